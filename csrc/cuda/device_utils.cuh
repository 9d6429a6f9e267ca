// Device helpers shared by the kernels in csrc/cuda/*.cu: conversions between the storage
// types and their accumulation type, a warp sum and 4 dot products at once, vector packs, and
// the list of storage types to instantiate.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "kernels.cuh"

// Kernel launches are written SPARSECODE_LAUNCH(kernel, grid, block, stream)(arguments...):
// kernel<<<grid, block, 0, stream>>>(arguments...) under nvcc. Compiled as host C++
// (tests/test_cuda_emulated.py), they call emulated_launch(kernel, grid, block), which the
// test's warp emulator defines, to run every thread of the grid on the CPU.
// SPARSECODE_LAUNCH_SHARED adds `bytes` of dynamic shared memory, which the kernel names with
// SPARSECODE_DYNAMIC_SHARED(name) (unsigned char name[], 16-byte aligned).
#if defined(__CUDACC__)
#define SPARSECODE_LAUNCH(kernel, grid, block, stream) kernel<<<(grid), (block), 0, (stream)>>>
#define SPARSECODE_LAUNCH_SHARED(kernel, grid, block, bytes, stream) \
  kernel<<<(grid), (block), (bytes), (stream)>>>
#define SPARSECODE_DYNAMIC_SHARED(name) extern __shared__ __align__(16) unsigned char name[]
#else
#define SPARSECODE_LAUNCH(kernel, grid, block, stream) emulated_launch(kernel, (grid), (block))
#define SPARSECODE_LAUNCH_SHARED(kernel, grid, block, bytes, stream) \
  emulated_launch(kernel, (grid), (block), (bytes))
#define SPARSECODE_DYNAMIC_SHARED(name) unsigned char* name = emulated_dynamic_shared()
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
// 16 bytes go out through the __stcs intrinsic as one 16-byte store (plain stores of a Pack or
// a uint4 were split into 4-byte ones here by nvcc 13). The callers' outputs are written once
// and not read again by the kernel: st.global.cs allocates their lines evict-first in L2, so
// that they do not push out the rows the kernel gathers (for the nested pass, a 256-column tile
// of W_dec, 34 MB at d_sae = 65536, beside 25 MB of suffix sums written a tile).
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
    __stcs(reinterpret_cast<uint4*>(dst), make_uint4(words[0], words[1], words[2], words[3]));
  } else {
    *reinterpret_cast<Pack<T, V>*>(dst) = packed;
  }
}

// Tensor-core and asynchronous-copy instructions (sm_80 and later), as PTX. Compiled as host
// C++, these names come from the warp emulator of tests/test_cuda_emulated.py instead, which
// implements each instruction's documented fragment layout independently of the kernels.
#if defined(__CUDACC__)
// 16 bytes from global src to shared dst, asynchronously (cp.async.cg: through L2 only); with
// fill false nothing is read and dst is zeroed. Complete after cp_async_wait, then visible to
// the warp's other lanes after a __syncwarp.
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool fill) {
  const auto shared = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(shared), "l"(src),
               "r"(fill ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n"); }
// Waits until at most `pending` of this thread's committed groups are still in flight.
template <int pending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(pending));
}

