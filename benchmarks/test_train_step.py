"""One full Matryoshka training step, cpp vs reference, against a TopK step and the bare
encoder GEMM (the floor: every encoder computes x @ W_enc's B * d_sae dot products)."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from workload import FAST_ROUNDS, SLOW_ROUNDS, build_sae, train_step

pytestmark = pytest.mark.benchmark(group="train step")


@pytest.mark.parametrize(
    ("kind", "backend"), [("matryoshka", "cpp"), ("matryoshka", "reference"), ("topk", "cpp")]
)
def test_train_step(timed, x: Tensor, seed: int, kind: str, backend: str) -> None:
    """forward, loss, backward and Adam step of a `kind` SAE on `backend`."""
    step = train_step(build_sae(kind, backend, seed), x)
    rounds = SLOW_ROUNDS if backend == "reference" else FAST_ROUNDS
    loss = timed(f"step: {kind}, {backend}", step, rounds)
    assert torch.isfinite(loss), f"the step's loss is {loss}"


def test_encoder_gemm(timed, x: Tensor, seed: int) -> None:
    """The bare encoder GEMM [B, d_model] @ [d_model, d_sae] with the SAE's initial W_enc."""
    W_enc = build_sae("topk", "cpp", seed).W_enc.detach()
    pre = timed("GEMM x @ W_enc (torch.mm)", lambda: torch.mm(x, W_enc), FAST_ROUNDS)
    assert pre.shape == (x.shape[0], W_enc.shape[1])
