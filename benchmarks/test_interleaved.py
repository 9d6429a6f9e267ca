"""The step ratios measured round-robin: a Matryoshka step (TopK and BatchTopK activation), a
TopK step and the bare encoder GEMM take turns, so that drift in the machine's speed over the run (a shared, virtualised
host) hits all three alike. These timings are the ones the step-ratio targets use."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import Tensor

from conftest import Results, Timing
from workload import SMOKE, build_sae, train_step

ROUNDS = 2 if SMOKE else 9


def test_steps_and_gemm_interleaved(results: Results, x: Tensor, seed: int) -> None:
    W_enc = build_sae("topk", "cpp", seed).W_enc.detach()
    subjects: dict[str, Callable[[], object]] = {
        "interleaved: step matryoshka, cpp": train_step(build_sae("matryoshka", "cpp", seed), x),
        "interleaved: step matryoshka batchtopk, cpp": train_step(
            build_sae("matryoshka", "cpp", seed, activation="batchtopk"), x
        ),
        "interleaved: step topk, cpp": train_step(build_sae("topk", "cpp", seed), x),
        "interleaved: GEMM x @ W_enc (torch.mm)": lambda: torch.mm(x, W_enc),
    }
    for fn in subjects.values():
        fn()
    seconds: dict[str, list[float]] = {label: [] for label in subjects}
    for _ in range(ROUNDS):
        for label, fn in subjects.items():
            start = time.perf_counter()
            out = fn()
            seconds[label].append(time.perf_counter() - start)
            if isinstance(out, Tensor) and out.dim() == 0:
                assert torch.isfinite(out), f"{label}: loss {out}"
    for label, values in seconds.items():
        values.sort()
        results.timings[label] = Timing(values[0], values[len(values) // 2], len(values))
