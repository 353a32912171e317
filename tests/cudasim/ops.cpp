// The simulator's library: the discloss schemas again as discloss_cudasim::*
// (their kernels are csrc/cuda's, registered on CPU by the *_sim.cpp units)
// and the ops that steer the simulator from the tests.
#include <torch/library.h>

#include <sstream>
#include <vector>

#include "../../csrc/schemas.h"
#include "cudasim.h"

namespace {

void configure(int64_t sm_count, c10::string_view order, int64_t seed) {
  TORCH_CHECK(sm_count >= 1 && sm_count <= 1024, "sm_count: expected 1..1024, got ", sm_count);
  cudasim::Order o;
  if (order == "forward") {
    o = cudasim::Order::Forward;
  } else if (order == "reverse") {
    o = cudasim::Order::Reverse;
  } else if (order == "random") {
    o = cudasim::Order::Random;
  } else {
    TORCH_CHECK(false, "order: expected 'forward', 'reverse' or 'random', got '", order, "'");
  }
  cudasim::config().sm_count = static_cast<int>(sm_count);
  cudasim::config().order = o;
  cudasim::config().seed = static_cast<uint64_t>(seed);
}

// One line per launch site: "kernel@file:line count".
std::string launch_log() {
  std::ostringstream s;
  for (const auto& [site, n] : cudasim::launch_log()) s << site << " " << n << "\n";
  return s.str();
}

void reset_launch_log() { cudasim::reset_launch_log(); }

void set_pruning(bool enabled) { cudasim::config().prune = enabled; }

// [push (tile, cluster) pairs, pairs of means, push gradient (pixel,
// cluster) pairs] skipped since the last reset.
std::vector<int64_t> skipped() {
  return {cudasim::skipped(cudasim::Skipped::PushTiles), cudasim::skipped(cudasim::Skipped::Pairs),
          cudasim::skipped(cudasim::Skipped::PushPixels)};
}

void reset_skipped() { cudasim::reset_skipped(); }

}  // namespace

TORCH_LIBRARY(discloss_cudasim, m) {
  discloss::define_ops(m);
  m.def("configure(int sm_count, str order, int seed) -> ()", &configure);
  m.def("launch_log() -> str", &launch_log);
  m.def("reset_launch_log() -> ()", &reset_launch_log);
  m.def("set_pruning(bool enabled) -> ()", &set_pruning);
  m.def("skipped() -> int[]", &skipped);
  m.def("reset_skipped() -> ()", &reset_skipped);
}
