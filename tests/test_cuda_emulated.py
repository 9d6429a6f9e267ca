"""The CUDA backend run on the CPU. Every .cu file of csrc/cuda is compiled by nvcc as host C++
over a warp emulator (one std::thread per GPU thread, warp shuffles through a per-warp exchange
between barriers, __syncthreads as a block barrier, __shared__ arrays shared by the block's
threads, one block at a time). Two libraries are built from them:
- the launchers of kernels.cuh behind C entry points, called with ctypes on torch CPU tensors:
  each kernel against float64 on awkward shapes;
- csrc/cuda/ops_cuda.cpp, the backend's host glue, over the same kernels, with stand-ins for
  its three c10/cuda headers, registered for CPU tensors as torch.ops.sparsecode_emulated:
  each op against the cpp backend's.

This checks the logic (indexing, tails, vector and strided paths, walk order, group
boundaries, shuffle reductions, what is written, the glue's grouping and reductions), the
launchers' grids and path choices, and that an asynchronous copy is waited for before it is
read (a copy's bytes land only at its wait), where no GPU is present. tests/test_sanitized.py
runs it again under AddressSanitizer, for reads and writes out of bounds. It says nothing of
speed, of memory ordering between threads that do not synchronise, or of the device's own
rounding. Skips without nvcc.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from torch.utils import cpp_extension

from sparsecode import reference
from sparsecode.nested_prefix_loss import nested_prefix_loss_and_decode
from tests import test_nested_prefix_loss as nested_tests
from tests.conftest import TOLERANCE as SUITE_TOLERANCE
from tests.conftest import assert_close
from tests.test_cuda_compile import CUDA_SOURCES, nvcc_or_skip
from tests.test_latent_rows_sum import grouped_reference, random_indices

EMULATOR = r"""
// The CUDA builtins of csrc/cuda/*.cu for a host build. Force-included before each file.
#pragma once
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include <cuda_runtime.h>

#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif
// Blocks run one at a time, so a kernel's statics are its block's shared memory.
#undef __shared__
#define __shared__ static

// A barrier that aborts with a message instead of hanging when a thread never arrives (a
// shuffle or __syncthreads that not every thread of the warp or block reaches).
class EmulatedBarrier {
 public:
  explicit EmulatedBarrier(int count) : count_(count) {}
  void arrive_and_wait() {
    std::unique_lock<std::mutex> lock(mutex_);
    const long phase = phase_;
    if (++arrived_ == count_) {
      arrived_ = 0;
      ++phase_;
      wake_.notify_all();
      return;
    }
    if (!wake_.wait_for(lock, std::chrono::seconds(20), [&] { return phase_ != phase; })) {
      std::fprintf(stderr, "emulated barrier: %d of %d threads never arrived\n",
                   count_ - arrived_, count_);
      std::abort();
    }
  }

 private:
  std::mutex mutex_;
  std::condition_variable wake_;
  const int count_;
  int arrived_ = 0;
  long phase_ = 0;
};

struct EmulatedWarp {
  explicit EmulatedWarp(int count) : lanes(count), sync(count) {}
  const int lanes;
  EmulatedBarrier sync;
  uint64_t slot[32];
  uint32_t words[32][6];  // the tensor-core operands of each lane
};

inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;
inline thread_local dim3 blockDim;
inline thread_local EmulatedWarp* emulated_warp;
inline thread_local EmulatedBarrier* emulated_block;
inline thread_local int emulated_lane;

template <typename V>
V __shfl_sync(unsigned, V value, int source) {
  static_assert(sizeof(V) <= sizeof(uint64_t), "a shuffle moves at most 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(V));
  emulated_warp->slot[emulated_lane] = bits;
  emulated_warp->sync.arrive_and_wait();
  bits = emulated_warp->slot[source & 31];
  emulated_warp->sync.arrive_and_wait();
  V out;
  std::memcpy(&out, &bits, sizeof(V));
  return out;
}
template <typename V>
V __shfl_xor_sync(unsigned mask, V value, int lane_mask) {
  return __shfl_sync(mask, value, emulated_lane ^ lane_mask);
}
template <typename V>
V __shfl_down_sync(unsigned mask, V value, unsigned delta) {
  const int source = emulated_lane + static_cast<int>(delta);
  return __shfl_sync(mask, value, source < 32 ? source : emulated_lane);
}
template <typename V>
V __shfl_up_sync(unsigned mask, V value, unsigned delta) {
  const int source = emulated_lane - static_cast<int>(delta);
  return __shfl_sync(mask, value, source >= 0 ? source : emulated_lane);
}
inline unsigned __ballot_sync(unsigned, int predicate) {
  emulated_warp->slot[emulated_lane] = predicate != 0;
  emulated_warp->sync.arrive_and_wait();
  unsigned bits = 0;
  for (int lane = 0; lane < emulated_warp->lanes; ++lane) {
    bits |= static_cast<unsigned>(emulated_warp->slot[lane]) << lane;
  }
  emulated_warp->sync.arrive_and_wait();
  return bits;
}
inline bool __any_sync(unsigned mask, int predicate) { return __ballot_sync(mask, predicate) != 0; }
inline int __ffs(unsigned x) { return __builtin_ffs(static_cast<int>(x)); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }

inline void __syncwarp(unsigned = 0xffffffffu) { emulated_warp->sync.arrive_and_wait(); }
inline void __syncthreads() { emulated_block->arrive_and_wait(); }

// The sm_80 instructions of csrc/cuda/device_utils.cuh, from the PTX ISA's descriptions.
// An asynchronous copy may land any time from its issue to the wait that covers it: here dst
// takes 0xff bytes (NaN in every float type) at the issue and the 16 bytes (or zeros) at that
// wait, so a read before the wait sees NaN, and a lane still reading dst when another lane
// issues a copy into it races with the issue, as on a GPU.
struct EmulatedCopy {
  void* dst;
  unsigned char bytes[16];
};
inline thread_local std::vector<EmulatedCopy> emulated_issued;  // not yet committed
inline thread_local std::deque<std::vector<EmulatedCopy>> emulated_committed;  // oldest first
inline void cp_async_16(void* dst, const void* src, bool fill) {
  EmulatedCopy copy{dst, {}};
  if (fill) {
    std::memcpy(copy.bytes, src, 16);
  }
  std::memset(dst, 0xff, 16);
  emulated_issued.push_back(copy);
}
inline void cp_async_commit() {
  emulated_committed.push_back(std::move(emulated_issued));
  emulated_issued.clear();
}
template <int pending>
void cp_async_wait() {
  while (emulated_committed.size() > pending) {
    for (const EmulatedCopy& copy : emulated_committed.front()) {
      std::memcpy(copy.dst, copy.bytes, 16);
    }
    emulated_committed.pop_front();
  }
}

// Every lane's N words, exchanged across the warp (the operands of ldmatrix and mma).
template <int N>
void emulated_exchange(const uint32_t (&mine)[N], uint32_t (&all)[32][N]) {
  static_assert(N <= 6, "EmulatedWarp::words holds 6 words a lane");
  std::memcpy(emulated_warp->words[emulated_lane], mine, sizeof(mine));
  emulated_warp->sync.arrive_and_wait();
  for (int lane = 0; lane < 32; ++lane) {
    std::memcpy(all[lane], emulated_warp->words[lane], sizeof(mine));
  }
  emulated_warp->sync.arrive_and_wait();
}

// redux.sync: the warp's smallest / largest value in every lane.
template <typename V, typename Pick>
V emulated_reduce(V value, Pick pick) {
  uint32_t mine[1];
  std::memcpy(mine, &value, sizeof(V));
  uint32_t all[32][1];
  emulated_exchange(mine, all);
  V out = value;
  for (int lane = 0; lane < 32; ++lane) {
    V other;
    std::memcpy(&other, all[lane], sizeof(V));
    out = pick(out, other);
  }
  return out;
}
inline unsigned __reduce_min_sync(unsigned, unsigned value) {
  return emulated_reduce(value, [](unsigned a, unsigned b) { return a < b ? a : b; });
}
inline int __reduce_max_sync(unsigned, int value) {
  return emulated_reduce(value, [](int a, int b) { return a > b ? a : b; });
}
inline int __reduce_add_sync(unsigned, int value) {
  uint32_t mine[1];
  std::memcpy(mine, &value, sizeof(value));
  uint32_t all[32][1];
  emulated_exchange(mine, all);
  int total = 0;
  for (int lane = 0; lane < 32; ++lane) {
    int other;
    std::memcpy(&other, all[lane], sizeof(other));
    total += other;
  }
  return total;
}

// ldmatrix .x4 (.trans): lane i gives row i % 8 of matrix i / 8; lane l = 4g + t receives
// matrix j's elements (g, 2t), (g, 2t + 1), or (2t, g), (2t + 1, g) transposed.
inline void emulated_ldmatrix_x4(uint32_t (&r)[4], const void* row, bool trans) {
  const auto address = reinterpret_cast<uintptr_t>(row);
  const uint32_t mine[2] = {static_cast<uint32_t>(address), static_cast<uint32_t>(address >> 32)};
  uint32_t all[32][2];
  emulated_exchange(mine, all);
  auto element = [&](int matrix, int i, int col) {  // matrix's (i, col), 16 bits
    const uint32_t* words = all[8 * matrix + i];
    const uint64_t at = (static_cast<uint64_t>(words[1]) << 32) | words[0];
    uint16_t bits;
    std::memcpy(&bits, reinterpret_cast<const char*>(at) + 2 * col, 2);
    return static_cast<uint32_t>(bits);
  };
  const int g = emulated_lane / 4;
  const int t = emulated_lane % 4;
  for (int j = 0; j < 4; ++j) {
    r[j] = trans ? element(j, 2 * t, g) | element(j, 2 * t + 1, g) << 16
                 : element(j, g, 2 * t) | element(j, g, 2 * t + 1) << 16;
  }
}
inline void ldmatrix_x4(uint32_t (&r)[4], const void* row) { emulated_ldmatrix_x4(r, row, false); }
inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row) {
  emulated_ldmatrix_x4(r, row, true);
}

