// The chunk kernels for x86-64 with AVX-512 (F, BW, VL, DQ) and AVX512-BF16,
// 256-bit vectors preferred. loss.cpp takes pass 3 (the gradient) of
// bfloat16 inputs from this copy when the processor has them: the
// gradient's rounding to bfloat16 is one vcvtne2ps2bf16 per 16 values
// (kernels.h, plane_grad). As in kernels_avx2.cpp the target pragma comes
// before every include.
#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC target("avx2,fma,avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,prefer-vector-width=256")
#define DISCLOSS_CPU_BF16 1
#endif
#define DISCLOSS_CPU_ISA avx512bf16
#define DISCLOSS_CPU_AVX2 1
#include "kernels.h"
