// Python module sparsecode._C: importing it registers the CPU kernels below as
// torch.ops.sparsecode_C.* (and, in a CUDA build, the CUDA kernels of cuda/ops_cuda.cpp under
// the same names). The autograd-aware public ops (torch.ops.sparsecode.*) are defined in
// Python and call these.
#include <Python.h>
#include <torch/library.h>

#include <sstream>
#include <string>

#include "ops.h"

namespace sparsecode {

void check_cpu_float(const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor for the cpp backend, got ",
              t.device());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), name, " must be a floating tensor, got ",
              t.scalar_type());
  TORCH_CHECK(t.dim() == dim, name, " must have ", dim, " dimensions, got shape ", t.sizes());
}

void check_same_dtype(const at::Tensor& a, const char* name_a, const at::Tensor& b,
                      const char* name_b) {
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), name_a, " and ", name_b,
              " must have the same dtype, got ", a.scalar_type(), " and ", b.scalar_type());
}

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

}  // namespace sparsecode

TORCH_LIBRARY(sparsecode_C, m) {
  m.def("topk_encode_forward(Tensor x, Tensor W_enc, Tensor b_enc, Tensor b_dec, int k)"
        " -> (Tensor, Tensor)");
  m.def("topk_encode_backward(Tensor grad_values, Tensor x, Tensor W_enc, Tensor b_dec,"
        " Tensor values, Tensor indices, bool need_grad_x=True) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("sparse_decode_forward(Tensor values, Tensor indices, Tensor W_dec, Tensor b_dec)"
        " -> Tensor");
  m.def("sparse_decode_backward(Tensor grad_out, Tensor values, Tensor indices, Tensor W_dec)"
        " -> (Tensor, Tensor, Tensor)");
  m.def("nested_prefix_loss_forward(Tensor x, Tensor values, Tensor indices, Tensor W_dec,"
        " Tensor b_dec, int[] prefix_sizes, float[] prefix_weights) -> (Tensor, Tensor, Tensor)");
  m.def("nested_prefix_loss_backward(Tensor grad_loss, Tensor grad_prefix_losses,"
        " Tensor? grad_x_hat, Tensor x,"
        " Tensor values, Tensor indices, Tensor W_dec, Tensor b_dec, int[] prefix_sizes,"
        " float[] prefix_weights) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("latent_rows_sum(Tensor coef, Tensor indices, Tensor src, int d_sae) -> Tensor");
}

TORCH_LIBRARY_IMPL(sparsecode_C, CPU, m) {
  m.impl("topk_encode_forward", &sparsecode::topk_encode_forward);
  m.impl("topk_encode_backward", &sparsecode::topk_encode_backward);
  m.impl("sparse_decode_forward", &sparsecode::sparse_decode_forward);
  m.impl("sparse_decode_backward", &sparsecode::sparse_decode_backward);
  m.impl("nested_prefix_loss_forward", &sparsecode::nested_prefix_loss_forward);
  m.impl("nested_prefix_loss_backward", &sparsecode::nested_prefix_loss_backward);
  m.impl("latent_rows_sum", &sparsecode::latent_rows_sum);
}

extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C",
                                   "CPU kernels of sparsecode (torch.ops.sparsecode_C)", -1,
                                   nullptr};
  return PyModule_Create(&module_def);
}
