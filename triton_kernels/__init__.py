"""Triton kernels for training on GPU, installed as ``wrinklefree.triton_kernels``.

They are the CUDA backend of the ops in :mod:`wrinklefree.ops` (which import them only where
Triton is installed and a CUDA tensor arrives), and they run on CPU tensors under
``TRITON_INTERPRET=1``, which is how the CPU test suite checks them against the references:

    quant.act_quant_int8      per-row absmax int8
    quant.ternary_quant       absmean ternary, the mean reduced on the device (no host sync)
    quant.rmsnorm_act_quant   fused RMSNorm + int8 (returns inv_rms for the backward)
    quant.rmsnorm_backward    the RMSNorm's backward given the gradient of its output
    glu.relu2_glu(_backward)  relu(gate)^2 * up, forward and backward
    bitlinear.forward         int8 x ternary int8 on tensor cores, scales in the epilogue
    bitlinear.grad_input      dy @ (codes * s_w)
    bitlinear.grad_weight     dy^T @ (q / s_x)
"""
