// C++ test of the operators through the dispatcher, as libtorch users (and
// sanitizer builds) call them: each result is checked against plain ATen.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cstdio>
#include <vector>

namespace {

int failures = 0;

void expect(bool ok, const char* what) {
  std::printf("%s %s\n", ok ? "ok  " : "FAIL", what);
  if (!ok) ++failures;
}

std::vector<c10::IValue> call(const char* name, std::vector<c10::IValue> args) {
  auto op = c10::Dispatcher::singleton().findSchemaOrThrow(name, "");
  op.callBoxed(&args);
  return args;
}

void test_topk_sim() {
  at::manual_seed(0);
  auto q = at::randn({70, 16}, at::kDouble), c = at::randn({3000, 16}, at::kDouble);
  auto out = call("relkd::topk_sim", {q, c, int64_t(9), c10::IValue(), c10::IValue(),
                                      c10::IValue(), false, int64_t(0)});
  auto ref = at::topk(at::mm(q, c.t()), 9, 1);
  expect(at::allclose(out[0].toTensor(), std::get<0>(ref)), "topk_sim values match mm + topk");
  expect(at::equal(out[1].toTensor(), std::get<1>(ref)), "topk_sim indices match mm + topk");
}

void test_pair_dot() {
  auto a = at::randn({20, 8}, at::kDouble), b = at::randn({30, 8}, at::kDouble);
  auto idx = at::randint(-1, 30, {20, 4}, at::kLong);
  auto out = call("relkd::pair_dot", {a, b, idx})[0].toTensor();
  auto gathered = (a.unsqueeze(1) * b.index_select(0, idx.clamp_min(0).flatten()).view({20, 4, 8})).sum(2);
  auto ref = at::where(idx >= 0, gathered, at::zeros_like(gathered));
  expect(at::allclose(out, ref), "pair_dot matches the gathered product");
}

void test_pairwise_cckd() {
  auto x = at::randn({300, 12}, at::kDouble), z = at::randn({300, 10}, at::kDouble);
  x = x / x.norm(2, 1, true);
  z = z / z.norm(2, 1, true);
  auto coef = at::tensor({0.5, 0.3, 0.2}, at::kDouble);
  auto out = call("relkd::pairwise_loss",
                  {std::string("cckd"), x, z, c10::IValue(), c10::IValue(), c10::IValue(),
                   c10::IValue(), c10::IValue(), c10::IValue(), coef, false, false});
  auto phi = [&](const at::Tensor& u) { return 0.5 + 0.3 * u + 0.2 * u * u; };
  auto diff = phi(at::mm(x, x.t())) - phi(at::mm(z, z.t()));
  auto ref = (diff * diff).sum();
  expect(at::allclose(out[0].toTensor(), ref), "pairwise_loss(cckd) matches the N x N sum");
}

}  // namespace

int main() {
  test_topk_sim();
  test_pair_dot();
  test_pairwise_cckd();
  return failures == 0 ? 0 : 1;
}
