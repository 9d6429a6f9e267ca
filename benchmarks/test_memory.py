"""Peak memory of one Matryoshka training step, cpp vs reference, as real process memory.

The C++ kernels allocate scratch outside torch's view, so each backend runs in a fresh
subprocess (this file run as a script): build the SAE and Adam, run 2 warm steps, drop the
gradients, reset the kernel's peak-RSS counter (``5`` to /proc/self/clear_refs), read VmRSS as
the resting baseline, run one step and read VmHWM; the step's peak is VmHWM - baseline. Where
the kernel cannot reset the counter, torch.profiler's allocation events are used instead
(torch allocations only), and the report says so.
"""

from __future__ import annotations

import ctypes
import gc
import itertools
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from workload import THREADS, activations, build_sae, train_step

WARM_STEPS = 2
RESET_SLACK_KIB = 4096  # VmHWM right after a working reset is VmRSS, give or take this much


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _release_free_heap() -> None:
    """Hands memory freed by Python and torch back to the OS, so the baseline holds only live data."""
    gc.collect()
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)  # glibc only
    if trim is not None:
        trim(0)


def _reset_peak_rss() -> bool:
    """Resets VmHWM to the current VmRSS; False where this kernel does not support it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return _status_kib("VmHWM") <= _status_kib("VmRSS") + RESET_SLACK_KIB


def measure(backend: str, seed: int) -> dict[str, float | int | str]:
    """Bytes at rest, the step's peak above rest, the method used and the step's loss."""
    torch.set_num_threads(THREADS)
    sae = build_sae("matryoshka", backend, seed)
    step = train_step(sae, activations(seed))
    for _ in range(WARM_STEPS):
        step()
    sae.zero_grad()  # at rest: parameters, Adam state and x; the step allocates the gradients
    _release_free_heap()
    peak_was_reset = _reset_peak_rss()
    rest = _status_kib("VmRSS") * 1024
    if peak_was_reset:
        loss = step()
        peak = _status_kib("VmHWM") * 1024 - rest
        method = "VmHWM - VmRSS of the process (kernel peak-RSS reset)"
    else:
        with torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
        ) as prof:
            loss = step()
        events = sorted(
            (e.start_ns(), e.nbytes())
            for e in prof.profiler.kineto_results.events()
            if e.name() == "[memory]"
        )
        peak = max(itertools.accumulate(nbytes for _, nbytes in events), default=0)
        method = "torch.profiler allocation events (torch tensors only: peak-RSS reset unsupported)"
    return {"rest": rest, "step_peak": peak, "method": method, "loss": float(loss)}


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_step_peak_memory(results, seed: int, backend: str) -> None:
    """Runs `measure` in a fresh interpreter and records its figures under the backend's name."""
    proc = subprocess.run(
        [sys.executable, __file__, backend, str(seed)], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, f"memory probe ({backend}) failed:\n{proc.stderr}"
    figures = json.loads(proc.stdout.splitlines()[-1])
    assert figures["step_peak"] > 0 and math.isfinite(figures["loss"]), figures
    results.add_memory(backend, figures["rest"], figures["step_peak"], str(figures["method"]))


if __name__ == "__main__":
    print(json.dumps(measure(sys.argv[1], int(sys.argv[2]))))
