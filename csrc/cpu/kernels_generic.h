// Portable versions of the engine's float and TQ1_0 kernels (see kernels.h), included by the scalar and
// AVX2 translation units; each compiles its own copy with its own target flags. Eight partial sums
// keep the loops vectorizable without reassociation.
#pragma once

#include <cmath>
#include <vector>

#include "cpu/formats.h"
#include "cpu/kernels.h"

namespace wf {
namespace {

// kernels.h: ternary_chunk, in three steps: the ISA's own ternary_round (Round), the band
// element by element, and chunk_sum's portable tree.
template <auto Round>
double generic_ternary_chunk(const void* w, DType dt, int64_t n, const TernaryBand& band, int8_t* out, int32_t* pos,
                             float* val, int64_t* count, const void* /*next*/) {
  Round(w, dt, n, band.inv, out);
  return dispatch_dtype(dt, [&]<DType D>() {
    int64_t c = 0;
    for (int64_t i = 0; i < n; ++i) {
      const float x = load_f32<D>(w, i), a = std::fabs(x * band.inv);
      if (a >= band.lo && a <= band.hi) {
        pos[c] = int32_t(i);
        val[c++] = x;
      }
    }
    *count = c;
    return chunk_sum_generic<D>(w, n, /*squares=*/false);
  });
}

inline float generic_dot_f32(const float* a, const float* b, int64_t n) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) acc[j] += a[i + j] * b[i + j];
  for (; i < n; ++i) acc[0] += a[i] * b[i];
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

inline void generic_axpy_f32(float a, const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

inline void generic_glu(const float* g, const float* u, float* out, int64_t n, bool silu) {
  if (silu) {
    for (int64_t i = 0; i < n; ++i) out[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
  } else {
    for (int64_t i = 0; i < n; ++i) {
      const float r = g[i] > 0.0f ? g[i] : 0.0f;
      out[i] = r * r * u[i];
    }
  }
}

inline void generic_f16_gemm(const float* x, int64_t N, int64_t K, const uint16_t* W, int64_t m0, int64_t m1,
                             float* out, int64_t ldo) {
  for (int64_t m = m0; m < m1; ++m)
    for (int64_t n = 0; n < N; ++n) {
      float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      for (int64_t k = 0; k < K; ++k) acc[k % 8] += x[n * K + k] * f16_to_f32(W[m * K + k]);
      out[n * ldo + m] = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
    }
}

inline void generic_i8_gemm(const uint8_t* xu, const float* x_scale, int64_t N, int64_t K, const int8_t* W,
                            const float* w_scale, const int32_t* wsum, int64_t m0, int64_t m1, float* out,
                            int64_t ldo) {
  for (int64_t m = m0; m < m1; ++m)
    for (int64_t n = 0; n < N; ++n) {
      int32_t d = 0;
      for (int64_t k = 0; k < K; ++k) d += int32_t(xu[n * K + k]) * int32_t(W[m * K + k]);
      d -= 128 * wsum[m];
      out[n * ldo + m] = float(d) / x_scale[n] * w_scale[m];
    }
}

// TQ1_0's gemm (kernels.h: tq1_gemm) for ISAs without a fast one: the engine repacks TQ1_0 to
// I2_S on those, so this serves a model loaded under AVX-512 and then run on another ISA. The
// activations stay in natural order (tq1_prepare_row is then the ISA's i2s_prepare_row); each
// weight row is decoded with the format table's block decoder.
inline void generic_tq1_gemm(const int8_t* acts, const int32_t* rowsum, const float* x_scale, int64_t N, int64_t K,
                             const uint8_t* W, float w_scale, int64_t m0, int64_t m1, float* out, int64_t ldo) {
  const FormatInfo& tq1 = format_info("tq1_0");
  const int64_t blocks = K / tq1.block_values;
  thread_local std::vector<int8_t> codes;
  codes.resize(size_t(K));
  for (int64_t m = m0; m < m1; ++m) {
    for (int64_t b = 0; b < blocks; ++b)
      unpack_block(tq1, W + (m * blocks + b) * tq1.block_bytes, codes.data() + b * tq1.block_values);
    for (int64_t n = 0; n < N; ++n) {
      int32_t d = 0;  // sum of digit * q, digit = code + 1: the I2_S formula's D
      for (int64_t k = 0; k < K; ++k) d += int32_t(codes[size_t(k)] + 1) * int32_t(acts[n * K + k]);
      out[n * ldo + m] = i2s_rescale(d, rowsum[n], x_scale[n], w_scale);
    }
  }
}

}  // namespace
}  // namespace wf
