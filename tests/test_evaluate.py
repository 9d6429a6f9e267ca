"""Evaluation: reconstruction metrics and their accumulation over batches, RSA against scipy,
and splicing reconstructions into the default model (exact, zero and lossy splices)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.spatial.distance import pdist
from scipy.stats import spearmanr

from sparsecode.evaluate import (
    MetricsAccumulator,
    SpliceResult,
    reconstruction_metrics,
    rsa,
    spliced_losses,
    spliced_losses_many,
)
from sparsecode.lm import load_model
from sparsecode.sae import TopKSAE
from sparsecode.text import iter_contexts, iter_documents

HOOK = "blocks.2.hook_resid_post"
CONTEXTS, LENGTH = 4, 32


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread while this file runs: the model's forward passes dominate its time,
    and on two shared cores two spinning threads ran them ~5x slower than one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model():
    return load_model()


@pytest.fixture(scope="module")
def tokens(model) -> torch.Tensor:
    """CONTEXTS held-out contexts of LENGTH tokens, int64 [CONTEXTS, LENGTH]."""
    contexts = iter_contexts(model.tokenizer, iter_documents(split="eval"), LENGTH)
    return torch.stack([c for c, _ in zip(contexts, range(CONTEXTS))])


@pytest.fixture(scope="module")
def hook_acts(model, tokens) -> torch.Tensor:
    """The clean activations at HOOK, [CONTEXTS, LENGTH, d_model]."""
    _, cache = model.run_with_cache(tokens, names_filter=HOOK, stop_at_layer=3)
    return cache[HOOK]


class Recorder:
    """reconstruct = fn, remembering every input it was given."""

    def __init__(self, fn) -> None:
        self.fn, self.inputs = fn, []

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs.append(x.clone())
        return self.fn(x)


@pytest.fixture(scope="module")
def exact(model, tokens) -> tuple[SpliceResult, Recorder]:
    """Splicing the activations themselves, in batches of 3 (the last one of 1)."""
    recorder = Recorder(lambda x: x)
    result = spliced_losses(model, HOOK, tokens, recorder, batch_size=3, progress=False)
    return result, recorder


# ------------------------------------------------------------------------------ splicing


def test_exact_splice_recovers_everything(exact, hook_acts):
    result, recorder = exact
    assert result.ce_sae == result.ce_clean
    assert result.ce_recovered == pytest.approx(1.0, abs=1e-5)
    assert result.kl == pytest.approx(0.0, abs=1e-7)
    assert result.rsa_final == pytest.approx(1.0, abs=1e-9)
    assert result.rsa_hook == pytest.approx(1.0, abs=1e-9)
    assert result.ce_zero > result.ce_clean > 0
    assert result.predictions == CONTEXTS * (LENGTH - 1)
    assert result.rsa_positions == CONTEXTS * (LENGTH - 1)  # all positions >= skip_positions=1
    # reconstruct saw exactly the activations at positions >= 1, context-major, in float32.
    assert [x.shape[0] for x in recorder.inputs] == [3 * (LENGTH - 1), LENGTH - 1]
    assert all(x.dtype == torch.float32 for x in recorder.inputs)
    expected = hook_acts[:, 1:].reshape(-1, hook_acts.shape[-1])
    assert torch.equal(torch.cat(recorder.inputs), expected)


def test_zero_splice_recovers_nothing(model, tokens, exact):
    result = spliced_losses(model, HOOK, tokens, torch.zeros_like, progress=False)
    assert result.ce_sae == result.ce_zero
    assert result.ce_recovered == pytest.approx(0.0, abs=1e-5)
    # Batching does not change the numbers (exact ran in batches of 3, this in one).
    assert result.ce_clean == pytest.approx(exact[0].ce_clean, rel=1e-6)
    assert result.ce_zero == pytest.approx(exact[0].ce_zero, rel=1e-6)
    assert result.kl > 1.0
    assert math.isnan(result.rsa_hook)  # all reconstructions are zero: no distances to rank
    assert result.rsa_final < 0.9


def test_lossy_splice_is_in_between(model, tokens, exact):
    """A real SAE whose latents are the coordinates' positive and negative parts: with k=16 it
    keeps each token's 16 largest coordinates, a lossy reconstruction."""
    d_model = model.cfg.d_model
    sae = TopKSAE(d_model, 2 * d_model, k=16)
    with torch.no_grad():
        eye = torch.eye(d_model)
        sae.W_dec.copy_(torch.cat([eye, -eye]))
        sae.W_enc.copy_(sae.W_dec.T)
    recorder = Recorder(lambda x: sae(x).x_hat)
    result = spliced_losses(
        model, HOOK, tokens, recorder, skip_positions=2, rsa_sample=40, progress=False
    )
    assert 0.0 < result.ce_recovered < 1.0
    assert result.ce_clean == pytest.approx(exact[0].ce_clean, rel=1e-6)
    assert result.kl > 1e-3
    assert 0.0 < result.rsa_final < 1.0
    assert 0.0 < result.rsa_hook < 1.0
    assert result.rsa_positions == 40
    assert [x.shape[0] for x in recorder.inputs] == [CONTEXTS * (LENGTH - 2)]


