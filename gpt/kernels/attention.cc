// Fused causal attention for the training step on a CPU, float32: forward and backward, behind
// JAX's FFI (FlashAttention-2's algorithm, written for a CPU core's caches).
//
// Why: XLA:CPU compiles the blocked formulation (gpt/attention.py) into separate fusions whose
// softmax reductions, exp and the saved [L, B, H, ~5/8 T, T] float32 probabilities (377 MB through
// the layer scan at the chapter's shape) cost ~800 ms of a ~4150 ms step that torch (a fused CPU
// attention) does not pay (BENCHMARKS.md, "Training speed routes"). Here no [T, S] array exists:
// - forward, one block per (batch*head, tile of query rows): over key tiles up to the diagonal
//   (k^T made once per head beforehand), scores in a tile-sized buffer, online softmax (running row
//   max and sum, in 16 lanes), y accumulated in the block's own rows; it writes y [B, H, T, K] and
//   the rows' logsumexp [B, H, T] only;
// - backward, one block per batch*head: over key tiles (outer) and the query tiles that see them
//   (inner), P recomputed from the logsumexp, D = rowsum(dy * y), dS = P * (dy v^T - D) * scale;
//   dk, dv of the key tile and dq accumulate in the head's own output rows (one block owns a head,
//   so nothing is shared between threads).
// Causal only (the last query is the last key, T <= S): attention.py keeps the blocked formulation
// for explicit masks. Inner products are one register-blocked micro-kernel, C[4 x 64] += op(A) B, in
// AVX-512 (built with -march=native) with a portable loop where the CPU has no AVX-512; on a tile
// that the diagonal crosses they skip the keys a row does not see (`Band`), and each row's softmax
// work is one or two sweeps (RowMax, ExpRow, GradRow). The micro-kernels run at ~95% of one core's
// FMA peak on L1-resident tiles (measured, attn-speed session 11): what is left is the work around
// them (BENCHMARKS.md, "attn-speed, session 11").
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "pool.h"
#include "simd_exp.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Which entries of a causal tile's product are needed, relative to the output row m: contraction
// indices c in [m + lo, m + hi) (the others multiply zeros: keys a query does not see) and output
// columns n < m + cols (the others are never read). The products skip the rest per 4-row panel,
// and in the column direction per 16 lanes: at 128 x 64 tiles a tile on the diagonal otherwise
// multiplies ~11% more than the causal half needs. `unit`: contraction indices per step (2 for the
// bf16 products' pair words, whose word p holds indices 2p and 2p + 1).
constexpr int64_t kFar = int64_t{1} << 40;
struct Band {
  int64_t lo = -kFar, hi = kFar, cols = kFar, unit = 1;
};

// The contraction steps [*begin, *end) and output columns [0, *n_end) that panel rows r..r+R-1 of
// an [M, N] product contracting C steps need under `band`.
inline void PanelRange(const Band& band, int64_t r, int64_t R, int64_t N, int64_t C, int64_t* begin,
                       int64_t* end, int64_t* n_end) {
  const int64_t first = r + band.lo, last = r + R - 1 + band.hi;  // contraction indices
  *begin = first <= 0 ? 0 : std::min(C, first / band.unit);
  *end = last <= 0 ? 0 : std::min(C, (last + band.unit - 1) / band.unit);
  const int64_t n = r + R - 1 + band.cols;
  *n_end = n <= 0 ? 0 : std::min(N, n);
}

// The bands of a causal tile whose row m sees keys c < m + diag of the tile (diag = first query row
// + S - T + 1 - first key): the scores' columns; a contraction over keys (P v, dS k); and over
// queries for key c (P^T dy, dS^T q: rows m >= c + 1 - diag).
inline Band Columns(int64_t diag) { return Band{-kFar, kFar, diag, 1}; }
inline Band KeysUpTo(int64_t diag, int64_t unit = 1) { return Band{-kFar, diag, kFar, unit}; }
inline Band QueriesFrom(int64_t diag, int64_t unit = 1) { return Band{1 - diag, kFar, kFar, unit}; }

// C[m, n] (+)= sum_c op(A)[m, c] B[c, n] for m < M, n < N, c < C (within `band`); row strides lda,
// ldb, ldc. op(A) = A [M, C], or with `TA` A^T of A [C, M] (so P^T and dS^T need no copies). `add`:
// accumulate into C, else overwrite it.
#if defined(__AVX512F__)
using gpt_kernels::Exp16;  // simd_exp.h, shared with gemm.cc
using gpt_kernels::TailMask;

