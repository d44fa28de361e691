#include "cpu/engine.h"

#include <sys/mman.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <initializer_list>
#include <utility>
#include <limits>
#include <numeric>
#include <new>

#include "cpu/common.h"
#include "cpu/formats.h"
#include "cpu/isa.h"
#include "cpu/ops.h"
#include "cpu/threadpool.h"

namespace wf::engine {
namespace {

using gguf::TensorInfo;

std::string layer_tensor(int64_t il, const char* name) { return "blk." + std::to_string(il) + "." + name; }

std::string shape_str(const std::vector<int64_t>& ne) {
  std::string s = "[";
  for (size_t i = 0; i < ne.size(); ++i) s += (i ? ", " : "") + std::to_string(ne[i]);
  return s + "]";
}

// RMSNorm of N rows of K floats into out (float32), with the sum of squares of rmsnorm_act_quant.
void rms_norm(const Kernels& k, const float* x, const float* w, int64_t N, int64_t K, double eps, float* out) {
  for (int64_t n = 0; n < N; ++n) {
    const float* xr = x + n * K;
    const float inv = rms_inv(k, xr, DType::F32, K, eps, n + 1 < N ? xr + K : nullptr);
    for (int64_t i = 0; i < K; ++i) out[n * K + i] = (xr[i] * inv) * w[i];
  }
}

// Ternary projections of the same N quantized rows, in one pass over the threads per format (a
// file's projections normally share one): outs[i][N, M_i].
void project(std::initializer_list<std::pair<const Projection*, float*>> jobs, const int8_t* q, const float* scale,
             int64_t N) {
  for (const TernaryFormat fmt : {TernaryFormat::I2S, TernaryFormat::TQ1_0}) {
    TernaryTarget targets[3];
    int n = 0;
    for (const auto& [p, out] : jobs)
      if (p->fmt == fmt) targets[n++] = {p->packed, p->M, out, p->scale};
    if (n) ternary_matmul_multi(fmt, q, scale, N, jobs.begin()->first->K, targets, n);
  }
  for (const auto& [p, out] : jobs)
    if (p->post_scale != 1.0f)
      for (int64_t i = 0; i < N * p->M; ++i) out[i] *= p->post_scale;
}

constexpr size_t kHugePage = size_t(2) << 20;

}  // namespace

WeightArena::~WeightArena() {
  if (mapping_) ::munmap(mapping_, mapping_bytes_);
}

void WeightArena::reserve(size_t bytes) {
  if (mapping_) fail("WeightArena::reserve called twice");
  capacity_ = (std::max<size_t>(bytes, 1) + kHugePage - 1) / kHugePage * kHugePage;
  mapping_bytes_ = capacity_ + kHugePage;  // room to align the start to a huge page
  void* p = ::mmap(nullptr, mapping_bytes_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) fail("cannot reserve " + std::to_string(bytes) + " bytes for the weights: " + std::strerror(errno));
  mapping_ = p;
  base_ = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(p) + kHugePage - 1) / kHugePage * kHugePage);
  ::madvise(base_, capacity_, MADV_HUGEPAGE);  // a hint: refused where the kernel has no huge pages
}

uint8_t* WeightArena::take(size_t bytes) {
  const size_t n = (bytes + 63) / 64 * 64;
  if (n > capacity_ - used_)
    fail("WeightArena: " + std::to_string(bytes) + " bytes asked, " + std::to_string(capacity_ - used_) + " left");
  uint8_t* p = base_ + used_;
  used_ += n;
  return p;
}

