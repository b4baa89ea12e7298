/* Issue rates of the instructions the int8 kernels are made of, on this core (BENCHMARKS.md,
 * "Where the time goes"): independent chains in registers / L1, so only the execution pipes limit.
 *
 *   gcc -O2 -mavx2 benchmarks/isa_rates.c -o /tmp/isa_rates && /tmp/isa_rates
 *
 * Prints per-ns rates of vpaddd, vpmulld, vpmuldq, vpermd (and vpermd's latency), and the
 * multiply-adds per ns of the two exact int8 inner loops: the 7-bit route (vpmaddubsw, vpmaddwd by
 * ones, vpaddd per 32 multiply-adds) and the 8-bit route (vpmovsxbw, vpmaddwd, vpaddd per 16).
 * The machine is shared: run it a few times and read the best figures.
 */
#include <immintrin.h>
#include <stdio.h>
#include <stdint.h>
#include <time.h>
static double now(void){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec*1e-9;}
#define CHAINS8(stmt) do { _Pragma("GCC unroll 8") for (int j = 0; j < 8; j++) { stmt; } } while (0)
int main(void){
  static int8_t W[4096*8] __attribute__((aligned(64)));
  for(int i=0;i<4096*8;i++) W[i]=(int8_t)((i*7)%129-64);
  __m256i t[8]; for(int i=0;i<8;i++) t[i]=_mm256_set1_epi32(i);
  __m256i idx=_mm256_setr_epi32(0,1,2,3,4,5,6,7), ones=_mm256_set1_epi16(1);
  __m256i x=_mm256_set1_epi32(0x01020304);
  const long N=20000000; double t0, dt;
  for(int rep=0;rep<2;rep++){
    t0=now(); for(long n=0;n<N;n++) CHAINS8(t[j]=_mm256_add_epi32(t[j],idx)); dt=now()-t0;
    printf("vpaddd      %6.2f per ns\n",8.0*N/dt*1e-9);
    t0=now(); for(long n=0;n<N;n++) CHAINS8(t[j]=_mm256_mullo_epi32(t[j],idx)); dt=now()-t0;
    printf("vpmulld     %6.2f per ns\n",8.0*N/dt*1e-9);
    t0=now(); for(long n=0;n<N;n++) CHAINS8(t[j]=_mm256_mul_epi32(t[j],idx)); dt=now()-t0;
    printf("vpmuldq     %6.2f per ns\n",8.0*N/dt*1e-9);
    t0=now(); for(long n=0;n<N;n++) CHAINS8(t[j]=_mm256_permutevar8x32_epi32(t[j],idx)); dt=now()-t0;
    printf("vpermd      %6.2f per ns\n",8.0*N/dt*1e-9);
    __m256i a=idx; t0=now(); for(long n=0;n<N;n++) a=_mm256_permutevar8x32_epi32(t[0],a); dt=now()-t0;
    printf("vpermd latency %.2f ns\n",dt/N*1e9); t[1]=_mm256_add_epi32(t[1],a);
    t0=now();
    for(long n=0;n<N;n++){ const __m256i*wp=(const __m256i*)(W+(n&127)*256);
      CHAINS8(t[j]=_mm256_add_epi32(t[j],_mm256_madd_epi16(_mm256_maddubs_epi16(x,_mm256_load_si256(wp+j)),ones)));
      __asm__ volatile("":"+x"(x)); }
    dt=now()-t0; printf("7-bit route %6.1f multiply-adds per ns\n",8*32.0*N/dt*1e-9);
    t0=now();
    for(long n=0;n<N;n++){ const __m128i*wp=(const __m128i*)(W+(n&127)*256);
      CHAINS8(t[j]=_mm256_add_epi32(t[j],_mm256_madd_epi16(x,_mm256_cvtepi8_epi16(_mm_load_si128(wp+j)))));
      __asm__ volatile("":"+x"(x)); }
    dt=now()-t0; printf("8-bit route %6.1f multiply-adds per ns\n",8*16.0*N/dt*1e-9);
  }
  int s=0; for(int i=0;i<8;i++) s+=_mm256_extract_epi32(t[i],0);
  return s==12345;   /* keep the results alive */
}
