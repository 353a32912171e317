// The chunk kernels for x86-64 with AVX-512 (F, BW, VL, DQ) and FMA, 512-bit
// vectors preferred. loss.cpp takes only the pair step from this copy when
// the processor has them (the pixel passes measured slower with 512-bit
// vectors). As in kernels_avx2.cpp the target pragma comes before every
// include.
#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC target("avx2,fma,avx512f,avx512bw,avx512vl,avx512dq,prefer-vector-width=512")
#endif
#define DISCLOSS_CPU_ISA avx512
#define DISCLOSS_CPU_AVX2 1
#include "kernels.h"
