// Segmented sum of rows by latent: every weight gradient of the sparse backward; fused with
// the pairs' dot products where the backward needs those too.
//
//   out[i] = sum over the pairs q of latent i, in ascending order, of coef[q] * src[rows[q]]
//   dots (latent_rows_sum_dots): partial[t, pair_ids[q]] = src[rows[q]] . weights[i] over
//            column tile t, for every pair q of latent i
//
// offsets [n + 1], rows / coef [P] (the B*k pairs sorted by latent, stable, so each latent's
// pairs keep their order), src [*, d] -> out [n, d], or [d, n] (transposed, the W_enc layout),
// plus optionally coef_sum[i] = sum of coef over latent i's pairs (grad_b_enc).
//   grad_W_dec (decode):   coef = values,     src = grad_out  [B, d],     rows = b
//   grad_W_enc (encode):   coef = grad_pre,   src = x - b_dec [B, d],     rows = b, transposed;
//                          with bias_weights = W_enc also the partial sums of W_enc @ grad_b_enc
//                          (the encode's grad_b_dec, negated), a thread per column reading
//                          its 32 latents' segment of W_enc's row: one read of W_enc inside
//                          this pass instead of a separate matrix-vector product (0.1 ms of
//                          memory traffic at the size below)
//   grad_W_dec (nested):   coef = -values,    src = S         [G * B, d], rows = g * B + b
//   with dots, weights = W_dec: the decode's grad_values, and the Triton nested loss's
//   grad_W_dec and grad_values (src = S [G * B, d] in x's dtype, rows = g * B + b).
// No atomics: each output element is summed by one lane in a fixed order, so the result is
// bit-identical run to run, and latents without pairs get zero rows. Pairs whose coefficient
// is zero are skipped, as on the CPU (accumulate_by_latent).
//
// Strategy: a block owns kLatentTile = 32 consecutive latents x 32 * V columns, where V is the
// number of elements in 16 bytes of src (8 bf16 / fp16, 4 fp32, 2 fp64) when src rows are 16-byte
// aligned (else V = 1); each of its 8 warps sums 4 consecutive latents, whose pairs are consecutive
// too, a lane holding V consecutive columns that it reads with one vector load per pair. A warp
// reads its latents' 5 offsets in one load, then 32 pairs' (row, coef) at a time, one per lane, and
// broadcasts them with shuffles; the next latent's first 32 pairs are loaded while a latent is
// summed. It issues the loads of kUnroll pairs before adding any of them, so that several L2 reads
// are in flight per lane while the sum keeps its ascending pair order. A pair's row is addressed in
// 32 bits (row index times row bytes, one wide multiply-add: src under 2^32 rows of under 2^32
// bytes), and bfloat16 words are widened with one integer instruction an element: per pair and
// lane, the bf16 sum loop takes 35 instructions (sm_90 SASS) and the one with the dots 48, against
// 58 and 88 with 64-bit rows, their broadcast in two shuffles and each bf16 moved into a register
// of its own before its conversion. Non-transposed results go straight from registers to out, one
// vector store per lane; transposed ones go through a [32][32 V + 1] shared tile (each lane writing
// its V values from its own starting place, so that no two lanes of a store share a bank: with
// 8-way conflicts these stores alone came to about 0.17 ms of shared-memory cycles at the size
// below), then each lane stores 16 bytes of consecutive latents of one column of out
// (store_transposed: 8 bfloat16 latents, 4 lanes a column, about 3.5 sm_90 instructions an
// element against 14 when a lane stored one latent's 2 bytes, and 44 before that, when each
// element looked up its latent's offsets again). Blocks are numbered latent-tile fastest, so the
// blocks in flight share one column tile and read only a B x 32 V (or G*B x 32 V) slab of src, a
// few MB that stays in L2.
//
// Cost at B = 8192, d = 2304, n = 65536, k = 64 (s = bytes per element: 2 bf16, 4 fp32):
// 2 B k d = 2.4 GFLOP. DRAM floor: src once (B d s = 38 MB bf16; the nested S is fp32,
// G B d 4 = 453 MB at G = 6), out once (n d s = 302 MB bf16), pairs B k 16 (8 MB) and
// offsets: 0.35 GB bf16 decode / encode: 0.12 ms at 3 TB/s (0.7 GB fp32: 0.23 ms); 0.77 GB
// for the nested grad_W_dec: 0.26 ms. The B k d src reads (2.4 GB bf16, 4.8 GB for the fp32 S)
// are served by L2. On an H100 (bf16) a call took 0.53 ms, 0.80 ms transposed and 0.79 ms with
// the dots (Nsight Compute, before the 32-bit rows and the one-instruction widening), bound by
// instruction issue (the ALU pipe the busiest); with 2-byte loads one pair at a time, 1.10 and
// 1.35 ms (about 2.2 TB/s of L2 reads: latency-bound).
// A latent with more than kLongSegment = 256 pairs (a dense latent, active in many rows) is
// summed by a second launch in which all 8 warps of a block share its pairs: a latent active in
// every row of the batch costs about B / 32 sequential steps of 4 pairs, not the B / 4 of one
// warp, which held its whole block until done. Random codes have no such latents (each block
// of the second launch then exits after one look at its tile's offsets); a trained SAE's codes
// have a few.
// The dots add, per pair, V multiply-adds per lane with the latent's weights (read once per
// latent and column tile: n d s, 302 MB bf16), 1.5 shuffles and one 4-byte store per column
// tile ([tiles, P] fp32, 19 MB bf16), in place of a second gather of the same B k d elements
// (the Triton grad_values kernel took 0.55 ms on an H100, the sum 0.49 ms).
// With SPARSECODE_TENSOR_CORES=1, for bfloat16 src and out with d a multiple of 8, on sm_80 and
// later, the first launch is latent_rows_sum_mma.cu's tensor-core kernel instead (off by
// default: slower on an H200); these loops serve every other case, and every type's long
// latents.
#include <type_traits>

