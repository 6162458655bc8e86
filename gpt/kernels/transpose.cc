// float32 [M, N] -> bfloat16 [M, N] and its row-major transpose [N, M], in one threaded pass, behind
// JAX's FFI: the mixed mode's operands for a dW product (model.matmul_dtype=bfloat16).
//
// Why: XLA:CPU's bf16 dot runs fast only when its left operand contracts its last, row-major axis,
// so each dW = a^T b of the mixed mode needs a row-major bf16 copy of a^T, which XLA makes as a
// gather (gpt.matmul.row_major_t) after a separate convert pass. In the tied head's backward
// (session 9's route, gpt.matmul.bf16_matmul with a transposed weight) those were the convert of
// the float32 dlogits [N, V] and the gather of its [V, N] transpose: 1.0 s of the 30m step's 6.7 s
// op time in a profile (BENCHMARKS.md, "mixed-transposes, session 11"). Here each float32 element is
// read once and written rounded to both.
//
// Layout of the work: a thread's unit is a block of kCols columns over all rows, walked kRows rows
// at a time: the rows' stretches are rounded into the row-major result and a stack tile, and the
// tile goes out transposed as whole 64-byte lines (32 bf16) of kCols contiguous rows of the
// transpose (a unit writes one stretch of it, not a line in every one of its rows: TLB misses; the
// same reason as gemm.cc's transposed loss pass).
#include <algorithm>
#include <cstdint>
#include <cstring>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "bf16.h"
#include "pool.h"
#include "simd_exp.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kRows = 32, kCols = 256;

using gpt_kernels::RoundBf16;

// n (<= kCols) floats of x rounded into both `row` (the row-major result) and `tile`.
void RoundStretch(const float* x, int64_t n, uint16_t* row, uint16_t* tile) {
  int64_t c = 0;
#if defined(__AVX512F__)
  for (; c + 16 <= n; c += 16) {
    const __m256i packed = gpt_kernels::RoundBf16x16(_mm512_loadu_ps(x + c));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(row + c), packed);
    _mm256_store_si256(reinterpret_cast<__m256i*>(tile + c), packed);
  }
#endif
  for (; c < n; ++c) row[c] = tile[c] = RoundBf16(x[c]);
}

ffi::Error RoundT(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> a_in, ffi::ResultBuffer<ffi::BF16> b_out,
                  ffi::ResultBuffer<ffi::BF16> bt_out) {
  const auto dims = a_in.dimensions();
  if (dims.size() != 2) return ffi::Error::InvalidArgument("bf16_with_t: a must be [M, N]");
  const int64_t M = dims[0], N = dims[1];
  const float* a = a_in.typed_data();
  uint16_t* b = reinterpret_cast<uint16_t*>(b_out->typed_data());
  uint16_t* bt = reinterpret_cast<uint16_t*>(bt_out->typed_data());
  const int64_t col_blocks = (N + kCols - 1) / kCols;
  gpt_kernels::RunBlocks(pool, col_blocks, col_blocks, [=](int64_t blk) {
    const int64_t j0 = blk * kCols, n = std::min(N, j0 + kCols) - j0;
    alignas(64) uint16_t tile[kRows][kCols];
    for (int64_t r0 = 0; r0 < M; r0 += kRows) {
      const int64_t rows = std::min(M, r0 + kRows) - r0;
      for (int64_t i = 0; i < rows; ++i)
        RoundStretch(a + (r0 + i) * N + j0, n, b + (r0 + i) * N + j0, tile[i]);
      for (int64_t c = 0; c < n; ++c) {  // the tile's column c is row j0 + c of the transpose
        uint16_t* o = bt + (j0 + c) * M + r0;
        for (int64_t i = 0; i < rows; ++i) o[i] = tile[i][c];
      }
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(GptRoundBf16T, RoundT,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()    // a [M, N]
                                  .Ret<ffi::Buffer<ffi::BF16>>()   // a rounded [M, N]
                                  .Ret<ffi::Buffer<ffi::BF16>>());  // its transpose [N, M]
