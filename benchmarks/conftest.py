"""Benchmark fixtures and the report: every timing and memory figure of a full-size run, and
the issue's target ratios, are written to benchmarks/RESULTS.md at the end of the session.

Ratios use medians over the timed rounds (the minimum is reported too). The step-versus-step and
step-versus-GEMM ratios come from test_interleaved.py, which runs its subjects round-robin so
that the machine's drift over the run hits them alike. Smoke runs (SPARSECODE_BENCH_SMOKE=1) and runs
that left a benchmark out do not write RESULTS.md.
"""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import pytest
import torch
from torch import Tensor

import sparsecode
from sparsecode.backends import ENV_VAR
from workload import SIZES, SMOKE, THREADS, activations

T = TypeVar("T")
RESULTS_PATH = Path(__file__).parent / "RESULTS.md"
MIB = 2**20

torch.set_num_threads(THREADS)
# Each benchmark names its backend; the override would silently make them all the same.
os.environ.pop(ENV_VAR, None)


@dataclass(frozen=True)
class Timing:
    """Seconds per call over the timed rounds."""

    min: float
    median: float
    rounds: int


@dataclass(frozen=True)
class MemoryUse:
    """Bytes at rest (before a step) and the step's peak above that; how they were measured."""

    rest: int
    step_peak: int
    method: str


@dataclass
class Results:
    """Everything the session measured, keyed by label."""

    seed: int
    timings: dict[str, Timing] = field(default_factory=dict)
    memory: dict[str, MemoryUse] = field(default_factory=dict)

    def add_timing(self, label: str, minimum: float, median: float, rounds: int) -> None:
        """Records a timing (seconds per call) measured outside pytest-benchmark."""
        self.timings[label] = Timing(minimum, median, rounds)

    def add_memory(self, label: str, rest: int, step_peak: int, method: str) -> None:
        """Records a memory measurement (bytes) under `label`."""
        self.memory[label] = MemoryUse(rest, step_peak, method)


@dataclass(frozen=True)
class Ratio:
    """numerator / denominator of two measurements, checked against a bound where one is set."""

    name: str
    numerator: str
    denominator: str
    memory: bool = False
    bound: float | None = None
    at_least: bool = False

    def value(self, results: Results) -> float:
        if self.memory:
            # Both processes hold the same parameters, Adam state and data at rest; cpp also
            # keeps its scratch between steps, so measure both peaks above the denominator's rest.
            num, den = results.memory[self.numerator], results.memory[self.denominator]
            return (num.rest + num.step_peak - den.rest) / den.step_peak
        table = results.timings
        return table[self.numerator].median / table[self.denominator].median

    def target(self) -> str:
        if self.bound is None:
            return "—"
        return f"{'≥' if self.at_least else '≤'} {self.bound:.3g}"

    def verdict(self, value: float) -> str:
        if self.bound is None:
            return "—"
        met = value >= self.bound if self.at_least else value <= self.bound
        return "PASS" if met else "MISS"


RATIOS = (
    Ratio("Matryoshka step speed-up, reference / cpp",
          "step: matryoshka, reference", "step: matryoshka, cpp", bound=5.0, at_least=True),
    Ratio("Matryoshka step cpp / bare encoder GEMM (interleaved)",
          "interleaved: step matryoshka, cpp", "interleaved: GEMM x @ W_enc (torch.mm)",
          bound=1.6),
    Ratio("Matryoshka step cpp / TopK step cpp (interleaved)",
          "interleaved: step matryoshka, cpp", "interleaved: step topk, cpp", bound=1.10),
    Ratio("BatchTopK Matryoshka step / TopK Matryoshka step, cpp (interleaved)",
          "interleaved: step matryoshka batchtopk, cpp", "interleaved: step matryoshka, cpp",
          bound=1.25),
    Ratio("nested_prefix_loss fwd+bwd speed-up, reference / cpp",
          "nested_prefix_loss fwd+bwd: reference", "nested_prefix_loss fwd+bwd: cpp",
          bound=10.0, at_least=True),
    Ratio("topk_encode fwd+bwd speed-up, reference / cpp",
          "topk_encode fwd+bwd: reference", "topk_encode fwd+bwd: cpp"),
    Ratio("sparse_decode fwd+bwd speed-up, reference / cpp",
          "sparse_decode fwd+bwd: reference", "sparse_decode fwd+bwd: cpp"),
    Ratio("Matryoshka step peak memory, cpp / reference", "cpp", "reference",
          memory=True, bound=1 / 3),
    Ratio("trainer tokens/s on cached activations / bare GEMM tokens/s (d_sae=8192)",
          "GEMM x @ W_enc (d_sae=8192)", "trainer step (cached activations, d_sae=8192)",
          bound=0.6, at_least=True),
)

_RESULTS = pytest.StashKey[Results]()


@pytest.fixture(scope="session")
def results(pytestconfig: pytest.Config) -> Results:
    """The session's measurements (filled in by the benchmarks, reported at the end)."""
    value = int(os.environ.get("SPARSECODE_SEED", int.from_bytes(os.urandom(4), "little")))
    return pytestconfig.stash.setdefault(_RESULTS, Results(seed=value))


@pytest.fixture(scope="session")
def seed(results: Results) -> int:
    """The session's random seed (SPARSECODE_SEED to replay one): data and initial weights."""
    return results.seed


