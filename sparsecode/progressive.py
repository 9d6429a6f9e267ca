"""Progressive coding by pruning: rank a TopK SAE's latents, reorder, keep a prefix.

Peter & Søgaard 2025 ("Empirical Evaluation of Progressive Coding for Sparse Autoencoders",
arXiv 2505.00190) found that the importance of a vanilla TopK SAE's latents, best measured
by E[a_i^2] over tokens, follows a power law over rank. Sorting the dictionary by
importance therefore puts most of the reconstruction in a short prefix, and any prefix is
a smaller SAE with no retraining:

    scores = importance(sae, activations)               # [d_sae] float64, E[a_i^2]
    small  = prune(reorder(sae, importance_order(scores)), m)   # a TopKSAE of width m
    fit    = fit_power_law(scores)                      # score ~ c * rank^-alpha

A prefix can be used two ways (:func:`prefix_reconstruction`): ``truncate`` keeps the full
top-k code's entries below m (what a Matryoshka SAE is trained for; L0 may drop below k),
``reencode`` picks the top-k among the first m latents only (what :func:`prune` gives).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from sparsecode.sae import SAE, SparseCode, TopKSAE, _as_int
from sparsecode.sparse_decode import sparse_decode

IMPORTANCE_METHODS = ("mean_sq", "frequency", "mean", "decoder_spectrum")
PREFIX_MODES = ("truncate", "reencode")


class DecoderSpectrum(Tensor):
    """The decoder-row covariance spectrum [d_sae] from ``importance(..., "decoder_spectrum")``.

    A plain tensor for plotting and :func:`fit_power_law`; its entries are eigenvalues, not
    per-latent scores, so :func:`importance_order` refuses it. Tensor ops keep the type;
    ``spectrum.as_subclass(torch.Tensor)`` drops it.
    """


def _batches(activations: Tensor | Iterable[Tensor], batch_size: int) -> Iterator[Tensor]:
    """The batches of activations: a tensor split into batch_size rows, or the iterable itself."""
    if isinstance(activations, Tensor):
        return iter(activations.split(batch_size) if activations.dim() >= 1 else [activations])
    if isinstance(activations, Iterable):
        return iter(activations)
    raise TypeError(
        "activations must be a tensor [N, d_model] or an iterable of [n, d_model] tensors, "
        f"got {type(activations).__name__}"
    )


def _decoder_spectrum(sae: SAE) -> DecoderSpectrum:
    """Eigenvalues (descending, >= 0) of W_dec^T W_dec / d_sae, zero-padded to [d_sae]."""
    W = sae.W_dec.detach().to(torch.float64)
    eigenvalues = torch.linalg.eigvalsh(W.T @ W / sae.d_sae).flip(0).clamp_min(0.0)
    spectrum = W.new_zeros(sae.d_sae)
    # W_dec^T W_dec has rank <= min(d_model, d_sae): eigenvalues past d_sae are zero.
    count = min(sae.d_model, sae.d_sae)
    spectrum[:count] = eigenvalues[:count]
    return spectrum.as_subclass(DecoderSpectrum)


def importance(
    sae: SAE,
    activations: Tensor | Iterable[Tensor] | None,
    method: str = "mean_sq",
    *,
    batch_size: int = 4096,
) -> Tensor:
    """Per-latent importance scores [d_sae] float64 (on the SAE's device), from sae's codes.

    activations: raw activations [N, d_model] (split into batches of batch_size rows) or an
    iterable of [n, d_model] batches; each batch is moved to the SAE's device and dtype and
    encoded with ``sae.encode``, and the scores are accumulated from the sparse code
    (values, indices [n, k]) without a dense [n, d_sae] matrix. With a_i the activation of
    latent i on a token (0 when i is not in the token's code), over all N tokens:

    - ``mean_sq``: E[a_i^2], the score Peter & Søgaard 2025 found best;
    - ``frequency``: E[1{a_i > 0}], the firing rate;
    - ``mean``: E[a_i];
    - ``decoder_spectrum``: not a per-latent score but the eigenvalues (descending) of the
      decoder-row covariance W_dec^T W_dec / d_sae [d_model, d_model], zero-padded (or cut,
      when d_model > d_sae, where the rest are zero) to length d_sae, returned as a
      :class:`DecoderSpectrum` for plotting; activations are not used and may be None.
    """
    if method not in IMPORTANCE_METHODS:
        raise ValueError(f"method must be one of {IMPORTANCE_METHODS}, got {method!r}")
    if method == "decoder_spectrum":
        return _decoder_spectrum(sae)
    if _as_int(batch_size) is None or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if activations is None:
        raise ValueError(
            f"activations is None: method {method!r} needs activations [N, d_model={sae.d_model}]"
        )
    device, dtype = sae.W_enc.device, sae.W_enc.dtype
    totals = torch.zeros(sae.d_sae, dtype=torch.float64, device=device)
    tokens = 0
    with torch.no_grad():
        for batch in _batches(activations, int(batch_size)):
            if not isinstance(batch, Tensor):
                raise TypeError(
                    f"activations must yield tensors [n, d_model], got {type(batch).__name__}"
                )
            if batch.dim() != 2 or batch.shape[1] != sae.d_model:
                raise ValueError(
                    f"activations must be [N, d_model={sae.d_model}] (or batches of "
                    f"[n, d_model]), got a batch of shape {list(batch.shape)}; flatten leading "
                    "dims with .reshape(-1, d_model)"
                )
            if batch.shape[0] == 0:
                continue
            values, indices = sae.encode(batch.to(device=device, dtype=dtype))
            values = values.to(torch.float64)
            if method == "mean_sq":
                contribution = values.square()
            elif method == "frequency":
                contribution = (values > 0).to(torch.float64)
            else:
                contribution = values
            totals.index_add_(0, indices.reshape(-1), contribution.reshape(-1))
            tokens += batch.shape[0]
    if tokens == 0:
        raise ValueError(
            "activations is empty: pass at least one activation vector "
            f"[N >= 1, d_model={sae.d_model}]"
        )
    return totals / tokens


def importance_order(scores: Tensor) -> Tensor:
    """Latent ids [d_sae] int64 by descending score, ties broken by ascending latent id.

    scores: [d_sae] per-latent scores from :func:`importance` (not a decoder spectrum).
    """
    if isinstance(scores, DecoderSpectrum):
        raise ValueError(
            "scores is a decoder spectrum (eigenvalues of the decoder covariance), not a score "
            "per latent: use importance(..., method='mean_sq', 'frequency' or 'mean')"
        )
    if not isinstance(scores, Tensor) or scores.dim() != 1 or scores.numel() == 0:
        shape = list(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
        raise ValueError(f"scores must be a non-empty 1-D tensor [d_sae], got {shape}")
    if scores.is_complex() or scores.dtype == torch.bool:
        raise TypeError(f"scores must be real numbers, got dtype {scores.dtype}")
    if scores.is_floating_point() and not bool(torch.isfinite(scores).all()):
        raise ValueError("scores contains NaN or Inf: recompute them from finite activations")
    return torch.sort(scores.detach(), descending=True, stable=True).indices.to(torch.int64)


def reorder(sae: SAE, order: Tensor) -> SAE:
    """A copy of sae (same class, settings and metadata) whose latent j is sae's latent order[j].

    order: [d_sae] integer tensor, a permutation of range(d_sae) (e.g. from
    :func:`importance_order`). W_enc's columns, b_enc and W_dec's rows are permuted; the
    outputs are unchanged up to the permutation (same x_hat, same code values, indices
    mapped). A Matryoshka SAE keeps its prefix sizes, which now bound the reordered latents.
    """
    if not isinstance(order, Tensor):
        raise TypeError(f"order must be a tensor [d_sae] of latent ids, got {type(order).__name__}")
    if order.dim() != 1 or order.numel() != sae.d_sae:
        raise ValueError(
            f"order must be a 1-D tensor of length d_sae={sae.d_sae}, got shape {list(order.shape)}"
        )
    if order.is_floating_point() or order.is_complex() or order.dtype == torch.bool:
        raise TypeError(f"order must hold integer latent ids, got dtype {order.dtype}")
    device = sae.W_enc.device
    order = order.detach().to(device=device, dtype=torch.int64)
    if not torch.equal(torch.sort(order).values, torch.arange(sae.d_sae, device=device)):
        raise ValueError(
            f"order must be a permutation of range(d_sae={sae.d_sae}) (each latent id once); "
            "build it with importance_order(scores)"
        )
    new = copy.deepcopy(sae)
    with torch.no_grad():
        new.W_enc.copy_(sae.W_enc[:, order])
        new.b_enc.copy_(sae.b_enc[order])
        new.W_dec.copy_(sae.W_dec[order])
    for parameter in new.parameters():
        parameter.grad = None
    return new


def _check_size(sae: SAE, size: int, caller: str) -> int:
    """size as an int in [1, d_sae], or a ValueError naming caller."""
    if _as_int(size) is None or not 1 <= size <= sae.d_sae:
        raise ValueError(
            f"{caller}: size must be an int in [1, d_sae={sae.d_sae}] (the number of leading "
            f"latents to keep), got {size!r}"
        )
    return int(size)


def prune(sae: SAE, size: int) -> TopKSAE:
    """A TopKSAE of width size made of sae's first size latents, with k = min(sae.k, size).

    W_enc[:, :size], b_enc[:size], W_dec[:size] and b_dec are copied; backend, dtype, device,
    train/eval mode, metadata and the activation (a BatchTopK SAE's k_max, capped at size, and
    threshold) follow sae. Call it after :func:`reorder` so the first
    latents are the most important: ``prune(reorder(sae, order), size)``.
    """
    size = _check_size(sae, size, "prune")
    small = TopKSAE(
        sae.d_model, size, min(sae.k, size), sae.backend, activation=sae.activation,
        k_max=min(sae.k_max, size) if sae.activation == "batchtopk" else None,
        dtype=sae.W_enc.dtype, device=sae.W_enc.device,
    )
    with torch.no_grad():
        if sae.activation == "batchtopk":
            small.threshold.copy_(sae.threshold)
        small.W_enc.copy_(sae.W_enc[:, :size])
        small.b_enc.copy_(sae.b_enc[:size])
        small.W_dec.copy_(sae.W_dec[:size])
        small.b_dec.copy_(sae.b_dec)
    small.metadata = copy.deepcopy(sae.metadata)
    small.train(sae.training)
    return small


def prefix_reconstruction(sae: SAE, x: Tensor, size: int, mode: str) -> tuple[Tensor, Tensor]:
    """x_hat [B, d_model] and l0 [B] int64 (active latents used) from sae's first size latents.

    x: [B, d_model] in the SAE's dtype and device. mode:

    - ``truncate``: the full top-k code restricted to latents < size (what Matryoshka
      training optimises); l0 counts the code's non-zero entries below size, at most k.
    - ``reencode``: the code chosen among the first size latents only (top-k', k' = min(k,
      size), for a TopK SAE), the same as ``prune(sae, size)(x).x_hat``; the encoder GEMM covers only those size
      columns.
    """
    if mode not in PREFIX_MODES:
        raise ValueError(f"mode must be one of {PREFIX_MODES}, got {mode!r}")
    size = _check_size(sae, size, "prefix_reconstruction")
    if mode == "truncate":
        values, indices = sae.encode(x)
        kept = indices < size
        x_hat = sae.decode(SparseCode(values, indices), size=size)
        return x_hat, (kept & (values > 0)).sum(dim=1)
    sae._check_input(x)
    values, indices = sae.encode_prefix(x, size)
    x_hat = sparse_decode(values, indices, sae.W_dec[:size], sae.b_dec, backend=sae.backend)
    return x_hat, (values > 0).sum(dim=1)


@dataclass(frozen=True)
class PowerLawFit:
    """Least-squares fits of sorted scores over ranks first_rank..last_rank (1-based, inclusive).

    Power law: score ~ c * rank^(-alpha), r2 its R^2 of log score on log rank.
    Exponential: score ~ exp_c * exp(-exp_rate * rank), exp_r2 its R^2 of log score on rank.
    """

    alpha: float
    c: float
    r2: float
    exp_rate: float
    exp_c: float
    exp_r2: float
    first_rank: int
    last_rank: int

    def predict(self, rank: Tensor | float | Sequence[float]) -> Tensor:
        """The power law's score c * rank^(-alpha) (float64, rank's shape); ranks must be > 0."""
        ranks = torch.as_tensor(rank, dtype=torch.float64)
        if not bool((ranks > 0).all()):
            raise ValueError("rank must be positive (ranks start at 1)")
        return self.c * ranks.pow(-self.alpha)


def _linear_fit(x: Tensor, y: Tensor) -> tuple[float, float, float]:
    """slope, intercept and R^2 of the least-squares line y ~ slope * x + intercept (1-D)."""
    x_centered, y_centered = x - x.mean(), y - y.mean()
    slope = float((x_centered * y_centered).sum() / x_centered.square().sum())
    intercept = float(y.mean() - slope * x.mean())
    ss_res = float((y - (slope * x + intercept)).square().sum())
    ss_tot = float(y_centered.square().sum())
    # Constant y is fitted exactly (ss_res = 0 too): call that a perfect fit.
    return slope, intercept, 1.0 if ss_tot == 0.0 else 1.0 - ss_res / ss_tot


def _fraction(value: float, name: str) -> float:
    """value as a float when it is a finite real number (the range is checked by the caller)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite fraction in [0, 1], got {value!r}")
    return float(value)


def fit_power_law(scores: Tensor, head: float = 0.0, tail: float = 1.0) -> PowerLawFit:
    """Fits score ~ c * rank^(-alpha) (and an exponential) to the positive scores by rank.

    scores: 1-D tensor [d_sae] (any order; a :class:`DecoderSpectrum` is fine). They are
    sorted descending and the n positive ones are ranked 1..n; the fit covers ranks
    floor(head * n) + 1 .. ceil(tail * n), so head drops the top fraction and tail keeps the
    ranks up to that fraction (0 <= head < tail <= 1). Least squares in float64 of log score
    on log rank (power law) and on rank (exponential), both R^2 in log space.
    """
    if not isinstance(scores, Tensor) or scores.dim() != 1:
        shape = list(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
        raise ValueError(f"scores must be a 1-D tensor, got {shape}")
    head, tail = _fraction(head, "head"), _fraction(tail, "tail")
    if not 0.0 <= head < tail <= 1.0:
        raise ValueError(
            f"need 0 <= head < tail <= 1 (fractions of the ranks), got head={head}, tail={tail}"
        )
    values = scores.detach().as_subclass(Tensor).to(device="cpu", dtype=torch.float64)
    if not bool(torch.isfinite(values).all()):
        raise ValueError("scores contains NaN or Inf: recompute them from finite activations")
    positive = torch.sort(values[values > 0], descending=True).values
    n = positive.numel()
    # Rounding to 9 decimals keeps e.g. 0.3 * 10 from landing on 3.0000000000000004.
    first_rank = math.floor(round(head * n, 9)) + 1
    last_rank = math.ceil(round(tail * n, 9))
    if last_rank - first_rank + 1 < 3:
        raise ValueError(
            "fit_power_law needs at least 3 positive scores to fit, got ranks "
            f"{first_rank}..{last_rank} of {n} positive scores (of {values.numel()}); pass more "
            "positive scores or widen head/tail"
        )
    ranks = torch.arange(first_rank, last_rank + 1, dtype=torch.float64)
    log_scores = positive[first_rank - 1 : last_rank].log()
    slope, intercept, r2 = _linear_fit(ranks.log(), log_scores)
    exp_slope, exp_intercept, exp_r2 = _linear_fit(ranks, log_scores)
    return PowerLawFit(
        alpha=-slope, c=math.exp(intercept), r2=r2,
        exp_rate=-exp_slope, exp_c=math.exp(exp_intercept), exp_r2=exp_r2,
        first_rank=first_rank, last_rank=last_rank,
    )
