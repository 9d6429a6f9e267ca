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
// two) are padding, never evicted.
//
// Strategy: a warp per row, a slot per lane and S (kpad / 32) slots a lane, in registers for the
// whole chunk. The warp scans the chunk 32 V columns at a time (V = 16 bytes of T a lane, or 1 when
// the rows are not 16-byte aligned; each step loaded one step ahead, ChunkSteps): each lane tests
// its columns against a bar, the value of the row's worst kept slot (the smallest key, the highest
// column among equals), and a step in which no lane has a column not below it ends with the vote
// (any_not_below). Flagged columns are taken one at a time (lowest lane, then lowest column): each
// that beats the worst slot by the rule replaces it, and the warp finds the new worst (on sm_80 and
// later two warp reductions, redux.sync, of the key and then the id) and drops the flags it no
// longer passes (fold_by_insertion). The first chunk, whose slots are empty, is selected at once
// instead: one pass finds a lower bound on its k-th largest value (chunk_bound: the smallest over
// the lanes of each lane's S-th largest column), a second writes its columns not below the bound to
// the warp's buffer in shared memory (gather_candidates), and select_candidates keeps the k best of
// them, the k-th best key from a search over its 32 bits (each step a count over the warp), then
// the keys above it and the lowest ids among those equal to it. A first chunk with more such
// columns than the buffer holds (rows whose values rise along the columns, or many equal values) is
// taken one column at a time like the others. The rule is a total order on (key, column), so the
// kept set depends neither on the path nor on the order in which columns are taken.
//
// Cost: the GEMM's 2 B d n FLOPs (cuBLAS) and its chunk written and read once, B w s bytes (from
// L2 at w * s * B of about 32 MB), plus keep (B kpad 8 bytes) read and written per chunk. Per
// row, on random pre-activations at k = 64 and chunks of 2048 columns (n = 65536), simulated:
// the first chunk has 185 columns on average not below its bound (at most 424 in 20000 rows);
// taken one at a time, it made 288 insertions of the row's 512 (about 95 sm_90 instructions a
// flagged column). In sm_90 instructions a warp, the first chunk now costs about 8 k (both passes,
// the buffer's stores and the selection) instead of 27 k, and a step without a candidate about 40
// instead of about 70: about 39 k a row instead of 63 k, an estimated 0.35 ms of issue on an H200
// at B = 8192 instead of 0.55 ms, beside the GEMM's 3.2 ms. Rows whose values rise along the
// columns make every column an insertion.
#include <cmath>
#include <type_traits>

#include "device_utils.cuh"

namespace sparsecode::cuda {
namespace {

constexpr int kRowsPerBlock = 8;  // warps a block, a row each
constexpr uint32_t kEmptyKey = 0;
// Candidates a warp's buffer holds: the first chunk's columns not below its bound, then the
// kept slots.
constexpr int kBuffer = 512;
constexpr int kBufferPerLane = kBuffer / kWarp;

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

// A lane's V consecutive elements of a row from `at`, `valid` of them, as loaded (Raw: four
// 32-bit words for 16 bytes): one load of V elements
// where all V are there, else one element at a time and zeros past `valid` (never read: their
// flags are cleared by the caller).
template <typename T, int V>
__device__ __forceinline__ Raw<T, V> fetch_columns(const T* at, int valid) {
  if (valid >= V) {
    return *reinterpret_cast<const Raw<T, V>*>(at);
  }
  Pack<T, V> pack;
#pragma unroll
  for (int v = 0; v < V; ++v) {
    pack.v[v] = v < valid ? at[v] : from_acc<T>(0.0f);
  }
  Raw<T, V> raw;
  memcpy(&raw, &pack, sizeof(raw));
  return raw;
}

// A lane's steps of 32 V columns over a chunk of `width` columns, each step's columns fetched
// one step ahead of their use, so that a warp keeps two L2 reads in flight (the fold runs 32
// warps an SM).
template <typename T, int V>
struct ChunkSteps {
  const T* row;
  int width;
  int lane;
  Raw<T, V> ahead;

