"""One Adam step on a flat parameter kept in low precision, with float32 master weights.

    m      = beta1 * m + (1 - beta1) * g
    v      = beta2 * v + (1 - beta2) * g * g
    master = master - step_size * m / (sqrt(v) / bc2_sqrt + eps)
    param  = master rounded to param's dtype

param [n] (float32, bfloat16 or float16), grad [n] in param's dtype, master, m, v [n] float32;
step_size = lr / (1 - beta1^t) and bc2_sqrt = sqrt(1 - beta2^t) for step t (the arithmetic of
torch's fused Adam). A float32 parameter is its own master (HAS_MASTER false).

Tiles. A program of 4 warps owns BLOCK = 512 contiguous elements (4 per thread) and reads and
writes each of them once. Compiled for sm_90 (Triton 3.9, ptxas -v) that takes 32 registers
per thread, so an SM holds its full 64 warps; 2048 elements per 4 warps took 224 registers.

Cost. About 12 FLOPs per element; bytes: the gradient and m, v, master read and written
(2 + 3 * 8 + 2 = 28 bytes per bfloat16 element, the same as torch's fused Adam on float32
parameters reading a float32 gradient), with no float32 copy of the gradient or the parameter.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl
from torch import Tensor


def _block() -> int:
    """Elements per program; small under the CPU interpreter."""
    return 64 if os.environ.get("TRITON_INTERPRET") == "1" else 512


@triton.jit
def _master_adam_kernel(
    param_ptr, grad_ptr, master_ptr, m_ptr, v_ptr, n,
    step_size, beta1, beta2, eps, bc2_sqrt,
    HAS_MASTER: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_MASTER:
        p = tl.load(master_ptr + offs, mask=mask, other=0.0)
    else:
        p = tl.load(param_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m = beta1 * tl.load(m_ptr + offs, mask=mask, other=0.0) + (1.0 - beta1) * g
    v = beta2 * tl.load(v_ptr + offs, mask=mask, other=0.0) + (1.0 - beta2) * g * g
    p = p - step_size * m / (tl.sqrt(v) / bc2_sqrt + eps)
    tl.store(m_ptr + offs, m, mask=mask)
    tl.store(v_ptr + offs, v, mask=mask)
    if HAS_MASTER:
        tl.store(master_ptr + offs, p, mask=mask)
    tl.store(param_ptr + offs, p.to(param_ptr.dtype.element_ty), mask=mask)


def master_adam_step(
    param: Tensor, grad: Tensor, master: Tensor | None, exp_avg: Tensor, exp_avg_sq: Tensor,
    step_size: float, beta1: float, beta2: float, eps: float, bc2_sqrt: float,
) -> None:
    """Updates exp_avg, exp_avg_sq, master and param in place (all contiguous, param's shape;
    grad in param's dtype; master None when param is float32)."""
    n = param.numel()
    block = _block()
    _master_adam_kernel[(triton.cdiv(n, block),)](
        param, grad, param if master is None else master, exp_avg, exp_avg_sq, n,
        step_size, beta1, beta2, eps, bc2_sqrt, HAS_MASTER=master is not None, BLOCK=block,
    )
