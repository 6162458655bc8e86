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
// XLA's own intra-op thread pool (pool.h: no second pool competing for the cores).
#include <algorithm>
#include <array>
#include <cmath>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <memory>
#include <mutex>
#include <thread>
#include <type_traits>
#include <unordered_set>
#include <utility>
#include <vector>

#ifdef __linux__
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "lanes.h"
#include "pool.h"
#include "simd_exp.h"
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
#ifndef GPT_GEMV_TILE
#define GPT_GEMV_TILE 4
#endif
constexpr int kTile = GPT_GEMV_TILE;  // weight rows multiplied together (independent accumulators)
constexpr int kLanes = 16;      // floats per accumulator: one AVX-512 register
constexpr int kRowsPerPass = 4; // activation rows sharing one read (and conversion) of a weight tile
#ifndef GPT_VNNI_TILE
#define GPT_VNNI_TILE 4
#define GPT_VNNI_ROWS 4
#endif
constexpr int kVnniTile = GPT_VNNI_TILE;  // the same two for the integer (VNNI) loops
constexpr int kVnniRows = GPT_VNNI_ROWS;

// Below kRowwiseBelow activation rows the int8 and bf16 loops can read the weights one row at a
// time, strictly in address order, with no software prefetch, instead of kTile interleaved rows
// with the next tile prefetched (the order tuned on a Xeon without AVX512-BF16, where it took the
// int8 loop from 1.5-1.9x to ~1.0x a plain read). On the first CPU with AVX512-BF16 this project
// met (AMD EPYC, Zen 4) the row order read 1.4-2.2x faster at 1-2 rows (int8 with float, int8 and
// int16 activations, bf16 with vdpbf16ps), tied at 4 and lost at 8 rows (where 4 weight rows'
// accumulators hide the instructions' latency); float32 weights were level in that order but read
// 1.2-1.3x faster at 1 row in tiles of 8 rows without prefetch, which the switch also selects
// (experiments/bench_gemv_loop.cc; BENCHMARKS.md, "decode-epyc, session 9"). So it is the default
// where the library is built with AVX512-BF16 (the CPU flag that told the two machines apart; an
// Intel CPU with it is unmeasured), and GPT_GEMV_ROWWISE=1 / 0 forces it on / off (read at each
// call, by MaxThreads, for same-run A/Bs).
constexpr int64_t kRowwiseBelow = 4;
#ifdef __AVX512BF16__
constexpr int kRowwiseDefault = 1;
#else
constexpr int kRowwiseDefault = 0;
#endif
std::atomic<int> g_rowwise{kRowwiseDefault};  // this call's setting (MaxThreads reads the variable)

inline bool Rowwise(int64_t B) { return B < kRowwiseBelow && g_rowwise.load(std::memory_order_relaxed); }

// The tail of a dot product past the last full vector, and the final scale.
template <typename W>
inline float Finish(float sum, const float* xb, const W* wr, int64_t k0, int64_t K, const float* scale,
                    int64_t n) {
  for (int64_t k = k0; k < K; ++k) sum += xb[k] * to_f32(wr[k]);
  return scale ? sum * scale[n] : sum;
}

#ifdef __AVX512F__
// Asks for the cache line `ahead` bytes past p: the same line of the next tile of rows. The tiles'
// rows are read in an interleaved order that the hardware prefetcher follows too late: at 1 row,
// fetching the next tile while this one is multiplied took the int8 loop from 1.5-1.9x to ~1.0x the
// time of a plain read of the same bytes (float32 ~0.95x -> ~0.9x; BENCHMARKS.md, decode). Past the
// end of the matrix it is a hint about an unmapped line, which never faults.
#ifndef GPT_GEMV_PREFETCH_TILES  // how many tiles ahead (0: none); a compile-time knob for bench_gemv_loop.cc
#define GPT_GEMV_PREFETCH_TILES 1
#endif
inline void Prefetch(const void* p, int64_t ahead) {
  if (GPT_GEMV_PREFETCH_TILES == 0) return;
  _mm_prefetch(reinterpret_cast<const char*>(reinterpret_cast<uintptr_t>(p) + GPT_GEMV_PREFETCH_TILES * ahead),
               _MM_HINT_T0);
}

inline __m512 Load16(const float* w) { return _mm512_loadu_ps(w); }
inline __m512 Load16(const uint16_t* w) {  // bf16: widen to 32 bits, shift into the high half
  __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline __m512 Load16(const int8_t* w) {
  __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w));
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b));
}

using gpt_kernels::Sum4;  // the float version (lanes.h); the int32 one follows

inline __m128i Sum4(__m512i a, __m512i b, __m512i c, __m512i d) {
  const __m512i ab = _mm512_add_epi32(_mm512_unpacklo_epi32(a, b), _mm512_unpackhi_epi32(a, b));
  const __m512i cd = _mm512_add_epi32(_mm512_unpacklo_epi32(c, d), _mm512_unpackhi_epi32(c, d));
  const __m512i t = _mm512_add_epi32(_mm512_unpacklo_epi64(ab, cd), _mm512_unpackhi_epi64(ab, cd));
  const __m256i h = _mm256_add_epi32(_mm512_castsi512_si256(t), _mm512_extracti64x4_epi64(t, 1));
  return _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
}

// Up to kTile weight rows [n, n + R) times BR activation rows [b0, b0 + BR): each weight vector is
// loaded and converted once and multiplied into BR accumulators (kTile x kRowsPerPass = 16 of the
// 32 vector registers).
template <typename W, int R, int BR, bool kPrefetch = true>
inline void Tile(const float* x, const W* w, const float* scale, float* y, int64_t b0, int64_t K,
                 int64_t N, int64_t n) {
  const int64_t k_vec = K - K % kLanes;
  __m512 acc[BR][R];
  for (int b = 0; b < BR; ++b)
    for (int r = 0; r < R; ++r) acc[b][r] = _mm512_setzero_ps();
  for (int64_t k = 0; k < k_vec; k += kLanes) {
    __m512 wv[R];
    for (int r = 0; r < R; ++r) {
      wv[r] = Load16(w + (n + r) * K + k);
      if (kPrefetch && (k * sizeof(W)) % 64 == 0) Prefetch(w + (n + r) * K + k, R * K * sizeof(W));
    }
    for (int b = 0; b < BR; ++b) {
      const __m512 xv = _mm512_loadu_ps(x + (b0 + b) * K + k);
      for (int r = 0; r < R; ++r) acc[b][r] = _mm512_fmadd_ps(xv, wv[r], acc[b][r]);
    }
  }
  for (int b = 0; b < BR; ++b) {
    float sums[R];
    if constexpr (R == 4) {
      _mm_storeu_ps(sums, Sum4(acc[b][0], acc[b][1], acc[b][2], acc[b][3]));
    } else {
      for (int r = 0; r < R; ++r) sums[r] = _mm512_reduce_add_ps(acc[b][r]);
    }
    for (int r = 0; r < R; ++r)
      y[(b0 + b) * N + n + r] = Finish(sums[r], x + (b0 + b) * K, w + (n + r) * K, k_vec, K, scale, n + r);
  }
}

template <typename W, int R, bool kPrefetch = true>
inline void Rows(const float* x, const W* w, const float* scale, float* y, int64_t B, int64_t K,
                 int64_t N, int64_t n) {
  int64_t b = 0;
  for (; b + kRowsPerPass <= B; b += kRowsPerPass) Tile<W, R, kRowsPerPass, kPrefetch>(x, w, scale, y, b, K, N, n);
  switch (B - b) {
    case 3: Tile<W, R, 3, kPrefetch>(x, w, scale, y, b, K, N, n); break;
    case 2: Tile<W, R, 2, kPrefetch>(x, w, scale, y, b, K, N, n); break;
    case 1: Tile<W, R, 1, kPrefetch>(x, w, scale, y, b, K, N, n); break;
  }
}