  __device__ ChunkSteps(const T* row_pre, int w, int lane_) : row(row_pre), width(w), lane(lane_) {
    ahead = fetch(0);
  }
  __device__ Raw<T, V> fetch(int col0) const {
    const int first = col0 + lane * V;
    return fetch_columns<T, V>(row + first, min32(V, width - first));
  }
  // The lane's columns of the step at col0 (steps taken in order), and the next step's fetch.
  __device__ Raw<T, V> take(int col0) {
    const Raw<T, V> now = ahead;
    if (col0 + kWarp * V < width) {
      ahead = fetch(col0 + kWarp * V);
    }
    return now;
  }
};

// Whether one of a lane's columns (`valid` of the V in raw) is not below bar (NaN included).
// Where the step is whole (every step but a chunk's last, unless its width is not a multiple
// of 32 V), the test is V chained compares and no masks.
template <typename T, int V>
__device__ __forceinline__ bool any_not_below(const Raw<T, V>& raw, int valid, float bar) {
  float x[V];
  widen<T, V>(raw, x);
  bool any = false;
  if (valid == V) {
#pragma unroll
    for (int v = 0; v < V; ++v) {
      any |= !(x[v] < bar);
    }
  } else {
#pragma unroll
    for (int v = 0; v < V; ++v) {
      any |= v < valid && !(x[v] < bar);
    }
  }
  return any;
}

// The bits of the lane's columns (x, `valid` of them) that are not below bar.
template <int V>
__device__ __forceinline__ unsigned flags_of(const float (&x)[V], int valid, float bar) {
  unsigned flags = 0;
#pragma unroll
  for (int v = 0; v < V; ++v) {
    flags |= static_cast<unsigned>(v < valid && !(x[v] < bar)) << v;
  }
  return flags;
}

// The lowest kept slot's replacement by the candidate (cand_key, cand_id), which beats it, and
// the new worst slot.
template <int S>
__device__ __forceinline__ void replace_worst(uint32_t cand_key, int32_t cand_id, int k, int lane,
                                              uint32_t (&key)[S], int32_t (&id)[S],
                                              uint32_t& worst_key, int32_t& worst_id) {
#pragma unroll
  for (int s = 0; s < S; ++s) {
    if (id[s] == worst_id) {  // ids are distinct: one slot of one lane
      key[s] = cand_key;
      id[s] = cand_id;
    }
  }
  worst_slot(key, id, k, lane, worst_key, worst_id);
}

// The warp's sum of v, and its smallest v, in every lane (redux.sync on sm_80 and later).
__device__ __forceinline__ int warp_total(int v) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  return __reduce_add_sync(kFullMask, v);
#else
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    v += __shfl_xor_sync(kFullMask, v, offset);
  }
  return v;
#endif
}
__device__ __forceinline__ uint32_t warp_least(uint32_t v) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  return __reduce_min_sync(kFullMask, v);
#else
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    v = min(v, __shfl_xor_sync(kFullMask, v, offset));
  }
  return v;
#endif
}

// The fold of a chunk one column at a time (see the file's comment): every chunk's but a first
// chunk's whose candidates fit the buffer. The fold of the chunk at c0 = 0 expects empty slots: it
// puts its first k columns in them without a comparison (when it has k).
template <typename T, int S, int V>
__device__ void fold_by_insertion(const T* __restrict__ row_pre, int64_t w, int64_t c0, int k,
                                  int lane, uint32_t (&key)[S], int32_t (&id)[S],
                                  uint32_t& worst_key, int32_t& worst_id) {
  const int start = c0 == 0 && w >= k ? k : 0;
  if (start > 0) {
#pragma unroll
    for (int s = 0; s < S; ++s) {
      const int p = s * kWarp + lane;
      if (p < k) {
        key[s] = order_key(to_acc(row_pre[p]));
        id[s] = p;
      }
    }
    worst_slot(key, id, k, lane, worst_key, worst_id);
  }
  const int width = static_cast<int>(w);  // c0 + w is below 2^31 (topk_fold)
  float bar = bar_of(worst_key);  // kept so, as worst_key changes
  ChunkSteps<T, V> steps(row_pre, width, lane);
  for (int col0 = 0; col0 < width; col0 += kWarp * V) {  // the same for the whole warp
    const Raw<T, V> raw = steps.take(col0);
    const int first = col0 + lane * V;
    const int valid = min32(V, width - first);
    if (!__any_sync(kFullMask, any_not_below<T, V>(raw, valid, bar))) {
      continue;  // no column of the step is a candidate: the same in every lane
    }
    float x[V];
    widen<T, V>(raw, x);
    unsigned flags = flags_of(x, valid, bar);
    if (col0 < start) {  // the columns already kept
#pragma unroll
      for (int v = 0; v < V; ++v) {
        flags &= ~(static_cast<unsigned>(first + v < start) << v);
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
        replace_worst(cand_key, cand_id, k, lane, key, id, worst_key, worst_id);
        bar = bar_of(worst_key);
#pragma unroll
        for (int v = 0; v < V; ++v) {
          flags &= ~(static_cast<unsigned>(x[v] < bar) << v);
        }
      }
    }
  }
}

