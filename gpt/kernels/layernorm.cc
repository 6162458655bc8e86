// LayerNorm over the last axis of float32 rows [N, D], forward and backward, one threaded pass each,
// behind JAX's FFI.
//
// Why: differentiated by JAX, LayerNorm is several XLA:CPU fusions per direction: the forward's two
// row reductions (mean, variance) and the normalised output, the backward's two row sums (of
// dy*g and dy*g*xhat), dx, and the column sums of g's and b's gradients over all N rows (YNNPACK
// reduce fusions, each a pass of its own over [N, D]: the 30m step's profile, BENCHMARKS.md
// "train-fuse, session 8"). Here each direction reads its inputs once, row by row while the row is
// in L1:
// - forward, per row: mean, variance (two sweeps of the row, as XLA: the variance of x - mean),
//   y = (x - mean) * rstd * g + b; it also writes mean and rstd [N], what the backward needs
//   besides x and g (so the layer scan keeps two [N] vectors, not an [N, D] normalised copy);
// - backward, per block of rows: xhat recomputed from x, mean, rstd; the row sums a = sum(dy g),
//   c = sum(dy g xhat); dx = rstd (dy g - a/D - xhat c/D); dg += dy xhat and db += dy into the
//   block's own partial rows, summed over blocks at the end in block order (so the result does
//   not depend on which thread ran which block: the same bits on every run).
// The loops are plain C++ with `#pragma omp simd` reductions (built with -fopenmp-simd, no OpenMP
// runtime): zmm code with -march=native, SSE2 in a portable build; sums in float32, as XLA's.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "pool.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Rows per block: a block of the backward keeps two [D] partial sums (dg, db); 32 rows of 768
// floats (96 KB per input) sit in L2, and the 30m shape (2048 rows) is 64 blocks for 2 threads.
constexpr int64_t kRows = 32;

void ForwardRow(const float* __restrict x, const float* __restrict g, const float* __restrict b,
                float* __restrict y, int64_t D, float eps, float* mean_out, float* rstd_out) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < D; ++j) s += x[j];
  const float mean = s / static_cast<float>(D);
  float v = 0.f;
#pragma omp simd reduction(+ : v)
  for (int64_t j = 0; j < D; ++j) v += (x[j] - mean) * (x[j] - mean);
  const float rstd = 1.f / std::sqrt(v / static_cast<float>(D) + eps);
#pragma omp simd
  for (int64_t j = 0; j < D; ++j) y[j] = (x[j] - mean) * rstd * g[j] + b[j];
  *mean_out = mean;
  *rstd_out = rstd;
}

// One row's dx, and its dy xhat, dy added to the block's partial dg, db.
void BackwardRow(const float* __restrict x, const float* __restrict g, const float* __restrict dy,
                 float mean, float rstd, int64_t D, float* __restrict dx, float* __restrict dg,
                 float* __restrict db) {
  float a = 0.f, c = 0.f;
#pragma omp simd reduction(+ : a, c)
  for (int64_t j = 0; j < D; ++j) {
    const float xhat = (x[j] - mean) * rstd;
    const float dxhat = dy[j] * g[j];
    a += dxhat;
    c += dxhat * xhat;
  }
  const float inv_d = 1.f / static_cast<float>(D);
  const float ma = a * inv_d, mc = c * inv_d;
#pragma omp simd
  for (int64_t j = 0; j < D; ++j) {
    const float xhat = (x[j] - mean) * rstd;
    dx[j] = rstd * (dy[j] * g[j] - ma - xhat * mc);
    dg[j] += dy[j] * xhat;
    db[j] += dy[j];
  }
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x_in, ffi::Buffer<ffi::F32> g_in,
                   ffi::Buffer<ffi::F32> b_in, ffi::ResultBuffer<ffi::F32> y_out,
                   ffi::ResultBuffer<ffi::F32> mean_out, ffi::ResultBuffer<ffi::F32> rstd_out,
                   float eps) {
  const auto dims = x_in.dimensions();
  if (dims.size() != 2) return ffi::Error::InvalidArgument("layernorm: x must be [N, D]");
  const int64_t N = dims[0], D = dims[1];
  if (g_in.element_count() != D || b_in.element_count() != D)
    return ffi::Error::InvalidArgument("layernorm: g and b must be [D]");
  const float* x = x_in.typed_data();
  const float* g = g_in.typed_data();
  const float* b = b_in.typed_data();
  float* y = y_out->typed_data();
  float* mean = mean_out->typed_data();
  float* rstd = rstd_out->typed_data();
  const int64_t blocks = (N + kRows - 1) / kRows;
  gpt_kernels::RunBlocks(pool, blocks, blocks, [=](int64_t blk) {
    for (int64_t r = blk * kRows; r < std::min(N, (blk + 1) * kRows); ++r)
      ForwardRow(x + r * D, g, b, y + r * D, D, eps, mean + r, rstd + r);
  });
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x_in, ffi::Buffer<ffi::F32> g_in,
                    ffi::Buffer<ffi::F32> mean_in, ffi::Buffer<ffi::F32> rstd_in,
                    ffi::Buffer<ffi::F32> dy_in, ffi::ResultBuffer<ffi::F32> dx_out,
                    ffi::ResultBuffer<ffi::F32> dg_out, ffi::ResultBuffer<ffi::F32> db_out) {
  const auto dims = x_in.dimensions();
  if (dims.size() != 2) return ffi::Error::InvalidArgument("layernorm: x must be [N, D]");
  const int64_t N = dims[0], D = dims[1];
  if (g_in.element_count() != D || mean_in.element_count() != N ||
      rstd_in.element_count() != N || dy_in.element_count() != N * D)
    return ffi::Error::InvalidArgument("layernorm: g [D], mean, rstd [N], dy [N, D]");
  const float* x = x_in.typed_data();
  const float* g = g_in.typed_data();
  const float* mean = mean_in.typed_data();
  const float* rstd = rstd_in.typed_data();
  const float* dy = dy_in.typed_data();
  float* dx = dx_out->typed_data();
  const int64_t blocks = (N + kRows - 1) / kRows;
  // Each block's partial [dg | db]: 2 D floats per block (64 blocks x 6 KB at the 30m shape).
  std::vector<float> partial(static_cast<size_t>(blocks * 2 * D), 0.f);
  float* part = partial.data();
  gpt_kernels::RunBlocks(pool, blocks, blocks, [=](int64_t blk) {
    float* dg = part + blk * 2 * D;
    for (int64_t r = blk * kRows; r < std::min(N, (blk + 1) * kRows); ++r)
      BackwardRow(x + r * D, g, dy + r * D, mean[r], rstd[r], D, dx + r * D, dg, dg + D);
  });
  float* dg = dg_out->typed_data();
  float* db = db_out->typed_data();
  std::fill(dg, dg + D, 0.f);
  std::fill(db, db + D, 0.f);
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const float* p = part + blk * 2 * D;
#pragma omp simd
    for (int64_t j = 0; j < D; ++j) {
      dg[j] += p[j];
      db[j] += p[D + j];
    }
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(GptLayerNormFwdF32, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x [N, D]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // g [D]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // b [D]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // y [N, D]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // mean [N]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // rstd [N]
                                  .Attr<float>("eps"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(GptLayerNormBwdF32, Backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x [N, D]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // g [D]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // mean [N]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // rstd [N]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dy [N, D]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dx [N, D]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dg [D]
                                  .Ret<ffi::Buffer<ffi::F32>>());  // db [D]
