// CPU kernels of the AdaLN-Zero family: ln_modulate, gated_residual_ln_modulate
// and gated_residual, forward and backward.
//
// dtypes (see checks.h): x and x_out in X; h, gate, shift, scale in L; y in Y.
// Everything is computed in float (double for float64).
//
// Forward runs rows in parallel; each row is read once from memory and then
// from L1 for the statistics. The row mean is x0 + mean(x - x0) with x0 the
// row's first element, and the variance is taken about that mean: a constant
// row normalises to exactly 0, and a large mean costs no accuracy. Row sums
// add float lanes into double every few vectors.
//
// Backward splits each sample's T rows into fixed chunks; a chunk sums its
// rows' contributions to dshift/dscale/dgate, and the chunk sums are added per
// sample in chunk order: deterministic for any number of threads.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "cpu_utils.h"
#include "sit_ext/adaln_math.h"
#include "sit_ext/checks.h"
#include "sit_ext/dtypes.h"

namespace sit_ext::cpu {
namespace {

using at::Tensor;

constexpr int64_t kRowChunk = 32;  // rows per backward task

// Sums f over a row of n elements in double: fv(i) for full vectors (added in
// acc_t lanes, flushed into double lanes), fs(i) for the scalar tail.
template <typename acc_t, typename VecF, typename ScalarF>
double row_total(int64_t n, const VecF& fv, const ScalarF& fs) {
  using Vec = at::vec::Vectorized<acc_t>;
  WideSum<acc_t> s;
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) s.add(fv(i));
  double total = s.total();
  for (; i < n; ++i) total += double(fs(i));
  return total;
}

// Calls fv(i) for the full vectors of a row and fs(i) for its tail.
template <typename acc_t, typename VecF, typename ScalarF>
void row_for(int64_t n, const VecF& fv, const ScalarF& fs) {
  using Vec = at::vec::Vectorized<acc_t>;
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) fv(i);
  for (; i < n; ++i) fs(i);
}

// Per-sample column sums for backward: body(b, row_begin, row_end, acc) adds
// the K column sums of D values of rows [row_begin, row_end) of sample b into
// acc (zeroed, acc_t[K * D]); outs[k] (nullable, [B, D]) receive the totals.
// A sample of more than kRowChunk rows is split into chunks whose sums are
// added in chunk order, in double: deterministic for any number of threads.
template <int K, typename out_t, typename Body>
void column_sums(int64_t batch, int64_t tokens, int64_t dim, std::array<out_t*, K> outs,
                 const Body& body) {
  std::array<bool, K> needed;
  for (int k = 0; k < K; ++k) needed[k] = outs[k] != nullptr;
  column_sums<K, at::opmath_type<out_t>>(
      batch, tokens, dim, needed, body,
      [&](int k, int64_t b, int64_t d, double v) { outs[k][b * dim + d] = out_t(v); });
}

// The same, with the totals handed to emit(k, b, d, total) for the k needed.
template <int K, typename acc_t, typename Body, typename Emit>
void column_sums(int64_t batch, int64_t tokens, int64_t dim, std::array<bool, K> needed,
                 const Body& body, const Emit& emit) {
  const int64_t chunks = std::max<int64_t>(1, (tokens + kRowChunk - 1) / kRowChunk);
  if (chunks == 1) {  // a whole sample per task: straight into the outputs
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, tokens * dim));
    at::parallel_for(0, batch, grain, [&](int64_t lo, int64_t hi) {
      std::vector<acc_t> acc(static_cast<size_t>(K * dim));
      for (int64_t b = lo; b < hi; ++b) {
        std::fill(acc.begin(), acc.end(), acc_t(0));
        body(b, b * tokens, (b + 1) * tokens, acc.data());
        for (int k = 0; k < K; ++k) {
          if (!needed[k]) continue;
          for (int64_t d = 0; d < dim; ++d) emit(k, b, d, double(acc[k * dim + d]));
        }
      }
    });
    return;
  }
  std::vector<acc_t> partial(static_cast<size_t>(batch * chunks * K * dim));
  const int64_t grain = std::max<int64_t>(1, 4096 / (kRowChunk * dim));
  at::parallel_for(0, batch * chunks, grain, [&](int64_t lo, int64_t hi) {
    for (int64_t task = lo; task < hi; ++task) {
      const int64_t b = task / chunks, first = (task % chunks) * kRowChunk;
      acc_t* acc = &partial[task * K * dim];
      std::fill(acc, acc + K * dim, acc_t(0));
      body(b, b * tokens + first, b * tokens + std::min(tokens, first + kRowChunk), acc);
    }
  });
  at::parallel_for(0, batch * K, 1, [&](int64_t lo, int64_t hi) {
    std::vector<double> total(static_cast<size_t>(dim));
    for (int64_t bk = lo; bk < hi; ++bk) {
      const int64_t b = bk / K, k = bk % K;
      if (!needed[k]) continue;
      std::fill(total.begin(), total.end(), 0.0);
      for (int64_t c = 0; c < chunks; ++c) {
        const acc_t* p = &partial[((b * chunks + c) * K + k) * dim];
        for (int64_t d = 0; d < dim; ++d) total[d] += p[d];
      }
      for (int64_t d = 0; d < dim; ++d) emit(k, b, d, total[d]);
    }
  });
}