// A value that at least 32 S >= k of the chunk's columns are not below, so that no column below
// it is among the k best of the chunk (nor of the chunk and the kept slots): the smallest, over
// the lanes, of each lane's S-th largest column (of the 32 V-column steps' columns it loads).
// NaN columns, which rank above every number, count as missing here, which only lowers the
// bound; a lane with fewer than S numbers gives -inf.
template <typename T, int S, int V>
__device__ float chunk_bound(const T* __restrict__ row_pre, int64_t w, int lane) {
  float top[S];  // the lane's S largest, descending
#pragma unroll
  for (int s = 0; s < S; ++s) {
    top[s] = -INFINITY;
  }
  for (int64_t col0 = 0; col0 < w; col0 += kWarp * V) {
    const int64_t first = col0 + lane * V;
    const int valid = static_cast<int>(min64(V, w - first));
    if (valid > 0) {
      float x[V];
      widen<T, V>(fetch_columns<T, V>(row_pre + first, valid), x);
#pragma unroll
      for (int v = 0; v < V; ++v) {
        float c = v < valid && x[v] == x[v] ? x[v] : -INFINITY;
#pragma unroll
        for (int s = 0; s < S; ++s) {  // c goes in at its rank; the smaller moves down
          const float higher = fmaxf(top[s], c);
          c = fminf(top[s], c);
          top[s] = higher;
        }
      }
    }
  }
  return key_value(warp_least(order_key(top[S - 1])));
}

// Writes the chunk's columns that are not below bar to the warp's candidate buffer, as (order
// key, column id), at most `room` of them (lower lanes' first in each step of 32 V columns), and
// returns how many there are, the same in every lane. A step in which no lane has one costs the
// load, the conversions, a compare a column and a vote (any_not_below: about 40 sm_90
// instructions with the loop's, for 256 bfloat16 columns); the flags, the prefix sum over the
// lanes and the stores only follow a vote that found one.
template <typename T, int V>
__device__ int gather_candidates(const T* __restrict__ row_pre, int64_t w, int64_t c0, float bar,
                                 int lane, int room, uint32_t* cand_key, int32_t* cand_id) {
  const int width = static_cast<int>(w);  // c0 + w is below 2^31 (topk_fold)
  ChunkSteps<T, V> steps(row_pre, width, lane);
  int count = 0;
  for (int col0 = 0; col0 < width; col0 += kWarp * V) {
    const Raw<T, V> raw = steps.take(col0);
    const int first = col0 + lane * V;
    const int valid = min32(V, width - first);
    if (!__any_sync(kFullMask, any_not_below<T, V>(raw, valid, bar))) {
      continue;  // the same in every lane
    }
    float x[V];
    widen<T, V>(raw, x);
    const unsigned flags = flags_of(x, valid, bar);
    // This lane's flagged columns go after those of the lanes below it.
    const int mine = __popc(flags);
    int through = mine;  // the flags of lanes 0 .. lane
#pragma unroll
    for (int offset = 1; offset < kWarp; offset *= 2) {
      const int below = __shfl_up_sync(kFullMask, through, offset);
      through += lane >= offset ? below : 0;
    }
    int at = count + through - mine;
#pragma unroll
    for (int v = 0; v < V; ++v) {
      if ((flags >> v) & 1) {
        if (at < room) {
          cand_key[at] = order_key(x[v]);
          cand_id[at] = static_cast<int32_t>(c0 + first + v);
        }
        ++at;
      }
    }
    count += __shfl_sync(kFullMask, through, kWarp - 1);
  }
  __syncwarp();
  return count;
}

