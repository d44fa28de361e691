// Per-row absmax int8 activation quantization on NVIDIA GPUs.
//
// Bit-exactness with the reference (DESIGN.md section 2) rests on three things:
//  * the absmax is a max, which is exact in any reduction order, so warps and blocks may combine
//    partial results however they like;
//  * the scale is a correctly rounded float32 division (__fdiv_rn) and each product a single
//    correctly rounded float32 multiply (__fmul_rn, which nvcc never contracts into an FMA);
//  * rintf rounds half to even, like torch.round and the CPU core's nearbyint.
// NaN follows the CPU core rather than torch: fmaxf skips NaN in the absmax, and a NaN product
// clamps to -128 (fmaxf(NaN, -128) = -128).
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "act_quant.h"

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

// Element types: how a stored value becomes float32 (exactly) and how many fit in 16 bytes.
struct F32 {
  using raw = float;
  static constexpr int kVec = 4;
  __device__ static float to_f32(raw v) { return v; }
};
struct BF16 {
  using raw = uint16_t;
  static constexpr int kVec = 8;
  __device__ static float to_f32(raw v) { return __uint_as_float(uint32_t(v) << 16); }
};
struct F16 {
  using raw = uint16_t;
  static constexpr int kVec = 8;
  __device__ static float to_f32(raw v) { return __half2float(__ushort_as_half(v)); }
};

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
  const float r = rintf(__fmul_rn(v, s));
  return static_cast<int8_t>(static_cast<int>(fminf(fmaxf(r, -128.0f), 127.0f)));
}

__device__ inline float warp_max(float v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

struct WarpMax {
  __device__ float operator()(float v) const { return warp_max(v); }
};

// Every warp reduces the per-warp partials itself, which saves a broadcast round through shared
// memory; the trailing barrier lets the next row of a grid-stride loop reuse `partial`.
struct BlockMax {
  float* partial;  // __shared__ float[32]
  __device__ float operator()(float v) const {
    v = warp_max(v);
    const int lane = threadIdx.x % kWarp;
    if (lane == 0) partial[threadIdx.x / kWarp] = v;
    __syncthreads();
    v = lane < int(blockDim.x / kWarp) ? partial[lane] : 0.0f;
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

  float amax = 0.0f;
  for (int64_t i = lane; i < head; i += width) amax = fmaxf(amax, fabsf(D::to_f32(x[i])));
  for (int64_t v = lane; v < nvec; v += width) {
    float f[V];
    load_vec<D>(x + head + v * V, f);
#pragma unroll
    for (int j = 0; j < V; ++j) amax = fmaxf(amax, fabsf(f[j]));
  }
  for (int64_t i = tail + lane; i < K; i += width) amax = fmaxf(amax, fabsf(D::to_f32(x[i])));
  amax = reduce_max(amax);

  const float s = __fdiv_rn(127.0f, fmaxf(amax, kAbsmaxFloor));
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
  __shared__ float partial[kWarp];
  for (int64_t row = blockIdx.x; row < N; row += gridDim.x)
    quant_row<D>(x + row * K, K, q + row * K, scale + row, int(threadIdx.x), int(blockDim.x), vec,
                 BlockMax{partial});
}

// The versions make "no driver" and "driver older than this module's toolkit" recognisable, which
// cudaErrorInsufficientDriver alone does not.
[[noreturn]] void fail_cuda(const char* what, cudaError_t err) {
  int driver = 0;
  if (cudaDriverGetVersion(&driver) != cudaSuccess) driver = 0;
  cudaGetLastError();
  throw std::runtime_error(std::string("act_quant_int8: ") + what + " failed: " + cudaGetErrorName(err) + " (" +
                           cudaGetErrorString(err) + "); module built with CUDA runtime " +
                           std::to_string(CUDART_VERSION) + ", driver supports " +
                           (driver ? std::to_string(driver) : std::string("none (no driver found)")));
}

void check_cuda(const char* what, cudaError_t err) {
  if (err != cudaSuccess) fail_cuda(what, err);
}

// The runtime's current device is per thread and shared with torch through the driver's context;
// launching on another device's stream needs that device current, and torch must find its own
// current device unchanged afterwards.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) : device_(device) {
    check_cuda("cudaGetDevice", cudaGetDevice(&prev_));
    if (prev_ != device_) check_cuda("cudaSetDevice", cudaSetDevice(device_));
  }
  ~DeviceGuard() {
    if (prev_ != device_) cudaSetDevice(prev_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int device_;
  int prev_ = 0;
};

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

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
  check_cuda("kernel launch", cudaGetLastError());
}

void check_positive(const char* name, int64_t v) {
  if (v <= 0)
    throw std::invalid_argument(std::string("act_quant_int8: ") + name + " must be > 0, got " + std::to_string(v));
}

void check_address(const char* name, const void* p) {
  if (p == nullptr)
    throw std::invalid_argument(std::string("act_quant_int8: ") + name + " must be a device address, got 0");
}

}  // namespace

void act_quant_int8(const void* x, int dtype, int64_t N, int64_t K, int8_t* q, float* scale, int device,
                    uintptr_t stream) {
  if (dtype < 0 || dtype > 2)
    throw std::invalid_argument("act_quant_int8: dtype code must be 0 (f32), 1 (bf16) or 2 (f16), got " +
                                std::to_string(dtype));
  check_positive("x.shape[0]", N);
  check_positive("x.shape[1]", K);
  check_address("x", x);
  check_address("q", q);
  check_address("scale", scale);
  if (device < 0) throw std::invalid_argument("act_quant_int8: device must be >= 0, got " + std::to_string(device));
  if (N > INT64_MAX / 4 / K) throw std::invalid_argument("act_quant_int8: N * K elements overflow int64 bytes");

  DeviceGuard guard(device);
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
