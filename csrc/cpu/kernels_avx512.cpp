// AVX-512 (F, BW, VL, VNNI) kernels. The I2_S matmul multiplies unpacked 2-bit codes (unsigned
// 0..2) by int8 activations with vpdpbusd; the -1 offset of the codes is removed afterwards by
// subtracting the activation row sum.
#include <immintrin.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <new>
#include <utility>

#include "cpu/kernels.h"


namespace wf::avx512 {
namespace {

constexpr int kRoundNearest = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;

inline __mmask16 tail_mask(int64_t rem) { return __mmask16((1u << rem) - 1u); }

// Loads 16 elements as float32; lanes outside `m` are zero.
template <DType D>
inline __m512 load16(const void* p, int64_t i, __mmask16 m = 0xffff) {
  if constexpr (D == DType::F32) {
    return _mm512_maskz_loadu_ps(m, static_cast<const float*>(p) + i);
  } else {
    const __m256i h = _mm256_maskz_loadu_epi16(m, static_cast<const uint16_t*>(p) + i);
    if constexpr (D == DType::BF16) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    else return _mm512_cvtph_ps(h);
  }
}

// One level of the pairwise tree on 16 consecutive doubles (a: 0..7, b: 8..15): the 8 sums of
// neighbours (0+1, 2+3, ..., 14+15), in order.
inline __m512d pair_sums(__m512d a, __m512d b) {
  const __m512i even = _mm512_setr_epi64(0, 2, 4, 6, 8, 10, 12, 14);
  const __m512i odd = _mm512_setr_epi64(1, 3, 5, 7, 9, 11, 13, 15);
  return _mm512_add_pd(_mm512_permutex2var_pd(a, even, b), _mm512_permutex2var_pd(a, odd, b));
}

// Elements i..i+7 of x (zeros at and past n) widened to doubles.
template <DType D>
inline __m512d load8_f64(const void* x, int64_t i, int64_t n) {
  const __mmask8 m = n - i >= 8 ? __mmask8(0xff) : i < n ? __mmask8((1u << (n - i)) - 1u) : __mmask8(0);
  if constexpr (D == DType::F32) {
    return _mm512_cvtps_pd(_mm256_maskz_loadu_ps(m, static_cast<const float*>(x) + i));
  } else {
    const __m128i h = _mm_maskz_loadu_epi16(m, static_cast<const uint16_t*>(x) + i);
    if constexpr (D == DType::BF16) return _mm512_cvtps_pd(_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)));
    else return _mm512_cvtps_pd(_mm256_cvtph_ps(h));
  }
}

// Levels 1 to 3 of the tree over the 64 values at x + i (zeros past n): the 8 sums of 8
// neighbours, in order. Level 1 pairs neighbours with in-lane unpacks (a square is exact in double,
// so x1^2 + x0^2 is one FMA); levels 2 and 3 pair 128-bit lanes. The lanes come out in order.
template <DType D>
inline __m512d leaf64(const void* x, int64_t i, int64_t n, bool squares) {
  __m512d r[4];  // r[m] lanes: pair sums 0, 4, 1, 5, 2, 6, 3, 7 of values 16m..16m+15 (pair p: 2p, 2p+1)
  for (int m = 0; m < 4; ++m) {
    const __m512d a = load8_f64<D>(x, i + 16 * m, n), b = load8_f64<D>(x, i + 16 * m + 8, n);
    const __m512d even = _mm512_unpacklo_pd(a, b), odd = _mm512_unpackhi_pd(a, b);
    r[m] = squares ? _mm512_fmadd_pd(odd, odd, _mm512_mul_pd(even, even))
                   : _mm512_add_pd(_mm512_abs_pd(even), _mm512_abs_pd(odd));
  }
  // 128-bit lanes 0, 2 of both inputs against lanes 1, 3: neighbouring pairs meet.
  auto join = [](__m512d a, __m512d b) {
    return _mm512_add_pd(_mm512_shuffle_f64x2(a, b, 0x88), _mm512_shuffle_f64x2(a, b, 0xDD));
  };
  return join(join(r[0], r[1]), join(r[2], r[3]));
}

// Prefetches the lines of p whose first byte is in [from, to), and the line holding byte 0: over a
// pass that covers [0, bytes) in pieces, each line once. The streaming passes (chunk_sum, the
// absmax pass) call it on the caller's next row at the offsets they read, one row ahead of their
// own loads, so that memory streams on through the cached passes after them (measured on 128-row
// inputs from DRAM: 5-15% more bandwidth for rmsnorm_act_quant at K = 2560 and 6912, where a
// prefetch during the cached passes themselves evicted the current row from L1 at K = 6912).
inline void prefetch_part(const void* p, int64_t from, int64_t to) {
  const uintptr_t base = reinterpret_cast<uintptr_t>(p);
  uintptr_t a = from == 0 ? base & ~uintptr_t(63) : (base + from + 63) & ~uintptr_t(63);
  for (; a < base + to; a += 64) _mm_prefetch(reinterpret_cast<const char*>(a), _MM_HINT_T1);
}

// The sum of |x| over at most kPairChunk values, in any order, where that is exact
// (abs_sum_order_free, kernels.h). One widening per 8 values and no shuffles: about twice the
// speed of the tree.
struct AbsSum {
  __m512d lo = _mm512_setzero_pd(), hi = _mm512_setzero_pd();
  __m512i max = _mm512_setzero_si512(), min_less_one = _mm512_set1_epi32(-1);  // zero -> 0xffffffff

  // Adds x; returns |x|.
  __m512 add(__m512 x) {
    const __m512 a = _mm512_abs_ps(x);
    const __m512i bits = _mm512_castps_si512(a);
    max = _mm512_max_epu32(max, bits);
    min_less_one = _mm512_min_epu32(min_less_one, _mm512_sub_epi32(bits, _mm512_set1_epi32(1)));
    lo = _mm512_add_pd(lo, _mm512_cvtps_pd(_mm512_castps512_ps256(a)));
    hi = _mm512_add_pd(hi, _mm512_cvtps_pd(_mm512_extractf32x8_ps(a, 1)));
    return a;
  }
  // The sum, if exact (false also for an inf or a NaN).
  bool exact(double* sum) const {
    if (!abs_sum_order_free(_mm512_reduce_max_epu32(max), _mm512_reduce_min_epu32(min_less_one) + 1u)) return false;
    *sum = _mm512_reduce_add_pd(_mm512_add_pd(lo, hi));
    return true;
  }
};

// The levels of the pairwise tree above its 64-value leaves: a binary counter of leaf vectors (8
// sums of 8 neighbours each, in order) that merges two equal levels as soon as both exist, so no
// level makes a pass over memory.
struct PairCounter {
  __m512d pending[8];  // pending[j]: a vector of 8 subtrees of 8 << j values, awaiting its neighbour
  unsigned have = 0;

  // Pushes s, a vector of 8 subtrees of 8 << j values, at level j.
  void push(__m512d s, int j = 0) {
    for (; have >> j & 1u; ++j) s = pair_sums(pending[j], s);
    have &= ~((1u << j) - 1u);
    pending[j] = s;
    have |= 1u << j;
  }
  // The tree's sum after `blocks` >= 1 leaves. The padding to a power of two is zeros at every
  // level: it goes in as whole zero subtrees, the largest that fits at each step (K = 2560 pads to
  // 4096: 24 blocks, 2 pushes).
  double finish(int64_t blocks) {
    if (blocks == 0) return 0.0;
    int64_t p = 1;
    while (p < blocks) p <<= 1;
    while (blocks < p) {
      const int j = __builtin_ctzll(uint64_t(blocks));
      push(_mm512_setzero_pd(), j);
      blocks += int64_t(1) << j;
    }
    // One vector is left: 8 lanes, each the sum of an eighth of the tree
    alignas(64) double lanes[8];
    _mm512_store_pd(lanes, pending[__builtin_ctz(have)]);
    return pairwise_reduce(lanes, 8);
  }
};

// The pairwise tree itself: chunk_sum of squares, and of |x| where AbsSum cannot be exact.
template <DType D>
double tree_sum_t(const void* x, int64_t n, bool squares, const void* next) {
  constexpr int64_t es = D == DType::F32 ? 4 : 2;
  PairCounter tree;
  int64_t i = 0;
  for (; i < n; i += 64) {
    if (next) prefetch_part(next, i * es, std::min(i + 64, n) * es);
    tree.push(leaf64<D>(x, i, n, squares));
  }
  return tree.finish(i / 64);
}

// Elements i..i+7 of x, all present, widened to doubles.
template <DType D>
inline __m512d load8_f64(const void* x, int64_t i) {
  if constexpr (D == DType::F32) {
    return _mm512_cvtps_pd(_mm256_loadu_ps(static_cast<const float*>(x) + i));
  } else {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(x) + i));
    if constexpr (D == DType::BF16) return _mm512_cvtps_pd(_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)));
    else return _mm512_cvtps_pd(_mm256_cvtph_ps(h));
  }
}

