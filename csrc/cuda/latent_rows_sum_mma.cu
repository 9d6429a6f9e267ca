// Per-latent sums of bfloat16 rows on the tensor cores: the first launch of latent_rows_sum.cu's
// sums (the latents of at most kLongSegment pairs) where src and out are bfloat16, d is a
// multiple of 8, the GPU is sm_80 or later and SPARSECODE_TENSOR_CORES=1 (tensor_cores_allowed);
// the dense latents keep latent_rows_sum.cu's second launch.
//
//   out[i] = sum over the pairs q of latent i of coef[q] * src[rows[q]]     out [n, d] or [d, n]
//   kDots:   partial_dots[t, pair_ids[q]] = src[rows[q]] . weights[i] over column tile t
//   kTransposed: also coef_sum and bias_partial, as latent_rows_sum.cu.
// offsets [n + 1], rows / coef [P] (the pairs sorted by latent), src [*, d], weights [n, d] (the
// dots) or [d, n] (bias_weights).
//
// Why: latent_rows_sum.cu's loop spends 35 instructions (48 with the dots) per pair and lane on
// 8 columns, widening each bfloat16 and multiply-adding it on the CUDA cores; on an H100 those
// sums were bound by instruction issue (0.79 ms with the dots, 0.80 ms transposed, at the size
// below) while L2 could feed the same gathers in about half that time. Here the tensor cores do
// the arithmetic on the bfloat16 rows as gathered.
//
// Strategy: a block of 4 warps owns kRowsSumLatentTile = 32 latents x 256 columns, a warp 8
// consecutive latents, whose pairs are consecutive in the sorted list. The warp takes its pairs
// 16 at a time (a step; a long latent's pairs are skipped, the second launch sums them). Its
// lanes copy the step's 16 src rows (256 columns, 512 bytes each) into shared memory with
// cp.async, two lanes a row, 32 contiguous bytes an instruction, into rows padded to 528 bytes
// (so that the 8 rows an ldmatrix reads at one column fall in different banks); double
// buffered, the next step's copies are in flight while a step is summed, and the rows and
// coefficients that the step after it copies are loaded then, so that no copy waits for a load
// (each step's 16 pairs are a new 128-byte line of rows). Then, per 16 columns
// (mma.sync m16n8k16, bfloat16 in, float32 accumulation):
//   sum:  D[16 columns x 8 latents] += S^T[16 columns x 16 pairs] C[16 pairs x 8 latents], S^T
//         by ldmatrix.trans and C[p][l] = the coefficient of pair p where p belongs to latent l,
//         else 0. A coefficient goes in as two bfloat16, hi + lo (lo = coef - hi, rounded; a
//         second mma, skipped when the step's lo are all zero, as for bfloat16 values), so it
//         keeps 16 of its 24 bits.
//   dots: E[16 pairs x 8 latents] += S[16 pairs x 16 columns] W^T[16 columns x 8 latents], S by
//         ldmatrix, W in registers (loaded once per warp); a pair's dot is E at its own latent,
//         stored by the lane that holds it.
// Products are exact in float32 and every sum runs in a fixed order: the result is
// bit-identical run to run, though not to the CUDA-core sums'. Unlike those, a pair's row is
// multiplied by the zero coefficients of the warp's other latents: a non-finite element of one
// pair's row makes that column non-finite for all 8 of them. Without the dots, a pair with a
// zero coefficient is not read (its staged row is zero-filled). After the last step the
// accumulators go through shared memory (the staged rows' place) to coalesced stores: 16 bytes a
// lane per latent row, or 32 latents of one column a warp when transposed.
//
// Cost at B = 8192, d = 2304, n = 65536, k = 64 (bfloat16): the B k d src elements gathered
// (2.4 GB, from L2), out written once (302 MB), 12 bytes of row, coefficient and id a pair (6 MB)
// and the offsets. Tensor cores: 16 mma a step and 256 columns for the sum (32 with lo), 16
// more for the dots, 2 B k d multiply-adds each, about 0.05 ms of an H100's mma.sync rate.
// sm_90 SASS of the step loop (nvcc 13): 291 instructions a step for the sum and 387 with the
// dots, of which about 70 run only in warps that hold a long latent: about 14 and 20 a pair,
// against the CUDA-core loop's 35 and 48. Shared memory 66 KB a block; 3 blocks an SM (164
// registers), 2 with the dots (225: 64 accumulators and 32 registers of W).

#include <cstdlib>
#include <cstring>

