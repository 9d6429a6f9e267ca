"""The warp emulator's tests (tests/test_cuda_emulated.py) again, with the CUDA kernels and the
host glue built under AddressSanitizer and UndefinedBehaviorSanitizer: a read or write past a
tensor, past a block's shared memory or a local array, or an overflowing signed index stops the
run with a report, where the plain run could read a neighbour's bytes and still pass (a slot
index one past the row's last, say, whose value multiplies zeros).

The run is a subprocess with the sanitizers' runtimes preloaded (python itself is not built with
them); a probe first shows, on a deliberate overrun and overflow, that such a run reports them.
Skips without nvcc or without gcc's sanitizer runtimes.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.test_cuda_compile import find_nvcc
from tests.test_cuda_emulated import SANITIZE_ENV

ROOT = Path(__file__).parents[1]
RUNTIMES = ["libasan.so", "libubsan.so", "libstdc++.so.6"]


def runtimes() -> list[str]:
    """The sanitizers' shared runtimes from gcc (and its libstdc++, which the address
    sanitizer needs loaded when it starts, to intercept C++ throws); skips when absent."""
    if find_nvcc() is None:
        pytest.skip("nvcc not found on PATH or in $CUDA_HOME/bin")
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
    """python `arguments` in the repository with the sanitizers preloaded and SANITIZE_ENV set;
    the address sanitizer's reports go to files logs/report.<pid>, the undefined-behaviour
    sanitizer's (beside it) to stderr."""
    env = {**os.environ, SANITIZE_ENV: "1", "LD_PRELOAD": " ".join(runtimes()),
           "ASAN_OPTIONS": f"detect_leaks=0:halt_on_error=1:log_path={logs / 'report'}",
           "UBSAN_OPTIONS": f"halt_on_error=1:print_stacktrace=1:log_path={logs / 'report'}"}
    return subprocess.run([sys.executable, *arguments], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def reports(logs: Path) -> str:
    """The address sanitizer's reports written under logs, joined."""
    return "\n".join(path.read_text() for path in sorted(logs.glob("report.*")))


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
    """The sanitized run's set-up (flags, preloaded runtimes, report files) catches a read one
    element past a torch tensor and a signed overflow, and passes the same calls in range."""
    call, expected = PROBES[probe]
    (tmp_path / "probe.cpp").write_text(PROBE_SOURCE)
    script = textwrap.dedent(f"""
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
    """)
    ran = run_sanitized(["-c", script, str(tmp_path)], tmp_path, timeout=300)
    assert "in range: ok" in ran.stdout, ran.stderr[-3000:]
    assert "not caught" not in ran.stdout and ran.returncode != 0, ran.stdout + ran.stderr[-3000:]
    found = reports(tmp_path) + ran.stderr
    assert expected in found, found[-3000:]


def test_emulated_kernels_under_address_and_undefined_behaviour_sanitizers(tmp_path):
    """Every test of tests/test_cuda_emulated.py passes with the kernels and the glue sanitized,
    and no sanitizer reports anything."""
    ran = run_sanitized(["-m", "pytest", "tests/test_cuda_emulated.py", "-q", "-p",
                         "no:cacheprovider", f"--basetemp={tmp_path / 'pytest'}"],
                        tmp_path, timeout=1800)
    found = reports(tmp_path)
    assert not found, found[:6000]
    summary = ran.stdout.strip().splitlines()[-1] if ran.stdout.strip() else ""
    assert ran.returncode == 0 and " passed" in summary and "skipped" not in summary, (
        ran.stdout[-6000:] + ran.stderr[-3000:])