// kernels.h: square_sum. Each square of a float is exact in double, so one FMA per 8 values into
// eight accumulators gives a sum within (n - 1) * 2^-53 of the exact one, relatively.
template <DType D>
double square_sum_t(const void* x, int64_t n, const void* next) {
  constexpr int64_t es = D == DType::F32 ? 4 : 2;
  __m512d acc[8];
  for (auto& a : acc) a = _mm512_setzero_pd();
  int64_t i = 0;
  for (; i + 64 <= n; i += 64) {
    if (next) prefetch_part(next, i * es, (i + 64) * es);
    for (int j = 0; j < 8; ++j) {
      const __m512d v = load8_f64<D>(x, i + 8 * j);
      acc[j] = _mm512_fmadd_pd(v, v, acc[j]);
    }
  }
  if (next) prefetch_part(next, i * es, n * es);
  for (int j = 0; i < n; i += 8, ++j) {
    const __m512d v = load8_f64<D>(x, i, n);
    acc[j] = _mm512_fmadd_pd(v, v, acc[j]);
  }
  for (int j = 0; j < 4; ++j) acc[j] = _mm512_add_pd(acc[j], acc[j + 4]);
  return _mm512_reduce_add_pd(_mm512_add_pd(_mm512_add_pd(acc[0], acc[1]), _mm512_add_pd(acc[2], acc[3])));
}

double square_sum(const void* x, DType dt, int64_t n, const void* next) {
  return dispatch_dtype(dt, [&]<DType D>() { return square_sum_t<D>(x, n, next); });
}

template <DType D>
double chunk_sum_t(const void* x, int64_t n, bool squares, const void* next) {
  if (squares) return tree_sum_t<D>(x, n, /*squares=*/true, next);
  constexpr int64_t es = D == DType::F32 ? 4 : 2;
  AbsSum sum;
  int64_t i = 0;
  for (; i + 64 <= n; i += 64) {  // whole blocks without masks: a third faster than 16 at a time
    if (next) prefetch_part(next, i * es, (i + 64) * es);
    for (int j = 0; j < 64; j += 16) sum.add(load16<D>(x, i + j));
  }
  if (next) prefetch_part(next, i * es, n * es);
  for (; i < n; i += 16) sum.add(load16<D>(x, i, n - i >= 16 ? __mmask16(0xffff) : tail_mask(n - i)));
  double total;
  return sum.exact(&total) ? total : tree_sum_t<D>(x, n, /*squares=*/false, nullptr);  // next: prefetched
}

double chunk_sum(const void* x, DType dt, int64_t n, bool squares, const void* next) {
  return dispatch_dtype(dt, [&]<DType D>() { return chunk_sum_t<D>(x, n, squares, next); });
}

void ternary_round(const void* w, DType dt, int64_t n, float inv, int8_t* out) {
  dispatch_dtype(dt, [&]<DType D>() {
    const __m512 vinv = _mm512_set1_ps(inv);
    const __m512i lo = _mm512_set1_epi32(-1), hi = _mm512_set1_epi32(1);
    for (int64_t i = 0; i < n; i += 16) {
      const __mmask16 m = n - i >= 16 ? __mmask16(0xffff) : tail_mask(n - i);
      const __m512i r = _mm512_cvt_roundps_epi32(_mm512_mul_ps(load16<D>(w, i, m), vinv), kRoundNearest);
      _mm_mask_storeu_epi8(out + i, m, _mm512_cvtepi32_epi8(_mm512_min_epi32(_mm512_max_epi32(r, lo), hi)));
    }
  });
}

// kernels.h: ternary_chunk. One read of each value: AbsSum's sum (the tree only where AbsSum cannot
// be exact), the code by two compares, and the band by one.
template <DType D>
double ternary_chunk_t(const void* w, int64_t n, const TernaryBand& band, int8_t* out, int32_t* pos, float* val,
                       int64_t* count, const void* next) {
  const __m512 inv = _mm512_set1_ps(band.inv);
  const __m512i half = _mm512_set1_epi32(0x3f000000);  // 0.5f
  // |y| in [lo, hi] as one unsigned compare of the bits (non-negative floats order as their bits)
  const __m512i lo = _mm512_set1_epi32(int(f32_to_bits(band.lo))), span = _mm512_set1_epi32(int(f32_to_bits(band.hi) - f32_to_bits(band.lo)));
  constexpr int64_t es = D == DType::F32 ? 4 : 2;
  AbsSum sum;
  int64_t c = 0;
  // Sums and rounds 16 values at i (lanes outside m zero): x, and masks of the codes that are
  // nonzero and negative (for finite y, clamp(round(y), -1, 1) is sign(y) where |y| > 0.5, else 0).
  // Returns the band's lanes.
  auto step = [&](int64_t i, __mmask16 m, __m512& x, __mmask16& nonzero, __mmask16& negative) {
    x = load16<D>(w, i, m);
    const __m512i y = _mm512_castps_si512(_mm512_mul_ps(sum.add(x), inv));  // |x| * inv = |x * inv|
    nonzero = _mm512_cmpgt_epu32_mask(y, half);
    negative = _mm512_movepi32_mask(_mm512_castps_si512(x));
    return _mm512_mask_cmple_epu32_mask(m, _mm512_sub_epi32(y, lo), span);
  };
  // Notes the band lanes of x (at i); compressed in registers, as a compressing store to memory is
  // slow on some cores.
  auto note = [&](int64_t i, __mmask16 in_band, __m512 x) {
    const __m512i at = _mm512_add_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                        _mm512_set1_epi32(int32_t(i)));
    _mm512_storeu_si512(pos + c, _mm512_maskz_compress_epi32(in_band, at));
    _mm512_storeu_ps(val + c, _mm512_maskz_compress_ps(in_band, x));
    c += __builtin_popcount(in_band);
  };
  // 64 codes a line, streamed past the caches where the line is aligned: the codes are not read
  // again soon, and a plain store would first read each line in (a fifth more memory traffic).
  const bool stream = (reinterpret_cast<uintptr_t>(out) & 63) == 0;
  const __m512i one64 = _mm512_set1_epi8(1), minus_one64 = _mm512_set1_epi8(-1);
  int64_t i = 0;
  for (; i + 64 <= n; i += 64) {
    if (next) prefetch_part(next, i * es, (i + 64) * es);
    __m512 x[4];
    __mmask16 b[4], nz[4], neg[4];
    for (int j = 0; j < 4; ++j) b[j] = step(i + 16 * j, 0xffff, x[j], nz[j], neg[j]);
    auto join = [](const __mmask16* k) {  // k[0] in the low bits
      return _mm512_kunpackd(_mm512_kunpackw(k[3], k[2]), _mm512_kunpackw(k[1], k[0]));
    };
    const __mmask64 nonzero = join(nz), negative = join(neg);
    const __m512i codes = _mm512_mask_mov_epi8(_mm512_maskz_mov_epi8(nonzero, one64), nonzero & negative, minus_one64);
    if (stream) _mm512_stream_si512(reinterpret_cast<__m512i*>(out + i), codes);
    else _mm512_storeu_si512(out + i, codes);
    if ((b[0] | b[1]) | (b[2] | b[3]))  // rare: one branch per 64 values
      for (int j = 0; j < 4; ++j)
        if (b[j]) note(i + 16 * j, b[j], x[j]);
  }
  if (stream) _mm_sfence();  // the streamed stores before whatever the caller publishes next
  const __m128i one = _mm_set1_epi8(1), minus_one = _mm_set1_epi8(-1);
  for (; i < n; i += 16) {
    const __mmask16 m = n - i >= 16 ? __mmask16(0xffff) : tail_mask(n - i);
    if (next) prefetch_part(next, i * es, std::min(i + 16, n) * es);
    __m512 x;
    __mmask16 nz, neg;
    const __mmask16 in_band = step(i, m, x, nz, neg);
    _mm_mask_storeu_epi8(out + i, m, _mm_mask_mov_epi8(_mm_maskz_mov_epi8(nz, one), nz & neg, minus_one));
    if (in_band) note(i, in_band, x);
  }
  *count = c;
  double total;
  return sum.exact(&total) ? total : tree_sum_t<D>(w, n, /*squares=*/false, nullptr);
}

double ternary_chunk(const void* w, DType dt, int64_t n, const TernaryBand& band, int8_t* out, int32_t* pos,
                     float* val, int64_t* count, const void* next) {
  return dispatch_dtype(dt, [&]<DType D>() { return ternary_chunk_t<D>(w, n, band, out, pos, val, count, next); });
}

