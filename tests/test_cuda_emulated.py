"""The nested loss's CUDA kernels (csrc/cuda/nested_prefix_loss.cu) run on the CPU: compiled as
host C++ with a warp emulator, one std::thread per GPU thread and the warp shuffles made
through a per-warp exchange and barrier, then checked against sparsecode.reference in float64.

This checks the kernels' logic (walk order, group boundaries, the reverse walk of the backward,
the shuffle reductions and which rows of S are written) where no GPU is present; it says
nothing of speed, memory ordering or the device's rounding of fused multiply-adds. The
launchers (nvcc only) are left out, so the harness picks the vector path as they do when d is
a multiple of 4, and also runs the strided path there. Built by nvcc as host C++ (C++20 for
std::barrier); skips without nvcc.
"""

from __future__ import annotations

import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from sparsecode import reference
from tests.test_cuda_compile import CUDA_SOURCES, find_nvcc

EMULATOR = r"""
// The CUDA builtins the walking kernels use, for a host build: thread and block indices per
// std::thread, warp shuffles through a per-warp exchange between two barriers.
#include <barrier>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include <cuda_runtime.h>

#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif

thread_local uint3 threadIdx;
thread_local uint3 blockIdx;

struct EmulatedWarp {
  EmulatedWarp() : sync(32) {}
  std::barrier<> sync;
  uint64_t slot[32];
};
thread_local EmulatedWarp* emulated_warp;
thread_local int emulated_lane;

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
  const V moved = __shfl_sync(mask, value, source < 32 ? source : emulated_lane);
  return moved;
}
template <typename P, typename V>
void __stcg(P* address, V value) {
  *address = value;
}

// Runs body() as every thread of a grid.x by grid.y grid of `threads`-thread blocks, one block
// at a time.
template <typename Body>
void emulate_launch(dim3 grid, int threads, Body body) {
  for (unsigned y = 0; y < grid.y; ++y) {
    for (unsigned x = 0; x < grid.x; ++x) {
      std::unique_ptr<EmulatedWarp[]> warps(new EmulatedWarp[(threads + 31) / 32]);
      std::vector<std::thread> block;
      for (int t = 0; t < threads; ++t) {
        block.emplace_back([&, t] {
          threadIdx = make_uint3(t, 0, 0);
          blockIdx = make_uint3(x, y, 0);
          emulated_warp = &warps[t / 32];
          emulated_lane = t % 32;
          body();
        });
      }
      for (std::thread& thread : block) {
        thread.join();
      }
    }
  }
}
"""

