// Absmean ternary quantization on NVIDIA GPUs, entirely on the device (no host round trip).
//
// The mean |w| must be the float64 pairwise sum of wrinklefree.ops.reference.pairwise_sum: the
// sequence padded with zeros to a power of two, S(v) = S(first half) + S(second half). Adding +0.0
// changes nothing (every term is >= 0 or NaN), so the tree splits into power-of-two pieces that
// are summed on their own:
//  1. abs_chunk_sums: one block of 256 threads per chunk of 1024 elements (the last one padded
//     with zeros). Thread t holds elements 4t..4t+3 and sums them as (a0 + a1) + (a2 + a3), the
//     two lowest levels of the tree; shuffles down by 1, 2, 4, 8, 16 lanes add neighbouring
//     subtrees of equal size (the next five levels, lane 0 of each warp ending with 128
//     elements); warp 0 does the last three levels over the 8 warp sums. Chunk sums go to the
//     workspace.
//  2. pairwise_sums: the same tree over groups of 1024 chunk sums (padded with zeros), level
//     after level of the workspace, until one value is left (one pass up to 2^20 chunks, two up
//     to 2^30, ...).
//  3. ternary_codes: every thread reads that total, computes s = max(float32(total / n), 1e-5)
//     and inv = 1 / s (IEEE float64 division, correctly rounded conversion, IEEE float32
//     division), block 0 stores s, and all write codes = clamp(rint(w * inv), -1, 1).
// All float64 additions are __dadd_rn and the float32 product __fmul_rn: nothing is contracted.
// Non-finite values as in the reference and the CPU core: a NaN total gives a NaN scale
// (max(NaN, 1e-5) keeps the NaN, as std::max does), an inf one an inf scale, and then every code
// is 0 (inv is NaN or 0).
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <string>

#include "common.cuh"
#include "ternary_quant.h"

