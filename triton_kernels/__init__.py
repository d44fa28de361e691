"""Triton kernels for training on GPU, installed as ``wrinklefree.triton_kernels``.

They will be the CUDA backend of the ops in :mod:`wrinklefree.ops` (act quant, ternary quant,
fused RMSNorm + act quant, BitLinear forward/backward); none has landed yet, so CUDA tensors run
the compiled ``wrinklefree._C_cuda`` kernels where they exist and the PyTorch references elsewhere.
"""
