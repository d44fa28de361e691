// AVX2 + FMA + F16C kernels. Without VNNI the I2_S dot uses vpmaddubsw (unsigned codes x signed
// activations -> int16 pairs; |pair| <= 2 * 2 * 128, no saturation), summed in int16 over the
// four sub-blocks of a block, then widened with vpmaddwd.
#include <immintrin.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <utility>

#include "cpu/kernels.h"
#include "cpu/kernels_generic.h"

namespace wf::avx2 {
namespace {

constexpr int kRoundNearest = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;

// Loads n <= 8 elements as float32 (n < 8: through a zero-padded copy).
template <DType D>
inline __m256 load8(const void* p, int64_t i, int64_t n = 8) {
  if (n < 8) {
    alignas(32) uint8_t tmp[32] = {};
    std::memcpy(tmp, static_cast<const uint8_t*>(p) + i * int64_t(dtype_size(D)), n * dtype_size(D));
    return load8<D>(tmp, 0);
  }
  if constexpr (D == DType::F32) {
    return _mm256_loadu_ps(static_cast<const float*>(p) + i);
  } else {
    const __m128i h = _mm_loadu_si128((const __m128i*)(static_cast<const uint16_t*>(p) + i));
    if constexpr (D == DType::BF16) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    else return _mm256_cvtph_ps(h);
  }
}

inline __m256 abs_ps(__m256 v) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), v); }
inline __m256d abs_pd(__m256d v) { return _mm256_andnot_pd(_mm256_set1_pd(-0.0), v); }

inline uint32_t hmax_epu32(__m256i v) {
  __m128i m = _mm_max_epu32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  m = _mm_max_epu32(m, _mm_shuffle_epi32(m, 0x4e));
  m = _mm_max_epu32(m, _mm_shuffle_epi32(m, 0xb1));
  return uint32_t(_mm_cvtsi128_si32(m));
}

inline uint32_t hmin_epu32(__m256i v) {
  __m128i m = _mm_min_epu32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  m = _mm_min_epu32(m, _mm_shuffle_epi32(m, 0x4e));
  m = _mm_min_epu32(m, _mm_shuffle_epi32(m, 0xb1));
  return uint32_t(_mm_cvtsi128_si32(m));
}

inline int32_t hsum_epi32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
  return _mm_cvtsi128_si32(s);
}

double square_sum(const void* x, DType dt, int64_t n, const void* /*next*/) {
  return dispatch_dtype(dt, [&]<DType D>() { return square_sum_generic<D>(x, n); });
}

// Rounds 8 floats to nearest even and clamps to [lo, hi] as int32.
inline __m256i round_clamp(__m256 v, float lo, float hi) {
  v = _mm256_round_ps(v, kRoundNearest);
  v = _mm256_min_ps(_mm256_max_ps(v, _mm256_set1_ps(lo)), _mm256_set1_ps(hi));  // NaN -> lo
  return _mm256_cvttps_epi32(v);
}

inline void store8_i8(int8_t* out, __m256i v, int64_t n) {
  const __m128i w16 = _mm_packs_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  const __m128i b = _mm_packs_epi16(w16, w16);
  if (n == 8) {
    _mm_storel_epi64((__m128i*)out, b);
  } else {
    alignas(16) int8_t tmp[16];
    _mm_store_si128((__m128i*)tmp, b);
    std::memcpy(out, tmp, n);
  }
}

void ternary_round(const void* w, DType dt, int64_t n, float inv, int8_t* out) {
  dispatch_dtype(dt, [&]<DType D>() {
    const __m256 vinv = _mm256_set1_ps(inv);
    for (int64_t i = 0; i < n; i += 8) {
      const int64_t c = std::min<int64_t>(8, n - i);
      store8_i8(out + i, round_clamp(_mm256_mul_ps(load8<D>(w, i, c), vinv), -1.0f, 1.0f), c);
    }
  });
}

