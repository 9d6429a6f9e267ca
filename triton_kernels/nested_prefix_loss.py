"""Nested-prefix (Matryoshka) loss forward and backward (DESIGN.md §3.4): every prefix's
squared residual, the full reconstruction and the loss's own suffix sums from one walk of
gathered decoder rows per row, as the sparse decode makes, and every gradient from those suffix
sums without a walk (under other upstream gradients than the loss's alone, from the residuals
of the walk made again).

    group[b, j]      = the first g with indices[b, j] < prefix_sizes[g]
    r_g[b]           = x[b] - b_dec - sum of values[b, j] * W_dec[indices[b, j]] over the slots
                       of groups <= g                                   (R [G, B, d], float32)
    partial[t, b, g] = sum of r_g[b, c]^2 over the columns c of column tile t   (float32)
    x_hat[b]         = x[b] - r_{G-1}[b]
    backward, with scale_g = 2 (grad_loss w_g + grad_prefix_losses[g]) / B and the upstream
    grad_x_hat (zero when absent):
    S_h[b]           = sum over g >= h of scale_g r_g[b] - grad_x_hat[b]
    grad_values[b,j] = -W_dec[indices[b, j]] . S_{group[b, j]}[b]
    grad_W_dec[i]    = -sum over the pairs (b, j) of latent i of values[b, j] S_{group[b, j]}[b]
    grad_x           = S_0 + grad_x_hat,   grad_b_dec = sum over b of grad_x_hat - grad_x
    P_h[b]           = sum over g >= h of (2 w_g / B) r_g[b]    (the forward's: from the loss
                       alone, grad_prefix_losses and grad_x_hat absent, S = grad_loss P)

x [B, d], values / indices [B, k] (int64), W_dec [n, d], b_dec [d], G <= 16 prefix sizes;
outputs in x's dtype, float32 accumulation.

On the tensor cores (tensor_core_ops: SPARSECODE_TENSOR_CORES=1, bfloat16 CUDA tensors, k >= 1,
d a multiple of 8, G <= 8, sm_80+, the extension built with CUDA) the extension's
nested_prefix_sums (csrc/cuda/nested_prefix_mma.cu) takes the place of the plan, the walk and
the suffix kernel below: every prefix's reconstruction at once as a matrix product of the
gathered decoder rows and C[slot][h] = value where the slot's group is <= h, then per row the
residuals, their squared norms and the suffix sums in registers; R is never stored. It serves
the forward (P, x_hat and the norms, partial over column tiles of 256) and the backward under
other upstream gradients (S and grad_x from the rows, no walk for R), so the two backward paths
still give the same bits.
It is off by default, with the extension's tensor-core per-latent sums (one switch): on an H200
(B=8192, d=2304, k=64, 6 prefix sizes) its forward took 0.89 ms, the walk's 0.69 to 1.18 ms
from run to run (benchmarks/RESULTS.md).

Plan (_plan_kernel). Each row's slots sorted by (group, slot): tl.sort of the int32 keys
group * K_PAD + slot over a [BLOCK_P, K_PAD] block of rows gives, for each walk position, its
latent, group and value packed in one int64 (_pack; d_sae < 2^27), so that a walk loads a
position's slot in one load without first loading where it is, and each row's groups that hold
a slot as the bits of present [B] (int32). Reads B*k*(8 + s) bytes (s: the values' element
size) and writes B*(8*k + 4).

Forward walk (_forward_kernel). A program owns BLOCK_B rows and BLOCK_D columns, as the sparse
decode's forward does, and walks the k positions with the gathers pipelined at the depth the
autotuner picks (sparse_decode.autotuned), under the same register cap, holding the residual r
(float32): before a slot whose group is above the previous slot's, r is the previous group's
residual, stored to R; after the last slot r goes to R as the last group's, and x_hat = x - r. A
walk step is the decode's plus a masked store (each row ends at most G groups in k slots). The
previous slot's group is carried from the last step. W_dec's offsets are 32-bit unless W_dec or
the code has 2^31 elements or more (sparse_decode.wide_offsets), R's unless R has. The tile's
columns come in runs of 4 (_columns_by_4), so that its 16-bit loads and R's float32 stores share
one layout: 4 rows of 4 columns a thread. In the sm_90 SASS (bfloat16, 8 warps, Triton 3.6) a
step is 125 to 128 instructions without a barrier at depth 1 (175 to 243 with 5 barriers at
depths 2 and 3, the pipeliner's), of which 16 multiply-adds, 24 for the bfloat16 widenings, 4
slot loads (one int64 a row) and 4 gathers of 8 bytes. Before the packed slots and the runs of 4
it was 140 with 4 barriers (247 and 272 with 7 at depths 2 and 3): runs of 8 columns gave
16-byte loads of 2 rows of 8 columns a thread, each slot's store of R moved the tile to the
store's layout through shared memory, and a row's group, latent and value were loaded apart. The
earlier walk, which also took every squared norm, was 236 without a barrier.

The walk's epilogue. After a barrier (other threads of the program stored them), the program
reads back its tile of R: for g = 0 ... G - 1, r_g is the stored R[g] where the row has a slot
of group g, else r_{g-1} (x - b_dec below the row's first group), written to R[g] there; partial
holds the tile's part of each squared norm. These reads follow the walk's stores of the same
tile, so they mostly hit L2. (The earlier walk took each squared norm in the walk, a reduction
over the tile's columns at every position, since some row of a tile nearly always crosses a
boundary there: 0.97 ms against the decode's 0.37 ms on an H100, B=8192, d=2304, k=64, G=6,
bf16, 2026-11-27.) Then (SUFFIX: a forward that a backward can follow) the suffix sums of the
same tile, as _suffix_kernel makes them below, with coef_g = 2 w_g / B: from the last group
down, A += coef_g R[g], P_g = A stored in x's dtype (71 instructions a group, sm_90 SASS). The
forward returns P; R was its scratch.

Backward from the loss alone (the training step's): S = grad_loss P, so one pass over the pairs
of P gives grad_W_dec (coefficients grad_loss * values) and grad_values (grad_loss times the
dots): latent_rows_sum_dots with src_rows = group * B + b (sparse_grad.latent_rows_sum_dots:
the extension's kernels, or torch ops where it has none for the device), as the sparse
decode's backward with its grad_out replaced by P; grad_x = grad_loss P_0. With grad_loss = 1
these are the bits of the backward below.

Backward under other upstream gradients (grad_prefix_losses or grad_x_hat given): the walk
again without SUFFIX (nested_prefix_loss_residuals) for R, then _suffix_kernel: a program owns
a tile of rows and columns (16 x 256, 4 warps) and, from the last group down, accumulates
A += scale_g R[g] and writes S_g = A - grad_x_hat in x's dtype to S [G, B, d]; grad_x = A at
the end, kept apart from grad_x_hat (an upstream grad_x_hat nearly cancels the loss's own
gradient in S, and adding it back would lose grad_x's low bits). R is then no longer needed:
the op's autograd formula (sparsecode.nested_prefix_loss) frees its memory before the pass over
the pairs of S allocates grad_W_dec. R is float32 because rounded to bfloat16 it lost too much:
on random problems at the test shapes the worst bfloat16 grad b_dec error went from 7.7e-3 to
1.7e-2 of the 2e-2 tolerance.

Cost. Forward: the decode's 2*B*k*d FLOPs and B*k*d gathered weight elements (each row segment
contiguous), x read twice, x_hat and G*B*d float32 elements of R written, then the norms and
the suffix sums (4*G*B*d FLOPs; R read back twice, mostly from L2; G*B*d elements of P
written). Backward from the loss alone: the decode backward's pass over the pairs (4*B*k*d
FLOPs; B*k rows of P gathered, n*d written). The forward holds R and P at once, P is kept for
the backward (2*G*B*d bytes in bfloat16, against R's 4*G*B*d); the backward holds P and
grad_W_dec. Against the suffix sums made in the backward from R kept by the forward (the
design before this one), the training step no longer reads R back from memory in its
backward: 4*G*B*d bytes (453 MB at B=8192, d=2304, G=6), about 0.15 ms of an H100's HBM. The
other upstream gradients cost the walk again.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from sparsecode.backends import compiled_kernels, tensor_cores_allowed
from sparsecode.sparse_grad import latent_rows_sum_dots
from sparsecode.triton_kernels.sparse_decode import (WIDE_ELEMENTS, _blocks, launch_walk,
                                                     walk_registers, wide_offsets)

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_GROUPS = 16
MMA_GROUPS = 8  # kMaxMmaGroups of csrc/cuda/kernels.cuh
MAX_LATENTS = 2**27  # latent * MAX_GROUPS + group fits an int32 (_pack)
# The forward walk's warps: over 4 (the decode's), its [32, 128] float32 residual tile spilled
# 264 bytes at the register cap (sm_90, bfloat16, Triton 3.9); over 8, it spills nothing in the
# slot loop at depths 1 and 2 (80 to 128 bytes outside it, Triton 3.6 and 3.9). The depths that
# the autotuner tries (sparse_decode.autotuned):
_WARPS = 8
NESTED_STAGES = (1, 2, 3)
# A suffix program's tile: rows x columns, 32 float32 elements a thread over 4 warps (the
# benchmark's d_model, 2304, is 9 column tiles, none of them masked).
_SUFFIX_ROWS, _SUFFIX_COLS, _SUFFIX_WARPS = 16, 256, 4


def _plan_rows(k_pad: int) -> int:
    """Rows per plan program: about 4096 keys, or 64 under the CPU interpreter, whose tl.sort
    is a Python sorting network."""
    cap = 64 if os.environ.get("TRITON_INTERPRET") == "1" else 4096
    return max(1, cap // k_pad)


@triton.jit
def _bit_or(a, b):
    return a | b


@triton.jit
def _plan_kernel(idx_ptr, val_ptr, sizes_ptr, slot_ptr, present_ptr, B, k, G,
                 BLOCK_P: tl.constexpr, K_PAD: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    slot = tl.arange(0, K_PAD)
    live = (rows < B)[:, None] & (slot < k)[None, :]
    at = rows[:, None].to(tl.int64) * k + slot[None, :]
    index = tl.load(idx_ptr + at, mask=live, other=0)
    group = tl.zeros([BLOCK_P, K_PAD], tl.int32)
    for g in range(0, G - 1):
        group += (index >= tl.load(sizes_ptr + g)).to(tl.int32)
    present = tl.reduce(tl.where(live, tl.full([BLOCK_P, K_PAD], 1, tl.int32) << group, 0), 1,
                        _bit_or)
    tl.store(present_ptr + rows, present, mask=rows < B)
    key = tl.where(live, group, G) * K_PAD + slot[None, :]  # padding sorts last
    key = tl.sort(key, 1)
    src = rows[:, None].to(tl.int64) * k + key % K_PAD
    code = tl.load(idx_ptr + src, mask=live, other=0).to(tl.int32) * 16 + key // K_PAD
    value = tl.load(val_ptr + src, mask=live, other=0.0).to(tl.float32)
    tl.store(slot_ptr + at, _pack(code, value), mask=live)


@triton.jit
def _pack(code, value):
    """A walk slot as one int64: code (latent * 16 + group, int32) in the high word, the float32
    value's bits in the low word."""
    low = value.to(tl.int32, bitcast=True).to(tl.uint32, bitcast=True).to(tl.int64)
    return (code.to(tl.int64) << 32) | low


