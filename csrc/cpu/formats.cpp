#include "cpu/formats.h"

#include <atomic>
#include <cstring>

#include "cpu/common.h"
#include "cpu/threadpool.h"

namespace wf {

const FormatInfo& format_info(const std::string& name) {
  for (const auto& f : kFormats)
    if (name == f.name) return f;
  fail("fmt must be one of 'i2_s', 'tq2_0', 'tq1_0'; got '" + name + "'");
}

int64_t packed_bytes(const FormatInfo& f, int64_t M, int64_t K) {
  if (M < 1 || K < 1) fail("shape must be positive, got [" + std::to_string(M) + ", " + std::to_string(K) + "]");
  if (K % f.block_values)
    fail(std::string(f.name) + " needs K (the last dimension) to be a multiple of " +
         std::to_string(f.block_values) + ", got K=" + std::to_string(K));
  return M * (K / f.block_values) * f.block_bytes + f.tail_bytes;
}

namespace {

constexpr uint8_t kPow3[6] = {1, 3, 9, 27, 81, 243};

void check_codes(const int8_t* c, int64_t n, int64_t row) {
  for (int64_t i = 0; i < n; ++i)
    if (c[i] < -1 || c[i] > 1)
      fail("codes must be in {-1, 0, 1}; row " + std::to_string(row) + " holds " + std::to_string(int(c[i])));
}

// Base-3 digits d[0..n) (0..2, most significant first), shifted to fill the byte (ceil(q*256/243)).
uint8_t pack_trits(const int8_t* v, int stride, int n) {
  uint32_t q = 0;
  for (int i = 0; i < n; ++i) q = q * 3 + uint32_t(v[i * stride] + 1);
  for (int i = n; i < 5; ++i) q *= 3;
  return uint8_t((q * 256 + 242) / 243);
}
int8_t unpack_trit(uint8_t byte, int i) {
  const uint8_t q = uint8_t(byte * kPow3[i]);
  return int8_t(((uint32_t(q) * 3) >> 8)) - 1;
}

void pack_block(const FormatInfo& f, const int8_t* c, uint8_t* out) {
  if (f.ggml_type == 36) {  // i2_s
    for (int b = 0; b < 32; ++b)
      out[b] = uint8_t(((c[b] + 1) << 6) | ((c[32 + b] + 1) << 4) | ((c[64 + b] + 1) << 2) | (c[96 + b] + 1));
  } else if (f.ggml_type == 35) {  // tq2_0
    for (int h = 0; h < 2; ++h)
      for (int m = 0; m < 32; ++m) {
        const int8_t* v = c + 128 * h + m;
        out[32 * h + m] = uint8_t((v[0] + 1) | ((v[32] + 1) << 2) | ((v[64] + 1) << 4) | ((v[96] + 1) << 6));
      }
  } else {  // tq1_0: 32 bytes x 5 trits, 16 bytes x 5 trits, 4 bytes x 4 trits
    for (int m = 0; m < 32; ++m) out[m] = pack_trits(c + m, 32, 5);
    for (int m = 0; m < 16; ++m) out[32 + m] = pack_trits(c + 160 + m, 16, 5);
    for (int m = 0; m < 4; ++m) out[48 + m] = pack_trits(c + 240 + m, 4, 4);
  }
}

}  // namespace

bool unpack_block(const FormatInfo& f, const uint8_t* in, int8_t* c) {
  if (f.ggml_type == 36) {
    uint8_t bad = 0;
    for (int b = 0; b < 32; ++b) {
      const uint8_t v = in[b];
      for (int s = 0; s < 4; ++s) {
        const uint8_t code = (v >> (6 - 2 * s)) & 3;
        bad |= code == 3;
        c[32 * s + b] = int8_t(code) - 1;
      }
    }
    return !bad;
  }
  if (f.ggml_type == 35) {
    uint8_t bad = 0;
    for (int h = 0; h < 2; ++h)
      for (int m = 0; m < 32; ++m) {
        const uint8_t v = in[32 * h + m];
        for (int n = 0; n < 4; ++n) {
          const uint8_t code = (v >> (2 * n)) & 3;
          bad |= code == 3;
          c[128 * h + 32 * n + m] = int8_t(code) - 1;
        }
      }
    return !bad;
  }
  for (int m = 0; m < 32; ++m)
    for (int n = 0; n < 5; ++n) c[m + 32 * n] = unpack_trit(in[m], n);
  for (int m = 0; m < 16; ++m)
    for (int n = 0; n < 5; ++n) c[160 + m + 16 * n] = unpack_trit(in[32 + m], n);
  for (int m = 0; m < 4; ++m)
    for (int n = 0; n < 4; ++n) c[240 + m + 4 * n] = unpack_trit(in[48 + m], n);
  return true;
}

void pack(const FormatInfo& f, const int8_t* codes, int64_t M, int64_t K, const float* scales, int64_t n_scales,
          uint8_t* out) {
  const int64_t total = packed_bytes(f, M, K);
  const int64_t blocks_per_row = K / f.block_values;
  const int64_t n_blocks = M * blocks_per_row;
  if (f.tensor_scale ? n_scales != 1 : (n_scales != 1 && n_scales != n_blocks))
    fail(std::string("scale for ") + f.name + " must hold 1 value" +
         (f.tensor_scale ? "" : " or one per block (" + std::to_string(n_blocks) + ")") + ", got " +
         std::to_string(n_scales));
  const int code_bytes = f.tensor_scale ? f.block_bytes : f.block_bytes - 2;
  parallel_for(M, M * K, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      check_codes(codes + m * K, K, m);
      for (int64_t b = 0; b < blocks_per_row; ++b) {
        const int8_t* c = codes + m * K + b * f.block_values;
        uint8_t* o = out + (m * blocks_per_row + b) * f.block_bytes;
        pack_block(f, c, o);
        if (!f.tensor_scale) {
          bool any = false;
          for (int i = 0; i < f.block_values; ++i) any |= c[i] != 0;
          const float d = any ? scales[n_scales == 1 ? 0 : m * blocks_per_row + b] : 0.0f;
          const uint16_t h = f32_to_f16(d);
          std::memcpy(o + code_bytes, &h, 2);
        }
      }
    }
  });
  if (f.tensor_scale) {
    uint8_t* tail = out + total - f.tail_bytes;
    std::memset(tail, 0, f.tail_bytes);
    std::memcpy(tail, scales, 4);
  }
}

