"""The benchmarked workload, shared by the benchmarks and the memory probe subprocess.

Full size (the issue's): B=4096, d_model=576, d_sae=16384, k=32, prefix sizes
[1024, 2048, 4096, 8192, 16384], float32, 2 threads, Adam (fused). With
SPARSECODE_BENCH_SMOKE=1 everything is tiny and runs 1-2 rounds, to check the benchmark code.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

import sparsecode

SMOKE = os.environ.get("SPARSECODE_BENCH_SMOKE") == "1"
THREADS = 2
LR = 1e-4


@dataclass(frozen=True)
class Sizes:
    """The problem's shape: batch rows, model width, dictionary size, active latents, prefixes."""

    batch: int
    d_model: int
    d_sae: int
    k: int
    prefix_sizes: tuple[int, ...]


SIZES = (
    Sizes(batch=64, d_model=32, d_sae=256, k=4, prefix_sizes=(32, 64, 128, 256))
    if SMOKE
    else Sizes(batch=4096, d_model=576, d_sae=16384, k=32, prefix_sizes=(1024, 2048, 4096, 8192, 16384))
)

# Timed rounds after one warm-up round: fast subjects (cpp kernels, the GEMM) and slow ones
# (the reference backend, ~10-20 s a step), keeping `pytest benchmarks/` to a few minutes.
FAST_ROUNDS = 2 if SMOKE else 7
SLOW_ROUNDS = 1 if SMOKE else 2


def activations(seed: int, sizes: Sizes = SIZES) -> Tensor:
    """Fresh standard-normal activations x [batch, d_model] drawn from `seed`."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(sizes.batch, sizes.d_model, generator=generator)


def build_sae(
    kind: str, backend: str, seed: int, sizes: Sizes = SIZES, activation: str = "topk"
) -> sparsecode.SAE:
    """A "matryoshka" or "topk" SAE; the same seed gives the same initial weights for both kinds.

    activation (Matryoshka only): "topk" or "batchtopk" (default k_max = 4k)."""
    torch.manual_seed(seed)
    if kind == "matryoshka":
        return sparsecode.MatryoshkaSAE(
            sizes.d_model, sizes.d_sae, sizes.k, list(sizes.prefix_sizes), backend=backend,
            activation=activation,
        )
    if kind == "topk":
        return sparsecode.TopKSAE(sizes.d_model, sizes.d_sae, sizes.k, backend=backend)
    raise ValueError(f"kind must be 'matryoshka' or 'topk', got {kind!r}")


def train_step(sae: sparsecode.SAE, x: Tensor) -> Callable[[], Tensor]:
    """One full training step on x (zero_grad, forward, loss, backward, fused Adam step).

    The returned callable runs the step and returns the (detached) loss.
    """
    opt = torch.optim.Adam(sae.parameters(), lr=LR, fused=True)

    def step() -> Tensor:
        opt.zero_grad()
        loss = sae(x).loss
        loss.backward()
        opt.step()
        return loss.detach()

    return step
