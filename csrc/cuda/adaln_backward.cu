// CUDA backward kernels of the AdaLN-Zero family (layout and dtypes: adaln.cuh).
//
// A block handles a chunk of rows of one sample (chunks sized from T alone).
// Each thread sums its columns' dshift/dscale/dgate terms (and gate dx_total,
// the folded bias's) over the chunk and writes them to a partial buffer; a
// second kernel adds the chunks in order (for dbias, then the samples too).
// No atomics: the same bits on every run and on every GPU.
//
// Resident rows (D <= 4096 in packs, 2048 by single elements) take one pass: a thread keeps
// its columns' scale, gate and sums in registers. Longer rows take two
// kernels: the row statistics first, then a column-tiled pass.
#include "adaln.cuh"

namespace sit_ext::cuda {
namespace {

using at::Tensor;

constexpr int kBackwardThreads = 512;  // resident rows up to kElems * 512 = 4096 elements

// Elements per thread: kElems in packs, half that one by one (single elements
// need an address each, and eight of them would not fit 128 registers).
template <int kVec>
constexpr int kBackwardElems = kVec == 1 ? kElems / 2 : kElems;

constexpr int kSums = 4;  // column sums per chunk: dshift, dscale, dgate, gate dx_total

// Pointers of one backward launch. Null outputs are not computed; partial is
// [B * chunks, kSums, D] or null.
template <typename x_t, typename l_t, typename y_t>
struct BackwardArgs {
  const y_t* dy;
  const x_t* xo;   // the normalised input: x_out, or x for ln_modulate
  const x_t* dxo;  // gradient of x_out, or null
  const l_t* h;
  const at::opmath_type<x_t>* mean;
  const at::opmath_type<x_t>* rstd;
  x_t* dx;
  l_t* dh;
  at::opmath_type<x_t>* partial;
  bool need_shift, need_scale, need_gate, need_bias;
};

// Writes the chunk's column sums acc[q] (q: dshift, dscale, dgate, gate
// dx_total) of this thread's columns [col, col + kVec).
template <int kVec, typename acc_t, typename Args>
__device__ __forceinline__ void store_partial(const Args& a, int64_t block, int64_t dim,
                                              int64_t col, const acc_t (&acc)[kSums][kVec]) {
  acc_t* out = a.partial + block * kSums * dim + col;
#pragma unroll
  for (int j = 0; j < kVec; ++j) {
    if (a.need_shift) out[j] = acc[0][j];
    if (a.need_scale) out[dim + j] = acc[1][j];
    if (a.need_gate) out[2 * dim + j] = acc[2][j];
    if (a.need_bias) out[3 * dim + j] = acc[3][j];
  }
}

// The forward's centre of a row (see row_centre): for float64, mean(x - x0)
// summed again over the stored row, by every thread of the block.
template <typename x_t, int kVec>
__device__ RowCentre<at::opmath_type<x_t>> backward_centre(const x_t* __restrict__ row_xo,
                                                           int64_t dim, at::opmath_type<x_t> mean) {
  using acc_t = at::opmath_type<x_t>;
  if constexpr (std::is_same_v<acc_t, double>) {
    const acc_t x0 = acc_t(row_xo[0]);
    acc_t s[1] = {0};
    for (int64_t p = threadIdx.x; p < dim / kVec; p += blockDim.x) {
      const auto xv = load_pack<kVec>(row_xo + p * kVec);
#pragma unroll
      for (int j = 0; j < kVec; ++j) s[0] += acc_t(xv.v[j]) - x0;
    }
    block_allreduce(s);
    return row_centre(mean, x0, s[0] / acc_t(dim));
  } else {
    return row_centre(mean, acc_t(0), acc_t(0));
  }
}

// (A minimum of 1 block per SM in the launch bounds keeps ptxas from capping
// registers for occupancy and spilling: seen at 32 and 64 registers.)
template <typename x_t, typename l_t, typename y_t, int kVec, bool kResidual>
__global__ void __launch_bounds__(kBackwardThreads, 1)
    adaln_backward_kernel(BackwardArgs<x_t, l_t, y_t> a, ModArgs<l_t> mod, int64_t tokens,
                          int64_t dim, int64_t chunk_rows, int64_t chunks) {
  using acc_t = at::opmath_type<x_t>;
  constexpr int kPacks = kBackwardElems<kVec> / kVec;
  const int64_t block = blockIdx.x, packs = dim / kVec, b = blockIdx.x / uint32_t(chunks);
  const int64_t chunk = blockIdx.x % uint32_t(chunks);
  const int64_t first = b * tokens + chunk * chunk_rows,
                last = b * tokens + min64(tokens, (chunk + 1) * chunk_rows);
  // LayerNorm over a single element is constant: no gradient reaches x.
  const acc_t ln_on = dim == 1 ? acc_t(0) : acc_t(1);
  acc_t acc[kPacks][kSums][kVec] = {};
  acc_t one_plus_scale[kPacks][kVec], gate[kPacks][kVec], bias[kPacks][kVec];
#pragma unroll
  for (int k = 0; k < kPacks; ++k) {
    const int64_t p = threadIdx.x + int64_t(k) * blockDim.x;
    Pack<l_t, kVec> sc{}, gv{};
    Pack<acc_t, kVec> bv{};
    if (p < packs) {
      sc = load_pack<kVec>(mod.scale + b * mod.scale_stride + p * kVec);
      if constexpr (kResidual) {
        gv = load_pack<kVec>(mod.gate + b * mod.gate_stride + p * kVec);
        bv = load_bias<kVec>(mod, p * kVec);
      }
    }
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      one_plus_scale[k][j] = acc_t(1) + acc_t(sc.v[j]);
      gate[k][j] = acc_t(gv.v[j]);
      bias[k][j] = acc_t(bv.v[j]);
    }
  }