// mma.m16n8k16 .row.col, bfloat16 in, float32 accumulation (summed in double here): lane
// l = 4g + t holds A[g][2t, 2t+1], A[g+8][2t, 2t+1], A[g][2t+8, 2t+9], A[g+8][2t+8, 2t+9],
// B[2t, 2t+1][g], B[2t+8, 2t+9][g], D[g][2t, 2t+1], D[g+8][2t, 2t+1].
inline void mma_m16n8k16_bf16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  const uint32_t mine[6] = {a[0], a[1], a[2], a[3], b[0], b[1]};
  uint32_t all[32][6];
  emulated_exchange(mine, all);
  auto half = [](uint32_t word, int h) {
    const uint32_t bits = h == 0 ? word << 16 : word & 0xffff0000u;
    float f;
    std::memcpy(&f, &bits, 4);
    return static_cast<double>(f);
  };
  double A[16][16];
  double B[16][8];
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane / 4;
    const int t = lane % 4;
    for (int h = 0; h < 2; ++h) {
      for (int r = 0; r < 4; ++r) {  // r: row g + 8 (r % 2), columns + 8 (r / 2)
        A[g + 8 * (r % 2)][2 * t + h + 8 * (r / 2)] = half(all[lane][r], h);
      }
      for (int r = 0; r < 2; ++r) {
        B[2 * t + h + 8 * r][g] = half(all[lane][4 + r], h);
      }
    }
  }
  const int g = emulated_lane / 4;
  const int t = emulated_lane % 4;
  for (int e = 0; e < 4; ++e) {
    const int row = g + 8 * (e / 2);
    const int col = 2 * t + e % 2;
    double sum = d[e];
    for (int k = 0; k < 16; ++k) {
      sum += A[row][k] * B[k][col];
    }
    d[e] = static_cast<float>(sum);
  }
}

template <typename P, typename V>
void __stcs(P* address, V value) {
  *address = value;
}

// The dynamic shared memory of the block running (SPARSECODE_DYNAMIC_SHARED).
inline thread_local unsigned char* emulated_shared;
inline unsigned char* emulated_dynamic_shared() { return emulated_shared; }

// kernel<<<grid, block>>>(arguments...) on the CPU: the blocks one after another, each block's
// threads as std::threads.
template <typename Kernel>
auto emulated_launch(Kernel kernel, dim3 grid, dim3 block, size_t shared_bytes = 0) {
  return [=](auto... arguments) {
    const int threads = static_cast<int>(block.x * block.y * block.z);
    for (unsigned z = 0; z < grid.z; ++z) {
      for (unsigned y = 0; y < grid.y; ++y) {
        for (unsigned x = 0; x < grid.x; ++x) {
          // 16-byte aligned, and no larger than asked, so that AddressSanitizer sees overruns
          std::vector<uint4> shared((shared_bytes + sizeof(uint4) - 1) / sizeof(uint4));
          EmulatedBarrier block_sync(threads);
          std::vector<std::unique_ptr<EmulatedWarp>> warps;
          for (int w = 0; w * 32 < threads; ++w) {
            warps.push_back(std::make_unique<EmulatedWarp>(std::min(32, threads - w * 32)));
          }
          std::vector<std::thread> running;
          for (int t = 0; t < threads; ++t) {
            running.emplace_back([&, t] {
              threadIdx = make_uint3(t % block.x, t / block.x % block.y, t / (block.x * block.y));
              blockIdx = make_uint3(x, y, z);
              blockDim = block;
              emulated_warp = warps[t / 32].get();
              emulated_block = &block_sync;
              emulated_lane = t % 32;
              emulated_shared = reinterpret_cast<unsigned char*>(shared.data());
              kernel(arguments...);
            });
          }
          for (std::thread& thread : running) {
            thread.join();
          }
        }
      }
    }
  };
}
"""

# C entry points for ctypes: each launcher of kernels.cuh for each storage type (suffix f32,
# f64, f16, bf16), raw pointers in, the launch's cudaError_t out.
ENTRY_POINTS = r"""
#include "kernels.cuh"

using namespace sparsecode::cuda;

extern "C" cudaError_t cudaGetLastError() { return cudaSuccess; }
// An sm_90 device: the bfloat16 per-latent sums take the tensor-core kernel.
extern "C" cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
extern "C" cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  *value = attr == cudaDevAttrComputeCapabilityMajor ? 9 : 0;
  return cudaSuccess;
}
extern "C" cudaError_t cudaFuncSetAttribute(const void*, cudaFuncAttribute, int) {
  return cudaSuccess;
}

#define ENTRY_POINTS(T, NAME)                                                                  \
  extern "C" int gather_rows_sum_##NAME(const void* coef, const int64_t* indices,              \
                                        const void* rows, const void* bias, int64_t B,         \
                                        int64_t k, int64_t d, int skip_zero, void* out) {      \
    return gather_rows_sum<T>(static_cast<const Acc<T>*>(coef), indices,                       \
                              static_cast<const T*>(rows), static_cast<const T*>(bias), B, k,  \
                              d, skip_zero != 0, static_cast<T*>(out), nullptr);               \
  }                                                                                            \
  extern "C" int transpose_##NAME(const void* in, int64_t rows, int64_t cols, void* out) {     \
    return transpose<T>(static_cast<const T*>(in), rows, cols, static_cast<T*>(out), nullptr); \
  }                                                                                            \
  extern "C" int latent_rows_sum_##NAME(const int64_t* offsets, const int64_t* rows,           \
                                        const void* coef, const void* src, int64_t n,          \
                                        int64_t d, int transposed, void* out, void* coef_sum,  \
                                        const void* bias_weights, void* bias_partial) {        \
    return latent_rows_sum<T, T>(offsets, rows, static_cast<const Acc<T>*>(coef),              \
                                 static_cast<const T*>(src), n, d, transposed != 0,            \
                                 static_cast<T*>(out), static_cast<T*>(coef_sum),              \
                                 static_cast<const T*>(bias_weights),                          \
                                 static_cast<Acc<T>*>(bias_partial), nullptr);                 \
  }                                                                                            \
  extern "C" int latent_rows_sum_dots_##NAME(                                                  \
      const int64_t* offsets, const int64_t* rows, const int64_t* pair_ids, const void* coef,  \
      const void* src, const void* weights, int64_t n, int64_t d, int64_t num_pairs,           \
      void* out, void* partial_dots) {                                                         \
    return latent_rows_sum_dots<T>(offsets, rows, pair_ids, static_cast<const Acc<T>*>(coef),  \
                                   static_cast<const T*>(src), static_cast<const T*>(weights), \
                                   n, d, num_pairs, static_cast<T*>(out),                      \
                                   static_cast<Acc<T>*>(partial_dots), nullptr);               \
  }                                                                                            \
  extern "C" int prefix_walk_plan_##NAME(const int64_t* indices, const void* values, int64_t B,  \
                                         int64_t k, const int64_t* sizes, int G,              \
                                         int32_t* group, void* walk) {                        \
    PrefixSizes prefix{};                                                                      \
    prefix.count = G;                                                                          \
    for (int g = 0; g < G; ++g) {                                                              \
      prefix.m[g] = sizes[g];                                                                  \
    }                                                                                          \
    return prefix_walk_plan<T>(indices, static_cast<const T*>(values), B, k, prefix, group,    \
                               static_cast<WalkSlot<T>*>(walk), nullptr);                      \
  }                                                                                            \
  extern "C" int nested_loss_forward_##NAME(const void* x, const void* b_dec, const void* walk, \
                                            const void* W_dec, int64_t B, int64_t k,           \
                                            int64_t d, int G, void* x_hat,                     \
                                            void* partial_losses, void* resid) {               \
    return nested_loss_forward<T>(                                                             \
        static_cast<const T*>(x), static_cast<const T*>(b_dec),                                \
        static_cast<const WalkSlot<T>*>(walk), static_cast<const T*>(W_dec), B, k, d, G,       \
        static_cast<T*>(x_hat), static_cast<Acc<T>*>(partial_losses), static_cast<T*>(resid), \
        nullptr);                                                                              \
  }                                                                                            \
  extern "C" int nested_loss_backward_##NAME(                                                  \
      const void* resid, const void* walk, const void* W_dec, const void* grad_x_hat,          \
      const double* cum_scale, int64_t B, int64_t k, int64_t d, int G, void* grad_x, void* S,  \
      void* partial_dots) {                                                                    \
    return nested_loss_backward<T>(                                                            \
        static_cast<const T*>(resid), static_cast<const WalkSlot<T>*>(walk),                   \
        static_cast<const T*>(W_dec), static_cast<const T*>(grad_x_hat), cum_scale, B, k, d, G,\
        static_cast<T*>(grad_x), static_cast<SuffixSum<T>*>(S),                                \
        static_cast<Acc<T>*>(partial_dots), nullptr);                                          \
  }
