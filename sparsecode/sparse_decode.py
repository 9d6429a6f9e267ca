"""The sparse decode op: dispatch and autograd.

    x_hat[b] = b_dec + sum_j values[b, j] * W_dec[indices[b, j]]

values [B, k], indices [B, k] int64, W_dec [n, d], b_dec [d] -> x_hat [B, d]. Registered as
``torch.ops.sparsecode.sparse_decode``; its backward (``sparse_decode_backward``) computes
k dot products per row for grad_values and a per-latent segmented sum for grad_W_dec
(DESIGN.md §3.2-3.3). The ``triton`` backend runs the Triton gather kernel for the forward,
and the extension's per-latent sum for grad_W_dec, which makes grad_values on the same pass
(:func:`sparsecode.sparse_grad.sparse_decode_grads`).
Reference: :func:`sparsecode.reference.sparse_decode`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sparsecode import reference, sparse_grad
from sparsecode.backends import kernels, resolve_backend


@torch.library.custom_op("sparsecode::sparse_decode", mutates_args=())
def _sparse_decode(
    values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Tensor, backend: str
) -> Tensor:
    if backend == "triton":
        from sparsecode.triton_kernels.sparse_decode import sparse_decode_forward

        return sparse_decode_forward(values, indices, W_dec, b_dec)
    return kernels(backend, values.device).sparse_decode_forward(values, indices, W_dec, b_dec)


@_sparse_decode.register_fake
def _(values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Tensor, backend: str):
    return values.new_empty(values.shape[0], W_dec.shape[1])


@torch.library.custom_op("sparsecode::sparse_decode_backward", mutates_args=())
def _sparse_decode_backward(
    grad_out: Tensor, values: Tensor, indices: Tensor, W_dec: Tensor, backend: str
) -> tuple[Tensor, Tensor, Tensor]:
    if backend == "triton":
        g = grad_out.to(values.dtype).contiguous()
        grad_values, grad_W_dec = sparse_grad.sparse_decode_grads(g, values, indices, W_dec)
        return grad_values, grad_W_dec, g.sum(0)
    return tuple(
        kernels(backend, values.device).sparse_decode_backward(grad_out, values, indices, W_dec)
    )


@_sparse_decode_backward.register_fake
def _(grad_out, values, indices, W_dec, backend):
    return torch.empty_like(values), torch.empty_like(W_dec), W_dec.new_empty(W_dec.shape[1])


def _setup_context(ctx, inputs, output) -> None:
    values, indices, W_dec, _, backend = inputs
    ctx.save_for_backward(values, indices, W_dec)
    ctx.backend = backend


def _backward(ctx, grad_out: Tensor):
    values, indices, W_dec = ctx.saved_tensors
    grad_values, grad_W_dec, grad_b_dec = _sparse_decode_backward(
        grad_out, values, indices, W_dec, ctx.backend
    )
    return grad_values, None, grad_W_dec, grad_b_dec, None


_sparse_decode.register_autograd(_backward, setup_context=_setup_context)


def sparse_decode(
    values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Tensor, *, backend: str = "auto"
) -> Tensor:
    """x_hat [B, d] decoded from the sparse code (values, indices [B, k]).

    Differentiable in values, W_dec and b_dec.
    """
    name = resolve_backend(backend, values.device)
    if name == "reference":
        return reference.sparse_decode(values, indices, W_dec, b_dec)
    return _sparse_decode(values, indices, W_dec, b_dec, name)