// The k best of the `count` candidates in the warp's buffer and of the row's k kept slots, put
// in the slots (in any order; the padding slots past k as they are). The k-th best key T comes
// from a search over its bits, each step counting over the warp the candidates at or above a
// trial key (32 steps of kBuffer / 32 compares a lane, the keys held in registers); the winners
// are the keys above T and, among the keys equal to T, the lowest ids, as many as the k places
// left. The ids stay in the buffer; the winners' keys and ids go to the two halves of the key
// buffer (k <= kBuffer / 2), which every lane has read by then.
template <int S>
__device__ void select_candidates(uint32_t* cand_key, int32_t* cand_id, int count, int k,
                                  int lane, uint32_t (&key)[S], int32_t (&id)[S]) {
  static_assert(2 * kMaxTopk <= kBuffer, "the winners' keys and ids fit in the key buffer");
#pragma unroll
  for (int s = 0; s < S; ++s) {  // the kept slots join the candidates
    const int p = s * kWarp + lane;
    if (p < k) {
      cand_key[count + p] = key[s];
      cand_id[count + p] = id[s];
    }
  }
  __syncwarp();
  const int total = count + k;  // at most kBuffer
  uint32_t ck[kBufferPerLane];
#pragma unroll
  for (int j = 0; j < kBufferPerLane; ++j) {
    const int q = j * kWarp + lane;
    ck[j] = q < total ? cand_key[q] : 0;
  }
  __syncwarp();  // every lane has read the keys, whose buffer then takes the winners
  auto live = [&](int j) { return j * kWarp + lane < total; };
  auto at_least = [&](uint32_t trial) {  // candidates with keys >= trial, over the warp
    int n = 0;
#pragma unroll
    for (int j = 0; j < kBufferPerLane; ++j) {
      n += live(j) && ck[j] >= trial;
    }
    return warp_total(n);
  };
  uint32_t T = 0;  // the largest key that k candidates are not below
  for (int bit = 31; bit >= 0; --bit) {
    const uint32_t trial = T | (uint32_t(1) << bit);
    if (at_least(trial) >= k) {
      T = trial;
    }
  }
  const int places = k - (T == 0xffffffffu ? 0 : at_least(T + 1));  // for keys equal to T
  int ties = 0;
#pragma unroll
  for (int j = 0; j < kBufferPerLane; ++j) {
    ties += live(j) && ck[j] == T;
  }
  // Among the keys equal to T, the ids up to `cut` win: the places-th lowest of those ids.
  uint32_t cut = 0xffffffffu;
  if (warp_total(ties) > places) {
    uint32_t from = 0;  // the ids below `from` are the lowest found so far
    for (int t = 0; t < places; ++t) {
      uint32_t least = 0xffffffffu;
#pragma unroll
      for (int j = 0; j < kBufferPerLane; ++j) {
        if (live(j) && ck[j] == T) {
          const auto candidate = static_cast<uint32_t>(cand_id[j * kWarp + lane]);
          least = candidate >= from && candidate < least ? candidate : least;
        }
      }
      cut = warp_least(least);
      from = cut + 1;
    }
  }
  uint32_t* winner_key = cand_key;
  uint32_t* winner_id = cand_key + kBuffer / 2;
  int placed = 0;
#pragma unroll
  for (int j = 0; j < kBufferPerLane; ++j) {
    const int q = j * kWarp + lane;
    bool wins = live(j) && ck[j] >= T;
    const auto candidate = static_cast<uint32_t>(wins ? cand_id[q] : 0);
    wins = wins && (ck[j] > T || candidate <= cut);
    const unsigned winners = __ballot_sync(kFullMask, wins);
    if (wins) {
      const int at = placed + __popc(winners & ((1u << lane) - 1));
      winner_key[at] = ck[j];
      winner_id[at] = candidate;
    }
    placed += __popc(winners);
  }
  __syncwarp();
#pragma unroll
  for (int s = 0; s < S; ++s) {
    const int p = s * kWarp + lane;
    if (p < k) {
      key[s] = winner_key[p];
      id[s] = static_cast<int32_t>(winner_id[p]);
    }
  }
}

// 4 blocks an SM (at most 64 registers; 128 KB of buffers): the scans wait on L2 reads.
template <typename T, int S, int V>
__global__ void __launch_bounds__(kRowsPerBlock * kWarp, 4)
    topk_fold_kernel(const T* __restrict__ pre, int64_t B, int64_t w, int64_t c0, int k,
                     uint32_t* __restrict__ keep_key, int32_t* __restrict__ keep_id) {
  __shared__ uint32_t buffer_key[kRowsPerBlock][kBuffer];
  __shared__ int32_t buffer_id[kRowsPerBlock][kBuffer];
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + warp;
  if (row >= B) {
    return;  // the whole warp
  }
  uint32_t key[S];
  int32_t id[S];
  load_slots(keep_key, keep_id, row, lane, key, id);
  const T* row_pre = pre + row * w;
  uint32_t worst_key;
  int32_t worst_id;
  worst_slot(key, id, k, lane, worst_key, worst_id);
  if (worst_key == kEmptyKey) {
    // The first chunk: its columns not below its own bound, selected at once where the buffer
    // holds them (with the kept slots), else taken one at a time as later chunks are.
    const float bar = chunk_bound<T, S, V>(row_pre, w, lane);
    const int room = kBuffer - k;
    const int count = gather_candidates<T, V>(row_pre, w, c0, bar, lane, room, buffer_key[warp],
                                              buffer_id[warp]);
    if (count <= room) {
      select_candidates(buffer_key[warp], buffer_id[warp], count, k, lane, key, id);
      store_slots(key, id, row, lane, keep_key, keep_id);
      return;
    }
  }
  fold_by_insertion<T, S, V>(row_pre, w, c0, k, lane, key, id, worst_key, worst_id);
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
