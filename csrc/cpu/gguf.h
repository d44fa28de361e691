// A read-only GGUF file: memory-mapped, parsed with every offset and length checked against the
// file size, so a truncated, corrupt or foreign file fails with an error instead of a crash.
// Format: github.com/ggml-org/ggml docs/gguf.md (versions 2 and 3).
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <string_view>
#include <vector>

namespace wf::gguf {

// GGUF metadata value types.
enum class ValueType : uint32_t {
  U8 = 0, I8 = 1, U16 = 2, I16 = 3, U32 = 4, I32 = 5, F32 = 6, BOOL = 7,
  STRING = 8, ARRAY = 9, U64 = 10, I64 = 11, F64 = 12,
};

struct Value {
  ValueType type = ValueType::U8;
  int64_t i = 0;        // integer and bool types (u64 values above INT64_MAX are refused)
  double f = 0.0;       // F32, F64
  std::string_view s;   // STRING (points into the mapped file)
  ValueType elem = ValueType::U8;  // ARRAY: element type
  std::vector<Value> arr;          // ARRAY: elements

  bool is_int() const;
  bool is_float() const { return type == ValueType::F32 || type == ValueType::F64; }
};

// ggml tensor types the engine reads.
constexpr uint32_t kF32 = 0, kF16 = 1, kTQ1_0 = 34, kTQ2_0 = 35, kI2_S = 36;
const char* type_name(uint32_t type);  // "F32", ..., or "type 17"

struct TensorInfo {
  std::string name;
  std::vector<int64_t> ne;  // ggml order: ne[0] is the row length (contiguous dimension)
  uint32_t type = 0;
  uint64_t offset = 0;      // from the start of the data section
  const uint8_t* data = nullptr;
  int64_t nbytes = -1;      // -1 for types whose size this reader does not know
  int64_t n_elements() const;
};

class File {
 public:
  explicit File(const std::string& path);  // throws std::invalid_argument with the reason
  ~File();
  File(const File&) = delete;
  File& operator=(const File&) = delete;

  const std::string& path() const { return path_; }
  uint32_t version() const { return version_; }
  int64_t size() const { return size_; }
  const std::map<std::string, Value>& metadata() const { return kv_; }
  const std::vector<TensorInfo>& tensors() const { return tensors_; }

  const Value* find(const std::string& key) const;
  const TensorInfo* tensor(const std::string& name) const;  // nullptr when absent

  // Typed lookups; `fallback` for absent optional keys. Throw naming the key for wrong types.
  int64_t get_int(const std::string& key) const;
  int64_t get_int(const std::string& key, int64_t fallback) const;
  double get_float(const std::string& key, double fallback) const;
  std::string get_string(const std::string& key) const;

  // Tells the kernel that the pages of [p, p + n) will not be read again (their RSS is dropped;
  // a later read maps them back from the page cache).
  void release(const void* p, int64_t n) const;

  [[noreturn]] void error(const std::string& what) const;

 private:
  std::string path_;
  const uint8_t* base_ = nullptr;
  int64_t size_ = 0;
  uint32_t version_ = 0;
  std::map<std::string, Value> kv_;
  std::vector<TensorInfo> tensors_;
  std::map<std::string, size_t> by_name_;
};

}  // namespace wf::gguf