// The bit patterns of |v| folded into the lanes of acc by an integer max: NaN > inf > numbers, so
// a NaN anywhere wins in any order (vmaxps would keep or drop it by its operand order).
inline __m512i max_abs_bits(__m512i acc, __m512 v) {
  return _mm512_max_epu32(acc, _mm512_and_si512(_mm512_castps_si512(v), _mm512_set1_epi32(int(kAbsMask))));
}

// Quantizes K values produced by value(i, mask) with the absmax whose bit patterns are in vmax.
template <typename Value>
__attribute__((always_inline)) inline void quantize_by_max(int64_t K, int8_t* q, float* scale, Value value, __m512i vmax) {
  const float s = row_scale(_mm512_reduce_max_epu32(vmax), K, q, scale);
  if (s == 0.0f) return;  // a NaN or an inf in the row: codes written
  const __m512 vs = _mm512_set1_ps(s);
  auto round16 = [&](int64_t i, __mmask16 m) {
    return _mm512_cvt_roundps_epi32(_mm512_mul_ps(value(i, m), vs), kRoundNearest);
  };
  // 64 values at a time: two saturating packs (int32 -> int16 -> int8, the same as saturating
  // once) and one permute to undo their per-lane interleave, then one 64-byte store.
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  int64_t i = 0;
  for (; i + 64 <= K; i += 64) {
    const __m512i ab = _mm512_packs_epi32(round16(i, 0xffff), round16(i + 16, 0xffff));
    const __m512i cd = _mm512_packs_epi32(round16(i + 32, 0xffff), round16(i + 48, 0xffff));
    _mm512_storeu_si512(q + i, _mm512_permutexvar_epi32(order, _mm512_packs_epi16(ab, cd)));
  }
  for (; i < K; i += 16) {
    const __mmask16 m = K - i >= 16 ? __mmask16(0xffff) : tail_mask(K - i);
    _mm_mask_storeu_epi8(q + i, m, _mm512_cvtsepi32_epi8(round16(i, m)));  // saturates to [-128, 127]
  }
}

void act_quant_row(const void* x, DType dt, int64_t K, int8_t* q, float* scale, const void* next) {
  dispatch_dtype(dt, [&]<DType D>() {
    constexpr int64_t es = D == DType::F32 ? 4 : 2;
    __m512i max0 = _mm512_setzero_si512(), max1 = _mm512_setzero_si512();  // two chains: latency
    int64_t i = 0;
    for (; i + 32 <= K; i += 32) {
      if (next) prefetch_part(next, i * es, (i + 32) * es);
      max0 = max_abs_bits(max0, load16<D>(x, i));
      max1 = max_abs_bits(max1, load16<D>(x, i + 16));
    }
    if (next) prefetch_part(next, i * es, K * es);
    for (; i < K; i += 16) {
      const __mmask16 m = K - i >= 16 ? __mmask16(0xffff) : tail_mask(K - i);
      max0 = max_abs_bits(max0, load16<D>(x, i, m));
    }
    quantize_by_max(K, q, scale, [&](int64_t at, __mmask16 m) { return load16<D>(x, at, m); }, _mm512_max_epu32(max0, max1));
  });
}

// Per-thread scratch, grown as needed; Tag keeps the users' buffers apart.
template <int Tag>
uint8_t* scratch(int64_t bytes) {
  struct Buf {
    uint8_t* p = nullptr;
    int64_t n = 0;
    ~Buf() { std::free(p); }
  };
  thread_local Buf b;
  if (b.n < bytes) {
    std::free(b.p);
    b.p = static_cast<uint8_t*>(std::aligned_alloc(64, size_t((bytes + 63) / 64 * 64)));
    if (!b.p) throw std::bad_alloc();
    b.n = bytes;
  }
  return b.p;
}

// y = (x * inv_rms) * w goes to an L1-sized scratch row in the absmax pass, so the quantize pass
// reads one stream and does one multiply (measured 25% faster than computing y twice).
void norm_quant_row(const void* x, DType dt, const float* w, int64_t K, float inv_rms, int8_t* q,
                    float* scale) {
  float* y = reinterpret_cast<float*>(scratch<0>(K * 4));
  dispatch_dtype(dt, [&]<DType D>() {
    const __m512 vinv = _mm512_set1_ps(inv_rms);
    __m512i max0 = _mm512_setzero_si512(), max1 = _mm512_setzero_si512();
    int64_t i = 0;
    for (; i + 32 <= K; i += 32) {
      const __m512 a = _mm512_mul_ps(_mm512_mul_ps(load16<D>(x, i), vinv), _mm512_loadu_ps(w + i));
      const __m512 b = _mm512_mul_ps(_mm512_mul_ps(load16<D>(x, i + 16), vinv), _mm512_loadu_ps(w + i + 16));
      _mm512_store_ps(y + i, a);
      _mm512_store_ps(y + i + 16, b);
      max0 = max_abs_bits(max0, a);
      max1 = max_abs_bits(max1, b);
    }
    for (; i < K; i += 16) {
      const __mmask16 m = K - i >= 16 ? __mmask16(0xffff) : tail_mask(K - i);
      const __m512 a = _mm512_mul_ps(_mm512_mul_ps(load16<D>(x, i, m), vinv), _mm512_maskz_loadu_ps(m, w + i));
      _mm512_store_ps(y + i, a);  // lanes past K: zeros into the scratch's padding
      max0 = max_abs_bits(max0, a);
    }
    quantize_by_max(K, q, scale, [&](int64_t at, __mmask16) { return _mm512_load_ps(y + at); }, _mm512_max_epu32(max0, max1));
  });
}

// ---- I2_S ---------------------------------------------------------------------------------------
// A 64-byte load of packed weights holds two 128-value blocks. Shifting right by 6, 4, 2, 0 and
// masking with 3 gives, for sub-block s, the codes of values 32s..32s+31 of both blocks. The
// activations are therefore laid out per pair of blocks as
//   [x[0:32] x[128:160]] [x[32:64] x[160:192]] [x[64:96] x[192:224]] [x[96:128] x[224:256]]
// so that each sub-block's activations are one contiguous 64-byte load. An odd last block keeps
// its natural order and is handled with 32-byte loads. The band path of prefill (from
// kBandMinRows rows) reorders the weights instead and reads the activations as they are.

// The sum of a row of int8 activations.
int32_t int8_row_sum(const int8_t* q, int64_t K) {
  const __m512i ones = _mm512_set1_epi8(1);  // vpdpbusd against ones: unsigned 1 x signed q
  __m512i acc = _mm512_setzero_si512();
  int64_t i = 0;
  for (; i + 64 <= K; i += 64) acc = _mm512_dpbusd_epi32(acc, ones, _mm512_loadu_si512(q + i));
  int32_t sum = _mm512_reduce_add_epi32(acc);
  for (; i < K; ++i) sum += q[i];
  return sum;
}

int32_t i2s_prepare_row(const int8_t* q, int64_t K, int8_t* out) {
  const int64_t pairs = K / 256;
  for (int64_t p = 0; out && p < pairs; ++p) {
    const int8_t* src = q + p * 256;
    int8_t* dst = out + p * 256;
    for (int s = 0; s < 4; ++s) {
      std::memcpy(dst + 64 * s, src + 32 * s, 32);
      std::memcpy(dst + 64 * s + 32, src + 128 + 32 * s, 32);
    }
  }
  if (out && K % 256) std::memcpy(out + pairs * 256, q + pairs * 256, 128);
  return int8_row_sum(q, K);
}

// Sums each of up to 16 vectors across its lanes: lane i of the result is the sum of v[i]
// (v[i] for i >= n taken as zero). A transpose tree: 45 instructions for 16 sums, where 16
// separate reductions take about 160.
inline __m512i reduce16(const __m512i* v, int n) {
  __m512i x[16];
  for (int i = 0; i < 16; ++i) x[i] = i < n ? v[i] : _mm512_setzero_si512();
  __m512i t[8], u[4], w[2];
  for (int i = 0; i < 8; ++i)  // per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3]
    t[i] = _mm512_add_epi32(_mm512_unpacklo_epi32(x[2 * i], x[2 * i + 1]), _mm512_unpackhi_epi32(x[2 * i], x[2 * i + 1]));
  for (int i = 0; i < 4; ++i)  // per 128-bit lane: partial sums of 4 inputs, in order
    u[i] = _mm512_add_epi32(_mm512_unpacklo_epi64(t[2 * i], t[2 * i + 1]), _mm512_unpackhi_epi64(t[2 * i], t[2 * i + 1]));
  for (int i = 0; i < 2; ++i)  // add 128-bit lanes pairwise, keeping two inputs' groups apart
    w[i] = _mm512_add_epi32(_mm512_shuffle_i32x4(u[2 * i], u[2 * i + 1], 0x88),
                            _mm512_shuffle_i32x4(u[2 * i], u[2 * i + 1], 0xDD));
  return _mm512_add_epi32(_mm512_shuffle_i32x4(w[0], w[1], 0x88), _mm512_shuffle_i32x4(w[0], w[1], 0xDD));
}

