// Lane reductions shared by the AVX-512 kernels (gemv.cc, decode_attention.cc).
#pragma once

#ifdef __AVX512F__
#include <immintrin.h>

namespace gpt_kernels {

// The sums of four vectors' lanes, as one 4-float vector: an unpack/add tree that shares its
// shuffles between the four (a separate reduction per vector costs about as much as a short dot
// product's whole loop: K = 768 in gemv, K = 64 in decode attention).
inline __m128 Sum4(__m512 a, __m512 b, __m512 c, __m512 d) {
  const __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
  const __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
  const __m512 t = _mm512_add_ps(
      _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(ab), _mm512_castps_pd(cd))),
      _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(ab), _mm512_castps_pd(cd))));
  const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(t),
                                 _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(t), 1)));
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

}  // namespace gpt_kernels

#endif  // __AVX512F__