// Rows r0..r0+R-1 (R <= 4) of C, columns n0..n0+16J-1 (masked beyond N), contraction c0..c1-1.
template <int R, int J, bool TA>
[[gnu::always_inline]] inline void Panel(int64_t r0, int64_t n0, int64_t N, int64_t c0, int64_t c1,
                                         const float* A, int64_t lda, const float* B, int64_t ldb,
                                         float* Cm, int64_t ldc, bool add) {
  __mmask16 mk[J];
  for (int j = 0; j < J; ++j) mk[j] = TailMask(std::max<int64_t>(0, N - n0 - 16 * j));
  __m512 acc[R][J];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < J; ++j)
      acc[r][j] = add ? _mm512_maskz_loadu_ps(mk[j], Cm + (r0 + r) * ldc + n0 + 16 * j)
                      : _mm512_setzero_ps();
  for (int64_t c = c0; c < c1; ++c) {
    const float* b = B + c * ldb + n0;
    __m512 bv[J];
    for (int j = 0; j < J; ++j) bv[j] = _mm512_maskz_loadu_ps(mk[j], b + 16 * j);
    for (int r = 0; r < R; ++r) {
      const __m512 a = _mm512_set1_ps(TA ? A[c * lda + r0 + r] : A[(r0 + r) * lda + c]);
      for (int j = 0; j < J; ++j) acc[r][j] = _mm512_fmadd_ps(a, bv[j], acc[r][j]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < J; ++j)
      _mm512_mask_storeu_ps(Cm + (r0 + r) * ldc + n0 + 16 * j, mk[j], acc[r][j]);
}

// Panel with J = the 16-lane chunks left of n_end - n0 (1..4), chosen at run time. Inlined into
// MatMul like Panel: as separate functions GCC 12 kept each accumulator's copy on the stack too,
// a store per FMA row, and the products ran at half speed.
template <int R, bool TA>
[[gnu::always_inline]] inline void PanelN(int64_t r0, int64_t n0, int64_t n_end, int64_t c0,
                                          int64_t c1, const float* A, int64_t lda, const float* B,
                                          int64_t ldb, float* Cm, int64_t ldc, bool add) {
  switch (std::min<int64_t>(4, (n_end - n0 + 15) / 16)) {
    case 1: return Panel<R, 1, TA>(r0, n0, n_end, c0, c1, A, lda, B, ldb, Cm, ldc, add);
    case 2: return Panel<R, 2, TA>(r0, n0, n_end, c0, c1, A, lda, B, ldb, Cm, ldc, add);
    case 3: return Panel<R, 3, TA>(r0, n0, n_end, c0, c1, A, lda, B, ldb, Cm, ldc, add);
    default: return Panel<R, 4, TA>(r0, n0, n_end, c0, c1, A, lda, B, ldb, Cm, ldc, add);
  }
}

template <bool TA = false>
void MatMul(int64_t M, int64_t N, int64_t C, const float* A, int64_t lda, const float* B,
            int64_t ldb, float* Cm, int64_t ldc, bool add, const Band& band = Band()) {
  for (int64_t r = 0; r < M;) {
    const int64_t R = M - r >= 4 ? 4 : 1;
    int64_t c0, c1, n_end;
    PanelRange(band, r, R, N, C, &c0, &c1, &n_end);
    if (!(add && c0 >= c1))  // with `add`, an empty contraction leaves C as it is
      for (int64_t n0 = 0; n0 < n_end; n0 += 64) {
        if (R == 4) PanelN<4, TA>(r, n0, n_end, c0, c1, A, lda, B, ldb, Cm, ldc, add);
        else PanelN<1, TA>(r, n0, n_end, c0, c1, A, lda, B, ldb, Cm, ldc, add);
      }
    r += R;
  }
}

// The per-row softmax passes, in 16 lanes: a scalar loop here is a chain of dependent max/add
// instructions (the compiler may not reorder float reductions); with them the forward took more
// than half the backward's time for 2 of its 5 tile products, and these made the forward 1.4-1.7x
// faster at the chapter's shape (BENCHMARKS.md, "train-layers, session 6"). Each is one sweep
// over the row (the scale folded into exp's argument by an FMA, the sum taken as exp leaves its
// registers): at 64-128 keys per row a row's fixed costs and passes weigh as much as the exps.
// max(x[0..n)), n > 0.
inline float RowMax(const float* x, int64_t n) {
  __m512 mx = _mm512_set1_ps(kNegInf);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = TailMask(n - i);
    mx = _mm512_mask_max_ps(mx, m, mx, _mm512_maskz_loadu_ps(m, x + i));
  }
  return _mm512_reduce_max_ps(mx);
}

// exp(x[i] * scale - sub) for lanes i < seen, 0 for lanes seen <= i (< 16-lane chunk's end).
inline __m512 ExpLanes(const float* x, int64_t i, int64_t seen, __m512 scale, __m512 sub) {
  const __mmask16 m = TailMask(std::max<int64_t>(0, seen - i));
  const __m512 x_scaled_minus_sub = _mm512_fmsub_ps(_mm512_maskz_loadu_ps(m, x + i), scale, sub);
  return _mm512_maskz_mov_ps(m, Exp16(x_scaled_minus_sub));
}

// out[i] = exp(x[i] * scale - sub) for i < seen, 0 for seen <= i < cols (out may be x); returns
// the sum of out[0..seen).
inline float ExpRow(const float* x, float scale, float sub, int64_t seen, int64_t cols,
                    float* out) {
  const __m512 sc = _mm512_set1_ps(scale), sb = _mm512_set1_ps(sub);
  __m512 acc = _mm512_setzero_ps();
  for (int64_t i = 0; i < cols; i += 16) {
    const __m512 e = ExpLanes(x, i, seen, sc, sb);
    _mm512_mask_storeu_ps(out + i, TailMask(cols - i), e);
    acc = _mm512_add_ps(acc, e);
  }
  return _mm512_reduce_add_ps(acc);
}

// The backward's row of a tile: p[i] = exp(p[i] * scale - lse) (the scores to probabilities) and
// dp[i] = p[i] * (dp[i] - d) * scale (dS) for i < seen; both 0 for seen <= i < cols, whatever the
// scores there were (the products skip keys a row does not see and leave those scores unset).
inline void GradRow(float* p, float* dp, float scale, float lse, float d, int64_t seen,
                    int64_t cols) {
  const __m512 sc = _mm512_set1_ps(scale), sb = _mm512_set1_ps(lse), dv = _mm512_set1_ps(d);
  for (int64_t i = 0; i < cols; i += 16) {
    const __mmask16 m = TailMask(std::max<int64_t>(0, seen - i)), out = TailMask(cols - i);
    const __m512 e = ExpLanes(p, i, seen, sc, sb);
    const __m512 g = _mm512_maskz_loadu_ps(m, dp + i);
    _mm512_mask_storeu_ps(p + i, out, e);
    _mm512_mask_storeu_ps(dp + i, out, _mm512_mul_ps(_mm512_mul_ps(e, _mm512_sub_ps(g, dv)), sc));
  }
}