// R activation rows x C weight rows. Per sub-block: R activation loads, C unpacks (shift, mask),
// R*C vpdpbusd; registers: R*C accumulators, C packed, R activations, 1 code vector.
template <int R, int C>
void gemm_tile(const int8_t* acts, int64_t K, const uint8_t* W, int64_t row_bytes, int32_t* dots) {
  __m512i acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_si512();
  const __m512i mask3 = _mm512_set1_epi8(3);
  const int64_t pairs = K / 256;
  auto step = [&](const __m512i* raw, int64_t act_off, int s, bool half) {
    __m512i a[R];
    for (int r = 0; r < R; ++r)
      a[r] = half ? _mm512_zextsi256_si512(_mm256_loadu_si256((const __m256i*)(acts + r * K + act_off)))
                  : _mm512_loadu_si512(acts + r * K + act_off);
    for (int c = 0; c < C; ++c) {
      const __m512i u = _mm512_and_si512(_mm512_srli_epi16(raw[c], 6 - 2 * s), mask3);
      for (int r = 0; r < R; ++r) acc[r][c] = _mm512_dpbusd_epi32(acc[r][c], u, a[r]);
    }
  };
  for (int64_t p = 0; p < pairs; ++p) {
    __m512i raw[C];
    for (int c = 0; c < C; ++c) raw[c] = _mm512_loadu_si512(W + c * row_bytes + p * 64);
#pragma GCC unroll 4
    for (int s = 0; s < 4; ++s) step(raw, p * 256 + 64 * s, s, false);
  }
  if (K % 256) {  // odd last block: 32 bytes of codes, activations in natural order
    __m512i raw[C];
    for (int c = 0; c < C; ++c)
      raw[c] = _mm512_zextsi256_si512(_mm256_loadu_si256((const __m256i*)(W + c * row_bytes + pairs * 64)));
    for (int s = 0; s < 4; ++s) step(raw, pairs * 256 + 32 * s, s, true);
  }
  _mm512_storeu_si512(dots, reduce16(&acc[0][0], R * C));
}

// A full 4 x 4 tile with the float step done on the whole vector of 16 results (lane 4r + c is
// row r, column c): the same IEEE operations as i2s_rescale, so the same bits, in a fraction of
// the instructions, which matters at K = 2560 where a tile's main loop is short.
void gemm_tile_4x4(const int8_t* acts, int64_t K, const uint8_t* W, int64_t row_bytes, const int32_t* rowsum,
                   const float* x_scale, float w_scale, float* out, int64_t ldo) {
  alignas(64) int32_t dots[16];
  gemm_tile<4, 4>(acts, K, W, row_bytes, dots);
  const __m512i by_row = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
  const __m512i sums = _mm512_permutexvar_epi32(by_row, _mm512_castsi128_si512(_mm_loadu_si128((const __m128i*)rowsum)));
  const __m512 scales = _mm512_permutexvar_ps(by_row, _mm512_castps128_ps512(_mm_loadu_ps(x_scale)));
  const __m512i d = _mm512_sub_epi32(_mm512_load_si512(dots), sums);
  const __m512 v = _mm512_mul_ps(_mm512_div_ps(_mm512_cvtepi32_ps(d), scales), _mm512_set1_ps(w_scale));
  _mm_storeu_ps(out, _mm512_extractf32x4_ps(v, 0));
  _mm_storeu_ps(out + ldo, _mm512_extractf32x4_ps(v, 1));
  _mm_storeu_ps(out + 2 * ldo, _mm512_extractf32x4_ps(v, 2));
  _mm_storeu_ps(out + 3 * ldo, _mm512_extractf32x4_ps(v, 3));
}

// One activation row (decode): memory bound, so the loop must issue as few vector ops per weight
// byte as possible and keep the reads one sequential stream (one weight row at a time; adjacent
// rows are adjacent in memory). Hardware prefetchers alone keep too few lines in flight for one
// core to reach DRAM bandwidth here; a software prefetch into L2 (T2 hint) 8 KB ahead of the
// stream does, where an L1 prefetch (T0) or a short distance gains little (measured).
//
// The codes are not shifted down: sub-block s is masked in place, u = raw & (3 << (6 - 2s)) =
// code << (6 - 2s), and gets its own accumulator, each lane of which therefore holds its share of
// D_s << (6 - 2s) exactly (at most 4 * 192 * 128 * K / 256 < 2^31 for K <= kI2sMaxK). Shifting
// the four back at the end, lane by lane before they are added up, saves four shifts per 64 weight
// bytes.
constexpr int kPrefetchBytes = 8192;

int32_t gemv_row(const int8_t* act, int64_t K, const uint8_t* w) {
  __m512i acc[4];
  for (int s = 0; s < 4; ++s) acc[s] = _mm512_setzero_si512();
  const __m512i mask[4] = {_mm512_set1_epi8(char(0xC0)), _mm512_set1_epi8(0x30), _mm512_set1_epi8(0x0C),
                           _mm512_set1_epi8(0x03)};
  const int64_t pairs = K / 256;
  for (int64_t p = 0; p < pairs; ++p) {
    _mm_prefetch((const char*)(w + p * 64 + kPrefetchBytes), _MM_HINT_T2);
    const __m512i raw = _mm512_loadu_si512(w + p * 64);
    for (int s = 0; s < 4; ++s)
      acc[s] = _mm512_dpbusd_epi32(acc[s], _mm512_and_si512(raw, mask[s]), _mm512_loadu_si512(act + p * 256 + 64 * s));
  }
  if (K % 256) {
    const __m512i raw = _mm512_zextsi256_si512(_mm256_loadu_si256((const __m256i*)(w + pairs * 64)));
    for (int s = 0; s < 4; ++s) {
      const __m512i a = _mm512_zextsi256_si512(_mm256_loadu_si256((const __m256i*)(act + pairs * 256 + 32 * s)));
      acc[s] = _mm512_dpbusd_epi32(acc[s], _mm512_and_si512(raw, mask[s]), a);
    }
  }
  const __m512i d01 = _mm512_add_epi32(_mm512_srai_epi32(acc[0], 6), _mm512_srai_epi32(acc[1], 4));
  return _mm512_reduce_add_epi32(_mm512_add_epi32(d01, _mm512_add_epi32(_mm512_srai_epi32(acc[2], 2), acc[3])));
}

// Many activation rows (prefill): a band of 32 weight rows is first unpacked into a scratch
// buffer where each 64-byte vector holds, for 16 weight rows, 4 consecutive codes each (one dword
// per row). vpdpbusd of that vector with one activation dword broadcast to all lanes adds 4
// multiply-adds to each of 16 output sums, so the accumulators end as finished dot products: no
// horizontal reduction, and no unpacking in the inner loop. The band is unpacked once and serves
// all N activation rows, which pays from about 32 rows (measured); fewer rows take the 4 x 4
// tiles of gemm_tile below.
constexpr int kBand = 32;               // weight rows per band: two vectors of 16 lanes
constexpr int kBandTileRows = 8;        // activation rows per band tile: 16 accumulators
constexpr int64_t kBandMinRows = 32;