// The sum of |x| over at most kPairChunk values in any order, where that is exact
// (abs_sum_order_free, kernels.h).
struct AbsSum {
  __m256d lo = _mm256_setzero_pd(), hi = _mm256_setzero_pd();
  __m256i max = _mm256_setzero_si256(), min_less_one = _mm256_set1_epi32(-1);  // zero -> 0xffffffff

  // Adds x; returns |x|.
  __m256 add(__m256 x) {
    const __m256 a = abs_ps(x);
    const __m256i bits = _mm256_castps_si256(a);
    max = _mm256_max_epu32(max, bits);
    min_less_one = _mm256_min_epu32(min_less_one, _mm256_sub_epi32(bits, _mm256_set1_epi32(1)));
    lo = _mm256_add_pd(lo, _mm256_cvtps_pd(_mm256_castps256_ps128(a)));
    hi = _mm256_add_pd(hi, _mm256_cvtps_pd(_mm256_extractf128_ps(a, 1)));
    return a;
  }
  // The sum, if exact (false also for an inf or a NaN).
  bool exact(double* sum) const {
    if (!abs_sum_order_free(hmax_epu32(max), hmin_epu32(min_less_one) + 1u)) return false;
    alignas(32) double s[4];
    _mm256_store_pd(s, _mm256_add_pd(lo, hi));
    *sum = (s[0] + s[1]) + (s[2] + s[3]);
    return true;
  }
};

double chunk_sum(const void* x, DType dt, int64_t n, bool squares, const void* /*next*/) {
  return dispatch_dtype(dt, [&]<DType D>() {
    if (!squares) {
      AbsSum sum;
      for (int64_t i = 0; i < n; i += 8) sum.add(load8<D>(x, i, std::min<int64_t>(8, n - i)));
      double total;
      if (sum.exact(&total)) return total;
    }
    return chunk_sum_generic<D>(x, n, squares);
  });
}

// kernels.h: ternary_chunk, one read of each value as in kernels_avx512.cpp: AbsSum's sum (the
// tree only where it cannot be exact), the code by one compare (for finite y, clamp(round(y), -1,
// 1) is sign(y) where |y| > 0.5, else 0) and the band by another.
double ternary_chunk(const void* w, DType dt, int64_t n, const TernaryBand& band, int8_t* out, int32_t* pos,
                     float* val, int64_t* count, const void* /*next*/) {
  return dispatch_dtype(dt, [&]<DType D>() {
    const __m256 inv = _mm256_set1_ps(band.inv);
    const __m256i half = _mm256_set1_epi32(0x3f000000), one = _mm256_set1_epi32(1);  // half: 0.5f
    // |y| in [lo, hi] as one unsigned compare of the bits (non-negative floats order as their bits)
    const __m256i lo = _mm256_set1_epi32(int(f32_to_bits(band.lo))), span = _mm256_set1_epi32(int(f32_to_bits(band.hi) - f32_to_bits(band.lo)));
    AbsSum sum;
    int64_t c = 0;
    for (int64_t i = 0; i < n; i += 8) {
      const int64_t m = std::min<int64_t>(8, n - i);
      const __m256 x = load8<D>(w, i, m);
      const __m256i y = _mm256_castps_si256(_mm256_mul_ps(sum.add(x), inv));  // |x| * inv = |x * inv|
      const __m256i nonzero = _mm256_cmpgt_epi32(y, half);
      const __m256i sign = _mm256_or_si256(_mm256_srai_epi32(_mm256_castps_si256(x), 31), one);  // -1 or 1
      store8_i8(out + i, _mm256_and_si256(nonzero, sign), m);
      const __m256i d = _mm256_sub_epi32(y, lo);
      int in_band = _mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_min_epu32(d, span), d)));
      in_band &= (1 << m) - 1;
      if (in_band) {  // rare
        alignas(32) float lanes[8];
        _mm256_store_ps(lanes, x);
        for (; in_band; in_band &= in_band - 1) {
          const int j = __builtin_ctz(unsigned(in_band));
          pos[c] = int32_t(i + j);
          val[c++] = lanes[j];
        }
      }
    }
    *count = c;
    double total;
    return sum.exact(&total) ? total : chunk_sum_generic<D>(w, n, /*squares=*/false);
  });
}