@triton.jit
def _unpack(slot):
    """(latent, group, value) of a walk slot (_pack): int32, int32, float32."""
    code = (slot >> 32).to(tl.int32)
    return code >> 4, code & 15, slot.to(tl.int32).to(tl.float32, bitcast=True)


@triton.jit
def _tile(B, d, cols, BLOCK_B: tl.constexpr):
    """A program's rows [BLOCK_B] and their row_ok, its columns cols' col_ok, and the tile's
    offsets in [B, d] and mask."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    col_ok = cols < d
    tile = row_ok[:, None] & col_ok[None, :]
    return rows, row_ok, col_ok, tile, rows[:, None].to(tl.int64) * d + cols[None, :]


@triton.jit
def _columns_by_4(BLOCK_D: tl.constexpr):
    """The program's BLOCK_D columns from program_id(1) * BLOCK_D, written so that Triton finds
    runs of only 4 contiguous ones: its 16-bit loads then take 4 elements (8 bytes) a thread, as
    its float32 stores of R do (16 bytes), and the walk's tile has one layout. With runs of 8 the
    loads took 8 a thread, and every slot's store of R moved the tile to the store's layout
    through shared memory (sm_90 SASS: 12 instructions and 4 barriers a slot)."""
    lane = tl.arange(0, BLOCK_D)
    return tl.program_id(1) * BLOCK_D + lane // 4 * 4 + lane % 4


@triton.jit
def _group_stride(B, d, BLOCK_B: tl.constexpr, DTYPE: tl.constexpr = tl.int64):
    """Elements of one group of R [G, B, d], as a [BLOCK_B] tensor of DTYPE: B or d may be a
    constexpr 1 (Triton specialises an int argument equal to 1)."""
    return (tl.zeros([BLOCK_B], DTYPE) + B) * d


@triton.jit
def _group_at(g, at, stride):
    """Offsets in R of group g at the tile's offsets `at` in [B, d] (g: a scalar or [rows];
    stride: _group_stride)."""
    return (g * stride)[:, None] + at


@triton.jit
def _forward_kernel(
    x_ptr, bias_ptr, slot_ptr, present_ptr, w_ptr, xhat_ptr, resid_ptr, partial_ptr, coef_ptr,
    p_ptr, B, k, d, G,
    SUFFIX: tl.constexpr, WIDE: tl.constexpr, R_WIDE: tl.constexpr, BLOCK_B: tl.constexpr,
    BLOCK_D: tl.constexpr, STAGES: tl.constexpr,
):
    cols = _columns_by_4(BLOCK_D)
    rows, row_ok, col_ok, tile, at = _tile(B, d, cols, BLOCK_B)
    bias = tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    r = tl.load(x_ptr + at, mask=tile, other=0.0).to(tl.float32) - bias[None, :]
    walk = rows.to(tl.int64) * k
    if R_WIDE:  # R's offsets need 64 bits (else 32-bit arithmetic, fewer instructions)
        r_at = at
        stride = _group_stride(B, d, BLOCK_B)
    else:
        r_at = rows[:, None] * d + cols[None, :]
        stride = _group_stride(B, d, BLOCK_B, tl.int32)
    prev = tl.full([BLOCK_B], G, tl.int32)  # the previous slot's group (G before the first)
    for q in tl.range(0, k, num_stages=STAGES):
        i, group, v = _unpack(tl.load(slot_ptr + walk + q, mask=row_ok, other=0))
        if WIDE:  # W_dec's offsets need 64 bits (sparse_decode.wide_offsets)
            i = i.to(tl.int64)
        # When the previous slot's group is lower, r is its residual.
        tl.store(resid_ptr + _group_at(prev, r_at, stride), r,
                 mask=(prev < group)[:, None] & col_ok[None, :])
        prev = group
        live = row_ok & (v != 0.0)
        w = tl.load(w_ptr + i[:, None] * d + cols[None, :], mask=live[:, None] & col_ok[None, :],
                    other=0.0).to(tl.float32)
        r -= v[:, None] * w
    last = _unpack(tl.load(slot_ptr + walk + k - 1, mask=row_ok, other=0))[1]
    tl.store(resid_ptr + _group_at(last, r_at, stride), r, mask=tile)
    x = tl.load(x_ptr + at, mask=tile, other=0.0).to(tl.float32)
    tl.store(xhat_ptr + at, (x - r).to(xhat_ptr.dtype.element_ty), mask=tile)

    # The norms, from the tile's rows of R that this program stored: other threads read them.
    tl.debug_barrier()
    # The residual of no slots, the groups' below the row's first.
    r = tl.where(tile, x - bias[None, :], 0.0)
    present = tl.load(present_ptr + rows, mask=row_ok, other=0)
    out = (tl.program_id(1).to(tl.int64) * B + rows) * G
    for g in range(0, G):
        has = ((present >> g) & 1) != 0
        g_at = _group_at(g, r_at, stride)
        r = tl.where(has[:, None],
                     tl.load(resid_ptr + g_at, mask=has[:, None] & col_ok[None, :], other=0.0), r)
        tl.store(resid_ptr + g_at, r, mask=(row_ok & ~has)[:, None] & col_ok[None, :])
        tl.store(partial_ptr + out + g, tl.sum(r * r, axis=1), mask=row_ok)
    if SUFFIX:  # the loss's own suffix sums, from the tile of R just completed
        tl.debug_barrier()  # other threads may have completed the parts of R this one reads
        _suffix_sums(resid_ptr, p_ptr, coef_ptr, r, r_at, stride, tile, G, False)


@triton.jit
def _suffix_sums(resid_ptr, s_ptr, scale_ptr, gxh, at, stride, tile, G, HAS_GXH: tl.constexpr):
    """From the last group down, A += scale_g R[g] over a tile (offsets `at` in [B, d], mask
    tile, stride: _group_stride) and S_g = A, less gxh (the tile of grad_x_hat, float32) when
    HAS_GXH, stored to S [G, B, d] in its dtype; returns A (float32). gxh's shape and layout
    are the tile's."""
    A = tl.zeros_like(gxh)
    for q in range(0, G):
        g_at = _group_at(G - 1 - q, at, stride)
        A += tl.load(scale_ptr + G - 1 - q) * tl.load(resid_ptr + g_at, mask=tile, other=0.0)
        S = A
        if HAS_GXH:
            S = A - gxh
        tl.store(s_ptr + g_at, S.to(s_ptr.dtype.element_ty), mask=tile)
    return A


