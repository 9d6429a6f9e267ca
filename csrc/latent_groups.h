// Grouping of the B*k active (row, slot) pairs of a sparse code by latent id, and the
// deterministic segmented reduction that every weight gradient in this extension uses.
//
//   group_by_latent:       counting sort of indices [B, k] into CSR form over the n latents.
//                          O(B*k + n) time, (B*k + n + 1) int64 memory; pairs of one latent
//                          stay in ascending pair order, so every reduction below sums in a
//                          fixed order and is bit-identical run to run.
//   accumulate_by_latent:  out[i] = sum over pairs p of latent i of coef[p] * src[row(p)],
//                          a d-vector per latent, written to every latent (zero when none is
//                          active), so no separate zero fill is needed; pairs whose coefficient
//                          is zero are skipped. O(B*k*d + n*d).
//                          `transposed` writes out as [d, n] (W_enc layout) through tiles of
//                          kTile latents, so each store fills whole cache lines.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

namespace sparsecode {

struct LatentGroups {
  std::vector<int64_t> offsets;  // [n + 1]: pairs of latent i are pairs[offsets[i]:offsets[i+1]]
  std::vector<int64_t> pairs;    // [B * k]: flat pair ids b * k + j
};

inline LatentGroups group_by_latent(const int64_t* indices, int64_t num_pairs, int64_t n) {
  LatentGroups groups;
  groups.offsets.assign(n + 1, 0);
  groups.pairs.resize(num_pairs);
  for (int64_t p = 0; p < num_pairs; ++p) {
    ++groups.offsets[indices[p] + 1];
  }
  for (int64_t i = 0; i < n; ++i) {
    groups.offsets[i + 1] += groups.offsets[i];
  }
  std::vector<int64_t> cursor(groups.offsets.begin(), groups.offsets.end() - 1);
  for (int64_t p = 0; p < num_pairs; ++p) {
    groups.pairs[cursor[indices[p]]++] = p;
  }
  return groups;
}

// Throws unless every index lies in [0, n): an out-of-range id would read or write outside
// the weight matrices. `name` and `bound` name the tensor and n in the message.
inline void check_indices(const int64_t* indices, int64_t num_pairs, int64_t n,
                          const char* name = "indices", const char* bound = "d_sae") {
  for (int64_t p = 0; p < num_pairs; ++p) {
    TORCH_CHECK(indices[p] >= 0 && indices[p] < n, name, " must lie in [0, ", bound, "=", n,
                "), found ", indices[p], " at flat position ", p);
  }
}

constexpr int64_t kTile = 16;

// The type for short reductions whose result may nearly cancel (a dot product that feeds a
// single gradient entry): double for float32 inputs too, so that a float32 output is correctly
// rounded rather than off in its last few digits. The operands come from memory either way, so
// the wider arithmetic is cheap.
template <typename scalar_t>
using wide_type =
    std::conditional_t<std::is_same_v<scalar_t, float>, double, at::opmath_type<scalar_t>>;

// Dot product of two d-vectors in acc_t; the simd reduction lets the compiler vectorise it.
template <typename acc_t, typename a_t, typename b_t>
inline acc_t dot(const a_t* a, const b_t* b, int64_t d) {
  acc_t s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t e = 0; e < d; ++e) {
    s += static_cast<acc_t>(a[e]) * static_cast<acc_t>(b[e]);
  }
  return s;
}

// Starts loading row[0:d] into the cache. The kernels read rows in a data-dependent order
// that the hardware prefetcher cannot guess, so each one prefetches the next row it will read
// while it works on the current one (about a quarter off every gather-bound kernel here).
template <typename T>
inline void prefetch_row(const T* row, int64_t d) {
  const char* bytes = reinterpret_cast<const char*>(row);
  for (int64_t offset = 0; offset < d * static_cast<int64_t>(sizeof(T)); offset += 64) {
    __builtin_prefetch(bytes + offset);
  }
}

// src_row(p) gives the row of `src` ([rows, d], contiguous) that pair p contributes.
template <typename out_t, typename acc_t, typename src_t, typename SrcRow>
void accumulate_by_latent(const LatentGroups& groups, const acc_t* coef, const src_t* src,
                          SrcRow src_row, int64_t d, int64_t n, bool transposed, out_t* out) {
  const int64_t num_tiles = (n + kTile - 1) / kTile;
  const int64_t num_pairs = static_cast<int64_t>(groups.pairs.size());
  at::parallel_for(0, num_tiles, 1, [&](int64_t tile_begin, int64_t tile_end) {
    std::vector<acc_t> acc(kTile * d);
    for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
      const int64_t i0 = tile * kTile;
      const int64_t width = std::min(kTile, n - i0);
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int64_t t = 0; t < width; ++t) {
        acc_t* row = acc.data() + t * d;
        for (int64_t q = groups.offsets[i0 + t]; q < groups.offsets[i0 + t + 1]; ++q) {
          const int64_t p = groups.pairs[q];
          const acc_t c = coef[p];
          if (c == acc_t(0)) {
            continue;  // a zero coefficient adds nothing: BatchTopK codes carry many
          }
          const src_t* s = src + src_row(p) * d;
          if (q + 1 < num_pairs) {
            prefetch_row(src + src_row(groups.pairs[q + 1]) * d, d);
          }
          for (int64_t e = 0; e < d; ++e) {
            row[e] += c * static_cast<acc_t>(s[e]);
          }
        }
      }
      if (transposed) {
        for (int64_t e = 0; e < d; ++e) {
          out_t* dst = out + e * n + i0;
          for (int64_t t = 0; t < width; ++t) {
            dst[t] = static_cast<out_t>(acc[t * d + e]);
          }
        }
      } else {
        for (int64_t t = 0; t < width; ++t) {
          out_t* dst = out + (i0 + t) * d;
          const acc_t* row = acc.data() + t * d;
          for (int64_t e = 0; e < d; ++e) {
            dst[e] = static_cast<out_t>(row[e]);
          }
        }
      }
    }
  });
}

}  // namespace sparsecode
