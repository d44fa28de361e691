#include "cpu/ops.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <vector>

#include "cpu/formats.h"
#include "cpu/isa.h"
#include "cpu/threadpool.h"

namespace wf {
namespace {

struct FreeDeleter {
  void operator()(void* p) const { std::free(p); }
};
template <typename T>
std::unique_ptr<T[], FreeDeleter> aligned_buffer(int64_t n) {
  const size_t bytes = (size_t(std::max<int64_t>(n, 1)) * sizeof(T) + 63) / 64 * 64;
  void* p = std::aligned_alloc(64, bytes);
  if (!p) throw std::bad_alloc();
  return std::unique_ptr<T[], FreeDeleter>(static_cast<T*>(p));
}

void check_positive(const char* what, int64_t v) {
  if (v < 1) fail(std::string(what) + " must be >= 1, got " + std::to_string(v));
}

}  // namespace

double pairwise_sum(const void* x, DType dt, int64_t n, bool squares) {
  check_positive("x.numel()", n);
  return pairwise_sum(active_kernels(), x, dt, n, squares);
}

float rms_inv(const void* x, DType dt, int64_t K, double eps, bool* tree) {
  check_positive("K", K);
  return rms_inv(active_kernels(), x, dt, K, eps, nullptr, tree);
}

namespace {

// The pairwise sum of |w| over [0, n), in parallel blocks combined in order (the result does not
// depend on the thread count). The sum over block c is partial[c].
double combine(const std::vector<double>& partial) {
  PairwiseAccumulator acc;
  for (double p : partial) acc.add(p);
  return acc.result();
}

float weight_scale(double abs_sum, int64_t n) { return std::max(float(abs_sum / double(n)), kWeightScaleFloor); }

// The codes of all of w at inv, in parallel. A weight holding a NaN has scale NaN, one holding an
// inf scale inf (reference.ternary_quant): every w * inv is then NaN or 0, and every code 0.
void round_all(const Kernels& k, const uint8_t* base, DType dt, int64_t n, float inv, int8_t* codes) {
  if (!(inv > 0.0f)) {
    parallel_for(n, n, [&](int64_t b, int64_t e) { std::memset(codes + b, 0, size_t(e - b)); });
    return;
  }
  const size_t es = dtype_size(dt);
  parallel_for((n + kPairChunk - 1) / kPairChunk, n, [&](int64_t c0, int64_t c1) {
    const int64_t b = c0 * kPairChunk, e = std::min(c1 * kPairChunk, n);
    k.ternary_round(base + b * es, dt, e - b, inv, codes + b);
  });
}

// The plain two passes: the sum of |w|, then the codes at its scale.
float ternary_quant_two_pass(const Kernels& k, const uint8_t* base, DType dt, int64_t n, int8_t* codes) {
  const size_t es = dtype_size(dt);
  const int64_t n_chunks = (n + kPairChunk - 1) / kPairChunk;
  std::vector<double> partial(n_chunks);
  parallel_for(n_chunks, n, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t b = c * kPairChunk, len = std::min(kPairChunk, n - b);
      partial[c] = k.chunk_sum(base + b * es, dt, len, /*squares=*/false, c + 1 < c1 ? base + (b + len) * es : nullptr);
    }
  });
  const float s = weight_scale(combine(partial), n);
  round_all(k, base, dt, n, 1.0f / s, codes);
  return s;
}

// mean|w| estimated from kSpots runs of w spread evenly over it, with the relative standard error
// of the estimate (from the spread of the runs' means); {0, 0} where w is too small to sample.
struct ScaleEstimate {
  double scale, rel_error;
};

