"""nested_prefix_loss (cpp backend) against the pure-PyTorch reference."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable
from typing import ContextManager

import pytest
import torch

from sparsecode import ops, reference
from sparsecode.nested_prefix_loss import nested_prefix_loss_and_decode
from tests.conftest import TOLERANCE, assert_close
from tests.test_sparse_decode import random_code

SHAPES = [
    (B, d, n, k)
    for B, d, n, k in itertools.product([1, 7, 33], [5, 64, 100], [17, 256, 1000], [1, 3, 32])
    if k <= n
]


def prefixes_for(n: int, k: int) -> list[int]:
    """Prefix sizes with a group of one latent, a prefix smaller than k (when k > 2), and n."""
    sizes = {1, 2, max(1, k // 2), n // 3, n // 2, n}
    return sorted(m for m in sizes if 1 <= m <= n)


def make_problem(B, d, n, k, dtype):
    values, indices = random_code(B, n, k, dtype)
    x = torch.randn(B, d, dtype=dtype)
    W_dec = torch.randn(n, d, dtype=dtype) / d**0.5
    b_dec = torch.randn(d, dtype=dtype) * 0.1
    sizes = prefixes_for(n, k)
    weights = (torch.rand(len(sizes)) + 0.1).tolist()
    return x, values, indices, W_dec, b_dec, sizes, weights


def check_against_reference(
    outputs: tuple[torch.Tensor, ...], leaves: list[torch.Tensor], indices: torch.Tensor,
    sizes: list[int], weights: list[float], tol: float,
    backward: Callable[[], ContextManager] = contextlib.nullcontext, label: str = "",
    loss_only: bool = False,
) -> None:
    """outputs = (loss, prefix_losses, x_hat) of the leaves (x, values, W_dec, b_dec) and their
    gradients through all three outputs, or through the loss alone (loss_only, as a training
    step takes them), computed inside backward(), against the float64 reference's autograd."""
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    x, values, W_dec, b_dec = leaves64
    ref_loss, ref_prefix = reference.nested_prefix_loss(x, values, indices, W_dec, b_dec, sizes,
                                                        weights)
    ref_outputs = (ref_loss, ref_prefix, reference.sparse_decode(values, indices, W_dec, b_dec))
    for name, out, ref in zip(["loss", "prefix_losses", "x_hat"], outputs, ref_outputs):
        assert out.dtype == leaves[0].dtype
        assert_close(out, ref, tol, label + name)

    # Upstream gradients on all three outputs, as when a caller also uses x_hat; they pull
    # against the loss's own gradient, so residuals nearly cancel in places.
    # They are drawn in the inputs' dtype so both sides get exactly the same values.
    shapes = [(), (len(sizes),), tuple(leaves[0].shape)]
    upstream = [torch.randn(s, device=x.device).to(leaves[0].dtype) for s in shapes]
    used = 1 if loss_only else 3
    with backward():
        grads = torch.autograd.grad(outputs[:used], leaves, upstream[:used])
    upstream64 = [u.double() * (i < used) for i, u in enumerate(upstream)]
    ref_grads = torch.autograd.grad(ref_outputs[:used], leaves64, upstream64[:used])
    for name, g, r in zip(["W_dec", "b_dec"], grads[2:], ref_grads[2:]):
        assert_close(g, r, tol, f"{label}grad {name}")
    # grad x is a sum of the G scaled residuals, whose random upstream scales can cancel, and a
    # value's gradient is one dot product of d terms, which can cancel too (a single one at
    # B = 1, k = 1): their errors are measured against the size of their terms, not of their sum.
    scaled = scaled_residuals(*(t.detach() for t in (x, values)), indices,
                              *(t.detach() for t in (W_dec, b_dec)), sizes, weights, upstream64)
    for name, g, r, terms in (
        ("x", grads[0], ref_grads[0], scaled.abs().sum(0)),
        ("values", grads[1], ref_grads[1],
         values_grad_terms(scaled, indices, W_dec.detach(), sizes, upstream64[2])),
    ):
        assert (r.abs() <= terms * (1 + 1e-9)).all(), f"the terms must bound grad {name}"
        err = ((g.double() - r).norm() / terms.norm()).item()
        assert err <= tol, f"{label}grad {name}: error {err:.3e} > {tol:.1e} of its terms' size"


