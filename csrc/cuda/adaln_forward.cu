// CUDA forward kernels of the AdaLN-Zero family: ln_modulate,
// gated_residual_ln_modulate and gated_residual (layout and dtypes: adaln.cuh).
//
// The row mean is x0 + mean(x - x0), with x0 the row's first element, and the
// variance is taken about that mean: a constant row normalises to exactly 0,
// and a large mean costs no accuracy (the CPU kernels do the same).
#include "adaln.cuh"

namespace sit_ext::cuda {
namespace {

using at::Tensor;

constexpr int kForwardThreads = 1024;  // resident rows up to kElems * 1024 = 8192 elements
constexpr int kForwardRows = 2;        // rows a resident block normalises at once

// x_out = x + gate (h + bias) (kResidual), y = LN(x_out) (1 + scale) + shift, for
// kForwardRows rows per block, each read once.
template <typename x_t, typename l_t, typename y_t, int kVec, bool kResidual>
__global__ void __launch_bounds__(kForwardThreads)
    adaln_forward_kernel(const x_t* __restrict__ x, const l_t* __restrict__ h, ModArgs<l_t> mod,
                         x_t* __restrict__ x_out, y_t* __restrict__ y,
                         at::opmath_type<x_t>* __restrict__ mean,
                         at::opmath_type<x_t>* __restrict__ rstd, int64_t rows, int64_t tokens,
                         int64_t dim, double eps) {
  using acc_t = at::opmath_type<x_t>;
  constexpr int kPacks = kElems / kVec, kRows = kForwardRows;
  __shared__ acc_t first[kRows];
  const int64_t packs = dim / kVec, row0 = int64_t(blockIdx.x) * kRows;
  acc_t v[kRows][kPacks][kVec];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const int64_t row = row0 + r, b = row / tokens;
#pragma unroll
    for (int k = 0; k < kPacks; ++k) {
      const int64_t p = threadIdx.x + int64_t(k) * blockDim.x;
      Pack<x_t, kVec> xv{};
      if (row < rows && p < packs) {
        const int64_t o = row * dim + p * kVec;
        xv = load_pack<kVec>(x + o);
        if constexpr (kResidual) {
          const auto hv = load_pack<kVec>(h + o);
          const auto bv = load_bias<kVec>(mod, p * kVec);
          const auto gv = load_pack<kVec>(mod.gate + b * mod.gate_stride + p * kVec);
#pragma unroll
          for (int j = 0; j < kVec; ++j) {
            // Round x_out to its dtype first: backward normalises the stored x_out.
            xv.v[j] = x_t(gated_residual_value(acc_t(xv.v[j]), acc_t(gv.v[j]),
                                               acc_t(hv.v[j]) + acc_t(bv.v[j])));
          }
          store_pack<kVec>(x_out + o, xv);
        }
      }
#pragma unroll
      for (int j = 0; j < kVec; ++j) v[r][k][j] = acc_t(xv.v[j]);
    }
    if (threadIdx.x == 0) first[r] = v[r][0][0];  // thread 0 owns element 0
  }
  __syncthreads();
  acc_t sums[kRows], x0[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    x0[r] = first[r];
    sums[r] = 0;
#pragma unroll
    for (int k = 0; k < kPacks; ++k) {
      if (threadIdx.x + int64_t(k) * blockDim.x >= packs) continue;
#pragma unroll
      for (int j = 0; j < kVec; ++j) sums[r] += v[r][k][j] - x0[r];
    }
  }
  block_allreduce(sums);
  acc_t mu[kRows];
  RowCentre<acc_t> ctr[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    mu[r] = x0[r] + sums[r] / acc_t(dim);
    ctr[r] = row_centre(mu[r], x0[r], sums[r] / acc_t(dim));
    sums[r] = 0;
#pragma unroll
    for (int k = 0; k < kPacks; ++k) {
      if (threadIdx.x + int64_t(k) * blockDim.x >= packs) continue;
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        const acc_t d = centred(v[r][k][j], ctr[r].c0, ctr[r].c1);
        sums[r] += d * d;
      }
    }
  }
  block_allreduce(sums);
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const int64_t row = row0 + r, b = row / tokens;
    if (row >= rows) continue;
    const acc_t rs = acc_t(1) / ::sqrt(sums[r] / acc_t(dim) + acc_t(eps));
    if (threadIdx.x == 0) {
      mean[row] = mu[r];
      rstd[row] = rs;
    }
#pragma unroll
    for (int k = 0; k < kPacks; ++k) {
      const int64_t p = threadIdx.x + int64_t(k) * blockDim.x;
      if (p >= packs) continue;
      const auto sh = load_pack<kVec>(mod.shift + b * mod.shift_stride + p * kVec);
      const auto sc = load_pack<kVec>(mod.scale + b * mod.scale_stride + p * kVec);
      Pack<y_t, kVec> out;
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        out.v[j] = y_t(modulate_value(centred(v[r][k][j], ctr[r].c0, ctr[r].c1) * rs,
                                      acc_t(sh.v[j]), acc_t(sc.v[j])));
      }
      store_pack<kVec>(y + row * dim + p * kVec, out);
    }
  }
}

