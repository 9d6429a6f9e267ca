"""The cuda backend (sparsecode._C built with CUDA) against the float64 references and the cpp
backend: small awkward shapes, the real size, determinism, and a full training step.

Outputs are poisoned (deterministic mode with uninitialised memory filled with NaN) while the
kernels under test run; references are computed in float64 on the GPU outside that mode.
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Iterator

# cuBLAS (the encode fallback's GEMM) is deterministic with a fixed workspace; older torch
# versions refuse it under torch.use_deterministic_algorithms(True) without this.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import pytest
import torch

from sparsecode import MatryoshkaSAE, ops, reference
from sparsecode.nested_prefix_loss import nested_prefix_loss_and_decode
from tests.conftest import TOLERANCE, assert_close, exact_tie_inputs, lowest_ids_first
from tests.test_latent_rows_sum import grouped_reference

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (B, d, n, k): every B in {1, 5, 33}, d in {7, 100}, n in {33, 1000}, k in {1, 3, 32}, plus a
# second column tile (d = 130), more slots than one shared-memory chunk (k = 300) and d = 264 (a
# multiple of 8: with SPARSECODE_TENSOR_CORES=1 the bfloat16 per-latent sums on the tensor cores,
# a second column tile of 8).
SMALL = [
    (1, 7, 33, 1),
    (5, 100, 33, 3),
    (33, 7, 1000, 32),
    (33, 100, 1000, 3),
    (5, 100, 1000, 32),
    (1, 100, 1000, 1),
    (5, 7, 33, 32),
    (5, 130, 1000, 300),
    (33, 264, 1000, 5),
]
REAL = (8192, 2304, 65536, 64)
REAL_SIZES = [2048, 4096, 8192, 16384, 32768, 65536]


# Runs a test as it is (bfloat16 per-latent sums on the CUDA cores, the default) and with
# SPARSECODE_TENSOR_CORES=1 (on the tensor cores): the tensor_cores fixture of tests/conftest.py.
BOTH_CORES = pytest.mark.parametrize("tensor_cores", [False, True], indirect=True,
                                     ids=["cuda cores", "tensor cores"])


@contextlib.contextmanager
def poisoned() -> Iterator[None]:
    """Deterministic mode, with every uninitialised output filled with NaN (ints: their max)."""
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    was_filling = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
        torch.utils.deterministic.fill_uninitialized_memory = was_filling


def random_code(B: int, n: int, k: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """values [B, k] in [0.1, 1.1) and distinct indices [B, k], sorted per row, on the GPU."""
    indices = torch.rand(B, n, device="cuda").topk(k, dim=1).indices.sort(dim=1).values
    return (torch.rand(B, k, device="cuda") + 0.1).to(dtype), indices


def leaves(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.detach().requires_grad_() for t in tensors]


def as64(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return [t.detach().double().requires_grad_() for t in tensors]


def on_cpu(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return [t.detach().cpu().requires_grad_() for t in tensors]


def check_all(outs, refs, tol: float, names: list[str]) -> None:
    for name, out, ref in zip(names, outs, refs, strict=True):
        assert_close(out, ref, tol, name)


def check_encode(B: int, d: int, n: int, k: int, dtype: torch.dtype, cpp: bool) -> None:
    """topk_encode on CUDA: the selection is a top-k of the float64 pre-activations; values and
    gradients match float64 at the kernel's own indices (and its own relu mask, so that a value
    that rounds across zero in bf16 cannot hide a gradient error); cpp gives the same."""
    tol = TOLERANCE[dtype]
    inputs = leaves(
        torch.randn(B, d, device="cuda", dtype=dtype),
        torch.randn(d, n, device="cuda", dtype=dtype) / d**0.5,
        torch.randn(n, device="cuda", dtype=dtype) * 0.1,
        torch.randn(d, device="cuda", dtype=dtype) * 0.1,
    )
    grad = torch.randn(B, k, device="cuda", dtype=dtype)
    with poisoned():
        values, indices = ops.topk_encode(*inputs, k, backend="cuda")
        grads = torch.autograd.grad(values, inputs, grad)

    assert indices.dtype == torch.int64 and indices.shape == (B, k)
    assert bool((indices[:, 1:] > indices[:, :-1]).all()), "indices not sorted and distinct"
    inputs64 = as64(inputs)
    x, W_enc, b_enc, b_dec = inputs64
    pre = (x - b_dec) @ W_enc + b_enc
    if k < n:
        pre_d = pre.detach()
        chosen = pre_d.gather(1, indices).min(1).values
        others = pre_d.scatter(1, indices, float("-inf")).max(1).values
        assert bool((chosen >= others - tol * pre_d.abs().max()).all()), "not a top-k"
        del pre_d, others
    picked = pre.gather(1, indices)
    assert_close(values, torch.relu(picked), tol, "values")
    ref_grads = torch.autograd.grad(picked, inputs64, grad.double() * (values > 0))
    check_all(grads, ref_grads, tol, ["grad x", "grad W_enc", "grad b_enc", "grad b_dec"])
    del pre, picked, ref_grads, inputs64
    # Without grad_x (a training step) the other gradients are unchanged.
    raw = tuple(t.detach() for t in (grad, inputs[0], inputs[1], inputs[3], values, indices))
    lean = torch.ops.sparsecode_C.topk_encode_backward(*raw, False)
    assert lean[0].shape == (0, d)
    check_all(lean[1:], grads[1:], tol, ["lean grad W_enc", "lean grad b_enc", "lean grad b_dec"])

    if not cpp:
        return
    if dtype == torch.float32:
        # The same selected values (a float32 near-tie may pick another latent of equal value).
        cpu_values, _ = ops.topk_encode(*on_cpu(inputs), k, backend="cpp")
        assert_close(values.sort(1).values, cpu_values.cuda().sort(1).values, tol, "values vs cpp")
    # The backward with the same code on both devices (bf16 selections may differ by ties).
    cpu_grads = torch.ops.sparsecode_C.topk_encode_backward(*(t.cpu() for t in raw))
    check_all(grads, [g.cuda() for g in cpu_grads], tol,
              ["grad x vs cpp", "grad W_enc vs cpp", "grad b_enc vs cpp", "grad b_dec vs cpp"])


def check_decode(B: int, d: int, n: int, k: int, dtype: torch.dtype, cpp: bool) -> None:
    """sparse_decode forward and backward, and latent_rows_sum, on CUDA."""
    tol = TOLERANCE[dtype]
    values, indices = random_code(B, n, k, dtype)
    inputs = leaves(
        values,
        torch.randn(n, d, device="cuda", dtype=dtype) / d**0.5,
        torch.randn(d, device="cuda", dtype=dtype) * 0.1,
    )
    grad = torch.randn(B, d, device="cuda", dtype=dtype)
    coef = torch.randn(B, k, device="cuda")
    with poisoned():
        out = ops.sparse_decode(inputs[0], indices, inputs[1], inputs[2], backend="cuda")
        grads = torch.autograd.grad(out, inputs, grad)
        rows = torch.ops.sparsecode_C.latent_rows_sum(coef, indices, grad, n)

    inputs64 = as64(inputs)
    ref = reference.sparse_decode(inputs64[0], indices, inputs64[1], inputs64[2])
    assert_close(out, ref, tol, "x_hat")
    ref_grads = torch.autograd.grad(ref, inputs64, grad.double())
    check_all(grads, ref_grads, tol, ["grad values", "grad W_dec", "grad b_dec"])
    del ref, ref_grads, inputs64
    assert rows.dtype == dtype
    ref_rows = reference.dense_code(coef.double(), indices, n).T @ grad.double()
    assert_close(rows, ref_rows, tol, "latent_rows_sum")
    del ref_rows
    if B * k * d <= 1 << 22:  # the src rows that src_rows names
        src = torch.randn(3 * B, d, device="cuda", dtype=dtype)
        src_rows = torch.randint(0, 3 * B, (B, k), device="cuda")
        with poisoned():
            grouped = torch.ops.sparsecode_C.latent_rows_sum(coef, indices, src, n, src_rows)
        assert grouped.dtype == dtype
        assert_close(grouped, grouped_reference(coef, indices, src, src_rows, n), tol,
                     "latent_rows_sum with src_rows")
        # The fused sums and dots, with zero coefficients (their dots are still made); a copy,
        # since coef is checked against the cpp backend below.
        zeroed = coef.clone()
        zeroed[:, ::3] = 0.0
        with poisoned():
            summed, dots = torch.ops.sparsecode_C.latent_rows_sum_dots(zeroed, indices, src,
                                                                       inputs[1], src_rows)
        assert_close(summed, grouped_reference(zeroed, indices, src, src_rows, n), tol,
                     "latent_rows_sum_dots sums")
        ref_dots = (src.double()[src_rows] * inputs[1].detach().double()[indices]).sum(-1)
        assert_close(dots, ref_dots, tol, "latent_rows_sum_dots dots")
        cpu_summed, cpu_dots = torch.ops.sparsecode_C.latent_rows_sum_dots(
            zeroed.cpu(), indices.cpu(), src.cpu(), inputs[1].detach().cpu(), src_rows.cpu())
        assert_close(summed, cpu_summed.cuda(), tol, "latent_rows_sum_dots sums vs cpp")
        assert_close(dots, cpu_dots.cuda(), tol, "latent_rows_sum_dots dots vs cpp")

    if not cpp:
        return
    cpu_inputs = on_cpu(inputs)
    cpu_out = ops.sparse_decode(cpu_inputs[0], indices.cpu(), cpu_inputs[1], cpu_inputs[2],
                                backend="cpp")
    cpu_grads = torch.autograd.grad(cpu_out, cpu_inputs, grad.cpu())
    assert_close(out, cpu_out.cuda(), tol, "x_hat vs cpp")
    check_all(grads, [g.cuda() for g in cpu_grads], tol,
              ["grad values vs cpp", "grad W_dec vs cpp", "grad b_dec vs cpp"])
    cpu_rows = torch.ops.sparsecode_C.latent_rows_sum(coef.cpu(), indices.cpu(), grad.cpu(), n)
    assert_close(rows, cpu_rows.cuda(), tol, "latent_rows_sum vs cpp")


def check_nested(B: int, d: int, n: int, k: int, dtype: torch.dtype, sizes: list[int],
                 cpp: bool, shuffle: bool = False) -> None:
    """The nested-prefix loss and its reconstruction, forward and backward, on CUDA, with
    upstream gradients on all three outputs (x_hat's scaled like the loss's, 1/B)."""
    tol = TOLERANCE[dtype]
    values, indices = random_code(B, n, k, dtype)
    if shuffle:
        order = torch.randperm(k, device="cuda")
        values, indices = values[:, order], indices[:, order]
    inputs = leaves(
        torch.randn(B, d, device="cuda", dtype=dtype),
        values,
        torch.randn(n, d, device="cuda", dtype=dtype) / d**0.5,
        torch.randn(d, device="cuda", dtype=dtype) * 0.1,
    )
    weights = (torch.rand(len(sizes)) + 0.1).tolist()
    upstream = [
        torch.randn((), device="cuda", dtype=dtype),
        torch.randn(len(sizes), device="cuda", dtype=dtype),
        torch.randn(B, d, device="cuda", dtype=dtype) / B,
    ]
    names = ["loss", "prefix_losses", "x_hat"]
    grad_names = ["grad x", "grad values", "grad W_dec", "grad b_dec"]

    def run(x, v, W, b, idx, backend):
        return nested_prefix_loss_and_decode(x, v, idx, W, b, sizes, weights, backend=backend)

    with poisoned():
        outs = run(*inputs, indices, "cuda")
        grads = torch.autograd.grad(outs, inputs, upstream)

    x, v, W, b = as64(inputs)
    loss, prefix_losses = reference.nested_prefix_loss(x, v, indices, W, b, sizes, weights)
    refs = (loss, prefix_losses, reference.sparse_decode(v, indices, W, b))
    check_all(outs, refs, tol, names)
    ref_grads = torch.autograd.grad(refs, [x, v, W, b], [u.double() for u in upstream])
    check_all(grads, ref_grads, tol, grad_names)
    del refs, ref_grads, loss, prefix_losses, x, v, W, b

    if not cpp:
        return
    cpu_inputs = on_cpu(inputs)
    cpu_outs = run(*cpu_inputs, indices.cpu(), "cpp")
    cpu_grads = torch.autograd.grad(cpu_outs, cpu_inputs, [u.cpu() for u in upstream])
    check_all(outs, [o.cuda() for o in cpu_outs], tol, [f"{m} vs cpp" for m in names])
    check_all(grads, [g.cuda() for g in cpu_grads], tol, [f"{m} vs cpp" for m in grad_names])


def test_kernels_are_registered_for_cuda():
    for op in ["topk_encode_forward", "topk_encode_backward", "sparse_decode_forward",
               "sparse_decode_backward", "nested_prefix_loss_forward",
               "nested_prefix_loss_backward", "latent_rows_sum", "latent_rows_sum_dots",
               "nested_prefix_sums"]:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"sparsecode_C::{op}", "CUDA"), op


def test_tensor_core_sums_keep_the_coefficients_float32_bits(monkeypatch):
    """The bfloat16 per-latent sums on the tensor cores take each float32 coefficient as two
    bfloat16 (hi + lo): latent 3's coefficients 1 + 2^-12 and -1 on equal rows of ones sum to
    2^-12 (0 with the hi parts alone), and their dots with rows of ones are d."""
    monkeypatch.setenv("SPARSECODE_TENSOR_CORES", "1")
    n, d = 40, 16
    coef = torch.tensor([[1 + 2.0**-12], [-1.0]], device="cuda")
    indices = torch.full((2, 1), 3, device="cuda")
    src = torch.ones(2, d, device="cuda", dtype=torch.bfloat16)
    want = torch.zeros(n, d, device="cuda", dtype=torch.bfloat16)
    want[3] = 2.0**-12
    assert torch.equal(torch.ops.sparsecode_C.latent_rows_sum(coef, indices, src, n), want)
    weights = torch.ones(n, d, device="cuda", dtype=torch.bfloat16)
    summed, dots = torch.ops.sparsecode_C.latent_rows_sum_dots(coef, indices, src, weights)
    assert torch.equal(summed, want)
    assert torch.equal(dots, torch.full((2, 1), float(d), device="cuda"))


def test_only_tensor_cores_on_takes_the_per_latent_sums_to_the_tensor_cores(monkeypatch):
    """The bfloat16 sums run on the CUDA cores unless SPARSECODE_TENSOR_CORES is 1 (read at each
    launch). Told apart by a NaN in latent 3's row: the tensor-core kernel multiplies it into the
    columns of all 8 latents of its warp (latent 2's among them), the CUDA-core kernel into
    latent 3's alone."""
    n, d = 40, 16
    coef = torch.tensor([[2.0], [1.0]], device="cuda")
    indices = torch.tensor([[2], [3]], device="cuda")
    src = torch.ones(2, d, device="cuda", dtype=torch.bfloat16)
    src[1, 5] = float("nan")
    monkeypatch.delenv("SPARSECODE_TENSOR_CORES", raising=False)
    for setting, spread in [(None, False), ("0", False), ("1", True)]:
        if setting is not None:
            monkeypatch.setenv("SPARSECODE_TENSOR_CORES", setting)
        out = torch.ops.sparsecode_C.latent_rows_sum(coef, indices, src, n)
        assert bool(out[3, 5].isnan()) and bool(out[2, 5].isnan()) == spread, setting
        if not spread:
            assert torch.equal(out[2], torch.full((d,), 2.0, device="cuda", dtype=torch.bfloat16))


@pytest.mark.parametrize("B,d,n,k", SMALL)
def test_encode_small(B, d, n, k, seed):
    for dtype in DTYPES:
        check_encode(B, d, n, k, dtype, cpp=True)


@BOTH_CORES
@pytest.mark.parametrize("B,d,n,k", SMALL)
def test_decode_small(B, d, n, k, tensor_cores, seed):
    for dtype in DTYPES:
        check_decode(B, d, n, k, dtype, cpp=True)


@BOTH_CORES
@pytest.mark.parametrize("G", [1, 3])
@pytest.mark.parametrize("B,d,n,k", SMALL)
def test_nested_small(B, d, n, k, G, tensor_cores, seed):
    sizes = [n] if G == 1 else [max(1, n // 4), n // 2, n]
    for dtype in DTYPES:
        check_nested(B, d, n, k, dtype, sizes, cpp=True, shuffle=(B == 5))


@pytest.mark.parametrize("d", [100, 130])
def test_nested_most_groups(d, seed):
    """G = 16 prefixes (the cuda backend's most), with float64 too: up to 15 group boundaries
    in one row's reverse walk; d = 100 takes the vector path, d = 130 the strided one."""
    sizes = [2 * (g + 1) for g in range(15)] + [1000]
    for dtype in [*DTYPES, torch.float64]:
        check_nested(33, d, 1000, 32, dtype, sizes, cpp=True, shuffle=True)


def test_exact_ties_keep_the_lower_latent(seed):
    """Integer inputs make every pre-activation an exact integer: rows full of ties. Like the
    cpp kernel, the lower latent id wins among equals."""
    k = 8
    x, W_enc, b_enc, b_dec = exact_tie_inputs(9, 16, 40)
    cpu_values, cpu_indices = ops.topk_encode(x, W_enc, b_enc, b_dec, k, backend="cpp")
    with poisoned():
        values, indices = ops.topk_encode(
            x.cuda(), W_enc.cuda(), b_enc.cuda(), b_dec.cuda(), k, backend="cuda"
        )
    assert torch.equal(indices.cpu(), cpu_indices)
    assert torch.equal(values.cpu(), cpu_values)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_encode_by_row_and_column_ranges(dtype, seed):
    """Past 65536 rows the cuda encode makes its pre-activations by row ranges as well as by
    column ranges (here 2 of each, the second 44 columns wide): integer inputs make every
    pre-activation exact in every dtype, so the selection is the rule's (lowest ids first
    among equals) exactly."""
    B, d, n, k = 70000, 8, 300, 5
    x, W_enc, b_enc, b_dec = exact_tie_inputs(B, d, n, dtype, "cuda")
    with poisoned():
        values, indices = ops.topk_encode(x, W_enc, b_enc, b_dec, k, backend="cuda")
    pre = ((x - b_dec).double() @ W_enc.double() + b_enc.double())
    want = lowest_ids_first(pre, k)
    assert torch.equal(indices, want)
    assert torch.equal(values, torch.relu(pre.gather(1, want)).to(dtype))


@BOTH_CORES
@pytest.mark.parametrize("dtype", DTYPES)
def test_real_size(dtype, tensor_cores, seed):
    """B = 8192, d_model = 2304, d_sae = 65536, k = 64, G = 6, against float64; in float32
    also against the cpp backend's sparse backward and nested loss (their CPU cost is
    O(B k d))."""
    B, d, n, k = REAL
    cpp = dtype == torch.float32
    check_decode(B, d, n, k, dtype, cpp=cpp)
    torch.cuda.empty_cache()
    check_nested(B, d, n, k, dtype, REAL_SIZES, cpp=cpp)
    torch.cuda.empty_cache()


@pytest.mark.parametrize("dtype", DTYPES)
def test_real_size_encode(dtype, seed):
    """The encode at the real size against float64 (the cpp encode forward's dense GEMM is
    left to the small sizes)."""
    check_encode(*REAL, dtype, cpp=False)
    torch.cuda.empty_cache()


@BOTH_CORES
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_deterministic(dtype, tensor_cores, seed):
    """Two runs under torch.use_deterministic_algorithms(True) are bit-identical, with latent 0
    active in every row (a long segment) and many latents shared between rows."""
    B, d, n, k = 512, 256, 4096, 32
    values, indices = random_code(B, n // 8, k, dtype)
    indices[:, 0] = 0
    x = torch.randn(B, d, device="cuda", dtype=dtype)
    W_enc = torch.randn(d, n, device="cuda", dtype=dtype) / d**0.5
    b_enc = torch.randn(n, device="cuda", dtype=dtype) * 0.1
    W_dec = torch.randn(n, d, device="cuda", dtype=dtype) / d**0.5
    b_dec = torch.randn(d, device="cuda", dtype=dtype) * 0.1
    grad_values = torch.randn(B, k, device="cuda", dtype=dtype)
    grad_out = torch.randn(B, d, device="cuda", dtype=dtype)
    coef = torch.randn(B, k, device="cuda")
    sizes, weights = [64, 512, n], [0.5, 0.3, 0.2]
    grad_loss = torch.ones((), device="cuda", dtype=dtype)
    grad_prefix = torch.randn(3, device="cuda", dtype=dtype)
    C = torch.ops.sparsecode_C

    def run() -> list[torch.Tensor]:
        with poisoned():
            nested = C.nested_prefix_loss_forward(x, values, indices, W_dec, b_dec, sizes, weights)
            return [
                *C.topk_encode_forward(x, W_enc, b_enc, b_dec, k),
                *C.topk_encode_backward(grad_values, x, W_enc, b_dec, values, indices),
                C.sparse_decode_forward(values, indices, W_dec, b_dec),
                *C.sparse_decode_backward(grad_out, values, indices, W_dec),
                C.latent_rows_sum(coef, indices, grad_out, n),
                *C.latent_rows_sum_dots(coef, indices, grad_out, W_dec),
                *nested,
                *C.nested_prefix_loss_backward(grad_loss, grad_prefix, grad_out, x, values,
                                               indices, W_dec, b_dec, sizes, weights, nested[3]),
            ]

    for a, b in zip(run(), run(), strict=True):
        assert torch.equal(a, b)


def test_matryoshka_adam_step_matches_reference(seed):
    """One full training step (encode, nested loss, backward, Adam) with backend="cuda" gives
    the parameters that the same step with the reference backend gives."""
    sae = MatryoshkaSAE(64, 512, 16, [32, 128, 512], backend="cuda", device="cuda")
    ref_sae = copy.deepcopy(sae)
    ref_sae.backend = "reference"
    x = torch.randn(256, 64, device="cuda")
    for model in (sae, ref_sae):
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        model(x).loss.backward()
        optimizer.step()
    for (name, p), ref in zip(sae.named_parameters(), ref_sae.parameters(), strict=True):
        assert_close(p, ref, 1e-5, name)
