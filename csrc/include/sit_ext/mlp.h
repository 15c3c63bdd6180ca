// The MLP family (gelu_mlp): argument checks, shared by the CPU and CUDA
// kernels, and the ATen path, which is the CPU kernel and the CUDA kernel's
// fallback where cuBLASLt's epilogues do not apply.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <optional>
#include <tuple>
#include <utility>

#include "sit_ext/checks.h"

namespace sit_ext {

// x as [M, K] rows; the weights as given (checked: one dtype and device).
struct MlpArgs {
  at::Tensor x2, w1, b1, w2, b2;  // b2 undefined when not given
  int64_t rows, in, hidden, out;
};

inline void check_matrix(const char* op, const char* name, const at::Tensor& t, int64_t dims,
                         const at::Tensor& x) {
  check_float(op, name, t);
  TORCH_CHECK(t.dim() == dims, "sit_ext.", op, ": expected ", name, " to have ", dims,
              " dimension(s), got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), "sit_ext.", op, ": expected ", name,
              " to have the dtype of x (", x.scalar_type(), "), got ", t.scalar_type(),
              " (under autocast the op casts them; outside it, cast them as for a Linear)");
  TORCH_CHECK(t.device() == x.device(), "sit_ext.", op, ": expected ", name, " on ", x.device(),
              ", got ", t.device());
}

// x, w1 and w2 checked, with b1 and b2 left undefined.
inline MlpArgs mlp_weights(const char* op, const at::Tensor& x, const at::Tensor& w1,
                           const at::Tensor& w2) {
  check_float(op, "x", x);
  TORCH_CHECK(x.dim() >= 1, "sit_ext.", op, ": expected x of shape [..., K], got a 0-d tensor");
  check_matrix(op, "w1", w1, 2, x);
  check_matrix(op, "w2", w2, 2, x);
  const int64_t in = x.size(-1), hidden = w1.size(0);
  TORCH_CHECK(w1.size(1) == in, "sit_ext.", op, ": expected w1 of shape [H, ", in,
              "] (x's last dim), got ", w1.sizes());
  TORCH_CHECK(w2.size(1) == hidden, "sit_ext.", op, ": expected w2 of shape [N, ", hidden,
              "] (w1's rows), got ", w2.sizes());
  TORCH_CHECK(in > 0 && hidden > 0 && w2.size(0) > 0, "sit_ext.", op,
              ": expected non-empty features (K, H, N > 0), got x ", x.sizes(), ", w1 ", w1.sizes(),
              ", w2 ", w2.sizes());
  const int64_t rows = x.numel() / in;
  return {x.reshape({rows, in}).contiguous(),
          w1.contiguous(),
          at::Tensor(),
          w2.contiguous(),
          at::Tensor(),
          rows,
          in,
          hidden,
          w2.size(0)};
}

inline MlpArgs mlp_args(const char* op, const at::Tensor& x, const at::Tensor& w1,
                        const at::Tensor& b1, const at::Tensor& w2,
                        const std::optional<at::Tensor>& b2) {
  MlpArgs a = mlp_weights(op, x, w1, w2);
  check_matrix(op, "b1", b1, 1, x);
  TORCH_CHECK(b1.size(0) == a.hidden, "sit_ext.", op, ": expected b1 of shape [", a.hidden,
              "] (w1's rows), got ", b1.sizes());
  a.b1 = b1.contiguous();
  if (b2.has_value() && b2->defined()) {
    check_matrix(op, "b2", *b2, 1, x);
    TORCH_CHECK(b2->size(0) == a.out, "sit_ext.", op, ": expected b2 of shape [", a.out,
                "] (w2's rows), got ", b2->sizes());
    a.b2 = b2->contiguous();
  }
  return a;
}

// The backward op's arguments: x, w1 and w2 as the forward's, the saved act
// and pre ([M, H]) and the incoming gradient ([..., N], returned as [M, N]).
inline std::pair<MlpArgs, at::Tensor> mlp_backward_args(const char* op, const at::Tensor& grad,
                                                        const at::Tensor& x, const at::Tensor& w1,
                                                        const at::Tensor& w2, const at::Tensor& act,
                                                        const at::Tensor& pre) {
  const MlpArgs a = mlp_weights(op, x, w1, w2);
  for (auto [name, t] : {std::pair{"act", &act}, std::pair{"pre", &pre}}) {
    check_matrix(op, name, *t, 2, a.x2);
    TORCH_CHECK(t->size(0) == a.rows && t->size(1) == a.hidden, "sit_ext.", op, ": expected ", name,
                " of shape [", a.rows, ", ", a.hidden, "], got ", t->sizes());
  }
  check_float(op, "grad", grad);
  TORCH_CHECK(grad.device() == a.x2.device(), "sit_ext.", op, ": expected grad on ", a.x2.device(),
              ", got ", grad.device());
  TORCH_CHECK(grad.dim() >= 1 && grad.size(-1) == a.out && grad.numel() == a.rows * a.out,
              "sit_ext.", op, ": expected grad of shape [..., ", a.out, "] with ", a.rows,
              " rows, got ", grad.sizes());
  return {a, grad.reshape({a.rows, a.out}).to(a.x2.scalar_type()).contiguous()};
}

// What backward's output_mask does not ask for comes back as an empty tensor.
inline at::Tensor unasked(const at::Tensor& like) { return at::empty({0}, like.options()); }

// The op's outputs: out ([M, N]) in x's leading shape, act and pre as they are.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> mlp_outputs(const at::Tensor& x,
                                                                  const MlpArgs& a,
                                                                  const at::Tensor& out,
                                                                  const at::Tensor& act,
                                                                  const at::Tensor& pre) {
  auto shape = x.sizes().vec();
  shape.back() = a.out;
  return {out.view(shape), act, pre};
}

// The backward op's outputs: dx ([M, K], when asked for) in x's shape.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> mlp_grads(
    const at::Tensor& x, const std::array<at::Tensor, 5>& g, bool dx) {
  return {dx ? g[0].view(x.sizes()) : g[0], g[1], g[2], g[3], g[4]};
}

// out ([M, N]), act, pre by ATen's GEMMs and tanh GELU.
std::tuple<at::Tensor, at::Tensor, at::Tensor> gelu_mlp_aten(const MlpArgs& a);

// fc2's part: out = act w2^T (+ b2), [M, N].
at::Tensor mlp_fc2(const MlpArgs& a, const at::Tensor& act);

// (dx as [M, K], dw1, db1, dw2, db2) by ATen, for the gradients `mask` asks for.
// d_pre and db1, when given (the CUDA kernel's epilogue made them), are used as they are.
std::array<at::Tensor, 5> gelu_mlp_backward_aten(const MlpArgs& a, const at::Tensor& grad2,
                                                 const at::Tensor& act, const at::Tensor& pre,
                                                 std::array<bool, 5> mask, at::Tensor d_pre = {},
                                                 at::Tensor db1 = {});

}  // namespace sit_ext