Model::Model(const std::string& path, int64_t n_ctx, const std::string& head, bool use_mmap) : use_mmap_(use_mmap) {
  if (head != "f16" && head != "int8") fail("head must be 'f16' or 'int8', got '" + head + "'");
  if (n_ctx < 0) fail("n_ctx must be >= 0, got " + std::to_string(n_ctx));
  if (n_ctx > kMaxContext) fail("n_ctx must be at most 2^24, got " + std::to_string(n_ctx));
  file_ = std::make_unique<gguf::File>(path);
  load_hparams();
  // At most the trained context (when the file gives one): past it the positions mean nothing.
  n_ctx_ = hp_.context_length && (!n_ctx || n_ctx > hp_.context_length) ? hp_.context_length : n_ctx;
  if (n_ctx_ < 1) fail("n_ctx must be >= 1 (the file gives no context length)");
  load_weights(head);
  // Each factor is at most 2^24 (load_hparams), so the product could pass 2^64: check each step.
  uint64_t kv = 2 * 4;  // K and V, float32
  for (const int64_t factor : {hp_.n_layer, hp_.n_head_kv, n_ctx_, hp_.head_dim})
    if (__builtin_mul_overflow(kv, uint64_t(factor), &kv) || kv > (uint64_t(1) << 48))
      fail("the KV cache for n_ctx=" + std::to_string(n_ctx_) + " would pass 2^48 bytes; pass a smaller n_ctx");
  kv_bytes_ = size_t(kv);
  // Anonymous pages are zero and take memory only once written: a long context costs nothing
  // until it is used.
  void* p = ::mmap(nullptr, std::max<size_t>(kv_bytes_, 1), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED)
    fail("cannot reserve " + std::to_string(kv_bytes_) + " bytes for the KV cache of n_ctx=" + std::to_string(n_ctx_) +
         "; pass a smaller n_ctx");
  kv_ = static_cast<float*>(p);
}

Model::~Model() {
  if (kv_) ::munmap(kv_, std::max<size_t>(kv_bytes_, 1));
}

void Model::load_hparams() {
  const gguf::File& f = *file_;
  hp_.arch = f.get_string("general.architecture");
  if (hp_.arch == "bitnet-b1.58") {
    hp_.act = Activation::ReLU2;
  } else if (hp_.arch == "bitnet") {
    hp_.act = Activation::SiLU;
  } else {
    f.error("unsupported architecture '" + hp_.arch + "' (the engine runs bitnet-b1.58 and bitnet)");
  }
  const std::string a = hp_.arch + ".";
  hp_.n_embd = f.get_int(a + "embedding_length");
  hp_.n_layer = f.get_int(a + "block_count");
  hp_.n_ff = f.get_int(a + "feed_forward_length");
  hp_.n_head = f.get_int(a + "attention.head_count");
  hp_.n_head_kv = f.get_int(a + "attention.head_count_kv", hp_.n_head);
  hp_.context_length = f.get_int(a + "context_length", 0);
  if (hp_.context_length < 0 || hp_.context_length > kMaxContext)
    f.error("context_length must be in [0, 2^24], got " + std::to_string(hp_.context_length));
  hp_.rms_eps = f.get_float(a + "attention.layer_norm_rms_epsilon", 1e-5);
  hp_.rope_base = f.get_float(a + "rope.freq_base", 10000.0);
  auto positive = [&](const char* what, int64_t v) {
    if (v < 1 || v > (int64_t(1) << 24)) f.error(std::string(what) + " must be in [1, 2^24], got " + std::to_string(v));
  };
  positive("embedding_length", hp_.n_embd);
  positive("block_count", hp_.n_layer);
  positive("feed_forward_length", hp_.n_ff);
  positive("attention.head_count", hp_.n_head);
  positive("attention.head_count_kv", hp_.n_head_kv);
  if (hp_.n_embd % hp_.n_head || hp_.n_head % hp_.n_head_kv)
    f.error("embedding_length " + std::to_string(hp_.n_embd) + ", head_count " + std::to_string(hp_.n_head) +
            " and head_count_kv " + std::to_string(hp_.n_head_kv) + " do not divide evenly");
  hp_.head_dim = hp_.n_embd / hp_.n_head;
  hp_.n_rot = f.get_int(a + "rope.dimension_count", hp_.head_dim);
  if (hp_.n_rot < 2 || hp_.n_rot > hp_.head_dim || hp_.n_rot % 2)
    f.error("rope.dimension_count " + std::to_string(hp_.n_rot) + " must be even and at most the head size " +
            std::to_string(hp_.head_dim));
  if (!(hp_.rms_eps >= 0.0) || !std::isfinite(hp_.rms_eps))
    f.error("attention.layer_norm_rms_epsilon must be a finite number >= 0, got " + std::to_string(hp_.rms_eps));
  if (!(hp_.rope_base > 0.0) || !std::isfinite(hp_.rope_base))
    f.error("rope.freq_base must be a finite number > 0, got " + std::to_string(hp_.rope_base));
  // As transformers computes it: inv_freq = 1 / base^(2i / n_rot), in float32.
  for (int64_t i = 0; i < hp_.n_rot / 2; ++i)
    inv_freq_.push_back(1.0f / std::pow(float(hp_.rope_base), float(2 * i) / float(hp_.n_rot)));
}

