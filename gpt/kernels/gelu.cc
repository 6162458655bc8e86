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
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "pool.h"
#include "simd_exp.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr float kC = 0.7978845608028654f;  // sqrt(2 / pi)
constexpr float kA = 0.044715f;
// Rows per block: u, dg, du and g rows of 1536-3072 floats; 16 rows are 100-200 KB per array.
constexpr int64_t kRows = 16;

// One row: du = dg * gelu'(h), g = gelu(h), db += du, with h = u + b, over M columns.
void Row(const float* __restrict u, const float* __restrict b, const float* dg,
         float* du, float* __restrict g, float* __restrict db, int64_t M) {
  int64_t j = 0;
#if defined(__AVX512F__)
  const __m512 one = _mm512_set1_ps(1.f), two = _mm512_set1_ps(2.f);
  const __m512 c = _mm512_set1_ps(kC), a = _mm512_set1_ps(kA), a3 = _mm512_set1_ps(3 * kA);
  for (; j < M; j += 16) {
    const __mmask16 m = gpt_kernels::TailMask(M - j);
    const __m512 h = _mm512_add_ps(_mm512_maskz_loadu_ps(m, u + j), _mm512_maskz_loadu_ps(m, b + j));
    const __m512 h2 = _mm512_mul_ps(h, h);
    // z = c (h + a h^3), t = tanh(z)
    const __m512 z = _mm512_mul_ps(c, _mm512_fmadd_ps(_mm512_mul_ps(a, h2), h, h));
    // e = exp(-2|z|) in (0, 1]: 0.5 (1 + t) = 1 / (1 + e) for z >= 0, e / (1 + e) below
    const __m512 e = gpt_kernels::Exp16(_mm512_mul_ps(_mm512_set1_ps(-2.f), _mm512_abs_ps(z)));
    const __m512 r = _mm512_div_ps(one, _mm512_add_ps(e, one));
    const __mmask16 neg = _mm512_cmp_ps_mask(z, _mm512_setzero_ps(), _CMP_LT_OQ);
    const __m512 hp = _mm512_mask_mul_ps(r, neg, e, r);
    // gelu'(h) = 0.5 (1 + t) + 0.5 h (1 - t^2) c (1 + 3 a h^2), 1 - t^2 = 4 e / (1 + e)^2
    const __m512 slope = _mm512_fmadd_ps(
        _mm512_mul_ps(_mm512_mul_ps(two, h), _mm512_mul_ps(e, _mm512_mul_ps(r, r))),
        _mm512_mul_ps(c, _mm512_fmadd_ps(a3, h2, one)), hp);
    const __m512 d = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, dg + j), slope);
    _mm512_mask_storeu_ps(du + j, m, d);
    _mm512_mask_storeu_ps(g + j, m, _mm512_mul_ps(h, hp));
    _mm512_mask_storeu_ps(db + j, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, db + j), d));
  }
#else
  for (; j < M; ++j) {
    const float h = u[j] + b[j], h2 = h * h;
    const float z = kC * (h + kA * h2 * h);
    const float e = std::exp(-2 * std::fabs(z)), r = 1.f / (e + 1.f);
    const float hp = z < 0 ? e * r : r;  // as the AVX-512 loop
    const float slope = hp + 2 * h * e * r * r * kC * (1.f + 3 * kA * h2);
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
