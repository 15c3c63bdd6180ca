// CUDA kernels of the AdaLN-Zero family: ln_modulate, gated_residual_ln_modulate
// and gated_residual, forward and backward.
//
// Layout: a block's threads are sized to D. Thread j owns packs j, j + threads,
// ... (kPacks of them) of kVec elements: 16-byte packs when D and every
// pointer and stride allow, single elements otherwise. A block handles kRows
// rows at a time and keeps them in registers, so each row is read once; the
// row statistics come from block reductions in a fixed order.
//
// Backward: a block handles a chunk of rows of one sample. Each thread sums
// its columns' dshift/dscale/dgate terms over the chunk in registers and writes
// them to a partial buffer; a second kernel adds the chunks in order. No
// atomics: the same bits on every run.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "cuda_utils.cuh"
#include "sit_ext/adaln_math.h"
#include "sit_ext/checks.h"

namespace sit_ext::cuda {
namespace {

using at::Tensor;

// ---------------------------------------------------------------- configs

constexpr int kMaxThreads = 512;  // with __launch_bounds__, at most 128 registers a thread

template <int kPacks_>
struct RowsFor {
  // Rows in registers at once: more rows amortise the block reductions, fewer
  // keep registers in check when each thread owns many packs.
  static constexpr int value = kPacks_ <= 2 ? 4 : 1;
};

// Sums v[0..N) over the block, in a fixed order; every thread gets the totals.
template <typename acc_t, int N>
__device__ __forceinline__ void block_allreduce(acc_t (&v)[N]) {
  __shared__ acc_t smem[N][32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
#pragma unroll
  for (int n = 0; n < N; ++n) {
    for (int off = 16; off > 0; off /= 2) v[n] += __shfl_xor_sync(0xffffffffu, v[n], off);
    if (lane == 0) smem[n][warp] = v[n];
  }
  __syncthreads();
#pragma unroll
  for (int n = 0; n < N; ++n) {
    acc_t s = 0;
    for (int w = 0; w < warps; ++w) s += smem[n][w];
    v[n] = s;
  }
  __syncthreads();
}

// Arguments shared by the forward and backward kernels.
template <typename scalar_t>
struct ModArgs {
  const scalar_t* gate;
  const scalar_t* shift;
  const scalar_t* scale;
  int64_t gate_stride, shift_stride, scale_stride;
};

// ---------------------------------------------------------------- forward

template <typename scalar_t, int kVec, int kPacks, bool kResidual>
__global__ void __launch_bounds__(kMaxThreads) adaln_forward_kernel(const scalar_t* __restrict__ x,
                                     const scalar_t* __restrict__ h, ModArgs<scalar_t> mod,
                                     scalar_t* __restrict__ x_out, scalar_t* __restrict__ y,
                                     at::opmath_type<scalar_t>* __restrict__ mean,
                                     at::opmath_type<scalar_t>* __restrict__ rstd, int64_t rows,
                                     int64_t tokens, int64_t dim, double eps) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kRows = RowsFor<kPacks>::value;
  const int64_t packs = dim / kVec, row0 = int64_t(blockIdx.x) * kRows;
  acc_t v[kRows][kPacks][kVec];
  acc_t sums[kRows];

#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const int64_t row = row0 + r, b = row / tokens;
    sums[r] = 0;
#pragma unroll
    for (int k = 0; k < kPacks; ++k) {
      const int64_t p = threadIdx.x + int64_t(k) * blockDim.x;
      const bool valid = row < rows && p < packs;
      Pack<scalar_t, kVec> xv{};
      if (valid) {
        const int64_t o = row * dim + p * kVec;
        xv = load_pack<kVec>(x + o);
        if constexpr (kResidual) {
          const auto hv = load_pack<kVec>(h + o);
          const auto gv = load_pack<kVec>(mod.gate + b * mod.gate_stride + p * kVec);
#pragma unroll
          for (int j = 0; j < kVec; ++j) {
            // Round x_out to its dtype first: backward normalises the stored x_out.
            xv.v[j] = scalar_t(gated_residual_value(acc_t(xv.v[j]), acc_t(gv.v[j]), acc_t(hv.v[j])));
          }
          store_pack<kVec>(x_out + o, xv);
        }
      }
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        v[r][k][j] = acc_t(xv.v[j]);
        sums[r] += v[r][k][j];
      }
    }
  }
  block_allreduce(sums);
  acc_t mu[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    mu[r] = sums[r] / acc_t(dim);
    sums[r] = 0;
#pragma unroll
    for (int k = 0; k < kPacks; ++k) {
      if (threadIdx.x + int64_t(k) * blockDim.x >= packs) continue;
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        const acc_t d = v[r][k][j] - mu[r];
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
      Pack<scalar_t, kVec> out;
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        out.v[j] = scalar_t(modulate_value((v[r][k][j] - mu[r]) * rs, acc_t(sh.v[j]), acc_t(sc.v[j])));
      }
      store_pack<kVec>(y + row * dim + p * kVec, out);
    }
  }
}

