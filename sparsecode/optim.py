"""Adam for SAEs whose weights are kept in bfloat16 or float16, with float32 master weights.

Training in bfloat16 usually keeps float32 parameters and casts them to bfloat16 inside every
step: the casts cost a pass over the weights each way, and the float32 gradients (4 bytes per
weight) are alive at once at the end of the backward. :class:`MasterWeightAdam` instead lets
the module hold its weights in bfloat16 (so the forward and backward run on them as they are,
and the gradients are bfloat16) and keeps a float32 master copy of each weight in the optimiser
state next to Adam's two moments. A step reads each gradient in its own dtype, updates the
master and the moments in float32 (the arithmetic of torch's fused Adam) and writes the rounded
master back into the parameter. On CUDA tensors the step is one Triton kernel per parameter
(``sparsecode.triton_kernels.master_adam``), which makes no float32 copy of anything;
elsewhere it is torch ops over chunks of 2^20 elements, whose float32 temporaries are that
small.

``step_in_backward=True`` also steps each parameter the moment its gradient has been
accumulated in the backward and frees that gradient, so that at most one weight's gradient is
alive at a time (the optimiser-in-backward technique). It cannot be combined with gradient
accumulation over several backwards, gradient clipping, edits of the gradients before the step,
or DistributedDataParallel; ``step()`` then only steps parameters whose gradients are still set.
With ``side_stream=True`` (CUDA) those steps run on a second CUDA stream, after the work queued
so far, so that a weight's step overlaps the rest of the backward (in an SAE, the decoder's step
runs while the encoder's backward does: the one is bound by memory traffic, the other by
instruction issue); the backward's end makes the caller's stream wait for them, without making
the host wait. On an H200 that changed a Matryoshka training step by about 1 % (10.27 against
10.39 ms at B = 8192, d_sae = 65536; benchmarks/RESULTS.md), with the same weights bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from itertools import chain
from typing import Any

import torch
from torch import Tensor

from sparsecode.backends import resolve_backend

_CHUNK = 1 << 20  # elements per torch-op pass of the fallback step
_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


class MasterWeightAdam(torch.optim.Optimizer):
    """Adam (no weight decay) with float32 state and float32 master weights.

    params: tensors of float32, bfloat16 or float16, contiguous; a float32 parameter is its own
    master. lr, betas, eps: as torch.optim.Adam. backend: "auto" runs the Triton kernel on CUDA
    tensors where Triton is installed; "triton" asks for it (CPU tensors only under
    TRITON_INTERPRET=1); any other backend name runs the torch-op step. step_in_backward,
    side_stream: see the module docstring. Its state per parameter: step (int), exp_avg,
    exp_avg_sq and, for a parameter that is not float32, master, each float32 of the
    parameter's shape.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        *,
        backend: str = "auto",
        step_in_backward: bool = False,
        side_stream: bool = False,
    ) -> None:
        if not (lr >= 0 and math.isfinite(lr)):
            raise ValueError(f"lr must be a non-negative number, got {lr}")
        if not all(0 <= beta < 1 for beta in betas) or len(betas) != 2:
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas}")
        if not eps >= 0:
            raise ValueError(f"eps must be non-negative, got {eps}")
        if side_stream and not step_in_backward:
            raise ValueError("side_stream=True runs the steps that step_in_backward=True takes "
                             "in the backward; pass step_in_backward=True too")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps})
        self.backend = backend
        # The side stream of each device (side_stream=True), and whether this backward's end
        # already has the callback that makes the caller's streams wait for them.
        self._sides: dict[torch.device, torch.cuda.Stream] | None = {} if side_stream else None
        self._rejoin_queued = False
        for param in self._params():
            if param.dtype not in _FLOATS:
                raise TypeError(f"MasterWeightAdam takes float32, bfloat16 or float16 "
                                f"parameters, got one of {param.dtype} {list(param.shape)}")
            if not param.is_contiguous():
                raise ValueError(f"MasterWeightAdam needs contiguous parameters, got one of "
                                 f"shape {list(param.shape)}: make it contiguous first")
            resolve_backend(backend, param.device)
            if side_stream and param.device.type != "cuda":
                raise ValueError(f"side_stream=True needs CUDA parameters, got one on "
                                 f"{param.device}; leave side_stream off there")
            if step_in_backward:
                param.register_post_accumulate_grad_hook(self._step_in_backward)

    def _params(self) -> Iterable[Tensor]:
        return chain.from_iterable(group["params"] for group in self.param_groups)

    def _group_of(self, param: Tensor) -> dict[str, Any]:
        return next(group for group in self.param_groups
                    if any(p is param for p in group["params"]))

    @torch.no_grad()
    def _step_in_backward(self, param: Tensor) -> None:
        group = self._group_of(param)
        if self._sides is None:
            self._step_param(param, group)
        else:
            side = self._sides.get(param.device)
            if side is None:
                side = self._sides[param.device] = torch.cuda.Stream(param.device)
            side.wait_stream(torch.cuda.current_stream(param.device))
            with torch.cuda.stream(side):
                self._step_param(param, group)
            param.grad.record_stream(side)  # not reused before the step has read it
            if not self._rejoin_queued:
                self._rejoin_queued = True
                torch.autograd.Variable._execution_engine.queue_callback(self._rejoin)
        param.grad = None

    def _rejoin(self) -> None:
        """At the backward's end: the caller's stream of each device waits for the steps."""
        for device, side in self._sides.items():
            torch.cuda.current_stream(device).wait_stream(side)
        self._rejoin_queued = False

    @torch.no_grad()
    def step(self, closure: Any = None) -> Tensor | None:  # type: ignore[override]
        """One Adam step of every parameter whose .grad is set. Returns closure's loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    self._step_param(param, group)
        return loss

    def _step_param(self, param: Tensor, group: dict[str, Any]) -> None:
        grad = param.grad
        if grad.layout != torch.strided:
            raise TypeError(f"MasterWeightAdam needs dense gradients, got a {grad.layout} one "
                            f"for a parameter of shape {list(param.shape)}")
        state = self._state(param)
        state["step"] += 1
        beta1, beta2 = group["betas"]
        step_size = group["lr"] / (1 - beta1 ** state["step"])
        bc2_sqrt = math.sqrt(1 - beta2 ** state["step"])
        args = (param.detach(), grad.contiguous(), state.get("master"), state["exp_avg"],
                state["exp_avg_sq"], step_size, beta1, beta2, group["eps"], bc2_sqrt)
        if resolve_backend(self.backend, param.device) == "triton":
            from sparsecode.triton_kernels.master_adam import master_adam_step

            master_adam_step(*args)
        else:
            _torch_step(*args)

    def _state(self, param: Tensor) -> dict[str, Any]:
        """param's state, made (step 0, zero moments, master = param) on first use."""
        state = self.state[param]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(param, dtype=torch.float32)
            state["exp_avg_sq"] = torch.zeros_like(param, dtype=torch.float32)
            if param.dtype != torch.float32:
                state["master"] = param.detach().float()
        return state

    def master(self, param: Tensor) -> Tensor:
        """The float32 weights behind param, shaped like it (param itself when it is float32).
        To change a weight between steps, change its master in place, then param.copy_(it)."""
        if not any(p is param for p in self._params()):
            raise ValueError(f"the parameter of shape {list(param.shape)} is not one this "
                             "optimiser steps")
        return self._state(param).get("master", param.detach())

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As torch.optim.Optimizer's, but keeps the float32 state in float32 (the base class
        casts floating-point state to each parameter's dtype)."""
        super().load_state_dict(state_dict)
        saved_ids = chain.from_iterable(group["params"] for group in state_dict["param_groups"])
        for saved_id, param in zip(saved_ids, self._params()):
            if saved_id in state_dict["state"]:
                self.state[param] = {
                    key: value.to(param.device, copy=True) if isinstance(value, Tensor) else value
                    for key, value in state_dict["state"][saved_id].items()
                }


def _torch_step(
    param: Tensor, grad: Tensor, master: Tensor | None, exp_avg: Tensor, exp_avg_sq: Tensor,
    step_size: float, beta1: float, beta2: float, eps: float, bc2_sqrt: float,
) -> None:
    """master_adam_step's arithmetic in torch ops, _CHUNK elements at a time (so the float32
    temporaries stay small), then the updated master rounded into param."""
    target = param if master is None else master
    g_all, m_all, v_all, t_all = (t.view(-1) for t in (grad, exp_avg, exp_avg_sq, target))
    for start in range(0, param.numel(), _CHUNK):
        chunk = slice(start, start + _CHUNK)
        g, m, v = g_all[chunk].float(), m_all[chunk], v_all[chunk]
        m.mul_(beta1).add_(g, alpha=1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        t_all[chunk].addcdiv_(m, v.sqrt().div_(bc2_sqrt).add_(eps), value=-step_size)
    if master is not None:
        param.copy_(master)