// The same for rows too long to keep in registers: one row per block, read
// (x_out: written, then read back by the same thread) once per pass.
template <typename x_t, typename l_t, typename y_t, int kVec, bool kResidual>
__global__ void __launch_bounds__(kForwardThreads)
    adaln_forward_streamed_kernel(const x_t* __restrict__ x, const l_t* __restrict__ h,
                                  ModArgs<l_t> mod, x_t* __restrict__ x_out, y_t* __restrict__ y,
                                  at::opmath_type<x_t>* __restrict__ mean,
                                  at::opmath_type<x_t>* __restrict__ rstd, int64_t tokens,
                                  int64_t dim, double eps) {
  using acc_t = at::opmath_type<x_t>;
  const int64_t row = blockIdx.x, b = row / tokens, packs = dim / kVec, o = row * dim;
  const x_t* src = kResidual ? x_out + o : x + o;
  if constexpr (kResidual) {
    for (int64_t p = threadIdx.x; p < packs; p += blockDim.x) {
      auto xv = load_pack<kVec>(x + o + p * kVec);
      const auto hv = load_pack<kVec>(h + o + p * kVec);
      const auto bv = load_bias<kVec>(mod, p * kVec);
      const auto gv = load_pack<kVec>(mod.gate + b * mod.gate_stride + p * kVec);
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        xv.v[j] = x_t(
            gated_residual_value(acc_t(xv.v[j]), acc_t(gv.v[j]), acc_t(hv.v[j]) + acc_t(bv.v[j])));
      }
      store_pack<kVec>(x_out + o + p * kVec, xv);
    }
    __syncthreads();  // element 0 of x_out, read by every thread below
  }
  const acc_t x0 = acc_t(src[0]);
  acc_t s[1] = {0};
  for (int64_t p = threadIdx.x; p < packs; p += blockDim.x) {
    const auto xv = load_pack<kVec>(src + p * kVec);
#pragma unroll
    for (int j = 0; j < kVec; ++j) s[0] += acc_t(xv.v[j]) - x0;
  }
  block_allreduce(s);
  const acc_t mu = x0 + s[0] / acc_t(dim);
  const RowCentre<acc_t> ctr = row_centre(mu, x0, s[0] / acc_t(dim));
  s[0] = 0;
  for (int64_t p = threadIdx.x; p < packs; p += blockDim.x) {
    const auto xv = load_pack<kVec>(src + p * kVec);
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      const acc_t d = centred(acc_t(xv.v[j]), ctr.c0, ctr.c1);
      s[0] += d * d;
    }
  }
  block_allreduce(s);
  const acc_t rs = acc_t(1) / ::sqrt(s[0] / acc_t(dim) + acc_t(eps));
  if (threadIdx.x == 0) {
    mean[row] = mu;
    rstd[row] = rs;
  }
  for (int64_t p = threadIdx.x; p < packs; p += blockDim.x) {
    const auto xv = load_pack<kVec>(src + p * kVec);
    const auto sh = load_pack<kVec>(mod.shift + b * mod.shift_stride + p * kVec);
    const auto sc = load_pack<kVec>(mod.scale + b * mod.scale_stride + p * kVec);
    Pack<y_t, kVec> out;
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      out.v[j] = y_t(modulate_value(centred(acc_t(xv.v[j]), ctr.c0, ctr.c1) * rs, acc_t(sh.v[j]),
                                    acc_t(sc.v[j])));
    }
    store_pack<kVec>(y + o + p * kVec, out);
  }
}

template <typename x_t, typename l_t, int kVec>
__global__ void gated_residual_kernel(const x_t* __restrict__ x, const l_t* __restrict__ h,
                                      const l_t* __restrict__ gate, int64_t gate_stride,
                                      x_t* __restrict__ out, int64_t total_packs, int64_t tokens,
                                      int64_t dim) {
  using acc_t = at::opmath_type<x_t>;
  const int64_t packs = dim / kVec;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total_packs;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = i / packs, p = i % packs, o = row * dim + p * kVec;
    const auto xv = load_pack<kVec>(x + o);
    const auto hv = load_pack<kVec>(h + o);
    const auto gv = load_pack<kVec>(gate + (row / tokens) * gate_stride + p * kVec);
    Pack<x_t, kVec> r;
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      r.v[j] = x_t(gated_residual_value(acc_t(xv.v[j]), acc_t(gv.v[j]), acc_t(hv.v[j])));
    }
    store_pack<kVec>(out + o, r);
  }
}

// -------------------------------------------------------------- host side