// y[b, n] = scale[n] * sum_k x[b, k] * W[n, k] for n in [n0, n1). Each tile of W is read from
// memory once; activation rows past the first pass read it again from L1/L2.
template <typename W>
void Block(const float* x, const W* w, const float* scale, float* y, int64_t B, int64_t K,
           int64_t N, int64_t n0, int64_t n1) {
  int64_t n = n0;
  if constexpr (std::is_same_v<W, float>) {
    // float32 at 1 row: 8 weight rows per tile, no software prefetch (Rowwise's switch): 1.25-1.3x
    // the 4-row tiles with prefetch on Zen 4, where one row at a time was level (BENCHMARKS.md,
    // decode-epyc). Not from 2 rows: 8 x rows accumulators would spill past 3.
    if (B == 1 && Rowwise(B)) {
      for (; n + 8 <= n1; n += 8) Rows<W, 8, false>(x, w, scale, y, B, K, N, n);
      for (; n < n1; ++n) Rows<W, 1, false>(x, w, scale, y, B, K, N, n);
      return;
    }
  } else if (Rowwise(B)) {  // int8 and bf16 weights: one row at a time
    for (; n < n1; ++n) Rows<W, 1, false>(x, w, scale, y, B, K, N, n);
    return;
  }
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

// int8 weights times int8 activations (model.int8_activations): AVX-512 VNNI's vpdpbusd multiplies
// 64 unsigned by signed bytes and adds them into 16 int32 sums in one instruction, where the float
// path needs a widen, a convert and an FMA per 16 weights (compute-bound at ~1.5x the time of
// reading the bytes, experiments/bench_gemv.py). Each activation row is quantized once per call
// to q = round(x * 127 / max|x|) in [-127, 127]. vpdpbusd multiplies unsigned by signed bytes: the
// weights take the unsigned side as w + 128 (one xor with 0x80 per 64 loaded), so that
// sum((w + 128) * q) = sum(w * q) + 128 * sum(q), where sum(q) is the activation row's, computed
// once per call when it is quantized. (The other way round, q + 128 against w, needs each weight
// row's sum: one more vpdpbusd per 64 weights and pass, ~10-20% of the 8-row loop's integer work.)
// y = (sum(q * w)) * (max|x| / 127) * scale[n]: the sums are exact integers, so the kernel and
// `reference(..., int8_activations=True)` agree to float32 rounding.
constexpr int64_t kVnniLanes = 64;  // bytes per vpdpbusd

// Row b of x as offset bytes (K padded to a multiple of 64 with 128 = a zero activation) and the
// factor that turns its integer sums back into floats.
// The largest |x| of a row (vectorised: at 8 rows and K = 3072 a scalar pass cost ~10 us a call).
inline float AbsMax(const float* x, int64_t K) {
  float amax = 0.0f;
  int64_t k = 0;
#ifdef __AVX512F__
  __m512 m = _mm512_setzero_ps();
  for (; k + kLanes <= K; k += kLanes) m = _mm512_max_ps(m, _mm512_abs_ps(_mm512_loadu_ps(x + k)));
  amax = _mm512_reduce_max_ps(m);
#endif
  for (; k < K; ++k) amax = std::max(amax, std::abs(x[k]));
  return amax;
}

// Row b of x as int8 q (K padded to a multiple of 64 with zeros), the sum of q (*qsum), and the
// factor that turns its integer sums back into floats. Rounding is half to even, in both the vector
// part (cvtps2dq under the default MXCSR) and the scalar tail (nearbyint), as quantize_rows's.
inline float QuantizeRow(const float* x, int64_t K, int8_t* q, int64_t k_pad, int32_t* qsum) {
  const float amax = AbsMax(x, K);
  const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
  int64_t k = 0;
  int32_t sum = 0;
#ifdef __AVX512F__
  const __m512 vinv = _mm512_set1_ps(inv);
  __m512i vsum = _mm512_setzero_si512();
  for (; k + kLanes <= K; k += kLanes) {
    const __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + k), vinv));
    vsum = _mm512_add_epi32(vsum, v);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + k), _mm512_cvtepi32_epi8(v));
  }
  sum = _mm512_reduce_add_epi32(vsum);
#endif
  for (; k < K; ++k) {
    q[k] = static_cast<int8_t>(std::nearbyint(x[k] * inv));
    sum += q[k];
  }
  for (k = K; k < k_pad; ++k) q[k] = 0;
  *qsum = sum;
  return amax / 127.0f;
}

// int8 weights times float activations at several rows (GptGemvS8A16): each activation row is
// quantized once per call to int16, q = round(x * 32767 / max|x|), and multiplied with VNNI's
// vpdpwssd (32 int16 x int16 products summed in pairs into 16 int32 lanes per instruction) against
// the weights widened to int16 once per load (vpmovsxbw) and shared by every activation row of the
// pass. The float loop spends a widen, a convert and 2 x rows FMAs per 16 weights and converts each
// weight once per 4-row pass; this spends one widen and `rows` vpdpwssd per 32. An activation keeps
// 16 bits (its rounding, half a step of max|x| / 32767, is ~1/128 of the int8 weights' own rounding
// error relative to each operand's range): the result is the float product to within
// 0.5 * step * sum_k |w_k| * scale plus float32 rounding (tests/test_gemv.py holds it to that).
constexpr int64_t kA16Lanes = 32;    // int16 activations per vpdpwssd
constexpr int64_t kA16Chunk = 8192;  // K per int32 sum: 512 products of <= 128 * 32767 per lane < 2^31

inline float QuantizeRow16(const float* x, int64_t K, int16_t* q, int64_t k_pad) {
  const float amax = AbsMax(x, K);
  const float inv = amax > 0.0f ? 32767.0f / amax : 0.0f;
  int64_t k = 0;
#ifdef __AVX512F__
  const __m512 vinv = _mm512_set1_ps(inv);
  for (; k + kLanes <= K; k += kLanes)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + k),
                        _mm512_cvtepi32_epi16(_mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + k), vinv))));
#endif
  for (; k < K; ++k) q[k] = static_cast<int16_t>(std::nearbyint(x[k] * inv));
  for (k = K; k < k_pad; ++k) q[k] = 0;
  return amax / 32767.0f;
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
constexpr bool kHasVnni = true;

// R weight rows times BR quantized activation rows; each 64-byte weight vector is loaded (and
// offset to unsigned) once. The ragged end of K loads weights under a mask: the padded activations
// are zero, so the masked lanes (0 ^ 0x80 = 128) add nothing.
template <int R, int BR, bool kPrefetch = true>
inline void TileVnni(const int8_t* q, int64_t k_pad, const int32_t* qsum, const float* xs,
                     const int8_t* w, const float* scale, float* y, int64_t b0, int64_t K, int64_t N,
                     int64_t n) {
  __m512i acc[BR][R];
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  for (int b = 0; b < BR; ++b)
    for (int r = 0; r < R; ++r) acc[b][r] = _mm512_setzero_si512();
  for (int64_t k = 0; k < K; k += kVnniLanes) {
    const __mmask64 m = K - k >= kVnniLanes ? ~__mmask64{0} : (__mmask64{1} << (K - k)) - 1;
    __m512i wv[R];
    for (int r = 0; r < R; ++r) {
      wv[r] = _mm512_xor_si512(_mm512_maskz_loadu_epi8(m, w + (n + r) * K + k), flip);
      if (kPrefetch) Prefetch(w + (n + r) * K + k, R * K);
    }
    for (int b = 0; b < BR; ++b) {
      const __m512i qv = _mm512_loadu_si512(q + (b0 + b) * k_pad + k);
      for (int r = 0; r < R; ++r) acc[b][r] = _mm512_dpbusd_epi32(acc[b][r], wv[r], qv);
    }
  }
  for (int b = 0; b < BR; ++b) {
    int32_t dots[R];
    if constexpr (R == 4) {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dots), Sum4(acc[b][0], acc[b][1], acc[b][2], acc[b][3]));
    } else {
      for (int r = 0; r < R; ++r) dots[r] = _mm512_reduce_add_epi32(acc[b][r]);
    }
    const int32_t offset = 128 * qsum[b0 + b];  // sum(q * w) = sum(q * (w + 128)) - 128 * sum(q)
    for (int r = 0; r < R; ++r)
      y[(b0 + b) * N + n + r] =
          static_cast<float>(dots[r] - offset) * (xs[b0 + b] * (scale ? scale[n + r] : 1.0f));
  }
}

// The last `left` (< kVnniRows) activation rows in one tile of exactly that many.
template <int R, int BR, bool kPrefetch = true>
inline void RestVnni(const int8_t* q, int64_t k_pad, const int32_t* qsum, const float* xs, const int8_t* w,
                     const float* scale, float* y, int64_t b0, int64_t left, int64_t K, int64_t N, int64_t n) {
  if constexpr (BR > 0) {
    if (left == BR) return TileVnni<R, BR, kPrefetch>(q, k_pad, qsum, xs, w, scale, y, b0, K, N, n);
    RestVnni<R, BR - 1, kPrefetch>(q, k_pad, qsum, xs, w, scale, y, b0, left, K, N, n);
  }
}

