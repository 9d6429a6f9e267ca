"""The nested-prefix (Matryoshka) loss op: dispatch and autograd.

    prefix_losses[g] = mean_b ||x - x_hat_g||^2,   loss = sum_g prefix_weights[g] * prefix_losses[g]

where x_hat_g decodes only the latents < prefix_sizes[g]. x [B, d], values/indices [B, k],
W_dec [n, d], b_dec [d] -> loss [], prefix_losses [G]. All G losses come from one walk over
each row's sorted slots and the backward uses suffix sums of the weighted residuals
(DESIGN.md §3.4), never G decodes. The registered op ``torch.ops.sparsecode.nested_prefix_loss``
also returns the full reconstruction x_hat [B, d], which the walk computes on the way, so a
module's forward needs no separate decode, and a fourth tensor that only its backward reads:
on the ``triton`` backend the suffix sums of a backward from the loss alone, [G, B, d] in x's
dtype (a backward that also takes gradients from the prefix losses or x_hat makes its own again:
from the residuals of the forward walk made again, or on the tensor cores from the rows), or
[G, 0, d] when the op's last argument, suffix_sums, is false (no
backward can follow: no input requires grad, or grad mode is off); on the ``cuda`` backend the
residual x - x_hat as [2, B, d] in x's dtype, two parts whose sum it is, from which the backward
walks back through the slots; on the CPU an empty [2, 0, d] (the backward walks to it again).
The ``triton`` backend runs the forward as a Triton walk of gathered decoder rows (float32,
bfloat16 and float16; triton_kernels/nested_prefix_loss.py; with SPARSECODE_TENSOR_CORES=1, in
bfloat16 with G <= 8 on sm_80+, the extension's tensor-core pass over the rows instead) and the
backward as one pass over the pairs (sparse_grad.latent_rows_sum_dots: the extension's
per-latent sums, or torch ops where it has no kernels for the device) after elementwise suffix
sums where needed; other dtypes on the
``triton`` backend run as the extension's kernels, or as the reference where it has none.
``auto`` on CUDA tensors picks ``triton`` before ``cuda``, as for the other ops: on an H100
(B=8192, d=2304, d_sae=65536, k=64, G=6, bf16, 2026-11-27 16:35 UTC) the earlier Triton walks
(forward, then a walk back) took 3.47 ms against the CUDA kernels' 3.66 ms (3.16 against 3.49
in a later run); on an H200 (2026-11-28) the triton walk forward and walk-free backward took
2.0 to 2.8 ms from run to run against the cuda kernels' 3.1 to 3.6.
Reference: :func:`sparsecode.reference.nested_prefix_loss`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from sparsecode import reference
from sparsecode.backends import compiled_kernels, kernels, resolve_backend

_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _walks_in_triton(x: Tensor, backend: str) -> bool:
    """Whether the Triton walks run the op for backend `backend` on x (else the extension)."""
    return backend == "triton" and x.dtype in _TRITON_DTYPES


def _runs_as_reference(x: Tensor, backend: str) -> bool:
    """Whether backend `backend` runs the op as the reference on x: the reference itself, or
    the triton backend on a dtype its walks do not take where the extension has no kernels."""
    return backend == "reference" or (backend == "triton" and not _walks_in_triton(x, backend)
                                      and compiled_kernels(x.device) is None)


@torch.library.custom_op("sparsecode::nested_prefix_loss", mutates_args=())
def _nested_prefix_loss(
    x: Tensor,
    values: Tensor,
    indices: Tensor,
    W_dec: Tensor,
    b_dec: Tensor,
    prefix_sizes: Sequence[int],
    prefix_weights: Sequence[float],
    backend: str,
    suffix_sums: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    if _walks_in_triton(x, backend):
        from sparsecode.triton_kernels.nested_prefix_loss import nested_prefix_loss_forward

        return nested_prefix_loss_forward(x, values, indices, W_dec, b_dec, prefix_sizes,
                                          prefix_weights, suffix_sums=suffix_sums)
    return kernels(backend, x.device).nested_prefix_loss_forward(
        x, values, indices, W_dec, b_dec, prefix_sizes, prefix_weights
    )


@_nested_prefix_loss.register_fake
def _(x, values, indices, W_dec, b_dec, prefix_sizes, prefix_weights, backend, suffix_sums):
    if _walks_in_triton(x, backend):
        resid = x.new_empty(len(prefix_sizes), x.shape[0] if suffix_sums else 0, x.shape[1])
    else:
        resid = x.new_empty(2, x.shape[0] if x.device.type == "cuda" else 0, x.shape[1])
    return x.new_empty(()), x.new_empty(len(prefix_sizes)), torch.empty_like(x), resid


@torch.library.custom_op("sparsecode::nested_prefix_loss_backward", mutates_args=())
def _nested_prefix_loss_backward(
    grad_loss: Tensor,
    grad_prefix_losses: Tensor,
    grad_x_hat: Tensor | None,
    x: Tensor,
    values: Tensor,
    indices: Tensor,
    W_dec: Tensor,
    b_dec: Tensor,
    prefix_sizes: Sequence[int],
    prefix_weights: Sequence[float],
    resid: Tensor,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return tuple(
        kernels(backend, x.device).nested_prefix_loss_backward(
            grad_loss, grad_prefix_losses, grad_x_hat, x, values, indices, W_dec, b_dec,
            prefix_sizes, prefix_weights, resid,
        )
    )


@torch.library.custom_op("sparsecode::nested_prefix_loss_residuals_triton", mutates_args=())
def _nested_prefix_loss_residuals_triton(
    x: Tensor, values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Tensor,
    prefix_sizes: Sequence[int],
) -> Tensor:
    """Every prefix's residual R [G, B, d] (float32), from the Triton forward walk again."""
    from sparsecode.triton_kernels.nested_prefix_loss import nested_prefix_loss_residuals

    return nested_prefix_loss_residuals(x, values, indices, W_dec, b_dec, prefix_sizes)