@pytest.fixture(scope="session")
def x(seed: int) -> Tensor:
    """Fresh random activations x [B, d_model], shared by every benchmark."""
    return activations(seed)


@pytest.fixture
def timed(benchmark, results: Results) -> Callable[[str, Callable[[], T], int], T]:
    """run(label, fn, rounds): benchmark fn for `rounds` rounds after one warm-up round,
    record its statistics under `label`, and return fn's last result."""

    def run(label: str, fn: Callable[[], T], rounds: int) -> T:
        out = benchmark.pedantic(fn, rounds=rounds, warmup_rounds=1)
        if benchmark.stats is not None:  # None under --benchmark-disable
            stats = benchmark.stats.stats
            results.timings[label] = Timing(stats.min, stats.median, stats.rounds)
        return out

    return run


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git_commit() -> str:
    root = Path(__file__).parent.parent

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (no git)"
    return f"{commit} (with uncommitted changes)" if dirty else commit


def _missing(results: Results) -> list[str]:
    """Labels the ratios need that this session did not measure."""
    needed = {(r.memory, label) for r in RATIOS for label in (r.numerator, r.denominator)}
    return sorted(
        label for memory, label in needed
        if label not in (results.memory if memory else results.timings)
    )


def _report(results: Results) -> str:
    s = SIZES
    lines = [
        "# sparsecode benchmarks",
        "",
        "Written by `pytest benchmarks/` (see `benchmarks/conftest.py`). Timings are seconds per "
        "call, min and median over the timed rounds after one warm-up round; the ratios use the "
        "medians. The step/GEMM ratios use the `interleaved:` rows, whose subjects ran "
        "round-robin in one loop so that the host's drift hits them alike.",
        "",
        "## Machine and versions",
        "",
        f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- CPU: {_cpu_model()}, {os.cpu_count()} logical cores; torch threads: "
        f"{torch.get_num_threads()}",
        f"- python {platform.python_version()}, torch {torch.__version__}, "
        f"sparsecode {sparsecode.__version__}, platform {platform.platform()}",
        f"- git commit: {_git_commit()}",
        "",
        "## Problem",
        "",
        f"- B={s.batch}, d_model={s.d_model}, d_sae={s.d_sae}, k={s.k}, prefix sizes "
        f"{list(s.prefix_sizes)} (uniform weights), float32, CPU",
        f"- x: standard-normal activations, seed {results.seed} (SPARSECODE_SEED replays it); "
        "SAEs start from the same weights",
        "- step: `opt.zero_grad()`, forward, loss, `loss.backward()`, "
        "`torch.optim.Adam(fused=True).step()`",
        "- GEMM floor: `torch.mm(x, W_enc)`, [B, d_model] @ [d_model, d_sae], output allocated "
        "per call",
        "- op fwd+bwd: the op, then `torch.autograd.grad` to its parameters (and `values` for "
        "the decode and the loss); x does not require grad",
        "",
        "## Timings",
        "",
        "| benchmark | min (s) | median (s) | rounds |",
        "|---|---:|---:|---:|",
    ]
    lines += [
        f"| {label} | {t.min:.4f} | {t.median:.4f} | {t.rounds} |"
        for label, t in results.timings.items()
    ]
    methods = sorted({m.method for m in results.memory.values()})
    lines += [
        "",
        "## Peak memory of one Matryoshka training step",
        "",
        "Each backend in a fresh subprocess: build the SAE and Adam, run 2 warm steps, drop the "
        "gradients, then measure one step. Method: " + "; ".join(methods) + ". The cpp backend "
        "keeps its large scratch (the pre-activation chunk and the nested loss's suffix sums) "
        "from step to step, so it shows up in cpp's memory at rest; the memory ratio below "
        "counts it, comparing each step's peak above the reference process's memory at rest.",
        "",
        "| backend | at rest (MiB) | step peak above rest (MiB) |",
        "|---|---:|---:|",
    ]
    lines += [
        f"| {backend} | {m.rest / MIB:.1f} | {m.step_peak / MIB:.1f} |"
        for backend, m in results.memory.items()
    ]
    lines += [
        "",
        "## Targets",
        "",
        "| ratio | measured | target | result |",
        "|---|---:|---:|---|",
    ]
    for ratio in RATIOS:
        value = ratio.value(results)
        lines.append(f"| {ratio.name} | {value:.2f} | {ratio.target()} | {ratio.verdict(value)} |")
    return "\n".join(lines) + "\n"


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    """Writes RESULTS.md after a full-size run that measured everything the report needs."""
    results = config.stash.get(_RESULTS, None)
    if results is None:
        return
    if SMOKE:
        terminalreporter.write_line("sparsecode: smoke run, RESULTS.md not written")
        return
    missing = _missing(results)
    if missing:
        terminalreporter.write_line(
            f"sparsecode: RESULTS.md not written, not measured: {', '.join(missing)}"
        )
        return
    RESULTS_PATH.write_text(_report(results) + _gpu_section())
    terminalreporter.write_line(f"sparsecode: wrote {RESULTS_PATH}")


GPU_HEADING = "\n## GPU"


def _gpu_section() -> str:
    """The GPU part of RESULTS.md (from its GPU_HEADING on), which a CPU run keeps as it is:
    it records the last run of benchmarks/gpu_check.sh on a lent GPU."""
    previous = RESULTS_PATH.read_text() if RESULTS_PATH.exists() else ""
    start = previous.find(GPU_HEADING)
    return "" if start < 0 else previous[start:]
