// CUDA kernels of the interpolant family: interpolant, velocity_mse, mse.
//
// Each block handles one fixed chunk of one sample (row), so per-sample
// coefficients are computed once per block. Per-sample sums are reduced in two
// stages with no atomics: each block writes its partial sums (double), then a
// small kernel adds them per row in chunk order. Results are bitwise
// reproducible.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "cuda_utils.cuh"
#include "sit_ext/checks.h"
#include "sit_ext/dtypes.h"
#include "sit_ext/interpolant_math.h"

namespace sit_ext::cuda {
namespace {

using at::Tensor;

// ------------------------------------------------------------------ kernels

template <typename scalar_t, int kVec>
__global__ void __launch_bounds__(kThreads)
    interpolant_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ e,
                       scalar_t* __restrict__ xt, scalar_t* __restrict__ ut, int64_t n,
                       int64_t chunks, TimeArg ta) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t block = blockIdx.x, row = block / chunks,
                begin = (block % chunks) * chunk_size<kVec>();
  const int64_t o = row * n, end = min64(n, begin + chunk_size<kVec>());
  const Coef<acc_t> c = sample_coef<acc_t>(ta, row);
  for_each_pack<kVec>(begin, end, [&](int64_t i) {
    const auto xv = load_pack<kVec>(x + o + i), ev = load_pack<kVec>(e + o + i);
    Pack<scalar_t, kVec> a, b;
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      const acc_t xs = xv.v[j], es = ev.v[j];
      a.v[j] = scalar_t(interpolant_value(c, xs, es));
      b.v[j] = scalar_t(velocity_value(c, xs, es));
    }
    if (xt) store_pack<kVec>(xt + o + i, a);
    if (ut) store_pack<kVec>(ut + o + i, b);
  });
}

// partial: [rows * chunks, 4] block sums of (gx*x, gx*e, gu*x, gu*e), or null.
template <typename scalar_t, int kVec>
__global__ void __launch_bounds__(kThreads)
    interpolant_backward_kernel(const scalar_t* __restrict__ gx, const scalar_t* __restrict__ gu,
                                const scalar_t* __restrict__ x, const scalar_t* __restrict__ e,
                                scalar_t* __restrict__ dx, scalar_t* __restrict__ dn,
                                double* __restrict__ partial, int64_t n, int64_t chunks,
                                TimeArg ta) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t block = blockIdx.x, row = block / chunks,
                begin = (block % chunks) * chunk_size<kVec>();
  const int64_t o = row * n, end = min64(n, begin + chunk_size<kVec>());
  const Coef<acc_t> c = used_coef(sample_coef<acc_t>(ta, row), gx != nullptr, gu != nullptr);
  acc_t s[4] = {0, 0, 0, 0};
  for_each_pack<kVec>(begin, end, [&](int64_t i) {
    Pack<scalar_t, kVec> gxv{}, guv{}, a, b;
    if (gx) gxv = load_pack<kVec>(gx + o + i);
    if (gu) guv = load_pack<kVec>(gu + o + i);
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      const acc_t gxs = gx ? acc_t(gxv.v[j]) : acc_t(0), gus = gu ? acc_t(guv.v[j]) : acc_t(0);
      a.v[j] = scalar_t(interpolant_grad_x(c, gxs, gus));
      b.v[j] = scalar_t(interpolant_grad_noise(c, gxs, gus));
    }
    if (dx) store_pack<kVec>(dx + o + i, a);
    if (dn) store_pack<kVec>(dn + o + i, b);
    if (partial) {
      const auto xv = load_pack<kVec>(x + o + i), ev = load_pack<kVec>(e + o + i);
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        const acc_t gxs = gx ? acc_t(gxv.v[j]) : acc_t(0), gus = gu ? acc_t(guv.v[j]) : acc_t(0);
        const acc_t xs = xv.v[j], es = ev.v[j];
        s[0] += gxs * xs;
        s[1] += gxs * es;
        s[2] += gus * xs;
        s[3] += gus * es;
      }
    }
  });
  if (partial == nullptr) return;
  double sums[4] = {s[0], s[1], s[2], s[3]};
  block_sum(sums);
  if (threadIdx.x == 0) {
    for (int k = 0; k < 4; ++k) partial[block * 4 + k] = sums[k];
  }
}

