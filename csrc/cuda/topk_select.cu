// Each row's top k of the pre-activations, folded in one column chunk at a time: the selection
// of the cuda backend's encode, whose GEMM (cuBLAS, through at::addmm) writes one chunk of
// pre = (x - b_dec) @ W_enc + b_enc at a time, small enough to stay in L2, instead of the whole
// [B, n] matrix.
//
//   topk_fold:   keep [B, kpad] (an order key and a column id per slot) <- the k best of keep and
//                the chunk pre [B, w] (columns c0 .. c0 + w - 1 of the full matrix)
//   topk_finish: values [B, k] = relu of the kept values (in T), indices [B, k] (int64), each
//                row ascending by column
// The rule is the CPU's: the k largest, the lower column among equals; NaN ranks above every
// number (as in torch.topk) and -0 equals +0. keep starts with every slot empty (key 0, below
// every value's key) and ids INT32_MAX - slot; slots from k to kpad (kpad = 32 S, a power of
// two) are padding, never evicted. The fold of the chunk at c0 = 0 expects empty slots: it puts
// its first k columns in them without a comparison (when it has k).
//
// Strategy: a warp per row, a slot per lane and S (kpad / 32) slots a lane, in registers for the
// whole chunk. The warp scans the chunk 32 V columns at a time (V = 16 bytes of T a lane, or 1
// when the rows are not 16-byte aligned): each lane flags its columns that are not below the
// value of the row's worst kept slot (the smallest key, the highest column among equals), in
// one compare a column. Flagged columns are then taken one at a time (lowest lane, then lowest
// column): each that beats the worst slot by the rule replaces it, and the warp finds the new
// worst (on sm_80 and later two warp reductions, redux.sync, of the key and then the id) and
// drops the flags it no longer passes. The
// rule is a total order on (key, column), so the kept set does not depend on the order in which
// columns are taken.
//
// Cost: the GEMM's 2 B d n FLOPs (cuBLAS) and its chunk written and read once, B w s bytes (from
// L2 at w * s * B of about 32 MB), plus keep (B kpad 8 bytes) read and written per chunk. A row
// scans its n columns once (a compare each; about 60 sm_90 instructions a warp per 256 bf16
// columns) and, past its first k, about k ln(n / k) insertions on random pre-activations (444
// at k = 64, n = 65536), about 95 instructions each: at B = 8192 an estimated 0.15 ms of
// scanning and 0.4 ms of insertions on an H100, beside the GEMM's 3.2 ms. Adversarial rows (pre
// increasing along the row) make every column an insertion.
#include <cmath>
#include <type_traits>

#include "device_utils.cuh"

