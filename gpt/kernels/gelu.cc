// The MLP's bias + GELU backward (tanh form, GPT-2's) in one threaded pass, behind JAX's FFI, with
// c_fc's bias gradient summed in the same pass.
//
// Why: in the training step the MLP is u = x w_fc (MKL), h = u + b_fc, g = gelu(h), y = g w_proj.
// Differentiated by JAX, the backward is an XLA fusion that reads h and dg = dy w_proj^T and writes
// dh and g (g for w_proj's gradient), then a separate column-reduce fusion that reads dh again for
// b_fc's gradient (the 30m step's profile: GELU's elementwise fusions ~3% of op time, reductions
// over [2048, 1536] in its ~2.3% of ynn_fusion reduces). Here one pass per block of rows reads u, b
// and dg and writes du (= dh: the bias add's derivative is 1; into dg's buffer, aliased), g, and
// the block's partial column sums of du, added over blocks in block order at the end (the same
// bits whichever thread ran which block). The forward keeps u (the product MKL wrote), not h.
//
// From e = exp(-2|z|), z = c (h + a h^3), in (0, 1]: 0.5 (1 + tanh z) = 1 / (1 + e) for z >= 0 and
// e / (1 + e) below, 1 - tanh(z)^2 = 4 e / (1 + e)^2 on both sides: no cancellation where
// tanh z ~ -1 (1 + tanh z would lose gelu's small negative values), no overflow, no denormal
// reciprocal (XLA's threads flush those to zero). exp in AVX-512 registers (simd_exp.h) where built
// with -march=native on such a CPU, std::exp in a plain loop elsewhere.
//
// The second handler, GptGeluBwdBf16T, is the same GELU backward for the mixed mode's MLP c_proj
// (model.matmul_dtype=bfloat16, gpt.matmul.bf16_gelu_matmul; mixed-transposes, session 11): from h
// and dg it writes dh = dg gelu'(h) (into dg's buffer) and gelu(h)^T [M, N] rounded to bfloat16,
// the left operand of c_proj's dW = gelu(h)^T dy as XLA:CPU's fast bf16 dot wants it (contracting
// its last, row-major axis). Before, XLA recomputed the tanh in one fusion and gathered the rounded
// transpose in another (the step's largest convert/gather: 281 ms of the chapter shape's profile).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "bf16.h"
#include "pool.h"
#include "simd_exp.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr float kC = 0.7978845608028654f;  // sqrt(2 / pi)
constexpr float kA = 0.044715f;
// Rows per block: u, dg, du and g rows of 1536-3072 floats; 16 rows are 100-200 KB per array.
constexpr int64_t kRows = 16;

// GELU's two factors from one exp, shared by both passes: hp = 0.5 (1 + tanh z) with
// z = c (h + a h^3), so gelu(h) = h hp, and slope = gelu'(h).
#if defined(__AVX512F__)
inline void GeluLanes(__m512 h, __m512* hp_out, __m512* slope_out) {
  const __m512 one = _mm512_set1_ps(1.f), two = _mm512_set1_ps(2.f);
  const __m512 c = _mm512_set1_ps(kC), a = _mm512_set1_ps(kA), a3 = _mm512_set1_ps(3 * kA);
  const __m512 h2 = _mm512_mul_ps(h, h);
  const __m512 z = _mm512_mul_ps(c, _mm512_fmadd_ps(_mm512_mul_ps(a, h2), h, h));
  // e = exp(-2|z|) in (0, 1]: 0.5 (1 + t) = 1 / (1 + e) for z >= 0, e / (1 + e) below
  const __m512 e = gpt_kernels::Exp16(_mm512_mul_ps(_mm512_set1_ps(-2.f), _mm512_abs_ps(z)));
  const __m512 r = _mm512_div_ps(one, _mm512_add_ps(e, one));
  const __mmask16 neg = _mm512_cmp_ps_mask(z, _mm512_setzero_ps(), _CMP_LT_OQ);
  const __m512 hp = _mm512_mask_mul_ps(r, neg, e, r);
  // gelu'(h) = 0.5 (1 + t) + 0.5 h (1 - t^2) c (1 + 3 a h^2), 1 - t^2 = 4 e / (1 + e)^2
  *slope_out = _mm512_fmadd_ps(
      _mm512_mul_ps(_mm512_mul_ps(two, h), _mm512_mul_ps(e, _mm512_mul_ps(r, r))),
      _mm512_mul_ps(c, _mm512_fmadd_ps(a3, h2, one)), hp);
  *hp_out = hp;
}
#else
inline void GeluScalar(float h, float* hp_out, float* slope_out) {
  const float h2 = h * h;
  const float z = kC * (h + kA * h2 * h);
  const float e = std::exp(-2 * std::fabs(z)), r = 1.f / (e + 1.f);
  const float hp = z < 0 ? e * r : r;  // as the AVX-512 lanes
  *slope_out = hp + 2 * h * e * r * r * kC * (1.f + 3 * kA * h2);
  *hp_out = hp;
}
#endif