// sum of a[i] * b[i] for i < n.
inline float Dot(const float* a, const float* b, int64_t n) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = TailMask(n - i);
    acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + i), _mm512_maskz_loadu_ps(m, b + i), acc);
  }
  return _mm512_reduce_add_ps(acc);
}
#else
template <bool TA = false>
void MatMul(int64_t M, int64_t N, int64_t C, const float* A, int64_t lda, const float* B,
            int64_t ldb, float* Cm, int64_t ldc, bool add, const Band& band = Band()) {
  for (int64_t m = 0; m < M; ++m) {
    float* c = Cm + m * ldc;
    int64_t c0, c1, n_end;
    PanelRange(band, m, 1, N, C, &c0, &c1, &n_end);
    if (!add) std::fill(c, c + n_end, 0.0f);
    for (int64_t k = c0; k < c1; ++k) {
      const float a = TA ? A[k * lda + m] : A[m * lda + k];
      const float* b = B + k * ldb;
      for (int64_t n = 0; n < n_end; ++n) c[n] += a * b[n];
    }
  }
}

inline float RowMax(const float* x, int64_t n) {
  float mx = kNegInf;
  for (int64_t i = 0; i < n; ++i) mx = std::max(mx, x[i]);
  return mx;
}

inline float ExpRow(const float* x, float scale, float sub, int64_t seen, int64_t cols,
                    float* out) {
  float acc = 0.0f;
  for (int64_t i = 0; i < cols; ++i) acc += out[i] = i < seen ? std::exp(x[i] * scale - sub) : 0.0f;
  return acc;
}

inline void GradRow(float* p, float* dp, float scale, float lse, float d, int64_t seen,
                    int64_t cols) {
  for (int64_t i = 0; i < cols; ++i) {
    p[i] = i < seen ? std::exp(p[i] * scale - lse) : 0.0f;
    dp[i] = i < seen ? p[i] * (dp[i] - d) * scale : 0.0f;
  }
}

inline float Dot(const float* a, const float* b, int64_t n) {
  float acc = 0.0f;
  for (int64_t i = 0; i < n; ++i) acc += a[i] * b[i];
  return acc;
}
#endif

// dst[c, r] = src[r, c] for r < R, c < Cn (src row stride lds, dst row stride ldd).
inline void Transpose(const float* src, int64_t lds, int64_t R, int64_t Cn, float* dst, int64_t ldd) {
  for (int64_t r = 0; r < R; ++r)
    for (int64_t c = 0; c < Cn; ++c) dst[c * ldd + r] = src[r * lds + c];
}

// A buffer left uninitialised: every one here is written before it is read (the products' masks
// and bands never read past what was written), and std::vector's zero-fill of the bf16 backward's
// ~1.2 MB of operand copies per head, the forward's per-call copies and the tiles showed as ~2% of
// the kernel's time in memset (plus the first-touch page faults it took).
template <typename T>
struct Scratch {
  explicit Scratch(int64_t n) : p(new T[n]) {}
  T* data() { return p.get(); }
  std::unique_ptr<T[]> p;
};

// The online softmax's running max m of a row, given a new tile's max: moved only when the tile's
// exceeds it by more than `slack`. Until then the tile's probabilities exp(s - m) are at most
// e^slack against the stale m, exact in float32 all the same (the row's sum and y grow by at most
// that factor, far from overflow), and the row skips exp(m_old - m_new) and the rescale of its y
// (K floats) and sum: with the max moved at every rise, most rows of most tiles paid both. The
// float32 forward takes kSlack; the bf16 one 0 (moved at every rise, as before): its P is rounded
// to bf16 for P v, and against the exact max a peaked row's largest p is 1, which bf16 holds
// exactly, where a stale max's e^x carried up to 2^-9 of the row's y (measured: 3-4x the value's
// error, and dq's through D, on the test's rising scores).
// Returns the factor the row's sum and y are rescaled by (1: m unchanged; 0 at the first tile).
constexpr float kSlack = 8.0f;

inline float RaiseMax(float& m, float tile_max, float slack) {
  if (!(tile_max > m + slack)) return 1.0f;
  const float corr = m == kNegInf ? 0.0f : std::exp(m - tile_max);
  m = tile_max;
  return corr;
}

struct Dims {
  int64_t BH, T, S, K;
};

// Reads [B, H, T, K] q and [B, H, S, K] k, v into `dims`; an error when they do not agree.
ffi::Error CheckDims(ffi::Buffer<ffi::F32>& q, ffi::Buffer<ffi::F32>& k, ffi::Buffer<ffi::F32>& v,
                     Dims& dims) {
  auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4)
    return ffi::Error::InvalidArgument("attention: q, k, v must be [B, H, T, K]");
  if (kd[0] != qd[0] || kd[1] != qd[1] || kd[3] != qd[3] || vd[0] != kd[0] || vd[1] != kd[1] ||
      vd[2] != kd[2] || vd[3] != kd[3])
    return ffi::Error::InvalidArgument("attention: q, k, v shapes do not agree");
  if (qd[2] > kd[2]) return ffi::Error::InvalidArgument("attention: causal needs T <= S");
  dims = Dims{qd[0] * qd[1], qd[2], kd[2], qd[3]};
  return ffi::Error::Success();
}


// ---- bf16 products (model.matmul_dtype=bfloat16, torch autocast's recipe for its SDPA) ----
// Q, K, V, dY and the tiles' P and dS are rounded to bfloat16 and every product is vdpbf16ps
// (two bf16 products per float32 lane, accumulated in float32); the softmax statistics, the
// logsumexp, D = rowsum(dy * y) and every output stay float32. vdpbf16ps contracts pairs of
// adjacent bf16 values, so each operand is laid out as 32-bit "pair words" along the contracted
// axis: a row-major bf16 matrix already is one along its rows; the other operand is either a
// transposed word matrix (k^T, v^T: contraction over K) or two rows interleaved (v, k, dy, q, P,
// dS: contraction over keys or queries). Odd lengths are padded with zeros.
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
constexpr bool kHasBf16 = true;

