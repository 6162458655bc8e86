// Matrix-vector products for decoding on a CPU: y[B, N] = x[B, K] . W, for a few rows B.
//
// A decode step reads every weight once for a handful of rows, so it is bound by how fast the
// weights stream from memory. XLA:CPU's matrix-vector kernels read at 13-19 GB/s where a plain
// reduction reads at 18-24 (BENCHMARKS.md), and it has no bf16 or int8 matrix-vector kernel at
// all (a bf16 matrix is converted to float32 first). These loops read each weight exactly once,
// sequentially, convert it in registers (bf16: a 16-bit shift; int8: a convert and a per-output
// scale) and accumulate in float32 (the sums' order differs from XLA's: results agree to float32
// rounding). W is laid out [N, K], one output per row, so that every output is a dot product over
// contiguous memory: the tied output layer (wte [n_vocab, n_embd]) already is; Conv1D weights
// ([n_in, n_out]) are transposed once when a model is prepared for decoding. Blocks of rows run on
// XLA's own intra-op thread pool (no second pool competing for the cores).
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

#ifdef __AVX512F__
#include <immintrin.h>
#endif

namespace ffi = xla::ffi;

namespace {

inline float to_f32(float w) { return w; }
inline float to_f32(int8_t w) { return static_cast<float>(w); }
inline float to_f32(uint16_t w) {  // bfloat16 -> float32: the high half of the float's bits
  uint32_t bits = static_cast<uint32_t>(w) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

constexpr int64_t kBlock = 64;  // weight rows (outputs) per task: one contiguous slab of W
constexpr int kTile = 4;        // weight rows multiplied together (independent accumulators)
constexpr int kLanes = 16;      // floats per accumulator: one AVX-512 register
constexpr int kRowsPerPass = 4; // activation rows sharing one read (and conversion) of a weight tile

// The tail of a dot product past the last full vector, and the final scale.
template <typename W>
inline float Finish(float sum, const float* xb, const W* wr, int64_t k0, int64_t K, const float* scale,
                    int64_t n) {
  for (int64_t k = k0; k < K; ++k) sum += xb[k] * to_f32(wr[k]);
  return scale ? sum * scale[n] : sum;
}

#ifdef __AVX512F__
inline __m512 Load16(const float* w) { return _mm512_loadu_ps(w); }
inline __m512 Load16(const uint16_t* w) {  // bf16: widen to 32 bits, shift into the high half
  __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline __m512 Load16(const int8_t* w) {
  __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w));
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b));
}

// Up to kTile weight rows [n, n + R) times BR activation rows [b0, b0 + BR): each weight vector is
// loaded and converted once and multiplied into BR accumulators (kTile x kRowsPerPass = 16 of the
// 32 vector registers).
template <typename W, int R, int BR>
inline void Tile(const float* x, const W* w, const float* scale, float* y, int64_t b0, int64_t K,
                 int64_t N, int64_t n) {
  const int64_t k_vec = K - K % kLanes;
  __m512 acc[BR][R];
  for (int b = 0; b < BR; ++b)
    for (int r = 0; r < R; ++r) acc[b][r] = _mm512_setzero_ps();
  for (int64_t k = 0; k < k_vec; k += kLanes) {
    __m512 wv[R];
    for (int r = 0; r < R; ++r) wv[r] = Load16(w + (n + r) * K + k);
    for (int b = 0; b < BR; ++b) {
      const __m512 xv = _mm512_loadu_ps(x + (b0 + b) * K + k);
      for (int r = 0; r < R; ++r) acc[b][r] = _mm512_fmadd_ps(xv, wv[r], acc[b][r]);
    }
  }
  for (int b = 0; b < BR; ++b)
    for (int r = 0; r < R; ++r)
      y[(b0 + b) * N + n + r] = Finish(_mm512_reduce_add_ps(acc[b][r]), x + (b0 + b) * K,
                                       w + (n + r) * K, k_vec, K, scale, n + r);
}

template <typename W, int R>
inline void Rows(const float* x, const W* w, const float* scale, float* y, int64_t B, int64_t K,
                 int64_t N, int64_t n) {
  int64_t b = 0;
  for (; b + kRowsPerPass <= B; b += kRowsPerPass) Tile<W, R, kRowsPerPass>(x, w, scale, y, b, K, N, n);
  switch (B - b) {
    case 3: Tile<W, R, 3>(x, w, scale, y, b, K, N, n); break;
    case 2: Tile<W, R, 2>(x, w, scale, y, b, K, N, n); break;
    case 1: Tile<W, R, 1>(x, w, scale, y, b, K, N, n); break;
  }
}

