"""MasterWeightAdam against torch.optim.Adam run on float32 copies of the same weights and
gradients: its float32 master must follow torch's Adam, and the parameter must be the master
rounded to the parameter's dtype. The Triton step runs interpreted here (TRITON_INTERPRET=1,
set by conftest), where a float32 -> bfloat16 conversion truncates instead of rounding to
nearest, so interpreted bfloat16 parameters are checked to one bfloat16 step of the master;
tests/test_triton_gpu.py checks the compiled kernel's rounding exactly.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

import sparsecode
from sparsecode import optim
from sparsecode.optim import MasterWeightAdam
from tests.conftest import assert_close

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(1,), (37, 13), (3, 5, 7)]
# The Triton step runs on CPU tensors only interpreted, which conftest sets up without a GPU.
INTERPRETED = importlib.util.find_spec("triton") is not None and not torch.cuda.is_available()
BACKENDS = ["reference"] + (["triton"] if INTERPRETED else [])


def run_both(shape, dtype, backend, steps=4, lr=1e-2, device="cpu"):
    """(param, its MasterWeightAdam, torch Adam on a float32 copy) after `steps` steps on the
    same random gradients, with the learning rate changed by a LambdaLR schedule."""
    param = torch.randn(shape, device=device).to(dtype).requires_grad_()
    expected = param.detach().float().requires_grad_()
    opt = MasterWeightAdam([param], lr=lr, betas=(0.8, 0.95), eps=1e-6, backend=backend)
    torch_opt = torch.optim.Adam([expected], lr=lr, betas=(0.8, 0.95), eps=1e-6)
    schedules = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1 / (s + 1))
                 for o in (opt, torch_opt)]
    for _ in range(steps):
        grad = torch.randn(shape, device=device).to(dtype)
        param.grad, expected.grad = grad, grad.float()
        opt.step()
        torch_opt.step()
        for schedule in schedules:
            schedule.step()
    return param, opt, torch_opt


def close_elementwise(out: torch.Tensor, ref: torch.Tensor, name: str) -> None:
    """Equal to float32 rounding of O(1) terms: |out - ref| <= 1e-6 + 1e-5 |ref| per element (a
    relative bound alone fails where a moment is a near-cancelling sum, whose two formulas,
    torch's lerp and b1 m + (1 - b1) g, round differently)."""
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


def check_rounded(param, master, interpreted_bf16: bool) -> None:
    """param is master rounded to param's dtype (to one step when the interpreter truncated)."""
    if interpreted_bf16:
        step = 2.0 ** (torch.frexp(master)[1] - 8)
        assert ((param.detach().float() - master).abs() <= step).all()
    else:
        assert torch.equal(param.detach(), master.to(param.dtype))


def check_against_torch(shape, dtype, backend, device="cpu"):
    param, opt, torch_opt = run_both(shape, dtype, backend, device=device)
    (expected,) = torch_opt.param_groups[0]["params"]
    state, torch_state = opt.state[param], torch_opt.state[expected]
    assert set(state) == {"step", "exp_avg", "exp_avg_sq"} | (
        {"master"} if dtype != torch.float32 else set())
    assert state["step"] == 4
    for name in ("exp_avg", "exp_avg_sq"):
        assert state[name].dtype == torch.float32
        close_elementwise(state[name], torch_state[name], name)
    close_elementwise(opt.master(param), expected, "master")
    check_rounded(param, opt.master(param),
                  interpreted_bf16=device == "cpu" and backend == "triton"
                  and dtype == torch.bfloat16)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_torch_adam(shape, dtype, backend, seed):
    check_against_torch(shape, dtype, backend)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES + [(65536, 2304)])
def test_matches_torch_adam_gpu(shape, dtype, backend, seed):
    """The compiled Triton step (and the torch-op step) on CUDA tensors, up to the benchmark's
    decoder shape; bfloat16 parameters are the master rounded to nearest, exactly."""
    check_against_torch(shape, dtype, backend, device="cuda")


