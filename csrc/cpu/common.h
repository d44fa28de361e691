// Shared definitions for the CPU kernels: element types, half-precision conversion, errors.
#pragma once

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
  if (exp == 31) return bits_to_f32(sign | 0x7f800000u | (man << 13));
  return bits_to_f32(sign | ((exp + 112u) << 23) | (man << 13));
}

// float -> IEEE half, round to nearest even (numpy's astype(float16)).
inline uint16_t f32_to_f16(float f) {
  uint32_t x = f32_to_bits(f);
  const uint16_t sign = uint16_t((x >> 16) & 0x8000u);
  x &= 0x7fffffffu;
  if (x >= 0x7f800000u) return sign | 0x7c00u | (x > 0x7f800000u ? 0x200u : 0u);  // inf, nan
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

// Fixed-order double reductions. Every backend sums v[i] into lane i % 8 in index order and
// combines the lanes as ((l0+l1)+(l2+l3))+((l4+l5)+(l6+l7)), so all ISAs and the PyTorch
// reference produce the same bits (see ops/reference.py: _lane_sum).
inline double combine_lanes(const double l[8]) {
  return ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]));
}
// The weight mean is reduced in chunks of this many elements (summed in order), so threads can
// share the work without changing the result.
constexpr int64_t kSumChunk = 1 << 16;

}  // namespace wf