  for (int64_t row = first; row < last; ++row) {
    const acc_t rs = a.rstd[row];
    const RowCentre<acc_t> ctr = backward_centre<x_t, kVec>(a.xo + row * dim, dim, a.mean[row]);
    acc_t dyv[kPacks][kVec], xhat[kPacks][kVec], sums[2] = {0, 0};
    Pack<x_t, kVec> dxo[kPacks];
    Pack<l_t, kVec> hv[kPacks];
#pragma unroll
    for (int k = 0; k < kPacks; ++k) {
      const int64_t p = threadIdx.x + int64_t(k) * blockDim.x, o = row * dim + p * kVec;
      Pack<y_t, kVec> g{};
      Pack<x_t, kVec> xv{};
      dxo[k] = {};
      hv[k] = {};
      if (p < packs) {
        g = load_pack<kVec>(a.dy + o);
        xv = load_pack<kVec>(a.xo + o);
        // The second round of loads, issued before the reduction waits.
        if (a.dxo) dxo[k] = load_pack<kVec>(a.dxo + o);
        if constexpr (kResidual) hv[k] = load_pack<kVec>(a.h + o);
      }
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        dyv[k][j] = acc_t(g.v[j]);
        xhat[k][j] = centred(acc_t(xv.v[j]), ctr.c0, ctr.c1) * rs;  // padding has dy = 0
        const acc_t dxhat = dyv[k][j] * one_plus_scale[k][j];
        sums[0] += dxhat;
        sums[1] += dxhat * xhat[k][j];
      }
    }
    block_allreduce(sums);
    const acc_t rs_dx = rs * ln_on, mean_dxhat = sums[0] / acc_t(dim),
                mean_dxhat_xhat = sums[1] / acc_t(dim);
#pragma unroll
    for (int k = 0; k < kPacks; ++k) {
      const int64_t p = threadIdx.x + int64_t(k) * blockDim.x;
      if (p >= packs) continue;
      const int64_t o = row * dim + p * kVec;
      Pack<x_t, kVec> out_dx;
      Pack<l_t, kVec> out_dh;
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        const acc_t dyj = dyv[k][j], xh = xhat[k][j];
        acc[k][0][j] += dyj;
        acc[k][1][j] += dyj * xh;
        acc_t total =
            layer_norm_grad(dyj * one_plus_scale[k][j], xh, mean_dxhat, mean_dxhat_xhat, rs_dx);
        if (a.dxo) total += acc_t(dxo[k].v[j]);
        out_dx.v[j] = x_t(total);
        if constexpr (kResidual) {
          const acc_t dh = gate[k][j] * total;
          out_dh.v[j] = l_t(dh);
          acc[k][2][j] += total * (acc_t(hv[k].v[j]) + bias[k][j]);
          acc[k][3][j] += dh;
        }
      }
      if (a.dx) store_pack<kVec>(a.dx + o, out_dx);
      if (kResidual && a.dh) store_pack<kVec>(a.dh + o, out_dh);
    }
  }
  if (a.partial == nullptr) return;
