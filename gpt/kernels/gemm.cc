// The training step's float32 matrix multiplies on a CPU: C[M, N] = op(A) . op(B), op = as is or
// transposed, through Intel MKL's cblas_sgemm.
//
// On the 2-core AVX-512 Xeon this project is measured on, XLA:CPU's own GEMM (YNNPACK) runs the
// step's matmul shapes at ~0.8x the speed of torch's (which is MKL's), and that gap is most of why
// the whole training step trails torch (BENCHMARKS.md, "Training speed routes"). One kernel with
// transpose flags serves the forward y = x W and both backward products, dx = dy W^T and
// dW = x^T dy (gemm.py's custom VJP).
//
// MKL is not linked: GptGemmLoad dlopen()s the libmkl_rt that gemm.py found (the `mkl` wheel from
// PyPI) and switches it to its sequential threading layer, so that MKL starts no OpenMP pool of its
// own to fight XLA's for the cores. Instead the output is cut into blocks of rows or columns that
// run on XLA's own intra-op thread pool (pool.h's RunBlocks, as gemv.cc's), one sequential sgemm each.
// Without the library the handler is never called: gemm.py keeps XLA's einsum.
//
// The second handler, GptSoftmaxXentF32, is the output layer's loss on the logits that Gemm made
// (gpt/output_loss.py): one pass per row over the [rows, vocabulary] float32 logits computes the
// row's max, exp-sum and loss term and overwrites the row with d(loss)/d(logits) =
// (softmax - onehot) * scale. A row of GPT-2's 50257 logits is 200 KB: it stays in L2 between the
// row's passes, so the logits cross memory once in and once out, where XLA's fusions of the same
// cross-entropy read them about four times. Where the build has AVX-512 (-march=native), a row is
// three sweeps with the exp in registers (XentRowAvx512, simd_exp.h's Exp16); elsewhere, for rows
// holding NaN or infinities, and with the `portable` attribute (gemm.XENT_PORTABLE, for same-run
// comparisons) the exponentials are MKL's vector vsExp (VML), which the session-5 measurement
// found ~1.3x slower than XLA's fused loops (BENCHMARKS.md).
//
// The third, GptSoftmaxXentBf16, is the same pass for model.matmul_dtype=bfloat16's head (opt-in,
// gpt/output_loss.py's BF16_HEAD): it writes the gradient in bfloat16, row-major and transposed,
// the operands of the head's two backward bf16 dots (below, before GptGemmLoad).
#include <dlfcn.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cstdint>
#include <cstdlib>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <vector>
#include <thread>

#include "bf16.h"
#include "pool.h"
#include "simd_exp.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// CBLAS's and MKL's constants (cblas.h, mkl_service.h), spelled out so no MKL header is needed.
constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;
constexpr int kMklThreadingSequential = 1;

using SgemmFn = void (*)(int, int, int, int, int, int, float, const float*, int, const float*, int,
                         float, float*, int);
using IntFn = int (*)(int);

using VecFn = void (*)(int, const float*, float*);  // VML's vsExp(n, a, y)

SgemmFn g_sgemm = nullptr;
VecFn g_vsexp = nullptr;  // MKL's vsExp; std::exp when the library lacks it
IntFn g_set_num_threads_local = nullptr;  // MKL_Set_Num_Threads_Local (C API; the lowercase
                                          // name is the Fortran one, taking a pointer)

// Blocks per thread of XLA's pool (GPT_GEMM_BLOCKS_PER_THREAD, default 1): more blocks balance a
// loaded machine better, fewer keep each sgemm large (each block packs its own operand panels).
int64_t BlocksPerThread() {
  const char* env = std::getenv("GPT_GEMM_BLOCKS_PER_THREAD");
  const int64_t v = env ? std::atoll(env) : 1;
  return v > 0 ? v : 1;
}

// Rows or columns per block are rounded to this (whole cache lines of C, whole SIMD panels).
constexpr int64_t kAlign = 16;
// A block does at least this many multiply-adds: below it, splitting costs more than it saves.
constexpr int64_t kMinBlockWork = int64_t{1} << 21;