// Adds v into acc[i .. i + Vec::size()).
template <typename Vec, typename acc_t>
void accumulate(acc_t* acc, int64_t i, const Vec& v) {
  (Vec::loadu(acc + i) + v).store(acc + i);
}

// ------------------------------------------------------------------ forward

// x_out = x + gate (h + bias) (when h is given; bias when given), then
// y = LN(x_out) (1 + scale) + shift.
template <typename x_t, typename l_t, typename y_t>
void adaln_forward(const AdalnArgs& a, const Tensor& gate, const Tensor& shift, const Tensor& scale,
                   double eps, Tensor& x_out, Tensor& y, Tensor& mean, Tensor& rstd) {
  using X = VecIO<x_t>;
  using L = VecIO<l_t>;
  using Y = VecIO<y_t>;
  using acc_t = typename X::acc_t;
  using Vec = typename X::Vec;
  static_assert(std::is_same_v<acc_t, typename L::acc_t> &&
                std::is_same_v<acc_t, typename Y::acc_t>);
  const int64_t D = a.dim, T = a.tokens;
  const bool residual = a.h.defined();
  const x_t* x = a.x.const_data_ptr<x_t>();
  const l_t* h = residual ? a.h.const_data_ptr<l_t>() : nullptr;
  const acc_t* bias = in_ptr<acc_t>(a.bias);
  const l_t* gate_p = residual ? gate.const_data_ptr<l_t>() : nullptr;
  const l_t* shift_p = shift.const_data_ptr<l_t>();
  const l_t* scale_p = scale.const_data_ptr<l_t>();
  x_t* xo_p = residual ? x_out.mutable_data_ptr<x_t>() : nullptr;
  y_t* y_p = y.mutable_data_ptr<y_t>();
  acc_t* mean_p = mean.mutable_data_ptr<acc_t>();
  acc_t* rstd_p = rstd.mutable_data_ptr<acc_t>();
  const int64_t gs = residual ? gate.stride(0) : 0, ss = shift.stride(0), cs = scale.stride(0);
  at::parallel_for(0, a.batch * T, std::max<int64_t>(1, 8192 / D), [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      const int64_t b = r / T;
      const x_t* src = x + r * D;
      if (residual) {
        const l_t *hr = h + r * D, *g = gate_p + b * gs;
        x_t* xo = xo_p + r * D;
        row_for<acc_t>(
            D,
            [&](int64_t i) {
              Vec hv = L::load(hr + i);
              if (bias) hv += Vec::loadu(bias + i);
              X::store(xo + i, gated_residual_value(X::load(src + i), L::load(g + i), hv));
            },
            [&](int64_t i) {
              const acc_t hv = acc_t(hr[i]) + (bias ? acc_t(bias[i]) : acc_t(0));
              xo[i] = x_t(gated_residual_value(acc_t(src[i]), acc_t(g[i]), hv));
            });
        src = xo;  // normalise the stored (rounded) x_out, as backward will see it
      }
      const acc_t x0 = src[0];
      const Vec x0_v(x0);
      const double shifted = row_total<acc_t>(
          D, [&](int64_t i) { return X::load(src + i) - x0_v; },
          [&](int64_t i) { return acc_t(src[i]) - x0; });
      const acc_t mu = acc_t(double(x0) + shifted / double(D));
      const RowCentre<acc_t> ctr = row_centre(mu, x0, acc_t(shifted / double(D)));
      const Vec c0_v(ctr.c0), c1_v(ctr.c1);
      const double squares = row_total<acc_t>(
          D,
          [&](int64_t i) {
            const Vec d = centred(X::load(src + i), c0_v, c1_v);
            return d * d;
          },
          [&](int64_t i) {
            const acc_t d = centred(acc_t(src[i]), ctr.c0, ctr.c1);
            return d * d;
          });
      const acc_t rs = acc_t(1) / std::sqrt(acc_t(squares / double(D)) + acc_t(eps));
      const Vec rs_v(rs);
      const l_t *sh = shift_p + b * ss, *sc = scale_p + b * cs;
      y_t* yr = y_p + r * D;
      row_for<acc_t>(
          D,
          [&](int64_t i) {
            Y::store(yr + i, modulate_value(centred(X::load(src + i), c0_v, c1_v) * rs_v,
                                            L::load(sh + i), L::load(sc + i)));
          },
          [&](int64_t i) {
            yr[i] = y_t(modulate_value(centred(acc_t(src[i]), ctr.c0, ctr.c1) * rs, acc_t(sh[i]),
                                       acc_t(sc[i])));
          });
      mean_p[r] = mu;
      rstd_p[r] = rs;
    }
  });
}

