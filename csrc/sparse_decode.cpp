// Sparse decode on the CPU and its backward (DESIGN.md §3.2 and §3.3).
//
// Forward:  x_hat[b] = b_dec + sum_j values[b, j] * W_dec[indices[b, j]]
//           values [B, k], indices [B, k], W_dec [n, d], b_dec [d] -> x_hat [B, d].
//           A gather of k rows per output row: 2*B*k*d flops, B*k*d weight reads.
// Backward: grad_values[b, j] = grad_out[b] . W_dec[indices[b, j]]   (B*k dot products)
//           grad_W_dec[i]     = sum over pairs of latent i of values * grad_out[b]
//                               (segmented by latent: deterministic, every row written)
//           grad_b_dec        = sum_b grad_out[b].
//           O(B*k*d) flops plus writing grad_W_dec once.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <vector>

#include "latent_groups.h"
#include "ops.h"

namespace sparsecode {
at::Tensor sparse_decode_forward(const at::Tensor& values, const at::Tensor& indices,
                                 const at::Tensor& W_dec, const at::Tensor& b_dec) {
  check_decode_forward_args(values, indices, W_dec, b_dec, at::Device(at::kCPU));
  const int64_t B = values.size(0);
  const int64_t k = values.size(1);
  const int64_t n = W_dec.size(0);
  const int64_t d = W_dec.size(1);

  const at::Tensor val = values.contiguous();
  const at::Tensor idx = indices.contiguous();
  const at::Tensor W = W_dec.contiguous();
  const at::Tensor bias = b_dec.contiguous();
  check_indices(idx.const_data_ptr<int64_t>(), B * k, n);
  at::Tensor out = at::empty({B, d}, values.options());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, values.scalar_type(), "sparse_decode_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* val_ptr = val.const_data_ptr<scalar_t>();
    const int64_t* idx_ptr = idx.const_data_ptr<int64_t>();
    const scalar_t* W_ptr = W.const_data_ptr<scalar_t>();
    const scalar_t* bias_ptr = bias.const_data_ptr<scalar_t>();
    scalar_t* out_ptr = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, B, 16, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> acc(d);
      for (int64_t b = begin; b < end; ++b) {
        for (int64_t e = 0; e < d; ++e) {
          acc[e] = static_cast<acc_t>(bias_ptr[e]);
        }
        for (int64_t j = 0; j < k; ++j) {
          if (b * k + j + 1 < B * k) {
            prefetch_row(W_ptr + idx_ptr[b * k + j + 1] * d, d);
          }
          const acc_t v = static_cast<acc_t>(val_ptr[b * k + j]);
          if (v == acc_t(0)) {
            continue;
          }
          const scalar_t* row = W_ptr + idx_ptr[b * k + j] * d;
          for (int64_t e = 0; e < d; ++e) {
            acc[e] += v * static_cast<acc_t>(row[e]);
          }
        }
        for (int64_t e = 0; e < d; ++e) {
          out_ptr[b * d + e] = static_cast<scalar_t>(acc[e]);
        }
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sparse_decode_backward(
    const at::Tensor& grad_out, const at::Tensor& values, const at::Tensor& indices,
    const at::Tensor& W_dec) {
  check_decode_backward_args(grad_out, values, indices, W_dec, at::Device(at::kCPU));
  const int64_t B = values.size(0);
  const int64_t k = values.size(1);
  const int64_t n = W_dec.size(0);
  const int64_t d = W_dec.size(1);

  const at::Tensor g = grad_out.contiguous().to(values.scalar_type());
  const at::Tensor val = values.contiguous();
  const at::Tensor idx = indices.contiguous();
  const at::Tensor W = W_dec.contiguous();
  check_indices(idx.const_data_ptr<int64_t>(), B * k, n);
  at::Tensor grad_values = at::empty({B, k}, values.options());
  at::Tensor grad_W_dec = at::empty({n, d}, values.options());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, values.scalar_type(), "sparse_decode_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* g_ptr = g.const_data_ptr<scalar_t>();
    const scalar_t* val_ptr = val.const_data_ptr<scalar_t>();
    const int64_t* idx_ptr = idx.const_data_ptr<int64_t>();
    const scalar_t* W_ptr = W.const_data_ptr<scalar_t>();
    scalar_t* gv_ptr = grad_values.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, B, 16, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const scalar_t* g_row = g_ptr + b * d;
        for (int64_t j = 0; j < k; ++j) {
          if (b * k + j + 1 < B * k) {
            prefetch_row(W_ptr + idx_ptr[b * k + j + 1] * d, d);
          }
          const scalar_t* w_row = W_ptr + idx_ptr[b * k + j] * d;
          gv_ptr[b * k + j] = static_cast<scalar_t>(dot<wide_type<scalar_t>>(g_row, w_row, d));
        }
      }
    });

    std::vector<acc_t> coef(B * k);
    for (int64_t p = 0; p < B * k; ++p) {
      coef[p] = static_cast<acc_t>(val_ptr[p]);
    }
    const LatentGroups groups = group_by_latent(idx_ptr, B * k, n);
    accumulate_by_latent<scalar_t, acc_t, scalar_t>(
        groups, coef.data(), g_ptr, [k](int64_t p) { return p / k; }, d, n,
        /*transposed=*/false, grad_W_dec.mutable_data_ptr<scalar_t>());
  });
  return {grad_values, grad_W_dec, g.sum(0)};
}

}  // namespace sparsecode
