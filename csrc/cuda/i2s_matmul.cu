// int8 activations times packed I2_S weights on NVIDIA GPUs (sm_80 and later).
//
// Layout (DESIGN.md section 3): each weight row is K/4 bytes, blocks of 32 bytes per 128 values;
// byte b of a block holds values b, 32+b, 64+b, 96+b in bits 7-6, 5-4, 3-2, 1-0 (codes 0, 1, 2 for
// -1, 0, +1). So a 32-bit word of a block (bytes b..b+3) shifted right by 6 - 2s and masked with
// 0x03030303 holds the codes of values 32s+b .. 32s+b+3, byte for byte in the order of the four
// int8 activations at the same positions: one __dp4a (or one k-slice of an int8 MMA) per
// sub-block s, no byte shuffling.
//
// Bit-exactness: the kernels turn the codes into signed bytes c - 1 in {-1, 0, +1} (a code of 3,
// which no packer writes, becomes +2 exactly as the reference's `(byte >> shift) & 3) - 1`), so the
// integer accumulators hold D - S = sum_k (code - 1) * q directly, exact in int32 in any order.
// The epilogue is the reference's float32 expression in its order: float(D - S) (correctly
// rounded, __int2float_rn), IEEE division by x_scale (__fdiv_rn), one rounded multiply by the
// weight scale (__fmul_rn); nothing there can be contracted into an FMA.
//
// Two kernels, chosen by the number of activation rows N:
//  * decode (N <= 8): a GEMV. Each block takes R weight rows; its threads stream those rows in
//    16-byte chunks (64 weights of one row), unpack them in registers and __dp4a them with the
//    N activation rows (read through the read-only cache, shared by all blocks), each chunk of
//    activations reused for the R rows. Warps reduce with redux.sync, the block through shared
//    memory. Memory-bound: the packed weights are read once, with 16-byte loads.
//  * prefill (N > 8): a tiled GEMM on int8 tensor cores (mma.sync m16n8k32 s8.s8.s32). A block
//    computes 64 activation rows x TM weight rows; per 128-value k-step it stages the int8
//    activations and the unpacked signed weight codes in shared memory (the global loads of the
//    next step are issued before the MMAs of this one), and each warp computes a 32 x 32 tile.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <string>

#include "common.cuh"
#include "i2s_matmul.h"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "the I2_S matmul kernels need sm_80 or later (int8 mma.sync m16n8k32, redux.sync)"
#endif

