// Nested-prefix (Matryoshka) loss, forward and backward, on the GPU (DESIGN.md §3.4; the
// same maths as csrc/nested_prefix_loss.cpp).
//
// With prefix sizes m_0 < ... < m_{G-1} = n, a slot j of row b belongs to group h, the first h
// with indices[b, j] < m_h, and the residual of prefix g is
//   r_g[b] = x[b] - b_dec - sum over slots of groups <= g of values[b, j] W_dec[indices[b, j]].
// x [B, d], values / indices [B, k], W_dec [n, d], b_dec [d].
//
//   prefix_walk_plan:     each slot's group -> group [B, k] (for the host's grad_W_dec), and
//                         each row's slots sorted by (index, slot) -> walk [B, k] of WalkSlot
//                         (latent, group, slot, value: 16 bytes, one vector load). One thread
//                         per slot counts the slots that sort before it: O(B k^2) integer work
//                         on L1-resident rows.
//   nested_loss_forward:  walks the sorted slots once, r starting at x - b_dec; at each group
//                         boundary the squared norm of r is recorded, and x_hat = b_dec + the
//                         sum of all slots is accumulated on the way. Out: x_hat [B, d],
//                         partial_losses [tiles, B, G] (one per column tile), and the final
//                         residual r_{G-1} as resid [2, B, d] (hi + lo in x's type).
//   nested_loss_backward: walks the slots in reverse from resid, adding each slot back. acc
//                         sums scale_g r_g over the groups passed: on reaching a group's last
//                         slot (in walk order), r is the residual of that group and of every
//                         empty group up to the last one passed, so acc += (their scales) r,
//                         and S_h = acc - grad_x_hat is complete: it goes to S [G, B, d] for
//                         grad_W_dec (a segmented sum by latent in latent_rows_sum.cu). Each
//                         slot's dot W_dec[i] . S_h uses the row that the walk loads anyway,
//                         with S_h in float32 registers; the dots of 4 slots are reduced
//                         together (warp_dots4) into partial_dots [tiles, B, k] (grad_values is
//                         minus their sum). At the end, grad_x = acc + (the scales of the
//                         groups before the first slot's) (x - b_dec).
//
// Strategy: one warp per (row, tile of kColTile = 128 columns), 4 rows of one column tile per
// block; a lane holds 4 columns of the tile: 4 consecutive ones, read and written with one
// vector access, when d is a multiple of 4 and the rows are aligned to that, else 4 columns a
// warp apart (any d). A warp reads its row's walk 32 slots at a time, one per lane, loading the
// next 32 before it uses these (a walk used to wait for two dependent loads, the slot order and
// then the slot's latent, at every 32 slots), and broadcasts them with shuffles (latent, value
// and group as 32-bit words; the backward also the slot); the walks issue the W_dec loads of 8
// slots before they use the first, so that several L2 reads are in flight per lane, and keep
// them as loaded until used; at 80 registers a thread, 24 warps fit on an SM. No shared memory,
// no barrier. Reductions over columns are a lane's 4 columns, then warp shuffles in a fixed
// tree, then the caller's sum over the column tiles: a fixed order. Blocks are numbered
// row-fastest, so the W_dec rows in flight belong to one column tile (n x 128 columns, 17 MB
// bf16 / 34 MB fp32 at n = 65536) and stay in L2.
//
// History on an H100 at the size below (bf16): forward 1.34 ms and backward 2.09 ms (2026-11-26,
// a backward that walked forward again, kept r_g in shared memory, and then gathered every
// slot's row a second time for the dots, with S in float32), against 1.7-1.8 and 2.6-2.8 ms
// for a block of 128 threads per row and tile. The Triton decode makes the forward's gathers in
// 0.45 ms. With the reverse walk (2026-11-27, same GPU) the forward took 1.26 ms and the
// backward kernel 1.33 ms; tests/test_cuda_emulated.py also runs both walks on the CPU
// through a warp emulator.
//
// Cost at B = 8192, d = 2304, n = 65536, k = 64, G = 6 (s = bytes per element: 2 bf16, 4 fp32):
//   forward:  2 B k d x2 = 4.8 GFLOP. DRAM floor: x (B d s), W_dec (n d s), x_hat and resid
//             (3 B d s), walk (B k 16, 8 MB): 0.45 GB bf16 (0.9 GB fp32): 0.15 ms at 3 TB/s
//             (0.3 ms).
//   backward: 4 B k d = 4.8 GFLOP (walk and dots). DRAM floor: resid (2 B d s), W_dec, grad_x
//             and grad_x_hat (B d s each), S written once (at most G B d s: 226 MB in bf16, whose
//             S is bf16; fp16 keeps a float32 S): 0.7 GB bf16 (1.4 GB fp32): 0.23 ms (0.45 ms);
//             plus grad_W_dec (latent_rows_sum.cu).
// The plan's O(B k^2) = 33 M comparisons at k = 64 cost a few microseconds.
#include "device_utils.cuh"