// C[M, N] = op(A) . op(B) with op(A) M x K and op(B) K x N, A and B row-major with leading
// dimensions lda and ldb (their stored row lengths), the blocks of C on XLA's thread pool.
void GemmCore(ffi::ThreadPool& pool, const float* ap, const float* bp, float* cp, int64_t M,
              int64_t N, int64_t K, int lda, int ldb, bool transpose_a, bool transpose_b) {
  if (M == 0 || N == 0) return;
  if (K == 0) {
    std::memset(cp, 0, sizeof(float) * M * N);
    return;
  }
  const int ldc = static_cast<int>(N);
  const int ta = transpose_a ? kTrans : kNoTrans, tb = transpose_b ? kTrans : kNoTrans;
  // Split the longer side of C: each block then shares the whole of the other operand.
  const bool by_rows = M >= N;
  const int64_t side = by_rows ? M : N;
  int64_t blocks = std::max<int64_t>(1, pool.num_threads()) * BlocksPerThread();
  blocks = std::min(blocks, std::max<int64_t>(1, M * N * K / kMinBlockWork));
  int64_t step = (side + blocks - 1) / blocks;
  step = (step + kAlign - 1) / kAlign * kAlign;
  blocks = (side + step - 1) / step;
  SgemmFn sgemm = g_sgemm;
  IntFn local = g_set_num_threads_local;
  gpt_kernels::RunBlocks(pool, blocks, blocks, [=](int64_t i) {
    if (local) local(1);  // sequential even if another library chose MKL's threaded layer first
    const int64_t lo = i * step, n = std::min(side, lo + step) - lo;
    if (by_rows) {  // rows lo.. of C: rows of op(A)
      const float* ab = transpose_a ? ap + lo : ap + lo * lda;
      sgemm(kRowMajor, ta, tb, static_cast<int>(n), static_cast<int>(N), static_cast<int>(K), 1.0f,
            ab, lda, bp, ldb, 0.0f, cp + lo * ldc, ldc);
    } else {  // columns lo.. of C: columns of op(B)
      const float* bb = transpose_b ? bp + lo * ldb : bp + lo;
      sgemm(kRowMajor, ta, tb, static_cast<int>(M), static_cast<int>(n), static_cast<int>(K), 1.0f,
            ap, lda, bb, ldb, 0.0f, cp + lo, ldc);
    }
  });
}

// The shapes of op(a) . op(b) for a [ad0, ad1] and b [bd0, bd1]: M, N, K, or an error.
ffi::Error GemmShapes(int64_t ad0, int64_t ad1, int64_t bd0, int64_t bd1, int64_t cd0, int64_t cd1,
                      bool transpose_a, bool transpose_b, int64_t* M, int64_t* N, int64_t* K) {
  *M = transpose_a ? ad1 : ad0;
  *K = transpose_a ? ad0 : ad1;
  const int64_t Kb = transpose_b ? bd1 : bd0;
  *N = transpose_b ? bd0 : bd1;
  if (*K != Kb || cd0 != *M || cd1 != *N)
    return ffi::Error::InvalidArgument("gemm: operand shapes do not agree");
  for (int64_t d : {ad0, ad1, bd0, bd1})
    if (d > INT_MAX) return ffi::Error::InvalidArgument("gemm: a dimension exceeds MKL's 32-bit sizes");
  return ffi::Error::Success();
}

ffi::Error Gemm(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b,
                ffi::ResultBuffer<ffi::F32> c, int64_t transpose_a, int64_t transpose_b) {
  if (!g_sgemm) return ffi::Error::Internal("gemm: MKL is not loaded (GptGemmLoad)");
  auto ad = a.dimensions();
  auto bd = b.dimensions();
  auto cd = c->dimensions();
  if (ad.size() != 2 || bd.size() != 2 || cd.size() != 2)
    return ffi::Error::InvalidArgument("gemm: a, b and the result must be 2-D");
  int64_t M, N, K;
  ffi::Error shapes = GemmShapes(ad[0], ad[1], bd[0], bd[1], cd[0], cd[1], transpose_a, transpose_b,
                                 &M, &N, &K);
  if (shapes.failure()) return shapes;
  GemmCore(pool, a.typed_data(), b.typed_data(), c->typed_data(), M, N, K,
           static_cast<int>(ad[1]), static_cast<int>(bd[1]), transpose_a, transpose_b);
  return ffi::Error::Success();
}

