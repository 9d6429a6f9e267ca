"""Evaluating an SAE, or any prefix of one, on held-out text.

Everything takes the SAE as a ``reconstruct`` callable, raw activations x [n, d_model] ->
reconstructions x_hat [n, d_model], so one code path serves a whole SAE
(``lambda x: sae(x).x_hat``), a prefix of its dictionary
(``lambda x: sae.decode(sae.encode(x), size=m)``) or a pruned one.

Reconstruction, in the field's names (DESIGN.md §7), over n tokens of dimension d:

    MSE            sum ||x - x_hat||^2 / (n * d)
    FVU            sum ||x - x_hat||^2 / sum ||x - mean(x)||^2     (mean over all n tokens)
    L0             mean number of active latents per token
    dead fraction  share of the latents considered that never fired on the data

Splicing (:func:`spliced_losses`) runs the language model with the hook's activation replaced
by its reconstruction and reports the next-token cross-entropy against the clean model and
against zero ablation, CE-loss recovered = (CE_zero - CE_sae) / (CE_zero - CE_clean), the KL
divergence from the clean predictions, and representational similarity analysis (:func:`rsa`)
of the final layer and of the hook itself with and without the splice.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Hashable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from sparsecode.lm import hook_layer

if TYPE_CHECKING:  # transformer_lens takes seconds to import
    from transformer_lens import HookedTransformer

Reconstruct = Callable[[Tensor], Tensor]
# rsa: cosine distances (in [0, 2], float64) are rounded to this many decimals before ranking.
_DISTANCE_DECIMALS = 12


# --------------------------------------------------------------------------- reconstruction


def _int_at_least(name: str, value: object, low: int) -> int:
    """value as a Python int (numpy ints too, bools not), checked to be >= low."""
    try:
        number = None if isinstance(value, bool) else operator.index(value)
    except TypeError:
        number = None
    if number is None or number < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return number


def _check_pair(x: Tensor, x_hat: Tensor, l0: Tensor) -> None:
    for name, value in (("x", x), ("x_hat", x_hat), ("l0", l0)):
        if not isinstance(value, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if x.dim() != 2 or x.shape[0] == 0:
        raise ValueError(f"x must be [n, d_model] with n >= 1, got shape {tuple(x.shape)}")
    if x_hat.shape != x.shape:
        raise ValueError(
            f"x_hat must have x's shape {tuple(x.shape)}, got {tuple(x_hat.shape)}; pass the "
            "reconstruction of exactly these activations"
        )
    if l0.shape != x.shape[:1]:
        raise ValueError(
            f"l0 must be [n={x.shape[0]}] (active latents per token), got shape "
            f"{tuple(l0.shape)}"
        )


def _dead_fraction(fired: Tensor) -> float:
    """1 - mean(fired) for fired, a 1-D bool tensor [size]."""
    if not isinstance(fired, Tensor) or fired.dtype != torch.bool or fired.dim() != 1:
        raise ValueError(
            "fired must be a 1-D bool tensor [size] (latent fired at least once), got "
            f"{fired.dtype if isinstance(fired, Tensor) else type(fired).__name__} of shape "
            f"{tuple(fired.shape) if isinstance(fired, Tensor) else '?'}"
        )
    if fired.numel() == 0:
        raise ValueError("fired is empty: it needs one entry per latent considered")
    return 1.0 - fired.double().mean().item()


class MetricsAccumulator:
    """MSE, FVU, L0 and (optionally) the dead fraction over batches, as if of one batch.

    Sums are kept in float64. The FVU's variance is taken about the global mean of all rows
    added: per-batch means and sums of squared deviations are merged with Chan et al.'s
    pairwise update, which equals sum ||x||^2 - n ||mean||^2 without its cancellation.

        acc = MetricsAccumulator()
        for x in batches:                       # the prefix of m latents, truncated
            code = sae.encode(x)
            l0 = ((code.values > 0) & (code.indices < m)).sum(dim=1)
            acc.add(x, sae.decode(code, size=m), l0, code.indices, code.values, size=m)
        acc.result()                            # {"mse", "fvu", "l0", "dead_fraction"}
    """

    def __init__(self) -> None:
        self._rows = 0
        self._squared_error = 0.0
        self._mean: Tensor | None = None  # float64 [d]
        self._deviation = 0.0  # sum over rows and dims of (x - mean)^2
        self._l0 = 0.0
        self._size: int | None = None
        self._fired: Tensor | None = None

    def add(
        self,
        x: Tensor,
        x_hat: Tensor,
        l0: Tensor,
        indices: Tensor | None = None,
        values: Tensor | None = None,
        size: int | None = None,
    ) -> None:
        """Adds a batch: x, x_hat [n, d_model], l0 [n] (active latents per token).

        indices, values [n, k] (the sparse code) and size (the number of latents considered,
        d_sae or a prefix size) mark latents < size with a value > 0 as fired; give them with
        every batch or with none. They add "dead_fraction" to :meth:`result`.
        """
        _check_pair(x, x_hat, l0)
        if self._mean is not None and x.shape[1] != self._mean.numel():
            raise ValueError(
                f"x has d_model={x.shape[1]} but earlier batches had {self._mean.numel()}"
            )
        if indices is None and values is None:
            if size is not None:
                raise ValueError("size is only used with indices and values: pass them too")
            if self._fired is not None:
                raise ValueError(
                    "earlier batches came with indices, values and size: pass them with every "
                    "batch, or the dead fraction misses this one"
                )
            active = None
        else:
            size, active = self._active_latents(indices, values, size, x.shape[0])

        x64 = x.detach().double()
        n = x.shape[0]
        mean = x64.mean(dim=0)
        deviation = (x64 - mean).pow(2).sum().item()
        squared_error = (x64 - x_hat.detach().double()).pow(2).sum().item()
        l0_sum = l0.detach().double().sum().item()
        # Everything is checked and computed: only now does the state change.
        if active is not None:
            if self._fired is None:
                self._size = size
                self._fired = torch.zeros(size, dtype=torch.bool, device=active.device)
            self._fired[active.to(self._fired.device)] = True
        self._squared_error += squared_error
        self._l0 += l0_sum
        if self._mean is None:
            self._mean, self._deviation = mean, deviation
        else:
            total = self._rows + n
            delta = mean - self._mean
            self._deviation += deviation + delta.pow(2).sum().item() * self._rows * n / total
            self._mean = self._mean + delta * (n / total)
        self._rows += n

    def _active_latents(self, indices: Tensor | None, values: Tensor | None, size: int | None,
                        n: int) -> tuple[int, Tensor]:
        """(size, the int64 ids < size with a value > 0) of a batch's code of n rows, checked
        against the earlier batches'."""
        if indices is None or values is None:
            raise ValueError("pass both indices and values (the sparse code), or neither")
        size = _int_at_least("size", size, 1)
        if indices.shape != values.shape or indices.dim() != 2 or indices.shape[0] != n:
            raise ValueError(
                f"indices and values must both be [n={n}, k], got {tuple(indices.shape)} and "
                f"{tuple(values.shape)}"
            )
        if self._fired is None and self._rows:
            raise ValueError(
                "earlier batches came without indices and values: pass them with every batch "
                "or with none"
            )
        if self._fired is not None and size != self._size:
            raise ValueError(f"size={size} differs from the size={self._size} of earlier batches")
        return size, indices[(values > 0) & (indices < size)].long()

    def result(self) -> dict[str, float]:
        """{"mse", "fvu", "l0"} and "dead_fraction" when codes were added.

        fvu is nan when the rows added have no variance.
        """
        if self._mean is None:
            raise ValueError("no batches were added: call add(x, x_hat, l0) first")
        metrics = {
            "mse": self._squared_error / (self._rows * self._mean.numel()),
            "fvu": self._squared_error / self._deviation if self._deviation > 0 else math.nan,
            "l0": self._l0 / self._rows,
        }
        if self._fired is not None:
            metrics["dead_fraction"] = _dead_fraction(self._fired)
        return metrics


