// Per-instruction-set kernel table. kernels_{scalar,avx2,avx512}.cpp each fill one, compiled with
// their own target flags; isa.cpp picks one at run time. All tables give identical integer results.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstring>

#include "cpu/common.h"

namespace wf {

// The guess at a weight scale of ternary_quant's single read: codes at inv, and the band of
// |w * inv| where a code could still change (Kernels::ternary_chunk).
struct TernaryBand {
  float inv, lo, hi;
};

struct Kernels {
  const char* name;

  // Pairwise sum (common.h) of |x[i]| (or x[i]^2 when squares) over n <= kPairChunk elements, in
  // double; pairwise_sum in ops.h extends it to any n. next, if not nullptr, is the n elements
  // the caller reads after these: a hint, which the AVX-512 kernels prefetch as they go (one
  // stride ahead of their own reads, so memory streams through the cached passes that follow).
  // Hints change no result.
  double (*chunk_sum)(const void* x, DType dt, int64_t n, bool squares, const void* next);

  // The sum of x[i]^2 over any n elements in double, in any order: each square is exact in double,
  // so the result is within (n - 1) * 2^-53 of the exact sum, relatively, as is the pairwise sum
  // (Higham, Accuracy and Stability of Numerical Algorithms, 2nd ed., section 4.2). rms_inv
  // brackets the pairwise sum with it. next: a hint, as in chunk_sum.
  double (*square_sum)(const void* x, DType dt, int64_t n, const void* next);

  // out[i] = clamp(round(w[i] * inv), -1, 1) for n elements.
  void (*ternary_round)(const void* w, DType dt, int64_t n, float inv, int8_t* out);

  // One chunk of ternary_quant's single read (ops.cpp) over n <= kPairChunk weights: returns
  // chunk_sum(w, n, |w|) and writes ternary_round(w, band.inv) to out, and notes the band: the
  // elements with band.lo <= |w[i] * band.inv| <= band.hi (the float32 product), whose positions i
  // go to pos and whose values, as float32, to val, in order; *count gets how many. pos and val
  // need room for n + 16 entries. next: a hint, as in chunk_sum. Where w holds an inf or a NaN the
  // codes are unspecified (the caller rounds again).
  double (*ternary_chunk)(const void* w, DType dt, int64_t n, const TernaryBand& band, int8_t* out, int32_t* pos,
                          float* val, int64_t* count, const void* next);

  // One row of K: scale = 127 / max(max|x|, 1e-5); q = clamp(round(x * scale), -128, 127).
  // next: the row the caller quantizes after this one, a hint as in chunk_sum.
  void (*act_quant_row)(const void* x, DType dt, int64_t K, int8_t* q, float* scale, const void* next);

  // One row: y = (x * inv_rms) * w in float32, then act_quant_row(y). w is float32.
  void (*norm_quant_row)(const void* x, DType dt, const float* w, int64_t K, float inv_rms, int8_t* q,
                         float* scale);

  // I2_S matmul, in two steps. i2s_prepare_row returns the sum of one int8 activation row of K
  // and, unless out is nullptr, copies the row into the layout this ISA's gemm reads (K bytes).
  // i2s_gemm then computes, for activation rows [0, N) and weight rows [m0, m1):
  //   out[n * ldo + m] = float(D - rowsum[n]) / x_scale[n] * w_scale,  D = sum_k code[m,k] * x[n,k]
  // where W holds the packed I2_S codes (0, 1, 2 for -1, 0, +1), K / 4 bytes a row. For calls of
  // at least i2s_natural_rows rows it reads the activations as they are (natural order, no byte
  // past a row's end), so they need no copy.
  int32_t (*i2s_prepare_row)(const int8_t* q, int64_t K, int8_t* out);
  void (*i2s_gemm)(const int8_t* acts, const int32_t* rowsum, const float* x_scale, int64_t N, int64_t K,
                   const uint8_t* W, float w_scale, int64_t m0, int64_t m1, float* out, int64_t ldo);
  int64_t i2s_natural_rows;

