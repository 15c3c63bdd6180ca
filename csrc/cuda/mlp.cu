// CUDA kernel of the MLP family (gelu_mlp). Forward: fc1's bias and tanh GELU
// run in the epilogue of fc1's cuBLASLt GEMM (GELU_AUX_BIAS), which writes
// GELU's input `pre` beside its output `act`; fc2 is ATen's GEMM. Backward: the
// GEMM that makes fc2's input gradient applies GELU's derivative at `pre` and
// sums b1's gradient in its epilogue (DGELU_BGRAD); the weight and input
// gradients are ATen's GEMMs. Without those epilogues the same step takes an
// elementwise pass over [M, H] each way plus a reduction for db1.
//
// cuBLASLt is column-major: a row-major [R, C] matrix is its C x R transpose,
// so out[M, H] = x[M, K] w1[H, K]^T is, column-major, (H x M) = w1^T (K x H)^T . x (K x M).
//
// float32 and float64, rows not 16-byte aligned, and shapes cuBLASLt has no
// algorithm for take the ATen path of csrc/cpu/mlp.cpp (the same results up to
// rounding: the epilogue applies GELU to the float32 accumulator, ATen to pre
// rounded to the output dtype).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContextLight.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cublasLt.h>
#include <torch/library.h>

#include <cstdint>

#include "sit_ext/mlp.h"

