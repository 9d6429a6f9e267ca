"""sparse_decode (cpp backend) against the pure-PyTorch reference."""

from __future__ import annotations

import itertools

import pytest
import torch

from sparsecode import ops, reference
from tests.conftest import TOLERANCE, assert_close

SHAPES = [
    (B, d, n, k)
    for B, d, n, k in itertools.product([1, 7, 33], [5, 64, 100], [17, 256, 1000], [1, 3, 32])
    if k <= n
]


def random_code(B: int, n: int, k: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """values [B, k] (positive, as after ReLU) and distinct sorted indices [B, k] per row."""
    indices = torch.rand(B, n).argsort(dim=1)[:, :k].sort(dim=1).values
    return torch.rand(B, k, dtype=dtype) + 0.1, indices


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("B,d,n,k", SHAPES)
def test_matches_reference(B, d, n, k, dtype, seed, poisoned):
    values, indices = random_code(B, n, k, dtype)
    W_dec = torch.randn(n, d, dtype=dtype)
    b_dec = torch.randn(d, dtype=dtype)
    inputs = [t.requires_grad_() for t in (values, W_dec, b_dec)]
    inputs64 = [t.detach().double().requires_grad_() for t in inputs]

    out = ops.sparse_decode(inputs[0], indices, inputs[1], inputs[2], backend="cpp")
    ref = reference.sparse_decode(inputs64[0], indices, inputs64[1], inputs64[2])
    assert_close(out, ref, TOLERANCE[dtype], "x_hat")

    grad = torch.randn(out.shape, dtype=dtype)
    grads = torch.autograd.grad(out, inputs, grad)
    ref_grads = torch.autograd.grad(ref, inputs64, grad.double())
    for name, g, r in zip(["values", "W_dec", "b_dec"], grads, ref_grads):
        assert_close(g, r, TOLERANCE[dtype], f"grad {name}")


def test_zero_values_and_repeated_latents(seed):
    """A zero value contributes nothing, and a latent used by many rows sums all of them."""
    B, d, n, k = 40, 9, 5, 3
    values, indices = random_code(B, n, k, torch.float64)
    values[:, 1] = 0.0
    W_dec = torch.randn(n, d, dtype=torch.float64, requires_grad=True)
    b_dec = torch.randn(d, dtype=torch.float64)
    out = ops.sparse_decode(values, indices, W_dec, b_dec, backend="cpp")
    ref = reference.sparse_decode(values, indices, W_dec, b_dec)
    assert_close(out, ref, 1e-12)
    (g,) = torch.autograd.grad(out.square().sum(), W_dec)
    (g_ref,) = torch.autograd.grad(ref.square().sum(), W_dec)
    assert_close(g, g_ref, 1e-12, "grad W_dec")


def test_gradcheck(seed):
    values, indices = random_code(6, 13, 4, torch.float64)
    W_dec = torch.randn(13, 5, dtype=torch.float64)
    b_dec = torch.randn(5, dtype=torch.float64)
    inputs = [t.requires_grad_() for t in (values, W_dec, b_dec)]
    assert torch.autograd.gradcheck(
        lambda v, W, b: ops.sparse_decode(v, indices, W, b, backend="cpp"), inputs
    )


def test_opcheck(seed):
    values, indices = random_code(6, 13, 4, torch.float32)
    W_dec = torch.randn(13, 5, requires_grad=True)
    b_dec = torch.randn(5, requires_grad=True)
    torch.library.opcheck(
        torch.ops.sparsecode.sparse_decode.default,
        (values.requires_grad_(), indices, W_dec, b_dec, "cpp"),
    )


def test_deterministic(seed):
    values, indices = random_code(64, 50, 8, torch.float32)
    W_dec = torch.randn(50, 32, requires_grad=True)
    b_dec = torch.randn(32)
    grads = [
        torch.autograd.grad(
            ops.sparse_decode(values, indices, W_dec, b_dec, backend="cpp").sin().sum(), W_dec
        )[0]
        for _ in range(2)
    ]
    assert torch.equal(grads[0], grads[1])


def test_out_of_range_index_is_rejected():
    values, indices = random_code(2, 10, 3, torch.float32)
    indices[1, 2] = 10
    with pytest.raises(RuntimeError, match=r"indices must lie in \[0, d_sae=10\)"):
        ops.sparse_decode(values, indices, torch.randn(10, 4), torch.zeros(4), backend="cpp")