#pragma unroll
  for (int k = 0; k < kPacks; ++k) {
    const int64_t p = threadIdx.x + int64_t(k) * blockDim.x;
    if (p < packs) store_partial<kVec>(a, block, dim, p * kVec, acc[k]);
  }
}

// Long rows, first kernel: per row, mean(dxhat) and mean(dxhat xhat) into
// stats[row, 0..1], with dxhat = dy (1 + scale), and the row's centre into
// stats[row, 2..3]. One block per row.
template <typename x_t, typename l_t, typename y_t, int kVec>
__global__ void __launch_bounds__(kThreads)
    row_grad_stats_kernel(BackwardArgs<x_t, l_t, y_t> a, ModArgs<l_t> mod, int64_t tokens,
                          int64_t dim, at::opmath_type<x_t>* __restrict__ stats) {
  using acc_t = at::opmath_type<x_t>;
  const int64_t row = blockIdx.x, b = row / tokens, packs = dim / kVec;
  const acc_t rs = a.rstd[row];
  const RowCentre<acc_t> ctr = backward_centre<x_t, kVec>(a.xo + row * dim, dim, a.mean[row]);
  acc_t s[2] = {0, 0};
  for (int64_t p = threadIdx.x; p < packs; p += blockDim.x) {
    const auto g = load_pack<kVec>(a.dy + row * dim + p * kVec);
    const auto xv = load_pack<kVec>(a.xo + row * dim + p * kVec);
    const auto sc = load_pack<kVec>(mod.scale + b * mod.scale_stride + p * kVec);
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      const acc_t dxhat = acc_t(g.v[j]) * (acc_t(1) + acc_t(sc.v[j]));
      s[0] += dxhat;
      s[1] += dxhat * centred(acc_t(xv.v[j]), ctr.c0, ctr.c1) * rs;
    }
  }
  block_allreduce(s);
  if (threadIdx.x == 0) {
    stats[4 * row] = s[0] / acc_t(dim);
    stats[4 * row + 1] = s[1] / acc_t(dim);
    stats[4 * row + 2] = ctr.c0;
    stats[4 * row + 3] = ctr.c1;
  }
}