def scaled_residuals(x: torch.Tensor, values: torch.Tensor, indices: torch.Tensor,
                     W_dec: torch.Tensor, b_dec: torch.Tensor, sizes: list[int],
                     weights: list[float], upstream: list[torch.Tensor]) -> torch.Tensor:
    """[G, B, d] float64: scale_g r_g, the residual of prefix g times its scale
    2 (grad_loss w_g + grad_prefix_losses[g]) / B (DESIGN.md §3.4); grad x is their sum."""
    grad_loss, grad_prefix, _ = upstream
    w = torch.tensor(weights, dtype=torch.float64, device=x.device)
    scale = 2.0 * (grad_loss * w + grad_prefix) / max(x.shape[0], 1)
    return torch.stack([
        scale[g] * (x - reference.sparse_decode(values * (indices < m).to(values.dtype), indices,
                                                W_dec, b_dec))
        for g, m in enumerate(sizes)
    ])


def values_grad_terms(scaled: torch.Tensor, indices: torch.Tensor, W_dec: torch.Tensor,
                      sizes: list[int], grad_x_hat: torch.Tensor) -> torch.Tensor:
    """[B, k] float64: sum over c of |W_dec[indices[b, j], c]| * (|A[b, c]| + |grad_x_hat[b, c]|)
    with A the suffix sum of scaled (scaled_residuals) over the groups from the slot's own, so
    that grad values[b, j] = -W_dec[indices[b, j]] . (A - grad_x_hat)[b] sums terms no larger
    than these."""
    suffix = scaled.flip(0).cumsum(0).flip(0)  # [G, B, d]: sum over g >= h
    group = torch.bucketize(indices, torch.tensor(sizes, device=indices.device), right=True)
    rows = torch.arange(indices.shape[0], device=indices.device)[:, None]
    size = suffix.abs()[group, rows] + grad_x_hat.abs()[:, None, :]  # [B, k, d]
    return (W_dec.abs()[indices] * size).sum(-1)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("B,d,n,k", SHAPES)
def test_matches_reference(B, d, n, k, dtype, seed, poisoned):
    x, values, indices, W_dec, b_dec, sizes, weights = make_problem(B, d, n, k, dtype)
    inputs = [t.requires_grad_() for t in (x, values, W_dec, b_dec)]
    outputs = nested_prefix_loss_and_decode(inputs[0], inputs[1], indices, inputs[2], inputs[3],
                                            sizes, weights, backend="cpp")
    check_against_reference(outputs, inputs, indices, sizes, weights, TOLERANCE[dtype])


@pytest.mark.parametrize("B,d,n,k", [(7, 5, 17, 3), (33, 64, 256, 32)])
def test_public_op_without_reconstruction(B, d, n, k, seed, poisoned):
    """ops.nested_prefix_loss returns (loss, prefix_losses); only the loss is differentiated."""
    x, values, indices, W_dec, b_dec, sizes, weights = make_problem(B, d, n, k, torch.float64)
    inputs = [t.requires_grad_() for t in (x, values, W_dec, b_dec)]
    loss, prefix_losses = ops.nested_prefix_loss(
        inputs[0], inputs[1], indices, inputs[2], inputs[3], sizes, weights, backend="cpp"
    )
    ref_loss, ref_prefix = reference.nested_prefix_loss(
        inputs[0], inputs[1], indices, inputs[2], inputs[3], sizes, weights
    )
    assert_close(prefix_losses, ref_prefix, 1e-10)
    for g, r in zip(torch.autograd.grad(loss, inputs), torch.autograd.grad(ref_loss, inputs)):
        assert_close(g, r, 1e-10)


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_reconstruction_alone_is_differentiated(backend, seed):
    """Only x_hat carries a gradient, so the backward gets None for the losses' (the op's context
    makes no zeros for them): the gradients are the sparse decode's."""
    if backend == "triton":
        pytest.importorskip("triton")
    x, values, indices, W_dec, b_dec, sizes, weights = make_problem(9, 12, 40, 4, torch.float32)
    inputs = [t.requires_grad_() for t in (x, values, W_dec, b_dec)]
    x_hat = nested_prefix_loss_and_decode(inputs[0], inputs[1], indices, inputs[2], inputs[3],
                                          sizes, weights, backend=backend)[2]
    upstream = torch.randn_like(x_hat)
    grads = torch.autograd.grad(x_hat, inputs[1:], upstream)
    ref = reference.sparse_decode(inputs[1], indices, inputs[2], inputs[3])
    for name, g, r in zip(["values", "W_dec", "b_dec"], grads,
                          torch.autograd.grad(ref, inputs[1:], upstream)):
        assert_close(g, r, TOLERANCE[torch.float32], f"grad {name}")