// The largest of x[0..n): 16 running maxima (GCC vectorizes the lanes at -O2).
float RowMax(const float* x, int64_t n) {
  float lanes[16];
  const int64_t whole = n / 16 * 16;
  for (int k = 0; k < 16; ++k) lanes[k] = n ? x[0] : 0.0f;
  for (int64_t j = 0; j < whole; j += 16)
    for (int k = 0; k < 16; ++k) lanes[k] = std::max(lanes[k], x[j + k]);
  float m = lanes[0];
  for (int k = 1; k < 16; ++k) m = std::max(m, lanes[k]);
  for (int64_t j = whole; j < n; ++j) m = std::max(m, x[j]);
  return m;
}

// x[j] = exp(x[j] - m) for j < n, in place, and their sum (in 16 lanes, then added up).
float ExpShiftSum(float* x, int64_t n, float m, VecFn vsexp) {
  for (int64_t j = 0; j < n; ++j) x[j] -= m;
  if (vsexp) {
    vsexp(static_cast<int>(n), x, x);
  } else {
    for (int64_t j = 0; j < n; ++j) x[j] = std::exp(x[j]);
  }
  float lanes[16] = {0};
  const int64_t whole = n / 16 * 16;
  for (int64_t j = 0; j < whole; j += 16)
    for (int k = 0; k < 16; ++k) lanes[k] += x[j + k];
  float s = 0.0f;
  for (int k = 0; k < 16; ++k) s += lanes[k];
  for (int64_t j = whole; j < n; ++j) s += x[j];
  return s;
}

#ifdef __AVX512F__
// The largest of x[0..V) in four AVX-512 accumulators, into *max; false, where the row holds a NaN or
// an infinity (the callers then take their scalar route, which gives XLA's NaN).
bool RowMaxAvx512(const float* x, int64_t V, float* max) {
  using gpt_kernels::TailMask;
  const __m512 ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  const __m512 inf = _mm512_set1_ps(std::numeric_limits<float>::infinity());
  __m512 m0 = ninf, m1 = ninf, m2 = ninf, m3 = ninf;
  __mmask16 bad = 0;  // lanes that saw a NaN or +-inf: |x| == inf or unordered
  int64_t j = 0;
  for (; j + 64 <= V; j += 64) {
    const __m512 a = _mm512_loadu_ps(x + j), b = _mm512_loadu_ps(x + j + 16);
    const __m512 c = _mm512_loadu_ps(x + j + 32), d = _mm512_loadu_ps(x + j + 48);
    m0 = _mm512_max_ps(m0, a);
    m1 = _mm512_max_ps(m1, b);
    m2 = _mm512_max_ps(m2, c);
    m3 = _mm512_max_ps(m3, d);
    // !(|v| < inf) holds exactly for NaN and +-inf (each vector: min/max would drop a NaN).
    bad |= _mm512_cmp_ps_mask(_mm512_abs_ps(a), inf, _CMP_NLT_UQ) |
           _mm512_cmp_ps_mask(_mm512_abs_ps(b), inf, _CMP_NLT_UQ) |
           _mm512_cmp_ps_mask(_mm512_abs_ps(c), inf, _CMP_NLT_UQ) |
           _mm512_cmp_ps_mask(_mm512_abs_ps(d), inf, _CMP_NLT_UQ);
  }
  for (; j < V; j += 16) {
    const __mmask16 k = TailMask(V - j);
    const __m512 a = _mm512_mask_loadu_ps(ninf, k, x + j);
    m0 = _mm512_max_ps(m0, a);
    bad |= _mm512_mask_cmp_ps_mask(k, _mm512_abs_ps(a), inf, _CMP_NLT_UQ);
  }
  if (bad) return false;
  *max = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_max_ps(m0, m1), _mm512_max_ps(m2, m3)));
  return true;
}

