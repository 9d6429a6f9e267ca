"""Triton kernels of sparsecode, shipped inside the wheel as ``sparsecode.triton_kernels``.

One file per kernel, for CUDA tensors: the fused TopK encode (``topk_encode``), the sparse
decode and its grad_values (``sparse_decode``), the nested-prefix loss forward and backward
(``nested_prefix_loss``), and the Adam step with float32 master weights (``master_adam``). On
CPU tensors they run only interpreted (``TRITON_INTERPRET=1``).
"""

import os


def sort_rows(width: int) -> int:
    """Rows per program of a kernel that tl.sorts rows of `width` (a power of two) elements:
    about 4096 elements, or 64 under the CPU interpreter, whose tl.sort is a Python network."""
    cap = 64 if os.environ.get("TRITON_INTERPRET") == "1" else 4096
    return max(1, cap // width)