def reconstruction_metrics(
    x: Tensor, x_hat: Tensor, l0: Tensor, fired: Tensor | None = None
) -> dict[str, float]:
    """MSE, FVU and L0 of one batch, x and x_hat [n, d_model], l0 [n] (see the module doc).

    fired [size] bool (latent fired at least once on the evaluation data) adds
    "dead_fraction", the share of False. fvu is nan when x has no variance.
    """
    accumulator = MetricsAccumulator()
    accumulator.add(x, x_hat, l0)
    metrics = accumulator.result()
    if fired is not None:
        metrics["dead_fraction"] = _dead_fraction(fired)
    return metrics


# --------------------------------------------------------------------------------------- rsa


def _average_ranks(v: Tensor) -> Tensor:
    """1-based ranks of the 1-D tensor v (float64), ties given their average rank."""
    ordered, order = torch.sort(v)
    _, group, counts = torch.unique_consecutive(ordered, return_inverse=True, return_counts=True)
    group_rank = counts.cumsum(0).double() - (counts.double() - 1) / 2
    ranks = torch.empty_like(v, dtype=torch.float64)
    ranks[order] = group_rank[group]
    return ranks


def _cosine_distances(a: Tensor) -> Tensor:
    """The upper triangle (i < j, row-major) of 1 - cos(a_i, a_j) for a [N, d], float64,
    rounded to _DISTANCE_DECIMALS decimals so that equal distances computed with different
    rounding errors (e.g. those between repeated rows) tie. An all-zero row has distance 1 to
    every other row."""
    unit = F.normalize(a.detach().double(), dim=1)
    n = a.shape[0]
    upper = (1.0 - unit @ unit.T)[torch.ones(n, n, dtype=torch.bool, device=a.device).triu_(1)]
    return upper.round_(decimals=_DISTANCE_DECIMALS)


