// The table of packed ternary formats, shared by the packer, the GGUF writer and the engine.
//
//   i2_s  (bitnet.cpp, ggml type 36): blocks of 128 values in 32 bytes; byte b holds values b,
//         32+b, 64+b, 96+b in bits 7-6, 5-4, 3-2, 1-0; codes 0/1/2 = -1/0/+1. After the
//         M*K/4 code bytes: one float32 tensor scale and 28 zero bytes.
//   tq2_0 (llama.cpp, ggml type 35): blocks of 256 values: 64 bytes of codes (value+1), where in
//         each 32-byte half value m + 32n sits at bits 2n..2n+1 of byte m, then an fp16 scale.
//   tq1_0 (llama.cpp, ggml type 34): blocks of 256 values: 48 bytes of five base-3 digits, 4
//         bytes of four, each byte scaled to 256/243 (ceil), then an fp16 scale.
#pragma once

#include <cstdint>
#include <string>

namespace wf {

struct FormatInfo {
  const char* name;
  int ggml_type;       // GGML type id
  int block_values;    // values per block; K must be a multiple
  int block_bytes;     // bytes per block
  bool tensor_scale;   // one float32 scale for the tensor (else one fp16 scale per block)
  int tail_bytes;      // bytes after the blocks (i2_s: scale + padding)
};

constexpr FormatInfo kFormats[] = {
    {"i2_s", 36, 128, 32, true, 32},
    {"tq2_0", 35, 256, 66, false, 0},
    {"tq1_0", 34, 256, 54, false, 0},
};

const FormatInfo& format_info(const std::string& name);  // throws for unknown names
int64_t packed_bytes(const FormatInfo& f, int64_t M, int64_t K);  // validates K

// codes: int8 [M, K] in {-1, 0, 1}. scales: 1 value (the tensor scale; for per-block formats it
// becomes every block's scale), or one per block (M * K / block_values) for per-block formats.
// A block of zeros gets scale 0, as ggml's quantizer writes it.
void pack(const FormatInfo& f, const int8_t* codes, int64_t M, int64_t K, const float* scales,
          int64_t n_scales, uint8_t* out);

// One block of f at `in` as codes (-1, 0, 1), block_values of them; false on an invalid code (a 2-bit 3).
bool unpack_block(const FormatInfo& f, const uint8_t* in, int8_t* codes);

// The fp16 scale that ends block `block` (in row-major block order) of a per-block format, as float.
float block_scale(const FormatInfo& f, const uint8_t* buf, int64_t block);

// Inverse of pack. scales receives 1 value (tensor scale) or M * K / block_values.
void unpack(const FormatInfo& f, const uint8_t* buf, int64_t nbytes, int64_t M, int64_t K, int8_t* codes,
            float* scales);

}  // namespace wf
