// Row gathers of a sparse code: the decode forward and the encoder's grad_x; plus the tiled
// transpose that gives the encoder's gather its rows.
//
//   gather_rows_sum:   out[b] = bias + sum_j coef[b, j] * rows[indices[b, j]]     [B, d]
//                      sparse_decode_forward (rows = W_dec) and topk_encode_backward's
//                      grad_x (rows = W_enc^T, coef = grad_pre).
//   transpose:         W_enc [d, n] -> W_enc^T [n, d], through 32x32 shared-memory tiles so
//                      that both the reads and the writes are coalesced.
//
// Strategy: one block per (row b, tile of kColTile = 128 columns), one column per thread;
// the row's k (coef, index) pairs are staged in shared memory, 256 at a time, and every warp
// then reads 32 consecutive elements of each gathered row (coalesced). Blocks are numbered
// row-fastest, so the blocks in flight share one column tile and the gathered rows' slab
// (n x 128 columns: 17 MB in bf16, 34 MB in fp32 at n = 65536) stays in the 50 MB L2 of an
// H100: a latent's row segment is read from DRAM about once, however many rows use it.
// Sums run in a fixed order.
//
// Cost at B = 8192, d = 2304, n = 65536, k = 64 (s = bytes per element: 2 bf16, 4 fp32):
//   gather_rows_sum   2 B k d = 2.4 GFLOP. Gathered: B k d s = 2.4 GB (bf16) from L2; DRAM
//                     floor: rows n d s (302 MB) + out B d s (38 MB) + pairs B k 12 (6 MB)
//                     = 0.35 GB bf16 (0.7 GB fp32): 0.12 ms (0.23 ms) at 3 TB/s; 0.8 ms if the
//                     L2 gave no reuse.
//   transpose         reads and writes n d s once: 604 MB bf16 (1.2 GB fp32): 0.2 ms (0.4 ms).
#include "device_utils.cuh"

namespace sparsecode::cuda {
namespace {

constexpr int kSlotChunk = 256;                   // (coef, index) pairs staged at a time
constexpr int kTransposeTile = 32;
constexpr int kTransposeRows = 8;                 // thread rows per transpose block

template <typename T>
__global__ void __launch_bounds__(kColTile)
    gather_rows_sum_kernel(const Acc<T>* __restrict__ coef, const int64_t* __restrict__ indices,
                           const T* __restrict__ rows, const T* __restrict__ bias, int64_t k,
                           int64_t d, bool skip_zero, T* __restrict__ out) {
  using A = Acc<T>;
  __shared__ A s_coef[kSlotChunk];
  __shared__ int64_t s_row[kSlotChunk];
  const int64_t b = blockIdx.x;
  const int64_t e = blockIdx.y * kColTile + threadIdx.x;
  const bool active = e < d;
  A acc = (active && bias != nullptr) ? to_acc(bias[e]) : A(0);
  for (int64_t j0 = 0; j0 < k; j0 += kSlotChunk) {
    const int count = static_cast<int>(min64(kSlotChunk, k - j0));
    __syncthreads();  // every thread is done with the previous chunk
    for (int t = threadIdx.x; t < count; t += blockDim.x) {
      s_coef[t] = coef[b * k + j0 + t];
      s_row[t] = indices[b * k + j0 + t];
    }
    __syncthreads();
    if (active) {
#pragma unroll 4
      for (int t = 0; t < count; ++t) {
        const A c = s_coef[t];
        if (!skip_zero || c != A(0)) {
          acc += c * to_acc(rows[s_row[t] * d + e]);
        }
      }
    }
  }
  if (active) {
    out[b * d + e] = from_acc<T>(acc);
  }
}

template <typename T>
__global__ void __launch_bounds__(kTransposeTile * kTransposeRows)
    transpose_kernel(const T* __restrict__ in, int64_t rows, int64_t cols, T* __restrict__ out) {
  __shared__ T tile[kTransposeTile][kTransposeTile + 1];
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * kTransposeTile;
  const int64_t c0 = static_cast<int64_t>(blockIdx.x) * kTransposeTile;
  for (int y = threadIdx.y; y < kTransposeTile; y += kTransposeRows) {
    const int64_t r = r0 + y;
    const int64_t c = c0 + threadIdx.x;
    if (r < rows && c < cols) {
      tile[y][threadIdx.x] = in[r * cols + c];
    }
  }
  __syncthreads();
  for (int y = threadIdx.y; y < kTransposeTile; y += kTransposeRows) {
    const int64_t c = c0 + y;
    const int64_t r = r0 + threadIdx.x;
    if (c < cols && r < rows) {
      out[c * rows + r] = tile[threadIdx.x][y];
    }
  }
}

}  // namespace

template <typename T>
cudaError_t gather_rows_sum(const Acc<T>* coef, const int64_t* indices, const T* rows,
                            const T* bias, int64_t B, int64_t k, int64_t d, bool skip_zero,
                            T* out, cudaStream_t stream) {
  const int64_t tiles = num_col_tiles(d);
  if (B == 0 || tiles == 0) {
    return cudaSuccess;
  }
  if (!grid_fits(B, tiles)) {
    return cudaErrorInvalidConfiguration;
  }
  const dim3 grid(static_cast<unsigned>(B), static_cast<unsigned>(tiles));
  SPARSECODE_LAUNCH(gather_rows_sum_kernel<T>, grid, kColTile, stream)(coef, indices, rows, bias,
                                                                     k, d, skip_zero, out);
  return cudaGetLastError();
}

template <typename T>
cudaError_t transpose(const T* in, int64_t rows, int64_t cols, T* out, cudaStream_t stream) {
  const int64_t row_tiles = (rows + kTransposeTile - 1) / kTransposeTile;
  const int64_t col_tiles = (cols + kTransposeTile - 1) / kTransposeTile;
  if (row_tiles == 0 || col_tiles == 0) {
    return cudaSuccess;
  }
  if (!grid_fits(col_tiles, row_tiles)) {
    return cudaErrorInvalidConfiguration;
  }
  const dim3 grid(static_cast<unsigned>(col_tiles), static_cast<unsigned>(row_tiles));
  const dim3 block(kTransposeTile, kTransposeRows);
  SPARSECODE_LAUNCH(transpose_kernel<T>, grid, block, stream)(in, rows, cols, out);
  return cudaGetLastError();
}

#define SPARSECODE_INSTANTIATE(T)                                                           \
  template cudaError_t gather_rows_sum<T>(const Acc<T>*, const int64_t*, const T*, const T*, \
                                          int64_t, int64_t, int64_t, bool, T*, cudaStream_t); \
  template cudaError_t transpose<T>(const T*, int64_t, int64_t, T*, cudaStream_t);
SPARSECODE_FOR_EACH_TYPE(SPARSECODE_INSTANTIATE)
#undef SPARSECODE_INSTANTIATE

}  // namespace sparsecode::cuda
