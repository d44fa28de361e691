// Shared definitions for the CPU kernels: element types, half-precision conversion, errors.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

namespace wf {

// Element type of a float buffer handed over by the ops layer.
enum class DType : int { F32 = 0, BF16 = 1, F16 = 2 };

inline size_t dtype_size(DType d) { return d == DType::F32 ? 4 : 2; }

// Bad arguments become ValueError on the Python side (pybind11 maps std::invalid_argument).
[[noreturn]] inline void fail(const std::string& msg) { throw std::invalid_argument(msg); }

inline float bits_to_f32(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint32_t f32_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

inline float bf16_to_f32(uint16_t h) { return bits_to_f32(uint32_t(h) << 16); }

// IEEE half -> float, exact.
inline float f16_to_f32(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t man = h & 0x3ffu;
  if (exp == 0) {
    const float mag = float(man) * (1.0f / 16777216.0f);  // subnormal: man * 2^-24
    return sign ? -mag : mag;
  }
  // inf, or a NaN made quiet with its payload kept (as vcvtph2ps and torch convert it)
  if (exp == 31) return bits_to_f32(sign | 0x7f800000u | (man << 13) | (man ? 0x400000u : 0u));
  return bits_to_f32(sign | ((exp + 112u) << 23) | (man << 13));
}

// float -> IEEE half, round to nearest even (numpy's astype(float16)).
inline uint16_t f32_to_f16(float f) {
  uint32_t x = f32_to_bits(f);
  const uint16_t sign = uint16_t((x >> 16) & 0x8000u);
  x &= 0x7fffffffu;
  if (x == 0x7f800000u) return sign | 0x7c00u;  // inf
  if (x > 0x7f800000u) return sign | 0x7e00u | uint16_t((x >> 13) & 0x3ffu);  // NaN: quiet, payload's top bits
  if (x >= 0x477ff000u) return sign | 0x7c00u;  // rounds past 65504
  const uint32_t e = x >> 23;
  if (e < 113) {  // half subnormal (or zero): units of 2^-24
    const uint32_t shift = 126 - e;
    if (shift > 24) return sign;
    const uint32_t m = (x & 0x7fffffu) | 0x800000u;
    uint32_t r = m >> shift;
    const uint32_t rem = m & ((1u << shift) - 1u), half = 1u << (shift - 1);
    if (rem > half || (rem == half && (r & 1u))) ++r;
    return sign | uint16_t(r);
  }
  uint32_t r = ((e - 112u) << 10) | ((x & 0x7fffffu) >> 13);
  const uint32_t rem = x & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (r & 1u))) ++r;
  return sign | uint16_t(r);
}

template <DType D>
inline float load_f32(const void* p, int64_t i) {
  if constexpr (D == DType::F32) return static_cast<const float*>(p)[i];
  if constexpr (D == DType::BF16) return bf16_to_f32(static_cast<const uint16_t*>(p)[i]);
  if constexpr (D == DType::F16) return f16_to_f32(static_cast<const uint16_t*>(p)[i]);
}

// Calls f.template operator()<D>() for the runtime dtype.
template <typename F>
inline auto dispatch_dtype(DType d, F&& f) {
  switch (d) {
    case DType::F32: return f.template operator()<DType::F32>();
    case DType::BF16: return f.template operator()<DType::BF16>();
    case DType::F16: return f.template operator()<DType::F16>();
  }
  fail("unknown dtype code " + std::to_string(int(d)));
}

// Activation and weight quantization constants (DESIGN.md section 2).
constexpr float kWeightScaleFloor = 1e-5f;  // s = max(mean|W|, 1e-5)
constexpr float kActAbsmaxFloor = 1e-5f;    // a = max(max|x|, 1e-5)

// Non-finite values (reference.py defines the same): max|x| propagates a NaN, so a row holding one
// has scale 127 / NaN = NaN, and a row holding an inf has scale 127 / inf = 0. Every product
// x * scale of such a row is 0 or NaN, and a NaN quantizes to 0, so its codes are all zeros. The
// kernels take max|x| as the largest of the bit patterns |x| (NaN > inf > every number).
constexpr uint32_t kAbsMask = 0x7fffffffu;

// Stores the scale of a row of K values whose max|x| has the bit pattern absmax_bits, and returns it;
// or, where it is NaN or 0, writes the row's codes (all zeros) itself and returns 0.
inline float row_scale(uint32_t absmax_bits, int64_t K, int8_t* q, float* scale) {
  const float s = 127.0f / std::max(bits_to_f32(absmax_bits), kActAbsmaxFloor);  // std::max keeps a NaN
  *scale = s;
  if (s > 0.0f) return s;
  std::memset(q, 0, size_t(K));
  return 0.0f;
}

// Fixed-order double reductions (see ops/reference.py: pairwise_sum). The sum of a sequence is
// the pairwise sum of the sequence padded with zeros to a power of two: S(v) = S(first half) +
// S(second half). Zeros add exactly nothing, so any power-of-two block of it can be summed on its
// own: kernels sum blocks of kPairChunk elements (Kernels::chunk_sum) and combine the block sums
// pairwise (PairwiseAccumulator). Every backend (CPU ISAs, CUDA, Triton, the PyTorch reference) gives
// the same bits, whatever its threads or vector width.
constexpr int64_t kPairChunk = 1024;

// Pairwise sum of n <= kPairChunk doubles in buf (clobbered): the portable version of chunk_sum's
// reduction step, shared by the scalar and AVX2 tables.
inline double pairwise_reduce(double* buf, int64_t n) {
  int64_t p = 1;
  while (p < n) p <<= 1;
  for (int64_t i = n; i < p; ++i) buf[i] = 0.0;
  for (int64_t len = p; len > 1; len >>= 1)
    for (int64_t i = 0; i < len / 2; ++i) buf[i] = buf[2 * i] + buf[2 * i + 1];
  return buf[0];
}

// Portable chunk_sum: the pairwise sum of |x[i]| (or x[i]^2) over n <= kPairChunk elements.
template <DType D>
double chunk_sum_generic(const void* x, int64_t n, bool squares) {
  alignas(64) double buf[kPairChunk];
  for (int64_t i = 0; i < n; ++i) {
    const double v = double(load_f32<D>(x, i));
    buf[i] = squares ? v * v : std::fabs(v);
  }
  return pairwise_reduce(buf, n);
}

// Portable Kernels::square_sum: eight partial sums, so the loop vectorizes without reassociation.
template <DType D>
double square_sum_generic(const void* x, int64_t n) {
  double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) {
      const double v = double(load_f32<D>(x, i + j));
      acc[j] += v * v;
    }
  for (; i < n; ++i) {
    const double v = double(load_f32<D>(x, i));
    acc[0] += v * v;
  }
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

// Pairwise sum of a stream of block sums, each block a power of two of the same size: the
// combination the padded tree makes. A binary counter merges equal-sized neighbours as they
// complete (64 levels cover any count); result() adds what is left from the smallest (right-most)
// block up, which is what the zero padding to a power of two makes of it.
class PairwiseAccumulator {
 public:
  void add(double v) {
    int lv = 0;
    while (top_ > 0 && level_[top_ - 1] == lv) {
      v = stack_[--top_] + v;
      ++lv;
    }
    stack_[top_] = v;
    level_[top_++] = lv;
  }
  double result() const {
    if (top_ == 0) return 0.0;
    double acc = stack_[top_ - 1];
    for (int i = top_ - 2; i >= 0; --i) acc = stack_[i] + acc;
    return acc;
  }

 private:
  double stack_[64];
  int level_[64];
  int top_ = 0;
};

}  // namespace wf