// --------------------------------------------------------------- backward

// Pointers of one backward launch. Null outputs are not computed; partial is
// [B * chunks, 3, D] (dshift, dscale, dgate) or null.
template <typename scalar_t>
struct BackwardArgs {
  const scalar_t* dy;
  const scalar_t* xo;   // the normalised input: x_out, or x for ln_modulate
  const scalar_t* dxo;  // gradient of x_out, or null
  const scalar_t* h;
  const at::opmath_type<scalar_t>* mean;
  const at::opmath_type<scalar_t>* rstd;
  scalar_t* dx;
  scalar_t* dh;
  at::opmath_type<scalar_t>* partial;
  bool need_shift, need_scale, need_gate;
};

template <typename scalar_t, int kVec, int kPacks, bool kResidual>
__global__ void __launch_bounds__(kMaxThreads) adaln_backward_kernel(BackwardArgs<scalar_t> a, ModArgs<scalar_t> mod,
                                      int64_t tokens, int64_t dim, int64_t chunk_rows,
                                      int64_t chunks) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kRows = RowsFor<kPacks>::value;
  const int64_t packs = dim / kVec, b = blockIdx.x / chunks;
  const int64_t first = b * tokens + (blockIdx.x % chunks) * chunk_rows;
  const int64_t last = b * tokens + min64(tokens, (blockIdx.x % chunks + 1) * chunk_rows);
  // LayerNorm over a single element is constant: no gradient reaches x.
  const acc_t ln_on = dim == 1 ? acc_t(0) : acc_t(1);
  acc_t acc[3][kPacks][kVec] = {};
  acc_t one_plus_scale[kPacks][kVec];