template <int R, bool kPrefetch = true>
inline void RowsVnni(const int8_t* q, int64_t k_pad, const int32_t* qsum, const float* xs, const int8_t* w,
                     const float* scale, float* y, int64_t B, int64_t K, int64_t N, int64_t n) {
  int64_t b = 0;
  for (; b + kVnniRows <= B; b += kVnniRows)
    TileVnni<R, kVnniRows, kPrefetch>(q, k_pad, qsum, xs, w, scale, y, b, K, N, n);
  RestVnni<R, kVnniRows - 1, kPrefetch>(q, k_pad, qsum, xs, w, scale, y, b, B - b, K, N, n);
}

void BlockVnni(const int8_t* q, int64_t k_pad, const int32_t* qsum, const float* xs, const int8_t* w,
               const float* scale, float* y, int64_t B, int64_t K, int64_t N, int64_t n0, int64_t n1) {
  int64_t n = n0;
  if (Rowwise(B)) {
    for (; n < n1; ++n) RowsVnni<1, false>(q, k_pad, qsum, xs, w, scale, y, B, K, N, n);
    return;
  }
  for (; n + kVnniTile <= n1; n += kVnniTile) RowsVnni<kVnniTile>(q, k_pad, qsum, xs, w, scale, y, B, K, N, n);
  for (; n < n1; ++n) RowsVnni<1>(q, k_pad, qsum, xs, w, scale, y, B, K, N, n);
}

// R weight rows times BR int16 activation rows (K padded with zeros to a multiple of 32 in q). The
// weights' ragged end is loaded under a mask; the int32 lanes are flushed to float every kA16Chunk
// of K (exact to there) and summed across lanes in float32.
template <int R, int BR, bool kPrefetch = true>
inline void TileA16(const int16_t* q, int64_t k_pad, const float* xs, const int8_t* w,
                    const float* scale, float* y, int64_t b0, int64_t K, int64_t N, int64_t n) {
  float sums[BR][R] = {};
  for (int64_t c = 0; c < K; c += kA16Chunk) {
    const int64_t c_end = std::min(K, c + kA16Chunk);
    __m512i acc[BR][R];
    for (int b = 0; b < BR; ++b)
      for (int r = 0; r < R; ++r) acc[b][r] = _mm512_setzero_si512();
    for (int64_t k = c; k < c_end; k += kA16Lanes) {
      const __mmask32 m = K - k >= kA16Lanes ? ~__mmask32{0} : (__mmask32{1} << (K - k)) - 1;
      __m512i wv[R];
      for (int r = 0; r < R; ++r) {
        wv[r] = _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(m, w + (n + r) * K + k));
        if (kPrefetch && k % 64 == 0) Prefetch(w + (n + r) * K + k, R * K);
      }
      for (int b = 0; b < BR; ++b) {
        const __m512i xv = _mm512_loadu_si512(q + (b0 + b) * k_pad + k);
        for (int r = 0; r < R; ++r) acc[b][r] = _mm512_dpwssd_epi32(acc[b][r], xv, wv[r]);
      }
    }
    // Each lane's int32 sum is exact, but 16 of them can pass 2^31: they are added as floats.
    for (int b = 0; b < BR; ++b) {
      float dots[R];
      if constexpr (R == 4) {
        _mm_storeu_ps(dots, Sum4(_mm512_cvtepi32_ps(acc[b][0]), _mm512_cvtepi32_ps(acc[b][1]),
                                 _mm512_cvtepi32_ps(acc[b][2]), _mm512_cvtepi32_ps(acc[b][3])));
      } else {
        for (int r = 0; r < R; ++r) dots[r] = _mm512_reduce_add_ps(_mm512_cvtepi32_ps(acc[b][r]));
      }
      for (int r = 0; r < R; ++r) sums[b][r] += dots[r];
    }
  }
  for (int b = 0; b < BR; ++b)
    for (int r = 0; r < R; ++r)
      y[(b0 + b) * N + n + r] = sums[b][r] * (xs[b0 + b] * (scale ? scale[n + r] : 1.0f));
}

template <int R, int BR, bool kPrefetch = true>
inline void RestA16(const int16_t* q, int64_t k_pad, const float* xs, const int8_t* w,
                    const float* scale, float* y, int64_t b0, int64_t left, int64_t K, int64_t N, int64_t n) {
  if constexpr (BR > 0) {
    if (left == BR) return TileA16<R, BR, kPrefetch>(q, k_pad, xs, w, scale, y, b0, K, N, n);
    RestA16<R, BR - 1, kPrefetch>(q, k_pad, xs, w, scale, y, b0, left, K, N, n);
  }
}

template <int R, bool kPrefetch = true>
inline void RowsA16(const int16_t* q, int64_t k_pad, const float* xs, const int8_t* w,
                    const float* scale, float* y, int64_t B, int64_t K, int64_t N, int64_t n) {
  int64_t b = 0;
  for (; b + kVnniRows <= B; b += kVnniRows) TileA16<R, kVnniRows, kPrefetch>(q, k_pad, xs, w, scale, y, b, K, N, n);
  RestA16<R, kVnniRows - 1, kPrefetch>(q, k_pad, xs, w, scale, y, b, B - b, K, N, n);
}

void BlockA16(const int16_t* q, int64_t k_pad, const float* xs, const int8_t* w, const float* scale,
              float* y, int64_t B, int64_t K, int64_t N, int64_t n0, int64_t n1) {
  int64_t n = n0;
  if (Rowwise(B)) {
    for (; n < n1; ++n) RowsA16<1, false>(q, k_pad, xs, w, scale, y, B, K, N, n);
    return;
  }
  for (; n + kVnniTile <= n1; n += kVnniTile) RowsA16<kVnniTile>(q, k_pad, xs, w, scale, y, B, K, N, n);
  for (; n < n1; ++n) RowsA16<1>(q, k_pad, xs, w, scale, y, B, K, N, n);
}
#else
constexpr bool kHasVnni = false;

// Without VNNI (this handler is then not chosen by gemv.py; kept correct for completeness).
void BlockVnni(const int8_t* q, int64_t k_pad, const int32_t* qsum, const float* xs, const int8_t* w,
               const float* scale, float* y, int64_t B, int64_t K, int64_t N, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t b = 0; b < B; ++b) {
      int64_t dot = 0;
      for (int64_t k = 0; k < K; ++k) dot += int32_t{q[b * k_pad + k]} * w[n * K + k];
      y[b * N + n] = static_cast<float>(dot) * (xs[b] * (scale ? scale[n] : 1.0f));
    }
}

// Without VNNI (gemv.py then does not choose GptGemvS8A16; kept correct for completeness).
void BlockA16(const int16_t* q, int64_t k_pad, const float* xs, const int8_t* w, const float* scale,
              float* y, int64_t B, int64_t K, int64_t N, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t b = 0; b < B; ++b) {
      int64_t dot = 0;
      for (int64_t k = 0; k < K; ++k) dot += int64_t{q[b * k_pad + k]} * w[n * K + k];
      y[b * N + n] = static_cast<float>(dot) * (xs[b] * (scale ? scale[n] : 1.0f));
    }
}
#endif

// bf16 weights times bf16 activations (the bf16 model, whose activations are bf16 already):
// AVX512-BF16's vdpbf16ps multiplies 32 bf16 pairs and adds them, two by two, into 16 float32 sums
// in one instruction, where the widening loop above spends a widen, a shift and an FMA per 16
// weights (and converts the weights once per pass of 4 activation rows). Each product of two bf16
// values is exact in float32, so this is the float32 product of the same bf16 numbers; only the
// order of the sums differs (and the instruction flushes denormals to zero): results agree with
// XLA's bf16 x bf16 -> float32 einsum to float32 rounding. GPT_GEMV_BF16DOT=0 (read at each call)
// takes the widening loop instead, for the same-run A/B (experiments/bench_decode.py --ab).
constexpr int64_t kBf16Lanes = 32;  // bf16 pairs per vdpbf16ps

bool Bf16DotEnabled() {
  const char* v = std::getenv("GPT_GEMV_BF16DOT");
  return !(v && v[0] == '0');
}

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
constexpr bool kHasBf16Dot = true;

