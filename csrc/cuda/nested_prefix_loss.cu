// Nested-prefix (Matryoshka) loss, forward and backward, on the GPU (DESIGN.md §3.4; the
// same maths and walk as csrc/nested_prefix_loss.cpp).
//
// With prefix sizes m_0 < ... < m_{G-1} = n, a slot j of row b belongs to group h, the first h
// with indices[b, j] < m_h, and the residual of prefix g is
//   r_g[b] = x[b] - b_dec - sum over slots of groups <= g of values[b, j] W_dec[indices[b, j]].
// x [B, d], values / indices [B, k], W_dec [n, d], b_dec [d].
//
//   prefix_walk_plan:     each row's slots sorted by (index, slot) -> order [B, k], and each
//                         slot's group -> group [B, k]. One thread per slot counts the slots
//                         that sort before it: O(B k^2) integer work on L1-resident rows.
//   nested_loss_forward:  walks the sorted slots once, r starting at x - b_dec; at each group
//                         boundary the squared norm of r is recorded, and x_hat = b_dec + the
//                         sum of all slots is accumulated on the way. Out: x_hat [B, d] and
//                         partial_losses [tiles, B, G] (one per column tile).
//   nested_loss_backward: the same walk records r_g in shared memory, then (per column)
//                         S_g = scale_g r_g + S_{g+1}, grad_x = S_0, S_g -= grad_x_hat, S goes
//                         to S [G, B, d] for grad_W_dec (a segmented sum by latent in
//                         latent_rows_sum.cu), and each slot's dot W_dec[i] . S_h is reduced
//                         per column tile into partial_dots [tiles, B, k] (grad_values is minus
//                         their sum). Keeping r_g for all G groups in shared memory (G <= 16 x
//                         128 columns) avoids a second, reverse walk.
//
// Strategy: one block per (row, tile of kColTile = 128 columns), one column per thread, so any
// d works and the residuals stay in registers / shared memory; the row's slots are staged in
// shared memory 256 at a time in walk order. The walk issues the W_dec loads of 8 slots before
// it uses the first, and the dot pass those of 4 slots per warp, so that several L2 reads are in
// flight per thread: with one load at a time both kernels were latency-bound (on an H100 at the
// size below: forward 1.83 ms, backward 2.62 ms, where the Triton decode makes the same gathers
// in 0.45 ms). Reductions over columns are warp shuffles, then the 4 warps in order, then the caller sums the column tiles: all in a fixed order. Blocks are
// numbered row-fastest, so the W_dec rows in flight belong to one column tile (n x 128 columns,
// 17 MB bf16 / 34 MB fp32 at n = 65536) and stay in L2.
//
// Cost at B = 8192, d = 2304, n = 65536, k = 64, G = 6 (s = bytes per element: 2 bf16, 4 fp32):
//   forward:  2 B k d x2 = 4.8 GFLOP. DRAM floor: x (B d s), W_dec (n d s), x_hat (B d s),
//             slots: 0.38 GB bf16 (0.75 GB fp32): 0.13 ms at 3 TB/s (0.25 ms).
//   backward: the walk again (x, W_dec), grad_x and grad_x_hat (B d s each), S written once
//             (G B d 4 = 453 MB), the dots read W_dec rows a second time from L1/L2:
//             0.9 GB bf16 (1.2 GB fp32): 0.3 ms (0.4 ms); plus grad_W_dec (latent_rows_sum.cu).
// The plan's O(B k^2) = 33 M comparisons at k = 64 cost a few microseconds.
#include "device_utils.cuh"