ENTRY_POINTS(float, f32)
ENTRY_POINTS(double, f64)
ENTRY_POINTS(__half, f16)
ENTRY_POINTS(__nv_bfloat16, bf16)

// The encode's running top k (no float64 kernels).
#define TOPK_ENTRY_POINTS(T, NAME)                                                             \
  extern "C" int topk_fold_##NAME(const void* pre, int64_t B, int64_t w, int64_t c0, int64_t k, \
                                  void* keep_key, void* keep_id) {                             \
    return topk_fold<T>(static_cast<const T*>(pre), B, w, c0, static_cast<int>(k),             \
                        static_cast<uint32_t*>(keep_key), static_cast<int32_t*>(keep_id),      \
                        nullptr);                                                              \
  }                                                                                            \
  extern "C" int topk_finish_##NAME(const void* keep_key, const void* keep_id, int64_t B,      \
                                    int64_t k, void* values, int64_t* indices) {               \
    return topk_finish<T>(static_cast<const uint32_t*>(keep_key),                              \
                          static_cast<const int32_t*>(keep_id), B, static_cast<int>(k),        \
                          static_cast<T*>(values), indices, nullptr);                          \
  }
TOPK_ENTRY_POINTS(float, f32)
TOPK_ENTRY_POINTS(__half, f16)
TOPK_ENTRY_POINTS(__nv_bfloat16, bf16)

// The nested loss's pass over the rows on the tensor cores (bfloat16 only).
extern "C" int nested_prefix_sums_bf16(const void* x, const void* b_dec, const void* values,
                                       const int64_t* indices, const void* W_dec,
                                       const int64_t* sizes, int G, const float* scale,
                                       const void* grad_x_hat, int64_t B, int64_t k, int64_t d,
                                       void* S, void* x_hat, float* partial, void* grad_x) {
  using bf16 = __nv_bfloat16;
  PrefixSizes prefix{};
  prefix.count = G;
  for (int g = 0; g < G; ++g) {
    prefix.m[g] = sizes[g];
  }
  return nested_prefix_sums_mma(
      static_cast<const bf16*>(x), static_cast<const bf16*>(b_dec),
      static_cast<const bf16*>(values), indices, static_cast<const bf16*>(W_dec), prefix, scale,
      static_cast<const bf16*>(grad_x_hat), B, k, d, static_cast<bf16*>(S),
      static_cast<bf16*>(x_hat), partial, static_cast<bf16*>(grad_x), nullptr);
}

// The float32 S of the float16 nested loss.
extern "C" int latent_rows_sum_f32_f16(const int64_t* offsets, const int64_t* rows,
                                       const void* coef, const void* src, int64_t n, int64_t d,
                                       int transposed, void* out, void* coef_sum) {
  return latent_rows_sum<float, __half>(offsets, rows, static_cast<const float*>(coef),
                                        static_cast<const float*>(src), n, d, transposed != 0,
                                        static_cast<__half*>(out),
                                        static_cast<__half*>(coef_sum), nullptr, nullptr,
                                        nullptr);
}

"""

# The ops that csrc/cuda/ops_cuda.cpp registers.
OPS = ["topk_encode_forward", "topk_encode_backward", "sparse_decode_forward",
       "sparse_decode_backward", "nested_prefix_loss_forward", "nested_prefix_loss_backward",
       "latent_rows_sum", "latent_rows_sum_dots", "nested_prefix_sums"]
SUFFIX = {torch.float32: "f32", torch.float64: "f64", torch.float16: "f16",
          torch.bfloat16: "bf16"}
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# Each dtype, then bfloat16 again with SPARSECODE_TENSOR_CORES=1: its per-latent sums on the
# tensor-core kernel, where by default they take the CUDA-core kernel (the tensor_cores fixture).
SUM_DTYPES = [*(pytest.param(t, False, id=str(t).removeprefix("torch.")) for t in DTYPES),
              pytest.param(torch.bfloat16, True, id="bfloat16-tensor-cores")]
# The suite's tolerances, and float64 held to float64 (the kernels accumulate in float64 there).
TOLERANCE = {**SUITE_TOLERANCE, torch.float64: 1e-12}
COL_TILE = 128  # kColTile in csrc/cuda/kernels.cuh
# sizeof(WalkSlot<T>) in csrc/cuda/kernels.cuh by accumulation type: int32 index, group and
# slot, then the value (after 4 bytes of padding for float64).
WALK_SLOT_BYTES = {torch.float32: 16, torch.float64: 24}
# SuffixSum<T> in csrc/cuda/kernels.cuh: the nested loss's S.
SUFFIX_SUM = {torch.float32: torch.float32, torch.float64: torch.float64,
              torch.bfloat16: torch.bfloat16, torch.float16: torch.float32}


# Stand-ins for the three c10/cuda headers that csrc/cuda/ops_cuda.cpp includes (the CPU torch
# wheel ships them, but not the library behind them): no device guard, the null stream, and a
# launch check.
CUDA_HEADER_STUBS = {
    "CUDAGuard.h": """#pragma once
#include <c10/core/Device.h>
namespace c10::cuda {
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
};
}  // namespace c10::cuda
""",
    "CUDAStream.h": """#pragma once
#include <cuda_runtime.h>
namespace c10::cuda {
inline cudaStream_t getCurrentCUDAStream() { return nullptr; }
}  // namespace c10::cuda
""",
    "CUDAException.h": """#pragma once
#include <c10/util/Exception.h>
#include <cuda_runtime.h>
#define C10_CUDA_CHECK(expression) \\
  TORCH_CHECK((expression) == cudaSuccess, "emulated CUDA call failed: ", #expression)
""",
}


# With SANITIZE_ENV=1 every library here is built with AddressSanitizer and
# UndefinedBehaviorSanitizer (tests/test_sanitized.py runs this file so, with their
# runtimes preloaded): a kernel's read or write past a tensor, its shared memory or a local
# array, or an overflowing signed index, then stops the process with a report.
SANITIZE_ENV = "SPARSECODE_EMULATOR_SANITIZE"
SANITIZERS = ("-Xcompiler", "-fsanitize=address", "-Xcompiler", "-fsanitize=undefined",
              "-Xcompiler", "-fno-omit-frame-pointer", "-Xcompiler", "-fno-sanitize-recover=all")


def sanitizers() -> tuple[str, ...]:
    """The sanitizers' compile and link flags when SANITIZE_ENV asks for them, else none."""
    return SANITIZERS if os.environ.get(SANITIZE_ENV) == "1" else ()


def host_compile(nvcc: str, source: Path, out: Path, *flags: str) -> None:
    """source -> out as host C++ by nvcc (-x c++: no __CUDACC__, CUDA's headers on the path)."""
    built = subprocess.run([nvcc, "-x", "c++", "-std=c++20", "-O1", "-Xcompiler", "-fPIC,-pthread",
                            *sanitizers(), *flags, "-c", str(source), "-o", str(out)],
                           capture_output=True, text=True)
    assert built.returncode == 0, f"{source.name}:\n{built.stderr[-4000:]}"


def link(nvcc: str, out: Path, objects: list[Path], *flags: str) -> Path:
    linked = subprocess.run([nvcc, "-shared", "-cudart=none", "-Xcompiler", "-pthread",
                             *sanitizers(), "-o", str(out), *map(str, objects), *flags],
                            capture_output=True, text=True)
    assert linked.returncode == 0, linked.stderr[-4000:]
    return out


@pytest.fixture(scope="module")
def emulated_build(tmp_path_factory) -> tuple[str, Path, list[Path]]:
    """(nvcc, build folder, objects): csrc/cuda/*.cu and the C entry points compiled as host C++
    over the warp emulator, once per session."""
    nvcc = nvcc_or_skip()
    where = tmp_path_factory.mktemp("emulated")
    (where / "emulator.h").write_text(EMULATOR)
    (where / "entry_points.cpp").write_text(ENTRY_POINTS)
    sources = [*sorted(CUDA_SOURCES.glob("*.cu")), where / "entry_points.cpp"]
    objects = [where / f"{source.stem}.o" for source in sources]
    flags = ("-include", str(where / "emulator.h"), f"-I{CUDA_SOURCES}")
    with ThreadPoolExecutor(max_workers=2) as pool:
        list(pool.map(lambda so: host_compile(nvcc, *so, *flags), zip(sources, objects)))
    return nvcc, where, objects


@pytest.fixture(scope="module")
def cuda_emulated(emulated_build) -> ctypes.CDLL:
    """Every launcher of csrc/cuda/kernels.cuh, through the C entry points, for ctypes."""
    nvcc, where, objects = emulated_build
    return ctypes.CDLL(str(link(nvcc, where / "libcuda_emulated.so", objects)))


@pytest.fixture(scope="module")
def cuda_ops(emulated_build):
    """The cuda backend's ops (csrc/cuda/ops_cuda.cpp over the emulated kernels) for CPU
    tensors, as torch.ops.sparsecode_emulated.*, with the schemas of torch.ops.sparsecode_C."""
    nvcc, where, objects = emulated_build
    stubs = where / "stubs"
    (stubs / "c10" / "cuda").mkdir(parents=True)
    for name, text in CUDA_HEADER_STUBS.items():
        (stubs / "c10" / "cuda" / name).write_text(text)
    abi = int(torch.compiled_with_cxx11_abi())
    flags = (f"-I{stubs}", *(f"-I{p}" for p in cpp_extension.include_paths()),
             f"-D_GLIBCXX_USE_CXX11_ABI={abi}", "-DSPARSECODE_CUDA_OPS_LIBRARY=sparsecode_emulated",
             "-DSPARSECODE_CUDA_OPS_KEY=CPU")
    glue = [CUDA_SOURCES / "ops_cuda.cpp", CUDA_SOURCES.parent / "checks.cpp"]
    glue_objects = [where / f"glue_{source.stem}.o" for source in glue]
    with ThreadPoolExecutor(max_workers=2) as pool:
        list(pool.map(lambda so: host_compile(nvcc, *so, *flags), zip(glue, glue_objects)))
    torch_lib = Path(torch.__file__).parent / "lib"
    library = link(nvcc, where / "libcuda_ops_emulated.so", [*objects, *glue_objects],
                   f"-L{torch_lib}", "-ltorch_cpu", "-lc10", f"-Xlinker=-rpath,{torch_lib}")
    definitions = torch.library.Library("sparsecode_emulated", "DEF")
    for name in OPS:
        schema = str(getattr(torch.ops.sparsecode_C, name).default._schema)
        definitions.define(schema.removeprefix("sparsecode_C::"))
    torch.ops.load_library(str(library))
    yield torch.ops.sparsecode_emulated
    del definitions


def call(lib: ctypes.CDLL, name: str, *arguments) -> None:
    """Calls the entry point `name`: tensors go as their data pointers (None as null), ints as
    int64 unless wrapped in ctypes.c_int."""
    converted = []
    for a in arguments:
        if isinstance(a, torch.Tensor):
            assert a.is_contiguous() and a.device.type == "cpu"
            converted.append(ctypes.c_void_p(a.data_ptr()))
        elif a is None:
            converted.append(ctypes.c_void_p(None))
        elif isinstance(a, ctypes.c_int):
            converted.append(a)
        else:
            converted.append(ctypes.c_int64(a))
    status = getattr(lib, name)(*converted)
    assert status == 0, f"{name} returned cudaError {status}"


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def poison(shape, dtype: torch.dtype) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype)