def test_many_splices_share_the_clean_pass_and_match_one_at_a_time(model, tokens):
    noise = torch.Generator().manual_seed(5)
    jitter = 0.3 * torch.randn(CONTEXTS * (LENGTH - 1), model.cfg.d_model, generator=noise)
    reconstructs = {
        "exact": lambda x: x,
        ("noisy", 1): lambda x: x + jitter * x.norm(dim=1, keepdim=True) / x.shape[1] ** 0.5,
        "zero": torch.zeros_like,
    }
    many = spliced_losses_many(model, HOOK, tokens, reconstructs, batch_size=5,
                               rsa_sample=50, progress=False)
    assert list(many) == list(reconstructs)
    for name, reconstruct in reconstructs.items():
        one = spliced_losses(model, HOOK, tokens, reconstruct, batch_size=5, rsa_sample=50,
                             progress=False)
        for field in ("ce_clean", "ce_sae", "ce_zero", "ce_recovered", "kl", "rsa_final"):
            got, want = getattr(many[name], field), getattr(one, field)
            assert got == pytest.approx(want, rel=1e-9, abs=1e-12, nan_ok=True), (name, field)
    assert 0 < many[("noisy", 1)].ce_recovered < 1
    with pytest.raises(ValueError, match="reconstructs is empty"):
        spliced_losses_many(model, HOOK, tokens, {}, progress=False)


def test_splice_errors(model, tokens):
    def call(tokens=tokens[:1], hook=HOOK, reconstruct=lambda x: x, **kwargs):
        return spliced_losses(model, hook, tokens, reconstruct, progress=False, **kwargs)

    with pytest.raises(ValueError, match="tokens must be a 2-D tensor"):
        call(tokens[0])
    with pytest.raises(TypeError, match="integer token ids"):
        call(tokens.float())
    with pytest.raises(ValueError, match=f"skip_positions={LENGTH} must be < L - 1"):
        call(skip_positions=LENGTH)
    with pytest.raises(ValueError, match="at least one spliced position"):
        call(skip_positions=LENGTH - 1)
    with pytest.raises(ValueError, match="skip_positions must be an int >= 0"):
        call(skip_positions=-1)
    with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
        call(batch_size=0)
    with pytest.raises(ValueError, match="rsa_sample must be an int >= 3"):
        call(rsa_sample=2)
    with pytest.raises(ValueError, match="fewer than 3 spliced positions"):
        call(tokens[:1, :3], skip_positions=1)
    with pytest.raises(ValueError, match="'blocks.99.hook_resid_post' is not a hook"):
        call(hook="blocks.99.hook_resid_post")
    with pytest.raises(ValueError, match=r"same shape: got \(31, 10\) for input \(31, 576\)"):
        call(reconstruct=lambda x: x[:, :10])
    with pytest.raises(ValueError, match="not \\[batch, position, ...\\]"):
        call(hook="blocks.0.attn.hook_pattern")
    assert not any(point._forward_hooks for point in model.hook_dict.values())


# ----------------------------------------------------------------- reconstruction metrics


def _random_batch(n: int, d: int = 8, offset: float = 0.0):
    x = torch.randn(n, d) * 3 + offset
    return x, x + torch.randn(n, d), torch.randint(0, 10, (n,))


def test_reconstruction_metrics_by_hand(seed):
    x, x_hat, l0 = _random_batch(50)
    fired = torch.rand(100) < 0.7
    metrics = reconstruction_metrics(x, x_hat, l0, fired)
    x, x_hat = x.double(), x_hat.double()
    squared_error = ((x - x_hat) ** 2).sum()
    assert metrics["mse"] == pytest.approx((squared_error / x.numel()).item(), rel=1e-12)
    fvu = squared_error / ((x - x.mean(dim=0)) ** 2).sum()
    assert metrics["fvu"] == pytest.approx(fvu.item(), rel=1e-12)
    assert metrics["l0"] == pytest.approx(l0.double().mean().item(), rel=1e-12)
    assert metrics["dead_fraction"] == pytest.approx(1 - fired.double().mean().item(), abs=1e-12)
    assert set(reconstruction_metrics(x, x_hat, l0)) == {"mse", "fvu", "l0"}
    assert reconstruction_metrics(x, x, l0)["fvu"] == 0.0


