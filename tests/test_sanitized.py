"""The kernels' CPU tests again under AddressSanitizer, which stops a run at a read or write
past a tensor, where the plain run could read a neighbour's bytes and still pass (a slot one
past a row's last, say, whose value multiplies zeros; a load missing its mask in a tile past
d_model, whose lanes are never stored):
- the warp emulator's tests (tests/test_cuda_emulated.py), with the CUDA kernels and the host
  glue built with AddressSanitizer and UndefinedBehaviorSanitizer (also past a block's shared
  memory or a local array, and an overflowing signed index);
- the Triton kernels' interpreter tests (tests/test_triton.py, tests/test_optim.py): the
  interpreter reads and writes a tensor's elements with memcpy, which the sanitizer checks.

Each run is a subprocess with the sanitizers' runtimes preloaded (python itself is not built
with them); probes first show, on a deliberate overrun and overflow, that such a run reports
them. Skips without gcc's sanitizer runtimes (and the emulator's without nvcc).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.test_cuda_compile import nvcc_or_skip
from tests.test_cuda_emulated import SANITIZE_ENV

ROOT = Path(__file__).parents[1]
RUNTIMES = ["libasan.so", "libubsan.so", "libstdc++.so.6"]


def runtimes() -> list[str]:
    """The sanitizers' shared runtimes from gcc (and its libstdc++, which the address
    sanitizer needs loaded when it starts, to intercept C++ throws); skips when absent."""
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc not found: it supplies the sanitizers' runtimes")
    found = [subprocess.run([gcc, f"-print-file-name={name}"], capture_output=True,
                            text=True).stdout.strip() for name in RUNTIMES]
    missing = [name for name, path in zip(RUNTIMES, found) if not Path(path).is_file()]
    if missing:
        pytest.skip(f"gcc has no {', '.join(missing)}")
    return found


def run_sanitized(arguments: list[str], logs: Path, timeout: int) -> subprocess.CompletedProcess:
    """python `arguments` in the repository with the sanitizers preloaded, SANITIZE_ENV set (the
    emulator's libraries built with them) and the Triton interpreter on; the address
    sanitizer's reports go to files logs/report.<pid>, the undefined-behaviour sanitizer's
    (beside it) to stderr."""
    env = {**os.environ, SANITIZE_ENV: "1", "TRITON_INTERPRET": "1",
           "LD_PRELOAD": " ".join(runtimes()),
           "ASAN_OPTIONS": f"detect_leaks=0:halt_on_error=1:log_path={logs / 'report'}",
           "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1"}
    return subprocess.run([sys.executable, *arguments], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def reports(logs: Path) -> str:
    """The address sanitizer's reports written under logs, joined."""
    return "\n".join(path.read_text() for path in sorted(logs.glob("report.*")))


def check_probe(script: str, expected: str, where: Path) -> None:
    """script (run sanitized, with where as its argument) prints "in range: ok", then commits
    a fault that the sanitizers must report as `expected` before it prints "not caught"."""
    ran = run_sanitized(["-c", textwrap.dedent(script), str(where)], where, timeout=300)
    assert "in range: ok" in ran.stdout, ran.stderr[-3000:]
    assert "not caught" not in ran.stdout and ran.returncode != 0, ran.stdout + ran.stderr[-3000:]
    found = reports(where) + ran.stderr
    assert expected in found, found[-3000:]


def check_suite(test_files: list[str], where: Path, skips: bool = False) -> None:
    """Every test of test_files passes sanitized (none skipped unless skips: the GPU tests),
    and no sanitizer reports anything."""
    ran = run_sanitized(["-m", "pytest", *test_files, "-q", "-p", "no:cacheprovider",
                         f"--basetemp={where / 'pytest'}"], where, timeout=1800)
    found = reports(where)
    assert not found, found[:6000]
    summary = ran.stdout.strip().splitlines()[-1] if ran.stdout.strip() else ""
    assert ran.returncode == 0 and " passed" in summary and (skips or "skipped" not in summary), (
        ran.stdout[-6000:] + ran.stderr[-3000:])


# Built with the emulator's own compile and link steps and flags, called with ctypes on a torch
# tensor (whose storage the address sanitizer guards like any allocation).
PROBE_SOURCE = r"""
#include <climits>
#include <cstdint>
extern "C" float read_at(const float* data, int64_t i) { return data[i]; }
extern "C" int add_to_max(int i) { return INT_MAX + i; }
"""
PROBES = {
    "read one past a tensor": ("read_at(ctypes.c_void_p(t.data_ptr()), 33)",
                               "heap-buffer-overflow"),
    "signed overflow": ("add_to_max(1)", "signed integer overflow"),
}


@pytest.mark.parametrize("probe", PROBES)
def test_a_sanitized_build_reports_what_the_plain_one_misses(probe, tmp_path):
    """The emulator's sanitized set-up (flags, preloaded runtimes, report files) catches a read
    one element past a torch tensor and a signed overflow, and passes the same calls in
    range."""
    nvcc_or_skip()
    call, expected = PROBES[probe]
    (tmp_path / "probe.cpp").write_text(PROBE_SOURCE)
    check_probe(f"""
        import ctypes, sys
        from pathlib import Path
        import torch
        from tests.test_cuda_compile import find_nvcc
        from tests.test_cuda_emulated import host_compile, link
        where = Path(sys.argv[1])
        nvcc = find_nvcc()
        host_compile(nvcc, where / "probe.cpp", where / "probe.o")
        lib = ctypes.CDLL(str(link(nvcc, where / "probe.so", [where / "probe.o"])))
        lib.read_at.restype = ctypes.c_float
        lib.read_at.argtypes = [ctypes.c_void_p, ctypes.c_int64]
        t = torch.arange(33, dtype=torch.float32)
        assert lib.read_at(ctypes.c_void_p(t.data_ptr()), 32) == 32.0
        assert lib.add_to_max(-1) == 2**31 - 2
        print("in range: ok", flush=True)
        lib.{call}
        print("not caught", flush=True)
    """, expected, tmp_path)


def test_an_interpreted_triton_load_past_a_tensor_is_reported(tmp_path):
    """Under the interpreter, a tile of 16 columns loaded without its mask from a tensor of 7
    is reported (with the mask, it passes)."""
    check_probe("""
        import torch, triton, triton.language as tl

        @triton.jit
        def copy(src, dst, n, MASKED: tl.constexpr):
            cols = tl.arange(0, 16)
            if MASKED:
                x = tl.load(src + cols, mask=cols < n, other=0.0)
            else:
                x = tl.load(src + cols)
            tl.store(dst + cols, x, mask=cols < n)

        src, dst = torch.randn(7), torch.empty(7)
        copy[(1,)](src, dst, 7, MASKED=True)
        assert torch.equal(dst, src)
        print("in range: ok", flush=True)
        copy[(1,)](src, dst, 7, MASKED=False)
        print("not caught", flush=True)
    """, "heap-buffer-overflow", tmp_path)


def test_emulated_kernels_under_address_and_undefined_behaviour_sanitizers(tmp_path):
    """Every test of tests/test_cuda_emulated.py passes with the kernels and the glue
    sanitized."""
    nvcc_or_skip()
    check_suite(["tests/test_cuda_emulated.py"], tmp_path)


def test_interpreted_triton_kernels_under_the_address_sanitizer(tmp_path):
    """Every test of tests/test_triton.py (the encode, decode and nested loss kernels) and of
    tests/test_optim.py (MasterWeightAdam's kernel) passes with the interpreter's loads and
    stores checked."""
    check_suite(["tests/test_triton.py", "tests/test_optim.py"], tmp_path, skips=True)
