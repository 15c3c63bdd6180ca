// C++ test of the op library as torch.ops.load_library() sees it: dlopen the
// shared library, then call its ops through the dispatcher and compare them
// with plain ATen formulas.
//
//   test_ops /path/to/libsit_ext.so
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <dlfcn.h>

#include <array>
#include <cmath>
#include <cstdio>
#include <functional>
#include <string>
#include <tuple>

namespace {

int failures = 0;

void check(bool ok, const std::string& what) {
  std::printf("%s %s\n", ok ? "ok  " : "FAIL", what.c_str());
  if (!ok) ++failures;
}

bool close(const at::Tensor& a, const at::Tensor& b, double tol = 1e-5) {
  return a.sizes() == b.sizes() && at::allclose(a, b, tol, tol);
}

bool throws(const std::function<void()>& fn, const std::string& fragment) {
  try {
    fn();
  } catch (const c10::Error& e) {
    return std::string(e.what()).find(fragment) != std::string::npos;
  }
  return false;
}

c10::OperatorHandle op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "");
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s libsit_ext.so\n", argv[0]);
    return 2;
  }
  if (dlopen(argv[1], RTLD_NOW | RTLD_GLOBAL) == nullptr) {
    std::fprintf(stderr, "cannot load %s: %s\n", argv[1], dlerror());
    return 2;
  }
  at::manual_seed(0);
  const at::Tensor x = at::randn({5, 3, 7}), noise = at::randn({5, 3, 7}),
                   pred = at::randn({5, 3, 7});
  const at::Tensor t = at::rand({5});
  const at::Tensor tb = t.view({5, 1, 1});
  const double h = M_PI / 2;

  using Pair = std::tuple<at::Tensor, at::Tensor>;
  auto interpolant = op("sit_ext::interpolant")
                         .typed<Pair(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                     int64_t, std::array<bool, 2>)>();
  auto [xt, ut] = interpolant.call(x, noise, t, 1, {true, true});
  check(close(xt, at::cos(h * tb) * x + at::sin(h * tb) * noise), "interpolant x_t (cosine)");
  check(close(ut, h * (at::cos(h * tb) * noise - at::sin(h * tb) * x)), "interpolant u_t (cosine)");

  auto velocity_mse = op("sit_ext::velocity_mse")
                          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                            const at::Tensor&, int64_t)>();
  const at::Tensor loss = velocity_mse.call(pred, x, noise, t, 0);
  check(close(loss, (pred - (noise - x)).pow(2).mean({1, 2})), "velocity_mse (linear)");

  auto mse = op("sit_ext::mse").typed<at::Tensor(const at::Tensor&, const at::Tensor&)>();
  check(close(mse.call(pred, x), (pred - x).pow(2).mean()), "mse");

  auto mse_backward = op("sit_ext::mse_backward")
                          .typed<Pair(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                      std::array<bool, 2>)>();
  auto [dp, dq] = mse_backward.call(at::ones({}), pred, x, {true, true});
  const at::Tensor expected = 2 * (pred - x) / pred.numel();
  check(close(dp, expected) && close(dq, -expected), "mse_backward");

  check(throws([&] { interpolant.call(x, at::randn({5, 3}), t, 0, {true, true}); }, "noise"),
        "mismatched shapes are refused, naming the argument");
  check(throws([&] { interpolant.call(x, noise, at::rand({4}), 0, {true, true}); }, "[5]"),
        "t of the wrong length is refused");

  std::printf("%d failure(s)\n", failures);
  return failures == 0 ? 0 : 1;
}
