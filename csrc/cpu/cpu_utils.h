// CPU helpers: SIMD load/store in the accumulation type, and a deterministic
// parallel loop over fixed-size chunks of [rows, n] data.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <array>
#include <type_traits>
#include <vector>

namespace sit_ext::cpu {

// Loads and stores Vec::size() elements of scalar_t as one vector of acc_t:
// float for float/half/bfloat16, double for double.
template <typename scalar_t>
struct VecIO {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = at::vec::Vectorized<acc_t>;
  static constexpr int64_t kSize = Vec::size();

  static Vec load(const scalar_t* p) {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      return Vec::loadu(p);
    } else {
      Vec v;
      at::vec::load_to_float(p, v);
      return v;
    }
  }
  static void store(scalar_t* p, const Vec& v) {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      v.store(p);
    } else {
      at::vec::convert_from_float<scalar_t>(v, v).store(p, kSize);
    }
  }
};

// A vector sum for long reductions: terms are added in acc_t lanes, which are
// flushed into double lanes every kFlush steps. Rounding error then grows with
// kFlush rather than with n, so sums are at least as accurate as torch.sum,
// at the cost of one store per kFlush vectors.
template <typename acc_t>
struct WideSum {
  using Vec = at::vec::Vectorized<acc_t>;
  static constexpr int kFlush = 16;
  Vec inner = Vec(0);
  int count = 0;
  std::array<double, Vec::size()> lanes{};

  void add(const Vec& a) {
    inner += a;
    if (++count == kFlush) flush();
  }
  void add_product(const Vec& a, const Vec& b) {
    inner = at::vec::fmadd(a, b, inner);
    if (++count == kFlush) flush();
  }
  void flush() {
    std::array<acc_t, Vec::size()> v;
    inner.store(v.data());
    for (int64_t l = 0; l < Vec::size(); ++l) lanes[l] += v[l];
    inner = Vec(0);
    count = 0;
  }
  double total() {
    flush();
    double s = 0;
    for (double l : lanes) s += l;
    return s;
  }
};

// Elements per parallel task. Fixed, so that results do not depend on the
// number of threads.
constexpr int64_t kChunk = 16384;

// Runs body(row, begin, end, sums) over chunks [begin, end) of every row of a
// [rows, n] problem, in parallel. body adds K partial sums into sums[0..K);
// they are then added per row in chunk order into out[row * K + k], so the
// result is bitwise reproducible for any thread count.
template <int K, typename Body>
void for_each_chunk(int64_t rows, int64_t n, double* out, const Body& body) {
  const int64_t chunks = std::max<int64_t>(1, (n + kChunk - 1) / kChunk);
  std::vector<double> partial(static_cast<size_t>(rows * chunks * K), 0.0);
  const int64_t grain = std::max<int64_t>(1, kChunk / std::max<int64_t>(n, 1));
  at::parallel_for(0, rows * chunks, grain, [&](int64_t lo, int64_t hi) {
    for (int64_t task = lo; task < hi; ++task) {
      const int64_t row = task / chunks, begin = (task % chunks) * kChunk;
      body(row, begin, std::min(n, begin + kChunk), K > 0 ? &partial[task * K] : nullptr);
    }
  });
  for (int64_t row = 0; row < rows && K > 0; ++row) {
    for (int k = 0; k < K; ++k) {
      double s = 0;
      for (int64_t c = 0; c < chunks; ++c) s += partial[(row * chunks + c) * K + k];
      out[row * K + k] = s;
    }
  }
}

}  // namespace sit_ext::cpu