HARNESS = r"""
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <string>

#include "emulator.h"
#include "nested_prefix_loss.cu"

using namespace sparsecode::cuda;

template <typename V>
std::vector<V> read(FILE* f, int64_t count) {
  std::vector<V> out(count);
  if (count > 0 && std::fread(out.data(), sizeof(V), count, f) != static_cast<size_t>(count)) {
    std::fprintf(stderr, "short input\n");
    std::exit(2);
  }
  return out;
}

template <typename V>
void write(FILE* f, const std::vector<V>& data) {
  std::fwrite(data.data(), sizeof(V), data.size(), f);
}

template <typename T>
std::vector<T> to_storage(const std::vector<float>& in) {
  std::vector<T> out(in.size());
  for (size_t e = 0; e < in.size(); ++e) {
    out[e] = static_cast<T>(in[e]);
  }
  return out;
}

template <typename T>
std::vector<float> to_float(const std::vector<T>& in) {
  std::vector<float> out(in.size());
  for (size_t e = 0; e < in.size(); ++e) {
    out[e] = static_cast<float>(in[e]);
  }
  return out;
}

// Inputs (float32 unless said): int64 B, k, n, d, G, has_grad_x_hat, vector; x [B, d],
// values [B, k], W_dec [n, d], b_dec [d], grad_x_hat [B, d] if any; int64 indices [B, k],
// int64 sizes [G]; float64 scale [G]. Outputs (float32 unless said): x_hat, partial_losses,
// resid, grad_x, S (NaN where not written), partial_dots; int32 order, group.
template <typename T, bool kVector>
int run(FILE* in, FILE* out, int64_t B, int64_t k, int64_t n, int64_t d, int G,
        bool has_grad_x_hat) {
  using A = Acc<T>;
  using ST = SuffixSum<T>;
  const std::vector<T> x = to_storage<T>(read<float>(in, B * d));
  const std::vector<T> values = to_storage<T>(read<float>(in, B * k));
  const std::vector<T> W_dec = to_storage<T>(read<float>(in, n * d));
  const std::vector<T> b_dec = to_storage<T>(read<float>(in, d));
  const std::vector<T> grad_x_hat = to_storage<T>(read<float>(in, has_grad_x_hat ? B * d : 0));
  const std::vector<int64_t> indices = read<int64_t>(in, B * k);
  const std::vector<int64_t> sizes = read<int64_t>(in, G);
  const std::vector<double> scale = read<double>(in, G);

  PrefixSizes prefix{};
  prefix.count = G;
  for (int g = 0; g < G; ++g) {
    prefix.m[g] = sizes[g];
  }
  std::vector<int32_t> order(B * k, -1), group(B * k, -1);
  emulate_launch(dim3((B * k + kPlanThreads - 1) / kPlanThreads, 1), kPlanThreads, [&] {
    prefix_walk_plan_kernel(indices.data(), B, k, prefix, order.data(), group.data());
  });

  const int64_t tiles = num_col_tiles(d);
  const dim3 grid((B + kRowsPerBlock - 1) / kRowsPerBlock, tiles);  // as walk_grid makes it
  const int threads = kRowsPerBlock * kWarp;
  const float nan = std::numeric_limits<float>::quiet_NaN();
  std::vector<T> x_hat(B * d, static_cast<T>(nan)), resid(2 * B * d, static_cast<T>(nan));
  std::vector<A> losses(tiles * B * G, A(nan));
  emulate_launch(grid, threads, [&] {
    nested_loss_forward_kernel<T, kVector>(x.data(), b_dec.data(), values.data(), indices.data(),
                                           order.data(), group.data(), W_dec.data(), B, k, d, G,
                                           x_hat.data(), losses.data(), resid.data());
  });
  std::vector<T> grad_x(B * d, static_cast<T>(nan));
  std::vector<ST> S(G * B * d, static_cast<ST>(nan));
  std::vector<A> dots(tiles * B * k, A(nan));
  emulate_launch(grid, threads, [&] {
    nested_loss_backward_kernel<T, ST, kVector>(
        resid.data(), values.data(), indices.data(), order.data(), group.data(), W_dec.data(),
        has_grad_x_hat ? grad_x_hat.data() : nullptr, scale.data(), B, k, d, G, grad_x.data(),
        S.data(), dots.data());
  });
  write(out, to_float(x_hat));
  write(out, to_float(losses));
  write(out, to_float(resid));
  write(out, to_float(grad_x));
  write(out, to_float(S));
  write(out, to_float(dots));
  write(out, order);
  write(out, group);
  return 0;
}

int main(int argc, char** argv) {
  if (argc != 4) {
    std::fprintf(stderr, "usage: harness float32|bfloat16|float16 input output\n");
    return 2;
  }
  FILE* in = std::fopen(argv[2], "rb");
  FILE* out = std::fopen(argv[3], "wb");
  const std::vector<int64_t> head = read<int64_t>(in, 7);
  const int64_t B = head[0], k = head[1], n = head[2], d = head[3];
  const int G = static_cast<int>(head[4]);
  const bool has_grad_x_hat = head[5] != 0, vector = head[6] != 0;
  const std::string dtype = argv[1];
  int status = 2;
  if (dtype == "float32") {
    status = vector ? run<float, true>(in, out, B, k, n, d, G, has_grad_x_hat)
                    : run<float, false>(in, out, B, k, n, d, G, has_grad_x_hat);
  } else if (dtype == "bfloat16") {
    status = vector ? run<__nv_bfloat16, true>(in, out, B, k, n, d, G, has_grad_x_hat)
                    : run<__nv_bfloat16, false>(in, out, B, k, n, d, G, has_grad_x_hat);
  } else if (dtype == "float16") {
    status = vector ? run<__half, true>(in, out, B, k, n, d, G, has_grad_x_hat)
                    : run<__half, false>(in, out, B, k, n, d, G, has_grad_x_hat);
  }
  std::fclose(out);
  return status;
}
"""