// 16 x 16 transpose of 32-bit elements, in place.
inline void transpose16(__m512i* v) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(v[i], v[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(v[i], v[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    v[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    v[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    v[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    v[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int i = 0; i < 8; ++i) {
    const int a = (i / 4) * 8 + i % 4;
    t[a] = _mm512_shuffle_i32x4(v[a], v[a + 4], 0x88);
    t[a + 4] = _mm512_shuffle_i32x4(v[a], v[a + 4], 0xDD);
  }
  for (int i = 0; i < 8; ++i) {
    v[i] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0x88);
    v[i + 8] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0xDD);
  }
}

// Unpacks weight rows [m, m + rows) (rows <= 32; missing rows read as code 0) into `buf`: for
// activation dword g (positions 4g..4g+3 of the row, natural order), buf[128 g .. 128 g + 63] holds
// rows 0..15 and buf[128 g + 64 ..] rows 16..31, 4 codes per row. Packed dword j of a 64-byte
// chunk holds the codes of activation dword j of all four sub-blocks (at shifts 6, 4, 2, 0), so
// the 16 rows' chunks are transposed once, as packed bytes, and each sub-block is then one shift
// and mask per vector: a quarter of the shuffles of transposing every sub-block's codes.
void unpack_band(const uint8_t* W, int64_t row_bytes, int64_t K, int64_t rows, uint8_t* buf) {
  const __m512i mask3 = _mm512_set1_epi8(3);
  const int64_t pairs = K / 256;
  for (int h = 0; h < 2; ++h) {
    const int64_t valid = std::clamp<int64_t>(rows - 16 * h, 0, 16);
    const uint8_t* src = W + 16 * h * row_bytes;
    uint8_t* dst = buf + 64 * h;
    for (int64_t p = 0; p <= pairs; ++p) {
      const bool odd = p == pairs;
      if (odd && K % 256 == 0) break;
      __m512i raw[16];
      for (int r = 0; r < 16; ++r)
        raw[r] = r >= valid ? _mm512_setzero_si512()
                 : odd      ? _mm512_zextsi256_si512(_mm256_loadu_si256((const __m256i*)(src + r * row_bytes + p * 64)))
                            : _mm512_loadu_si512(src + r * row_bytes + p * 64);
      transpose16(raw);  // raw[j]: packed dword j of the 16 rows
      // Sub-block s of packed dword j holds activation dword 8s + j of block 2p (j < 8) or
      // 8s + j - 8 of block 2p + 1, in natural order.
      for (int s = 0; s < 4; ++s)
        for (int j = 0; j < (odd ? 8 : 16); ++j) {
          const int64_t g = p * 64 + (j < 8 ? 8 * s + j : 32 + 8 * s + j - 8);
          _mm512_store_si512(dst + g * 128, _mm512_and_si512(_mm512_srli_epi16(raw[j], 6 - 2 * s), mask3));
        }
    }
  }
}

// acc += w (unsigned bytes) . the int8 dword at p broadcast to all lanes. Written as asm
// because GCC 12, given the intrinsic, surrounds each one with register copies and spills once
// the tile has more than a few accumulators.
inline void dpbusd_bcast(__m512i& acc, __m512i w, const int8_t* p) {
  __asm__("vpdpbusd %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(w), "m"(*reinterpret_cast<const int32_t*>(p)));
}

// 8 (kBandTileRows) activation rows x the 32 rows of an unpacked band, over all K. Rows
// r >= nrows repeat the last row and are not stored. The 16 accumulators are named variables:
// GCC 12 keeps an array of them in memory here, which halves the speed.
void band_tile(const int8_t* acts, int64_t K, int64_t nrows, const uint8_t* buf, const int32_t* rowsum,
               const float* x_scale, float w_scale, int64_t rows, float* out, int64_t ldo) {
  const int8_t* a[kBandTileRows];
  for (int r = 0; r < kBandTileRows; ++r) a[r] = acts + std::min<int64_t>(r, nrows - 1) * K;
#define WF_ROWS(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7)
#define WF_DECL(r) __m512i lo##r = _mm512_setzero_si512(), hi##r = lo##r;
  WF_ROWS(WF_DECL)
  const int64_t groups = K / 4;
  for (int64_t g = 0; g < groups; ++g) {
    const __m512i w0 = _mm512_load_si512(buf + g * 128), w1 = _mm512_load_si512(buf + g * 128 + 64);
#define WF_STEP(r)                           \
  dpbusd_bcast(lo##r, w0, a[r] + 4 * g); \
  dpbusd_bcast(hi##r, w1, a[r] + 4 * g);
    WF_ROWS(WF_STEP)
  }
  // The float step of i2s_rescale on 16 results at once: the same IEEE operations, the same bits.
  const __m512 ws = _mm512_set1_ps(w_scale);
  const __mmask16 m0 = tail_mask(std::clamp<int64_t>(rows, 0, 16));
  const __mmask16 m1 = tail_mask(std::clamp<int64_t>(rows - 16, 0, 16));
  auto finish = [&](int r, __m512i lo, __m512i hi) {
    if (r >= nrows) return;
    const __m512i s = _mm512_set1_epi32(rowsum[r]);
    const __m512 xs = _mm512_set1_ps(x_scale[r]);
    auto rescale = [&](__m512i d) {
      return _mm512_mul_ps(_mm512_div_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(d, s)), xs), ws);
    };
    _mm512_mask_storeu_ps(out + r * ldo, m0, rescale(lo));
    _mm512_mask_storeu_ps(out + r * ldo + 16, m1, rescale(hi));
  };
#define WF_FINISH(r) finish(r, lo##r, hi##r);
  WF_ROWS(WF_FINISH)
#undef WF_FINISH
#undef WF_STEP
#undef WF_DECL
#undef WF_ROWS
}

using TileFn = void (*)(const int8_t*, int64_t, const uint8_t*, int64_t, int32_t*);

template <int R, int... Cs>
constexpr auto tile_row(std::integer_sequence<int, Cs...>) {
  return std::array<TileFn, sizeof...(Cs)>{&gemm_tile<R, Cs + 1>...};
}

constexpr int kMaxR = 4, kMaxC = 4;
const std::array<std::array<TileFn, kMaxC>, kMaxR> kTiles = {
    tile_row<1>(std::make_integer_sequence<int, kMaxC>{}), tile_row<2>(std::make_integer_sequence<int, kMaxC>{}),
    tile_row<3>(std::make_integer_sequence<int, kMaxC>{}), tile_row<4>(std::make_integer_sequence<int, kMaxC>{})};

// The first kPrefetchBytes of weight rows [m0, m1), which the one-row paths' in-loop prefetch
// (kPrefetchBytes ahead) does not cover: requested at the start of a call, to start the stream.
inline void prefetch_head(const uint8_t* W, int64_t row_bytes, int64_t m0, int64_t m1) {
  const int64_t head = std::min<int64_t>(kPrefetchBytes, (m1 - m0) * row_bytes);
  for (int64_t off = 0; off < head; off += 64) _mm_prefetch((const char*)(W + m0 * row_bytes + off), _MM_HINT_T2);
}

// Prefill over weight rows [m0, m1) in bands of kBand rows: unpack(band's first row, rows, buf)
// writes a band in unpack_band's layout, which band_tile multiplies by every 8 activation rows.
template <typename Unpack>
void band_gemm(const int8_t* acts, const int32_t* rowsum, const float* x_scale, int64_t N, int64_t K,
               const uint8_t* W, int64_t row_bytes, float w_scale, int64_t m0, int64_t m1, float* out, int64_t ldo,
               Unpack&& unpack) {
  uint8_t* buf = scratch<1>(K * 32);  // one unpacked band
  const int64_t tiles = (N + kBandTileRows - 1) / kBandTileRows;
  // The first band: all its lines requested at once rather than as the unpacking reaches them.
  for (int64_t o = 0; o < std::min<int64_t>(kBand, m1 - m0) * row_bytes; o += 64)
    _mm_prefetch((const char*)(W + m0 * row_bytes + o), _MM_HINT_T0);
  for (int64_t m = m0; m < m1; m += kBand) {
    const int64_t rows = std::min<int64_t>(kBand, m1 - m);
    unpack(W + m * row_bytes, rows, buf);
    // The next band's weights, one slice per tile, into L2: unpacking 16 rows of cold weights
    // otherwise waits on memory for about as long as it computes (measured: 10% of the I2_S
    // matmul's time at N = 128 without, 5% with).
    const uint8_t* next = W + (m + kBand) * row_bytes;
    const int64_t next_bytes = std::clamp<int64_t>(m1 - m - kBand, 0, kBand) * row_bytes;
    const int64_t slice = (next_bytes / tiles + 63) / 64 * 64;
    for (int64_t n = 0, t = 0; n < N; n += kBandTileRows, ++t) {
      for (int64_t o = t * slice; o < std::min(next_bytes, (t + 1) * slice); o += 64)
        _mm_prefetch((const char*)(next + o), _MM_HINT_T1);
      band_tile(acts + n * K, K, std::min<int64_t>(kBandTileRows, N - n), buf, rowsum + n, x_scale + n, w_scale, rows,
                out + n * ldo + m, ldo);
    }
  }
}

void i2s_gemm(const int8_t* acts, const int32_t* rowsum, const float* x_scale, int64_t N, int64_t K,
              const uint8_t* W, float w_scale, int64_t m0, int64_t m1, float* out, int64_t ldo) {
  const int64_t row_bytes = K / 4;
  if (N == 1) {
    prefetch_head(W, row_bytes, m0, m1);
    for (int64_t m = m0; m < m1; ++m)
      out[m] = i2s_rescale(gemv_row(acts, K, W + m * row_bytes), rowsum[0], x_scale[0], w_scale);
    return;
  }
  if (N >= kBandMinRows) {
    band_gemm(acts, rowsum, x_scale, N, K, W, row_bytes, w_scale, m0, m1, out, ldo,
              [&](const uint8_t* w, int64_t rows, uint8_t* buf) { unpack_band(w, row_bytes, K, rows, buf); });
    return;
  }
  // A few activation rows: 4 x 4 tiles that unpack the codes in the inner loop; each unpacked
  // code vector serves 4 activation rows (the best of the R x C shapes from 2 x 8 to 8 x 2
  // measured here). Full tiles finish on one vector; the edges (N % 4, M % 4) take the narrower
  // tiles and the scalar step.
  for_each_tile(N, m0, m1, 4, 4, rowsum, x_scale, w_scale, out, ldo,
                [&](int64_t n, int64_t m, int64_t r, int64_t c, int32_t* dots) {
                  if (r == 4 && c == 4) {
                    gemm_tile_4x4(acts + n * K, K, W + m * row_bytes, row_bytes, rowsum + n, x_scale + n, w_scale,
                                  out + n * ldo + m, ldo);
                    return true;
                  }
                  kTiles[r - 1][c - 1](acts + n * K, K, W + m * row_bytes, row_bytes, dots);
                  return false;
                });
}

// ---- TQ1_0 -------------------------------------------------------------------------------------
// A TQ1_0 block of 256 values (54 bytes): qs[0:32] hold values 32n + j (byte j, digit n = 0..4),
// qs[32:48] values 160 + 16n + j, qh[0:4] values 240 + 4n + j (digit n = 0..3), then an fp16
// scale, which the engine checks is the tensor's. A byte holds its digits t_n (0, 1, 2 for -1,
// 0, +1) as q = ceil(v * 256 / 243), v = sum_n t_n 3^(4 - n) (qh: 3^(3 - n), times 3), and digit n
// is t_n = (3 x_n) >> 8 with x_n = q * 3^n mod 256, so x_{n+1} = 3 x_n mod 256: two byte adds.
//
// The one-row path never extracts a digit: 3 x_n - x_{n+1} = 256 t_n exactly, so
//   sum_i t_n,i a_i = (3 sum_i x_n,i a_i - sum_i x_n+1,i a_i) / 256,
// two vpdpbusd of the bytes x_n and x_{n+1} as they are, where extracting t_n takes two compares
// and two mask moves before its one vpdpbusd.

constexpr int64_t kTq1BlockBytes = 54;

inline __m512i times3(__m512i x) { return _mm512_add_epi8(_mm512_add_epi8(x, x), x); }
inline __m256i times3(__m256i x) { return _mm256_add_epi8(_mm256_add_epi8(x, x), x); }
inline __m128i times3(__m128i x) { return _mm_add_epi8(_mm_add_epi8(x, x), x); }

// Stands in for the blocks past a row's end in the last group of four: zero bytes give x_n = 0,
// which adds nothing.
alignas(64) constexpr uint8_t kZeroTq1Block[kTq1BlockBytes] = {};

// The one-row layout, 1024 bytes per group of four blocks A, B, C, D (zeros past the row's end):
//   [0, 640)     qs[0:32], blocks A B then C D: for digit n, [A 32n..+32 | B 32n..+32] at 64n
//                and [C 32n..+32 | D 32n..+32] at 320 + 64n;
//   [640, 960)   qs[32:48]: for digit n, [A | B | C | D] 160+16n..+16 at 640 + 64n;
//   [960, 1024)  qh: for digit n, [A | B | C | D] 240+4n..+4 at 960 + 16n.
// Each 64-byte vector of digits is then one load beside its weight bytes.
int32_t tq1_prepare_row(const int8_t* q, int64_t K, int8_t* out) {
  const int64_t blocks = K / 256;
  for (int64_t c = 0; out && c < (blocks + 3) / 4; ++c) {
    int8_t* dst = out + c * 1024;
    for (int h = 0; h < 4; ++h) {
      const int64_t b = 4 * c + h;
      auto put = [&](int64_t at, int64_t from, size_t len) {
        if (b < blocks) std::memcpy(dst + at, q + b * 256 + from, len);
        else std::memset(dst + at, 0, len);
      };
      for (int n = 0; n < 5; ++n) put(320 * (h / 2) + 64 * n + 32 * (h % 2), 32 * n, 32);
      for (int n = 0; n < 5; ++n) put(640 + 64 * n + 16 * h, 160 + 16 * n, 16);
      for (int n = 0; n < 4; ++n) put(960 + 16 * n + 4 * h, 240 + 4 * n, 4);
    }
  }
  return int8_row_sum(q, K);
}

// acc += x . a (vpdpbusd, unsigned x). As asm for the reason of dpbusd_bcast: with the
// intrinsic, GCC 12 copies every accumulator around each one and spills them.
inline void dpbusd_reg(__m512i& acc, __m512i x, __m512i a) { __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(x), "v"(a)); }

// Word indices into [ab | cd] (tq1_gemv_rows), where block h's bytes 32.. start at word 16h: its
// qs[32:48] are words 16h..16h+7, its qh words 16h+8, 16h+9. (Arrays, not vectors: a vector
// constant at namespace scope would run AVX-512 code when the library loads, on any CPU.)
alignas(64) constexpr int16_t kTq1Qs1Words[32] = {0,  1,  2,  3,  4,  5,  6,  7,  16, 17, 18, 19, 20, 21, 22, 23,
                                                  32, 33, 34, 35, 36, 37, 38, 39, 48, 49, 50, 51, 52, 53, 54, 55};
alignas(64) constexpr int16_t kTq1QhWords[32] = {8, 9, 24, 25, 40, 41, 56, 57, 8, 9, 24, 25, 40, 41, 56, 57,
                                                 8, 9, 24, 25, 40, 41, 56, 57, 8, 9, 24, 25, 40, 41, 56, 57};
// 3^n for every word of 16-byte lane n.
alignas(64) constexpr int16_t kTq1QhFactors[32] = {1, 1, 1, 1, 1, 1, 1, 1, 3,  3,  3,  3,  3,  3,  3,  3,
                                                   9, 9, 9, 9, 9, 9, 9, 9, 27, 27, 27, 27, 27, 27, 27, 27};

// sum_i t_i a_i over R = 1 or 2 TQ1_0 rows (digits t, not codes; rows row_bytes apart) into
// dots[0, R), with `act` in tq1_prepare_row's layout, four blocks at a time in full 64-byte
// vectors: 32 vpdpbusd per row and 1024 weights. Which digit a product belongs to does not matter
// to the sum, so all go to 5 pairs of accumulators per row, each a short chain. Two rows share
// each activation load and hide each other's latencies.
template <int R>
void tq1_gemv_rows(const int8_t* act, int64_t K, const uint8_t* w, int64_t row_bytes, int32_t* dots) {
  static_assert(R == 1 || R == 2);
  const int64_t blocks = K / 256;
  // Per digit n, sum x_n a (t, u: to be tripled) and sum x_{n+1} a (r, s) of the first and second
  // row, as named variables: GCC 12 keeps an array of them in memory, as in band_tile.
#define WF_DIGITS(X) X(0) X(1) X(2) X(3) X(4)
#define WF_DECL(n) __m512i t##n = _mm512_setzero_si512(), r##n = t##n, u##n = t##n, s##n = t##n;
  WF_DIGITS(WF_DECL)
  // The five digits of the bytes in v0 (and v1) against the five activation vectors from x.
#define WF_STEP(n)                                    \
  {                                                   \
    const __m512i a = _mm512_loadu_si512(x + 64 * n); \
    const __m512i v0n = times3(v0);                   \
    dpbusd_reg(t##n, v0, a);                          \
    dpbusd_reg(r##n, v0n, a);                         \
    v0 = v0n;                                         \
    if constexpr (R == 2) {                           \
      const __m512i v1n = times3(v1);                 \
      dpbusd_reg(u##n, v1, a);                        \
      dpbusd_reg(s##n, v1n, a);                       \
      v1 = v1n;                                       \
    }                                                 \
  }
  const __m512i qs1_words = _mm512_load_si512(kTq1Qs1Words), qh_words = _mm512_load_si512(kTq1QhWords);
  const __mmask32 tail = 0x3FFFFF;  // bytes 32..53 of a block: nothing past it is read
  // qh of the four blocks (16 bytes) in each 16-byte lane n, times 3^n: the four digits at once,
  // against the 64 activation bytes at 960. A byte times f mod 256 is the low byte of its word
  // times f, for the low byte as it stands and for the high byte with the low one cleared.
  const __m512i qh_factors = _mm512_load_si512(kTq1QhFactors);
  auto qh = [&](__m512i ab, __m512i cd) {
    const __m512i g = _mm512_permutex2var_epi16(ab, qh_words, cd);
    const __m512i low = _mm512_mullo_epi16(g, qh_factors);
    const __m512i high = _mm512_mullo_epi16(_mm512_and_si512(g, _mm512_set1_epi16(short(0xFF00))), qh_factors);
    return _mm512_mask_blend_epi8(__mmask64(0xAAAAAAAAAAAAAAAAull), low, high);
  };
  for (int64_t b = 0; b < blocks; b += 4) {
    const uint8_t* blk[2][4];
    for (int r = 0; r < R; ++r)
      for (int h = 0; h < 4; ++h)
        blk[r][h] = b + h < blocks ? w + r * row_bytes + (b + h) * kTq1BlockBytes : kZeroTq1Block;
    for (int r = 0; r < R; ++r)
      for (int l = 0; l < 4; ++l) _mm_prefetch((const char*)(blk[r][0] + kPrefetchBytes + 64 * l), _MM_HINT_T2);
    auto half = [&](int r, int h) {  // qs[0:32] of blocks h, h + 1
      return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i*)blk[r][h])),
                                _mm256_loadu_si256((const __m256i*)blk[r][h + 1]), 1);
    };
    // Bytes 32..53 of each block (qs[32:48], qh, the scale) in the 32-byte quarters of two
    // vectors; two word permutes gather qs[32:48] of the four blocks, and their qh into every
    // 16-byte lane.
    auto upper = [&](int r, int h) {
      return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_maskz_loadu_epi8(tail, blk[r][h] + 32)),
                                _mm256_maskz_loadu_epi8(tail, blk[r][h + 1] + 32), 1);
    };
    // The bytes 32.. of the four blocks first: their permutes and qh's multiplies then run
    // beside the digit steps of qs[0:32] instead of as one long chain after them (measured 10%
    // faster hot in L1).
    const __m512i ab0 = upper(0, 0), cd0 = upper(0, 2);
    const __m512i ab1 = R == 2 ? upper(R - 1, 0) : ab0, cd1 = R == 2 ? upper(R - 1, 2) : cd0;
    const __m512i qs1_0 = _mm512_permutex2var_epi16(ab0, qs1_words, cd0);
    const __m512i qs1_1 = R == 2 ? _mm512_permutex2var_epi16(ab1, qs1_words, cd1) : qs1_0;
    const __m512i qh0 = qh(ab0, cd0), qh1 = R == 2 ? qh(ab1, cd1) : qh0;
    const int8_t* x = act + b / 4 * 1024;
    {
      __m512i v0 = half(0, 0), v1 = R == 2 ? half(R - 1, 0) : v0;
      WF_DIGITS(WF_STEP)
    }
    x += 320;
    if (b + 2 < blocks) {  // not a last group of one or two blocks (K = 2560 ends with two)
      __m512i v0 = half(0, 2), v1 = R == 2 ? half(R - 1, 2) : v0;
      WF_DIGITS(WF_STEP)
    }
    x += 320;
    {
      __m512i v0 = qs1_0, v1 = qs1_1;
      WF_DIGITS(WF_STEP)
    }
    const __m512i a = _mm512_loadu_si512(x + 320);
    dpbusd_reg(t0, qh0, a);
    dpbusd_reg(r0, times3(qh0), a);
    if constexpr (R == 2) {
      dpbusd_reg(u0, qh1, a);
      dpbusd_reg(s0, times3(qh1), a);
    }
  }
  // Each lane of 3 t - r is 256 times its share of the sum: exact, so add up, then shift.
  __m512i tz0 = t0, rz0 = r0, tz1 = u0, rz1 = s0;
#define WF_SUM(n)                                                                \
  tz0 = _mm512_add_epi32(tz0, t##n);                                             \
  rz0 = _mm512_add_epi32(rz0, r##n);                                             \
  if constexpr (R == 2) tz1 = _mm512_add_epi32(tz1, u##n), rz1 = _mm512_add_epi32(rz1, s##n);
  WF_SUM(1) WF_SUM(2) WF_SUM(3) WF_SUM(4)
  auto digits_sum = [](__m512i t, __m512i r) { return _mm512_sub_epi32(_mm512_add_epi32(_mm512_add_epi32(t, t), t), r); };
  const __m512i z0 = digits_sum(tz0, rz0), z1 = digits_sum(tz1, rz1);
#undef WF_SUM
#undef WF_STEP
#undef WF_DECL
#undef WF_DIGITS
  dots[0] = _mm512_reduce_add_epi32(_mm512_srai_epi32(z0, 8));
  if constexpr (R == 2) dots[1] = _mm512_reduce_add_epi32(_mm512_srai_epi32(z1, 8));
}

// The digits (0, 1, 2) of one TQ1_0 row, K bytes in natural order.
void tq1_digits_row(const uint8_t* w, int64_t K, uint8_t* out) {
  const __m256i ones256 = _mm256_set1_epi8(1);
  const __m128i ones128 = _mm_set1_epi8(1);
  auto d256 = [&](__m256i x) {
    const __mmask32 one = _mm256_cmpgt_epu8_mask(x, _mm256_set1_epi8(85)), two = _mm256_cmpgt_epu8_mask(x, _mm256_set1_epi8(char(170)));
    const __m256i d = _mm256_maskz_mov_epi8(one, ones256);
    return _mm256_mask_add_epi8(d, two, d, ones256);
  };
  auto d128 = [&](__m128i x) {
    const __mmask16 one = _mm_cmpgt_epu8_mask(x, _mm_set1_epi8(85)), two = _mm_cmpgt_epu8_mask(x, _mm_set1_epi8(char(170)));
    const __m128i d = _mm_maskz_mov_epi8(one, ones128);
    return _mm_mask_add_epi8(d, two, d, ones128);
  };
  for (int64_t b = 0; b < K / 256; ++b) {
    const uint8_t* src = w + b * kTq1BlockBytes;
    uint8_t* dst = out + b * 256;
    __m256i v = _mm256_loadu_si256((const __m256i*)src);
    for (int n = 0; n < 5; ++n, v = times3(v)) _mm256_storeu_si256((__m256i*)(dst + 32 * n), d256(v));
    __m128i u = _mm_loadu_si128((const __m128i*)(src + 32));
    for (int n = 0; n < 5; ++n, u = times3(u)) _mm_storeu_si128((__m128i*)(dst + 160 + 16 * n), d128(u));
    uint32_t qh;
    std::memcpy(&qh, src + 48, 4);
    __m128i g = _mm_cvtsi32_si128(int(qh));
    for (int n = 0; n < 4; ++n, g = times3(g)) {
      const uint32_t t = uint32_t(_mm_cvtsi128_si32(d128(g)));
      std::memcpy(dst + 240 + 4 * n, &t, 4);
    }
  }
}

// Weight rows [m, m + rows) (rows <= 32) of TQ1_0 into unpack_band's layout: their digits, row
// by row into `digits` (32 x K bytes), then 16 x 16 dword transposes (missing rows are zeros).
void tq1_band(const uint8_t* W, int64_t row_bytes, int64_t K, int64_t rows, uint8_t* digits, uint8_t* buf) {
  for (int64_t r = 0; r < rows; ++r) tq1_digits_row(W + r * row_bytes, K, digits + r * K);
  for (int h = 0; h < 2; ++h) {
    const int64_t valid = std::clamp<int64_t>(rows - 16 * h, 0, 16);
    for (int64_t c = 0; c < K / 64; ++c) {  // activation dwords 16c .. 16c + 15
      __m512i v[16];
      for (int r = 0; r < 16; ++r)
        v[r] = r < valid ? _mm512_loadu_si512(digits + (16 * h + r) * K + 64 * c) : _mm512_setzero_si512();
      transpose16(v);  // v[j]: dword 16c + j of the 16 rows
      for (int j = 0; j < 16; ++j) _mm512_store_si512(buf + (16 * c + j) * 128 + 64 * h, v[j]);
    }
  }
}

void tq1_gemm(const int8_t* acts, const int32_t* rowsum, const float* x_scale, int64_t N, int64_t K,
              const uint8_t* W, float w_scale, int64_t m0, int64_t m1, float* out, int64_t ldo) {
  const int64_t row_bytes = K / 256 * kTq1BlockBytes;
  if (N == 1) {
    prefetch_head(W, row_bytes, m0, m1);
    int32_t dots[2];
    int64_t m = m0;
    for (; m + 2 <= m1; m += 2) {
      tq1_gemv_rows<2>(acts, K, W + m * row_bytes, row_bytes, dots);
      out[m] = i2s_rescale(dots[0], rowsum[0], x_scale[0], w_scale);
      out[m + 1] = i2s_rescale(dots[1], rowsum[0], x_scale[0], w_scale);
    }
    if (m < m1) {
      tq1_gemv_rows<1>(acts, K, W + m * row_bytes, row_bytes, dots);
      out[m] = i2s_rescale(dots[0], rowsum[0], x_scale[0], w_scale);
    }
    return;
  }
  // Two rows or more: the I2_S prefill over bands of digits, whatever N (TQ1_0 has no small-N tiles).
  uint8_t* digits = scratch<2>(K * 32);
  band_gemm(acts, rowsum, x_scale, N, K, W, row_bytes, w_scale, m0, m1, out, ldo,
            [&](const uint8_t* w, int64_t rows, uint8_t* buf) { tq1_band(w, row_bytes, K, rows, digits, buf); });
}

// ---- engine float kernels -----------------------------------------------------------------------

inline float hsum(__m512 v) { return _mm512_reduce_add_ps(v); }

float dot_f32(const float* a, const float* b, int64_t n) {
  __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), s0);
    s1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 16), _mm512_loadu_ps(b + i + 16), s1);
  }
  for (; i < n; i += 16) {
    const __mmask16 m = n - i >= 16 ? __mmask16(0xffff) : tail_mask(n - i);
    s0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + i), _mm512_maskz_loadu_ps(m, b + i), s0);
  }
  return hsum(_mm512_add_ps(s0, s1));
}

