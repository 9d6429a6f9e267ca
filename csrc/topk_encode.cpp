// TopK encode on the CPU and its sparse-gradient backward (DESIGN.md §3.1 and §3.3).
//
// Forward:  pre = (x - b_dec) @ W_enc + b_enc,  values/indices = relu of each row's k
//           largest entries of pre, indices sorted ascending (ties: the lower id wins).
//           x [B, d], W_enc [d, n], b_enc [n], b_dec [d] -> values [B, k], indices [B, k].
//           Rows are processed in chunks, so one [rows, n] buffer of at most kChunkElems
//           elements is alive (and reused across calls), never the whole [B, n] matrix.
//           The GEMM writes (x - b_dec) @ W_enc alone; b_enc is added as the selection reads
//           each entry, which saves addmm's broadcast copy of b_enc into the buffer.
//           bfloat16/float16 inputs are multiplied in float32 (x - b_dec is rounded to the
//           input dtype first, as the reference does): torch's 16-bit CPU GEMM is a scalar
//           loop on CPUs without native 16-bit arithmetic (0.3 GFLOP/s in bfloat16 on this
//           project's AVX2 CI machine). The selection then reads float32 pre-activations, as
//           the CUDA paths do; the float32 copy of W_enc is d*n*4 bytes for the call.
//           Cost: the GEMM (2*B*d*n flops) plus one read of each pre row, keeping the
//           entries above a running k-th-best threshold (O(n + k log k + k log(n/k)) per row).
// Backward: dpre = grad_values * [values > 0] on the B*k active pairs only, then
//           dW_enc[:, i] = sum dpre * x'[b]        (segmented by latent, transposed tiles)
//           db_enc[i]    = sum dpre
//           db_dec       = -W_enc @ db_enc         (= -sum_b dx'[b], one pass over W_enc)
//           dx'[b]       = sum_j dpre[b, j] * W_enc[:, indices[b, j]]   (kRowBlock rows of
//                          W_enc at a time, so the gathers stay in cache and sum in parallel),
//                          only when need_grad_x (a training step's x needs none; it is the
//                          backward's costliest part, B*k*d strided gathers); else dx is [0].
//           O(B*k*d) flops plus reading W_enc and writing dW_enc once.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#include "latent_groups.h"
#include "ops.h"
#include "scratch.h"

