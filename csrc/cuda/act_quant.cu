// Per-row absmax int8 activation quantization on NVIDIA GPUs.
//
// Bit-exactness with the reference (DESIGN.md section 2) rests on three things:
//  * the absmax is a max, which is exact in any reduction order, so warps and blocks may combine
//    partial results however they like;
//  * the scale is a correctly rounded float32 division (__fdiv_rn) and each product a single
//    correctly rounded float32 multiply (__fmul_rn, which nvcc never contracts into an FMA);
//  * rintf rounds half to even, like torch.round and the CPU core's nearbyint.
// Non-finite values as in the reference and the CPU core: the absmax is the largest bit pattern
// of |x| (an unsigned max: NaN > inf > numbers, so a NaN wins, where fmaxf would skip it), a row
// holding a NaN gets scale NaN and one holding an inf scale 0, and such rows' codes are all 0.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "act_quant.h"
#include "common.cuh"

namespace wf::cuda {
namespace {

constexpr float kAbsmaxFloor = 1e-5f;
constexpr int kWarp = 32;
constexpr int kWarpRowsPerBlock = 8;  // 256 threads: enough warps in flight for small rows
// Rows are visited by a grid-stride loop, so N may exceed the grid limit (N up to 2^31 and beyond);
// 65536 blocks are far more than an H100 keeps resident, so the cap never costs parallelism.
constexpr int64_t kMaxBlocks = 65536;
// Rows of at most this many bytes go one warp per row (at most 4 vector loads per lane); longer rows
// get a whole block so a single row still spreads over many warps.
constexpr int64_t kWarpRowMaxBytes = 2048;

using detail::BF16;
using detail::F16;
using detail::F32;

// p must be 16-byte aligned.
template <class D>
__device__ inline void load_vec(const typename D::raw* __restrict__ p, float (&f)[D::kVec]) {
  const uint4 u = __ldg(reinterpret_cast<const uint4*>(p));
  const uint32_t w[4] = {u.x, u.y, u.z, u.w};
  if constexpr (D::kVec == 4) {
#pragma unroll
    for (int j = 0; j < 4; ++j) f[j] = __uint_as_float(w[j]);
  } else {
    // Little-endian: the lower-addressed element is in the low half of each word.
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      f[2 * j] = D::to_f32(uint16_t(w[j] & 0xffffu));
      f[2 * j + 1] = D::to_f32(uint16_t(w[j] >> 16));
    }
  }
}

// q must be V-byte aligned.
template <int V>
__device__ inline void store_vec(int8_t* __restrict__ q, const int8_t (&b)[V]) {
  uint32_t w[V / 4];
#pragma unroll
  for (int i = 0; i < V / 4; ++i) {
    w[i] = 0;
#pragma unroll
    for (int j = 0; j < 4; ++j) w[i] |= uint32_t(uint8_t(b[4 * i + j])) << (8 * j);
  }
  if constexpr (V == 4) {
    *reinterpret_cast<uint32_t*>(q) = w[0];
  } else {
    *reinterpret_cast<uint2*>(q) = make_uint2(w[0], w[1]);
  }
}

__device__ inline int8_t quantize(float v, float s) {
  if (!(s > 0.0f)) return 0;  // a NaN or an inf in the row
  const float r = rintf(__fmul_rn(v, s));
  return static_cast<int8_t>(static_cast<int>(fminf(fmaxf(r, -128.0f), 127.0f)));
}

__device__ inline unsigned warp_max(unsigned v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v = max(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

// The bit pattern of |v|.
__device__ inline unsigned abs_bits(float v) { return __float_as_uint(v) & 0x7fffffffu; }

struct WarpMax {
  __device__ unsigned operator()(unsigned v) const { return warp_max(v); }
};

// Every warp reduces the per-warp partials itself, which saves a broadcast round through shared
// memory; the trailing barrier lets the next row of a grid-stride loop reuse `partial`.
struct BlockMax {
  unsigned* partial;  // __shared__ unsigned[32]
  __device__ unsigned operator()(unsigned v) const {
    v = warp_max(v);
    const int lane = threadIdx.x % kWarp;
    if (lane == 0) partial[threadIdx.x / kWarp] = v;
    __syncthreads();
    v = lane < int(blockDim.x / kWarp) ? partial[lane] : 0u;
    v = warp_max(v);
    __syncthreads();
    return v;
  }
};

// One row, processed by `width` cooperating threads (a warp or a block), this one being `lane`.
// With `vec`, the row splits into a scalar head up to the first 16-byte boundary of x, a body of
// 16-byte loads (and V-byte stores of q, aligned at the same element because the caller checked that
// x and q share their misalignment in elements), and a scalar tail; without it everything is scalar.
template <class D, class Reduce>
__device__ inline void quant_row(const typename D::raw* __restrict__ x, int64_t K, int8_t* __restrict__ q,
                                 float* __restrict__ scale, int lane, int width, bool vec, Reduce reduce_max) {
  constexpr int V = D::kVec;
  int64_t head = K, nvec = 0;
  if (vec) {
    const int64_t mis = int64_t((reinterpret_cast<uintptr_t>(x) / sizeof(typename D::raw)) % V);
    head = (V - mis) % V;
    if (head > K) head = K;
    nvec = (K - head) / V;
  }
  const int64_t tail = head + nvec * V;

  unsigned amax = 0;
  for (int64_t i = lane; i < head; i += width) amax = max(amax, abs_bits(D::to_f32(x[i])));
  for (int64_t v = lane; v < nvec; v += width) {
    float f[V];
    load_vec<D>(x + head + v * V, f);
#pragma unroll
    for (int j = 0; j < V; ++j) amax = max(amax, abs_bits(f[j]));
  }
  for (int64_t i = tail + lane; i < K; i += width) amax = max(amax, abs_bits(D::to_f32(x[i])));
  const float a = __uint_as_float(reduce_max(amax));
  const float s = __fdiv_rn(127.0f, a < kAbsmaxFloor ? kAbsmaxFloor : a);  // std::max: keeps a NaN
  if (lane == 0) *scale = s;

  // Same lane-to-element mapping as above, so the second read of x mostly hits L1.
  for (int64_t i = lane; i < head; i += width) q[i] = quantize(D::to_f32(x[i]), s);
  for (int64_t v = lane; v < nvec; v += width) {
    float f[V];
    int8_t b[V];
    load_vec<D>(x + head + v * V, f);
#pragma unroll
    for (int j = 0; j < V; ++j) b[j] = quantize(f[j], s);
    store_vec<V>(q + head + v * V, b);
  }
  for (int64_t i = tail + lane; i < K; i += width) q[i] = quantize(D::to_f32(x[i]), s);
}

template <class D>
__global__ void __launch_bounds__(kWarp * kWarpRowsPerBlock)
    act_quant_warp_rows(const typename D::raw* __restrict__ x, int64_t N, int64_t K, int8_t* __restrict__ q,
                        float* __restrict__ scale, bool vec) {
  const int lane = threadIdx.x % kWarp;
  const int64_t rows_per_block = blockDim.x / kWarp;
  const int64_t stride = int64_t(gridDim.x) * rows_per_block;
  for (int64_t row = int64_t(blockIdx.x) * rows_per_block + threadIdx.x / kWarp; row < N; row += stride)
    quant_row<D>(x + row * K, K, q + row * K, scale + row, lane, kWarp, vec, WarpMax{});
}

template <class D>
__global__ void __launch_bounds__(1024)
    act_quant_block_rows(const typename D::raw* __restrict__ x, int64_t N, int64_t K, int8_t* __restrict__ q,
                         float* __restrict__ scale, bool vec) {
  __shared__ unsigned partial[kWarp];
  for (int64_t row = blockIdx.x; row < N; row += gridDim.x)
    quant_row<D>(x + row * K, K, q + row * K, scale + row, int(threadIdx.x), int(blockDim.x), vec,
                 BlockMax{partial});
}

constexpr const char* kOp = "act_quant_int8";

using detail::ceil_div;

template <class D>
void launch(const void* x_, int64_t N, int64_t K, int8_t* q, float* scale, cudaStream_t stream) {
  using raw = typename D::raw;
  constexpr int V = D::kVec;
  const auto* x = static_cast<const raw*>(x_);
  // Vector loads and stores line up at the same element of every row only when x and q are
  // misaligned by the same number of elements (fresh allocations are both aligned).
  const auto xa = reinterpret_cast<uintptr_t>(x_), qa = reinterpret_cast<uintptr_t>(q);
  const bool vec = xa % sizeof(raw) == 0 && (xa / sizeof(raw)) % V == qa % V;

  if (K * int64_t(sizeof(raw)) <= kWarpRowMaxBytes) {
    const int64_t blocks = std::min(ceil_div(N, kWarpRowsPerBlock), kMaxBlocks);
    act_quant_warp_rows<D><<<unsigned(blocks), kWarp * kWarpRowsPerBlock, 0, stream>>>(x, N, K, q, scale, vec);
  } else {
    // About two 16-byte vectors per thread: long rows get up to 1024 threads, short ones at least 128.
    const int64_t threads = std::clamp<int64_t>(ceil_div(ceil_div(K, V), 2 * kWarp) * kWarp, 128, 1024);
    const int64_t blocks = std::min(N, kMaxBlocks);
    act_quant_block_rows<D><<<unsigned(blocks), unsigned(threads), 0, stream>>>(x, N, K, q, scale, vec);
  }
  detail::check_cuda(kOp, "kernel launch", cudaGetLastError());
}

}  // namespace

void act_quant_int8(const void* x, int dtype, int64_t N, int64_t K, int8_t* q, float* scale, int device,
                    uintptr_t stream) {
  detail::check_dtype(kOp, dtype);
  detail::check_positive(kOp, "x.shape[0]", N);
  detail::check_positive(kOp, "x.shape[1]", K);
  detail::check_address(kOp, "x", x);
  detail::check_address(kOp, "q", q);
  detail::check_address(kOp, "scale", scale);
  detail::check_device(kOp, device);
  if (N > INT64_MAX / 4 / K) detail::fail_arg(kOp, "N * K elements overflow int64 bytes");

  detail::DeviceGuard guard(kOp, device);
  const auto s = reinterpret_cast<cudaStream_t>(stream);
  switch (dtype) {
    case 0: launch<F32>(x, N, K, q, scale, s); break;
    case 1: launch<BF16>(x, N, K, q, scale, s); break;
    default: launch<F16>(x, N, K, q, scale, s); break;
  }
}

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // the failure is the answer (no driver or no device), not an error to keep
    return 0;
  }
  return n;
}

const char* runtime_status() {
  int n = 0;
  const cudaError_t err = cudaGetDeviceCount(&n);
  cudaGetLastError();
  return cudaGetErrorName(err);
}

int driver_version() {
  int v = 0;
  if (cudaDriverGetVersion(&v) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return v;
}

int runtime_version() { return CUDART_VERSION; }

}  // namespace wf::cuda