// partial: [rows * chunks] block sums of (pred - u_t)^2. pred in p_t, x and
// noise in x_t (see kVecOfWidest for kVec).
template <typename p_t, typename x_t, int kVec>
__global__ void __launch_bounds__(kThreads)
    velocity_mse_kernel(const p_t* __restrict__ p, const x_t* __restrict__ x,
                        const x_t* __restrict__ e, double* __restrict__ partial, int64_t n,
                        int64_t chunks, TimeArg ta) {
  using acc_t = at::opmath_type<x_t>;
  const int64_t block = blockIdx.x, row = block / chunks,
                begin = (block % chunks) * chunk_size<kVec>();
  const int64_t o = row * n, end = min64(n, begin + chunk_size<kVec>());
  const Coef<acc_t> c = sample_coef<acc_t>(ta, row);
  acc_t s = 0;
  for_each_pack<kVec>(begin, end, [&](int64_t i) {
    const auto pv = load_pack<kVec>(p + o + i);
    const auto xv = load_pack<kVec>(x + o + i), ev = load_pack<kVec>(e + o + i);
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      const acc_t r = acc_t(pv.v[j]) - velocity_value(c, acc_t(xv.v[j]), acc_t(ev.v[j]));
      s += r * r;
    }
  });
  double sums[1] = {s};
  block_sum(sums);
  if (threadIdx.x == 0) partial[block] = sums[0];
}

// g: per-sample upstream gradient (acc_t, stride g_stride). partial:
// [rows * chunks, 2] block sums of (du*x, du*e), or null.
template <typename p_t, typename x_t, int kVec>
__global__ void __launch_bounds__(kThreads)
    velocity_mse_backward_kernel(const at::opmath_type<x_t>* __restrict__ g, int64_t g_stride,
                                 const p_t* __restrict__ p, const x_t* __restrict__ x,
                                 const x_t* __restrict__ e, p_t* __restrict__ dp,
                                 x_t* __restrict__ dx, x_t* __restrict__ dn,
                                 double* __restrict__ partial, int64_t n, int64_t chunks,
                                 TimeArg ta) {
  using acc_t = at::opmath_type<x_t>;
  const int64_t block = blockIdx.x, row = block / chunks,
                begin = (block % chunks) * chunk_size<kVec>();
  const int64_t o = row * n, end = min64(n, begin + chunk_size<kVec>());
  const Coef<acc_t> c = sample_coef<acc_t>(ta, row);
  const acc_t k = acc_t(2) * g[row * g_stride] / acc_t(n);
  acc_t s[2] = {0, 0};
  for_each_pack<kVec>(begin, end, [&](int64_t i) {
    const auto pv = load_pack<kVec>(p + o + i);
    const auto xv = load_pack<kVec>(x + o + i), ev = load_pack<kVec>(e + o + i);
    Pack<p_t, kVec> a;
    Pack<x_t, kVec> b, d;
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      const acc_t xs = xv.v[j], es = ev.v[j];
      const acc_t dps = k * (acc_t(pv.v[j]) - velocity_value(c, xs, es));
      a.v[j] = p_t(dps);
      b.v[j] = x_t(-(c.da * dps));
      d.v[j] = x_t(-(c.db * dps));
      s[0] -= dps * xs;  // du = -dpred
      s[1] -= dps * es;
    }
    if (dp) store_pack<kVec>(dp + o + i, a);
    if (dx) store_pack<kVec>(dx + o + i, b);
    if (dn) store_pack<kVec>(dn + o + i, d);
  });
  if (partial == nullptr) return;
  double sums[2] = {s[0], s[1]};
  block_sum(sums);
  if (threadIdx.x == 0) {
    partial[block * 2] = sums[0];
    partial[block * 2 + 1] = sums[1];
  }
}

// pred in p_t, target in q_t.
template <typename p_t, typename q_t, int kVec>
__global__ void __launch_bounds__(kThreads)
    mse_kernel(const p_t* __restrict__ p, const q_t* __restrict__ q, double* __restrict__ partial,
               int64_t n) {
  using acc_t = at::opmath_type<p_t>;
  const int64_t block = blockIdx.x, begin = block * chunk_size<kVec>();
  const int64_t end = min64(n, begin + chunk_size<kVec>());
  acc_t s = 0;
  for_each_pack<kVec>(begin, end, [&](int64_t i) {
    const auto pv = load_pack<kVec>(p + i);
    const auto qv = load_pack<kVec>(q + i);
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      const acc_t r = acc_t(pv.v[j]) - acc_t(qv.v[j]);
      s += r * r;
    }
  });
  double sums[1] = {s};
  block_sum(sums);
  if (threadIdx.x == 0) partial[block] = sums[0];
}

