// Two versions of gemv.cc's float-activation `Block` loop A/B, in one binary: each version in its
// own namespace, run interleaved on one thread over two copies of one 117M decode step's matrices
// (so that neither reads the other's weights from cache), timed in thread CPU time beside a plain
// read; prints medians and the per-round time ratio A/B (> 1: B is faster) and the largest
// relative difference of their outputs. How gemv-read (session 6) tried loop variants under load.
//
//   cut() { sed '/^extern "C"/,$d; /^\/\/ How many weight buffers/,$d' $1 | grep -v '#include "lanes.h"\|#include "pool.h"\|#include "xla/ffi'; }
//   cut gpt/kernels/gemv.cc > /tmp/va.cc && cut /tmp/variant.cc > /tmp/vb.cc
//   J=$(python -c "import jax; print(jax.ffi.include_dir())")
//   g++ -O3 -march=native -mprefer-vector-width=512 -std=c++17 -w -I$J -I$PWD/gpt/kernels \
//       -DVA=/tmp/va.cc -DVB=/tmp/vb.cc -DWT=int8_t experiments/bench_gemv_ab.cc -o /tmp/ab && /tmp/ab 1 15
// (-DA16B: B is the int16-activation loop, BlockA16, with its per-call quantization; -DHUGE=1:
// the weights on 2 MB pages.) Arguments: rows (default 1), rounds (default 15).
#include <immintrin.h>
#include <algorithm>
#include <cmath>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>
#include <condition_variable>
#include <cstdio>
#include <deque>
#include <mutex>
#include <unordered_set>
#include <utility>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <time.h>
#include <cstdio>
#include "lanes.h"
#include "pool.h"
#define GPT_STR2(x) #x
#define GPT_STR(x) GPT_STR2(x)
namespace v0 {
#include GPT_STR(VA)
}
namespace v1 {
#include GPT_STR(VB)
}
#ifndef HUGE
#define HUGE 0
#endif
double CpuNow(){timespec t;clock_gettime(CLOCK_THREAD_CPUTIME_ID,&t);return t.tv_sec+1e-9*t.tv_nsec;}
struct Matrix{int64_t N,K;WT* w;float* scale;};
std::vector<Matrix> Make(){
  const int64_t d=768,shapes[4][2]={{3*d,d},{d,d},{4*d,d},{d,4*d}};
  std::vector<Matrix> ms;
  for(int l=0;l<12;++l) for(auto&s:shapes) ms.push_back({s[0],s[1],nullptr,nullptr});
  ms.push_back({50257,d,nullptr,nullptr});
  size_t total=0; for(auto&m:ms) total+=(m.N*m.K*sizeof(WT)+4095)/4096*4096;
  size_t al=2<<20; char* base=(char*)mmap(nullptr,total+al,PROT_READ|PROT_WRITE,MAP_PRIVATE|MAP_ANONYMOUS,-1,0);
  base=(char*)(((uintptr_t)base+al-1)&~uintptr_t(al-1)); madvise(base,total,HUGE?MADV_HUGEPAGE:MADV_NOHUGEPAGE);
  size_t off=0;
  for(auto&m:ms){ m.w=(WT*)(base+off); off+=(m.N*m.K*sizeof(WT)+4095)/4096*4096;
    for(int64_t i=0;i<m.N*m.K;++i) m.w[i]=(WT)(rand()%100-50);
    m.scale=(float*)aligned_alloc(64,(m.N*4+63)/64*64); for(int64_t i=0;i<m.N;++i) m.scale[i]=0.01f;}
  return ms;}
float PlainRead(const std::vector<Matrix>& ms){
  __m512i a=_mm512_setzero_si512(),b=a;
  for(const auto&m:ms){const __m512i* p=(const __m512i*)m.w; const int64_t lines=m.N*m.K*sizeof(WT)/64;
    for(int64_t i=0;i+2<=lines;i+=2){a=_mm512_add_epi8(a,_mm512_load_si512(p+i));b=_mm512_add_epi8(b,_mm512_load_si512(p+i+1));}}
  return (float)_mm512_reduce_add_epi32(_mm512_add_epi32(a,b));}
int main(int argc,char**argv){
  const int B=argc>1?atoi(argv[1]):1; const int rounds=argc>2?atoi(argv[2]):15;
  auto ms=Make(); auto ms2=Make();  // two copies: each variant reads its own (no cache reuse)
  size_t bytes=0; for(auto&m:ms) bytes+=m.N*m.K*sizeof(WT);
  std::vector<float> x(B*4*768,0.5f),y0(B*50257),y1(B*50257);
  for(auto&v:x) v=(rand()%1000)/1000.0f-0.5f;
  const char* names[]={"read","A","B"};
  std::vector<double> t[3]; volatile float sink=0; double maxdiff=0;
  for(int round=0;round<rounds;++round) for(int v=0;v<3;++v){
    auto& m_=(round%2)?ms:ms2; double t0=CpuNow();
    if(v==0) sink=sink+PlainRead(m_);
    else if(v==1) for(auto&m:m_) v0::Block<WT>(x.data(),m.w,m.scale,y0.data(),B,m.K,m.N,0,m.N);
    else for(auto&m:m_) {
#ifdef A16B
      static std::vector<int16_t> q(4*768*8+64); std::vector<float> xs(B); const int64_t k_pad=(m.K+31)/32*32;
      for(int b=0;b<B;++b) xs[b]=v1::QuantizeRow16(x.data()+b*m.K,m.K,q.data()+b*k_pad,k_pad);
      v1::BlockA16(q.data(),k_pad,xs.data(),m.w,m.scale,y1.data(),B,m.K,m.N,0,m.N);
#else
      v1::Block<WT>(x.data(),m.w,m.scale,y1.data(),B,m.K,m.N,0,m.N);
#endif
    }
    t[v].push_back(CpuNow()-t0);}
  for(int i=0;i<B*50257;++i) maxdiff=std::max(maxdiff,(double)std::fabs(y0[i]-y1[i])/(std::fabs(y0[i])+1e-3));
  double med[3];
  for(int v=0;v<3;++v){auto s=t[v];std::sort(s.begin(),s.end()); med[v]=s[s.size()/2]; printf("%-5s rows %d median %.2f ms (%.1f GB/s, x read %.2f) best %.2f ms\n",names[v],B,med[v]*1e3,bytes/med[v]/1e9,med[v]/med[0],s[0]*1e3);}
  // paired ratio per round
  std::vector<double> r; for(size_t i=0;i<t[1].size();++i) r.push_back(t[1][i]/t[2][i]); std::sort(r.begin(),r.end());
  printf("A/B time ratio per round: median %.3f (min %.3f max %.3f); max rel diff of head outputs %.2e\n",r[r.size()/2],r[0],r.back(),maxdiff);
}
