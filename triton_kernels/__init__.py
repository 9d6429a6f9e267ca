"""Triton kernels of sparsecode, shipped inside the wheel as ``sparsecode.triton_kernels``.

The fused TopK encode and sparse decode kernels for CUDA tensors live here, one file per
kernel; this package is empty until they land, and ``sparsecode.backends()`` reports the
``triton`` backend as unavailable.
"""
