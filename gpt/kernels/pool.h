// Running one call's blocks on XLA's intra-op thread pool: shared by gemv.cc and gemm.cc.
//
// Why XLA's pool and not threads of our own: a kernel runs inside an XLA program whose other ops
// use that pool, so a second pool (OpenMP's, MKL's, std::thread's) would compete with it for the
// same cores. Blocks are claimed from a shared counter by the calling thread and by helper tasks on
// the pool. The caller waits only for blocks that were claimed, never for a task to start, so a
// busy pool cannot stall it; a task that starts late finds nothing left and touches no buffer.
#ifndef GPT_KERNELS_POOL_H_
#define GPT_KERNELS_POOL_H_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>
#include <utility>

#include "xla/ffi/api/ffi.h"

namespace gpt_kernels {

struct Work {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  int64_t blocks = 0;
};

// Calls fn(i) for every block i in [0, blocks), on at most `max_threads` threads (the caller's
// included) of `pool`, and returns when all have run.
template <typename Fn>
void RunBlocks(xla::ffi::ThreadPool& pool, int64_t blocks, int64_t max_threads, Fn fn) {
  auto work = std::make_shared<Work>();
  work->blocks = blocks;
  auto drain = [work, fn]() {
    for (int64_t i; (i = work->next.fetch_add(1)) < work->blocks;) {
      fn(i);
      work->done.fetch_add(1, std::memory_order_release);
    }
  };
  const int64_t helpers = std::min<int64_t>({pool.num_threads(), blocks, max_threads}) - 1;
  for (int64_t t = 0; t < helpers; ++t) {
    auto task = drain;  // Schedule takes its task by value (an rvalue)
    pool.Schedule(std::move(task));
  }
  drain();
  while (work->done.load(std::memory_order_acquire) < blocks) std::this_thread::yield();
}

// RunBlocks for work in phases that depend on each other (gemv.cc's fused MLP: the GELU'd hidden
// row must be whole before the second matrix reads it). `counts[p]` blocks of phase p, fn(p, i) for
// i in [0, counts[p]); no block of phase p starts before every block of the phases before it has
// finished. One pool hand-off for the whole chain instead of one per matrix: where a call's matrices
// are small (int8 weights at one row), each hand-off and each call's first misses weigh against
// little work (BENCHMARKS.md, "int8-fuse, session 7"). Blocks are claimed in order from one
// counter, so a thread that waits between phases waits only for blocks that running threads have
// claimed and are running (never for a task to start): no deadlock, and a busy pool cannot stall
// the caller, as in RunBlocks.
constexpr int kMaxPhases = 8;

struct PhasedWork {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  int64_t ends[kMaxPhases] = {};  // cumulative block counts: phase p is [ends[p - 1], ends[p])
  int phases = 0;
};

template <typename Fn>
void RunPhases(xla::ffi::ThreadPool& pool, const int64_t* counts, int phases, int64_t max_threads, Fn fn) {
  auto work = std::make_shared<PhasedWork>();
  int64_t total = 0, widest = 0;
  for (int p = 0; p < phases && p < kMaxPhases; ++p) {
    total += counts[p];
    work->ends[p] = total;
    widest = std::max(widest, counts[p]);
    work->phases = p + 1;
  }
  auto drain = [work, fn]() {
    int phase = 0;
    const int64_t total = work->ends[work->phases - 1];
    for (int64_t i; (i = work->next.fetch_add(1)) < total;) {
      while (i >= work->ends[phase]) ++phase;
      const int64_t start = phase ? work->ends[phase - 1] : 0;
      // The earlier phases' last blocks, claimed and running on another thread: microseconds.
      while (work->done.load(std::memory_order_acquire) < start) std::this_thread::yield();
      fn(phase, i - start);
      work->done.fetch_add(1, std::memory_order_release);
    }
  };
  const int64_t helpers = std::min<int64_t>({pool.num_threads(), widest, max_threads}) - 1;
  for (int64_t t = 0; t < helpers; ++t) {
    auto task = drain;
    pool.Schedule(std::move(task));
  }
  drain();
  while (work->done.load(std::memory_order_acquire) < total) std::this_thread::yield();
}

}  // namespace gpt_kernels

#endif  // GPT_KERNELS_POOL_H_
