// The CPU ops as the Python layer calls them: validated raw buffers, threads, the active ISA.
// Pointers come from contiguous torch tensors checked by wrinklefree.ops; sizes are re-checked
// here so that a bad call fails with an error instead of reading out of bounds.
#pragma once

#include <cstdint>
#include <vector>

#include "cpu/common.h"

namespace wf {

// Pairwise sum (common.h) of |x[i]|, or x[i]^2 when squares, in double, on the active ISA.
double pairwise_sum(const void* x, DType dt, int64_t n, bool squares);
// RMSNorm's inv_rms of one row of K (kernels.h: rms_inv); *tree says whether the exact pairwise
// sum was needed, for tests of that path.
float rms_inv(const void* x, DType dt, int64_t K, double eps, bool* tree);

// codes[i] = clamp(round(w[i] * (1 / s)), -1, 1) with s = max(mean|w|, 1e-5); returns s.
// scale_hint: a guess at s (say, the last step's scale of a weight being trained), or 0 to estimate
// it from a sample. A good guess lets w be read once instead of twice; any guess gives the same result.
float ternary_quant(const void* w, DType dt, int64_t n, int8_t* codes, float scale_hint = 0.0f);

// Per row of K: scale[n] = 127 / max(max|x|, 1e-5); q = clamp(round(x * scale), -128, 127).
void act_quant_int8(const void* x, DType dt, int64_t N, int64_t K, int8_t* q, float* scale);

// RMSNorm (weight w, float32) followed by act_quant_int8, without writing the normalised rows.
// inv_rms, where not null, receives each row's 1 / sqrt(mean(x^2) + eps) (what a backward needs).
void rmsnorm_act_quant(const void* x, DType dt, const float* w, int64_t N, int64_t K, double eps, int8_t* q,
                       float* scale, float* inv_rms = nullptr);

// out[N, M] = (sum_k code * q - sum_k q) / x_scale * w_scale over packed I2_S weights of M x K.
// K is at most kI2sMaxK, so that no int32 sum can overflow whatever the bytes: the largest, a dot
// product with 2-bit codes up to 3, is at most 3 * 128 * K < 2^31.
constexpr int64_t kI2sMaxK = int64_t(1) << 22;
void i2s_matmul(const int8_t* q, const float* x_scale, int64_t N, int64_t K, const uint8_t* packed,
                int64_t packed_nbytes, int64_t M, float* out);

// The same product over TQ1_0 weights (K a multiple of 256, K / 256 * 54 bytes a row) with the
// tensor's one scale w_scale. has_native_tq1_0: the active ISA has a fast one (AVX-512), so the
// engine runs TQ1_0 files as stored; elsewhere this is portable scalar code.
// K is at most kTq1MaxK: the one-row path keeps 256 times each lane's share of the sum in an
// int32 lane, at most 256 * 2 * 128 * K / 16.
constexpr int64_t kTq1MaxK = int64_t(1) << 19;
void tq1_0_matmul(const int8_t* q, const float* x_scale, int64_t N, int64_t K, const uint8_t* packed,
                  int64_t packed_nbytes, int64_t M, float w_scale, float* out);
bool has_native_tq1_0();

// Several ternary matmuls of the same activations (Q, K and V; gate and up), in one pass over the
// threads: the activations are prepared once, and the weight rows of all of them are split into
// one list of work units. Each target writes out[N, M] (row stride M).
enum class TernaryFormat { I2S, TQ1_0 };
inline const char* format_name(TernaryFormat f) { return f == TernaryFormat::TQ1_0 ? "tq1_0" : "i2_s"; }
struct TernaryTarget {
  const uint8_t* W;  // I2_S: M*K/4 code bytes, then the float32 scale; TQ1_0: M rows of K / 256 blocks
  int64_t M;
  float* out;
  float w_scale;  // TQ1_0's tensor scale (I2_S's is read from W)
};
void ternary_matmul_multi(TernaryFormat fmt, const int8_t* q, const float* x_scale, int64_t N, int64_t K,
                          const TernaryTarget* targets, int n_targets);

// act_quant_int8 then i2s_matmul.
void bitlinear_infer(const void* x, DType dt, int64_t N, int64_t K, const uint8_t* packed, int64_t packed_nbytes,
                     int64_t M, float* out);

// Peak int8 multiply-adds per second of the active ISA's matmul instruction on all kernel threads.
double int8_mac_rate(double seconds);

// Read bandwidth in bytes/s of `threads` threads streaming a buffer of `nbytes`, best of `reps`.
double read_bandwidth(int64_t nbytes, int reps);

}  // namespace wf