namespace sparsecode {
namespace {

constexpr int64_t kChunkElems = int64_t(1) << 24;  // 64 MiB of float32 pre-activations
constexpr int64_t kScanBlock = 32;                 // pre entries checked at once for a new top-k entry
constexpr int64_t kRowBlock = 8;                   // rows of W_enc gathered together for grad_x

// Slots of the candidate buffer of select_topk_row for a given k.
inline int64_t candidate_slots(int64_t k) { return 2 * k + 64; }

// Selects the k largest of pre[0:n] + bias[0:n] (lower index first among equals) into
// values/indices, sorted by index, values passed through relu. `buf` is scratch of
// candidate_slots(k) entries.
//
// Entries above the running threshold are appended to buf; when it is full, nth_element keeps
// the k best and the threshold becomes the k-th best value. Appending is cheaper than a heap
// update per new entry, and a full buffer is compacted only every k + 64 appends. A NaN
// pre-activation counts as -inf, so every comparison below is a strict weak order.
template <typename pre_t, typename scalar_t, typename acc_t>
void select_topk_row(const pre_t* pre, const scalar_t* bias, int64_t n, int64_t k,
                     std::vector<std::pair<acc_t, int64_t>>& buf, scalar_t* values,
                     int64_t* indices) {
  auto at = [&](int64_t i) { return static_cast<acc_t>(pre[i]) + static_cast<acc_t>(bias[i]); };
  // "a is better than b": the larger value, or the lower index among equals.
  auto better = [](const std::pair<acc_t, int64_t>& a, const std::pair<acc_t, int64_t>& b) {
    return a.first > b.first || (a.first == b.first && a.second < b.second);
  };
  const acc_t minus_inf = -std::numeric_limits<acc_t>::infinity();
  const int64_t slots = static_cast<int64_t>(buf.size());
  int64_t used = 0;
  for (int64_t i = 0; i < k; ++i) {
    const acc_t v = at(i);
    buf[used++] = {v == v ? v : minus_inf, i};
  }
  // Every entry better than the k-th best so far is at or above this (-inf until the first
  // compaction). A later entry equal to it has a higher index than the kept ones, so it
  // never beats them: only strictly larger values are taken.
  acc_t threshold = minus_inf;
  auto keep_best_k = [&] {
    std::nth_element(buf.begin(), buf.begin() + (k - 1), buf.begin() + used, better);
    used = k;
    threshold = buf[k - 1].first;
  };
  auto offer = [&](int64_t i) {
    const acc_t v = at(i);
    if (v > threshold) {
      buf[used++] = {v, i};
      if (used == slots) {
        keep_best_k();
      }
    }
  };
  // Most blocks hold nothing above the running threshold: a vectorised max skips them.
  int64_t i = k;
  for (; i + kScanBlock <= n; i += kScanBlock) {
    acc_t block_max = at(i);
#pragma omp simd reduction(max : block_max)
    for (int64_t e = 1; e < kScanBlock; ++e) {
      const acc_t v = at(i + e);
      block_max = v > block_max ? v : block_max;
    }
    if (block_max > threshold) {
      for (int64_t e = 0; e < kScanBlock; ++e) {
        offer(i + e);
      }
    }
  }
  for (; i < n; ++i) {
    offer(i);
  }
  if (used > k) {
    keep_best_k();
  }
  std::sort(buf.begin(), buf.begin() + k,
            [](const auto& a, const auto& b) { return a.second < b.second; });
  for (int64_t j = 0; j < k; ++j) {
    values[j] = static_cast<scalar_t>(std::max(buf[j].first, acc_t(0)));
    indices[j] = buf[j].second;
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> topk_encode_forward(const at::Tensor& x,
                                                       const at::Tensor& W_enc,
                                                       const at::Tensor& b_enc,
                                                       const at::Tensor& b_dec, int64_t k) {
  check_encode_forward_args(x, W_enc, b_enc, b_dec, k, at::Device(at::kCPU));
  const int64_t B = x.size(0);
  const int64_t n = W_enc.size(1);

  const at::Tensor bias = b_enc.contiguous();
  at::Tensor values = at::empty({B, k}, x.options());
  at::Tensor indices = at::empty({B, k}, x.options().dtype(at::kLong));
  const int64_t chunk = std::max<int64_t>(1, std::min<int64_t>(B, kChunkElems / n));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "topk_encode_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    // The GEMM's dtype: float32 for 16-bit inputs (see the header).
    using pre_t = std::conditional_t<std::is_same_v<scalar_t, at::BFloat16> ||
                                         std::is_same_v<scalar_t, at::Half>,
                                     float, scalar_t>;
    const auto gemm_options = x.options().dtype(c10::CppTypeToScalarType<pre_t>::value);
    const at::Tensor xc = (x - b_dec).to(gemm_options).contiguous();
    const at::Tensor W = W_enc.to(gemm_options).contiguous();
    at::Tensor pre = scratch(ScratchSlot::kPreActivations, {chunk, n}, gemm_options);
    for (int64_t r0 = 0; r0 < B; r0 += chunk) {
      const int64_t rows = std::min(chunk, B - r0);
      at::Tensor pre_rows = pre.narrow(0, 0, rows);
      at::mm_out(pre_rows, xc.narrow(0, r0, rows), W);
      const pre_t* pre_ptr = pre_rows.const_data_ptr<pre_t>();
      scalar_t* val_ptr = values.mutable_data_ptr<scalar_t>() + r0 * k;
      int64_t* idx_ptr = indices.mutable_data_ptr<int64_t>() + r0 * k;
      at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
        std::vector<std::pair<acc_t, int64_t>> buf(candidate_slots(k));
        for (int64_t r = begin; r < end; ++r) {
          select_topk_row<pre_t, scalar_t, acc_t>(pre_ptr + r * n, bias.const_data_ptr<scalar_t>(),
                                                  n, k, buf, val_ptr + r * k, idx_ptr + r * k);
        }
      });
    }
  });
  return {values, indices};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> topk_encode_backward(
    const at::Tensor& grad_values, const at::Tensor& x, const at::Tensor& W_enc,
    const at::Tensor& b_dec, const at::Tensor& values, const at::Tensor& indices,
    bool need_grad_x) {
  check_encode_backward_args(grad_values, x, W_enc, b_dec, values, indices, at::Device(at::kCPU));
  const int64_t B = x.size(0);
  const int64_t d = x.size(1);
  const int64_t n = W_enc.size(1);
  const int64_t k = values.size(1);

  const at::Tensor xc = (x - b_dec).contiguous();
  const at::Tensor W = W_enc.contiguous();
  const at::Tensor idx = indices.contiguous();
  const at::Tensor val = values.contiguous().to(x.scalar_type());
  const at::Tensor gval = grad_values.contiguous().to(x.scalar_type());
  check_indices(idx.const_data_ptr<int64_t>(), B * k, n);

  at::Tensor grad_W_enc = at::empty({d, n}, x.options());
  at::Tensor grad_b_enc = at::empty({n}, x.options());
  at::Tensor grad_b_dec = at::empty({d}, x.options());
  at::Tensor grad_x = at::empty({need_grad_x ? B : 0, d}, x.options());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "topk_encode_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using wide_t = wide_type<scalar_t>;
    const int64_t* idx_ptr = idx.const_data_ptr<int64_t>();
    const scalar_t* val_ptr = val.const_data_ptr<scalar_t>();
    const scalar_t* gval_ptr = gval.const_data_ptr<scalar_t>();
    const scalar_t* W_ptr = W.const_data_ptr<scalar_t>();
    std::vector<acc_t> dpre(B * k);
    std::vector<wide_t> column_sum(n, wide_t(0));  // db_enc, summed in ascending pair order
    for (int64_t p = 0; p < B * k; ++p) {
      dpre[p] = static_cast<acc_t>(val_ptr[p]) > acc_t(0) ? static_cast<acc_t>(gval_ptr[p])
                                                           : acc_t(0);
      column_sum[idx_ptr[p]] += dpre[p];
    }
    scalar_t* gbe_ptr = grad_b_enc.mutable_data_ptr<scalar_t>();
    for (int64_t i = 0; i < n; ++i) {
      gbe_ptr[i] = static_cast<scalar_t>(column_sum[i]);
    }
    scalar_t* gbd_ptr = grad_b_dec.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, d, 1, [&](int64_t begin, int64_t end) {
      for (int64_t e = begin; e < end; ++e) {
        gbd_ptr[e] = static_cast<scalar_t>(-dot<wide_t>(W_ptr + e * n, column_sum.data(), n));
      }
    });