def random_code(B: int, n: int, k: int) -> torch.Tensor:
    """indices [B, k]: distinct latents per row but for one row holding a latent twice."""
    indices = random_indices(B, n, k).contiguous()
    if k > 1:
        indices[B - 1, 0] = indices[B - 1, k - 1]
    return indices


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,d,n,k", [(1, 7, 33, 1), (5, 130, 40, 3), (3, 64, 500, 300)])
def test_gather_rows_sum(cuda_emulated, B, d, n, k, dtype, seed):
    """out[b] = bias + sum_j coef[b, j] rows[indices[b, j]]; k = 300 spans two staged chunks of
    256 pairs. The one pair with a zero coefficient has a row of its own, NaN: with skip_zero
    it is not read, without it the sum must be NaN."""
    coef = torch.randn(B, k, dtype=acc_dtype(dtype))
    coef[0, 0] = 0.0
    indices = torch.randint(0, n - 1, (B, k))
    indices[0, 0] = n - 1
    rows = torch.randn(n, d).to(dtype)
    rows[n - 1] = float("nan")
    bias = torch.randn(d).to(dtype)
    want = torch.einsum("bk,bkd->bd", coef.double(), rows.double().nan_to_num()[indices])
    for with_bias in [True, False]:
        out = poison((B, d), dtype)
        call(cuda_emulated, f"gather_rows_sum_{SUFFIX[dtype]}", coef, indices, rows,
             bias if with_bias else None, B, k, d, ctypes.c_int(1), out)
        expected = want + bias.double() if with_bias else want
        assert_close(out, expected, TOLERANCE[dtype], f"gather_rows_sum, bias={with_bias}")
    out = poison((B, d), dtype)
    call(cuda_emulated, f"gather_rows_sum_{SUFFIX[dtype]}", coef, indices, rows, bias, B, k, d,
         ctypes.c_int(0), out)
    assert bool(out[0].isnan().all()), "without skip_zero the NaN row is read"
    if B > 1:
        assert_close(out[1:], want[1:] + bias.double(), TOLERANCE[dtype], "the other rows")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,cols", [(1, 1), (33, 70), (64, 32)])
def test_transpose(cuda_emulated, rows, cols, dtype, seed):
    matrix = torch.randn(rows, cols).to(dtype)
    out = poison((cols, rows), dtype)
    call(cuda_emulated, f"transpose_{SUFFIX[dtype]}", matrix, rows, cols, out)
    assert torch.equal(out, matrix.t())


