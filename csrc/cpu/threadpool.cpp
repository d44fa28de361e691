#include "cpu/threadpool.h"

#include <pthread.h>
#include <sched.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <exception>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define WF_PAUSE() _mm_pause()
#else
#define WF_PAUSE() std::this_thread::yield()
#endif

#include "cpu/common.h"

namespace wf {
namespace {

constexpr auto kSpin = std::chrono::microseconds(200);  // how long idle workers spin before sleeping

int default_threads() {
  if (const char* env = std::getenv("WF_NUM_THREADS")) {
    const int n = std::atoi(env);
    if (n > 0) return n;
  }
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
  return std::max(1u, std::thread::hardware_concurrency());
}

class Pool {
 public:
  explicit Pool(int n) : n_(n) {
    for (int t = 1; t < n_; ++t) workers_.emplace_back([this, t] { work(t); });
  }
  ~Pool() {
    {
      std::lock_guard<std::mutex> lk(mu_);
      stop_ = true;
      gen_.fetch_add(1);
    }
    cv_.notify_all();
    for (auto& w : workers_) w.join();
  }
  int size() const { return n_; }

  void run(int64_t n, const std::function<void(int64_t, int64_t)>& fn) {
    const int used = int(std::min<int64_t>(n_, n));
    job_ = &fn;
    job_n_ = n;
    job_threads_ = used;
    error_ = nullptr;
    pending_.store(n_ - 1);
    gen_.fetch_add(1);
    if (sleeping_.load() > 0) {
      std::lock_guard<std::mutex> lk(mu_);
      cv_.notify_all();
    }
    run_part(0);
    while (pending_.load(std::memory_order_acquire) != 0) WF_PAUSE();
    if (error_) std::rethrow_exception(error_);
  }

 private:
  void run_part(int t) {
    if (t >= job_threads_) return;
    const int64_t b = job_n_ * t / job_threads_, e = job_n_ * (t + 1) / job_threads_;
    try {
      if (b < e) (*job_)(b, e);
    } catch (...) {
      std::lock_guard<std::mutex> lk(err_mu_);
      if (!error_) error_ = std::current_exception();
    }
  }

  void work(int t) {
    uint64_t seen = 0;  // the generation at construction: a job may be posted before we get here
    for (;;) {
      const auto deadline = std::chrono::steady_clock::now() + kSpin;
      int spins = 0;
      while (gen_.load(std::memory_order_acquire) == seen) {
        WF_PAUSE();
        if (++spins % 64 == 0 && std::chrono::steady_clock::now() > deadline) {
          std::unique_lock<std::mutex> lk(mu_);
          sleeping_.fetch_add(1);
          cv_.wait(lk, [&] { return gen_.load() != seen; });
          sleeping_.fetch_sub(1);
          break;
        }
      }
      seen = gen_.load();
      if (stop_) return;
      run_part(t);
      pending_.fetch_sub(1, std::memory_order_release);
    }
  }

  const int n_;
  std::vector<std::thread> workers_;
  std::mutex mu_, err_mu_;
  std::condition_variable cv_;
  std::atomic<uint64_t> gen_{0};
  std::atomic<int> sleeping_{0}, pending_{0};
  std::atomic<bool> stop_{false};
  const std::function<void(int64_t, int64_t)>* job_ = nullptr;
  int64_t job_n_ = 0;
  int job_threads_ = 0;
  std::exception_ptr error_;
};

std::mutex g_mu;      // guards g_pool and g_threads; one parallel job at a time
Pool* g_pool = nullptr;  // never destroyed: workers may still be parked at interpreter exit
int g_threads = 0;

void forget_pool_after_fork() {
  // The child has none of the parent's threads: drop (leak) the pool, make a new one on demand.
  g_pool = nullptr;
  new (&g_mu) std::mutex();
}

Pool& pool() {
  static const bool registered = [] {
    pthread_atfork(nullptr, nullptr, forget_pool_after_fork);
    return true;
  }();
  (void)registered;
  if (g_threads == 0) g_threads = default_threads();
  if (!g_pool || g_pool->size() != g_threads) {
    delete g_pool;
    g_pool = new Pool(g_threads);
  }
  return *g_pool;
}

}  // namespace

int num_threads() {
  std::lock_guard<std::mutex> lk(g_mu);
  if (g_threads == 0) g_threads = default_threads();
  return g_threads;
}

void set_num_threads(int n) {
  if (n < 1) fail("num_threads must be >= 1, got " + std::to_string(n));
  std::lock_guard<std::mutex> lk(g_mu);
  g_threads = n;
}

void parallel_for(int64_t n, const std::function<void(int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  std::lock_guard<std::mutex> lk(g_mu);
  Pool& p = pool();
  if (p.size() == 1 || n == 1) {
    fn(0, n);
    return;
  }
  p.run(n, fn);
}

void parallel_for(int64_t n, int64_t work, const std::function<void(int64_t, int64_t)>& fn) {
  constexpr int64_t kMinWork = 1 << 15;
  if (work < kMinWork) {
    if (n > 0) fn(0, n);
    return;
  }
  parallel_for(n, fn);
}

}  // namespace wf
