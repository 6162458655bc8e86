// One Adam / AdamW step of one float32 parameter array in one pass: p, m, v updated in place.
//
// Why: written as optax's chain (clip by one scale, scale_by_adam, add_decayed_weights,
// scale_by_learning_rate, apply_updates), XLA:CPU's fusions cross every parameter-sized array
// about 11 times per step (the moments, the update, the new parameters, each fusion re-reading its
// inputs). The minimum is 7: read p, g, m, v and write p, m, v. At 117M parameters one pass is
// ~0.5 GB, so the difference is a few percent of the chapter's step (BENCHMARKS.md, "train-adam,
// session 7"). gpt/kernels/adam.py calls this once per parameter leaf, with the outputs aliased to
// the (donated) p, m, v buffers.
//
// The arithmetic is optax's as XLA:CPU compiles it, operation by operation, in float32. XLA turns
// the division by a bias correction into a multiplication by its reciprocal (a scalar computed
// once), and LLVM contracts a multiply feeding an add into one fused multiply-add; this file is
// built with -ffp-contract=off and writes those FMAs where XLA's code has them (std::fma), so the
// results match optax's bit for bit where XLA compiles it so (tests/test_adam_kernel.py counts):
//   g' = g * scale                                  (clip_by_global_norm's one scalar)
//   m' = fma(1 - b1, g', b1 * m)
//   v' = fma(b2, v, (1 - b2) * (g' * g'))
//   u  = (m' * r1) / (sqrt(v' * r2) + eps)          (r = 1 / (1 - b^count), by the caller)
//   u  = fma(wd, p, u)                              (AdamW, leaves in the decay mask only)
//   p' = fma(lr_neg, u, p)                          (lr_neg = -schedule(count))
// The traced scalars (scale, r1, r2, lr_neg) come in as one float32[4] buffer; the constants
// (b1, b2, eps, wd and optax's float32 roundings of 1 - b1, 1 - b2) as attributes.
//
// The loop is plain C++ that GCC vectorizes: with -march=native on an AVX-512 CPU it is zmm code
// (vdivps, vsqrtps and vfmadd are correctly rounded, as XLA's); the portable build
// (-DGPT_ADAM_PORTABLE, no -march) is the same loop in SSE2, its fma from libm (slower, the same
// numbers). Blocks of kBlock elements run on XLA's intra-op pool (pool.h's RunBlocks).
#include <algorithm>
#include <cmath>
#include <cstdint>

#include "pool.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Elements per block: 4 arrays x 64 KB stay in L2 while a block is worked; a block is far longer
// than a task's start-up cost.
constexpr int64_t kBlock = 16384;

struct Constants {
  float b1, b2, c1, c2, eps, wd;
  bool decay;
};

// Elements [0, n) of one block: see the file comment for the formula.
void AdamBlock(float* __restrict p, const float* __restrict g, float* __restrict m,
               float* __restrict v, int64_t n, const Constants& k, float scale, float r1,
               float r2, float lr_neg) {
  const float b1 = k.b1, b2 = k.b2, c1 = k.c1, c2 = k.c2, eps = k.eps, wd = k.wd;
  if (k.decay) {
    for (int64_t i = 0; i < n; ++i) {
      const float gs = g[i] * scale;
      const float mi = std::fma(c1, gs, b1 * m[i]);
      const float vi = std::fma(b2, v[i], c2 * (gs * gs));
      const float u = (mi * r1) / (std::sqrt(vi * r2) + eps);
      p[i] = std::fma(lr_neg, std::fma(wd, p[i], u), p[i]);
      m[i] = mi;
      v[i] = vi;
    }
  } else {
    for (int64_t i = 0; i < n; ++i) {
      const float gs = g[i] * scale;
      const float mi = std::fma(c1, gs, b1 * m[i]);
      const float vi = std::fma(b2, v[i], c2 * (gs * gs));
      const float u = (mi * r1) / (std::sqrt(vi * r2) + eps);
      p[i] = std::fma(lr_neg, u, p[i]);
      m[i] = mi;
      v[i] = vi;
    }
  }
}

ffi::Error Adam(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> p_in, ffi::Buffer<ffi::F32> g_in,
                ffi::Buffer<ffi::F32> m_in, ffi::Buffer<ffi::F32> v_in,
                ffi::Buffer<ffi::F32> scalars, ffi::ResultBuffer<ffi::F32> p_out,
                ffi::ResultBuffer<ffi::F32> m_out, ffi::ResultBuffer<ffi::F32> v_out, float b1,
                float b2, float c1, float c2, float eps, float wd, int64_t decay) {
  const int64_t n = p_in.element_count();
  if (g_in.element_count() != n || m_in.element_count() != n || v_in.element_count() != n ||
      p_out->element_count() != n || m_out->element_count() != n || v_out->element_count() != n)
    return ffi::Error::InvalidArgument("adam: p, g, m and v must have the same size");
  if (scalars.element_count() != 4)
    return ffi::Error::InvalidArgument("adam: scalars must be [scale, r1, r2, lr_neg]");
  const float* s = scalars.typed_data();
  const float scale = s[0], r1 = s[1], r2 = s[2], lr_neg = s[3];
  float* p = p_out->typed_data();
  float* m = m_out->typed_data();
  float* v = v_out->typed_data();
  const float* g = g_in.typed_data();
  // Aliased (the usual case, the state donated) these are the same buffers; when XLA could not
  // alias them the inputs are copied over first and the update runs in the outputs.
  const float* pi = p_in.typed_data();
  const float* mi = m_in.typed_data();
  const float* vi = v_in.typed_data();
  const Constants k{b1, b2, c1, c2, eps, wd, decay != 0};
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  gpt_kernels::RunBlocks(pool, blocks, blocks, [=](int64_t b) {
    const int64_t lo = b * kBlock, len = std::min(n, lo + kBlock) - lo;
    if (p + lo != pi + lo) std::copy(pi + lo, pi + lo + len, p + lo);
    if (m + lo != mi + lo) std::copy(mi + lo, mi + lo + len, m + lo);
    if (v + lo != vi + lo) std::copy(vi + lo, vi + lo + len, v + lo);
    AdamBlock(p + lo, g + lo, m + lo, v + lo, len, k, scale, r1, r2, lr_neg);
  });
  return ffi::Error::Success();
}

}  // namespace

#ifdef GPT_ADAM_PORTABLE
#define GPT_ADAM_TARGET GptAdamF32Portable
#else
#define GPT_ADAM_TARGET GptAdamF32
#endif

XLA_FFI_DEFINE_HANDLER_SYMBOL(GPT_ADAM_TARGET, Adam,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // p
                                  .Arg<ffi::Buffer<ffi::F32>>()  // g
                                  .Arg<ffi::Buffer<ffi::F32>>()  // m
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v
                                  .Arg<ffi::Buffer<ffi::F32>>()  // [scale, r1, r2, lr_neg]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // p (aliased)
                                  .Ret<ffi::Buffer<ffi::F32>>()  // m (aliased)
                                  .Ret<ffi::Buffer<ffi::F32>>()  // v (aliased)
                                  .Attr<float>("b1")
                                  .Attr<float>("b2")
                                  .Attr<float>("c1")
                                  .Attr<float>("c2")
                                  .Attr<float>("eps")
                                  .Attr<float>("wd")
                                  .Attr<int64_t>("decay"));