  // The same two steps over TQ1_0 weights (llama.cpp's 1.69-bit format: blocks of 256 values in
  // 54 bytes, K / 256 * 54 bytes a row), with the tensor's one scale passed as w_scale. Where
  // tq1_fast is false they are portable and slow (kernels_generic.h), and the engine repacks
  // TQ1_0 to I2_S at load instead; they serve a model loaded on a faster ISA. The
  // digits 0, 1, 2 stand for the codes -1, 0, +1, so out is the I2_S formula: the same D, the same
  // float step, the same bits. tq1_prepare_row returns the row's sum and, unless out is nullptr,
  // copies it into the layout tq1_gemm reads (at most tq1_prepared_bytes(K) bytes); calls of at
  // least tq1_natural_rows rows read the activations as they are.
  int32_t (*tq1_prepare_row)(const int8_t* q, int64_t K, int8_t* out);
  void (*tq1_gemm)(const int8_t* acts, const int32_t* rowsum, const float* x_scale, int64_t N, int64_t K,
                   const uint8_t* W, float w_scale, int64_t m0, int64_t m1, float* out, int64_t ldo);
  int64_t tq1_natural_rows;
  bool tq1_fast;

  // Float kernels of the inference engine (csrc/cpu/engine.cpp); tolerance-exact, not bit-exact
  // across ISAs.
  // out[n * ldo + m] = sum_k x[n * K + k] * W[m * K + k] for m in [m0, m1); W is fp16.
  void (*f16_gemm)(const float* x, int64_t N, int64_t K, const uint16_t* W, int64_t m0, int64_t m1, float* out,
                   int64_t ldo);
  // int8 weights with a scale per row: out[n * ldo + m] = float(D) / x_scale[n] * w_scale[m] with
  // D = sum_k q[n, k] * W[m, k], computed in int32. xu holds q + 128 as unsigned bytes (N rows of K)
  // and wsum[m] = sum_k W[m, k], so that D = sum_k xu * W - 128 * wsum.
  void (*i8_gemm)(const uint8_t* xu, const float* x_scale, int64_t N, int64_t K, const int8_t* W,
                  const float* w_scale, const int32_t* wsum, int64_t m0, int64_t m1, float* out, int64_t ldo);
  float (*dot_f32)(const float* a, const float* b, int64_t n);
  void (*axpy_f32)(float a, const float* x, float* y, int64_t n);  // y += a * x
  // The gated FFN activation: out[i] = act(g[i]) * u[i], act relu(x)^2 (silu false) or x * sigmoid(x).
  void (*glu)(const float* g, const float* u, float* out, int64_t n, bool silu);

  // Reads n bytes (n % 256 == 0) and returns a value that depends on all of them; for measuring
  // read bandwidth.
  uint64_t (*read_bytes)(const uint8_t* p, int64_t n);

