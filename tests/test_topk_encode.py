"""topk_encode (cpp backend) against the pure-PyTorch reference."""

from __future__ import annotations

import itertools

import pytest
import torch

from sparsecode import ops, reference
from tests.conftest import TOLERANCE, assert_close, exact_tie_inputs, lowest_ids_first

SHAPES = [
    (B, d, n, k)
    for B, d, n, k in itertools.product([1, 7, 33], [5, 64, 100], [17, 256, 1000], [1, 3, 32])
    if k <= n
]


def make_inputs(B: int, d: int, n: int, dtype: torch.dtype) -> list[torch.Tensor]:
    """x [B, d], W_enc [d, n], b_enc [n], b_dec [d]: random, never zero."""
    return [
        torch.randn(B, d, dtype=dtype),
        torch.randn(d, n, dtype=dtype) / d**0.5,
        torch.randn(n, dtype=dtype) * 0.1,
        torch.randn(d, dtype=dtype) * 0.1,
    ]


def reference_at(inputs: list[torch.Tensor], indices: torch.Tensor) -> torch.Tensor:
    """relu of the float64 pre-activations at the given latents: the reference for a fixed
    selection, so float32 near-ties that pick another latent cannot hide a gradient error."""
    x, W_enc, b_enc, b_dec = inputs
    pre = (x - b_dec) @ W_enc + b_enc
    return torch.relu(pre.gather(1, indices))


def check_topk_selection(
    inputs: list[torch.Tensor], indices: torch.Tensor, k: int, slack: float = 1e-5
) -> None:
    """indices are sorted, distinct, in range, and pick the k largest float64 pre-activations,
    up to `slack` times the largest |pre-activation| (the rounding of the kernel's own)."""
    x, W_enc, b_enc, b_dec = (t.detach().double() for t in inputs)
    pre = (x - b_dec) @ W_enc + b_enc
    n = pre.shape[1]
    assert indices.dtype == torch.int64 and indices.shape == (x.shape[0], k)
    assert bool(((indices >= 0) & (indices < n)).all())
    assert bool((indices[:, 1:] > indices[:, :-1]).all()), "indices not sorted and distinct"
    if k < n:
        chosen = pre.gather(1, indices)
        others = pre.scatter(1, indices, float("-inf"))
        margin = slack * pre.abs().max()
        assert bool((chosen.min(1).values >= others.max(1).values - margin).all()), "not a top-k"


