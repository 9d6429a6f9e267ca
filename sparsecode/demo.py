"""The package's main job in miniature: train a Matryoshka SAE on synthetic activations
built from a planted dictionary, then measure how well each prefix of the learned
dictionary reconstructs and how many planted features it has found.

Synthetic data (all sizes are arguments of :func:`run_demo`):

    D      [n_features, d_model]   random unit-norm planted directions
    p_i    = c * (i + 1) ** -alpha  firing probability of feature i (Zipf-like, so
                                    feature 0 is the most frequent), c set so that
                                    sum_i p_i = mean_active
    a      [B, n_features]          a_i ~ Bernoulli(p_i) * Uniform(0.5, 1.5)
    x      = a @ D + noise_std * N(0, I)

A planted feature counts as recovered by a prefix of size m when one of the decoder rows
W_dec[:m] has cosine similarity above ``recovery_threshold`` with it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm import tqdm

from sparsecode.sae import MatryoshkaSAE


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
    final_loss: the training loss (weighted nested prefix loss) of the last step.
    mean_active: the mean number of planted features active per held-out sample.
    """

    rows: list[PrefixRow]
    final_loss: float
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
        return (
            f"The smallest prefix ({first.size} latents) already explains {1 - first.fvu:.0%} "
            f"of the variance and holds {first.recovered_frequent:.0%} of the {min(first.size, 10**9)} "
            f"most frequent planted features; the full dictionary ({last.size} latents) explains "
            f"{1 - last.fvu:.0%} and recovers {last.recovered:.0%} of all planted features."
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
    """[n_features] bool: planted feature has a decoder row among w_dec [m, d] with cos > threshold."""
    rows = w_dec / w_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return (directions @ rows.T).amax(dim=1) > threshold


def run_demo(
    *,
    d_model: int = 64,
    n_features: int = 256,
    d_sae: int = 256,
    k: int = 8,
    prefix_sizes: Sequence[int] = (32, 64, 128, 256),
    steps: int = 1000,
    batch_size: int = 1024,
    lr: float = 2e-3,
    mean_active: float = 6.0,
    alpha: float = 0.5,
    noise_std: float = 0.01,
    recovery_threshold: float = 0.9,
    eval_batch_size: int = 8192,
    seed: int = 0,
    backend: str = "auto",
    progress: bool = True,
) -> DemoResult:
    """Train a MatryoshkaSAE on planted-dictionary data and evaluate every prefix.

    Deterministic given seed (the global torch RNG is left untouched). Decoder rows are
    renormalised to unit norm after every Adam step. progress shows a tqdm bar with the loss.
    """
    generator = torch.Generator().manual_seed(seed)
    # The SAE's init must not share a random stream with the planted directions (the same
    # seed would draw W_dec equal to them), so it gets its own seed drawn from the generator.
    sae_seed = int(torch.randint(2**62, (), generator=generator))
    data = PlantedDictionary(d_model, n_features, mean_active, alpha, noise_std, generator)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(sae_seed)
        sae = MatryoshkaSAE(d_model, d_sae, k, list(prefix_sizes), backend=backend)
    optimizer = torch.optim.Adam(sae.parameters(), lr=lr, fused=True)

    loss = torch.tensor(float("nan"))
    bar = tqdm(range(steps), desc="training", disable=not progress)
    for step in bar:
        x, _ = data.sample(batch_size)
        loss = sae(x).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            sae.W_dec /= sae.W_dec.norm(dim=1, keepdim=True)
        if step % 50 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{loss.item():.4f}")

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
        final_loss=float(loss.detach()),
        mean_active=float((acts > 0).sum(dim=1).float().mean()),
    )