// One row: du = dg * gelu'(h), g = gelu(h), db += du, with h = u + b, over M columns.
void Row(const float* __restrict u, const float* __restrict b, const float* dg,
         float* du, float* __restrict g, float* __restrict db, int64_t M) {
  int64_t j = 0;
#if defined(__AVX512F__)
  for (; j < M; j += 16) {
    const __mmask16 m = gpt_kernels::TailMask(M - j);
    const __m512 h = _mm512_add_ps(_mm512_maskz_loadu_ps(m, u + j), _mm512_maskz_loadu_ps(m, b + j));
    __m512 hp, slope;
    GeluLanes(h, &hp, &slope);
    const __m512 d = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, dg + j), slope);
    _mm512_mask_storeu_ps(du + j, m, d);
    _mm512_mask_storeu_ps(g + j, m, _mm512_mul_ps(h, hp));
    _mm512_mask_storeu_ps(db + j, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, db + j), d));
  }
#else
  for (; j < M; ++j) {
    const float h = u[j] + b[j];
    float hp, slope;
    GeluScalar(h, &hp, &slope);
    const float d = dg[j] * slope;
    du[j] = d;
    g[j] = h * hp;
    db[j] += d;
  }
#endif
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> u_in, ffi::Buffer<ffi::F32> b_in,
                    ffi::Buffer<ffi::F32> dg_in, ffi::ResultBuffer<ffi::F32> du_out,
                    ffi::ResultBuffer<ffi::F32> g_out, ffi::ResultBuffer<ffi::F32> db_out) {
  const auto dims = u_in.dimensions();
  if (dims.size() != 2) return ffi::Error::InvalidArgument("bias_gelu: u must be [N, M]");
  const int64_t N = dims[0], M = dims[1];
  if (b_in.element_count() != M || dg_in.element_count() != N * M)
    return ffi::Error::InvalidArgument("bias_gelu: b must be [M] and dg [N, M]");
  const float* u = u_in.typed_data();
  const float* b = b_in.typed_data();
  const float* dg = dg_in.typed_data();
  float* du = du_out->typed_data();  // dg's buffer where XLA aliased them (read before written)
  float* g = g_out->typed_data();
  const int64_t blocks = (N + kRows - 1) / kRows;
  std::vector<float> partial(static_cast<size_t>(blocks * M), 0.f);
  float* part = partial.data();
  gpt_kernels::RunBlocks(pool, blocks, blocks, [=](int64_t blk) {
    for (int64_t r = blk * kRows; r < std::min(N, (blk + 1) * kRows); ++r)
      Row(u + r * M, b, dg + r * M, du + r * M, g + r * M, part + blk * M, M);
  });
  float* db = db_out->typed_data();
  std::fill(db, db + M, 0.f);
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const float* p = part + blk * M;
    for (int64_t j = 0; j < M; ++j) db[j] += p[j];
  }
  return ffi::Error::Success();
}

using gpt_kernels::RoundBf16;

// GptGeluBwdBf16T's tiles: kTRows rows x kTCols columns of [N, M], rounded into a stack buffer and
// written out transposed as whole 64-byte lines (32 bf16) of each of kTCols rows of [M, N]. A
// thread's unit is one block of kTCols columns over all rows: it writes kTCols contiguous rows of
// the transpose (a few hundred KB), not a line in every one of its M rows (TLB misses; the same
// reason as gemm.cc's transposed loss pass).
constexpr int64_t kTRows = 32, kTCols = 64;