// y[b, n] = scale[n] * sum_k x[b, k] * W[n, k] for n in [n0, n1). Each tile of W is read from
// memory once; activation rows past the first pass read it again from L1/L2.
template <typename W>
void Block(const float* x, const W* w, const float* scale, float* y, int64_t B, int64_t K,
           int64_t N, int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + kTile <= n1; n += kTile) Rows<W, kTile>(x, w, scale, y, B, K, N, n);
  for (; n < n1; ++n) Rows<W, 1>(x, w, scale, y, B, K, N, n);
}

#else  // portable loops (the compiler vectorises the lane loop)

template <typename W>
void Block(const float* x, const W* w, const float* scale, float* y, int64_t B, int64_t K,
           int64_t N, int64_t n0, int64_t n1) {
  const int64_t k_vec = K - K % kLanes;
  for (int64_t n = n0; n < n1; n += kTile) {
    const int rows = static_cast<int>(std::min<int64_t>(kTile, n1 - n));
    for (int64_t b = 0; b < B; ++b) {
      const float* xb = x + b * K;
      float acc[kTile][kLanes] = {};
      for (int64_t k = 0; k < k_vec; k += kLanes) {
        for (int r = 0; r < rows; ++r) {
          const W* wr = w + (n + r) * K + k;
          for (int l = 0; l < kLanes; ++l) acc[r][l] += xb[k + l] * to_f32(wr[l]);
        }
      }
      for (int r = 0; r < rows; ++r) {
        float sum = 0.0f;
        for (int l = 0; l < kLanes; ++l) sum += acc[r][l];
        y[b * N + n + r] = Finish(sum, xb, w + (n + r) * K, k_vec, K, scale, n + r);
      }
    }
  }
}
#endif

// Blocks are claimed from a shared counter by the calling thread and by helper tasks on XLA's
// pool. The caller waits only for blocks that were claimed, never for a task to start, so a busy
// pool cannot stall it; a task that starts late finds nothing left and touches no buffer.
struct Work {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  int64_t blocks = 0;
};

template <typename Fn>
void RunBlocks(ffi::ThreadPool& pool, int64_t blocks, Fn fn) {
  auto work = std::make_shared<Work>();
  work->blocks = blocks;
  auto drain = [work, fn]() {
    for (int64_t i; (i = work->next.fetch_add(1)) < work->blocks;) {
      fn(i);
      work->done.fetch_add(1, std::memory_order_release);
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), blocks) - 1;
  for (int64_t t = 0; t < helpers; ++t) {
    auto task = drain;  // Schedule takes its task by value (an rvalue)
    pool.Schedule(std::move(task));
  }
  drain();
  while (work->done.load(std::memory_order_acquire) < blocks) std::this_thread::yield();
}

template <typename W>
ffi::Error Gemv(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer w,
                ffi::Buffer<ffi::F32> scale, ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions();
  auto wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2) return ffi::Error::InvalidArgument("gemv: x and w must be 2-D");
  const int64_t B = xd[0], K = xd[1], N = wd[0];
  if (wd[1] != K) return ffi::Error::InvalidArgument("gemv: w must be [N, K] for x [B, K]");
  const bool scaled = scale.element_count() == static_cast<size_t>(N);
  const float* s = scaled ? scale.typed_data() : nullptr;
  const float* xp = x.typed_data();
  const W* wp = static_cast<const W*>(w.untyped_data());
  float* yp = y->typed_data();
  RunBlocks(pool, (N + kBlock - 1) / kBlock, [=](int64_t i) {
    Block<W>(xp, wp, s, yp, B, K, N, i * kBlock, std::min(N, (i + 1) * kBlock));
  });
  return ffi::Error::Success();
}

}  // namespace

#define GPT_GEMV_HANDLER(name, W)                                                        \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(name, Gemv<W>,                                           \
                                ffi::Ffi::Bind()                                         \
                                    .Ctx<ffi::ThreadPool>()                              \
                                    .Arg<ffi::Buffer<ffi::F32>>()                        \
                                    .Arg<ffi::AnyBuffer>()                               \
                                    .Arg<ffi::Buffer<ffi::F32>>()                        \
                                    .Ret<ffi::Buffer<ffi::F32>>());

GPT_GEMV_HANDLER(GptGemvF32, float)
GPT_GEMV_HANDLER(GptGemvBF16, uint16_t)
GPT_GEMV_HANDLER(GptGemvS8, int8_t)
