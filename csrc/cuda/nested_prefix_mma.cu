// The nested-prefix (Matryoshka) loss's pass over the rows on the tensor cores, bfloat16: every
// prefix's reconstruction at once, and from it the squared norms and the suffix sums that the
// loss and its backward need (DESIGN.md §3.4). It replaces the Triton walk
// (triton_kernels/nested_prefix_loss.py) where x is bfloat16, G <= kMaxMmaGroups = 8, d is a
// multiple of 8 and the GPU is sm_80 or later.
//
// With prefix sizes m_0 < ... < m_{G-1} = n, slot j of row b is in group h, the first h with
// indices[b, j] < m_h; x [B, d], values / indices [B, k], W_dec [n, d], b_dec [d], scale [G]
// (float32):
//   xhat_h[b]    = sum over the slots j of groups <= h of values[b, j] W_dec[indices[b, j]]
//   r_h[b]       = x[b] - b_dec - xhat_h[b]
//   A_h[b]       = sum over g >= h of scale[g] r_g[b]            (float32, from g = G - 1 down)
//   S [G, B, d]  = A_h - grad_x_hat (grad_x_hat absent: zero), in bfloat16     (when S is given)
//   grad_x       = A_0                                                     (when grad_x is given)
//   x_hat        = b_dec + xhat_{G-1}                                       (when x_hat is given)
//   partial[t, b, h] = the squared norm of r_h over the columns of tile t (256 columns, float32)
// The loss's forward takes scale_g = 2 w_g / B, so that S is its backward's P; a backward under
// other upstream gradients takes their scale and grad_x_hat.
//
// Why: the Triton walk subtracts one decoder row at a time on the CUDA cores and stores each
// group's residual as it passes a group boundary, then reads them back for the norms and the
// suffix sums: 125 instructions a slot for 16 elements a thread (sm_90 SASS), bound by
// instruction issue (0.88 ms on an H100 at the size below, against the sparse decode's 0.37 ms
// for the same gathers). As a matrix product, every prefix comes at once:
//   D[16 columns x 8 groups] += W^T[16 columns x 16 slots] C[16 slots x 8 groups],
//   C[j][h] = values[b, j] where slot j's group is <= h, else 0,
// so D's column h is xhat_h directly: no walk order, no boundaries, no stored residuals. The
// values are bfloat16 already, so C is exact, and the products are exact in float32.
//
// Strategy: a block of 4 warps owns 16 rows (4 a warp, one at a time) and 256 columns; blocks
// are numbered row-fastest, so that the rows in flight share one column tile of W_dec (n x 256
// columns, 34 MB at n = 65536) in L2. A warp takes a row's slots 16 at a time (a step). Its
// lanes copy the step's 16 decoder rows (256 columns, 512 bytes each) into shared memory with
// cp.async, two lanes a row, as latent_rows_sum_mma.cu does, into rows padded to 528 bytes so
// that ldmatrix has no bank conflicts; a slot of value zero (or past k) is not read, its row
// zero-filled; a row's last step also copies the row of x. Double buffered: the next step's
// copies (the next row's first at a row's end) are in flight while a step is multiplied, and the
// latents that the step after it copies are loaded then, so that no copy waits for a load. Per 16
// columns: A = W^T by ldmatrix.trans, mma.sync m16n8k16 into D (16 x 4 floats a lane). After a
// row's last step D goes to shared memory, [group][column] in the step's place (pitch 260
// floats: no bank conflicts), and each lane takes 8 consecutive columns: from the last group
// down it makes r_h, A_h and S_h, stored as one 16-byte store a group, and the squared norm of
// r_h, summed over the warp by a fixed shuffle tree. Every sum runs in a fixed order: the results
// are bit-identical run to run.
//
// Unlike the walk, a slot's row is multiplied by the zeros of the groups below its own: a
// non-finite element of a decoder row makes that column of every prefix of the row non-finite,
// where the reference keeps the prefixes below the slot's group finite.
//
// Cost at B = 8192, d = 2304, n = 65536, k = 64, G = 6 (bfloat16): the B k d decoder elements
// gathered (2.4 GB, mostly from L2, as the decode's), x read once (38 MB), S written (G B d: 226
// MB) and x_hat (38 MB), 10 bytes of index and value a slot. Tensor cores: 8 B k d multiply-adds
// (one per group of the mma's 8), 19 GFLOP, about 0.03 ms of an H100's mma.sync rate. sm_90
// SASS (nvcc 13): 268 instructions a step (16 cp.async, 16 ldmatrix, 16 mma, the next step's C
// and the latents a step ahead), about 1040 at the end of a row for all 8 groups (a row runs G
// of them): about 1800 a row of k = 64 and 256 columns, against about 4000 for the walk's slots
// alone (64 x 125 x 16 / 32): about 0.15 ms of an H100's issue rate. The gathers should bound
// it, at about the decode's 0.37 ms. 166 registers; shared memory 70 KB a block, 3 blocks an SM.

