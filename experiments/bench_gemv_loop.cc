// gemv.cc's inner loops alone, single thread, against a plain read of the same bytes: the
// kernel-level A/B that experiments/bench_gemv.py (whole JAX calls, both cores) cannot give on a
// loaded machine. Time is the thread's CPU time (CLOCK_THREAD_CPUTIME_ID: time descheduled by
// other processes does not count, memory contention still does); variants run interleaved, 21
// rounds, best kept; "x read" is the ratio to a plain AVX-512 read of the same matrices in the same
// round, so 1.00 means the loop streams weights as fast as memory gives them to this core.
// Matrices: one decode step of 117M (12 x c_attn, attn c_proj, c_fc, mlp c_proj, then [50257, 768]).
//
//   J=$(python -c "import jax; print(jax.ffi.include_dir())")
//   build() { g++ -O3 -march=native -mprefer-vector-width=512 -std=c++17 -w -I$J \
//               -DKERNEL="\"$1\"" -DWT=$2 experiments/bench_gemv_loop.cc -o $3; }
//   build $PWD/gpt/kernels/gemv.cc int8_t /tmp/loop_new && /tmp/loop_new 1    # rows = 1
//   git show HEAD~1:gpt/kernels/gemv.cc > /tmp/old.cc && build /tmp/old.cc int8_t /tmp/loop_old
// WT: float (float32), uint16_t (bfloat16; weights are normal numbers, as trained ones are:
// denormal bf16 would run ~14x slower through the FMAs), int8_t (+ the int8-activation VNNI loop
// where the kernel has it: -DVNNI=1; + the int16-activation vpdpwssd loop: -DVNNI=2).
// GPT_GEMV_ROWWISE=0 / 1 in the environment picks gemv.cc's loop order below 4 rows, as in the library.
// -DBF16DOT=1 (WT=uint16_t, a CPU with AVX512-BF16): + bf16 activations through the vdpbf16ps loop
// (BlockBf16), beside the widening loop's float activations.
// -DHUGEPAGES=1: the weights twice, on 4 KB pages (MADV_NOHUGEPAGE) and on 2 MB pages
// (MADV_HUGEPAGE before they are written), and the plain read and the float-activation loop on
// each, interleaved (what gemv.cc's hugepages::Advise buys; medians of 21 rounds are printed too).
#include KERNEL
#include <time.h>

#include <sys/mman.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>

#ifndef VNNI
#define VNNI 0
#endif
#ifndef HUGEPAGES
#define HUGEPAGES 0
#endif
#ifndef BF16DOT
#define BF16DOT 0
#endif

namespace {
double CpuNow() {
  timespec t;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
  return t.tv_sec + 1e-9 * t.tv_nsec;
}

struct Matrix { int64_t N, K; WT* w; float* scale; };

WT RandomWeight() {
  if (sizeof(WT) == 2) return static_cast<WT>(0x3F00 | (rand() & 0xFF));  // bf16 in [0.5, 2)
  return static_cast<WT>(rand() % 100 - 50);
}

float PlainRead(const std::vector<Matrix>& ms) {
  __m512i a = _mm512_setzero_si512(), b = a;
  for (const auto& m : ms) {
    const __m512i* p = reinterpret_cast<const __m512i*>(m.w);
    const int64_t lines = m.N * m.K * sizeof(WT) / 64;
    for (int64_t i = 0; i + 2 <= lines; i += 2) {
      a = _mm512_add_epi8(a, _mm512_load_si512(p + i));
      b = _mm512_add_epi8(b, _mm512_load_si512(p + i + 1));
    }
  }
  return static_cast<float>(_mm512_reduce_add_epi32(_mm512_add_epi32(a, b)));
}
}  // namespace

