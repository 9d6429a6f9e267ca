"""MatryoshkaSAE / TopKSAE: API, agreement with the reference backend, training, bad input."""

from __future__ import annotations

import copy

import pytest
import torch

import sparsecode
from sparsecode import MatryoshkaSAE, TopKSAE, reference
from tests.conftest import TOLERANCE, assert_close

PARAMS = ["W_enc", "b_enc", "W_dec", "b_dec"]


def randomised(sae: sparsecode.SAE) -> sparsecode.SAE:
    """Non-zero random biases and an encoder that is not the decoder's transpose."""
    with torch.no_grad():
        sae.W_enc.add_(0.1 * torch.randn_like(sae.W_enc))
        sae.b_enc.copy_(0.05 * torch.randn_like(sae.b_enc))
        sae.b_dec.copy_(0.1 * torch.randn_like(sae.b_dec))
    return sae


def twin(sae: sparsecode.SAE, backend: str) -> sparsecode.SAE:
    other = copy.deepcopy(sae)
    other.backend = backend
    return other


def test_parameters_and_init():
    sae = MatryoshkaSAE(d_model=12, d_sae=40, k=4, prefix_sizes=[10, 20, 40])
    assert sae.W_enc.shape == (12, 40) and sae.b_enc.shape == (40,)
    assert sae.W_dec.shape == (40, 12) and sae.b_dec.shape == (12,)
    assert all(getattr(sae, p).dtype == torch.float32 for p in PARAMS)
    assert_close(sae.W_dec.norm(dim=1), torch.ones(40), 1e-6, "decoder row norms")
    assert torch.equal(sae.W_enc, sae.W_dec.T)
    assert not sae.b_enc.any() and not sae.b_dec.any()
    assert sae.prefix_weights == pytest.approx([1 / 3] * 3)
    double = TopKSAE(12, 40, 4, dtype=torch.float64, device="cpu")
    assert double.W_enc.dtype == torch.float64 and double.prefix_sizes == [40]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(
    "B,d,n,k,sizes",
    [
        (1, 5, 17, 1, [1, 17]),
        (7, 64, 256, 3, [2, 64, 65, 256]),
        (33, 100, 1000, 32, [16, 100, 500, 1000]),
    ],
)
def test_matches_reference_backend(B, d, n, k, sizes, dtype, seed, poisoned):
    weights = (torch.rand(len(sizes)) + 0.1).tolist()
    sae = randomised(MatryoshkaSAE(d, n, k, sizes, weights, backend="cpp", dtype=dtype))
    ref = twin(sae, "reference").double()
    x = torch.randn(B, d, dtype=dtype)

    out, ref_out = sae(x), ref(x.double())
    assert torch.equal(out.code.indices, ref_out.code.indices)
    assert_close(out.code.values, ref_out.code.values, TOLERANCE[dtype], "values")
    assert_close(out.x_hat, ref_out.x_hat, TOLERANCE[dtype], "x_hat")
    assert_close(out.prefix_losses, ref_out.prefix_losses, TOLERANCE[dtype], "prefix_losses")
    assert_close(out.loss, ref_out.loss, TOLERANCE[dtype], "loss")

    # A loss that uses every output, as a training script with extra terms would.
    def objective(o):
        return o.loss + o.x_hat.sin().sum() + o.code.values.square().sum()

    objective(out).backward()
    objective(ref_out).backward()
    for p in PARAMS:
        assert_close(getattr(sae, p).grad, getattr(ref, p).grad, TOLERANCE[dtype], f"grad {p}")


def test_decode_prefix(seed):
    sae = randomised(MatryoshkaSAE(16, 64, 6, [8, 32, 64], backend="cpp", dtype=torch.float64))
    x = torch.randn(10, 16, dtype=torch.float64)
    code = sae.encode(x)
    for size in [1, 8, 33, 64]:
        keep = code.indices < size
        dense = reference.dense_code(code.values * keep, code.indices, 64)
        expected = dense @ sae.W_dec + sae.b_dec
        assert_close(sae.decode(code, size), expected, 1e-12, f"decode size={size}")
    assert_close(sae.decode(code), sae(x).x_hat, 1e-12)


