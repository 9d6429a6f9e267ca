"""The TopK encode op: dispatch and autograd.

    values, indices = relu(topk((x - b_dec) @ W_enc + b_enc, k)), indices sorted per row

x [B, d], W_enc [d, n], b_enc [n], b_dec [d] -> values [B, k] (x's dtype), indices [B, k]
int64. Registered as ``torch.ops.sparsecode.topk_encode`` with a fake implementation and
an autograd formula whose backward (``torch.ops.sparsecode.topk_encode_backward``) touches
only the B*k active latents (DESIGN.md §3.3). The ``triton`` backend runs the fused Triton
encode and the extension's sparse backward (plain torch ops where the extension has no kernels
for the device). Reference: :func:`sparsecode.reference.topk_encode`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sparsecode import reference, sparse_grad
from sparsecode.backends import kernels, resolve_backend


@torch.library.custom_op("sparsecode::topk_encode", mutates_args=())
def _topk_encode(
    x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor, k: int, backend: str
) -> tuple[Tensor, Tensor]:
    if backend == "triton":
        from sparsecode.triton_kernels.topk_encode import topk_encode_forward

        return topk_encode_forward(x, W_enc, b_enc, b_dec, k)
    return tuple(kernels(backend, x.device).topk_encode_forward(x, W_enc, b_enc, b_dec, k))


@_topk_encode.register_fake
def _(x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor, k: int, backend: str):
    return x.new_empty(x.shape[0], k), x.new_empty(x.shape[0], k, dtype=torch.int64)


@torch.library.custom_op("sparsecode::topk_encode_backward", mutates_args=())
def _topk_encode_backward(
    grad_values: Tensor,
    x: Tensor,
    W_enc: Tensor,
    b_dec: Tensor,
    values: Tensor,
    indices: Tensor,
    need_grad_x: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    args = (grad_values, x, W_enc, b_dec, values, indices, need_grad_x)
    if backend == "triton":
        return sparse_grad.topk_encode_backward(*args)
    return tuple(kernels(backend, x.device).topk_encode_backward(*args))


@_topk_encode_backward.register_fake
def _(grad_values, x, W_enc, b_dec, values, indices, need_grad_x, backend):
    return (
        x.new_empty(x.shape[0] if need_grad_x else 0, x.shape[1]),
        torch.empty_like(W_enc),
        W_enc.new_empty(W_enc.shape[1]),
        torch.empty_like(b_dec),
    )


def _setup_context(ctx, inputs, output) -> None:
    x, W_enc, _, b_dec, _, backend = inputs
    values, indices = output
    ctx.save_for_backward(x, W_enc, b_dec, values, indices)
    ctx.backend = backend


def _backward(ctx, grad_values: Tensor, _grad_indices: Tensor):
    x, W_enc, b_dec, values, indices = ctx.saved_tensors
    need_grad_x = ctx.needs_input_grad[0]
    grad_x, grad_W_enc, grad_b_enc, grad_b_dec = _topk_encode_backward(
        grad_values, x, W_enc, b_dec, values, indices, need_grad_x, ctx.backend
    )
    return grad_x if need_grad_x else None, grad_W_enc, grad_b_enc, grad_b_dec, None, None


_topk_encode.register_autograd(_backward, setup_context=_setup_context)


def topk_encode(
    x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor, k: int, *, backend: str = "auto"
) -> tuple[Tensor, Tensor]:
    """values [B, k], indices [B, k] int64 (sorted ascending per row) of the TopK code of x [B, d].

    Differentiable in x, W_enc, b_enc and b_dec; the selection itself is not.
    """
    name = resolve_backend(backend, x.device)
    if name == "reference":
        return reference.topk_encode(x, W_enc, b_enc, b_dec, k)
    return _topk_encode(x, W_enc, b_enc, b_dec, k, name)
