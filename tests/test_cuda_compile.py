"""Every CUDA kernel file (csrc/cuda/*.cu) compiles with nvcc for sm_80 and sm_90.

The kernels include only CUDA's own headers, so this runs without a GPU and with a CPU build
of torch: a broken kernel fails here even where the CUDA extension is never built. The flags
follow the CUDA build's (CMakeLists.txt: C++17, -O3).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

CUDA_SOURCES = Path(__file__).resolve().parent.parent / "csrc" / "cuda"
ARCHITECTURES = ["80", "90"]


def find_nvcc() -> str | None:
    """nvcc on PATH, else in $CUDA_HOME/bin."""
    found = shutil.which("nvcc")
    if found is None and os.environ.get("CUDA_HOME"):
        candidate = Path(os.environ["CUDA_HOME"]) / "bin" / "nvcc"
        found = str(candidate) if candidate.is_file() else None
    return found


def nvcc_or_skip() -> str:
    """find_nvcc()'s nvcc; skips the calling test where there is none."""
    nvcc = find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found on PATH or in $CUDA_HOME/bin")
    return nvcc


def compile_one(nvcc: str, source: Path, out_dir: Path) -> tuple[Path, subprocess.CompletedProcess]:
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHITECTURES]
    command = [nvcc, "-std=c++17", "-O3", *gencode, "-c", str(source),
               "-o", str(out_dir / f"{source.stem}.o")]
    return source, subprocess.run(command, capture_output=True, text=True)


def test_every_kernel_compiles_for_sm80_and_sm90(tmp_path):
    nvcc = nvcc_or_skip()
    sources = sorted(CUDA_SOURCES.glob("*.cu"))
    assert sources, f"no .cu files in {CUDA_SOURCES}"
    with ThreadPoolExecutor(max_workers=len(sources)) as pool:
        results = list(pool.map(lambda s: compile_one(nvcc, s, tmp_path), sources))
    failures = [
        f"{source.name} (exit {result.returncode}):\n{result.stderr}"
        for source, result in results
        if result.returncode != 0
    ]
    assert not failures, "nvcc failed:\n" + "\n".join(failures)


def test_the_cuda_build_lists_every_kernel_file():
    """CMakeLists.txt names each csrc/cuda/*.cu file in the CUDA build's sources (a file left out
    compiles here but fails to link on a GPU machine)."""
    listed = (CUDA_SOURCES.parent.parent / "CMakeLists.txt").read_text()
    missing = [s.name for s in sorted(CUDA_SOURCES.glob("*.cu"))
               if f"csrc/cuda/{s.name}" not in listed]
    assert not missing, f"CMakeLists.txt does not build {missing}"
