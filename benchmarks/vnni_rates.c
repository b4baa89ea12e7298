/* Multiply-add rates of the VNNI inner loops on this core (BENCHMARKS.md, the per-CPU floors):
 * vpdpbusd ymm (AVX-VNNI / AVX512-VNNI+VL, the x86_vnni kernel family) and zmm (AVX512-VNNI, the
 * avx512_vnni family), each in 8 independent accumulator chains fed from L1 like the kernels'
 * outer-product step (a broadcast u8 quad against 32 / 64 weight bytes).
 *
 *   gcc -O2 -mavx2 -mavxvnni -mavx512f -mavx512bw -mavx512vl -mavx512vnni \
 *       benchmarks/vnni_rates.c -o /tmp/vnni_rates && /tmp/vnni_rates
 *
 * Only on a CPU with AVX512-VNNI (the zmm loop is skipped without it, checked at run time).
 * The machine is shared: run it a few times and read the best figures.
 */
#include <immintrin.h>
#include <stdio.h>
#include <stdint.h>
#include <time.h>
static double now(void){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec*1e-9;}
#define CHAINS8(stmt) do { _Pragma("GCC unroll 8") for (int j = 0; j < 8; j++) { stmt; } } while (0)
int main(void){
  static int8_t W[4096*16] __attribute__((aligned(64)));
  for(int i=0;i<4096*16;i++) W[i]=(int8_t)((i*7)%255-127);
  const long N=20000000; double t0, dt;
  int have512 = __builtin_cpu_supports("avx512vnni");
  __m256i y[8]; for(int i=0;i<8;i++) y[i]=_mm256_set1_epi32(i);
  __m512i z[8]; for(int i=0;i<8;i++) z[i]=_mm512_set1_epi32(i);
  __m256i xy=_mm256_set1_epi32(0x01020304); __m512i xz=_mm512_set1_epi32(0x01020304);
  for(int rep=0;rep<3;rep++){
    t0=now();
    for(long n=0;n<N;n++){ const __m256i*wp=(const __m256i*)(W+(n&127)*256);
      CHAINS8(y[j]=_mm256_dpbusd_epi32(y[j],xy,_mm256_load_si256(wp+j)));
      __asm__ volatile("":"+x"(xy)); }
    dt=now()-t0; printf("vpdpbusd ymm %6.1f multiply-adds per ns\n",8*32.0*N/dt*1e-9);
    if(have512){
      t0=now();
      for(long n=0;n<N;n++){ const __m512i*wp=(const __m512i*)(W+(n&63)*512);
        CHAINS8(z[j]=_mm512_dpbusd_epi32(z[j],xz,_mm512_load_si512(wp+j)));
        __asm__ volatile("":"+v"(xz)); }
      dt=now()-t0; printf("vpdpbusd zmm %6.1f multiply-adds per ns\n",8*64.0*N/dt*1e-9);
    }
  }
  int s=0; for(int i=0;i<8;i++) s+=_mm256_extract_epi32(y[i],0)+_mm512_reduce_add_epi32(z[i]);
  return s==12345;   /* keep the results alive */
}