#include "staged_rows.cuh"

namespace sparsecode::cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kRowsPerWarp = 4;
constexpr int kStep = kStagedRows;  // slots a step: the k of the mma
constexpr int kCols = kStagedCols;  // columns a block
constexpr int kRowPitch = kStagedPitch;
constexpr int kStages = 2;
constexpr int kMTiles = kStagedTiles;
static_assert(kCols == kMmaColTile, "the glue sizes partial by kMmaColTile");
constexpr int kLaneCols = kCols / kWarp;  // a lane's columns in the epilogue
// A step's place: its 16 decoder rows, then the row of x (a row's last step).
constexpr int kStageBytes = (kStep + 1) * kRowPitch;
constexpr int kSharedBytes = kWarps * kStages * kStageBytes;  // 70 KB
// D as [group][column] floats, in the place of the step's decoder rows once multiplied.
constexpr int kTilePitch = kCols + 4;
static_assert(kMaxMmaGroups * kTilePitch * 4 <= kStep * kRowPitch, "D fits before the row of x");
static_assert(kLaneCols == 8, "a lane's columns are one 16-byte vector of bfloat16");

// 8 bfloat16 from 16-byte aligned p, as floats.
__device__ __forceinline__ void load8(const __nv_bfloat16* p, float (&v)[kLaneCols]) {
  uint4 bits = *reinterpret_cast<const uint4*>(p);
  const uint32_t words[4] = {bits.x, bits.y, bits.z, bits.w};
#pragma unroll
  for (int c = 0; c < 4; ++c) {
    v[2 * c] = bits_to_float(words[c] << 16);
    v[2 * c + 1] = bits_to_float(words[c] & 0xffff0000u);
  }
}

__global__ void __launch_bounds__(kWarps * kWarp, 3)
    nested_prefix_mma_kernel(const __nv_bfloat16* __restrict__ x,
                             const __nv_bfloat16* __restrict__ b_dec,
                             const __nv_bfloat16* __restrict__ values,
                             const int64_t* __restrict__ indices,
                             const __nv_bfloat16* __restrict__ W_dec, PrefixSizes sizes,
                             const float* __restrict__ scale,
                             const __nv_bfloat16* __restrict__ grad_x_hat, int64_t B, int64_t k,
                             int64_t d, __nv_bfloat16* __restrict__ S,
                             __nv_bfloat16* __restrict__ x_hat, float* __restrict__ partial,
                             __nv_bfloat16* __restrict__ grad_x) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // not launched there: has_bf16_mma() is false
#else
  SPARSECODE_DYNAMIC_SHARED(shared);
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  const int g = lane / 4;  // the mma operands' row group; in C, the group
  const int t = lane % 4;
  const int G = sizes.count;
  const int64_t e0 = static_cast<int64_t>(blockIdx.y) * kCols;
  const int64_t b0 = (static_cast<int64_t>(blockIdx.x) * kWarps + warp) * kRowsPerWarp;
  const int64_t b_end = min64(b0 + kRowsPerWarp, B);
  if (b0 >= b_end) {
    return;  // no block barrier below
  }
  // C's column g: a slot is in a group <= g when its latent is below limit (d_sae < 2^31).
  int limit = INT32_MAX;