#pragma unroll
  for (int k = 0; k < kPacks; ++k) {
    const int64_t p = threadIdx.x + int64_t(k) * blockDim.x;
    Pack<scalar_t, kVec> sc{};
    if (p < packs) sc = load_pack<kVec>(mod.scale + b * mod.scale_stride + p * kVec);
#pragma unroll
    for (int j = 0; j < kVec; ++j) one_plus_scale[k][j] = acc_t(1) + acc_t(sc.v[j]);
  }

  for (int64_t row0 = first; row0 < last; row0 += kRows) {
    acc_t dyv[kRows][kPacks][kVec], xhat[kRows][kPacks][kVec], sums[2 * kRows];
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const int64_t row = row0 + r;
      const bool row_ok = row < last;
      const acc_t mu = row_ok ? a.mean[row] : acc_t(0), rs = row_ok ? a.rstd[row] : acc_t(0);
      sums[2 * r] = sums[2 * r + 1] = 0;
#pragma unroll
      for (int k = 0; k < kPacks; ++k) {
        const int64_t p = threadIdx.x + int64_t(k) * blockDim.x;
        Pack<scalar_t, kVec> g{}, xv{};
        if (row_ok && p < packs) {
          g = load_pack<kVec>(a.dy + row * dim + p * kVec);
          xv = load_pack<kVec>(a.xo + row * dim + p * kVec);
        }
#pragma unroll
        for (int j = 0; j < kVec; ++j) {
          dyv[r][k][j] = acc_t(g.v[j]);
          xhat[r][k][j] = (acc_t(xv.v[j]) - mu) * rs;  // padding has dy = 0: adds nothing
          const acc_t dxhat = dyv[r][k][j] * one_plus_scale[k][j];
          sums[2 * r] += dxhat;
          sums[2 * r + 1] += dxhat * xhat[r][k][j];
        }
      }
    }
    block_allreduce(sums);
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const int64_t row = row0 + r;
      if (row >= last) continue;
      const acc_t rs = a.rstd[row] * ln_on;
      const acc_t mean_dxhat = sums[2 * r] / acc_t(dim), mean_dxhat_xhat = sums[2 * r + 1] / acc_t(dim);
#pragma unroll
      for (int k = 0; k < kPacks; ++k) {
        const int64_t p = threadIdx.x + int64_t(k) * blockDim.x;
        if (p >= packs) continue;
        const int64_t o = row * dim + p * kVec;
        Pack<scalar_t, kVec> dxo{}, hv{}, gv{}, out_dx, out_dh;
        if (a.dxo) dxo = load_pack<kVec>(a.dxo + o);
        if constexpr (kResidual) {
          hv = load_pack<kVec>(a.h + o);
          gv = load_pack<kVec>(mod.gate + b * mod.gate_stride + p * kVec);
        }
#pragma unroll
        for (int j = 0; j < kVec; ++j) {
          const acc_t dyj = dyv[r][k][j], xh = xhat[r][k][j];
          acc[0][k][j] += dyj;
          acc[1][k][j] += dyj * xh;
          acc_t total = layer_norm_grad(dyj * one_plus_scale[k][j], xh, mean_dxhat, mean_dxhat_xhat, rs);
          if (a.dxo) total += acc_t(dxo.v[j]);
          out_dx.v[j] = scalar_t(total);
          if constexpr (kResidual) {
            out_dh.v[j] = scalar_t(acc_t(gv.v[j]) * total);
            acc[2][k][j] += total * acc_t(hv.v[j]);
          }
        }
        if (a.dx) store_pack<kVec>(a.dx + o, out_dx);
        if (kResidual && a.dh) store_pack<kVec>(a.dh + o, out_dh);
      }
    }
  }
  if (a.partial == nullptr) return;
  const bool need[3] = {a.need_shift, a.need_scale, a.need_gate};
#pragma unroll
  for (int q = 0; q < 3; ++q) {
    if (!need[q]) continue;
#pragma unroll
    for (int k = 0; k < kPacks; ++k) {
      const int64_t p = threadIdx.x + int64_t(k) * blockDim.x;
      if (p >= packs) continue;
#pragma unroll
      for (int j = 0; j < kVec; ++j) a.partial[(int64_t(blockIdx.x) * 3 + q) * dim + p * kVec + j] = acc[q][k][j];
    }
  }
}

// dh = gate grad and the chunk's partial sums of grad h (for dgate).
template <typename scalar_t, int kVec, int kPacks>
__global__ void __launch_bounds__(kMaxThreads) gated_residual_backward_kernel(const scalar_t* __restrict__ grad,
                                               const scalar_t* __restrict__ h,
                                               const scalar_t* __restrict__ gate,
                                               int64_t gate_stride, scalar_t* __restrict__ dh,
                                               at::opmath_type<scalar_t>* __restrict__ partial,
                                               int64_t tokens, int64_t dim, int64_t chunk_rows,
                                               int64_t chunks) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t packs = dim / kVec, b = blockIdx.x / chunks;
  const int64_t first = b * tokens + (blockIdx.x % chunks) * chunk_rows;
  const int64_t last = b * tokens + min64(tokens, (blockIdx.x % chunks + 1) * chunk_rows);