// Long rows, second kernel: blocks over (sample, chunk of rows, tile of
// kThreads * kVec columns); each thread walks its columns down the chunk.
template <typename x_t, typename l_t, typename y_t, int kVec, bool kResidual>
__global__ void __launch_bounds__(kThreads, 1)
    adaln_backward_columns_kernel(BackwardArgs<x_t, l_t, y_t> a, ModArgs<l_t> mod,
                                  const at::opmath_type<x_t>* __restrict__ stats, int64_t tokens,
                                  int64_t dim, int64_t chunk_rows, int64_t chunks, int64_t tiles) {
  using acc_t = at::opmath_type<x_t>;
  // 32-bit index arithmetic (the grid fits in 32 bits): a 64-bit division is a call.
  const uint32_t block = blockIdx.x / uint32_t(tiles), tile = blockIdx.x % uint32_t(tiles);
  const int64_t b = block / uint32_t(chunks), col = (int64_t(tile) * kThreads + threadIdx.x) * kVec;
  if (col >= dim) return;
  const int64_t chunk = block % uint32_t(chunks);
  const int64_t first = b * tokens + chunk * chunk_rows,
                last = b * tokens + min64(tokens, (chunk + 1) * chunk_rows);
  const acc_t ln_on = dim == 1 ? acc_t(0) : acc_t(1);
  const auto sc = load_pack<kVec>(mod.scale + b * mod.scale_stride + col);
  Pack<l_t, kVec> gv{};
  Pack<acc_t, kVec> bv{};
  if constexpr (kResidual) {
    gv = load_pack<kVec>(mod.gate + b * mod.gate_stride + col);
    bv = load_bias<kVec>(mod, col);
  }
  acc_t acc[kSums][kVec] = {};
  for (int64_t row = first; row < last; ++row) {
    const int64_t o = row * dim + col;
    const acc_t rs = a.rstd[row];
    const acc_t mean_dxhat = stats[4 * row], mean_dxhat_xhat = stats[4 * row + 1];
    const acc_t c0 = stats[4 * row + 2], c1 = stats[4 * row + 3];
    const auto g = load_pack<kVec>(a.dy + o);
    const auto xv = load_pack<kVec>(a.xo + o);
    Pack<x_t, kVec> dxo{}, out_dx;
    Pack<l_t, kVec> hv{}, out_dh;
    if (a.dxo) dxo = load_pack<kVec>(a.dxo + o);
    if constexpr (kResidual) hv = load_pack<kVec>(a.h + o);
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      const acc_t dyj = acc_t(g.v[j]), xh = centred(acc_t(xv.v[j]), c0, c1) * rs;
      acc[0][j] += dyj;
      acc[1][j] += dyj * xh;
      acc_t total = layer_norm_grad(dyj * (acc_t(1) + acc_t(sc.v[j])), xh, mean_dxhat,
                                    mean_dxhat_xhat, rs * ln_on);
      if (a.dxo) total += acc_t(dxo.v[j]);
      out_dx.v[j] = x_t(total);
      if constexpr (kResidual) {
        const acc_t dh = acc_t(gv.v[j]) * total;
        out_dh.v[j] = l_t(dh);
        acc[2][j] += total * (acc_t(hv.v[j]) + acc_t(bv.v[j]));
        acc[3][j] += dh;
      }
    }
    if (a.dx) store_pack<kVec>(a.dx + o, out_dx);
    if (kResidual && a.dh) store_pack<kVec>(a.dh + o, out_dh);
  }
  if (a.partial != nullptr) store_partial<kVec>(a, block, dim, col, acc);
}

// dh = gate grad and the chunk's column sums of grad h (for dgate): blocks over
// (sample, chunk of rows, tile of kThreads * kVec columns).
template <typename x_t, typename l_t, int kVec>
__global__ void __launch_bounds__(kThreads, 1)
    gated_residual_backward_kernel(const x_t* __restrict__ grad, const l_t* __restrict__ h,
                                   const l_t* __restrict__ gate, int64_t gate_stride,
                                   l_t* __restrict__ dh, at::opmath_type<x_t>* __restrict__ partial,
                                   int64_t tokens, int64_t dim, int64_t chunk_rows, int64_t chunks,
                                   int64_t tiles) {
  using acc_t = at::opmath_type<x_t>;
  // 32-bit index arithmetic (the grid fits in 32 bits): a 64-bit division is a call.
  const uint32_t block = blockIdx.x / uint32_t(tiles), tile = blockIdx.x % uint32_t(tiles);
  const int64_t b = block / uint32_t(chunks), col = (int64_t(tile) * kThreads + threadIdx.x) * kVec;
  if (col >= dim) return;
  const int64_t chunk = block % uint32_t(chunks);
  const int64_t first = b * tokens + chunk * chunk_rows,
                last = b * tokens + min64(tokens, (chunk + 1) * chunk_rows);
  const auto gv = load_pack<kVec>(gate + b * gate_stride + col);
  acc_t acc[kVec] = {};
  for (int64_t row = first; row < last; ++row) {
    const int64_t o = row * dim + col;
    const auto g = load_pack<kVec>(grad + o);
    Pack<l_t, kVec> out, hv{};
    if (partial) hv = load_pack<kVec>(h + o);
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      out.v[j] = l_t(acc_t(gv.v[j]) * acc_t(g.v[j]));
      acc[j] += acc_t(g.v[j]) * acc_t(hv.v[j]);
    }
    if (dh) store_pack<kVec>(dh + o, out);
  }
  if (partial) {
#pragma unroll
    for (int j = 0; j < kVec; ++j) partial[block * dim + col + j] = acc[j];
  }
}

