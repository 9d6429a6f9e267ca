"""BatchTopK selection on the sparse code (Bussmann et al. 2024; SAELens's BatchTopK SAEs).

A BatchTopK SAE keeps the B*k largest activations of a whole batch [B, d_sae], so that k is
an average and a row that needs more latents gets them. sparsecode keeps its sparse format:
the encode gives each row's top ``c`` candidates (values, indices [B, c], c = k_max + 1 at
most), and the selection below zeroes all but the B*k largest candidate values of the batch.
Zeroed slots carry no gradient (the kept values are ``values * mask``) and the kernels skip
them. Among equal values the earlier (row, latent) in row-major order is kept, as in
:func:`sparsecode.reference.batch_topk_encode`; so with every row's true top B*k inside its
candidates the code equals the dense BatchTopK code exactly.

The extra candidate (the row's smallest, the "probe") is never kept: when it beats the batch's
threshold, the row had more than k_max activations worth keeping and lost some, which
:class:`BatchSelection` counts.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class BatchSelection(NamedTuple):
    """keep [B, c] bool, the smallest kept positive value [] (inf when none), and how many rows
    [] lost activations to the k_max cap."""

    keep: Tensor
    smallest_kept: Tensor
    rows_over_cap: Tensor


def select(values: Tensor, total: int, probe: bool) -> BatchSelection:
    """The `total` largest of values [B, c] (>= 0), the earlier flat position first among equals.

    probe: whether each row's smallest candidate (the first among equals) is only a probe,
    never kept.
    """
    flat = values.detach().float().flatten()
    eligible = torch.ones_like(flat, dtype=torch.bool)
    if probe:
        rows = torch.arange(values.shape[0], device=values.device)
        probe_at = rows * values.shape[1] + values.detach().argmin(dim=1)
        eligible[probe_at] = False
    scores = torch.where(eligible, flat, -1.0)
    total = min(total, flat.numel() - (values.shape[0] if probe else 0))  # the eligible count
    threshold = torch.kthvalue(scores, scores.numel() - total + 1).values
    above = scores > threshold
    tied = scores == threshold
    keep = above | (tied & (tied.cumsum(0) <= total - above.sum()))
    kept_positive = torch.where(keep & (flat > 0), flat, torch.inf)
    rows_over_cap = (flat[probe_at] > threshold).sum() if probe else flat.new_zeros((), dtype=torch.int64)
    return BatchSelection(keep.view_as(values), kept_positive.min(), rows_over_cap)


def compact(values: Tensor, indices: Tensor, keep: Tensor) -> tuple[Tensor, Tensor]:
    """The code narrowed to w = the most slots any row keeps: each row's kept slots first (in
    index order), then zero-valued slots. values, indices, keep [B, c] -> [B, w].

    Every op downstream costs O(B * width), so the B*k kept entries should not be carried in
    k_max + 1 slots per row."""
    width = max(1, int(keep.sum(dim=1).max()))
    order = torch.sort((~keep).to(torch.uint8), dim=1, stable=True).indices[:, :width]
    return values.gather(1, order), indices.gather(1, order)