namespace sit_ext::cuda {
namespace {

using at::Tensor;

// Owns one cuBLASLt descriptor.
template <typename T, cublasStatus_t (*Destroy)(T)>
struct LtDescriptor {
  T h = nullptr;
  LtDescriptor() = default;
  LtDescriptor(const LtDescriptor&) = delete;
  LtDescriptor& operator=(const LtDescriptor&) = delete;
  ~LtDescriptor() {
    if (h != nullptr) Destroy(h);
  }
};

void check_lt(cublasStatus_t status, const char* what) {
  TORCH_CHECK(status == CUBLAS_STATUS_SUCCESS, "sit_ext.gelu_mlp: cuBLASLt ", what,
              " failed: ", cublasLtGetStatusString(status));
}

uint32_t alignment(const void* p) {
  uint32_t a = 1;
  while (a < 256 && reinterpret_cast<uintptr_t>(p) % (2 * a) == 0) a *= 2;
  return a;
}

// D (m x n, column-major, leading dimension m) = op(A) op(B) with `epilogue`,
// which reads or writes `bias` (m values) and `aux` (m x n, leading dimension
// m) in the type of D. False where cuBLASLt has no algorithm for it or
// refuses the arguments (nothing was launched; the caller falls back). Runs on
// the current stream.
bool lt_gemm(cublasOperation_t transa, cublasOperation_t transb, int64_t m, int64_t n, int64_t k,
             const void* a, int64_t lda, const void* b, int64_t ldb, void* d, cudaDataType_t type,
             cublasLtEpilogue_t epilogue, void* bias, void* aux) {
  LtDescriptor<cublasLtMatmulDesc_t, cublasLtMatmulDescDestroy> op;
  check_lt(cublasLtMatmulDescCreate(&op.h, CUBLAS_COMPUTE_32F, CUDA_R_32F), "descriptor");
  auto set = [&](cublasLtMatmulDescAttributes_t attribute, const auto& value) {
    check_lt(cublasLtMatmulDescSetAttribute(op.h, attribute, &value, sizeof(value)), "attribute");
  };
  const int64_t aux_ld = m;  // aux in D's type: cuBLASLt's default
  set(CUBLASLT_MATMUL_DESC_TRANSA, transa);
  set(CUBLASLT_MATMUL_DESC_TRANSB, transb);
  set(CUBLASLT_MATMUL_DESC_EPILOGUE, epilogue);
  set(CUBLASLT_MATMUL_DESC_BIAS_POINTER, bias);
  set(CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, aux);
  set(CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD, aux_ld);

  const bool na = transa == CUBLAS_OP_N, nb = transb == CUBLAS_OP_N;
  LtDescriptor<cublasLtMatrixLayout_t, cublasLtMatrixLayoutDestroy> la, lb, ld;
  check_lt(cublasLtMatrixLayoutCreate(&la.h, type, na ? m : k, na ? k : m, lda), "layout");
  check_lt(cublasLtMatrixLayoutCreate(&lb.h, type, nb ? k : n, nb ? n : k, ldb), "layout");
  check_lt(cublasLtMatrixLayoutCreate(&ld.h, type, m, n, m), "layout");

  LtDescriptor<cublasLtMatmulPreference_t, cublasLtMatmulPreferenceDestroy> pref;
  check_lt(cublasLtMatmulPreferenceCreate(&pref.h), "preference");
  auto prefer = [&](cublasLtMatmulPreferenceAttributes_t attribute, const auto& value) {
    check_lt(cublasLtMatmulPreferenceSetAttribute(pref.h, attribute, &value, sizeof(value)),
             "preference");
  };
  const size_t workspace_size = at::cuda::getCUDABlasLtWorkspaceSize();
  prefer(CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, workspace_size);
  // The heuristic assumes 256-byte alignment unless told.
  prefer(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, alignment(a));
  prefer(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, alignment(b));
  prefer(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, alignment(d));
  prefer(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, alignment(d));

  cublasLtHandle_t handle = at::cuda::getCurrentCUDABlasLtHandle();
  cublasLtMatmulHeuristicResult_t result{};
  int found = 0;
  if (cublasLtMatmulAlgoGetHeuristic(handle, op.h, la.h, lb.h, ld.h, ld.h, pref.h, 1, &result,
                                     &found) != CUBLAS_STATUS_SUCCESS ||
      found == 0) {
    return false;
  }
  const float one = 1.0f, zero = 0.0f;
  const cublasStatus_t status = cublasLtMatmul(
      handle, op.h, &one, a, la.h, b, lb.h, &zero, d, ld.h, d, ld.h, &result.algo,
      at::cuda::getCUDABlasLtWorkspace(), workspace_size, at::cuda::getCurrentCUDAStream());
  // An argument it refuses launches nothing: the caller falls back.
  if (status == CUBLAS_STATUS_NOT_SUPPORTED || status == CUBLAS_STATUS_INVALID_VALUE) return false;
  check_lt(status, "matmul");
  return true;
}

bool aligned16(const Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

// Whether the epilogue path takes these operands: half precision, every row
// a whole number of 16-byte packs, every matrix 16-byte aligned.
bool lt_applies(const MlpArgs& a) {
  const auto s = a.x2.scalar_type();
  return (s == at::kHalf || s == at::kBFloat16) && a.rows > 0 && a.in % 8 == 0 &&
         a.hidden % 8 == 0 && a.out % 8 == 0 && aligned16(a.x2) && aligned16(a.w1) &&
         aligned16(a.w2);
}

cudaDataType_t lt_type(at::ScalarType s) { return s == at::kHalf ? CUDA_R_16F : CUDA_R_16BF; }

std::tuple<Tensor, Tensor, Tensor> gelu_mlp(const Tensor& x, const Tensor& w1, const Tensor& b1,
                                            const Tensor& w2, const std::optional<Tensor>& b2) {
  const MlpArgs a = mlp_args("gelu_mlp", x, w1, b1, w2, b2);
  const c10::cuda::CUDAGuard guard(x.device());
  Tensor out, act, pre;
  if (lt_applies(a) && aligned16(a.b1)) {
    act = at::empty({a.rows, a.hidden}, a.x2.options());
    pre = at::empty_like(act);
    // act^T (H x M) = GELU(w1 (K x H, transposed) . x^T (K x M) + b1), pre^T beside it.
    if (lt_gemm(CUBLAS_OP_T, CUBLAS_OP_N, a.hidden, a.rows, a.in, a.w1.data_ptr(), a.in,
                a.x2.data_ptr(), a.in, act.data_ptr(), lt_type(a.x2.scalar_type()),
                CUBLASLT_EPILOGUE_GELU_AUX_BIAS, a.b1.data_ptr(), pre.data_ptr())) {
      out = mlp_fc2(a, act);
    }
  }
  if (!out.defined()) std::tie(out, act, pre) = gelu_mlp_aten(a);
  return mlp_outputs(x, a, out, act, pre);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> gelu_mlp_backward(
    const Tensor& grad, const Tensor& x, const Tensor& w1, const Tensor& w2, const Tensor& act,
    const Tensor& pre, std::array<bool, 5> mask) {
  const auto [a, grad2] = mlp_backward_args("gelu_mlp_backward", grad, x, w1, w2, act, pre);
  const c10::cuda::CUDAGuard guard(x.device());
  Tensor d_pre, db1;
  if ((mask[0] || mask[1] || mask[2]) && lt_applies(a) && aligned16(grad2) && pre.is_contiguous() &&
      aligned16(pre)) {
    d_pre = at::empty({a.rows, a.hidden}, a.x2.options());
    db1 = at::empty({a.hidden}, a.x2.options());
    // d_pre^T (H x M) = GELU'(pre^T) * (w2^T (H x N) . grad^T (N x M)); db1 its row sums.
    if (!lt_gemm(CUBLAS_OP_N, CUBLAS_OP_N, a.hidden, a.rows, a.out, a.w2.data_ptr(), a.hidden,
                 grad2.data_ptr(), a.out, d_pre.data_ptr(), lt_type(a.x2.scalar_type()),
                 CUBLASLT_EPILOGUE_DGELU_BGRAD, db1.data_ptr(), pre.data_ptr())) {
      d_pre = db1 = Tensor();
    }
  }
  return mlp_grads(x, gelu_mlp_backward_aten(a, grad2, act, pre, mask, d_pre, db1), mask[0]);
}

}  // namespace

TORCH_LIBRARY_IMPL(sit_ext, CUDA, m) {
  m.impl("gelu_mlp", &gelu_mlp);
  m.impl("gelu_mlp_backward", &gelu_mlp_backward);
}

}  // namespace sit_ext::cuda
