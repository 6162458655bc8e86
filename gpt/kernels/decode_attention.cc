// Attention over the KV cache for decoding on a CPU: y = softmax(q k^T / sqrt(K), masked) v, one
// call per layer.
//
// Why a kernel: a decode step's attention is B * H tiny problems (one query row per head against
// that head's filled cache slots). XLA:CPU runs them as a batched dot for the scores, a masked
// select, a softmax in several fusions and a second batched dot, each pass over [B * H, T, S]
// (10-12% of a batch-8 117M step). Here each (row, head) is one pass over its own cache slice:
// scores for the slots its mask allows (masked slots are skipped: their probability is exactly 0
// in the XLA formulation too), a max-subtracted float32 softmax, and the probabilities times the
// values accumulated in registers, the B * H slices split over XLA's intra-op pool (pool.h).
//
// The arithmetic follows gpt.attention's "einsum" formulation: float32 scores divided by
// sqrt(K), exp(s - max) / sum (a query with no visible key gets the uniform distribution over all
// S slots, as a -1e30-filled row does there), probabilities rounded to bfloat16 before the values
// when the compute dtype is bfloat16 (`bf16_probs`), float32 accumulation. Only the order of the
// sums differs: results agree to float32 rounding.
//
// Shapes: q [N, T, K] float32 (N = B * H, row b's heads are n = b * H .. b * H + H - 1), k and v
// [N, S, K] float32 or bfloat16 (the cache), mask [B, T, S] bool, y [N, T, K] float32.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "lanes.h"
#include "pool.h"
#include "xla/ffi/api/ffi.h"

#ifdef __AVX512F__
#include <immintrin.h>
#endif

namespace ffi = xla::ffi;

