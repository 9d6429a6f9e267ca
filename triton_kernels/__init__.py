"""Triton kernels of sparsecode, shipped inside the wheel as ``sparsecode.triton_kernels``.

One file per kernel, for CUDA tensors: the fused TopK encode (``topk_encode``), the sparse
decode and its grad_values (``sparse_decode``), the nested-prefix loss forward and backward
(``nested_prefix_loss``), and the Adam step with float32 master weights (``master_adam``). On
CPU tensors they run only interpreted (``TRITON_INTERPRET=1``).
"""