namespace wf::cuda {
namespace {

constexpr const char* kOp = "i2s_matmul";
constexpr int kWarp = 32;
constexpr int64_t kBlockValues = 128;  // values per I2_S block (32 bytes)
constexpr int kGemvMaxN = 8;           // N up to this takes the decode kernel
constexpr int kGemvMaxThreads = 256;
constexpr int kTileN = 64;                 // prefill: activation rows per block tile
constexpr int kTileK = 128;                // prefill: values per k-step (one I2_S block per row)
constexpr int kSmemLd = kTileK + 16;       // padded shared row: conflict-free fragment loads
constexpr int64_t kMaxGridX = 1 << 24;     // grid-stride loops beyond this
constexpr int64_t kMaxGridY = 65535;

// ---- device helpers -----------------------------------------------------------------------------

__device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// 16 bytes from p: one vector load where p is 16-byte aligned, else byte loads.
template <bool kAligned>
__device__ __forceinline__ uint4 load16(const void* p) {
  if constexpr (kAligned) {
    return __ldg(reinterpret_cast<const uint4*>(p));
  } else {
    const auto* b = static_cast<const uint8_t*>(p);
    uint32_t w[4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
      w[i] = uint32_t(__ldg(b + 4 * i)) | uint32_t(__ldg(b + 4 * i + 1)) << 8 |
             uint32_t(__ldg(b + 4 * i + 2)) << 16 | uint32_t(__ldg(b + 4 * i + 3)) << 24;
    return make_uint4(w[0], w[1], w[2], w[3]);
  }
}

// The weight scale: the little-endian float32 after the codes (any alignment).
__device__ __forceinline__ float load_w_scale(const uint8_t* p) {
  return __uint_as_float(uint32_t(__ldg(p)) | uint32_t(__ldg(p + 1)) << 8 | uint32_t(__ldg(p + 2)) << 16 |
                         uint32_t(__ldg(p + 3)) << 24);
}

// Signed codes c - 1 of the four values whose 2-bit codes sit at bit `shift` of each byte of w:
// per byte, (c | 0x80) - 1 cannot borrow from the next byte, and flipping bit 7 back gives
// 0x7f + c ^ 0x80 = c - 1 as a two's complement byte (0 -> 0xff, 1 -> 0x00, 2 -> 0x01, 3 -> 0x02).
__device__ __forceinline__ uint32_t signed_codes(uint32_t w, int shift) {
  const uint32_t c = (w >> shift) & 0x03030303u;
  return ((c | 0x80808080u) - 0x01010101u) ^ 0x80808080u;
}

// The reference's float32 epilogue, in its order: float32(D - S) / x_scale * w_scale.
__device__ __forceinline__ float rescale(int32_t d, float x_scale, float w_scale) {
  return __fmul_rn(__fdiv_rn(__int2float_rn(d), x_scale), w_scale);
}

// ---- decode: GEMV ---------------------------------------------------------------------------------

// NT activation rows, R weight rows per block, blockDim.x a multiple of 32 up to kGemvMaxThreads.
template <int NT, int R, bool kAligned>
__global__ void __launch_bounds__(kGemvMaxThreads)
    i2s_gemv(const int8_t* __restrict__ q, const float* __restrict__ x_scale, int64_t K,
             const uint8_t* __restrict__ packed, int64_t M, float* __restrict__ out) {
  __shared__ int32_t partial[kGemvMaxThreads / kWarp][R * NT];
  const int lane = int(threadIdx.x) % kWarp, warp = int(threadIdx.x) / kWarp;
  const int warps = int(blockDim.x) / kWarp;
  const int64_t row_bytes = K / 4;
  const int64_t chunks = K / 64;  // 16-byte chunks per weight row; a chunk never straddles a block
  const float w_scale = load_w_scale(packed + M * row_bytes);

  for (int64_t m0 = int64_t(blockIdx.x) * R; m0 < M; m0 += int64_t(gridDim.x) * R) {
    int32_t acc[R][NT];
    const uint8_t* wrow[R];
#pragma unroll
    for (int r = 0; r < R; ++r) {
      // Rows past M repeat the last row; their sums are never written.
      wrow[r] = packed + min64(m0 + r, M - 1) * row_bytes;
#pragma unroll
      for (int n = 0; n < NT; ++n) acc[r][n] = 0;
    }
    for (int64_t c = threadIdx.x; c < chunks; c += blockDim.x) {
      // Chunk c: bytes 16 (c % 2) .. +15 of block c / 2, i.e. values 128 (c / 2) + 32 s + 16 (c % 2)
      // + 0..15 for each sub-block s.
      uint32_t codes[R][4][4];  // [row][sub-block s][word i]
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const uint4 v = load16<kAligned>(wrow[r] + 16 * c);
        const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
        for (int s = 0; s < 4; ++s)
#pragma unroll
          for (int i = 0; i < 4; ++i) codes[r][s][i] = signed_codes(w[i], 6 - 2 * s);
      }
      const int8_t* a = q + (c >> 1) * kBlockValues + (c & 1) * 16;
#pragma unroll
      for (int n = 0; n < NT; ++n) {
#pragma unroll
        for (int s = 0; s < 4; ++s) {
          const uint4 v = load16<kAligned>(a + n * K + 32 * s);
          const uint32_t x[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
          for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int r = 0; r < R; ++r) acc[r][n] = __dp4a(int(codes[r][s][i]), int(x[i]), acc[r][n]);
        }
      }
    }
    // Integer sums: exact in any order.
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int n = 0; n < NT; ++n) {
        const int32_t v = __reduce_add_sync(0xffffffffu, acc[r][n]);
        if (lane == 0) partial[warp][r * NT + n] = v;
      }
    __syncthreads();
    if (int(threadIdx.x) < R * NT) {
      const int r = int(threadIdx.x) / NT, n = int(threadIdx.x) % NT;
      const int64_t m = m0 + r;
      if (m < M) {
        int32_t d = 0;
        for (int w = 0; w < warps; ++w) d += partial[w][threadIdx.x];
        out[n * M + m] = rescale(d, x_scale[n], w_scale);
      }
    }
    __syncthreads();  // `partial` is reused by the next rows
  }
}

// ---- prefill: tensor-core GEMM ----------------------------------------------------------------------

// D (16 x 8, int32) += A (16 x 32, s8, row-major) * B (32 x 8, s8, column-major). Fragments, with
// g = lane / 4 and t = lane % 4: a0 = A[g][4t..4t+3], a1 = A[g+8][4t..], a2 = A[g][16+4t..],
// a3 = A[g+8][16+4t..]; b0 = B[4t..4t+3][g], b1 = B[16+4t..][g]; d0 = D[g][2t], d1 = D[g][2t+1],
// d2 = D[g+8][2t], d3 = D[g+8][2t+1].
__device__ __forceinline__ void mma_s8(int32_t (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

__device__ __forceinline__ uint32_t lds32(const int8_t* p) { return *reinterpret_cast<const uint32_t*>(p); }

// A block computes out[n0 .. n0+64, m0 .. m0+TM) with 2 x TM/32 warps, each a 32 x 32 tile
// (2 x 4 MMA tiles of 16 activation rows x 8 weight rows).
template <int TM, bool kAligned>
__global__ void __launch_bounds__(2 * TM)
    i2s_gemm(const int8_t* __restrict__ q, const float* __restrict__ x_scale, int64_t N, int64_t K,
             const uint8_t* __restrict__ packed, int64_t M, float* __restrict__ out) {
  constexpr int kThreads = 2 * TM;
  constexpr int kWarpsM = TM / 32;
  constexpr int kAVecs = kTileN * kTileK / 16 / kThreads;  // 16-byte activation loads per thread
  static_assert(kAVecs * kThreads * 16 == kTileN * kTileK, "activation tile split");
  static_assert(kThreads == 2 * TM, "one 16-byte weight load per thread");
  __shared__ __align__(16) int8_t As[kTileN * kSmemLd];  // [activation row][k]
  __shared__ __align__(16) int8_t Bs[TM * kSmemLd];      // [weight row][k], signed codes

  const int tid = int(threadIdx.x), lane = tid % kWarp, warp = tid / kWarp;
  const int wm = warp % kWarpsM, wn = warp / kWarpsM;
  const int g = lane / 4, t = lane % 4;
  const int64_t row_bytes = K / 4, k_steps = K / kTileK;
  const int64_t tiles_m = (M + TM - 1) / TM, tiles_n = (N + kTileN - 1) / kTileN;
  const float w_scale = load_w_scale(packed + M * row_bytes);

  for (int64_t tn = blockIdx.y; tn < tiles_n; tn += gridDim.y) {
    for (int64_t tm = blockIdx.x; tm < tiles_m; tm += gridDim.x) {
      const int64_t n0 = tn * kTileN, m0 = tm * TM;
      // What this thread copies at each k-step. Rows past N or M repeat the last row; their
      // results are never written.
      const int8_t* a_src[kAVecs];
      int a_dst[kAVecs];
#pragma unroll
      for (int v = 0; v < kAVecs; ++v) {
        const int idx = tid + v * kThreads, r = idx / (kTileK / 16), c = idx % (kTileK / 16);
        a_src[v] = q + min64(n0 + r, N - 1) * K + 16 * c;
        a_dst[v] = r * kSmemLd + 16 * c;
      }
      const int b_row = tid / 2, b_half = tid % 2;
      const uint8_t* b_src = packed + min64(m0 + b_row, M - 1) * row_bytes + 16 * b_half;
      int8_t* const b_dst = Bs + b_row * kSmemLd + 16 * b_half;

      int32_t acc[2][4][4] = {};
      uint4 a_reg[kAVecs], b_reg;
#pragma unroll
      for (int v = 0; v < kAVecs; ++v) a_reg[v] = load16<kAligned>(a_src[v]);
      b_reg = load16<kAligned>(b_src);

      for (int64_t ks = 0; ks < k_steps; ++ks) {
        __syncthreads();  // the previous step's fragments have been read
#pragma unroll
        for (int v = 0; v < kAVecs; ++v) *reinterpret_cast<uint4*>(As + a_dst[v]) = a_reg[v];
        {
          // 16 packed bytes = bytes 16 b_half .. +15 of this row's block: values 32 s + 16 b_half
          // + 4 i + j for sub-block s, word i, byte j.
          const uint32_t w[4] = {b_reg.x, b_reg.y, b_reg.z, b_reg.w};
#pragma unroll
          for (int s = 0; s < 4; ++s)
            *reinterpret_cast<uint4*>(b_dst + 32 * s) =
                make_uint4(signed_codes(w[0], 6 - 2 * s), signed_codes(w[1], 6 - 2 * s),
                           signed_codes(w[2], 6 - 2 * s), signed_codes(w[3], 6 - 2 * s));
        }
        __syncthreads();
        if (ks + 1 < k_steps) {  // in flight during the MMAs below
#pragma unroll
          for (int v = 0; v < kAVecs; ++v) a_reg[v] = load16<kAligned>(a_src[v] + (ks + 1) * kTileK);
          b_reg = load16<kAligned>(b_src + (ks + 1) * (kTileK / 4));
        }
#pragma unroll
        for (int kk = 0; kk < kTileK; kk += 32) {
          uint32_t af[2][4], bf[4][2];
#pragma unroll
          for (int i = 0; i < 2; ++i) {
            const int8_t* p = As + (wn * 32 + i * 16 + g) * kSmemLd + kk + 4 * t;
            af[i][0] = lds32(p);
            af[i][1] = lds32(p + 8 * kSmemLd);
            af[i][2] = lds32(p + 16);
            af[i][3] = lds32(p + 8 * kSmemLd + 16);
          }
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            const int8_t* p = Bs + (wm * 32 + j * 8 + g) * kSmemLd + kk + 4 * t;
            bf[j][0] = lds32(p);
            bf[j][1] = lds32(p + 16);
          }
#pragma unroll
          for (int i = 0; i < 2; ++i)
#pragma unroll
            for (int j = 0; j < 4; ++j) mma_s8(acc[i][j], af[i], bf[j]);
        }
      }

#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int64_t n = n0 + wn * 32 + i * 16 + g + 8 * h;
          if (n >= N) continue;
          const float xs = x_scale[n];
#pragma unroll
          for (int j = 0; j < 4; ++j)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              const int64_t m = m0 + wm * 32 + j * 8 + 2 * t + e;
              if (m < M) out[n * M + m] = rescale(acc[i][j][2 * h + e], xs, w_scale);
            }
        }
    }
  }
}

