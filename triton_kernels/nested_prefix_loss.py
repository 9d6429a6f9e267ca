"""Nested-prefix (Matryoshka) loss forward and backward (DESIGN.md §3.4): every prefix's
squared residual and the full reconstruction, then every gradient, from walks of gathered
decoder rows per row, as the sparse decode makes.

    group[b, j]      = the first g with indices[b, j] < prefix_sizes[g]
    r_g[b]           = x[b] - b_dec - sum of values[b, j] * W_dec[indices[b, j]] over the slots
                       of groups <= g
    partial[t, b, g] = sum of r_g[b, c]^2 over the columns c of column tile t   (float32)
    x_hat[b]         = b_dec + sum of values[b, j] * W_dec[indices[b, j]] over all slots
    backward, with scale_g = 2 (grad_loss w_g + grad_prefix_losses[g]) / B and the upstream
    grad_x_hat (zero when absent):
    S_h[b]           = sum over g >= h of scale_g r_g[b] - grad_x_hat[b]
    grad_values[b,j] = -W_dec[indices[b, j]] . S_{group[b, j]}[b]
    grad_W_dec[i]    = -sum over the pairs (b, j) of latent i of values[b, j] S_{group[b, j]}[b]
    grad_x           = S_0 + grad_x_hat,   grad_b_dec = sum over b of grad_x_hat - grad_x

x [B, d], values / indices [B, k] (int64), W_dec [n, d], b_dec [d], G <= 16 prefix sizes;
outputs in x's dtype, float32 accumulation.

Plan (_plan_kernel). Each row's slots sorted by (group, slot): tl.sort of the int32 keys
group * K_PAD + slot over a [BLOCK_P, K_PAD] block of rows gives, for each walk position, the
slot there (order), its group, latent and value ([B, k] each: int32, int32, int32, float32),
so that a walk loads a position's slot without first loading where it is. Reads B*k*(8 + s)
bytes (s: the values' element size) and writes B*k*16.

Walks. The forward and the backward below walk the k positions of each row like the sparse
decode, with the gathers pipelined at the depth the autotuner picks (sparse_decode.autotuned),
under the same register cap.

Forward (_forward_kernel). A program owns BLOCK_B rows and BLOCK_D columns, as the sparse
decode's forward does, and walks the k positions: before the slot of group h it records the
residual's squared norm for each group from the row's last recorded one up to h - 1 (no slot of
those groups is left, so the residual is theirs), then subtracts the slot's values * W_dec row;
after the last position the norm goes to the remaining groups. The norms are tile reductions
over the row's columns, made at every position because some row of the tile nearly always
crosses a boundary there (each row crosses up to G - 1 of them in k positions). The walk's
final residual x - x_hat (float32) is the forward's fourth output, saved for the backward, as
two tensors in x's dtype whose sum it is (hi = r rounded, lo = r - hi rounded: about 16
mantissa bits in bfloat16, exact in float32). Rounded once, it lost too much before S is
rounded too (a bfloat16 test case went past its tolerance); stored as float32 it needed a
layout conversion that took the forward from 80 to 94 registers (sm_90).

Backward (_backward_kernel). The same tiles: starting from the forward's residual of all slots,
a walk back over the positions adds each slot back: entering a group (going down)
it adds scale_g r for the groups it passes, since r is their residual, writes the row's S of
that group to S [G * B, d] (x's dtype) for grad_W_dec, and stores the tile's part of each
slot's dot with S (float32) to partial [tiles, B, k]. grad_W_dec is the per-latent sum over
the pairs with src_rows = group * B + b (sparse_grad.latent_rows_sum: the extension's kernels,
or torch ops where it has none for the device). S in float32 would be stored
through a layout conversion at every position (4 floats per thread against the tile's 8
16-bit elements). The dots are not taken from the stored S (latent_rows_sum_dots would make
them on the same pass as grad_W_dec): a dot of d rounded elements can cancel, and single-dot
cases in bfloat16 then went past the 2e-2 tolerance.

Cost. Forward: 2*B*k*d FLOPs for the gathers plus 2*B*k*d for the norms; reads B*k*d gathered
weight elements (each row segment contiguous) and x, writes x_hat and the residual (B*d each)
and partial (B*G*tiles*4 bytes), against the G decodes of a loss that decodes each prefix on
its own. Backward: one walk of gathers (4*B*k*d FLOPs with the dots), the residual and
grad_x (B*d each), S written once (at most G*B*d elements) and the dots' partial
(B*k*tiles*4 bytes); then latent_rows_sum gathers B*k rows of S (from L2) and writes
grad_W_dec (n*d). Starting from the saved residual instead of
walking forward to it again halves the backward's gathers, for 2*B*d elements kept from the
forward to the backward.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from sparsecode.sparse_grad import latent_rows_sum
from sparsecode.triton_kernels.sparse_decode import _blocks, launch_walk, walk_registers

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_GROUPS = 16
# The walk holds the residual and the reconstruction tiles: the decode's 32 x 128 tiles over 8
# warps hold 16 elements of each per thread (over 4 warps, 32: 168 registers for sm_90 bfloat16
# with Triton 3.9, d, k and B multiples of 16 as Triton specialises them).
_WARPS = 8
# The walks' pipelining depths that the autotuner tries (sparse_decode.autotuned). At the
# register cap (bfloat16, Triton 3.6, sm_90) the forward spills 0 / 24 / 56 bytes at depths
# 1 / 2 / 3 (80 at depth 4), the backward 8 / 16 / 64.
NESTED_STAGES = (1, 2, 3)


def _plan_rows(k_pad: int) -> int:
    """Rows per plan program: about 4096 keys, or 64 under the CPU interpreter, whose tl.sort
    is a Python sorting network."""
    cap = 64 if os.environ.get("TRITON_INTERPRET") == "1" else 4096
    return max(1, cap // k_pad)


@triton.jit
def _plan_kernel(idx_ptr, val_ptr, sizes_ptr, order_ptr, group_ptr, latent_ptr, value_ptr, B, k,
                 G, BLOCK_P: tl.constexpr, K_PAD: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    slot = tl.arange(0, K_PAD)
    live = (rows < B)[:, None] & (slot < k)[None, :]
    at = rows[:, None].to(tl.int64) * k + slot[None, :]
    index = tl.load(idx_ptr + at, mask=live, other=0)
    group = tl.zeros([BLOCK_P, K_PAD], tl.int32)
    for g in range(0, G - 1):
        group += (index >= tl.load(sizes_ptr + g)).to(tl.int32)
    key = tl.where(live, group, G) * K_PAD + slot[None, :]  # padding sorts last
    key = tl.sort(key, 1)
    order = key % K_PAD
    tl.store(order_ptr + at, order, mask=live)
    tl.store(group_ptr + at, key // K_PAD, mask=live)
    src = rows[:, None].to(tl.int64) * k + order
    tl.store(latent_ptr + at, tl.load(idx_ptr + src, mask=live, other=0).to(tl.int32), mask=live)
    tl.store(value_ptr + at, tl.load(val_ptr + src, mask=live, other=0.0).to(tl.float32),
             mask=live)


@triton.jit
def _tile(B, d, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    """A program's rows and columns: rows [BLOCK_B], row_ok, col_ok, and the tile's offsets in
    [B, d] and mask."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < B
    col_ok = cols < d
    tile = row_ok[:, None] & col_ok[None, :]
    return rows, cols, row_ok, col_ok, tile, rows[:, None].to(tl.int64) * d + cols[None, :]


