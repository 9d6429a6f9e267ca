"""Progressive coding by pruning: importance, ordering, reorder, prune, prefixes, power-law fits."""

from __future__ import annotations

import math

import pytest
import torch

from sparsecode import SAE, MatryoshkaSAE, TopKSAE, reference
from sparsecode.progressive import (
    IMPORTANCE_METHODS,
    PREFIX_MODES,
    DecoderSpectrum,
    PowerLawFit,
    fit_power_law,
    importance,
    importance_order,
    prefix_reconstruction,
    prune,
    reorder,
)
from tests.conftest import assert_close

D_MODEL, D_SAE, K = 6, 23, 4
BACKENDS = ["auto", "reference"]
KINDS = ["topk", "matryoshka"]


def make_sae(
    kind: str, backend: str, dtype: torch.dtype = torch.float32,
    d_model: int = D_MODEL, d_sae: int = D_SAE, k: int = K,
) -> SAE:
    """A random SAE with non-zero biases, an encoder that is not W_dec.T, and metadata."""
    if kind == "topk":
        sae = TopKSAE(d_model, d_sae, k, backend, dtype=dtype)
    else:
        sizes = sorted({max(1, d_sae // 4), max(2, d_sae // 2), d_sae})
        sae = MatryoshkaSAE(d_model, d_sae, k, sizes, backend=backend, dtype=dtype)
    with torch.no_grad():
        sae.W_enc.add_(0.3 * torch.randn_like(sae.W_enc))
        sae.b_enc.copy_(0.5 * torch.randn_like(sae.b_enc) - 0.3)
        sae.b_dec.copy_(0.2 * torch.randn_like(sae.b_dec))
    sae.metadata = {"hook_name": "blocks.0.hook_resid_post", "extra": {"tokens": 7}}
    return sae


def dense_scores(sae: SAE, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The three per-latent scores from the dense [N, d_sae] code of x, in float64."""
    values, indices = sae.encode(x)
    dense = reference.dense_code(values.double(), indices, sae.d_sae)
    return {
        "mean_sq": dense.square().mean(0),
        "frequency": (dense > 0).double().mean(0),
        "mean": dense.mean(0),
    }


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_importance_matches_dense_code(kind, backend, dtype, tol, seed):
    sae = make_sae(kind, backend, dtype)
    with torch.no_grad():
        sae.b_enc.copy_(-1 - torch.rand(D_SAE))
    x = torch.randn(37, D_MODEL, dtype=dtype)
    x[::4] = sae.b_dec.detach()  # pre = b_enc: fewer than k positive pre-activations
    expected = dense_scores(sae, x)
    assert (sae.encode(x).values == 0).any(), "the test wants some zero code values"
    for method, ref in expected.items():
        scores = importance(sae, x, method, batch_size=8)
        assert scores.dtype == torch.float64 and scores.shape == (D_SAE,)
        assert_close(scores, ref, tol, method)
        as_batches = importance(sae, (chunk for chunk in x.split(5)), method)
        assert_close(as_batches, ref, tol, f"{method} from an iterable")
    frequency = importance(sae, x, "frequency")
    assert frequency.sum().item() < K and ((0 <= frequency) & (frequency <= 1)).all()


def test_importance_casts_batches_and_skips_empty_ones(seed):
    sae = make_sae("topk", "auto", torch.float64)
    x = torch.randn(9, D_MODEL, dtype=torch.float64)
    batches = [x[:4].float(), x[:0], x[4:].float()]
    expected = dense_scores(sae, x.float().double())["mean_sq"]
    assert_close(importance(sae, batches), expected, 1e-12, "mean_sq")


@pytest.mark.parametrize("d_model,d_sae,k", [(6, 23, 4), (7, 5, 1)])
def test_decoder_spectrum(d_model, d_sae, k, seed):
    sae = make_sae("topk", "auto", d_model=d_model, d_sae=d_sae, k=k)
    spectrum = importance(sae, None, "decoder_spectrum")
    assert isinstance(spectrum, DecoderSpectrum)
    assert spectrum.shape == (d_sae,) and spectrum.dtype == torch.float64
    W = sae.W_dec.detach().double()
    eigenvalues = torch.linalg.eigvalsh(W.T @ W / d_sae).flip(0)
    count = min(d_model, d_sae)
    assert_close(spectrum[:count], eigenvalues[:count], 1e-10, "eigenvalues")
    assert (spectrum[count:] == 0).all() and (spectrum[:-1] >= spectrum[1:]).all()
    # The trace: sum of eigenvalues = ||W_dec||_F^2 / d_sae.
    assert spectrum.sum().item() == pytest.approx(W.square().sum().item() / d_sae, rel=1e-10)
    # Activations are not read (an exhausted iterator would be fine) and the result is the same.
    assert torch.equal(importance(sae, torch.randn(3, d_model), "decoder_spectrum"), spectrum)
    for refused in (spectrum, spectrum.clone(), spectrum[:]):
        with pytest.raises(ValueError, match="decoder spectrum"):
            importance_order(refused)
    fit = fit_power_law(spectrum)
    assert fit.last_rank == int((spectrum > 0).sum())


def test_importance_errors(seed):
    sae = make_sae("topk", "auto")
    x = torch.randn(5, D_MODEL)
    valid = "method must be one of.*mean_sq.*frequency.*mean.*decoder_spectrum"
    with pytest.raises(ValueError, match=valid):
        importance(sae, x, "l1")
    for empty in (torch.randn(0, D_MODEL), [], iter([])):
        with pytest.raises(ValueError, match="activations is empty"):
            importance(sae, empty)
    with pytest.raises(ValueError, match=rf"d_model={D_MODEL}.*\[5, 7\]"):
        importance(sae, torch.randn(5, 7))
    with pytest.raises(ValueError, match="d_model"):
        importance(sae, torch.randn(2, 5, D_MODEL))
    with pytest.raises(TypeError, match="activations must yield tensors"):
        importance(sae, [x.tolist()])
    with pytest.raises(TypeError, match="activations must be a tensor"):
        importance(sae, 3.0)
    with pytest.raises(ValueError, match="activations is None"):
        importance(sae, None)
    with pytest.raises(ValueError, match="batch_size"):
        importance(sae, x, batch_size=0)
    assert set(IMPORTANCE_METHODS) == {"mean_sq", "frequency", "mean", "decoder_spectrum"}


def test_importance_order_ties_by_latent_id(seed):
    scores = torch.randint(0, 4, (D_SAE,)).double()  # many exact ties
    scores[5] = -0.0
    scores[6] = 0.0
    order = importance_order(scores)
    expected = sorted(range(D_SAE), key=lambda i: (-scores[i].item(), i))
    assert order.dtype == torch.int64 and order.tolist() == expected
    assert importance_order(scores.long()).tolist() == expected
    assert importance_order(torch.tensor([2.0])).tolist() == [0]
    for bad in (torch.ones(2, 3), torch.ones(0)):
        with pytest.raises(ValueError, match="1-D tensor"):
            importance_order(bad)
    with pytest.raises(ValueError, match="NaN"):
        importance_order(torch.tensor([1.0, float("nan")]))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_reorder_permutes_latents_only(kind, backend, seed):
    sae = make_sae(kind, backend, torch.float64)
    before = {name: p.detach().clone() for name, p in sae.named_parameters()}
    order = torch.randperm(D_SAE)
    new = reorder(sae, order)
    assert type(new) is type(sae) and new is not sae
    assert (new.d_model, new.d_sae, new.k, new.backend) == (D_MODEL, D_SAE, K, backend)
    assert new.prefix_sizes == sae.prefix_sizes and new.prefix_weights == sae.prefix_weights
    assert new.W_enc.dtype == torch.float64
    assert new.metadata == sae.metadata and new.metadata["extra"] is not sae.metadata["extra"]
    assert torch.equal(new.W_dec, sae.W_dec[order]) and torch.equal(new.b_dec, sae.b_dec)
    assert torch.equal(new.W_enc, sae.W_enc[:, order]) and torch.equal(new.b_enc, sae.b_enc[order])
    for name, p in sae.named_parameters():
        assert torch.equal(p, before[name]), f"reorder changed the original's {name}"

    x = torch.randn(29, D_MODEL, dtype=torch.float64)
    out, new_out = sae(x), new(x)
    assert_close(new_out.x_hat, out.x_hat, 1e-12, "x_hat")
    # The same code: map the new ids back to the old ones and compare (id, value) pairs.
    mapped = order[new_out.code.indices]
    mapped, perm = mapped.sort(dim=1)
    assert torch.equal(mapped, out.code.indices)
    assert_close(new_out.code.values.gather(1, perm), out.code.values, 1e-12, "code values")
    if kind == "topk":
        assert_close(new_out.loss, out.loss, 1e-12, "loss")


def test_reorder_errors(seed):
    sae = make_sae("topk", "auto")
    good = torch.randperm(D_SAE)
    duplicate = good.clone()
    duplicate[0] = duplicate[1]
    with pytest.raises(ValueError, match="permutation"):
        reorder(sae, duplicate)
    with pytest.raises(ValueError, match="permutation"):
        reorder(sae, good + 1)
    with pytest.raises(ValueError, match=f"length d_sae={D_SAE}"):
        reorder(sae, good[:-1])
    with pytest.raises(TypeError, match="integer"):
        reorder(sae, good.double())
    with pytest.raises(TypeError, match="order must be a tensor"):
        reorder(sae, good.tolist())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("size", [1, 3, 11, D_SAE])
def test_prune_is_reencode(kind, backend, size, seed):
    sae = make_sae(kind, backend)
    x = torch.randn(19, D_MODEL)
    ordered = reorder(sae, importance_order(importance(sae, x)))
    small = prune(ordered, size)
    assert type(small) is TopKSAE and small.training == sae.training
    assert (small.d_model, small.d_sae, small.k) == (D_MODEL, size, min(K, size))
    assert small.backend == backend and small.W_enc.dtype == torch.float32
    assert small.prefix_sizes == [size]
    assert small.metadata == sae.metadata and small.metadata["extra"] is not sae.metadata["extra"]
    assert torch.equal(small.W_enc, ordered.W_enc[:, :size])
    assert torch.equal(small.b_enc, ordered.b_enc[:size])
    assert torch.equal(small.W_dec, ordered.W_dec[:size])
    assert torch.equal(small.b_dec, ordered.b_dec)
    x_hat, l0 = prefix_reconstruction(ordered, x, size, "reencode")
    assert_close(x_hat, small(x).x_hat, 1e-6, "reencode vs pruned SAE")
    assert torch.equal(l0, (small.encode(x).values > 0).sum(1))


def test_prune_errors(seed):
    sae = make_sae("topk", "auto")
    message = rf"prune: size must be an int in \[1, d_sae={D_SAE}\]"
    for bad in (0, D_SAE + 1, 2.5, True, None):
        with pytest.raises(ValueError, match=message):
            prune(sae, bad)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [1, K])
def test_prefix_reconstruction(kind, backend, k, seed):
    sae = make_sae(kind, backend, torch.float64, k=k)
    x = torch.randn(21, D_MODEL, dtype=torch.float64)
    full = sae(x)
    for mode in PREFIX_MODES:
        x_hat, l0 = prefix_reconstruction(sae, x, D_SAE, mode)
        assert_close(x_hat, full.x_hat, 1e-12, f"{mode} at size=d_sae")
        assert l0.dtype == torch.int64 and torch.equal(l0, (full.code.values > 0).sum(1))

    for size in (1, 3, 10):
        values, indices = full.code
        mask = (indices < size).double()
        x_hat, l0 = prefix_reconstruction(sae, x, size, "truncate")
        expected = reference.sparse_decode(values * mask, indices, sae.W_dec, sae.b_dec)
        assert_close(x_hat, expected, 1e-12, f"truncate at {size}")
        assert torch.equal(l0, ((values > 0).double() * mask).sum(1).long())

        k_prefix = min(k, size)
        pre = torch.relu((x - sae.b_dec) @ sae.W_enc[:, :size] + sae.b_enc[:size])
        top = pre.topk(k_prefix, dim=1)
        dense = torch.zeros_like(pre).scatter(1, top.indices, top.values)
        x_hat, l0 = prefix_reconstruction(sae, x, size, "reencode")
        assert_close(x_hat, dense @ sae.W_dec[:size] + sae.b_dec, 1e-12, f"reencode at {size}")
        assert torch.equal(l0, (top.values > 0).sum(1))
        assert (l0 <= k_prefix).all()


def test_prefix_reconstruction_errors(seed):
    sae = make_sae("matryoshka", "auto")
    x = torch.randn(3, D_MODEL)
    with pytest.raises(ValueError, match="mode must be one of.*truncate.*reencode"):
        prefix_reconstruction(sae, x, 5, "prune")
    with pytest.raises(ValueError, match="prefix_reconstruction: size"):
        prefix_reconstruction(sae, x, 0, "truncate")
    for mode in PREFIX_MODES:
        with pytest.raises(ValueError, match="d_model"):
            prefix_reconstruction(sae, torch.randn(3, D_MODEL + 1), 5, mode)
        with pytest.raises(TypeError, match="dtype"):
            prefix_reconstruction(sae, x.double(), 5, mode)


@pytest.mark.parametrize("alpha", [0.5, 1.0, 1.5])
def test_fit_power_law_recovers_zipf(alpha, seed):
    n = 1500
    ranks = torch.arange(1, n + 1, dtype=torch.float64)
    # Sorting noisy scores biases the fit (order statistics): with sigma = 0.1 the alpha
    # error stays under 0.02 over 200 seeds; sigma = 0.3 reaches 0.09 at alpha = 0.5.
    scores = 2.5 * ranks.pow(-alpha) * torch.exp(0.1 * torch.randn(n, dtype=torch.float64))
    scores = torch.cat([scores, torch.zeros(7), -torch.rand(3)])[torch.randperm(n + 10)]
    fit = fit_power_law(scores.float())
    assert isinstance(fit, PowerLawFit) and (fit.first_rank, fit.last_rank) == (1, n)
    assert abs(fit.alpha - alpha) < 0.05, f"alpha {fit.alpha} vs {alpha}"
    assert fit.c == pytest.approx(2.5, rel=0.15)
    assert fit.r2 > fit.exp_r2 and 0.5 < fit.r2 <= 1
    assert_close(fit.predict(ranks[:3]), fit.c * ranks[:3].pow(-fit.alpha), 1e-12, "predict")
    assert fit.predict(1).item() == pytest.approx(fit.c)
    with pytest.raises(ValueError, match="rank must be positive"):
        fit.predict([0, 1])
    with pytest.raises(AttributeError):
        fit.alpha = 0.0  # frozen


def test_fit_exponential_prefers_exponential(seed):
    ranks = torch.arange(1, 301, dtype=torch.float64)
    noise = torch.exp(0.05 * torch.randn(300, dtype=torch.float64))
    scores = 3.0 * torch.exp(-0.05 * ranks) * noise
    fit = fit_power_law(scores)
    assert fit.exp_r2 > fit.r2
    assert fit.exp_rate == pytest.approx(0.05, rel=0.05)
    assert fit.exp_c == pytest.approx(3.0, rel=0.1)


def test_fit_power_law_rank_range(seed):
    ranks = torch.arange(1, 101, dtype=torch.float64)
    exact = 4.0 * ranks.pow(-1.25)
    fit = fit_power_law(exact, head=0.1, tail=0.5)
    assert (fit.first_rank, fit.last_rank) == (11, 50)
    assert fit.alpha == pytest.approx(1.25, abs=1e-10) and fit.c == pytest.approx(4.0, rel=1e-10)
    assert fit.r2 == pytest.approx(1.0, abs=1e-12)
    # Fractions that are not exact in binary still give the intended ranks.
    fit = fit_power_law(exact[:10], head=0.3, tail=0.7)
    assert (fit.first_rank, fit.last_rank) == (4, 7)
    ties = fit_power_law(torch.ones(5))
    assert ties.alpha == 0.0 and ties.r2 == 1.0 and math.isclose(ties.c, 1.0)


def test_fit_power_law_errors():
    with pytest.raises(ValueError, match="at least 3 positive scores"):
        fit_power_law(torch.tensor([3.0, 1.0, 0.0, -1.0]))
    with pytest.raises(ValueError, match="at least 3 positive scores"):
        fit_power_law(torch.arange(1.0, 11.0), head=0.5, tail=0.6)
    for head, tail in ((0.5, 0.5), (-0.1, 1.0), (0.0, 1.1), (0.6, 0.2)):
        with pytest.raises(ValueError, match="0 <= head < tail <= 1"):
            fit_power_law(torch.arange(1.0, 11.0), head=head, tail=tail)
    with pytest.raises(ValueError, match="head must be a finite fraction"):
        fit_power_law(torch.arange(1.0, 11.0), head=float("nan"))
    with pytest.raises(ValueError, match="1-D tensor"):
        fit_power_law(torch.ones(3, 3))
    with pytest.raises(ValueError, match="NaN or Inf"):
        fit_power_law(torch.tensor([1.0, 2.0, 3.0, float("inf")]))
