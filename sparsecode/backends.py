"""Which kernel backends exist on this machine, and which one a call uses.

    backend = "auto" | "triton" | "cuda" | "cpp" | "reference"

``auto`` picks per device: CPU tensors use the C++ extension (``cpp``) where it was built,
else the pure-PyTorch ``reference``; CUDA tensors use ``triton`` where Triton is installed
(its encode and decode kernels, with the CUDA extension's sparse weight gradients), else
``cuda`` where the extension was built with CUDA, else ``reference``. Triton kernels run on
CPU tensors only interpreted (``TRITON_INTERPRET=1``), which is how CI checks them. The
``SPARSECODE_BACKEND`` environment variable overrides whatever a module or call asked for.
``SPARSECODE_TENSOR_CORES=1`` runs the bfloat16 kernels written for the tensor cores (the
CUDA per-latent weight-gradient sums, the triton backend's pass over the nested loss's rows)
in place of the CUDA-core kernels and the Triton walk. They are off by default: on an H200 the
tensor-core per-latent sums took 0.96 ms against 0.50, and a Matryoshka training step 11.2 ms
against 10.4 (benchmarks/RESULTS.md).
Asking for a backend that is missing raises :class:`BackendUnavailableError` naming what is
missing.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from typing import Any

import torch

BACKENDS = ("auto", "triton", "cuda", "cpp", "reference")
ENV_VAR = "SPARSECODE_BACKEND"
TENSOR_CORES_ENV_VAR = "SPARSECODE_TENSOR_CORES"


class BackendUnavailableError(RuntimeError):
    """A backend was asked for that this machine or this build does not have."""


def _import_extension() -> str | None:
    """Imports sparsecode._C (registering torch.ops.sparsecode_C); returns why not, or None."""
    try:
        from sparsecode import _C  # noqa: F401
    except ImportError as err:
        return (
            f"the C++ extension sparsecode._C could not be imported ({err}); rebuild it with "
            "`pip install --no-build-isolation -e .` after `pip install torch`"
        )
    return None


_CPP_MISSING = _import_extension()
if _CPP_MISSING is not None:
    warnings.warn(
        f"sparsecode: the cpp backend is unavailable, so CPU ops use the slow pure-PyTorch "
        f"reference: {_CPP_MISSING}",
        RuntimeWarning,
        stacklevel=2,
    )


# Looked up once: torch.compile cannot trace find_spec inside an op's dispatch.
_TRITON_FOUND = importlib.util.find_spec("triton") is not None


def tensor_cores_allowed() -> bool:
    """True when SPARSECODE_TENSOR_CORES is "1": the tensor-core kernels may run (the
    extension's C++ reads the same variable for its per-latent sums)."""
    return os.environ.get(TENSOR_CORES_ENV_VAR) == "1"


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _has_kernels(dispatch_key: str) -> bool:
    op = "sparsecode_C::topk_encode_forward"
    return _CPP_MISSING is None and torch._C._dispatch_has_kernel_for_dispatch_key(op, dispatch_key)


# Which device types the extension has kernels for; fixed at build time, so read once (and
# read as a plain dict lookup when torch.compile traces an op).
_COMPILED_FOR = {"cpu": _has_kernels("CPU"), "cuda": _has_kernels("CUDA")}


def compiled_kernels(device: torch.device) -> Any | None:
    """torch.ops.sparsecode_C when the extension has kernels for `device`'s type, else None."""
    return torch.ops.sparsecode_C if _COMPILED_FOR.get(device.type, False) else None


def _missing(name: str) -> str | None:
    """Why backend `name` cannot run here, or None when it can."""
    if name == "reference":
        return None
    if name == "cpp":
        return _CPP_MISSING
    if name == "cuda":
        if not torch.cuda.is_available():
            return "no CUDA device is visible to torch"
        if _CPP_MISSING is not None:
            return _CPP_MISSING
        if compiled_kernels(torch.device("cuda")) is None:
            return (
                "this build of sparsecode._C has no CUDA kernels; rebuild it with nvcc and a "
                "CUDA build of torch: pip install --no-build-isolation -e . "
                "-Ccmake.define.SPARSECODE_CUDA=ON"
            )
        return None
    if name == "triton":
        if not _TRITON_FOUND:
            return "the triton package is not installed (pip install triton)"
        if not torch.cuda.is_available() and not _interpreted():
            return (
                "no CUDA device is visible to torch (set TRITON_INTERPRET=1 to run the Triton "
                "kernels interpreted on the CPU, slowly)"
            )
        return None
    raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")


def backends() -> dict[str, dict[str, Any]]:
    """What each backend needs and whether this machine has it.

    Returns ``{name: {"available": bool, "reason": str | None}}`` for ``cpp``, ``cuda``,
    ``triton`` and ``reference``; the ``triton`` entry also says whether Triton would run
    interpreted on the CPU (``TRITON_INTERPRET=1``).
    """
    report = {}
    for name in ("cpp", "cuda", "triton", "reference"):
        reason = _missing(name)
        report[name] = {"available": reason is None, "reason": reason}
    report["triton"]["interpreted"] = _interpreted()
    return report


def check_backend_name(name: str) -> None:
    """Raises unless `name` is a known backend that can run on this machine."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    if name != "auto":
        reason = _missing(name)
        if reason is not None:
            raise BackendUnavailableError(
                f"backend {name!r} is not available here: {reason}. "
                "Use backend='auto' to pick the fastest available one."
            )


def resolve_backend(requested: str, device: torch.device) -> str:
    """The concrete backend that runs an op on tensors on `device`.

    `requested` is overridden by the SPARSECODE_BACKEND environment variable when set. For
    "auto" on CUDA tensors, triton where it is available, else cuda, else the reference.
    """
    name = os.environ.get(ENV_VAR) or requested
    check_backend_name(name)
    if name == "auto":
        if device.type == "cpu":
            return "cpp" if _CPP_MISSING is None else "reference"
        if device.type == "cuda":
            for candidate in ("triton", "cuda"):
                if _missing(candidate) is None:
                    return candidate
        return "reference"
    if name == "cpp" and device.type != "cpu":
        raise BackendUnavailableError(
            f"the cpp backend runs on CPU tensors, got tensors on {device}; "
            "use backend='auto' or move the tensors to the CPU"
        )
    if name == "cuda" and device.type != "cuda":
        raise BackendUnavailableError(
            f"the cuda backend runs on CUDA tensors, got tensors on {device}; "
            "use backend='auto' or move the tensors to the GPU"
        )
    if name == "triton" and device.type != "cuda" and not (device.type == "cpu" and _interpreted()):
        raise BackendUnavailableError(
            f"the triton backend runs on CUDA tensors, got tensors on {device} (CPU tensors "
            "only with TRITON_INTERPRET=1); use backend='auto' or move the tensors to the GPU"
        )
    return name


def kernels(name: str, device: torch.device) -> Any:
    """The raw compiled kernels (torch.ops.sparsecode_C) that backend `name` uses on `device`.

    ``cpp`` and ``cuda`` name the extension's CPU and CUDA kernels; ``triton`` uses them for
    the ops and gradients it has no Triton kernel for.
    """
    found = compiled_kernels(device)
    if found is None:
        raise BackendUnavailableError(
            f"backend {name!r} needs sparsecode._C kernels for {device.type} tensors, and this "
            "build has none"
        )
    return found