@triton.jit
def _slot_at(latent_ptr, value_ptr, group_ptr, rows, row_ok, k, q, G):
    """The slot at walk position q of each row: value (float32), latent and group (G past
    the batch), each a load that does not wait for another."""
    at = rows.to(tl.int64) * k + q
    v = tl.load(value_ptr + at, mask=row_ok, other=0.0)
    i = tl.load(latent_ptr + at, mask=row_ok, other=0).to(tl.int64)
    return v, i, tl.load(group_ptr + at, mask=row_ok, other=G)


@triton.jit
def _forward_kernel(
    x_ptr, bias_ptr, latent_ptr, value_ptr, group_ptr, w_ptr, xhat_ptr, resid_ptr,
    partial_ptr, B, k, d, G,
    BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, G_PAD: tl.constexpr, STAGES: tl.constexpr,
):
    rows, cols, row_ok, col_ok, tile, at = _tile(B, d, BLOCK_B, BLOCK_D)
    bias = tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    r = tl.load(x_ptr + at, mask=tile, other=0.0).to(tl.float32) - bias[None, :]
    r = tl.where(tile, r, 0.0)
    recon = tl.zeros([BLOCK_B, BLOCK_D], tl.float32) + bias[None, :]
    gcol = tl.arange(0, G_PAD)
    losses = tl.zeros([BLOCK_B, G_PAD], tl.float32)
    recorded = tl.zeros([BLOCK_B], tl.int32)  # groups below this one have their norm
    for q in tl.range(0, k, num_stages=STAGES):
        v, i, group = _slot_at(latent_ptr, value_ptr, group_ptr, rows, row_ok, k, q, 0)
        norm = tl.sum(r * r, axis=1)
        due = (gcol[None, :] >= recorded[:, None]) & (gcol[None, :] < group[:, None])
        losses += tl.where(due, norm[:, None], 0.0)
        recorded = tl.maximum(recorded, group)
        live = row_ok & (v != 0.0)
        w = tl.load(w_ptr + i[:, None] * d + cols[None, :], mask=live[:, None] & col_ok[None, :],
                    other=0.0).to(tl.float32)
        r -= v[:, None] * w
        recon += v[:, None] * w
    norm = tl.sum(r * r, axis=1)
    rest = (gcol[None, :] >= recorded[:, None]) & (gcol[None, :] < G)
    losses += tl.where(rest, norm[:, None], 0.0)
    tl.store(xhat_ptr + at, recon.to(xhat_ptr.dtype.element_ty), mask=tile)
    hi = r.to(resid_ptr.dtype.element_ty)  # r as hi + lo in x's dtype: its layout, 2x the bits
    tl.store(resid_ptr + at, hi, mask=tile)
    tl.store(resid_ptr + B * d + at, (r - hi.to(tl.float32)).to(resid_ptr.dtype.element_ty),
             mask=tile)
    out = (tl.program_id(1).to(tl.int64) * B + rows[:, None]) * G + gcol[None, :]
    tl.store(partial_ptr + out, losses, mask=row_ok[:, None] & (gcol < G)[None, :])


