// The per-latent weighted row sum on the CPU: a weight gradient on its own, for backends whose
// other kernels live elsewhere (the Triton decode and nested loss backwards).
//
//   out[i]     = sum over (b, j) with indices[b, j] == i of coef[b, j] * src[b]
//   dots[b, j] = src[b] . weights[indices[b, j]]            (latent_rows_sum_dots only)
//
// coef [B, k] (any floating dtype, used in src's accumulation type), indices [B, k] int64,
// src [B, d], weights [d_sae, d] -> out [d_sae, d] in src's dtype, dots [B, k] in float32
// (float64 for float64 src). With src_rows [B, k], pair (b, j) reads src[src_rows[b, j]]
// instead (src [rows, d]).
// The pairs are grouped by latent with a counting sort and summed in ascending pair order
// (accumulate_by_latent): deterministic, and every row is written, zero for latents no pair
// uses. The dots are one dot product per pair. O(B*k*d + d_sae*d).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include "latent_groups.h"
#include "ops.h"

namespace sparsecode {
namespace {

// The contiguous src_rows after checking its range, or an undefined tensor when absent.
at::Tensor checked_src_rows(const std::optional<at::Tensor>& src_rows, int64_t src_rows_count) {
  if (!src_rows.has_value()) {
    return at::Tensor();
  }
  const at::Tensor rows = src_rows->contiguous();
  check_indices(rows.const_data_ptr<int64_t>(), rows.numel(), src_rows_count, "src_rows",
                "src's rows");
  return rows;
}

// out = latent_rows_sum(coef, idx, s, d_sae, rows) for checked, contiguous arguments, and
// dots [B, k] when `dots` is defined.
void rows_sum(const at::Tensor& coef, const at::Tensor& idx, const at::Tensor& s,
              const at::Tensor& rows, const at::Tensor& weights, at::Tensor& out,
              at::Tensor& dots) {
  const int64_t B = idx.size(0);
  const int64_t k = idx.size(1);
  const int64_t d = s.size(1);
  const int64_t d_sae = out.size(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, s.scalar_type(), "latent_rows_sum", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor c = coef.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    const int64_t* idx_ptr = idx.const_data_ptr<int64_t>();
    const int64_t* row = rows.defined() ? rows.const_data_ptr<int64_t>() : nullptr;
    const auto src_row = [row, k](int64_t p) { return row != nullptr ? row[p] : p / k; };
    const scalar_t* s_ptr = s.const_data_ptr<scalar_t>();
    const LatentGroups groups = group_by_latent(idx_ptr, B * k, d_sae);
    accumulate_by_latent<scalar_t, acc_t, scalar_t>(groups, c.const_data_ptr<acc_t>(), s_ptr,
                                                    src_row, d, d_sae, /*transposed=*/false,
                                                    out.mutable_data_ptr<scalar_t>());
    if (!dots.defined()) {
      return;
    }
    const scalar_t* w_ptr = weights.const_data_ptr<scalar_t>();
    acc_t* dots_ptr = dots.mutable_data_ptr<acc_t>();
    at::parallel_for(0, B * k, 256, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        dots_ptr[p] = static_cast<acc_t>(
            dot<wide_type<scalar_t>>(s_ptr + src_row(p) * d, w_ptr + idx_ptr[p] * d, d));
      }
    });
  });
}

}  // namespace

at::Tensor latent_rows_sum(const at::Tensor& coef, const at::Tensor& indices, const at::Tensor& src,
                           int64_t d_sae, const std::optional<at::Tensor>& src_rows) {
  check_rows_sum_args(coef, indices, src, d_sae, src_rows, at::Device(at::kCPU));
  const at::Tensor idx = indices.contiguous();
  const at::Tensor s = src.contiguous();
  check_indices(idx.const_data_ptr<int64_t>(), idx.numel(), d_sae);
  const at::Tensor rows = checked_src_rows(src_rows, s.size(0));
  at::Tensor out = at::empty({d_sae, s.size(1)}, s.options());
  at::Tensor no_dots;
  rows_sum(coef, idx, s, rows, at::Tensor(), out, no_dots);
  return out;
}

std::tuple<at::Tensor, at::Tensor> latent_rows_sum_dots(const at::Tensor& coef,
                                                        const at::Tensor& indices,
                                                        const at::Tensor& src,
                                                        const at::Tensor& weights,
                                                        const std::optional<at::Tensor>& src_rows) {
  check_rows_sum_dots_args(coef, indices, src, weights, src_rows, at::Device(at::kCPU));
  const int64_t d_sae = weights.size(0);
  const at::Tensor idx = indices.contiguous();
  const at::Tensor s = src.contiguous();
  check_indices(idx.const_data_ptr<int64_t>(), idx.numel(), d_sae);
  const at::Tensor rows = checked_src_rows(src_rows, s.size(0));
  at::Tensor out = at::empty({d_sae, s.size(1)}, s.options());
  at::Tensor dots = at::empty(idx.sizes(), s.options().dtype(at::toOpMathType(s.scalar_type())));
  rows_sum(coef, idx, s, rows, weights.contiguous(), out, dots);
  return {out, dots};
}

}  // namespace sparsecode
