// What latent_rows_sum.cu (the per-latent sums on the CUDA cores, every type) and
// latent_rows_sum_mma.cu (the same sums on the tensor cores, bfloat16) share.
#pragma once

#include "device_utils.cuh"

namespace sparsecode::cuda {

// A latent with more pairs than this (a dense latent, active in many rows) is summed by the
// second launch of latent_rows_sum.cu, in which all the warps of a block share its pairs; the
// first launch sums the others.
constexpr int64_t kLongSegment = 256;

// The first launch of latent_rows_sum (kDots false) or latent_rows_sum_dots (kDots true) for
// bfloat16 src and out on the tensor cores (latent_rows_sum_mma.cu): every latent of at most
// kLongSegment pairs, over column tiles of 256 (d a multiple of 8, src, out and weights
// 16-byte aligned). The arguments are latent_rows_sum_kernel's; grid as in segment_grid.
template <bool kTransposed, bool kDots>
cudaError_t launch_latent_rows_sum_mma(dim3 grid, const int64_t* offsets, const int64_t* rows,
                                       const float* coef, const __nv_bfloat16* src, int64_t n,
                                       int64_t d, __nv_bfloat16* out, __nv_bfloat16* coef_sum,
                                       const __nv_bfloat16* weights, const int64_t* pair_ids,
                                       int64_t num_pairs, float* partial_dots,
                                       float* bias_partial, cudaStream_t stream);

// bias_partial[e] = sum over the tile's latents t (from i0, `latents` of them) of
// bias_weights[e, i0 + t] * tile_total[t], in latent order, for the block's columns e0 ..
// e0 + cols - 1 below d: a thread per column. bias_weights is [d, n]. A thread reads its row
// segment (kRowsSumLatentTile elements: 64 bytes in bf16) 16 bytes a load where a full tile's
// segment is 16-byte aligned, two loads in flight at a time (four spilled 12 bytes in the bf16
// pass of long latents), and an element a load otherwise. Element by element, a thread issued
// 32 2-byte loads (LDG.E.U16 in the sm_90 SASS), each load's 32 lanes touching 32 rows; now it
// issues four 16-byte ones (LDG.E.128). Run 4's Nsight Compute showed that pass, the only
// one with bias weights, stalled on memory loads (long scoreboard) 10.9 cycles an issued
// instruction against the plain sum's 4.6, and on the load/store queue (MIO throttle) 1.4
// against 0.0; whether these loads are the cause, its next run will say. The sum's order, and
// so its bits, are the same either way.
// At a block's start, asks L2 for the lines of bias_weights that bias_partial_sums reads at its
// end (a thread per column, the line of its segment), so that those reads find them in L2
// rather than DRAM: in the pass that has them, they come after the block's last barrier, with
// nothing else left to overlap their latency. A hint: no value changes.
template <typename Src>
__device__ __forceinline__ void prefetch_bias_weights(const Src* bias_weights, int64_t i0,
                                                      int64_t n, int64_t d, int64_t e0,
                                                      int cols) {
  for (int col = threadIdx.x; col < cols; col += blockDim.x) {
    if (e0 + col < d) {
      prefetch_l2(bias_weights + (e0 + col) * n + i0);
    }
  }
}

template <typename Src, typename A>
__device__ __forceinline__ void bias_partial_sums(const Src* __restrict__ bias_weights,
                                                  const A* tile_total, int64_t i0, int latents,
                                                  int64_t n, int64_t d, int64_t e0, int cols,
                                                  A* __restrict__ bias_partial) {
  constexpr int kTile = static_cast<int>(kRowsSumLatentTile);
  constexpr int kPerLoad = 16 / static_cast<int>(sizeof(Src));  // elements in 16 bytes
  constexpr int kLoads = kTile / kPerLoad;                      // 16-byte loads a segment
  constexpr int kInFlight = kLoads < 2 ? kLoads : 2;
  for (int col = threadIdx.x; col < cols; col += blockDim.x) {
    const int64_t e = e0 + col;
    if (e < d) {
      const Src* w = bias_weights + e * n + i0;
      A sum = 0;
      if (latents == kTile && reinterpret_cast<uintptr_t>(w) % 16 == 0) {
        const uint4* segment = reinterpret_cast<const uint4*>(w);
#pragma unroll 1
        for (int q0 = 0; q0 < kLoads; q0 += kInFlight) {
          uint4 raw[kInFlight];
#pragma unroll
          for (int q = 0; q < kInFlight; ++q) {
            raw[q] = segment[q0 + q];
          }
#pragma unroll
          for (int q = 0; q < kInFlight; ++q) {
            Src weight[kPerLoad];
            memcpy(weight, &raw[q], sizeof(weight));
#pragma unroll
            for (int v = 0; v < kPerLoad; ++v) {
              sum += to_acc(weight[v]) * tile_total[(q0 + q) * kPerLoad + v];
            }
          }
        }
      } else {
        for (int t = 0; t < latents; ++t) {
          sum += to_acc(w[t]) * tile_total[t];
        }
      }
      bias_partial[e] = sum;
    }
  }
}

}  // namespace sparsecode::cuda