#include "latent_rows_sum.cuh"
#include "staged_rows.cuh"

namespace sparsecode::cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kWarpLatents = 8;        // a warp's latents: the n of the mma
constexpr int kStep = kStagedRows;     // pairs a step: the k of the sum's mma
constexpr int kCols = kStagedCols;     // columns a block
constexpr int kRowPitch = kStagedPitch;
constexpr int kStages = 2;
constexpr int kMTiles = kStagedTiles;
constexpr int kStageBytes = kStep * kRowPitch;
constexpr int kStagedBytes = kWarps * kStages * kStageBytes;  // 66 KB
// The accumulators' tile, in the staged rows' place once they are summed: [latent][column], or
// [column][latent] when transposed, pitches (floats) that make the accumulator writes and the
// stores' reads free of bank conflicts.
constexpr int kPitch = kCols + 4;
constexpr int kPitchTransposed = kRowsSumLatentTile + 8;
static_assert(kCols * kPitchTransposed * 4 <= kStagedBytes, "the tile fits in the staged rows");
// Shared memory a block: the staged rows (or the tile), then each latent's coefficient sum.
constexpr int kSharedBytes = kStagedBytes + kRowsSumLatentTile * 4;
static_assert(kWarps * kWarpLatents == kRowsSumLatentTile, "a block's warps cover its latents");

// What a lane needs of a step to sum it: C[2t, 2t+1, 2t+8, 2t+9][g], the coefficients of those
// pairs of the step where they belong to the lane's latent g (else 0); for the dots' pairs g
// and g + 8 (r = 0, 1) their flat ids and which of the lane's latents 2t, 2t + 1 they belong
// to (0, 1; -1: neither).
struct StepPairs {
  float coef[4] = {0, 0, 0, 0};
  int32_t id[2] = {0, 0};
  int dot_at[2] = {-1, -1};
};

template <bool kTransposed, bool kDots>
__global__ void __launch_bounds__(kWarps * kWarp, kDots ? 2 : 3)
    latent_rows_sum_mma_kernel(const int64_t* __restrict__ offsets,
                               const int64_t* __restrict__ rows, const float* __restrict__ coef,
                               const __nv_bfloat16* __restrict__ src, int64_t n, int64_t d,
                               __nv_bfloat16* __restrict__ out,
                               __nv_bfloat16* __restrict__ coef_sum,
                               const __nv_bfloat16* __restrict__ weights,
                               const int64_t* __restrict__ pair_ids, int64_t num_pairs,
                               float* __restrict__ partial_dots, float* __restrict__ bias_partial) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // not launched there: has_bf16_mma() is false
#else
  SPARSECODE_DYNAMIC_SHARED(shared);
  float(*tile)[kTransposed ? kPitchTransposed : kPitch] =
      reinterpret_cast<float(*)[kTransposed ? kPitchTransposed : kPitch]>(shared);
  float* tile_total = reinterpret_cast<float*>(shared + kStagedBytes);
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  const int g = lane / 4;  // the mma operands' row group
  const int t = lane % 4;
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * kRowsSumLatentTile;
  const int64_t e0 = static_cast<int64_t>(blockIdx.y) * kCols;
  const int64_t first = i0 + warp * kWarpLatents;
  // The warp's latent first + j owns the pairs bound[j] .. bound[j + 1] - 1 (below 2^31).
  const int lane_bound =
      lane <= kWarpLatents ? static_cast<int>(offsets[min64(first + lane, n)]) : 0;
  int bound[kWarpLatents + 1];
#pragma unroll
  for (int j = 0; j <= kWarpLatents; ++j) {
    bound[j] = __shfl_sync(kFullMask, lane_bound, j);
  }
  const int own_begin = __shfl_sync(kFullMask, lane_bound, g);  // latent first + g's pairs
  const int own_end = __shfl_sync(kFullMask, lane_bound, g + 1);
  // Latents first + 2t and first + 2t + 1: the pairs even_begin .. odd_begin - 1 and
  // odd_begin .. odd_end - 1.
  const int even_begin = __shfl_sync(kFullMask, lane_bound, 2 * t);
  const int odd_begin = __shfl_sync(kFullMask, lane_bound, 2 * t + 1);
  const int odd_end = __shfl_sync(kFullMask, lane_bound, 2 * t + 2);
  unsigned long_latents = 0;  // bit j: latent first + j is the second launch's
