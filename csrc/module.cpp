// Python module sparsecode._C: importing it registers the CPU kernels below as
// torch.ops.sparsecode_C.* (and, in a CUDA build, the CUDA kernels of cuda/ops_cuda.cpp under
// the same names). The autograd-aware public ops (torch.ops.sparsecode.*) are defined in
// Python and call these.
#include <Python.h>
#include <torch/library.h>

#include "ops.h"

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
        " Tensor b_dec, int[] prefix_sizes, float[] prefix_weights)"
        " -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("nested_prefix_loss_backward(Tensor grad_loss, Tensor grad_prefix_losses,"
        " Tensor? grad_x_hat, Tensor x,"
        " Tensor values, Tensor indices, Tensor W_dec, Tensor b_dec, int[] prefix_sizes,"
        " float[] prefix_weights, Tensor resid) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("latent_rows_sum(Tensor coef, Tensor indices, Tensor src, int d_sae,"
        " Tensor? src_rows=None) -> Tensor");
  m.def("latent_rows_sum_dots(Tensor coef, Tensor indices, Tensor src, Tensor weights,"
        " Tensor? src_rows=None) -> (Tensor, Tensor)");
  // CUDA only (cuda/ops_cuda.cpp): the triton backend's nested loss on the tensor cores.
  m.def("nested_prefix_sums(Tensor x, Tensor values, Tensor indices, Tensor W_dec, Tensor b_dec,"
        " int[] prefix_sizes, Tensor scale, Tensor? grad_x_hat, bool suffix_sums, bool loss)"
        " -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(sparsecode_C, CPU, m) {
  m.impl("topk_encode_forward", &sparsecode::topk_encode_forward);
  m.impl("topk_encode_backward", &sparsecode::topk_encode_backward);
  m.impl("sparse_decode_forward", &sparsecode::sparse_decode_forward);
  m.impl("sparse_decode_backward", &sparsecode::sparse_decode_backward);
  m.impl("nested_prefix_loss_forward", &sparsecode::nested_prefix_loss_forward);
  m.impl("nested_prefix_loss_backward", &sparsecode::nested_prefix_loss_backward);
  m.impl("latent_rows_sum", &sparsecode::latent_rows_sum);
  m.impl("latent_rows_sum_dots", &sparsecode::latent_rows_sum_dots);
}

extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C",
                                   "CPU kernels of sparsecode (torch.ops.sparsecode_C)", -1,
                                   nullptr};
  return PyModule_Create(&module_def);
}
