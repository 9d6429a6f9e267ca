"""Sparse decode and its grad_values (DESIGN.md §3.2): gathers of k decoder rows per batch row.

    forward:      x_hat[b]          = b_dec + sum_j values[b, j] * W_dec[indices[b, j]]
    grad_values:  grad_values[b, j] = grad_out[b] . W_dec[indices[b, j]]

values, indices [B, k] (int64), W_dec [n, d], b_dec [d], grad_out [B, d]; x_hat [B, d] and
grad_values [B, k] in values' dtype, float32 accumulation.

Tiles. A program owns BLOCK_B rows and BLOCK_D columns and walks the k slots, loading for each
the BLOCK_B gathered row segments W_dec[indices[:, j], cols] (the forward skips those whose
value is zero). The forward accumulates x_hat's tile; grad_values loads its grad_out tile once
and writes, per slot, the tile's part of each dot product to partial [d tiles, B, k] (float32),
which torch then sums over the tiles. (grad_values as a walk over d for BLOCK_P flat pairs,
which loaded a grad_out row once per pair, took 0.72 ms on an H100 at B=8192, d=2304,
n=65536, k=64, against 0.45 ms for the forward's same gathers.)

Pipelining. The walk over the slots is a tl.range pipelined STAGES deep: the gathers of later
slots are issued before this slot's are used. The autotuner picks the depth on a kernel's first
launch for each shape (autotuned), 16-bit tiles capped at WALK_REGISTERS registers a thread. On
an H100 (bf16, B=8192, d=2304, k=64, 2026-11-27) it picked depth 3 for the decode, 0.374 ms
against 0.481 ms at depth 1, and depth 1 for grad_values.

Cost. Each is 2*B*k*d FLOPs and reads B*k*d weight elements (gathered rows, each segment
contiguous), plus B*d elements of x_hat written or grad_out read, against the dense decode's
2*B*n*d FLOPs and dense [B, n] code.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# The pipelining depths of the decode's walks that the autotuner tries (see autotuned): at
# depth 4 the bfloat16 decode holds 3 slots' gathers in flight per warp (Triton 3.6, sm_90:
# 80 registers, no spills).
DECODE_STAGES = (1, 2, 3, 4)
# The walks' register cap for 16-bit inputs: 80 a thread lets 24 warps share an SM (6 programs of 4
# warps, 3 of 8). Unbounded, Triton 3.6 (sm_90, bfloat16) gives the decode at depth 3 96 registers
# and the nested loss's earlier forward 97 to 127 and its earlier walk back 80 to 111; capped, they
# spilled at most 64 bytes (the nested loss's forward walk today: none in its slot loop at depths 1
# and 2, nested_prefix_loss.py). float32 tiles, twice the bytes, are not capped (capped at 80 the
# nested loss's earlier walks spilled 88 to 152 bytes).
WALK_REGISTERS = 80
# Walks of fewer gathered elements (B * k * d) run at depth 1 untuned: they take microseconds,
# and each new shape would cost the autotuner a compile and a timing of every depth.
AUTOTUNE_MIN_ELEMENTS = 2**22
_WARPS = 4
# Sizes (elements) from which the walks compute offsets in 64 bits: W_dec's (latent * d_model)
# and the code's (row * k). Below, 32-bit arithmetic: the decode's slot at depth 3 takes 217
# instructions against 241 (sm_90 SASS, bfloat16, Triton 3.6; 156 against 173 at depth 1).
WIDE_ELEMENTS = 2**31
# Every autotuner that `autotuned` has made, with its kernel's name (for picked_depths).
_TUNERS: list[tuple[str, triton.runtime.Autotuner]] = []


def _blocks() -> tuple[int, int]:
    """(rows, columns) per program; small under the CPU interpreter."""
    return (4, 16) if os.environ.get("TRITON_INTERPRET") == "1" else (32, 128)


def wide_offsets(W_dec: Tensor, B: int, k: int) -> bool:
    """Whether a walk over the code [B, k] and W_dec needs 64-bit offsets (WIDE_ELEMENTS)."""
    return max(W_dec.numel(), B * k) >= WIDE_ELEMENTS


def walk_registers(dtype: torch.dtype) -> int | None:
    """The register cap of a walk over tiles of dtype (see WALK_REGISTERS)."""
    return None if dtype == torch.float32 else WALK_REGISTERS


@functools.cache
def autotuned(kernel: triton.JITFunction, num_warps: int, max_registers: int | None,
              depths: tuple[int, ...]) -> triton.runtime.Autotuner:
    """kernel (a walk over the k slots with a STAGES constexpr) under Triton's autotuner, which
    times each of the depths on the first launch for each (B, k, d) and dtypes and keeps the
    fastest. Under the CPU interpreter, depth 1 only.

    A walk waits for a slot's gathered rows before it issues the next slot's: with STAGES = 1
    the sm_90 SASS of the decode has one gather in flight per warp. The decode's 2.4 GB of
    gathers at B=8192, k=64, d=2304 took 0.45 ms on an H100 (5.4 TB/s of L2 reads, near what
    its L2 may deliver, and about what one 512-byte gather in flight per warp at 24 warps an SM
    allows at an L2 latency of some 600 cycles); the nested loss's earlier walks made the same
    gathers in 1.4 ms. With STAGES = s, Triton's pipeliner copies the rows s - 1 slots ahead
    into shared memory (cp.async), with a barrier per slot and more registers (or spills under
    max_registers): which depth is fastest depends on the kernel and the GPU. Only the loads
    move, so every depth computes the same bits."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        depths = (1,)
    configs = [triton.Config({"STAGES": s}, num_warps=num_warps, maxnreg=max_registers)
               for s in depths]
    # A few runs per depth: the kernels take milliseconds at most, and the depths differ by more
    # than the noise if they differ at all.
    tuner = triton.autotune(
        configs=configs, key=["B", "k", "d"],
        do_bench=lambda run, quantiles: triton.testing.do_bench(run, warmup=5, rep=20,
                                                                quantiles=quantiles),
    )(kernel)
    _TUNERS.append((kernel.__name__, tuner))
    return tuner


