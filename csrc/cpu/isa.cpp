#include "cpu/isa.h"

#include <atomic>
#include <cstdlib>

namespace wf {
namespace {

bool cpu_has(const std::string& isa) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  if (isa == "avx512")
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512vnni");
  if (isa == "avx2")
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#endif
  return isa == "scalar";
}

const Kernels* table_for(const std::string& isa) {
  if (isa == "avx512") return &avx512::kernels();
  if (isa == "avx2") return &avx2::kernels();
  if (isa == "scalar") return &scalar::kernels();
  return nullptr;
}

const Kernels* initial() {
  if (const char* env = std::getenv("WF_CPU_ISA"); env && *env) {
    const std::string want(env);
    if (!table_for(want)) fail("WF_CPU_ISA='" + want + "' is not one of avx512, avx2, scalar");
    if (!cpu_has(want)) fail("WF_CPU_ISA='" + want + "' is not supported by this CPU");
    return table_for(want);
  }
  return table_for(supported_isas().front());
}

std::atomic<const Kernels*> g_active{nullptr};

}  // namespace

std::vector<std::string> supported_isas() {
  std::vector<std::string> out;
  for (const char* isa : {"avx512", "avx2", "scalar"})
    if (cpu_has(isa)) out.emplace_back(isa);
  return out;
}

const Kernels& active_kernels() {
  const Kernels* k = g_active.load();
  if (!k) {
    k = initial();
    g_active.store(k);
  }
  return *k;
}

std::string active_isa() { return active_kernels().name; }

void set_isa(const std::string& name) {
  const Kernels* k = table_for(name);
  if (!k) fail("isa must be one of avx512, avx2, scalar; got '" + name + "'");
  if (!cpu_has(name)) fail("isa '" + name + "' is not supported by this CPU");
  g_active.store(k);
}

}  // namespace wf
