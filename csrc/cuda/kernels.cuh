// Launchers of the CUDA kernels in csrc/cuda/*.cu, called by the torch glue in ops_cuda.cpp.
//
// A plain header: the CUDA runtime and its half types only, no torch, so that CI compiles every
// kernel with nvcc alone (tests/test_cuda_compile.py). Launchers take raw device pointers
// (contiguous, row-major), sizes and the stream to run on, launch, and return the launch's
// cudaGetLastError() for the caller to check; a problem with a zero size launches nothing.
//
// T is the storage type of one op's tensors: float, double, __half or __nv_bfloat16.
// Arithmetic is in Acc<T>: float, or double for double.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <initializer_list>

namespace sparsecode::cuda {

template <typename T>
struct AccTypeOf {
  using type = float;
};
template <>
struct AccTypeOf<double> {
  using type = double;
};
template <typename T>
using Acc = typename AccTypeOf<T>::type;

// The row-walking kernels give each block one row and kColTile consecutive columns of d.
// Reductions over d (dot products, squared norms) come out as one partial per column tile,
// [num_col_tiles(d), ...], which the caller sums over the first dimension.
constexpr int64_t kColTile = 128;
inline int64_t num_col_tiles(int64_t d) { return (d + kColTile - 1) / kColTile; }

// Prefix sizes of the nested loss, passed by value to the kernels.
constexpr int kMaxGroups = 16;
struct PrefixSizes {
  int64_t m[kMaxGroups];
  int count;
};

// out[b, e] = bias[e] + sum_j coef[b, j] * rows[indices[b, j], e]   (gather_rows.cu)
// coef, indices [B, k]; rows [*, d]; bias [d] or null (zero); out [B, d]. Slots are summed in
// order j = 0..k-1; with skip_zero a slot whose coef is zero is skipped (its row is not read).
template <typename T>
cudaError_t gather_rows_sum(const Acc<T>* coef, const int64_t* indices, const T* rows,
                            const T* bias, int64_t B, int64_t k, int64_t d, bool skip_zero,
                            T* out, cudaStream_t stream);

// out [cols, rows] = in [rows, cols] transposed.   (gather_rows.cu)
template <typename T>
cudaError_t transpose(const T* in, int64_t rows, int64_t cols, T* out, cudaStream_t stream);

// Segmented sum of rows by latent (latent_rows_sum.cu). The pairs are sorted by latent:
// latent i owns positions offsets[i]..offsets[i+1]-1 of rows/coef (offsets [n + 1]).
//   out[i] = sum over q of latent i, ascending, of coef[q] * src[rows[q]]     (zero if none)
// written as out [n, d], or as out [d, n] when transposed. coef_sum (optional, [n]) receives
// the sum of coef over each latent's positions. Rows are below 2^32, a row of src is under
// 2^32 bytes (else cudaErrorInvalidConfiguration for the row bytes; the caller checks rows) and
// there are fewer than 2^31 positions (the caller checks).
// Transposed, with bias_weights [d, n] (optional, laid out as out: the encode's W_enc), also
//   bias_partial[p, t, e] = sum over the latents i of tile t (kRowsSumLatentTile of them) that
//                           pass p sums of bias_weights[e, i] * (sum of coef over i's positions)
// in the accumulation type, bias_partial [2, rows_sum_latent_tiles(n), d]: pass 0 sums the
// latents of at most 256 positions, pass 1 the longer ones, and writes only the tiles that have
// one, so the caller zeroes bias_partial[1] first. Its sum over the first two dimensions is
// bias_weights @ coef_sum in float32: the encode's grad_b_dec is its negation.
template <typename Src, typename Out>
cudaError_t latent_rows_sum(const int64_t* offsets, const int64_t* rows, const Acc<Out>* coef,
                            const Src* src, int64_t n, int64_t d, bool transposed, Out* out,
                            Out* coef_sum, const Src* bias_weights, Acc<Out>* bias_partial,
                            cudaStream_t stream);

// Latents per block of the per-latent sums, and the latent tiles of n latents.
constexpr int64_t kRowsSumLatentTile = 32;
__host__ __device__ inline int64_t rows_sum_latent_tiles(int64_t n) {
  return (n + kRowsSumLatentTile - 1) / kRowsSumLatentTile;
}

// The vector width of the latent sums, whose lanes read elements of element_bytes: the elements
// in 16 bytes when every one of `pointers` is 16-byte aligned and d is a multiple of that,
// else 1. A block covers 32 * width columns.
inline int rows_sum_vector_width(int64_t d, int64_t element_bytes,
                                 std::initializer_list<const void*> pointers) {
  const int64_t vec = 16 / element_bytes;
  bool aligned = d % vec == 0;
  for (const void* p : pointers) {
    aligned = aligned && reinterpret_cast<uintptr_t>(p) % 16 == 0;
  }
  return aligned ? static_cast<int>(vec) : 1;
}

// The column tiles of latent_rows_sum_dots's partial_dots: [rows_sum_dot_tiles(...), P].
template <typename T>
inline int64_t rows_sum_dot_tiles(const T* src, const T* weights, const T* out, int64_t d) {
  const int64_t cols = 32 * rows_sum_vector_width(d, sizeof(T), {src, weights, out});
  return (d + cols - 1) / cols;
}

// latent_rows_sum (not transposed, without coef_sum) fused with the dot products that the
// same pairs need: with P pairs, pair_ids [P] the flat id of each sorted pair and weights
// [n, d], also
//   partial_dots[t, pair_ids[q]] = sum over the columns e of tile t of
//                                  src[rows[q], e] * weights[i, e]   (q a pair of latent i)
// for every pair, zero coefficients included (num_pairs below 2^31, the limits of
// latent_rows_sum besides). One read of each pair's src row serves both sums of the decode
// backward (src = grad_out, weights = W_dec: grad_W_dec and grad_values).
template <typename T>
cudaError_t latent_rows_sum_dots(const int64_t* offsets, const int64_t* rows,
                                 const int64_t* pair_ids, const Acc<T>* coef, const T* src,
                                 const T* weights, int64_t n, int64_t d, int64_t num_pairs,
                                 T* out, Acc<T>* partial_dots, cudaStream_t stream);

// The running top k of the cuda backend's encode (topk_select.cu). keep_key / keep_id
// [B, 32 S] (S = topk_slots_per_lane(k)) hold each row's kept slots: an order key of the value
// (0: empty) and its column. Start them with keys 0 and ids INT32_MAX - slot; then, per column
// chunk pre [B, w] (columns c0 .. c0 + w - 1, in ascending chunks), topk_fold keeps the k best of
// the slots and the chunk (the larger value, the lower column among equals, NaN above every
// number); topk_finish writes values [B, k] = relu of the kept values and indices [B, k] (int64),
// ascending per row. Needs 1 <= k <= kMaxTopk and columns below kMaxTopkColumns (else
// cudaErrorInvalidValue / cudaErrorInvalidConfiguration).
constexpr int kMaxTopk = 256;
constexpr int64_t kMaxTopkColumns = 2147483647 - kMaxTopk;
__host__ __device__ inline int topk_slots_per_lane(int64_t k) {
  return k < 1 || k > kMaxTopk ? 0 : k <= 32 ? 1 : k <= 64 ? 2 : k <= 128 ? 4 : 8;
}
template <typename T>
cudaError_t topk_fold(const T* pre, int64_t B, int64_t w, int64_t c0, int k, uint32_t* keep_key,
                      int32_t* keep_id, cudaStream_t stream);
template <typename T>
cudaError_t topk_finish(const uint32_t* keep_key, const int32_t* keep_id, int64_t B, int k,
                        T* values, int64_t* indices, cudaStream_t stream);

// One slot of a row in the nested loss's walk order: its latent (d_sae < 2^31), its prefix
// group, its place j in the row, and its value in the accumulation type. 16 bytes (24 for
// double), so that a lane reads it with one vector load.
template <typename T>
struct alignas(sizeof(Acc<T>) == 4 ? 16 : 8) WalkSlot {
  int32_t index;
  int32_t group;
  int32_t slot;
  Acc<T> value;
};

// The walk plan of the nested loss (nested_prefix_loss.cu), from indices and values [B, k]:
//   group [B, k]: group[b, j] is the prefix group of slot j, the first g with
//                 indices[b, j] < sizes.m[g];
//   walk [B, k]:  walk[b, q] is the slot at position q of row b sorted by (index, slot).
template <typename T>
cudaError_t prefix_walk_plan(const int64_t* indices, const T* values, int64_t B, int64_t k,
                             const PrefixSizes& sizes, int32_t* group, WalkSlot<T>* walk,
                             cudaStream_t stream);

// Nested loss forward: x_hat [B, d]; per column tile, the squared norms of each row's residual
// at each group boundary, partial_losses [num_col_tiles(d), B, G]; and the final residual
// r = x - x_hat for the backward, as resid [2, B, d] in T: resid[0] = r rounded to T,
// resid[1] = r - resid[0] rounded (about 16 significant bits in bf16, exact in fp32 / fp64).
template <typename T>
cudaError_t nested_loss_forward(const T* x, const T* b_dec, const WalkSlot<T>* walk,
                                const T* W_dec, int64_t B, int64_t k, int64_t d, int G, T* x_hat,
                                Acc<T>* partial_losses, T* resid, cudaStream_t stream);

// The storage type of the nested loss's suffix sums S, which only the per-latent sum of
// grad_W_dec reads (the dots use them in registers): bf16 for bf16 (float's exponent range,
// half the bytes), else the accumulation type (fp16's range would flush S's small values,
// about 2 / B, towards zero).
template <typename T>
struct SuffixSumOf {
  using type = Acc<T>;
};
template <>
struct SuffixSumOf<__nv_bfloat16> {
  using type = __nv_bfloat16;
};
template <typename T>
using SuffixSum = typename SuffixSumOf<T>::type;

// Nested loss backward, from the forward's resid, given scale[g] = 2 (grad_loss w_g +
// grad_prefix_losses[g]) / B as cum_scale [G + 1] (device: cum_scale[g] = the sum of scale
// below g) and grad_x_hat [B, d] (or null):
//   S_g = sum_{g' >= g} scale[g'] r_{g'},  grad_x = S_0,
//   S [G, B, d]: S_g - grad_x_hat, written for the groups that have a slot in row b (the
//                only rows the per-latent sum reads),
//   partial_dots [num_col_tiles(d), B, k]: W_dec[indices[b, j]] . (S_{group of slot j}[b] -
//                grad_x_hat[b]) per column tile, in Acc<T> (grad_values is minus their sum).
template <typename T>
cudaError_t nested_loss_backward(const T* resid, const WalkSlot<T>* walk, const T* W_dec,
                                 const T* grad_x_hat, const double* cum_scale, int64_t B,
                                 int64_t k, int64_t d, int G, T* grad_x, SuffixSum<T>* S,
                                 Acc<T>* partial_dots, cudaStream_t stream);

// Whether the current device has the tensor-core instructions of latent_rows_sum_mma.cu and
// nested_prefix_mma.cu (compute capability 8.0 or later).
bool has_bf16_mma();

// Whether the per-latent sums may take the tensor-core kernel: has_bf16_mma() and the
// environment variable SPARSECODE_TENSOR_CORES is "1" (read at each launch). Off by default: on
// an H200 the tensor-core kernel took 0.96 ms where the CUDA-core one took 0.50 ms.
bool tensor_cores_allowed();

// The nested loss's pass over the rows on the tensor cores (nested_prefix_mma.cu), bfloat16, for
// at most kMaxMmaGroups prefix sizes. With xhat_h[b] the sum of values[b, j] W_dec[indices[b, j]]
// over the slots j of groups <= h, r_h = x - b_dec - xhat_h and A_h = the sum over g >= h of
// scale[g] r_g (float32; scale [G] on the device), it writes, for each output given (else null):
//   S [G, B, d]:        A_h - grad_x_hat (grad_x_hat [B, d] or null: zero),
//   x_hat [B, d]:       b_dec + xhat_{G-1},
//   partial [T, B, G]:  the squared norm of r_h over each column tile of 256 (T of them), float32,
//   grad_x [B, d]:      A_0.
// Needs k >= 1, d a multiple of 8, d_sae below 2^31, x, b_dec, W_dec, grad_x_hat, S, x_hat and
// grad_x 16-byte aligned (else cudaErrorInvalidValue / cudaErrorMisalignedAddress) and an sm_80
// or later device.
constexpr int kMaxMmaGroups = 8;
constexpr int64_t kMmaColTile = 256;
cudaError_t nested_prefix_sums_mma(const __nv_bfloat16* x, const __nv_bfloat16* b_dec,
                                   const __nv_bfloat16* values, const int64_t* indices,
                                   const __nv_bfloat16* W_dec, const PrefixSizes& sizes,
                                   const float* scale, const __nv_bfloat16* grad_x_hat, int64_t B,
                                   int64_t k, int64_t d, __nv_bfloat16* S, __nv_bfloat16* x_hat,
                                   float* partial, __nv_bfloat16* grad_x, cudaStream_t stream);

}  // namespace sparsecode::cuda
