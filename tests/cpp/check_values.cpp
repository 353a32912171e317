// Runs discloss::forward and discloss::backward through the dispatcher on
// DESIGN §1's check values (B=1, E=2, pixels (0,0), (2,0), (1,1), labels
// 1, 1, 2), on the slot map of sparse ids, on a hand-computed unlabeled push
// and on a finite-difference check of the gradient. Exit code 0 = pass.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/torch.h>

#include <cmath>
#include <cstdio>
#include <optional>
#include <string_view>
#include <tuple>

namespace {

using Forward = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                           at::Tensor>(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                       const std::optional<at::Tensor>&, int64_t, double, double, int64_t, double,
                                       double, double, double, std::optional<int64_t>, c10::string_view,
                                       c10::string_view);
using SlotMap = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, int64_t, std::optional<int64_t>);
using Backward = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                            const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const at::Tensor&, double, double, int64_t, double, double, double, double,
                            std::optional<int64_t>, c10::string_view, c10::string_view);
const std::optional<at::Tensor> kNoMap;

int failures = 0;

void expect_near(const char* what, double got, double want, double tol) {
  const bool ok = std::fabs(got - want) <= tol;
  std::printf("%s %-32s got %.10f want %.10f\n", ok ? "ok  " : "FAIL", what, got, want);
  if (!ok) ++failures;
}

}  // namespace

int main() {
  auto forward = c10::Dispatcher::singleton().findSchemaOrThrow("discloss::forward", "").typed<Forward>();
  const auto opts = torch::TensorOptions().dtype(torch::kFloat64);
  const at::Tensor x = torch::tensor({0.0, 2.0, 1.0, 0.0, 0.0, 1.0}, opts).reshape({1, 2, 3});
  const at::Tensor labels = torch::tensor({1, 1, 2}, torch::kLong).reshape({1, 3});

  struct Case {
    const char* name;
    int64_t norm;
    const char* normalization;
    double var, dist, reg;
  };
  const Case cases[] = {
      {"paper L1", 1, "paper", 0.125, 4.0, 1.5},
      {"paper L2", 2, "paper", 0.125, 4.0, 1.2071067811865475},
      {"chainer L1 (K=2)", 1, "chainer", 0.125, 4.0, 1.5},
  };
  for (const Case& c : cases) {
    const int64_t K = std::string_view(c.normalization) == "chainer" ? 2 : 3;
    const std::optional<int64_t> ignore = std::string_view(c.normalization) == "chainer"
                                              ? std::nullopt
                                              : std::optional<int64_t>(0);
    auto out = forward.call(x, labels, kNoMap, kNoMap, K, 0.5, 1.5, c.norm, 1.0, 1.0, 1.0, 0.0, ignore,
                            c.normalization, "mean");
    std::string n = c.name;
    expect_near((n + " var").c_str(), std::get<0>(out).item<double>(), c.var, 1e-12);
    expect_near((n + " dist").c_str(), std::get<1>(out).item<double>(), c.dist, 1e-12);
    expect_near((n + " reg").c_str(), std::get<2>(out).item<double>(), c.reg, 1e-12);
  }

  // The same values with ids 7 and 2^40 (a sorted slot table, K = 2).
  auto slot_map = c10::Dispatcher::singleton().findSchemaOrThrow("discloss::slot_map", "").typed<SlotMap>();
  const at::Tensor sparse = torch::tensor({int64_t(1) << 40, int64_t(1) << 40, int64_t(7)}, torch::kLong).reshape({1, 3});
  auto map = slot_map.call(sparse, 2, 0);
  expect_near("slot_map num_ids", double(std::get<1>(map).item<int64_t>()), 2, 0);
  expect_near("slot_map first id", double(std::get<0>(map)[0][0].item<int64_t>()), 7, 0);
  auto sp = forward.call(x, sparse, std::get<0>(map), std::get<1>(map), 2, 0.5, 1.5, 2, 1.0, 1.0, 1.0, 0.0, 0, "paper",
                         "mean");
  expect_near("sparse ids var", std::get<0>(sp).item<double>(), 0.125, 1e-12);
  expect_near("sparse ids dist", std::get<1>(sp).item<double>(), 4.0, 1e-12);
  expect_near("sparse ids reg", std::get<2>(sp).item<double>(), 1.2071067811865475, 1e-12);

  // Unlabeled push, 1D: cluster {0, 2} (mean 1), unlabeled pixels 1.5 and 4,
  // delta_d = 1: push = 1/(C N_U) * ([1 - 0.5]+^2 + 0) = 0.125.
  const at::Tensor x1 = torch::tensor({0.0, 2.0, 1.5, 4.0}, opts).reshape({1, 1, 4});
  const at::Tensor l1 = torch::tensor({1, 1, 0, 0}, torch::kLong).reshape({1, 4});
  auto pu = forward.call(x1, l1, kNoMap, kNoMap, 2, 10.0, 1.0, 2, 1.0, 1.0, 0.0, 1.0, 0, "paper", "mean");
  expect_near("unlabeled push", std::get<3>(pu).item<double>(), 0.125, 1e-12);

  // Gradient of var + dist + reg against central differences.
  auto total = [&](const at::Tensor& e) {
    auto out = forward.call(e, labels, kNoMap, kNoMap, 3, 0.5, 1.5, 2, 1.0, 1.0, 1.0, 0.0, 0, "paper", "mean");
    return (std::get<0>(out) + std::get<1>(out) + std::get<2>(out)).item<double>();
  };
  auto out = forward.call(x, labels, kNoMap, kNoMap, 3, 0.5, 1.5, 2, 1.0, 1.0, 1.0, 0.0, 0, "paper", "mean");
  const at::Tensor one = torch::ones({}, opts);
  const at::Tensor grad = c10::Dispatcher::singleton()
                              .findSchemaOrThrow("discloss::backward", "")
                              .typed<Backward>()
                              .call(one, one, one, one, x, labels, kNoMap, kNoMap, std::get<4>(out), std::get<5>(out),
                                    std::get<6>(out), std::get<7>(out), 0.5, 1.5, 2, 1.0, 1.0, 1.0, 0.0, 0, "paper",
                                    "mean");
  const double h = 1e-6;
  for (int64_t i = 0; i < x.numel(); ++i) {
    at::Tensor up = x.clone(), down = x.clone();
    up.view({-1})[i] += h;
    down.view({-1})[i] -= h;
    const double fd = (total(up) - total(down)) / (2 * h);
    expect_near(("grad element " + std::to_string(i)).c_str(), grad.view({-1})[i].item<double>(), fd, 1e-6);
  }
  std::printf("%d failure(s)\n", failures);
  return failures == 0 ? 0 : 1;
}