#include "latent_rows_sum.cuh"

namespace sparsecode::cuda {
namespace {

constexpr int kLatentTile = static_cast<int>(kRowsSumLatentTile);
constexpr int kSegWarps = 8;
constexpr int kWarpLatents = kLatentTile / kSegWarps;  // consecutive latents a warp sums
constexpr int kUnroll = 4;  // pairs in flight per lane: one warp_dots4

// Up to 32 consecutive pairs of the sorted list, one per lane (zero past the end): the src row
// of each (below 2^32), its coefficient and, for the dots, its flat pair id (below 2^31).
template <typename A>
struct PairChunk {
  uint32_t row = 0;
  A coef = 0;
  int32_t id = 0;
};

template <bool kDots, typename A>
__device__ __forceinline__ PairChunk<A> load_chunk(int64_t q0, int64_t end,
                                                   const int64_t* __restrict__ rows,
                                                   const A* __restrict__ coef,
                                                   const int64_t* __restrict__ pair_ids,
                                                   int lane) {
  PairChunk<A> chunk;
  if (q0 + lane < end) {
    chunk.row = static_cast<uint32_t>(rows[q0 + lane]);
    chunk.coef = coef[q0 + lane];
    if constexpr (kDots) {
      chunk.id = static_cast<int32_t>(pair_ids[q0 + lane]);
    }
  }
  return chunk;
}

// Adds the pairs begin..end-1 of one latent, in order, to acc (the lane's V columns of their
// coef * src rows) and total (their coefs); chunk holds the pairs from begin on, loaded ahead
// by the caller. A pair's row r is read at lane_src + r * row_bytes (lane_src: the lane's
// columns of src row 0). With kDots also writes each pair's dot with weight (the lane's V
// columns of the latent's weights row) to dots[pair id]; active is false in the lanes past
// d, whose share of the dots is zero. Every lane of the warp calls it.
template <typename Src, bool kDots, int V, typename A>
__device__ __forceinline__ void sum_pairs(int64_t begin, int64_t end, PairChunk<A> chunk,
                                          const int64_t* __restrict__ rows,
                                          const A* __restrict__ coef,
                                          const int64_t* __restrict__ pair_ids,
                                          const char* lane_src, uint32_t row_bytes, bool active,
                                          const A (&weight)[V], A* __restrict__ dots, int lane,
                                          A (&acc)[V], A& total) {
  for (int64_t q0 = begin; q0 < end; q0 += kWarp) {
    if (q0 != begin) {
      chunk = load_chunk<kDots>(q0, end, rows, coef, pair_ids, lane);
    }
    const int count = static_cast<int>(min64(kWarp, end - q0));
    // u0 + u < 32: the lanes from count on hold coefficient 0 and row 0.
    for (int u0 = 0; u0 < count; u0 += kUnroll) {
      A cs[kUnroll];
      Raw<Src, V> w[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const uint32_t r = __shfl_sync(kFullMask, chunk.row, u0 + u);
        cs[u] = __shfl_sync(kFullMask, chunk.coef, u0 + u);
        // A zero coefficient adds nothing and its row is not read (the same for the whole
        // warp): BatchTopK codes carry many. The dots need every pair's row.
        if (kDots || cs[u] != A(0)) {
          w[u] = *reinterpret_cast<const Raw<Src, V>*>(lane_src +
                                                       static_cast<uint64_t>(r) * row_bytes);
        }
      }
      A part[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        A x[V];
        if constexpr (kDots) {
          widen<Src, V>(w[u], x);
          part[u] = 0;
#pragma unroll
          for (int v = 0; v < V; ++v) {
            part[u] += x[v] * weight[v];
          }
          part[u] = active ? part[u] : A(0);
        }
        if (cs[u] != A(0)) {
          if constexpr (!kDots) {
            widen<Src, V>(w[u], x);
          }
#pragma unroll
          for (int v = 0; v < V; ++v) {
            acc[v] += cs[u] * x[v];
          }
          total += cs[u];
        }
      }
      if constexpr (kDots) {
        const A dot = warp_dots4(part, lane);
        const int u = kept_pair(lane);
        const int32_t id = __shfl_sync(kFullMask, chunk.id, u0 + u);
        if (lane % 8 == 0 && u0 + u < count) {
          dots[id] = dot;
        }
      }
    }
  }
}

// The transposed store of a block's sums, after a barrier: out[e0 + col, i0 + t] = tile[t][col]
// (out [d, n]) for every latent t of the tile that this pass sums (bit t of ours) and every
// column below d. A lane stores kVec consecutive latents of one column, 16 bytes of Out (8
// bfloat16), a warp kWarp / (kLatentTile / kVec) columns at once: one evict-first vector store
// (store_pack) where the pass sums all kVec of them and out's rows keep 16-byte alignment, else
// an element at a time. The lanes of one read, tile[q * kVec + j][col0 + c] for every q and c,
// fall in the banks (q * kVec + c + j + col0) % 32 (rows of kCols + 1 words, kCols a multiple of
// 32): all different. In the bfloat16 sm_90 SASS a lane's 8 elements take 27 instructions (8
// shared loads, 4 conversions of two, the store and the address), against about 14 an element
// when each lane stored one 2-byte element of 32 consecutive latents a warp.
template <typename Out, int kCols, typename A>
__device__ __forceinline__ void store_transposed(const A (&tile)[kLatentTile][kCols + 1],
                                                 uint32_t ours, int64_t i0, int64_t e0,
                                                 int64_t n, int64_t d, int warp, int lane,
                                                 Out* __restrict__ out) {
  constexpr int kVec = static_cast<int>(16 / sizeof(Out));
  static_assert(kVec <= kLatentTile && kLatentTile % kVec == 0, "a lane's latents");
  constexpr int kLanesPerCol = kLatentTile / kVec;
  constexpr int kColsAtOnce = kWarp / kLanesPerCol;
  constexpr uint32_t kMine = (uint32_t(1) << kVec) - 1;  // kVec < 32
  const int first = lane % kLanesPerCol * kVec;          // the lane's first latent of the tile
  const bool vector = n % kVec == 0 && reinterpret_cast<uintptr_t>(out) % 16 == 0 &&
                      ((ours >> first) & kMine) == kMine;
#pragma unroll
  for (int col = warp * kColsAtOnce + lane / kLanesPerCol; col < kCols;
       col += kSegWarps * kColsAtOnce) {
    if (e0 + col >= d) {
      break;  // and every later column
    }
    Out* dst = out + (e0 + col) * n + i0 + first;
    if (vector) {
      A values[kVec];
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        values[j] = tile[first + j][col];
      }
      store_pack<Out, kVec>(dst, values);
    } else {
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        if ((ours >> (first + j)) & 1) {
          dst[j] = from_acc<Out>(tile[first + j][col]);
        }
      }
    }
  }
}