@torch.library.custom_op("sparsecode::nested_prefix_loss_suffix_triton", mutates_args=())
def _nested_prefix_loss_suffix_triton(
    grad_loss: Tensor, grad_prefix_losses: Tensor, grad_x_hat: Tensor | None, values: Tensor,
    indices: Tensor, W_dec: Tensor, prefix_sizes: Sequence[int],
    prefix_weights: Sequence[float], resid: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """The first half of the Triton backward under any upstream gradients: (S [G, B, d],
    grad_x [B, d], grad_b_dec [d]) from the residuals resid [G, B, d]."""
    from sparsecode.triton_kernels.nested_prefix_loss import nested_prefix_loss_suffix_sums

    return nested_prefix_loss_suffix_sums(grad_loss, grad_prefix_losses, grad_x_hat, values,
                                          indices, W_dec, prefix_sizes, prefix_weights, resid)


@torch.library.custom_op("sparsecode::nested_prefix_loss_suffix_tensor_cores", mutates_args=())
def _nested_prefix_loss_suffix_tensor_cores(
    grad_loss: Tensor, grad_prefix_losses: Tensor, grad_x_hat: Tensor | None, x: Tensor,
    values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Tensor, prefix_sizes: Sequence[int],
    prefix_weights: Sequence[float],
) -> tuple[Tensor, Tensor, Tensor]:
    """The first half of the Triton backward under any upstream gradients where the tensor-core
    pass takes the inputs: (S [G, B, d], grad_x [B, d], grad_b_dec [d]) from the rows, with no
    residuals in memory."""
    from sparsecode.triton_kernels.nested_prefix_loss import (
        nested_prefix_loss_suffix_sums_on_tensor_cores)

    return nested_prefix_loss_suffix_sums_on_tensor_cores(
        grad_loss, grad_prefix_losses, grad_x_hat, x, values, indices, W_dec, b_dec, prefix_sizes,
        prefix_weights)


@torch.library.custom_op("sparsecode::nested_prefix_loss_pair_grads_triton", mutates_args=())
def _nested_prefix_loss_pair_grads_triton(
    S: Tensor, values: Tensor, indices: Tensor, W_dec: Tensor, prefix_sizes: Sequence[int],
) -> tuple[Tensor, Tensor]:
    """The pass over the pairs of the Triton backward: (grad_values, grad_W_dec) from S."""
    from sparsecode.triton_kernels.nested_prefix_loss import nested_prefix_loss_pair_grads

    return nested_prefix_loss_pair_grads(S, values, indices, W_dec, prefix_sizes)


@_nested_prefix_loss_backward.register_fake
def _(grad_loss, grad_prefix_losses, grad_x_hat, x, values, indices, W_dec, b_dec,
      prefix_sizes, prefix_weights, resid, backend):
    return (
        torch.empty_like(x),
        torch.empty_like(values),
        torch.empty_like(W_dec),
        torch.empty_like(b_dec),
    )


@_nested_prefix_loss_residuals_triton.register_fake
def _(x, values, indices, W_dec, b_dec, prefix_sizes):
    return x.new_empty(len(prefix_sizes), *x.shape, dtype=torch.float32)


@_nested_prefix_loss_suffix_triton.register_fake
def _(grad_loss, grad_prefix_losses, grad_x_hat, values, indices, W_dec, prefix_sizes,
      prefix_weights, resid):
    G, B, d = resid.shape
    return values.new_empty(G, B, d), values.new_empty(B, d), values.new_empty(d)


@_nested_prefix_loss_suffix_tensor_cores.register_fake
def _(grad_loss, grad_prefix_losses, grad_x_hat, x, values, indices, W_dec, b_dec, prefix_sizes,
      prefix_weights):
    return x.new_empty(len(prefix_sizes), *x.shape), torch.empty_like(x), torch.empty_like(b_dec)


@_nested_prefix_loss_pair_grads_triton.register_fake
def _(S, values, indices, W_dec, prefix_sizes):
    return torch.empty_like(values), torch.empty_like(W_dec)


def _setup_context(ctx, inputs, output) -> None:
    x, values, indices, W_dec, b_dec, prefix_sizes, prefix_weights, backend, _ = inputs
    resid = output[3]
    ctx.mark_non_differentiable(resid)
    # Outputs without a gradient get None, not zeros: resid's would be as large as resid (the
    # triton backend's [G, B, d]), and x_hat's, unused by a loss, a [B, d] pass.
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, values, indices, W_dec, b_dec, resid)
    ctx.prefix_sizes = prefix_sizes
    ctx.prefix_weights = prefix_weights
    ctx.backend = backend


