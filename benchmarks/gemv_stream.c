/* Streaming floor of the recurrent step: one int8 GEMV over an R x K weight matrix that does not fit
 * in L2 (2048 x 512 = 1 MiB, the W_h of a 512-unit LSTM), u8 x s8 vpmaddubsw + vpmaddwd, in the
 * natural row layout and in the packed [R/8][K/32][8][32] layout with a software prefetch.
 * It bounds what the recurrent kernel can reach per time step on one core (BENCHMARKS.md).
 *
 *   gcc -O2 -march=native benchmarks/gemv_stream.c -o /tmp/gemv_stream && /tmp/gemv_stream 2048 512 1024
 *   (arguments: rows, K, prefetch distance in bytes (0: none))
 */
#include <immintrin.h>
#include <stdio.h>
#include <stdint.h>
#include <stdlib.h>
#include <time.h>
static double now(){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec*1e-9;}
#define Z(i) __m256i c##i=_mm256_setzero_si256();
#define M(i,p) c##i=_mm256_add_epi32(c##i,_mm256_madd_epi16(_mm256_maddubs_epi16(xv,_mm256_loadu_si256((const __m256i*)(p))),ones));
#define SUM(i) out[o+i]=_mm256_extract_epi32(c##i,0)+_mm256_extract_epi32(c##i,7);
int main(int argc,char**argv){ int R=atoi(argv[1]),K=atoi(argv[2]); int pf=argc>3?atoi(argv[3]):0;
 int8_t*W=aligned_alloc(64,(long)R*K); uint8_t*x=aligned_alloc(64,K); for(long i=0;i<(long)R*K;i++)W[i]=(i*7)%64; for(int i=0;i<K;i++)x[i]=i;
 int32_t*out=malloc(4*R); __m256i ones=_mm256_set1_epi16(1); int reps=20000000/R/K*100+1; double t;
 t=now(); for(int rep=0;rep<reps;rep++) for(int o=0;o<R;o+=8){ Z(0)Z(1)Z(2)Z(3)Z(4)Z(5)Z(6)Z(7) const int8_t*w=W+(long)o*K;
   for(int k=0;k<K;k+=32){ __m256i xv=_mm256_load_si256((const __m256i*)(x+k)); M(0,w+k)M(1,w+K+k)M(2,w+2*K+k)M(3,w+3*K+k)M(4,w+4*K+k)M(5,w+5*K+k)M(6,w+6*K+k)M(7,w+7*K+k)}
   SUM(0)SUM(1)SUM(2)SUM(3)SUM(4)SUM(5)SUM(6)SUM(7)}
 t=now()-t; printf("natural R=%d K=%d: %.2f us/gemv %.1f GB/s\n",R,K,t/reps*1e6,(double)R*K*reps/t/1e9);
 // packed: [R/8][K/32][8][32]
 t=now(); for(int rep=0;rep<reps;rep++) for(int o=0;o<R;o+=8){ Z(0)Z(1)Z(2)Z(3)Z(4)Z(5)Z(6)Z(7) const int8_t*w=W+(long)o*K;
   for(int k=0;k<K;k+=32){ __m256i xv=_mm256_load_si256((const __m256i*)(x+k)); const int8_t*p=w+k*8; if(pf) _mm_prefetch((const char*)(p+pf),_MM_HINT_T0),_mm_prefetch((const char*)(p+pf+64),_MM_HINT_T0),_mm_prefetch((const char*)(p+pf+128),_MM_HINT_T0),_mm_prefetch((const char*)(p+pf+192),_MM_HINT_T0);
     M(0,p)M(1,p+32)M(2,p+64)M(3,p+96)M(4,p+128)M(5,p+160)M(6,p+192)M(7,p+224)}
   SUM(0)SUM(1)SUM(2)SUM(3)SUM(4)SUM(5)SUM(6)SUM(7)}
 t=now()-t; printf("packed  R=%d K=%d: %.2f us/gemv %.1f GB/s (pf %d)\n",R,K,t/reps*1e6,(double)R*K*reps/t/1e9,pf);
 return out[3]&0;}