ScaleEstimate estimate_scale(const Kernels& k, const uint8_t* base, DType dt, int64_t n) {
  // Runs of up to 16 KB, covering at most 1/16 of w: each run is a fresh start for memory (its
  // latency, a page walk), so fewer and longer runs cost less than many short ones for one size.
  constexpr int kSpots = 64;
  const size_t es = dtype_size(dt);
  const int64_t run = std::min<int64_t>(4 * kPairChunk, n / (16 * kSpots) / 16 * 16), step = n / kSpots;
  if (run < 64) return {0.0, 0.0};
  double mean[kSpots];
  parallel_for(kSpots, kSpots * run, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      const uint8_t* at = base + g * step * es;
      mean[g] = pairwise_sum(k, at, dt, run, /*squares=*/false, g + 1 < g1 ? at + step * es : nullptr) / double(run);
    }
  });
  double est = 0.0, var = 0.0;
  for (double m : mean) est += m / kSpots;
  for (double m : mean) var += (m - est) * (m - est);
  const double se = std::sqrt(var / (kSpots - 1) / kSpots);
  return {est, est > 0.0 ? se / est : 0.0};
}

}  // namespace

// ternary_quant reads w once where it can. The codes depend on the mean of all of w, which the
// plain way (ternary_quant_two_pass) must finish before it can round: two reads of w. Instead:
//   1. guess the scale (scale_hint, or an estimate from a sample of w) and bound it: s in
//      [s_lo, s_hi] with inv = 1 / s in [inv_lo, inv_hi];
//   2. one pass: the exact sum of |w| and the codes at the guess g = 1 / guess, noting the band of
//      elements whose code could differ at some inv in [inv_lo, inv_hi] (and their values);
//   3. if the true inv lies in [inv_lo, inv_hi], only band elements can be wrong: round them again
//      at inv from the noted values. Otherwise (a bad guess, or a band too wide to note), round all
//      of w again as the two-pass way does.
// The code of w is 0 where fl(|w| * inv) <= 0.5 and sign(w) above, monotone in inv; so an element's
// code can change between g and inv only if |w| * g lies near 0.5 * g / inv, which the band bounds
// with a margin for the two float roundings. Both ways give the same bits.
float ternary_quant(const void* w, DType dt, int64_t n, int8_t* codes, float scale_hint) {
  check_positive("w.numel()", n);
  if (!(scale_hint >= 0.0f) || !std::isfinite(scale_hint))
    fail("scale_hint must be a finite number >= 0 (0: estimate), got " + std::to_string(scale_hint));
  const Kernels& k = active_kernels();
  const size_t es = dtype_size(dt);
  const auto* base = static_cast<const uint8_t*>(w);
  // Below a few MB the second read comes from cache anyway; positions are noted in int32 per chunk.
  constexpr int64_t kOnePassMin = int64_t(1) << 22;
  double guess = scale_hint, rel = 0.005;
  if (guess == 0.0) {
    if (n < kOnePassMin) return ternary_quant_two_pass(k, base, dt, n, codes);
    const ScaleEstimate e = estimate_scale(k, base, dt, n);
    guess = e.scale;
    rel = std::max(4.0 * e.rel_error, 0.002);  // four standard errors, and not below 0.2%
  }
  if (!(guess > 0.0) || !std::isfinite(guess) || rel > 0.1) return ternary_quant_two_pass(k, base, dt, n, codes);
  const float s_lo = std::max(float(guess * (1.0 - rel)), kWeightScaleFloor);
  const float s_hi = std::max(float(guess * (1.0 + rel)), kWeightScaleFloor);
  const float g = 1.0f / std::max(float(guess), kWeightScaleFloor);
  const float inv_lo = 1.0f / s_hi, inv_hi = 1.0f / s_lo;
  // fl(|w| * inv) > 0.5 >= fl(|w| * g) needs |w| * g >= 0.5 * g / inv_hi * (1 - 2^-24)^2, and the
  // reverse |w| * g <= 0.5 * g / inv_lo * (1 + 2^-24)^2: the band, widened by 1e-6 for both roundings.
  const float band_lo = std::nextafter(float(0.5 * double(g) / double(inv_hi) * (1.0 - 1e-6)), 0.0f);
  const float band_hi = std::nextafter(float(0.5 * double(g) / double(inv_lo) * (1.0 + 1e-6)), 1.0f);
  const TernaryBand guess_band{g, band_lo, band_hi};

  // One pass. Each range of chunks notes its band in its own list; a list longer than 1/32 of its
  // elements (a guess far off, or many equal weights near the threshold) stops noting, and then
  // the codes are redone in full.
  struct Band {
    std::vector<int64_t> pos;
    std::vector<float> val;
  };
  std::mutex mu;
  std::vector<Band> bands;
  std::atomic<bool> overflow{false};
  const int64_t n_chunks = (n + kPairChunk - 1) / kPairChunk;
  std::vector<double> partial(n_chunks);
  parallel_for(n_chunks, n, [&](int64_t c0, int64_t c1) {
    Band band;
    const int64_t cap = (std::min(c1 * kPairChunk, n) - c0 * kPairChunk) / 32 + 16;
    alignas(64) int32_t pos[kPairChunk + 16];
    alignas(64) float val[kPairChunk + 16];
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t b = c * kPairChunk, len = std::min(kPairChunk, n - b);
      const uint8_t* x = base + b * es;
      const void* next = c + 1 < c1 ? x + len * es : nullptr;
      if (overflow.load(std::memory_order_relaxed)) {
        partial[c] = k.chunk_sum(x, dt, len, /*squares=*/false, next);
        continue;
      }
      int64_t m = 0;
      partial[c] = k.ternary_chunk(x, dt, len, guess_band, codes + b, pos, val, &m, next);
      if (int64_t(band.pos.size()) + m > cap) {
        overflow.store(true, std::memory_order_relaxed);
        continue;
      }
      for (int64_t i = 0; i < m; ++i) band.pos.push_back(b + pos[i]);
      band.val.insert(band.val.end(), val, val + m);
    }
    std::lock_guard<std::mutex> lk(mu);
    bands.push_back(std::move(band));
  });
  const float s = weight_scale(combine(partial), n);
  const float inv = 1.0f / s;
  if (overflow.load() || !(inv >= inv_lo && inv <= inv_hi)) {
    round_all(k, base, dt, n, inv, codes);
    return s;
  }
  // Round the band again at inv and write the codes that change: a few per thousand weights, on
  // lines of codes long gone to memory, so each write is prefetched a few ahead.
  parallel_for(int64_t(bands.size()), n / 64, [&](int64_t b0, int64_t b1) {
    std::vector<int8_t> now, before;
    std::vector<int64_t> changed;
    for (int64_t bi = b0; bi < b1; ++bi) {
      const Band& band = bands[size_t(bi)];
      const int64_t m = int64_t(band.pos.size());
      now.resize(size_t(m));
      before.resize(size_t(m));
      k.ternary_round(band.val.data(), DType::F32, m, inv, now.data());
      // the codes written at the guess, rounded again from the noted values: reading them back
      // from `codes` would be a cache miss each
      k.ternary_round(band.val.data(), DType::F32, m, g, before.data());
      changed.clear();
      for (int64_t i = 0; i < m; ++i)
        if (now[size_t(i)] != before[size_t(i)]) changed.push_back(i);
      constexpr size_t kAhead = 64;
      for (size_t j = 0; j < changed.size(); ++j) {
        if (j + kAhead < changed.size()) __builtin_prefetch(codes + band.pos[size_t(changed[j + kAhead])], 1);
        codes[band.pos[size_t(changed[j])]] = now[size_t(changed[j])];
      }
    }
  });
  return s;
}