namespace sparsecode::cuda {
namespace {

constexpr int kSlotChunk = 256;                   // slots staged in shared memory at a time
constexpr int kWalkWarps = kColTile / kWarp;      // warps per block
constexpr int kColsPerLane = kColTile / kWarp;    // dot pass: columns per lane
constexpr int kPlanThreads = 256;
constexpr int kWalkUnroll = 8;                    // slots whose loads the walk issues together
constexpr int kDotUnroll = 4;                     // slots per warp in flight in the dot pass

__global__ void __launch_bounds__(kPlanThreads)
    prefix_walk_plan_kernel(const int64_t* __restrict__ indices, int64_t B, int64_t k,
                            PrefixSizes sizes, int32_t* __restrict__ order,
                            int32_t* __restrict__ group) {
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
  order[b * k + rank] = static_cast<int32_t>(j);
  int g = 0;
  while (g < sizes.count && i >= sizes.m[g]) {
    ++g;
  }
  group[p] = g;
}

// One chunk of a row's slots staged in shared memory, in walk order: the slot, its latent,
// its value and its group.
template <typename A>
struct SlotStage {
  int slot[kSlotChunk];
  int64_t index[kSlotChunk];
  A value[kSlotChunk];
  int group[kSlotChunk];
};

// One row's code: walk order, latents, values and groups of its k slots.
template <typename T>
struct RowCode {
  const int32_t* order;
  const int64_t* index;
  const T* value;
  const int32_t* group;
};

template <typename T>
__device__ __forceinline__ RowCode<T> row_code(const int32_t* order, const int64_t* indices,
                                               const T* values, const int32_t* group, int64_t b,
                                               int64_t k) {
  return {order + b * k, indices + b * k, values + b * k, group + b * k};
}

// Stages the walk positions q0 .. q0 + count - 1 of a row.
template <typename T>
__device__ __forceinline__ void stage_slots(const RowCode<T>& row, int64_t q0, int count,
                                            SlotStage<Acc<T>>& stage) {
  for (int t = threadIdx.x; t < count; t += blockDim.x) {
    const int slot = row.order[q0 + t];
    stage.slot[t] = slot;
    stage.index[t] = row.index[slot];
    stage.value[t] = to_acc(row.value[slot]);
    stage.group[t] = row.group[slot];
  }
}

// The walk both kernels share, for this thread's column e of row b: starting from
// r = x - b_dec, subtracts each slot's values * W_dec[index] in walk order and calls
// at_boundary(g, r) with the residual of prefix g, once per g in order. Every thread of the
// block calls it (inactive columns with r = 0), so at_boundary may use warp shuffles. When
// recon is not null, *recon also accumulates the slots' sum.
template <typename T, typename AtBoundary>
__device__ __forceinline__ void walk_row(const T* x, const T* b_dec, const T* W_dec,
                                         const RowCode<T>& row, int64_t b, int64_t k, int64_t d,
                                         int64_t e, bool active, int G,
                                         SlotStage<Acc<T>>& stage, Acc<T>* recon,
                                         AtBoundary at_boundary) {
  using A = Acc<T>;
  A r = active ? to_acc(x[b * d + e]) - to_acc(b_dec[e]) : A(0);
  int g = 0;
  for (int64_t q0 = 0; q0 < k; q0 += kSlotChunk) {
    const int count = static_cast<int>(min64(kSlotChunk, k - q0));
    __syncthreads();  // every thread is done with the previous chunk
    stage_slots(row, q0, count, stage);
    __syncthreads();
    // kWalkUnroll slots at a time: their W_dec loads are all issued before the first is used,
    // so that several reads are in flight per thread (the walk is bound by their latency).
    for (int t0 = 0; t0 < count; t0 += kWalkUnroll) {
      A w[kWalkUnroll];
#pragma unroll
      for (int u = 0; u < kWalkUnroll; ++u) {
        const int t = t0 + u;
        w[u] = (t < count && active && stage.value[t] != A(0))
                   ? to_acc(W_dec[stage.index[t] * d + e])
                   : A(0);
      }
#pragma unroll
      for (int u = 0; u < kWalkUnroll; ++u) {
        const int t = t0 + u;
        if (t >= count) {
          break;  // the same for the whole block
        }
        for (; g < stage.group[t]; ++g) {
          at_boundary(g, r);
        }
        const A v = stage.value[t];
        if (active && v != A(0)) {
          r -= v * w[u];
          if (recon != nullptr) {
            *recon += v * w[u];
          }
        }
      }
    }
  }
  for (; g < G; ++g) {
    at_boundary(g, r);
  }
}

template <typename T>
__global__ void __launch_bounds__(kColTile)
    nested_loss_forward_kernel(const T* __restrict__ x, const T* __restrict__ b_dec,
                               const T* __restrict__ values, const int64_t* __restrict__ indices,
                               const int32_t* __restrict__ order,
                               const int32_t* __restrict__ group, const T* __restrict__ W_dec,
                               int64_t B, int64_t k, int64_t d, int G, T* __restrict__ x_hat,
                               Acc<T>* __restrict__ partial_losses) {
  using A = Acc<T>;
  __shared__ SlotStage<A> stage;
  __shared__ A s_loss[kMaxGroups][kWalkWarps];
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  const int64_t b = blockIdx.x;
  const int64_t e = blockIdx.y * kColTile + threadIdx.x;
  const bool active = e < d;
  A recon = active ? to_acc(b_dec[e]) : A(0);
  walk_row(x, b_dec, W_dec, row_code(order, indices, values, group, b, k), b, k, d, e, active, G,
           stage, &recon, [&](int g, A r) {
             const A square = warp_sum(r * r);
             if (lane == 0) {
               s_loss[g][warp] = square;
             }
           });
  if (active) {
    x_hat[b * d + e] = from_acc<T>(recon);
  }
  __syncthreads();
  if (static_cast<int>(threadIdx.x) < G) {
    A sum = 0;
    for (int w = 0; w < kWalkWarps; ++w) {
      sum += s_loss[threadIdx.x][w];
    }
    partial_losses[(blockIdx.y * B + b) * G + threadIdx.x] = sum;
  }
}

template <typename T>
__global__ void __launch_bounds__(kColTile)
    nested_loss_backward_kernel(const T* __restrict__ x, const T* __restrict__ b_dec,
                                const T* __restrict__ values,
                                const int64_t* __restrict__ indices,
                                const int32_t* __restrict__ order,
                                const int32_t* __restrict__ group, const T* __restrict__ W_dec,
                                const T* __restrict__ grad_x_hat,
                                const double* __restrict__ scale, int64_t B, int64_t k,
                                int64_t d, int G, T* __restrict__ grad_x, Acc<T>* __restrict__ S,
                                Acc<T>* __restrict__ partial_dots) {
  using A = Acc<T>;
  __shared__ SlotStage<A> stage;
  __shared__ A s_S[kMaxGroups][kColTile];  // r_g, then S_g, of this block's columns
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  const int col = threadIdx.x;
  const int64_t b = blockIdx.x;
  const int64_t e0 = blockIdx.y * kColTile;
  const int64_t e = e0 + col;
  const bool active = e < d;
  const RowCode<T> row = row_code(order, indices, values, group, b, k);

  // The walk: r_g of this thread's column into s_S[g][col].
  walk_row(x, b_dec, W_dec, row, b, k, d, e, active, G, stage, static_cast<A*>(nullptr),
           [&](int g, A r) { s_S[g][col] = r; });

  // Suffix sums of the scaled residuals; grad_x is S_0 before x_hat's gradient joins.
  A suffix = 0;
  for (int h = G - 1; h >= 0; --h) {
    suffix = static_cast<A>(scale[h]) * s_S[h][col] + suffix;
    s_S[h][col] = suffix;
  }
  if (active) {
    grad_x[b * d + e] = from_acc<T>(s_S[0][col]);
  }
  const A g_hat = (active && grad_x_hat != nullptr) ? to_acc(grad_x_hat[b * d + e]) : A(0);
  for (int h = 0; h < G; ++h) {
    s_S[h][col] -= g_hat;
    if (active) {
      S[(h * B + b) * d + e] = s_S[h][col];
    }
  }

  // Dot products W_dec[i] . S_h over this tile's columns: one warp per slot.
  for (int64_t q0 = 0; q0 < k; q0 += kSlotChunk) {
    const int count = static_cast<int>(min64(kSlotChunk, k - q0));
    __syncthreads();  // s_S is complete; every warp is done with the previous chunk
    stage_slots(row, q0, count, stage);
    __syncthreads();
    // Each warp takes kDotUnroll of its slots at a time, loading all their W_dec segments
    // before the first reduction.
    for (int t0 = warp; t0 < count; t0 += kWalkWarps * kDotUnroll) {
      A dots[kDotUnroll];
#pragma unroll
      for (int u = 0; u < kDotUnroll; ++u) {
        const int t = t0 + u * kWalkWarps;
        dots[u] = 0;
        if (t < count) {
          const T* w = W_dec + stage.index[t] * d + e0;
          const A* S_h = s_S[stage.group[t]];
#pragma unroll
          for (int v = 0; v < kColsPerLane; ++v) {
            const int c = lane + v * kWarp;
            if (e0 + c < d) {
              dots[u] += to_acc(w[c]) * S_h[c];
            }
          }
        }
      }
#pragma unroll
      for (int u = 0; u < kDotUnroll; ++u) {
        const int t = t0 + u * kWalkWarps;
        if (t < count) {  // the same for the whole warp
          const A dot = warp_sum(dots[u]);
          if (lane == 0) {
            partial_dots[(blockIdx.y * B + b) * k + stage.slot[t]] = dot;
          }
        }
      }
    }
  }
}

}  // namespace

cudaError_t prefix_walk_plan(const int64_t* indices, int64_t B, int64_t k,
                             const PrefixSizes& sizes, int32_t* order, int32_t* group,
                             cudaStream_t stream) {
  const int64_t blocks = (B * k + kPlanThreads - 1) / kPlanThreads;
  if (blocks == 0) {
    return cudaSuccess;
  }
  if (!grid_fits(blocks, 1)) {
    return cudaErrorInvalidConfiguration;
  }
  prefix_walk_plan_kernel<<<static_cast<unsigned>(blocks), kPlanThreads, 0, stream>>>(
      indices, B, k, sizes, order, group);
  return cudaGetLastError();
}

template <typename T>
cudaError_t nested_loss_forward(const T* x, const T* b_dec, const T* values,
                                const int64_t* indices, const int32_t* order,
                                const int32_t* group, const T* W_dec, int64_t B, int64_t k,
                                int64_t d, int G, T* x_hat, Acc<T>* partial_losses,
                                cudaStream_t stream) {
  const int64_t tiles = num_col_tiles(d);
  if (B == 0 || tiles == 0) {
    return cudaSuccess;
  }
  if (G < 1 || G > kMaxGroups || !grid_fits(B, tiles)) {
    return cudaErrorInvalidValue;
  }
  const dim3 grid(static_cast<unsigned>(B), static_cast<unsigned>(tiles));
  nested_loss_forward_kernel<T><<<grid, kColTile, 0, stream>>>(
      x, b_dec, values, indices, order, group, W_dec, B, k, d, G, x_hat, partial_losses);
  return cudaGetLastError();
}

template <typename T>
cudaError_t nested_loss_backward(const T* x, const T* b_dec, const T* values,
                                 const int64_t* indices, const int32_t* order,
                                 const int32_t* group, const T* W_dec, const T* grad_x_hat,
                                 const double* scale, int64_t B, int64_t k, int64_t d, int G,
                                 T* grad_x, Acc<T>* S, Acc<T>* partial_dots,
                                 cudaStream_t stream) {
  const int64_t tiles = num_col_tiles(d);
  if (B == 0 || tiles == 0) {
    return cudaSuccess;
  }
  if (G < 1 || G > kMaxGroups || !grid_fits(B, tiles)) {
    return cudaErrorInvalidValue;
  }
  const dim3 grid(static_cast<unsigned>(B), static_cast<unsigned>(tiles));
  nested_loss_backward_kernel<T><<<grid, kColTile, 0, stream>>>(
      x, b_dec, values, indices, order, group, W_dec, grad_x_hat, scale, B, k, d, G, grad_x, S,
      partial_dots);
  return cudaGetLastError();
}

#define SPARSECODE_INSTANTIATE(T)                                                             \
  template cudaError_t nested_loss_forward<T>(const T*, const T*, const T*, const int64_t*,   \
                                              const int32_t*, const int32_t*, const T*,       \
                                              int64_t, int64_t, int64_t, int, T*, Acc<T>*,    \
                                              cudaStream_t);                                  \
  template cudaError_t nested_loss_backward<T>(                                               \
      const T*, const T*, const T*, const int64_t*, const int32_t*, const int32_t*, const T*, \
      const T*, const double*, int64_t, int64_t, int64_t, int, T*, Acc<T>*, Acc<T>*,          \
      cudaStream_t);
SPARSECODE_FOR_EACH_TYPE(SPARSECODE_INSTANTIATE)
#undef SPARSECODE_INSTANTIATE

}  // namespace sparsecode::cuda