@triton.jit
def _backward_kernel(
    resid_ptr, latent_ptr, value_ptr, group_ptr, order_ptr, w_ptr, gxh_ptr, cum_ptr,
    gx_ptr, s_ptr, partial_ptr, B, k, d, G,
    HAS_GXH: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, STAGES: tl.constexpr,
):
    rows, cols, row_ok, col_ok, tile, at = _tile(B, d, BLOCK_B, BLOCK_D)
    r = (tl.load(resid_ptr + at, mask=tile, other=0.0).to(tl.float32)  # residual of all slots
         + tl.load(resid_ptr + B * d + at, mask=tile, other=0.0).to(tl.float32))

    # A is the suffix sum of scale_g r_g over the groups the walk has passed, and S = A -
    # grad_x_hat. grad_x is A at the end, kept apart from grad_x_hat: an upstream grad_x_hat
    # nearly cancels the loss's own gradient in S, and adding it back lost grad_x's low bits.
    A = tl.zeros([BLOCK_B, BLOCK_D], tl.float32)
    if HAS_GXH:
        gxh = tl.load(gxh_ptr + at, mask=tile, other=0.0).to(tl.float32)
    partial = partial_ptr + tl.program_id(1).to(tl.int64) * B * k
    walk = rows.to(tl.int64) * k
    for q in tl.range(0, k, num_stages=STAGES):  # backward: slots in reverse walk order
        p = k - 1 - q
        v, i, group = _slot_at(latent_ptr, value_ptr, group_ptr, rows, row_ok, k, p, G)
        slot = tl.load(order_ptr + walk + p, mask=row_ok, other=0)
        # The groups passed are those of the later positions, the smallest of which is the next
        # position's (groups rise along the walk; G past its end): loaded, not carried over
        # from the last step, so that the loads of a step depend on none of the last step's.
        passed = tl.load(group_ptr + walk + p + 1, mask=row_ok & (rows * 0 + p + 1 < k), other=G)
        # r is the residual of every group from this slot's up to the last one passed: their
        # scales sum to cum[passed] - cum[group] (zero within a group).
        entering = tl.load(cum_ptr + passed) - tl.load(cum_ptr + group)
        A += entering[:, None] * r
        S = A
        if HAS_GXH:
            S = A - gxh
        first = row_ok & (group < passed)  # the row's first slot of this group: S is its S
        s_at = (group[:, None].to(tl.int64) * B + rows[:, None]) * d + cols[None, :]
        tl.store(s_ptr + s_at, S.to(s_ptr.dtype.element_ty),
                 mask=first[:, None] & col_ok[None, :])
        w = tl.load(w_ptr + i[:, None] * d + cols[None, :], mask=tile, other=0.0).to(tl.float32)
        tl.store(partial + walk + slot, tl.sum(w * S, axis=1), mask=row_ok)
        r += v[:, None] * w
    # All groups from the first position's on are passed.
    passed = tl.load(group_ptr + walk, mask=row_ok & (rows * 0 < k), other=G)
    A += tl.load(cum_ptr + passed)[:, None] * r
    tl.store(gx_ptr + at, A.to(gx_ptr.dtype.element_ty), mask=tile)


