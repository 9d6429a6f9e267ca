// CUDA implementations of the torch.ops.sparsecode_C.* ops: the torch glue around the kernels
// of csrc/cuda/*.cu, registered under the CUDA dispatch key with the CPU ops' schemas
// (module.cpp). Compiled only in the CUDA build (it needs torch's CUDA headers).
//
// Each op mirrors its CPU counterpart: same checks (naming the argument and the fix), same
// outputs and dtypes (float32, bfloat16, float16 and float64), the same arithmetic steps, with
// float32 accumulation (float64 for float64 inputs).
//   topk_encode_forward:    per range of columns, pre = addmm(b_enc, x - b_dec, W_enc) (cuBLAS;
//                           2048 columns at B = 8192), folded into each row's running top k by
//                           topk_select.cu, which keeps the CPU's rule (among equals the lower
//                           id wins) and lists them in ascending index order. For float64 or
//                           k > 256, ATen only: per chunk of rows, the k-th largest value per row
//                           (at::topk), then the entries above it plus the lowest-index ties
//                           (nonzero() lists them in order).
//   topk_encode_backward:   grad_pre = grad_values * [values > 0]; grad_W_enc / grad_b_enc by
//                           latent_rows_sum (transposed), which also gives
//                           grad_b_dec = -W_enc @ grad_b_enc (float32) from the same pass;
//                           grad_x = gather of W_enc^T rows, only when need_grad_x.
//                           W_enc [d, n] holds a latent's weights as a strided column, so grad_x
//                           first makes W_enc^T [n, d] with the tiled transpose kernel (reads and
//                           writes n*d once: 0.2 ms bf16 / 0.4 ms fp32 at n = 65536, d = 2304;
//                           skipped when W_enc is already a transposed view of an [n, d] tensor)
//                           and then gathers whole rows, coalesced, like the decode forward.
//   sparse_decode_forward:  gather_rows.cu.
//   sparse_decode_backward, latent_rows_sum_dots: one pass over the pairs grouped by latent
//                           (latent_rows_sum.cu) gives grad_W_dec and the pairs' dot products
//                           (grad_values), reading each pair's grad_out row once.
//   latent_rows_sum:        latent_rows_sum.cu.
//   nested_prefix_sums:     nested_prefix_mma.cu, the triton backend's pass over the rows of
//                           the nested loss on the tensor cores (bfloat16; CUDA only, no CPU
//                           counterpart).
//   nested_prefix_loss_forward / backward: nested_prefix_loss.cu; the per-column-tile
//                           partial sums are reduced here with ATen (the losses' in float64, as
//                           the CPU sums its row losses). The forward's fourth output is the
//                           final residual that the backward walks back from.
//
// Determinism: every path is deterministic, with or without
// torch.use_deterministic_algorithms(True). Weight gradients group the B*k (row, slot) pairs
// by latent with a stable at::sort of the flat indices and at::searchsorted for the CSR
// offsets, then sum each latent's pairs in ascending pair order in one lane (no atomics); all
// other reductions are fixed shuffle trees and ATen sums over a fixed partial layout. Results
// are bit-identical run to run.
//
// Index checks: the forward ops check the index range with one device-to-host copy and raise
// an error naming the bad entry. The backward ops and the latent sums, whose indices come from
// a checked forward or from the encode, assert it on the device instead (at::_assert_async), so
// that a training step never waits for the host; a failure there stops the process's CUDA work.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <initializer_list>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../ops.h"
#include "kernels.cuh"

