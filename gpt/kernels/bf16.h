// float -> bfloat16 rounding shared by the kernels that write bf16 (gemm.cc's loss pass, gelu.cc's
// and transpose.cc's transposed passes): round to nearest even, NaN kept quiet, which is XLA's
// (Eigen's) convert bit for bit, so a pass's bf16 output equals XLA's convert of the same floats.
#pragma once

#include <cstdint>
#include <cstring>

#ifdef __AVX512F__
#include <immintrin.h>
#endif

namespace gpt_kernels {

inline uint16_t RoundBf16(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof(u));
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

#ifdef __AVX512F__
// RoundBf16 of 16 lanes, in the integer domain, packed into 16 words.
inline __m256i RoundBf16x16(__m512 v) {
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), lsb)), 16);
  r = _mm512_mask_or_epi32(r, nan, _mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
  return _mm512_cvtepi32_epi16(r);
}
#endif

}  // namespace gpt_kernels