const float* Model::norm(const std::string& name, int64_t n) {
  const TensorInfo* t = file_->tensor(name);
  if (!t) file_->error("missing tensor " + name);
  if (t->type != gguf::kF32 || t->n_elements() != n)
    file_->error("tensor " + name + " must be F32 with " + std::to_string(n) + " values, got " +
                 gguf::type_name(t->type) + " " + shape_str(t->ne));
  std::vector<float>& copy = norms_.emplace_back(size_t(n));
  std::memcpy(copy.data(), t->data, size_t(n) * sizeof(float));
  return copy.data();
}

Projection Model::projection(const std::string& name, int64_t M, int64_t K) {
  const gguf::File& f = *file_;
  const TensorInfo* t = f.tensor(name);
  if (!t) f.error("missing tensor " + name);
  if (t->ne.size() != 2 || t->ne[0] != K || t->ne[1] != M)
    f.error("tensor " + name + " must have shape [" + std::to_string(K) + ", " + std::to_string(M) +
            "] (ggml order), got " + shape_str(t->ne));
  if (K > kI2sMaxK)
    f.error("tensor " + name + " has rows of " + std::to_string(K) + " values; the engine's matmul takes at most 2^22");
  Projection p;
  p.M = M;
  p.K = K;
  float extra = 1.0f;  // llama.cpp's optional per-tensor scale, multiplied into the output
  const std::string scale_name = name.substr(0, name.size() - std::string("weight").size()) + "scale";
  if (const TensorInfo* s = f.tensor(scale_name)) {
    if (s->type != gguf::kF32 || s->n_elements() != 1) f.error("tensor " + scale_name + " must be one F32 value");
    std::memcpy(&extra, s->data, 4);
    if (!std::isfinite(extra)) f.error("tensor " + scale_name + " is " + std::to_string(extra) + ", not a finite number");
  }
  if (t->type == gguf::kI2_S) {
    float scale;  // the tensor's scale, in the tail after the M * K / 4 code bytes
    std::memcpy(&scale, t->data + M * K / 4, 4);
    if (!std::isfinite(scale)) f.error("tensor " + name + ": its I2_S scale is " + std::to_string(scale) + ", not a finite number");
    p.packed = keep(t->data, t->nbytes);
    p.post_scale = extra;
    return p;
  }
  const char* fmt = t->type == gguf::kTQ2_0 ? "tq2_0" : t->type == gguf::kTQ1_0 ? "tq1_0" : nullptr;
  if (!fmt)
    f.error("tensor " + name + " has type " + gguf::type_name(t->type) +
            "; the engine runs ternary projections in I2_S, TQ2_0 or TQ1_0");
  // Both kernels keep one scale for the tensor: every block scale must be that scale (or 0, for a
  // block of zeros, as ggml's quantizer writes it).
  const FormatInfo& fi = format_info(fmt);
  if (t->nbytes != packed_bytes(fi, M, K))
    f.error("tensor " + name + " holds " + std::to_string(t->nbytes) + " bytes, not the " +
            std::to_string(packed_bytes(fi, M, K)) + " of " + fmt + " [" + std::to_string(M) + ", " + std::to_string(K) + "]");
  float s = 0.0f;
  for (int64_t b = 0; b < M * K / fi.block_values; ++b) {
    const float d = block_scale(fi, t->data, b);
    if (!std::isfinite(d)) f.error("tensor " + name + ": block " + std::to_string(b) + " has the scale " + std::to_string(d));
    if (d == 0.0f) continue;
    if (s == 0.0f) s = d;
    if (d != s)
      f.error("tensor " + name + ": its " + fmt + " blocks have different scales (" + std::to_string(s) + ", " +
              std::to_string(d) + "); the engine needs one scale per tensor, as BitNet models have");
  }
  if (s == 0.0f) s = 1.0f;  // all zeros
  s *= extra;
  if (t->type == gguf::kTQ1_0 && has_native_tq1_0() && K <= kTq1MaxK) {  // run as stored: no copy
    p.fmt = TernaryFormat::TQ1_0;
    p.packed = keep(t->data, t->nbytes);
    p.scale = s;
    return p;
  }
  // Repack to I2_S.
  std::vector<int8_t> codes(size_t(M * K));
  std::vector<float> scales(size_t(M * K / fi.block_values));
  unpack(fi, t->data, t->nbytes, M, K, codes.data(), scales.data());
  const FormatInfo& i2s = format_info("i2_s");
  uint8_t* packed = arena_.take(size_t(packed_bytes(i2s, M, K)));
  wf::pack(i2s, codes.data(), M, K, &s, 1, packed);
  p.packed = packed;
  f.release(t->data, t->nbytes);
  return p;
}