// ---- launch -----------------------------------------------------------------------------------------

struct Args {
  const int8_t* q;
  const float* x_scale;
  int64_t N, K;
  const uint8_t* packed;
  int64_t M;
  float* out;
  bool aligned;
  cudaStream_t stream;
};

template <int NT, int R>
void launch_gemv(const Args& a) {
  const int64_t chunks = a.K / 64;
  const auto threads = unsigned(std::clamp<int64_t>(detail::ceil_div(chunks, kWarp) * kWarp, kWarp, kGemvMaxThreads));
  const auto blocks = unsigned(std::min(detail::ceil_div(a.M, R), kMaxGridX));
  if (a.aligned)
    i2s_gemv<NT, R, true><<<blocks, threads, 0, a.stream>>>(a.q, a.x_scale, a.K, a.packed, a.M, a.out);
  else
    i2s_gemv<NT, R, false><<<blocks, threads, 0, a.stream>>>(a.q, a.x_scale, a.K, a.packed, a.M, a.out);
}

template <int TM>
void launch_gemm(const Args& a) {
  const dim3 grid(unsigned(std::min(detail::ceil_div(a.M, TM), kMaxGridX)),
                  unsigned(std::min(detail::ceil_div(a.N, kTileN), kMaxGridY)));
  if (a.aligned)
    i2s_gemm<TM, true><<<grid, 2 * TM, 0, a.stream>>>(a.q, a.x_scale, a.N, a.K, a.packed, a.M, a.out);
  else
    i2s_gemm<TM, false><<<grid, 2 * TM, 0, a.stream>>>(a.q, a.x_scale, a.N, a.K, a.packed, a.M, a.out);
}

