// Per-element formulas of the AdaLN-Zero ops, shared by the CPU and CUDA
// kernels. V is a scalar or a SIMD vector.
//
//   x_out = x + gate h
//   xhat  = (x_out - mean) rstd            (LayerNorm without affine)
//   y     = xhat (1 + scale) + shift
#pragma once

#include <c10/macros/Macros.h>

namespace sit_ext {

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