def test_torch_step_chunks(monkeypatch, seed):
    """The torch-op step walks a parameter in chunks; one of 481 elements in chunks of 100 (the
    last one short) gives what one chunk does."""
    torch.manual_seed(seed)
    whole = run_both((37, 13), torch.bfloat16, "reference")
    monkeypatch.setattr(optim, "_CHUNK", 100)
    torch.manual_seed(seed)
    chunked = run_both((37, 13), torch.bfloat16, "reference")
    assert torch.equal(whole[0], chunked[0])
    assert torch.equal(whole[1].master(whole[0]), chunked[1].master(chunked[0]))


def make_sae() -> sparsecode.MatryoshkaSAE:
    torch.manual_seed(0)
    return sparsecode.MatryoshkaSAE(24, 40, 4, [10, 40]).to(torch.bfloat16)


def train(sae, opt, batches) -> None:
    for x in batches:
        sae(x).loss.backward()
        opt.step()
        opt.zero_grad()


def test_step_in_backward_equals_step(seed):
    """Stepping each weight as its gradient lands gives the same weights as stepping after the
    backward, and leaves no gradient behind."""
    batches = [torch.randn(16, 24).bfloat16() for _ in range(3)]
    after, during = make_sae(), make_sae()
    train(after, MasterWeightAdam(after.parameters(), lr=1e-2), batches)
    opt = MasterWeightAdam(during.parameters(), lr=1e-2, step_in_backward=True)
    for x in batches:
        during(x).loss.backward()
        assert all(p.grad is None for p in during.parameters())
    for a, b in zip(after.parameters(), during.parameters()):
        assert torch.equal(a, b)
    assert all(opt.state[p]["step"] == 3 for p in during.parameters())


def test_state_dict_resumes_exactly(tmp_path, seed):
    """A run saved and loaded (torch.save of both state dicts) after two steps ends where an
    uninterrupted run ends; the loaded state stays float32."""
    batches = [torch.randn(16, 24).bfloat16() for _ in range(4)]
    whole = make_sae()
    train(whole, MasterWeightAdam(whole.parameters(), lr=1e-2), batches)

    first = make_sae()
    opt = MasterWeightAdam(first.parameters(), lr=1e-2)
    train(first, opt, batches[:2])
    torch.save({"sae": first.state_dict(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    resumed = make_sae()
    resumed.load_state_dict(saved["sae"])
    opt = MasterWeightAdam(resumed.parameters(), lr=1e-2)
    opt.load_state_dict(saved["opt"])
    assert all(opt.state[p]["master"].dtype == torch.float32 for p in resumed.parameters())
    train(resumed, opt, batches[2:])
    for a, b in zip(whole.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_bad_input():
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        MasterWeightAdam([torch.zeros(3, dtype=torch.float64, requires_grad=True)])
    with pytest.raises(ValueError, match="contiguous"):
        MasterWeightAdam([torch.zeros(4, 3).t().requires_grad_()])
    with pytest.raises(ValueError, match="lr"):
        MasterWeightAdam([torch.zeros(3, requires_grad=True)], lr=-1.0)
    with pytest.raises(ValueError, match="betas"):
        MasterWeightAdam([torch.zeros(3, requires_grad=True)], betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="backend must be one of"):
        MasterWeightAdam([torch.zeros(3, requires_grad=True)], backend="fast")
    with pytest.raises(ValueError, match="pass step_in_backward=True too"):
        MasterWeightAdam([torch.zeros(3, requires_grad=True)], side_stream=True)
    with pytest.raises(ValueError, match="side_stream=True needs CUDA parameters, got one on cpu"):
        MasterWeightAdam([torch.zeros(3, requires_grad=True)], step_in_backward=True,
                         side_stream=True)
    param = torch.zeros(3, dtype=torch.bfloat16, requires_grad=True)
    opt = MasterWeightAdam([param])
    with pytest.raises(ValueError, match="not one this optimiser steps"):
        opt.master(torch.zeros(3))
    param.grad = torch.zeros(3, dtype=torch.bfloat16).to_sparse()
    with pytest.raises(TypeError, match="dense gradients"):
        opt.step()