COL_TILE = 128  # kColTile in csrc/cuda/kernels.cuh
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-2}
SUFFIX_DTYPE = {torch.float32: torch.float32, torch.bfloat16: torch.bfloat16,
                torch.float16: torch.float32}  # SuffixSum<T> in kernels.cuh


@pytest.fixture(scope="module")
def harness(tmp_path_factory) -> Path:
    """The harness binary, built once per test session."""
    nvcc = find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found on PATH or in $CUDA_HOME/bin")
    where = tmp_path_factory.mktemp("emulated")
    (where / "emulator.h").write_text(EMULATOR)
    (where / "harness.cpp").write_text(HARNESS)
    binary = where / "harness"
    # -x c++: nvcc hands the file to the host compiler (no __CUDACC__) with CUDA's headers.
    built = subprocess.run(
        [nvcc, "-x", "c++", "-std=c++20", "-O1", "-Xcompiler", "-pthread", f"-I{where}",
         f"-I{CUDA_SOURCES}", str(where / "harness.cpp"), "-o", str(binary)],
        capture_output=True, text=True,
    )
    assert built.returncode == 0, built.stderr[-4000:]
    return binary


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).norm() / want.norm().clamp_min(1e-300)).item()


def run_kernels(harness: Path, tmp: Path, dtype: torch.dtype, x, values, indices, W_dec, b_dec,
                grad_x_hat, sizes: list[int], scale: torch.Tensor, vector: bool) -> dict:
    """The emulated plan, forward and backward kernels' outputs, as float32 tensors."""
    B, k = values.shape
    n, d = W_dec.shape
    G = len(sizes)
    with open(tmp / "in.bin", "wb") as f:
        f.write(struct.pack("<7q", B, k, n, d, G, grad_x_hat is not None, vector))
        for t in (x, values, W_dec, b_dec, grad_x_hat):
            if t is not None:
                f.write(t.float().numpy().tobytes())
        f.write(indices.numpy().astype("<i8").tobytes())
        f.write(np.asarray(sizes, dtype="<i8").tobytes())
        f.write(scale.numpy().astype("<f8").tobytes())
    ran = subprocess.run([str(harness), str(dtype).removeprefix("torch."), str(tmp / "in.bin"),
                          str(tmp / "out.bin")], capture_output=True, text=True, timeout=600)
    assert ran.returncode == 0, ran.stderr
    raw = (tmp / "out.bin").read_bytes()
    tiles = -(-d // COL_TILE)
    shapes = [("x_hat", (B, d), "<f4"), ("losses", (tiles, B, G), "<f4"),
              ("resid", (2, B, d), "<f4"), ("grad_x", (B, d), "<f4"), ("S", (G, B, d), "<f4"),
              ("dots", (tiles, B, k), "<f4"), ("order", (B, k), "<i4"), ("group", (B, k), "<i4")]
    out, at = {}, 0
    for name, shape, kind in shapes:
        count = int(np.prod(shape))
        out[name] = torch.from_numpy(np.frombuffer(raw, kind, count, at).reshape(shape).copy())
        at += count * 4
    assert at == len(raw)
    return out


# (B, d, n, [k], prefix sizes): k = 1; k past one or two chunks of 32 slots and not a multiple
# of the 8-slot batches; d past one column tile and not a multiple of 4 (the strided path); an
# empty first group; a single group; B not a multiple of the 4 rows of a block. Each problem
# also has a latent twice in one row and a zero value.
PROBLEMS = [
    (5, 32, 33, [3], [5, 20, 33]),
    (3, 8, 40, [1], [10, 40]),
    (6, 130, 200, [40], [7, 50, 120, 200]),
    (4, 64, 300, [70], [1, 100, 300]),
    (2, 16, 50, [9], [50]),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,d,n,ks,sizes", PROBLEMS)
def test_nested_kernels_match_reference(harness, tmp_path, B, d, n, ks, sizes, dtype):
    (k,) = ks
    generator = torch.Generator().manual_seed(B * 1000 + d + n + k)
    x = torch.randn(B, d, generator=generator).to(dtype)
    W_dec = (torch.randn(n, d, generator=generator) / d**0.5).to(dtype)
    b_dec = (torch.randn(d, generator=generator) * 0.1).to(dtype)
    values = torch.rand(B, k, generator=generator).to(dtype)
    values[0, 0] = 0.0  # a zero value still has a gradient
    indices = torch.stack([torch.randperm(n, generator=generator)[:k] for _ in range(B)])
    if k > 1:
        indices[1, 0] = indices[1, k - 1]  # one latent twice in a row
    weights = (torch.rand(len(sizes), generator=generator) + 0.1).tolist()
    grad_loss = torch.randn((), generator=generator, dtype=torch.float64)
    grad_prefix = torch.randn(len(sizes), generator=generator, dtype=torch.float64)
    grad_x_hat = (torch.randn(B, d, generator=generator) / B).to(dtype)
    scale = 2 * (grad_loss * torch.tensor(weights, dtype=torch.float64) + grad_prefix) / B
    tol = TOLERANCE[dtype]

    x64, v64, W64, b64 = (t.double().requires_grad_() for t in (x, values, W_dec, b_dec))
    loss, prefix_losses = reference.nested_prefix_loss(x64, v64, indices, W64, b64, sizes,
                                                       weights)
    x_hat = reference.sparse_decode(v64, indices, W64, b64)
    grads = torch.autograd.grad([loss, prefix_losses, x_hat], [x64, v64, W64],
                                [grad_loss, grad_prefix, grad_x_hat.double()])

    for vector in ([True, False] if d % 4 == 0 else [False]):
        out = run_kernels(harness, tmp_path, dtype, x, values, indices, W_dec, b_dec, grad_x_hat,
                          sizes, scale, vector)
        where = f"{dtype}, vector={vector}"
        assert relative_error(out["x_hat"], x_hat.detach()) <= tol, where
        means = out["losses"].double().sum(0).mean(0)
        assert relative_error(means, prefix_losses.detach()) <= tol, where
        # hi + lo keeps about 16 significant bits in bfloat16, 22 in float16.
        residual = (x64 - x_hat).detach()
        assert relative_error(out["resid"].double().sum(0), residual) <= 1e-4, where
        assert relative_error(out["grad_x"], grads[0]) <= tol, where
        assert relative_error(-out["dots"].double().sum(0), grads[1]) <= tol, where
        # grad_W_dec as the host glue makes it: -values * the row of S of each slot's group.
        rows = out["S"][out["group"].long(), torch.arange(B)[:, None]]  # [B, k, d]
        grad_W = torch.zeros(n, d, dtype=torch.float64).index_add_(
            0, indices.reshape(-1), (-values.double()[..., None] * rows.double()).reshape(-1, d))
        assert relative_error(grad_W, grads[2]) <= tol, where
        S_dtype = SUFFIX_DTYPE[dtype]
        assert torch.equal(rows, rows.to(S_dtype).float()), "S is stored in SuffixSum<T>"
        order = out["order"].long()
        assert torch.equal(torch.sort(order, 1).values, torch.arange(k).expand(B, k))
        walked = indices.gather(1, order)
        assert bool((walked[:, 1:] >= walked[:, :-1]).all()), "the walk is in index order"