#pragma unroll
  for (int k = 0; k < kPacks; ++k) {
    const int64_t p = threadIdx.x + int64_t(k) * blockDim.x;
    if (p >= packs) continue;
    const auto gv = load_pack<kVec>(gate + b * gate_stride + p * kVec);
    acc_t acc[kVec] = {};
    for (int64_t row = first; row < last; ++row) {
      const int64_t o = row * dim + p * kVec;
      const auto g = load_pack<kVec>(grad + o);
      Pack<scalar_t, kVec> out;
      Pack<scalar_t, kVec> hv{};
      if (partial) hv = load_pack<kVec>(h + o);
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        out.v[j] = scalar_t(acc_t(gv.v[j]) * acc_t(g.v[j]));
        acc[j] += acc_t(g.v[j]) * acc_t(hv.v[j]);
      }
      if (dh) store_pack<kVec>(dh + o, out);
    }
    if (partial) {
#pragma unroll
      for (int j = 0; j < kVec; ++j) partial[int64_t(blockIdx.x) * dim + p * kVec + j] = acc[j];
    }
  }
}

// out_q[b, d] = sum over chunks c of partial[b * chunks + c, q, d], in chunk order.
template <typename scalar_t>
__global__ void column_sums_kernel(const at::opmath_type<scalar_t>* __restrict__ partial,
                                   int64_t batch, int64_t chunks, int64_t stride_q, int64_t dim,
                                   scalar_t* out0, scalar_t* out1, scalar_t* out2) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= batch * dim) return;
  const int64_t b = i / dim, d = i % dim;
  scalar_t* outs[3] = {out0, out1, out2};
  for (int q = 0; q < 3; ++q) {
    if (outs[q] == nullptr) continue;
    double s = 0;
    for (int64_t c = 0; c < chunks; ++c) s += partial[((b * chunks + c) * stride_q + q) * dim + d];
    outs[q][i] = scalar_t(s);
  }
}

template <typename scalar_t, int kVec>
__global__ void gated_residual_kernel(const scalar_t* __restrict__ x,
                                      const scalar_t* __restrict__ h,
                                      const scalar_t* __restrict__ gate, int64_t gate_stride,
                                      scalar_t* __restrict__ out, int64_t total_packs,
                                      int64_t tokens, int64_t dim) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t packs = dim / kVec;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total_packs;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = i / packs, p = i % packs, o = row * dim + p * kVec;
    const auto xv = load_pack<kVec>(x + o), hv = load_pack<kVec>(h + o);
    const auto gv = load_pack<kVec>(gate + (row / tokens) * gate_stride + p * kVec);
    Pack<scalar_t, kVec> r;
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      r.v[j] = scalar_t(gated_residual_value(acc_t(xv.v[j]), acc_t(gv.v[j]), acc_t(hv.v[j])));
    }
    store_pack<kVec>(out + o, r);
  }
}

// -------------------------------------------------------------- host side

// The tiling of one launch: kVec, kPacks and the block size for this D.
struct Tiling {
  bool vectorized;
  int packs_per_thread;  // kPacks
  int threads;
};

template <typename scalar_t>
Tiling tiling(const char* op, int64_t dim, bool aligned) {
  constexpr int kVec = kVecOf<scalar_t>;
  auto threads_for = [](int64_t packs, int per) {
    return int(std::max<int64_t>(32, (ceil_div(packs, per) + 31) / 32 * 32));
  };
  if (!std::is_same_v<scalar_t, double> && aligned && dim % kVec == 0) {
    for (int per : {1, 4}) {
      if (dim / kVec <= per * kMaxThreads) return {true, per, threads_for(dim / kVec, per)};
    }
  }
  for (int per : {2, 32}) {
    if (dim <= per * kMaxThreads) return {false, per, threads_for(dim, per)};
  }
  TORCH_CHECK(false, "sit_ext.", op, ": D = ", dim, " is larger than the CUDA kernels support (",
              32 * kMaxThreads, ")");
  return {};
}

