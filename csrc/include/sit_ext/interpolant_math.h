// Per-sample schedule coefficients and per-element formulas of the interpolant,
// its target velocity and the velocity MSE. Shared by the CPU and CUDA kernels,
// so both run the same arithmetic. The element formulas are templates: the CPU
// instantiates them with at::vec::Vectorized, the GPU with float/double.
//
// Convention: t = 0 is data, t = 1 is noise.
//   x_t = a(t) x + b(t) eps,   u_t = a'(t) x + b'(t) eps.
#pragma once

#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>

namespace sit_ext {

// Values of the `schedule` argument of the interpolant ops.
enum Schedule : int64_t {
  kLinear = 0,        // a = 1 - t, b = t
  kCosine = 1,        // a = cos(pi t / 2), b = sin(pi t / 2)
  kVP = 2,            // variance preserving, beta_min = 0.1, beta_max = 20
  kCoefficients = 3,  // t is [B, 4]: per-sample (a, b, a', b') given by the caller
};
constexpr int64_t kNumSchedules = 4;

constexpr double kVPBetaMin = 0.1;
constexpr double kVPBetaMax = 20.0;

// a, b, their first derivatives, and the second derivatives (needed for d/dt).
template <typename T>
struct Coef {
  T a, b, da, db, dda, ddb;
};

template <typename T>
C10_HOST_DEVICE inline Coef<T> schedule_coef(int64_t schedule, T t) {
  if (schedule == kCosine) {
    const T h = T(1.5707963267948966);  // pi / 2
    const T c = ::cos(h * t), s = ::sin(h * t);
    return {c, s, -h * s, h * c, -h * h * c, -h * h * s};
  }
  if (schedule == kVP) {
    // log a = -t^2 (bmax - bmin) / 4 - t bmin / 2, b = sqrt(1 - a^2). t is held in [0, 1]
    // (as sit_ext.reference does): just below 0, a > 1 and b would be NaN.
    t = t < T(0) ? T(0) : (t > T(1) ? T(1) : t);
    const T range = T(kVPBetaMax - kVPBetaMin), bmin = T(kVPBetaMin);
    const T g = -T(0.5) * t * range - T(0.5) * bmin;  // (log a)'
    const T log_a = -T(0.25) * t * t * range - T(0.5) * t * bmin;
    const T a = ::exp(log_a);
    const T da = a * g;
    const T dda = a * (g * g - T(0.5) * range);
    // 1 - a^2 as -expm1(2 log a): for t below ~1e-8 the difference cancels (below ~1e-16 to 0,
    // which made b' and b'' infinite, and the t gradient inf or NaN, where they are finite).
    const T b = ::sqrt(-::expm1(T(2) * log_a));
    const T db = -a * a * g / b;
    // b'' = -(a'^2 + a a'' + b'^2) / b, with a'^2 + a a'' = a^2 (2 g^2 - range / 2).
    const T ddb = -(a * a * (T(2) * g * g - T(0.5) * range) + db * db) / b;
    return {a, b, da, db, dda, ddb};
  }
  // kLinear
  return {T(1) - t, t, T(-1), T(1), T(0), T(0)};
}

// Type-erased read of one element of t (or of the coefficient table), so the
// kernels accept t in any floating dtype without a conversion launch.
enum class FloatKind : int { kFloat, kDouble, kHalf, kBFloat16 };

template <typename T>
C10_HOST_DEVICE inline T load_as(const void* p, int64_t i, FloatKind kind) {
  switch (kind) {
    case FloatKind::kDouble:
      return T(static_cast<const double*>(p)[i]);
    case FloatKind::kHalf:
      return T(static_cast<float>(static_cast<const c10::Half*>(p)[i]));
    case FloatKind::kBFloat16:
      return T(static_cast<float>(static_cast<const c10::BFloat16*>(p)[i]));
    default:
      return T(static_cast<const float*>(p)[i]);
  }
}

template <typename T>
C10_HOST_DEVICE inline void store_as(void* p, int64_t i, FloatKind kind, T value) {
  switch (kind) {
    case FloatKind::kDouble:
      static_cast<double*>(p)[i] = double(value);
      break;
    case FloatKind::kHalf:
      static_cast<c10::Half*>(p)[i] = c10::Half(float(value));
      break;
    case FloatKind::kBFloat16:
      static_cast<c10::BFloat16*>(p)[i] = c10::BFloat16(float(value));
      break;
    default:
      static_cast<float*>(p)[i] = float(value);
  }
}

// Where a kernel finds the per-sample coefficients: t [B] for a built-in
// schedule, or the [B, 4] table (a, b, a', b') for kCoefficients.
struct TimeArg {
  const void* ptr;
  int64_t stride0;
  int64_t stride1;
  FloatKind kind;
  int64_t schedule;
};

// Computed in double and rounded once, so the coefficients are as exact as T
// allows (the VP schedule's b' and b'' lose digits to cancellation otherwise).
// Runs once per block or chunk, not per element.
template <typename T>
C10_HOST_DEVICE inline Coef<T> sample_coef(const TimeArg& ta, int64_t b) {
  Coef<double> c;
  if (ta.schedule == kCoefficients) {
    const int64_t o = b * ta.stride0;
    c = {load_as<double>(ta.ptr, o, ta.kind),
         load_as<double>(ta.ptr, o + ta.stride1, ta.kind),
         load_as<double>(ta.ptr, o + 2 * ta.stride1, ta.kind),
         load_as<double>(ta.ptr, o + 3 * ta.stride1, ta.kind),
         0.0,
         0.0};
  } else {
    c = schedule_coef<double>(ta.schedule, load_as<double>(ta.ptr, b * ta.stride0, ta.kind));
  }
  return {T(c.a), T(c.b), T(c.da), T(c.db), T(c.dda), T(c.ddb)};
}

// ---- Per-element formulas. V is a scalar or a SIMD vector; C is Coef<V>. ----

template <typename V>
C10_HOST_DEVICE inline V interpolant_value(const Coef<V>& c, V x, V e) {
  return c.a * x + c.b * e;
}

template <typename V>
C10_HOST_DEVICE inline V velocity_value(const Coef<V>& c, V x, V e) {
  return c.da * x + c.db * e;
}

// The coefficients the interpolant backward reads: those of an output without a
// gradient (not computed, or not used) are zeroed, so that its missing gradient
// contributes 0 even where a coefficient is infinite (b' = inf at t = 0 for VP).
template <typename T>
C10_HOST_DEVICE inline Coef<T> used_coef(Coef<T> c, bool has_gx, bool has_gu) {
  if (!has_gx) c.a = c.b = T(0);
  if (!has_gu) c.da = c.db = T(0);
  return c;
}

// Interpolant backward, per element: dx = a gx + a' gu, de = b gx + b' gu.
template <typename V>
C10_HOST_DEVICE inline V interpolant_grad_x(const Coef<V>& c, V gx, V gu) {
  return c.a * gx + c.da * gu;
}
template <typename V>
C10_HOST_DEVICE inline V interpolant_grad_noise(const Coef<V>& c, V gx, V gu) {
  return c.b * gx + c.db * gu;
}

// Number of gradient values per sample for t (1) or the coefficient table (4).
C10_HOST_DEVICE inline int time_grad_size(const TimeArg& ta) {
  return ta.schedule == kCoefficients ? 4 : 1;
}

// c * s, where an s of exactly 0 (the gradient of an output that was not used)
// contributes 0 even where c is infinite (a schedule's derivative at t = 0),
// and a c of exactly 0 (no dependence on t, as a'' and b'' of the linear path)
// contributes 0 even where s is infinite.
template <typename T>
C10_HOST_DEVICE inline T times_sum(T c, T s) {
  return (s == T(0) || c == T(0)) ? T(0) : c * s;
}

// Whether sample b's t lies outside [0, 1] under the VP schedule, where the
// coefficients are held at the end's and so do not depend on t.
C10_HOST_DEVICE inline bool vp_time_held(const TimeArg& ta, int64_t b) {
  if (ta.schedule != kVP) return false;
  const double t = load_as<double>(ta.ptr, b * ta.stride0, ta.kind);
  return t < 0.0 || t > 1.0;
}

// Interpolant backward, per sample. The kernels sum, over the sample,
//   s0 = gx*x, s1 = gx*eps, s2 = gu*x, s3 = gu*eps,
// which are the gradients of (a, b, a', b'). Writes into g sample b's gradient
// of the coefficient table, or of t by the chain rule.
template <typename T>
C10_HOST_DEVICE inline void interpolant_time_grad(const TimeArg& ta, int64_t b, const T* s, T* g) {
  if (ta.schedule == kCoefficients) {
    for (int k = 0; k < 4; ++k) g[k] = s[k];
    return;
  }
  if (vp_time_held(ta, b)) {
    g[0] = T(0);
    return;
  }
  const Coef<T> c = sample_coef<T>(ta, b);
  g[0] = times_sum(c.da, s[0]) + times_sum(c.db, s[1]) + times_sum(c.dda, s[2]) +
         times_sum(c.ddb, s[3]);
}

// Velocity MSE: residual r = pred - u_t; the loss averages r^2 over the sample.
// Backward: dpred = (2 g / N) r and du = -dpred, so dx = a' du, de = b' du, and
// the per-sample sums s0 = du*x, s1 = du*eps are the gradients of (a', b').
template <typename T>
C10_HOST_DEVICE inline void velocity_mse_time_grad(const TimeArg& ta, int64_t b, const T* s, T* g) {
  if (ta.schedule == kCoefficients) {
    g[0] = T(0);
    g[1] = T(0);
    g[2] = s[0];
    g[3] = s[1];
    return;
  }
  if (vp_time_held(ta, b)) {
    g[0] = T(0);
    return;
  }
  const Coef<T> c = sample_coef<T>(ta, b);
  g[0] = times_sum(c.dda, s[0]) + times_sum(c.ddb, s[1]);
}

}  // namespace sit_ext