template <typename p_t, typename q_t, int kVec>
__global__ void __launch_bounds__(kThreads)
    mse_backward_kernel(const at::opmath_type<p_t>* __restrict__ g, const p_t* __restrict__ p,
                        const q_t* __restrict__ q, p_t* __restrict__ dp, q_t* __restrict__ dq,
                        int64_t n) {
  using acc_t = at::opmath_type<p_t>;
  const int64_t begin = int64_t(blockIdx.x) * chunk_size<kVec>();
  const int64_t end = min64(n, begin + chunk_size<kVec>());
  const acc_t k = acc_t(2) * g[0] / acc_t(n);
  for_each_pack<kVec>(begin, end, [&](int64_t i) {
    const auto pv = load_pack<kVec>(p + i);
    const auto qv = load_pack<kVec>(q + i);
    Pack<p_t, kVec> a;
    Pack<q_t, kVec> b;
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      const acc_t d = k * (acc_t(pv.v[j]) - acc_t(qv.v[j]));
      a.v[j] = p_t(d);
      b.v[j] = q_t(-d);
    }
    if (dp) store_pack<kVec>(dp + i, a);
    if (dq) store_pack<kVec>(dq + i, b);
  });
}

// Second stage: per row, the block partials added in chunk order.
template <int K>
__device__ __forceinline__ void row_sums(const double* partial, int64_t row, int64_t chunks,
                                         double (&s)[K]) {
  for (int k = 0; k < K; ++k) s[k] = 0;
  for (int64_t c = 0; c < chunks; ++c) {
    for (int k = 0; k < K; ++k) s[k] += partial[(row * chunks + c) * K + k];
  }
}

// out[row] = (sum over the row's chunks) / n, in acc_t: one block per row,
// each thread adding a strided share of the chunks, then a fixed-order block
// sum, so that a long row (mse: one row of every block's partial) is summed in
// parallel with the same bits on every run.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    mean_finalize_kernel(const double* partial, int64_t chunks, int64_t n, acc_t* out) {
  const int64_t row = blockIdx.x;
  double s[1] = {0};
  for (int64_t c = threadIdx.x; c < chunks; c += kThreads) s[0] += partial[row * chunks + c];
  block_sum(s);
  if (threadIdx.x == 0) out[row] = acc_t(s[0] / double(n));
}

// The gradient of t (or the coefficient table) from the per-row sums, in t's dtype.
template <int K>
__global__ void time_grad_finalize_kernel(const double* partial, int64_t rows, int64_t chunks,
                                          TimeArg ta, void* out) {
  const int64_t row = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (row >= rows) return;
  double s[K], g[4];
  row_sums(partial, row, chunks, s);
  if constexpr (K == 4) {
    interpolant_time_grad(ta, row, s, g);
  } else {
    velocity_mse_time_grad(ta, row, s, g);
  }
  const int size = time_grad_size(ta);
  for (int k = 0; k < size; ++k) store_as(out, row * size + k, ta.kind, g[k]);
}

// -------------------------------------------------------------- host side

// Blocks per row.
template <int kVec>
int64_t chunks_for(int64_t n) {
  return std::max<int64_t>(1, ceil_div(n, chunk_size<kVec>()));
}

int64_t finalize_blocks(int64_t rows) { return ceil_div(rows, kThreads); }