#pragma unroll
  for (int h = 0; h < kMaxMmaGroups - 1; ++h) {
    if (h == g && h < G - 1) {
      limit = static_cast<int>(sizes.m[h]);
    }
  }
  // The epilogue's columns: c0 .. c0 + 7, all below d or none (d is a multiple of 8).
  const int64_t c0 = e0 + kLaneCols * lane;
  const bool lane_live = c0 < d;

  // The lane copies slot lane / 2's decoder row and reads the step's rows as a transposed A
  // operand (staged_rows.cuh).
  const RowCopier copier(W_dec, d, e0, lane);
  const int read_at = transposed_read_at(lane);
  const auto* value_bits = reinterpret_cast<const uint16_t*>(values);
  auto stage_at = [&](int stage) { return shared + (warp * kStages + stage) * kStageBytes; };

  // What this lane copies for the step of row b at slots q .. q + 15: slot q + lane / 2's latent
  // and value bits (latent -1 past k). Loaded a step before the copies, and used only then, so
  // that the copies do not wait for the loads.
  struct CopySlot {
    int latent = -1;
    uint32_t value = 0;
  };
  auto copy_slot = [&](int64_t b, int64_t q) {
    CopySlot slot;
    if (q + lane / 2 < k) {
      slot.latent = static_cast<int>(indices[b * k + q + lane / 2]);
      slot.value = value_bits[b * k + q + lane / 2];
    }
    return slot;
  };
  // Starts the copies of the step of row b at slots q .. q + 15 into stage (what this lane copies:
  // copy_slot's) and returns the lane's C: b[0] = C[2t, 2t+1][g], b[1] = C[2t+8, 2t+9][g].
  struct StepC {
    uint32_t b[2] = {0, 0};
  };
  auto issue = [&](int64_t b, int64_t q, const CopySlot& slot, int stage) {
    const int64_t slot0 = b * k + q;  // the step's first slot in values / indices
    // A slot past k or of value zero adds nothing: its row is not read.
    const bool copy = slot.latent >= 0 && (slot.value & 0x7fffu) != 0;
    unsigned char* to = stage_at(stage);
    copier.copy(to, static_cast<uint64_t>(slot.latent), copy);
    if (q + kStep >= k) {  // the row's last step: its row of x, 16 bytes a lane
      cp_async_16(to + kStep * kRowPitch + 16 * lane, x + b * d + c0, lane_live);
    }
    StepC step;
#pragma unroll
    for (int h = 0; h < 4; ++h) {
      const int at = 2 * t + h % 2 + 8 * (h / 2);
      if (q + at < k) {
        const int64_t latent = indices[slot0 + at];
        const uint32_t value = value_bits[slot0 + at];
        step.b[h / 2] |= (latent < limit ? value : 0u) << (16 * (h % 2));
      }
    }
    return step;
  };

  float acc[kMTiles][4] = {};  // D[16 columns x 8 groups] per 16 columns

  // The row's outputs from D, after its last step (staged in stage).
  auto finish_row = [&](int64_t b, int stage) {
    unsigned char* staged = stage_at(stage);
    float(*tile)[kTilePitch] = reinterpret_cast<float(*)[kTilePitch]>(staged);
    __syncwarp();  // every lane has read the step's rows: D takes their place
#pragma unroll
    for (int m = 0; m < kMTiles; ++m) {
      const int col = 16 * m + g;
      tile[2 * t][col] = acc[m][0];
      tile[2 * t + 1][col] = acc[m][1];
      tile[2 * t][col + 8] = acc[m][2];
      tile[2 * t + 1][col + 8] = acc[m][3];
#pragma unroll
      for (int v = 0; v < 4; ++v) {
        acc[m][v] = 0.0f;
      }
    }
    __syncwarp();
    // x - b_dec, and grad_x_hat, at the lane's columns (zero past d: the copy zero-filled x).
    float xb[kLaneCols];
    load8(reinterpret_cast<const __nv_bfloat16*>(staged + kStep * kRowPitch) + kLaneCols * lane,
          xb);
    float bias[kLaneCols] = {};
    float gxh[kLaneCols] = {};
    if (lane_live) {
      load8(b_dec + c0, bias);
      if (grad_x_hat != nullptr) {
        load8(grad_x_hat + b * d + c0, gxh);
      }
    }
#pragma unroll
    for (int c = 0; c < kLaneCols; ++c) {
      xb[c] -= bias[c];
    }
    float A[kLaneCols] = {};
#pragma unroll
    for (int q = 0; q < kMaxMmaGroups; ++q) {
      const int h = kMaxMmaGroups - 1 - q;
      if (h < G) {  // the same for the whole warp
        const float4* at = reinterpret_cast<const float4*>(tile[h] + kLaneCols * lane);
        const float4 lo = at[0];
        const float4 hi = at[1];
        const float xhat[kLaneCols] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
        const float scale_h = scale[h];
        float square = 0.0f;
        float out_h[kLaneCols];
#pragma unroll
        for (int c = 0; c < kLaneCols; ++c) {
          const float r = xb[c] - xhat[c];
          square += r * r;
          A[c] += scale_h * r;
          out_h[c] = A[c] - gxh[c];
        }
        if (S != nullptr && lane_live) {
          store_pack<__nv_bfloat16, kLaneCols>(S + (h * B + b) * d + c0, out_h);
        }
        if (x_hat != nullptr && h == G - 1 && lane_live) {
#pragma unroll
          for (int c = 0; c < kLaneCols; ++c) {
            out_h[c] = bias[c] + xhat[c];
          }
          store_pack<__nv_bfloat16, kLaneCols>(x_hat + b * d + c0, out_h);
        }
        if (partial != nullptr) {
          square = warp_sum(square);
          if (lane == 0) {
            partial[(static_cast<int64_t>(blockIdx.y) * B + b) * G + h] = square;
          }
        }
      }
    }
    if (grad_x != nullptr && lane_live) {
      store_pack<__nv_bfloat16, kLaneCols>(grad_x + b * d + c0, A);
    }
  };

  // The step being multiplied: row b, slots q .. q + 15; the warp walks its rows' steps in order.
  // The next step (row b_next, slots from q_next) copies copy_next, loaded a step ahead.
  auto following = [&](int64_t& b_step, int64_t& q_step) {
    q_step += kStep;
    if (q_step >= k) {
      q_step = 0;
      ++b_step;
    }
  };
  int64_t b = b0;
  int64_t q = 0;
  StepC step = issue(b, q, copy_slot(b, q), 0);
  cp_async_commit();
  int64_t b_next = b;
  int64_t q_next = q;
  following(b_next, q_next);
  CopySlot copy_next;
  if (b_next < b_end) {
    copy_next = copy_slot(b_next, q_next);
  }
  for (int stage = 0; b < b_end; stage ^= 1) {  // the same for the whole warp
    const bool row_ends = b_next != b;
    StepC next;
    if (b_next < b_end) {
      next = issue(b_next, q_next, copy_next, stage ^ 1);
    }
    int64_t b_after = b_next;
    int64_t q_after = q_next;
    following(b_after, q_after);
    if (b_after < b_end) {
      copy_next = copy_slot(b_after, q_after);
    }
    cp_async_commit();
    cp_async_wait<1>();
    __syncwarp();  // every lane's copies of this step have landed
    const unsigned char* staged = stage_at(stage);
#pragma unroll
    for (int m = 0; m < kMTiles; ++m) {
      uint32_t a[4];
      ldmatrix_x4_trans(a, staged + read_at + 32 * m);
      mma_m16n8k16_bf16(acc[m], a, step.b);
    }
    if (row_ends) {
      finish_row(b, stage);
    }
    __syncwarp();  // this step's place is read before the next issue overwrites it
    step = next;
    b = b_next;
    q = q_next;
    b_next = b_after;
    q_next = q_after;
  }
  cp_async_wait<0>();
