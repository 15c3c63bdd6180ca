// CPU kernels of the AdaLN-Zero family: ln_modulate, gated_residual_ln_modulate
// and gated_residual, forward and backward.
//
// Forward runs rows in parallel; each row is read once from memory and then
// from L1 for the statistics. Backward splits each sample's T rows into fixed
// chunks; a chunk sums its rows' contributions to dshift/dscale/dgate, and the
// chunk sums are added per sample in chunk order: deterministic for any number
// of threads.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "cpu_utils.h"
#include "sit_ext/adaln_math.h"
#include "sit_ext/checks.h"

namespace sit_ext::cpu {
namespace {

using at::Tensor;

constexpr int64_t kRowChunk = 32;  // rows per backward task

template <typename scalar_t>
struct Row {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
};

// Sums f(i) over the vectors and the scalar tail of a row of n elements:
// f(i, Vec) for full vectors, f(i, scalar) for the tail.
template <typename scalar_t, typename VecF, typename ScalarF>
typename Row<scalar_t>::acc_t row_sum(int64_t n, const VecF& fv, const ScalarF& fs) {
  using R = Row<scalar_t>;
  typename R::Vec s(0);
  int64_t i = 0;
  for (; i + R::IO::kSize <= n; i += R::IO::kSize) s += fv(i);
  std::array<typename R::acc_t, R::Vec::size()> lanes;
  s.store(lanes.data());
  typename R::acc_t total = 0;
  for (auto l : lanes) total += l;
  for (; i < n; ++i) total += fs(i);
  return total;
}

// Calls fv(i) for the full vectors of a row and fs(i) for its tail.
template <typename scalar_t, typename VecF, typename ScalarF>
void row_for(int64_t n, const VecF& fv, const ScalarF& fs) {
  int64_t i = 0;
  for (; i + VecIO<scalar_t>::kSize <= n; i += VecIO<scalar_t>::kSize) fv(i);
  for (; i < n; ++i) fs(i);
}

// Per-sample column sums for backward: body(b, row_begin, row_end, acc) adds
// the K column sums of D values of rows [row_begin, row_end) of sample b into
// acc (zeroed, acc_t[K * D]); outs[k] (nullable, [B, D]) receive the totals.
// A sample of more than kRowChunk rows is split into chunks whose sums are
// added in chunk order, in double: deterministic for any number of threads.
template <int K, typename scalar_t, typename Body>
void column_sums(int64_t batch, int64_t tokens, int64_t dim, std::array<scalar_t*, K> outs,
                 const Body& body) {
  using acc_t = typename Row<scalar_t>::acc_t;
  const int64_t chunks = std::max<int64_t>(1, (tokens + kRowChunk - 1) / kRowChunk);
  if (chunks == 1) {  // a whole sample per task: straight into the outputs
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, tokens * dim));
    at::parallel_for(0, batch, grain, [&](int64_t lo, int64_t hi) {
      std::vector<acc_t> acc(static_cast<size_t>(K * dim));
      for (int64_t b = lo; b < hi; ++b) {
        std::fill(acc.begin(), acc.end(), acc_t(0));
        body(b, b * tokens, (b + 1) * tokens, acc.data());
        for (int k = 0; k < K; ++k) {
          if (outs[k] == nullptr) continue;
          for (int64_t d = 0; d < dim; ++d) outs[k][b * dim + d] = scalar_t(acc[k * dim + d]);
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
      if (outs[k] == nullptr) continue;
      std::fill(total.begin(), total.end(), 0.0);
      for (int64_t c = 0; c < chunks; ++c) {
        const acc_t* p = &partial[((b * chunks + c) * K + k) * dim];
        for (int64_t d = 0; d < dim; ++d) total[d] += p[d];
      }
      for (int64_t d = 0; d < dim; ++d) outs[k][b * dim + d] = scalar_t(total[d]);
    }
  });
}

// Adds v into acc[i .. i + kSize).
template <typename Vec, typename acc_t>
void accumulate(acc_t* acc, int64_t i, const Vec& v) {
  (Vec::loadu(acc + i) + v).store(acc + i);
}

// ------------------------------------------------------------------ forward

// x_out = x + gate h (when h is given), then y = LN(x_out) (1 + scale) + shift.
template <typename scalar_t>
void adaln_forward(const AdalnArgs& a, const Tensor& gate, const Tensor& shift,
                   const Tensor& scale, double eps, Tensor& x_out, Tensor& y, Tensor& mean,
                   Tensor& rstd) {
  using R = Row<scalar_t>;
  using IO = typename R::IO;
  using acc_t = typename R::acc_t;
  using Vec = typename R::Vec;
  const int64_t D = a.dim, T = a.tokens;
  const bool residual = a.h.defined();
  const scalar_t* x = a.x.const_data_ptr<scalar_t>();
  const scalar_t* h = residual ? a.h.const_data_ptr<scalar_t>() : nullptr;
  const scalar_t* gate_p = residual ? gate.const_data_ptr<scalar_t>() : nullptr;
  const scalar_t* shift_p = shift.const_data_ptr<scalar_t>();
  const scalar_t* scale_p = scale.const_data_ptr<scalar_t>();
  scalar_t* xo_p = residual ? x_out.mutable_data_ptr<scalar_t>() : nullptr;
  scalar_t* y_p = y.mutable_data_ptr<scalar_t>();
  acc_t* mean_p = mean.mutable_data_ptr<acc_t>();
  acc_t* rstd_p = rstd.mutable_data_ptr<acc_t>();
  const int64_t gs = residual ? gate.stride(0) : 0, ss = shift.stride(0), cs = scale.stride(0);
  at::parallel_for(0, a.batch * T, std::max<int64_t>(1, 8192 / D), [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      const int64_t b = r / T;
      const scalar_t* src = x + r * D;
      if (residual) {
        const scalar_t *hr = h + r * D, *g = gate_p + b * gs;
        scalar_t* xo = xo_p + r * D;
        row_for<scalar_t>(
            D,
            [&](int64_t i) {
              IO::store(xo + i, gated_residual_value(IO::load(src + i), IO::load(g + i),
                                                     IO::load(hr + i)));
            },
            [&](int64_t i) {
              xo[i] = scalar_t(gated_residual_value(acc_t(src[i]), acc_t(g[i]), acc_t(hr[i])));
            });
        src = xo;  // normalise the stored (rounded) x_out, as backward will see it
      }
      const acc_t mu = row_sum<scalar_t>(
                           D, [&](int64_t i) { return IO::load(src + i); },
                           [&](int64_t i) { return acc_t(src[i]); }) /
                       acc_t(D);
      const Vec mu_v(mu);
      const acc_t var = row_sum<scalar_t>(
                            D,
                            [&](int64_t i) {
                              const Vec d = IO::load(src + i) - mu_v;
                              return d * d;
                            },
                            [&](int64_t i) {
                              const acc_t d = acc_t(src[i]) - mu;
                              return d * d;
                            }) /
                        acc_t(D);
      const acc_t rs = acc_t(1) / std::sqrt(var + acc_t(eps));
      const Vec rs_v(rs);
      const scalar_t *sh = shift_p + b * ss, *sc = scale_p + b * cs;
      scalar_t* yr = y_p + r * D;
      row_for<scalar_t>(
          D,
          [&](int64_t i) {
            IO::store(yr + i, modulate_value((IO::load(src + i) - mu_v) * rs_v, IO::load(sh + i),
                                             IO::load(sc + i)));
          },
          [&](int64_t i) {
            yr[i] = scalar_t(modulate_value((acc_t(src[i]) - mu) * rs, acc_t(sh[i]), acc_t(sc[i])));
          });
      mean_p[r] = mu;
      rstd_p[r] = rs;
    }
  });
}

std::tuple<Tensor, Tensor, Tensor> ln_modulate(const Tensor& x_, const Tensor& shift,
                                               const Tensor& scale, double eps) {
  constexpr const char* op = "ln_modulate";
  const AdalnArgs a = adaln_args(op, "x", x_);
  check_modulation(op, "shift", shift, a);
  check_modulation(op, "scale", scale, a);
  Tensor y = at::empty_like(a.x), mean = stats_empty(a.x), rstd = stats_empty(a.x), none;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.x.scalar_type(), op, [&] {
    adaln_forward<scalar_t>(a, Tensor(), shift, scale, eps, none, y, mean, rstd);
  });
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
  Tensor x_out = at::empty_like(a.x), y = at::empty_like(a.x);
  Tensor mean = stats_empty(a.x), rstd = stats_empty(a.x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.x.scalar_type(), op, [&] {
    adaln_forward<scalar_t>(a, gate, shift, scale, eps, x_out, y, mean, rstd);
  });
  return {x_out, y, mean, rstd};
}

