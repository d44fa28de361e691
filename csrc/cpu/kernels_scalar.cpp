// Portable kernels: the baseline every SIMD table must match bit for bit.
#include <algorithm>
#include <cmath>

#include "cpu/kernels.h"
#include "cpu/kernels_generic.h"

namespace wf::scalar {
namespace {

double chunk_sum(const void* x, DType dt, int64_t n, bool squares, const void* /*next*/) {
  return dispatch_dtype(dt, [&]<DType D>() { return chunk_sum_generic<D>(x, n, squares); });
}

double square_sum(const void* x, DType dt, int64_t n, const void* /*next*/) {
  return dispatch_dtype(dt, [&]<DType D>() { return square_sum_generic<D>(x, n); });
}

inline int8_t round_clamp(float v, float lo, float hi) {
  // fmax/fmin before the cast: NaN maps to lo, like the SIMD paths.
  return int8_t(std::fmin(std::fmax(std::nearbyint(v), lo), hi));
}

void ternary_round(const void* w, DType dt, int64_t n, float inv, int8_t* out) {
  dispatch_dtype(dt, [&]<DType D>() {
    for (int64_t i = 0; i < n; ++i) out[i] = round_clamp(load_f32<D>(w, i) * inv, -1.0f, 1.0f);
  });
}

// max|x| over the bit patterns (common.h: a NaN wins in any order), then the codes.
void absmax_quantize(int64_t K, int8_t* q, float* scale, auto&& value) {
  uint32_t top = 0;
  for (int64_t k = 0; k < K; ++k) top = std::max(top, f32_to_bits(value(k)) & kAbsMask);
  const float s = row_scale(top, K, q, scale);
  if (s == 0.0f) return;  // a NaN or an inf in the row: codes written
  for (int64_t k = 0; k < K; ++k) q[k] = round_clamp(value(k) * s, -128.0f, 127.0f);
}

void act_quant_row(const void* x, DType dt, int64_t K, int8_t* q, float* scale, const void* /*next*/) {
  dispatch_dtype(dt, [&]<DType D>() { absmax_quantize(K, q, scale, [&](int64_t k) { return load_f32<D>(x, k); }); });
}

void norm_quant_row(const void* x, DType dt, const float* w, int64_t K, float inv_rms, int8_t* q,
                    float* scale) {
  dispatch_dtype(dt, [&]<DType D>() {
    absmax_quantize(K, q, scale, [&](int64_t k) { return (load_f32<D>(x, k) * inv_rms) * w[k]; });
  });
}

int32_t i2s_prepare_row(const int8_t* q, int64_t K, int8_t* out) {
  int32_t sum = 0;
  for (int64_t k = 0; k < K; ++k) sum += q[k];
  if (out) std::memcpy(out, q, size_t(K));
  return sum;
}

void i2s_gemm(const int8_t* acts, const int32_t* rowsum, const float* x_scale, int64_t N, int64_t K,
              const uint8_t* W, float w_scale, int64_t m0, int64_t m1, float* out, int64_t ldo) {
  const int64_t row_bytes = K / 4;
  for (int64_t m = m0; m < m1; ++m) {
    const uint8_t* w = W + m * row_bytes;
    for (int64_t n = 0; n < N; ++n) {
      const int8_t* a = acts + n * K;
      int32_t dot = 0;
      for (int64_t blk = 0; blk < K / 128; ++blk) {
        const uint8_t* wb = w + blk * 32;
        const int8_t* ab = a + blk * 128;
        for (int b = 0; b < 32; ++b) {
          const uint8_t byte = wb[b];
          dot += int32_t(byte >> 6) * ab[b] + int32_t((byte >> 4) & 3) * ab[32 + b] +
                 int32_t((byte >> 2) & 3) * ab[64 + b] + int32_t(byte & 3) * ab[96 + b];
        }
      }
      out[n * ldo + m] = i2s_rescale(dot, rowsum[n], x_scale[n], w_scale);
    }
  }
}

uint64_t read_bytes(const uint8_t* p, int64_t n) {
  uint64_t acc[4] = {0, 0, 0, 0};
  for (int64_t i = 0; i < n; i += 32) {
    for (int j = 0; j < 4; ++j) {
      uint64_t v;
      std::memcpy(&v, p + i + 8 * j, 8);
      acc[j] += v;
    }
  }
  return acc[0] ^ acc[1] ^ acc[2] ^ acc[3];
}

int64_t int8_macs(int64_t iters) {
  int32_t acc[4] = {0, 1, 2, 3}, u[4] = {1, 2, 0, 1};
  const int32_t a = 2;
  for (int64_t it = 0; it < iters; ++it) {
    for (int i = 0; i < 4; ++i) {
      __asm__ volatile("" : "+r"(u[i]));
      acc[i] += u[i] * a;
    }
  }
  volatile int32_t sink = acc[0] + acc[1] + acc[2] + acc[3];
  (void)sink;
  return iters * 4;
}

}  // namespace

const Kernels& kernels() {
  static const Kernels k{"scalar",          chunk_sum,         square_sum,        ternary_round,
                         generic_ternary_chunk<ternary_round>, act_quant_row,
                         norm_quant_row,   i2s_prepare_row,  i2s_gemm,        /*i2s_natural_rows=*/1,
                         i2s_prepare_row, generic_tq1_gemm, /*tq1_natural_rows=*/1, /*tq1_fast=*/false,
                         generic_f16_gemm,
                         generic_i8_gemm,  generic_dot_f32,  generic_axpy_f32, generic_glu,     read_bytes,
                         int8_macs};
  return k;
}

}  // namespace wf::scalar
