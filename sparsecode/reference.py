"""Pure-PyTorch references of the hot-path ops, written for clarity, not speed.

They use a dense ``[B, d_sae]`` code and decode once per prefix, and take their gradients
from PyTorch's autograd. Every other backend is tested against them. Shapes: x [B, d],
W_enc [d, n], b_enc [n], W_dec [n, d], b_dec [d], values/indices [B, k].
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def topk_encode(
    x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor, k: int
) -> tuple[Tensor, Tensor]:
    """values, indices [B, k]: relu of the k largest of (x - b_dec) @ W_enc + b_enc per row.

    Each row's indices are sorted ascending and values follow them.
    """
    pre = (x - b_dec) @ W_enc + b_enc
    top = torch.topk(pre, k, dim=-1)
    indices, order = torch.sort(top.indices, dim=-1)
    values = torch.relu(torch.gather(top.values, -1, order))
    return values, indices


def dense_code(values: Tensor, indices: Tensor, d_sae: int) -> Tensor:
    """The [B, d_sae] dense code whose row b holds values[b, j] at column indices[b, j]."""
    dense = values.new_zeros(values.shape[0], d_sae)
    return dense.scatter_add(-1, indices, values)


def sparse_decode(values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Tensor) -> Tensor:
    """x_hat [B, d] = dense code @ W_dec + b_dec."""
    return dense_code(values, indices, W_dec.shape[0]) @ W_dec + b_dec


def nested_prefix_loss(
    x: Tensor,
    values: Tensor,
    indices: Tensor,
    W_dec: Tensor,
    b_dec: Tensor,
    prefix_sizes: Sequence[int],
    prefix_weights: Sequence[float],
) -> tuple[Tensor, Tensor]:
    """loss [] and prefix_losses [G] of the Matryoshka objective.

    prefix_losses[g] = mean_b ||x - x_hat_g||^2 where x_hat_g decodes the code restricted to
    latents < prefix_sizes[g]; loss = sum_g prefix_weights[g] * prefix_losses[g].
    """
    code = dense_code(values, indices, W_dec.shape[0])
    prefix_losses = torch.stack(
        [
            ((x - (code[:, :m] @ W_dec[:m] + b_dec)) ** 2).sum(-1).mean()
            for m in prefix_sizes
        ]
    )
    weights = torch.tensor(list(prefix_weights), dtype=prefix_losses.dtype, device=x.device)
    return (weights * prefix_losses).sum(), prefix_losses


def batch_topk_encode(
    x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor, k: int
) -> Tensor:
    """The dense BatchTopK code [B, n]: of relu((x - b_dec) @ W_enc + b_enc), the B*k largest
    entries of the whole batch are kept (the earlier in row-major order among equal values)
    and every other entry is zero."""
    acts = torch.relu((x - b_dec) @ W_enc + b_enc)
    flat = acts.flatten()
    order = torch.sort(flat, descending=True, stable=True).indices[: x.shape[0] * k]
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[order] = True
    return torch.where(keep, flat, 0).view_as(acts)