// One row of SoftmaxXent in three AVX-512 sweeps over the 200 KB row while it stays in L2: the max
// (read from memory), exp(x - max) computed in registers, stored over the row and summed, then the
// scale by `scale` / sum. So the logits cross memory once in and once out, and the exp never makes
// a separate trip through memory as MKL's vsExp's results do. x and y may be the same row (XLA
// aliases the output). Returns false, touching nothing, when the row holds a NaN or an infinity:
// the caller's portable route then gives XLA's NaN where Exp16's clamp would hide it.
bool XentRowAvx512(const float* x, float* y, int64_t V, int32_t target, float scale, float* loss) {
  using gpt_kernels::Exp16;
  using gpt_kernels::TailMask;
  float m;
  if (!RowMaxAvx512(x, V, &m)) return false;
  const bool valid = target >= 0 && target < V;
  // Out of range: the loss is NaN (as jnp.take_along_axis's fill) and no one-hot is subtracted.
  const float picked = valid ? x[target] : std::numeric_limits<float>::quiet_NaN();
  const __m512 mv = _mm512_set1_ps(m);
  __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
  int64_t j = 0;
  for (; j + 64 <= V; j += 64) {
    const __m512 a = Exp16(_mm512_sub_ps(_mm512_loadu_ps(x + j), mv));
    const __m512 b = Exp16(_mm512_sub_ps(_mm512_loadu_ps(x + j + 16), mv));
    const __m512 c = Exp16(_mm512_sub_ps(_mm512_loadu_ps(x + j + 32), mv));
    const __m512 d = Exp16(_mm512_sub_ps(_mm512_loadu_ps(x + j + 48), mv));
    _mm512_storeu_ps(y + j, a);
    _mm512_storeu_ps(y + j + 16, b);
    _mm512_storeu_ps(y + j + 32, c);
    _mm512_storeu_ps(y + j + 48, d);
    s0 = _mm512_add_ps(s0, a);
    s1 = _mm512_add_ps(s1, b);
    s2 = _mm512_add_ps(s2, c);
    s3 = _mm512_add_ps(s3, d);
  }
  for (; j < V; j += 16) {
    const __mmask16 k = TailMask(V - j);
    const __m512 a = _mm512_maskz_mov_ps(k, Exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, x + j), mv)));
    _mm512_mask_storeu_ps(y + j, k, a);
    s0 = _mm512_add_ps(s0, a);
  }
  const float s = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(s0, s1), _mm512_add_ps(s2, s3)));
  *loss = std::log(s) + m - picked;
  const __m512 f = _mm512_set1_ps(scale / s);
  for (j = 0; j + 64 <= V; j += 64) {
    _mm512_storeu_ps(y + j, _mm512_mul_ps(_mm512_loadu_ps(y + j), f));
    _mm512_storeu_ps(y + j + 16, _mm512_mul_ps(_mm512_loadu_ps(y + j + 16), f));
    _mm512_storeu_ps(y + j + 32, _mm512_mul_ps(_mm512_loadu_ps(y + j + 32), f));
    _mm512_storeu_ps(y + j + 48, _mm512_mul_ps(_mm512_loadu_ps(y + j + 48), f));
  }
  for (; j < V; j += 16) {
    const __mmask16 k = TailMask(V - j);
    _mm512_mask_storeu_ps(y + j, k, _mm512_mul_ps(_mm512_maskz_loadu_ps(k, y + j), f));
  }
  if (valid) y[target] -= scale;
  return true;
}
#endif  // __AVX512F__

// Rows per block of the loss's pass: several 200 KB rows per pool task, few enough to balance.
constexpr int64_t kXentRows = 8;