// R weight rows times BR activation rows, both bf16; each 64-byte weight vector is loaded once per
// pass and shared by the BR rows. The ragged end of K is loaded under a mask in both operands, so
// the masked lanes multiply zero by zero.
template <int R, int BR, bool kPrefetch>
inline void TileBf16(const uint16_t* x, const uint16_t* w, const float* scale, float* y, int64_t b0,
                     int64_t K, int64_t N, int64_t n) {
  __m512 acc[BR][R];
  for (int b = 0; b < BR; ++b)
    for (int r = 0; r < R; ++r) acc[b][r] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += kBf16Lanes) {
    const __mmask32 m = K - k >= kBf16Lanes ? ~__mmask32{0} : (__mmask32{1} << (K - k)) - 1;
    __m512i wv[R];
    for (int r = 0; r < R; ++r) {
      wv[r] = _mm512_maskz_loadu_epi16(m, w + (n + r) * K + k);
      if (kPrefetch) Prefetch(w + (n + r) * K + k, R * K * sizeof(uint16_t));
    }
    for (int b = 0; b < BR; ++b) {
      const __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(m, x + (b0 + b) * K + k);
      for (int r = 0; r < R; ++r) acc[b][r] = _mm512_dpbf16_ps(acc[b][r], xv, (__m512bh)wv[r]);
    }
  }
  for (int b = 0; b < BR; ++b) {
    float sums[R];
    if constexpr (R == 4) {
      _mm_storeu_ps(sums, Sum4(acc[b][0], acc[b][1], acc[b][2], acc[b][3]));
    } else {
      for (int r = 0; r < R; ++r) sums[r] = _mm512_reduce_add_ps(acc[b][r]);
    }
    for (int r = 0; r < R; ++r) y[(b0 + b) * N + n + r] = scale ? sums[r] * scale[n + r] : sums[r];
  }
}

template <int R, bool kPrefetch>
inline void RowsBf16(const uint16_t* x, const uint16_t* w, const float* scale, float* y, int64_t B,
                     int64_t K, int64_t N, int64_t n) {
  int64_t b = 0;
  for (; b + kRowsPerPass <= B; b += kRowsPerPass)
    TileBf16<R, kRowsPerPass, kPrefetch>(x, w, scale, y, b, K, N, n);
  switch (B - b) {
    case 3: TileBf16<R, 3, kPrefetch>(x, w, scale, y, b, K, N, n); break;
    case 2: TileBf16<R, 2, kPrefetch>(x, w, scale, y, b, K, N, n); break;
    case 1: TileBf16<R, 1, kPrefetch>(x, w, scale, y, b, K, N, n); break;
  }
}

void BlockBf16(const uint16_t* x, const uint16_t* w, const float* scale, float* y, int64_t B, int64_t K,
               int64_t N, int64_t n0, int64_t n1) {
  int64_t n = n0;
  if (Rowwise(B)) {
    for (; n < n1; ++n) RowsBf16<1, false>(x, w, scale, y, B, K, N, n);
    return;
  }
  for (; n + kTile <= n1; n += kTile) RowsBf16<kTile, true>(x, w, scale, y, B, K, N, n);
  for (; n < n1; ++n) RowsBf16<1, true>(x, w, scale, y, B, K, N, n);
}
#else
constexpr bool kHasBf16Dot = false;

// Without AVX512-BF16 (GemvBf16 then widens the activations and runs Block; kept correct for
// completeness).
void BlockBf16(const uint16_t* x, const uint16_t* w, const float* scale, float* y, int64_t B, int64_t K,
               int64_t N, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t b = 0; b < B; ++b) {
      float sum = 0.0f;
      for (int64_t k = 0; k < K; ++k) sum += to_f32(x[b * K + k]) * to_f32(w[n * K + k]);
      y[b * N + n] = scale ? sum * scale[n] : sum;
    }
}
#endif

// Weights on 2 MB pages (transparent huge pages). A batch-1 call streams every weight once, 4 KB
// page after 4 KB page: each page costs a TLB miss, a page walk that is two-dimensional in a VM,
// and the hardware prefetcher stops at every 4 KB boundary. Where the kernel leaves THP to
// madvise (`enabled` = madvise, common, and this machine's setting), XLA's buffers stay on 4 KB
// pages. So the first call that sees a weight buffer marks the 2 MB-aligned range around it
// MADV_HUGEPAGE and hands it to one background thread (lowest priority) that asks the kernel to
// rebuild it on 2 MB pages now (MADV_COLLAPSE, Linux 6.1+; without it, khugepaged does so over
// time). The range is rounded out to whole 2 MB pages but clamped to the mapping that holds the
// buffer (/proc/self/maps), so that the 117M's int8 matrices (0.6-2.4 MB, most with no whole 2 MB
// page inside) qualify too; what it changes for the neighbours in that mapping is only which page
// size backs them (invisible to the program; at most 2 MB of untouched pages per edge may become
// resident). Measured in experiments/bench_gemv_loop.cc --hugepages (BENCHMARKS.md, gemv-read).
// GPT_GEMV_HUGEPAGES=0 (read at each call) turns it off.
namespace hugepages {

constexpr uintptr_t kHuge = uintptr_t{2} << 20;

bool Enabled() {
  const char* v = std::getenv("GPT_GEMV_HUGEPAGES");
  return !(v && v[0] == '0');
}

#ifdef __linux__
#ifndef MADV_COLLAPSE
#define MADV_COLLAPSE 25
#endif

// [begin, end) of the mapping that holds address a, or {0, 0} when none does.
std::pair<uintptr_t, uintptr_t> Mapping(uintptr_t a) {
  std::pair<uintptr_t, uintptr_t> found{0, 0};
  FILE* f = std::fopen("/proc/self/maps", "r");
  if (!f) return found;
  unsigned long lo, hi;
  char line[512];
  while (std::fgets(line, sizeof line, f)) {
    if (std::sscanf(line, "%lx-%lx", &lo, &hi) == 2 && lo <= a && a < hi) {
      found = {lo, hi};
      break;
    }
  }
  std::fclose(f);
  return found;
}

// One background thread, started at the first range, collapses ranges in the order they came.
struct Collapser {
  std::mutex mu;
  std::condition_variable ready;
  std::deque<std::pair<uintptr_t, uintptr_t>> ranges;
  std::unordered_set<uintptr_t> seen;  // buffers already handled (by address)
  bool started = false;

  void Run() {
    setpriority(PRIO_PROCESS, static_cast<id_t>(syscall(SYS_gettid)), 19);  // behind the decoding
    for (;;) {
      std::pair<uintptr_t, uintptr_t> r;
      {
        std::unique_lock<std::mutex> lock(mu);
        ready.wait(lock, [this] { return !ranges.empty(); });
        r = ranges.front();
        ranges.pop_front();
      }
      // One 2 MB page at a time: a range that is unmapped meanwhile (XLA freed the buffer) fails
      // page by page without harm; a failure (no free 2 MB page, an old kernel) leaves 4 KB pages.
      for (uintptr_t a = r.first; a < r.second; a += kHuge) madvise(reinterpret_cast<void*>(a), kHuge, MADV_COLLAPSE);
    }
  }
};

Collapser& TheCollapser() {
  static Collapser* c = new Collapser;  // never destroyed: its thread may outlive static destructors
  return *c;
}

void Advise(const void* p, size_t bytes) {
  if (bytes < kHuge / 4 || !Enabled()) return;  // small matrices: too few pages to matter
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  Collapser& c = TheCollapser();
  {
    std::lock_guard<std::mutex> lock(c.mu);
    if (!c.seen.insert(a).second) return;
  }
  const auto [lo, hi] = Mapping(a);
  const uintptr_t begin = std::max(a & ~(kHuge - 1), (lo + kHuge - 1) & ~(kHuge - 1));
  const uintptr_t end = std::min((a + bytes + kHuge - 1) & ~(kHuge - 1), hi & ~(kHuge - 1));
  if (end <= begin) return;
  if (madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE) != 0) return;
  std::lock_guard<std::mutex> lock(c.mu);
  c.ranges.emplace_back(begin, end);
  if (!c.started) {
    c.started = true;
    std::thread([&c] { c.Run(); }).detach();
  }
  c.ready.notify_one();
}
#else
void Advise(const void*, size_t) {}
#endif

}  // namespace hugepages

// GPT_GEMV_THREADS caps the threads one call uses (default: all of XLA's pool). Read at every call
// (a getenv, ~0.1 us against calls of 20 us and more), so that experiments/bench_gemv.py can
// interleave a single-thread column with the default one and separate the hand-off from the loops.
int64_t MaxThreads() {
  const char* r = std::getenv("GPT_GEMV_ROWWISE");  // every handler calls this once per call
  g_rowwise.store(r && r[0] ? (r[0] != '0') : kRowwiseDefault, std::memory_order_relaxed);
  const char* v = std::getenv("GPT_GEMV_THREADS");
  const int64_t n = v ? std::atoll(v) : 0;
  return n > 0 ? n : int64_t{1} << 30;
}