namespace sparsecode::cuda_ops {
namespace {

namespace kernels = sparsecode::cuda;

// Rows of pre-activations computed at once by the encode fallback (256 MiB of fp32).
constexpr int64_t kChunkElems = int64_t(1) << 26;
// Pre-activations a chunk of the encode by column ranges: 16 M elements (32 MB of bfloat16, 2048
// columns at B = 8192).
constexpr int64_t kPreChunkElems = int64_t(1) << 24;

template <typename scalar_t>
struct CudaTypeOf {
  using type = scalar_t;
};
template <>
struct CudaTypeOf<at::Half> {
  using type = __half;
};
template <>
struct CudaTypeOf<at::BFloat16> {
  using type = __nv_bfloat16;
};
template <typename scalar_t>
using cuda_t = typename CudaTypeOf<scalar_t>::type;

template <typename T>
const T* in(const at::Tensor& t) {
  return static_cast<const T*>(t.const_data_ptr());
}
template <typename T>
T* out(at::Tensor& t) {
  return static_cast<T*>(t.mutable_data_ptr());
}

// The accumulation dtype of the kernels for storage dtype `dtype`.
at::ScalarType acc_dtype(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

// The GPU an op runs on: that of its first CUDA tensor argument (the dispatcher picked the CUDA
// kernel, so there is one). The shared checks then name any argument that is elsewhere.
at::Device op_device(std::initializer_list<at::Tensor> tensors) {
  for (const at::Tensor& t : tensors) {
    if (t.is_cuda()) {
      return t.device();
    }
  }
  return tensors.begin()->device();
}

// Throws unless every index lies in [0, n): an out-of-range id would read or write outside
// the weight matrices. One small device-to-host copy (a synchronisation): for the forward ops,
// which take indices from the caller.
void check_index_range(const at::Tensor& indices, int64_t n) {
  if (indices.numel() == 0) {
    return;
  }
  const auto [lo, hi] = at::aminmax(indices);
  const at::Tensor bounds = at::stack({lo, hi}).cpu();
  const int64_t lowest = bounds[0].item<int64_t>();
  const int64_t highest = bounds[1].item<int64_t>();
  if (lowest < 0 || highest >= n) {
    const int64_t bad = lowest < 0 ? lowest : highest;
    const int64_t position = (indices.reshape(-1) == bad).nonzero()[0][0].item<int64_t>();
    TORCH_CHECK(false, "indices must lie in [0, d_sae=", n, "), found ", bad,
                " at flat position ", position);
  }
}

// The same condition without a host synchronisation: a device-side assertion, which stops the
// process's CUDA work if it fails. For the backward ops, whose indices come from a checked
// forward (or from the encode itself), so that a training step does not wait for the host.
void assert_index_range(const at::Tensor& indices, int64_t n, const char* name = "indices",
                        const char* bound = "d_sae") {
  if (indices.numel() == 0) {
    return;
  }
  const auto [lo, hi] = at::aminmax(indices);
  at::_assert_async(at::logical_and(lo >= 0, hi < n),
                    c10::str(name, " must lie in [0, ", bound, "=", n, ")"));
}

// The B*k pairs of a code grouped by latent: pairs of latent i are order[offsets[i]] ..
// order[offsets[i + 1] - 1], in ascending pair order (the sort is stable).
struct LatentCsr {
  at::Tensor offsets;  // [n + 1] int64
  at::Tensor order;    // [B * k] int64 flat pair ids
};

// The ids are sorted as int32 (d_sae < 2^31 always): a radix sort of half the key bits.
LatentCsr group_by_latent(const at::Tensor& flat_indices, int64_t n) {
  TORCH_CHECK(n < (int64_t(1) << 31), "d_sae must be below 2^31, got ", n);
  const auto [sorted, order] = at::sort(flat_indices.to(at::kInt),
                                        /*stable=*/std::optional<bool>(true), /*dim=*/0,
                                        /*descending=*/false);
  const at::Tensor offsets =
      at::searchsorted(sorted, at::arange(n + 1, flat_indices.options().dtype(at::kInt)));
  return {offsets, order};
}

// The per-latent sums address a pair's row of src in 32 bits (its index and the row's bytes)
// and a pair's place in the sorted list in 31.
void check_rows_sum_sizes(const at::Tensor& src, int64_t num_pairs) {
  constexpr int64_t kLimit = int64_t(1) << 32;
  TORCH_CHECK(src.size(0) < kLimit && src.size(1) * src.element_size() < kLimit,
              "the CUDA per-latent sums need src (the rows they gather) under 2^32 rows of under "
              "2^32 bytes each, got ", src.sizes(), " of ", src.scalar_type(),
              "; split the batch into smaller ones");
  TORCH_CHECK(num_pairs < (int64_t(1) << 31), "the CUDA per-latent sums need fewer than 2^31 "
              "(row, latent) pairs, got ", num_pairs, "; split the batch into smaller ones");
}

// out [n, d] (or [d, n] when transposed) = per latent, sum of coef[p] * src[src_rows[p]] over
// its pairs p; coef [P] in the accumulation dtype, src_rows [P] int64, src [*, d]. With
// bias_weights (transposed only: [d, n] contiguous, W_enc), also returns bias_weights @ (the
// per-latent sums of coef) in the accumulation dtype [d], from the same pass (else undefined).
template <typename Src, typename Out>
at::Tensor sum_rows_by_latent(const LatentCsr& csr, const at::Tensor& coef,
                              const at::Tensor& src_rows, const at::Tensor& src, int64_t n,
                              int64_t d, bool transposed, at::Tensor& result,
                              at::Tensor* coef_sum, const at::Tensor* bias_weights = nullptr) {
  check_rows_sum_sizes(src, coef.numel());
  const at::Tensor coef_sorted = coef.index_select(0, csr.order);
  const at::Tensor rows_sorted = src_rows.index_select(0, csr.order);
  at::Tensor bias_partial;
  if (bias_weights != nullptr) {
    bias_partial = at::empty({2, kernels::rows_sum_latent_tiles(n), d}, coef.options());
    bias_partial[1].zero_();  // the pass of long latents writes only the tiles that have one
  }
  const cudaError_t launched = kernels::latent_rows_sum<Src, Out>(
      in<int64_t>(csr.offsets), in<int64_t>(rows_sorted), in<kernels::Acc<Out>>(coef_sorted),
      in<Src>(src), n, d, transposed, out<Out>(result),
      coef_sum != nullptr ? out<Out>(*coef_sum) : nullptr,
      bias_weights != nullptr ? in<Src>(*bias_weights) : nullptr,
      bias_weights != nullptr ? out<kernels::Acc<Out>>(bias_partial) : nullptr,
      c10::cuda::getCurrentCUDAStream());
  C10_CUDA_CHECK(launched);
  return bias_weights != nullptr ? bias_partial.sum(at::IntArrayRef{0, 1}) : at::Tensor();
}

// out [n, d] = sum_rows_by_latent's, and dots [P] = each pair's src row . weights row of its
// latent (in the accumulation type), in flat pair order, from one pass over the pairs.
template <typename T>
void sum_rows_and_dots(const LatentCsr& csr, const at::Tensor& coef, const at::Tensor& src_rows,
                       const at::Tensor& src, const at::Tensor& weights, int64_t n, int64_t d,
                       at::Tensor& result, at::Tensor& dots) {
  const int64_t P = coef.numel();
  check_rows_sum_sizes(src, P);
  const at::Tensor coef_sorted = coef.index_select(0, csr.order);
  const at::Tensor rows_sorted = src_rows.index_select(0, csr.order);
  const int64_t tiles =
      kernels::rows_sum_dot_tiles(in<T>(src), in<T>(weights), in<T>(result), d);
  at::Tensor partial = at::empty({tiles, P}, coef.options());
  C10_CUDA_CHECK(kernels::latent_rows_sum_dots<T>(
      in<int64_t>(csr.offsets), in<int64_t>(rows_sorted), in<int64_t>(csr.order),
      in<kernels::Acc<T>>(coef_sorted), in<T>(src), in<T>(weights), n, d, P, out<T>(result),
      out<kernels::Acc<T>>(partial), c10::cuda::getCurrentCUDAStream()));
  dots = partial.sum(0);
}

// The row of src each flat pair p = b * k + j of a [B, k] code reads: b.
at::Tensor pair_rows(int64_t B, int64_t k, const at::TensorOptions& options) {
  return at::arange(B * k, options.dtype(at::kLong)).div(k, "floor");
}

// W_enc [d, n] as rows W_enc^T [n, d], contiguous.
template <typename T>
at::Tensor rows_of_columns(const at::Tensor& W_enc) {
  if (W_enc.t().is_contiguous()) {
    return W_enc.t();
  }
  const at::Tensor W = W_enc.contiguous();
  at::Tensor W_t = at::empty({W.size(1), W.size(0)}, W.options());
  C10_CUDA_CHECK(kernels::transpose<T>(in<T>(W), W.size(0), W.size(1), out<T>(W_t),
                                       c10::cuda::getCurrentCUDAStream()));
  return W_t;
}

// values / indices [rows, k]: the k largest entries of each row of pre, ties to the lower
// index, listed in ascending index order; values through relu.
std::tuple<at::Tensor, at::Tensor> select_topk(const at::Tensor& pre, int64_t k) {
  const int64_t rows = pre.size(0);
  const at::Tensor kth = std::get<0>(at::topk(pre, k, 1, /*largest=*/true, /*sorted=*/false))
                             .amin(1, /*keepdim=*/true);
  const at::Tensor above = pre > kth;
  const at::Tensor ties = pre == kth;
  const at::Tensor ties_needed = k - above.sum(1, /*keepdim=*/true);
  const at::Tensor take = above.logical_or(ties.logical_and(ties.cumsum(1) <= ties_needed));
  const at::Tensor chosen = take.nonzero();
  TORCH_CHECK(chosen.size(0) == rows * k,
              "topk_encode: a row of pre-activations (x - b_dec) @ W_enc + b_enc contains NaN; "
              "check x and the weights for NaN");
  const at::Tensor indices = chosen.select(1, 1).reshape({rows, k});
  return {at::relu(pre.gather(1, indices)), indices};
}

// values / indices [B, k]: each row's top k of xc @ W_enc + b_enc by select_topk's rule. The
// pre-activations are made kPreChunkElems at a time (all rows, a range of columns: 32 MB of
// bfloat16, near the size of L2) and each chunk is folded into the rows' running top k by
// topk_select.cu, so that [B, n] is never written whole.
void encode_by_column_chunks(const at::Tensor& xc, const at::Tensor& W_enc,
                             const at::Tensor& b_enc, int64_t k, at::Tensor& values,
                             at::Tensor& indices) {
  const int64_t B = xc.size(0);
  const int64_t n = W_enc.size(1);
  const int64_t kpad = 32 * kernels::topk_slots_per_lane(k);
  const at::TensorOptions ints = xc.options().dtype(at::kInt);
  at::Tensor keep_key = at::zeros({B, kpad}, ints);
  at::Tensor keep_id = (std::numeric_limits<int32_t>::max() - at::arange(kpad, ints))
                           .expand({B, kpad})
                           .contiguous();
  // At least 256 columns a chunk; past 65536 rows, row ranges as well.
  const int64_t width =
      std::min(n, std::max<int64_t>(256, kPreChunkElems / std::max<int64_t>(B, 1) / 256 * 256));
  const int64_t rows = std::max<int64_t>(1, kPreChunkElems / width);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, xc.scalar_type(), "topk_encode_cuda", [&] {
    using T = cuda_t<scalar_t>;
    if constexpr (!std::is_same_v<T, double>) {
      for (int64_t r0 = 0; r0 < B; r0 += rows) {
        const int64_t r = std::min(rows, B - r0);
        const at::Tensor x_rows = xc.narrow(0, r0, r);
        for (int64_t c0 = 0; c0 < n; c0 += width) {
          const int64_t w = std::min(width, n - c0);
          const at::Tensor pre =
              at::addmm(b_enc.narrow(0, c0, w), x_rows, W_enc.narrow(1, c0, w));
          C10_CUDA_CHECK(kernels::topk_fold<T>(
              in<T>(pre), r, w, c0, static_cast<int>(k), out<uint32_t>(keep_key) + r0 * kpad,
              out<int32_t>(keep_id) + r0 * kpad, stream));
        }
      }
      C10_CUDA_CHECK(kernels::topk_finish<T>(in<uint32_t>(keep_key), in<int32_t>(keep_id), B,
                                             static_cast<int>(k), out<T>(values),
                                             out<int64_t>(indices), stream));
    }
  });
}

std::tuple<at::Tensor, at::Tensor> topk_encode_forward(const at::Tensor& x,
                                                       const at::Tensor& W_enc,
                                                       const at::Tensor& b_enc,
                                                       const at::Tensor& b_dec, int64_t k) {
  check_encode_forward_args(x, W_enc, b_enc, b_dec, k, op_device({x, W_enc, b_enc, b_dec}));
  const int64_t B = x.size(0);
  const int64_t n = W_enc.size(1);
  const c10::cuda::CUDAGuard guard(x.device());

  const at::Tensor xc = (x - b_dec).contiguous();
  at::Tensor values = at::empty({B, k}, x.options());
  at::Tensor indices = at::empty({B, k}, x.options().dtype(at::kLong));
  if (x.scalar_type() != at::kDouble && kernels::topk_slots_per_lane(k) > 0 &&
      n <= kernels::kMaxTopkColumns) {
    encode_by_column_chunks(xc, W_enc, b_enc, k, values, indices);
    return {values, indices};
  }
  const int64_t chunk = std::max<int64_t>(1, std::min<int64_t>(B, kChunkElems / n));
  for (int64_t r0 = 0; r0 < B; r0 += chunk) {
    const int64_t rows = std::min(chunk, B - r0);
    const at::Tensor pre = at::addmm(b_enc, xc.narrow(0, r0, rows), W_enc);
    const auto [chunk_values, chunk_indices] = select_topk(pre, k);
    values.narrow(0, r0, rows).copy_(chunk_values);
    indices.narrow(0, r0, rows).copy_(chunk_indices);
  }
  return {values, indices};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> topk_encode_backward(
    const at::Tensor& grad_values, const at::Tensor& x, const at::Tensor& W_enc,
    const at::Tensor& b_dec, const at::Tensor& values, const at::Tensor& indices,
    bool need_grad_x) {
  check_encode_backward_args(grad_values, x, W_enc, b_dec, values, indices,
                             op_device({x, W_enc, b_dec, values, grad_values}));
  const int64_t B = x.size(0);
  const int64_t d = x.size(1);
  const int64_t n = W_enc.size(1);
  const int64_t k = values.size(1);
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  const at::Tensor xc = (x - b_dec).contiguous();
  const at::Tensor idx = indices.contiguous();
  assert_index_range(idx, n);
  const at::Tensor val = values.contiguous().to(x.scalar_type());
  const at::Tensor gval = grad_values.contiguous().to(x.scalar_type());
  const at::Tensor grad_pre =
      at::where(val > 0, gval, at::zeros_like(gval)).to(acc_dtype(x.scalar_type())).contiguous();

  at::Tensor grad_W_enc = at::empty({d, n}, x.options());
  at::Tensor grad_b_enc = at::empty({n}, x.options());
  at::Tensor grad_x = at::empty({need_grad_x ? B : 0, d}, x.options());
  // grad_b_dec = -W_enc @ grad_b_enc, from the pass that sums grad_W_enc (W_enc's tile of each
  // block against its latents' coef sums, in float32) instead of a second read of W_enc.
  const at::Tensor W = W_enc.contiguous();
  at::Tensor W_times_grad_b_enc;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "topk_encode_backward_cuda", [&] {
    using T = cuda_t<scalar_t>;
    const LatentCsr csr = group_by_latent(idx.reshape(-1), n);
    W_times_grad_b_enc = sum_rows_by_latent<T, T>(
        csr, grad_pre.reshape(-1), pair_rows(B, k, idx.options()), xc, n, d,
        /*transposed=*/true, grad_W_enc, &grad_b_enc, &W);
    if (!need_grad_x) {
      return;
    }
    const at::Tensor W_rows = rows_of_columns<T>(W_enc);
    C10_CUDA_CHECK(kernels::gather_rows_sum<T>(in<kernels::Acc<T>>(grad_pre), in<int64_t>(idx),
                                               in<T>(W_rows), nullptr, B, k, d,
                                               /*skip_zero=*/true, out<T>(grad_x), stream));
  });
  at::Tensor grad_b_dec = (-W_times_grad_b_enc).to(x.scalar_type());
  return {grad_x, grad_W_enc, grad_b_enc, grad_b_dec};
}

at::Tensor sparse_decode_forward(const at::Tensor& values, const at::Tensor& indices,
                                 const at::Tensor& W_dec, const at::Tensor& b_dec) {
  check_decode_forward_args(values, indices, W_dec, b_dec, op_device({values, W_dec, b_dec}));
  const int64_t B = values.size(0);
  const int64_t k = values.size(1);
  const int64_t n = W_dec.size(0);
  const int64_t d = W_dec.size(1);
  const c10::cuda::CUDAGuard guard(values.device());

  const at::Tensor coef = values.contiguous().to(acc_dtype(values.scalar_type()));
  const at::Tensor idx = indices.contiguous();
  const at::Tensor W = W_dec.contiguous();
  const at::Tensor bias = b_dec.contiguous();
  check_index_range(idx, n);
  at::Tensor x_hat = at::empty({B, d}, values.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, values.scalar_type(), "sparse_decode_forward_cuda", [&] {
    using T = cuda_t<scalar_t>;
    C10_CUDA_CHECK(kernels::gather_rows_sum<T>(
        in<kernels::Acc<T>>(coef), in<int64_t>(idx), in<T>(W), in<T>(bias), B, k, d,
        /*skip_zero=*/true, out<T>(x_hat), c10::cuda::getCurrentCUDAStream()));
  });
  return x_hat;
}

// The inputs of the latent sums, contiguous: src, coef (flat, in the accumulation dtype), the
// src row of each pair (src_rows, asserted in range, or b for pair b * k + j) and the pairs
// grouped by latent (the indices asserted in [0, d_sae)).
struct RowsSumInputs {
  at::Tensor src, coef, rows;
  LatentCsr csr;
};

RowsSumInputs rows_sum_inputs(const at::Tensor& coef, const at::Tensor& indices,
                              const at::Tensor& src, int64_t d_sae,
                              const std::optional<at::Tensor>& src_rows) {
  const at::Tensor idx = indices.contiguous();
  assert_index_range(idx, d_sae);
  const at::Tensor s = src.contiguous();
  at::Tensor rows;
  if (src_rows.has_value()) {
    rows = src_rows->contiguous().reshape(-1);
    assert_index_range(rows, s.size(0), "src_rows", "src's rows");
  } else {
    rows = pair_rows(coef.size(0), coef.size(1), idx.options());
  }
  return {s, coef.to(acc_dtype(src.scalar_type())).contiguous().reshape(-1), rows,
          group_by_latent(idx.reshape(-1), d_sae)};
}

at::Tensor latent_rows_sum(const at::Tensor& coef, const at::Tensor& indices, const at::Tensor& src,
                           int64_t d_sae, const std::optional<at::Tensor>& src_rows) {
  check_rows_sum_args(coef, indices, src, d_sae, src_rows, op_device({src, coef}));
  const c10::cuda::CUDAGuard guard(src.device());
  const RowsSumInputs p = rows_sum_inputs(coef, indices, src, d_sae, src_rows);
  at::Tensor result = at::empty({d_sae, src.size(1)}, src.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, src.scalar_type(), "latent_rows_sum_cuda", [&] {
    using T = cuda_t<scalar_t>;
    sum_rows_by_latent<T, T>(p.csr, p.coef, p.rows, p.src, d_sae, src.size(1),
                             /*transposed=*/false, result, nullptr);
  });
  return result;
}

std::tuple<at::Tensor, at::Tensor> latent_rows_sum_dots(const at::Tensor& coef,
                                                        const at::Tensor& indices,
                                                        const at::Tensor& src,
                                                        const at::Tensor& weights,
                                                        const std::optional<at::Tensor>& src_rows) {
  check_rows_sum_dots_args(coef, indices, src, weights, src_rows, op_device({src, coef, weights}));
  const int64_t d_sae = weights.size(0);
  const c10::cuda::CUDAGuard guard(src.device());
  const RowsSumInputs p = rows_sum_inputs(coef, indices, src, d_sae, src_rows);
  const at::Tensor W = weights.contiguous();
  at::Tensor result = at::empty({d_sae, src.size(1)}, src.options());
  at::Tensor dots;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, src.scalar_type(), "latent_rows_sum_dots_cuda", [&] {
    using T = cuda_t<scalar_t>;
    sum_rows_and_dots<T>(p.csr, p.coef, p.rows, p.src, W, d_sae, src.size(1), result, dots);
  });
  return {result, dots.reshape(coef.sizes())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sparse_decode_backward(
    const at::Tensor& grad_out, const at::Tensor& values, const at::Tensor& indices,
    const at::Tensor& W_dec) {
  check_decode_backward_args(grad_out, values, indices, W_dec,
                             op_device({values, W_dec, grad_out}));
  const c10::cuda::CUDAGuard guard(values.device());
  const at::Tensor g = grad_out.contiguous().to(values.scalar_type());
  const auto [grad_W_dec, dots] = latent_rows_sum_dots(values, indices, g, W_dec, std::nullopt);
  return {dots.to(values.scalar_type()), grad_W_dec, g.sum(0)};
}

// The checked nested-loss problem: sizes, contiguous inputs, and each row's walk plan.
struct NestedProblem {
  int64_t B, k, n, d, G;
  at::Tensor x, values, indices, W_dec, b_dec;
  at::Tensor group;    // [B, k] int32: the group of each slot
  at::Tensor walk;     // [B, k] WalkSlot<T> as bytes: each row's slots in walk order
  at::Tensor weights;  // [G] float64 on the device
};

// Nothing here waits for the GPU, since the op runs inside every Matryoshka training step: the
// index range is asserted on the device (as the Triton walks do), and the weights go to the
// device from pinned memory without blocking (a pageable copy synchronises the stream).
NestedProblem prepare_nested(const at::Tensor& x, const at::Tensor& values,
                             const at::Tensor& indices, const at::Tensor& W_dec,
                             const at::Tensor& b_dec, at::IntArrayRef sizes,
                             at::ArrayRef<double> weights) {
  check_nested_args(x, values, indices, W_dec, b_dec, sizes, weights,
                    op_device({x, values, W_dec, b_dec}));
  NestedProblem p{x.size(0),          values.size(1),        W_dec.size(0),
                  x.size(1),          static_cast<int64_t>(sizes.size()),
                  x.contiguous(),     values.contiguous(),   indices.contiguous(),
                  W_dec.contiguous(), b_dec.contiguous(),    {},
                  {},                 {}};
  TORCH_CHECK(p.G <= kernels::kMaxGroups, "the cuda backend supports at most ",
              kernels::kMaxGroups, " prefix sizes, got ", p.G,
              "; merge prefixes or use the cpp backend");
  TORCH_CHECK(p.n < (int64_t(1) << 31), "the cuda backend takes d_sae below 2^31, got ", p.n);
  assert_index_range(p.indices, p.n);

  kernels::PrefixSizes prefix{};
  prefix.count = static_cast<int>(p.G);
  std::copy(sizes.begin(), sizes.end(), prefix.m);
  p.group = at::empty({p.B, p.k}, x.options().dtype(at::kInt));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "prefix_walk_plan_cuda", [&] {
    using T = cuda_t<scalar_t>;
    using Slot = kernels::WalkSlot<T>;
    p.walk = at::empty({p.B, p.k, static_cast<int64_t>(sizeof(Slot))},
                       x.options().dtype(at::kByte));
    C10_CUDA_CHECK(kernels::prefix_walk_plan<T>(
        in<int64_t>(p.indices), in<T>(p.values), p.B, p.k, prefix, out<int32_t>(p.group),
        out<Slot>(p.walk), c10::cuda::getCurrentCUDAStream()));
  });
  const at::Tensor host_weights = at::tensor(std::vector<double>(weights.begin(), weights.end()),
                                             at::TensorOptions().dtype(at::kDouble));
  p.weights = x.is_cuda() ? host_weights.pin_memory().to(x.device(), at::kDouble,
                                                         /*non_blocking=*/true)
                          : host_weights;  // CPU tensors: tests/test_cuda_emulated.py
  return p;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> nested_prefix_loss_forward(
    const at::Tensor& x, const at::Tensor& values, const at::Tensor& indices,
    const at::Tensor& W_dec, const at::Tensor& b_dec, at::IntArrayRef prefix_sizes,
    at::ArrayRef<double> prefix_weights) {
  const c10::cuda::CUDAGuard guard(x.device());
  const NestedProblem p =
      prepare_nested(x, values, indices, W_dec, b_dec, prefix_sizes, prefix_weights);
  at::Tensor x_hat = at::empty({p.B, p.d}, x.options());
  at::Tensor partial = at::empty({kernels::num_col_tiles(p.d), p.B, p.G},
                                 x.options().dtype(acc_dtype(x.scalar_type())));
  at::Tensor resid = at::empty({2, p.B, p.d}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "nested_prefix_loss_forward_cuda", [&] {
    using T = cuda_t<scalar_t>;
    C10_CUDA_CHECK(kernels::nested_loss_forward<T>(
        in<T>(p.x), in<T>(p.b_dec), in<kernels::WalkSlot<T>>(p.walk), in<T>(p.W_dec), p.B, p.k,
        p.d, static_cast<int>(p.G), out<T>(x_hat), out<kernels::Acc<T>>(partial), out<T>(resid),
        c10::cuda::getCurrentCUDAStream()));
  });
  const at::Tensor row_losses = partial.to(at::kDouble).sum(0);  // [B, G]
  const at::Tensor means = row_losses.sum(0) / static_cast<double>(p.B);
  const at::Tensor loss = (means * p.weights).sum();
  return {loss.to(x.scalar_type()), means.to(x.scalar_type()), x_hat, resid};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> nested_prefix_loss_backward(
    const at::Tensor& grad_loss, const at::Tensor& grad_prefix_losses,
    const std::optional<at::Tensor>& grad_x_hat, const at::Tensor& x, const at::Tensor& values,
    const at::Tensor& indices, const at::Tensor& W_dec, const at::Tensor& b_dec,
    at::IntArrayRef prefix_sizes, at::ArrayRef<double> prefix_weights, const at::Tensor& resid) {
  const c10::cuda::CUDAGuard guard(x.device());
  const NestedProblem p =
      prepare_nested(x, values, indices, W_dec, b_dec, prefix_sizes, prefix_weights);
  check_nested_grads(grad_loss, grad_prefix_losses, grad_x_hat, x, p.G, x.device());
  TORCH_CHECK(resid.sizes() == at::IntArrayRef({2, p.B, p.d}) &&
                  resid.scalar_type() == x.scalar_type() && resid.device() == x.device(),
              "resid must be the cuda forward's final residual, [2, B=", p.B, ", d_model=", p.d,
              "] of x's dtype on x's device, got ", resid.sizes(), " ", resid.scalar_type(),
              " on ", resid.device(), "; pass the fourth output of nested_prefix_loss_forward");
  const at::Tensor r = resid.contiguous();
  const bool has_grad_x_hat = grad_x_hat.has_value() && grad_x_hat->defined();
  at::Tensor g_hat;
  if (has_grad_x_hat) {
    g_hat = grad_x_hat->contiguous().to(x.scalar_type());
  }
  // scale[g] = 2 c_g / B with c_g = grad_loss * w_g + grad_prefix_losses[g], in float64, as
  // cum_scale[g] = the sum of scale below g ([G + 1]).
  const at::TensorOptions on_device_f64 = x.options().dtype(at::kDouble);
  const at::Tensor scale =
      (grad_loss.reshape({}).to(on_device_f64) * p.weights +
       grad_prefix_losses.reshape({p.G}).to(on_device_f64)) *
      2.0 / static_cast<double>(p.B);
  const at::Tensor cum_scale = at::cat({at::zeros({1}, on_device_f64), scale.cumsum(0)});

  const at::ScalarType acc = acc_dtype(x.scalar_type());
  at::Tensor grad_x = at::empty({p.B, p.d}, x.options());
  at::Tensor partial = at::empty({kernels::num_col_tiles(p.d), p.B, p.k}, x.options().dtype(acc));
  at::Tensor grad_W_dec = at::empty({p.n, p.d}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "nested_prefix_loss_backward_cuda", [&] {
    using T = cuda_t<scalar_t>;
    using A = kernels::Acc<T>;
    using ST = kernels::SuffixSum<T>;
    // Rows of groups without a slot in a row are never written, nor read.
    at::Tensor S = at::empty({p.G * p.B, p.d},
                             x.options().dtype(std::is_same_v<ST, T> ? x.scalar_type() : acc));
    C10_CUDA_CHECK(kernels::nested_loss_backward<T>(
        in<T>(r), in<kernels::WalkSlot<T>>(p.walk), in<T>(p.W_dec),
        has_grad_x_hat ? in<T>(g_hat) : nullptr, in<double>(cum_scale), p.B, p.k, p.d,
        static_cast<int>(p.G), out<T>(grad_x), out<ST>(S), out<A>(partial),
        c10::cuda::getCurrentCUDAStream()));
    // grad_W_dec[i] = sum over latent i's pairs of -values * S_{group} row b.
    const at::Tensor coef = -p.values.to(acc).reshape(-1);
    const at::Tensor src_rows =
        p.group.reshape(-1).to(at::kLong) * p.B + pair_rows(p.B, p.k, p.indices.options());
    const LatentCsr csr = group_by_latent(p.indices.reshape(-1), p.n);
    sum_rows_by_latent<ST, T>(csr, coef, src_rows, S, p.n, p.d, /*transposed=*/false, grad_W_dec,
                              nullptr);
  });
  at::Tensor grad_values = (-partial.sum(0)).to(x.scalar_type());
  at::Tensor grad_b_dec = has_grad_x_hat ? g_hat.sum(0) - grad_x.sum(0) : -grad_x.sum(0);
  return {grad_x, grad_values, grad_W_dec, grad_b_dec};
}

// t, contiguous, in memory aligned to 16 bytes (a copy when its storage offset is not).
at::Tensor aligned16(const at::Tensor& t) {
  const at::Tensor c = t.contiguous();
  return reinterpret_cast<uintptr_t>(c.const_data_ptr()) % 16 == 0 ? c : c.clone();
}

// The nested loss's pass over the rows on the tensor cores (kernels.cuh: nested_prefix_sums_mma),
// for the triton backend's forward (loss: x_hat and the squared norms, and with suffix_sums the
// loss's own suffix sums) and its backward under other upstream gradients (suffix_sums and not
// loss: S and grad_x). Returns (S [G, B or 0, d], grad_x [B or 0, d], x_hat [B or 0, d],
// partial [T or 0, B, G] float32 over column tiles of 256), each empty where not made.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> nested_prefix_sums(
    const at::Tensor& x, const at::Tensor& values, const at::Tensor& indices,
    const at::Tensor& W_dec, const at::Tensor& b_dec, at::IntArrayRef prefix_sizes,
    const at::Tensor& scale, const std::optional<at::Tensor>& grad_x_hat, bool suffix_sums,
    bool loss) {
  const int64_t G = static_cast<int64_t>(prefix_sizes.size());
  const std::vector<double> weights(G, 1.0);
  check_nested_args(x, values, indices, W_dec, b_dec, prefix_sizes, weights,
                    op_device({x, values, W_dec, b_dec}));
  const int64_t B = x.size(0);
  const int64_t d = x.size(1);
  const int64_t k = values.size(1);
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && G <= kernels::kMaxMmaGroups && k >= 1 &&
                  d % 8 == 0 && kernels::has_bf16_mma(),
              "nested_prefix_sums runs bfloat16 inputs with k >= 1, d_model a multiple of 8 and "
              "at most ", kernels::kMaxMmaGroups, " prefix sizes on a GPU of compute capability "
              "8.0 or later, got ", x.scalar_type(), " with k = ", k, ", d_model = ", d, ", ", G,
              " prefix sizes; use nested_prefix_loss_forward");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.dim() == 1 && scale.size(0) == G &&
                  scale.device() == x.device(),
              "scale must be a float32 [G = ", G, "] tensor on ", x.device(), ", got ",
              scale.scalar_type(), " ", scale.sizes(), " on ", scale.device());
  const bool has_grad_x_hat = grad_x_hat.has_value() && grad_x_hat->defined();
  if (has_grad_x_hat) {
    TORCH_CHECK(grad_x_hat->sizes() == x.sizes(), "grad_x_hat must be [B, d_model] like x, got ",
                grad_x_hat->sizes());
    check_float(*grad_x_hat, "grad_x_hat", 2, x.device());
  }
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor idx = indices.contiguous();
  assert_index_range(idx, W_dec.size(0));
  const at::Tensor xc = aligned16(x);
  const at::Tensor W = aligned16(W_dec);
  const at::Tensor bias = aligned16(b_dec);
  const at::Tensor vals = values.contiguous();
  const at::Tensor sc = scale.contiguous();
  at::Tensor g_hat;
  if (has_grad_x_hat) {
    g_hat = aligned16(grad_x_hat->to(x.scalar_type()));
  }
  at::Tensor S = at::empty({G, suffix_sums ? B : 0, d}, x.options());
  at::Tensor grad_x = at::empty({suffix_sums && !loss ? B : 0, d}, x.options());
  at::Tensor x_hat = at::empty({loss ? B : 0, d}, x.options());
  const int64_t col_tiles = (d + kernels::kMmaColTile - 1) / kernels::kMmaColTile;
  at::Tensor partial = at::empty({loss ? col_tiles : 0, B, G}, x.options().dtype(at::kFloat));
  kernels::PrefixSizes prefix{};
  prefix.count = static_cast<int>(G);
  std::copy(prefix_sizes.begin(), prefix_sizes.end(), prefix.m);
  using bf16 = __nv_bfloat16;
  C10_CUDA_CHECK(kernels::nested_prefix_sums_mma(
      in<bf16>(xc), in<bf16>(bias), in<bf16>(vals), in<int64_t>(idx), in<bf16>(W), prefix,
      in<float>(sc), has_grad_x_hat ? in<bf16>(g_hat) : nullptr, B, k, d,
      suffix_sums ? out<bf16>(S) : nullptr, loss ? out<bf16>(x_hat) : nullptr,
      loss ? out<float>(partial) : nullptr, grad_x.numel() > 0 ? out<bf16>(grad_x) : nullptr,
      c10::cuda::getCurrentCUDAStream()));
  return {S, grad_x, x_hat, partial};
}

}  // namespace
}  // namespace sparsecode::cuda_ops