// Four 8 x 8 matrices of 16-bit elements from shared memory: lane i gives the address of row
// i % 8 of matrix i / 8 (16 bytes); r[j] of lane l = (g, t) = (l / 4, l % 4) receives matrix j's
// elements (g, 2t) and (g, 2t + 1), or with trans its elements (2t, g) and (2t + 1, g), the
// first in the low half.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
  const auto shared = static_cast<unsigned>(__cvta_generic_to_shared(row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(shared));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row) {
  const auto shared = static_cast<unsigned>(__cvta_generic_to_shared(row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(shared));
}

// D += A B on the tensor cores, m16n8k16, bfloat16 in, float32 accumulation, the whole warp at
// once. Lane l = (g, t) = (l / 4, l % 4) holds, two bfloat16 a register (the lower index in the
// low half): a[0] = A[g][2t, 2t+1], a[1] = A[g+8][2t, 2t+1], a[2] = A[g][2t+8, 2t+9],
// a[3] = A[g+8][2t+8, 2t+9]; b[0] = B[2t, 2t+1][g], b[1] = B[2t+8, 2t+9][g]; d[0], d[1] =
// D[g][2t, 2t+1], d[2], d[3] = D[g+8][2t, 2t+1].
__device__ __forceinline__ void mma_m16n8k16_bf16(float (&d)[4], const uint32_t (&a)[4],
                                                  const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
      "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
#endif

// Makes the compiler hold v, as loaded, in a register up to this point: a test on a value loaded
// a step ahead is then made where the value is used, not right after its load (where the warp
// would wait for the load to land). Nothing on the host.
__host__ __device__ __forceinline__ void hold(uint32_t& v) {
#if defined(__CUDA_ARCH__)
  asm volatile("" : "+r"(v));
#endif
}

// A hint that the line holding p is read soon: prefetch.global.L2 starts bringing it into L2,
// and nothing waits for it. Nothing on the host.
__host__ __device__ __forceinline__ void prefetch_l2(const void* p) {
#if defined(__CUDA_ARCH__)
  asm volatile("prefetch.global.L2 [%0];\n" ::"l"(__cvta_generic_to_global(p)));
#else
  (void)p;
#endif
}

__host__ __device__ __forceinline__ float bits_to_float(uint32_t bits) {
  float f;
  memcpy(&f, &bits, sizeof(f));
  return f;
}

// A lane's V elements of one row as loaded: 16 bytes as four 32-bit words, else a Pack.
template <typename T, int V>
using Raw = std::conditional_t<sizeof(T) * V == 16, uint4, Pack<T, V>>;

// raw's V elements in the accumulation type. A 32-bit word of two bfloat16 widens with one
// integer instruction an element (a shift or a mask); converted one by one, each element took
// two (a byte permute, then the shift).
template <typename T, int V>
__device__ __forceinline__ void widen(const Raw<T, V>& raw, Acc<T> (&out)[V]) {
  if constexpr (sizeof(T) * V == 16) {
    const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
    if constexpr (std::is_same_v<T, __nv_bfloat16>) {
#pragma unroll
      for (int w = 0; w < 4; ++w) {
        out[2 * w] = bits_to_float(words[w] << 16);
        out[2 * w + 1] = bits_to_float(words[w] & 0xffff0000u);
      }
    } else {
      Pack<T, V> pack;
      memcpy(&pack, words, sizeof(pack));
#pragma unroll
      for (int v = 0; v < V; ++v) {
        out[v] = to_acc(pack.v[v]);
      }
    }
  } else {
#pragma unroll
    for (int v = 0; v < V; ++v) {
      out[v] = to_acc(raw.v[v]);
    }
  }
}

// Two floats rounded to bfloat16 (nearest even) in one register, lo in the low half.
__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  const __nv_bfloat16 halves[2] = {__float2bfloat16_rn(lo), __float2bfloat16_rn(hi)};
  uint32_t word;
  memcpy(&word, halves, sizeof(word));
  return word;
}

// Whether p is aligned to `bytes`.
inline bool aligned_to(const void* p, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

__host__ __device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
__host__ __device__ __forceinline__ int min32(int a, int b) { return a < b ? a : b; }

// Whether a grid of x by y blocks is within CUDA's limits (x < 2^31, y < 2^16).
inline bool grid_fits(int64_t x, int64_t y) { return x <= 2147483647 && y <= 65535; }

}  // namespace sparsecode::cuda

// Instantiates MACRO(T) for every storage type.
#define SPARSECODE_FOR_EACH_TYPE(MACRO) \
  MACRO(float)                          \
  MACRO(double)                         \
  MACRO(__half)                         \
  MACRO(__nv_bfloat16)
