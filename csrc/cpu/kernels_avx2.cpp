// The chunk kernels for x86-64 with AVX2 and FMA, chosen at run time when the
// processor has them. The target pragma comes before every include so that
// all code in this file is compiled for that target; kernels.h keeps torch out.
#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC target("avx2,fma")
#endif
#define DISCLOSS_CPU_ISA avx2
#define DISCLOSS_CPU_AVX2 1
#include "kernels.h"
