// The one place that declares every sit_ext op schema. Kernels live in
// csrc/cpu/<family>.cpp and csrc/cuda/<family>.cu.
//
// Backward ops take a `output_mask` naming the gradients the caller needs;
// gradients not asked for come back as empty tensors.
#include <torch/library.h>
#include <torch/version.h>

#include <string>

#ifndef SIT_EXT_CUDA_ARCHS
#define SIT_EXT_CUDA_ARCHS ""
#endif
#ifndef SIT_EXT_CPU_CAPABILITY
#define SIT_EXT_CPU_CAPABILITY "DEFAULT"
#endif

namespace {

// JSON, parsed by sit_ext.build_info(). Which backends have kernels is asked of
// the dispatcher at run time, not recorded here.
std::string build_info() {
  return std::string("{\"torch_version\": \"") + TORCH_VERSION + "\", \"cuda_archs\": \"" +
         SIT_EXT_CUDA_ARCHS + "\", \"cpu_capability\": \"" + SIT_EXT_CPU_CAPABILITY + "\"}";
}

}  // namespace

TORCH_LIBRARY(sit_ext, m) {
  m.def("build_info() -> str", &build_info);

  // ---- Interpolant family. `schedule`: 0 linear, 1 cosine, 2 vp, 3 coefficients;
  // with 3, `t` is a [B, 4] table of per-sample (alpha, beta, alpha', beta').
  // x_t = alpha x + beta noise and u_t = alpha' x + beta' noise, in one pass;
  // output_mask says which of the two to write.
  m.def(
      "interpolant(Tensor x, Tensor noise, Tensor t, int schedule, bool[2] output_mask) "
      "-> (Tensor, Tensor)");
  m.def(
      "interpolant_backward(Tensor? grad_xt, Tensor? grad_ut, Tensor x, Tensor noise, "
      "Tensor t, int schedule, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
  // Per-sample mean over the non-batch dims of (pred - u_t)^2, in fp32 (fp64 when
  // pred or x is fp64), with u_t computed in the kernel and never written. pred
  // may have any float dtype; x and noise share one.
  m.def("velocity_mse(Tensor pred, Tensor x, Tensor noise, Tensor t, int schedule) -> Tensor");
  m.def(
      "velocity_mse_backward(Tensor grad, Tensor pred, Tensor x, Tensor noise, Tensor t, "
      "int schedule, bool[4] output_mask) -> (Tensor, Tensor, Tensor, Tensor)");
  // Mean of (pred - target)^2 over all elements, as a 0-d fp32 (fp64) tensor;
  // pred and target in any float dtypes.
  m.def("mse(Tensor pred, Tensor target) -> Tensor");
  m.def(
      "mse_backward(Tensor grad, Tensor pred, Tensor target, bool[2] output_mask) -> (Tensor, "
      "Tensor)");

  // ---- AdaLN-Zero family. x, h: [B, T, D] or [B, D]; shift, scale, gate: [B, D],
  // inner stride 1, any outer stride (the views chunk(6, dim=1) makes). LayerNorm
  // has no affine; mean and rstd ([B, T] or [B], fp32) are saved for backward.
  // dtypes: h, gate, shift, scale share one, which is x's or (with float32 x)
  // bfloat16/float16; y is written in out_dtype (default x's), x's or theirs.
  // Gradients come back in each input's dtype.
  // y = LN(x) (1 + scale) + shift.
  m.def(
      "ln_modulate(Tensor x, Tensor shift, Tensor scale, float eps, ScalarType? out_dtype=None) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "ln_modulate_backward(Tensor grad_y, Tensor x, Tensor scale, Tensor mean, Tensor rstd, "
      "bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
  // x_out = x + gate (h + bias), y = LN(x_out) (1 + scale) + shift. bias ([D], h's
  // dtype, optional) is that of the Linear that made h, folded in: its gradient,
  // sum over samples of gate times the column sums of grad x_out, comes from the
  // per-sample sums the backward already makes.
  m.def(
      "gated_residual_ln_modulate(Tensor x, Tensor h, Tensor gate, Tensor shift, Tensor scale, "
      "float eps, ScalarType? out_dtype=None, Tensor? bias=None) -> (Tensor, Tensor, Tensor, "
      "Tensor)");
  m.def(
      "gated_residual_ln_modulate_backward(Tensor? grad_x_out, Tensor grad_y, Tensor x_out, "
      "Tensor h, Tensor gate, Tensor scale, Tensor mean, Tensor rstd, bool[6] output_mask, "
      "Tensor? bias=None) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // x + gate h. Its backward gives (dh, dgate); dx is the incoming gradient itself.
  m.def("gated_residual(Tensor x, Tensor h, Tensor gate) -> Tensor");
  m.def(
      "gated_residual_backward(Tensor grad, Tensor h, Tensor gate, bool[2] output_mask) "
      "-> (Tensor, Tensor)");

  // ---- MLP family. out = GELU_tanh(x w1^T + b1) w2^T (+ b2): fc1, GELU and fc2 of a
  // transformer block. x: [..., K]; w1: [H, K]; b1: [H]; w2: [N, H]; b2: [N]; one float
  // dtype (the Autocast kernels cast to autocast's, as Linear does). Also returns act
  // (the GELU output, fc2's input) and pre (its input), [M, H] with M the rows of x,
  // which backward takes. On CUDA in half precision, fc1's bias and GELU run in the
  // epilogue of fc1's cuBLASLt GEMM (which writes pre beside act), and backward's GELU
  // derivative and b1's gradient in that of the GEMM that makes fc2's input gradient.
  m.def(
      "gelu_mlp(Tensor x, Tensor w1, Tensor b1, Tensor w2, Tensor? b2=None) -> (Tensor, Tensor, "
      "Tensor)");
  // Gradients (dx, dw1, db1, dw2, db2).
  m.def(
      "gelu_mlp_backward(Tensor grad, Tensor x, Tensor w1, Tensor w2, Tensor act, Tensor pre, "
      "bool[5] output_mask) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}
