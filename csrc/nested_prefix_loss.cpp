// Nested-prefix (Matryoshka) loss on the CPU, forward and backward (DESIGN.md §3.4).
//
// With prefix sizes m_0 < ... < m_{G-1} = n and weights w_g:
//   r_g[b]            = x[b] - b_dec - sum_{j : indices[b, j] < m_g} values[b, j] W_dec[indices[b, j]]
//   prefix_losses[g]  = mean_b ||r_g[b]||^2,   loss = sum_g w_g prefix_losses[g].
// x [B, d], values/indices [B, k], W_dec [n, d], b_dec [d]
//   -> loss [], prefix_losses [G], x_hat [B, d] (the full reconstruction, a by-product), and
//      an empty [2, 0, d] where the CUDA forward returns its final residual (the schema's
//      resid): the backward here walks again instead.
//
// Forward: one walk over each row's slots in ascending index order accumulates the
// reconstruction (one multiply-add per slot and element); the residual is formed at each group
// boundary. O(B*(k + G)*d) for all G prefixes at once.
// Backward: with c_g = grad_loss * w_g + grad_prefix_losses[g], the same walk stores the
// residuals, then suffix sums S_g = (2/B) sum_{g' >= g} c_{g'} r_{g'} - grad_x_hat
// (computed per row in double, kept as a [G, B, d] float scratch; x_hat = x - r_{G-1}, so its
// gradient joins the last group) give, for a slot in group h (m_{h-1} <= index < m_h):
//   grad_values = -W_dec[i] . S_h,   grad_W_dec[i] += -values * S_h  (segmented by latent),
//   grad_x = S_0 + grad_x_hat (the loss part alone, taken before grad_x_hat is folded in),
//   grad_b_dec = -sum_b S_0.       O(B*(k + G)*d).
// The scratch is laid out group-major because latents of one group are one contiguous id
// range: the segmented sum for grad_W_dec then reads one [B, d] slab at a time, which stays
// in the last-level cache.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <numeric>
#include <vector>

#include "latent_groups.h"
#include "ops.h"
#include "scratch.h"