// C[m, n] (+)= sum_p dot2(A[m, p], B[p, n]) over pair words (within `band`, whose `unit` is 2
// where the pairs are of contraction indices the band counts); A[m, p] at A[m * lda + p], or with
// `TA` at A[p * lda + m]; B[p, n] at B[p * ldb + n]. Rows r0.. (R <= 4), columns n0..n0+16J-1.
template <int R, int J, bool TA>
[[gnu::always_inline]] inline void PanelBf16(int64_t r0, int64_t n0, int64_t N, int64_t p0,
                                             int64_t p1, const uint32_t* A, int64_t lda,
                                             const uint32_t* B, int64_t ldb, float* Cm, int64_t ldc,
                                             bool add) {
  __mmask16 mk[J];
  for (int j = 0; j < J; ++j) mk[j] = TailMask(std::max<int64_t>(0, N - n0 - 16 * j));
  __m512 acc[R][J];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < J; ++j)
      acc[r][j] = add ? _mm512_maskz_loadu_ps(mk[j], Cm + (r0 + r) * ldc + n0 + 16 * j)
                      : _mm512_setzero_ps();
  for (int64_t p = p0; p < p1; ++p) {
    const uint32_t* b = B + p * ldb + n0;
    __m512bh bv[J];
    for (int j = 0; j < J; ++j) bv[j] = (__m512bh)_mm512_maskz_loadu_epi32(mk[j], b + 16 * j);
    for (int r = 0; r < R; ++r) {
      const uint32_t w = TA ? A[p * lda + r0 + r] : A[(r0 + r) * lda + p];
      const __m512bh a = (__m512bh)_mm512_set1_epi32(static_cast<int>(w));
      for (int j = 0; j < J; ++j) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], a, bv[j]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < J; ++j)
      _mm512_mask_storeu_ps(Cm + (r0 + r) * ldc + n0 + 16 * j, mk[j], acc[r][j]);
}

template <int R, bool TA>
[[gnu::always_inline]] inline void PanelBf16N(int64_t r0, int64_t n0, int64_t n_end, int64_t p0,
                                              int64_t p1, const uint32_t* A, int64_t lda,
                                              const uint32_t* B, int64_t ldb, float* Cm,
                                              int64_t ldc, bool add) {
  switch (std::min<int64_t>(4, (n_end - n0 + 15) / 16)) {
    case 1: return PanelBf16<R, 1, TA>(r0, n0, n_end, p0, p1, A, lda, B, ldb, Cm, ldc, add);
    case 2: return PanelBf16<R, 2, TA>(r0, n0, n_end, p0, p1, A, lda, B, ldb, Cm, ldc, add);
    case 3: return PanelBf16<R, 3, TA>(r0, n0, n_end, p0, p1, A, lda, B, ldb, Cm, ldc, add);
    default: return PanelBf16<R, 4, TA>(r0, n0, n_end, p0, p1, A, lda, B, ldb, Cm, ldc, add);
  }
}

template <bool TA = false>
void MatMulBf16(int64_t M, int64_t N, int64_t P, const uint32_t* A, int64_t lda, const uint32_t* B,
                int64_t ldb, float* Cm, int64_t ldc, bool add, const Band& band = Band()) {
  for (int64_t r = 0; r < M;) {
    const int64_t R = M - r >= 4 ? 4 : 1;
    int64_t p0, p1, n_end;
    PanelRange(band, r, R, N, P, &p0, &p1, &n_end);
    if (!(add && p0 >= p1))
      for (int64_t n0 = 0; n0 < n_end; n0 += 64) {
        if (R == 4) PanelBf16N<4, TA>(r, n0, n_end, p0, p1, A, lda, B, ldb, Cm, ldc, add);
        else PanelBf16N<1, TA>(r, n0, n_end, p0, p1, A, lda, B, ldb, Cm, ldc, add);
      }
    r += R;
  }
}

// Row r of dst (ldd words) = src row r (n floats) in bf16, pairs of adjacent columns per word; an
// odd n's last word gets a zero high half.
void ToWords(const float* src, int64_t lds, int64_t rows, int64_t n, uint32_t* dst, int64_t ldd) {
  for (int64_t r = 0; r < rows; ++r) {
    uint16_t* d = reinterpret_cast<uint16_t*>(dst + r * ldd);
    for (int64_t i = 0; i < n; i += 16) {
      const __mmask16 m = TailMask(n - i);
      const __m256bh h = _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(m, src + r * lds + i));
      const int64_t keep = std::min<int64_t>(16, (n + 1) / 2 * 2 - i);  // the zero pad included
      _mm256_mask_storeu_epi16(d + i, TailMask(keep), (__m256i)h);
    }
  }
}

// dst[p, j] = (src[2p, j], src[2p + 1, j]) in bf16 for j < n, p < ceil(rows / 2) (a missing odd
// row is zero): two rows interleaved, the layout a contraction over rows reads.
// cvtne2ps_pbh(hi, lo) holds lo's 16 values then hi's; this index pairs them element by element.
alignas(64) constexpr uint16_t kPairIdx[32] = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22,
                                               7, 23, 8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29,
                                               14, 30, 15, 31};