@pytest.mark.parametrize("x_grad", [True, False], ids=["x_grad", "no_x_grad"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("B,d,n,k", SHAPES)
def test_matches_reference(B, d, n, k, dtype, x_grad, seed, poisoned):
    """Values and gradients; without x_grad (a training step's activations) the backward
    skips grad_x and the other gradients must not change."""
    inputs = make_inputs(B, d, n, dtype)
    names = ["x", "W_enc", "b_enc", "b_dec"]
    leaves = [(name, t.requires_grad_()) for name, t in zip(names, inputs) if x_grad or name != "x"]
    values, indices = ops.topk_encode(*inputs, k, backend="cpp")
    check_topk_selection(inputs, indices, k)

    inputs64 = [t.detach().double().requires_grad_() for t in inputs]
    ref_values = reference_at(inputs64, indices)
    assert_close(values, ref_values, TOLERANCE[dtype], "values")

    grad = torch.randn(values.shape, dtype=dtype)
    grads = torch.autograd.grad(values, [t for _, t in leaves], grad)
    ref_grads = dict(zip(names, torch.autograd.grad(ref_values, inputs64, grad.double())))
    for (name, _), g in zip(leaves, grads):
        assert_close(g, ref_grads[name], TOLERANCE[dtype], f"grad {name}")


@pytest.mark.parametrize("B,d,n,k", [(1, 5, 17, 1), (33, 100, 1000, 32)])
def test_backward_without_grad_x(B, d, n, k, seed):
    """need_grad_x=False returns grad_x as [0, d] and the same weight and bias gradients."""
    x, W_enc, b_enc, b_dec = make_inputs(B, d, n, torch.float32)
    values, indices = ops.topk_encode(x, W_enc, b_enc, b_dec, k, backend="cpp")
    grad = torch.randn_like(values)
    full = torch.ops.sparsecode_C.topk_encode_backward(grad, x, W_enc, b_dec, values, indices, True)
    lean = torch.ops.sparsecode_C.topk_encode_backward(grad, x, W_enc, b_dec, values, indices, False)
    assert full[0].shape == (B, d) and lean[0].shape == (0, d)
    for name, a, b in zip(["W_enc", "b_enc", "b_dec"], full[1:], lean[1:]):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("B,d,n,k", [(7, 5, 17, 3), (33, 64, 256, 32), (1, 100, 1000, 1)])
def test_same_selection_as_reference(B, d, n, k, seed):
    inputs = make_inputs(B, d, n, torch.float64)
    values, indices = ops.topk_encode(*inputs, k, backend="cpp")
    ref_values, ref_indices = reference.topk_encode(*inputs, k)
    assert torch.equal(indices, ref_indices)
    assert_close(values, ref_values, 1e-12, "values")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("k", [1, 3, 8])
def test_exact_ties(k, dtype, seed):
    """Small-integer inputs make every pre-activation an exact integer, so rows are full of
    exact ties whatever order the GEMM sums in. The kernel must keep the lower latent id among
    equals; the reference (torch.topk) may not, so against it compare the selected values."""
    x, W_enc, b_enc, b_dec = exact_tie_inputs(9, 16, 40, dtype)
    values, indices = ops.topk_encode(x, W_enc, b_enc, b_dec, k, backend="cpp")
    ref_values, ref_indices = reference.topk_encode(x, W_enc, b_enc, b_dec, k)
    assert_close(values.sort(1).values, ref_values.sort(1).values, 0.0, "selected values")

    assert torch.equal(indices, lowest_ids_first((x - b_dec) @ W_enc + b_enc, k))


def test_all_negative_preactivations_give_zero_values(seed):
    x, W_enc, b_enc, b_dec = make_inputs(4, 8, 30, torch.float64)
    b_enc = b_enc - 100.0
    values, indices = ops.topk_encode(x, W_enc, b_enc, b_dec, 5, backend="cpp")
    assert torch.equal(values, torch.zeros_like(values))
    check_topk_selection([x, W_enc, b_enc, b_dec], indices, 5)


@pytest.mark.parametrize("k", [1, 5])
def test_nan_preactivations_are_never_preferred(k, seed):
    """A NaN pre-activation ranks below every number: the kernel keeps the top-k of the
    finite entries, whatever the NaN's position in the row."""
    x, W_enc, b_enc, b_dec = make_inputs(6, 8, 40, torch.float64)
    b_enc[[0, 17, 39]] = float("nan")
    values, indices = ops.topk_encode(x, W_enc, b_enc, b_dec, k, backend="cpp")
    assert bool(torch.isfinite(values).all())
    assert not bool(torch.isin(indices, torch.tensor([0, 17, 39])).any())
    finite = b_enc.nan_to_num(nan=float("-inf"))
    ref_values, ref_indices = reference.topk_encode(x, W_enc, finite, b_dec, k)
    assert torch.equal(indices, ref_indices)
    assert_close(values, ref_values, 1e-12, "values")

def test_gradcheck(seed):
    inputs = [t.requires_grad_() for t in make_inputs(5, 6, 19, torch.float64)]
    assert torch.autograd.gradcheck(
        lambda *a: ops.topk_encode(*a, 4, backend="cpp")[0], inputs
    )


def test_opcheck(seed):
    """Schema, fake (meta) implementation and autograd registration are consistent."""
    inputs = [t.requires_grad_() for t in make_inputs(6, 7, 23, torch.float32)]
    torch.library.opcheck(torch.ops.sparsecode.topk_encode.default, (*inputs, 3, "cpp"))


def test_non_contiguous_inputs(seed):
    x, W_enc, b_enc, b_dec = make_inputs(8, 12, 50, torch.float64)
    W_t = W_enc.t().contiguous().t()
    x_strided = torch.randn(12, 8, dtype=torch.float64).t()
    for args in [(x, W_t, b_enc, b_dec), (x_strided, W_enc, b_enc, b_dec)]:
        values, indices = ops.topk_encode(*args, 4, backend="cpp")
        ref_values, ref_indices = reference.topk_encode(*args, 4)
        assert torch.equal(indices, ref_indices)
        assert_close(values, ref_values, 1e-12)


def test_bad_arguments_are_named():
    x, W_enc, b_enc, b_dec = make_inputs(3, 4, 10, torch.float32)
    with pytest.raises(RuntimeError, match="k must be in"):
        ops.topk_encode(x, W_enc, b_enc, b_dec, 11, backend="cpp")
    with pytest.raises(RuntimeError, match="W_enc must be"):
        ops.topk_encode(x, W_enc[:3], b_enc, b_dec, 2, backend="cpp")
    with pytest.raises(RuntimeError, match="same dtype"):
        ops.topk_encode(x.double(), W_enc, b_enc, b_dec, 2, backend="cpp")
