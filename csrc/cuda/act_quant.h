// Host entry points of the CUDA kernels. This header includes no CUDA header so that the pybind11
// bindings build with the plain C++ compiler; pointers are device addresses and the stream is a
// cudaStream_t carried as an integer (torch.cuda.current_stream().cuda_stream).
#pragma once

#include <cstdint>

namespace wf::cuda {

// Per-row absmax int8 quantization (DESIGN.md section 2), bit-exact with
// wrinklefree.ops.reference.act_quant_int8 and the CPU core:
//   x      [N, K] row-major, dtype code 0 (float32), 1 (bfloat16) or 2 (float16)
//   q      int8 [N, K] row-major, clamp(rint(x * scale), -128, 127)
//   scale  float32 [N], 127 / max(max|x|, 1e-5)
// All three live on CUDA device `device`. The kernel is enqueued on `stream` and the call returns
// without synchronizing. Throws std::invalid_argument for bad arguments and std::runtime_error when
// the CUDA runtime reports an error (no driver, no device, launch failure).
void act_quant_int8(const void* x, int dtype, int64_t N, int64_t K, int8_t* q, float* scale, int device,
                    uintptr_t stream);

// Number of CUDA devices the driver reports; 0 where there is no driver or no device.
int device_count();

// Name of the error cudaGetDeviceCount returns ("cudaSuccess" when this module can use the GPUs):
// tells "no GPU" apart from "driver too old for the toolkit this module was built with".
const char* runtime_status();

// CUDA version the installed driver supports (e.g. 13000), 0 without a driver.
int driver_version();

// CUDART_VERSION the module was compiled against (e.g. 13000 for CUDA 13.0).
int runtime_version();

}  // namespace wf::cuda
