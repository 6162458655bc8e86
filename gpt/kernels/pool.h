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

}  // namespace gpt_kernels

#endif  // GPT_KERNELS_POOL_H_