#pragma unroll
  for (int j = 0; j < kWarpLatents; ++j) {
    long_latents |= static_cast<unsigned>(bound[j + 1] - bound[j] > kLongSegment) << j;
  }
  hold(long_latents);  // one register, not a mask rebuilt from predicates at every step
  const int last = bound[kWarpLatents];
  // q, moved past the pairs of the long latents that start there.
  auto skip_long = [&](int q) {
    if (long_latents != 0) {
#pragma unroll
      for (int j = 0; j < kWarpLatents; ++j) {
        if ((long_latents >> j & 1) != 0 && q == bound[j]) {
          q = bound[j + 1];
        }
      }
    }
    return q;
  };
  // The end of the step from q: kStep pairs, fewer before a long latent or the warp's last pair.
  auto step_end = [&](int q) {
    int end = min32(q + kStep, last);
    if (long_latents != 0) {
#pragma unroll
      for (int j = 0; j < kWarpLatents; ++j) {
        if ((long_latents >> j & 1) != 0 && bound[j] > q) {
          end = min32(end, bound[j]);
        }
      }
    }
    return end;
  };

  // The lane copies pair lane / 2's row (staged_rows.cuh).
  const int copy_pair = lane / 2;
  const RowCopier copier(src, d, e0, lane);
  // The sum reads the step's rows as a transposed A operand (transposed_read_at); the dots read
  // the columns 16 m .. 16 m + 15 of the step's 16 pairs as the A operand itself, four 8 x 8
  // matrices (pairs x columns) in the order (0-7 x 0-7), (8-15 x 0-7), (0-7 x 8-15),
  // (8-15 x 8-15): lane i gives pair i % 8 + 8 (i / 8 % 2) at unit 2m + i / 16.
  const int read_at = transposed_read_at(lane);
  const int dots_read_at = (lane % 8 + 8 * (lane / 8 % 2)) * kRowPitch + 16 * (lane / 16);
  const float* lane_coef = coef + 2 * t;  // C's pairs
  const int64_t* lane_ids = pair_ids + g;  // the dots' pairs

  // What this lane copies for the step from pair q: pair q + copy_pair's src row and coefficient
  // (where it is one of the warp's pairs). Loaded a step before the copies, and used only then,
  // so that the copies do not wait for the loads.
  struct CopyPair {
    uint32_t row = 0;
    uint32_t coef_bits = 0;
  };
  auto copy_pair_at = [&](int q) {
    CopyPair pair;
    if (q + copy_pair < last) {
      pair.row = static_cast<uint32_t>(rows[q + copy_pair]);
      pair.coef_bits = reinterpret_cast<const uint32_t*>(coef)[q + copy_pair];
    }
    return pair;
  };
  // Starts the copies of the pairs q .. end - 1 into stage (what this lane copies: copy_pair_at's)
  // and returns what the lane needs of them to sum them.
  auto issue = [&](int q, int end, CopyPair pair, int stage) {
    // A zero coefficient (+0 or -0) adds nothing; without the dots its row is not read.
    hold(pair.coef_bits);
    const bool copy = q + copy_pair < end && (kDots || (pair.coef_bits & 0x7fffffffu) != 0);
    copier.copy(shared + (warp * kStages + stage) * kStageBytes, pair.row, copy);
    StepPairs pairs;
    const int count = end - q;
    const float* step_coef = lane_coef + q;
#pragma unroll
    for (int h = 0; h < 4; ++h) {
      const int at = h % 2 + 8 * (h / 2);  // pair 2t + at
      const int ph = q + 2 * t + at;
      if (2 * t + at < count && own_begin <= ph && ph < own_end) {
        pairs.coef[h] = step_coef[at];
      }
    }
    if constexpr (kDots) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        if (g + 8 * r < count) {
          const int pr = q + g + 8 * r;
          pairs.id[r] = static_cast<int32_t>(lane_ids[q + 8 * r]);
          pairs.dot_at[r] = pr < even_begin || pr >= odd_end ? -1 : pr < odd_begin ? 0 : 1;
        }
      }
    }
    return pairs;
  };

  float acc[kMTiles][4] = {};  // D[16 columns x 8 latents] per 16 columns
  // The dots' B operand: latent first + g's columns 16 m + 2t, +1 and 16 m + 2t + 8, +9.
  uint32_t w[kDots ? kMTiles : 1][2] = {};
  if constexpr (kDots) {
    const int64_t i = first + g;
#pragma unroll
    for (int m = 0; m < kMTiles; ++m) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int64_t e = e0 + 16 * m + 8 * h + 2 * t;
        if (i < n && e < d) {
          w[m][h] = *reinterpret_cast<const uint32_t*>(weights + i * d + e);
        }
      }
    }
  }
  float* dots = kDots ? partial_dots + static_cast<int64_t>(blockIdx.y) * num_pairs : nullptr;

  // Sums the step staged in stage.
  auto sum_step = [&](const StepPairs& pairs, int stage) {
    // C[2t, 2t+1][g] and C[2t+8, 2t+9][g], each as hi + lo.
    uint32_t hi[2];
    uint32_t lo[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float c0 = pairs.coef[2 * r];
      const float c1 = pairs.coef[2 * r + 1];
      hi[r] = pack_bf16(c0, c1);
      lo[r] = pack_bf16(c0 - bits_to_float(hi[r] << 16),
                        c1 - bits_to_float(hi[r] & 0xffff0000u));
    }
    const bool with_lo = __any_sync(kFullMask, (lo[0] | lo[1]) != 0);
    const unsigned char* staged = shared + (warp * kStages + stage) * kStageBytes;
    float dot[4] = {};  // E[g][2t, 2t+1], E[g+8][2t, 2t+1]: pairs g, g + 8 at latents 2t, 2t+1
#pragma unroll
    for (int m = 0; m < kMTiles; ++m) {
      uint32_t a[4];
      ldmatrix_x4_trans(a, staged + read_at + 32 * m);
      mma_m16n8k16_bf16(acc[m], a, hi);
      if (with_lo) {
        mma_m16n8k16_bf16(acc[m], a, lo);
      }
      if constexpr (kDots) {
        uint32_t rows16[4];
        ldmatrix_x4(rows16, staged + dots_read_at + 32 * m);
        mma_m16n8k16_bf16(dot, rows16, w[m]);
      }
    }
    if constexpr (kDots) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        if (pairs.dot_at[r] >= 0) {
          dots[pairs.id[r]] = pairs.dot_at[r] == 0 ? dot[2 * r] : dot[2 * r + 1];
        }
      }
    }
  };

  int q = skip_long(bound[0]);
  int end = q < last ? step_end(q) : q;
  StepPairs pairs;
  if (q < last) {
    pairs = issue(q, end, copy_pair_at(q), 0);
  }
  cp_async_commit();
  int q_next = skip_long(end);  // the next step, whose copies copy_next holds
  CopyPair copy_next = copy_pair_at(q_next);
  for (int stage = 0; q < last; stage ^= 1) {  // the same for the whole warp
    int end_next = q_next;
    StepPairs next;
    if (q_next < last) {
      end_next = step_end(q_next);
      next = issue(q_next, end_next, copy_next, stage ^ 1);
    }
    const int q_after = skip_long(end_next);
    copy_next = copy_pair_at(q_after);
    cp_async_commit();
    cp_async_wait<1>();
    __syncwarp();  // every lane's copies of this step have landed
    sum_step(pairs, stage);
    __syncwarp();  // this step's rows are read before the next issue overwrites them
    pairs = next;
    q = q_next;
    end = end_next;
    q_next = q_after;
  }

  // Lane j < 8: latent first + j's coefficient sum, if this launch sums it.
  const int lane_end = __shfl_down_sync(kFullMask, lane_bound, 1);
  const bool lane_sums = lane < kWarpLatents && first + lane < n &&
                         lane_end - lane_bound <= kLongSegment;
  float total = 0;
  if (lane_sums && (coef_sum != nullptr || bias_partial != nullptr)) {
    for (int p = lane_bound; p < lane_end; ++p) {
      total += coef[p];
    }
    if (coef_sum != nullptr && blockIdx.y == 0) {
      coef_sum[first + lane] = __float2bfloat16_rn(total);
    }
  }
  cp_async_wait<0>();
  __syncthreads();  // every warp is done with its staged rows: the tile takes their place
  if (lane < kWarpLatents) {
    tile_total[warp * kWarpLatents + lane] = lane_sums ? total : 0.0f;
  }
  const int row0 = warp * kWarpLatents + 2 * t;  // D[.][2t, 2t+1]: this lane's two latents