void act_quant_int8(const void* x, DType dt, int64_t N, int64_t K, int8_t* q, float* scale) {
  check_positive("x.shape[0]", N);
  check_positive("x.shape[1]", K);
  const Kernels& k = active_kernels();
  const size_t row = size_t(K) * dtype_size(dt);
  parallel_for(N, N * K, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const uint8_t* xr = static_cast<const uint8_t*>(x) + n * row;
      k.act_quant_row(xr, dt, K, q + n * K, scale + n, n + 1 < n1 ? xr + row : nullptr);
    }
  });
}

void rmsnorm_act_quant(const void* x, DType dt, const float* w, int64_t N, int64_t K, double eps, int8_t* q,
                       float* scale, float* inv_rms) {
  check_positive("x.shape[0]", N);
  check_positive("x.shape[1]", K);
  if (!(eps >= 0.0)) fail("eps must be >= 0, got " + std::to_string(eps));
  const Kernels& k = active_kernels();
  const size_t row = size_t(K) * dtype_size(dt);
  parallel_for(N, N * K, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const uint8_t* xr = static_cast<const uint8_t*>(x) + n * row;
      const float inv = rms_inv(k, xr, dt, K, eps, n + 1 < n1 ? xr + row : nullptr);
      if (inv_rms) inv_rms[n] = inv;
      k.norm_quant_row(xr, dt, w, K, inv, q + n * K, scale + n);
    }
  });
}

