"""Fused TopK encode (DESIGN.md §3.1): the top k of each row of the pre-activations, without
writing the pre-activation matrix.

    pre            = (x - b_dec) @ W_enc + b_enc          x [B, d], W_enc [d, n], b_enc [n], b_dec [d]
    values, indices = relu of each row's k largest pre entries, indices ascending   [B, k]

Tiles. A program owns BLOCK_B rows and one of `splits` contiguous ranges of W_enc's columns,
which it walks BLOCK_N columns at a time. Each [BLOCK_B, BLOCK_N] tile of pre is a tl.dot over
d in BLOCK_D steps (float32 accumulation), then folded into a running per-row top-k held in
registers: [BLOCK_B, K_PAD] values and column ids (K_PAD = k rounded up to a power of two; the
slots past k hold +inf so they are never evicted; empty slots hold -inf and the distinct ids
-1 - slot, so that every slot has its own id). While some row has a tile entry above its
threshold (its smallest kept value), each such row moves its best tile entry (the lowest column
among equals) into the slot of its smallest kept entry (the highest column among equals). After
the first tiles of a range only a few entries per row clear the threshold, so the loop runs a
few times per tile; the slowest of the BLOCK_B rows sets how many. With select_halves (the
default for the tensor-descriptor tiles below) a tile is folded in as its two column halves,
each with its own loop: a step scans half the columns, and the halves' slowest rows together
cost fewer scanned columns than the whole tile's (simulated on random rows at k = 64 over
32768-column ranges: 1162 steps of 128 columns against 832 of 256). Under the Hopper MMA layout
the halves are a reshape of the accumulator that leaves every element in its thread; under the
Ampere and float32 layouts it would move data, so those tiles fold whole. Whether some row is
left is a reduction across the program's warps before each step; EncodeConfig.unchecked_steps
takes counted steps without it first (_fold_tile): on an H100 16 such steps gained under 1 %
(5.229 against 5.262 ms, 2026-11-27), so the default takes none.

Keys (16-bit inputs). The insertion step scans int32 keys instead of the float32 values: the
value's bits made monotone, with the low 8 bits replaced by 255 - column. A row's keys are
distinct, so the best key gives the column by its low bits and is taken out by equality, which
saves the step two passes over the tile (finding the best's column, masking it): in the sm_90
SASS (bf16, TMA tiles, halves) 414 instructions per step against 618. The kept values carry
the low 8 bits set, within 2^-15 of the pre-activations (relative), ranked by their top 24 bits
then by column; they come back in bfloat16 or float16 (8 or 11 significant bits), so the 16
kept bits are more than the output holds. Float32 inputs rank the exact values.

Merge. Each program writes its range's top k as candidates [B, splits, k]; _merge_kernel keeps
each row's k best of the splits*k candidates (the lower id among equal values, so the result
does not depend on `splits`) and sorts them by id: one program per row counts, for each
candidate, the candidates that rank above it (chosen when fewer than k) and the chosen ones with
lower ids (its output slot), width^2 comparisons each. Lists wider than MERGE_WIDTH (many
ranges for a small batch) merge with torch ops, which took about 0.3 ms of the 6.2 ms encode
in the stop-13 H100 profile (B=8192, 2 ranges, k=64).

Cost. FLOPs: 2*B*d*n for the GEMM, plus O(B*n) compares and, per row and range, about
k*(1 + ln(range/k)) insertions of O(BLOCK_N + K_PAD) work. Bytes from memory: x' once per
column tile (from L2), W_enc once per row block (from L2; once from HBM when the row blocks
march together), and B*splits*k*8 bytes of candidates, instead of the B*n*4 bytes of a
pre-activation matrix that the naive mm + topk writes and reads back.

Flat and interleaved loops (tried and removed). One loop over every tile's d steps, so that
the next tile's loads are issued before a tile's selection, took 6.26 ms against the nested
loops' 5.24 ms on an H200 (2026-11-28); taking a tile's insertion steps under the next tile's
MMAs (128-column tiles, to fit the registers) passed the interpreter's tests but left output
slots unwritten on the GPU. See benchmarks/RESULTS.md.

Loads. The x' and W_enc tiles are masked pointer loads, or with EncodeConfig(tma=True) loads
through device-side tensor descriptors (TMA on Hopper and newer, zero-filled past the edges as
the masks do), which need 16-byte aligned data and rows: d and n multiples of 16 bytes /
itemsize. The default tiles use them for bfloat16 / float16 on Hopper when the inputs allow.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class EncodeConfig:
    """Tile sizes and launch shape of the fused encode (block sizes are powers of two >= 16)."""

    block_b: int = 128
    block_n: int = 128
    block_d: int = 64
    splits: int | None = None  # column ranges per row block; None: about one program per SM
    num_warps: int = 8
    num_stages: int = 3
    tma: bool = False  # load the x' and W_enc tiles through tensor descriptors (TMA)
    select_halves: bool = False  # fold each tile into the top k one column half at a time
    keys: bool = True  # 16-bit inputs: rank by int32 keys (see the docstring), not by values
    unchecked_steps: int = 0  # insertion steps per fold before the first "any row left?" test

    def __post_init__(self) -> None:
        for name in ("block_b", "block_n", "block_d"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"{name} must be a power of two >= 16, got {value}")
        if self.splits is not None and self.splits < 1:
            raise ValueError(f"splits must be >= 1 or None, got {self.splits}")
        if self.unchecked_steps < 0:
            raise ValueError(f"unchecked_steps must be >= 0, got {self.unchecked_steps}")


# Small tiles under the CPU interpreter (TRITON_INTERPRET=1), where each program is numpy code,
# and two ranges so that the merge of ranges is exercised too.
_INTERPRETED = EncodeConfig(block_b=16, block_n=32, block_d=16, splits=2, num_warps=1, num_stages=1)


def default_config(x: Tensor, W_enc: Tensor) -> EncodeConfig:
    """The built-in tiles for x's dtype and device (x [B, d], W_enc [d, n]).

    16-bit inputs on a Hopper or newer GPU load their tiles through tensor descriptors when the
    shapes allow it: on an H100 at B=8192, d=2304, n=65536, k=64 (bf16) that ran in 6.3 ms,
    against 7.9 ms for the best masked-pointer tiles (benchmarks/RESULTS.md).
    """
    if os.environ.get("TRITON_INTERPRET") == "1":
        return _INTERPRETED
    hopper = x.is_cuda and torch.cuda.get_device_capability(x.device)[0] >= 9
    return default_tiles(x.dtype, hopper and _tma_problem(x, W_enc) is None)


def default_tiles(dtype: torch.dtype, tma: bool) -> EncodeConfig:
    """The compiled kernel's tiles for dtype; tma: whether 16-bit inputs may use tensor
    descriptors (Hopper or newer, aligned inputs)."""
    if dtype == torch.float32:
        return EncodeConfig(block_b=128, block_n=128, block_d=32, num_warps=8, num_stages=3)
    if tma:
        return EncodeConfig(block_b=128, block_n=256, block_d=64, num_warps=8, num_stages=4,
                            tma=True, select_halves=True)
    return EncodeConfig(block_b=128, block_n=128, block_d=64, num_warps=8, num_stages=3)


@triton.jit
def _ordered_bits(v):
    """int32 ordered like the float32 v (its bits, the magnitude bits flipped when negative);
    applied to such ints, it gives back the float32's bits."""
    bits = v.to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def _fold_input(pre, WIDTH: tl.constexpr, KEYED: tl.constexpr):
    """What _insert_step scans for pre [rows, WIDTH]: pre itself, or (KEYED) int32 keys ordered
    like (value, -column): pre's ordered bits with the low 8 replaced by 255 - column, distinct
    within a row (WIDTH <= 256). Keys rank values by their top 24 bits (16 of mantissa)."""
    if KEYED:
        return (_ordered_bits(pre) & -256) | (255 - tl.arange(0, WIDTH))[None, :]
    else:
        return pre


