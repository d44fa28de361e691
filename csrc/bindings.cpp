// pybind11 module wrinklefree._C. Tensors arrive as raw addresses (tensor.data_ptr()) with their
// sizes: the core does not link libtorch. Validation of dtype, rank and contiguity happens in
// wrinklefree.ops before any call reaches here; sizes are checked again in the C++ ops.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "cpu/formats.h"
#include "cpu/isa.h"
#include "cpu/ops.h"
#include "cpu/threadpool.h"

namespace py = pybind11;
using wf::DType;

namespace {

template <typename T>
T* ptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}
DType dtype(int code) {
  if (code < 0 || code > 2) wf::fail("dtype code must be 0 (f32), 1 (bf16) or 2 (f16), got " + std::to_string(code));
  return DType(code);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "wrinklefree CPU kernels (raw-buffer interface; use wrinklefree.ops)";
  m.attr("__version__") = WF_VERSION;
  using release = py::call_guard<py::gil_scoped_release>;

  m.def(
      "ternary_quant",
      [](uintptr_t w, int dt, int64_t n, uintptr_t codes) {
        return wf::ternary_quant(ptr<const void>(w), dtype(dt), n, ptr<int8_t>(codes));
      },
      release());
  m.def(
      "act_quant_int8",
      [](uintptr_t x, int dt, int64_t N, int64_t K, uintptr_t q, uintptr_t scale) {
        wf::act_quant_int8(ptr<const void>(x), dtype(dt), N, K, ptr<int8_t>(q), ptr<float>(scale));
      },
      release());
  m.def(
      "rmsnorm_act_quant",
      [](uintptr_t x, int dt, uintptr_t w, int64_t N, int64_t K, double eps, uintptr_t q, uintptr_t scale) {
        wf::rmsnorm_act_quant(ptr<const void>(x), dtype(dt), ptr<const float>(w), N, K, eps, ptr<int8_t>(q),
                              ptr<float>(scale));
      },
      release());
  m.def(
      "i2s_matmul",
      [](uintptr_t q, uintptr_t xs, int64_t N, int64_t K, uintptr_t packed, int64_t nbytes, int64_t M,
         uintptr_t out) {
        wf::i2s_matmul(ptr<const int8_t>(q), ptr<const float>(xs), N, K, ptr<const uint8_t>(packed), nbytes, M,
                       ptr<float>(out));
      },
      release());
  m.def(
      "bitlinear_infer",
      [](uintptr_t x, int dt, int64_t N, int64_t K, uintptr_t packed, int64_t nbytes, int64_t M, uintptr_t out) {
        wf::bitlinear_infer(ptr<const void>(x), dtype(dt), N, K, ptr<const uint8_t>(packed), nbytes, M,
                            ptr<float>(out));
      },
      release());

  m.def(
      "packed_bytes",
      [](const std::string& fmt, int64_t M, int64_t K) { return wf::packed_bytes(wf::format_info(fmt), M, K); });
  m.def(
      "pack",
      [](const std::string& fmt, uintptr_t codes, int64_t M, int64_t K, uintptr_t scales, int64_t n_scales,
         uintptr_t out) {
        wf::pack(wf::format_info(fmt), ptr<const int8_t>(codes), M, K, ptr<const float>(scales), n_scales,
                 ptr<uint8_t>(out));
      },
      release());
  m.def(
      "unpack",
      [](const std::string& fmt, uintptr_t buf, int64_t nbytes, int64_t M, int64_t K, uintptr_t codes,
         uintptr_t scales) {
        wf::unpack(wf::format_info(fmt), ptr<const uint8_t>(buf), nbytes, M, K, ptr<int8_t>(codes),
                   ptr<float>(scales));
      },
      release());
  m.def("formats", [] {
    py::list out;
    for (const auto& f : wf::kFormats) {
      py::dict d;
      d["name"] = f.name;
      d["ggml_type"] = f.ggml_type;
      d["block_values"] = f.block_values;
      d["block_bytes"] = f.block_bytes;
      d["tensor_scale"] = f.tensor_scale;
      d["tail_bytes"] = f.tail_bytes;
      out.append(d);
    }
    return out;
  });

  m.def("supported_isas", &wf::supported_isas);
  m.def("active_isa", &wf::active_isa);
  m.def("set_isa", &wf::set_isa);
  m.def("num_threads", &wf::num_threads);
  m.def("set_num_threads", &wf::set_num_threads);
  m.def("read_bandwidth", &wf::read_bandwidth, py::arg("nbytes"), py::arg("reps"), release());
  m.def("int8_mac_rate", &wf::int8_mac_rate, py::arg("seconds"), release());
}