namespace {

// One weight of `fmt` (described as `layout` in errors): its size checked, then run as a
// ternary_matmul_multi of one target.
void one_matmul(TernaryFormat fmt, const char* layout, const int8_t* q, const float* x_scale, int64_t N, int64_t K,
                const uint8_t* packed, int64_t packed_nbytes, int64_t M, float w_scale, float* out) {
  check_positive("q.shape[0]", N);
  check_positive("out_features", M);
  const char* name = format_name(fmt);
  const int64_t need = packed_bytes(format_info(name), M, K);
  if (packed_nbytes != need)
    fail("packed holds " + std::to_string(packed_nbytes) + " bytes; out_features=" + std::to_string(M) +
         " x K=" + std::to_string(K) + " in " + name + " needs " + layout + " = " + std::to_string(need));
  const TernaryTarget target{packed, M, out, w_scale};
  ternary_matmul_multi(fmt, q, x_scale, N, K, &target, 1);
}

}  // namespace

void i2s_matmul(const int8_t* q, const float* x_scale, int64_t N, int64_t K, const uint8_t* packed,
                int64_t packed_nbytes, int64_t M, float* out) {
  one_matmul(TernaryFormat::I2S, "M*K/4 + 32", q, x_scale, N, K, packed, packed_nbytes, M, 0.0f, out);
}

void tq1_0_matmul(const int8_t* q, const float* x_scale, int64_t N, int64_t K, const uint8_t* packed,
                  int64_t packed_nbytes, int64_t M, float w_scale, float* out) {
  one_matmul(TernaryFormat::TQ1_0, "M*K/256*54", q, x_scale, N, K, packed, packed_nbytes, M, w_scale, out);
}

bool has_native_tq1_0() { return active_kernels().tq1_fast; }

