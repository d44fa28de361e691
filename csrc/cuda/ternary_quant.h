// Host entry point of the absmean ternary quantizer (no CUDA header, like act_quant.h).
#pragma once

#include <cstdint>

namespace wf::cuda {

// Doubles of workspace ternary_quant needs for n elements: the partial sums of every level of the
// pairwise tree, ceil(n / 1024) + ceil(n / 1024^2) + ... + 1 (1 for n <= 1024). Throws
// std::invalid_argument for n <= 0.
int64_t ternary_quant_workspace(int64_t n);

// Absmean ternary quantization (DESIGN.md section 2), bit-exact with
// wrinklefree.ops.reference.ternary_quant and the CPU core:
//   w          n contiguous elements, dtype code 0 (float32), 1 (bfloat16) or 2 (float16)
//   codes      int8 [n], clamp(rint(w * inv), -1, 1)
//   scale      float32 [1], s = max(float32(total / n), 1e-5), inv = 1.0f / s
//   workspace  float64 [workspace_len], workspace_len >= ternary_quant_workspace(n)
// where total is the float64 pairwise sum of |w| (reference.pairwise_sum). Everything stays on
// CUDA device `device`: the kernels are enqueued on `stream`, s is computed on the device and the
// call returns without synchronizing. Errors as act_quant_int8.
void ternary_quant(const void* w, int dtype, int64_t n, int8_t* codes, float* scale, double* workspace,
                   int64_t workspace_len, int device, uintptr_t stream);

}  // namespace wf::cuda
