"""The package's main job in miniature: train a Matryoshka SAE on synthetic activations
built from a planted dictionary, then measure how well each prefix of the learned
dictionary reconstructs and how many planted features it has found.

Synthetic data (all sizes are arguments of :func:`run_demo`):

    D      [n_features, d_model]   random unit-norm planted directions
    p_i    = c * (i + 1) ** -alpha  firing probability of feature i (Zipf-like, so
                                    feature 0 is the most frequent), c set so that
                                    sum_i p_i = mean_active (each p_i capped at 1)
    a      [B, n_features]          a_i ~ Bernoulli(p_i) * Uniform(0.5, 1.5)
    x      = a @ D + noise_std * N(0, I)

A planted feature counts as recovered by a prefix of size m when one of the decoder rows
W_dec[:m] has cosine similarity above ``recovery_threshold`` with it.

Training is plain Adam on fresh batches with decoder rows renormalised to unit norm after
each step, plus the AuxK loss of Gao et al. (2024, arXiv 2406.04093) so that latents which
stop firing are pulled back towards what the SAE fails to reconstruct: without it a TopK
SAE as wide as the planted dictionary leaves about a tenth of its latents dead.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm import tqdm

from sparsecode.sae import MatryoshkaSAE

# A latent is dead (and trained by the AuxK loss) once it has not fired for this many samples.
_DEAD_AFTER = 10_000


@dataclass(frozen=True)
class PrefixRow:
    """Held-out metrics of one prefix W_dec[:size] of the trained SAE.

    fvu: sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 with x_hat decoded from the full code
        truncated to latents < size.
    l0: mean number of non-zero code entries per sample among latents < size.
    recovered: fraction of all n_features planted features recovered by the prefix.
    recovered_frequent: fraction of the min(size, n_features) most frequent planted features
        recovered by the prefix (how well a prefix of size m holds the m commonest features).
    """

    size: int
    fvu: float
    l0: float
    recovered: float
    recovered_frequent: float


@dataclass(frozen=True)
class DemoResult:
    """What :func:`run_demo` measured: one row per prefix size, smallest first.

    rows: G rows, rows[g] for the prefix W_dec[:prefix_sizes[g]].
    final_loss: the nested prefix loss (without the AuxK term) of the last training step
        (NaN when there were no steps).
    n_features: the number of planted features.
    mean_active: the mean number of planted features active per held-out sample.
    """

    rows: list[PrefixRow]
    final_loss: float
    n_features: int
    mean_active: float

    def to_markdown(self) -> str:
        """The rows as a markdown table."""
        lines = [
            "| prefix size | FVU | L0 | recovered (all) | recovered (top-m frequent) |",
            "|---:|---:|---:|---:|---:|",
        ]
        for row in self.rows:
            lines.append(
                f"| {row.size} | {row.fvu:.4f} | {row.l0:.2f} | "
                f"{row.recovered:.1%} | {row.recovered_frequent:.1%} |"
            )
        return "\n".join(lines)

    def interpretation(self) -> str:
        """One line that reads the table."""
        first, last = self.rows[0], self.rows[-1]
        n_top = min(first.size, self.n_features)
        return (
            f"Every prefix works as an SAE on its own: FVU falls from {first.fvu:.2f} with "
            f"{first.size} latents to {last.fvu:.2f} with all {last.size}, and the planted "
            f"features recovered rise from {first.recovered:.0%} to {last.recovered:.0%} "
            f"(the first {first.size} latents hold {first.recovered_frequent:.0%} of the "
            f"{n_top} most frequent features)."
        )


class PlantedDictionary:
    """Synthetic activations from planted unit-norm features with Zipf-like firing rates.

    directions: [n_features, d_model], unit-norm rows. probs: [n_features], decreasing.
    """

    def __init__(
        self,
        d_model: int,
        n_features: int,
        mean_active: float,
        alpha: float,
        noise_std: float,
        generator: torch.Generator,
    ) -> None:
        directions = torch.randn(n_features, d_model, generator=generator)
        self.directions = directions / directions.norm(dim=1, keepdim=True)
        weights = torch.arange(1, n_features + 1, dtype=torch.float32) ** -alpha
        self.probs = (weights * (mean_active / weights.sum())).clamp(max=1.0)
        self.noise_std = noise_std
        self.generator = generator

    def sample(self, batch_size: int) -> tuple[Tensor, Tensor]:
        """x [batch_size, d_model] and the planted activations a [batch_size, n_features]."""
        shape = (batch_size, self.probs.numel())
        fires = torch.rand(shape, generator=self.generator) < self.probs
        magnitudes = 0.5 + torch.rand(shape, generator=self.generator)
        acts = magnitudes * fires
        noise = torch.randn(batch_size, self.directions.shape[1], generator=self.generator)
        return acts @ self.directions + self.noise_std * noise, acts


def _recovered(w_dec: Tensor, directions: Tensor, threshold: float) -> Tensor:
    """[n_features] bool: whether some row of w_dec [m, d] has cosine > threshold with each
    planted direction (rows of directions [n_features, d], unit norm)."""
    rows = w_dec / w_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return (directions @ rows.T).amax(dim=1) > threshold


def _aux_loss(sae: MatryoshkaSAE, x: Tensor, x_hat: Tensor, dead: Tensor) -> Tensor:
    """AuxK loss: how well the top-(2k) dead latents reconstruct the residual x - x_hat.

    x, x_hat [B, d_model]; dead [d_sae] bool (at least one True). Only the dead latents'
    parameters get gradients (b_dec and x_hat are detached). Returns a scalar.
    """
    cols = dead.nonzero().flatten()
    residual = x - x_hat.detach()
    pre = torch.relu((x - sae.b_dec.detach()) @ sae.W_enc[:, cols] + sae.b_enc[cols])
    values, slots = pre.topk(min(cols.numel(), 2 * sae.k), dim=1)
    aux_hat = torch.einsum("bj,bjd->bd", values, sae.W_dec[cols][slots])
    return (aux_hat - residual).pow(2).sum(dim=1).mean()


def run_demo(
    *,
    d_model: int = 128,
    n_features: int = 256,
    d_sae: int = 256,
    k: int = 8,
    prefix_sizes: Sequence[int] | None = None,
    steps: int = 1000,
    batch_size: int = 512,
    lr: float = 3e-3,
    aux_coeff: float = 0.1,
    mean_active: float | None = None,
    alpha: float = 0.5,
    noise_std: float = 0.01,
    recovery_threshold: float = 0.9,
    eval_batch_size: int = 8192,
    seed: int = 0,
    backend: str = "auto",
    progress: bool = True,
) -> DemoResult:
    """Train a MatryoshkaSAE on planted-dictionary data and evaluate every prefix.

    Data: n_features planted directions in R^d_model, about mean_active (default 0.75 k) of
    them active per sample, firing probabilities proportional to (i + 1) ** -alpha (see the
    module doc). SAE: d_sae latents, k active, nested prefixes prefix_sizes (strictly
    increasing, last = d_sae; default d_sae/8, d_sae/4, d_sae/2, d_sae). Training: steps Adam
    steps on fresh batches of batch_size, loss = nested prefix loss + aux_coeff * AuxK loss
    over latents that have not fired for _DEAD_AFTER samples. Evaluation: one held-out batch
    of eval_batch_size samples.

    Deterministic given seed (the global torch RNG is left untouched). progress shows a tqdm
    bar with the loss.
    """
    for name, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    if steps < 0:
        raise ValueError(f"steps must be non-negative, got {steps}")
    if prefix_sizes is None:
        prefix_sizes = sorted({max(1, d_sae // 8), max(1, d_sae // 4), max(1, d_sae // 2), d_sae})
    if mean_active is None:
        mean_active = 0.75 * k
    generator = torch.Generator().manual_seed(seed)
    # The SAE's init must not share a random stream with the planted directions (the same
    # seed would draw W_dec equal to them), so it gets its own seed drawn from the generator.
    sae_seed = int(torch.randint(2**62, (), generator=generator))
    data = PlantedDictionary(d_model, n_features, mean_active, alpha, noise_std, generator)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(sae_seed)
        sae = MatryoshkaSAE(d_model, d_sae, k, list(prefix_sizes), backend=backend)
    optimizer = torch.optim.Adam(sae.parameters(), lr=lr, fused=True)

    final_loss = float("nan")
    samples_since_fired = torch.zeros(d_sae, dtype=torch.long)
    bar = tqdm(range(steps), desc="training", disable=not progress)
    for step in bar:
        x, _ = data.sample(batch_size)
        out = sae(x)
        loss = out.loss
        samples_since_fired += batch_size
        samples_since_fired[out.code.indices[out.code.values > 0]] = 0
        dead = samples_since_fired > _DEAD_AFTER
        if aux_coeff > 0 and bool(dead.any()):
            loss = loss + aux_coeff * _aux_loss(sae, x, out.x_hat, dead)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            sae.W_dec /= sae.W_dec.norm(dim=1, keepdim=True)
        final_loss = out.loss.item()
        if step % 50 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{final_loss:.4f}")

    with torch.no_grad():
        x, acts = data.sample(eval_batch_size)
        code = sae.encode(x)
        total_var = (x - x.mean(dim=0)).pow(2).sum()
        rows = []
        for size in sae.prefix_sizes:
            x_hat = sae.decode(code, size=size)
            found = _recovered(sae.W_dec[:size], data.directions, recovery_threshold)
            rows.append(
                PrefixRow(
                    size=size,
                    fvu=float((x - x_hat).pow(2).sum() / total_var),
                    l0=float(((code.indices < size) & (code.values > 0)).sum(dim=1).float().mean()),
                    recovered=float(found.float().mean()),
                    recovered_frequent=float(found[: min(size, n_features)].float().mean()),
                )
            )
    return DemoResult(
        rows=rows,
        final_loss=final_loss,
        n_features=n_features,
        mean_active=float((acts > 0).sum(dim=1).float().mean()),
    )
