// pybind11 module wrinklefree._C. Tensors arrive as raw addresses (tensor.data_ptr()) with their
// sizes: the core does not link libtorch. Validation of dtype, rank and contiguity happens in
// wrinklefree.ops before any call reaches here; sizes are checked again in the C++ ops.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <chrono>

#include "cpu/engine.h"
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

// A file's bytes as a str, invalid UTF-8 replaced (metadata keys and strings are meant to be UTF-8).
py::object utf8_lossy(std::string_view bytes) {
  PyObject* s = PyUnicode_DecodeUTF8(bytes.data(), Py_ssize_t(bytes.size()), "replace");
  if (!s) throw py::error_already_set();
  return py::reinterpret_steal<py::object>(s);
}

py::object to_python(const wf::gguf::Value& v) {
  using T = wf::gguf::ValueType;
  switch (v.type) {
    case T::BOOL: return py::bool_(v.i != 0);
    case T::F32: case T::F64: return py::float_(v.f);
    case T::STRING: return utf8_lossy(v.s);
    case T::ARRAY: {
      py::list out(v.arr.size());
      for (size_t i = 0; i < v.arr.size(); ++i) out[i] = to_python(v.arr[i]);
      return std::move(out);
    }
    default: return py::int_(v.i);
  }
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "wrinklefree CPU kernels (raw-buffer interface; use wrinklefree.ops)";
  m.attr("__version__") = WF_VERSION;
  m.attr("I2S_MAX_K") = wf::kI2sMaxK;      // the longest row the I2_S matmul takes
  m.attr("MAX_THREADS") = wf::kMaxThreads;  // the most threads the CPU kernels take
  using release = py::call_guard<py::gil_scoped_release>;

  m.def(
      "pairwise_sum",
      [](uintptr_t x, int dt, int64_t n, bool squares) { return wf::pairwise_sum(ptr<const void>(x), dtype(dt), n, squares); },
      release(), "Fixed-order float64 sum of |x| (or x^2) over n elements (ops/reference.py: pairwise_sum).");
  m.def(
      "rms_inv",
      [](uintptr_t x, int dt, int64_t K, double eps) {
        bool tree = false;
        const float inv = wf::rms_inv(ptr<const void>(x), dtype(dt), K, eps, &tree);
        return std::make_pair(inv, tree);
      },
      release(),
      "RMSNorm's 1/rms of one row of K (ops/reference.py: rms_inv), and whether it needed the exact "
      "pairwise sum (the fast sum's bracket straddled a rounding boundary), for tests of that path.");
  m.def(
      "ternary_quant",
      [](uintptr_t w, int dt, int64_t n, uintptr_t codes, float scale_hint) {
        return wf::ternary_quant(ptr<const void>(w), dtype(dt), n, ptr<int8_t>(codes), scale_hint);
      },
      py::arg("w"), py::arg("dt"), py::arg("n"), py::arg("codes"), py::arg("scale_hint") = 0.0f, release(),
      "Absmean ternary codes of n elements at w into codes; returns the scale. scale_hint: a guess at "
      "the scale (0: estimate from a sample); it changes the speed, never the result.");
  m.def(
      "act_quant_int8",
      [](uintptr_t x, int dt, int64_t N, int64_t K, uintptr_t q, uintptr_t scale) {
        wf::act_quant_int8(ptr<const void>(x), dtype(dt), N, K, ptr<int8_t>(q), ptr<float>(scale));
      },
      release());
  m.def(
      "rmsnorm_act_quant",
      [](uintptr_t x, int dt, uintptr_t w, int64_t N, int64_t K, double eps, uintptr_t q, uintptr_t scale,
         uintptr_t inv_rms) {
        wf::rmsnorm_act_quant(ptr<const void>(x), dtype(dt), ptr<const float>(w), N, K, eps, ptr<int8_t>(q),
                              ptr<float>(scale), ptr<float>(inv_rms));
      },
      py::arg("x"), py::arg("dt"), py::arg("w"), py::arg("N"), py::arg("K"), py::arg("eps"), py::arg("q"),
      py::arg("scale"), py::arg("inv_rms") = 0, release(),
      "RMSNorm then int8 quantization of N rows of K; inv_rms (0: none) receives each row's 1/rms.");
  m.def(
      "i2s_matmul",
      [](uintptr_t q, uintptr_t xs, int64_t N, int64_t K, uintptr_t packed, int64_t nbytes, int64_t M,
         uintptr_t out) {
        wf::i2s_matmul(ptr<const int8_t>(q), ptr<const float>(xs), N, K, ptr<const uint8_t>(packed), nbytes, M,
                       ptr<float>(out));
      },
      release());
  m.def(
      "tq1_0_matmul",
      [](uintptr_t q, uintptr_t xs, int64_t N, int64_t K, uintptr_t packed, int64_t nbytes, int64_t M, float w_scale,
         uintptr_t out) {
        wf::tq1_0_matmul(ptr<const int8_t>(q), ptr<const float>(xs), N, K, ptr<const uint8_t>(packed), nbytes, M,
                         w_scale, ptr<float>(out));
      },
      release(),
      "out[N, M] = (sum_k code * q - sum_k q) / x_scale * w_scale over TQ1_0 weights of M x K with one "
      "scale: the engine's TQ1_0 path (fast where has_native_tq1_0(), portable elsewhere).");
  m.def("has_native_tq1_0", &wf::has_native_tq1_0, "Whether the active ISA runs TQ1_0 weights without repacking.");
  m.def(
      "time_matmul",
      [](const std::string& fmt, uintptr_t q, uintptr_t xs, int64_t N, int64_t K, const std::vector<uintptr_t>& packed,
         int64_t nbytes, int64_t M, float w_scale, uintptr_t out, int64_t reps) {
        if (fmt != "i2_s" && fmt != "tq1_0") wf::fail("fmt must be 'i2_s' or 'tq1_0', got '" + fmt + "'");
        if (packed.empty()) wf::fail("packed must hold at least one buffer");
        const bool tq1 = fmt == "tq1_0";  // decided once, outside the timed calls
        std::vector<double> seconds(size_t(std::max<int64_t>(reps, 0)));
        for (size_t r = 0; r < seconds.size(); ++r) {
          const auto* w = ptr<const uint8_t>(packed[r % packed.size()]);
          const auto start = std::chrono::steady_clock::now();
          if (tq1)
            wf::tq1_0_matmul(ptr<const int8_t>(q), ptr<const float>(xs), N, K, w, nbytes, M, w_scale, ptr<float>(out));
          else
            wf::i2s_matmul(ptr<const int8_t>(q), ptr<const float>(xs), N, K, w, nbytes, M, ptr<float>(out));
          seconds[r] = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
        }
        return seconds;
      },
      release(),
      "Runs i2s_matmul or tq1_0_matmul (fmt) reps times, call r on packed[r % len(packed)] (copies of one "
      "weight, so that each call streams from memory; w_scale: TQ1_0's), and returns each call's seconds: "
      "the kernel's time as the inference engine calls it, with no Python between calls (for bench/run.py).");
  m.def(
      "bitlinear_infer",
      [](uintptr_t x, int dt, int64_t N, int64_t K, uintptr_t packed, int64_t nbytes, int64_t M, uintptr_t out) {
        wf::bitlinear_infer(ptr<const void>(x), dtype(dt), N, K, ptr<const uint8_t>(packed), nbytes, M,
                            ptr<float>(out));
      },
      release());

  // The inference engine's output-head kernels on the active ISA, for tests against torch
  // (kernels.h: f16_gemm, i8_gemm); weight rows [0, M), out [N, M].
  m.def(
      "f16_gemm",
      [](uintptr_t x, int64_t N, int64_t K, uintptr_t W, int64_t M, uintptr_t out) {
        if (N < 1 || K < 1 || M < 1) wf::fail("f16_gemm: N, K and M must be >= 1");
        wf::active_kernels().f16_gemm(ptr<const float>(x), N, K, ptr<const uint16_t>(W), 0, M, ptr<float>(out), M);
      },
      release());
  m.def(
      "i8_gemm",
      [](uintptr_t xu, uintptr_t x_scale, int64_t N, int64_t K, uintptr_t W, uintptr_t w_scale, uintptr_t wsum,
         int64_t M, uintptr_t out) {
        if (N < 1 || K < 1 || M < 1) wf::fail("i8_gemm: N, K and M must be >= 1");
        wf::active_kernels().i8_gemm(ptr<const uint8_t>(xu), ptr<const float>(x_scale), N, K, ptr<const int8_t>(W),
                                     ptr<const float>(w_scale), ptr<const int32_t>(wsum), 0, M, ptr<float>(out), M);
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

  using wf::engine::Model;
  py::class_<Model>(m, "Engine", "The CPU inference engine over a GGUF file (use wrinklefree.inference.Engine)")
      .def(py::init<const std::string&, int64_t, const std::string&, bool>(), py::arg("path"), py::arg("n_ctx"),
           py::arg("head"), py::arg("use_mmap") = false, release())
      .def("metadata",
           [](const Model& e) {
             py::dict d;
             for (const auto& [key, value] : e.file().metadata()) d[utf8_lossy(key)] = to_python(value);
             return d;
           })
      .def("tensors",
           [](const Model& e) {
             py::list out;
             for (const auto& t : e.file().tensors())
               out.append(py::make_tuple(t.name, wf::gguf::type_name(t.type), t.ne, t.nbytes));
             return out;
           })
      .def_property_readonly("arch", [](const Model& e) { return e.hparams().arch; })
      .def_property_readonly("n_vocab", [](const Model& e) { return e.hparams().n_vocab; })
      .def_property_readonly("n_embd", [](const Model& e) { return e.hparams().n_embd; })
      .def_property_readonly("n_layer", [](const Model& e) { return e.hparams().n_layer; })
      .def_property_readonly("n_ctx", &Model::n_ctx)
      .def_property_readonly("n_past", &Model::n_past)
      .def_property_readonly("ternary_format", &Model::ternary_format)
      .def_property_readonly("file_bytes", [](const Model& e) { return e.file().size(); })
      .def(
          "eval",
          [](Model& e, const std::vector<int32_t>& tokens, uintptr_t out, bool all_logits) {
            py::gil_scoped_release nogil;
            e.eval(tokens.data(), int64_t(tokens.size()), ptr<float>(out), all_logits);
          },
          py::arg("tokens"), py::arg("out"), py::arg("all_logits") = false)
      .def("truncate", &Model::truncate, py::arg("n"));
}