ffi::Error SoftmaxXent(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> logits, ffi::Buffer<ffi::S32> targets,
                       ffi::ResultBuffer<ffi::F32> dlogits, ffi::ResultBuffer<ffi::F32> loss,
                       float scale, int64_t portable) {
  auto ld = logits.dimensions();
  if (ld.size() != 2 || targets.dimensions().size() != 1 || targets.dimensions()[0] != ld[0] ||
      dlogits->dimensions().size() != 2 || dlogits->dimensions()[0] != ld[0] ||
      dlogits->dimensions()[1] != ld[1] || loss->dimensions().size() != 1 ||
      loss->dimensions()[0] != ld[0])
    return ffi::Error::InvalidArgument("softmax_xent: logits [N, V], targets [N], results [N, V] and [N]");
  const int64_t N = ld[0], V = ld[1];
  if (V > INT_MAX) return ffi::Error::InvalidArgument("softmax_xent: the vocabulary exceeds 32-bit sizes");
  if (N == 0) return ffi::Error::Success();
  const float* in = logits.typed_data();
  const int32_t* t = targets.typed_data();
  float* out = dlogits->typed_data();
  float* rl = loss->typed_data();
  VecFn vsexp = g_vsexp;
  IntFn local = g_set_num_threads_local;
  const int64_t blocks = (N + kXentRows - 1) / kXentRows;
  gpt_kernels::RunBlocks(pool, blocks, blocks, [=](int64_t b) {
    if (local) local(1);
    for (int64_t r = b * kXentRows; r < std::min(N, (b + 1) * kXentRows); ++r) {
      const float* x = in + r * V;
      float* y = out + r * V;
#ifdef __AVX512F__
      if (!portable && XentRowAvx512(x, y, V, t[r], scale, rl + r)) continue;  // else: below
#endif
      if (y != x) std::memcpy(y, x, sizeof(float) * V);  // XLA aliases them unless it cannot
      const float m = RowMax(y, V);
      const int32_t target = t[r];
      const bool valid = target >= 0 && target < V;
      // Out of range: the loss is NaN (as jnp.take_along_axis's fill) and no one-hot is subtracted.
      const float picked = valid ? y[target] : std::numeric_limits<float>::quiet_NaN();
      const float s = ExpShiftSum(y, V, m, vsexp);
      rl[r] = std::log(s) + m - picked;
      const float f = scale / s;
      for (int64_t j = 0; j < V; ++j) y[j] *= f;
      if (valid) y[target] -= scale;
    }
  });
  return ffi::Error::Success();
}

// --- GptSoftmaxXentBf16: the loss pass of model.matmul_dtype=bfloat16's head (train-head, session 10).
// The same loss and (softmax - onehot) * scale as SoftmaxXent, written as bfloat16 twice: dlogits
// [N, V] row-major and its transpose [V, N] row-major, the operands of the head's two backward
// products as XLA:CPU's fast bf16 dot wants them (left operand contracting its last axis). Before,
// XLA rounded the float32 dlogits and gathered their transpose (a [V, N] gather, ~10% of the 30m
// mixed step). The exp is computed twice per element (once for the row's sum, once for its
// output) instead of storing float32 rows: the exp is cheap next to a trip through memory.

using gpt_kernels::RoundBf16;

// Rows per block of the bf16 pass: a tile of kXentTRows rows x kXentTCols columns is rounded into a
// stack buffer and written out transposed as whole 64-byte lines of the [V, N] result.
constexpr int64_t kXentTRows = 32, kXentTCols = 64;
// Words per block of the pass's second phase (a multiple of kXentTCols).
constexpr int64_t kXentTBlock = 256;

// A row's max and sum of exp(x - max) (float32, the same lanes and order as XentRowAvx512, so the
// two passes' numbers agree bit for bit); false where the row holds a NaN or an infinity (or the
// build has no AVX-512): the caller then takes the scalar route.
bool RowStats(const float* x, int64_t V, float* max, float* sum) {
#ifdef __AVX512F__
  using gpt_kernels::Exp16;
  using gpt_kernels::TailMask;
  float m;
  if (!RowMaxAvx512(x, V, &m)) return false;
  const __m512 mv = _mm512_set1_ps(m);
  __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
  int64_t j = 0;
  for (; j + 64 <= V; j += 64) {
    s0 = _mm512_add_ps(s0, Exp16(_mm512_sub_ps(_mm512_loadu_ps(x + j), mv)));
    s1 = _mm512_add_ps(s1, Exp16(_mm512_sub_ps(_mm512_loadu_ps(x + j + 16), mv)));
    s2 = _mm512_add_ps(s2, Exp16(_mm512_sub_ps(_mm512_loadu_ps(x + j + 32), mv)));
    s3 = _mm512_add_ps(s3, Exp16(_mm512_sub_ps(_mm512_loadu_ps(x + j + 48), mv)));
  }
  for (; j < V; j += 16) {
    const __mmask16 k = TailMask(V - j);
    s0 = _mm512_add_ps(s0, _mm512_maskz_mov_ps(k, Exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, x + j), mv))));
  }
  *max = m;
  *sum = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(s0, s1), _mm512_add_ps(s2, s3)));
  return true;