def test_prefix_losses_are_the_truncated_reconstructions(seed):
    sae = randomised(MatryoshkaSAE(16, 64, 6, [3, 32, 64], backend="cpp", dtype=torch.float64))
    x = torch.randn(10, 16, dtype=torch.float64)
    out = sae(x)
    for g, m in enumerate(sae.prefix_sizes):
        expected = (x - sae.decode(out.code, m)).square().sum(1).mean()
        assert_close(out.prefix_losses[g], expected, 1e-12, f"prefix {m}")
    assert_close(out.loss, out.prefix_losses.mean(), 1e-12)


def test_topk_sae_is_a_single_prefix_matryoshka(seed):
    topk = randomised(TopKSAE(20, 50, 5, backend="cpp", dtype=torch.float64))
    nested = MatryoshkaSAE(20, 50, 5, [50], backend="cpp", dtype=torch.float64)
    nested.load_state_dict(topk.state_dict())
    x = torch.randn(8, 20, dtype=torch.float64)
    a, b = topk(x), nested(x)
    assert torch.equal(a.x_hat, b.x_hat) and torch.equal(a.loss, b.loss)
    assert_close(a.loss, (x - a.x_hat).square().sum(1).mean(), 1e-12)


def test_adam_step_matches_reference(seed):
    sae = randomised(MatryoshkaSAE(48, 300, 8, [30, 100, 300], backend="cpp"))
    ref = twin(sae, "reference")
    start = twin(sae, "cpp")
    x = torch.randn(64, 48)
    for model in (sae, ref):
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        model(x).loss.backward()
        opt.step()
    for p in PARAMS:
        assert_close(getattr(sae, p), getattr(ref, p), 1e-5, p)
        assert not torch.equal(getattr(sae, p), getattr(start, p)), f"{p} did not move"


def test_training_reduces_the_loss(seed):
    sae = MatryoshkaSAE(32, 128, 4, [16, 64, 128], backend="cpp")
    features = torch.randn(64, 32)
    opt = torch.optim.Adam(sae.parameters(), lr=3e-3)

    def batch():
        gate = (torch.rand(256, 64) < 0.05).float()
        return (gate * torch.rand(256, 64)) @ features

    first = sae(batch()).prefix_losses.detach()
    for _ in range(150):
        opt.zero_grad()
        sae(batch()).loss.backward()
        opt.step()
    last = sae(batch()).prefix_losses.detach()
    assert last[-1] < 0.5 * first[-1], (first, last)
    assert bool((last[1:] <= last[:-1]).all()), f"larger prefixes should reconstruct better: {last}"


def test_non_contiguous_input(seed):
    sae = randomised(MatryoshkaSAE(12, 40, 3, [10, 40], backend="cpp", dtype=torch.float64))
    x = torch.randn(12, 9, dtype=torch.float64).T
    assert not x.is_contiguous()
    a, b = sae(x), sae(x.contiguous())
    assert torch.equal(a.x_hat, b.x_hat) and torch.equal(a.loss, b.loss)


def test_torch_compile_traces_a_training_step_without_graph_breaks(seed):
    """fullgraph=True fails on any graph break; aot_eager traces the forward with the ops'
    fake implementations and builds the backward graph from their autograd formulas."""
    torch._dynamo.reset()
    sae = randomised(MatryoshkaSAE(24, 96, 4, [12, 48, 96], backend="cpp"))
    ref = twin(sae, "reference")
    x = torch.randn(32, 24)

    def forward(model, x):
        out = model(x)
        return out.loss, out.x_hat

    loss, x_hat = torch.compile(forward, fullgraph=True, backend="aot_eager")(sae, x)
    loss.backward()
    ref_loss, ref_x_hat = forward(ref, x)
    ref_loss.backward()
    assert_close(loss, ref_loss, 1e-5, "loss")
    assert_close(x_hat, ref_x_hat, 1e-5, "x_hat")
    for p in PARAMS:
        assert_close(getattr(sae, p).grad, getattr(ref, p).grad, 1e-5, f"grad {p}")