// kDots: also partial_dots[blockIdx.y * num_pairs + pair_ids[q]] = src[rows[q]] . weights[i]
// over the block's columns, for every pair q of latent i (zero coefficients included).
// At most 64 registers, so that 4 blocks (32 warps) fit on an SM: the pair loads are L2
// latency-bound.
// Each call launches the kernel twice. kLongPass false: each warp sums whole latents of its
// block's tile, those with at most kLongSegment pairs. kLongPass true: the latents with more
// (dense latents, active in many rows; usually none) are summed by all 8 warps of the block,
// each taking an eighth of the pairs in order, and the 8 sums are added in warp order: still a
// fixed order, in about an eighth of the time that one warp would take.
template <typename Src, typename Out, bool kTransposed, bool kDots, bool kLongPass, int V>
__global__ void __launch_bounds__(kSegWarps * kWarp, 4)
    latent_rows_sum_kernel(const int64_t* __restrict__ offsets, const int64_t* __restrict__ rows,
                           const Acc<Out>* __restrict__ coef, const Src* __restrict__ src,
                           int64_t n, int64_t d, Out* __restrict__ out,
                           Out* __restrict__ coef_sum, const Src* __restrict__ weights,
                           const int64_t* __restrict__ pair_ids, int64_t num_pairs,
                           Acc<Out>* __restrict__ partial_dots,
                           Acc<Out>* __restrict__ bias_partial) {
  using A = Acc<Out>;
  constexpr int kCols = kWarp * V;  // columns per block
  __shared__ A tile[kTransposed ? kLatentTile : 1][kCols + 1];
  // Transposed: each latent's coef sum in this pass (zero for the latents it does not sum).
  __shared__ A tile_total[kTransposed ? kLatentTile : 1];
  // A long latent's sums over each warp's share of its pairs.
  __shared__ A split[kLongPass ? kSegWarps : 1][kLongPass ? kCols : 1];
  __shared__ A split_total[kSegWarps];
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * kLatentTile;
  const int64_t e0 = static_cast<int64_t>(blockIdx.y) * kCols;
  const int64_t c = e0 + static_cast<int64_t>(lane) * V;  // this lane's first column
  // With V > 1, d is a multiple of V, so a lane's V columns are all inside or all outside.
  // Lanes past d read (and drop) columns 0..V-1 instead: every pair's load is then in bounds.
  const bool active = c < d;
  const char* lane_src = reinterpret_cast<const char*>(src + (active ? c : 0));
  const auto row_bytes = static_cast<uint32_t>(d * static_cast<int64_t>(sizeof(Src)));
  A* dots = kDots ? partial_dots + static_cast<int64_t>(blockIdx.y) * num_pairs : nullptr;
  // Whether this pass sums a latent of `length` pairs.
  auto ours = [](int64_t length) { return (length > kLongSegment) == kLongPass; };
  // Whether lane's latent, i0 + lane, is ours: the transposed store reads it at the end.
  const int64_t lane_latent = i0 + lane;
  const bool lane_ours =
      lane_latent < n && ours(offsets[lane_latent + 1] - offsets[lane_latent]);

  // The lane's V columns of latent i's weights row (zero without kDots and past d).
  auto load_weight = [&](int64_t i, A (&weight)[V]) {
    if constexpr (kDots) {
      if (active) {
        widen<Src, V>(*reinterpret_cast<const Raw<Src, V>*>(weights + i * d + c), weight);
      }
    }
  };
  // Latent t of the tile is summed: its row of out (through the shared tile when transposed)
  // and its coef_sum.
  auto finish = [&](int t, A (&acc)[V], A total) {
    const int64_t i = i0 + t;
    if constexpr (kTransposed) {
      // Written in the same order by every lane, the v-th stores of lanes 32 / V apart would
      // fall in one bank (8-way conflicts for bf16); each lane starts at its own place instead,
      // r = lane * V / 32, which spreads every store of the warp over the 32 banks.
      const int r = lane * V / kWarp;
      rotate_left(acc, r);
#pragma unroll
      for (int v = 0; v < V; ++v) {
        tile[t][lane * V + (v + r) % V] = acc[v];
      }
      if (lane == 0) {
        tile_total[t] = total;
      }
    } else if (active) {
      store_pack<Out, V>(out + i * d + c, acc);
    }
    if (coef_sum != nullptr && blockIdx.y == 0 && lane == 0) {
      coef_sum[i] = from_acc<Out>(total);
    }
  };

  if constexpr (!kLongPass) {
    if (kTransposed && bias_partial != nullptr) {
      prefetch_bias_weights(weights, i0, n, d, e0, kCols);
    }
    // The warp's latents first .. first + kWarpLatents - 1 own consecutive pairs: latent
    // first + j those from bound(j) to bound(j + 1), with the offsets read in one load.
    const int64_t first = i0 + warp * kWarpLatents;
    const int64_t lane_bound = lane <= kWarpLatents ? offsets[min64(first + lane, n)] : 0;
    auto bound = [&](int j) { return __shfl_sync(kFullMask, lane_bound, j); };
    int64_t begin = bound(0);
    PairChunk<A> next = load_chunk<kDots>(begin, bound(1), rows, coef, pair_ids, lane);
    for (int j = 0; j < kWarpLatents; ++j) {
      const int64_t i = first + j;
      const int64_t end = bound(j + 1);
      const PairChunk<A> chunk = next;
      if (j + 1 < kWarpLatents) {
        // The next latent's first pairs, loaded while this one is summed.
        next = load_chunk<kDots>(end, bound(j + 2), rows, coef, pair_ids, lane);
      }
      const int t = warp * kWarpLatents + j;
      if (i < n && ours(end - begin)) {
        A acc[V] = {};
        A total = 0;
        A weight[V] = {};
        load_weight(i, weight);
        sum_pairs<Src, kDots>(begin, end, chunk, rows, coef, pair_ids, lane_src, row_bytes,
                              active, weight, dots, lane, acc, total);
        finish(t, acc, total);
      } else if (kTransposed && lane == 0) {
        tile_total[t] = 0;
      }
      begin = end;
    }
  } else {
    // Most tiles have no dense latent: one look at the tile's offsets, and the block is done.
    // (Without it, this launch cost 0.17 ms on an H100 with no dense latent to sum: each of the
    // grid's 18 k blocks read its 32 latents' offsets one after another.)
    if (__ballot_sync(kFullMask, lane_ours) == 0) {
      return;  // the same in every warp of the block
    }
    for (int t = 0; t < kLatentTile && i0 + t < n; ++t) {  // the same for the whole block
      const int64_t i = i0 + t;
      const int64_t begin = offsets[i];
      const int64_t length = offsets[i + 1] - begin;
      if (!ours(length)) {
        if (kTransposed && threadIdx.x == 0) {
          tile_total[t] = 0;
        }
        continue;
      }
      A acc[V] = {};
      A total = 0;
      A weight[V] = {};
      load_weight(i, weight);
      const int64_t b = begin + length * warp / kSegWarps;
      const int64_t e = begin + length * (warp + 1) / kSegWarps;
      sum_pairs<Src, kDots>(b, e, load_chunk<kDots>(b, e, rows, coef, pair_ids, lane), rows,
                            coef, pair_ids, lane_src, row_bytes, active, weight, dots, lane,
                            acc, total);
#pragma unroll
      for (int v = 0; v < V; ++v) {
        split[warp][lane * V + v] = acc[v];
      }
      if (lane == 0) {
        split_total[warp] = total;
      }
      __syncthreads();
      if (warp == t % kSegWarps) {
#pragma unroll
        for (int v = 0; v < V; ++v) {
          acc[v] = 0;
        }
        total = 0;
        for (int w = 0; w < kSegWarps; ++w) {
#pragma unroll
          for (int v = 0; v < V; ++v) {
            acc[v] += split[w][lane * V + v];
          }
          total += split_total[w];
        }
        finish(t, acc, total);
      }
      __syncthreads();  // split is free again
    }
  }
  if constexpr (kTransposed) {
    __syncthreads();
    store_transposed<Out, kCols>(tile, __ballot_sync(kFullMask, lane_ours), i0, e0, n, d, warp,
                                 lane, out);
    if (bias_partial != nullptr) {
      bias_partial_sums(weights, tile_total, i0, static_cast<int>(min64(kLatentTile, n - i0)),
                        n, d, e0, kCols,
                        bias_partial + (kLongPass * rows_sum_latent_tiles(n) + blockIdx.x) * d);
    }
  }
}

