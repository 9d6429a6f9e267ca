"""Which kernel backends exist on this machine, and which one a call uses.

    backend = "auto" | "triton" | "cuda" | "cpp" | "reference"

``auto`` picks per device: CPU tensors use the C++ extension (``cpp``) where it was built,
else the pure-PyTorch ``reference``. The ``SPARSECODE_BACKEND`` environment variable
overrides whatever a module or call asked for. Asking for a backend that is missing raises
:class:`BackendUnavailableError` naming what is missing.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from typing import Any

import torch

BACKENDS = ("auto", "triton", "cuda", "cpp", "reference")
ENV_VAR = "SPARSECODE_BACKEND"


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


def _missing(name: str) -> str | None:
    """Why backend `name` cannot run here, or None when it can."""
    if name == "reference":
        return None
    if name == "cpp":
        return _CPP_MISSING
    if name == "cuda":
        if not torch.cuda.is_available():
            return "no CUDA device is visible to torch"
        return "this build of sparsecode._C has no CUDA kernels"
    if name == "triton":
        if importlib.util.find_spec("triton") is None:
            return "the triton package is not installed"
        return "this version of sparsecode has no Triton kernels"
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
    report["triton"]["interpreted"] = os.environ.get("TRITON_INTERPRET") == "1"
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

    `requested` is overridden by the SPARSECODE_BACKEND environment variable when set.
    """
    name = os.environ.get(ENV_VAR) or requested
    check_backend_name(name)
    if name == "auto":
        if device.type == "cpu" and _CPP_MISSING is None:
            return "cpp"
        return "reference"
    if name == "cpp" and device.type != "cpu":
        raise BackendUnavailableError(
            f"the cpp backend runs on CPU tensors, got tensors on {device}; "
            "use backend='auto' or move the tensors to the CPU"
        )
    return name


def kernels(name: str) -> Any:
    """The namespace of raw forward/backward kernels of a compiled backend."""
    if name == "cpp":
        return torch.ops.sparsecode_C
    raise BackendUnavailableError(f"backend {name!r} has no compiled kernels here")