@triton.jit
def _insert_step(cand, best, c0, top_v, top_i, thr, WIDTH: tl.constexpr, K_PAD: tl.constexpr,
                 KEYED: tl.constexpr):
    """One insertion step of the tile cand [rows, WIDTH] (columns c0 ...; best [rows] its row
    maxima; values or KEYED keys, see _fold_input) into the running top-k top_v / top_i
    [rows, K_PAD] with threshold thr [rows] (each row's smallest kept value): every row whose
    best is above thr moves it (the lowest column among equals) into the slot of its smallest
    kept entry (the highest column among equals). KEYED, top_v and thr hold keys whose low 8
    bits are all ones, so best > thr compares the values' top 24 bits, and equal values fail
    it. Returns cand (with each row's best taken out), best, top_v, top_i and thr, updated."""
    pos = tl.arange(0, WIDTH)
    take = best > thr
    if KEYED:
        best_pos = 255 - (best & 255)
        value = best | 255
    else:
        best_pos = tl.min(tl.where(cand == best[:, None], pos[None, :], WIDTH), axis=1)
        value = best
    evict = tl.max(tl.where(top_v == thr[:, None], top_i, -K_PAD - 1), axis=1)
    replace = (top_i == evict[:, None]) & take[:, None]
    top_v = tl.where(replace, value[:, None], top_v)
    top_i = tl.where(replace, (c0 + best_pos)[:, None], top_i)
    thr = tl.min(top_v, axis=1)
    # A row that did not take still drops its best: it is at or below thr, which only rises.
    # Entries at or below thr stay in cand: best > thr fails for them.
    if KEYED:  # keys are distinct within a row
        cand = tl.where(cand == best[:, None], -2147483648, cand)
    else:
        cand = tl.where(pos[None, :] != best_pos[:, None], cand, float("-inf"))
    best = tl.max(cand, axis=1)
    return cand, best, top_v, top_i, thr