def _free(resid: Tensor) -> None:
    """Frees the memory of resid (eager tensors only; a traced backward, whose tensors are
    fakes, keeps it)."""
    if type(resid) is not Tensor:
        return
    if resid.is_cuda:  # not reused before the kernels queued on this stream have read it
        resid.record_stream(torch.cuda.current_stream(resid.device))
    resid.untyped_storage().resize_(0)


def _triton_backward(ctx, grad_loss: Tensor | None, grad_prefix_losses: Tensor | None,
                     grad_x_hat: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(grad_x, grad_values, grad_W_dec, grad_b_dec) of the Triton walks. From the loss alone
    (the usual training step) S = grad_loss P, the suffix sums the forward saved, and the pass
    over the pairs takes grad_loss into its coefficients; grad_x = grad_loss P_0 is made only
    where x requires grad (a training step's activations do not: a [B, d] pass saved), and
    grad_b_dec = -grad_loss times the column sums of P_0. Under other upstream gradients the
    backward walks the forward again for the residuals R [G, B, d] (float32), makes S from them
    and frees R before the pass over the pairs allocates grad_W_dec."""
    x, values, indices, W_dec, b_dec, P = ctx.saved_tensors
    if grad_prefix_losses is None and grad_x_hat is None:
        grad_loss = grad_loss.to(values.dtype)
        grad_values, grad_W_dec = _nested_prefix_loss_pair_grads_triton(
            P, values * grad_loss, indices, W_dec, ctx.prefix_sizes)
        grad_x = P[0] * grad_loss if ctx.needs_input_grad[0] else None
        return grad_x, grad_values * grad_loss, grad_W_dec, -(P[0].sum(0) * grad_loss)
    if grad_loss is None:
        grad_loss = x.new_zeros(())
    if grad_prefix_losses is None:
        grad_prefix_losses = x.new_zeros(len(ctx.prefix_sizes))
    from sparsecode.triton_kernels.nested_prefix_loss import tensor_core_ops

    if tensor_core_ops(x, values.shape[1], len(ctx.prefix_sizes)) is not None:
        S, grad_x, grad_b_dec = _nested_prefix_loss_suffix_tensor_cores(
            grad_loss, grad_prefix_losses, grad_x_hat, x, values, indices, W_dec, b_dec,
            ctx.prefix_sizes, ctx.prefix_weights)
    else:
        R = _nested_prefix_loss_residuals_triton(x, values, indices, W_dec, b_dec,
                                                 ctx.prefix_sizes)
        S, grad_x, grad_b_dec = _nested_prefix_loss_suffix_triton(
            grad_loss, grad_prefix_losses, grad_x_hat, values, indices, W_dec, ctx.prefix_sizes,
            ctx.prefix_weights, R)
        _free(R)  # the backward's largest tensor: gone before grad_W_dec is made
    grad_values, grad_W_dec = _nested_prefix_loss_pair_grads_triton(
        S, values, indices, W_dec, ctx.prefix_sizes)
    return grad_x, grad_values, grad_W_dec, grad_b_dec


def _backward(ctx, grad_loss: Tensor | None, grad_prefix_losses: Tensor | None,
              grad_x_hat: Tensor | None, _grad_resid: Tensor | None):
    x, values, indices, W_dec, b_dec, resid = ctx.saved_tensors
    if _walks_in_triton(x, ctx.backend):
        grad_x, grad_values, grad_W_dec, grad_b_dec = _triton_backward(
            ctx, grad_loss, grad_prefix_losses, grad_x_hat)
    else:
        if grad_loss is None:
            grad_loss = x.new_zeros(())
        if grad_prefix_losses is None:
            grad_prefix_losses = x.new_zeros(len(ctx.prefix_sizes))
        grad_x, grad_values, grad_W_dec, grad_b_dec = _nested_prefix_loss_backward(
            grad_loss, grad_prefix_losses, grad_x_hat, x, values, indices, W_dec, b_dec,
            ctx.prefix_sizes, ctx.prefix_weights, resid, ctx.backend)
    return grad_x, grad_values, None, grad_W_dec, grad_b_dec, None, None, None, None


_nested_prefix_loss.register_autograd(_backward, setup_context=_setup_context)


def nested_prefix_loss_and_decode(
    x: Tensor,
    values: Tensor,
    indices: Tensor,
    W_dec: Tensor,
    b_dec: Tensor,
    prefix_sizes: Sequence[int],
    prefix_weights: Sequence[float],
    *,
    backend: str = "auto",
) -> tuple[Tensor, Tensor, Tensor]:
    """loss [], prefix_losses [G] and the full reconstruction x_hat [B, d], in one pass.

    Differentiable in x, values, W_dec and b_dec (through all three outputs).
    """
    name = resolve_backend(backend, x.device)
    sizes = [int(m) for m in prefix_sizes]
    weights = [float(w) for w in prefix_weights]
    if _runs_as_reference(x, name):
        loss, prefix_losses = reference.nested_prefix_loss(
            x, values, indices, W_dec, b_dec, sizes, weights
        )
        return loss, prefix_losses, reference.sparse_decode(values, indices, W_dec, b_dec)
    # The triton forward makes the suffix sums of a backward only where one can follow.
    suffix_sums = torch.is_grad_enabled() and any(
        t.requires_grad for t in (x, values, W_dec, b_dec))
    loss, prefix_losses, x_hat, _ = _nested_prefix_loss(x, values, indices, W_dec, b_dec, sizes,
                                                        weights, name, suffix_sums)
    return loss, prefix_losses, x_hat


def nested_prefix_loss(
    x: Tensor,
    values: Tensor,
    indices: Tensor,
    W_dec: Tensor,
    b_dec: Tensor,
    prefix_sizes: Sequence[int],
    prefix_weights: Sequence[float],
    *,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """loss [] and prefix_losses [G] of the Matryoshka objective for the code (values, indices).

    Differentiable in x, values, W_dec and b_dec.
    """
    name = resolve_backend(backend, x.device)
    if _runs_as_reference(x, name):
        return reference.nested_prefix_loss(
            x, values, indices, W_dec, b_dec, prefix_sizes, prefix_weights
        )
    loss, prefix_losses, _ = nested_prefix_loss_and_decode(
        x, values, indices, W_dec, b_dec, prefix_sizes, prefix_weights, backend=name
    )
    return loss, prefix_losses