namespace sparsecode::cuda {
namespace {

constexpr int kLaneCols = kColTile / kWarp;  // columns per lane
constexpr int kRowsPerBlock = 4;             // warps per block, one row each
constexpr int kPlanThreads = 256;
static_assert(kLaneCols == 4, "a lane's columns are one 4-element vector");

// The slots whose W_dec loads a walk issues together, a multiple of 4 (the backward's dots go
// 4 at a time). Their rows are held as loaded (a lane's 4 elements: 2 registers in 16 bits)
// until used.
constexpr int kWalkBatch = 8;
// At most 80 registers a thread (no spills in sm_90's 16-bit and float32 walks; 96 unbounded),
// so that 6 blocks, 24 warps, fit on an SM as for the Triton decode whose gathers these are:
// the walks are latency-bound. (16 slots a batch at 4 blocks an SM take 128 registers.)
// float64 needs about 160 registers: 3 blocks.
template <typename T>
constexpr int kWalkBlocksPerSM = sizeof(T) == 8 ? 3 : 6;

template <typename T>
__global__ void __launch_bounds__(kPlanThreads)
    prefix_walk_plan_kernel(const int64_t* __restrict__ indices, const T* __restrict__ values,
                            int64_t B, int64_t k, PrefixSizes sizes, int32_t* __restrict__ group,
                            WalkSlot<T>* __restrict__ walk) {
  const int64_t p = static_cast<int64_t>(blockIdx.x) * kPlanThreads + threadIdx.x;
  if (p >= B * k) {
    return;
  }
  const int64_t b = p / k;
  const int64_t j = p % k;
  const int64_t* row = indices + b * k;
  const int64_t i = row[j];
  int64_t rank = 0;
  for (int64_t t = 0; t < k; ++t) {
    const int64_t other = row[t];
    rank += (other < i || (other == i && t < j)) ? 1 : 0;
  }
  int g = 0;
  while (g < sizes.count && i >= sizes.m[g]) {
    ++g;
  }
  group[p] = g;
  WalkSlot<T> slot;
  slot.index = static_cast<int32_t>(i);  // d_sae < 2^31 (checked by the host)
  slot.group = g;
  slot.slot = static_cast<int32_t>(j);
  slot.value = to_acc(values[p]);
  walk[b * k + rank] = slot;
}

// The v-th column (within the tile) of a lane: with kVector 4 consecutive columns, else
// columns a warp apart.
template <bool kVector>
__device__ __forceinline__ int lane_col(int lane, int v) {
  return kVector ? lane * kLaneCols + v : lane + v * kWarp;
}

// The lane's columns of row as stored: out.v[v] = row[e0 + lane_col(lane, v)], zero past d.
template <bool kVector, typename T>
__device__ __forceinline__ Pack<T, kLaneCols> load_pack(const T* row, int64_t e0, int64_t d,
                                                        int lane) {
  Pack<T, kLaneCols> out{};
  if constexpr (kVector) {
    const int64_t c = e0 + lane * kLaneCols;
    if (c < d) {  // d is a multiple of 4: the lane's columns are all inside or all outside
      out = *reinterpret_cast<const Pack<T, kLaneCols>*>(row + c);
    }
  } else {
#pragma unroll
    for (int v = 0; v < kLaneCols; ++v) {
      const int64_t c = e0 + lane_col<false>(lane, v);
      if (c < d) {
        out.v[v] = row[c];
      }
    }
  }
  return out;
}

// out[v] = row[e0 + lane_col(lane, v)] in the accumulation type, zero past d.
template <bool kVector, typename T>
__device__ __forceinline__ void load_cols(const T* row, int64_t e0, int64_t d, int lane,
                                          Acc<T> (&out)[kLaneCols]) {
  const Pack<T, kLaneCols> p = load_pack<kVector>(row, e0, d, lane);
#pragma unroll
  for (int v = 0; v < kLaneCols; ++v) {
    out[v] = to_acc(p.v[v]);
  }
}

// row[e0 + lane_col(lane, v)] = in[v] (rounded to T), for the columns inside d.
template <bool kVector, typename T>
__device__ __forceinline__ void store_cols(T* row, int64_t e0, int64_t d, int lane,
                                           const Acc<T> (&in)[kLaneCols]) {
  if constexpr (kVector) {
    const int64_t c = e0 + lane * kLaneCols;
    if (c < d) {
      Pack<T, kLaneCols> p;
#pragma unroll
      for (int v = 0; v < kLaneCols; ++v) {
        p.v[v] = from_acc<T>(in[v]);
      }
      *reinterpret_cast<Pack<T, kLaneCols>*>(row + c) = p;
    }
  } else {
#pragma unroll
    for (int v = 0; v < kLaneCols; ++v) {
      const int64_t c = e0 + lane_col<false>(lane, v);
      if (c < d) {
        row[c] = from_acc<T>(in[v]);
      }
    }
  }
}

// The walk-ordered slots of a row, 32 at a time, one per lane: lane t gets position begin + t
// when t < count, else an empty slot. The walks load the next 32 before they use these, so that
// their latency overlaps the current ones' gathers.
template <typename T>
__device__ __forceinline__ WalkSlot<T> load_slots(const WalkSlot<T>* row, int64_t begin,
                                                  int64_t count, int lane) {
  WalkSlot<T> slot{};
  if (lane < count) {
    slot = row[begin + lane];
  }
  return slot;
}

// The start of the walk for one warp's row b and column tile e0: bias = the lane's columns of
// b_dec, r = those of x[b] - b_dec.
template <bool kVector, typename T>
__device__ __forceinline__ void start_walk(const T* x, const T* b_dec, int64_t b, int64_t d,
                                           int64_t e0, int lane, Acc<T> (&r)[kLaneCols],
                                           Acc<T> (&bias)[kLaneCols]) {
  load_cols<kVector>(x + b * d, e0, d, lane, r);
  load_cols<kVector>(b_dec, e0, d, lane, bias);
#pragma unroll
  for (int v = 0; v < kLaneCols; ++v) {
    r[v] -= bias[v];
  }
}

// The forward's walk, for one warp's row and column tile (e0): r holds the lane's columns of
// x - b_dec; the walk subtracts each slot's values * W_dec[index] in walk order, adds it to
// recon, and calls at_boundary(g) when r is the residual of prefix g, once per g in order.
// Every lane of the warp calls it (columns past d hold zeros), so at_boundary may use warp
// shuffles.
template <bool kVector, typename T, typename AtBoundary>
__device__ __forceinline__ void walk_row(const T* W_dec, const WalkSlot<T>* row, int64_t k,
                                         int64_t d, int64_t e0, int lane, int G,
                                         Acc<T> (&r)[kLaneCols], Acc<T> (&recon)[kLaneCols],
                                         AtBoundary at_boundary) {
  using A = Acc<T>;
  int g = 0;
  WalkSlot<T> ahead = load_slots(row, 0, k, lane);
  for (int64_t q0 = 0; q0 < k; q0 += kWarp) {
    const int count = static_cast<int>(min64(kWarp, k - q0));
    const WalkSlot<T> mine = ahead;  // lane t: the slot at walk position q0 + t
    ahead = load_slots(row, q0 + kWarp, k - q0 - kWarp, lane);
    for (int u0 = 0; u0 < count; u0 += kWalkBatch) {
      A value[kWalkBatch];
      Pack<T, kLaneCols> w[kWalkBatch];
#pragma unroll
      for (int u = 0; u < kWalkBatch; ++u) {
        const int from = (u0 + u) % kWarp;
        const int64_t i = __shfl_sync(kFullMask, mine.index, from);
        value[u] = __shfl_sync(kFullMask, mine.value, from);
        if (u0 + u >= count) {
          value[u] = 0;
        }
        if (value[u] != A(0)) {  // a zero value adds nothing: its row is not read
          w[u] = load_pack<kVector>(W_dec + i * d, e0, d, lane);
        }
      }
#pragma unroll
      for (int u = 0; u < kWalkBatch; ++u) {
        const int group = __shfl_sync(kFullMask, mine.group, (u0 + u) % kWarp);
        if (u0 + u >= count) {
          break;  // the same for the whole warp
        }
        for (; g < group; ++g) {
          at_boundary(g);
        }
        if (value[u] != A(0)) {
#pragma unroll
          for (int v = 0; v < kLaneCols; ++v) {
            const A wv = to_acc(w[u].v[v]);
            r[v] -= value[u] * wv;
            recon[v] += value[u] * wv;
          }
        }
      }
    }
  }
  for (; g < G; ++g) {
    at_boundary(g);
  }
}

template <typename T, bool kVector>
__global__ void __launch_bounds__(kRowsPerBlock * kWarp, kWalkBlocksPerSM<T>)
    nested_loss_forward_kernel(const T* __restrict__ x, const T* __restrict__ b_dec,
                               const WalkSlot<T>* __restrict__ walk,
                               const T* __restrict__ W_dec, int64_t B, int64_t k, int64_t d,
                               int G, T* __restrict__ x_hat, Acc<T>* __restrict__ partial_losses,
                               T* __restrict__ resid) {
  using A = Acc<T>;
  const int lane = threadIdx.x % kWarp;
  const int64_t b = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarp;
  if (b >= B) {
    return;  // the whole warp
  }
  const int64_t e0 = static_cast<int64_t>(blockIdx.y) * kColTile;
  A r[kLaneCols];
  A recon[kLaneCols];  // starts at b_dec
  start_walk<kVector>(x, b_dec, b, d, e0, lane, r, recon);
  A* losses = partial_losses + (blockIdx.y * B + b) * G;
  walk_row<kVector>(W_dec, walk + b * k, k, d, e0, lane, G, r, recon, [&](int g) {
    A square = 0;
#pragma unroll
    for (int v = 0; v < kLaneCols; ++v) {
      square += r[v] * r[v];
    }
    square = warp_sum(square);
    if (lane == 0) {
      losses[g] = square;
    }
  });
  store_cols<kVector>(x_hat + b * d, e0, d, lane, recon);
  // The final residual for the backward, as hi + lo in T: hi = r rounded, lo = r - hi rounded.
  A hi[kLaneCols];
#pragma unroll
  for (int v = 0; v < kLaneCols; ++v) {
    hi[v] = to_acc(from_acc<T>(r[v]));
    r[v] -= hi[v];
  }
  store_cols<kVector>(resid + b * d, e0, d, lane, hi);
  store_cols<kVector>(resid + (B + b) * d, e0, d, lane, r);
}

// The backward walks each row's slots in reverse order, from the forward's final residual
// (hi + lo) and adding each slot back. acc is the sum of scale_g r_g over the groups passed;
// on reaching the last slot (in walk order) of group h, r is the residual of every group from h
// up to the last one passed, whose scales sum to cum_scale[passed] - cum_scale[h], and acc then
// holds all of S_h + grad_x_hat.
template <typename T, typename ST, bool kVector>
__global__ void __launch_bounds__(kRowsPerBlock * kWarp, kWalkBlocksPerSM<T>)
    nested_loss_backward_kernel(const T* __restrict__ resid,
                                const WalkSlot<T>* __restrict__ walk, const T* __restrict__ W_dec,
                                const T* __restrict__ grad_x_hat,
                                const double* __restrict__ cum_scale, int64_t B, int64_t k,
                                int64_t d, int G, T* __restrict__ grad_x, ST* __restrict__ S,
                                Acc<T>* __restrict__ partial_dots) {
  using A = Acc<T>;
  const int lane = threadIdx.x % kWarp;
  const int64_t b = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarp;
  if (b >= B) {
    return;  // the whole warp
  }
  const int64_t e0 = static_cast<int64_t>(blockIdx.y) * kColTile;
  const WalkSlot<T>* row = walk + b * k;
  A r[kLaneCols];
  A lo[kLaneCols];
  load_cols<kVector>(resid + b * d, e0, d, lane, r);
  load_cols<kVector>(resid + (B + b) * d, e0, d, lane, lo);
  A g_hat[kLaneCols] = {};
  if (grad_x_hat != nullptr) {
    load_cols<kVector>(grad_x_hat + b * d, e0, d, lane, g_hat);
  }
  A acc[kLaneCols] = {};
#pragma unroll
  for (int v = 0; v < kLaneCols; ++v) {
    r[v] += lo[v];
  }
  int passed = G;  // the groups >= passed are in acc
  Acc<T>* dots = partial_dots + (blockIdx.y * B + b) * k;
  // Chunks of 32 walk positions from the top: [base, top), lane t holding position base + t.
  WalkSlot<T> ahead = load_slots(row, k - min64(kWarp, k), min64(kWarp, k), lane);
  for (int64_t top = k; top > 0; top -= kWarp) {
    const int count = static_cast<int>(min64(kWarp, top));
    const int64_t base = top - count;
    const WalkSlot<T> mine = ahead;
    ahead = load_slots(row, base - min64(kWarp, base), min64(kWarp, base), lane);
    // Positions u0 - 1, u0 - 2, ... of this chunk, kWalkBatch at a time, their loads first.
    for (int u0 = count; u0 > 0; u0 -= kWalkBatch) {
      Pack<T, kLaneCols> w[kWalkBatch];
      A part[kWalkBatch];
#pragma unroll
      for (int u = 0; u < kWalkBatch; ++u) {
        const int at = u0 - 1 - u;
        const int64_t i = __shfl_sync(kFullMask, mine.index, at >= 0 ? at : 0);
        if (at >= 0) {  // every slot's row: a zero value still has a gradient
          w[u] = load_pack<kVector>(W_dec + i * d, e0, d, lane);
        }
      }
#pragma unroll
      for (int u = 0; u < kWalkBatch; ++u) {
        const int at = u0 - 1 - u;
        const A value = __shfl_sync(kFullMask, mine.value, at >= 0 ? at : 0);
        const int group = __shfl_sync(kFullMask, mine.group, at >= 0 ? at : 0);
        part[u] = 0;
        if (at < 0) {
          continue;  // the same for the whole warp
        }
        if (group < passed) {
          const A c = static_cast<A>(cum_scale[passed] - cum_scale[group]);
          A S_h[kLaneCols];
#pragma unroll
          for (int v = 0; v < kLaneCols; ++v) {
            acc[v] += c * r[v];
            S_h[v] = acc[v] - g_hat[v];
          }
          passed = group;
          store_cols<kVector>(S + (passed * B + b) * d, e0, d, lane, S_h);
        }
#pragma unroll
        for (int v = 0; v < kLaneCols; ++v) {
          const A wv = to_acc(w[u].v[v]);
          part[u] += wv * (acc[v] - g_hat[v]);
          r[v] += value * wv;
        }
      }
      // Each slot's dot over the tile's columns, 4 slots at a time: lanes 0, 8, 16 and 24 hold
      // the 4 dots, and fetch the slot (place in the row) of theirs.
#pragma unroll
      for (int quad = 0; quad < kWalkBatch / 4; ++quad) {
        const A four[4] = {part[4 * quad], part[4 * quad + 1], part[4 * quad + 2],
                           part[4 * quad + 3]};
        const A dot = warp_dots4(four, lane);
        const int at = u0 - 1 - (4 * quad + kept_pair(lane));
        const int slot = __shfl_sync(kFullMask, mine.slot, at >= 0 ? at : 0);
        if (lane % 8 == 0 && at >= 0) {
          dots[slot] = dot;
        }
      }
    }
  }
  const A c = static_cast<A>(cum_scale[passed]);
#pragma unroll
  for (int v = 0; v < kLaneCols; ++v) {
    acc[v] += c * r[v];
  }
  store_cols<kVector>(grad_x + b * d, e0, d, lane, acc);
}

// Whether the row-major rows of every pointer (rows of d elements of its type) can be read as
// 4-element vectors.
template <typename T>
bool vector_rows(int64_t d, std::initializer_list<const void*> pointers) {
  if (d % kLaneCols != 0) {
    return false;
  }
  for (const void* p : pointers) {
    if (p != nullptr && !aligned_to(p, kLaneCols * sizeof(T))) {
      return false;
    }
  }
  return true;
}

}  // namespace

template <typename T>
cudaError_t prefix_walk_plan(const int64_t* indices, const T* values, int64_t B, int64_t k,
                             const PrefixSizes& sizes, int32_t* group, WalkSlot<T>* walk,
                             cudaStream_t stream) {
  const int64_t blocks = (B * k + kPlanThreads - 1) / kPlanThreads;
  if (blocks == 0) {
    return cudaSuccess;
  }
  if (!grid_fits(blocks, 1)) {
    return cudaErrorInvalidConfiguration;
  }
  SPARSECODE_LAUNCH(prefix_walk_plan_kernel<T>, static_cast<unsigned>(blocks), kPlanThreads,
                    stream)(indices, values, B, k, sizes, group, walk);
  return cudaGetLastError();
}

// The grid of the walking kernels: blocks of kRowsPerBlock rows (fastest) x column tiles.
// Returns false when there is nothing to do; `status` says whether the problem is invalid.
bool walk_grid(int64_t B, int64_t d, int G, dim3& grid, cudaError_t& status) {
  const int64_t tiles = num_col_tiles(d);
  const int64_t row_blocks = (B + kRowsPerBlock - 1) / kRowsPerBlock;
  status = cudaSuccess;
  if (B == 0 || tiles == 0) {
    return false;
  }
  if (G < 1 || G > kMaxGroups || !grid_fits(row_blocks, tiles)) {
    status = cudaErrorInvalidValue;
    return false;
  }
  grid = dim3(static_cast<unsigned>(row_blocks), static_cast<unsigned>(tiles));
  return true;
}

template <typename T>
cudaError_t nested_loss_forward(const T* x, const T* b_dec, const WalkSlot<T>* walk,
                                const T* W_dec, int64_t B, int64_t k, int64_t d, int G, T* x_hat,
                                Acc<T>* partial_losses, T* resid, cudaStream_t stream) {
  dim3 grid;
  cudaError_t status;
  if (!walk_grid(B, d, G, grid, status)) {
    return status;
  }
  const int threads = kRowsPerBlock * kWarp;
  const auto kernel = vector_rows<T>(d, {x, b_dec, W_dec, x_hat, resid, resid + B * d})
                          ? nested_loss_forward_kernel<T, true>
                          : nested_loss_forward_kernel<T, false>;
  SPARSECODE_LAUNCH(kernel, grid, threads, stream)(x, b_dec, walk, W_dec, B, k, d, G, x_hat,
                                                   partial_losses, resid);
  return cudaGetLastError();
}

template <typename T>
cudaError_t nested_loss_backward(const T* resid, const WalkSlot<T>* walk, const T* W_dec,
                                 const T* grad_x_hat, const double* cum_scale, int64_t B,
                                 int64_t k, int64_t d, int G, T* grad_x, SuffixSum<T>* S,
                                 Acc<T>* partial_dots, cudaStream_t stream) {
  dim3 grid;
  cudaError_t status;
  if (!walk_grid(B, d, G, grid, status)) {
    return status;
  }
  const int threads = kRowsPerBlock * kWarp;
  const bool vector = vector_rows<T>(d, {resid, resid + B * d, W_dec, grad_x_hat, grad_x}) &&
                      vector_rows<SuffixSum<T>>(d, {S});
  const auto kernel = vector ? nested_loss_backward_kernel<T, SuffixSum<T>, true>
                             : nested_loss_backward_kernel<T, SuffixSum<T>, false>;
  SPARSECODE_LAUNCH(kernel, grid, threads, stream)(resid, walk, W_dec, grad_x_hat, cum_scale, B,
                                                   k, d, G, grad_x, S, partial_dots);
  return cudaGetLastError();
}

#define SPARSECODE_INSTANTIATE(T)                                                              \
  template cudaError_t prefix_walk_plan<T>(const int64_t*, const T*, int64_t, int64_t,         \
                                           const PrefixSizes&, int32_t*, WalkSlot<T>*,          \
                                           cudaStream_t);                                      \
  template cudaError_t nested_loss_forward<T>(const T*, const T*, const WalkSlot<T>*,          \
                                              const T*, int64_t, int64_t, int64_t, int, T*,    \
                                              Acc<T>*, T*, cudaStream_t);                      \
  template cudaError_t nested_loss_backward<T>(const T*, const WalkSlot<T>*, const T*,         \
                                               const T*, const double*, int64_t, int64_t,      \
                                               int64_t, int, T*, SuffixSum<T>*, Acc<T>*,       \
                                               cudaStream_t);
SPARSECODE_FOR_EACH_TYPE(SPARSECODE_INSTANTIATE)
#undef SPARSECODE_INSTANTIATE

}  // namespace sparsecode::cuda
