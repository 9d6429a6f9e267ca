// CPU kernels of the sparsecode extension, registered as torch.ops.sparsecode_C.* in
// module.cpp (the CUDA ones, same names and schemas, are in cuda/ops_cuda.cpp). Shapes:
// x [B, d], W_enc [d, n], b_enc [n], W_dec [n, d], b_dec [d], values [B, k] (float),
// indices [B, k] (int64, each in [0, n)), G prefix sizes.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace sparsecode {

// Argument checks shared by the CPU and CUDA ops (checks.cpp). `device` is where the op runs:
// the CPU, or the GPU of its first tensor argument; `name` is the argument name in the error.
void check_float(const at::Tensor& t, const char* name, int64_t dim, const at::Device& device);
void check_same_dtype(const at::Tensor& a, const char* name_a, const at::Tensor& b,
                      const char* name_b);
void check_index_tensor(const at::Tensor& indices, const at::Device& device);
// Prefix sizes strictly increasing, positive, the last equal to n; one weight per size.
void check_prefixes(at::IntArrayRef sizes, at::ArrayRef<double> weights, int64_t n);
// Each op's arguments (dtypes, dims, devices, shapes; not the range of the index values).
void check_encode_forward_args(const at::Tensor& x, const at::Tensor& W_enc,
                               const at::Tensor& b_enc, const at::Tensor& b_dec, int64_t k,
                               const at::Device& device);
void check_encode_backward_args(const at::Tensor& grad_values, const at::Tensor& x,
                                const at::Tensor& W_enc, const at::Tensor& b_dec,
                                const at::Tensor& values, const at::Tensor& indices,
                                const at::Device& device);
void check_decode_forward_args(const at::Tensor& values, const at::Tensor& indices,
                               const at::Tensor& W_dec, const at::Tensor& b_dec,
                               const at::Device& device);
void check_decode_backward_args(const at::Tensor& grad_out, const at::Tensor& values,
                                const at::Tensor& indices, const at::Tensor& W_dec,
                                const at::Device& device);
void check_nested_args(const at::Tensor& x, const at::Tensor& values, const at::Tensor& indices,
                       const at::Tensor& W_dec, const at::Tensor& b_dec, at::IntArrayRef sizes,
                       at::ArrayRef<double> weights, const at::Device& device);
// The nested loss backward's incoming gradients (grad_x_hat may be absent).
void check_nested_grads(const at::Tensor& grad_loss, const at::Tensor& grad_prefix_losses,
                        const std::optional<at::Tensor>& grad_x_hat, const at::Tensor& x,
                        int64_t G, const at::Device& device);
void check_rows_sum_args(const at::Tensor& coef, const at::Tensor& indices,
                         const at::Tensor& src, int64_t d_sae,
                         const std::optional<at::Tensor>& src_rows, const at::Device& device);
// check_rows_sum_args with d_sae = weights.size(0), and weights [d_sae, d] like src.
void check_rows_sum_dots_args(const at::Tensor& coef, const at::Tensor& indices,
                              const at::Tensor& src, const at::Tensor& weights,
                              const std::optional<at::Tensor>& src_rows, const at::Device& device);

std::tuple<at::Tensor, at::Tensor> topk_encode_forward(const at::Tensor& x,
                                                       const at::Tensor& W_enc,
                                                       const at::Tensor& b_enc,
                                                       const at::Tensor& b_dec, int64_t k);

// Returns (grad_x, grad_W_enc, grad_b_enc, grad_b_dec); grad_x is [0, d] unless need_grad_x.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> topk_encode_backward(
    const at::Tensor& grad_values, const at::Tensor& x, const at::Tensor& W_enc,
    const at::Tensor& b_dec, const at::Tensor& values, const at::Tensor& indices,
    bool need_grad_x);

at::Tensor sparse_decode_forward(const at::Tensor& values, const at::Tensor& indices,
                                 const at::Tensor& W_dec, const at::Tensor& b_dec);

// Returns (grad_values, grad_W_dec, grad_b_dec).
std::tuple<at::Tensor, at::Tensor, at::Tensor> sparse_decode_backward(
    const at::Tensor& grad_out, const at::Tensor& values, const at::Tensor& indices,
    const at::Tensor& W_dec);

// Returns (loss [], prefix_losses [G], x_hat [B, d], resid). resid is what the backward needs
// from the forward: the CUDA kernels' final residual x - x_hat as [2, B, d] in x's dtype (two
// parts whose sum it is); empty, [2, 0, d], on the CPU, whose backward walks to it again.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> nested_prefix_loss_forward(
    const at::Tensor& x, const at::Tensor& values, const at::Tensor& indices,
    const at::Tensor& W_dec, const at::Tensor& b_dec, at::IntArrayRef prefix_sizes,
    at::ArrayRef<double> prefix_weights);

// Returns (grad_x, grad_values, grad_W_dec, grad_b_dec); grad_x_hat may be absent; resid is
// the forward's fourth output.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> nested_prefix_loss_backward(
    const at::Tensor& grad_loss, const at::Tensor& grad_prefix_losses,
    const std::optional<at::Tensor>& grad_x_hat, const at::Tensor& x, const at::Tensor& values,
    const at::Tensor& indices, const at::Tensor& W_dec, const at::Tensor& b_dec,
    at::IntArrayRef prefix_sizes, at::ArrayRef<double> prefix_weights, const at::Tensor& resid);

// out [d_sae, d] (src's dtype): out[i] = sum over (b, j) with indices[b, j] == i of
// coef[b, j] * src[row], row = src_rows[b, j] if given else b, in float32 (float64 for float64
// src), summed in a fixed order; zero rows for latents no pair uses. coef [B, k] floating,
// indices [B, k] int64, src [rows, d], src_rows [B, k] int64. sparse_decode_backward's
// grad_W_dec alone, and (src_rows into the [G * B, d] suffix sums of the residuals) the
// nested loss's grad_W_dec.
at::Tensor latent_rows_sum(const at::Tensor& coef, const at::Tensor& indices, const at::Tensor& src,
                           int64_t d_sae, const std::optional<at::Tensor>& src_rows);

// latent_rows_sum with d_sae = weights.size(0), and the dot product of every pair's src row
// with its latent's row of weights [d_sae, d] (src's dtype):
//   dots[b, j] = src[row] . weights[indices[b, j]]   [B, k], float32 (float64 for float64 src)
// Returns (out, dots). With src = grad_out and weights = W_dec these are the decode backward's
// grad_W_dec and grad_values (coef = values).
std::tuple<at::Tensor, at::Tensor> latent_rows_sum_dots(const at::Tensor& coef,
                                                        const at::Tensor& indices,
                                                        const at::Tensor& src,
                                                        const at::Tensor& weights,
                                                        const std::optional<at::Tensor>& src_rows);

}  // namespace sparsecode
