// Rows of a bfloat16 matrix staged in shared memory for the tensor cores, as the kernels of
// latent_rows_sum_mma.cu and nested_prefix_mma.cu gather them: 16 rows (the k of an mma.sync
// m16n8k16) of 256 columns a step, their layout, a lane's copies into it and its reads of the
// rows as a transposed A operand.
#pragma once

#include "device_utils.cuh"

namespace sparsecode::cuda {

constexpr int kStagedRows = 16;   // rows a step: the k of the mma
constexpr int kStagedCols = 256;  // columns: 16 column tiles of the mma
constexpr int kStagedRowBytes = kStagedCols * 2;
// A staged row's pitch: 16 bytes of padding put the 8 rows that an ldmatrix reads at one column
// in different banks.
constexpr int kStagedPitch = kStagedRowBytes + 16;
constexpr int kStagedTiles = kStagedCols / 16;

// A lane's part in copying a step's 16 rows of src [*, d] (the 256 columns from e0) into a
// stage: lane (s, c) = (lane / 2, lane % 2) copies row s's 16-byte units 2u + c, u = 0..15 (a
// 32-byte sector for the 2 lanes each time), zeros past d. d a multiple of 8, src 16-byte
// aligned.
struct RowCopier {
  const char* lane_src;
  uint64_t row_bytes;
  int cols_left;  // unit u is read while 16 u < cols_left
  int copy_at;    // the lane's first byte in a stage

  __device__ RowCopier(const __nv_bfloat16* src, int64_t d, int64_t e0, int lane)
      : lane_src(reinterpret_cast<const char*>(src + e0 + 8 * (lane % 2))),
        row_bytes(static_cast<uint64_t>(d) * 2),
        cols_left(static_cast<int>(min64(d - e0 - 8 * (lane % 2), kStagedCols))),
        copy_at(lane / 2 * kStagedPitch + 16 * (lane % 2)) {}

  // Starts the copies of src row `row` into stage (asynchronous: cp_async_commit and
  // cp_async_wait follow); without copy, nothing is read and the lane's part is zeroed.
  __device__ __forceinline__ void copy(unsigned char* stage, uint64_t row, bool copy) const {
    const char* from = lane_src + (copy ? row : 0) * row_bytes;
#pragma unroll
    for (int u = 0; u < kStagedRowBytes / 32; ++u) {
      cp_async_16(stage + copy_at + 32 * u, from + 32 * u, copy && 16 * u < cols_left);
    }
  }
};

// Where lane reads in a stage, for ldmatrix_x4_trans at + 32 m, the columns 16 m .. 16 m + 15 of
// the 16 rows as the A operand of an mma (columns x rows): four 8 x 8 matrices (rows x columns)
// in the order (0-7 x 0-7), (0-7 x 8-15), (8-15 x 0-7), (8-15 x 8-15). Lane i gives row
// i % 8 + 8 (i / 16) at unit 2m + i / 8 % 2.
__device__ __forceinline__ int transposed_read_at(int lane) {
  return (lane % 8 + 8 * (lane / 16)) * kStagedPitch + 16 * (lane / 8 % 2);
}

}  // namespace sparsecode::cuda
