// Argument checks shared by the CPU ops (csrc/*.cpp) and the CUDA ops (cuda/ops_cuda.cpp).
// `device` is where the op runs: the CPU, or the GPU of its first tensor argument. Every
// error names the argument and the fix. The range of the index values is checked by each
// device's own code (a loop on the CPU, one reduction on the GPU).
#include <sstream>
#include <string>

#include "ops.h"

namespace sparsecode {
namespace {

// "[a, b, c]": the sizes as the error messages below print them.
std::string format_sizes(at::IntArrayRef sizes) {
  std::ostringstream out;
  out << "[";
  for (size_t g = 0; g < sizes.size(); ++g) {
    out << (g == 0 ? "" : ", ") << sizes[g];
  }
  out << "]";
  return out.str();
}

}  // namespace

void check_float(const at::Tensor& t, const char* name, int64_t dim, const at::Device& device) {
  if (device.is_cpu()) {
    TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor for the cpp backend, got ",
                t.device());
  } else {
    TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor for the cuda backend, got ",
                t.device(), "; use the cpp backend for CPU tensors");
    TORCH_CHECK(t.device() == device, name, " is on ", t.device(),
                " but the other inputs are on ", device, "; move them to one GPU");
  }
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), name, " must be a floating tensor, got ",
              t.scalar_type());
  TORCH_CHECK(t.dim() == dim, name, " must have ", dim, " dimensions, got shape ", t.sizes());
}

void check_same_dtype(const at::Tensor& a, const char* name_a, const at::Tensor& b,
                      const char* name_b) {
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), name_a, " and ", name_b,
              " must have the same dtype, got ", a.scalar_type(), " and ", b.scalar_type());
}

void check_index_tensor(const at::Tensor& indices, const at::Device& device) {
  TORCH_CHECK(indices.device() == device && indices.scalar_type() == at::kLong,
              "indices must be an int64 tensor on ", device, " like the other inputs, got ",
              indices.scalar_type(), " on ", indices.device());
}

void check_prefixes(at::IntArrayRef sizes, at::ArrayRef<double> weights, int64_t n) {
  const int64_t G = static_cast<int64_t>(sizes.size());
  TORCH_CHECK(G >= 1 && static_cast<int64_t>(weights.size()) == G,
              "need one prefix weight per prefix size, got ", weights.size(), " weights for ", G,
              " sizes");
  for (int64_t g = 0; g < G; ++g) {
    TORCH_CHECK(sizes[g] >= 1 && (g == 0 || sizes[g] > sizes[g - 1]),
                "prefix_sizes must be strictly increasing positive ints, got ", format_sizes(sizes));
  }
  TORCH_CHECK(sizes[G - 1] == n, "the last prefix size must equal d_sae = ", n, ", got ",
              format_sizes(sizes));
}

void check_encode_args(const at::Tensor& x, const at::Tensor& W_enc, const at::Tensor& b_dec,
                       const at::Device& device) {
  check_float(x, "x", 2, device);
  check_float(W_enc, "W_enc", 2, device);
  check_float(b_dec, "b_dec", 1, device);
  check_same_dtype(x, "x", W_enc, "W_enc");
  check_same_dtype(x, "x", b_dec, "b_dec");
  TORCH_CHECK(W_enc.size(0) == x.size(1), "W_enc must be [d_model, d_sae] with d_model = ",
              x.size(1), " (x's last dim), got ", W_enc.sizes());
  TORCH_CHECK(b_dec.size(0) == x.size(1), "b_dec must be [d_model] = [", x.size(1), "], got ",
              b_dec.sizes());
}

void check_encode_forward_args(const at::Tensor& x, const at::Tensor& W_enc,
                               const at::Tensor& b_enc, const at::Tensor& b_dec, int64_t k,
                               const at::Device& device) {
  check_encode_args(x, W_enc, b_dec, device);
  check_float(b_enc, "b_enc", 1, device);
  check_same_dtype(x, "x", b_enc, "b_enc");
  const int64_t n = W_enc.size(1);
  TORCH_CHECK(b_enc.size(0) == n, "b_enc must be [d_sae] = [", n, "], got ", b_enc.sizes());
  TORCH_CHECK(k >= 1 && k <= n, "k must be in [1, d_sae=", n, "], got ", k);
}

void check_encode_backward_args(const at::Tensor& grad_values, const at::Tensor& x,
                                const at::Tensor& W_enc, const at::Tensor& b_dec,
                                const at::Tensor& values, const at::Tensor& indices,
                                const at::Device& device) {
  check_encode_args(x, W_enc, b_dec, device);
  check_float(values, "values", 2, device);
  check_float(grad_values, "grad_values", 2, device);
  check_index_tensor(indices, device);
  TORCH_CHECK(values.size(0) == x.size(0) && values.sizes() == indices.sizes() &&
                  values.sizes() == grad_values.sizes(),
              "values, indices and grad_values must all be [B, k] with B = ", x.size(0),
              ", got ", values.sizes(), ", ", indices.sizes(), ", ", grad_values.sizes());
}

