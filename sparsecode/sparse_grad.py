"""Sparse gradients for the triton backend (DESIGN.md §3.3).

The Triton kernels cover the encode and decode forwards; the gradients that sum over the B*k
active (row, latent) pairs by latent come from the compiled extension
(``torch.ops.sparsecode_C``) when it has kernels for the tensors' device, the decode's
grad_values from the same pass over the pairs. Where it has none (Triton installed, extension
built without CUDA) grad_values is the Triton gather kernel and the sums run as plain torch ops
over chunks of rows, so no tensor larger than about ``_CHUNK_ELEMENTS`` is made and no dense
``[B, d_sae]`` matrix ever is; the nested-prefix loss's Triton backward takes its grad_W_dec
and grad_values from the same sums and dots (latent_rows_sum_dots, where the dots run as chunked
torch ops). Shapes: x [B, d], W_enc [d, n], W_dec [n, d], values/indices [B, k].
"""

from __future__ import annotations

import torch
from torch import Tensor

from sparsecode.backends import compiled_kernels

_CHUNK_ELEMENTS = 1 << 24


def _row_chunks(rows: int, width: int) -> range:
    """Starts of row chunks whose [chunk, width] temporaries hold about _CHUNK_ELEMENTS."""
    return range(0, rows, max(1, _CHUNK_ELEMENTS // max(1, width)))


def latent_rows_sum(coef: Tensor, indices: Tensor, src: Tensor, d_sae: int,
                    src_rows: Tensor | None = None) -> Tensor:
    """out [d_sae, d] (src's dtype): out[i] = sum of coef[b, j] * src[b] over pairs with
    indices[b, j] == i; coef, indices [B, k], src [B, d]. With src_rows [B, k] (int64), pair
    (b, j) reads src[src_rows[b, j]] instead (src [R, d], any R)."""
    found = compiled_kernels(src.device)
    if found is not None:
        return found.latent_rows_sum(coef, indices, src, d_sae, src_rows)
    B, k = indices.shape
    d = src.shape[1]
    out = torch.zeros(d_sae, d, dtype=torch.float32, device=src.device)
    chunks = _row_chunks(B, k * d)
    for r0 in chunks:
        rows = slice(r0, r0 + chunks.step)
        read = src[rows, None, :] if src_rows is None else src[src_rows[rows]]
        contrib = coef[rows, :, None].float() * read.float()
        out.index_add_(0, indices[rows].reshape(-1), contrib.reshape(-1, d))
    return out.to(src.dtype)


def latent_rows_sum_dots(coef: Tensor, indices: Tensor, src: Tensor, weights: Tensor,
                         src_rows: Tensor) -> tuple[Tensor, Tensor]:
    """(out [d_sae, d] in src's dtype, dots [B, k] float32) from one pass over the pairs where the
    extension has kernels: out is latent_rows_sum(coef, indices, src, d_sae, src_rows) with
    d_sae = weights.shape[0], and dots[b, j] = src[src_rows[b, j]] . weights[indices[b, j]];
    coef, indices, src_rows [B, k], src [R, d], weights [d_sae, d] in src's dtype."""
    found = compiled_kernels(src.device)
    if found is not None:
        out, dots = found.latent_rows_sum_dots(coef, indices, src, weights, src_rows)
        return out, dots.float()
    B, k = indices.shape
    dots = torch.empty(B, k, dtype=torch.float32, device=src.device)
    chunks = _row_chunks(B, k * src.shape[1])
    for r0 in chunks:
        rows = slice(r0, r0 + chunks.step)
        dots[rows] = (src[src_rows[rows]].float() * weights[indices[rows]].float()).sum(-1)
    return latent_rows_sum(coef, indices, src, weights.shape[0], src_rows), dots


def sparse_decode_grads(g: Tensor, values: Tensor, indices: Tensor,
                        W_dec: Tensor) -> tuple[Tensor, Tensor]:
    """(grad_values [B, k], grad_W_dec [n, d]) of the sparse decode, given g = grad_out [B, d]
    in values' dtype: grad_values[b, j] = g[b] . W_dec[indices[b, j]] and the per-latent sum
    of values * g, from one pass over the pairs where the extension has kernels."""
    found = compiled_kernels(g.device)
    if found is not None:
        grad_W_dec, dots = found.latent_rows_sum_dots(values, indices, g, W_dec)
        return dots.to(g.dtype), grad_W_dec
    from sparsecode.triton_kernels.sparse_decode import sparse_decode_grad_values

    grad_values = sparse_decode_grad_values(g, indices, W_dec)
    return grad_values, latent_rows_sum(values, indices, g, W_dec.shape[0])


def topk_encode_backward(
    grad_values: Tensor,
    x: Tensor,
    W_enc: Tensor,
    b_dec: Tensor,
    values: Tensor,
    indices: Tensor,
    need_grad_x: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(grad_x [B, d] ([0, d] unless need_grad_x), grad_W_enc [d, n], grad_b_enc [n],
    grad_b_dec [d]) of the TopK encode, touching only the B*k active latents."""
    found = compiled_kernels(x.device)
    if found is not None:
        return tuple(
            found.topk_encode_backward(grad_values, x, W_enc, b_dec, values, indices, need_grad_x)
        )
    n, k = W_enc.shape[1], indices.shape[1]
    dpre = torch.where(values > 0, grad_values.to(x.dtype), 0)
    grad_W_enc = latent_rows_sum(dpre, indices, x - b_dec, n).t().contiguous()
    grad_b_enc = torch.zeros(n, dtype=torch.float32, device=x.device)
    grad_b_enc.index_add_(0, indices.reshape(-1), dpre.reshape(-1).float())
    grad_x = x.new_empty(x.shape[0] if need_grad_x else 0, x.shape[1])
    W_rows = W_enc.t()
    chunks = _row_chunks(grad_x.shape[0], k * x.shape[1])
    for r0 in chunks:
        rows = slice(r0, r0 + chunks.step)
        gathered = W_rows[indices[rows]].float()
        grad_x[rows] = (dpre[rows, :, None].float() * gathered).sum(1).to(x.dtype)
    grad_b_enc = grad_b_enc.to(x.dtype)
    return grad_x, grad_W_enc, grad_b_enc, -torch.mv(W_enc, grad_b_enc)