namespace sparsecode::cuda {
namespace {

constexpr int kRowsPerBlock = 8;  // warps a block, a row each
constexpr uint32_t kEmptyKey = 0;

// The float's rank as an unsigned key: monotone, NaN above +inf, -0 as +0.
__device__ __forceinline__ uint32_t order_key(float v) {
  if (v != v) {
    return 0xffffffffu;
  }
  uint32_t bits;
  const float zeroed = v == 0.0f ? 0.0f : v;
  memcpy(&bits, &zeroed, sizeof(bits));
  return (bits & 0x80000000u) != 0 ? ~bits : bits | 0x80000000u;
}

// The float of a key (key_value(order_key(v)) == v but for NaN's payload and -0).
__device__ __forceinline__ float key_value(uint32_t key) {
  return bits_to_float((key & 0x80000000u) != 0 ? key & 0x7fffffffu : ~key);
}

// The value a column must not be below to be a candidate against the worst kept key (every
// column is one against an empty slot; NaN against NaN).
__device__ __forceinline__ float bar_of(uint32_t worst_key) {
  return worst_key == kEmptyKey ? -INFINITY : key_value(worst_key);
}

// Whether slot (key, id) ranks below (other_key, other_id): the worse of two slots.
__device__ __forceinline__ bool worse(uint32_t key, int32_t id, uint32_t other_key,
                                      int32_t other_id) {
  return key < other_key || (key == other_key && id > other_id);
}

// The row's worst slot: its key and id in every lane (ids are distinct within a row).
template <int S>
__device__ __forceinline__ void worst_slot(const uint32_t (&key)[S], const int32_t (&id)[S],
                                           int k, int lane, uint32_t& worst_key,
                                           int32_t& worst_id) {
  worst_key = 0xffffffffu;
  worst_id = -1;  // ranks above every slot with the highest key
#pragma unroll
  for (int s = 0; s < S; ++s) {
    if (s * kWarp + lane < k && worse(key[s], id[s], worst_key, worst_id)) {
      worst_key = key[s];
      worst_id = id[s];
    }
  }
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  // The smallest key, then the highest id among the lanes that hold it: two warp reductions.
  const uint32_t least = __reduce_min_sync(kFullMask, worst_key);
  worst_id = __reduce_max_sync(kFullMask, worst_key == least ? worst_id : -1);
  worst_key = least;
#else
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    const uint32_t other_key = __shfl_xor_sync(kFullMask, worst_key, offset);
    const int32_t other_id = __shfl_xor_sync(kFullMask, worst_id, offset);
    if (worse(other_key, other_id, worst_key, worst_id)) {
      worst_key = other_key;
      worst_id = other_id;
    }
  }
#endif
}

// The lane's S kept slots of `row` (slot s * 32 + lane of the row's 32 S).
template <int S>
__device__ __forceinline__ void load_slots(const uint32_t* __restrict__ keep_key,
                                           const int32_t* __restrict__ keep_id, int64_t row,
                                           int lane, uint32_t (&key)[S], int32_t (&id)[S]) {
  const int64_t at = row * S * kWarp + lane;
#pragma unroll
  for (int s = 0; s < S; ++s) {
    key[s] = keep_key[at + s * kWarp];
    id[s] = keep_id[at + s * kWarp];
  }
}

// load_slots' inverse.
template <int S>
__device__ __forceinline__ void store_slots(const uint32_t (&key)[S], const int32_t (&id)[S],
                                            int64_t row, int lane, uint32_t* __restrict__ keep_key,
                                            int32_t* __restrict__ keep_id) {
  const int64_t at = row * S * kWarp + lane;
#pragma unroll
  for (int s = 0; s < S; ++s) {
    keep_key[at + s * kWarp] = key[s];
    keep_id[at + s * kWarp] = id[s];
  }
}

// A lane's V consecutive elements of a row as floats (columns at or past `valid` as NaN: they
// are never read, and their flags are cleared by the caller).
template <typename T, int V>
__device__ __forceinline__ void load_columns(const T* at, int valid, float (&out)[V]) {
  if constexpr (V > 1) {
    if (valid >= V) {
      Pack<T, V> pack = *reinterpret_cast<const Pack<T, V>*>(at);
#pragma unroll
      for (int v = 0; v < V; ++v) {
        out[v] = to_acc(pack.v[v]);
      }
      return;
    }
  }
#pragma unroll
  for (int v = 0; v < V; ++v) {
    out[v] = v < valid ? to_acc(at[v]) : 0.0f;
  }
}

template <typename T, int S, int V>
__global__ void __launch_bounds__(kRowsPerBlock * kWarp)
    topk_fold_kernel(const T* __restrict__ pre, int64_t B, int64_t w, int64_t c0, int k,
                     uint32_t* __restrict__ keep_key, int32_t* __restrict__ keep_id) {
  const int lane = threadIdx.x % kWarp;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarp;
  if (row >= B) {
    return;  // the whole warp
  }
  uint32_t key[S];
  int32_t id[S];
  load_slots(keep_key, keep_id, row, lane, key, id);
  const T* row_pre = pre + row * w;
  // The first chunk (its slots empty) fills them with its first k columns, as they come.
  const int64_t start = c0 == 0 && w >= k ? k : 0;
  if (start > 0) {
#pragma unroll
    for (int s = 0; s < S; ++s) {
      const int p = s * kWarp + lane;
      if (p < k) {
        key[s] = order_key(to_acc(row_pre[p]));
        id[s] = p;
      }
    }
  }
  uint32_t worst_key;
  int32_t worst_id;
  worst_slot(key, id, k, lane, worst_key, worst_id);
  for (int64_t col0 = 0; col0 < w; col0 += kWarp * V) {  // the same for the whole warp
    const int64_t first = col0 + lane * V;
    const int valid = static_cast<int>(min64(V, w - first));
    float x[V];
    unsigned flags = 0;
    if (valid > 0) {
      load_columns<T, V>(row_pre + first, valid, x);
      const float bar = bar_of(worst_key);
#pragma unroll
      for (int v = 0; v < V; ++v) {
        flags |= static_cast<unsigned>(v < valid && !(x[v] < bar)) << v;
      }
      if (col0 < start) {  // the columns already kept
#pragma unroll
        for (int v = 0; v < V; ++v) {
          flags &= ~(static_cast<unsigned>(first + v < start) << v);
        }
      }
    }
    // The flagged columns in ascending order: lowest lane, then its lowest flag.
    for (unsigned lanes = __ballot_sync(kFullMask, flags != 0); lanes != 0;
         lanes = __ballot_sync(kFullMask, flags != 0)) {
      const int from = __ffs(lanes) - 1;
      const int v_from = __ffs(flags) - 1;  // meaningful in lane `from`
      float mine = 0.0f;
#pragma unroll
      for (int v = 0; v < V; ++v) {
        mine = v == v_from ? x[v] : mine;
      }
      const uint32_t cand_key = order_key(__shfl_sync(kFullMask, mine, from));
      const auto cand_id =
          static_cast<int32_t>(c0 + col0 + from * V + __shfl_sync(kFullMask, v_from, from));
      if (lane == from) {
        flags &= flags - 1;  // taken
      }
      if (worse(worst_key, worst_id, cand_key, cand_id)) {
#pragma unroll
        for (int s = 0; s < S; ++s) {
          if (id[s] == worst_id) {  // ids are distinct: one slot of one lane
            key[s] = cand_key;
            id[s] = cand_id;
          }
        }
        worst_slot(key, id, k, lane, worst_key, worst_id);
        const float bar = bar_of(worst_key);
#pragma unroll
        for (int v = 0; v < V; ++v) {
          flags &= ~(static_cast<unsigned>(x[v] < bar) << v);
        }
      }
    }
  }
  store_slots(key, id, row, lane, keep_key, keep_id);
}

// Sorts each row's kpad slots by id (a bitonic network over the warp: position p = s * 32 +
// lane), then writes the first k: relu of the value in T, and the id.
template <typename T, int S>
__global__ void __launch_bounds__(kRowsPerBlock * kWarp)
    topk_finish_kernel(const uint32_t* __restrict__ keep_key, const int32_t* __restrict__ keep_id,
                       int64_t B, int k, T* __restrict__ values, int64_t* __restrict__ indices) {
  const int lane = threadIdx.x % kWarp;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarp;
  if (row >= B) {
    return;
  }
  uint32_t key[S];
  int32_t id[S];
  load_slots(keep_key, keep_id, row, lane, key, id);
  constexpr int kpad = S * kWarp;
  // Position p = s * 32 + lane ends holding the p-th smallest id. For each stage (size, j): p
  // and p ^ j exchange, the lower position keeping the smaller id where p & size is 0.
#pragma unroll
  for (int size = 2; size <= kpad; size *= 2) {
#pragma unroll
    for (int j = size / 2; j > 0; j /= 2) {
#pragma unroll
      for (int s = 0; s < S; ++s) {
        const int p = s * kWarp + lane;
        const bool ascending = (p & size) == 0;
        if (j >= kWarp) {
          const int t = s ^ (j / kWarp);
          if (t > s) {  // each pair once, from its lower position
            const bool swap = ascending ? id[s] > id[t] : id[s] < id[t];
            if (swap) {
              const uint32_t key_s = key[s];
              const int32_t id_s = id[s];
              key[s] = key[t];
              id[s] = id[t];
              key[t] = key_s;
              id[t] = id_s;
            }
          }
        } else {
          const uint32_t other_key = __shfl_xor_sync(kFullMask, key[s], j);
          const int32_t other_id = __shfl_xor_sync(kFullMask, id[s], j);
          const bool lower = (lane & j) == 0;
          const bool take = lower == ascending ? other_id < id[s] : other_id > id[s];
          if (take) {
            key[s] = other_key;
            id[s] = other_id;
          }
        }
      }
    }
  }
#pragma unroll
  for (int s = 0; s < S; ++s) {
    const int p = s * kWarp + lane;
    if (p < k) {
      const float v = key_value(key[s]);
      values[row * k + p] = from_acc<T>(v > 0.0f || v != v ? v : 0.0f);
      indices[row * k + p] = id[s];
    }
  }
}

template <typename T, int S>
cudaError_t launch_fold(const T* pre, int64_t B, int64_t w, int64_t c0, int k,
                        uint32_t* keep_key, int32_t* keep_id, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((B + kRowsPerBlock - 1) / kRowsPerBlock));
  constexpr int V = 16 / sizeof(T);
  const bool vector = w % V == 0 && aligned_to(pre, 16);
  const auto kernel = vector ? topk_fold_kernel<T, S, V> : topk_fold_kernel<T, S, 1>;
  SPARSECODE_LAUNCH(kernel, grid, kRowsPerBlock * kWarp, stream)(pre, B, w, c0, k, keep_key,
                                                                  keep_id);
  return cudaGetLastError();
}

