// Host entry point of the I2_S matmul kernels (no CUDA header, like act_quant.h): pointers are
// device addresses, the stream a cudaStream_t carried as an integer.
#pragma once

#include <cstdint>

namespace wf::cuda {

// Largest K the int32 accumulators take: |sum_k (code - 1) * q| <= 128 K < 2^31.
constexpr int64_t kI2SMaxK = int64_t(1) << 23;

// int8 activations times packed I2_S weights (DESIGN.md section 3), bit-exact with
// wrinklefree.ops.reference.i2s_matmul and the CPU core:
//   q        int8 [N, K] row-major, K a multiple of 128
//   x_scale  float32 [N]
//   packed   uint8 [M*K/4 + 32]: the bitnet.cpp I2_S bytes, the float32 weight scale after the codes
//   out      float32 [N, M] row-major, out[n, m] = float(D - S) / x_scale[n] * w_scale with
//            D - S = sum_k (code[m, k] - 1) * q[n, k] exact in int32
// N <= 8 takes the decode kernel (a GEMV streaming the weights), larger N the prefill kernel
// (int8 tensor-core tiles). Enqueued on `stream` of CUDA device `device`, no synchronization.
// Throws std::invalid_argument for bad arguments (before any CUDA call) and std::runtime_error
// for CUDA errors.
void i2s_matmul(const int8_t* q, const float* x_scale, int64_t N, int64_t K, const uint8_t* packed,
                int64_t packed_nbytes, int64_t M, float* out, int device, uintptr_t stream);

}  // namespace wf::cuda