// Whether a row of d elements of `bytes` each is under 2^32 bytes (a pair's row is addressed
// in 32 bits).
bool rows_addressable(int64_t d, int64_t bytes) { return d * bytes < (int64_t(1) << 32); }

// The grid: latent tiles x column tiles (at least one, so that coef_sum is written even when
// d = 0); false when it is too large for CUDA.
bool segment_grid(int64_t n, int64_t d, int V, dim3* grid) {
  const int64_t latent_tiles = rows_sum_latent_tiles(n);
  const int64_t col_tiles = d > 0 ? (d + kWarp * V - 1) / (kWarp * V) : 1;
  if (!grid_fits(latent_tiles, col_tiles)) {
    return false;
  }
  *grid = dim3(static_cast<unsigned>(latent_tiles), static_cast<unsigned>(col_tiles));
  return true;
}

// Whether the first launch runs on the tensor cores (latent_rows_sum_mma.cu): bfloat16 rows
// read 16 bytes a lane, on sm_80 or later, with SPARSECODE_TENSOR_CORES=1.
template <typename Src, typename Out, int V>
bool use_mma() {
  return std::is_same_v<Src, __nv_bfloat16> && std::is_same_v<Out, __nv_bfloat16> && V == 8 &&
         tensor_cores_allowed();
}

