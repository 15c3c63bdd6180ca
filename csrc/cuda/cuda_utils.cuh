// CUDA helpers: 16-byte packs, deterministic block sums, and the tiling of
// [rows, n] problems into fixed chunks, one chunk per block.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>
#include <limits>

namespace sit_ext::cuda {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kUnroll = 4;  // packs per thread per chunk

// kVec elements moved as one access: 16 bytes when kVec = 16 / sizeof(T).
template <typename T, int kVec>
struct alignas(sizeof(T) * kVec) Pack {
  T v[kVec];
};

template <int kVec, typename T>
__device__ __forceinline__ Pack<T, kVec> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, kVec>*>(p);
}

template <int kVec, typename T>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, kVec>& v) {
  *reinterpret_cast<Pack<T, kVec>*>(p) = v;
}

// Elements one block covers.
template <int kVec>
constexpr int64_t chunk_size() {
  return int64_t(kThreads) * kVec * kUnroll;
}

// Calls f(i) for the first element i of each of this thread's packs in
// [begin, end). Neighbouring threads touch neighbouring packs.
template <int kVec, typename F>
__device__ __forceinline__ void for_each_pack(int64_t begin, int64_t end, const F& f) {
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    const int64_t i = begin + (int64_t(u) * kThreads + threadIdx.x) * kVec;
    if (i < end) f(i);
  }
}

// Sums v[0..K) over the block in a fixed order (deterministic); thread 0 gets
// the totals.
template <int K>
__device__ __forceinline__ void block_sum(double (&v)[K]) {
  __shared__ double smem[K][kWarps];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    for (int off = 16; off > 0; off /= 2) v[k] += __shfl_down_sync(0xffffffffu, v[k], off);
    if (lane == 0) smem[k][warp] = v[k];
  }
  __syncthreads();
  if (threadIdx.x == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) {
      double s = 0;
      for (int w = 0; w < kWarps; ++w) s += smem[k][w];
      v[k] = s;
    }
  }
}

// The vector width for this launch: 16-byte packs when every pointer is
// 16-byte aligned and rows start on a pack boundary, else single elements.
template <typename scalar_t>
constexpr int kVecOf = 16 / sizeof(scalar_t);

inline bool aligned16(std::initializer_list<const void*> ptrs) {
  for (const void* p : ptrs) {
    if (p != nullptr && reinterpret_cast<uintptr_t>(p) % 16 != 0) return false;
  }
  return true;
}

template <typename scalar_t, typename Launch>
void with_vec(bool vectorize, const Launch& launch) {
  if (vectorize) {
    launch(std::integral_constant<int, kVecOf<scalar_t>>{});
  } else {
    launch(std::integral_constant<int, 1>{});
  }
}

// Mixed dtypes: packs of kVec elements with kVec set by the widest type, so
// that its accesses are 16 bytes (the narrower ones 8).
template <typename... Ts>
constexpr int kVecOfWidest = 16 / std::max({sizeof(Ts)...});

// Whether every (non-null) pointer is aligned for packs of kVec of its type.
template <int kVec, typename... Ts>
bool packs_aligned(const Ts*... ptrs) {
  return ((ptrs == nullptr || reinterpret_cast<uintptr_t>(ptrs) % (sizeof(Ts) * kVec) == 0) && ...);
}

// A launch of `blocks` blocks fits the grid's x dimension.
inline void check_grid(const char* op, int64_t blocks) {
  TORCH_CHECK(blocks <= int64_t(std::numeric_limits<int32_t>::max()), "sit_ext.", op,
              ": the input needs ", blocks,
              " CUDA blocks, more than a grid holds; split the batch");
}

__host__ __device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Multiprocessors of a device (cached: the query is made once per device).
inline int64_t sm_count(const at::Device& device) {
  static int counts[64] = {};
  const int index = device.index();
  TORCH_CHECK(index >= 0 && index < 64, "sit_ext: unexpected CUDA device index ", index);
  if (counts[index] == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&counts[index], cudaDevAttrMultiProcessorCount, index));
  }
  return counts[index];
}

}  // namespace sit_ext::cuda