// max|x| over the bit patterns (common.h: a NaN wins in any order), then the codes.
template <typename Value>
inline void absmax_quantize(int64_t K, int8_t* q, float* scale, Value value) {
  const __m256i abs_mask = _mm256_set1_epi32(int(kAbsMask));
  __m256i vmax = _mm256_setzero_si256();
  for (int64_t i = 0; i < K; i += 8)
    vmax = _mm256_max_epu32(vmax, _mm256_and_si256(_mm256_castps_si256(value(i, std::min<int64_t>(8, K - i))), abs_mask));
  const float s = row_scale(hmax_epu32(vmax), K, q, scale);
  if (s == 0.0f) return;  // a NaN or an inf in the row: codes written
  const __m256 vs = _mm256_set1_ps(s);
  for (int64_t i = 0; i < K; i += 8) {
    const int64_t c = std::min<int64_t>(8, K - i);
    store8_i8(q + i, round_clamp(_mm256_mul_ps(value(i, c), vs), -128.0f, 127.0f), c);
  }
}

void act_quant_row(const void* x, DType dt, int64_t K, int8_t* q, float* scale, const void* /*next*/) {
  dispatch_dtype(dt, [&]<DType D>() {
    absmax_quantize(K, q, scale, [&](int64_t i, int64_t c) { return load8<D>(x, i, c); });
  });
}

void norm_quant_row(const void* x, DType dt, const float* w, int64_t K, float inv_rms, int8_t* q,
                    float* scale) {
  dispatch_dtype(dt, [&]<DType D>() {
    const __m256 vinv = _mm256_set1_ps(inv_rms);
    absmax_quantize(K, q, scale, [&](int64_t i, int64_t c) {
      return _mm256_mul_ps(_mm256_mul_ps(load8<D>(x, i, c), vinv), load8<DType::F32>(w, i, c));
    });
  });
}

// ---- I2_S ---------------------------------------------------------------------------------------
// A 32-byte block of codes shifted right by 6, 4, 2, 0 and masked gives the codes of values
// 0..31, 32..63, 64..95, 96..127: activations stay in natural order.

int32_t i2s_prepare_row(const int8_t* q, int64_t K, int8_t* out) {
  if (out) std::memcpy(out, q, size_t(K));
  int32_t sum = 0;
  const __m256i ones16 = _mm256_set1_epi16(1);
  __m256i acc = _mm256_setzero_si256();
  int64_t i = 0;
  for (; i + 16 <= K; i += 16)
    acc = _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)(q + i))), ones16));
  sum = hsum_epi32(acc);
  for (; i < K; ++i) sum += q[i];
  return sum;
}

// Decode (one activation row) is memory bound: as in the AVX-512 kernel, the hardware prefetchers
// alone keep too few lines in flight for a core to reach DRAM bandwidth, so each row's stream is
// also prefetched into L2 kPrefetchBytes ahead (the rows of a tile are adjacent, so this runs ahead
// of the tiles that follow), and the first kPrefetchBytes of a call are requested at its start.
constexpr int64_t kPrefetchBytes = 8192;

inline void prefetch_head(const uint8_t* W, int64_t row_bytes, int64_t m0, int64_t m1) {
  const int64_t head = std::min<int64_t>(kPrefetchBytes, (m1 - m0) * row_bytes);
  for (int64_t off = 0; off < head; off += 64) _mm_prefetch((const char*)(W + m0 * row_bytes + off), _MM_HINT_T2);
}