const uint8_t* Model::keep(const uint8_t* data, int64_t nbytes) {
  if (use_mmap_) return data;
  // In 1 MB blocks of the file (aligned there, so that each block's pages can be released once it
  // is copied: the file's pages and the copy are never both resident), over the threads: most of
  // the time goes to page faults, which run in parallel.
  uint8_t* copy = arena_.take(size_t(nbytes));
  constexpr uintptr_t kBlock = uintptr_t(1) << 20;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(data), end = begin + uintptr_t(nbytes);
  const uintptr_t first = begin / kBlock * kBlock;
  parallel_for(int64_t((end - first + kBlock - 1) / kBlock), nbytes, [&](int64_t b0, int64_t b1) {
    const uintptr_t lo = std::max(begin, first + uintptr_t(b0) * kBlock), hi = std::min(end, first + uintptr_t(b1) * kBlock);
    std::memcpy(copy + (lo - begin), reinterpret_cast<const void*>(lo), hi - lo);
    file_->release(reinterpret_cast<const void*>(lo), int64_t(hi - lo));
  });
  return copy;
}

size_t Model::arena_bytes(const std::string& head) const {
  // An upper bound (the projections are checked later): every ternary tensor of the file as stored
  // or repacked to I2_S, at most 5/4 of its bytes (TQ1_0 keeps 256 values in 54 bytes, I2_S in 64)
  // plus the I2_S tail and the alignment, and the head. The file's reader has bounded each by the
  // file size; the pages of what is reserved and not taken cost nothing.
  const gguf::File& f = *file_;
  size_t total = 0;
  for (const TensorInfo& t : f.tensors())
    if (t.type == gguf::kI2_S || t.type == gguf::kTQ2_0 || t.type == gguf::kTQ1_0)
      total += size_t(t.nbytes) + size_t(t.nbytes) / 4 + 128;
  const TensorInfo* out = f.tensor("output.weight");
  const TensorInfo* h = out ? out : f.tensor("token_embd.weight");
  if (head == "int8") total += size_t(hp_.n_vocab * hp_.n_embd) + 64;
  else if (h && !use_mmap_) total += size_t(h->nbytes) + 64;
  return total;
}