@triton.jit
def _fold_tile(pre, c0, top_v, top_i, thr, WIDTH: tl.constexpr, K_PAD: tl.constexpr,
               KEYED: tl.constexpr, UNCHECKED: tl.constexpr):
    """Folds all of pre [rows, WIDTH] (columns c0 ...) into the running top-k: insertion steps
    while some row has an entry above its threshold; returns top_v, top_i and thr.

    That test reduces over all the program's rows, so across its warps: through shared memory
    and barriers, before every step (sm_90 SASS of the bf16 TMA tiles: a step is 428
    instructions with 3 barriers under Triton 3.6, 412 with 2 under 3.9, and 403 without the
    test under either). With UNCHECKED > 0 the fold first counts each row's entries above its
    threshold and takes min(UNCHECKED, the largest count) steps without the test. None of them
    changes the result: a row's entries above its threshold are its largest, each step takes out
    the row's best whether or not it goes in, and a row with nothing left above its threshold
    (which only rises) just drops entries at or below it. UNCHECKED >= WIDTH takes the counted
    steps alone, never testing. Simulated on random rows (k = 64, 32768-column ranges,
    128-column folds): 16 unchecked steps take 3% more steps than the test alone and 57% fewer
    reductions across warps; the count alone, 16% more steps and 82% fewer. The count costs two
    operations per entry. Which wins depends on whether a step waits on the barriers or on its
    arithmetic: the GPU benchmark's sweep times both."""
    cand = _fold_input(pre, WIDTH, KEYED)
    best = tl.max(cand, axis=1)
    if UNCHECKED > 0:
        above = tl.max(tl.sum((cand > thr[:, None]).to(tl.int32), axis=1), axis=0)
        for _ in range(0, tl.minimum(above, UNCHECKED)):
            cand, best, top_v, top_i, thr = _insert_step(cand, best, c0, top_v, top_i, thr,
                                                          WIDTH, K_PAD, KEYED)
    if UNCHECKED < WIDTH:
        while tl.max((best > thr).to(tl.int32), axis=0) > 0:
            cand, best, top_v, top_i, thr = _insert_step(cand, best, c0, top_v, top_i, thr,
                                                          WIDTH, K_PAD, KEYED)
    return top_v, top_i, thr