def _check(x: Tensor, values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Tensor,
           prefix_sizes: Sequence[int], prefix_weights: Sequence[float]) -> None:
    """Raises, naming the argument and the fix, unless the Triton walks can run these inputs."""
    if x.dtype not in _DTYPES:
        raise TypeError(
            f"the triton backend takes float32, bfloat16 or float16 tensors, got x of {x.dtype}; "
            "use backend='cuda' or 'reference' for other dtypes"
        )
    for name, t, dim in (("x", x, 2), ("values", values, 2), ("W_dec", W_dec, 2),
                         ("b_dec", b_dec, 1)):
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
    if W_dec.shape[0] >= 2**31:
        raise ValueError(f"the triton backend takes d_sae < 2^31 (its walks hold latents as "
                         f"int32), got {W_dec.shape[0]}; use the cpp backend")
    if W_dec.shape[1] != d or b_dec.shape[0] != d:
        raise ValueError(f"W_dec must be [d_sae, d_model] and b_dec [d_model] with d_model = {d}, "
                         f"got {list(W_dec.shape)} and {list(b_dec.shape)}")
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
    torch._assert_async(((indices >= 0) & (indices < W_dec.shape[0])).all(),
                        "indices must lie in [0, d_sae)")


def _on_device(numbers: Sequence[float], dtype: torch.dtype, device: torch.device) -> Tensor:
    """numbers as a [len(numbers)] tensor on device, without waiting for the GPU: a copy from
    pageable memory synchronises the stream (every Matryoshka step runs this op), so CUDA
    tensors come from pinned memory, copied without blocking."""
    host = torch.tensor(list(numbers), dtype=dtype)
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


class _Walk(NamedTuple):
    """Each row's slots in walk order (sorted by group, then slot), [B, k] each: the slot at each
    walk position (int32), its group (int32), latent (int32) and value (float32)."""

    order: Tensor
    group: Tensor
    latent: Tensor
    value: Tensor


def _checked_plan(
    x: Tensor, values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Tensor,
    prefix_sizes: Sequence[int], prefix_weights: Sequence[float],
) -> tuple[Tensor, Tensor, _Walk]:
    """Checks the inputs, then (idx, sizes, walk): indices contiguous, the prefix sizes as an
    int64 [G] tensor, and the walk-ordered slots."""
    _check(x, values, indices, W_dec, b_dec, prefix_sizes, prefix_weights)
    B, k = indices.shape
    idx = indices.contiguous()
    sizes = _on_device(prefix_sizes, torch.int64, x.device)
    walk = _Walk(*(torch.empty(B, k, dtype=torch.int32, device=x.device) for _ in range(3)),
                 torch.empty(B, k, dtype=torch.float32, device=x.device))
    k_pad = triton.next_power_of_2(max(k, 1))
    block_p = _plan_rows(k_pad)
    _plan_kernel[(triton.cdiv(B, block_p),)](idx, values.contiguous(), sizes, *walk, B, k,
                                             len(prefix_sizes), BLOCK_P=block_p, K_PAD=k_pad)
    return idx, sizes, walk