template <int R, int C>
void gemm_tile(const int8_t* acts, int64_t K, const uint8_t* W, int64_t row_bytes, int32_t* dots) {
  __m256i acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm256_setzero_si256();
  const __m256i mask3 = _mm256_set1_epi8(3), ones16 = _mm256_set1_epi16(1);
  for (int64_t b = 0; b < K / 128; ++b) {
    __m256i raw[C], part[R][C];
    if (R == 1 && b % 2 == 0)  // one 64-byte line per two blocks
      for (int c = 0; c < C; ++c) _mm_prefetch((const char*)(W + c * row_bytes + b * 32 + kPrefetchBytes), _MM_HINT_T2);
    for (int c = 0; c < C; ++c) raw[c] = _mm256_loadu_si256((const __m256i*)(W + c * row_bytes + b * 32));
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < C; ++c) part[r][c] = _mm256_setzero_si256();
#pragma GCC unroll 4
    for (int s = 0; s < 4; ++s) {
      __m256i u[C];
      for (int c = 0; c < C; ++c) u[c] = _mm256_and_si256(_mm256_srli_epi16(raw[c], 6 - 2 * s), mask3);
      for (int r = 0; r < R; ++r) {
        const __m256i a = _mm256_loadu_si256((const __m256i*)(acts + r * K + b * 128 + 32 * s));
        for (int c = 0; c < C; ++c) part[r][c] = _mm256_add_epi16(part[r][c], _mm256_maddubs_epi16(u[c], a));
      }
    }
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < C; ++c) acc[r][c] = _mm256_add_epi32(acc[r][c], _mm256_madd_epi16(part[r][c], ones16));
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) dots[r * C + c] = hsum_epi32(acc[r][c]);
}

using TileFn = void (*)(const int8_t*, int64_t, const uint8_t*, int64_t, int32_t*);

template <int R, int... Cs>
constexpr auto tile_row(std::integer_sequence<int, Cs...>) {
  return std::array<TileFn, sizeof...(Cs)>{&gemm_tile<R, Cs + 1>...};
}

constexpr int kMaxR = 2, kMaxC = 4;
const std::array<std::array<TileFn, kMaxC>, kMaxR> kTiles = {
    tile_row<1>(std::make_integer_sequence<int, kMaxC>{}), tile_row<2>(std::make_integer_sequence<int, kMaxC>{})};

void i2s_gemm(const int8_t* acts, const int32_t* rowsum, const float* x_scale, int64_t N, int64_t K,
              const uint8_t* W, float w_scale, int64_t m0, int64_t m1, float* out, int64_t ldo) {
  const int64_t row_bytes = K / 4;
  const int64_t R = N == 1 ? 1 : 2, C = N == 1 ? 4 : 2;
  if (N == 1) prefetch_head(W, row_bytes, m0, m1);
  for_each_tile(N, m0, m1, R, C, rowsum, x_scale, w_scale, out, ldo,
                [&](int64_t n, int64_t m, int64_t r, int64_t c, int32_t* dots) {
                  kTiles[r - 1][c - 1](acts + n * K, K, W + m * row_bytes, row_bytes, dots);
                  return false;
                });
}

// ---- engine float kernels (kernels.h; tolerance-exact) -----------------------------------------