def latent_pairs(indices: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(order [P], offsets [n + 1]): the flat pairs sorted by latent (stable), as the host glue
    groups them."""
    flat = indices.reshape(-1)
    order = torch.sort(flat, stable=True).indices
    offsets = torch.zeros(n + 1, dtype=torch.int64)
    offsets[1:] = torch.bincount(flat, minlength=n).cumsum(0)
    return order, offsets


def vector_width(d: int, dtype: torch.dtype) -> int:
    """rows_sum_vector_width for CPU tensors (torch aligns their storage to 64 bytes)."""
    vec = 16 // torch.tensor([], dtype=dtype).element_size()
    return vec if d % vec == 0 else 1


@pytest.mark.parametrize("dtype,tensor_cores", SUM_DTYPES, indirect=["tensor_cores"])
@pytest.mark.parametrize("B,d,n,k", [(1, 7, 33, 1), (5, 130, 40, 3), (33, 64, 70, 32),
                                     (40, 264, 70, 5), (300, 16, 40, 3), (200, 24, 9, 3),
                                     (300, 40, 96, 3)])
def test_latent_rows_sum(cuda_emulated, B, d, n, k, dtype, tensor_cores, seed):
    """out[i] = sum over latent i's pairs of coef * src[row] (plain, transposed with coef_sum,
    and fused with the pairs' dots against weights), with src_rows into a taller src, zero
    coefficients and empty latents; d = 64, 264, 16 and 24 take the vector path in every dtype
    (bfloat16 with SPARSECODE_TENSOR_CORES=1: the tensor-core kernel; d = 264 has two column
    tiles, the second mostly past d).
    Latent 0 is in every row: at B = 300 its 300 pairs (over kLongSegment, 256) take the pass in
    which the whole block sums one latent, and so do latent 5's, between short latents of the
    same warp (the tensor-core kernel skips both); at B = 200 its 200 pairs, and the other
    latents' 50 or so, span several chunks of 32 pairs in the pass where a warp sums whole
    latents. The transposed sums store 16 bytes of consecutive latents a lane where the pass
    sums all of them and n keeps the rows aligned: n = 96 and 40 (and 70 in float64) in the
    latent tiles that it sums whole, an element at a time elsewhere (the
    tile of latents 0 and 5 at B = 300, partial tiles, other n)."""
    indices = random_code(B, n, k)
    indices[:, 0] = 0  # latent 0 in every row: a long segment
    if B == 300:
        indices[:, 1] = 5
    order, offsets = latent_pairs(indices, n)
    P = B * k
    coef = torch.randn(P, dtype=acc_dtype(dtype))
    coef[::5] = 0.0
    src_rows = torch.randint(0, 2 * B, (P,))
    src = torch.randn(2 * B, d).to(dtype)
    flat = indices.reshape(-1)
    want = grouped_reference(coef, indices, src, src_rows, n)
    want_sum = torch.zeros(n, dtype=torch.float64).index_add_(0, flat, coef.double())
    rows_sorted, coef_sorted = src_rows[order].contiguous(), coef[order].contiguous()
    tol = TOLERANCE[dtype]
    name = SUFFIX[dtype]

    out = poison((n, d), dtype)
    call(cuda_emulated, f"latent_rows_sum_{name}", offsets, rows_sorted, coef_sorted, src, n, d,
         ctypes.c_int(0), out, None, None, None)
    assert_close(out, want, tol, "out")

    # Transposed, with the product of bias weights [d, n] and the coef sums: one partial a pass
    # and latent tile, the long latents' pass writing only its tiles (the caller zeroes it).
    out_t, coef_sum = poison((d, n), dtype), poison((n,), dtype)
    bias_weights = torch.randn(d, n).to(dtype)
    bias_partial = poison((2, -(-n // 32), d), acc_dtype(dtype))
    bias_partial[1] = 0.0
    call(cuda_emulated, f"latent_rows_sum_{name}", offsets, rows_sorted, coef_sorted, src, n, d,
         ctypes.c_int(1), out_t, coef_sum, bias_weights, bias_partial)
    assert_close(out_t, want.t(), tol, "out, transposed")
    assert_close(coef_sum, want_sum, tol, "coef_sum")
    assert_close(bias_partial.double().sum((0, 1)), bias_weights.double() @ want_sum, tol,
                 "bias weights @ coef sums")

    weights = torch.randn(n, d).to(dtype)
    tiles = -(-d // (32 * vector_width(d, dtype)))
    out_d, partial = poison((n, d), dtype), poison((tiles, P), acc_dtype(dtype))
    call(cuda_emulated, f"latent_rows_sum_dots_{name}", offsets, rows_sorted, order.contiguous(),
         coef_sorted, src, weights, n, d, P, out_d, partial)
    assert_close(out_d, want, tol, "out, with the dots")
    want_dots = (src.double()[src_rows] * weights.double()[flat]).sum(1)
    assert_close(partial.double().sum(0), want_dots, tol, "dots")


@pytest.mark.parametrize("dtype,tensor_cores", SUM_DTYPES, indirect=["tensor_cores"])
def test_latent_rows_sum_skips_the_rows_of_zero_coefficients(cuda_emulated, dtype, tensor_cores):
    """A pair of coefficient 0 or -0 adds nothing and its src row is not read, as on the CPU:
    NaN rows there leave the sums, plain and transposed, as they are (the tensor-core kernel
    too)."""
    n, d = 40, 16
    offsets = torch.tensor([0] * 4 + [3] * (n - 3))
    rows = torch.tensor([0, 1, 2])
    coef = torch.tensor([0.0, -0.0, 1.5], dtype=acc_dtype(dtype))
    src = torch.randn(3, d).to(dtype)
    src[:2] = float("nan")
    want = torch.zeros(n, d, dtype=torch.float64)
    want[3] = 1.5 * src[2].double()
    out, out_t = poison((n, d), dtype), poison((d, n), dtype)
    name = SUFFIX[dtype]
    call(cuda_emulated, f"latent_rows_sum_{name}", offsets, rows, coef, src, n, d,
         ctypes.c_int(0), out, None, None, None)
    call(cuda_emulated, f"latent_rows_sum_{name}", offsets, rows, coef, src, n, d,
         ctypes.c_int(1), out_t, None, None, None)
    assert_close(out, want, TOLERANCE[dtype], "out")
    assert_close(out_t, want.t(), TOLERANCE[dtype], "out, transposed")


@pytest.mark.parametrize("tensor_cores", [True], indirect=True)
def test_tensor_core_sums_keep_the_coefficients_float32_bits(cuda_emulated, tensor_cores):
    """The bfloat16 tensor-core sums take each float32 coefficient as two bfloat16 (hi + lo):
    latent 3's pairs, coefficients 1 + 2^-12 and -1 on equal rows of ones, sum to 2^-12 (with
    the hi parts alone, 0), in every form of the sum; the other latents' rows are zero."""
    n, d = 40, 16
    offsets = torch.tensor([0] * 4 + [2] * (n - 3))
    rows = torch.tensor([0, 1])
    coef = torch.tensor([1 + 2.0**-12, -1.0])
    src = torch.ones(2, d, dtype=torch.bfloat16)
    want = torch.zeros(n, d, dtype=torch.bfloat16)
    want[3] = 2.0**-12
    out = poison((n, d), torch.bfloat16)
    call(cuda_emulated, "latent_rows_sum_bf16", offsets, rows, coef, src, n, d, ctypes.c_int(0),
         out, None, None, None)
    assert torch.equal(out, want)
    out_t = poison((d, n), torch.bfloat16)
    call(cuda_emulated, "latent_rows_sum_bf16", offsets, rows, coef, src, n, d, ctypes.c_int(1),
         out_t, None, None, None)
    assert torch.equal(out_t, want.t())
    out_d, partial = poison((n, d), torch.bfloat16), poison((1, 2), torch.float32)
    weights = torch.ones(n, d, dtype=torch.bfloat16)
    call(cuda_emulated, "latent_rows_sum_dots_bf16", offsets, rows, torch.arange(2), coef, src,
         weights, n, d, 2, out_d, partial)
    assert torch.equal(out_d, want)
    assert torch.equal(partial, torch.full((1, 2), float(d)))


def test_only_tensor_cores_on_takes_the_per_latent_sums_to_the_tensor_cores(cuda_emulated,
                                                                              monkeypatch):
    """The bfloat16 sums run on the CUDA cores unless SPARSECODE_TENSOR_CORES is 1 (read at each
    launch). Told apart by a NaN in latent 3's src row: the tensor-core kernel multiplies it into
    the columns of all 8 latents of its warp (latent 2's among them), the CUDA-core kernel into
    latent 3's alone."""
    n, d = 40, 16
    offsets = torch.tensor([0, 0, 0, 1] + [2] * (n - 2))  # latent 2: pair 0, latent 3: pair 1
    rows = torch.tensor([0, 1])
    coef = torch.tensor([2.0, 1.0])
    src = torch.ones(2, d, dtype=torch.bfloat16)
    src[1, 5] = float("nan")

    def summed() -> torch.Tensor:
        out = poison((n, d), torch.bfloat16)
        call(cuda_emulated, "latent_rows_sum_bf16", offsets, rows, coef, src, n, d,
             ctypes.c_int(0), out, None, None, None)
        return out

    monkeypatch.delenv("SPARSECODE_TENSOR_CORES", raising=False)
    for setting, spread in [(None, False), ("0", False), ("1", True)]:
        if setting is not None:
            monkeypatch.setenv("SPARSECODE_TENSOR_CORES", setting)
        out = summed()
        assert bool(out[3, 5].isnan()) and bool(out[2, 5].isnan()) == spread, setting
        if not spread:
            assert torch.equal(out[2], torch.full((d,), 2.0, dtype=torch.bfloat16))


def topk_rule(pre: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, indices) [B, k]: each row's k largest entries of pre (NaN above every number,
    -0 equal to +0, the lower column among equals), ascending by column; values through relu."""
    value = pre.double().nan_to_num(nan=float("inf"))
    order = torch.sort(value, dim=1, descending=True, stable=True).indices
    order = order.gather(1, torch.sort(pre.isnan().gather(1, order).int(), dim=1,
                                       descending=True, stable=True).indices)
    indices = order[:, :k].sort(1).values
    return torch.relu(pre.gather(1, indices)), indices


def fold_and_finish(cuda_emulated, pre: torch.Tensor, k: int,
                    width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, indices) [B, k] of the cuda encode's selection on pre [B, n]: the kept slots
    start empty, topk_fold takes pre's column chunks of `width` (the last one narrower) in
    order, and topk_finish writes the result (outputs poisoned first)."""
    B, n = pre.shape
    kpad = 32 * max(1, 1 << max(0, (k - 1).bit_length() - 5))
    keep_key = torch.zeros(B, kpad, dtype=torch.int32)
    keep_id = (2**31 - 1 - torch.arange(kpad, dtype=torch.int32)).expand(B, kpad).contiguous()
    name = SUFFIX[pre.dtype]
    for c0 in range(0, n, width):
        chunk = pre[:, c0:c0 + width].contiguous()
        call(cuda_emulated, f"topk_fold_{name}", chunk, B, chunk.shape[1], c0, k, keep_key,
             keep_id)
    values, indices = poison((B, k), pre.dtype), torch.full((B, k), -7, dtype=torch.int64)
    call(cuda_emulated, f"topk_finish_{name}", keep_key, keep_id, B, k, values, indices)
    return values, indices


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,n,k,width", [(3, 40, 1, 40), (5, 300, 3, 64), (4, 700, 33, 256),
                                         (2, 1000, 64, 333), (3, 600, 256, 512),
                                         (2, 300, 40, 300), (1, 256, 256, 100)])