def picked_depths() -> dict[str, list[int]]:
    """The depths the autotuner has picked so far, by walk kernel, over the shapes it has met."""
    picked: dict[str, set[int]] = {}
    for name, tuner in _TUNERS:
        picked.setdefault(name, set()).update(c.kwargs["STAGES"] for c in tuner.cache.values())
    return {name: sorted(depths) for name, depths in picked.items()}


def launch_walk(kernel: triton.JITFunction, grid: tuple[int, ...], stages: int | None,
                depths: tuple[int, ...], num_warps: int, max_registers: int | None,
                *args: object, **constexprs: object) -> None:
    """Launches the walk kernel on grid with args and constexprs (all but STAGES): autotuned over
    depths when stages is None (at depth 1 below AUTOTUNE_MIN_ELEMENTS gathered elements
    B * k * d, read from the kernel's arguments of those names), else at that depth;
    max_registers: the cap (None: none)."""
    named = dict(zip(kernel.arg_names, args))
    if stages is None and named["B"] * named["k"] * named["d"] < AUTOTUNE_MIN_ELEMENTS:
        stages = 1
    if stages is None:
        autotuned(kernel, num_warps, max_registers, depths)[grid](*args, **constexprs)
    else:
        kernel[grid](*args, STAGES=stages, num_warps=num_warps, maxnreg=max_registers,
                     **constexprs)


@triton.jit
def _row_starts(rows, k, WIDE: tl.constexpr):
    """Where each of rows [BLOCK_B] starts in the code [B, k]: int64 offsets when WIDE."""
    if WIDE:
        return rows.to(tl.int64) * k
    else:
        return rows * k


@triton.jit
def _latents(i, WIDE: tl.constexpr):
    """The latents i (int64, as indices holds them) as the walk multiplies them by d_model:
    int32 unless WIDE."""
    if WIDE:
        return i
    else:
        return i.to(tl.int32)


