"""Triton kernels for training on GPU (the CUDA backend of wrinklefree.ops)."""