@triton.jit
def _suffix_kernel(resid_ptr, s_ptr, gxh_ptr, scale_ptr, gx_ptr, B, d, G, HAS_GXH: tl.constexpr,
                   BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    rows, row_ok, col_ok, tile, at = _tile(B, d, cols, BLOCK_B)
    stride = _group_stride(B, d, BLOCK_B)
    gxh = tl.zeros([BLOCK_B, BLOCK_D], tl.float32)
    if HAS_GXH:
        gxh = tl.load(gxh_ptr + at, mask=tile, other=0.0).to(tl.float32)
    A = _suffix_sums(resid_ptr, s_ptr, scale_ptr, gxh, at, stride, tile, G, HAS_GXH)
    tl.store(gx_ptr + at, A.to(gx_ptr.dtype.element_ty), mask=tile)


def _check(x: Tensor, values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Tensor | None,
           prefix_sizes: Sequence[int], prefix_weights: Sequence[float]) -> None:
    """Raises, naming the argument and the fix, unless the Triton kernels can run these inputs
    (b_dec None: the backward's, which has none)."""
    if x.dtype not in _DTYPES:
        raise TypeError(
            f"the triton backend takes float32, bfloat16 or float16 tensors, got x of {x.dtype}; "
            "use backend='cuda' or 'reference' for other dtypes"
        )
    named = [("x", x, 2), ("values", values, 2), ("W_dec", W_dec, 2), ("b_dec", b_dec, 1)]
    for name, t, dim in (entry for entry in named if entry[1] is not None):
        if t.dim() != dim:
            raise ValueError(f"{name} must have {dim} dimensions, got shape {list(t.shape)}")
        if t.dtype != x.dtype or t.device != x.device:
            raise TypeError(f"{name} must match x's dtype {x.dtype} and device {x.device}, got "
                            f"{t.dtype} on {t.device}")
    if indices.dtype != torch.int64 or indices.device != x.device:
        raise TypeError(f"indices must be int64 on {x.device}, got {indices.dtype} on "
                        f"{indices.device}")
    B, d = x.shape
    if values.shape[0] != B or indices.shape != values.shape:
        raise ValueError(f"values and indices must be [B, k] with B = {B}, got "
                         f"{list(values.shape)} and {list(indices.shape)}")
    if W_dec.shape[0] >= MAX_LATENTS:
        raise ValueError(f"the triton backend takes d_sae < 2^27 (its walk packs a latent and its "
                         f"group in an int32), got {W_dec.shape[0]}; use the cpp backend")
    if W_dec.shape[1] != d or (b_dec is not None and b_dec.shape[0] != d):
        raise ValueError(f"W_dec must be [d_sae, d_model] and b_dec [d_model] with d_model = {d}, "
                         f"got {list(W_dec.shape)} and "
                         f"{None if b_dec is None else list(b_dec.shape)}")
    G = len(prefix_sizes)
    if G < 1 or len(prefix_weights) != G:
        raise ValueError(f"need one prefix weight per prefix size, got {len(prefix_weights)} "
                         f"weights for {G} sizes")
    increasing = all(b > a for a, b in zip(prefix_sizes, prefix_sizes[1:]))
    if any(m < 1 for m in prefix_sizes) or not increasing:
        raise ValueError(f"prefix_sizes must be strictly increasing positive ints, got "
                         f"{list(prefix_sizes)}")
    if prefix_sizes[-1] != W_dec.shape[0]:
        raise ValueError(f"the last prefix size must equal d_sae = {W_dec.shape[0]}, got "
                         f"{list(prefix_sizes)}")
    if G > MAX_GROUPS:
        raise ValueError(f"the triton backend supports at most {MAX_GROUPS} prefix sizes, got {G}; "
                         "merge prefixes or use the cpp backend")


def _on_device(numbers: Sequence[float], dtype: torch.dtype, device: torch.device) -> Tensor:
    """numbers as a [len(numbers)] tensor on device, not to be written to. Every Matryoshka
    step passes the same prefix sizes and weights, so each such tensor is made once per device
    and stream (_constant) and kept; a tensor for a stream being captured into a CUDA graph is
    made afresh."""
    if device.type != "cuda":
        return _constant(tuple(numbers), dtype, device, 0)
    if torch.cuda.is_current_stream_capturing():
        return _copied(tuple(numbers), dtype, device)
    return _constant(tuple(numbers), dtype, device, torch.cuda.current_stream(device).stream_id)


def _copied(numbers: tuple[float, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """numbers on device without waiting for the GPU: a copy from pageable memory would
    synchronise the stream, so CUDA tensors come from pinned memory, copied without blocking."""
    host = torch.tensor(numbers, dtype=dtype)
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


@functools.lru_cache(maxsize=256)
def _constant(numbers: tuple[float, ...], dtype: torch.dtype, device: torch.device,
              stream_id: int) -> Tensor:
    """_copied(numbers, dtype, device), made on the stream stream_id (its copy is ordered
    before that stream's later work), kept for every later call on that stream."""
    return _copied(numbers, dtype, device)


class _Walk(NamedTuple):
    """Each row's slots in walk order (sorted by group, then slot): slot [B, k] (int64), the
    latent, group and value at each walk position (_pack); and present [B] (int32), the bits of
    the groups that hold one of the row's slots."""

    slot: Tensor
    present: Tensor


def _plan(values: Tensor, indices: Tensor, prefix_sizes: Sequence[int]) -> _Walk:
    """The walk-ordered slots of checked inputs. The walk is the first of the Triton kernels to
    read indices, so their range is asserted here (on the device: no wait); the tensor-core op
    asserts it itself."""
    torch._assert_async(((indices >= 0) & (indices < prefix_sizes[-1])).all(),
                        "indices must lie in [0, d_sae)")
    B, k = indices.shape
    device = indices.device
    walk = _Walk(torch.empty(B, k, dtype=torch.int64, device=device),
                 torch.empty(B, dtype=torch.int32, device=device))
    k_pad = triton.next_power_of_2(max(k, 1))
    block_p = _plan_rows(k_pad)
    _plan_kernel[(triton.cdiv(B, block_p),)](
        indices.contiguous(), values.contiguous(),
        _on_device(prefix_sizes, torch.int64, device), *walk, B, k, len(prefix_sizes),
        BLOCK_P=block_p, K_PAD=k_pad)
    return walk


def tensor_core_ops(x: Tensor, k: int, G: int) -> Any | None:
    """The extension's ops (torch.ops.sparsecode_C) where its tensor-core pass over the rows
    (nested_prefix_sums, csrc/cuda/nested_prefix_mma.cu) takes the place of the walk for x
    [B, d] with k slots a row and G prefix sizes: bfloat16 CUDA tensors, k >= 1, d a multiple
    of 8, G <= 8, a GPU of compute capability 8.0 or later, an extension built with CUDA and
    SPARSECODE_TENSOR_CORES=1; else None."""
    runs = (x.dtype == torch.bfloat16 and k >= 1 and x.shape[1] % 8 == 0 and G <= MMA_GROUPS
            and _has_tensor_cores(x.device))
    if not runs or not tensor_cores_allowed():
        return None
    return compiled_kernels(x.device)


def _has_tensor_cores(device: torch.device) -> bool:
    """Whether device is a GPU of compute capability 8.0 or later."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8


def _walk(x: Tensor, values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Tensor,
          prefix_sizes: Sequence[int], coef: Sequence[float] | None,
          stages: int | None) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """The forward walk over checked inputs: (partial [column tiles, B, G], x_hat [B, d], R, and
    when coef is given (one float per group) the suffix sums P_g = sum over h >= g of
    coef_h R[h], [G, B, d] in x's dtype)."""
    walk = _plan(values, indices, prefix_sizes)
    B, d = x.shape
    k = values.shape[1]
    G = len(prefix_sizes)
    device = x.device
    block_b, block_d = _blocks()
    grid = (triton.cdiv(B, block_b), triton.cdiv(d, block_d))
    x_hat = torch.empty(B, d, dtype=x.dtype, device=device)
    resid = torch.empty(G, B, d, dtype=torch.float32, device=device)
    partial = torch.empty(grid[1], B, G, dtype=torch.float32, device=device)
    P = None if coef is None else torch.empty(G, B, d, dtype=x.dtype, device=device)
    launch_walk(_forward_kernel, grid, stages, NESTED_STAGES, _WARPS, walk_registers(x.dtype),
                x.contiguous(), b_dec.contiguous(), walk.slot, walk.present, W_dec.contiguous(),
                x_hat, resid, partial,
                partial if coef is None else _on_device(coef, torch.float32, device),
                resid if P is None else P, B, k, d, G,
                SUFFIX=P is not None, WIDE=wide_offsets(W_dec, B, k),
                R_WIDE=resid.numel() >= WIDE_ELEMENTS, BLOCK_B=block_b, BLOCK_D=block_d)
    return partial, x_hat, resid, P


def nested_prefix_loss_forward(
    x: Tensor, values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Tensor,
    prefix_sizes: Sequence[int], prefix_weights: Sequence[float], stages: int | None = None,
    suffix_sums: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """loss [], prefix_losses [G] (means over the rows) and x_hat [B, d], all in x's dtype, and
    the loss's own suffix sums P [G, B, d] in x's dtype: P_g = sum over h >= g of
    (2 prefix_weights[h] / B) r_h, the S of a backward from the loss alone (S = grad_loss P);
    without suffix_sums (no backward to follow) an empty P [G, 0, d], and the walk skips them.

    Forward only: its backward is nested_prefix_loss_pair_grads of grad_loss P, or with other
    upstream gradients nested_prefix_loss_residuals, nested_prefix_loss_suffix_sums (where
    tensor_core_ops takes the inputs, nested_prefix_loss_suffix_sums_on_tensor_cores instead of
    both), then nested_prefix_loss_pair_grads.
    stages: the walk's pipelining depth (sparse_decode.autotuned); None lets the autotuner choose.
    The tensor-core pass, where it runs, has none.
    """
    _check(x, values, indices, W_dec, b_dec, prefix_sizes, prefix_weights)
    B, d = x.shape
    coef = [w * (2.0 / max(B, 1)) for w in prefix_weights]  # no rows, no terms
    ops = tensor_core_ops(x, values.shape[1], len(prefix_sizes))
    if ops is not None:
        P, _, x_hat, partial = ops.nested_prefix_sums(
            x, values, indices, W_dec, b_dec, list(prefix_sizes),
            _on_device(coef, torch.float32, x.device), None, suffix_sums, True)
    else:
        partial, x_hat, _, P = _walk(x, values, indices, W_dec, b_dec, prefix_sizes,
                                     coef if suffix_sums else None, stages)
    if P is None:
        P = x.new_empty(len(prefix_sizes), 0, d)
    means = partial.double().sum(0).sum(0) / B
    weights = _on_device(prefix_weights, torch.float64, x.device)
    return (means * weights).sum().to(x.dtype), means.to(x.dtype), x_hat, P


def nested_prefix_loss_residuals(
    x: Tensor, values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Tensor,
    prefix_sizes: Sequence[int], stages: int | None = None,
) -> Tensor:
    """Every prefix's residual R [G, B, d] (float32), R[g] = r_g, from the forward walk again:
    what nested_prefix_loss_suffix_sums takes when the upstream gradients are not the loss's
    alone."""
    _check(x, values, indices, W_dec, b_dec, prefix_sizes, [1.0] * len(prefix_sizes))
    return _walk(x, values, indices, W_dec, b_dec, prefix_sizes, None, stages)[2]


def nested_prefix_loss_suffix_sums(
    grad_loss: Tensor, grad_prefix_losses: Tensor, grad_x_hat: Tensor | None, values: Tensor,
    indices: Tensor, W_dec: Tensor, prefix_sizes: Sequence[int], prefix_weights: Sequence[float],
    resid: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """The first half of nested_prefix_loss_forward's backward under any upstream gradients:
    (S [G, B, d], grad_x [B, d], grad_b_dec [d]), in x's dtype (that of values), from the
    upstream grad_loss [], grad_prefix_losses [G] and grad_x_hat [B, d] (or None) and the
    residuals resid [G, B, d] (float32; nested_prefix_loss_residuals), which the second half
    (nested_prefix_loss_pair_grads) does not need."""
    G = len(prefix_sizes)
    if resid.dim() != 3 or resid.shape[0] != G or resid.dtype != torch.float32 \
            or not resid.is_contiguous():
        raise ValueError(f"resid must be nested_prefix_loss_residuals's contiguous float32 "
                         f"[G, B, d_model] residuals, got {list(resid.shape)} {resid.dtype}")
    B, d = resid.shape[1:]
    device = values.device
    grad_x = torch.empty(B, d, dtype=values.dtype, device=device)
    _check(grad_x, values, indices, W_dec, None, prefix_sizes, prefix_weights)
    _check_grad_x_hat(grad_x_hat, grad_x)
    scale = _scale(grad_loss, grad_prefix_losses, prefix_weights, B, device)
    gxh = grad_x_hat.to(values.dtype).contiguous() if grad_x_hat is not None else grad_x
    S = torch.empty(G, B, d, dtype=values.dtype, device=device)
    block_d = min(_SUFFIX_COLS, triton.next_power_of_2(max(d, 1)))
    block_b = _SUFFIX_ROWS * _SUFFIX_COLS // block_d
    _suffix_kernel[(triton.cdiv(B, block_b), triton.cdiv(d, block_d))](
        resid, S, gxh, scale, grad_x, B, d, G, HAS_GXH=grad_x_hat is not None, BLOCK_B=block_b,
        BLOCK_D=block_d, num_warps=_SUFFIX_WARPS)
    return S, grad_x, _grad_b_dec(grad_x, grad_x_hat)


def nested_prefix_loss_suffix_sums_on_tensor_cores(
    grad_loss: Tensor, grad_prefix_losses: Tensor, grad_x_hat: Tensor | None, x: Tensor,
    values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Tensor, prefix_sizes: Sequence[int],
    prefix_weights: Sequence[float],
) -> tuple[Tensor, Tensor, Tensor]:
    """nested_prefix_loss_suffix_sums where tensor_core_ops takes the inputs: (S [G, B, d],
    grad_x [B, d], grad_b_dec [d]) in x's dtype from the rows directly, the residuals made and
    used in registers (no R)."""
    _check(x, values, indices, W_dec, b_dec, prefix_sizes, prefix_weights)
    _check_grad_x_hat(grad_x_hat, x)
    ops = tensor_core_ops(x, values.shape[1], len(prefix_sizes))
    if ops is None:
        raise ValueError("the tensor-core suffix sums take bfloat16 CUDA tensors with k >= 1, "
                         "d_model a multiple of 8 and at most 8 prefix sizes on an sm_80+ GPU, "
                         "with SPARSECODE_TENSOR_CORES=1; "
                         "use nested_prefix_loss_residuals and nested_prefix_loss_suffix_sums")
    scale = _scale(grad_loss, grad_prefix_losses, prefix_weights, x.shape[0], x.device)
    S, grad_x, _, _ = ops.nested_prefix_sums(x, values, indices, W_dec, b_dec, list(prefix_sizes),
                                             scale, grad_x_hat, True, False)
    return S, grad_x, _grad_b_dec(grad_x, grad_x_hat)


def _check_grad_x_hat(grad_x_hat: Tensor | None, like: Tensor) -> None:
    if grad_x_hat is not None and grad_x_hat.shape != like.shape:
        raise ValueError(f"grad_x_hat must be [B, d_model] = {list(like.shape)}, got "
                         f"{list(grad_x_hat.shape)}")


def _scale(grad_loss: Tensor, grad_prefix_losses: Tensor, prefix_weights: Sequence[float],
           B: int, device: torch.device) -> Tensor:
    """scale_g = 2 (grad_loss w_g + grad_prefix_losses[g]) / B, [G] float32 (made in float64);
    with no rows, no terms: B = 0 scales nothing."""
    weights = _on_device(prefix_weights, torch.float64, device)
    G = len(prefix_weights)
    return ((grad_loss.reshape(()).double() * weights + grad_prefix_losses.reshape(G).double())
            * (2.0 / max(B, 1))).float()


def _grad_b_dec(grad_x: Tensor, grad_x_hat: Tensor | None) -> Tensor:
    """grad_b_dec [d] = sum over the rows of grad_x_hat - grad_x."""
    if grad_x_hat is None:
        return -grad_x.sum(0)
    return grad_x_hat.to(grad_x.dtype).contiguous().sum(0) - grad_x.sum(0)


def nested_prefix_loss_pair_grads(
    S: Tensor, values: Tensor, indices: Tensor, W_dec: Tensor, prefix_sizes: Sequence[int],
) -> tuple[Tensor, Tensor]:
    """The second half of the backward: (grad_values [B, k], grad_W_dec [n, d]) from
    nested_prefix_loss_suffix_sums's S [G, B, d] (checked inputs), in one pass over the pairs
    (sparse_grad.latent_rows_sum_dots)."""
    G, B, d = S.shape
    device = values.device
    # Pair (b, j) reads S_{group of its latent}[b]: row group * B + b of S.
    idx = indices.contiguous()
    sizes = _on_device(prefix_sizes, torch.int64, device)
    src_rows = (torch.bucketize(idx, sizes[:-1], right=True) * B
                + torch.arange(B, device=device)[:, None])
    grad_W_dec, dots = latent_rows_sum_dots(-values, idx, S.view(G * B, d), W_dec, src_rows)
    return (-dots).to(values.dtype), grad_W_dec
