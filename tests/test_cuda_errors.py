"""The cuda backend's argument checks: each bad argument raises a RuntimeError naming it.

Kept apart from tests/test_cuda_ops.py, and run by benchmarks/gpu_check.sh as a pytest run of
its own, so that a crash cannot take the other GPU tests down: on a lent H100 (2026-11-26),
built by a compiler driver that linked libstdc++ statically, these error paths crashed the
process (SIGSEGV) whenever a message formatted a number (see tests/test_extension_build.py).
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tests.test_cuda_ops import random_code

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_bad_arguments_are_named():
    C = torch.ops.sparsecode_C
    values, indices = random_code(2, 10, 3, torch.float32)
    W_dec, b_dec = torch.randn(10, 4, device="cuda"), torch.zeros(4, device="cuda")
    bad = indices.clone()
    bad[1, 2] = 10
    with pytest.raises(RuntimeError, match=r"indices must lie in \[0, d_sae=10\)"):
        C.sparse_decode_forward(values, bad, W_dec, b_dec)
    with pytest.raises(RuntimeError, match="W_dec must be a CUDA tensor"):
        C.sparse_decode_forward(values, indices, W_dec.cpu(), b_dec)
    with pytest.raises(RuntimeError, match="values must be a CUDA tensor"):
        C.sparse_decode_forward(values.cpu(), indices, W_dec, b_dec)
    with pytest.raises(RuntimeError, match="indices must be an int64 tensor on cuda"):
        C.sparse_decode_forward(values, indices.int(), W_dec, b_dec)
    with pytest.raises(RuntimeError, match="same dtype"):
        C.sparse_decode_forward(values.double(), indices, W_dec, b_dec)
    x = torch.randn(2, 4, device="cuda")
    with pytest.raises(RuntimeError, match="strictly increasing"):
        C.nested_prefix_loss_forward(x, values, indices, W_dec, b_dec, [5, 5, 10], [1.0] * 3)
    values, indices = random_code(2, 40, 3, torch.float32)
    W_dec = torch.randn(40, 4, device="cuda")
    with pytest.raises(RuntimeError, match="at most 16 prefix sizes"):
        C.nested_prefix_loss_forward(x, values, indices, W_dec, b_dec, list(range(21, 41)),
                                     [1.0] * 20)


def test_backward_ops_assert_the_index_range_on_the_device():
    """The backward ops and the latent sums check the index range without waiting for the host:
    a bad index fails a device-side assertion, which ends the process's CUDA work (so this runs
    in a child process) instead of reading outside the weights."""
    code = (
        "import torch, sparsecode\n"
        "C = torch.ops.sparsecode_C\n"
        "coef, src = torch.randn(2, 3, device='cuda'), torch.randn(2, 4, device='cuda')\n"
        "bad = torch.tensor([[0, 1, 2], [3, 4, 10]], device='cuda')\n"
        "out = C.latent_rows_sum_dots(coef, bad, src, torch.randn(10, 4, device='cuda'))\n"
        "torch.cuda.synchronize()\n"
        "print('no error')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode != 0 and "no error" not in result.stdout, result.stdout
    assert "device-side assert" in result.stderr, result.stderr[-2000:]
