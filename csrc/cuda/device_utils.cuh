// Device helpers shared by the kernels in csrc/cuda/*.cu: conversions between the storage
// types and their accumulation type, a warp sum and 4 dot products at once, vector packs, and
// the list of storage types to instantiate.
#pragma once

#include <cstdint>
#include <cstring>

#include "kernels.cuh"

// Kernel launches are written SPARSECODE_LAUNCH(kernel, grid, block, stream)(arguments...):
// kernel<<<grid, block, 0, stream>>>(arguments...) under nvcc. Compiled as host C++
// (tests/test_cuda_emulated.py), they call emulated_launch(kernel, grid, block), which the
// test's warp emulator defines, to run every thread of the grid on the CPU.
#if defined(__CUDACC__)
#define SPARSECODE_LAUNCH(kernel, grid, block, stream) kernel<<<(grid), (block), 0, (stream)>>>
#else
#define SPARSECODE_LAUNCH(kernel, grid, block, stream) emulated_launch(kernel, (grid), (block))
#endif

namespace sparsecode::cuda {

constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

// Rounds to nearest even, like the CPU kernels' static_cast to at::Half / at::BFloat16.
template <typename T>
__device__ __forceinline__ T from_acc(Acc<T> v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_acc<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// The sum over the warp's lanes, valid in lane 0; every lane of the warp must call it.
// The shuffle tree is fixed, so the result is the same run to run.
template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    v += __shfl_down_sync(kFullMask, v, offset);
  }
  return v;
}

// The dot products of 4 pairs at once: part[u] is this lane's share of pair u's. Two
// exchanges halve the values a lane holds (lanes l and l ^ 16 swap pairs {0, 1} / {2, 3},
// then l and l ^ 8 swap one of the two), and three more sum the rest: 6 shuffles for 4 dots
// instead of 20. Returns the full dot of pair kept_pair(lane) in every lane, so lanes 0, 8,
// 16 and 24 hold pairs 0, 1, 2 and 3; fixed order. Every lane of the warp must call it.
__device__ __forceinline__ int kept_pair(int lane) {
  return ((lane >> 4) & 1) * 2 + ((lane >> 3) & 1);
}

template <typename A>
__device__ __forceinline__ A warp_dots4(const A (&part)[4], int lane) {
  const bool high16 = (lane & 16) != 0;
  A keep0 = high16 ? part[2] : part[0];
  A keep1 = high16 ? part[3] : part[1];
  keep0 += __shfl_xor_sync(kFullMask, high16 ? part[0] : part[2], 16);
  keep1 += __shfl_xor_sync(kFullMask, high16 ? part[1] : part[3], 16);
  const bool high8 = (lane & 8) != 0;
  A keep = high8 ? keep1 : keep0;
  keep += __shfl_xor_sync(kFullMask, high8 ? keep0 : keep1, 8);
  for (int offset = 4; offset > 0; offset /= 2) {
    keep += __shfl_xor_sync(kFullMask, keep, offset);
  }
  return keep;
}

// V consecutive elements, loaded and stored as one access of V * sizeof(T) bytes (the address
// must be aligned to that).
template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

// values rotated left by r places, values[v] <- values[(v + r) % V] (0 <= r < V, V a power of
// two), through log2(V) stages of selects: a per-lane r needs no dynamically indexed array,
// which would live in local memory.
template <typename A, int V>
__host__ __device__ __forceinline__ void rotate_left(A (&values)[V], int r) {
#pragma unroll
  for (int s = 1; s < V; s *= 2) {
    A shifted[V];
#pragma unroll
    for (int v = 0; v < V; ++v) {
      shifted[v] = values[(v + s) % V];
    }
    const bool take = (r & s) != 0;
#pragma unroll
    for (int v = 0; v < V; ++v) {
      values[v] = take ? shifted[v] : values[v];
    }
  }
}

// dst[0:V] = values rounded to T, as one store of V * sizeof(T) bytes (dst aligned to that):
// 16 bytes go out through the __stcg intrinsic as one 16-byte store (plain stores of a Pack or
// a uint4 were split into 4-byte ones here by nvcc 13).
template <typename T, int V>
__device__ __forceinline__ void store_pack(T* dst, const Acc<T> (&values)[V]) {
  Pack<T, V> packed;
#pragma unroll
  for (int v = 0; v < V; ++v) {
    packed.v[v] = from_acc<T>(values[v]);
  }
  if constexpr (sizeof(packed) == 16) {
    unsigned words[4];
    memcpy(words, &packed, sizeof(words));
    __stcg(reinterpret_cast<uint4*>(dst), make_uint4(words[0], words[1], words[2], words[3]));
  } else {
    *reinterpret_cast<Pack<T, V>*>(dst) = packed;
  }
}

// Whether p is aligned to `bytes`.
inline bool aligned_to(const void* p, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

__host__ __device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// Whether a grid of x by y blocks is within CUDA's limits (x < 2^31, y < 2^16).
inline bool grid_fits(int64_t x, int64_t y) { return x <= 2147483647 && y <= 65535; }

}  // namespace sparsecode::cuda

// Instantiates MACRO(T) for every storage type.
#define SPARSECODE_FOR_EACH_TYPE(MACRO) \
  MACRO(float)                          \
  MACRO(double)                         \
  MACRO(__half)                         \
  MACRO(__nv_bfloat16)