// The shapes of one call, checked: x [B, K], w [N, K], and the per-output scales (nullptr when
// `scale` is not [N]: an unscaled product).
struct Shape {
  int64_t B = 0, K = 0, N = 0;
  const float* scale = nullptr;
};

template <typename XBuffer, typename WBuffer>
ffi::Error CheckShapes(const XBuffer& x, const WBuffer& w, const ffi::Buffer<ffi::F32>& scale,
                       Shape* s) {
  auto xd = x.dimensions();
  auto wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2) return ffi::Error::InvalidArgument("gemv: x and w must be 2-D");
  *s = Shape{xd[0], xd[1], wd[0], nullptr};
  if (wd[1] != s->K) return ffi::Error::InvalidArgument("gemv: w must be [N, K] for x [B, K]");
  if (scale.element_count() == static_cast<size_t>(s->N)) s->scale = scale.typed_data();
  return ffi::Error::Success();
}

template <typename W>
ffi::Error Gemv(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer w,
                ffi::Buffer<ffi::F32> scale, ffi::ResultBuffer<ffi::F32> y) {
  Shape shape;
  if (ffi::Error e = CheckShapes(x, w, scale, &shape); e.failure()) return e;
  const int64_t B = shape.B, K = shape.K, N = shape.N;  // named: a lambda cannot capture a structured binding in C++17
  const float* s = shape.scale;
  const float* xp = x.typed_data();
  const W* wp = static_cast<const W*>(w.untyped_data());
  hugepages::Advise(wp, static_cast<size_t>(N * K) * sizeof(W));
  float* yp = y->typed_data();
  gpt_kernels::RunBlocks(pool, (N + kBlock - 1) / kBlock, MaxThreads(), [=](int64_t i) {
    Block<W>(xp, wp, s, yp, B, K, N, i * kBlock, std::min(N, (i + 1) * kBlock));
  });
  return ffi::Error::Success();
}

// bf16 weights (GptGemvBF16): float32 activations take the widening loop (Block); bf16 ones (the
// bf16 model's, exact in bf16) take the vdpbf16ps loop where the CPU has AVX512-BF16 and
// GPT_GEMV_BF16DOT is not 0, else they are widened to float32 once per call (B * K, shared by
// every block) for the widening loop.
ffi::Error GemvBf16(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::Buffer<ffi::F32> scale,
                    ffi::ResultBuffer<ffi::F32> y) {
  Shape shape;
  if (ffi::Error e = CheckShapes(x, w, scale, &shape); e.failure()) return e;
  const int64_t B = shape.B, K = shape.K, N = shape.N;
  const float* s = shape.scale;
  const uint16_t* wp = static_cast<const uint16_t*>(w.untyped_data());
  hugepages::Advise(wp, static_cast<size_t>(N * K) * sizeof(uint16_t));
  float* yp = y->typed_data();
  const int64_t blocks = (N + kBlock - 1) / kBlock;
  if (x.element_type() == ffi::DataType::F32) {
    const float* xp = static_cast<const float*>(x.untyped_data());
    gpt_kernels::RunBlocks(pool, blocks, MaxThreads(), [=](int64_t i) {
      Block<uint16_t>(xp, wp, s, yp, B, K, N, i * kBlock, std::min(N, (i + 1) * kBlock));
    });
    return ffi::Error::Success();
  }
  if (x.element_type() != ffi::DataType::BF16)
    return ffi::Error::InvalidArgument("gemv bf16: x must be float32 or bfloat16");
  const uint16_t* xh = static_cast<const uint16_t*>(x.untyped_data());
  if (kHasBf16Dot && Bf16DotEnabled()) {
    gpt_kernels::RunBlocks(pool, blocks, MaxThreads(), [=](int64_t i) {
      BlockBf16(xh, wp, s, yp, B, K, N, i * kBlock, std::min(N, (i + 1) * kBlock));
    });
    return ffi::Error::Success();
  }
  auto xf = std::make_shared<std::vector<float>>(B * K);
  for (int64_t i = 0; i < B * K; ++i) (*xf)[i] = to_f32(xh[i]);
  gpt_kernels::RunBlocks(pool, blocks, MaxThreads(), [=](int64_t i) {
    Block<uint16_t>(xf->data(), wp, s, yp, B, K, N, i * kBlock, std::min(N, (i + 1) * kBlock));
  });
  return ffi::Error::Success();
}

ffi::Error GemvInt8Activations(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> w,
                               ffi::Buffer<ffi::F32> scale, ffi::ResultBuffer<ffi::F32> y) {
  Shape shape;
  if (ffi::Error e = CheckShapes(x, w, scale, &shape); e.failure()) return e;
  const int64_t B = shape.B, K = shape.K, N = shape.N;
  const float* s = shape.scale;
  // Quantized once per call (B * K bytes), shared by every block.
  const int64_t k_pad = (K + kVnniLanes - 1) / kVnniLanes * kVnniLanes;
  auto q = std::make_shared<std::vector<int8_t>>(B * k_pad);
  auto xs = std::make_shared<std::vector<float>>(B);
  auto qsum = std::make_shared<std::vector<int32_t>>(B);
  for (int64_t b = 0; b < B; ++b)
    (*xs)[b] = QuantizeRow(x.typed_data() + b * K, K, q->data() + b * k_pad, k_pad, qsum->data() + b);
  const int8_t* wp = w.typed_data();
  hugepages::Advise(wp, static_cast<size_t>(N * K));
  float* yp = y->typed_data();
  gpt_kernels::RunBlocks(pool, (N + kBlock - 1) / kBlock, MaxThreads(), [=](int64_t i) {
    BlockVnni(q->data(), k_pad, qsum->data(), xs->data(), wp, s, yp, B, K, N, i * kBlock,
              std::min(N, (i + 1) * kBlock));
  });
  return ffi::Error::Success();
}

ffi::Error GemvInt16Activations(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> w,
                                ffi::Buffer<ffi::F32> scale, ffi::ResultBuffer<ffi::F32> y) {
  Shape shape;
  if (ffi::Error e = CheckShapes(x, w, scale, &shape); e.failure()) return e;
  const int64_t B = shape.B, K = shape.K, N = shape.N;
  const float* s = shape.scale;
  // Quantized once per call (B * K int16), shared by every block.
  const int64_t k_pad = (K + kA16Lanes - 1) / kA16Lanes * kA16Lanes;
  auto q = std::make_shared<std::vector<int16_t>>(B * k_pad);
  auto xs = std::make_shared<std::vector<float>>(B);
  for (int64_t b = 0; b < B; ++b) (*xs)[b] = QuantizeRow16(x.typed_data() + b * K, K, q->data() + b * k_pad, k_pad);
  const int8_t* wp = w.typed_data();
  hugepages::Advise(wp, static_cast<size_t>(N * K));
  float* yp = y->typed_data();
  gpt_kernels::RunBlocks(pool, (N + kBlock - 1) / kBlock, MaxThreads(), [=](int64_t i) {
    BlockA16(q->data(), k_pad, xs->data(), wp, s, yp, B, K, N, i * kBlock, std::min(N, (i + 1) * kBlock));
  });
  return ffi::Error::Success();
}

// ---- The MLP in one call: y = gelu(x W1^T * s1 + b1) W2^T * s2 + b2 (c_fc, GELU, c_proj) ----
//
// At one row an int8 117M layer's matrices are 0.6-2.4 MB: each call hands its blocks to the pool's
// second thread (a wake-up) and starts with misses before its prefetch runs ahead, a fixed cost that
// weighs 4x more against int8's bytes than float32's (the second core gave float32 1.85x, int8
// 1.38x: BENCHMARKS.md, "the lead's quiet retake, session 6"). Here c_fc's rows and then c_proj's
// are split over the threads in one pool hand-off (pool.h's RunPhases), the bias and the GELU are
// applied to each block of the hidden row while it is in cache, and c_proj starts as soon as the
// last block of c_fc is done. h (the GELU'd hidden rows, [B, N1]) is the call's second result: the
// scratch that phase 2 reads.

// GPT-2's tanh-approximate GELU, 0.5 x (1 + tanh(z)) with z = sqrt(2/pi) (x + 0.044715 x^3), written
// as x / (1 + exp(-2z)) (the same function: 0.5 (1 + tanh z) = 1 / (1 + exp(-2z))), applied to
// v + bias over [0, n) in place.
constexpr float kGeluC = 0.7978845608028654f;  // sqrt(2 / pi)