void check_decode_args(const at::Tensor& values, const at::Tensor& indices,
                       const at::Tensor& W_dec, const at::Device& device) {
  check_float(values, "values", 2, device);
  check_float(W_dec, "W_dec", 2, device);
  check_index_tensor(indices, device);
  TORCH_CHECK(indices.sizes() == values.sizes(),
              "indices and values must have the same shape [B, k], got ", indices.sizes(),
              " and ", values.sizes());
  check_same_dtype(values, "values", W_dec, "W_dec");
}

void check_decode_forward_args(const at::Tensor& values, const at::Tensor& indices,
                               const at::Tensor& W_dec, const at::Tensor& b_dec,
                               const at::Device& device) {
  check_decode_args(values, indices, W_dec, device);
  check_float(b_dec, "b_dec", 1, device);
  check_same_dtype(values, "values", b_dec, "b_dec");
  TORCH_CHECK(b_dec.size(0) == W_dec.size(1), "b_dec must be [d_model] = [", W_dec.size(1),
              "], got ", b_dec.sizes());
}

void check_decode_backward_args(const at::Tensor& grad_out, const at::Tensor& values,
                                const at::Tensor& indices, const at::Tensor& W_dec,
                                const at::Device& device) {
  check_decode_args(values, indices, W_dec, device);
  check_float(grad_out, "grad_out", 2, device);
  TORCH_CHECK(grad_out.size(0) == values.size(0) && grad_out.size(1) == W_dec.size(1),
              "grad_out must be [B, d_model] = [", values.size(0), ", ", W_dec.size(1),
              "], got ", grad_out.sizes());
}

void check_nested_args(const at::Tensor& x, const at::Tensor& values, const at::Tensor& indices,
                       const at::Tensor& W_dec, const at::Tensor& b_dec, at::IntArrayRef sizes,
                       at::ArrayRef<double> weights, const at::Device& device) {
  check_float(x, "x", 2, device);
  check_float(values, "values", 2, device);
  check_float(W_dec, "W_dec", 2, device);
  check_float(b_dec, "b_dec", 1, device);
  check_same_dtype(x, "x", values, "values");
  check_same_dtype(x, "x", W_dec, "W_dec");
  check_same_dtype(x, "x", b_dec, "b_dec");
  check_index_tensor(indices, device);
  TORCH_CHECK(values.size(0) == x.size(0) && indices.sizes() == values.sizes(),
              "values and indices must be [B, k] with B = ", x.size(0), ", got ", values.sizes(),
              " and ", indices.sizes());
  TORCH_CHECK(W_dec.size(1) == x.size(1) && b_dec.size(0) == x.size(1),
              "W_dec must be [d_sae, d_model] and b_dec [d_model] with d_model = ", x.size(1));
  check_prefixes(sizes, weights, W_dec.size(0));
}

void check_nested_grads(const at::Tensor& grad_loss, const at::Tensor& grad_prefix_losses,
                        const std::optional<at::Tensor>& grad_x_hat, const at::Tensor& x,
                        int64_t G, const at::Device& device) {
  TORCH_CHECK(grad_loss.numel() == 1 && grad_prefix_losses.numel() == G,
              "grad_loss must be a scalar and grad_prefix_losses [G]");
  if (grad_x_hat.has_value() && grad_x_hat->defined()) {
    TORCH_CHECK(grad_x_hat->sizes() == x.sizes(), "grad_x_hat must be [B, d_model] like x, got ",
                grad_x_hat->sizes());
    check_float(*grad_x_hat, "grad_x_hat", 2, device);
  }
}

void check_rows_sum_args(const at::Tensor& coef, const at::Tensor& indices,
                         const at::Tensor& src, int64_t d_sae,
                         const std::optional<at::Tensor>& src_rows, const at::Device& device) {
  check_float(coef, "coef", 2, device);
  check_float(src, "src", 2, device);
  check_index_tensor(indices, device);
  TORCH_CHECK(indices.sizes() == coef.sizes(),
              "indices and coef must have the same shape [B, k], got ", indices.sizes(), " and ",
              coef.sizes());
  if (src_rows.has_value()) {
    TORCH_CHECK(src_rows->device() == device && src_rows->scalar_type() == at::kLong &&
                    src_rows->sizes() == indices.sizes(),
                "src_rows must be an int64 [B, k] tensor like indices on ", device, ", got ",
                src_rows->scalar_type(), " ", src_rows->sizes(), " on ", src_rows->device());
  } else {
    TORCH_CHECK(src.size(0) == coef.size(0), "src must be [B, d] with B = ", coef.size(0),
                " (coef's rows), got ", src.sizes(), "; or pass src_rows");
  }
  TORCH_CHECK(d_sae >= 0, "d_sae must be non-negative, got ", d_sae);
}

void check_rows_sum_dots_args(const at::Tensor& coef, const at::Tensor& indices,
                              const at::Tensor& src, const at::Tensor& weights,
                              const std::optional<at::Tensor>& src_rows, const at::Device& device) {
  check_float(weights, "weights", 2, device);
  check_rows_sum_args(coef, indices, src, weights.size(0), src_rows, device);
  check_same_dtype(src, "src", weights, "weights");
  TORCH_CHECK(weights.size(1) == src.size(1), "weights must be [d_sae, d] with src's d = ",
              src.size(1), ", got ", weights.sizes());
}

}  // namespace sparsecode
