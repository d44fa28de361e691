#include "cpu/gguf.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <limits>
#include <stdexcept>

#include "cpu/common.h"
#include "cpu/formats.h"

namespace wf::gguf {
namespace {

constexpr uint32_t kMagic = 0x46554747;  // "GGUF" read as a little-endian uint32
constexpr int kMaxDims = 4;               // GGML_MAX_DIMS
constexpr int kMaxArrayDepth = 2;

// Reads little-endian values from [p, end), failing with the file's name and the offset.
class Cursor {
 public:
  Cursor(const File& f, const uint8_t* base, int64_t size) : f_(f), base_(base), pos_(0), size_(size) {}

  int64_t pos() const { return pos_; }

  // Metadata array elements still allowed. Each takes ~80 bytes in memory against 1 to 8 in the
  // file, so the budget, not the file's size, bounds the memory a crafted file can claim. A real
  // tokenizer's tokens, types and merges are well under it (Llama 3: about 540k).
  uint64_t elements_left = uint64_t(1) << 22;

  template <typename T>
  T read(const char* what) {
    need(sizeof(T), what);
    T v;
    std::memcpy(&v, base_ + pos_, sizeof(T));
    pos_ += sizeof(T);
    return v;
  }

  std::string_view string(const char* what) {
    const uint64_t n = read<uint64_t>(what);
    need(n, what);
    std::string_view s(reinterpret_cast<const char*>(base_ + pos_), size_t(n));
    pos_ += int64_t(n);
    return s;
  }

  // Fails unless n more bytes are there.
  void need(uint64_t n, const char* what) const {
    if (n > uint64_t(size_ - pos_))
      f_.error(std::string("truncated or corrupt: ") + what + " at byte " + std::to_string(pos_) + " needs " +
               std::to_string(n) + " bytes, " + std::to_string(size_ - pos_) + " left");
  }

