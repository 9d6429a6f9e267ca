"""One launch of each hot kernel at the GPU benchmark's size, for Nsight Compute (ncu) to say
what each waits on (warp stall reasons, issue-slot use, memory throughput):

    ncu --clock-control none --kernel-name regex:'_encode_kernel|...' python benchmarks/gpu_ncu.py

`gpu_check.sh ncu` runs it so. The Triton walks run at fixed pipelining depths (the ones the
autotuner picked on an H100), not under the autotuner, whose timing runs ncu would replay.
Kernels: the fused encode, the decode forward, the decode's per-latent sum with its dots
(latent_rows_sum_dots), the encode backward's transposed per-latent sum, the nested loss's
Triton forward walk (with its norms and the loss's own suffix sums) and, as a backward under
other upstream gradients than the loss's alone takes them, the suffix sums from the residuals;
the cuda encode's two folds over the first 4096 columns (topk_fold_kernel: the first chunk
selected at once, the second taken a column at a time);
then, with SPARSECODE_TENSOR_CORES=1, the same per-latent sums and the nested forward on the
tensor cores (latent_rows_sum_mma_kernel, nested_prefix_mma_kernel).
"""

from __future__ import annotations

import os

import torch

from gpu_profile import K, PREFIX_SIZES, PREFIX_WEIGHTS, problem
from sparsecode import ops, sparse_grad
from sparsecode.triton_kernels.nested_prefix_loss import (nested_prefix_loss_forward,
                                                          nested_prefix_loss_residuals,
                                                          nested_prefix_loss_suffix_sums)
from sparsecode.triton_kernels.sparse_decode import sparse_decode_forward
from sparsecode.triton_kernels.topk_encode import topk_encode_forward

DECODE_STAGES = 3  # picked for the decode on an H100 (RESULTS.md, 2026-11-27 16:31 UTC)
NESTED_STAGES = 1  # picked for the nested loss's earlier forward walk there


def main() -> None:
    dev = "cuda"
    x, W_enc, b_enc, W_dec, b_dec = problem(dev, requires_grad=False)
    with torch.no_grad():
        values, indices = topk_encode_forward(x, W_enc, b_enc, b_dec, K)
        sparse_decode_forward(values, indices, W_dec, b_dec, stages=DECODE_STAGES)
    for tensor_cores in ("0", "1"):
        os.environ["SPARSECODE_TENSOR_CORES"] = tensor_cores
        with torch.no_grad():
            sparse_grad.sparse_decode_grads(torch.randn_like(x), values, indices, W_dec)
        v, _ = ops.topk_encode(x, W_enc, b_enc, b_dec, K, backend="triton")
        torch.autograd.grad(v, (W_enc,), torch.randn_like(v))
        with torch.no_grad():
            nested_prefix_loss_forward(x, values, indices, W_dec, b_dec, PREFIX_SIZES,
                                       PREFIX_WEIGHTS, stages=NESTED_STAGES)
    with torch.no_grad():
        resid = nested_prefix_loss_residuals(x, values, indices, W_dec, b_dec, PREFIX_SIZES,
                                             stages=NESTED_STAGES)
        nested_prefix_loss_suffix_sums(
            torch.ones((), device=dev), torch.zeros(len(PREFIX_SIZES), device=dev), None,
            values, indices, W_dec, PREFIX_SIZES, PREFIX_WEIGHTS, resid)
        # The cuda encode over the first 4096 columns: two chunks of 2048, so two folds of
        # topk_select.cu, the first chunk's selection and a later chunk's insertions.
        columns = slice(0, 4096)
        ops.topk_encode(x, W_enc[:, columns].contiguous(), b_enc[columns].contiguous(), b_dec, K,
                        backend="cuda")
    torch.cuda.synchronize()
    print("launched every kernel once")


if __name__ == "__main__":
    main()
