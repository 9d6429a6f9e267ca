"""Host-side checks of the arithmetic helpers in csrc/cuda/device_utils.cuh that the kernels
rely on, compiled by nvcc as host code (no GPU needed): rotate_left, and the claim in
latent_rows_sum.cu that the rotated writes of the transposed tile are free of bank conflicts."""

from __future__ import annotations

import subprocess

from tests.test_cuda_compile import CUDA_SOURCES, nvcc_or_skip

PROGRAM = r"""
#include <cstdio>
#include "device_utils.cuh"

using sparsecode::cuda::rotate_left;

template <int V>
int check_rotation() {
  int failures = 0;
  for (int r = 0; r < V; ++r) {
    float values[V];
    for (int v = 0; v < V; ++v) values[v] = float(v);
    rotate_left(values, r);
    for (int v = 0; v < V; ++v) {
      if (values[v] != float((v + r) % V)) {
        std::printf("rotate_left<%d> by %d: slot %d holds %g\n", V, r, v, values[v]);
        ++failures;
      }
    }
  }
  return failures;
}

// The transposed tile of latent_rows_sum_kernel: float words, rows of 32 * V + 1. Lane l writes
// its v-th store at word row * (32 V + 1) + l V + (v + r) % V with r = l V / 32; the 32 lanes of
// one store must hit 32 different banks (word address mod 32), for every row.
template <int V>
int check_banks() {
  int failures = 0;
  for (int row = 0; row < 32; ++row) {
    for (int v = 0; v < V; ++v) {
      unsigned used = 0;
      for (int lane = 0; lane < 32; ++lane) {
        const int r = lane * V / 32;
        const int word = row * (32 * V + 1) + lane * V + (v + r) % V;
        used |= 1u << (word % 32);
      }
      if (used != 0xffffffffu) {
        std::printf("V=%d row %d store %d: bank conflict\n", V, row, v);
        ++failures;
      }
    }
  }
  return failures;
}

int main() {
  const int failures = check_rotation<1>() + check_rotation<2>() + check_rotation<4>() +
                       check_rotation<8>() + check_banks<1>() + check_banks<4>() +
                       check_banks<8>();
  std::printf("%d failures\n", failures);
  return failures == 0 ? 0 : 1;
}
"""


def test_rotation_and_conflict_free_tile_writes(tmp_path):
    nvcc = nvcc_or_skip()
    source = tmp_path / "device_utils_test.cu"
    source.write_text(PROGRAM)
    binary = tmp_path / "device_utils_test"
    built = subprocess.run([nvcc, "-std=c++17", "-O2", f"-I{CUDA_SOURCES}", str(source), "-o",
                            str(binary)], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    ran = subprocess.run([str(binary)], capture_output=True, text=True)
    assert ran.returncode == 0, ran.stdout + ran.stderr