#pragma unroll
  for (int m = 0; m < kMTiles; ++m) {
    const int col = 16 * m + g;
    if constexpr (kTransposed) {
      *reinterpret_cast<float2*>(&tile[col][row0]) = make_float2(acc[m][0], acc[m][1]);
      *reinterpret_cast<float2*>(&tile[col + 8][row0]) = make_float2(acc[m][2], acc[m][3]);
    } else {
      tile[row0][col] = acc[m][0];
      tile[row0 + 1][col] = acc[m][1];
      tile[row0][col + 8] = acc[m][2];
      tile[row0 + 1][col + 8] = acc[m][3];
    }
  }
  __syncthreads();

  if constexpr (kTransposed) {
    // Lane l stores latent i0 + l of the columns warp, warp + 4, ...: 32 latents of one column
    // of out [d, n] a warp.
    const int64_t lane_latent = i0 + lane;
    const bool lane_ours = lane_latent < n &&
                           offsets[lane_latent + 1] - offsets[lane_latent] <= kLongSegment;
    int64_t at = (e0 + warp) * n + lane_latent;
    for (int col = warp; col < kCols; col += kWarps, at += kWarps * n) {
      if (lane_ours && e0 + col < d) {
        out[at] = __float2bfloat16_rn(tile[col][lane]);
      }
    }
    if (bias_partial != nullptr) {
      bias_partial_sums(weights, tile_total, i0,
                        static_cast<int>(min64(kRowsSumLatentTile, n - i0)), n, d, e0, kCols,
                        bias_partial + static_cast<int64_t>(blockIdx.x) * d);
    }
  } else {
    // The warp's latents, a row each: lane l's 8 columns as one 16-byte store. Lane l reads
    // them from its own starting place g, so that the warp's reads hit 32 banks.
    const int64_t c = e0 + static_cast<int64_t>(lane) * 8;
#pragma unroll
    for (int j = 0; j < kWarpLatents; ++j) {
      const int64_t i = first + j;
      if (i < n && bound[j + 1] - bound[j] <= kLongSegment && c < d) {
        const float* row = tile[warp * kWarpLatents + j] + lane * 8;
        float values[8];
#pragma unroll
        for (int v = 0; v < 8; ++v) {
          values[v] = row[(v + g) % 8];
        }
        rotate_left(values, (8 - g) % 8);
        store_pack<__nv_bfloat16, 8>(out + i * d + c, values);
      }
    }
  }