#else
  (void)x, (void)V, (void)max, (void)sum;
  return false;
#endif
}

// Columns [j0, j0 + n) of one row's dlogits, rounded to bfloat16, into out[0..n) (n <= kXentTCols):
// exp(x - m) * f, less `scale` at the target. `fast`: the row's stats came from RowStats (Exp16,
// as SoftmaxXent's AVX-512 route); otherwise std::exp (the scalar route, as SoftmaxXent's portable one).
void RowTile(const float* x, int64_t j0, int64_t n, float m, float f, int32_t target, float scale,
             bool fast, uint16_t* out) {
#ifdef __AVX512F__
  if (fast) {
    using gpt_kernels::Exp16;
    using gpt_kernels::TailMask;
    const __m512 mv = _mm512_set1_ps(m), fv = _mm512_set1_ps(f), sv = _mm512_set1_ps(scale);
    const __m512i one = _mm512_set1_epi32(1), bias = _mm512_set1_epi32(0x7fff);
    for (int64_t c = 0; c < n; c += 16) {
      const __mmask16 k = TailMask(n - c);
      const int64_t j = j0 + c;
      __m512 v = _mm512_mul_ps(Exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, x + j), mv)), fv);
      if (target >= j && target < j + 16)
        v = _mm512_mask_sub_ps(v, static_cast<__mmask16>(1u << (target - j)), v, sv);
      // Round to nearest even in the integer domain (no NaN here: the row passed RowStats).
      const __m512i u = _mm512_castps_si512(v);
      const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), one);
      const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(bias, lsb)), 16);
      const __m256i packed = _mm512_cvtepi32_epi16(r);
      if (n - c >= 16) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + c), packed);
      } else {  // the row's tail: only its n - c words
        alignas(32) uint16_t last[16];
        _mm256_store_si256(reinterpret_cast<__m256i*>(last), packed);
        std::memcpy(out + c, last, sizeof(uint16_t) * (n - c));
      }
    }
    return;
  }
#endif
  for (int64_t c = 0; c < n; ++c) {
    float v = std::exp(x[j0 + c] - m) * f;
    if (j0 + c == target) v -= scale;
    out[c] = RoundBf16(v);
  }
}