void axpy_f32(float a, const float* x, float* y, int64_t n) {
  const __m512 va = _mm512_set1_ps(a);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = n - i >= 16 ? __mmask16(0xffff) : tail_mask(n - i);
    _mm512_mask_storeu_ps(y + i, m, _mm512_fmadd_ps(va, _mm512_maskz_loadu_ps(m, x + i), _mm512_maskz_loadu_ps(m, y + i)));
  }
}

// exp(x) = 2^k * exp(r), k = round(x / ln 2), |r| <= ln(2) / 2, exp(r) by its Taylor series to
// degree 7 (truncation error < 1e-8 relative); inputs are clamped to [-87, 87].
inline __m512 exp512(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(87.0f));
  const __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), kRoundNearest);
  const __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693145751953125f), x);  // ln 2 in two parts
  const __m512 t = _mm512_fnmadd_ps(k, _mm512_set1_ps(1.428606765330187e-06f), r);
  __m512 p = _mm512_set1_ps(1.0f / 5040);
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(1.0f / 720));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, k);
}

void glu(const float* g, const float* u, float* out, int64_t n, bool silu) {
  const __m512 one = _mm512_set1_ps(1.0f), zero = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = n - i >= 16 ? __mmask16(0xffff) : tail_mask(n - i);
    const __m512 gv = _mm512_maskz_loadu_ps(m, g + i), uv = _mm512_maskz_loadu_ps(m, u + i);
    __m512 a;
    if (silu) {
      a = _mm512_div_ps(gv, _mm512_add_ps(one, exp512(_mm512_sub_ps(zero, gv))));
    } else {
      const __m512 r = _mm512_max_ps(gv, zero);
      a = _mm512_mul_ps(r, r);
    }
    _mm512_mask_storeu_ps(out + i, m, _mm512_mul_ps(a, uv));
  }
}

