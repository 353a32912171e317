// csrc/cuda/slot_map.cu compiled as plain C++ on the CUDA simulator.
#include "cudasim.h"
// (cudasim.h first: it defines the CUDA language for what follows)
#include "../../csrc/cuda/slot_map.cu"