namespace wf::cuda {
namespace {

constexpr const char* kOp = "ternary_quant";
constexpr int kWarp = 32;
constexpr int64_t kChunk = 1024;  // reference.PAIR_CHUNK
constexpr int kThreads = 256;     // kChunk / 4: four consecutive elements per thread
constexpr int64_t kMaxBlocks = 1 << 20;
constexpr float kWeightScaleFloor = 1e-5f;

using detail::BF16;
using detail::F16;
using detail::F32;

// Four consecutive elements at p, which must be aligned to 4 elements.
template <class D>
__device__ __forceinline__ void load4(const typename D::raw* __restrict__ p, float (&f)[4]) {
  if constexpr (sizeof(typename D::raw) == 4) {
    const float4 v = __ldg(reinterpret_cast<const float4*>(p));
    f[0] = v.x;
    f[1] = v.y;
    f[2] = v.z;
    f[3] = v.w;
  } else {
    const uint2 v = __ldg(reinterpret_cast<const uint2*>(p));
    f[0] = D::to_f32(uint16_t(v.x & 0xffffu));  // little-endian: lower address in the low half
    f[1] = D::to_f32(uint16_t(v.x >> 16));
    f[2] = D::to_f32(uint16_t(v.y & 0xffffu));
    f[3] = D::to_f32(uint16_t(v.y >> 16));
  }
}

// The pairwise sum of the 1024 values whose 4-element subtrees the block's threads hold, in thread
// order; the result is valid in thread 0. A shuffle down by `off` lets lane L (a multiple of
// 2 off) add the subtree of lane L + off (a multiple of off, so complete at the previous level);
// the other lanes compute values nobody reads.
__device__ __forceinline__ double block_pairwise(double v, double* warp_sums) {
  const int lane = int(threadIdx.x) % kWarp, warp = int(threadIdx.x) / kWarp;
#pragma unroll
  for (int off = 1; off < kWarp; off *= 2) v = __dadd_rn(v, __shfl_down_sync(0xffffffffu, v, off));
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < kThreads / kWarp ? warp_sums[lane] : 0.0;
#pragma unroll
    for (int off = 1; off < kThreads / kWarp; off *= 2) v = __dadd_rn(v, __shfl_down_sync(0xffffffffu, v, off));
  }
  __syncthreads();  // warp_sums is reused by the next chunk
  return v;
}

__device__ __forceinline__ double subtree4(const double (&a)[4]) {
  return __dadd_rn(__dadd_rn(a[0], a[1]), __dadd_rn(a[2], a[3]));
}

// Stage 1: sums[c] = pairwise sum of |w| over chunk c. `vec`: w is aligned to 4 elements.
template <class D>
__global__ void __launch_bounds__(kThreads)
    abs_chunk_sums(const typename D::raw* __restrict__ w, int64_t n, double* __restrict__ sums, bool vec) {
  __shared__ double warp_sums[kThreads / kWarp];
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  for (int64_t c = blockIdx.x; c < chunks; c += gridDim.x) {
    const int64_t i0 = c * kChunk + 4 * int64_t(threadIdx.x);
    float f[4];
    if (vec && i0 + 4 <= n) {
      load4<D>(w + i0, f);
    } else {
#pragma unroll
      for (int j = 0; j < 4; ++j) f[j] = i0 + j < n ? D::to_f32(w[i0 + j]) : 0.0f;
    }
    double a[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) a[j] = fabs(double(f[j]));
    const double v = block_pairwise(subtree4(a), warp_sums);
    if (threadIdx.x == 0) sums[c] = v;
  }
}

// Stage 2: out[g] = pairwise sum of in[1024 g .. 1024 g + 1023] (zeros past count).
__global__ void __launch_bounds__(kThreads)
    pairwise_sums(const double* __restrict__ in, int64_t count, double* __restrict__ out) {
  __shared__ double warp_sums[kThreads / kWarp];
  const int64_t groups = (count + kChunk - 1) / kChunk;
  for (int64_t g = blockIdx.x; g < groups; g += gridDim.x) {
    const int64_t i0 = g * kChunk + 4 * int64_t(threadIdx.x);
    double a[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) a[j] = i0 + j < count ? in[i0 + j] : 0.0;
    const double v = block_pairwise(subtree4(a), warp_sums);
    if (threadIdx.x == 0) out[g] = v;
  }
}

__device__ __forceinline__ int8_t ternary(float v, float inv) {
  if (!(inv > 0.0f)) return 0;  // a NaN or an inf in the weight
  return static_cast<int8_t>(static_cast<int>(fminf(fmaxf(rintf(__fmul_rn(v, inv)), -1.0f), 1.0f)));
}

// Stage 3. `vec`: w is aligned to 4 elements and codes to 4 bytes.
template <class D>
__global__ void __launch_bounds__(kThreads)
    ternary_codes(const typename D::raw* __restrict__ w, int64_t n, const double* __restrict__ total,
                  float* __restrict__ scale, int8_t* __restrict__ codes, bool vec) {
  const float mean = __double2float_rn(__ddiv_rn(*total, __ll2double_rn(n)));
  const float s = mean < kWeightScaleFloor ? kWeightScaleFloor : mean;  // std::max(mean, floor)
  const float inv = __fdiv_rn(1.0f, s);
  if (blockIdx.x == 0 && threadIdx.x == 0) *scale = s;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  const int64_t first = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  int64_t done = 0;
  if (vec) {
    const int64_t nvec = n / 4;
    for (int64_t v = first; v < nvec; v += stride) {
      float f[4];
      load4<D>(w + 4 * v, f);
      uint32_t packed = 0;
#pragma unroll
      for (int j = 0; j < 4; ++j) packed |= uint32_t(uint8_t(ternary(f[j], inv))) << (8 * j);
      *reinterpret_cast<uint32_t*>(codes + 4 * v) = packed;
    }
    done = 4 * nvec;
  }
  for (int64_t i = done + first; i < n; i += stride) codes[i] = ternary(D::to_f32(w[i]), inv);
}

template <class D>
void launch(const void* w_, int64_t n, int8_t* codes, float* scale, double* workspace, cudaStream_t stream) {
  using raw = typename D::raw;
  const auto* w = static_cast<const raw*>(w_);
  const auto wa = reinterpret_cast<uintptr_t>(w_);
  const bool w_vec = wa % (4 * sizeof(raw)) == 0;

  int64_t count = detail::ceil_div(n, kChunk);
  double* level = workspace;
  abs_chunk_sums<D><<<unsigned(std::min(count, kMaxBlocks)), kThreads, 0, stream>>>(w, n, level, w_vec);
  while (count > 1) {
    const int64_t next = detail::ceil_div(count, kChunk);
    pairwise_sums<<<unsigned(std::min(next, kMaxBlocks)), kThreads, 0, stream>>>(level, count, level + count);
    level += count;
    count = next;
  }
  const bool vec = w_vec && reinterpret_cast<uintptr_t>(codes) % 4 == 0;
  const int64_t blocks = std::min(detail::ceil_div(detail::ceil_div(n, 4), kThreads), kMaxBlocks);
  ternary_codes<D><<<unsigned(blocks), kThreads, 0, stream>>>(w, n, level, scale, codes, vec);
  detail::check_cuda(kOp, "kernel launch", cudaGetLastError());
}

}  // namespace

int64_t ternary_quant_workspace(int64_t n) {
  detail::check_positive(kOp, "n", n);
  int64_t count = detail::ceil_div(n, kChunk), total = count;
  while (count > 1) {
    count = detail::ceil_div(count, kChunk);
    total += count;
  }
  return total;
}

void ternary_quant(const void* w, int dtype, int64_t n, int8_t* codes, float* scale, double* workspace,
                   int64_t workspace_len, int device, uintptr_t stream) {
  detail::check_dtype(kOp, dtype);
  detail::check_positive(kOp, "n", n);
  if (n > INT64_MAX / 4) detail::fail_arg(kOp, "n elements overflow int64 bytes");
  detail::check_address(kOp, "w", w);
  detail::check_address(kOp, "codes", codes);
  detail::check_address(kOp, "scale", scale);
  detail::check_address(kOp, "workspace", workspace);
  if (reinterpret_cast<uintptr_t>(workspace) % alignof(double))
    detail::fail_arg(kOp, "workspace must be aligned to 8 bytes (a float64 tensor)");
  const int64_t need = ternary_quant_workspace(n);
  if (workspace_len < need)
    detail::fail_arg(kOp, "workspace holds " + std::to_string(workspace_len) + " doubles; n=" + std::to_string(n) +
                              " needs ternary_quant_workspace(n) = " + std::to_string(need));
  detail::check_device(kOp, device);

  detail::DeviceGuard guard(kOp, device);
  const auto s = reinterpret_cast<cudaStream_t>(stream);
  switch (dtype) {
    case 0: launch<F32>(w, n, codes, scale, workspace, s); break;
    case 1: launch<BF16>(w, n, codes, scale, workspace, s); break;
    default: launch<F16>(w, n, codes, scale, workspace, s); break;
  }
}

}  // namespace wf::cuda