void forward(const AdalnArgs& a, const Tensor& gate, const Tensor& shift, const Tensor& scale,
             double eps, Tensor& x_out, Tensor& y, Tensor& mean, Tensor& rstd) {
  with_adaln_types(a.x.scalar_type(), *a.low, y.scalar_type(), [&](auto tx, auto tl, auto ty) {
    adaln_forward<typename decltype(tx)::type, typename decltype(tl)::type,
                  typename decltype(ty)::type>(a, gate, shift, scale, eps, x_out, y, mean, rstd);
  });
}

std::tuple<Tensor, Tensor, Tensor> ln_modulate(const Tensor& x, const Tensor& shift,
                                               const Tensor& scale, double eps,
                                               std::optional<at::ScalarType> out_dtype) {
  AdalnForward f =
      adaln_forward_args("ln_modulate", false, x, Tensor(), Tensor(), shift, scale, out_dtype);
  forward(f.a, Tensor(), shift, scale, eps, f.x_out, f.y, f.mean, f.rstd);
  return {f.y, f.mean, f.rstd};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> gated_residual_ln_modulate(
    const Tensor& x, const Tensor& h, const Tensor& gate, const Tensor& shift, const Tensor& scale,
    double eps, std::optional<at::ScalarType> out_dtype, const std::optional<Tensor>& bias) {
  AdalnForward f = adaln_forward_args("gated_residual_ln_modulate", true, x, h, gate, shift, scale,
                                      out_dtype, bias);
  forward(f.a, gate, shift, scale, eps, f.x_out, f.y, f.mean, f.rstd);
  return {f.x_out, f.y, f.mean, f.rstd};
}

Tensor gated_residual(const Tensor& x_, const Tensor& h_, const Tensor& gate) {
  constexpr const char* op = "gated_residual";
  AdalnArgs a = adaln_args_with_h(op, "x", x_, h_);
  check_modulation(op, "gate", gate, a);
  Tensor out = at::empty_like(a.x);
  with_residual_types(a.x.scalar_type(), *a.low, [&](auto tx, auto tl) {
    using x_t = typename decltype(tx)::type;
    using l_t = typename decltype(tl)::type;
    using X = VecIO<x_t>;
    using L = VecIO<l_t>;
    using acc_t = typename X::acc_t;
    const int64_t D = a.dim, T = a.tokens, gs = gate.stride(0);
    const x_t* x = a.x.const_data_ptr<x_t>();
    const l_t *h = a.h.const_data_ptr<l_t>(), *g = gate.const_data_ptr<l_t>();
    x_t* o = out.mutable_data_ptr<x_t>();
    at::parallel_for(0, a.batch * T, std::max<int64_t>(1, 16384 / D), [&](int64_t lo, int64_t hi) {
      for (int64_t r = lo; r < hi; ++r) {
        const x_t* xr = x + r * D;
        const l_t *hr = h + r * D, *gr = g + (r / T) * gs;
        x_t* orow = o + r * D;
        row_for<acc_t>(
            D,
            [&](int64_t i) {
              X::store(orow + i,
                       gated_residual_value(X::load(xr + i), L::load(gr + i), L::load(hr + i)));
            },
            [&](int64_t i) {
              orow[i] = x_t(gated_residual_value(acc_t(xr[i]), acc_t(gr[i]), acc_t(hr[i])));
            });
      }
    });
  });
  return out;
}

// ----------------------------------------------------------------- backward

// The LayerNorm + modulate backward of one row, plus (for the gated residual)
// the residual's own gradient grad_x_out. Writes dx_total = dx_ln + grad_x_out
// (as dx, and times gate as dh) and adds the row's column terms into acc:
// [0, D) dshift, [D, 2D) dscale, [2D, 3D) dgate, [3D, 4D) gate dx_total (the
// folded bias's gradient, summed over samples later).
constexpr int kColumnSums = 4;

struct RowGrads {
  int64_t dim;
  bool need_shift, need_scale, need_gate, need_bias;
};

template <typename x_t, typename l_t, typename y_t>
void adaln_backward_row(const RowGrads& rg, const x_t* xo, const y_t* dy, const x_t* dxo,
                        const l_t* h, const at::opmath_type<x_t>* bias, const l_t* gate,
                        const l_t* scale, at::opmath_type<x_t> mu, at::opmath_type<x_t> rs, x_t* dx,
                        l_t* dh, at::opmath_type<x_t>* acc) {
  using X = VecIO<x_t>;
  using L = VecIO<l_t>;
  using Y = VecIO<y_t>;
  using acc_t = typename X::acc_t;
  using Vec = typename X::Vec;
  const int64_t D = rg.dim;
  // The forward's centre: for float64, mean(x - x0) again, summed as the forward summed it.
  const acc_t x0 = xo[0];
  const Vec x0_v(x0);
  const acc_t shifted = std::is_same_v<acc_t, double>
                            ? acc_t(row_total<acc_t>(
                                        D, [&](int64_t i) { return X::load(xo + i) - x0_v; },
                                        [&](int64_t i) { return acc_t(xo[i]) - x0; }) /
                                    double(D))
                            : acc_t(0);
  const RowCentre<acc_t> ctr = row_centre(mu, x0, shifted);
  const Vec c0_v(ctr.c0), c1_v(ctr.c1), rs_v(rs), one(1);
  const acc_t a =
      acc_t(row_total<acc_t>(
                D, [&](int64_t i) { return Y::load(dy + i) * (one + L::load(scale + i)); },
                [&](int64_t i) { return acc_t(dy[i]) * (acc_t(1) + acc_t(scale[i])); }) /
            double(D));
  const acc_t c = acc_t(row_total<acc_t>(
                            D,
                            [&](int64_t i) {
                              const Vec xhat = centred(X::load(xo + i), c0_v, c1_v) * rs_v;
                              return Y::load(dy + i) * (one + L::load(scale + i)) * xhat;
                            },
                            [&](int64_t i) {
                              const acc_t xhat = centred(acc_t(xo[i]), ctr.c0, ctr.c1) * rs;
                              return acc_t(dy[i]) * (acc_t(1) + acc_t(scale[i])) * xhat;
                            }) /
                        double(D));
  // LayerNorm over a single element is constant: no gradient reaches x. (The
  // general formula gives rstd times a rounding difference, with rstd ~ 1/sqrt(eps).)
  const acc_t rs_dx = D == 1 ? acc_t(0) : rs;
  const Vec a_v(a), c_v(c), rs_dx_v(rs_dx);
  const bool need_total = dx != nullptr || dh != nullptr || rg.need_gate || rg.need_bias;
  row_for<acc_t>(
      D,
      [&](int64_t i) {
        const Vec dyv = Y::load(dy + i), xhat = centred(X::load(xo + i), c0_v, c1_v) * rs_v;
        if (rg.need_shift) accumulate(acc, i, dyv);
        if (rg.need_scale) accumulate(acc + D, i, dyv * xhat);
        if (!need_total) return;
        Vec total = layer_norm_grad(dyv * (one + L::load(scale + i)), xhat, a_v, c_v, rs_dx_v);
        if (dxo) total += X::load(dxo + i);
        if (dx) X::store(dx + i, total);
        if (dh || rg.need_bias) {
          const Vec dhv = L::load(gate + i) * total;
          if (dh) L::store(dh + i, dhv);
          if (rg.need_bias) accumulate(acc + 3 * D, i, dhv);
        }
        if (rg.need_gate) {
          Vec hv = L::load(h + i);
          if (bias) hv += Vec::loadu(bias + i);
          accumulate(acc + 2 * D, i, total * hv);
        }
      },
      [&](int64_t i) {
        const acc_t dyv = acc_t(dy[i]), xhat = centred(acc_t(xo[i]), ctr.c0, ctr.c1) * rs;
        if (rg.need_shift) acc[i] += dyv;
        if (rg.need_scale) acc[D + i] += dyv * xhat;
        if (!need_total) return;
        acc_t total = layer_norm_grad(dyv * (acc_t(1) + acc_t(scale[i])), xhat, a, c, rs_dx);
        if (dxo) total += acc_t(dxo[i]);
        if (dx) dx[i] = x_t(total);
        const acc_t dhv = gate ? acc_t(gate[i]) * total : acc_t(0);
        if (dh) dh[i] = l_t(dhv);
        if (rg.need_bias) acc[3 * D + i] += dhv;
        if (rg.need_gate)
          acc[2 * D + i] += total * (acc_t(h[i]) + (bias ? acc_t(bias[i]) : acc_t(0)));
      });
}

// The LayerNorm + modulate backward of every row, with the gated residual when
// h is defined (and its folded bias when a.bias is). Outputs not asked for are
// empty. dbias is the sum over samples of each sample's column sums of gate
// dx_total, added in sample order.
void backward(const AdalnArgs& a, const Tensor& dy, const Tensor& dxo, const Tensor& gate,
              const Tensor& scale, const Tensor& mean, const Tensor& rstd, Tensor& dx, Tensor& dh,
              Tensor& dgate, Tensor& dshift, Tensor& dscale, Tensor& dbias) {
  with_adaln_types(a.x.scalar_type(), *a.low, dy.scalar_type(), [&](auto tx, auto tl, auto ty) {
    using x_t = typename decltype(tx)::type;
    using l_t = typename decltype(tl)::type;
    using y_t = typename decltype(ty)::type;
    using acc_t = at::opmath_type<x_t>;
    const int64_t D = a.dim, T = a.tokens, cs = scale.stride(0);
    const int64_t gs = gate.defined() ? gate.stride(0) : 0;
    const x_t* xo = a.x.const_data_ptr<x_t>();
    const y_t* dy_p = dy.const_data_ptr<y_t>();
    const x_t* dxo_p = in_ptr<x_t>(dxo);
    const l_t *h = in_ptr<l_t>(a.h), *gate_p = in_ptr<l_t>(gate),
              *scale_p = scale.const_data_ptr<l_t>();
    const acc_t* bias = in_ptr<acc_t>(a.bias);
    const acc_t *mean_p = mean.const_data_ptr<acc_t>(), *rstd_p = rstd.const_data_ptr<acc_t>();
    x_t* dx_p = out_ptr<x_t>(dx);
    l_t* dh_p = out_ptr<l_t>(dh);
    const RowGrads rg{D, dshift.numel() > 0, dscale.numel() > 0, dgate.numel() > 0,
                      dbias.numel() > 0};
    l_t* outs[3] = {out_ptr<l_t>(dshift), out_ptr<l_t>(dscale), out_ptr<l_t>(dgate)};
    std::vector<double> per_sample_bias(rg.need_bias ? a.batch * D : 0);
    column_sums<kColumnSums, acc_t>(
        a.batch, T, D, {rg.need_shift, rg.need_scale, rg.need_gate, rg.need_bias},
        [&](int64_t b, int64_t lo, int64_t hi, acc_t* acc) {
          for (int64_t r = lo; r < hi; ++r) {
            const int64_t o = r * D;
            adaln_backward_row<x_t, l_t, y_t>(
                rg, xo + o, dy_p + o, dxo_p ? dxo_p + o : nullptr, h ? h + o : nullptr, bias,
                gate_p ? gate_p + b * gs : nullptr, scale_p + b * cs, mean_p[r], rstd_p[r],
                dx_p ? dx_p + o : nullptr, dh_p ? dh_p + o : nullptr, acc);
          }
        },
        [&](int k, int64_t b, int64_t d, double v) {
          if (k < 3) {
            outs[k][b * D + d] = l_t(v);
          } else {
            per_sample_bias[b * D + d] = v;
          }
        });
    if (!rg.need_bias) return;
    // Sample by sample, each row read in order (column by column over [B, D]
    // strides a cache line per value).
    std::vector<double> total(static_cast<size_t>(D), 0.0);
    double* __restrict__ sum = total.data();
    for (int64_t b = 0; b < a.batch; ++b) {
      const double* __restrict__ row = per_sample_bias.data() + b * D;
      for (int64_t d = 0; d < D; ++d) sum[d] += row[d];
    }
    acc_t* dbias_p = dbias.mutable_data_ptr<acc_t>();
    for (int64_t d = 0; d < D; ++d) dbias_p[d] = acc_t(sum[d]);
  });
}

std::tuple<Tensor, Tensor, Tensor> ln_modulate_backward(const Tensor& grad_y, const Tensor& x,
                                                        const Tensor& scale, const Tensor& mean,
                                                        const Tensor& rstd,
                                                        std::array<bool, 3> mask) {
  AdalnBackward g =
      ln_modulate_backward_args("ln_modulate_backward", grad_y, x, scale, mean, rstd, mask);
  backward(g.a, g.dy, Tensor(), Tensor(), scale, mean, rstd, g.dx, g.dh, g.dgate, g.dshift,
           g.dscale, g.dbias);
  return {g.dx, g.dshift, g.dscale};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> gated_residual_ln_modulate_backward(
    const std::optional<Tensor>& grad_x_out, const Tensor& grad_y, const Tensor& x_out,
    const Tensor& h, const Tensor& gate, const Tensor& scale, const Tensor& mean,
    const Tensor& rstd, std::array<bool, 6> mask, const std::optional<Tensor>& bias) {
  AdalnBackward g = gated_residual_ln_modulate_backward_args("gated_residual_ln_modulate_backward",
                                                             grad_x_out, grad_y, x_out, h, gate,
                                                             scale, mean, rstd, mask, bias);
  backward(g.a, g.dy, g.dxo, gate, scale, mean, rstd, g.dx, g.dh, g.dgate, g.dshift, g.dscale,
           g.dbias);
  return {g.dx, g.dh, g.dgate, g.dshift, g.dscale, bias_grad(g)};
}

std::tuple<Tensor, Tensor> gated_residual_backward(const Tensor& grad_, const Tensor& h_,
                                                   const Tensor& gate, std::array<bool, 2> mask) {
  constexpr const char* op = "gated_residual_backward";
  AdalnArgs a = adaln_args_with_h(op, "grad", grad_, h_);
  check_modulation(op, "gate", gate, a);
  Tensor dh = empty_if(mask[0], a.h), dgate = per_sample_empty(mask[1], a);
  with_residual_types(a.x.scalar_type(), *a.low, [&](auto tx, auto tl) {
    using x_t = typename decltype(tx)::type;
    using l_t = typename decltype(tl)::type;
    using X = VecIO<x_t>;
    using L = VecIO<l_t>;
    using acc_t = typename X::acc_t;
    const int64_t D = a.dim, gs = gate.stride(0);
    const x_t* g = a.x.const_data_ptr<x_t>();
    const l_t *h = a.h.const_data_ptr<l_t>(), *gate_p = gate.const_data_ptr<l_t>();
    l_t* dh_p = out_ptr<l_t>(dh);
    column_sums<1, l_t>(a.batch, a.tokens, D, {out_ptr<l_t>(dgate)},
                        [&](int64_t b, int64_t lo, int64_t hi, acc_t* acc) {
                          const l_t* gr = gate_p + b * gs;
                          for (int64_t r = lo; r < hi; ++r) {
                            const x_t* gg = g + r * D;
                            const l_t* hr = h + r * D;
                            l_t* dhr = dh_p ? dh_p + r * D : nullptr;
                            row_for<acc_t>(
                                D,
                                [&](int64_t i) {
                                  const auto gv = X::load(gg + i);
                                  if (dhr) L::store(dhr + i, L::load(gr + i) * gv);
                                  if (mask[1]) accumulate(acc, i, gv * L::load(hr + i));
                                },
                                [&](int64_t i) {
                                  if (dhr) dhr[i] = l_t(acc_t(gr[i]) * acc_t(gg[i]));
                                  if (mask[1]) acc[i] += acc_t(gg[i]) * acc_t(hr[i]);
                                });
                          }
                        });
  });
  return {dh, dgate};
}

}  // namespace

TORCH_LIBRARY_IMPL(sit_ext, CPU, m) {
  m.impl("ln_modulate", &ln_modulate);
  m.impl("ln_modulate_backward", &ln_modulate_backward);
  m.impl("gated_residual_ln_modulate", &gated_residual_ln_modulate);
  m.impl("gated_residual_ln_modulate_backward", &gated_residual_ln_modulate_backward);
  m.impl("gated_residual", &gated_residual);
  m.impl("gated_residual_backward", &gated_residual_backward);
}

}  // namespace sit_ext::cpu