# ----- bad input: a clear error naming the argument, and no parameter changed -----


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(k=0), "k must be a positive int"),
        (dict(k=65), "k=65 must be at most d_sae=64"),
        (dict(d_model=0), "d_model must be a positive int"),
        (dict(prefix_sizes=[]), "prefix_sizes must be a non-empty list"),
        (dict(prefix_sizes=[32, 16, 64]), "strictly increasing"),
        (dict(prefix_sizes=[0, 64]), "strictly increasing positive"),
        (dict(prefix_sizes=[16, 32]), "last prefix size must equal d_sae=64"),
        (dict(prefix_sizes=[16.0, 64]), "list of ints"),
        (dict(prefix_weights=[1.0]), "one weight per prefix size"),
        (dict(prefix_weights=[1.0, -1.0]), "non-negative"),
        (dict(prefix_weights=[1.0, float("nan")]), "finite"),
        (dict(backend="gpu"), "backend must be one of"),
    ],
)
def test_bad_constructor_arguments(kwargs, match):
    args = dict(d_model=8, d_sae=64, k=4, prefix_sizes=[16, 64])
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        MatryoshkaSAE(**args)


def test_unavailable_backend_is_named():
    with pytest.raises(sparsecode.BackendUnavailableError, match="'cuda' is not available"):
        TopKSAE(8, 16, 2, backend="cuda")


@pytest.mark.parametrize(
    "make_x,error,match",
    [
        (lambda: torch.randn(4, 8, 2), ValueError, r"shape \[batch, d_model=8\]"),
        (lambda: torch.randn(8), ValueError, r"shape \[batch, d_model=8\]"),
        (lambda: torch.randn(4, 9), ValueError, r"d_model=8"),
        (lambda: torch.randn(0, 8), ValueError, "empty batch"),
        (lambda: torch.randint(0, 5, (4, 8)), TypeError, "dtype torch.int64"),
        (lambda: torch.randn(4, 8, dtype=torch.float64), TypeError, "cast with x.to"),
        (lambda: torch.randn(4, 8, device="meta"), ValueError, "x is on meta"),
        (lambda: torch.full((4, 8), float("nan")), ValueError, "NaN or Inf"),
        (lambda: torch.randn(4, 8).index_fill(0, torch.tensor([2]), float("inf")), ValueError, "NaN or Inf"),
        (lambda: [[0.0] * 8], TypeError, "must be a torch.Tensor"),
    ],
)
def test_bad_input_is_rejected_and_changes_nothing(make_x, error, match):
    sae = MatryoshkaSAE(8, 32, 3, [8, 32], backend="cpp")
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    before = copy.deepcopy(sae.state_dict())
    with pytest.raises(error, match=match):
        opt.zero_grad()
        sae(make_x()).loss.backward()
        opt.step()
    for name, value in sae.state_dict().items():
        assert torch.equal(value, before[name]), f"{name} changed"


def test_bad_decode_size():
    sae = TopKSAE(8, 32, 3)
    code = sae.encode(torch.randn(2, 8))
    for size in [0, 33, 2.5]:
        with pytest.raises(ValueError, match=r"size must be an int in \[1, d_sae=32\]"):
            sae.decode(code, size)


def test_training_after_inference_mode_use(seed):
    """The C++ kernels' reused scratch, first allocated under inference mode, stays writable
    by a later training step (it was once an inference tensor, which autograd code cannot
    update in place)."""
    sae = MatryoshkaSAE(24, 64, 4, [16, 64])
    x = torch.randn(33, 24)
    with torch.inference_mode():
        expected = sae(x).loss
    loss = sae(x).loss
    loss.backward()
    assert torch.equal(loss.detach(), expected)
    assert sae.W_enc.grad is not None
