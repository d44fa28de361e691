// pybind11 module wrinklefree._C_cuda. Like wrinklefree._C it does not link libtorch: tensors arrive
// as device addresses (tensor.data_ptr()), the stream as torch.cuda.current_stream().cuda_stream.
// The CUDA runtime is linked statically, so importing this module needs neither libcudart nor a
// driver; the driver is first touched by a call that launches a kernel or counts devices.
// std::invalid_argument becomes ValueError, std::runtime_error RuntimeError.
#include <pybind11/pybind11.h>

#include <string>

#include "act_quant.h"
#include "i2s_matmul.h"
#include "ternary_quant.h"

namespace py = pybind11;

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "wrinklefree CUDA kernels (raw-pointer interface; use wrinklefree.ops)";
#ifdef WF_VERSION
  m.attr("__version__") = WF_VERSION;
#endif
  m.attr("cuda_runtime_version") = wf::cuda::runtime_version();
  using release = py::call_guard<py::gil_scoped_release>;

  m.def(
      "act_quant_int8",
      [](uintptr_t x, int dtype, int64_t N, int64_t K, uintptr_t q, uintptr_t scale, int device, uintptr_t stream) {
        wf::cuda::act_quant_int8(reinterpret_cast<const void*>(x), dtype, N, K, reinterpret_cast<int8_t*>(q),
                                 reinterpret_cast<float*>(scale), device, stream);
      },
      py::arg("x"), py::arg("dtype"), py::arg("N"), py::arg("K"), py::arg("q"), py::arg("scale"), py::arg("device"),
      py::arg("stream"), release(),
      "Per-row int8 quantization of x [N, K] (dtype code 0 f32, 1 bf16, 2 f16) into q int8 [N, K] and\n"
      "scale float32 [N], all device addresses on CUDA device `device`; enqueued on `stream`, no sync.");
  m.def(
      "i2s_matmul",
      [](uintptr_t q, uintptr_t x_scale, int64_t N, int64_t K, uintptr_t packed, int64_t packed_nbytes, int64_t M,
         uintptr_t out, int device, uintptr_t stream) {
        wf::cuda::i2s_matmul(reinterpret_cast<const int8_t*>(q), reinterpret_cast<const float*>(x_scale), N, K,
                             reinterpret_cast<const uint8_t*>(packed), packed_nbytes, M, reinterpret_cast<float*>(out),
                             device, stream);
      },
      py::arg("q"), py::arg("x_scale"), py::arg("N"), py::arg("K"), py::arg("packed"), py::arg("packed_nbytes"),
      py::arg("M"), py::arg("out"), py::arg("device"), py::arg("stream"), release(),
      "int8 q [N, K] (scales x_scale float32 [N]) times I2_S weights packed (uint8, M*K/4 + 32 bytes) into\n"
      "out float32 [N, M]; device addresses on CUDA device `device`, enqueued on `stream`, no sync.");
  m.def(
      "ternary_quant",
      [](uintptr_t w, int dtype, int64_t n, uintptr_t codes, uintptr_t scale, uintptr_t workspace,
         int64_t workspace_len, int device, uintptr_t stream) {
        wf::cuda::ternary_quant(reinterpret_cast<const void*>(w), dtype, n, reinterpret_cast<int8_t*>(codes),
                                reinterpret_cast<float*>(scale), reinterpret_cast<double*>(workspace), workspace_len,
                                device, stream);
      },
      py::arg("w"), py::arg("dtype"), py::arg("n"), py::arg("codes"), py::arg("scale"), py::arg("workspace"),
      py::arg("workspace_len"), py::arg("device"), py::arg("stream"), release(),
      "Absmean ternary quantization of n contiguous elements w (dtype code 0 f32, 1 bf16, 2 f16) into codes\n"
      "int8 [n] and scale float32 [1], using workspace float64 [workspace_len >= ternary_quant_workspace(n)]\n"
      "(on exit its last used entry holds the pairwise sum of |w|); all device addresses on CUDA device\n"
      "`device`, enqueued on `stream`, no sync and no host round trip.");
  m.def("ternary_quant_workspace", &wf::cuda::ternary_quant_workspace, py::arg("n"),
        "Number of float64 workspace elements ternary_quant needs for n elements.");
  m.def("device_count", &wf::cuda::device_count, release(),
        "Number of CUDA devices the driver reports; 0 without a driver or device.");
  m.def(
      "runtime_status", [] { return std::string(wf::cuda::runtime_status()); },
      "'cudaSuccess' when this module can use the GPUs, else the CUDA error name (e.g.\n"
      "'cudaErrorNoDevice', or 'cudaErrorInsufficientDriver' for a driver older than the toolkit).");
  m.def("driver_version", &wf::cuda::driver_version, release(),
        "CUDA version the installed driver supports (e.g. 13000); 0 without a driver.");
}
