// Shared pieces of the CUDA AdaLN-Zero kernels (adaln_forward.cu,
// adaln_backward.cu): dtypes, block reductions, and how a row is laid out
// over a block's threads.
//
// dtypes (see checks.h): x, x_out, dx in x_t; h, gate, shift, scale, dh and
// the per-sample gradients in l_t; y and grad_y in y_t; arithmetic in acc_t
// (float, double for double).
//
// Row layout. Rows of D <= kResidentElems * threads are "resident": thread j
// keeps elements j, j + threads, ... of the row in registers, kElems of them
// (kVec-element packs: 16-byte accesses for the widest dtype when D and every
// pointer allow, single elements otherwise), so each row is read once. Longer
// rows are streamed: the kernels read them again from memory instead.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include "cuda_utils.cuh"
#include "sit_ext/adaln_math.h"
#include "sit_ext/checks.h"
#include "sit_ext/dtypes.h"

namespace sit_ext::cuda {

constexpr int kElems = 8;  // elements per thread and row in the resident kernels

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

// The per-sample [B, D] vectors, each with its own row stride, and the [D]
// bias folded into h (null when none).
template <typename l_t>
struct ModArgs {
  const l_t* gate;
  const l_t* shift;
  const l_t* scale;
  int64_t gate_stride, shift_stride, scale_stride;
  const at::opmath_type<l_t>* bias;  // in the accumulation dtype
};

template <typename l_t>
ModArgs<l_t> mod_args(const at::Tensor& gate, const at::Tensor& shift, const at::Tensor& scale,
                      const at::Tensor& bias = at::Tensor()) {
  auto stride = [](const at::Tensor& t) { return t.defined() ? t.stride(0) : int64_t(0); };
  return {in_ptr<l_t>(gate),
          in_ptr<l_t>(shift),
          in_ptr<l_t>(scale),
          stride(gate),
          stride(shift),
          stride(scale),
          in_ptr<at::opmath_type<l_t>>(bias)};
}

// Elements [col, col + kVec) of the folded bias, zeros without one.
template <int kVec, typename l_t>
__device__ __forceinline__ Pack<at::opmath_type<l_t>, kVec> load_bias(const ModArgs<l_t>& mod,
                                                                      int64_t col) {
  Pack<at::opmath_type<l_t>, kVec> v{};
  if (mod.bias != nullptr) v = load_pack<kVec>(mod.bias + col);
  return v;
}

// Whether packs of kVec fit D, every pointer and every modulation row stride.
template <int kVec, typename l_t, typename... Ts>
bool packs_fit(int64_t dim, const ModArgs<l_t>& mod, const Ts*... ptrs) {
  return dim % kVec == 0 && mod.gate_stride % kVec == 0 && mod.shift_stride % kVec == 0 &&
         mod.scale_stride % kVec == 0 &&
         packs_aligned<kVec>(mod.gate, mod.shift, mod.scale, mod.bias, ptrs...);
}

// Threads for a resident row of D elements, kPerThread per thread in packs of
// kVec, or 0 when the row needs more than max_threads: it is then streamed.
template <int kVec, int kPerThread = kElems>
int resident_threads(int64_t dim, int max_threads) {
  const int64_t packs = dim / kVec, per = kPerThread / kVec;
  const int64_t threads = (ceil_div(packs, per) + 31) / 32 * 32;
  return threads <= max_threads ? int(threads) : 0;
}

// Calls launch(integral_constant<kVec>) with the widest packs that fit, else 1.
template <int kWide, typename Launch>
void with_pack_width(bool wide, const Launch& launch) {
  if (wide) {
    launch(std::integral_constant<int, kWide>{});
  } else {
    launch(std::integral_constant<int, 1>{});
  }
}

// Rows per backward chunk, from T alone (so that the gradient bits do not
// depend on the GPU): about kChunkRows, split evenly.
constexpr int64_t kChunkRows = 16;

inline int64_t chunk_rows_for(int64_t tokens) {
  const int64_t chunks = std::max<int64_t>(1, ceil_div(tokens, kChunkRows));
  return std::max<int64_t>(1, ceil_div(tokens, chunks));
}

}  // namespace sit_ext::cuda