@triton.jit
def _decode_kernel(
    val_ptr, idx_ptr, w_ptr, bias_ptr, out_ptr, B, k, d,
    WIDE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, STAGES: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < B
    col_ok = cols < d
    bias = tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    acc = tl.zeros([BLOCK_B, BLOCK_D], tl.float32) + bias[None, :]
    walk = _row_starts(rows, k, WIDE)
    for j in tl.range(0, k, num_stages=STAGES):
        slot = walk + j
        v = tl.load(val_ptr + slot, mask=row_ok, other=0.0).to(tl.float32)
        i = _latents(tl.load(idx_ptr + slot, mask=row_ok, other=0), WIDE)
        live = row_ok & (v != 0.0)
        w = tl.load(w_ptr + i[:, None] * d + cols[None, :], mask=live[:, None] & col_ok[None, :],
                    other=0.0)
        acc += v[:, None] * w.to(tl.float32)
    out = rows[:, None].to(tl.int64) * d + cols[None, :]
    tl.store(out_ptr + out, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _grad_values_kernel(
    g_ptr, idx_ptr, w_ptr, partial_ptr, B, k, d,
    WIDE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, STAGES: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < B
    tile = row_ok[:, None] & (cols < d)[None, :]
    g = tl.load(g_ptr + rows[:, None].to(tl.int64) * d + cols[None, :], mask=tile,
                other=0.0).to(tl.float32)
    out = partial_ptr + tl.program_id(1).to(tl.int64) * B * k
    walk = _row_starts(rows, k, WIDE)
    for j in tl.range(0, k, num_stages=STAGES):
        slot = walk + j
        i = _latents(tl.load(idx_ptr + slot, mask=row_ok, other=0), WIDE)
        w = tl.load(w_ptr + i[:, None] * d + cols[None, :], mask=tile, other=0.0)
        tl.store(out + slot, tl.sum(w.to(tl.float32) * g, axis=1), mask=row_ok)


def _check_code(floats: Tensor, name: str, indices: Tensor, W_dec: Tensor) -> None:
    """Checks indices [B, k] and W_dec against the float input `name` (values or grad_out)."""
    if floats.dtype not in _DTYPES:
        raise TypeError(
            f"the triton backend takes float32, bfloat16 or float16 tensors, got {name} of "
            f"{floats.dtype}; use backend='cuda' or 'reference' for other dtypes"
        )
    if indices.dim() != 2 or indices.dtype != torch.int64:
        raise TypeError(f"indices must be an int64 [B, k] tensor, got {indices.dtype} "
                        f"{list(indices.shape)}")
    if W_dec.dim() != 2 or W_dec.dtype != floats.dtype or W_dec.device != floats.device:
        raise TypeError(f"W_dec must be [d_sae, d_model] of {name}'s dtype {floats.dtype} on "
                        f"{floats.device}, got {list(W_dec.shape)} {W_dec.dtype} on {W_dec.device}")
    torch._assert_async(((indices >= 0) & (indices < W_dec.shape[0])).all(),
                        "indices must lie in [0, d_sae)")


def sparse_decode_forward(values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Tensor,
                          stages: int | None = None) -> Tensor:
    """x_hat [B, d] = b_dec + sum_j values[:, j] * W_dec[indices[:, j]]. Forward only.

    stages: the gathers' pipelining depth (see autotuned); None lets the autotuner choose."""
    _check_code(values, "values", indices, W_dec)
    if values.shape != indices.shape:
        raise ValueError(f"values and indices must both be [B, k], got {list(values.shape)} and "
                         f"{list(indices.shape)}")
    B, k = values.shape
    d = W_dec.shape[1]
    if b_dec.shape != (d,) or b_dec.dtype != values.dtype:
        raise ValueError(f"b_dec must be [d_model={d}] of {values.dtype}, got "
                         f"{list(b_dec.shape)} {b_dec.dtype}")
    out = torch.empty(B, d, dtype=values.dtype, device=values.device)
    block_b, block_d = _blocks()
    grid = (triton.cdiv(B, block_b), triton.cdiv(d, block_d))
    launch_walk(_decode_kernel, grid, stages, DECODE_STAGES, _WARPS, walk_registers(values.dtype),
                values.contiguous(), indices.contiguous(), W_dec.contiguous(),
                b_dec.contiguous(), out, B, k, d, WIDE=wide_offsets(W_dec, B, k),
                BLOCK_B=block_b, BLOCK_D=block_d)
    return out


def sparse_decode_grad_values(grad_out: Tensor, indices: Tensor, W_dec: Tensor,
                              stages: int | None = None) -> Tensor:
    """grad_values [B, k] = grad_out[b] . W_dec[indices[b, j]], in grad_out's dtype.

    stages: the gathers' pipelining depth (see autotuned); None lets the autotuner choose."""
    _check_code(grad_out, "grad_out", indices, W_dec)
    B, k = indices.shape
    d = W_dec.shape[1]
    if grad_out.shape != (B, d):
        raise ValueError(f"grad_out must be [B={B}, d_model={d}], got {list(grad_out.shape)}")
    block_b, block_d = _blocks()
    tiles = triton.cdiv(d, block_d)
    partial = torch.empty(tiles, B, k, dtype=torch.float32, device=grad_out.device)
    launch_walk(_grad_values_kernel, (triton.cdiv(B, block_b), tiles), stages, DECODE_STAGES,
                _WARPS, walk_registers(grad_out.dtype), grad_out.contiguous(),
                indices.contiguous(), W_dec.contiguous(), partial, B, k, d,
                WIDE=wide_offsets(W_dec, B, k), BLOCK_B=block_b, BLOCK_D=block_d)
    return partial.sum(0).to(grad_out.dtype)