std::tuple<Tensor, Tensor> interpolant(const Tensor& x_, const Tensor& noise_, const Tensor& t,
                                       int64_t schedule, std::array<bool, 2> mask) {
  const SampleArgs a = sample_args("interpolant", x_, noise_, t, schedule);
  const c10::cuda::CUDAGuard guard(a.x.device());
  Tensor xt = empty_if(mask[0], a.x), ut = empty_if(mask[1], a.x);
  if (a.rows == 0) return {xt, ut};
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.x.scalar_type(), "interpolant", [&] {
    const scalar_t* x = a.x.const_data_ptr<scalar_t>();
    const scalar_t* e = a.noise.const_data_ptr<scalar_t>();
    scalar_t* xt_p = out_ptr<scalar_t>(xt);
    scalar_t* ut_p = out_ptr<scalar_t>(ut);
    const bool vec = a.n % kVecOf<scalar_t> == 0 && aligned16({x, e, xt_p, ut_p});
    with_vec<scalar_t>(vec, [&](auto v) {
      constexpr int kVec = decltype(v)::value;
      const int64_t chunks = chunks_for<kVec>(a.n);
      check_grid("interpolant", a.rows * chunks);
      interpolant_kernel<scalar_t, kVec>
          <<<a.rows * chunks, kThreads, 0, stream>>>(x, e, xt_p, ut_p, a.n, chunks, a.time);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {xt, ut};
}

std::tuple<Tensor, Tensor, Tensor> interpolant_backward(const std::optional<Tensor>& grad_xt,
                                                        const std::optional<Tensor>& grad_ut,
                                                        const Tensor& x_, const Tensor& noise_,
                                                        const Tensor& t, int64_t schedule,
                                                        std::array<bool, 3> mask) {
  constexpr const char* op = "interpolant_backward";
  const SampleArgs a = sample_args(op, x_, noise_, t, schedule);
  const c10::cuda::CUDAGuard guard(a.x.device());
  const Tensor gx_t = tensor_grad(op, "grad_xt", grad_xt.value_or(Tensor()), a.x);
  const Tensor gu_t = tensor_grad(op, "grad_ut", grad_ut.value_or(Tensor()), a.x);
  Tensor dx = empty_if(mask[0], a.x), dn = empty_if(mask[1], a.x);
  Tensor dt = mask[2] ? at::empty(t.sizes(), t.options()) : at::empty({0}, t.options());
  if (a.rows == 0) return {dx, dn, dt};
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.x.scalar_type(), op, [&] {
    const scalar_t* x = a.x.const_data_ptr<scalar_t>();
    const scalar_t* e = a.noise.const_data_ptr<scalar_t>();
    const scalar_t* gx = in_ptr<scalar_t>(gx_t);
    const scalar_t* gu = in_ptr<scalar_t>(gu_t);
    scalar_t* dx_p = out_ptr<scalar_t>(dx);
    scalar_t* dn_p = out_ptr<scalar_t>(dn);
    const bool vec = a.n % kVecOf<scalar_t> == 0 && aligned16({x, e, gx, gu, dx_p, dn_p});
    with_vec<scalar_t>(vec, [&](auto v) {
      constexpr int kVec = decltype(v)::value;
      const int64_t chunks = chunks_for<kVec>(a.n);
      check_grid(op, a.rows * chunks);
      Tensor partial =
          at::empty({mask[2] ? a.rows * chunks * 4 : 0}, a.x.options().dtype(at::kDouble));
      double* partial_p = mask[2] ? partial.mutable_data_ptr<double>() : nullptr;
      interpolant_backward_kernel<scalar_t, kVec><<<a.rows * chunks, kThreads, 0, stream>>>(
          gx, gu, x, e, dx_p, dn_p, partial_p, a.n, chunks, a.time);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (!mask[2]) return;
      time_grad_finalize_kernel<4><<<finalize_blocks(a.rows), kThreads, 0, stream>>>(
          partial_p, a.rows, chunks, a.time, dt.data_ptr());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {dx, dn, dt};
}

// pred may have any float dtype (P); x and noise share theirs (X). With
// float64 on one side only, the other is converted (see paired_with).
Tensor velocity_mse(const Tensor& pred_, const Tensor& x_, const Tensor& noise_, const Tensor& t,
                    int64_t schedule) {
  constexpr const char* op = "velocity_mse";
  const LossArgs a = loss_args(op, pred_, x_, noise_, t, schedule);
  const c10::cuda::CUDAGuard guard(a.x.device());
  const auto acc_type = a.acc;
  const Tensor &pred = a.pred, &x = a.x, &noise = a.noise;
  Tensor loss = at::empty({a.rows}, x.options().dtype(acc_type));
  if (a.rows == 0) return loss;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  with_loss_types(pred.scalar_type(), x.scalar_type(), [&](auto tp, auto tx) {
    using p_t = typename decltype(tp)::type;
    using x_t = typename decltype(tx)::type;
    using acc_t = at::opmath_type<x_t>;
    constexpr int kWide = kVecOfWidest<p_t, x_t>;
    const p_t* p = pred.const_data_ptr<p_t>();
    const x_t* xp = x.const_data_ptr<x_t>();
    const x_t* e = noise.const_data_ptr<x_t>();
    auto launch = [&](auto v) {
      constexpr int kVec = decltype(v)::value;
      const int64_t chunks = chunks_for<kVec>(a.n);
      check_grid(op, a.rows * chunks);
      Tensor partial = at::empty({a.rows * chunks}, x.options().dtype(at::kDouble));
      velocity_mse_kernel<p_t, x_t, kVec><<<a.rows * chunks, kThreads, 0, stream>>>(
          p, xp, e, partial.mutable_data_ptr<double>(), a.n, chunks, a.time);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      mean_finalize_kernel<acc_t><<<a.rows, kThreads, 0, stream>>>(
          partial.const_data_ptr<double>(), chunks, a.n, loss.mutable_data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (a.n % kWide == 0 && packs_aligned<kWide>(p, xp, e)) {
      launch(std::integral_constant<int, kWide>{});
    } else {
      launch(std::integral_constant<int, 1>{});
    }
  });
  return loss;
}

// Gradients in each input's own dtype: dpred in P, dx and dnoise in X.
std::tuple<Tensor, Tensor, Tensor, Tensor> velocity_mse_backward(
    const Tensor& grad_, const Tensor& pred_, const Tensor& x_, const Tensor& noise_,
    const Tensor& t, int64_t schedule, std::array<bool, 4> mask) {
  constexpr const char* op = "velocity_mse_backward";
  const LossArgs a = loss_args(op, pred_, x_, noise_, t, schedule);
  const c10::cuda::CUDAGuard guard(a.x.device());
  const auto acc_type = a.acc;
  const Tensor grad = per_sample_grad(op, grad_, a.x, acc_type);
  const Tensor &pred = a.pred, &x = a.x, &noise = a.noise;
  Tensor dp = empty_if(mask[0], pred), dx = empty_if(mask[1], x), dn = empty_if(mask[2], x);
  Tensor dt = mask[3] ? at::empty(t.sizes(), t.options()) : at::empty({0}, t.options());
  if (a.rows > 0) {
    const auto stream = c10::cuda::getCurrentCUDAStream();
    with_loss_types(pred.scalar_type(), x.scalar_type(), [&](auto tp, auto tx) {
      using p_t = typename decltype(tp)::type;
      using x_t = typename decltype(tx)::type;
      using acc_t = at::opmath_type<x_t>;
      constexpr int kWide = kVecOfWidest<p_t, x_t>;
      const p_t* p = pred.const_data_ptr<p_t>();
      const x_t* xp = x.const_data_ptr<x_t>();
      const x_t* e = noise.const_data_ptr<x_t>();
      p_t* dp_p = out_ptr<p_t>(dp);
      x_t* dx_p = out_ptr<x_t>(dx);
      x_t* dn_p = out_ptr<x_t>(dn);
      auto launch = [&](auto v) {
        constexpr int kVec = decltype(v)::value;
        const int64_t chunks = chunks_for<kVec>(a.n);
        check_grid(op, a.rows * chunks);
        Tensor partial =
            at::empty({mask[3] ? a.rows * chunks * 2 : 0}, x.options().dtype(at::kDouble));
        double* partial_p = mask[3] ? partial.mutable_data_ptr<double>() : nullptr;
        velocity_mse_backward_kernel<p_t, x_t, kVec><<<a.rows * chunks, kThreads, 0, stream>>>(
            grad.const_data_ptr<acc_t>(), grad.stride(0), p, xp, e, dp_p, dx_p, dn_p, partial_p,
            a.n, chunks, a.time);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        if (!mask[3]) return;
        time_grad_finalize_kernel<2><<<finalize_blocks(a.rows), kThreads, 0, stream>>>(
            partial_p, a.rows, chunks, a.time, dt.data_ptr());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      if (a.n % kWide == 0 && packs_aligned<kWide>(p, xp, e, dp_p, dx_p, dn_p)) {
        launch(std::integral_constant<int, kWide>{});
      } else {
        launch(std::integral_constant<int, 1>{});
      }
    });
  }
  return {as_dtype(dp, a.pred_dtype), as_dtype(dx, a.x_dtype), as_dtype(dn, a.x_dtype), dt};
}

// pred (P) and target (Q) in any float dtypes.
Tensor mse(const Tensor& pred_, const Tensor& target_) {
  constexpr const char* op = "mse";
  check_mse_args(op, pred_, target_);
  const c10::cuda::CUDAGuard guard(pred_.device());
  const auto acc_type = loss_acc_type(pred_.scalar_type(), target_.scalar_type());
  const Tensor pred = paired_with(pred_, acc_type).contiguous();
  const Tensor target = paired_with(target_, acc_type).contiguous();
  Tensor out = at::empty({}, pred.options().dtype(acc_type));
  const int64_t n = pred.numel();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  with_loss_types(pred.scalar_type(), target.scalar_type(), [&](auto tp, auto tq) {
    using p_t = typename decltype(tp)::type;
    using q_t = typename decltype(tq)::type;
    using acc_t = at::opmath_type<p_t>;
    constexpr int kWide = kVecOfWidest<p_t, q_t>;
    const p_t* p = pred.const_data_ptr<p_t>();
    const q_t* q = target.const_data_ptr<q_t>();
    auto launch = [&](auto v) {
      constexpr int kVec = decltype(v)::value;
      const int64_t chunks = chunks_for<kVec>(n);
      check_grid(op, chunks);
      Tensor partial = at::empty({chunks}, pred.options().dtype(at::kDouble));
      mse_kernel<p_t, q_t, kVec>
          <<<chunks, kThreads, 0, stream>>>(p, q, partial.mutable_data_ptr<double>(), n);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      mean_finalize_kernel<acc_t><<<1, kThreads, 0, stream>>>(
          partial.const_data_ptr<double>(), chunks, n, out.mutable_data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (n % kWide == 0 && packs_aligned<kWide>(p, q)) {
      launch(std::integral_constant<int, kWide>{});
    } else {
      launch(std::integral_constant<int, 1>{});
    }
  });
  return out;
}

std::tuple<Tensor, Tensor> mse_backward(const Tensor& grad_, const Tensor& pred_,
                                        const Tensor& target_, std::array<bool, 2> mask) {
  constexpr const char* op = "mse_backward";
  check_mse_args(op, pred_, target_);
  const auto acc_type = loss_acc_type(pred_.scalar_type(), target_.scalar_type());
  const Tensor grad = scalar_grad(op, grad_, pred_, acc_type);
  const c10::cuda::CUDAGuard guard(pred_.device());
  const Tensor pred = paired_with(pred_, acc_type).contiguous();
  const Tensor target = paired_with(target_, acc_type).contiguous();
  Tensor dp = empty_if(mask[0], pred), dq = empty_if(mask[1], target);
  const int64_t n = pred.numel();
  if (n > 0 && (mask[0] || mask[1])) {
    const auto stream = c10::cuda::getCurrentCUDAStream();
    with_loss_types(pred.scalar_type(), target.scalar_type(), [&](auto tp, auto tq) {
      using p_t = typename decltype(tp)::type;
      using q_t = typename decltype(tq)::type;
      using acc_t = at::opmath_type<p_t>;
      constexpr int kWide = kVecOfWidest<p_t, q_t>;
      const p_t* p = pred.const_data_ptr<p_t>();
      const q_t* q = target.const_data_ptr<q_t>();
      p_t* dp_p = out_ptr<p_t>(dp);
      q_t* dq_p = out_ptr<q_t>(dq);
      auto launch = [&](auto v) {
        constexpr int kVec = decltype(v)::value;
        check_grid(op, chunks_for<kVec>(n));
        mse_backward_kernel<p_t, q_t, kVec><<<chunks_for<kVec>(n), kThreads, 0, stream>>>(
            grad.const_data_ptr<acc_t>(), p, q, dp_p, dq_p, n);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      if (n % kWide == 0 && packs_aligned<kWide>(p, q, dp_p, dq_p)) {
        launch(std::integral_constant<int, kWide>{});
      } else {
        launch(std::integral_constant<int, 1>{});
      }
    });
  }
  return {as_dtype(dp, pred_.scalar_type()), as_dtype(dq, target_.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(sit_ext, CUDA, m) {
  m.impl("interpolant", &interpolant);
  m.impl("interpolant_backward", &interpolant_backward);
  m.impl("velocity_mse", &velocity_mse);
  m.impl("velocity_mse_backward", &velocity_mse_backward);
  m.impl("mse", &mse);
  m.impl("mse_backward", &mse_backward);
}

}  // namespace sit_ext::cuda
