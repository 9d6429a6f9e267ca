// The per-latent weighted row sum on the CPU: sparse_decode_backward's grad_W_dec on its own,
// for backends whose other kernels live elsewhere (the Triton decode backward).
//
//   out[i] = sum over (b, j) with indices[b, j] == i of coef[b, j] * src[b]
//
// coef [B, k] (any floating dtype, used in src's accumulation type), indices [B, k] int64,
// src [B, d] -> out [d_sae, d] in src's dtype. With src_rows [B, k], pair (b, j) reads
// src[src_rows[b, j]] instead (src [rows, d]).
// The pairs are grouped by latent with a counting sort and summed in ascending pair order
// (accumulate_by_latent): deterministic, and every row is written, zero for latents no pair
// uses. O(B*k*d + d_sae*d).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include "latent_groups.h"
#include "ops.h"

namespace sparsecode {

at::Tensor latent_rows_sum(const at::Tensor& coef, const at::Tensor& indices, const at::Tensor& src,
                           int64_t d_sae, const std::optional<at::Tensor>& src_rows) {
  check_rows_sum_args(coef, indices, src, d_sae, src_rows, at::Device(at::kCPU));
  const int64_t B = coef.size(0);
  const int64_t k = coef.size(1);
  const int64_t d = src.size(1);

  const at::Tensor idx = indices.contiguous();
  const at::Tensor s = src.contiguous();
  check_indices(idx.const_data_ptr<int64_t>(), B * k, d_sae);
  const at::Tensor rows = src_rows.has_value() ? src_rows->contiguous() : at::Tensor();
  if (rows.defined()) {
    const int64_t* row = rows.const_data_ptr<int64_t>();
    for (int64_t p = 0; p < B * k; ++p) {
      TORCH_CHECK(row[p] >= 0 && row[p] < s.size(0), "src_rows must lie in [0, src's rows=",
                  s.size(0), "), found ", row[p], " at flat position ", p);
    }
  }
  at::Tensor out = at::empty({d_sae, d}, src.options());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, src.scalar_type(), "latent_rows_sum", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor c = coef.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    const LatentGroups groups = group_by_latent(idx.const_data_ptr<int64_t>(), B * k, d_sae);
    const int64_t* row = rows.defined() ? rows.const_data_ptr<int64_t>() : nullptr;
    accumulate_by_latent<scalar_t, acc_t, scalar_t>(
        groups, c.const_data_ptr<acc_t>(), s.const_data_ptr<scalar_t>(),
        [row, k](int64_t p) { return row != nullptr ? row[p] : p / k; }, d, d_sae,
        /*transposed=*/false, out.mutable_data_ptr<scalar_t>());
  });
  return out;
}

}  // namespace sparsecode