// The library and dispatch key are macros so that tests/test_cuda_emulated.py can register
// this file, built as host C++ over emulated kernels, for CPU tensors under another name.
#ifndef SPARSECODE_CUDA_OPS_LIBRARY
#define SPARSECODE_CUDA_OPS_LIBRARY sparsecode_C
#define SPARSECODE_CUDA_OPS_KEY CUDA
#endif
// TORCH_LIBRARY_IMPL stringifies and pastes its arguments: expand the macros first.
#define SPARSECODE_LIBRARY_IMPL(library, key, m) TORCH_LIBRARY_IMPL(library, key, m)

SPARSECODE_LIBRARY_IMPL(SPARSECODE_CUDA_OPS_LIBRARY, SPARSECODE_CUDA_OPS_KEY, m) {
  m.impl("topk_encode_forward", &sparsecode::cuda_ops::topk_encode_forward);
  m.impl("topk_encode_backward", &sparsecode::cuda_ops::topk_encode_backward);
  m.impl("sparse_decode_forward", &sparsecode::cuda_ops::sparse_decode_forward);
  m.impl("sparse_decode_backward", &sparsecode::cuda_ops::sparse_decode_backward);
  m.impl("nested_prefix_loss_forward", &sparsecode::cuda_ops::nested_prefix_loss_forward);
  m.impl("nested_prefix_loss_backward", &sparsecode::cuda_ops::nested_prefix_loss_backward);
  m.impl("latent_rows_sum", &sparsecode::cuda_ops::latent_rows_sum);
  m.impl("latent_rows_sum_dots", &sparsecode::cuda_ops::latent_rows_sum_dots);
  m.impl("nested_prefix_sums", &sparsecode::cuda_ops::nested_prefix_sums);
}