namespace {

constexpr int kLanes = 16;  // floats per AVX-512 register

inline float ToF32(float x) { return x; }
inline float ToF32(uint16_t x) {  // bfloat16 -> float32: the high half of the float's bits
  uint32_t bits = static_cast<uint32_t>(x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// float32 -> bfloat16 -> float32 with round-to-nearest-even, as XLA's convert (finite inputs:
// probabilities are in [0, 1]).
inline float RoundBf16(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  bits += 0x7FFFu + ((bits >> 16) & 1u);
  bits &= 0xFFFF0000u;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

#ifdef __AVX512F__
inline __m512 Load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 Load16(const uint16_t* p) {
  __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
#endif

// q . k over K floats.
template <typename C>
inline float Dot(const float* q, const C* k, int64_t K) {
  int64_t i = 0;
  float sum = 0.0f;
#ifdef __AVX512F__
  __m512 acc = _mm512_setzero_ps();
  for (; i + kLanes <= K; i += kLanes) acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + i), Load16(k + i), acc);
  sum = _mm512_reduce_add_ps(acc);
#endif
  for (; i < K; ++i) sum += q[i] * ToF32(k[i]);
  return sum;
}

#ifdef __AVX512F__
using gpt_kernels::Sum4;  // lanes.h
#endif

// out[r] = q . k[slots[r]] for r < 4: four slots' dot products sharing each load of q.
template <typename C>
inline void Dot4(const float* q, const C* k, const int64_t* slots, int64_t K, float* out) {
#ifdef __AVX512F__
  if (K % kLanes == 0) {
    const C* r0 = k + slots[0] * K;
    const C* r1 = k + slots[1] * K;
    const C* r2 = k + slots[2] * K;
    const C* r3 = k + slots[3] * K;
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t i = 0; i < K; i += kLanes) {
      const __m512 qv = _mm512_loadu_ps(q + i);
      a0 = _mm512_fmadd_ps(qv, Load16(r0 + i), a0);
      a1 = _mm512_fmadd_ps(qv, Load16(r1 + i), a1);
      a2 = _mm512_fmadd_ps(qv, Load16(r2 + i), a2);
      a3 = _mm512_fmadd_ps(qv, Load16(r3 + i), a3);
    }
    _mm_storeu_ps(out, Sum4(a0, a1, a2, a3));
    return;
  }
#endif
  for (int r = 0; r < 4; ++r) out[r] = Dot(q, k + slots[r] * K, K);
}

// y[0, K) += p * v[0, K).
template <typename C>
inline void Axpy(float p, const C* v, float* y, int64_t K) {
  int64_t i = 0;
#ifdef __AVX512F__
  const __m512 pv = _mm512_set1_ps(p);
  for (; i + kLanes <= K; i += kLanes)
    _mm512_storeu_ps(y + i, _mm512_fmadd_ps(pv, Load16(v + i), _mm512_loadu_ps(y + i)));
#endif
  for (; i < K; ++i) y[i] += p * ToF32(v[i]);
}

struct Shape {
  int64_t B = 0, H = 0, T = 0, S = 0, K = 0;
  // GPT_DECODE_ATTENTION_SCORES=1: the scores one slot at a time instead of Dot4 (for the
  // same-process A/B of experiments/bench_decode_attention.py --scores_ab).
  bool one_slot_at_a_time = false;
};

// One query row of one head: q [K], its head's cache k, v [S, K], its mask row [S], y [K].
// `e` is scratch for S floats.
template <typename C>
void Row(const float* q, const C* k, const C* v, const bool* mask, float* y, const Shape& s,
         bool bf16_probs, float* e, int64_t* slots) {
  const float root = std::sqrt(static_cast<float>(s.K));
  int64_t m = 0;
  for (int64_t j = 0; j < s.S; ++j) {
    if (mask[j]) slots[m++] = j;
  }
  int64_t i = 0;
  if (!s.one_slot_at_a_time)
    for (; i + 4 <= m; i += 4) Dot4(q, k, slots + i, s.K, e + i);
  for (; i < m; ++i) e[i] = Dot(q, k + slots[i] * s.K, s.K);
  float max = -INFINITY;
  for (i = 0; i < m; ++i) {
    e[i] /= root;
    max = std::max(max, e[i]);
  }
  std::fill(y, y + s.K, 0.0f);
  if (m == 0) {  // nothing visible (a padding query): uniform over all S slots
    float p = 1.0f / static_cast<float>(s.S);
    if (bf16_probs) p = RoundBf16(p);
    for (int64_t j = 0; j < s.S; ++j) Axpy(p, v + j * s.K, y, s.K);
    return;
  }
  float sum = 0.0f;
  for (i = 0; i < m; ++i) {
    e[i] = std::exp(e[i] - max);
    sum += e[i];
  }
  for (i = 0; i < m; ++i) {
    float p = e[i] / sum;
    if (bf16_probs) p = RoundBf16(p);
    Axpy(p, v + slots[i] * s.K, y, s.K);
  }
}

int64_t MaxThreads() {
  const char* v = std::getenv("GPT_DECODE_ATTENTION_THREADS");
  const int64_t n = v ? std::atoll(v) : 0;
  return n > 0 ? n : int64_t{1} << 30;
}

// Below this much work (2 x queries x cache slots x K, over all rows and heads) a call runs on
// the calling thread alone: handing blocks to the pool cost more than it saved at every decode
// shape measured (loaded 2-core Xeon, load 7-9: one thread 1.65-1.71x faster at batch 8 over 32-64
// filled slots, 1.38x at batch 1, still 1.06x over 512 of 1024; BENCHMARKS.md). A full 1024-slot
// cache at batch 8 (12.6M) still splits, for a quiet machine and longer contexts.
constexpr int64_t kParallelWork = int64_t{1} << 23;

template <typename C>
ffi::Error Attend(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                  ffi::Buffer<ffi::PRED> mask, ffi::ResultBuffer<ffi::F32> y, int32_t bf16_probs) {
  auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions(), md = mask.dimensions();
  if (qd.size() != 3 || kd.size() != 3 || vd.size() != 3 || md.size() != 3)
    return ffi::Error::InvalidArgument("decode_attention: q, k, v and mask must be 3-D");
  Shape s{md[0], 0, qd[1], kd[1], qd[2]};
  const int64_t N = qd[0];
  if (s.B <= 0 || N % s.B != 0 || kd[0] != N || vd[0] != N || kd[2] != s.K || vd[1] != s.S ||
      vd[2] != s.K || md[1] != s.T || md[2] != s.S)
    return ffi::Error::InvalidArgument(
        "decode_attention: want q [B*H, T, K], k and v [B*H, S, K], mask [B, T, S]");
  s.H = N / s.B;
  const char* scores = std::getenv("GPT_DECODE_ATTENTION_SCORES");
  s.one_slot_at_a_time = scores && scores[0] == '1';
  const float* qp = q.typed_data();
  const C* kp = static_cast<const C*>(k.untyped_data());
  const C* vp = static_cast<const C*>(v.untyped_data());
  const bool* mp = mask.typed_data();
  float* yp = y->typed_data();
  const bool round = bf16_probs != 0;
  const int64_t threads = N * s.T * s.S * s.K * 2 < kParallelWork ? 1 : MaxThreads();
  gpt_kernels::RunBlocks(pool, N, threads, [=](int64_t n) {
    std::vector<float> e(s.S);
    std::vector<int64_t> slots(s.S);
    const int64_t b = n / s.H;
    for (int64_t t = 0; t < s.T; ++t) {
      Row<C>(qp + (n * s.T + t) * s.K, kp + n * s.S * s.K, vp + n * s.S * s.K,
             mp + (b * s.T + t) * s.S, yp + (n * s.T + t) * s.K, s, round, e.data(), slots.data());
    }
  });
  return ffi::Error::Success();
}

}  // namespace

#define GPT_DECODE_ATTENTION_HANDLER(name, C)                     \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(name, Attend<C>,                  \
                                ffi::Ffi::Bind()                  \
                                    .Ctx<ffi::ThreadPool>()       \
                                    .Arg<ffi::Buffer<ffi::F32>>() \
                                    .Arg<ffi::AnyBuffer>()        \
                                    .Arg<ffi::AnyBuffer>()        \
                                    .Arg<ffi::Buffer<ffi::PRED>>() \
                                    .Ret<ffi::Buffer<ffi::F32>>() \
                                    .Attr<int32_t>("bf16_probs"));

GPT_DECODE_ATTENTION_HANDLER(GptDecodeAttentionF32, float)
GPT_DECODE_ATTENTION_HANDLER(GptDecodeAttentionBF16, uint16_t)
