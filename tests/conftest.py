"""Shared test helpers: fresh random seeds, a relative-error assert, poisoned outputs, exact
ties for the TopK encode."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

# Without a GPU the Triton kernels run interpreted on the CPU; Triton reads this when a kernel
# module is imported, so it is set before any test imports one.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# DESIGN.md §5: relative error against a float64 reference.
TOLERANCE = {torch.float64: 1e-5, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-2}


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (0 when both are zero)."""
    out64, ref64 = out.detach().double(), ref.detach().double()
    denom = ref64.norm().item()
    diff = (out64 - ref64).norm().item()
    return diff if denom == 0 else diff / denom


def assert_close(out: torch.Tensor, ref: torch.Tensor, tol: float, name: str = "output") -> None:
    """Fails with the relative error when out is NaN/Inf, mis-shaped, or off by more than tol."""
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{name}: contains NaN/Inf"
    err = rel_error(out, ref)
    assert err <= tol, f"{name}: relative error {err:.3e} > {tol:.1e}"


def exact_tie_inputs(B: int, d: int, n: int, dtype: torch.dtype = torch.float32,
                     device: str = "cpu") -> list[torch.Tensor]:
    """x [B, d], W_enc [d, n], b_enc [n], b_dec [d] of small integers: every pre-activation is
    an exact integer whatever order a GEMM sums in, so rows are full of exact ties."""
    return [torch.randint(-3, 4, (B, d)).to(device, dtype),
            torch.randint(-2, 3, (d, n)).to(device, dtype),
            torch.randint(-2, 3, (n,)).to(device, dtype),
            torch.randint(-1, 2, (d,)).to(device, dtype)]


def lowest_ids_first(pre: torch.Tensor, k: int) -> torch.Tensor:
    """indices [B, k], ascending, of each row's k largest entries of pre [B, n], the lower id
    first among equals."""
    return torch.sort(pre, dim=1, descending=True, stable=True).indices[:, :k].sort(1).values


@pytest.fixture
def tensor_cores(request, monkeypatch) -> bool:
    """Indirectly parametrized with a bool: whether the test runs with SPARSECODE_TENSOR_CORES=1
    (the bfloat16 kernels written for the tensor cores) or with the variable unset (the
    default kernels)."""
    if request.param:
        monkeypatch.setenv("SPARSECODE_TENSOR_CORES", "1")
    else:
        monkeypatch.delenv("SPARSECODE_TENSOR_CORES", raising=False)
    return request.param


@pytest.fixture
def seed() -> int:
    """A fresh random seed per test, printed so a failure can be replayed (SPARSECODE_SEED)."""
    value = int(os.environ.get("SPARSECODE_SEED", int.from_bytes(os.urandom(4), "little")))
    torch.manual_seed(value)
    print(f"seed={value}")
    return value


@pytest.fixture
def poisoned():
    """Every uninitialised tensor (torch.empty here, at::empty in the C++ kernels) starts as NaN
    (ints as their max value), so an output element a kernel forgets to write fails the test."""
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    was_filling = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(was_deterministic)
    torch.utils.deterministic.fill_uninitialized_memory = was_filling


@pytest.fixture
def hide_package(monkeypatch):
    """hide(name): from then on importlib.util.find_spec(name) returns None, as if the package
    were not installed."""
    real_find_spec = importlib.util.find_spec

    def hide(name: str) -> None:
        monkeypatch.setattr(
            importlib.util, "find_spec",
            lambda wanted, *args: None if wanted == name else real_find_spec(wanted, *args),
        )

    return hide