Tensor gated_residual(const Tensor& x_, const Tensor& h_, const Tensor& gate) {
  constexpr const char* op = "gated_residual";
  const AdalnArgs a = adaln_args(op, "x", x_, h_);
  check_modulation(op, "gate", gate, a);
  Tensor out = at::empty_like(a.x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.x.scalar_type(), op, [&] {
    using IO = VecIO<scalar_t>;
    using acc_t = typename IO::acc_t;
    const int64_t D = a.dim, T = a.tokens, gs = gate.stride(0);
    const scalar_t *x = a.x.const_data_ptr<scalar_t>(), *h = a.h.const_data_ptr<scalar_t>();
    const scalar_t* g = gate.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, a.batch * T, std::max<int64_t>(1, 16384 / D), [&](int64_t lo, int64_t hi) {
      for (int64_t r = lo; r < hi; ++r) {
        const scalar_t *xr = x + r * D, *hr = h + r * D, *gr = g + (r / T) * gs;
        scalar_t* orow = o + r * D;
        row_for<scalar_t>(
            D,
            [&](int64_t i) {
              IO::store(orow + i, gated_residual_value(IO::load(xr + i), IO::load(gr + i),
                                                       IO::load(hr + i)));
            },
            [&](int64_t i) {
              orow[i] = scalar_t(gated_residual_value(acc_t(xr[i]), acc_t(gr[i]), acc_t(hr[i])));
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
// [0, D) dshift, [D, 2D) dscale, [2D, 3D) dgate.
struct RowGrads {
  int64_t dim;
  bool need_shift, need_scale, need_gate;
};

template <typename scalar_t>
void adaln_backward_row(const RowGrads& rg, const scalar_t* xo, const scalar_t* dy,
                        const scalar_t* dxo, const scalar_t* h, const scalar_t* gate,
                        const scalar_t* scale, typename Row<scalar_t>::acc_t mu,
                        typename Row<scalar_t>::acc_t rs, scalar_t* dx, scalar_t* dh,
                        typename Row<scalar_t>::acc_t* acc) {
  using R = Row<scalar_t>;
  using IO = typename R::IO;
  using acc_t = typename R::acc_t;
  using Vec = typename R::Vec;
  const int64_t D = rg.dim;
  const Vec mu_v(mu), rs_v(rs), one(1);
  const acc_t a = row_sum<scalar_t>(
                      D, [&](int64_t i) { return IO::load(dy + i) * (one + IO::load(scale + i)); },
                      [&](int64_t i) { return acc_t(dy[i]) * (acc_t(1) + acc_t(scale[i])); }) /
                  acc_t(D);
  const acc_t c = row_sum<scalar_t>(
                      D,
                      [&](int64_t i) {
                        const Vec xhat = (IO::load(xo + i) - mu_v) * rs_v;
                        return IO::load(dy + i) * (one + IO::load(scale + i)) * xhat;
                      },
                      [&](int64_t i) {
                        const acc_t xhat = (acc_t(xo[i]) - mu) * rs;
                        return acc_t(dy[i]) * (acc_t(1) + acc_t(scale[i])) * xhat;
                      }) /
                  acc_t(D);
  // LayerNorm over a single element is constant: no gradient reaches x. (The
  // general formula gives rstd times a rounding difference, with rstd ~ 1/sqrt(eps).)
  const acc_t rs_dx = D == 1 ? acc_t(0) : rs;
  const Vec a_v(a), c_v(c), rs_dx_v(rs_dx);
  const bool need_total = dx != nullptr || dh != nullptr || rg.need_gate;
  row_for<scalar_t>(
      D,
      [&](int64_t i) {
        const Vec dyv = IO::load(dy + i), xhat = (IO::load(xo + i) - mu_v) * rs_v;
        if (rg.need_shift) accumulate(acc, i, dyv);
        if (rg.need_scale) accumulate(acc + D, i, dyv * xhat);
        if (!need_total) return;
        Vec total = layer_norm_grad(dyv * (one + IO::load(scale + i)), xhat, a_v, c_v, rs_dx_v);
        if (dxo) total += IO::load(dxo + i);
        if (dx) IO::store(dx + i, total);
        if (dh) IO::store(dh + i, IO::load(gate + i) * total);
        if (rg.need_gate) accumulate(acc + 2 * D, i, total * IO::load(h + i));
      },
      [&](int64_t i) {
        const acc_t dyv = dy[i], xhat = (acc_t(xo[i]) - mu) * rs;
        if (rg.need_shift) acc[i] += dyv;
        if (rg.need_scale) acc[D + i] += dyv * xhat;
        if (!need_total) return;
        acc_t total = layer_norm_grad(dyv * (acc_t(1) + acc_t(scale[i])), xhat, a, c, rs_dx);
        if (dxo) total += acc_t(dxo[i]);
        if (dx) dx[i] = scalar_t(total);
        if (dh) dh[i] = scalar_t(acc_t(gate[i]) * total);
        if (rg.need_gate) acc[2 * D + i] += total * acc_t(h[i]);
      });
}

std::tuple<Tensor, Tensor, Tensor> ln_modulate_backward(const Tensor& grad_y,
                                                        const Tensor& x_, const Tensor& scale,
                                                        const Tensor& mean, const Tensor& rstd,
                                                        std::array<bool, 3> mask) {
  constexpr const char* op = "ln_modulate_backward";
  const AdalnArgs a = adaln_args(op, "x", x_);
  check_modulation(op, "scale", scale, a);
  check_like(op, "x", x_, "grad_y", grad_y);
  check_stats(op, mean, rstd, x_);
  const Tensor dy = grad_y.contiguous();
  Tensor dx = empty_if(mask[0], a.x), dshift = per_sample_empty(mask[1], a),
         dscale = per_sample_empty(mask[2], a);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.x.scalar_type(), op, [&] {
    using acc_t = typename Row<scalar_t>::acc_t;
    const int64_t D = a.dim, T = a.tokens, cs = scale.stride(0);
    const scalar_t *x = a.x.const_data_ptr<scalar_t>(), *dy_p = dy.const_data_ptr<scalar_t>();
    const scalar_t* scale_p = scale.const_data_ptr<scalar_t>();
    const acc_t *mean_p = mean.const_data_ptr<acc_t>(), *rstd_p = rstd.const_data_ptr<acc_t>();
    scalar_t* dx_p = out_ptr<scalar_t>(dx);
    const RowGrads rg{D, mask[1], mask[2], false};
    column_sums<2, scalar_t>(
        a.batch, T, D, {out_ptr<scalar_t>(dshift), out_ptr<scalar_t>(dscale)},
        [&](int64_t b, int64_t lo, int64_t hi, acc_t* acc) {
          for (int64_t r = lo; r < hi; ++r) {
            adaln_backward_row<scalar_t>(rg, x + r * D, dy_p + r * D, nullptr, nullptr, nullptr,
                                         scale_p + b * cs, mean_p[r], rstd_p[r],
                                         dx_p ? dx_p + r * D : nullptr, nullptr, acc);
          }
        });
  });
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
  const Tensor dy = grad_y.contiguous();
  const Tensor dxo = grad_x_out.has_value() ? grad_x_out->contiguous() : Tensor();
  Tensor dx = empty_if(mask[0], a.x), dh = empty_if(mask[1], a.x),
         dgate = per_sample_empty(mask[2], a), dshift = per_sample_empty(mask[3], a),
         dscale = per_sample_empty(mask[4], a);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.x.scalar_type(), op, [&] {
    using acc_t = typename Row<scalar_t>::acc_t;
    const int64_t D = a.dim, T = a.tokens, cs = scale.stride(0), gs = gate.stride(0);
    const scalar_t *xo = a.x.const_data_ptr<scalar_t>(), *h = a.h.const_data_ptr<scalar_t>();
    const scalar_t* dy_p = dy.const_data_ptr<scalar_t>();
    const scalar_t* dxo_p = in_ptr<scalar_t>(dxo);
    const scalar_t *gate_p = gate.const_data_ptr<scalar_t>(), *scale_p = scale.const_data_ptr<scalar_t>();
    const acc_t *mean_p = mean.const_data_ptr<acc_t>(), *rstd_p = rstd.const_data_ptr<acc_t>();
    scalar_t* dx_p = out_ptr<scalar_t>(dx);
    scalar_t* dh_p = out_ptr<scalar_t>(dh);
    const RowGrads rg{D, mask[3], mask[4], mask[2]};
    column_sums<3, scalar_t>(
        a.batch, T, D,
        {out_ptr<scalar_t>(dshift), out_ptr<scalar_t>(dscale),
         out_ptr<scalar_t>(dgate)},
        [&](int64_t b, int64_t lo, int64_t hi, acc_t* acc) {
          for (int64_t r = lo; r < hi; ++r) {
            const int64_t o = r * D;
            adaln_backward_row<scalar_t>(rg, xo + o, dy_p + o, dxo_p ? dxo_p + o : nullptr, h + o,
                                         gate_p + b * gs, scale_p + b * cs, mean_p[r], rstd_p[r],
                                         dx_p ? dx_p + o : nullptr, dh_p ? dh_p + o : nullptr, acc);
          }
        });
  });
  return {dx, dh, dgate, dshift, dscale};
}

std::tuple<Tensor, Tensor> gated_residual_backward(const Tensor& grad_, const Tensor& h_,
                                                   const Tensor& gate,
                                                   std::array<bool, 2> mask) {
  constexpr const char* op = "gated_residual_backward";
  const AdalnArgs a = adaln_args(op, "grad", grad_, h_);
  check_modulation(op, "gate", gate, a);
  Tensor dh = empty_if(mask[0], a.x), dgate = per_sample_empty(mask[1], a);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.x.scalar_type(), op, [&] {
    using IO = VecIO<scalar_t>;
    using acc_t = typename IO::acc_t;
    const int64_t D = a.dim, gs = gate.stride(0);
    const scalar_t *g = a.x.const_data_ptr<scalar_t>(), *h = a.h.const_data_ptr<scalar_t>();
    const scalar_t* gate_p = gate.const_data_ptr<scalar_t>();
    scalar_t* dh_p = out_ptr<scalar_t>(dh);
    column_sums<1, scalar_t>(
        a.batch, a.tokens, D, {out_ptr<scalar_t>(dgate)},
        [&](int64_t b, int64_t lo, int64_t hi, acc_t* acc) {
          const scalar_t* gr = gate_p + b * gs;
          for (int64_t r = lo; r < hi; ++r) {
            const scalar_t *gg = g + r * D, *hr = h + r * D;
            scalar_t* dhr = dh_p ? dh_p + r * D : nullptr;
            row_for<scalar_t>(
                D,
                [&](int64_t i) {
                  const auto gv = IO::load(gg + i);
                  if (dhr) IO::store(dhr + i, IO::load(gr + i) * gv);
                  if (mask[1]) accumulate(acc, i, gv * IO::load(hr + i));
                },
                [&](int64_t i) {
                  if (dhr) dhr[i] = scalar_t(acc_t(gr[i]) * acc_t(gg[i]));
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