inline float hsum_ps(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

// The f16 output head: F16C converts 8 weights per instruction; four FMA chains per row.
void f16_gemm(const float* x, int64_t N, int64_t K, const uint16_t* W, int64_t m0, int64_t m1, float* out,
              int64_t ldo) {
  const int64_t K32 = K / 32 * 32;
  auto w8 = [](const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); };
  for (int64_t m = m0; m < m1; ++m) {
    const uint16_t* w = W + m * K;
    for (int64_t n = 0; n < N; ++n) {
      const float* xr = x + n * K;
      __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
      int64_t k = 0;
      for (; k < K32; k += 32) {
        a0 = _mm256_fmadd_ps(w8(w + k), _mm256_loadu_ps(xr + k), a0);
        a1 = _mm256_fmadd_ps(w8(w + k + 8), _mm256_loadu_ps(xr + k + 8), a1);
        a2 = _mm256_fmadd_ps(w8(w + k + 16), _mm256_loadu_ps(xr + k + 16), a2);
        a3 = _mm256_fmadd_ps(w8(w + k + 24), _mm256_loadu_ps(xr + k + 24), a3);
      }
      float acc = hsum_ps(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
      for (; k < K; ++k) acc += xr[k] * f16_to_f32(w[k]);
      out[n * ldo + m] = acc;
    }
  }
}

uint64_t read_bytes(const uint8_t* p, int64_t n) {
  __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
  for (int64_t i = 0; i < n; i += 128) {
    a0 = _mm256_add_epi64(a0, _mm256_load_si256((const __m256i*)(p + i)));
    a1 = _mm256_add_epi64(a1, _mm256_load_si256((const __m256i*)(p + i + 32)));
    a2 = _mm256_add_epi64(a2, _mm256_load_si256((const __m256i*)(p + i + 64)));
    a3 = _mm256_add_epi64(a3, _mm256_load_si256((const __m256i*)(p + i + 96)));
  }
  const __m256i x = _mm256_xor_si256(_mm256_xor_si256(a0, a1), _mm256_xor_si256(a2, a3));
  alignas(32) uint64_t l[4];
  _mm256_store_si256((__m256i*)l, x);
  return l[0] + l[1] + l[2] + l[3];
}

int64_t int8_macs(int64_t iters) {
  // vpmaddubsw + vpaddw per 32 multiply-adds, as in gemm_tile (the vpmaddwd is amortised there).
  // Each accumulator gets its own code vector, hidden from the optimiser, so no product is shared;
  // named variables (not arrays) keep everything in the 16 ymm registers.
  __m256i acc0 = _mm256_set1_epi16(0), acc1 = _mm256_set1_epi16(1), acc2 = _mm256_set1_epi16(2),
          acc3 = _mm256_set1_epi16(3), acc4 = _mm256_set1_epi16(4), acc5 = _mm256_set1_epi16(5);
  __m256i u0 = _mm256_set1_epi8(0), u1 = _mm256_set1_epi8(1), u2 = _mm256_set1_epi8(2),
          u3 = _mm256_set1_epi8(3), u4 = _mm256_set1_epi8(1), u5 = _mm256_set1_epi8(2);
  const __m256i a = _mm256_set1_epi8(2);
  for (int64_t it = 0; it < iters; ++it) {
    __asm__ volatile("" : "+x"(u0), "+x"(u1), "+x"(u2), "+x"(u3), "+x"(u4), "+x"(u5));
    acc0 = _mm256_add_epi16(acc0, _mm256_maddubs_epi16(u0, a));
    acc1 = _mm256_add_epi16(acc1, _mm256_maddubs_epi16(u1, a));
    acc2 = _mm256_add_epi16(acc2, _mm256_maddubs_epi16(u2, a));
    acc3 = _mm256_add_epi16(acc3, _mm256_maddubs_epi16(u3, a));
    acc4 = _mm256_add_epi16(acc4, _mm256_maddubs_epi16(u4, a));
    acc5 = _mm256_add_epi16(acc5, _mm256_maddubs_epi16(u5, a));
  }
  const __m256i sum = _mm256_add_epi16(_mm256_add_epi16(_mm256_add_epi16(acc0, acc1), _mm256_add_epi16(acc2, acc3)),
                                       _mm256_add_epi16(acc4, acc5));
  volatile int32_t sink = _mm256_extract_epi16(sum, 0);
  (void)sink;
  return iters * 6 * 32;
}

}  // namespace

const Kernels& kernels() {
  static const Kernels k{"avx2",          chunk_sum,         square_sum,        ternary_round,
                         ternary_chunk,    act_quant_row,
                         norm_quant_row,   i2s_prepare_row,  i2s_gemm,        /*i2s_natural_rows=*/1,
                         i2s_prepare_row, generic_tq1_gemm, /*tq1_natural_rows=*/1, /*tq1_fast=*/false,
                         f16_gemm,
                         generic_i8_gemm,  generic_dot_f32,  generic_axpy_f32, generic_glu,     read_bytes,
                         int8_macs};
  return k;
}

}  // namespace wf::avx2