// Instantiates the kernel for the tiling chosen at run time.
template <typename scalar_t, typename Launch>
void with_tiling(const Tiling& t, const Launch& launch) {
  constexpr int kVec = kVecOf<scalar_t>;
  if (t.vectorized) {
    if constexpr (!std::is_same_v<scalar_t, double>) {
      if (t.packs_per_thread == 1) return launch(std::integral_constant<int, kVec>{}, std::integral_constant<int, 1>{});
      return launch(std::integral_constant<int, kVec>{}, std::integral_constant<int, 4>{});
    }
  }
  if (t.packs_per_thread == 2) return launch(std::integral_constant<int, 1>{}, std::integral_constant<int, 2>{});
  launch(std::integral_constant<int, 1>{}, std::integral_constant<int, 32>{});
}

// Vector loads need 16-byte aligned rows, also in the [B, D] modulation views.
bool rows_aligned(std::initializer_list<const void*> ptrs, std::initializer_list<int64_t> strides,
                  int64_t elem_size) {
  for (int64_t s : strides) {
    if ((s * elem_size) % 16 != 0) return false;
  }
  return aligned16(ptrs);
}

// Rows per backward block: enough blocks to fill the GPU about twice, and at
// least 16 rows so that the partial sums stay small next to the data.
int64_t chunk_rows_for(const AdalnArgs& a, int rows_per_step) {
  const int64_t want = ceil_div(a.batch * a.tokens, 2 * sm_count(a.x.device()));
  const int64_t rows = std::min(std::max<int64_t>(16, want), std::max<int64_t>(a.tokens, 1));
  return ceil_div(rows, rows_per_step) * rows_per_step;
}

