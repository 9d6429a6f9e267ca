"""benchmarks/gpu_smoke.py, the first look of gpu_check.sh at the kernels no GPU has run yet:
its checks' code on the CPU backends (the GPU runs them on cuda and triton), and what it
leaves out of the later stages when a check fails."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "gpu_smoke.py"


@pytest.fixture
def smoke():
    spec = importlib.util.spec_from_file_location("gpu_smoke", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_checks_pass_on_the_cpu_backends(tmp_path):
    env_file = tmp_path / "smoke.env"
    ran = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--small",
                          "--env-file", str(env_file)], capture_output=True, text=True,
                         timeout=600)
    assert ran.returncode == 0, ran.stdout + ran.stderr[-3000:]
    lines = ran.stdout.splitlines()
    assert len(lines) == 4 and all(line.split(": ")[1].startswith("ok") for line in lines), lines
    assert env_file.read_text() == ""


def test_a_check_that_differs_or_raises_fails(smoke, capsys):
    """Results that differ exit with DIFFERS, a check that raises (at any shape) with 1."""
    smoke.CHECKS["tensor_cores"] = lambda shape, device: "grad W_dec rel. error 1.00e+00"
    assert smoke.run_check("tensor_cores", "cpu", small=True) == smoke.DIFFERS
    outcomes = iter(["raise", "differ"])
    smoke.CHECKS["cuda_encode"] = (
        lambda shape, device: 1 / 0 if next(outcomes) == "raise" else "values")
    assert smoke.run_check("cuda_encode", "cpu", small=True) == 1
    out = capsys.readouterr().out
    assert out.count("FAILED: grad W_dec rel. error") == 2
    assert out.count("FAILED: ZeroDivisionError") == 1 and out.count("FAILED: values") == 1


def test_what_failed_is_left_out_of_the_later_stages(smoke, monkeypatch, tmp_path, capsys):
    """A check whose process fails (a fault exits it too) writes its export to the env file;
    one whose results only differ is kept."""
    exits = {"tensor_cores": smoke.DIFFERS, "cuda_encode": -6}

    def run(command, **_):
        name = command[command.index("--check") + 1]
        return subprocess.CompletedProcess(command, exits[name], stdout=f"{name} ran\n")

    monkeypatch.setattr(smoke.subprocess, "run", run)
    env_file = tmp_path / "smoke.env"
    monkeypatch.setattr(sys, "argv", ["gpu_smoke.py", "--env-file", str(env_file)])
    assert smoke.main() == 1
    assert env_file.read_text() == "export SPARSECODE_SKIP_CUDA_ENCODE=1\n"
    out = capsys.readouterr().out
    assert "cuda_encode: FAILED (exit -6)" in out
    assert "tensor_cores: FAILED, results differ; kept" in out