def nested_prefix_loss_forward(
    x: Tensor, values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Tensor,
    prefix_sizes: Sequence[int], prefix_weights: Sequence[float], stages: int | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """loss [], prefix_losses [G] (means over the rows) and x_hat [B, d], and the residual of
    all slots x - x_hat as resid [2, B, d] whose two halves sum to it, all in x's dtype.

    Forward only: nested_prefix_loss_backward is its backward, and starts from the residual.
    stages: the walk's pipelining depth (sparse_decode.autotuned); None lets the autotuner choose.
    """
    _, _, walk = _checked_plan(x, values, indices, W_dec, b_dec, prefix_sizes, prefix_weights)
    B, d = x.shape
    k = values.shape[1]
    G = len(prefix_sizes)
    device = x.device
    block_b, block_d = _blocks()
    tiles = triton.cdiv(d, block_d)
    x_hat = torch.empty(B, d, dtype=x.dtype, device=device)
    resid = torch.empty(2, B, d, dtype=x.dtype, device=device)
    partial = torch.empty(tiles, B, G, dtype=torch.float32, device=device)
    launch_walk(
        _forward_kernel, (triton.cdiv(B, block_b), tiles), stages, NESTED_STAGES, _WARPS,
        walk_registers(x.dtype), x.contiguous(), b_dec.contiguous(), walk.latent, walk.value,
        walk.group, W_dec.contiguous(), x_hat, resid, partial, B, k, d, G,
        BLOCK_B=block_b, BLOCK_D=block_d, G_PAD=triton.next_power_of_2(G),
    )
    means = partial.double().sum(0).sum(0) / B
    weights = _on_device(prefix_weights, torch.float64, device)
    return (means * weights).sum().to(x.dtype), means.to(x.dtype), x_hat, resid


def nested_prefix_loss_backward(
    grad_loss: Tensor, grad_prefix_losses: Tensor, grad_x_hat: Tensor | None, x: Tensor,
    values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Tensor,
    prefix_sizes: Sequence[int], prefix_weights: Sequence[float], resid: Tensor,
    stages: int | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(grad_x [B, d], grad_values [B, k], grad_W_dec [n, d], grad_b_dec [d]) of the loss,
    prefix losses and x_hat of nested_prefix_loss_forward, given the upstream grad_loss [],
    grad_prefix_losses [G] and grad_x_hat [B, d] (or None), and the forward's residual
    resid [2, B, d]. The walk back through the slots runs here; grad_W_dec is the per-latent
    sum over S (sparse_grad.latent_rows_sum). stages: as for nested_prefix_loss_forward."""
    if grad_x_hat is not None and grad_x_hat.shape != x.shape:
        raise ValueError(f"grad_x_hat must be [B, d_model] like x, got {list(grad_x_hat.shape)}")
    if resid.shape != (2, *x.shape) or resid.dtype != x.dtype:
        raise ValueError(f"resid must be the forward's [2, B, d_model] residual in x's dtype, got "
                         f"{list(resid.shape)} {resid.dtype}")
    idx, sizes, walk = _checked_plan(x, values, indices, W_dec, b_dec, prefix_sizes,
                                     prefix_weights)
    B, d = x.shape
    k = values.shape[1]
    G = len(prefix_sizes)
    device = x.device
    weights = _on_device(prefix_weights, torch.float64, device)
    scale = ((grad_loss.reshape(()).double() * weights + grad_prefix_losses.reshape(G).double())
             * (2.0 / max(B, 1)))  # no rows, no terms: B = 0 scales nothing
    cum = torch.cat([scale.new_zeros(1), scale.cumsum(0)]).float()  # cum[g] = sum of scale_<g
    block_b, block_d = _blocks()
    tiles = triton.cdiv(d, block_d)
    grad_x = torch.empty(B, d, dtype=x.dtype, device=device)
    S = torch.empty(G * B, d, dtype=x.dtype, device=device)
    partial = torch.empty(tiles, B, k, dtype=torch.float32, device=device)
    gxh = grad_x_hat.to(x.dtype).contiguous() if grad_x_hat is not None else grad_x
    # With grad_x_hat the walk holds one more tile: capped, it spills 120 to 136 bytes.
    launch_walk(
        _backward_kernel, (triton.cdiv(B, block_b), tiles), stages, NESTED_STAGES, _WARPS,
        None if grad_x_hat is not None else walk_registers(x.dtype), resid.contiguous(),
        walk.latent, walk.value, walk.group, walk.order, W_dec.contiguous(), gxh, cum, grad_x, S,
        partial, B, k, d, G,
        HAS_GXH=grad_x_hat is not None, BLOCK_B=block_b, BLOCK_D=block_d,
    )
    grad_values = (-partial.sum(0)).to(x.dtype)
    # Pair (b, j) reads S_{group of its latent}[b]: row group * B + b of S.
    slot_group = torch.bucketize(idx, sizes[:-1], right=True)
    src_rows = slot_group * B + torch.arange(B, device=device)[:, None]
    grad_W_dec = latent_rows_sum(-values, idx, S, W_dec.shape[0], src_rows)
    grad_b_dec = -grad_x.sum(0) if grad_x_hat is None else gxh.sum(0) - grad_x.sum(0)
    return grad_x, grad_values, grad_W_dec, grad_b_dec