void Model::load_weights(const std::string& head) {
  const gguf::File& f = *file_;
  const int64_t D = hp_.n_embd, F = hp_.n_ff, KV = hp_.n_head_kv * hp_.head_dim;
  const TensorInfo* emb = f.tensor("token_embd.weight");
  if (!emb) f.error("missing tensor token_embd.weight");
  if (emb->ne.size() != 2 || emb->ne[0] != D || (emb->type != gguf::kF16 && emb->type != gguf::kF32))
    f.error("tensor token_embd.weight must be F16 or F32 with rows of " + std::to_string(D) + ", got " +
            gguf::type_name(emb->type) + " " + shape_str(emb->ne));
  hp_.n_vocab = emb->ne[1];
  if (emb->type == gguf::kF16) embd_f16_ = reinterpret_cast<const uint16_t*>(emb->data);
  else embd_f32_ = reinterpret_cast<const float*>(emb->data);

  const TensorInfo* out = f.tensor("output.weight");  // absent: tied to token_embd
  if (out && (out->ne.size() != 2 || out->ne[0] != D || out->ne[1] != hp_.n_vocab ||
              (out->type != gguf::kF16 && out->type != gguf::kF32)))
    f.error("tensor output.weight must be F16 or F32 of shape [" + std::to_string(D) + ", " +
            std::to_string(hp_.n_vocab) + "], got " + gguf::type_name(out->type) + " " + shape_str(out->ne));
  const TensorInfo* h = out ? out : emb;
  arena_.reserve(arena_bytes(head));

  // The norms first, copied out of the file before any projection's pages are released: read in
  // place, they would be faulted in by the first forward pass, after the releases, and the kernel
  // maps file pages around a fault, which brought back about 1 MB of each layer's repacked TQ2_0
  // weights (measured).
  layers_.resize(size_t(hp_.n_layer));
  output_norm_ = norm("output_norm.weight", D);
  for (int64_t il = 0; il < hp_.n_layer; ++il) {
    Layer& L = layers_[size_t(il)];
    L.attn_norm = norm(layer_tensor(il, "attn_norm.weight"), D);
    L.attn_sub_norm = norm(layer_tensor(il, "attn_sub_norm.weight"), D);
    L.ffn_norm = norm(layer_tensor(il, "ffn_norm.weight"), D);
    L.ffn_sub_norm = norm(layer_tensor(il, "ffn_sub_norm.weight"), F);
  }
  for (int64_t il = 0; il < hp_.n_layer; ++il) {
    Layer& L = layers_[size_t(il)];
    L.q = projection(layer_tensor(il, "attn_q.weight"), D, D);
    L.k = projection(layer_tensor(il, "attn_k.weight"), KV, D);
    L.v = projection(layer_tensor(il, "attn_v.weight"), KV, D);
    L.o = projection(layer_tensor(il, "attn_output.weight"), D, D);
    L.gate = projection(layer_tensor(il, "ffn_gate.weight"), F, D);
    L.up = projection(layer_tensor(il, "ffn_up.weight"), F, D);
    L.down = projection(layer_tensor(il, "ffn_down.weight"), D, F);
  }

  if (head == "f16") {
    const uint8_t* data = keep(h->data, h->nbytes);
    if (h->type == gguf::kF16) head_f16_ = reinterpret_cast<const uint16_t*>(data);
    else head_f32_ = reinterpret_cast<const float*>(data);
    if (h == emb) {  // tied: look the embeddings up in the copy, whose pages are resident anyway
      if (embd_f16_) embd_f16_ = head_f16_;
      else embd_f32_ = head_f32_;
    }
  } else {
    // Per row, the activation quantizer (absmax to +-127, round half to even) gives the int8 row
    // and q = w * s; i8_gemm wants the dequantization scale 1 / s and the row sum.
    head_ = Head::Int8;
    const int64_t V = hp_.n_vocab;
    int8_t* rows = reinterpret_cast<int8_t*>(arena_.take(size_t(V * D)));
    head_i8_ = rows;
    head_i8_scale_.resize(size_t(V));
    head_i8_sum_.resize(size_t(V));
    // In blocks of rows, each released once quantized, so the stored head's pages are never all
    // resident at once: the peak memory stays that of the int8 head (the f16 pages are not read
    // again; embedding lookups touch a few rows).
    const DType dt = h->type == gguf::kF16 ? DType::F16 : DType::F32;
    const int64_t row_bytes = D * int64_t(dtype_size(dt));
    const Kernels& kern = active_kernels();
    const int64_t block = std::max<int64_t>(1, (int64_t(16) << 20) / row_bytes);  // 16 MB of rows
    for (int64_t b0 = 0; b0 < V; b0 += block) {
      const int64_t b1 = std::min(V, b0 + block);
      parallel_for(b1 - b0, (b1 - b0) * D, [&](int64_t r0, int64_t r1) {
        for (int64_t m = b0 + r0; m < b0 + r1; ++m) {
          int8_t* q = rows + m * D;
          float s;
          const uint8_t* next = m + 1 < b0 + r1 ? h->data + (m + 1) * row_bytes : nullptr;
          kern.act_quant_row(h->data + m * row_bytes, dt, D, q, &s, next);
          head_i8_scale_[size_t(m)] = 1.0f / s;
          head_i8_sum_[size_t(m)] = std::accumulate(q, q + D, int32_t(0));
        }
      });
      f.release(h->data + b0 * row_bytes, (b1 - b0) * row_bytes);
    }
  }
}