// Columns [j0, j0 + n) (n <= kTCols) of one row: du = dg gelu'(h) into du, gelu(h) rounded to
// bfloat16 into out[0..n). The same arithmetic as Row (bias 0), so dh agrees with the float32 pass.
void RowTileBf16(const float* h_row, const float* dg_row, float* du_row, int64_t j0, int64_t n,
                 uint16_t* out) {
  int64_t c = 0;
#if defined(__AVX512F__)
  const __m512i lsb1 = _mm512_set1_epi32(1), bias = _mm512_set1_epi32(0x7fff);
  const __m512i quiet = _mm512_set1_epi32(0x40);
  for (; c < n; c += 16) {
    const __mmask16 m = gpt_kernels::TailMask(n - c);
    const int64_t j = j0 + c;
    const __m512 h = _mm512_maskz_loadu_ps(m, h_row + j);
    __m512 hp, slope;
    GeluLanes(h, &hp, &slope);
    _mm512_mask_storeu_ps(du_row + j, m, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, dg_row + j), slope));
    // gelu(h) = h hp; a NaN h stays NaN (Exp16 clamps NaN lanes away, so put them back).
    const __mmask16 nan = _mm512_cmp_ps_mask(h, h, _CMP_UNORD_Q);
    const __m512 g = _mm512_mask_mov_ps(_mm512_mul_ps(h, hp), nan, h);
    // Round to nearest even in the integer domain; NaN: the top half, made quiet.
    const __m512i u = _mm512_castps_si512(g);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), lsb1);
    __m512i rb = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(bias, lsb)), 16);
    rb = _mm512_mask_or_epi32(rb, nan, _mm512_srli_epi32(u, 16), quiet);
    const __m256i packed = _mm512_cvtepi32_epi16(rb);
    if (n - c >= 16) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + c), packed);
    } else {
      alignas(32) uint16_t last[16];
      _mm256_store_si256(reinterpret_cast<__m256i*>(last), packed);
      std::memcpy(out + c, last, sizeof(uint16_t) * (n - c));
    }
  }
#else
  for (; c < n; ++c) {
    const int64_t j = j0 + c;
    const float h = h_row[j];
    float hp, slope;
    GeluScalar(h, &hp, &slope);
    du_row[j] = dg_row[j] * slope;
    out[c] = RoundBf16(h * hp);
  }
#endif
}

ffi::Error BackwardBf16T(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> h_in, ffi::Buffer<ffi::F32> dg_in,
                         ffi::ResultBuffer<ffi::F32> dh_out, ffi::ResultBuffer<ffi::BF16> gt_out) {
  const auto dims = h_in.dimensions();
  if (dims.size() != 2) return ffi::Error::InvalidArgument("gelu_bf16t: h must be [N, M]");
  const int64_t N = dims[0], M = dims[1];
  if (dg_in.element_count() != N * M || gt_out->element_count() != N * M)
    return ffi::Error::InvalidArgument("gelu_bf16t: dg [N, M], gelu(h)^T [M, N]");
  const float* h = h_in.typed_data();
  const float* dg = dg_in.typed_data();
  float* dh = dh_out->typed_data();  // dg's buffer where XLA aliased them (each element read first)
  uint16_t* gt = reinterpret_cast<uint16_t*>(gt_out->typed_data());
  const int64_t col_blocks = (M + kTCols - 1) / kTCols;
  gpt_kernels::RunBlocks(pool, col_blocks, col_blocks, [=](int64_t blk) {
    const int64_t j0 = blk * kTCols, n = std::min(M, j0 + kTCols) - j0;
    alignas(64) uint16_t tile[kTRows][kTCols];
    for (int64_t r0 = 0; r0 < N; r0 += kTRows) {
      const int64_t rows = std::min(N, r0 + kTRows) - r0;
      for (int64_t i = 0; i < rows; ++i) {
        const int64_t r = r0 + i;
        RowTileBf16(h + r * M, dg + r * M, dh + r * M, j0, n, tile[i]);
      }
      for (int64_t c = 0; c < n; ++c) {  // the tile's column c is row j0 + c of the transpose
        uint16_t* o = gt + (j0 + c) * N + r0;
        for (int64_t i = 0; i < rows; ++i) o[i] = tile[i][c];
      }
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(GptBiasGeluBwdF32, Backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // u [N, M] (before the bias)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // b [M]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dg [N, M]: d loss / d gelu(h)
                                  .Ret<ffi::Buffer<ffi::F32>>()  // du [N, M] (aliases dg)
                                  .Ret<ffi::Buffer<ffi::F32>>()  // g = gelu(u + b) [N, M]
                                  .Ret<ffi::Buffer<ffi::F32>>());  // db [M]

XLA_FFI_DEFINE_HANDLER_SYMBOL(GptGeluBwdBf16T, BackwardBf16T,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()    // h [N, M]
                                  .Arg<ffi::Buffer<ffi::F32>>()    // dg [N, M]: d loss / d gelu(h)
                                  .Ret<ffi::Buffer<ffi::F32>>()    // dh [N, M] (aliases dg)
                                  .Ret<ffi::Buffer<ffi::BF16>>());  // gelu(h)^T [M, N], bfloat16
