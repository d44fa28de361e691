"""Compiles the Triton kernels to PTX for the given architectures and prints a JSON map
name -> {arch: ptx}. Run in a process without TRITON_INTERPRET (tests/test_triton.py does), since
interpreted kernels cannot be compiled. No GPU is needed: Triton compiles for a named target."""

from __future__ import annotations

import json
import sys

import triton
from triton.backends.compiler import GPUTarget

from wrinklefree.triton_kernels import bitlinear as tb
from wrinklefree.triton_kernels import glu as tg
from wrinklefree.triton_kernels import quant as tq

P = "*fp32"
# name -> (kernel, signature, constexprs, launched with the exact options)
KERNELS = {
    "act_quant": (tq._act_quant_kernel, {"x_ptr": "*bf16", "q_ptr": "*i8", "scale_ptr": P, "K": "i32"},
                  {"BLOCK": 1024, "FLOOR": 1e-5}, True),
    "rmsnorm_quant": (tq._rmsnorm_quant_kernel, {"x_ptr": "*bf16", "w_ptr": P, "q_ptr": "*i8", "scale_ptr": P,
                      "inv_ptr": P, "K": "i32", "eps": "fp32"},
                      {"BLOCK": 4096, "LOG2_BLOCK": 12, "NCHUNK": 2, "LOG2_NCHUNK": 1, "FLOOR": 1e-5}, True),
    "rmsnorm_backward": (tq._rmsnorm_backward_kernel, {"dh_ptr": P, "x_ptr": "*bf16", "w_ptr": P, "inv_ptr": P,
                         "dx_ptr": "*bf16", "dw_ptr": P, "N": "i32", "K": "i32"}, {"BLOCK": 4096}, False),
    "abs_block_sum": (tq._abs_block_sum_kernel, {"w_ptr": "*bf16", "out_ptr": "*fp64", "n": "i32"},
                      {"CHUNK": 1024, "LOG2": 10}, True),
    "block_sum": (tq._block_sum_kernel, {"in_ptr": "*fp64", "out_ptr": "*fp64", "n": "i32"},
                  {"CHUNK": 1024, "LOG2": 10}, True),
    "ternary_codes": (tq._ternary_codes_kernel, {"w_ptr": "*bf16", "total_ptr": "*fp64", "codes_ptr": "*i8",
                      "scale_ptr": P, "n": "i32"}, {"BLOCK": 4096, "FLOOR": 1e-5}, True),
    "bitlinear_forward": (tb._forward_kernel, {"q_ptr": "*i8", "c_ptr": "*i8", "xs_ptr": P, "ws_ptr": P, "y_ptr": P,
                          "N": "i32", "M": "i32", "K": "i32"}, {"BM": 128, "BN": 128, "BK": 128, "GROUP": 8}, True),
    "grad_input": (tb._grad_input_kernel, {"dy_ptr": "*bf16", "c_ptr": "*i8", "ws_ptr": P, "dx_ptr": P, "N": "i32",
                   "M": "i32", "K": "i32"},
                   {"BM": 128, "BN": 128, "BK": 64, "GROUP": 8, "PRECISION": "tf32", "INTERPRET": False}, False),
    "grad_weight": (tb._grad_weight_kernel, {"dy_ptr": "*bf16", "q_ptr": "*i8", "xs_ptr": P, "dw_ptr": P, "N": "i32",
                    "M": "i32", "K": "i32"},
                    {"BM": 128, "BN": 128, "BK": 64, "GROUP": 8, "PRECISION": "tf32", "INTERPRET": False}, False),
    "relu2_glu": (tg._relu2_glu_kernel, {"g_ptr": "*bf16", "u_ptr": "*bf16", "out_ptr": "*bf16", "n": "i32"},
                  {"BLOCK": 2048}, False),
    "relu2_glu_backward": (tg._relu2_glu_backward_kernel, {"dh_ptr": "*bf16", "g_ptr": "*bf16", "u_ptr": "*bf16",
                           "dg_ptr": "*bf16", "du_ptr": "*bf16", "n": "i32"}, {"BLOCK": 2048}, False),
}  # fmt: skip


def compile_ptx(name: str, arch: int) -> str:
    kernel, signature, constexprs, exact = KERNELS[name]
    src = triton.compiler.ASTSource(fn=kernel, signature={**signature, **dict.fromkeys(constexprs, "constexpr")},
                                    constexprs=constexprs)  # fmt: skip
    options = {"enable_fp_fusion": False} if exact else {}
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options).asm["ptx"]


if __name__ == "__main__":
    archs = [int(a) for a in sys.argv[1:]] or [80, 90]
    out = {name: {"exact": KERNELS[name][3], "ptx": {str(a): compile_ptx(name, a) for a in archs}} for name in KERNELS}
    json.dump(out, sys.stdout)