ffi::Error SoftmaxXentBf16(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> logits,
                           ffi::Buffer<ffi::S32> targets, ffi::ResultBuffer<ffi::BF16> dlogits,
                           ffi::ResultBuffer<ffi::BF16> dlogits_t, ffi::ResultBuffer<ffi::F32> loss,
                           float scale) {
  auto ld = logits.dimensions();
  auto dd = dlogits->dimensions();
  auto td = dlogits_t->dimensions();
  if (ld.size() != 2 || targets.dimensions().size() != 1 || targets.dimensions()[0] != ld[0] ||
      dd.size() != 2 || dd[0] != ld[0] || dd[1] != ld[1] || td.size() != 2 || td[0] != ld[1] ||
      td[1] != ld[0] || loss->dimensions().size() != 1 || loss->dimensions()[0] != ld[0])
    return ffi::Error::InvalidArgument(
        "softmax_xent_bf16: logits [N, V], targets [N], results [N, V], [V, N] and [N]");
  const int64_t N = ld[0], V = ld[1];
  if (N == 0 || V == 0) return ffi::Error::Success();
  const float* in = logits.typed_data();
  const int32_t* t = targets.typed_data();
  auto* dl = reinterpret_cast<uint16_t*>(dlogits->typed_data());
  auto* dlt = reinterpret_cast<uint16_t*>(dlogits_t->typed_data());
  float* rl = loss->typed_data();
  const int64_t blocks = (N + kXentRows - 1) / kXentRows;
  gpt_kernels::RunBlocks(pool, blocks, blocks, [=](int64_t b) {
    const int64_t r0 = b * kXentRows, rows = std::min(N, r0 + kXentRows) - r0;
    // Each row in turn, while its 200 KB stay in L2: its max and exp-sum, its loss, and its bf16
    // gradient written out row by row.
    for (int64_t r = r0; r < r0 + rows; ++r) {
      const float* x = in + r * V;
      float m, s;
      const bool fast = RowStats(x, V, &m, &s);
      if (!fast) {  // NaN/inf rows, or no AVX-512: SoftmaxXent's portable arithmetic
        m = RowMax(x, V);
        float lanes[16] = {0};
        for (int64_t j = 0; j < V; ++j) lanes[j % 16] += std::exp(x[j] - m);
        s = 0.0f;
        for (float l : lanes) s += l;
      }
      const int32_t target = t[r];
      const float picked = target >= 0 && target < V ? x[target] : std::numeric_limits<float>::quiet_NaN();
      rl[r] = std::log(s) + m - picked;
      for (int64_t j0 = 0; j0 < V; j0 += kXentTCols)
        RowTile(x, j0, std::min(V, j0 + kXentTCols) - j0, m, scale / s, target, scale, fast, dl + r * V + j0);
    }
  });
  // Then the transpose of the bf16 rows, by blocks of kXentTBlock words (rows of [V, N]: a
  // contiguous stretch of it) for every row, the rows walked kXentTRows at a time: so a block
  // writes a few hundred pages of the transpose and reads each row of dlogits in one piece, where
  // blocks of rows would touch every page of the transpose (one 4 KB row of it per word: 50257
  // pages, TLB misses) for each. Tiles of kXentTRows x kXentTCols go through a stack buffer and
  // out as whole 64-byte lines.
  const int64_t col_blocks = (V + kXentTBlock - 1) / kXentTBlock;
  gpt_kernels::RunBlocks(pool, col_blocks, col_blocks, [=](int64_t b) {
    const int64_t c0 = b * kXentTBlock, c1 = std::min(V, c0 + kXentTBlock);
    alignas(64) uint16_t tile[kXentTRows][kXentTCols];
    for (int64_t r0 = 0; r0 < N; r0 += kXentTRows) {
      const int64_t rows = std::min(N, r0 + kXentTRows) - r0;
      for (int64_t j0 = c0; j0 < c1; j0 += kXentTCols) {
        const int64_t n = std::min(c1, j0 + kXentTCols) - j0;
        for (int64_t i = 0; i < rows; ++i) std::memcpy(tile[i], dl + (r0 + i) * V + j0, sizeof(uint16_t) * n);
        for (int64_t c = 0; c < n; ++c) {  // the tile's column c is row j0 + c of the transpose
          uint16_t* o = dlt + (j0 + c) * N + r0;
          for (int64_t i = 0; i < rows; ++i) o[i] = tile[i][c];
        }
      }
    }
  });
  return ffi::Error::Success();
}

}  // namespace

// Loads MKL from `path` (libmkl_rt) and selects its sequential layer. Returns 0 on success, 1 when
// the library cannot be opened, 2 when it lacks cblas_sgemm; `error` (when not null, `size`
// bytes) receives dlerror()'s text.
extern "C" int GptGemmLoad(const char* path, char* error, int size) {
  auto fail = [&](int code) {
    const char* msg = dlerror();
    if (error && size > 0) {
      std::strncpy(error, msg ? msg : "unknown error", size - 1);
      error[size - 1] = '\0';
    }
    return code;
  };
  void* lib = dlopen(path, RTLD_NOW | RTLD_LOCAL);
  if (!lib) return fail(1);
  auto sgemm = reinterpret_cast<SgemmFn>(dlsym(lib, "cblas_sgemm"));
  if (!sgemm) return fail(2);
  // Must precede MKL's first computation; a no-op (returns the layer in force) if too late.
  if (auto layer = reinterpret_cast<IntFn>(dlsym(lib, "MKL_Set_Threading_Layer"))) layer(kMklThreadingSequential);
  g_set_num_threads_local = reinterpret_cast<IntFn>(dlsym(lib, "MKL_Set_Num_Threads_Local"));
  g_vsexp = reinterpret_cast<VecFn>(dlsym(lib, "vsExp"));
  g_sgemm = sgemm;
  return 0;
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(GptGemmF32, Gemm,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("transpose_a")
                                  .Attr<int64_t>("transpose_b"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(GptSoftmaxXentF32, SoftmaxXent,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("portable"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(GptSoftmaxXentBf16, SoftmaxXentBf16,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale"));