def rsa(a: Tensor, b: Tensor) -> float:
    """Representational similarity of a [N, d1] and b [N, d2] (row i of both: one item).

    The Spearman correlation between the pairwise cosine distances of a's rows and of b's
    rows over the N(N-1)/2 pairs i < j, ties ranked by their average (distances are rounded
    to 12 decimals first, so repeated rows tie at 0). 1 when b = c * a for c > 0; near 0 for
    unrelated representations; nan when either set of distances is constant (e.g. all rows
    equal). Runs on a's device; N = 2000 (2M pairs) took 1.5 s on two busy CPU cores.
    """
    for name, value in (("a", a), ("b", b)):
        if not isinstance(value, Tensor) or value.dim() != 2:
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(f"{name} must be a 2-D tensor [N, d], got {shape}")
    if a.shape[0] != b.shape[0]:
        raise ValueError(
            f"a and b must have one row per item, the same N: got {a.shape[0]} and {b.shape[0]}"
        )
    if a.shape[0] < 3:
        raise ValueError(f"rsa needs N >= 3 rows (at least 3 pairs), got N={a.shape[0]}")
    ranks_a = _average_ranks(_cosine_distances(a))
    ranks_b = _average_ranks(_cosine_distances(b.to(a.device)))
    ranks_a -= ranks_a.mean()
    ranks_b -= ranks_b.mean()
    denominator = math.sqrt(ranks_a.pow(2).sum().item() * ranks_b.pow(2).sum().item())
    if denominator == 0:
        return math.nan
    return (ranks_a @ ranks_b).item() / denominator


# ---------------------------------------------------------------------------------- splicing


@dataclass(frozen=True)
class SpliceResult:
    """What :func:`spliced_losses` measured (CE in nats per predicted token).

    ce_clean, ce_sae, ce_zero: mean next-token cross-entropy of the clean model, of the model
        with the reconstruction spliced in, and with zeros spliced in (zero ablation).
    ce_recovered: (ce_zero - ce_sae) / (ce_zero - ce_clean); 1 is a perfect reconstruction,
        0 no better than zeros; nan when ce_zero == ce_clean.
    kl: mean KL(clean || spliced) of the next-token distributions, in nats.
    rsa_final: :func:`rsa` of the final-layer representations (the last block's
        hook_resid_post) with and without the splice, on the sampled positions.
    rsa_hook: :func:`rsa` of the hook's activations and their reconstructions there.
    predictions: the number of next-token predictions scored, C * (L - 1).
    rsa_positions: the number of sampled positions the RSAs use.
    """

    ce_clean: float
    ce_sae: float
    ce_zero: float
    ce_recovered: float
    kl: float
    rsa_final: float
    rsa_hook: float
    predictions: int
    rsa_positions: int


def _check_splice_args(
    tokens: Tensor, skip_positions: int, batch_size: int, rsa_sample: int
) -> None:
    if not isinstance(tokens, Tensor) or tokens.dim() != 2:
        shape = tuple(tokens.shape) if isinstance(tokens, Tensor) else type(tokens).__name__
        raise ValueError(
            f"tokens must be a 2-D tensor [contexts, positions], got {shape}; stack 1-D "
            "contexts with torch.stack"
        )
    if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
        raise TypeError(f"tokens must hold integer token ids (int64), got {tokens.dtype}")
    if 0 in tokens.shape:
        raise ValueError(f"tokens is empty (shape {tuple(tokens.shape)})")
    length = tokens.shape[1]
    if _int_at_least("skip_positions", skip_positions, 0) >= length - 1:
        raise ValueError(
            f"skip_positions={skip_positions} must be < L - 1 = {length - 1} for contexts of "
            f"L={length} tokens: at least one spliced position must predict a scored next "
            "token; use longer contexts or a smaller skip_positions"
        )
    if tokens.shape[0] * (length - skip_positions) < 3:
        raise ValueError(
            f"tokens {tuple(tokens.shape)} with skip_positions={skip_positions} leave fewer "
            "than 3 spliced positions for the RSA: pass more or longer contexts"
        )
    _int_at_least("batch_size", batch_size, 1)
    _int_at_least("rsa_sample", rsa_sample, 3)