@triton.jit
def _load_tiles(xc_ptr, w_ptr, x_desc, w_desc, row0, rows, row_ok, d0, c0, cols, col_ok, d, n,
                BLOCK_D: tl.constexpr, TMA: tl.constexpr):
    """The x' tile [BLOCK_B, BLOCK_D] at (row0, d0) and the W_enc tile [BLOCK_D, BLOCK_N] at
    (d0, c0), zero past the edges."""
    if TMA:
        a = x_desc.load([row0, d0])
        w = w_desc.load([d0, c0])
    else:
        dd = d0 + tl.arange(0, BLOCK_D)
        d_ok = dd < d
        a = tl.load(xc_ptr + rows[:, None].to(tl.int64) * d + dd[None, :],
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        w = tl.load(w_ptr + dd[:, None].to(tl.int64) * n + cols[None, :],
                    mask=d_ok[:, None] & col_ok[None, :], other=0.0)
    return a, w


@triton.jit
def _tile_folds(acc, b_ptr, cols, col_ok, row_ok, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
                SELECT_SPLIT: tl.constexpr):
    """The tile's pre-activations (acc [BLOCK_B, BLOCK_N] of x' @ W_enc plus b_enc, -inf past
    the edges) as the folds the selection takes: (lo, hi), its column halves [BLOCK_B,
    BLOCK_N / 2], with SELECT_SPLIT = 2 (under the Hopper MMA layout a reshape that leaves every
    element in its thread), else (the tile, the tile)."""
    bias = tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    pre = tl.where(row_ok[:, None] & col_ok[None, :], acc + bias[None, :], float("-inf"))
    if SELECT_SPLIT == 2:
        lo, hi = tl.split(tl.permute(tl.reshape(pre, [BLOCK_B, 2, BLOCK_N // 2]), [0, 2, 1]))
        return lo, hi
    else:
        return pre, pre


@triton.jit
def _select_tile(acc, b_ptr, c0, cols, col_ok, row_ok, top_v, top_i, thr, BLOCK_B: tl.constexpr,
                 BLOCK_N: tl.constexpr, K_PAD: tl.constexpr, SELECT_SPLIT: tl.constexpr,
                 KEYED: tl.constexpr, UNCHECKED: tl.constexpr):
    """Folds the tile acc [BLOCK_B, BLOCK_N] of x' @ W_enc (columns c0 ...), plus b_enc, into
    the running top-k; returns top_v, top_i and thr."""
    lo, hi = _tile_folds(acc, b_ptr, cols, col_ok, row_ok, BLOCK_B, BLOCK_N, SELECT_SPLIT)
    if SELECT_SPLIT == 2:
        # The two column halves of the tile, each selected on its own (fewer insertion steps in
        # all: a step scans half the columns, and the slowest row of a half sets the number of
        # steps for that half only).
        top_v, top_i, thr = _fold_tile(lo, c0, top_v, top_i, thr, BLOCK_N // 2, K_PAD, KEYED,
                                       UNCHECKED)
        top_v, top_i, thr = _fold_tile(hi, c0 + BLOCK_N // 2, top_v, top_i, thr, BLOCK_N // 2,
                                       K_PAD, KEYED, UNCHECKED)
    else:
        top_v, top_i, thr = _fold_tile(lo, c0, top_v, top_i, thr, BLOCK_N, K_PAD, KEYED,
                                       UNCHECKED)
    return top_v, top_i, thr


@triton.jit
def _encode_kernel(
    xc_ptr, w_ptr, b_ptr, cand_v_ptr, cand_i_ptr,
    B, d, n, k, tiles_per_split,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    K_PAD: tl.constexpr, INPUT_PRECISION: tl.constexpr, TMA: tl.constexpr,
    SELECT_SPLIT: tl.constexpr, KEYED: tl.constexpr, UNCHECKED: tl.constexpr,
):
    pid_s = tl.program_id(1)
    splits = tl.num_programs(1)
    row0 = tl.program_id(0) * BLOCK_B
    rows = row0 + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    col_begin = pid_s * tiles_per_split * BLOCK_N
    slot = tl.arange(0, K_PAD)
    pos = tl.arange(0, BLOCK_N)
    x_desc = None
    w_desc = None
    if TMA:
        x_desc = tl.make_tensor_descriptor(xc_ptr, shape=[B, d], strides=[d, 1],
                                           block_shape=[BLOCK_B, BLOCK_D])
        w_desc = tl.make_tensor_descriptor(w_ptr, shape=[d, n], strides=[n, 1],
                                           block_shape=[BLOCK_D, BLOCK_N])

    top_v = tl.zeros([BLOCK_B, K_PAD], tl.float32) + tl.where(slot < k, float("-inf"), float("inf"))[None, :]
    top_i = tl.zeros([BLOCK_B, K_PAD], tl.int32) - 1 - slot[None, :]
    if KEYED:
        top_v = _ordered_bits(top_v) | 255
    thr = tl.min(top_v, axis=1)
    for t in range(0, tiles_per_split):
        c0 = col_begin + t * BLOCK_N
        cols = c0 + pos
        col_ok = cols < n
        acc = tl.zeros([BLOCK_B, BLOCK_N], tl.float32)
        for d0 in range(0, d, BLOCK_D):
            a, w = _load_tiles(xc_ptr, w_ptr, x_desc, w_desc, row0, rows, row_ok, d0, c0,
                               cols, col_ok, d, n, BLOCK_D, TMA)
            acc = tl.dot(a, w, acc, input_precision=INPUT_PRECISION)
        top_v, top_i, thr = _select_tile(acc, b_ptr, c0, cols, col_ok, row_ok, top_v, top_i,
                                         thr, BLOCK_B, BLOCK_N, K_PAD, SELECT_SPLIT, KEYED,
                                         UNCHECKED)
    if KEYED:  # the kept values, their low 8 bits set (within 2^-15 of pre, relative)
        top_v = _ordered_bits(top_v).to(tl.float32, bitcast=True)

    out = (rows[:, None].to(tl.int64) * splits + pid_s) * k + slot[None, :]
    keep = row_ok[:, None] & (slot[None, :] < k)
    tl.store(cand_v_ptr + out, top_v, mask=keep)
    tl.store(cand_i_ptr + out, top_i, mask=keep)


@triton.jit
def _merge_kernel(cand_v_ptr, cand_i_ptr, val_ptr, idx_ptr, k, width, W_PAD: tl.constexpr):
    """One row: the k best of its `width` candidates (ties to the lower id), sorted by id."""
    row = tl.program_id(0).to(tl.int64)
    pos = tl.arange(0, W_PAD)
    live = pos < width
    v = tl.load(cand_v_ptr + row * width + pos, mask=live, other=float("-inf"))
    i = tl.load(cand_i_ptr + row * width + pos, mask=live, other=0)
    # beats[a, b]: candidate a ranks above candidate b (padding ranks above none).
    beats = live[:, None] & ((v[:, None] > v[None, :])
                             | ((v[:, None] == v[None, :]) & (i[:, None] < i[None, :])))
    chosen = live & (tl.sum(beats.to(tl.int32), axis=0) < k)
    # A chosen candidate's place in id order: the chosen candidates with lower ids.
    slot = tl.sum((chosen[:, None] & (i[:, None] < i[None, :])).to(tl.int32), axis=0)
    tl.store(idx_ptr + row * k + slot, i.to(tl.int64), mask=chosen)
    tl.store(val_ptr + row * k + slot, tl.where(v < 0.0, 0.0, v).to(val_ptr.dtype.element_ty),
             mask=chosen)


def _keyed(dtype: torch.dtype, config: EncodeConfig) -> bool:
    """Whether the kernel ranks by keys (_fold_input): when config.keys, for 16-bit inputs, whose
    values come back in their own dtype (8 or 11 significant bits, the keys keep 16), and folds
    of at most 256 columns."""
    width = config.block_n // 2 if config.select_halves else config.block_n
    return config.keys and dtype != torch.float32 and width <= 256


def _check(x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor, k: int) -> None:
    if x.dtype not in _DTYPES:
        raise TypeError(
            f"the triton backend takes float32, bfloat16 or float16 tensors, got x of {x.dtype}; "
            "use backend='cuda' or 'reference' for other dtypes"
        )
    for name, t, dim in (("x", x, 2), ("W_enc", W_enc, 2), ("b_enc", b_enc, 1), ("b_dec", b_dec, 1)):
        if t.dim() != dim:
            raise ValueError(f"{name} must have {dim} dimensions, got shape {list(t.shape)}")
        if t.dtype != x.dtype or t.device != x.device:
            raise TypeError(f"{name} must match x's dtype {x.dtype} and device {x.device}, got "
                            f"{t.dtype} on {t.device}")
    d, n = x.shape[1], W_enc.shape[1]
    if W_enc.shape[0] != d or b_enc.shape[0] != n or b_dec.shape[0] != d:
        raise ValueError(f"need W_enc [d_model={d}, d_sae], b_enc [d_sae], b_dec [d_model]; got "
                         f"{list(W_enc.shape)}, {list(b_enc.shape)}, {list(b_dec.shape)}")
    if not 1 <= k <= min(n, 256):
        raise ValueError(f"k must be in [1, min(d_sae={n}, 256)] for the triton backend, got {k}")


def _tma_problem(xc: Tensor, W_enc: Tensor) -> str | None:
    """Why tensor descriptors cannot load x' [B, d] and W_enc [d, n] (they need 16-byte aligned
    base pointers and row strides), or None when they can."""
    size = xc.element_size()
    for name, length in (("d_model", xc.shape[1]), ("d_sae", W_enc.shape[1])):
        if length * size % 16:
            return (f"EncodeConfig(tma=True) needs 16-byte rows, so d_model and d_sae multiples "
                    f"of {16 // size} for {xc.dtype}; got {name}={length} ({length * size} "
                    "bytes); use tma=False")
    for name, t in (("x - b_dec", xc), ("W_enc", W_enc)):
        if t.data_ptr() % 16:
            return (f"EncodeConfig(tma=True) needs 16-byte aligned data; {name} starts at address "
                    f"{t.data_ptr():#x}; use tma=False")
    return None


def _descriptor_scratch(size: int, alignment: int, stream: int | None) -> Tensor:
    """Global memory for the device-side tensor descriptors of a launch (triton.set_allocator)."""
    return torch.empty(size, device="cuda", dtype=torch.int8)


def _split_columns(n: int, rows_blocks: int, config: EncodeConfig, device: torch.device) -> int:
    """Columns per range: a multiple of block_n, with enough ranges to fill the GPU."""
    tiles = triton.cdiv(n, config.block_n)
    splits = config.splits
    if splits is None:
        # One wave: more ranges cost more first-tile fills of the running top-k (measured on an
        # H100 at B=8192, n=65536, k=64: 1 range per row block 13.0 ms, 2 ranges 8.2 ms, 4 ranges
        # 8.8 ms, with 64 row blocks on 132 SMs).
        sms = 1
        if device.type == "cuda":
            sms = torch.cuda.get_device_properties(device).multi_processor_count
        splits = max(1, round(sms / rows_blocks))
    splits = max(1, min(splits, tiles))
    return triton.cdiv(tiles, splits) * config.block_n


# The widest candidate list (splits * k, padded to a power of two) that _merge_kernel ranks in
# registers, width^2 comparisons per row (B=8192 at k=64 has 2 x 64 candidates); wider lists
# (k > 64, or many ranges for a small batch) merge with torch ops. At 256, 8 warps, ptxas for
# sm_90 spilled 160 bytes (2.7 KB for sm_80); at 128, 4 warps, 168 registers and no spills.
MERGE_WIDTH = 128


def _merge_warps(w_pad: int) -> int:
    """Warps of a merge program: about 128 of its w_pad^2 comparisons per thread."""
    return max(1, min(4, w_pad * w_pad // (128 * 32)))


def _ordered_keys(values: Tensor, ids: Tensor) -> Tensor:
    """int64 keys ordered like (value, -id): float32 bits made monotone, id in the low word."""
    bits = values.view(torch.int32)
    monotone = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return (monotone.to(torch.int64) << 32) + (0x7FFFFFFF - ids.to(torch.int64))


def topk_encode_forward(
    x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor, k: int,
    config: EncodeConfig | None = None,
) -> tuple[Tensor, Tensor]:
    """values [B, k] (x's dtype) and indices [B, k] int64 (ascending per row) of the TopK code.

    Forward only; sparsecode.ops.topk_encode adds the autograd formula.
    """
    _check(x, W_enc, b_enc, b_dec, k)
    B, d = x.shape
    n = W_enc.shape[1]
    xc = (x - b_dec).contiguous()
    w = W_enc.contiguous()
    config = config or default_config(xc, w)
    if config.tma:
        problem = _tma_problem(xc, w)
        if problem is not None:
            raise ValueError(problem)
        # The descriptors are written to scratch memory at launch, from triton's allocator (a
        # context variable, so it is set here, in the launching thread).
        triton.set_allocator(_descriptor_scratch)
    row_blocks = triton.cdiv(B, config.block_b)
    cols_per_split = _split_columns(n, row_blocks, config, x.device)
    splits = triton.cdiv(n, cols_per_split)
    cand_v = torch.empty(B, splits * k, dtype=torch.float32, device=x.device)
    cand_i = torch.empty(B, splits * k, dtype=torch.int32, device=x.device)
    tf32 = x.dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32
    _encode_kernel[(row_blocks, splits)](
        xc, w, b_enc.contiguous(), cand_v, cand_i,
        B, d, n, k, cols_per_split // config.block_n,
        BLOCK_B=config.block_b, BLOCK_N=config.block_n, BLOCK_D=config.block_d,
        K_PAD=triton.next_power_of_2(k), INPUT_PRECISION="tf32" if tf32 else "ieee",
        TMA=config.tma, SELECT_SPLIT=2 if config.select_halves else 1,
        KEYED=_keyed(x.dtype, config), UNCHECKED=config.unchecked_steps,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    width = splits * k
    w_pad = triton.next_power_of_2(width)
    if w_pad > MERGE_WIDTH:
        if splits > 1:
            best = torch.topk(_ordered_keys(cand_v, cand_i), k, dim=1, sorted=False).indices
            cand_v, cand_i = cand_v.gather(1, best), cand_i.gather(1, best)
        indices, order = torch.sort(cand_i.to(torch.int64), dim=1)
        return torch.relu(cand_v.gather(1, order)).to(x.dtype), indices
    values = torch.empty(B, k, dtype=x.dtype, device=x.device)
    indices = torch.empty(B, k, dtype=torch.int64, device=x.device)
    _merge_kernel[(B,)](cand_v, cand_i, values, indices, k, width, W_PAD=w_pad,
                        num_warps=_merge_warps(w_pad))
    return values, indices