template <typename Src, typename Out, int V>
cudaError_t launch_latent_rows_sum(const int64_t* offsets, const int64_t* rows,
                                   const Acc<Out>* coef, const Src* src, int64_t n, int64_t d,
                                   bool transposed, Out* out, Out* coef_sum,
                                   const Src* bias_weights, Acc<Out>* bias_partial,
                                   cudaStream_t stream) {
  dim3 grid;
  if (n == 0) {
    return cudaSuccess;
  }
  if (!rows_addressable(d, sizeof(Src)) || !segment_grid(n, d, V, &grid)) {
    return cudaErrorInvalidConfiguration;
  }
  Acc<Out>* bias = transposed ? bias_partial : nullptr;
  if (use_mma<Src, Out, V>()) {
    if constexpr (std::is_same_v<Src, __nv_bfloat16> && std::is_same_v<Out, __nv_bfloat16>) {
      const auto launch = transposed ? launch_latent_rows_sum_mma<true, false>
                                     : launch_latent_rows_sum_mma<false, false>;
      const cudaError_t launched = launch(grid, offsets, rows, coef, src, n, d, out, coef_sum,
                                          bias_weights, nullptr, 0, nullptr, bias, stream);
      if (launched != cudaSuccess) {
        return launched;
      }
    }
  } else {
    const auto kernel = transposed ? latent_rows_sum_kernel<Src, Out, true, false, false, V>
                                   : latent_rows_sum_kernel<Src, Out, false, false, false, V>;
    SPARSECODE_LAUNCH(kernel, grid, kSegWarps * kWarp, stream)(
        offsets, rows, coef, src, n, d, out, coef_sum, bias_weights, nullptr, 0, nullptr, bias);
  }
  const auto long_kernel = transposed ? latent_rows_sum_kernel<Src, Out, true, false, true, V>
                                      : latent_rows_sum_kernel<Src, Out, false, false, true, V>;
  SPARSECODE_LAUNCH(long_kernel, grid, kSegWarps * kWarp, stream)(
      offsets, rows, coef, src, n, d, out, coef_sum, bias_weights, nullptr, 0, nullptr, bias);
  return cudaGetLastError();
}

