"""Forward + backward of each hot-path op, cpp vs its pure-PyTorch reference, on the code of
the session's activations (realistic sorted indices, not uniform random ones)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor

from sparsecode import ops
from workload import FAST_ROUNDS, SIZES, SLOW_ROUNDS, build_sae

pytestmark = pytest.mark.benchmark(group="ops fwd+bwd")
BACKENDS = ["cpp", "reference"]


@dataclass(frozen=True)
class OpInputs:
    """Leaf parameters (requiring grad), the encoded code and fixed output gradients."""

    x: Tensor
    W_enc: Tensor
    b_enc: Tensor
    W_dec: Tensor
    b_dec: Tensor
    values: Tensor
    indices: Tensor
    grad_values: Tensor
    grad_x_hat: Tensor


@pytest.fixture(scope="module")
def inputs(x: Tensor, seed: int) -> OpInputs:
    sae = build_sae("matryoshka", "cpp", seed)
    params = {name: p.detach().clone().requires_grad_() for name, p in sae.named_parameters()}
    with torch.no_grad():
        values, indices = ops.topk_encode(
            x, params["W_enc"], params["b_enc"], params["b_dec"], SIZES.k, backend="cpp"
        )
    generator = torch.Generator().manual_seed(seed)
    return OpInputs(
        x=x,
        values=values.requires_grad_(),
        indices=indices,
        grad_values=torch.randn(values.shape, generator=generator),
        grad_x_hat=torch.randn(x.shape, generator=generator),
        **params,
    )


def _topk_encode(a: OpInputs, backend: str) -> tuple[Tensor, ...]:
    values, _ = ops.topk_encode(a.x, a.W_enc, a.b_enc, a.b_dec, SIZES.k, backend=backend)
    return torch.autograd.grad(values, (a.W_enc, a.b_enc, a.b_dec), a.grad_values)


def _sparse_decode(a: OpInputs, backend: str) -> tuple[Tensor, ...]:
    x_hat = ops.sparse_decode(a.values, a.indices, a.W_dec, a.b_dec, backend=backend)
    return torch.autograd.grad(x_hat, (a.values, a.W_dec, a.b_dec), a.grad_x_hat)


def _nested_prefix_loss(a: OpInputs, backend: str) -> tuple[Tensor, ...]:
    groups = len(SIZES.prefix_sizes)
    loss, _ = ops.nested_prefix_loss(
        a.x, a.values, a.indices, a.W_dec, a.b_dec, SIZES.prefix_sizes, [1 / groups] * groups,
        backend=backend,
    )
    return torch.autograd.grad(loss, (a.values, a.W_dec, a.b_dec))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", [_topk_encode, _sparse_decode, _nested_prefix_loss],
                         ids=lambda op: op.__name__.lstrip("_"))
def test_op_forward_backward(
    timed, inputs: OpInputs, op: Callable[[OpInputs, str], tuple[Tensor, ...]], backend: str
) -> None:
    """The op's forward and the gradients of its output w.r.t. its differentiable inputs."""
    rounds = SLOW_ROUNDS if backend == "reference" else FAST_ROUNDS
    name = op.__name__.lstrip("_")
    grads = timed(f"{name} fwd+bwd: {backend}", lambda: op(inputs, backend), rounds)
    assert all(torch.isfinite(g).all() for g in grads), f"{name} ({backend}): non-finite gradient"