// One weight row at a time, read front to back, so the rows of a range form one sequential stream
// (the prefetcher's best case; interleaving a few rows made short streams that ran at a fraction
// of the bandwidth). The row stays in L1 across the activation rows; four accumulators hide the
// FMA latency.
void f16_gemm(const float* x, int64_t N, int64_t K, const uint16_t* W, int64_t m0, int64_t m1, float* out,
              int64_t ldo) {
  const int64_t K64 = K / 64 * 64;
  for (int64_t m = m0; m < m1; ++m) {
    const uint16_t* w = W + m * K;
    for (int64_t n = 0; n < N; ++n) {
      const float* xr = x + n * K;
      __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
      int64_t k = 0;
      for (; k < K64; k += 64) {
        a0 = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(w + k))), _mm512_loadu_ps(xr + k), a0);
        a1 = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(w + k + 16))),
                             _mm512_loadu_ps(xr + k + 16), a1);
        a2 = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(w + k + 32))),
                             _mm512_loadu_ps(xr + k + 32), a2);
        a3 = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(w + k + 48))),
                             _mm512_loadu_ps(xr + k + 48), a3);
      }
      for (; k < K; k += 16) {
        const __mmask16 mk = K - k >= 16 ? __mmask16(0xffff) : tail_mask(K - k);
        a0 = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mk, w + k)), _mm512_maskz_loadu_ps(mk, xr + k),
                             a0);
      }
      out[n * ldo + m] = hsum(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
    }
  }
}