inline void BiasGelu(float* v, const float* bias, int64_t n) {
  int64_t i = 0;
#ifdef __AVX512F__
  const __m512 c = _mm512_set1_ps(kGeluC), c3 = _mm512_set1_ps(kGeluC * 0.044715f);
  const __m512 one = _mm512_set1_ps(1.0f), m2 = _mm512_set1_ps(-2.0f);
  for (; i < n; i += kLanes) {
    const __mmask16 m = gpt_kernels::TailMask(n - i);
    const __m512 x = _mm512_add_ps(_mm512_maskz_loadu_ps(m, v + i), _mm512_maskz_loadu_ps(m, bias + i));
    const __m512 z = _mm512_mul_ps(x, _mm512_fmadd_ps(_mm512_mul_ps(x, x), c3, c));  // x (c + c3 x^2)
    const __m512 e = gpt_kernels::Exp16(_mm512_mul_ps(m2, z));
    _mm512_mask_storeu_ps(v + i, m, _mm512_div_ps(x, _mm512_add_ps(one, e)));
  }
#endif
  for (; i < n; ++i) {
    const float x = v[i] + bias[i];
    v[i] = 0.5f * x * (1.0f + std::tanh(kGeluC * (x + 0.044715f * x * x * x)));
  }
}

inline void AddBias(float* v, const float* bias, int64_t n) {
  for (int64_t i = 0; i < n; ++i) v[i] += bias[i];  // the compiler vectorises this one
}

// The shapes of a fused MLP call, checked: x [B, K], w1 [N1, K], b1 [N1], w2 [N2, N1], b2 [N2],
// y [B, N2], h [B, N1]; scales [N] or empty (unscaled).
struct MlpShape {
  Shape fc, proj;
};

template <typename WBuffer>
ffi::Error CheckMlp(const ffi::Buffer<ffi::F32>& x, const WBuffer& w1, const ffi::Buffer<ffi::F32>& s1,
                    const ffi::Buffer<ffi::F32>& b1, const WBuffer& w2, const ffi::Buffer<ffi::F32>& s2,
                    const ffi::Buffer<ffi::F32>& b2, MlpShape* s) {
  if (ffi::Error e = CheckShapes(x, w1, s1, &s->fc); e.failure()) return e;
  auto w2d = w2.dimensions();
  if (w2d.size() != 2 || w2d[1] != s->fc.N)
    return ffi::Error::InvalidArgument("gemv mlp: w2 must be [N2, N1] for w1 [N1, K]");
  s->proj = Shape{s->fc.B, s->fc.N, w2d[0], nullptr};
  if (s2.element_count() == static_cast<size_t>(s->proj.N)) s->proj.scale = s2.typed_data();
  if (b1.element_count() != static_cast<size_t>(s->fc.N) || b2.element_count() != static_cast<size_t>(s->proj.N))
    return ffi::Error::InvalidArgument("gemv mlp: b1 must be [N1] and b2 [N2]");
  return ffi::Error::Success();
}

template <typename W>
ffi::Error GemvMlp(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer w1, ffi::Buffer<ffi::F32> s1,
                   ffi::Buffer<ffi::F32> b1, ffi::AnyBuffer w2, ffi::Buffer<ffi::F32> s2,
                   ffi::Buffer<ffi::F32> b2, ffi::ResultBuffer<ffi::F32> y, ffi::ResultBuffer<ffi::F32> h) {
  MlpShape m;
  if (ffi::Error e = CheckMlp(x, w1, s1, b1, w2, s2, b2, &m); e.failure()) return e;
  const int64_t B = m.fc.B, K = m.fc.K, N1 = m.fc.N, N2 = m.proj.N;
  const float *sc1 = m.fc.scale, *sc2 = m.proj.scale, *xp = x.typed_data();
  const float *bp1 = b1.typed_data(), *bp2 = b2.typed_data();
  const W* wp1 = static_cast<const W*>(w1.untyped_data());
  const W* wp2 = static_cast<const W*>(w2.untyped_data());
  hugepages::Advise(wp1, static_cast<size_t>(N1 * K) * sizeof(W));
  hugepages::Advise(wp2, static_cast<size_t>(N2 * N1) * sizeof(W));
  float *yp = y->typed_data(), *hp = h->typed_data();
  const int64_t counts[2] = {(N1 + kBlock - 1) / kBlock, (N2 + kBlock - 1) / kBlock};
  gpt_kernels::RunPhases(pool, counts, 2, MaxThreads(), [=](int phase, int64_t i) {
    if (phase == 0) {
      const int64_t n0 = i * kBlock, n1 = std::min(N1, n0 + kBlock);
      Block<W>(xp, wp1, sc1, hp, B, K, N1, n0, n1);
      for (int64_t b = 0; b < B; ++b) BiasGelu(hp + b * N1 + n0, bp1 + n0, n1 - n0);
    } else {
      const int64_t n0 = i * kBlock, n1 = std::min(N2, n0 + kBlock);
      Block<W>(hp, wp2, sc2, yp, B, N1, N2, n0, n1);
      for (int64_t b = 0; b < B; ++b) AddBias(yp + b * N2 + n0, bp2 + n0, n1 - n0);
    }
  });
  return ffi::Error::Success();
}

// The same with int8 activations (model.int8_activations): x quantized once before the phases, the
// GELU'd hidden rows quantized (one block per row) between c_fc and c_proj, as the unfused calls
// quantize each matrix's input.
ffi::Error GemvMlpInt8Activations(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> w1,
                                  ffi::Buffer<ffi::F32> s1, ffi::Buffer<ffi::F32> b1, ffi::Buffer<ffi::S8> w2,
                                  ffi::Buffer<ffi::F32> s2, ffi::Buffer<ffi::F32> b2,
                                  ffi::ResultBuffer<ffi::F32> y, ffi::ResultBuffer<ffi::F32> h) {
  MlpShape m;
  if (ffi::Error e = CheckMlp(x, w1, s1, b1, w2, s2, b2, &m); e.failure()) return e;
  const int64_t B = m.fc.B, K = m.fc.K, N1 = m.fc.N, N2 = m.proj.N;
  const float *sc1 = m.fc.scale, *sc2 = m.proj.scale;
  const float *bp1 = b1.typed_data(), *bp2 = b2.typed_data();
  const int64_t k_pad = (K + kVnniLanes - 1) / kVnniLanes * kVnniLanes;
  const int64_t h_pad = (N1 + kVnniLanes - 1) / kVnniLanes * kVnniLanes;
  // One allocation for both quantized inputs and their factors and sums (shared by every block).
  struct Scratch {
    std::vector<int8_t> qx, qh;
    std::vector<float> xs, hs;
    std::vector<int32_t> xsum, hsum;
  };
  auto sc = std::make_shared<Scratch>();
  sc->qx.resize(B * k_pad);
  sc->qh.resize(B * h_pad);
  sc->xs.resize(B);
  sc->hs.resize(B);
  sc->xsum.resize(B);
  sc->hsum.resize(B);
  for (int64_t b = 0; b < B; ++b)
    sc->xs[b] = QuantizeRow(x.typed_data() + b * K, K, sc->qx.data() + b * k_pad, k_pad, sc->xsum.data() + b);
  const int8_t *wp1 = w1.typed_data(), *wp2 = w2.typed_data();
  hugepages::Advise(wp1, static_cast<size_t>(N1 * K));
  hugepages::Advise(wp2, static_cast<size_t>(N2 * N1));
  float *yp = y->typed_data(), *hp = h->typed_data();
  const int64_t counts[3] = {(N1 + kBlock - 1) / kBlock, B, (N2 + kBlock - 1) / kBlock};
  gpt_kernels::RunPhases(pool, counts, 3, MaxThreads(), [=](int phase, int64_t i) {
    Scratch& s = *sc;
    if (phase == 0) {
      const int64_t n0 = i * kBlock, n1 = std::min(N1, n0 + kBlock);
      BlockVnni(s.qx.data(), k_pad, s.xsum.data(), s.xs.data(), wp1, sc1, hp, B, K, N1, n0, n1);
      for (int64_t b = 0; b < B; ++b) BiasGelu(hp + b * N1 + n0, bp1 + n0, n1 - n0);
    } else if (phase == 1) {  // row i of h, whole now
      s.hs[i] = QuantizeRow(hp + i * N1, N1, s.qh.data() + i * h_pad, h_pad, s.hsum.data() + i);
    } else {
      const int64_t n0 = i * kBlock, n1 = std::min(N2, n0 + kBlock);
      BlockVnni(s.qh.data(), h_pad, s.hsum.data(), s.hs.data(), wp2, sc2, yp, B, N1, N2, n0, n1);
      for (int64_t b = 0; b < B; ++b) AddBias(yp + b * N2 + n0, bp2 + n0, n1 - n0);
    }
  });
  return ffi::Error::Success();
}