#endif
}

}  // namespace

bool has_bf16_mma() {
  int device = 0;
  int major = 0;
  return cudaGetDevice(&device) == cudaSuccess &&
         cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) ==
             cudaSuccess &&
         major >= 8;
}

bool tensor_cores_allowed() {
  const char* setting = std::getenv("SPARSECODE_TENSOR_CORES");
  return has_bf16_mma() && setting != nullptr && std::strcmp(setting, "1") == 0;
}

template <bool kTransposed, bool kDots>
cudaError_t launch_latent_rows_sum_mma(dim3 grid, const int64_t* offsets, const int64_t* rows,
                                       const float* coef, const __nv_bfloat16* src, int64_t n,
                                       int64_t d, __nv_bfloat16* out, __nv_bfloat16* coef_sum,
                                       const __nv_bfloat16* weights, const int64_t* pair_ids,
                                       int64_t num_pairs, float* partial_dots,
                                       float* bias_partial, cudaStream_t stream) {
  const auto kernel = latent_rows_sum_mma_kernel<kTransposed, kDots>;
  // Over 48 KB of shared memory a block must be allowed, kernel by kernel (on the current
  // device: so at every launch).
  const cudaError_t allowed =
      cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel),
                           cudaFuncAttributeMaxDynamicSharedMemorySize, kSharedBytes);
  if (allowed != cudaSuccess) {
    return allowed;
  }
  SPARSECODE_LAUNCH_SHARED(kernel, grid, kWarps * kWarp, kSharedBytes, stream)(
      offsets, rows, coef, src, n, d, out, coef_sum, weights, pair_ids, num_pairs, partial_dots,
      bias_partial);
  return cudaGetLastError();
}

#define SPARSECODE_INSTANTIATE(TRANSPOSED, DOTS)                                                \
  template cudaError_t launch_latent_rows_sum_mma<TRANSPOSED, DOTS>(                          \
      dim3, const int64_t*, const int64_t*, const float*, const __nv_bfloat16*, int64_t,      \
      int64_t, __nv_bfloat16*, __nv_bfloat16*, const __nv_bfloat16*, const int64_t*, int64_t, \
      float*, float*, cudaStream_t);
SPARSECODE_INSTANTIATE(false, false)
SPARSECODE_INSTANTIATE(true, false)
SPARSECODE_INSTANTIATE(false, true)
#undef SPARSECODE_INSTANTIATE

}  // namespace sparsecode::cuda
