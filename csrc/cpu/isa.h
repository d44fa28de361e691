// Run-time choice of the kernel table: the best the CPU supports, or the one named by
// WF_CPU_ISA=avx512|avx2|scalar (for tests and comparisons).
#pragma once

#include <string>
#include <vector>

#include "cpu/kernels.h"

namespace wf {

std::vector<std::string> supported_isas();  // best first
std::string active_isa();
void set_isa(const std::string& name);  // throws std::invalid_argument if unknown or unsupported
const Kernels& active_kernels();

}  // namespace wf
