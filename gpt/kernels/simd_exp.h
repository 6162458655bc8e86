// exp over 16 float lanes in AVX-512, shared by the kernels that need it in registers
// (attention.cc's online softmax, gemm.cc's output-layer loss pass).
//
// Why not MKL's vsExp or std::exp: a softmax wants exp fused with the sweep that also sums (or
// scales) the row while it sits in cache; a library call writes its results to memory and the sum
// reads them back (the loss pass was ~1.3x slower than XLA's fused loops that way, BENCHMARKS.md
// session 5), and std::exp is scalar.
#pragma once

#ifdef __AVX512F__
#include <immintrin.h>

#include <cstdint>

namespace gpt_kernels {

// The first min(n, 16) lanes (the tail of a row whose length is not a multiple of 16).
inline __mmask16 TailMask(int64_t n) { return n >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << n) - 1); }

// exp(x) for 16 lanes: 2^n * p(f) on x = n ln2 + f (Cephes' polynomial, ~1 ulp); 0 below -87.3
// (so exp(-inf) = 0, as masked and not-yet-seen scores need), x clamped above. NaN lanes do not
// propagate (the clamp replaces them): callers that must see NaN check for it themselves.
inline __m512 Exp16(__m512 x) {
  const __m512 lo = _mm512_set1_ps(-87.3f);
  const __mmask16 under = _mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ);
  x = _mm512_min_ps(_mm512_max_ps(x, lo), _mm512_set1_ps(88.3f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 f = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  f = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), f);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(f, f), _mm512_add_ps(f, _mm512_set1_ps(1.0f)));
  return _mm512_maskz_scalef_ps(static_cast<__mmask16>(~under), p, n);
}

}  // namespace gpt_kernels

#endif  // __AVX512F__