    const LatentGroups groups = group_by_latent(idx_ptr, B * k, n);
    accumulate_by_latent<scalar_t, acc_t, scalar_t>(
        groups, dpre.data(), xc.const_data_ptr<scalar_t>(), [k](int64_t p) { return p / k; },
        d, n, /*transposed=*/true, grad_W_enc.mutable_data_ptr<scalar_t>());
    if (!need_grad_x) {
      return;
    }

    scalar_t* gx_ptr = grad_x.mutable_data_ptr<scalar_t>();
    const int64_t num_blocks = (d + kRowBlock - 1) / kRowBlock;
    at::parallel_for(0, num_blocks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t blk = begin; blk < end; ++blk) {
        const int64_t r0 = blk * kRowBlock;
        const int64_t rows = std::min(kRowBlock, d - r0);
        const scalar_t* w_rows = W_ptr + r0 * n;
        for (int64_t b = 0; b < B; ++b) {
          wide_t s[kRowBlock] = {};
          for (int64_t j = 0; j < k; ++j) {
            const wide_t c = dpre[b * k + j];
            if (c == wide_t(0)) {
              continue;
            }
            const int64_t i = idx_ptr[b * k + j];
            for (int64_t rr = 0; rr < rows; ++rr) {
              s[rr] += c * static_cast<wide_t>(w_rows[rr * n + i]);
            }
          }
          for (int64_t rr = 0; rr < rows; ++rr) {
            gx_ptr[b * d + r0 + rr] = static_cast<scalar_t>(s[rr]);
          }
        }
      }
    });
  });
  return {grad_x, grad_W_enc, grad_b_enc, grad_b_dec};
}

}  // namespace sparsecode
