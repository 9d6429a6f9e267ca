"""The trainer end to end on cached default-model activations against the bare encoder GEMM.

Target (issue 4): training a MatryoshkaSAE (d_sae=8192, k=32, 5 prefixes, batch 4096) from
the activation cache reaches >= 60% of the tokens/s of the bare encoder GEMM
[4096, 576] @ [576, 8192] measured in the same run, i.e. reading shards, scaling, AuxK
bookkeeping, logging and the step together cost at most 1/0.6 of that GEMM.

The cache holds SmolLM2-135M-Instruct's blocks.15.hook_resid_post on the BBC text (built
once under $SPARSECODE_HOME, about two minutes of extraction the first time). The smoke run
trains on a tiny synthetic cache instead.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import pytest
import torch

from sparsecode.cache import ActivationCache, CacheWriter, activation_key, ensure_cache
from sparsecode.lm import DEFAULT_HOOK, DEFAULT_MODEL
from sparsecode.train import TrainConfig, train
from workload import SMOKE

pytestmark = pytest.mark.benchmark(group="trainer")

BATCH = 64 if SMOKE else 4096
D_SAE = 256 if SMOKE else 8192
K = 4 if SMOKE else 32
STEPS = 8 if SMOKE else 30
LOG_EVERY = 2 if SMOKE else 5
CACHE_TOKENS = BATCH * 16


def _cache(tmp_path: Path) -> ActivationCache:
    if SMOKE:
        writer = CacheWriter(tmp_path / "cache", {"model": "random", "dtype": "bfloat16"})
        writer.add_shard(torch.randn(CACHE_TOKENS, 32), contexts=1, skip_positions=0)
        return ActivationCache.open(tmp_path / "cache")
    key = activation_key(model=DEFAULT_MODEL, hook=DEFAULT_HOOK, text=None, dataset=None,
                         split="train", context_length=128, dtype="bfloat16")
    return ensure_cache(key, CACHE_TOKENS)


def test_trainer_against_gemm(tmp_path, results) -> None:
    """Seconds per training step (median over logging windows) and per bare GEMM."""
    cache = _cache(tmp_path)
    W_enc = torch.randn(cache.d_model, D_SAE)
    x = next(cache.batches(BATCH))

    def gemm_times(rounds: int) -> list[float]:
        times = []
        for _ in range(rounds):
            start = time.perf_counter()
            torch.mm(x, W_enc)
            times.append(time.perf_counter() - start)
        return times

    gemm_times(1)
    before = gemm_times(5)
    config = TrainConfig(
        arch="matryoshka", d_sae=D_SAE, k=K, tokens=BATCH * STEPS, batch_size=BATCH,
        log_every=LOG_EVERY, checkpoint_every=10**6,
    )
    train(config, cache, tmp_path / "run", progress=False)
    after = gemm_times(5)
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    step_times = [BATCH / line["tokens_per_s"] for line in lines[1:]]  # the first window warms up
    gemm = before + after
    results.add_timing("trainer step (cached activations, d_sae=8192)",
                       min(step_times), statistics.median(step_times), len(step_times))
    results.add_timing("GEMM x @ W_enc (d_sae=8192)", min(gemm), statistics.median(gemm), len(gemm))
    assert all(line["fvu"] < 1.5 for line in lines)