class _Splice:
    """A forward hook that replaces the activation [B, L, ...] (tokens_shape = (B, L)) at
    positions >= skip with replace(x), where x [B * (L - skip), features] (float32) is that
    part of the activation flattened context-major, and keeps rows `sample` of x and of
    replace(x)."""

    def __init__(self, hook_name: str, tokens_shape: torch.Size, replace: Reconstruct, skip: int,
                 sample: Tensor | None = None) -> None:
        self.hook_name, self.tokens_shape = hook_name, tokens_shape
        self.replace, self.skip, self.sample = replace, skip, sample
        self.x: Tensor | None = None
        self.x_hat: Tensor | None = None

    def __call__(self, act: Tensor, hook) -> Tensor:
        if act.shape[:2] != self.tokens_shape:
            raise ValueError(
                f"hook_name: {self.hook_name!r} gives activations of shape {tuple(act.shape)}, "
                f"not [batch, position, ...] = {list(self.tokens_shape)} + [...]; splice a "
                "per-position hook such as 'blocks.6.hook_resid_post'"
            )
        kept = act[:, self.skip :]
        x = kept.reshape(-1, kept[0, 0].numel()).to(torch.float32)
        x_hat = self.replace(x)
        if not isinstance(x_hat, Tensor) or x_hat.shape != x.shape:
            shape = tuple(x_hat.shape) if isinstance(x_hat, Tensor) else type(x_hat).__name__
            raise ValueError(
                f"reconstruct must map activations [n, d] to a tensor of the same shape: got "
                f"{shape} for input {tuple(x.shape)}"
            )
        if self.sample is not None:
            self.x, self.x_hat = x[self.sample], x_hat[self.sample].to(torch.float32)
        return torch.cat([act[:, : self.skip], x_hat.to(act.dtype).reshape(kept.shape)], dim=1)


class _Grab:
    """A forward hook that keeps rows `sample` of the activation at positions >= skip,
    flattened context-major as in :class:`_Splice`, in float32."""

    def __init__(self, skip: int, sample: Tensor) -> None:
        self.skip, self.sample = skip, sample
        self.rows: Tensor | None = None

    def __call__(self, act: Tensor, hook) -> None:
        kept = act[:, self.skip :]
        self.rows = kept.reshape(-1, kept[0, 0].numel())[self.sample].to(torch.float32)


def _log_probs(logits: Tensor) -> Tensor:
    """Next-token log-probabilities [B, L - 1, vocab] (float32) of logits [B, L, vocab]."""
    return logits[:, :-1].float().log_softmax(dim=-1)


def _ce_sum(log_probs: Tensor, tokens: Tensor) -> float:
    """Summed cross-entropy of log_probs [B, L - 1, vocab] against tokens[:, 1:]."""
    return -log_probs.gather(-1, tokens[:, 1:, None]).double().sum().item()


def spliced_losses(
    model: HookedTransformer,
    hook_name: str,
    tokens: Tensor,
    reconstruct: Reconstruct,
    *,
    skip_positions: int = 1,
    batch_size: int = 8,
    rsa_sample: int = 2000,
    seed: int = 0,
    progress: bool = True,
) -> SpliceResult:
    """How much of the language model's behaviour survives replacing `hook_name`'s activation
    with its reconstruction, on tokens [C, L] (int64 contexts).

    Runs ``model.run_with_hooks(..., return_type="logits")`` on each batch of `batch_size`
    contexts three ways: clean; with the activation at positions >= skip_positions replaced
    by reconstruct(x); and with zeros there (zero ablation). Positions < skip_positions keep
    the clean activation, as extract_activations drops them (the SAE never saw them).
    reconstruct gets x [n, d] in float32 (d: the hook's trailing dims flattened, n: the
    batch's spliced positions, context-major) and must return [n, d]; the result is cast to
    the model's dtype.

    Cross-entropy and KL are averaged over all C * (L - 1) next-token predictions
    (logits[:, :-1] against tokens[:, 1:]). The RSAs use one fixed random sample, drawn with
    `seed`, of min(rsa_sample, C * (L - skip_positions)) positions >= skip_positions; the
    final layer is represented by the last block's hook_resid_post (for RMS-normed models
    the same cosine distances as ln_final.hook_normalized, which rescales each row).
    """
    results = spliced_losses_many(
        model, hook_name, tokens, {"sae": reconstruct}, skip_positions=skip_positions,
        batch_size=batch_size, rsa_sample=rsa_sample, seed=seed, progress=progress,
    )
    return results["sae"]