 private:
  const File& f_;
  const uint8_t* base_;
  int64_t pos_, size_;
};

int64_t scalar_size(ValueType t) {
  switch (t) {
    case ValueType::U8: case ValueType::I8: case ValueType::BOOL: return 1;
    case ValueType::U16: case ValueType::I16: return 2;
    case ValueType::U32: case ValueType::I32: case ValueType::F32: return 4;
    case ValueType::U64: case ValueType::I64: case ValueType::F64: return 8;
    case ValueType::STRING: return 8;  // at least its length field
    case ValueType::ARRAY: return 12;  // at least its type and count
  }
  return -1;
}

Value read_value(const File& f, Cursor& c, ValueType t, int depth) {
  Value v;
  v.type = t;
  switch (t) {
    case ValueType::U8: v.i = c.read<uint8_t>("u8 value"); break;
    case ValueType::I8: v.i = c.read<int8_t>("i8 value"); break;
    case ValueType::U16: v.i = c.read<uint16_t>("u16 value"); break;
    case ValueType::I16: v.i = c.read<int16_t>("i16 value"); break;
    case ValueType::U32: v.i = c.read<uint32_t>("u32 value"); break;
    case ValueType::I32: v.i = c.read<int32_t>("i32 value"); break;
    case ValueType::I64: v.i = c.read<int64_t>("i64 value"); break;
    case ValueType::U64: {
      const uint64_t u = c.read<uint64_t>("u64 value");
      if (u > uint64_t(std::numeric_limits<int64_t>::max())) f.error("corrupt: u64 value too large");
      v.i = int64_t(u);
      break;
    }
    case ValueType::BOOL: {
      const uint8_t b = c.read<uint8_t>("bool value");
      if (b > 1) f.error("corrupt: bool value " + std::to_string(b) + " at byte " + std::to_string(c.pos() - 1));
      v.i = b;
      break;
    }
    case ValueType::F32: v.f = c.read<float>("f32 value"); break;
    case ValueType::F64: v.f = c.read<double>("f64 value"); break;
    case ValueType::STRING: v.s = c.string("string value"); break;
    case ValueType::ARRAY: {
      if (depth >= kMaxArrayDepth) f.error("corrupt: arrays nested deeper than " + std::to_string(kMaxArrayDepth));
      const uint32_t et = c.read<uint32_t>("array type");
      if (et > uint32_t(ValueType::F64)) f.error("corrupt: unknown array element type " + std::to_string(et));
      v.elem = ValueType(et);
      const uint64_t n = c.read<uint64_t>("array length");
      // Every element takes at least scalar_size bytes: refuse counts the file cannot hold before
      // allocating for them.
      if (n > uint64_t(std::numeric_limits<int64_t>::max() / scalar_size(v.elem)))
        f.error("corrupt: array length " + std::to_string(n));
      c.need(n * uint64_t(scalar_size(v.elem)), "array elements");
      if (n > c.elements_left) f.error("metadata arrays hold more than 2^22 elements in all (corrupt, or not a model file)");
      c.elements_left -= n;
      v.arr.reserve(size_t(n));
      for (uint64_t j = 0; j < n; ++j) v.arr.push_back(read_value(f, c, v.elem, depth + 1));
      break;
    }
    default: f.error("corrupt: unknown value type " + std::to_string(uint32_t(t)));
  }
  return v;
}

// Bytes of a tensor of `n` elements with row length ne0, or -1 for types this reader skips.
int64_t tensor_bytes(uint32_t type, int64_t n, int64_t ne0, const File& f, const std::string& name) {
  auto blocks = [&](const char* fmt) {
    const FormatInfo& fi = format_info(fmt);
    if (ne0 % fi.block_values)
      f.error("tensor " + name + ": " + type_name(type) + " rows of " + std::to_string(ne0) +
              " values are not a multiple of the block of " + std::to_string(fi.block_values));
    return n / fi.block_values * fi.block_bytes + fi.tail_bytes;
  };
  switch (type) {
    case kF32: return n * 4;
    case kF16: return n * 2;
    case kTQ1_0: return blocks("tq1_0");
    case kTQ2_0: return blocks("tq2_0");
    case kI2_S: return blocks("i2_s");
  }
  return -1;
}

}  // namespace

bool Value::is_int() const {
  switch (type) {
    case ValueType::U8: case ValueType::I8: case ValueType::U16: case ValueType::I16: case ValueType::U32:
    case ValueType::I32: case ValueType::U64: case ValueType::I64: return true;
    default: return false;
  }
}

const char* type_name(uint32_t type) {
  switch (type) {
    case kF32: return "F32";
    case kF16: return "F16";
    case kTQ1_0: return "TQ1_0";
    case kTQ2_0: return "TQ2_0";
    case kI2_S: return "I2_S";
  }
  static thread_local std::string s;
  s = "type " + std::to_string(type);
  return s.c_str();
}

int64_t TensorInfo::n_elements() const {
  int64_t n = 1;
  for (int64_t d : ne) n *= d;
  return n;
}

void File::error(const std::string& what) const { fail(path_ + ": " + what); }

File::File(const std::string& path) : path_(path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) fail(path + ": cannot open: " + std::strerror(errno));
  struct stat st {};
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    fail(path + ": not a regular file");
  }
  size_ = st.st_size;
  if (size_ < 24) {
    ::close(fd);
    fail(path + ": not a GGUF file (" + std::to_string(size_) + " bytes, shorter than the header)");
  }
  void* p = ::mmap(nullptr, size_t(size_), PROT_READ, MAP_PRIVATE, fd, 0);
  ::close(fd);
  if (p == MAP_FAILED) fail(path + ": mmap failed: " + std::strerror(errno));
  base_ = static_cast<const uint8_t*>(p);
  try {
    Cursor c(*this, base_, size_);
    if (c.read<uint32_t>("magic") != kMagic) error("not a GGUF file (bad magic)");
    version_ = c.read<uint32_t>("version");
    if (version_ != 2 && version_ != 3) error("unsupported GGUF version " + std::to_string(version_) + " (2 or 3)");
    const uint64_t n_tensors = c.read<uint64_t>("tensor count");
    const uint64_t n_kv = c.read<uint64_t>("metadata count");
    if (n_kv > uint64_t(size_) / 12) error("truncated or corrupt: " + std::to_string(n_kv) + " metadata entries cannot fit in the file");
    for (uint64_t i = 0; i < n_kv; ++i) {
      const std::string key(c.string("metadata key"));
      const uint32_t t = c.read<uint32_t>("metadata type");
      if (t > uint32_t(ValueType::F64)) error("corrupt: key " + key + " has unknown type " + std::to_string(t));
      Value v = read_value(*this, c, ValueType(t), 0);
      if (!kv_.emplace(key, std::move(v)).second) error("corrupt: duplicate key " + key);
    }
    int64_t alignment = 32;
    if (const Value* a = find("general.alignment")) {
      if (!a->is_int() || a->i < 1 || (a->i & (a->i - 1)) || a->i > (1 << 20))
        error("general.alignment must be a power of two, got " + std::to_string(a->i));
      alignment = a->i;
    }
    if (n_tensors > uint64_t(size_) / 32) error("truncated or corrupt: " + std::to_string(n_tensors) + " tensor infos cannot fit in the file");
    tensors_.reserve(size_t(n_tensors));
    for (uint64_t i = 0; i < n_tensors; ++i) {
      TensorInfo t;
      t.name = std::string(c.string("tensor name"));
      const uint32_t nd = c.read<uint32_t>("tensor dimension count");
      if (nd < 1 || nd > kMaxDims) error("tensor " + t.name + ": " + std::to_string(nd) + " dimensions (1 to 4)");
      int64_t n = 1;
      for (uint32_t d = 0; d < nd; ++d) {
        const uint64_t v = c.read<uint64_t>("tensor dimension");
        // at most 2^56 elements: every byte count below (4 per element at most) fits an int64
        if (v < 1 || v > (uint64_t(1) << 40) || uint64_t(n) > (uint64_t(1) << 56) / v)
          error("tensor " + t.name + ": bad dimension " + std::to_string(v));
        n *= int64_t(v);
        t.ne.push_back(int64_t(v));
      }
      t.type = c.read<uint32_t>("tensor type");
      t.offset = c.read<uint64_t>("tensor offset");
      if (t.offset % uint64_t(alignment))
        error("tensor " + t.name + ": offset " + std::to_string(t.offset) + " is not a multiple of the alignment " +
              std::to_string(alignment));
      t.nbytes = tensor_bytes(t.type, n, t.ne[0], *this, t.name);
      if (!by_name_.emplace(t.name, tensors_.size()).second) error("corrupt: duplicate tensor " + t.name);
      tensors_.push_back(std::move(t));
    }
    const int64_t data_start = (c.pos() + alignment - 1) / alignment * alignment;
    for (auto& t : tensors_) {
      const uint64_t avail = uint64_t(std::max<int64_t>(size_ - data_start, 0));
      const uint64_t need = t.nbytes < 0 ? 0 : uint64_t(t.nbytes);
      if (t.offset > avail || need > avail - t.offset)
        error("truncated or corrupt: tensor " + t.name + " (" + type_name(t.type) + ", " + std::to_string(t.nbytes) +
              " bytes at data offset " + std::to_string(t.offset) + ") runs past the end of the file (" +
              std::to_string(size_) + " bytes)");
      t.data = base_ + data_start + int64_t(t.offset);
    }
  } catch (...) {
    ::munmap(const_cast<uint8_t*>(base_), size_t(size_));
    throw;
  }
}