// out_q[b, d] = sum over chunks c of partial[b * chunks + c, q, d], in chunk order.
template <typename acc_t, typename l_t>
__global__ void column_sums_kernel(const acc_t* __restrict__ partial, int64_t batch, int64_t chunks,
                                   int64_t stride_q, int64_t dim, l_t* out0, l_t* out1, l_t* out2) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= batch * dim) return;
  const int64_t b = i / dim, d = i % dim;
  l_t* outs[3] = {out0, out1, out2};
  for (int q = 0; q < 3; ++q) {
    if (outs[q] == nullptr) continue;
    double s = 0;
    for (int64_t c = 0; c < chunks; ++c) s += partial[((b * chunks + c) * stride_q + q) * dim + d];
    outs[q][i] = l_t(s);
  }
}

// -------------------------------------------------------------- host side

// The LayerNorm + modulate backward, with the gated residual when h is defined
// (and its folded bias when a.bias is). Outputs not asked for are left empty.
void adaln_backward(const char* op, const AdalnArgs& a, const Tensor& dy, const Tensor& dxo,
                    const Tensor& gate, const Tensor& scale, const Tensor& mean, const Tensor& rstd,
                    Tensor& dx, Tensor& dh, Tensor& dgate, Tensor& dshift, Tensor& dscale,
                    Tensor& dbias) {
  const bool need_cols =
      dgate.numel() > 0 || dshift.numel() > 0 || dscale.numel() > 0 || dbias.numel() > 0;
  if (a.batch == 0 || a.tokens == 0) {
    // No rows: the per-sample gradients are sums over nothing.
    for (Tensor* t : {&dgate, &dshift, &dscale, &dbias}) t->zero_();
    return;
  }
  const auto stream = c10::cuda::getCurrentCUDAStream();
  with_adaln_types(a.x.scalar_type(), *a.low, dy.scalar_type(), [&](auto tx, auto tl, auto ty) {
    using x_t = typename decltype(tx)::type;
    using l_t = typename decltype(tl)::type;
    using y_t = typename decltype(ty)::type;
    using acc_t = at::opmath_type<x_t>;
    constexpr int kWide = kVecOfWidest<x_t, l_t, y_t>;
    const ModArgs<l_t> mod = mod_args<l_t>(gate, Tensor(), scale, a.bias);
    BackwardArgs<x_t, l_t, y_t> args{in_ptr<y_t>(dy),
                                     in_ptr<x_t>(a.x),
                                     in_ptr<x_t>(dxo),
                                     in_ptr<l_t>(a.h),
                                     mean.const_data_ptr<acc_t>(),
                                     rstd.const_data_ptr<acc_t>(),
                                     out_ptr<x_t>(dx),
                                     out_ptr<l_t>(dh),
                                     nullptr,
                                     dshift.numel() > 0,
                                     dscale.numel() > 0,
                                     dgate.numel() > 0,
                                     dbias.numel() > 0};
    const bool wide =
        packs_fit<kWide>(a.dim, mod, args.dy, args.xo, args.dxo, args.h, args.dx, args.dh);
    with_pack_width<kWide>(wide, [&](auto vec) {
      constexpr int kVec = decltype(vec)::value;
      const int64_t chunk_rows = chunk_rows_for(a.tokens);
      const int64_t chunks = ceil_div(a.tokens, chunk_rows), blocks = a.batch * chunks;
      Tensor partial;
      if (need_cols) {
        partial = at::empty({blocks * kSums * a.dim}, mean.options());
        args.partial = partial.mutable_data_ptr<acc_t>();
      }
      const bool residual = a.h.defined();
      const int threads = resident_threads<kVec, kBackwardElems<kVec>>(a.dim, kBackwardThreads);
      if (threads > 0) {
        check_grid(op, blocks);
        auto kernel = residual ? adaln_backward_kernel<x_t, l_t, y_t, kVec, true>
                               : adaln_backward_kernel<x_t, l_t, y_t, kVec, false>;
        kernel<<<blocks, threads, 0, stream>>>(args, mod, a.tokens, a.dim, chunk_rows, chunks);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      } else {
        const int64_t rows = a.batch * a.tokens, tiles = ceil_div(a.dim / kVec, kThreads);
        check_grid(op, rows);
        check_grid(op, blocks * tiles);
        Tensor stats = at::empty({rows * 4}, mean.options());
        row_grad_stats_kernel<x_t, l_t, y_t, kVec><<<rows, kThreads, 0, stream>>>(
            args, mod, a.tokens, a.dim, stats.mutable_data_ptr<acc_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        auto kernel = residual ? adaln_backward_columns_kernel<x_t, l_t, y_t, kVec, true>
                               : adaln_backward_columns_kernel<x_t, l_t, y_t, kVec, false>;
        kernel<<<blocks * tiles, kThreads, 0, stream>>>(args, mod, stats.const_data_ptr<acc_t>(),
                                                        a.tokens, a.dim, chunk_rows, chunks, tiles);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      if (!need_cols) return;
      if (args.need_shift || args.need_scale || args.need_gate) {
        column_sums_kernel<acc_t, l_t>
            <<<ceil_div(a.batch * a.dim, kThreads), kThreads, 0, stream>>>(
                args.partial, a.batch, chunks, kSums, a.dim, out_ptr<l_t>(dshift),
                out_ptr<l_t>(dscale), out_ptr<l_t>(dgate));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      if (args.need_bias) {
        // dbias: the fourth sums per sample (over chunks, B x D threads), then over
        // samples, both by column_sums_kernel in order.
        Tensor per_sample = at::empty({a.batch * a.dim}, mean.options());
        acc_t* ps = per_sample.mutable_data_ptr<acc_t>();
        column_sums_kernel<acc_t, acc_t>
            <<<ceil_div(a.batch * a.dim, kThreads), kThreads, 0, stream>>>(
                args.partial + 3 * a.dim, a.batch, chunks, kSums, a.dim, ps, nullptr, nullptr);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        column_sums_kernel<acc_t, acc_t><<<ceil_div(a.dim, kThreads), kThreads, 0, stream>>>(
            ps, 1, a.batch, 1, a.dim, out_ptr<acc_t>(dbias), nullptr, nullptr);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  });
}

std::tuple<Tensor, Tensor, Tensor> ln_modulate_backward(const Tensor& grad_y, const Tensor& x,
                                                        const Tensor& scale, const Tensor& mean,
                                                        const Tensor& rstd,
                                                        std::array<bool, 3> mask) {
  constexpr const char* op = "ln_modulate_backward";
  AdalnBackward g = ln_modulate_backward_args(op, grad_y, x, scale, mean, rstd, mask);
  const c10::cuda::CUDAGuard guard(g.a.x.device());
  adaln_backward(op, g.a, g.dy, Tensor(), Tensor(), scale, mean, rstd, g.dx, g.dh, g.dgate,
                 g.dshift, g.dscale, g.dbias);
  return {g.dx, g.dshift, g.dscale};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> gated_residual_ln_modulate_backward(
    const std::optional<Tensor>& grad_x_out, const Tensor& grad_y, const Tensor& x_out,
    const Tensor& h, const Tensor& gate, const Tensor& scale, const Tensor& mean,
    const Tensor& rstd, std::array<bool, 6> mask, const std::optional<Tensor>& bias) {
  constexpr const char* op = "gated_residual_ln_modulate_backward";
  AdalnBackward g = gated_residual_ln_modulate_backward_args(op, grad_x_out, grad_y, x_out, h, gate,
                                                             scale, mean, rstd, mask, bias);
  const c10::cuda::CUDAGuard guard(g.a.x.device());
  adaln_backward(op, g.a, g.dy, g.dxo, gate, scale, mean, rstd, g.dx, g.dh, g.dgate, g.dshift,
                 g.dscale, g.dbias);
  return {g.dx, g.dh, g.dgate, g.dshift, g.dscale, bias_grad(g)};
}

std::tuple<Tensor, Tensor> gated_residual_backward(const Tensor& grad_, const Tensor& h_,
                                                   const Tensor& gate, std::array<bool, 2> mask) {
  constexpr const char* op = "gated_residual_backward";
  AdalnArgs a = adaln_args_with_h(op, "grad", grad_, h_);
  check_modulation(op, "gate", gate, a);
  const c10::cuda::CUDAGuard guard(a.x.device());
  Tensor dh = empty_if(mask[0], a.h), dgate = per_sample_empty(mask[1], a);
  if (!(mask[0] || mask[1])) return {dh, dgate};
  if (a.batch == 0 || a.tokens == 0) {
    dgate.zero_();
    return {dh, dgate};
  }
  const auto stream = c10::cuda::getCurrentCUDAStream();
  with_residual_types(a.x.scalar_type(), *a.low, [&](auto tx, auto tl) {
    using x_t = typename decltype(tx)::type;
    using l_t = typename decltype(tl)::type;
    using acc_t = at::opmath_type<x_t>;
    constexpr int kWide = kVecOfWidest<x_t, l_t>;
    const x_t* g = in_ptr<x_t>(a.x);
    const l_t *h = in_ptr<l_t>(a.h), *gt = in_ptr<l_t>(gate);
    l_t* dh_p = out_ptr<l_t>(dh);
    const bool wide =
        a.dim % kWide == 0 && gate.stride(0) % kWide == 0 && packs_aligned<kWide>(g, h, gt, dh_p);
    with_pack_width<kWide>(wide, [&](auto vec) {
      constexpr int kVec = decltype(vec)::value;
      const int64_t chunk_rows = chunk_rows_for(a.tokens);
      const int64_t chunks = ceil_div(a.tokens, chunk_rows),
                    tiles = ceil_div(a.dim / kVec, kThreads);
      check_grid(op, a.batch * chunks * tiles);
      Tensor partial = acc_empty({mask[1] ? a.batch * chunks * a.dim : 0}, a.x);
      acc_t* partial_p = mask[1] ? partial.mutable_data_ptr<acc_t>() : nullptr;
      gated_residual_backward_kernel<x_t, l_t, kVec>
          <<<a.batch * chunks * tiles, kThreads, 0, stream>>>(g, h, gt, gate.stride(0), dh_p,
                                                              partial_p, a.tokens, a.dim,
                                                              chunk_rows, chunks, tiles);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (!mask[1]) return;
      column_sums_kernel<acc_t, l_t><<<ceil_div(a.batch * a.dim, kThreads), kThreads, 0, stream>>>(
          partial_p, a.batch, chunks, 1, a.dim, out_ptr<l_t>(dgate), nullptr, nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {dh, dgate};
}

}  // namespace

TORCH_LIBRARY_IMPL(sit_ext, CUDA, m) {
  m.impl("ln_modulate_backward", &ln_modulate_backward);
  m.impl("gated_residual_ln_modulate_backward", &gated_residual_ln_modulate_backward);
  m.impl("gated_residual_backward", &gated_residual_backward);
}

}  // namespace sit_ext::cuda