void ternary_matmul_multi(TernaryFormat fmt, const int8_t* q, const float* x_scale, int64_t N, int64_t K,
                          const TernaryTarget* targets, int n_targets) {
  check_positive("q.shape[0]", N);
  const Kernels& k = active_kernels();
  const bool tq1 = fmt == TernaryFormat::TQ1_0;
  const FormatInfo& fi = format_info(format_name(fmt));
  if (K % fi.block_values) fail("K=" + std::to_string(K) + " is not a multiple of " + std::to_string(fi.block_values));
  if (tq1 && K > kTq1MaxK) fail("K=" + std::to_string(K) + " is over the TQ1_0 matmul's limit of 2^19");
  if (K > kI2sMaxK) fail("K=" + std::to_string(K) + " is over the I2_S matmul's limit of 2^22");
  auto prepare = tq1 ? k.tq1_prepare_row : k.i2s_prepare_row;
  auto gemm = tq1 ? k.tq1_gemm : k.i2s_gemm;
  // The activations in the layout the gemm reads: q itself from natural_rows rows up, else a
  // prepared copy (which kernels may read up to 64 bytes past its last row).
  const bool natural = N >= (tq1 ? k.tq1_natural_rows : k.i2s_natural_rows);
  const int64_t row = tq1 ? tq1_prepared_bytes(K) : K;
  auto prepared = aligned_buffer<int8_t>(natural ? 0 : N * row + 64);
  const int8_t* acts = natural ? q : prepared.get();
  auto rowsum = aligned_buffer<int32_t>(N);
  parallel_for(N, N * K, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) rowsum[n] = prepare(q + n * K, K, natural ? nullptr : prepared.get() + n * row);
  });
  // Split the weight rows across threads in units of 32 rows (a multiple of every tile width);
  // one activation row (decode) has no tiles, and finer units balance its short calls better.
  // Units never straddle two targets.
  const int64_t unit = N == 1 ? 8 : 32;
  std::vector<int64_t> first(size_t(n_targets) + 1, 0);  // first unit of each target
  std::vector<float> w_scale(static_cast<size_t>(n_targets));
  int64_t total_bytes = 0;
  for (int t = 0; t < n_targets; ++t) {
    check_positive("out_features", targets[t].M);
    first[t + 1] = first[t] + (targets[t].M + unit - 1) / unit;
    if (tq1) w_scale[t] = targets[t].w_scale;
    else std::memcpy(&w_scale[t], targets[t].W + targets[t].M * K / 4, 4);
    total_bytes += packed_bytes(fi, targets[t].M, K);
  }
  parallel_for(first[n_targets], N * total_bytes, [&](int64_t u0, int64_t u1) {
    int t = 0;
    while (u0 < u1) {
      while (first[t + 1] <= u0) ++t;
      const int64_t u_end = std::min(u1, first[t + 1]);
      const TernaryTarget& tg = targets[t];
      gemm(acts, rowsum.get(), x_scale, N, K, tg.W, w_scale[t], (u0 - first[t]) * unit,
           std::min((u_end - first[t]) * unit, tg.M), tg.out, tg.M);
      u0 = u_end;
    }
  });
}

void bitlinear_infer(const void* x, DType dt, int64_t N, int64_t K, const uint8_t* packed, int64_t packed_nbytes,
                     int64_t M, float* out) {
  auto q = aligned_buffer<int8_t>(N * K);
  auto scale = aligned_buffer<float>(N);
  act_quant_int8(x, dt, N, K, q.get(), scale.get());
  i2s_matmul(q.get(), scale.get(), N, K, packed, packed_nbytes, M, out);
}

double int8_mac_rate(double seconds) {
  if (!(seconds > 0.0)) fail("seconds must be > 0");
  const Kernels& k = active_kernels();
  const int T = num_threads();
  constexpr int64_t kIters = 1 << 16;
  double best = 0.0;
  const auto until = std::chrono::steady_clock::now() + std::chrono::duration<double>(seconds);
  while (std::chrono::steady_clock::now() < until) {
    std::atomic<int64_t> macs{0};
    const auto start = std::chrono::steady_clock::now();
    parallel_for(T, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) macs += k.int8_macs(kIters);
    });
    const double sec = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    best = std::max(best, double(macs.load()) / sec);
  }
  return best;
}

double read_bandwidth(int64_t nbytes, int reps) {
  check_positive("nbytes", nbytes);
  check_positive("reps", reps);
  const Kernels& k = active_kernels();
  const int T = num_threads();
  const int64_t per = (nbytes / T + 4095) / 4096 * 4096;  // each thread reads its own pages
  auto buf = aligned_buffer<uint8_t>(per * T);
  // Touch the pages from the thread that will read them (first-touch placement).
  parallel_for(T, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) std::memset(buf.get() + t * per, int(t + 1), per);
  });
  std::vector<uint64_t> sink(T);
  double best = 0.0;
  for (int r = 0; r < reps; ++r) {
    const auto start = std::chrono::steady_clock::now();
    parallel_for(T, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) sink[t] += k.read_bytes(buf.get() + t * per, per);
    });
    const double sec = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    best = std::max(best, double(per * T) / sec);
  }
  volatile uint64_t keep = 0;
  for (uint64_t s : sink) keep = keep + s;
  (void)keep;
  return best;
}

}  // namespace wf