void adaln_forward(const char* op, const AdalnArgs& a, const Tensor& gate, const Tensor& shift,
                   const Tensor& scale, double eps, Tensor& x_out, Tensor& y, Tensor& mean,
                   Tensor& rstd) {
  const int64_t rows = a.batch * a.tokens;
  if (rows == 0) return;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  with_adaln_types(a.x.scalar_type(), *a.low, y.scalar_type(), [&](auto tx, auto tl, auto ty) {
    using x_t = typename decltype(tx)::type;
    using l_t = typename decltype(tl)::type;
    using y_t = typename decltype(ty)::type;
    using acc_t = at::opmath_type<x_t>;
    constexpr int kWide = kVecOfWidest<x_t, l_t, y_t>;
    const ModArgs<l_t> mod = mod_args<l_t>(gate, shift, scale, a.bias);
    const x_t* x = in_ptr<x_t>(a.x);
    const l_t* h = in_ptr<l_t>(a.h);
    x_t* xo = out_ptr<x_t>(x_out);
    y_t* yp = out_ptr<y_t>(y);
    acc_t *mp = mean.mutable_data_ptr<acc_t>(), *rp = rstd.mutable_data_ptr<acc_t>();
    with_pack_width<kWide>(packs_fit<kWide>(a.dim, mod, x, h, xo, yp), [&](auto vec) {
      constexpr int kVec = decltype(vec)::value;
      const int threads = resident_threads<kVec>(a.dim, kForwardThreads);
      const bool residual = a.h.defined();
      if (threads > 0) {
        const int64_t blocks = ceil_div(rows, kForwardRows);
        check_grid(op, blocks);
        auto kernel = residual ? adaln_forward_kernel<x_t, l_t, y_t, kVec, true>
                               : adaln_forward_kernel<x_t, l_t, y_t, kVec, false>;
        kernel<<<blocks, threads, 0, stream>>>(x, h, mod, xo, yp, mp, rp, rows, a.tokens, a.dim,
                                               eps);
      } else {
        check_grid(op, rows);
        auto kernel = residual ? adaln_forward_streamed_kernel<x_t, l_t, y_t, kVec, true>
                               : adaln_forward_streamed_kernel<x_t, l_t, y_t, kVec, false>;
        kernel<<<rows, kForwardThreads, 0, stream>>>(x, h, mod, xo, yp, mp, rp, a.tokens, a.dim,
                                                     eps);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

std::tuple<Tensor, Tensor, Tensor> ln_modulate(const Tensor& x, const Tensor& shift,
                                               const Tensor& scale, double eps,
                                               std::optional<at::ScalarType> out_dtype) {
  constexpr const char* op = "ln_modulate";
  AdalnForward f = adaln_forward_args(op, false, x, Tensor(), Tensor(), shift, scale, out_dtype);
  const c10::cuda::CUDAGuard guard(f.a.x.device());
  adaln_forward(op, f.a, Tensor(), shift, scale, eps, f.x_out, f.y, f.mean, f.rstd);
  return {f.y, f.mean, f.rstd};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> gated_residual_ln_modulate(
    const Tensor& x, const Tensor& h, const Tensor& gate, const Tensor& shift, const Tensor& scale,
    double eps, std::optional<at::ScalarType> out_dtype, const std::optional<Tensor>& bias) {
  constexpr const char* op = "gated_residual_ln_modulate";
  AdalnForward f = adaln_forward_args(op, true, x, h, gate, shift, scale, out_dtype, bias);
  const c10::cuda::CUDAGuard guard(f.a.x.device());
  adaln_forward(op, f.a, gate, shift, scale, eps, f.x_out, f.y, f.mean, f.rstd);
  return {f.x_out, f.y, f.mean, f.rstd};
}

Tensor gated_residual(const Tensor& x_, const Tensor& h_, const Tensor& gate) {
  constexpr const char* op = "gated_residual";
  AdalnArgs a = adaln_args_with_h(op, "x", x_, h_);
  check_modulation(op, "gate", gate, a);
  const c10::cuda::CUDAGuard guard(a.x.device());
  Tensor out = at::empty_like(a.x);
  if (out.numel() == 0) return out;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  with_residual_types(a.x.scalar_type(), *a.low, [&](auto tx, auto tl) {
    using x_t = typename decltype(tx)::type;
    using l_t = typename decltype(tl)::type;
    constexpr int kWide = kVecOfWidest<x_t, l_t>;
    const x_t* x = in_ptr<x_t>(a.x);
    const l_t *h = in_ptr<l_t>(a.h), *g = in_ptr<l_t>(gate);
    x_t* o = out_ptr<x_t>(out);
    const bool wide =
        a.dim % kWide == 0 && gate.stride(0) % kWide == 0 && packs_aligned<kWide>(x, h, g, o);
    with_pack_width<kWide>(wide, [&](auto vec) {
      constexpr int kVec = decltype(vec)::value;
      const int64_t total = out.numel() / kVec;
      const int64_t blocks =
          std::min<int64_t>(ceil_div(total, kThreads), 16 * sm_count(out.device()));
      gated_residual_kernel<x_t, l_t, kVec>
          <<<blocks, kThreads, 0, stream>>>(x, h, g, gate.stride(0), o, total, a.tokens, a.dim);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(sit_ext, CUDA, m) {
  m.impl("ln_modulate", &ln_modulate);
  m.impl("gated_residual_ln_modulate", &gated_residual_ln_modulate);
  m.impl("gated_residual", &gated_residual);
}

}  // namespace sit_ext::cuda
