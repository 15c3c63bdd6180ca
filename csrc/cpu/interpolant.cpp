// CPU kernels of the interpolant family: interpolant, velocity_mse, mse.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "cpu_utils.h"
#include "sit_ext/checks.h"
#include "sit_ext/dtypes.h"
#include "sit_ext/interpolant_math.h"

namespace sit_ext::cpu {
namespace {

using at::Tensor;

template <typename acc_t>
Coef<at::vec::Vectorized<acc_t>> broadcast(const Coef<acc_t>& c) {
  using Vec = at::vec::Vectorized<acc_t>;
  return {Vec(c.a), Vec(c.b), Vec(c.da), Vec(c.db), Vec(c.dda), Vec(c.ddb)};
}

// The gradient of t (or of the coefficient table) in t's dtype, from
// per_sample(b, g), which writes sample b's values into g (in double).
template <typename PerSample>
Tensor time_grad(const TimeArg& ta, const Tensor& t, const PerSample& per_sample) {
  Tensor out = at::empty(t.sizes(), t.options());
  const int size = time_grad_size(ta);
  double g[4];
  for (int64_t b = 0; b < t.size(0); ++b) {
    per_sample(b, g);
    for (int k = 0; k < size; ++k) store_as(out.data_ptr(), b * size + k, ta.kind, g[k]);
  }
  return out;
}

std::tuple<Tensor, Tensor> interpolant(const Tensor& x_, const Tensor& noise_, const Tensor& t,
                                       int64_t schedule, std::array<bool, 2> mask) {
  const SampleArgs a = sample_args("interpolant", x_, noise_, t, schedule);
  Tensor xt = empty_if(mask[0], a.x), ut = empty_if(mask[1], a.x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.x.scalar_type(), "interpolant", [&] {
    using IO = VecIO<scalar_t>;
    using acc_t = typename IO::acc_t;
    const scalar_t* x = a.x.const_data_ptr<scalar_t>();
    const scalar_t* e = a.noise.const_data_ptr<scalar_t>();
    scalar_t* xt_p = out_ptr<scalar_t>(xt);
    scalar_t* ut_p = out_ptr<scalar_t>(ut);
    for_each_chunk<0>(a.rows, a.n, nullptr, [&](int64_t row, int64_t i, int64_t end, double*) {
      const Coef<acc_t> c = sample_coef<acc_t>(a.time, row);
      const auto cv = broadcast(c);
      const int64_t o = row * a.n;
      for (; i + IO::kSize <= end; i += IO::kSize) {
        const auto xv = IO::load(x + o + i), ev = IO::load(e + o + i);
        if (xt_p) IO::store(xt_p + o + i, interpolant_value(cv, xv, ev));
        if (ut_p) IO::store(ut_p + o + i, velocity_value(cv, xv, ev));
      }
      for (; i < end; ++i) {
        const acc_t xs = x[o + i], es = e[o + i];
        if (xt_p) xt_p[o + i] = scalar_t(interpolant_value(c, xs, es));
        if (ut_p) ut_p[o + i] = scalar_t(velocity_value(c, xs, es));
      }
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
  const Tensor gx_t = tensor_grad(op, "grad_xt", grad_xt.value_or(Tensor()), a.x);
  const Tensor gu_t = tensor_grad(op, "grad_ut", grad_ut.value_or(Tensor()), a.x);
  Tensor dx = empty_if(mask[0], a.x), dn = empty_if(mask[1], a.x);
  Tensor dt = at::empty({0}, t.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.x.scalar_type(), op, [&] {
    using IO = VecIO<scalar_t>;
    using acc_t = typename IO::acc_t;
    using Vec = typename IO::Vec;
    const scalar_t* x = a.x.const_data_ptr<scalar_t>();
    const scalar_t* e = a.noise.const_data_ptr<scalar_t>();
    const scalar_t* gx = in_ptr<scalar_t>(gx_t);
    const scalar_t* gu = in_ptr<scalar_t>(gu_t);
    scalar_t* dx_p = out_ptr<scalar_t>(dx);
    scalar_t* dn_p = out_ptr<scalar_t>(dn);
    auto body = [&](int64_t row, int64_t i, int64_t end, double* sums) {
      const Coef<acc_t> c =
          used_coef(sample_coef<acc_t>(a.time, row), gx != nullptr, gu != nullptr);
      const auto cv = broadcast(c);
      const int64_t o = row * a.n;
      WideSum<acc_t> s0, s1, s2, s3;
      for (; i + IO::kSize <= end; i += IO::kSize) {
        const Vec gxv = gx ? IO::load(gx + o + i) : Vec(0);
        const Vec guv = gu ? IO::load(gu + o + i) : Vec(0);
        if (dx_p) IO::store(dx_p + o + i, interpolant_grad_x(cv, gxv, guv));
        if (dn_p) IO::store(dn_p + o + i, interpolant_grad_noise(cv, gxv, guv));
        if (sums) {
          const Vec xv = IO::load(x + o + i), ev = IO::load(e + o + i);
          s0.add_product(gxv, xv);
          s1.add_product(gxv, ev);
          s2.add_product(guv, xv);
          s3.add_product(guv, ev);
        }
      }
      double r0 = 0, r1 = 0, r2 = 0, r3 = 0;
      for (; i < end; ++i) {
        const acc_t gxs = gx ? acc_t(gx[o + i]) : acc_t(0);
        const acc_t gus = gu ? acc_t(gu[o + i]) : acc_t(0);
        if (dx_p) dx_p[o + i] = scalar_t(interpolant_grad_x(c, gxs, gus));
        if (dn_p) dn_p[o + i] = scalar_t(interpolant_grad_noise(c, gxs, gus));
        const double xs = x[o + i], es = e[o + i];
        r0 += gxs * xs;
        r1 += gxs * es;
        r2 += gus * xs;
        r3 += gus * es;
      }
      if (sums) {
        sums[0] += s0.total() + r0;
        sums[1] += s1.total() + r1;
        sums[2] += s2.total() + r2;
        sums[3] += s3.total() + r3;
      }
    };
    if (!mask[2]) {
      for_each_chunk<0>(a.rows, a.n, nullptr, body);
      return;
    }
    std::vector<double> sums(a.rows * 4);
    for_each_chunk<4>(a.rows, a.n, sums.data(), body);
    dt = time_grad(a.time, t, [&](int64_t b, double* g) {
      interpolant_time_grad(a.time, b, &sums[4 * b], g);
    });
  });
  return {dx, dn, dt};
}

// pred may have any float dtype (P); x and noise share theirs (X). With
// float64 on one side only, the other is converted (see paired_with).
Tensor velocity_mse(const Tensor& pred_, const Tensor& x_, const Tensor& noise_, const Tensor& t,
                    int64_t schedule) {
  const LossArgs a = loss_args("velocity_mse", pred_, x_, noise_, t, schedule);
  const auto acc_type = a.acc;
  const Tensor &pred = a.pred, &x = a.x, &noise = a.noise;
  Tensor loss = at::empty({a.rows}, x.options().dtype(acc_type));
  with_loss_types(pred.scalar_type(), x.scalar_type(), [&](auto tp, auto tx) {
    using p_t = typename decltype(tp)::type;
    using x_t = typename decltype(tx)::type;
    using PIO = VecIO<p_t>;
    using XIO = VecIO<x_t>;
    using acc_t = typename XIO::acc_t;
    using Vec = typename XIO::Vec;
    const p_t* p = pred.const_data_ptr<p_t>();
    const x_t* xp = x.const_data_ptr<x_t>();
    const x_t* e = noise.const_data_ptr<x_t>();
    std::vector<double> sums(a.rows);
    for_each_chunk<1>(
        a.rows, a.n, sums.data(), [&](int64_t row, int64_t i, int64_t end, double* sum) {
          const Coef<acc_t> c = sample_coef<acc_t>(a.time, row);
          const auto cv = broadcast(c);
          const int64_t o = row * a.n;
          WideSum<acc_t> s;
          for (; i + XIO::kSize <= end; i += XIO::kSize) {
            const Vec r = PIO::load(p + o + i) -
                          velocity_value(cv, XIO::load(xp + o + i), XIO::load(e + o + i));
            s.add_product(r, r);
          }
          double tail = 0;
          for (; i < end; ++i) {
            const double r = acc_t(p[o + i]) - velocity_value(c, acc_t(xp[o + i]), acc_t(e[o + i]));
            tail += r * r;
          }
          sum[0] += s.total() + tail;
        });
    acc_t* out = loss.mutable_data_ptr<acc_t>();
    for (int64_t b = 0; b < a.rows; ++b) out[b] = acc_t(sums[b] / double(a.n));
  });
  return loss;
}

// Gradients in each input's own dtype: dpred in P, dx and dnoise in X.
std::tuple<Tensor, Tensor, Tensor, Tensor> velocity_mse_backward(
    const Tensor& grad_, const Tensor& pred_, const Tensor& x_, const Tensor& noise_,
    const Tensor& t, int64_t schedule, std::array<bool, 4> mask) {
  constexpr const char* op = "velocity_mse_backward";
  const LossArgs a = loss_args(op, pred_, x_, noise_, t, schedule);
  const auto acc_type = a.acc;
  const Tensor grad = per_sample_grad(op, grad_, a.x, acc_type);
  const Tensor &pred = a.pred, &x = a.x, &noise = a.noise;
  Tensor dp = empty_if(mask[0], pred), dx = empty_if(mask[1], x), dn = empty_if(mask[2], x);
  Tensor dt = at::empty({0}, t.options());
  with_loss_types(pred.scalar_type(), x.scalar_type(), [&](auto tp, auto tx) {
    using p_t = typename decltype(tp)::type;
    using x_t = typename decltype(tx)::type;
    using PIO = VecIO<p_t>;
    using XIO = VecIO<x_t>;
    using acc_t = typename XIO::acc_t;
    using Vec = typename XIO::Vec;
    const p_t* p = pred.const_data_ptr<p_t>();
    const x_t* xp = x.const_data_ptr<x_t>();
    const x_t* e = noise.const_data_ptr<x_t>();
    const acc_t* g = grad.const_data_ptr<acc_t>();
    const int64_t g_stride = grad.stride(0);
    p_t* dp_p = out_ptr<p_t>(dp);
    x_t* dx_p = out_ptr<x_t>(dx);
    x_t* dn_p = out_ptr<x_t>(dn);
    auto body = [&](int64_t row, int64_t i, int64_t end, double* sums) {
      const Coef<acc_t> c = sample_coef<acc_t>(a.time, row);
      const auto cv = broadcast(c);
      const acc_t k = acc_t(2) * g[row * g_stride] / acc_t(a.n);
      const Vec kv(k);
      const int64_t o = row * a.n;
      WideSum<acc_t> s0, s1;
      for (; i + XIO::kSize <= end; i += XIO::kSize) {
        const Vec xv = XIO::load(xp + o + i), ev = XIO::load(e + o + i);
        const Vec dpv = kv * (PIO::load(p + o + i) - velocity_value(cv, xv, ev));
        if (dp_p) PIO::store(dp_p + o + i, dpv);
        if (dx_p) XIO::store(dx_p + o + i, -(cv.da * dpv));
        if (dn_p) XIO::store(dn_p + o + i, -(cv.db * dpv));
        if (sums) {
          s0.add_product(dpv, xv);
          s1.add_product(dpv, ev);
        }
      }
      double r0 = 0, r1 = 0;
      for (; i < end; ++i) {
        const acc_t xs = xp[o + i], es = e[o + i];
        const acc_t dps = k * (acc_t(p[o + i]) - velocity_value(c, xs, es));
        if (dp_p) dp_p[o + i] = p_t(dps);
        if (dx_p) dx_p[o + i] = x_t(-(c.da * dps));
        if (dn_p) dn_p[o + i] = x_t(-(c.db * dps));
        r0 += double(dps) * xs;
        r1 += double(dps) * es;
      }
      if (sums) {
        sums[0] -= s0.total() + r0;  // du = -dpred
        sums[1] -= s1.total() + r1;
      }
    };
    if (!mask[3]) {
      for_each_chunk<0>(a.rows, a.n, nullptr, body);
      return;
    }
    std::vector<double> sums(a.rows * 2);
    for_each_chunk<2>(a.rows, a.n, sums.data(), body);
    dt = time_grad(a.time, t, [&](int64_t b, double* g) {
      velocity_mse_time_grad(a.time, b, &sums[2 * b], g);
    });
  });
  return {as_dtype(dp, a.pred_dtype), as_dtype(dx, a.x_dtype), as_dtype(dn, a.x_dtype), dt};
}

// pred (P) and target (Q) in any float dtypes.
Tensor mse(const Tensor& pred_, const Tensor& target_) {
  check_mse_args("mse", pred_, target_);
  const auto acc_type = loss_acc_type(pred_.scalar_type(), target_.scalar_type());
  const Tensor pred = paired_with(pred_, acc_type).contiguous();
  const Tensor target = paired_with(target_, acc_type).contiguous();
  Tensor out = at::empty({}, pred.options().dtype(acc_type));
  with_loss_types(pred.scalar_type(), target.scalar_type(), [&](auto tp, auto tq) {
    using p_t = typename decltype(tp)::type;
    using q_t = typename decltype(tq)::type;
    using PIO = VecIO<p_t>;
    using QIO = VecIO<q_t>;
    using acc_t = typename PIO::acc_t;
    using Vec = typename PIO::Vec;
    const p_t* p = pred.const_data_ptr<p_t>();
    const q_t* q = target.const_data_ptr<q_t>();
    double sum = 0;
    for_each_chunk<1>(1, pred.numel(), &sum, [&](int64_t, int64_t i, int64_t end, double* sums) {
      WideSum<acc_t> s;
      for (; i + PIO::kSize <= end; i += PIO::kSize) {
        const Vec r = PIO::load(p + i) - QIO::load(q + i);
        s.add_product(r, r);
      }
      double tail = 0;
      for (; i < end; ++i) {
        const double r = acc_t(p[i]) - acc_t(q[i]);
        tail += r * r;
      }
      sums[0] += s.total() + tail;
    });
    *out.mutable_data_ptr<acc_t>() = acc_t(sum / double(pred.numel()));
  });
  return out;
}

std::tuple<Tensor, Tensor> mse_backward(const Tensor& grad_, const Tensor& pred_,
                                        const Tensor& target_, std::array<bool, 2> mask) {
  constexpr const char* op = "mse_backward";
  check_mse_args(op, pred_, target_);
  const auto acc_type = loss_acc_type(pred_.scalar_type(), target_.scalar_type());
  const Tensor grad = scalar_grad(op, grad_, pred_, acc_type);
  const Tensor pred = paired_with(pred_, acc_type).contiguous();
  const Tensor target = paired_with(target_, acc_type).contiguous();
  Tensor dp = empty_if(mask[0], pred), dq = empty_if(mask[1], target);
  with_loss_types(pred.scalar_type(), target.scalar_type(), [&](auto tp, auto tq) {
    using p_t = typename decltype(tp)::type;
    using q_t = typename decltype(tq)::type;
    using PIO = VecIO<p_t>;
    using QIO = VecIO<q_t>;
    using acc_t = typename PIO::acc_t;
    using Vec = typename PIO::Vec;
    const p_t* p = pred.const_data_ptr<p_t>();
    const q_t* q = target.const_data_ptr<q_t>();
    p_t* dp_p = out_ptr<p_t>(dp);
    q_t* dq_p = out_ptr<q_t>(dq);
    const acc_t k = acc_t(2) * *grad.const_data_ptr<acc_t>() / acc_t(pred.numel());
    const Vec kv(k);
    for_each_chunk<0>(1, pred.numel(), nullptr, [&](int64_t, int64_t i, int64_t end, double*) {
      for (; i + PIO::kSize <= end; i += PIO::kSize) {
        const Vec d = kv * (PIO::load(p + i) - QIO::load(q + i));
        if (dp_p) PIO::store(dp_p + i, d);
        if (dq_p) QIO::store(dq_p + i, -d);
      }
      for (; i < end; ++i) {
        const acc_t d = k * (acc_t(p[i]) - acc_t(q[i]));
        if (dp_p) dp_p[i] = p_t(d);
        if (dq_p) dq_p[i] = q_t(-d);
      }
    });
  });
  return {as_dtype(dp, pred_.scalar_type()), as_dtype(dq, target_.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(sit_ext, CPU, m) {
  m.impl("interpolant", &interpolant);
  m.impl("interpolant_backward", &interpolant_backward);
  m.impl("velocity_mse", &velocity_mse);
  m.impl("velocity_mse_backward", &velocity_mse_backward);
  m.impl("mse", &mse);
  m.impl("mse_backward", &mse_backward);
}

}  // namespace sit_ext::cpu