const char* Model::ternary_format() const {
  return format_name(layers_.empty() ? TernaryFormat::I2S : layers_[0].q.fmt);
}

void Model::truncate(int64_t n) {
  if (n < 0 || n > n_past_)
    fail("truncate: n must be in [0, n_past=" + std::to_string(n_past_) + "], got " + std::to_string(n));
  n_past_ = n;
}

void Model::attention(int64_t il, const float* q, int64_t N, float* out) const {
  const int64_t H = hp_.n_head, hd = hp_.head_dim, group = hp_.n_head / hp_.n_head_kv;
  const Kernels& k = active_kernels();
  const float scale = 1.0f / std::sqrt(float(hd));
  const size_t plane = size_t(n_ctx_) * size_t(hd);  // one kv head's positions
  const float* kc = kv_ + size_t(il) * 2 * size_t(hp_.n_head_kv) * plane;
  const float* vc = kc + size_t(hp_.n_head_kv) * plane;
  const int64_t p0 = n_past_;
  parallel_for(H * N, H * N * (p0 + N) * hd, [&](int64_t i0, int64_t i1) {
    std::vector<float> s(size_t(p0 + N));
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t h = i / N, n = i % N, kvh = h / group, T = p0 + n + 1;  // causal: positions [0, T)
      const float* qh = q + n * H * hd + h * hd;
      const float* kh = kc + size_t(kvh) * plane;
      const float* vh = vc + size_t(kvh) * plane;
      float mx = -std::numeric_limits<float>::infinity();
      for (int64_t t = 0; t < T; ++t) {
        s[t] = k.dot_f32(qh, kh + t * hd, hd) * scale;
        mx = std::max(mx, s[t]);
      }
      float sum = 0.0f;
      for (int64_t t = 0; t < T; ++t) sum += (s[t] = std::exp(s[t] - mx));
      float* o = out + n * H * hd + h * hd;
      std::fill(o, o + hd, 0.0f);
      const float inv = 1.0f / sum;
      for (int64_t t = 0; t < T; ++t) k.axpy_f32(s[t] * inv, vh + t * hd, o, hd);
    }
  });
}