template <typename T, int V>
cudaError_t launch_latent_rows_sum_dots(const int64_t* offsets, const int64_t* rows,
                                        const int64_t* pair_ids, const Acc<T>* coef,
                                        const T* src, const T* weights, int64_t n, int64_t d,
                                        int64_t num_pairs, T* out, Acc<T>* partial_dots,
                                        cudaStream_t stream) {
  dim3 grid;
  if (n == 0 || d == 0) {
    return cudaSuccess;
  }
  if (!rows_addressable(d, sizeof(T)) || num_pairs >= (int64_t(1) << 31) ||
      !segment_grid(n, d, V, &grid)) {
    return cudaErrorInvalidConfiguration;
  }
  if (use_mma<T, T, V>()) {
    if constexpr (std::is_same_v<T, __nv_bfloat16>) {
      const cudaError_t launched = launch_latent_rows_sum_mma<false, true>(
          grid, offsets, rows, coef, src, n, d, out, nullptr, weights, pair_ids, num_pairs,
          partial_dots, nullptr, stream);
      if (launched != cudaSuccess) {
        return launched;
      }
    }
  } else {
    const auto kernel = latent_rows_sum_kernel<T, T, false, true, false, V>;
    SPARSECODE_LAUNCH(kernel, grid, kSegWarps * kWarp, stream)(
        offsets, rows, coef, src, n, d, out, nullptr, weights, pair_ids, num_pairs, partial_dots,
        nullptr);
  }
  const auto long_kernel = latent_rows_sum_kernel<T, T, false, true, true, V>;
  SPARSECODE_LAUNCH(long_kernel, grid, kSegWarps * kWarp, stream)(
      offsets, rows, coef, src, n, d, out, nullptr, weights, pair_ids, num_pairs, partial_dots,
      nullptr);
  return cudaGetLastError();
}

}  // namespace