#endif
}

}  // namespace

cudaError_t nested_prefix_sums_mma(const __nv_bfloat16* x, const __nv_bfloat16* b_dec,
                                   const __nv_bfloat16* values, const int64_t* indices,
                                   const __nv_bfloat16* W_dec, const PrefixSizes& sizes,
                                   const float* scale, const __nv_bfloat16* grad_x_hat, int64_t B,
                                   int64_t k, int64_t d, __nv_bfloat16* S, __nv_bfloat16* x_hat,
                                   float* partial, __nv_bfloat16* grad_x, cudaStream_t stream) {
  if (k < 1 || d % 8 != 0 || sizes.count < 1 || sizes.count > kMaxMmaGroups ||
      sizes.m[sizes.count - 1] > INT32_MAX) {
    return cudaErrorInvalidValue;
  }
  for (const void* p : {static_cast<const void*>(x), static_cast<const void*>(b_dec),
                        static_cast<const void*>(W_dec),
                        static_cast<const void*>(grad_x_hat), static_cast<const void*>(S),
                        static_cast<const void*>(x_hat), static_cast<const void*>(grad_x)}) {
    if (!aligned_to(p, 16)) {
      return cudaErrorMisalignedAddress;
    }
  }
  const int64_t row_blocks = (B + kWarps * kRowsPerWarp - 1) / (kWarps * kRowsPerWarp);
  const int64_t col_tiles = (d + kCols - 1) / kCols;
  if (row_blocks == 0 || col_tiles == 0) {
    return cudaSuccess;
  }
  if (!grid_fits(row_blocks, col_tiles)) {
    return cudaErrorInvalidConfiguration;
  }
  // Over 48 KB of shared memory a block must be allowed (on the current device: at every launch).
  const cudaError_t allowed =
      cudaFuncSetAttribute(reinterpret_cast<const void*>(nested_prefix_mma_kernel),
                           cudaFuncAttributeMaxDynamicSharedMemorySize, kSharedBytes);
  if (allowed != cudaSuccess) {
    return allowed;
  }
  const dim3 grid(static_cast<unsigned>(row_blocks), static_cast<unsigned>(col_tiles));
  SPARSECODE_LAUNCH_SHARED(nested_prefix_mma_kernel, grid, kWarps * kWarp, kSharedBytes, stream)(
      x, b_dec, values, indices, W_dec, sizes, scale, grad_x_hat, B, k, d, S, x_hat, partial,
      grad_x);
  return cudaGetLastError();
}

}  // namespace sparsecode::cuda