void Model::output(const float* x, int64_t N, float* logits) const {
  const int64_t D = hp_.n_embd, V = hp_.n_vocab;
  const Kernels& k = active_kernels();
  std::vector<float> y(size_t(N * D));
  rms_norm(k, x, output_norm_, N, D, hp_.rms_eps, y.data());
  constexpr int64_t kRows = 64;  // head rows per work item
  const int64_t units = (V + kRows - 1) / kRows;
  if (head_ == Head::Int8) {
    std::vector<int8_t> q(size_t(N * D));
    std::vector<uint8_t> xu(size_t(N * D));
    std::vector<float> xs(static_cast<size_t>(N));
    act_quant_int8(y.data(), DType::F32, N, D, q.data(), xs.data());
    for (size_t i = 0; i < q.size(); ++i) xu[i] = uint8_t(int(q[i]) + 128);
    parallel_for(units, N * V * D, [&](int64_t u0, int64_t u1) {
      k.i8_gemm(xu.data(), xs.data(), N, D, head_i8_, head_i8_scale_.data(), head_i8_sum_.data(), u0 * kRows,
                std::min(u1 * kRows, V), logits, V);
    });
  } else if (head_f16_) {
    parallel_for(units, N * V * D, [&](int64_t u0, int64_t u1) {
      k.f16_gemm(y.data(), N, D, head_f16_, u0 * kRows, std::min(u1 * kRows, V), logits, V);
    });
  } else {
    parallel_for(units, N * V * D, [&](int64_t u0, int64_t u1) {
      for (int64_t m = u0 * kRows; m < std::min(u1 * kRows, V); ++m)
        for (int64_t n = 0; n < N; ++n) logits[n * V + m] = k.dot_f32(y.data() + n * D, head_f32_ + m * D, D);
    });
  }
}

