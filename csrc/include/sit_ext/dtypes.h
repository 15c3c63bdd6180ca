// Compile-time dispatch over the dtype combinations the kernels take, shared by
// the CPU and CUDA implementations. Callers check the combination first (see
// checks.h); reaching a combination not listed here is an internal error.
#pragma once

#include <ATen/ATen.h>

#include <type_traits>

namespace sit_ext {

// A type carried as a value, for generic lambdas: typename decltype(tag)::type.
template <typename T>
struct Type {
  using type = T;
};

// f(Type<T>{}) for the C++ type of a float dtype.
template <typename F>
void with_float_type(at::ScalarType s, const F& f) {
  switch (s) {
    case at::kDouble:
      return f(Type<double>{});
    case at::kFloat:
      return f(Type<float>{});
    case at::kHalf:
      return f(Type<at::Half>{});
    case at::kBFloat16:
      return f(Type<at::BFloat16>{});
    default:
      TORCH_CHECK(false, "sit_ext: unsupported dtype ", s);
  }
}

// f(Type<P>{}, Type<Q>{}) for the two sides of a loss (pred and x, or pred and
// target): any pair of float32/float16/bfloat16, or float64 with float64.
template <typename F>
void with_loss_types(at::ScalarType p, at::ScalarType q, const F& f) {
  with_float_type(p, [&](auto tp) {
    with_float_type(q, [&](auto tq) {
      using P = typename decltype(tp)::type;
      using Q = typename decltype(tq)::type;
      if constexpr (std::is_same_v<P, double> == std::is_same_v<Q, double>) {
        f(tp, tq);
      } else {
        TORCH_INTERNAL_ASSERT(false, "sit_ext: float64 pairs only with float64");
      }
    });
  });
}

// f(Type<X>{}, Type<L>{}, Type<Y>{}) for the AdaLN ops (see checks.h): one dtype
// throughout, or float32 x with L in {bfloat16, float16} and y in {X, L}.
template <typename F>
void with_adaln_types(at::ScalarType x, at::ScalarType low, at::ScalarType y, const F& f) {
  if (low == x && y == x) {
    return with_float_type(x, [&](auto t) { f(t, t, t); });
  }
  TORCH_INTERNAL_ASSERT(x == at::kFloat && (low == at::kBFloat16 || low == at::kHalf) &&
                        (y == x || y == low));
  auto low_half = [&](auto tl) {
    if (y == x) {
      f(Type<float>{}, tl, Type<float>{});
    } else {
      f(Type<float>{}, tl, tl);
    }
  };
  if (low == at::kHalf) {
    low_half(Type<at::Half>{});
  } else {
    low_half(Type<at::BFloat16>{});
  }
}

// f(Type<X>{}, Type<L>{}) for gated_residual: the pairs above without y.
template <typename F>
void with_residual_types(at::ScalarType x, at::ScalarType low, const F& f) {
  if (low == x) {
    return with_float_type(x, [&](auto t) { f(t, t); });
  }
  TORCH_INTERNAL_ASSERT(x == at::kFloat && (low == at::kBFloat16 || low == at::kHalf));
  if (low == at::kHalf) {
    f(Type<float>{}, Type<at::Half>{});
  } else {
    f(Type<float>{}, Type<at::BFloat16>{});
  }
}

}  // namespace sit_ext