def test_accumulator_equals_one_shot(seed):
    """Uneven batches far from the origin and from each other: the FVU uses the global mean,
    so it is far below every batch's own FVU. Latents 0-4 never fire."""
    size, k = 40, 6
    sizes_and_offsets = ((7, 50.0), (30, 80.0), (1, 110.0), (12, 140.0))
    batches = [_random_batch(n, offset=offset) for n, offset in sizes_and_offsets]
    accumulator = MetricsAccumulator()
    fired = torch.zeros(size, dtype=torch.bool)
    for x, x_hat, l0 in batches:
        indices = torch.randint(5, size + 10, (x.shape[0], k))  # ids >= size do not count
        values = torch.relu(torch.randn(x.shape[0], k))  # zeros did not fire
        accumulator.add(x, x_hat, l0, indices, values, size=size)
        kept = (values > 0) & (indices < size)
        fired[indices[kept]] = True
    x, x_hat, l0 = (torch.cat(parts) for parts in zip(*batches))
    expected = reconstruction_metrics(x, x_hat, l0, fired)
    result = accumulator.result()
    assert result.keys() == expected.keys()
    for key, value in expected.items():
        assert result[key] == pytest.approx(value, rel=1e-10), key
    assert 0.0 < result["dead_fraction"] < 1.0
    assert result["dead_fraction"] >= 5 / size
    per_batch_fvu = [
        reconstruction_metrics(*batch)["fvu"] for batch in batches if batch[0].shape[0] > 1
    ]
    assert all(fvu > 10 * result["fvu"] for fvu in per_batch_fvu)  # not a mean of batch FVUs


def test_metrics_errors(seed):
    x, x_hat, l0 = _random_batch(5)
    indices, values = torch.randint(0, 10, (5, 2)), torch.rand(5, 2)
    with pytest.raises(ValueError, match="x_hat must have x's shape"):
        reconstruction_metrics(x, x_hat[:, :3], l0)
    with pytest.raises(ValueError, match=r"l0 must be \[n=5\]"):
        reconstruction_metrics(x, x_hat, l0[:4])
    with pytest.raises(ValueError, match="x must be \\[n, d_model\\]"):
        reconstruction_metrics(x[0], x_hat[0], l0)
    with pytest.raises(ValueError, match="fired must be a 1-D bool tensor"):
        reconstruction_metrics(x, x_hat, l0, torch.ones(4))
    with pytest.raises(ValueError, match="no batches were added"):
        MetricsAccumulator().result()
    with pytest.raises(ValueError, match="pass both indices and values"):
        MetricsAccumulator().add(x, x_hat, l0, indices)
    with pytest.raises(ValueError, match="size must be an int >= 1"):
        MetricsAccumulator().add(x, x_hat, l0, indices, values)
    with pytest.raises(ValueError, match="size is only used with indices and values"):
        MetricsAccumulator().add(x, x_hat, l0, size=10)
    with pytest.raises(ValueError, match=r"indices and values must both be \[n=5, k\]"):
        MetricsAccumulator().add(x, x_hat, l0, indices, values[:, :1], size=10)

    accumulator = MetricsAccumulator()
    accumulator.add(x, x_hat, l0, indices, values, size=10)
    with pytest.raises(ValueError, match="size=12 differs from the size=10"):
        accumulator.add(x, x_hat, l0, indices, values, size=12)
    with pytest.raises(ValueError, match="earlier batches came with indices"):
        accumulator.add(x, x_hat, l0)
    with pytest.raises(ValueError, match="d_model=3 but earlier batches had 8"):
        accumulator.add(x[:, :3], x_hat[:, :3], l0, indices, values, size=10)
    before = accumulator.result()
    assert accumulator.result() == before  # the failed adds changed nothing
    without = MetricsAccumulator()
    without.add(x, x_hat, l0)
    with pytest.raises(ValueError, match="earlier batches came without indices"):
        without.add(x, x_hat, l0, indices, values, size=10)


# ----------------------------------------------------------------------------------- rsa


def _scipy_rsa(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman correlation of scipy's cosine distances, rounded as rsa rounds them (scipy's
    nan for a zero row is rsa's distance 1)."""
    da, db = (np.round(np.nan_to_num(pdist(t.double().numpy(), "cosine"), nan=1.0), 12)
              for t in (a, b))
    return float(spearmanr(da, db).statistic)


def test_rsa_properties(seed):
    a = torch.randn(200, 16)
    assert rsa(a, a) == pytest.approx(1.0, abs=1e-12)
    assert rsa(a, 3.7 * a) == pytest.approx(1.0, abs=1e-9)
    assert abs(rsa(a, torch.randn(200, 24))) < 0.1
    b = a[:, :8] + 0.5 * torch.randn(200, 8)
    assert rsa(a, b) == pytest.approx(_scipy_rsa(a, b), abs=1e-9)
    assert rsa(a, b) == pytest.approx(rsa(b, a), abs=1e-12)


def test_rsa_ties_take_average_ranks(seed):
    """Small integer vectors, repeated rows and a zero row: many exactly equal distances."""
    a = torch.randint(0, 3, (40, 3)).double()
    b = torch.randint(0, 2, (40, 4)).double()
    a[0], a[1] = 0.0, a[2]
    b[3:6] = b[6]
    assert rsa(a, b) == pytest.approx(_scipy_rsa(a, b), abs=1e-9)


def test_rsa_degenerate_and_errors(seed):
    a = torch.randn(10, 4)
    assert math.isnan(rsa(a, torch.ones(10, 3)))  # every row equal: all distances 0
    with pytest.raises(ValueError, match="the same N: got 10 and 9"):
        rsa(a, a[:9])
    with pytest.raises(ValueError, match="b must be a 2-D tensor"):
        rsa(a, a[0])
    with pytest.raises(ValueError, match="N >= 3"):
        rsa(a[:2], a[:2])