template <typename Src, typename Out>
cudaError_t latent_rows_sum(const int64_t* offsets, const int64_t* rows, const Acc<Out>* coef,
                            const Src* src, int64_t n, int64_t d, bool transposed, Out* out,
                            Out* coef_sum, const Src* bias_weights, Acc<Out>* bias_partial,
                            cudaStream_t stream) {
  if (rows_sum_vector_width(d, sizeof(Src), {src, out}) > 1) {
    return launch_latent_rows_sum<Src, Out, 16 / sizeof(Src)>(
        offsets, rows, coef, src, n, d, transposed, out, coef_sum, bias_weights, bias_partial,
        stream);
  }
  return launch_latent_rows_sum<Src, Out, 1>(offsets, rows, coef, src, n, d, transposed, out,
                                             coef_sum, bias_weights, bias_partial, stream);
}

template <typename T>
cudaError_t latent_rows_sum_dots(const int64_t* offsets, const int64_t* rows,
                                 const int64_t* pair_ids, const Acc<T>* coef, const T* src,
                                 const T* weights, int64_t n, int64_t d, int64_t num_pairs,
                                 T* out, Acc<T>* partial_dots, cudaStream_t stream) {
  if (rows_sum_vector_width(d, sizeof(T), {src, weights, out}) > 1) {
    return launch_latent_rows_sum_dots<T, 16 / sizeof(T)>(offsets, rows, pair_ids, coef, src,
                                                          weights, n, d, num_pairs, out,
                                                          partial_dots, stream);
  }
  return launch_latent_rows_sum_dots<T, 1>(offsets, rows, pair_ids, coef, src, weights, n, d,
                                           num_pairs, out, partial_dots, stream);
}

// src in the storage type, and in float for float16 out (the nested loss's float32 S).
#define SPARSECODE_INSTANTIATE(Src, Out)                                                   \
  template cudaError_t latent_rows_sum<Src, Out>(const int64_t*, const int64_t*,          \
                                                 const Acc<Out>*, const Src*, int64_t,    \
                                                 int64_t, bool, Out*, Out*, const Src*,   \
                                                 Acc<Out>*, cudaStream_t);
SPARSECODE_INSTANTIATE(float, float)
SPARSECODE_INSTANTIATE(double, double)
SPARSECODE_INSTANTIATE(__half, __half)
SPARSECODE_INSTANTIATE(float, __half)
SPARSECODE_INSTANTIATE(__nv_bfloat16, __nv_bfloat16)
#undef SPARSECODE_INSTANTIATE

#define SPARSECODE_INSTANTIATE(T)                                                          \
  template cudaError_t latent_rows_sum_dots<T>(const int64_t*, const int64_t*,            \
                                               const int64_t*, const Acc<T>*, const T*,   \
                                               const T*, int64_t, int64_t, int64_t, T*,   \
                                               Acc<T>*, cudaStream_t);
SPARSECODE_FOR_EACH_TYPE(SPARSECODE_INSTANTIATE)
#undef SPARSECODE_INSTANTIATE

}  // namespace sparsecode::cuda