int main(int argc, char** argv) {
  const int B = argc > 1 ? atoi(argv[1]) : 1;
  MaxThreads();  // reads GPT_GEMV_ROWWISE, as each kernel call does: GPT_GEMV_ROWWISE=0 times the tiled order
  const int64_t d = 768, shapes[4][2] = {{3 * d, d}, {d, d}, {4 * d, d}, {d, 4 * d}};
  std::vector<Matrix> ms;
  for (int l = 0; l < 12; ++l)
    for (auto& s : shapes) ms.push_back({s[0], s[1], nullptr, nullptr});
  ms.push_back({50257, d, nullptr, nullptr});
  size_t bytes = 0;
#if HUGEPAGES
  {  // its own scope: the names below are the other mode's too
  // One 2 MB-aligned mapping per set: 4 KB pages for ms, 2 MB pages for hp.
  std::vector<Matrix> hp = ms;
  auto place = [](std::vector<Matrix>& set, bool huge) {
    size_t total = 0;
    for (auto& m : set) total += (m.N * m.K * sizeof(WT) + 4095) / 4096 * 4096;
    const uintptr_t align = uintptr_t{2} << 20;
    char* base = static_cast<char*>(mmap(nullptr, total + align, PROT_READ | PROT_WRITE,
                                         MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
    base = reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(base) + align - 1) & ~(align - 1));
    madvise(base, total, huge ? MADV_HUGEPAGE : MADV_NOHUGEPAGE);
    for (auto& m : set) {
      m.w = reinterpret_cast<WT*>(base);
      base += (m.N * m.K * sizeof(WT) + 4095) / 4096 * 4096;
    }
  };
  place(ms, false);
  place(hp, true);
  for (size_t i = 0; i < ms.size(); ++i) {
    for (int64_t j = 0; j < ms[i].N * ms[i].K; ++j) ms[i].w[j] = hp[i].w[j] = RandomWeight();
    ms[i].scale = hp[i].scale = static_cast<float*>(aligned_alloc(64, (ms[i].N * 4 + 63) / 64 * 64));
    for (int64_t j = 0; j < ms[i].N; ++j) ms[i].scale[j] = 0.01f;
    bytes += ms[i].N * ms[i].K * sizeof(WT);
  }
  std::vector<float> x(B * 4 * d, 0.5f), y(B * 50257);
  const char* names[] = {"plain read, 4 KB pages", "plain read, 2 MB pages",
                         "float activations, 4 KB pages", "float activations, 2 MB pages"};
  std::vector<double> times[4];
  volatile float sink = 0;
  for (int round = 0; round < 21; ++round)
    for (int v = 0; v < 4; ++v) {
      const auto& set = v % 2 ? hp : ms;
      const double t0 = CpuNow();
      if (v < 2) sink = sink + PlainRead(set);
      else for (const auto& m : set) Block<WT>(x.data(), m.w, m.scale, y.data(), B, m.K, m.N, 0, m.N);
      times[v].push_back(CpuNow() - t0);
    }
  printf("| loop | rows | MB | median ms (thread CPU) | best ms | GB/s (median) | x read on 4 KB pages (median) |\n"
         "|---|---|---|---|---|---|---|\n");
  std::vector<double> med(4);
  for (int v = 0; v < 4; ++v) {
    std::sort(times[v].begin(), times[v].end());
    med[v] = times[v][times[v].size() / 2];
  }
  for (int v = 0; v < 4; ++v)
    printf("| %s | %d | %.0f | %.2f | %.2f | %.1f | %.2f |\n", names[v], B, bytes / 1e6, med[v] * 1e3,
           times[v][0] * 1e3, bytes / med[v] / 1e9, med[v] / med[0]);
  return 0;
  }
#endif
  for (auto& m : ms) {
    m.w = static_cast<WT*>(aligned_alloc(64, (m.N * m.K * sizeof(WT) + 63) / 64 * 64));
    for (int64_t i = 0; i < m.N * m.K; ++i) m.w[i] = RandomWeight();
    m.scale = static_cast<float*>(aligned_alloc(64, (m.N * 4 + 63) / 64 * 64));
    for (int64_t i = 0; i < m.N; ++i) m.scale[i] = 0.01f;
    bytes += m.N * m.K * sizeof(WT);
  }
  std::vector<float> x(B * 4 * d, 0.5f), y(B * 50257), xs(B);
  std::vector<int8_t> u(B * 4 * d);
  std::vector<int32_t> qsum(B);
  std::vector<int16_t> q16(B * 4 * d);
  std::vector<uint16_t> xh(B * 4 * d, 0x3F00);  // bf16 0.5, as x
  const char* names[] = {"plain read", "float activations",
                         BF16DOT ? "bf16 activations (vdpbf16ps)" : "int8 activations (VNNI)",
                         "int16 activations (VNNI vpdpwssd)"};
  const int variants = VNNI ? 2 + VNNI : 2 + BF16DOT;
  double best[4] = {1e9, 1e9, 1e9, 1e9};
  volatile float sink = 0;
  for (int round = 0; round < 21; ++round)
    for (int v = 0; v < variants; ++v) {
      const double t0 = CpuNow();
      if (v == 0) sink = sink + PlainRead(ms);
      for (const auto& m : ms) {
        if (v == 1) Block<WT>(x.data(), m.w, m.scale, y.data(), B, m.K, m.N, 0, m.N);
#if VNNI
        if (v == 2) {
          const int64_t k_pad = (m.K + 63) / 64 * 64;
          for (int b = 0; b < B; ++b)
            xs[b] = QuantizeRow(x.data() + b * m.K, m.K, u.data() + b * k_pad, k_pad, qsum.data() + b);
          BlockVnni(u.data(), k_pad, qsum.data(), xs.data(), m.w, m.scale, y.data(), B, m.K, m.N, 0, m.N);
        }
#endif
#if BF16DOT
        if (v == 2) BlockBf16(xh.data(), m.w, m.scale, y.data(), B, m.K, m.N, 0, m.N);
#endif
#if VNNI >= 2
        if (v == 3) {
          const int64_t k_pad = (m.K + 31) / 32 * 32;
          for (int b = 0; b < B; ++b) xs[b] = QuantizeRow16(x.data() + b * m.K, m.K, q16.data() + b * k_pad, k_pad);
          BlockA16(q16.data(), k_pad, xs.data(), m.w, m.scale, y.data(), B, m.K, m.N, 0, m.N);
        }
#endif
      }
      best[v] = std::min(best[v], CpuNow() - t0);
    }
  printf("| loop | rows | MB | best ms (thread CPU) | GB/s | x read |\n|---|---|---|---|---|---|\n");
  for (int v = 0; v < variants; ++v)
    printf("| %s | %d | %.0f | %.2f | %.1f | %.2f |\n", names[v], B, bytes / 1e6, best[v] * 1e3,
           bytes / best[v] / 1e9, best[v] / best[0]);
}
