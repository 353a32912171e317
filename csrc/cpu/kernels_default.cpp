// The chunk kernels for the baseline instruction set of the build.
#define DISCLOSS_CPU_ISA generic
#include "kernels.h"
