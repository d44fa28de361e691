// Helpers shared by the CUDA kernels: the element types of float inputs and, for the host entry
// points, error reporting, the device guard and argument checks. Every entry point checks its
// arguments (std::invalid_argument) before its first CUDA call and reports CUDA errors as
// std::runtime_error naming the op.
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

namespace wf::cuda::detail {

// Element types of the float inputs (dtype codes 0, 1, 2): how a stored value becomes float32
// (exactly) and how many fit in 16 bytes.
struct F32 {
  using raw = float;
  static constexpr int kVec = 4;
  __device__ static float to_f32(raw v) { return v; }
};
struct BF16 {
  using raw = uint16_t;
  static constexpr int kVec = 8;
  __device__ static float to_f32(raw v) { return __uint_as_float(uint32_t(v) << 16); }
};
struct F16 {
  using raw = uint16_t;
  static constexpr int kVec = 8;
  __device__ static float to_f32(raw v) { return __half2float(__ushort_as_half(v)); }
};

// The versions make "no driver" and "driver older than this module's toolkit" recognisable, which
// cudaErrorInsufficientDriver alone does not.
[[noreturn]] inline void fail_cuda(const char* op, const char* what, cudaError_t err) {
  int driver = 0;
  if (cudaDriverGetVersion(&driver) != cudaSuccess) driver = 0;
  cudaGetLastError();
  throw std::runtime_error(std::string(op) + ": " + what + " failed: " + cudaGetErrorName(err) + " (" +
                           cudaGetErrorString(err) + "); module built with CUDA runtime " +
                           std::to_string(CUDART_VERSION) + ", driver supports " +
                           (driver ? std::to_string(driver) : std::string("none (no driver found)")));
}

inline void check_cuda(const char* op, const char* what, cudaError_t err) {
  if (err != cudaSuccess) fail_cuda(op, what, err);
}

// The runtime's current device is per thread and shared with torch through the driver's context;
// launching on another device's stream needs that device current, and torch must find its own
// current device unchanged afterwards.
class DeviceGuard {
 public:
  DeviceGuard(const char* op, int device) : device_(device) {
    check_cuda(op, "cudaGetDevice", cudaGetDevice(&prev_));
    if (prev_ != device_) check_cuda(op, "cudaSetDevice", cudaSetDevice(device_));
  }
  ~DeviceGuard() {
    if (prev_ != device_) cudaSetDevice(prev_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int device_;
  int prev_ = 0;
};

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

[[noreturn]] inline void fail_arg(const char* op, const std::string& msg) {
  throw std::invalid_argument(std::string(op) + ": " + msg);
}

inline void check_positive(const char* op, const char* name, int64_t v) {
  if (v <= 0) fail_arg(op, std::string(name) + " must be > 0, got " + std::to_string(v));
}

inline void check_address(const char* op, const char* name, const void* p) {
  if (p == nullptr) fail_arg(op, std::string(name) + " must be a device address, got 0");
}

inline void check_device(const char* op, int device) {
  if (device < 0) fail_arg(op, "device must be >= 0, got " + std::to_string(device));
}

inline void check_dtype(const char* op, int dtype) {
  if (dtype < 0 || dtype > 2)
    fail_arg(op, "dtype code must be 0 (f32), 1 (bf16) or 2 (f16), got " + std::to_string(dtype));
}

}  // namespace wf::cuda::detail