  // Runs `iters` rounds of independent int8 multiply-add instructions (the ones the I2_S matmul
  // uses) from registers and returns the number of multiply-adds done; for measuring the peak.
  int64_t (*int8_macs)(int64_t iters);
};

// TQ1_0's one-row activation layout: 1024 bytes per group of four blocks (the last group padded
// with zeros).
inline int64_t tq1_prepared_bytes(int64_t K) { return (K / 256 + 3) / 4 * 1024; }

// Helpers shared by the per-ISA files. Each of those files is compiled with its own target flags,
// so these must not be shared symbols (the linker could hand the AVX-512 copy to the scalar
// path): the anonymous namespace gives every translation unit its own copy.
namespace {

// Whether the sum of at most kPairChunk values |x| is the same in any order, given the largest bit
// pattern `top` among them and the smallest nonzero one `least` (0: all are zero): the per-ISA
// AbsSum accumulators then skip the pairwise tree. It is so when the nonzero |x| span at most 19
// binades: each is a multiple of the smallest one's ulp, 2^(e_lo - 150) (e: the biased exponent,
// at least 1), and below 2^(e_hi - 126), so any sum of 2^10 of them is a multiple of that ulp below
// 2^(e_hi - e_lo + 34) <= 2^53 of it: a double. Every partial sum of the tree is then exact, and so
// equals any other order's. An inf or a NaN (top at or above the inf pattern) never is.
inline bool abs_sum_order_free(uint32_t top, uint32_t least) {
  if (top >= 0x7f800000u) return false;
  return least == 0u || int(top >> 23) - std::max(int(least >> 23), 1) <= 19;
}

// The float step of the I2_S matmul, in this order in every backend: float(D - S) / x_scale * w_scale.
inline float i2s_rescale(int32_t dot, int32_t rowsum, float x_scale, float w_scale) {
  return float(dot - rowsum) / x_scale * w_scale;
}

// Covers activation rows [0, N) x weight rows [m0, m1) with tiles of at most R x C: calls
// tile(n, m, r, c, dots) for the r x c tile at (n, m). A tile either writes its results to out
// itself and returns true, or fills dots[i * c + j] and returns false, and then this writes the
// rescaled results to out[(n + i) * ldo + m + j].
template <typename Tile>
void for_each_tile(int64_t N, int64_t m0, int64_t m1, int64_t R, int64_t C, const int32_t* rowsum,
                   const float* x_scale, float w_scale, float* out, int64_t ldo, Tile&& tile) {
  alignas(64) int32_t dots[64];
  for (int64_t m = m0; m < m1; m += C) {
    const int64_t c = m1 - m < C ? m1 - m : C;
    for (int64_t n = 0; n < N; n += R) {
      const int64_t r = N - n < R ? N - n : R;
      if (tile(n, m, r, c, dots)) continue;
      for (int64_t i = 0; i < r; ++i)
        for (int64_t j = 0; j < c; ++j)
          out[(n + i) * ldo + m + j] = i2s_rescale(dots[i * c + j], rowsum[n + i], x_scale[n + i], w_scale);
    }
  }
}

}  // namespace

namespace scalar { const Kernels& kernels(); }
namespace avx2 { const Kernels& kernels(); }
namespace avx512 { const Kernels& kernels(); }

// Pairwise sum (common.h) of |x[i]| (or x[i]^2) over any n >= 0 elements: k.chunk_sum on blocks
// of kPairChunk, combined pairwise. next: the n elements read after these (a hint, or nullptr).
inline double pairwise_sum(const Kernels& k, const void* x, DType dt, int64_t n, bool squares,
                           const void* next = nullptr) {
  const auto* base = static_cast<const uint8_t*>(x);
  const auto* after = static_cast<const uint8_t*>(next);
  const size_t es = dtype_size(dt);
  PairwiseAccumulator acc;
  for (int64_t b = 0; b < n; b += kPairChunk)
    acc.add(k.chunk_sum(base + b * es, dt, std::min(kPairChunk, n - b), squares, after ? after + b * es : nullptr));
  return acc.result();
}

// RMSNorm's 1 / sqrt(mean(x^2) + eps) of one row of K (DESIGN.md section 2; reference.rms_inv):
// the pairwise sum, the division and the square root in double, rounded once to float. Every step
// after the sum is monotone in it, so where the two ends of a bracket around the pairwise sum give
// the same float, that float is the answer. The bracket comes from square_sum, a few times faster
// than the tree: the pairwise sum P and square_sum's F are both within (K - 1) * 2^-53 of the exact
// sum, relatively, so for K <= 2^28 P is within F * (1 +- (K + 64) * 2^-52) (the 64 covers the
// second-order terms and the two products' own rounding). The ends round to different floats only
// where the result lies within about K * 2^-52 of a rounding boundary, relatively (a few rows in a
// million at K = 2560); those rows, and infinities and NaNs, take the tree. *tree (if not nullptr)
// says whether the tree was needed. next: the row read after this one (a hint, or nullptr).
inline float rms_inv(const Kernels& k, const void* x, DType dt, int64_t K, double eps, const void* next = nullptr,
                     bool* tree = nullptr) {
  const auto inv = [&](double sum) { return float(1.0 / std::sqrt(sum / double(K) + eps)); };
  const double fast = k.square_sum(x, dt, K, next);
  if (std::isfinite(fast) && K <= (int64_t(1) << 28)) {
    const double margin = double(K + 64) * 0x1p-52;
    const float a = inv(fast * (1.0 + margin)), b = inv(fast * (1.0 - margin));
    if (a == b) {
      if (tree) *tree = false;
      return a;
    }
  }
  if (tree) *tree = true;
  return inv(pairwise_sum(k, x, dt, K, /*squares=*/true));
}

}  // namespace wf