namespace sparsecode {
namespace {

// The checked problem: sizes and contiguous inputs.
struct Problem {
  int64_t B, k, n, d, G;
  at::Tensor x, values, indices, W_dec, b_dec;
};

Problem prepare(const at::Tensor& x, const at::Tensor& values, const at::Tensor& indices,
                   const at::Tensor& W_dec, const at::Tensor& b_dec, at::IntArrayRef sizes,
                   at::ArrayRef<double> weights) {
  check_nested_args(x, values, indices, W_dec, b_dec, sizes, weights, at::Device(at::kCPU));
  Problem p{x.size(0),         values.size(1),        W_dec.size(0),
            x.size(1),         static_cast<int64_t>(sizes.size()),
            x.contiguous(),    values.contiguous(),   indices.contiguous(),
            W_dec.contiguous(), b_dec.contiguous()};
  check_indices(p.indices.const_data_ptr<int64_t>(), p.B * p.k, p.n);
  return p;
}

// A row's residuals and suffix sums are kept in wide_type (double for float32 inputs too):
// residuals that nearly cancel (a good reconstruction, or the loss and x_hat gradients pulling
// against each other) would otherwise lose digits that float32 tests can see; the walk works on
// cache-resident rows, so the wider type costs arithmetic, not memory traffic.
//
// Walks one row's slots in ascending index order, accumulating the reconstruction
// s = sum_j values[j] W_dec[indices[j]] (one multiply-add per slot and element). At each group
// boundary it forms the residual r = (x - b_dec) - s in `r` and calls at_boundary(g, r), once
// per g in order, and stores each slot's group in group_of_slot[k]. `order` is scratch of size
// k, `s` of size d. When x_hat is not null it receives b_dec + s.
template <typename scalar_t, typename acc_t, typename AtBoundary>
void walk_row(const scalar_t* x, const scalar_t* b_dec, const scalar_t* values,
              const int64_t* indices, const scalar_t* W_dec, const Problem& p,
              at::IntArrayRef sizes, std::vector<int64_t>& order, acc_t* s, acc_t* r,
              int64_t* group_of_slot, acc_t* x_hat, AtBoundary at_boundary) {
  std::iota(order.begin(), order.end(), 0);
  if (!std::is_sorted(indices, indices + p.k)) {
    std::stable_sort(order.begin(), order.end(),
                     [&](int64_t a, int64_t b) { return indices[a] < indices[b]; });
  }
  std::fill(s, s + p.d, acc_t(0));
  auto boundary = [&](int64_t g) {
    for (int64_t e = 0; e < p.d; ++e) {
      r[e] = static_cast<acc_t>(x[e]) - static_cast<acc_t>(b_dec[e]) - s[e];
    }
    at_boundary(g, r);
  };
  int64_t g = 0;
  for (int64_t position = 0; position < p.k; ++position) {
    const int64_t slot = order[position];
    const int64_t i = indices[slot];
    if (position + 1 < p.k) {
      prefetch_row(W_dec + indices[order[position + 1]] * p.d, p.d);
    }
    while (g < p.G && i >= sizes[g]) {
      boundary(g++);
    }
    group_of_slot[slot] = g;
    const acc_t v = static_cast<acc_t>(values[slot]);
    if (v == acc_t(0)) {
      continue;
    }
    const scalar_t* w = W_dec + i * p.d;
    for (int64_t e = 0; e < p.d; ++e) {
      s[e] += v * static_cast<acc_t>(w[e]);
    }
  }
  while (g < p.G) {
    boundary(g++);
  }
  if (x_hat != nullptr) {
    for (int64_t e = 0; e < p.d; ++e) {
      x_hat[e] = static_cast<acc_t>(b_dec[e]) + s[e];
    }
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> nested_prefix_loss_forward(
    const at::Tensor& x, const at::Tensor& values, const at::Tensor& indices,
    const at::Tensor& W_dec, const at::Tensor& b_dec, at::IntArrayRef prefix_sizes,
    at::ArrayRef<double> prefix_weights) {
  const Problem p = prepare(x, values, indices, W_dec, b_dec, prefix_sizes, prefix_weights);
  std::vector<double> row_losses(p.B * p.G);
  at::Tensor x_hat = at::empty({p.B, p.d}, x.options());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "nested_prefix_loss_forward", [&] {
    using acc_t = wide_type<scalar_t>;
    at::parallel_for(0, p.B, 16, [&](int64_t begin, int64_t end) {
      std::vector<int64_t> order(p.k), group_of_slot(p.k);
      std::vector<acc_t> s(p.d), r(p.d), recon(p.d);
      scalar_t* x_hat_ptr = x_hat.mutable_data_ptr<scalar_t>();
      for (int64_t b = begin; b < end; ++b) {
        walk_row<scalar_t, acc_t>(
            p.x.const_data_ptr<scalar_t>() + b * p.d, p.b_dec.const_data_ptr<scalar_t>(),
            p.values.const_data_ptr<scalar_t>() + b * p.k, p.indices.const_data_ptr<int64_t>() + b * p.k,
            p.W_dec.const_data_ptr<scalar_t>(), p, prefix_sizes, order, s.data(), r.data(),
            group_of_slot.data(), recon.data(), [&](int64_t g, const acc_t* res) {
              row_losses[b * p.G + g] = static_cast<double>(dot<acc_t>(res, res, p.d));
            });
        for (int64_t e = 0; e < p.d; ++e) {
          x_hat_ptr[b * p.d + e] = static_cast<scalar_t>(recon[e]);
        }
      }
    });
  });

  std::vector<double> means(p.G, 0.0);
  for (int64_t b = 0; b < p.B; ++b) {
    for (int64_t g = 0; g < p.G; ++g) {
      means[g] += row_losses[b * p.G + g];
    }
  }
  double loss = 0.0;
  for (int64_t g = 0; g < p.G; ++g) {
    means[g] /= static_cast<double>(p.B);
    loss += prefix_weights[g] * means[g];
  }
  return {at::scalar_tensor(loss, x.options()),
          at::tensor(means, x.options().dtype(at::kDouble)).to(x.scalar_type()), x_hat,
          at::empty({2, 0, p.d}, x.options())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> nested_prefix_loss_backward(
    const at::Tensor& grad_loss, const at::Tensor& grad_prefix_losses,
    const std::optional<at::Tensor>& grad_x_hat, const at::Tensor& x, const at::Tensor& values,
    const at::Tensor& indices, const at::Tensor& W_dec, const at::Tensor& b_dec,
    at::IntArrayRef prefix_sizes, at::ArrayRef<double> prefix_weights,
    const at::Tensor& /*resid: empty, the walk below recomputes the residuals*/) {
  const Problem p = prepare(x, values, indices, W_dec, b_dec, prefix_sizes, prefix_weights);
  check_nested_grads(grad_loss, grad_prefix_losses, grad_x_hat, x, p.G, at::Device(at::kCPU));
  const bool has_grad_x_hat = grad_x_hat.has_value() && grad_x_hat->defined();
  at::Tensor g_hat;
  if (has_grad_x_hat) {
    g_hat = grad_x_hat->contiguous().to(x.scalar_type());
  }

  const double g_loss = grad_loss.item<double>();
  const at::Tensor g_prefix = grad_prefix_losses.to(at::kDouble).contiguous();
  std::vector<double> scale(p.G);  // 2 c_g / B
  for (int64_t g = 0; g < p.G; ++g) {
    scale[g] = 2.0 * (g_loss * prefix_weights[g] + g_prefix.const_data_ptr<double>()[g]) /
               static_cast<double>(p.B);
  }

  at::Tensor grad_x = at::empty({p.B, p.d}, x.options());
  at::Tensor grad_values = at::empty({p.B, p.k}, x.options());
  at::Tensor grad_W_dec = at::empty({p.n, p.d}, x.options());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "nested_prefix_loss_backward", [&] {
    using acc_t = wide_type<scalar_t>;
    using store_t = at::opmath_type<scalar_t>;
    const scalar_t* W_ptr = p.W_dec.const_data_ptr<scalar_t>();
    const scalar_t* val_ptr = p.values.const_data_ptr<scalar_t>();
    const int64_t* idx_ptr = p.indices.const_data_ptr<int64_t>();
    // Every residual slot is written by the walk before it is read.
    at::Tensor S_tensor = scratch(ScratchSlot::kSuffixSums, {p.G, p.B, p.d},
                                  x.options().dtype(c10::CppTypeToScalarType<store_t>::value));
    store_t* S = S_tensor.mutable_data_ptr<store_t>();
    const scalar_t* g_hat_ptr = has_grad_x_hat ? g_hat.const_data_ptr<scalar_t>() : nullptr;
    std::vector<int64_t> group_of_pair(p.B * p.k);
    scalar_t* gx_ptr = grad_x.mutable_data_ptr<scalar_t>();
    scalar_t* gv_ptr = grad_values.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, p.B, 16, [&](int64_t begin, int64_t end) {
      std::vector<int64_t> order(p.k);
      std::vector<acc_t> s(p.d), r(p.d);
      std::vector<acc_t> S_row(p.G * p.d);  // this row's residuals, then suffix sums
      for (int64_t b = begin; b < end; ++b) {
        auto S_at = [&](int64_t g) { return S_row.data() + g * p.d; };
        walk_row<scalar_t, acc_t>(
            p.x.const_data_ptr<scalar_t>() + b * p.d, p.b_dec.const_data_ptr<scalar_t>(),
            val_ptr + b * p.k, idx_ptr + b * p.k, W_ptr, p, prefix_sizes, order, s.data(),
            r.data(), group_of_pair.data() + b * p.k, nullptr,
            [&](int64_t g, const acc_t* res) { std::copy(res, res + p.d, S_at(g)); });
        for (int64_t g = p.G - 1; g >= 0; --g) {
          acc_t* Sg = S_at(g);
          const acc_t* Snext = g + 1 < p.G ? S_at(g + 1) : nullptr;
          const acc_t c = static_cast<acc_t>(scale[g]);
          for (int64_t e = 0; e < p.d; ++e) {
            Sg[e] = c * Sg[e] + (Snext != nullptr ? Snext[e] : acc_t(0));
          }
        }
        scalar_t* gx = gx_ptr + b * p.d;
        for (int64_t e = 0; e < p.d; ++e) {
          gx[e] = static_cast<scalar_t>(S_at(0)[e]);
        }
        // grad_x is taken before x_hat's gradient joins, so it never cancels against it.
        if (has_grad_x_hat) {
          const scalar_t* gh = g_hat_ptr + b * p.d;
          for (int64_t g = 0; g < p.G; ++g) {
            acc_t* Sg = S_at(g);
            for (int64_t e = 0; e < p.d; ++e) {
              Sg[e] -= static_cast<acc_t>(gh[e]);
            }
          }
        }
        for (int64_t j = 0; j < p.k; ++j) {
          const scalar_t* w = W_ptr + idx_ptr[b * p.k + j] * p.d;
          const acc_t* Sh = S_at(group_of_pair[b * p.k + j]);
          gv_ptr[b * p.k + j] = static_cast<scalar_t>(-dot<acc_t>(w, Sh, p.d));
        }
        for (int64_t g = 0; g < p.G; ++g) {
          std::copy(S_at(g), S_at(g) + p.d, S + (g * p.B + b) * p.d);
        }
      }
    });

    std::vector<store_t> coef(p.B * p.k);
    for (int64_t q = 0; q < p.B * p.k; ++q) {
      coef[q] = -static_cast<store_t>(val_ptr[q]);
    }
    const LatentGroups groups = group_by_latent(idx_ptr, p.B * p.k, p.n);
    const int64_t k = p.k, B = p.B;
    accumulate_by_latent<scalar_t, store_t, store_t>(
        groups, coef.data(), S,
        [&](int64_t q) { return group_of_pair[q] * B + q / k; }, p.d, p.n,
        /*transposed=*/false, grad_W_dec.mutable_data_ptr<scalar_t>());
  });
  at::Tensor grad_b_dec = has_grad_x_hat ? g_hat.sum(0) - grad_x.sum(0) : -grad_x.sum(0);
  return {grad_x, grad_values, grad_W_dec, grad_b_dec};
}

}  // namespace sparsecode