File::~File() {
  if (base_) ::munmap(const_cast<uint8_t*>(base_), size_t(size_));
}

const Value* File::find(const std::string& key) const {
  const auto it = kv_.find(key);
  return it == kv_.end() ? nullptr : &it->second;
}

const TensorInfo* File::tensor(const std::string& name) const {
  const auto it = by_name_.find(name);
  return it == by_name_.end() ? nullptr : &tensors_[it->second];
}

int64_t File::get_int(const std::string& key) const {
  const Value* v = find(key);
  if (!v) error("missing metadata key " + key);
  if (!v->is_int()) error("metadata key " + key + " must be an integer");
  return v->i;
}

int64_t File::get_int(const std::string& key, int64_t fallback) const {
  return find(key) ? get_int(key) : fallback;
}

double File::get_float(const std::string& key, double fallback) const {
  const Value* v = find(key);
  if (!v) return fallback;
  if (v->is_float()) return v->f;
  if (v->is_int()) return double(v->i);
  error("metadata key " + key + " must be a number");
}

std::string File::get_string(const std::string& key) const {
  const Value* v = find(key);
  if (!v) error("missing metadata key " + key);
  if (v->type != ValueType::STRING) error("metadata key " + key + " must be a string");
  return std::string(v->s);
}

void File::release(const void* p, int64_t n) const {
  const uintptr_t page = uintptr_t(::sysconf(_SC_PAGESIZE));
  const uintptr_t b = (reinterpret_cast<uintptr_t>(p) + page - 1) / page * page;
  const uintptr_t e = (reinterpret_cast<uintptr_t>(p) + uintptr_t(n)) / page * page;
  if (e > b) ::madvise(reinterpret_cast<void*>(b), e - b, MADV_DONTNEED);
}

}  // namespace wf::gguf