def test_topk_fold_and_finish(cuda_emulated, B, n, k, width, dtype, seed):
    """The cuda encode's running top k over column chunks of `width` (the last one narrower;
    width 333, 300 and 100 are not multiples of 8: the element-at-a-time path) against the rule:
    coarse values with many exact ties, -0 and +0, NaN and -inf entries, k = 1, k past one and
    two slots a lane, k = n. The kept slots start empty; the first chunk puts its first k
    columns in them (but at width 100 < k = 256), and the finish sorts them by column."""
    pre = (torch.randn(B, n) * 4).round().to(dtype)  # integers: ties everywhere
    pre[0, ::7] = -0.0
    pre[0, 3::11] = 0.0
    pre[-1, 5] = float("nan")
    pre[-1, 9] = float("-inf")
    values, indices = fold_and_finish(cuda_emulated, pre, k, width)
    want_values, want_indices = topk_rule(pre, k)
    assert torch.equal(indices, want_indices)
    torch.testing.assert_close(values, want_values, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("k,dtype", [(1, torch.bfloat16), (64, torch.bfloat16),
                                     (200, torch.float32)])
def test_topk_fold_of_the_encodes_chunks(cuda_emulated, k, dtype, seed):
    """The running top k over chunks of 1024 columns (the encode's are 2048 at B = 8192) on
    rows that take each of the fold's paths: a random row (the first chunk selects from the
    columns above its own bound, the next selects or inserts what beats the worst kept slot),
    a row rising along its columns (more candidates than the buffer holds: the chunk taken a
    column at a time), and a row of a few distinct values (ties at the k-th value)."""
    n, width, B = 2 * 1024, 1024, 3
    pre = torch.randn(B, n)
    pre[1] = torch.linspace(-3.0, 3.0, n)
    pre[2] = torch.randint(0, 6, (n,)).float()
    pre = pre.to(dtype)
    values, indices = fold_and_finish(cuda_emulated, pre, k, width)
    want_values, want_indices = topk_rule(pre, k)
    assert torch.equal(indices, want_indices)
    torch.testing.assert_close(values, want_values, rtol=0, atol=0)


def test_latent_rows_sum_refuses_rows_past_32_bit_addressing(cuda_emulated):
    """A src row of 2^32 bytes or more, or 2^31 pairs or more for the dots, is refused before
    any launch (the kernels address a pair's row and its id in 32 bits): the launchers return
    cudaErrorInvalidConfiguration (9) without reading anything (null pointers here)."""
    wide = 2**31  # bfloat16 elements: a row of 2^32 bytes
    entry = cuda_emulated.latent_rows_sum_bf16
    null = ctypes.c_void_p(None)
    assert entry(null, null, null, null, ctypes.c_int64(1), ctypes.c_int64(wide), 0, null,
                 null, null, null) == 9
    dots = cuda_emulated.latent_rows_sum_dots_bf16
    assert dots(null, null, null, null, null, null, ctypes.c_int64(1), ctypes.c_int64(8),
                ctypes.c_int64(2**31), null, null) == 9
    assert dots(null, null, null, null, null, null, ctypes.c_int64(1), ctypes.c_int64(wide),
                ctypes.c_int64(1), null, null) == 9


def test_latent_rows_sum_of_float_rows_into_half(cuda_emulated, seed):
    """The float16 nested loss's grad_W_dec: float32 src (its S) summed into float16 out."""
    B, d, n, k = 9, 36, 50, 4
    indices = random_code(B, n, k)
    order, offsets = latent_pairs(indices, n)
    coef = torch.randn(B * k)
    src = torch.randn(B, d)
    rows = torch.arange(B).repeat_interleave(k)
    want = grouped_reference(coef, indices, src, rows, n)
    out = poison((n, d), torch.float16)
    call(cuda_emulated, "latent_rows_sum_f32_f16", offsets, rows[order].contiguous(),
         coef[order].contiguous(), src, n, d, ctypes.c_int(0), out, None)
    assert_close(out, want, TOLERANCE[torch.float16], "float16 out")


# (B, d, n, [k], prefix sizes): k = 1; k past one or two chunks of 32 slots and not a multiple
# of the 8-slot batches; d past one column tile and not a multiple of 4 (the strided path); an
# empty first group; a single group; B not a multiple of the 4 rows of a block. Each problem
# also has a latent twice in one row and a zero value.
NESTED = [
    (5, 32, 33, [3], [5, 20, 33]),
    (3, 8, 40, [1], [10, 40]),
    (6, 130, 200, [40], [7, 50, 120, 200]),
    (4, 64, 300, [70], [1, 100, 300]),
    (2, 16, 50, [9], [50]),
]


@pytest.mark.parametrize("dtype,tensor_cores", SUM_DTYPES, indirect=["tensor_cores"])
@pytest.mark.parametrize("B,d,n,ks,sizes", NESTED)
def test_nested_loss(cuda_emulated, B, d, n, ks, sizes, dtype, tensor_cores, seed):
    """The walk plan (each row's slots in index order, with their groups and values), the
    forward walk and the backward's reverse walk against the float64 reference's losses,
    reconstruction and gradients (grad_W_dec as the host glue sums S)."""
    (k,) = ks
    G = len(sizes)
    x, W_dec, b_dec, values, indices, weights = nested_problem(B, d, n, k, sizes, dtype)
    grad_loss = torch.randn((), dtype=torch.float64)
    grad_prefix = torch.randn(G, dtype=torch.float64)
    grad_x_hat = (torch.randn(B, d) / B).to(dtype)
    scale = 2 * (grad_loss * torch.tensor(weights, dtype=torch.float64) + grad_prefix) / B
    tol = TOLERANCE[dtype]
    name = SUFFIX[dtype]

    x64, v64, W64, b64 = (t.double().requires_grad_() for t in (x, values, W_dec, b_dec))
    loss, prefix_losses = reference.nested_prefix_loss(x64, v64, indices, W64, b64, sizes,
                                                       weights)
    x_hat = reference.sparse_decode(v64, indices, W64, b64)
    grads = torch.autograd.grad([loss, prefix_losses, x_hat], [x64, v64, W64],
                                [grad_loss, grad_prefix, grad_x_hat.double()])

    group = torch.full((B, k), -1, dtype=torch.int32)
    walk = torch.full((B, k, WALK_SLOT_BYTES[acc_dtype(dtype)]), 255, dtype=torch.uint8)
    call(cuda_emulated, f"prefix_walk_plan_{name}", indices, values, B, k, torch.tensor(sizes),
         ctypes.c_int(G), group, walk)
    assert torch.equal(group.long(), torch.bucketize(indices, torch.tensor(sizes), right=True))
    walk_index, walk_group, slot = (walk[..., 4 * f:4 * f + 4].contiguous().view(torch.int32)
                                    .squeeze(-1).long() for f in range(3))
    walk_value = walk[..., -acc_dtype(dtype).itemsize:].contiguous().view(acc_dtype(dtype))
    assert torch.equal(torch.sort(slot, 1).values, torch.arange(k).expand(B, k))
    assert torch.equal(walk_index, indices.gather(1, slot))
    assert bool((walk_index[:, 1:] >= walk_index[:, :-1]).all()), "the walk is in index order"
    assert torch.equal(walk_group, group.long().gather(1, slot))
    assert torch.equal(walk_value.squeeze(-1), values.gather(1, slot).to(acc_dtype(dtype)))

    tiles = -(-d // COL_TILE)
    out_x_hat, resid = poison((B, d), dtype), poison((2, B, d), dtype)
    losses = poison((tiles, B, G), acc_dtype(dtype))
    call(cuda_emulated, f"nested_loss_forward_{name}", x, b_dec, walk, W_dec, B, k, d,
         ctypes.c_int(G), out_x_hat, losses, resid)
    assert_close(out_x_hat, x_hat, tol, "x_hat")
    assert_close(losses.double().sum(0).mean(0), prefix_losses, tol, "prefix losses")
    # hi + lo keeps about 16 significant bits in bfloat16, 22 in float16.
    assert_close(resid.double().sum(0), x64 - x_hat, min(tol, 1e-4), "resid")

    grad_x = poison((B, d), dtype)
    S = poison((G, B, d), SUFFIX_SUM[dtype])
    dots = poison((tiles, B, k), acc_dtype(dtype))
    cum_scale = torch.cat([torch.zeros(1, dtype=torch.float64), scale.cumsum(0)])
    call(cuda_emulated, f"nested_loss_backward_{name}", resid, walk, W_dec, grad_x_hat, cum_scale,
         B, k, d, ctypes.c_int(G), grad_x, S, dots)
    assert_close(grad_x, grads[0], tol, "grad_x")
    assert_close(-dots.double().sum(0), grads[1], tol, "grad_values")
    # grad_W_dec as the host glue makes it: -values * the row of S of each slot's group (rows
    # of groups a row has no slot in stay unwritten, NaN, and are never read).
    src_rows = group.long() * B + torch.arange(B)[:, None]
    grad_W = grouped_reference(-values.double(), indices, S.reshape(G * B, d), src_rows, n)
    assert_close(grad_W, grads[2], tol, "grad_W_dec")


def nested_problem(B: int, d: int, n: int, k: int, sizes: list[int], dtype: torch.dtype):
    """x [B, d], W_dec [n, d], b_dec [d], values [B, k] (some zero, one -0), indices [B, k]
    (distinct latents but for one row holding one twice) and prefix weights [G]."""
    x = torch.randn(B, d).to(dtype)
    W_dec = (torch.randn(n, d) / d**0.5).to(dtype)
    b_dec = (torch.randn(d) * 0.1).to(dtype)
    values = torch.rand(B, k).to(dtype)
    values[0, 0] = 0.0  # a zero value still has a gradient
    values[-1, -1] = -0.0
    return x, W_dec, b_dec, values, random_code(B, n, k), (torch.rand(len(sizes)) + 0.1).tolist()


MMA_COL_TILE = 256  # kMmaColTile in csrc/cuda/kernels.cuh
NESTED_MMA = [
    (1, 8, 33, 1, [5, 33]),
    (5, 264, 40, 3, [8, 20, 40]),
    (17, 24, 100, 17, [1, 2, 3, 4, 5, 6, 7, 100]),
    (6, 512, 70, 33, [70]),
    (20, 16, 300, 40, [1, 100, 300]),
    (3, 40, 60, 32, [10, 60]),
]


@pytest.mark.parametrize("B,d,n,k,sizes", NESTED_MMA)
def test_nested_prefix_sums_on_tensor_cores(cuda_emulated, B, d, n, k, sizes, seed):
    """The bfloat16 tensor-core pass over the rows, against the float64 reference's losses,
    reconstruction and gradients: as the loss's forward (scale 2 w / B: x_hat, the squared
    norms, and S, the suffix sums its backward takes, from which grad_x = S_0), and as a
    backward under other upstream gradients (their scale and grad_x_hat: S and grad_x), with
    grad_values and grad_W_dec made from S as the pass over the pairs makes them. k = 1, 3, 17,
    33 and 40 leave steps part empty; d = 8, 24 and 16 leave lanes past d, d = 264 a second
    column tile mostly past d; G = 8 fills the mma's groups; B = 17 and 20 leave a block part
    empty."""
    G = len(sizes)
    x, W_dec, b_dec, values, indices, weights = nested_problem(B, d, n, k, sizes, torch.bfloat16)
    tol = TOLERANCE[torch.bfloat16]
    tiles = -(-d // MMA_COL_TILE)
    x64, v64, W64, b64 = (t.double().requires_grad_() for t in (x, values, W_dec, b_dec))
    loss, prefix_losses = reference.nested_prefix_loss(x64, v64, indices, W64, b64, sizes,
                                                       weights)
    want_x_hat = reference.sparse_decode(v64, indices, W64, b64)
    src_rows = torch.bucketize(indices, torch.tensor(sizes), right=True) * B + \
        torch.arange(B)[:, None]

    def check_grads(S: torch.Tensor, grad_x: torch.Tensor, grads, upstream, what: str) -> None:
        # grad_x and grad_values sum terms that can cancel: their errors are measured against
        # the size of their terms, as tests/test_nested_prefix_loss.py measures them.
        leaves = [t.detach() for t in (x64, v64, W64, b64)]
        scaled = nested_tests.scaled_residuals(*leaves[:2], indices, *leaves[2:], sizes, weights,
                                               upstream)
        S_rows = S.reshape(G * B, d).double()[src_rows]
        grad_values = -(W_dec.double()[indices] * S_rows).sum(-1)
        for name, got, want, terms in (
            ("x", grad_x, grads[0], scaled.abs().sum(0)),
            ("values", grad_values, grads[1],
             nested_tests.values_grad_terms(scaled, indices, leaves[2], sizes, upstream[2])),
        ):
            err = ((got.double() - want).norm() / terms.norm()).item()
            assert err <= tol, f"grad {name}, {what}: error {err:.3e} of its terms' size"
        grad_W = grouped_reference(-values.double(), indices, S.reshape(G * B, d), src_rows, n)
        assert_close(grad_W, grads[2], tol, f"grad_W_dec, {what}")

    scale = torch.tensor([2 * w / B for w in weights], dtype=torch.float32)
    S, x_hat = poison((G, B, d), torch.bfloat16), poison((B, d), torch.bfloat16)
    partial = poison((tiles, B, G), torch.float32)
    call(cuda_emulated, "nested_prefix_sums_bf16", x, b_dec, values, indices, W_dec,
         torch.tensor(sizes), ctypes.c_int(G), scale, None, B, k, d, S, x_hat, partial, None)
    assert_close(x_hat, want_x_hat, tol, "x_hat")
    assert_close(partial.double().sum(0).mean(0), prefix_losses, tol, "prefix losses")
    check_grads(S, S[0], torch.autograd.grad(loss, [x64, v64, W64], retain_graph=True),
                [torch.tensor(1.0, dtype=torch.float64), torch.zeros(G, dtype=torch.float64),
                 torch.zeros(B, d, dtype=torch.float64)], "from the loss alone")

    grad_loss = torch.randn((), dtype=torch.float64)
    grad_prefix = torch.randn(G, dtype=torch.float64)
    grad_x_hat = (torch.randn(B, d) / B).to(torch.bfloat16)
    scale = (2 * (grad_loss * torch.tensor(weights, dtype=torch.float64) + grad_prefix) / B).float()
    S, grad_x = poison((G, B, d), torch.bfloat16), poison((B, d), torch.bfloat16)
    call(cuda_emulated, "nested_prefix_sums_bf16", x, b_dec, values, indices, W_dec,
         torch.tensor(sizes), ctypes.c_int(G), scale, grad_x_hat, B, k, d, S, None, None, grad_x)
    grads = torch.autograd.grad([loss, prefix_losses, want_x_hat], [x64, v64, W64],
                                [grad_loss, grad_prefix, grad_x_hat.double()])
    check_grads(S, grad_x, grads, [grad_loss, grad_prefix, grad_x_hat.double()],
                "under upstream gradients")


def test_nested_prefix_sums_read_only_the_rows_of_a_rows_nonzero_values(cuda_emulated):
    """A slot of value 0 or -0 adds nothing and its decoder row is not read, nor is a row of
    another row's slot: NaN in the rows of row 0's zero slot and row 1's slots leaves row 0's
    outputs as they are with finite rows, and row 1's when only its zero slot's row is NaN."""
    x, W_dec, b_dec, values, _, _ = nested_problem(2, 16, 40, 3, [40], torch.bfloat16)
    indices = torch.tensor([[0, 1, 2], [3, 4, 5]])
    values[0, 1], values[1, 2] = 0.0, -0.0
    outputs = []
    for poisoned in (0.0, float("nan")):
        W_dec[[1, 5]] = poisoned
        S, x_hat, partial = (poison(shape, dtype) for shape, dtype in
                             [((1, 2, 16), torch.bfloat16), ((2, 16), torch.bfloat16),
                              ((1, 2, 1), torch.float32)])
        call(cuda_emulated, "nested_prefix_sums_bf16", x, b_dec, values, indices, W_dec,
             torch.tensor([40]), ctypes.c_int(1), torch.ones(1), None, 2, 3, 16, S, x_hat,
             partial, None)
        outputs.append((S, x_hat, partial))
    for clean, poisoned in zip(*outputs, strict=True):
        assert torch.isfinite(clean).all() and torch.equal(clean, poisoned)
    W_dec[[3, 4]] = float("nan")  # row 1's nonzero slots
    S, x_hat, partial = (poison(t.shape, t.dtype) for t in outputs[0])
    call(cuda_emulated, "nested_prefix_sums_bf16", x, b_dec, values, indices, W_dec,
         torch.tensor([40]), ctypes.c_int(1), torch.ones(1), None, 2, 3, 16, S, x_hat, partial,
         None)
    for got, clean in zip((S[:, 0], x_hat[0], partial[:, 0]),
                          (t[:, 0] if t.dim() == 3 else t[0] for t in outputs[0]), strict=True):
        assert torch.equal(got, clean)


def test_nested_prefix_sums_refuse_what_they_cannot_run(cuda_emulated):
    """The tensor-core pass returns an error, writing nothing, for k = 0, d not a multiple of 8,
    more than 8 prefix sizes, or a misaligned tensor."""
    x, W_dec, b_dec, values, indices, _ = nested_problem(3, 16, 40, 2, [40], torch.bfloat16)
    sizes = torch.tensor([40] * 9)
    S = poison((1, 3, 16), torch.bfloat16)
    base = [x, b_dec, values, indices, W_dec, sizes, ctypes.c_int(1), torch.ones(1), None, 3, 2,
            16, S, None, None, None]
    for at, bad in [(10, 0), (11, 12), (6, ctypes.c_int(9))]:
        arguments = list(base)
        arguments[at] = bad
        with pytest.raises(AssertionError, match="returned cudaError"):
            call(cuda_emulated, "nested_prefix_sums_bf16", *arguments)
    misaligned = torch.empty(3 * 16 + 1, dtype=torch.bfloat16)[1:].view(3, 16).copy_(x)
    with pytest.raises(AssertionError, match="returned cudaError"):
        call(cuda_emulated, "nested_prefix_sums_bf16", misaligned, *base[1:])
    assert S.isnan().all()


@pytest.mark.parametrize("B,d,n,k", [(5, 24, 130, 8), (17, 264, 40, 3)])
def test_triton_backend_runs_bfloat16_nested_loss_on_the_tensor_cores(cuda_ops, monkeypatch, B, d,
                                                                      n, k, seed):
    """The triton backend's bfloat16 nested loss with the extension's ops taken from the emulated
    glue and kernels, as on an sm_80+ GPU: no Triton walk runs; the loss, prefix losses, x_hat
    and every gradient, from the loss alone and under upstream gradients on all three outputs,
    match the reference; the backward from the loss alone (the forward's suffix sums) gives the
    bits of the backward under upstream zeros on the prefix losses (the suffix sums made again);
    more than 8 prefix sizes, or SPARSECODE_TENSOR_CORES unset or 0, go back to the walk; the
    backward's op passes torch.library.opcheck."""
    from sparsecode.triton_kernels import nested_prefix_loss as nested

    monkeypatch.setenv("SPARSECODE_TENSOR_CORES", "1")
    monkeypatch.setattr(nested, "_has_tensor_cores", lambda device: True)
    monkeypatch.setattr(nested, "compiled_kernels", lambda device: cuda_ops)
    walks = []
    walk = nested._walk
    monkeypatch.setattr(nested, "_walk", lambda *args: walks.append(args) or walk(*args))
    x, values, indices, W_dec, b_dec, sizes, weights = nested_tests.make_problem(
        B, d, n, k, torch.bfloat16)
    leaves = [t.requires_grad_() for t in (x, values, W_dec, b_dec)]
    tol = TOLERANCE[torch.bfloat16]
    for loss_only in (True, False):
        outputs = nested_prefix_loss_and_decode(*leaves[:2], indices, *leaves[2:], sizes,
                                                weights, backend="triton")
        nested_tests.check_against_reference(outputs, leaves, indices, sizes, weights, tol,
                                             loss_only=loss_only)
    loss, prefix_losses, _ = nested_prefix_loss_and_decode(*leaves[:2], indices, *leaves[2:],
                                                           sizes, weights, backend="triton")
    from_loss = torch.autograd.grad(loss, leaves, retain_graph=True)
    again = torch.autograd.grad([loss, prefix_losses], leaves,
                                [torch.tensor(1.0), torch.zeros(len(sizes))])
    for name, a, b in zip(["x", "values", "W_dec", "b_dec"], from_loss, again, strict=True):
        assert torch.equal(a, b), f"grad {name}"
    assert walks == []

    many = [1 + i for i in range(8)] + [n]
    nested_prefix_loss_and_decode(x, values, indices, W_dec, b_dec, many, [1.0] * 9,
                                  backend="triton")
    assert len(walks) == 1
    for setting in ("0", None):
        with monkeypatch.context() as switched:
            if setting is None:
                switched.delenv("SPARSECODE_TENSOR_CORES")
            else:
                switched.setenv("SPARSECODE_TENSOR_CORES", setting)
            nested_prefix_loss_and_decode(x, values, indices, W_dec, b_dec, sizes, weights,
                                          backend="triton")
    assert len(walks) == 3

    # The backward's op under other upstream gradients passes torch.library's checks (its fake
    # for torch.compile among them).
    upstream = (torch.tensor(1.0), torch.randn(len(sizes)), torch.randn(B, d).to(x.dtype))
    inputs = [t.detach() for t in (x, values)] + [indices] + [t.detach() for t in (W_dec, b_dec)]
    torch.library.opcheck(torch.ops.sparsecode.nested_prefix_loss_suffix_tensor_cores.default,
                          (*upstream, *inputs, sizes, weights))


def test_nested_prefix_sums_glue(cuda_ops, seed):
    """The op around the tensor-core pass: inputs at a storage offset that is not a multiple of
    16 bytes give the bits of aligned ones (the glue copies them); what the kernel cannot run is
    refused with the fix named."""
    x, W_dec, b_dec, values, indices, _ = nested_problem(5, 16, 40, 3, [10, 40], torch.bfloat16)
    scale, grad_x_hat = torch.rand(2), torch.randn(5, 16).to(torch.bfloat16)

    def run(x, W_dec, grad_x_hat, *, values=values, b_dec=b_dec, sizes=(10, 40), scale=scale,
            loss=False):
        return cuda_ops.nested_prefix_sums(x, values, indices, W_dec, b_dec, list(sizes), scale,
                                           grad_x_hat, True, loss)

    def shifted(t: torch.Tensor) -> torch.Tensor:
        out = torch.empty(t.numel() + 1, dtype=t.dtype)[1:].view(t.shape)
        assert out.data_ptr() % 16 != 0
        return out.copy_(t)

    want = run(x, W_dec, grad_x_hat)
    assert want[0].shape == (2, 5, 16) and want[1].shape == (5, 16)
    got = run(shifted(x), shifted(W_dec), shifted(grad_x_hat), b_dec=shifted(b_dec))
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    x_hat, partial = run(x, W_dec, None, loss=True)[2:]
    assert x_hat.shape == (5, 16) and partial.shape == (1, 5, 2)

    with pytest.raises(RuntimeError, match="runs bfloat16 inputs"):
        run(x.float(), W_dec.float(), None, values=values.float(), b_dec=b_dec.float())
    with pytest.raises(RuntimeError, match="at most 8 prefix sizes"):
        run(x, W_dec, None, sizes=range(32, 41), scale=torch.rand(9))
    with pytest.raises(RuntimeError, match="scale must be a float32"):
        run(x, W_dec, None, scale=scale.double())


@pytest.mark.parametrize("dtype,tensor_cores", SUM_DTYPES, indirect=["tensor_cores"])
@pytest.mark.parametrize("B,d,n,k", [(1, 7, 33, 1), (5, 130, 40, 3), (9, 64, 100, 20)])
def test_cuda_backend_ops_match_cpp(cuda_ops, B, d, n, k, dtype, tensor_cores, seed):
    """Every op of the cuda backend (host glue and kernels) on CPU tensors against the cpp
    backend's on the same inputs: the encode's selected values and reconstruction, then, for
    the cpp code, each backward, the decode, the per-latent sums (with src_rows, and latent 0
    in every row) and the nested loss forward and backward. (The kernel tests above cover the
    dense-latent pass, which needs more rows than these.)"""
    C = torch.ops.sparsecode_C
    tol = 2 * TOLERANCE[dtype]  # each backend is within TOLERANCE of float64

    def check(got, want, what: str) -> None:
        for g, w in zip(got, want, strict=True):
            assert g.dtype == w.dtype, what
            assert_close(g, w, tol, what)

    x = torch.randn(B, d).to(dtype)
    W_enc = (torch.randn(d, n) / d**0.5).to(dtype)
    b_enc = (torch.randn(n) * 0.1).to(dtype)
    b_dec = (torch.randn(d) * 0.1).to(dtype)
    W_dec = (torch.randn(n, d) / d**0.5).to(dtype)

    values, indices = C.topk_encode_forward(x, W_enc, b_enc, b_dec, k)
    got_values, got_indices = cuda_ops.topk_encode_forward(x, W_enc, b_enc, b_dec, k)
    assert_close(got_values.sort(1).values, values.sort(1).values, tol, "encode values")
    if dtype in (torch.float32, torch.float64):  # 16-bit rounding of the two GEMMs can swap
        # latents whose pre-activations nearly tie, each a valid top k of its own GEMM
        assert_close(C.sparse_decode_forward(got_values, got_indices, W_dec, b_dec),
                     C.sparse_decode_forward(values, indices, W_dec, b_dec), tol,
                     "encode reconstruction")
    indices[:, 0] = 0  # latent 0 in every row, then the cpp code for both backends
    grad_values, grad_out = torch.randn(B, k).to(dtype), torch.randn(B, d).to(dtype)
    check(cuda_ops.topk_encode_backward(grad_values, x, W_enc, b_dec, values, indices),
          C.topk_encode_backward(grad_values, x, W_enc, b_dec, values, indices),
          "topk_encode_backward")
    check([cuda_ops.sparse_decode_forward(values, indices, W_dec, b_dec)],
          [C.sparse_decode_forward(values, indices, W_dec, b_dec)], "sparse_decode_forward")
    check(cuda_ops.sparse_decode_backward(grad_out, values, indices, W_dec),
          C.sparse_decode_backward(grad_out, values, indices, W_dec), "sparse_decode_backward")
    coef = torch.randn(B, k)
    src_rows = torch.randint(0, 2 * B, (B, k))
    src = torch.randn(2 * B, d).to(dtype)
    check([cuda_ops.latent_rows_sum(coef, indices, src, n, src_rows)],
          [C.latent_rows_sum(coef, indices, src, n, src_rows)], "latent_rows_sum")
    check(cuda_ops.latent_rows_sum_dots(coef, indices, src, W_dec, src_rows),
          C.latent_rows_sum_dots(coef, indices, src, W_dec, src_rows), "latent_rows_sum_dots")

    sizes, weights = [max(1, n // 4), n // 2, n], [0.5, 0.3, 0.2]
    got = cuda_ops.nested_prefix_loss_forward(x, values, indices, W_dec, b_dec, sizes, weights)
    want = C.nested_prefix_loss_forward(x, values, indices, W_dec, b_dec, sizes, weights)
    check(got[:3], want[:3], "nested_prefix_loss_forward")
    assert got[3].shape == (2, B, d) and want[3].shape == (2, 0, d)
    upstream = (torch.randn(()).to(dtype), torch.randn(3).to(dtype), grad_out / B)
    check(cuda_ops.nested_prefix_loss_backward(*upstream, x, values, indices, W_dec, b_dec, sizes,
                                               weights, got[3]),
          C.nested_prefix_loss_backward(*upstream, x, values, indices, W_dec, b_dec, sizes,
                                        weights, want[3]), "nested_prefix_loss_backward")
    with pytest.raises(RuntimeError, match="pass the fourth output of nested_prefix_loss_forward"):
        cuda_ops.nested_prefix_loss_backward(*upstream, x, values, indices, W_dec, b_dec, sizes,
                                             weights, want[3])
