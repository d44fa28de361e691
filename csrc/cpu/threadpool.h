// A small persistent thread pool for the CPU kernels. Workers spin briefly after each job (so
// back-to-back kernels, as in decoding, do not pay a wake-up) and then sleep on a condition
// variable. A job is cut into contiguous ranges, claimed dynamically (guided); kernels
// write disjoint outputs per range, so results never depend on which thread ran what.
#pragma once

#include <cstdint>
#include <functional>

namespace wf {

// Number of threads the kernels use (caller included). Default: WF_NUM_THREADS, else the CPUs
// this process may run on.
int num_threads();
constexpr int kMaxThreads = 1024;  // set_num_threads refuses more
void set_num_threads(int n);

// Runs fn(begin, end) over [0, n) split into contiguous ranges; returns when all are done.
// Exceptions in fn are rethrown in the caller. Not reentrant: fn must not call parallel_for.
void parallel_for(int64_t n, const std::function<void(int64_t, int64_t)>& fn);

// Same, but runs inline when the work (in elements touched) is too small to be worth threads.
void parallel_for(int64_t n, int64_t work, const std::function<void(int64_t, int64_t)>& fn);

}  // namespace wf
