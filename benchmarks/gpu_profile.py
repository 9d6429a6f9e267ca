"""Where the GPU time goes: a kernel-by-kernel breakdown (torch.profiler) of the operations that
benchmarks/test_gpu.py times, at its problem size, for choosing what to speed up next.

    python benchmarks/gpu_profile.py > profile.txt

Each section profiles a few runs after warm-up and prints the kernels sorted by their total
device time (per-run figures: divide by the run count printed in the heading).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.profiler import ProfilerActivity, profile

import sparsecode
from sparsecode import ops, reference
from sparsecode.optim import MasterWeightAdam

BATCH, D_MODEL, D_SAE, K = 8192, 2304, 65536, 64
PREFIX_SIZES = (2048, 4096, 8192, 16384, 32768, 65536)
PREFIX_WEIGHTS = tuple(1 / len(PREFIX_SIZES) for _ in PREFIX_SIZES)
DTYPE = torch.bfloat16
RUNS = 5


def breakdown(title: str, fn: Callable[[], object]) -> None:
    """Prints the device kernels of RUNS calls of fn (after two warm-up calls)."""
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(RUNS):
            fn()
        torch.cuda.synchronize()
    print(f"\n=== {title} ({RUNS} runs)")
    print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=14,
                                    max_name_column_width=70))


def problem(dev: str, requires_grad: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """x [BATCH, D_MODEL] and the SAE's W_enc [D_MODEL, D_SAE], b_enc [D_SAE],
    W_dec [D_SAE, D_MODEL] and b_dec [D_MODEL], in DTYPE on dev, from seed 0: unit-norm decoder
    rows, W_enc their transpose, small biases. W_enc requires grad; the other weights when
    requires_grad."""
    torch.manual_seed(0)
    W_dec = torch.randn(D_SAE, D_MODEL, device=dev)
    W_dec /= W_dec.norm(dim=1, keepdim=True)
    W_enc = W_dec.T.contiguous().to(DTYPE).requires_grad_()
    W_dec = W_dec.to(DTYPE).requires_grad_(requires_grad)
    x = torch.randn(BATCH, D_MODEL, device=dev, dtype=DTYPE)
    b_enc = (0.01 * torch.randn(D_SAE, device=dev)).to(DTYPE).requires_grad_(requires_grad)
    b_dec = (0.01 * torch.randn(D_MODEL, device=dev)).to(DTYPE).requires_grad_(requires_grad)
    return x, W_enc, b_enc, W_dec, b_dec


def main() -> None:
    dev = "cuda"
    x, W_enc, b_enc, W_dec, b_dec = problem(dev, requires_grad=True)
    grad = torch.randn_like(x)
    with torch.no_grad():
        values, indices = reference.topk_encode(x, W_enc, b_enc, b_dec, K)
    values = values.requires_grad_()

    with torch.no_grad():
        breakdown("fused encode forward", lambda: ops.topk_encode(x, W_enc, b_enc, b_dec, K))
        # The cuda encode: its cuBLAS column chunks against its running top-k folds.
        breakdown("cuda encode forward (column chunks of cuBLAS, then the folds)",
                  lambda: ops.topk_encode(x, W_enc, b_enc, b_dec, K, backend="cuda"))

    def decode() -> object:
        x_hat = ops.sparse_decode(values, indices, W_dec, b_dec)
        return torch.autograd.grad(x_hat, (values, W_dec, b_dec), grad)

    breakdown("sparse decode fwd+bwd", decode)

    v, i = ops.topk_encode(x, W_enc, b_enc, b_dec, K)
    x_hat = ops.sparse_decode(v, i, W_dec, b_dec)
    leaves = (W_enc, b_enc, W_dec, b_dec)
    breakdown("encode+decode backward",
              lambda: torch.autograd.grad(x_hat, leaves, grad, retain_graph=True))
    del v, i, x_hat

    def nested(backend: str) -> Callable[[], object]:
        def run() -> object:
            loss, _ = ops.nested_prefix_loss(x, values, indices, W_dec, b_dec, PREFIX_SIZES,
                                             PREFIX_WEIGHTS, backend=backend)
            return torch.autograd.grad(loss, (values, W_dec, b_dec))
        return run

    breakdown("nested loss fwd+bwd, cuda", nested("cuda"))
    breakdown("nested loss fwd+bwd, triton (forward walk, walk-free backward)", nested("triton"))
    del W_enc, W_dec, b_enc, b_dec, values
    torch.cuda.empty_cache()

    sae = sparsecode.MatryoshkaSAE(D_MODEL, D_SAE, K, list(PREFIX_SIZES), device=dev).to(DTYPE)
    MasterWeightAdam(sae.parameters(), lr=1e-4, step_in_backward=True)
    breakdown("Matryoshka training step (Adam inside the backward)",
              lambda: sae(x).loss.backward())


if __name__ == "__main__":
    main()