float block_scale(const FormatInfo& f, const uint8_t* buf, int64_t block) {
  uint16_t h;
  std::memcpy(&h, buf + (block + 1) * f.block_bytes - 2, 2);
  return f16_to_f32(h);
}

void unpack(const FormatInfo& f, const uint8_t* buf, int64_t nbytes, int64_t M, int64_t K, int8_t* codes,
            float* scales) {
  const int64_t total = packed_bytes(f, M, K);
  if (nbytes != total)
    fail("buf holds " + std::to_string(nbytes) + " bytes; a [" + std::to_string(M) + ", " + std::to_string(K) +
         "] " + f.name + " tensor needs " + std::to_string(total));
  const int64_t blocks_per_row = K / f.block_values;
  std::atomic<int64_t> bad_row{-1};
  parallel_for(M, M * K, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m)
      for (int64_t b = 0; b < blocks_per_row; ++b) {
        const uint8_t* in = buf + (m * blocks_per_row + b) * f.block_bytes;
        if (!unpack_block(f, in, codes + m * K + b * f.block_values)) bad_row.store(m);
        if (!f.tensor_scale) scales[m * blocks_per_row + b] = block_scale(f, buf, m * blocks_per_row + b);
      }
  });
  if (bad_row.load() >= 0)
    fail(std::string("buf is not valid ") + f.name + ": row " + std::to_string(bad_row.load()) +
         " holds the unused 2-bit code 3");
  if (f.tensor_scale) std::memcpy(scales, buf + total - f.tail_bytes, 4);
}

}  // namespace wf