// x_out = x + gate h (when h is defined), y = LN(x_out) (1 + scale) + shift.
void adaln_forward(const char* op, const AdalnArgs& a, const Tensor& gate, const Tensor& shift,
                   const Tensor& scale, double eps, Tensor& x_out, Tensor& y, Tensor& mean,
                   Tensor& rstd) {
  const int64_t rows = a.batch * a.tokens;
  if (rows == 0) return;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.x.scalar_type(), "adaln_forward", [&] {
    const ModArgs<scalar_t> mod{in_ptr<scalar_t>(gate), in_ptr<scalar_t>(shift), in_ptr<scalar_t>(scale),
                                gate.defined() ? gate.stride(0) : 0, shift.stride(0), scale.stride(0)};
    const scalar_t *x = in_ptr<scalar_t>(a.x), *h = in_ptr<scalar_t>(a.h);
    scalar_t *xo = out_ptr<scalar_t>(x_out), *yp = out_ptr<scalar_t>(y);
    const bool aligned = rows_aligned({x, h, xo, yp, mod.gate, mod.shift, mod.scale},
                                      {mod.gate_stride, mod.shift_stride, mod.scale_stride},
                                      sizeof(scalar_t));
    const Tiling t = tiling<scalar_t>(op, a.dim, aligned);
    with_tiling<scalar_t>(t, [&](auto vec, auto per) {
      constexpr int kVec = decltype(vec)::value, kPacks = decltype(per)::value;
      const int64_t blocks = ceil_div(rows, RowsFor<kPacks>::value);
      using acc_t = at::opmath_type<scalar_t>;
      if (a.h.defined()) {
        adaln_forward_kernel<scalar_t, kVec, kPacks, true><<<blocks, t.threads, 0, stream>>>(
            x, h, mod, xo, yp, mean.mutable_data_ptr<acc_t>(), rstd.mutable_data_ptr<acc_t>(), rows,
            a.tokens, a.dim, eps);
      } else {
        adaln_forward_kernel<scalar_t, kVec, kPacks, false><<<blocks, t.threads, 0, stream>>>(
            x, nullptr, mod, nullptr, yp, mean.mutable_data_ptr<acc_t>(), rstd.mutable_data_ptr<acc_t>(),
            rows, a.tokens, a.dim, eps);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

// The LayerNorm + modulate backward, with the gated residual when h is defined.
// Outputs not asked for are left empty.
void adaln_backward(const char* op, const AdalnArgs& a, const Tensor& dy, const Tensor& dxo,
                    const Tensor& gate, const Tensor& scale, const Tensor& mean,
                    const Tensor& rstd, Tensor& dx, Tensor& dh, Tensor& dgate, Tensor& dshift,
                    Tensor& dscale) {
  const bool need_cols = dgate.numel() > 0 || dshift.numel() > 0 || dscale.numel() > 0;
  if (a.batch == 0) return;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.x.scalar_type(), "adaln_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const ModArgs<scalar_t> mod{in_ptr<scalar_t>(gate), nullptr, in_ptr<scalar_t>(scale),
                                gate.defined() ? gate.stride(0) : 0, 0, scale.stride(0)};
    BackwardArgs<scalar_t> args{in_ptr<scalar_t>(dy), in_ptr<scalar_t>(a.x), in_ptr<scalar_t>(dxo),
                                in_ptr<scalar_t>(a.h), mean.const_data_ptr<acc_t>(),
                                rstd.const_data_ptr<acc_t>(), out_ptr<scalar_t>(dx), out_ptr<scalar_t>(dh),
                                nullptr, dshift.numel() > 0, dscale.numel() > 0, dgate.numel() > 0};
    const bool aligned = rows_aligned({args.dy, args.xo, args.dxo, args.h, args.dx, args.dh, mod.gate,
                                       mod.scale},
                                      {mod.gate_stride, mod.scale_stride}, sizeof(scalar_t));
    const Tiling t = tiling<scalar_t>(op, a.dim, aligned);
    with_tiling<scalar_t>(t, [&](auto vec, auto per) {
      constexpr int kVec = decltype(vec)::value, kPacks = decltype(per)::value;
      const int64_t chunk_rows = chunk_rows_for(a, RowsFor<kPacks>::value);
      const int64_t chunks = std::max<int64_t>(1, ceil_div(a.tokens, chunk_rows));
      Tensor partial;
      if (need_cols) {
        partial = at::empty({a.batch * chunks * 3 * a.dim}, mean.options());
        args.partial = partial.mutable_data_ptr<acc_t>();
      }
      if (a.h.defined()) {
        adaln_backward_kernel<scalar_t, kVec, kPacks, true><<<a.batch * chunks, t.threads, 0, stream>>>(
            args, mod, a.tokens, a.dim, chunk_rows, chunks);
      } else {
        adaln_backward_kernel<scalar_t, kVec, kPacks, false><<<a.batch * chunks, t.threads, 0, stream>>>(
            args, mod, a.tokens, a.dim, chunk_rows, chunks);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (!need_cols) return;
      column_sums_kernel<scalar_t><<<ceil_div(a.batch * a.dim, kThreads), kThreads, 0, stream>>>(
          args.partial, a.batch, chunks, 3, a.dim, out_ptr<scalar_t>(dshift), out_ptr<scalar_t>(dscale),
          out_ptr<scalar_t>(dgate));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

std::tuple<Tensor, Tensor, Tensor> ln_modulate(const Tensor& x_, const Tensor& shift,
                                               const Tensor& scale, double eps) {
  constexpr const char* op = "ln_modulate";
  const AdalnArgs a = adaln_args(op, "x", x_);
  check_modulation(op, "shift", shift, a);
  check_modulation(op, "scale", scale, a);
  const c10::cuda::CUDAGuard guard(a.x.device());
  Tensor y = at::empty_like(a.x), mean = stats_empty(a.x), rstd = stats_empty(a.x), none;
  adaln_forward(op, a, Tensor(), shift, scale, eps, none, y, mean, rstd);
  return {y, mean, rstd};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> gated_residual_ln_modulate(
    const Tensor& x_, const Tensor& h_, const Tensor& gate, const Tensor& shift,
    const Tensor& scale, double eps) {
  constexpr const char* op = "gated_residual_ln_modulate";
  const AdalnArgs a = adaln_args(op, "x", x_, h_);
  check_modulation(op, "gate", gate, a);
  check_modulation(op, "shift", shift, a);
  check_modulation(op, "scale", scale, a);
  const c10::cuda::CUDAGuard guard(a.x.device());
  Tensor x_out = at::empty_like(a.x), y = at::empty_like(a.x);
  Tensor mean = stats_empty(a.x), rstd = stats_empty(a.x);
  adaln_forward(op, a, gate, shift, scale, eps, x_out, y, mean, rstd);
  return {x_out, y, mean, rstd};
}

std::tuple<Tensor, Tensor, Tensor> ln_modulate_backward(const Tensor& grad_y, const Tensor& x_,
                                                        const Tensor& scale, const Tensor& mean,
                                                        const Tensor& rstd,
                                                        std::array<bool, 3> mask) {
  constexpr const char* op = "ln_modulate_backward";
  const AdalnArgs a = adaln_args(op, "x", x_);
  check_modulation(op, "scale", scale, a);
  check_like(op, "x", x_, "grad_y", grad_y);
  check_stats(op, mean, rstd, x_);
  const c10::cuda::CUDAGuard guard(a.x.device());
  Tensor dx = empty_if(mask[0], a.x), dshift = per_sample_empty(mask[1], a),
         dscale = per_sample_empty(mask[2], a), dh, dgate = per_sample_empty(false, a);
  adaln_backward(op, a, grad_y.contiguous(), Tensor(), Tensor(), scale, mean, rstd, dx, dh, dgate,
                 dshift, dscale);
  return {dx, dshift, dscale};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> gated_residual_ln_modulate_backward(
    const std::optional<Tensor>& grad_x_out, const Tensor& grad_y, const Tensor& x_out_,
    const Tensor& h_, const Tensor& gate, const Tensor& scale, const Tensor& mean,
    const Tensor& rstd, std::array<bool, 5> mask) {
  constexpr const char* op = "gated_residual_ln_modulate_backward";
  const AdalnArgs a = adaln_args(op, "x_out", x_out_, h_);
  check_modulation(op, "gate", gate, a);
  check_modulation(op, "scale", scale, a);
  check_like(op, "x_out", x_out_, "grad_y", grad_y);
  if (grad_x_out.has_value()) check_like(op, "x_out", x_out_, "grad_x_out", *grad_x_out);
  check_stats(op, mean, rstd, x_out_);
  const c10::cuda::CUDAGuard guard(a.x.device());
  Tensor dx = empty_if(mask[0], a.x), dh = empty_if(mask[1], a.x),
         dgate = per_sample_empty(mask[2], a), dshift = per_sample_empty(mask[3], a),
         dscale = per_sample_empty(mask[4], a);
  adaln_backward(op, a, grad_y.contiguous(), grad_x_out.has_value() ? grad_x_out->contiguous() : Tensor(),
                 gate, scale, mean, rstd, dx, dh, dgate, dshift, dscale);
  return {dx, dh, dgate, dshift, dscale};
}

Tensor gated_residual(const Tensor& x_, const Tensor& h_, const Tensor& gate) {
  constexpr const char* op = "gated_residual";
  const AdalnArgs a = adaln_args(op, "x", x_, h_);
  check_modulation(op, "gate", gate, a);
  const c10::cuda::CUDAGuard guard(a.x.device());
  Tensor out = at::empty_like(a.x);
  if (out.numel() == 0) return out;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.x.scalar_type(), op, [&] {
    const scalar_t *x = in_ptr<scalar_t>(a.x), *h = in_ptr<scalar_t>(a.h), *g = in_ptr<scalar_t>(gate);
    scalar_t* o = out_ptr<scalar_t>(out);
    const bool vec = a.dim % kVecOf<scalar_t> == 0 &&
                     rows_aligned({x, h, g, o}, {gate.stride(0)}, sizeof(scalar_t));
    with_vec<scalar_t>(vec, [&](auto v) {
      constexpr int kVec = decltype(v)::value;
      const int64_t total = out.numel() / kVec;
      const int64_t blocks = std::min<int64_t>(ceil_div(total, kThreads), 16 * sm_count(out.device()));
      gated_residual_kernel<scalar_t, kVec><<<blocks, kThreads, 0, stream>>>(
          x, h, g, gate.stride(0), o, total, a.tokens, a.dim);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

std::tuple<Tensor, Tensor> gated_residual_backward(const Tensor& grad_, const Tensor& h_,
                                                   const Tensor& gate, std::array<bool, 2> mask) {
  constexpr const char* op = "gated_residual_backward";
  const AdalnArgs a = adaln_args(op, "grad", grad_, h_);
  check_modulation(op, "gate", gate, a);
  const c10::cuda::CUDAGuard guard(a.x.device());
  Tensor dh = empty_if(mask[0], a.x), dgate = per_sample_empty(mask[1], a);
  if (a.batch == 0 || !(mask[0] || mask[1])) return {dh, dgate};
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.x.scalar_type(), op, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t *g = in_ptr<scalar_t>(a.x), *h = in_ptr<scalar_t>(a.h), *gt = in_ptr<scalar_t>(gate);
    scalar_t* dh_p = out_ptr<scalar_t>(dh);
    const bool aligned = rows_aligned({g, h, gt, dh_p}, {gate.stride(0)}, sizeof(scalar_t));
    const Tiling t = tiling<scalar_t>(op, a.dim, aligned);
    with_tiling<scalar_t>(t, [&](auto vec, auto per) {
      constexpr int kVec = decltype(vec)::value, kPacks = decltype(per)::value;
      const int64_t chunk_rows = chunk_rows_for(a, 1);
      const int64_t chunks = std::max<int64_t>(1, ceil_div(a.tokens, chunk_rows));
      Tensor partial = acc_empty({mask[1] ? a.batch * chunks * a.dim : 0}, a.x);
      acc_t* partial_p = mask[1] ? partial.mutable_data_ptr<acc_t>() : nullptr;
      gated_residual_backward_kernel<scalar_t, kVec, kPacks><<<a.batch * chunks, t.threads, 0, stream>>>(
          g, h, gt, gate.stride(0), dh_p, partial_p, a.tokens, a.dim, chunk_rows, chunks);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (!mask[1]) return;
      column_sums_kernel<scalar_t><<<ceil_div(a.batch * a.dim, kThreads), kThreads, 0, stream>>>(
          partial_p, a.batch, chunks, 1, a.dim, out_ptr<scalar_t>(dgate), nullptr, nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {dh, dgate};
}

}  // namespace

TORCH_LIBRARY_IMPL(sit_ext, CUDA, m) {
  m.impl("ln_modulate", &ln_modulate);
  m.impl("ln_modulate_backward", &ln_modulate_backward);
  m.impl("gated_residual_ln_modulate", &gated_residual_ln_modulate);
  m.impl("gated_residual_ln_modulate_backward", &gated_residual_ln_modulate_backward);
  m.impl("gated_residual", &gated_residual);
  m.impl("gated_residual_backward", &gated_residual_backward);
}

}  // namespace sit_ext::cuda