template <typename T, int S>
cudaError_t launch_finish(const uint32_t* keep_key, const int32_t* keep_id, int64_t B, int k,
                          T* values, int64_t* indices, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((B + kRowsPerBlock - 1) / kRowsPerBlock));
  const auto kernel = topk_finish_kernel<T, S>;
  SPARSECODE_LAUNCH(kernel, grid, kRowsPerBlock * kWarp, stream)(keep_key, keep_id, B, k, values,
                                                                  indices);
  return cudaGetLastError();
}

// launch(std::integral_constant<int, S>) for k's slots a lane S, or cudaErrorInvalidValue.
template <typename Launch>
cudaError_t with_slots_per_lane(int k, Launch launch) {
  switch (topk_slots_per_lane(k)) {
    case 1: return launch(std::integral_constant<int, 1>{});
    case 2: return launch(std::integral_constant<int, 2>{});
    case 4: return launch(std::integral_constant<int, 4>{});
    case 8: return launch(std::integral_constant<int, 8>{});
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

template <typename T>
cudaError_t topk_fold(const T* pre, int64_t B, int64_t w, int64_t c0, int k,
                      uint32_t* keep_key, int32_t* keep_id, cudaStream_t stream) {
  if (B == 0 || w == 0) {
    return cudaSuccess;
  }
  if (B > (int64_t(kRowsPerBlock) << 31) || c0 + w > kMaxTopkColumns) {
    return cudaErrorInvalidConfiguration;
  }
  return with_slots_per_lane(k, [&](auto slots) {
    return launch_fold<T, decltype(slots)::value>(pre, B, w, c0, k, keep_key, keep_id, stream);
  });
}

template <typename T>
cudaError_t topk_finish(const uint32_t* keep_key, const int32_t* keep_id, int64_t B, int k,
                        T* values, int64_t* indices, cudaStream_t stream) {
  if (B == 0) {
    return cudaSuccess;
  }
  if (B > (int64_t(kRowsPerBlock) << 31)) {
    return cudaErrorInvalidConfiguration;
  }
  return with_slots_per_lane(k, [&](auto slots) {
    return launch_finish<T, decltype(slots)::value>(keep_key, keep_id, B, k, values, indices,
                                                    stream);
  });
}

#define SPARSECODE_INSTANTIATE(T)                                                              \
  template cudaError_t topk_fold<T>(const T*, int64_t, int64_t, int64_t, int, uint32_t*,      \
                                    int32_t*, cudaStream_t);                                  \
  template cudaError_t topk_finish<T>(const uint32_t*, const int32_t*, int64_t, int, T*,      \
                                      int64_t*, cudaStream_t);
SPARSECODE_INSTANTIATE(float)
SPARSECODE_INSTANTIATE(__half)
SPARSECODE_INSTANTIATE(__nv_bfloat16)
#undef SPARSECODE_INSTANTIATE

}  // namespace sparsecode::cuda