// ---- A block's tail in one call: attention's c_proj, the residual, ln_2, the MLP, the residual ----
//
//   r = x + a W_o^T * s_o + b_o;  u = LayerNorm(r) g + beta;  out = r + gelu(u W1^T * s1 + b1) W2^T * s2 + b2
//
// Everything of a decoder block after the attention over the cache: three matrices in one pool
// hand-off (pool.h's RunPhases), with the residual adds and ln_2 (one block per row) between them.
// Together with c_attn's call and decode attention's, a layer makes 3 calls instead of 5. r, u and h
// are the call's scratch results (what the later phases read).
constexpr float kLnEps = 1e-5f;  // gpt.layers.LN_EPS

// y = (x - mean) / sqrt(var + eps) * g + beta over one row of D, in float32 (gpt.layers.layer_norm's
// operations; the sums' order differs: results agree to float32 rounding).
inline void LayerNormRow(const float* x, const float* g, const float* beta, float* y, int64_t D) {
  float sum = 0.0f;
  for (int64_t i = 0; i < D; ++i) sum += x[i];
  const float mean = sum / static_cast<float>(D);
  float ss = 0.0f;
  for (int64_t i = 0; i < D; ++i) ss += (x[i] - mean) * (x[i] - mean);
  const float inv = 1.0f / std::sqrt(ss / static_cast<float>(D) + kLnEps);
  for (int64_t i = 0; i < D; ++i) y[i] = (x[i] - mean) * inv * g[i] + beta[i];
}

// v += bias + res over [0, n), in that order ((v + bias) + res, as the model adds them).
inline void AddBiasResidual(float* v, const float* bias, const float* res, int64_t n) {
  for (int64_t i = 0; i < n; ++i) v[i] = (v[i] + bias[i]) + res[i];
}

struct TailArgs {
  int64_t B = 0, D = 0, N1 = 0;
  const float *a = nullptr, *x = nullptr, *so = nullptr, *bo = nullptr, *g = nullptr, *beta = nullptr;
  const float *s1 = nullptr, *b1 = nullptr, *s2 = nullptr, *b2 = nullptr;
  float *out = nullptr, *r = nullptr, *u = nullptr, *h = nullptr;
};

template <typename WBuffer>
ffi::Error CheckTail(const ffi::Buffer<ffi::F32>& a, const ffi::Buffer<ffi::F32>& x, const WBuffer& wo,
                     const ffi::Buffer<ffi::F32>& so, const ffi::Buffer<ffi::F32>& bo, const ffi::Buffer<ffi::F32>& g,
                     const ffi::Buffer<ffi::F32>& beta, const WBuffer& w1, const ffi::Buffer<ffi::F32>& s1,
                     const ffi::Buffer<ffi::F32>& b1, const WBuffer& w2, const ffi::Buffer<ffi::F32>& s2,
                     const ffi::Buffer<ffi::F32>& b2, TailArgs* t) {
  Shape o;
  if (ffi::Error e = CheckShapes(a, wo, so, &o); e.failure()) return e;
  MlpShape m;
  if (ffi::Error e = CheckMlp(a, w1, s1, b1, w2, s2, b2, &m); e.failure()) return e;
  const int64_t D = o.K;
  if (o.N != D || m.proj.N != D || x.element_count() != static_cast<size_t>(o.B * D) ||
      bo.element_count() != static_cast<size_t>(D) || g.element_count() != static_cast<size_t>(D) ||
      beta.element_count() != static_cast<size_t>(D))
    return ffi::Error::InvalidArgument("gemv layer tail: a, x [B, D], w_o [D, D], w2 [D, N1], b_o, g, beta [D]");
  *t = TailArgs{o.B, D, m.fc.N, a.typed_data(), x.typed_data(), o.scale, bo.typed_data(), g.typed_data(),
                beta.typed_data(), m.fc.scale, b1.typed_data(), m.proj.scale, b2.typed_data()};
  return ffi::Error::Success();
}

template <typename W>
ffi::Error GemvLayerTail(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer wo,
                         ffi::Buffer<ffi::F32> so, ffi::Buffer<ffi::F32> bo, ffi::Buffer<ffi::F32> g,
                         ffi::Buffer<ffi::F32> beta, ffi::AnyBuffer w1, ffi::Buffer<ffi::F32> s1,
                         ffi::Buffer<ffi::F32> b1, ffi::AnyBuffer w2, ffi::Buffer<ffi::F32> s2,
                         ffi::Buffer<ffi::F32> b2, ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> r,
                         ffi::ResultBuffer<ffi::F32> u, ffi::ResultBuffer<ffi::F32> h) {
  TailArgs t;
  if (ffi::Error e = CheckTail(a, x, wo, so, bo, g, beta, w1, s1, b1, w2, s2, b2, &t); e.failure()) return e;
  t.out = out->typed_data(), t.r = r->typed_data(), t.u = u->typed_data(), t.h = h->typed_data();
  const W* wpo = static_cast<const W*>(wo.untyped_data());
  const W* wp1 = static_cast<const W*>(w1.untyped_data());
  const W* wp2 = static_cast<const W*>(w2.untyped_data());
  hugepages::Advise(wpo, static_cast<size_t>(t.D * t.D) * sizeof(W));
  hugepages::Advise(wp1, static_cast<size_t>(t.N1 * t.D) * sizeof(W));
  hugepages::Advise(wp2, static_cast<size_t>(t.D * t.N1) * sizeof(W));
  const int64_t d_blocks = (t.D + kBlock - 1) / kBlock;
  const int64_t counts[4] = {d_blocks, t.B, (t.N1 + kBlock - 1) / kBlock, d_blocks};
  gpt_kernels::RunPhases(pool, counts, 4, MaxThreads(), [=](int phase, int64_t i) {
    const int64_t B = t.B, D = t.D, N1 = t.N1;
    if (phase == 1) return LayerNormRow(t.r + i * D, t.g, t.beta, t.u + i * D, D);
    const int64_t n0 = i * kBlock, n1 = std::min(phase == 2 ? N1 : D, n0 + kBlock);
    if (phase == 0) {
      Block<W>(t.a, wpo, t.so, t.r, B, D, D, n0, n1);
      for (int64_t b = 0; b < B; ++b) AddBiasResidual(t.r + b * D + n0, t.bo + n0, t.x + b * D + n0, n1 - n0);
    } else if (phase == 2) {
      Block<W>(t.u, wp1, t.s1, t.h, B, D, N1, n0, n1);
      for (int64_t b = 0; b < B; ++b) BiasGelu(t.h + b * N1 + n0, t.b1 + n0, n1 - n0);
    } else {
      Block<W>(t.h, wp2, t.s2, t.out, B, N1, D, n0, n1);
      for (int64_t b = 0; b < B; ++b) AddBiasResidual(t.out + b * D + n0, t.b2 + n0, t.r + b * D + n0, n1 - n0);
    }
  });
  return ffi::Error::Success();
}