void Model::eval(const int32_t* tokens, int64_t N, float* logits, bool all_logits) {
  if (N < 1) fail("eval: tokens must not be empty");
  if (n_past_ + N > n_ctx_)
    fail("eval: " + std::to_string(n_past_) + " cached + " + std::to_string(N) + " new tokens exceed n_ctx=" +
         std::to_string(n_ctx_));
  for (int64_t n = 0; n < N; ++n)
    if (tokens[n] < 0 || tokens[n] >= hp_.n_vocab)
      fail("eval: token id " + std::to_string(tokens[n]) + " at index " + std::to_string(n) +
           " is outside the vocabulary [0, " + std::to_string(hp_.n_vocab) + ")");

  const int64_t D = hp_.n_embd, F = hp_.n_ff, H = hp_.n_head, hd = hp_.head_dim, KVH = hp_.n_head_kv;
  const int64_t KV = KVH * hd, p0 = n_past_;
  const double eps = hp_.rms_eps;
  std::vector<float> x(size_t(N * D)), q(size_t(N * D)), kk(size_t(N * KV)), vv(size_t(N * KV)),
      att(size_t(N * D)), tmp(size_t(N * D)), g(size_t(N * F)), u(size_t(N * F));
  std::vector<int8_t> xq(size_t(N * std::max(D, F)));
  std::vector<float> xs(static_cast<size_t>(N));

  for (int64_t n = 0; n < N; ++n) {
    float* row = x.data() + n * D;
    if (embd_f16_)
      for (int64_t d = 0; d < D; ++d) row[d] = f16_to_f32(embd_f16_[int64_t(tokens[n]) * D + d]);
    else
      std::memcpy(row, embd_f32_ + int64_t(tokens[n]) * D, size_t(D) * 4);
  }

  // RoPE (NEOX: dimension i pairs with i + n_rot / 2) angles for these positions, computed once
  // for all layers: cos/sin per layer and head would cost more than the attention itself.
  const int64_t half = hp_.n_rot / 2;
  std::vector<float> cos_t(size_t(N * half)), sin_t(size_t(N * half));
  for (int64_t n = 0; n < N; ++n)
    for (int64_t i = 0; i < half; ++i) {
      const float f = float(p0 + n) * inv_freq_[size_t(i)];
      cos_t[size_t(n * half + i)] = std::cos(f);
      sin_t[size_t(n * half + i)] = std::sin(f);
    }
  auto rope = [&](float* v, int64_t heads, int64_t n) {
    const float* c = cos_t.data() + n * half;
    const float* s = sin_t.data() + n * half;
    for (int64_t h = 0; h < heads; ++h) {
      float* r = v + h * hd;
      for (int64_t i = 0; i < half; ++i) {
        const float a = r[i], b = r[i + half];
        r[i] = a * c[i] - b * s[i];
        r[i + half] = b * c[i] + a * s[i];
      }
    }
  };
  const size_t plane = size_t(n_ctx_) * size_t(hd);

  const Kernels& k = active_kernels();
  const bool silu = hp_.act == Activation::SiLU;
  auto add_rows = [&](const float* y) {  // x += y (the residual), over row ranges
    parallel_for(N, N * D, [&](int64_t n0, int64_t n1) { k.axpy_f32(1.0f, y + n0 * D, x.data() + n0 * D, (n1 - n0) * D); });
  };

  for (int64_t il = 0; il < hp_.n_layer; ++il) {
    const Layer& L = layers_[size_t(il)];
    // Attention: RMSNorm -> Q, K, V -> RoPE -> cache -> attention -> SubLN -> O -> residual.
    rmsnorm_act_quant(x.data(), DType::F32, L.attn_norm, N, D, eps, xq.data(), xs.data());
    project({{&L.q, q.data()}, {&L.k, kk.data()}, {&L.v, vv.data()}}, xq.data(), xs.data(), N);
    float* kc = kv_ + size_t(il) * 2 * size_t(KVH) * plane;
    float* vc = kc + size_t(KVH) * plane;
    for (int64_t n = 0; n < N; ++n) {
      rope(q.data() + n * D, H, n);
      rope(kk.data() + n * KV, KVH, n);
      for (int64_t h = 0; h < KVH; ++h) {
        std::memcpy(kc + size_t(h) * plane + size_t(p0 + n) * hd, kk.data() + n * KV + h * hd, size_t(hd) * 4);
        std::memcpy(vc + size_t(h) * plane + size_t(p0 + n) * hd, vv.data() + n * KV + h * hd, size_t(hd) * 4);
      }
    }
    attention(il, q.data(), N, att.data());
    rmsnorm_act_quant(att.data(), DType::F32, L.attn_sub_norm, N, D, eps, xq.data(), xs.data());
    project({{&L.o, tmp.data()}}, xq.data(), xs.data(), N);
    add_rows(tmp.data());

    // FFN: RMSNorm -> gate, up -> act(gate) * up -> SubLN -> down -> residual.
    rmsnorm_act_quant(x.data(), DType::F32, L.ffn_norm, N, D, eps, xq.data(), xs.data());
    project({{&L.gate, g.data()}, {&L.up, u.data()}}, xq.data(), xs.data(), N);
    parallel_for(N, N * F, [&](int64_t n0, int64_t n1) {
      k.glu(g.data() + n0 * F, u.data() + n0 * F, g.data() + n0 * F, (n1 - n0) * F, silu);
    });
    rmsnorm_act_quant(g.data(), DType::F32, L.ffn_sub_norm, N, F, eps, xq.data(), xs.data());
    project({{&L.down, tmp.data()}}, xq.data(), xs.data(), N);
    add_rows(tmp.data());
  }
  n_past_ += N;
  if (all_logits) output(x.data(), N, logits);
  else output(x.data() + (N - 1) * D, 1, logits);
}

}  // namespace wf::engine
