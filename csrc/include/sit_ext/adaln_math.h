// Per-element formulas of the AdaLN-Zero ops, shared by the CPU and CUDA
// kernels. V is a scalar or a SIMD vector.
//
//   x_out = x + gate h
//   xhat  = (x_out - mean) rstd            (LayerNorm without affine)
//   y     = xhat (1 + scale) + shift
#pragma once

#include <c10/macros/Macros.h>

#include <type_traits>

namespace sit_ext {

// x - mean, taken as (x - c0) - c1. float64 has no wider type to sum in, so
// its mean is kept in two parts, c0 = the row's first element and c1 =
// mean(x - c0): rounded to float64, the mean of a row far from zero (mean
// 4.8e8, D = 3) costs every xhat up to half an ulp of the mean, and some rows
// more than eager PyTorch (which rounds its mean too) loses. The other dtypes
// compute in float with the mean summed in double, and take c0 = mean, c1 = 0:
// x - mean, bit for bit.
template <typename acc_t>
struct RowCentre {
  acc_t c0, c1;
};

template <typename acc_t>
C10_HOST_DEVICE inline RowCentre<acc_t> row_centre(acc_t mean, acc_t first,
                                                   acc_t mean_minus_first) {
  if constexpr (std::is_same_v<acc_t, double>) {
    return {first, mean_minus_first};
  } else {
    return {mean, acc_t(0)};
  }
}

template <typename V>
C10_HOST_DEVICE inline V centred(V x, V c0, V c1) {
  return (x - c0) - c1;
}

template <typename V>
C10_HOST_DEVICE inline V gated_residual_value(V x, V gate, V h) {
  return x + gate * h;
}

template <typename V>
C10_HOST_DEVICE inline V modulate_value(V xhat, V shift, V scale) {
  return xhat * (V(1) + scale) + shift;
}

// LayerNorm backward for one element: with dxhat = dy (1 + scale) and the row
// means a = mean(dxhat), c = mean(dxhat xhat),
//   dx = rstd (dxhat - a - xhat c).
template <typename V>
C10_HOST_DEVICE inline V layer_norm_grad(V dxhat, V xhat, V a, V c, V rstd) {
  return rstd * (dxhat - a - xhat * c);
}

}  // namespace sit_ext
