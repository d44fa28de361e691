// The embedded CPU inference engine: a BitNet b1.58 decoder (DESIGN.md section 4) run from a
// memory-mapped GGUF file, with a KV cache. The weights it streams (the ternary projections and the
// output head) are copied at load into memory backed by transparent huge pages, unless the caller
// keeps them in the mapped file (use_mmap). Ternary projections go through the I2_S matmul
// (prefill: many rows; decode: the one-row path). TQ1_0 runs as stored where the kernels have a
// TQ1_0 matmul (AVX-512); TQ2_0 (and TQ1_0 elsewhere) is repacked to I2_S at load.
//
// The architecture key selects the graph of the engine that defines it:
//   bitnet-b1.58 (bitnet.cpp): FFN relu(gate)^2 * up
//   bitnet       (llama.cpp):  FFN silu(gate) * up
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "cpu/gguf.h"
#include "cpu/ops.h"

namespace wf::engine {

enum class Activation { ReLU2, SiLU };
enum class Head { F16, Int8 };

struct HParams {
  std::string arch;
  int64_t n_vocab = 0, n_embd = 0, n_layer = 0, n_ff = 0, n_head = 0, n_head_kv = 0, head_dim = 0, n_rot = 0;
  int64_t context_length = 0;
  double rms_eps = 1e-5, rope_base = 10000.0;
  Activation act = Activation::ReLU2;
};

// A ternary weight of M outputs x K inputs, in I2_S (M*K/4 code bytes, float32 scale, 28 zero
// bytes) or, where the kernels have a native TQ1_0 matmul, in TQ1_0 as the file holds it.
struct Projection {
  int64_t M = 0, K = 0;
  TernaryFormat fmt = TernaryFormat::I2S;
  const uint8_t* packed = nullptr;  // into the mapped file (use_mmap), or into the model's WeightArena
  float scale = 1.0f;               // TQ1_0: the tensor's scale (I2_S keeps it after its codes)
  float post_scale = 1.0f;          // an I2_S tensor's separate `.scale` tensor, if the file has one
};

struct Layer {
  const float *attn_norm = nullptr, *attn_sub_norm = nullptr, *ffn_norm = nullptr, *ffn_sub_norm = nullptr;
  Projection q, k, v, o, gate, up, down;
};

// Anonymous memory for the weights the engine keeps, 2 MB aligned and advised to transparent huge
// pages: decode streams every weight once per token, and from 2 MB pages it spends fewer cycles on
// TLB misses than from the file's 4 KB page-cache pages (about 5% more tokens/s on a 2B model,
// measured). Where the kernel gives no huge pages, these are ordinary pages.
class WeightArena {
 public:
  WeightArena() = default;
  WeightArena(const WeightArena&) = delete;
  WeightArena& operator=(const WeightArena&) = delete;
  ~WeightArena();
  void reserve(size_t bytes);   // once, before take(); untouched pages cost no memory
  uint8_t* take(size_t bytes);  // 64-byte aligned, zero-filled; at most the reserved bytes in all

 private:
  void* mapping_ = nullptr;
  size_t mapping_bytes_ = 0;
  uint8_t* base_ = nullptr;
  size_t capacity_ = 0, used_ = 0;
};

constexpr int64_t kMaxContext = int64_t(1) << 24;  // the longest context the engine takes

class Model {
 public:
  // n_ctx: KV cache positions, at most the file's context length (0: that length). head: "f16" (the stored head) or
  // "int8" (rows quantized at load to int8 with a float scale each). use_mmap: run the weights the file
  // holds in a runnable layout from its mapping (faster load, page cache shared between processes)
  // instead of copying them to huge pages.
  Model(const std::string& path, int64_t n_ctx, const std::string& head, bool use_mmap = false);
  ~Model();

  const HParams& hparams() const { return hp_; }
  const gguf::File& file() const { return *file_; }
  int64_t n_ctx() const { return n_ctx_; }
  // The format the ternary projections run in: "i2_s", or "tq1_0" when a TQ1_0 file runs as stored.
  const char* ternary_format() const;
  int64_t n_past() const { return n_past_; }

  // Runs tokens[0, n) at positions n_past.. and appends them to the cache. logits receives
  // n_vocab floats for the last token, or n * n_vocab when all_logits.
  void eval(const int32_t* tokens, int64_t n, float* logits, bool all_logits);
  void truncate(int64_t n);  // keep the first n cached positions

 private:
  void load_hparams();
  void load_weights(const std::string& head);
  size_t arena_bytes(const std::string& head) const;
  const uint8_t* keep(const uint8_t* data, int64_t nbytes);
  Projection projection(const std::string& name, int64_t M, int64_t K);
  const float* norm(const std::string& name, int64_t n);
  void attention(int64_t il, const float* q, int64_t N, float* out) const;
  void output(const float* x, int64_t N, float* logits) const;

  std::unique_ptr<gguf::File> file_;
  bool use_mmap_ = false;
  WeightArena arena_;
  HParams hp_;
  std::vector<Layer> layers_;
  const uint16_t* embd_f16_ = nullptr;  // token_embd, [n_vocab, n_embd]
  const float* embd_f32_ = nullptr;
  const float* output_norm_ = nullptr;
  // Every norm's weights, copied out of the file; layers_ point into them (an inner vector's buffer
  // stays where it is when norms_ grows).
  std::vector<std::vector<float>> norms_;
  Head head_ = Head::F16;
  const uint16_t* head_f16_ = nullptr;  // the output head as stored (token_embd or output.weight)
  const float* head_f32_ = nullptr;
  const int8_t* head_i8_ = nullptr;     // Head::Int8: rows (in the arena), scales and row sums
  std::vector<float> head_i8_scale_;
  std::vector<int32_t> head_i8_sum_;
  std::vector<float> inv_freq_;

  int64_t n_ctx_ = 0, n_past_ = 0;
  float* kv_ = nullptr;  // [layer][K or V][kv head][position][head_dim], mapped anonymously
  size_t kv_bytes_ = 0;
};

}  // namespace wf::engine