// The same with int8 activations: each matrix's input rows quantized as the unfused calls would
// (a before the phases; u with its LayerNorm; h once whole).
ffi::Error GemvLayerTailInt8Activations(
    ffi::ThreadPool pool, ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> wo,
    ffi::Buffer<ffi::F32> so, ffi::Buffer<ffi::F32> bo, ffi::Buffer<ffi::F32> g, ffi::Buffer<ffi::F32> beta,
    ffi::Buffer<ffi::S8> w1, ffi::Buffer<ffi::F32> s1, ffi::Buffer<ffi::F32> b1, ffi::Buffer<ffi::S8> w2,
    ffi::Buffer<ffi::F32> s2, ffi::Buffer<ffi::F32> b2, ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> r,
    ffi::ResultBuffer<ffi::F32> u, ffi::ResultBuffer<ffi::F32> h) {
  TailArgs t;
  if (ffi::Error e = CheckTail(a, x, wo, so, bo, g, beta, w1, s1, b1, w2, s2, b2, &t); e.failure()) return e;
  t.out = out->typed_data(), t.r = r->typed_data(), t.u = u->typed_data(), t.h = h->typed_data();
  const int64_t B = t.B, D = t.D, N1 = t.N1;
  const int64_t d_pad = (D + kVnniLanes - 1) / kVnniLanes * kVnniLanes;
  const int64_t h_pad = (N1 + kVnniLanes - 1) / kVnniLanes * kVnniLanes;
  struct Quantized {  // one matrix input's rows as int8, their factors and sums
    std::vector<int8_t> q;
    std::vector<float> scale;
    std::vector<int32_t> sum;
    void Resize(int64_t rows, int64_t pad) { q.resize(rows * pad), scale.resize(rows), sum.resize(rows); }
  };
  auto qs = std::make_shared<std::array<Quantized, 3>>();  // a, u, h
  (*qs)[0].Resize(B, d_pad), (*qs)[1].Resize(B, d_pad), (*qs)[2].Resize(B, h_pad);
  for (int64_t b = 0; b < B; ++b) {
    Quantized& qa = (*qs)[0];
    qa.scale[b] = QuantizeRow(t.a + b * D, D, qa.q.data() + b * d_pad, d_pad, qa.sum.data() + b);
  }
  const int8_t *wpo = wo.typed_data(), *wp1 = w1.typed_data(), *wp2 = w2.typed_data();
  hugepages::Advise(wpo, static_cast<size_t>(D * D));
  hugepages::Advise(wp1, static_cast<size_t>(N1 * D));
  hugepages::Advise(wp2, static_cast<size_t>(D * N1));
  const int64_t d_blocks = (D + kBlock - 1) / kBlock;
  const int64_t counts[5] = {d_blocks, B, (N1 + kBlock - 1) / kBlock, B, d_blocks};
  gpt_kernels::RunPhases(pool, counts, 5, MaxThreads(), [=](int phase, int64_t i) {
    Quantized &qa = (*qs)[0], &qu = (*qs)[1], &qh = (*qs)[2];
    if (phase == 1) {
      LayerNormRow(t.r + i * D, t.g, t.beta, t.u + i * D, D);
      qu.scale[i] = QuantizeRow(t.u + i * D, D, qu.q.data() + i * d_pad, d_pad, qu.sum.data() + i);
      return;
    }
    if (phase == 3) {
      qh.scale[i] = QuantizeRow(t.h + i * N1, N1, qh.q.data() + i * h_pad, h_pad, qh.sum.data() + i);
      return;
    }
    const int64_t n0 = i * kBlock, n1 = std::min(phase == 2 ? N1 : D, n0 + kBlock);
    if (phase == 0) {
      BlockVnni(qa.q.data(), d_pad, qa.sum.data(), qa.scale.data(), wpo, t.so, t.r, B, D, D, n0, n1);
      for (int64_t b = 0; b < B; ++b) AddBiasResidual(t.r + b * D + n0, t.bo + n0, t.x + b * D + n0, n1 - n0);
    } else if (phase == 2) {
      BlockVnni(qu.q.data(), d_pad, qu.sum.data(), qu.scale.data(), wp1, t.s1, t.h, B, D, N1, n0, n1);
      for (int64_t b = 0; b < B; ++b) BiasGelu(t.h + b * N1 + n0, t.b1 + n0, n1 - n0);
    } else {
      BlockVnni(qh.q.data(), h_pad, qh.sum.data(), qh.scale.data(), wp2, t.s2, t.out, B, N1, D, n0, n1);
      for (int64_t b = 0; b < B; ++b) AddBiasResidual(t.out + b * D + n0, t.b2 + n0, t.r + b * D + n0, n1 - n0);
    }
  });
  return ffi::Error::Success();
}

}  // namespace

// How many weight buffers hugepages::Advise has met (gemv.py's hugepage_buffers: a test checks that
// decoding meets each weight once, not once per call).
extern "C" int64_t GptGemvHugepageBuffers() {
#ifdef __linux__
  hugepages::Collapser& c = hugepages::TheCollapser();
  std::lock_guard<std::mutex> lock(c.mu);
  return static_cast<int64_t>(c.seen.size());
#else
  return 0;
#endif
}

// Whether GptGemvS8A8 runs on AVX-512 VNNI here (gemv.py chooses it only then).
extern "C" int GptGemvHasVnni() { return kHasVnni ? 1 : 0; }

// Whether GptGemvBF16 multiplies bf16 activations with vdpbf16ps here (AVX512-BF16; gemv.py's bf16_dot).
extern "C" int GptGemvHasBf16Dot() { return kHasBf16Dot ? 1 : 0; }

#define GPT_GEMV_HANDLER(name, W)                                                        \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(name, Gemv<W>,                                           \
                                ffi::Ffi::Bind()                                         \
                                    .Ctx<ffi::ThreadPool>()                              \
                                    .Arg<ffi::Buffer<ffi::F32>>()                        \
                                    .Arg<ffi::AnyBuffer>()                               \
                                    .Arg<ffi::Buffer<ffi::F32>>()                        \
                                    .Ret<ffi::Buffer<ffi::F32>>());

GPT_GEMV_HANDLER(GptGemvF32, float)
XLA_FFI_DEFINE_HANDLER_SYMBOL(GptGemvBF16, GemvBf16,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
GPT_GEMV_HANDLER(GptGemvS8, int8_t)

XLA_FFI_DEFINE_HANDLER_SYMBOL(GptGemvS8A8, GemvInt8Activations,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(GptGemvS8A16, GemvInt16Activations,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

#define GPT_GEMV_MLP_HANDLER(name, W)                                                    \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(name, GemvMlp<W>,                                        \
                                ffi::Ffi::Bind()                                         \
                                    .Ctx<ffi::ThreadPool>()                              \
                                    .Arg<ffi::Buffer<ffi::F32>>()                        \
                                    .Arg<ffi::AnyBuffer>()                               \
                                    .Arg<ffi::Buffer<ffi::F32>>()                        \
                                    .Arg<ffi::Buffer<ffi::F32>>()                        \
                                    .Arg<ffi::AnyBuffer>()                               \
                                    .Arg<ffi::Buffer<ffi::F32>>()                        \
                                    .Arg<ffi::Buffer<ffi::F32>>()                        \
                                    .Ret<ffi::Buffer<ffi::F32>>()                        \
                                    .Ret<ffi::Buffer<ffi::F32>>());

GPT_GEMV_MLP_HANDLER(GptGemvMlpF32, float)
GPT_GEMV_MLP_HANDLER(GptGemvMlpBF16, uint16_t)
GPT_GEMV_MLP_HANDLER(GptGemvMlpS8, int8_t)

XLA_FFI_DEFINE_HANDLER_SYMBOL(GptGemvMlpS8A8, GemvMlpInt8Activations,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

// a, x, w_o, s_o, b_o, g, beta, w1, s1, b1, w2, s2, b2 -> out, r, u, h (GemvLayerTail).
#define GPT_GEMV_TAIL_BIND(WArg)                                                                       \
  ffi::Ffi::Bind()                                                                                   \
      .Ctx<ffi::ThreadPool>()                                                                        \
      .Arg<ffi::Buffer<ffi::F32>>()                                                                  \
      .Arg<ffi::Buffer<ffi::F32>>()                                                                  \
      .Arg<WArg>()                                                                                   \
      .Arg<ffi::Buffer<ffi::F32>>()                                                                  \
      .Arg<ffi::Buffer<ffi::F32>>()                                                                  \
      .Arg<ffi::Buffer<ffi::F32>>()                                                                  \
      .Arg<ffi::Buffer<ffi::F32>>()                                                                  \
      .Arg<WArg>()                                                                                   \
      .Arg<ffi::Buffer<ffi::F32>>()                                                                  \
      .Arg<ffi::Buffer<ffi::F32>>()                                                                  \
      .Arg<WArg>()                                                                                   \
      .Arg<ffi::Buffer<ffi::F32>>()                                                                  \
      .Arg<ffi::Buffer<ffi::F32>>()                                                                  \
      .Ret<ffi::Buffer<ffi::F32>>()                                                                  \
      .Ret<ffi::Buffer<ffi::F32>>()                                                                  \
      .Ret<ffi::Buffer<ffi::F32>>()                                                                  \
      .Ret<ffi::Buffer<ffi::F32>>()

XLA_FFI_DEFINE_HANDLER_SYMBOL(GptGemvTailF32, GemvLayerTail<float>, GPT_GEMV_TAIL_BIND(ffi::AnyBuffer));
XLA_FFI_DEFINE_HANDLER_SYMBOL(GptGemvTailBF16, GemvLayerTail<uint16_t>, GPT_GEMV_TAIL_BIND(ffi::AnyBuffer));
XLA_FFI_DEFINE_HANDLER_SYMBOL(GptGemvTailS8, GemvLayerTail<int8_t>, GPT_GEMV_TAIL_BIND(ffi::AnyBuffer));
XLA_FFI_DEFINE_HANDLER_SYMBOL(GptGemvTailS8A8, GemvLayerTailInt8Activations,
                              GPT_GEMV_TAIL_BIND(ffi::Buffer<ffi::S8>));