// 16 pair words (lo[i], hi[i]) in bf16.
inline __m512i PairWords(__m512 lo, __m512 hi, __m512i idx) {
  return _mm512_permutexvar_epi16(idx, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
}

void Interleave(const float* src, int64_t lds, int64_t rows, int64_t n, uint32_t* dst, int64_t ldd) {
  const __m512i idx = _mm512_load_si512(kPairIdx);
  for (int64_t p = 0; p < (rows + 1) / 2; ++p) {
    const float* lo = src + 2 * p * lds;
    const bool has_hi = 2 * p + 1 < rows;
    for (int64_t j = 0; j < n; j += 16) {
      const __mmask16 m = TailMask(n - j);
      const __m512 a = _mm512_maskz_loadu_ps(m, lo + j);
      const __m512 b = has_hi ? _mm512_maskz_loadu_ps(m, lo + lds + j) : _mm512_setzero_ps();
      _mm512_mask_storeu_epi32(dst + p * ldd + j, m, PairWords(a, b, idx));
    }
  }
}

// GradRow for the bf16 backward, two rows (2i, 2i + 1) at a time, written straight into the
// layouts its products read: P and dS as pair words of the two rows (pi, dsi: row i of ld words)
// and dS as each row's own words (dsw rows 2i and 2i + 1, ldw words). The scores (p) and dy v^T
// (dp) stay float32 in their tile buffers (ld floats a row); `seen[j]`: keys row 2i + j sees (a
// missing second row has 0, and its dsw row is not written). One sweep instead of GradRow's two
// float32 stores and three re-reads by Interleave, Interleave and ToWords.
inline void GradPairWords(const float* p, const float* dp, int64_t ld, float scale,
                          const float* lse, const float* dd, const int64_t seen[2], bool has_hi,
                          int64_t cols, uint32_t* pi, uint32_t* dsi, uint32_t* dsw, int64_t ldw) {
  const __m512i idx = _mm512_load_si512(kPairIdx);
  const __m512 sc = _mm512_set1_ps(scale);
  const int64_t even = (cols + 1) / 2 * 2;
  __m512 e[2], g[2];
  for (int64_t i = 0; i < cols; i += 16) {
    for (int j = 0; j < 2; ++j) {
      e[j] = ExpLanes(p + j * ld, i, seen[j], sc, _mm512_set1_ps(lse[j]));
      const __m512 dy_v = _mm512_maskz_loadu_ps(TailMask(std::max<int64_t>(0, seen[j] - i)),
                                                dp + j * ld + i);
      g[j] = _mm512_mul_ps(_mm512_mul_ps(e[j], _mm512_sub_ps(dy_v, _mm512_set1_ps(dd[j]))), sc);
    }
    const __mmask16 m = TailMask(cols - i);
    _mm512_mask_storeu_epi32(pi + i, m, PairWords(e[0], e[1], idx));
    _mm512_mask_storeu_epi32(dsi + i, m, PairWords(g[0], g[1], idx));
    for (int j = 0; j < (has_hi ? 2 : 1); ++j)
      _mm256_mask_storeu_epi16(reinterpret_cast<uint16_t*>(dsw + j * ldw) + i, TailMask(even - i),
                               (__m256i)_mm512_cvtneps_pbh(g[j]));
  }
}

inline float BitsToFloat(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// dst[c, r] = src[r, c] for 32-bit words, r < R, c < Cn.
// In blocks of 16 rows: a destination row gets 16 consecutive words (a cache line) per visit,
// where row by row each word went to another line ldd words apart (at ldd = S = 1024 another 4 KB
// page, the same cache set): the backward's two [S, Kw] transposes took ~7% of its time that way.
inline void TransposeWords(const uint32_t* src, int64_t lds, int64_t R, int64_t Cn, uint32_t* dst,
                           int64_t ldd) {
  for (int64_t r0 = 0; r0 < R; r0 += 16) {
    const int64_t r1 = std::min(R, r0 + 16);
    for (int64_t c = 0; c < Cn; ++c)
      for (int64_t r = r0; r < r1; ++r) dst[c * ldd + r] = src[r * lds + c];
  }
}

// ExpRow (the forward's probabilities of a row) written as bf16 pair words: out gets ceil(cols / 2)
// words, p = 0 from `seen` on (the odd pad too); returns the float32 sum of p[0..seen).
inline float ExpRowWords(const float* x, float scale, float sub, int64_t seen, int64_t cols,
                         uint32_t* out) {
  const __m512 sc = _mm512_set1_ps(scale), sb = _mm512_set1_ps(sub);
  const int64_t even = (cols + 1) / 2 * 2;
  uint16_t* o = reinterpret_cast<uint16_t*>(out);
  __m512 acc = _mm512_setzero_ps();
  for (int64_t i = 0; i < cols; i += 16) {
    const __m512 e = ExpLanes(x, i, seen, sc, sb);
    _mm256_mask_storeu_epi16(o + i, TailMask(even - i), (__m256i)_mm512_cvtneps_pbh(e));
    acc = _mm512_add_ps(acc, e);
  }
  return _mm512_reduce_add_ps(acc);
}

void ForwardBf16(ffi::ThreadPool& pool, const Dims& dims, const float* qp, const float* kp,
                 const float* vp, float* yp, float* lp, int64_t bq, int64_t bk) {
  const int64_t BH = dims.BH, T = dims.T, S = dims.S, K = dims.K, off = S - T;
  const int64_t Kw = (K + 1) / 2, Sw = (S + 1) / 2;  // words per row of q, k; pairs of v rows
  const float scale = 1.0f / std::sqrt(static_cast<float>(K));
  const int64_t tiles = (T + bq - 1) / bq, ktiles = (S + bk - 1) / bk;
  // Per head: q as words [T][Kw], k^T tile by tile [key tile][Kw][bk], v's rows paired [Sw][K].
  Scratch<uint32_t> qw(BH * T * Kw), ktw(BH * ktiles * Kw * bk), vi(BH * Sw * K);
  uint32_t *qwp = qw.data(), *ktp = ktw.data(), *vip = vi.data();
  gpt_kernels::RunBlocks(pool, BH, BH, [=](int64_t h) {
    ToWords(qp + h * T * K, K, T, K, qwp + h * T * Kw, Kw);
    Scratch<uint32_t> kw(S * Kw);
    ToWords(kp + h * S * K, K, S, K, kw.data(), Kw);
    for (int64_t t = 0; t < ktiles; ++t) {
      const int64_t c0 = t * bk;
      TransposeWords(kw.data() + c0 * Kw, Kw, std::min(S, c0 + bk) - c0, Kw,
                     ktp + (h * ktiles + t) * Kw * bk, bk);
    }
    Interleave(vp + h * S * K, K, S, K, vip + h * Sw * K, K);
  });
  gpt_kernels::RunBlocks(pool, BH * tiles, BH * tiles, [=](int64_t block) {
    const int64_t h = block % BH, tile = tiles - 1 - block / BH;
    const int64_t r0 = tile * bq, rows = std::min(T, r0 + bq) - r0;
    float* yh = yp + (h * T + r0) * K;
    Scratch<float> s(rows * bk);
    std::vector<float> m(rows, kNegInf), l(rows, 0.0f);
    Scratch<uint32_t> pw(rows * (bk / 2));
    std::fill(yh, yh + rows * K, 0.0f);
    const int64_t keys = r0 + rows + off;
    for (int64_t c0 = 0; c0 < keys; c0 += bk) {
      const int64_t cols = std::min(keys, c0 + bk) - c0;
      const int64_t diag = r0 + off + 1 - c0;  // row r sees keys c0 .. c0 + r + diag - 1
      MatMulBf16(rows, cols, Kw, qwp + (h * T + r0) * Kw, Kw, ktp + (h * ktiles + c0 / bk) * Kw * bk,
                 bk, s.data(), bk, false, Columns(diag));
      for (int64_t r = 0; r < rows; ++r) {
        float* sr = s.data() + r * bk;
        uint32_t* pr = pw.data() + r * (bk / 2);
        const int64_t seen = std::min(cols, r + diag);
        if (seen <= 0) {
          std::fill(pr, pr + (cols + 1) / 2, 0u);
          continue;
        }
        const float corr = RaiseMax(m[r], RowMax(sr, seen) * scale, 0.0f);  // scale > 0
        l[r] = l[r] * corr + ExpRowWords(sr, scale, m[r], seen, cols, pr);
        if (corr != 1.0f)
          for (int64_t d = 0; d < K; ++d) yh[r * K + d] *= corr;
      }
      MatMulBf16(rows, K, (cols + 1) / 2, pw.data(), bk / 2, vip + (h * Sw + c0 / 2) * K, K, yh, K,
                 true, KeysUpTo(diag, 2));
    }
    for (int64_t r = 0; r < rows; ++r) {
      const float inv = 1.0f / l[r];
      for (int64_t d = 0; d < K; ++d) yh[r * K + d] *= inv;
      lp[h * T + r0 + r] = m[r] + std::log(l[r]);
    }
  });
}

void BackwardBf16(ffi::ThreadPool& pool, const Dims& dims, const float* qp, const float* kp,
                  const float* vp, const float* yp, const float* lp, const float* dyp, float* dqp,
                  float* dkp, float* dvp, int64_t bq, int64_t bk) {
  const int64_t BH = dims.BH, T = dims.T, S = dims.S, K = dims.K, off = S - T;
  const int64_t Kw = (K + 1) / 2, Tw = (T + 1) / 2, Sw = (S + 1) / 2;
  const float scale = 1.0f / std::sqrt(static_cast<float>(K));
  gpt_kernels::RunBlocks(pool, BH, BH, [=](int64_t h) {
    const float* qh = qp + h * T * K;
    const float* kh = kp + h * S * K;
    const float* vh = vp + h * S * K;
    const float* dyh = dyp + h * T * K;
    const float* lh = lp + h * T;
    float* dqh = dqp + h * T * K;
    float* dkh = dkp + h * S * K;
    float* dvh = dvp + h * S * K;
    std::fill(dqh, dqh + T * K, 0.0f);
    // The head's operands in the layouts its products read (see ToWords, Interleave).
    Scratch<uint32_t> qw(T * Kw), dyw(T * Kw), qi(Tw * K), dyi(Tw * K), ki(Sw * K);
    Scratch<uint32_t> kw(S * Kw), vw(S * Kw), ktw(Kw * S), vtw(Kw * S);
    ToWords(qh, K, T, K, qw.data(), Kw);
    ToWords(dyh, K, T, K, dyw.data(), Kw);
    // D = rowsum(dy * y) of the bf16 dy that dP = dy v^T multiplies: D is rowsum(P * dP), and
    // dS = P * (dP - D) subtracts two nearly equal numbers, so both must see the same dy (with
    // the float32 dy a one-key row's dq came out ~2^-8 |dy| |v| instead of 0).
    std::vector<float> d(T), dyr(K);
    for (int64_t r = 0; r < T; ++r) {
      const uint16_t* w = reinterpret_cast<const uint16_t*>(dyw.data() + r * Kw);
      for (int64_t c = 0; c < K; ++c) dyr[c] = BitsToFloat(static_cast<uint32_t>(w[c]) << 16);
      d[r] = Dot(dyr.data(), yp + (h * T + r) * K, K);
    }
    Interleave(qh, K, T, K, qi.data(), K);
    Interleave(dyh, K, T, K, dyi.data(), K);
    Interleave(kh, K, S, K, ki.data(), K);
    ToWords(kh, K, S, K, kw.data(), Kw);
    ToWords(vh, K, S, K, vw.data(), Kw);
    TransposeWords(kw.data(), Kw, S, Kw, ktw.data(), S);
    TransposeWords(vw.data(), Kw, S, Kw, vtw.data(), S);
    Scratch<float> p(bq * bk), dp(bq * bk);
    Scratch<uint32_t> pi((bq / 2) * bk), dsi((bq / 2) * bk), dsw(bq * (bk / 2));
    for (int64_t c0 = 0; c0 < S; c0 += bk) {
      const int64_t cols = std::min(S, c0 + bk) - c0;
      float* dkc = dkh + c0 * K;
      float* dvc = dvh + c0 * K;
      const int64_t first = std::max<int64_t>(0, c0 - off);
      std::fill(dkc, dkc + cols * K, 0.0f);
      std::fill(dvc, dvc + cols * K, 0.0f);
      for (int64_t r0 = first / bq * bq; r0 < T; r0 += bq) {
        const int64_t rows = std::min(T, r0 + bq) - r0, pairs = (rows + 1) / 2;
        const int64_t diag = r0 + off + 1 - c0;  // row r sees keys c0 .. c0 + r + diag - 1
        MatMulBf16(rows, cols, Kw, qw.data() + r0 * Kw, Kw, ktw.data() + c0, S, p.data(), bk, false,
                   Columns(diag));
        MatMulBf16(rows, cols, Kw, dyw.data() + r0 * Kw, Kw, vtw.data() + c0, S, dp.data(), bk,
                   false, Columns(diag));
        for (int64_t r = 0; r < rows; r += 2) {
          const bool has_hi = r + 1 < rows;
          const int64_t seen[2] = {std::max<int64_t>(0, std::min(cols, r + diag)),
                                   has_hi ? std::max<int64_t>(0, std::min(cols, r + 1 + diag)) : 0};
          const float lse2[2] = {lh[r0 + r], has_hi ? lh[r0 + r + 1] : 0.0f};
          const float d2[2] = {d[r0 + r], has_hi ? d[r0 + r + 1] : 0.0f};
          GradPairWords(p.data() + r * bk, dp.data() + r * bk, bk, scale, lse2, d2, seen, has_hi,
                        cols, pi.data() + (r / 2) * bk, dsi.data() + (r / 2) * bk,
                        dsw.data() + r * (bk / 2), bk / 2);
        }
        // dv += P^T dy, dk += dS^T q (contracting queries), dq += dS k (contracting keys).
        MatMulBf16<true>(cols, K, pairs, pi.data(), bk, dyi.data() + (r0 / 2) * K, K, dvc, K, true,
                         QueriesFrom(diag, 2));
        MatMulBf16<true>(cols, K, pairs, dsi.data(), bk, qi.data() + (r0 / 2) * K, K, dkc, K, true,
                         QueriesFrom(diag, 2));
        MatMulBf16(rows, K, (cols + 1) / 2, dsw.data(), bk / 2, ki.data() + (c0 / 2) * K, K,
                   dqh + r0 * K, K, true, KeysUpTo(diag, 2));
      }
    }
  });
}
#else
constexpr bool kHasBf16 = false;
#endif

int64_t Clamp(int64_t tile) { return std::max<int64_t>(1, std::min<int64_t>(tile, 1024)); }

// The bf16 path's tiles start on even rows and keys (pairs of rows share a word): even tiles.
int64_t ClampEven(int64_t tile) { return std::max<int64_t>(2, std::min<int64_t>(tile + (tile & 1), 1024)); }

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                   ffi::Buffer<ffi::F32> v, ffi::ResultBuffer<ffi::F32> y,
                   ffi::ResultBuffer<ffi::F32> lse, int64_t block_q, int64_t block_k,
                   int64_t bf16) {
  Dims dims;
  if (auto error = CheckDims(q, k, v, dims); error.failure()) return error;
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
  if (bf16) {
    if (dims.BH * dims.T > 0)
      ForwardBf16(pool, dims, q.typed_data(), k.typed_data(), v.typed_data(), y->typed_data(),
                  lse->typed_data(), ClampEven(block_q), ClampEven(block_k));
    return ffi::Error::Success();
  }
#endif
  const int64_t BH = dims.BH, T = dims.T, S = dims.S, K = dims.K;
  const int64_t off = S - T, bq = Clamp(block_q), bk = Clamp(block_k);
  const float scale = 1.0f / std::sqrt(static_cast<float>(K));
  const float* qp = q.typed_data();
  const float* kp = k.typed_data();
  const float* vp = v.typed_data();
  float* yp = y->typed_data();
  float* lp = lse->typed_data();
  const int64_t tiles = (T + bq - 1) / bq, ktiles = (S + bk - 1) / bk;
  if (BH * T == 0) return ffi::Error::Success();
  // k^T once per head, tile by tile ([BH][key tile][K][bk]: each tile a contiguous K x bk block, the
  // layout MatMul reads), rather than once per query tile that reads it.
  Scratch<float> ktv(BH * ktiles * K * bk);
  float* ktp = ktv.data();
  gpt_kernels::RunBlocks(pool, BH, BH, [=](int64_t h) {
    for (int64_t t = 0; t < ktiles; ++t) {
      const int64_t c0 = t * bk;
      Transpose(kp + (h * S + c0) * K, K, std::min(S, c0 + bk) - c0, K,
                ktp + (h * ktiles + t) * K * bk, bk);
    }
  });
  // Later query tiles see more keys: run them first, so that the shorter ones balance the end.
  gpt_kernels::RunBlocks(pool, BH * tiles, BH * tiles, [=](int64_t block) {
    const int64_t h = block % BH, tile = tiles - 1 - block / BH;
    const int64_t r0 = tile * bq, rows = std::min(T, r0 + bq) - r0;
    const float* qh = qp + (h * T + r0) * K;
    const float* vh = vp + h * S * K;
    float* yh = yp + (h * T + r0) * K;
    Scratch<float> s(rows * bk);
    std::vector<float> m(rows, kNegInf), l(rows, 0.0f);
    std::fill(yh, yh + rows * K, 0.0f);
    const int64_t keys = r0 + rows + off;  // keys 0..keys-1 are seen by some row of the tile
    for (int64_t c0 = 0; c0 < keys; c0 += bk) {
      const int64_t cols = std::min(keys, c0 + bk) - c0;
      const int64_t diag = r0 + off + 1 - c0;  // row r sees keys c0 .. c0 + r + diag - 1
      MatMul(rows, cols, K, qh, K, ktp + (h * ktiles + c0 / bk) * K * bk, bk, s.data(), bk, false,
             Columns(diag));
      for (int64_t r = 0; r < rows; ++r) {
        float* sr = s.data() + r * bk;
        const int64_t seen = std::min(cols, r + diag);  // keys c0.. this row may see
        if (seen <= 0) {  // no key of this tile for this row: p = 0 here
          std::fill(sr, sr + cols, 0.0f);
          continue;
        }
        const float corr = RaiseMax(m[r], RowMax(sr, seen) * scale, kSlack);  // scale > 0
        l[r] = l[r] * corr + ExpRow(sr, scale, m[r], seen, cols, sr);
        if (corr != 1.0f)
          for (int64_t d = 0; d < K; ++d) yh[r * K + d] *= corr;
      }
      MatMul(rows, K, cols, s.data(), bk, vh + c0 * K, K, yh, K, true, KeysUpTo(diag));
    }
    for (int64_t r = 0; r < rows; ++r) {
      const float inv = 1.0f / l[r];
      for (int64_t d = 0; d < K; ++d) yh[r * K + d] *= inv;
      lp[h * T + r0 + r] = m[r] + std::log(l[r]);
    }
  });
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                    ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::F32> y, ffi::Buffer<ffi::F32> lse,
                    ffi::Buffer<ffi::F32> dy, ffi::ResultBuffer<ffi::F32> dq,
                    ffi::ResultBuffer<ffi::F32> dk, ffi::ResultBuffer<ffi::F32> dv,
                    int64_t block_q, int64_t block_k, int64_t bf16) {
  Dims dims;
  if (auto error = CheckDims(q, k, v, dims); error.failure()) return error;
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
  if (bf16) {
    if (dims.BH > 0)
      BackwardBf16(pool, dims, q.typed_data(), k.typed_data(), v.typed_data(), y.typed_data(),
                   lse.typed_data(), dy.typed_data(), dq->typed_data(), dk->typed_data(),
                   dv->typed_data(), ClampEven(block_q), ClampEven(block_k));
    return ffi::Error::Success();
  }
#endif
  const int64_t BH = dims.BH, T = dims.T, S = dims.S, K = dims.K;
  const int64_t off = S - T, bq = Clamp(block_q), bk = Clamp(block_k);
  const float scale = 1.0f / std::sqrt(static_cast<float>(K));
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data();
  const float *yp = y.typed_data(), *lp = lse.typed_data(), *dyp = dy.typed_data();
  float *dqp = dq->typed_data(), *dkp = dk->typed_data(), *dvp = dv->typed_data();
  if (BH == 0) return ffi::Error::Success();
  gpt_kernels::RunBlocks(pool, BH, BH, [=](int64_t h) {
    const float* qh = qp + h * T * K;
    const float* kh = kp + h * S * K;
    const float* vh = vp + h * S * K;
    const float* dyh = dyp + h * T * K;
    const float* lh = lp + h * T;
    float* dqh = dqp + h * T * K;
    float* dkh = dkp + h * S * K;
    float* dvh = dvp + h * S * K;
    std::fill(dqh, dqh + T * K, 0.0f);
    std::vector<float> d(T);
    for (int64_t r = 0; r < T; ++r) d[r] = Dot(dyh + r * K, yp + (h * T + r) * K, K);
    Scratch<float> kt(K * bk), vt(K * bk), p(bq * bk), dp(bq * bk);
    for (int64_t c0 = 0; c0 < S; c0 += bk) {
      const int64_t cols = std::min(S, c0 + bk) - c0;
      float* dkc = dkh + c0 * K;
      float* dvc = dvh + c0 * K;
      const int64_t first = std::max<int64_t>(0, c0 - off);  // the first row that sees key c0 (< T)
      std::fill(dkc, dkc + cols * K, 0.0f);
      std::fill(dvc, dvc + cols * K, 0.0f);
      Transpose(kh + c0 * K, K, cols, K, kt.data(), bk);
      Transpose(vh + c0 * K, K, cols, K, vt.data(), bk);
      for (int64_t r0 = first / bq * bq; r0 < T; r0 += bq) {
        const int64_t rows = std::min(T, r0 + bq) - r0;
        const int64_t diag = r0 + off + 1 - c0;  // row r sees keys c0 .. c0 + r + diag - 1
        MatMul(rows, cols, K, qh + r0 * K, K, kt.data(), bk, p.data(), bk, false, Columns(diag));
        MatMul(rows, cols, K, dyh + r0 * K, K, vt.data(), bk, dp.data(), bk, false, Columns(diag));
        for (int64_t r = 0; r < rows; ++r)
          GradRow(p.data() + r * bk, dp.data() + r * bk, scale, lh[r0 + r], d[r0 + r],
                  std::max<int64_t>(0, std::min(cols, r + diag)), cols);
        MatMul<true>(cols, K, rows, p.data(), bk, dyh + r0 * K, K, dvc, K, true,
                     QueriesFrom(diag));  // += P^T dy
        MatMul<true>(cols, K, rows, dp.data(), bk, qh + r0 * K, K, dkc, K, true,
                     QueriesFrom(diag));  // += dS^T q
        MatMul(rows, K, cols, dp.data(), bk, kh + c0 * K, K, dqh + r0 * K, K, true,
               KeysUpTo(diag));  // += dS k
      }
    }
  });
  return ffi::Error::Success();
}

}  // namespace

// 1 when this build uses the AVX-512 micro-kernels, 0 for the portable loops.
extern "C" int GptAttentionHasAvx512() {
#if defined(__AVX512F__)
  return 1;
#else
  return 0;
#endif
}

// 1 when this build has the bf16 products (AVX512-BF16): the `bf16` attribute takes them; without
// it the attribute is ignored and the float32 products run.
extern "C" int GptAttentionHasBf16() { return kHasBf16 ? 1 : 0; }

XLA_FFI_DEFINE_HANDLER_SYMBOL(GptAttentionFwdF32, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("block_q")
                                  .Attr<int64_t>("block_k")
                                  .Attr<int64_t>("bf16"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(GptAttentionBwdF32, Backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("block_q")
                                  .Attr<int64_t>("block_k")
                                  .Attr<int64_t>("bf16"));