void i8_gemm(const uint8_t* xu, const float* x_scale, int64_t N, int64_t K, const int8_t* W, const float* w_scale,
             const int32_t* wsum, int64_t m0, int64_t m1, float* out, int64_t ldo) {
  const int64_t K256 = K / 256 * 256;
  for (int64_t m = m0; m < m1; ++m) {
    const int8_t* w = W + m * K;
    for (int64_t n = 0; n < N; ++n) {
      const uint8_t* xr = xu + n * K;
      __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
      int64_t k = 0;
      for (; k < K256; k += 256) {
        a0 = _mm512_dpbusd_epi32(a0, _mm512_loadu_si512(xr + k), _mm512_loadu_si512(w + k));
        a1 = _mm512_dpbusd_epi32(a1, _mm512_loadu_si512(xr + k + 64), _mm512_loadu_si512(w + k + 64));
        a2 = _mm512_dpbusd_epi32(a2, _mm512_loadu_si512(xr + k + 128), _mm512_loadu_si512(w + k + 128));
        a3 = _mm512_dpbusd_epi32(a3, _mm512_loadu_si512(xr + k + 192), _mm512_loadu_si512(w + k + 192));
      }
      for (; k < K; k += 64) {
        const __mmask64 mk = K - k >= 64 ? ~__mmask64(0) : (__mmask64(1) << (K - k)) - 1;
        a0 = _mm512_dpbusd_epi32(a0, _mm512_maskz_loadu_epi8(mk, xr + k), _mm512_maskz_loadu_epi8(mk, w + k));
      }
      const int32_t d = _mm512_reduce_add_epi32(_mm512_add_epi32(_mm512_add_epi32(a0, a1), _mm512_add_epi32(a2, a3)));
      out[n * ldo + m] = float(d - 128 * wsum[m]) / x_scale[n] * w_scale[m];
    }
  }
}

uint64_t read_bytes(const uint8_t* p, int64_t n) {
  __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
  for (int64_t i = 0; i < n; i += 256) {
    a0 = _mm512_add_epi64(a0, _mm512_load_si512(p + i));
    a1 = _mm512_add_epi64(a1, _mm512_load_si512(p + i + 64));
    a2 = _mm512_add_epi64(a2, _mm512_load_si512(p + i + 128));
    a3 = _mm512_add_epi64(a3, _mm512_load_si512(p + i + 192));
  }
  return uint64_t(_mm512_reduce_add_epi64(_mm512_xor_si512(_mm512_xor_si512(a0, a1), _mm512_xor_si512(a2, a3))));
}

int64_t int8_macs(int64_t iters) {
  // 8 independent accumulators hide the vpdpbusd latency; named variables (not an array) stay in
  // registers, and the asm barrier keeps the compiler from folding the loop.
  __m512i a0 = _mm512_set1_epi32(0), a1 = _mm512_set1_epi32(1), a2 = _mm512_set1_epi32(2),
          a3 = _mm512_set1_epi32(3), a4 = _mm512_set1_epi32(4), a5 = _mm512_set1_epi32(5),
          a6 = _mm512_set1_epi32(6), a7 = _mm512_set1_epi32(7);
  __m512i u = _mm512_set1_epi8(1), x = _mm512_set1_epi8(2);
  for (int64_t it = 0; it < iters; ++it) {
    __asm__ volatile("" : "+v"(u), "+v"(x));
    a0 = _mm512_dpbusd_epi32(a0, u, x);
    a1 = _mm512_dpbusd_epi32(a1, u, x);
    a2 = _mm512_dpbusd_epi32(a2, u, x);
    a3 = _mm512_dpbusd_epi32(a3, u, x);
    a4 = _mm512_dpbusd_epi32(a4, u, x);
    a5 = _mm512_dpbusd_epi32(a5, u, x);
    a6 = _mm512_dpbusd_epi32(a6, u, x);
    a7 = _mm512_dpbusd_epi32(a7, u, x);
  }
  const __m512i sum = _mm512_add_epi32(_mm512_add_epi32(_mm512_add_epi32(a0, a1), _mm512_add_epi32(a2, a3)),
                                       _mm512_add_epi32(_mm512_add_epi32(a4, a5), _mm512_add_epi32(a6, a7)));
  volatile int32_t sink = _mm512_reduce_add_epi32(sum);
  (void)sink;
  return iters * 8 * 64;
}

}  // namespace

const Kernels& kernels() {
  static const Kernels k{"avx512",       chunk_sum,        square_sum,    ternary_round, ternary_chunk, act_quant_row, norm_quant_row,
                         i2s_prepare_row, i2s_gemm,        kBandMinRows,  tq1_prepare_row, tq1_gemm, /*tq1_natural_rows=*/2, /*tq1_fast=*/true,
                         f16_gemm,        i8_gemm,         dot_f32,
                         axpy_f32,        glu,             read_bytes,    int8_macs};
  return k;
}

}  // namespace wf::avx512