void launch(const Args& a, int device) {
  switch (a.N) {
    case 1: launch_gemv<1, 2>(a); break;
    case 2: launch_gemv<2, 2>(a); break;
    case 3: launch_gemv<3, 4>(a); break;
    case 4: launch_gemv<4, 4>(a); break;
    case 5: launch_gemv<5, 4>(a); break;
    case 6: launch_gemv<6, 4>(a); break;
    case 7: launch_gemv<7, 4>(a); break;
    case 8: launch_gemv<8, 4>(a); break;
    default: {
      static_assert(kGemvMaxN == 8, "the switch covers N = 1 .. kGemvMaxN");
      // Big tiles where they still give every SM a couple of blocks, else smaller ones.
      int sms = 0;
      detail::check_cuda(kOp, "cudaDeviceGetAttribute",
                         cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
      const int64_t big_tiles = detail::ceil_div(a.M, 128) * detail::ceil_div(a.N, kTileN);
      if (big_tiles >= 2 * int64_t(sms))
        launch_gemm<128>(a);
      else
        launch_gemm<64>(a);
    }
  }
  detail::check_cuda(kOp, "kernel launch", cudaGetLastError());
}

}  // namespace

void i2s_matmul(const int8_t* q, const float* x_scale, int64_t N, int64_t K, const uint8_t* packed,
                int64_t packed_nbytes, int64_t M, float* out, int device, uintptr_t stream) {
  using detail::fail_arg;
  detail::check_positive(kOp, "q.shape[0]", N);
  detail::check_positive(kOp, "K", K);
  detail::check_positive(kOp, "out_features", M);
  if (K % kBlockValues) fail_arg(kOp, "K=" + std::to_string(K) + " is not a multiple of 128");
  if (K > kI2SMaxK)
    fail_arg(kOp, "K=" + std::to_string(K) + " exceeds " + std::to_string(kI2SMaxK) + " (int32 accumulators)");
  if (N > INT64_MAX / K) fail_arg(kOp, "N * K elements overflow int64");
  if (M > (INT64_MAX - 32) / (K / 4)) fail_arg(kOp, "M * K / 4 + 32 bytes overflow int64");
  if (N > INT64_MAX / 4 / M) fail_arg(kOp, "N * M outputs overflow int64 bytes");
  const int64_t need = M * (K / 4) + 32;
  if (packed_nbytes != need)
    fail_arg(kOp, "packed holds " + std::to_string(packed_nbytes) + " bytes; out_features=" + std::to_string(M) +
                      " x K=" + std::to_string(K) + " in i2_s needs M*K/4 + 32 = " + std::to_string(need));
  detail::check_address(kOp, "q", q);
  detail::check_address(kOp, "x_scale", x_scale);
  detail::check_address(kOp, "packed", packed);
  detail::check_address(kOp, "out", out);
  detail::check_device(kOp, device);

  // K is a multiple of 128, so every row of q and of the packed weights starts 16-byte aligned
  // when the buffers do.
  const bool aligned = reinterpret_cast<uintptr_t>(q) % 16 == 0 && reinterpret_cast<uintptr_t>(packed) % 16 == 0;
  detail::DeviceGuard guard(kOp, device);
  launch(Args{q, x_scale, N, K, packed, M, out, aligned, reinterpret_cast<cudaStream_t>(stream)}, device);
}

}  // namespace wf::cuda
