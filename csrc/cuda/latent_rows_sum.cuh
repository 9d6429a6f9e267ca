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
// e0 + cols - 1 below d: a thread per column. bias_weights is [d, n].
template <typename Src, typename A>
__device__ __forceinline__ void bias_partial_sums(const Src* __restrict__ bias_weights,
                                                  const A* tile_total, int64_t i0, int latents,
                                                  int64_t n, int64_t d, int64_t e0, int cols,
                                                  A* __restrict__ bias_partial) {
  for (int col = threadIdx.x; col < cols; col += blockDim.x) {
    const int64_t e = e0 + col;
    if (e < d) {
      const Src* w = bias_weights + e * n + i0;
      A sum = 0;
      for (int t = 0; t < latents; ++t) {
        sum += to_acc(w[t]) * tile_total[t];
      }
      bias_partial[e] = sum;
    }
  }
}

}  // namespace sparsecode::cuda