def spliced_losses_many(
    model: HookedTransformer,
    hook_name: str,
    tokens: Tensor,
    reconstructs: dict[Hashable, Reconstruct],
    *,
    skip_positions: int = 1,
    batch_size: int = 8,
    rsa_sample: int = 2000,
    seed: int = 0,
    progress: bool = True,
) -> dict[Hashable, SpliceResult]:
    """:func:`spliced_losses` for several reconstructions at once: {name: SpliceResult}.

    The clean and the zero-ablated passes run once per batch and are shared, so n
    reconstructions cost n + 2 model passes instead of 3n.
    """
    if not reconstructs:
        raise ValueError("reconstructs is empty: pass at least one name -> reconstruct")
    _check_splice_args(tokens, skip_positions, batch_size, rsa_sample)
    hook_layer(hook_name, model)
    final_hook = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
    contexts, length = tokens.shape
    spliced = length - skip_positions  # spliced positions per context
    n_sample = min(rsa_sample, contexts * spliced)
    generator = torch.Generator().manual_seed(seed)
    sample = torch.randperm(contexts * spliced, generator=generator)[:n_sample].sort().values
    device = model.cfg.device

    ce_clean = ce_zero = 0.0
    final_clean: list[Tensor] = []
    sums = {name: {"ce": 0.0, "kl": 0.0} for name in reconstructs}
    rows: dict[str, dict[str, list[Tensor]]] = {
        name: {"final": [], "x": [], "x_hat": []} for name in reconstructs
    }
    total = tokens.numel() * (len(reconstructs) + 2)
    with torch.inference_mode(), tqdm(total=total, desc=f"splice {hook_name}", unit="tok",
                                      unit_scale=True, disable=not progress) as bar:
        for start in range(0, contexts, batch_size):
            batch = tokens[start : start + batch_size].to(device=device, dtype=torch.long)
            offset, n_rows = start * spliced, batch.shape[0] * spliced
            local = (sample[(sample >= offset) & (sample < offset + n_rows)] - offset).to(device)
            grab = _Grab(skip_positions, local)
            clean = None
            for name, reconstruct in reconstructs.items():
                splice = _Splice(hook_name, batch.shape, reconstruct, skip_positions, local)
                # The splice runs before the clean pass, so that a hook or reconstruct
                # error surfaces at once.
                sae = _log_probs(model.run_with_hooks(
                    batch, return_type="logits", fwd_hooks=[(hook_name, splice), (final_hook, grab)]
                ))
                rows[name]["final"].append(grab.rows)
                rows[name]["x"].append(splice.x)
                rows[name]["x_hat"].append(splice.x_hat)
                sums[name]["ce"] += _ce_sum(sae, batch)
                bar.update(batch.numel())
                if clean is None:
                    clean = _log_probs(model.run_with_hooks(
                        batch, return_type="logits", fwd_hooks=[(final_hook, grab)]
                    ))
                    final_clean.append(grab.rows)
                    ce_clean += _ce_sum(clean, batch)
                    bar.update(batch.numel())
                sums[name]["kl"] += F.kl_div(sae, clean, reduction="sum", log_target=True).double().item()
                del sae
            del clean

            zero = _Splice(hook_name, batch.shape, torch.zeros_like, skip_positions)
            zeroed = _log_probs(model.run_with_hooks(
                batch, return_type="logits", fwd_hooks=[(hook_name, zero)]
            ))
            ce_zero += _ce_sum(zeroed, batch)
            del zeroed
            bar.update(batch.numel())

    predictions = contexts * (length - 1)
    ce_clean, ce_zero = ce_clean / predictions, ce_zero / predictions
    gap = ce_zero - ce_clean
    clean_final = torch.cat(final_clean)
    results = {}
    for name in reconstructs:
        ce_sae = sums[name]["ce"] / predictions
        results[name] = SpliceResult(
            ce_clean=ce_clean,
            ce_sae=ce_sae,
            ce_zero=ce_zero,
            ce_recovered=(ce_zero - ce_sae) / gap if gap != 0 else math.nan,
            kl=sums[name]["kl"] / predictions,
            rsa_final=rsa(clean_final, torch.cat(rows[name]["final"])),
            rsa_hook=rsa(torch.cat(rows[name]["x"]), torch.cat(rows[name]["x_hat"])),
            predictions=predictions,
            rsa_positions=n_sample,
        )
    return results