def test_unsorted_indices_give_the_same_result(seed):
    x, values, indices, W_dec, b_dec, sizes, weights = make_problem(9, 8, 40, 6, torch.float64)
    perm = torch.randperm(6)
    sorted_out = ops.nested_prefix_loss(x, values, indices, W_dec, b_dec, sizes, weights, backend="cpp")
    shuffled_out = ops.nested_prefix_loss(
        x, values[:, perm], indices[:, perm], W_dec, b_dec, sizes, weights, backend="cpp"
    )
    for a, b in zip(sorted_out, shuffled_out):
        assert_close(a, b, 1e-12)


def test_single_prefix_is_the_mean_squared_error(seed):
    x, values, indices, W_dec, b_dec, _, _ = make_problem(11, 7, 30, 4, torch.float64)
    loss, prefix_losses = ops.nested_prefix_loss(
        x, values, indices, W_dec, b_dec, [30], [1.0], backend="cpp"
    )
    x_hat = reference.sparse_decode(values, indices, W_dec, b_dec)
    assert_close(loss, (x - x_hat).square().sum(1).mean(), 1e-12)
    assert prefix_losses.shape == (1,)


def test_gradcheck(seed):
    x, values, indices, W_dec, b_dec, sizes, weights = make_problem(5, 4, 12, 3, torch.float64)
    inputs = [t.requires_grad_() for t in (x, values, W_dec, b_dec)]
    assert torch.autograd.gradcheck(
        lambda *a: nested_prefix_loss_and_decode(
            a[0], a[1], indices, a[2], a[3], sizes, weights, backend="cpp"
        ),
        inputs,
    )


def test_opcheck(seed):
    x, values, indices, W_dec, b_dec, sizes, weights = make_problem(6, 5, 14, 3, torch.float32)
    inputs = [t.requires_grad_() for t in (x, values, W_dec, b_dec)]
    torch.library.opcheck(
        torch.ops.sparsecode.nested_prefix_loss.default,
        (inputs[0], inputs[1], indices, inputs[2], inputs[3], sizes, weights, "cpp", True),
    )


def test_deterministic(seed):
    x, values, indices, W_dec, b_dec, sizes, weights = make_problem(64, 16, 100, 8, torch.float32)
    W_dec.requires_grad_()
    grads = [
        torch.autograd.grad(
            ops.nested_prefix_loss(x, values, indices, W_dec, b_dec, sizes, weights, backend="cpp")[0],
            W_dec,
        )[0]
        for _ in range(2)
    ]
    assert torch.equal(grads[0], grads[1])


def test_bad_prefix_sizes_are_rejected():
    x, values, indices, W_dec, b_dec, _, _ = make_problem(3, 4, 10, 2, torch.float32)
    with pytest.raises(RuntimeError, match="strictly increasing"):
        ops.nested_prefix_loss(x, values, indices, W_dec, b_dec, [5, 5, 10], [1, 1, 1], backend="cpp")
    with pytest.raises(RuntimeError, match="last prefix size must equal d_sae"):
        ops.nested_prefix_loss(x, values, indices, W_dec, b_dec, [5, 9], [1, 1], backend="cpp")
    with pytest.raises(RuntimeError, match="one prefix weight per prefix size"):
        ops.nested_prefix_loss(x, values, indices, W_dec, b_dec, [5, 10], [1], backend="cpp")
