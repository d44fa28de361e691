#include "cpu/threadpool.h"

#include <pthread.h>
#include <sched.h>

#include <atomic>
#include <cerrno>
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

constexpr auto kSpin = std::chrono::microseconds(100);  // how long idle workers spin before sleeping

int default_threads() {
  if (const char* env = std::getenv("WF_NUM_THREADS"); env && *env) {
    char* end = nullptr;
    errno = 0;
    const long n = std::strtol(env, &end, 10);
    if (errno || *end || n < 1 || n > kMaxThreads)
      fail("WF_NUM_THREADS='" + std::string(env) + "' is not an integer in [1, " + std::to_string(kMaxThreads) + "]");
    return int(n);
  }
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
  return std::max(1u, std::thread::hardware_concurrency());
}

// One parallel_for call. It lives on the caller's stack; workers reach it through Pool::job_.
struct Job {
  const std::function<void(int64_t, int64_t)>* fn;
  int64_t n, threads;
  std::atomic<int64_t> next{0}, done{0};
  std::mutex err_mu;
  std::exception_ptr error;

  // Claims ranges until none are left. Ranges are claimed dynamically, so a worker that wakes
  // late (a descheduled vCPU, a slow futex wake-up) never holds the caller up: the caller takes
  // the work itself. Each claim takes 1/(2 * threads) of what is left (guided scheduling): large
  // ranges first, single items at the end, so the threads finish within one item of each other.
  void work() {
    for (;;) {
      int64_t begin = next.load(std::memory_order_relaxed), end;
      do {
        if (begin >= n) return;
        end = begin + std::max<int64_t>(1, (n - begin) / (2 * threads));
      } while (!next.compare_exchange_weak(begin, end));
      try {
        (*fn)(begin, end);
      } catch (...) {
        std::lock_guard<std::mutex> lk(err_mu);
        if (!error) error = std::current_exception();
      }
      done.fetch_add(end - begin, std::memory_order_release);
    }
  }
};

class Pool {
 public:
  explicit Pool(int n) : n_(n) {
    try {
      for (int t = 1; t < n_; ++t) workers_.emplace_back([this] { work(); });
    } catch (...) {  // the system refused a thread: stop the ones started, then report
      stop_workers();
      throw;
    }
  }
  ~Pool() { stop_workers(); }
  int size() const { return n_; }

  void run(int64_t n, const std::function<void(int64_t, int64_t)>& fn) {
    Job job;
    job.fn = &fn;
    job.n = n;
    job.threads = n_;
    job_.store(&job);
    gen_.fetch_add(1);
    if (sleeping_.load() > 0) {
      std::lock_guard<std::mutex> lk(mu_);
      cv_.notify_all();
    }
    job.work();
    while (job.done.load(std::memory_order_acquire) < n) WF_PAUSE();
    // Workers that looked the job up may still be inside Job::work(); wait for them to leave
    // before `job` goes out of scope. (seq_cst: a worker either sees nullptr or is counted.)
    job_.store(nullptr);
    while (active_.load() != 0) WF_PAUSE();
    if (job.error) std::rethrow_exception(job.error);
  }

 private:
  void stop_workers() {
    {
      std::lock_guard<std::mutex> lk(mu_);
      stop_ = true;
      gen_.fetch_add(1);
    }
    cv_.notify_all();
    for (auto& w : workers_) w.join();
  }

  void work() {
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
      active_.fetch_add(1);
      if (Job* job = job_.load()) job->work();
      active_.fetch_sub(1);
    }
  }

  const int n_;
  std::vector<std::thread> workers_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::atomic<uint64_t> gen_{0};
  std::atomic<int> sleeping_{0}, active_{0};
  std::atomic<bool> stop_{false};
  std::atomic<Job*> job_{nullptr};
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
    Pool* fresh;
    try {
      fresh = new Pool(g_threads);
    } catch (const std::exception& e) {  // std::system_error, std::bad_alloc
      fail("cannot start " + std::to_string(g_threads) + " threads (" + e.what() + "); use fewer");
    }
    delete g_pool;
    g_pool = fresh;
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
  if (n < 1 || n > kMaxThreads)
    fail("num_threads must be in [1, " + std::to_string(kMaxThreads) + "], got " + std::to_string(n));
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
