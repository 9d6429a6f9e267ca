"""GPU benchmarks of the Triton issue (6) and the CUDA-extension issue (7), with their targets.

    SPARSECODE_GPU_RESULTS=gpu_results.md python -m pytest benchmarks/test_gpu.py -q -s

Problem: B=8192, d_model=2304, d_sae=65536, k=64, prefix sizes [2048, ..., 65536] (uniform
weights), bfloat16. Op benchmarks take bfloat16 leaves; training steps run an SAE with bfloat16
weights whose float32 masters are kept by sparsecode.optim.MasterWeightAdam, stepping each
weight as its gradient lands (and once with the Adam step after the backward, for comparison).
Times are medians over many runs, timed with CUDA events after warm-up runs, with the L2 cache
flushed before each run.

Every measurement is guarded: one that raises is reported as an error row and fails its test,
and the others still run. At the end of the module one markdown table (measure, value, target,
result) is printed and, when SPARSECODE_GPU_RESULTS is set, written there with the device and
versions. Skipped without a CUDA device; this file never writes benchmarks/RESULTS.md.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib
import importlib.metadata
import os
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import pytest
import torch
from torch import Tensor

import sparsecode
import sparsecode.sae
from sparsecode import ops, reference
from sparsecode.backends import TENSOR_CORES_ENV_VAR
from sparsecode.optim import MasterWeightAdam

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

DEVICE = "cuda"
BATCH, D_MODEL, D_SAE, K = 8192, 2304, 65536, 64
PREFIX_SIZES = (2048, 4096, 8192, 16384, 32768, 65536)
PREFIX_WEIGHTS = tuple(1 / len(PREFIX_SIZES) for _ in PREFIX_SIZES)
DTYPE = torch.bfloat16
LR = 1e-4
SEED = 0
RESULTS_ENV = "SPARSECODE_GPU_RESULTS"
FLUSH_BYTES = 256 * 2**20  # written before each timed run: over 5x an H100's 50 MB L2
# GPU clock cycles of the torch.cuda._sleep that keeps the device busy while the host issues one
# run (queued_ms): about 20 ms at the H100's and H200's 1.98 GHz boost clock.
QUEUE_CYCLES = 40_000_000
GB = 1e9
T = TypeVar("T")

# Labels of the measurements that ratios refer to.
MM = "encode: torch.mm x @ W_enc (floor)"
MM_TOPK = "encode: torch.mm + torch.topk (naive)"
FUSED = "encode: fused, triton, no_grad"
DECODE_SPARSE = "decode fwd+bwd: triton"
DECODE_DENSE = "decode fwd+bwd: dense reference"
ENCODE_CUDA = "encode: cuda, column chunks of torch.mm + running top k, no_grad"
BACKWARD_SPARSE = "encode+decode backward: cuda"
BACKWARD_DENSE = "encode+decode backward: dense reference autograd"
NESTED = "nested_prefix_loss fwd+bwd: auto"
NESTED_DIRECT = ("nested_prefix_loss fwd+bwd from the loss alone, as direct calls (no custom "
                 "ops, no autograd): triton")
DECODE_AUTO = "decode fwd+bwd: auto"

# The encode tiles tried by the sweep: fields of sparsecode.triton_kernels.topk_encode.EncodeConfig
# (the best masked-pointer tiles of a wider sweep recorded in benchmarks/RESULTS.md), each the
# base tiles with some fields changed.
TILES = {"block_b": 128, "block_n": 128, "block_d": 64, "splits": 2, "num_warps": 8,
         "num_stages": 3}
SWEEP = [
    TILES,
    {**TILES, "num_stages": 4},
    {**TILES, "num_stages": 4, "select_halves": True},
    {**TILES, "block_n": 256, "num_stages": 4},
]
# The same kernel loading the x' and W_enc tiles through tensor descriptors (TMA) instead of
# masked pointers. First the default tiles (folded by column halves, 4 stages), which the
# sweep times again at its end: in the run of 2026-11-27 08:39 UTC the same tiles took 4.97 ms
# as the default encode's row and 5.22 ms in the sweep, so a variant is compared with the
# sweep's own default rows. Then the default with insertion steps taken before the test across
# warps (unchecked_steps: 16, and the count alone); whole tiles at 4 stages (at 3 they beat the
# halves, 5.05 against 5.24 ms), also with the count alone; 3 stages (144 KB of tiles, where 4
# take 192 KB); three ranges per row block; 128-deep d steps (96 KB of tiles per stage); 64-row
# tiles over 4 warps at 2 stages (82 KB of shared memory and 255 registers a thread, so two
# programs fit on an SM and one can select while the other multiplies, at the cost of loading
# each W_enc tile for 64 rows instead of 128), as the default and with the count alone. Swept
# last (test_encode_tma_sweep), so that a fault there cannot spoil the other measurements of
# the run.
TMA_TILES = {**TILES, "block_n": 256, "tma": True, "num_stages": 4}
TMA_DEFAULT = {**TMA_TILES, "select_halves": True}
TMA_SWEEP = [
    TMA_DEFAULT,
    {**TMA_DEFAULT, "unchecked_steps": 16},
    {**TMA_DEFAULT, "unchecked_steps": 128},
    {**TMA_TILES, "select_halves": False},
    {**TMA_TILES, "select_halves": False, "unchecked_steps": 256},
    {**TMA_DEFAULT, "num_stages": 3},
    {**TMA_DEFAULT, "splits": 3},
    {**TMA_DEFAULT, "block_d": 128, "num_stages": 2},
    {**TMA_DEFAULT, "block_b": 64, "num_warps": 4, "num_stages": 2},
    {**TMA_DEFAULT, "block_b": 64, "num_warps": 4, "num_stages": 2, "unchecked_steps": 128},
]


@contextlib.contextmanager
def tensor_cores() -> Iterator[None]:
    """SPARSECODE_TENSOR_CORES=1 while active: the bfloat16 kernels written for the tensor cores
    (off by default) take the place of the CUDA-core per-latent sums and the nested loss's
    Triton walk."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(TENSOR_CORES_ENV_VAR, "1")
        yield


def time_ms(fn: Callable[[], object], runs: int = 20, warmup: int = 3) -> float:
    """Median milliseconds of fn() over `runs` runs after `warmup` untimed ones, by CUDA events
    around each run, with the L2 cache flushed (a 256 MiB write) before each."""
    flush = torch.empty(FLUSH_BYTES, dtype=torch.int8, device=DEVICE)
    for _ in range(warmup):
        fn()
    events = [
        (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
        for _ in range(runs)
    ]
    for start, end in events:
        flush.zero_()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events)


def queued_ms(fn: Callable[[], object], runs: int = 20, warmup: int = 3) -> tuple[float, float]:
    """(device, host): the median milliseconds of fn() on the device, by CUDA events, when the
    host has issued the whole run before the device reaches it, and the median milliseconds the
    host takes to issue it. Each run is issued while the device sleeps (torch.cuda._sleep, after
    the L2 flush) and waited for before the next, so its events time the device's work with no
    gaps of the host's making; time_ms's runs include those gaps where the host issues fn more
    slowly than the device runs it. A host time near the sleep's (QUEUE_CYCLES) means fn waited
    for the device."""
    flush = torch.empty(FLUSH_BYTES, dtype=torch.int8, device=DEVICE)
    for _ in range(warmup):
        fn()
    device, host = [], []
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(runs):
        flush.zero_()
        torch.cuda._sleep(QUEUE_CYCLES)
        began = time.perf_counter()
        start.record()
        fn()
        end.record()
        host.append((time.perf_counter() - began) * 1e3)
        torch.cuda.synchronize()
        device.append(start.elapsed_time(end))
    return statistics.median(device), statistics.median(host)


def queued_label(label: str) -> str:
    """The row of `label`'s device time with the host queued ahead (Report.time_queued)."""
    return f"{label}, device time, host queued ahead"


@dataclass
class Row:
    """One line of the results table."""

    measure: str
    value: str
    target: str = "—"
    result: str = "—"


@dataclass(repr=False)
class Report:
    """The module's table rows, the timings ratios refer to, and the errors met so far."""

    rows: list[Row] = field(default_factory=list)
    times: dict[str, float] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def add(self, measure: str, value: str, target: str = "—", result: str = "—") -> None:
        """Appends a row and prints it."""
        self.rows.append(Row(measure, value, target, result))
        if result == "—":
            print(f"  {measure}: {value}")
        else:
            print(f"  {measure}: {value}  [{result}, target {target}]")

    def attempt(self, label: str, fn: Callable[[], T]) -> T | None:
        """fn(), or None and an ERROR row under `label` when it raises."""
        try:
            return fn()
        except Exception as err:  # reported in the table; the other measurements still run
            text = str(err).strip()
            message = f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"
            self.add(label, message[:200], result="ERROR")
            self.errors.append(f"{label}: {message}")
            return None

    def time(self, label: str, fn: Callable[[], object], runs: int = 20) -> float | None:
        """time_ms(fn) recorded under `label`; None (and an ERROR row) when fn raised."""
        ms = self.attempt(label, lambda: time_ms(fn, runs=runs))
        if ms is not None:
            self.times[label] = ms
            self.add(label, f"{ms:.3f} ms")
        return ms

    def time_queued(self, label: str, fn: Callable[[], object]) -> None:
        """queued_ms(fn) as two rows: queued_label(label) (kept in times for ratios) and
        `label` + ", host time to issue"."""
        figures = self.attempt(label, lambda: queued_ms(fn))
        if figures is not None:
            device, host = figures
            self.times[queued_label(label)] = device
            self.add(queued_label(label), f"{device:.3f} ms")
            self.add(f"{label}, host time to issue", f"{host:.3f} ms")

    def ratio(self, numerator: str, denominator: str) -> float | None:
        """times[numerator] / times[denominator]; None when either was not measured."""
        if numerator not in self.times or denominator not in self.times:
            return None
        return self.times[numerator] / self.times[denominator]

    def check(self, measure: str, value: float | None, bound: float, at_least: bool) -> None:
        """A row comparing value with its target: at least `bound` when at_least, else at most."""
        target = f"{'≥' if at_least else '≤'} {bound:g}"
        if value is None:
            self.add(measure, "not measured", target, "ERROR")
            return
        met = value >= bound if at_least else value <= bound
        self.add(measure, f"{value:.3g}", target, "PASS" if met else "MISS")

    def fail_on_errors_since(self, count: int) -> None:
        """Fails the running test with the errors recorded after the first `count`."""
        new = self.errors[count:]
        if new:
            pytest.fail("\n".join(new), pytrace=False)

    def markdown(self) -> str:
        """The rows as a markdown table (a "|" inside a cell escaped)."""
        lines = ["| measure | value | target | result |", "|---|---|---|---|"]
        for row in self.rows:
            cells = (row.measure, row.value, row.target, row.result)
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        return "\n".join(lines)


def _command_output(*command: str) -> str:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError):
        return "unavailable"
    return done.stdout.strip()


def _environment() -> list[str]:
    """Markdown bullet lines: date, device, driver, versions and the backends found."""
    nvcc = _command_output("nvcc", "--version")
    nvcc_release = next((line for line in nvcc.splitlines() if "release" in line), nvcc)
    try:
        triton_version = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton_version = "not installed"
    props = torch.cuda.get_device_properties(0)
    available = {name: info["available"] for name, info in sparsecode.backends().items()}
    driver = _command_output("nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader")
    return [
        f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- device: {props.name}, {props.multi_processor_count} SMs, "
        f"{props.total_memory / 2**30:.0f} GiB",
        f"- driver: {driver}",
        f"- torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton_version}, "
        f"nvcc: {nvcc_release}",
        f"- sparsecode backends available: {available}",
        *([f"- {TENSOR_CORES_ENV_VAR}={os.environ[TENSOR_CORES_ENV_VAR]} for every row (rows "
           "not named 'tensor cores' otherwise run without it)"]
          if TENSOR_CORES_ENV_VAR in os.environ else []),
    ]


def _results_markdown(report: Report) -> str:
    """The GPU section of benchmarks/RESULTS.md: it opens with the heading that
    benchmarks/conftest.py keeps when a CPU run rewrites that file."""
    dtype = str(DTYPE).removeprefix("torch.")
    return "\n".join([
        "## GPU",
        "",
        "Written by `benchmarks/test_gpu.py` (run by `benchmarks/gpu_check.sh`).",
        "",
        *_environment(),
        f"- problem: B={BATCH}, d_model={D_MODEL}, d_sae={D_SAE}, k={K}, prefix sizes "
        f"{list(PREFIX_SIZES)} (uniform weights), {dtype}; op benchmarks on {dtype} leaves, "
        f"training steps with float32 master weights cast to {dtype} in the step",
        "- times: medians over many runs after warm-up runs, CUDA events, L2 flushed before "
        "each run; ratios of medians",
        "",
        report.markdown(),
        "",
    ])


@pytest.fixture(scope="module")
def report() -> Iterator[Report]:
    """The module's results; printed (and written to $SPARSECODE_GPU_RESULTS) at its end."""
    collected = Report()
    yield collected
    text = _results_markdown(collected)
    print("\n" + text)
    path = os.environ.get(RESULTS_ENV)
    if path:
        Path(path).write_text(text)
        print(f"sparsecode: wrote {path}")


@dataclass(frozen=True, repr=False)
class Problem:
    """bfloat16 inputs on the GPU: x [B, d], SAE-like weights (W_dec rows of unit norm,
    W_enc = W_dec.T), the code (values, indices [B, k]) of x by torch mm + topk, and a fixed
    gradient grad_x_hat [B, d]."""

    x: Tensor
    W_enc: Tensor
    b_enc: Tensor
    W_dec: Tensor
    b_dec: Tensor
    values: Tensor
    indices: Tensor
    grad_x_hat: Tensor

    def leaves(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Fresh copies of W_enc, b_enc, W_dec, b_dec that require grad."""
        return tuple(
            t.clone().requires_grad_() for t in (self.W_enc, self.b_enc, self.W_dec, self.b_dec)
        )


@pytest.fixture(scope="module")
def problem() -> Iterator[Problem]:
    torch.manual_seed(SEED)
    W_dec = torch.randn(D_SAE, D_MODEL, device=DEVICE)
    W_dec /= W_dec.norm(dim=1, keepdim=True)
    W_enc = W_dec.T.contiguous()
    x = torch.randn(BATCH, D_MODEL, device=DEVICE, dtype=DTYPE)
    b_enc = (0.01 * torch.randn(D_SAE, device=DEVICE)).to(DTYPE)
    b_dec = (0.01 * torch.randn(D_MODEL, device=DEVICE)).to(DTYPE)
    W_enc, W_dec = W_enc.to(DTYPE), W_dec.to(DTYPE)
    with torch.no_grad():
        values, indices = reference.topk_encode(x, W_enc, b_enc, b_dec, K)
    yield Problem(x, W_enc, b_enc, W_dec, b_dec, values, indices, torch.randn_like(x))
    torch.cuda.empty_cache()


def test_encode(report: Report, problem: Problem) -> None:
    """Issue 6: the fused encode against the bare GEMM and the naive mm + topk."""
    errors = len(report.errors)
    p = problem
    tflop = 2 * BATCH * D_MODEL * D_SAE / 1e12
    mm = report.time(MM, lambda: torch.mm(p.x, p.W_enc))
    report.time(MM_TOPK, lambda: torch.topk(torch.mm(p.x, p.W_enc), K, dim=1))
    def fused_encode() -> tuple[Tensor, Tensor]:
        return ops.topk_encode(p.x, p.W_enc, p.b_enc, p.b_dec, K, backend="triton")

    with torch.no_grad():
        fused = report.time(FUSED, fused_encode)
        report.time_queued(FUSED, fused_encode)
    for label, ms in (("torch.mm", mm), ("fused encode", fused)):
        if ms is not None:
            report.add(f"encode: {label} rate", f"{tflop / ms * 1e3:.0f} TFLOP/s")
    # The cuda backend's encode: cuBLAS on 2048 columns at a time, each chunk folded into the
    # rows' running top k (csrc/cuda/topk_select.cu); not fused, but the chunk stays near L2.
    with torch.no_grad():
        chunked = report.time(
            ENCODE_CUDA, lambda: ops.topk_encode(p.x, p.W_enc, p.b_enc, p.b_dec, K, backend="cuda"))
        if chunked is not None:
            values, indices = ops.topk_encode(p.x, p.W_enc, p.b_enc, p.b_dec, K, backend="cuda")
            ours, theirs = values.float().sort(1).values, p.values.float().sort(1).values
            error = ((ours - theirs).norm() / theirs.norm()).item()
            same = (indices == p.indices).all(1).float().mean().item()
            ratio = report.ratio(ENCODE_CUDA, MM)
            report.add("encode: cuda / torch.mm; against the reference encode",
                       f"{f'{ratio:.2f}' if ratio else '—'}; values rel. error {error:.1e}, "
                       f"{same:.1%} of rows with the same indices (bf16 near-ties of two GEMMs "
                       f"may differ)")
    report.check("issue 6: fused encode / torch.mm", report.ratio(FUSED, MM), 1.3, at_least=False)
    report.check("issue 6: (torch.mm + topk) / fused encode", report.ratio(MM_TOPK, FUSED), 1.5,
                 at_least=True)
    report.fail_on_errors_since(errors)


def sweep_encode_configs(report: Report, problem: Problem, configs: list[dict],
                         label: str = "encode config") -> None:
    """Times the fused encode forward (no autograd) with each EncodeConfig(**fields) of
    `configs`, in rows named `label` and the fields. A config that the class or the launch
    rejects is reported as skipped, with the reason (for tma=True configs that includes
    triton.set_allocator and the descriptors' creation, which happen inside the launch)."""
    errors = len(report.errors)
    p = problem
    module = report.attempt(
        "encode config sweep",
        lambda: importlib.import_module("sparsecode.triton_kernels.topk_encode"),
    )
    report.fail_on_errors_since(errors)
    mm = report.times.get(MM)
    torch_values = p.values.float()

    def encode_with(config: object) -> Callable[[], tuple[Tensor, Tensor]]:
        return lambda: module.topk_encode_forward(p.x, p.W_enc, p.b_enc, p.b_dec, K, config=config)

    with torch.no_grad():
        default_indices = module.topk_encode_forward(p.x, p.W_enc, p.b_enc, p.b_dec, K)[1]

    for fields in configs:
        row = label + " " + " ".join(f"{key}={value}" for key, value in fields.items())
        try:
            encode = encode_with(module.EncodeConfig(**fields))
            with torch.no_grad():
                values, indices = encode()
                ms = time_ms(encode)
        except (TypeError, ValueError) as err:
            report.add(row, f"skipped: {type(err).__name__}: {err}")
            continue
        except Exception as err:  # e.g. Triton's OutOfResources at launch: skip this config
            report.add(row, f"skipped at launch: {type(err).__name__}: {str(err)[:150]}")
            continue
        # Against the values torch's mm + topk selected, each row's sorted (bf16 near-ties may
        # pick other latents of equal value): small unless the config is wrong.
        ours, theirs = values.float().sort(dim=1).values, torch_values.sort(dim=1).values
        error = ((ours - theirs).norm() / theirs.norm()).item()
        versus_mm = f", {ms / mm:.2f}× mm" if mm else ""
        # A config that ranks as the default does (16-bit keys, or float values) selects the
        # same latents whatever its tiles, fold, split or unchecked steps.
        same = "equal to" if torch.equal(indices, default_indices) else "DIFFER from"
        report.add(row, f"{ms:.3f} ms{versus_mm}; values rel. error vs mm+topk {error:.1e}; "
                        f"indices {same} the default encode's")


def test_encode_config_sweep(report: Report, problem: Problem) -> None:
    """Issue 6: the fused encode with each tile config of SWEEP, then with k = 1."""
    sweep_encode_configs(report, problem, SWEEP)
    p = problem
    module = importlib.import_module("sparsecode.triton_kernels.topk_encode")
    mm = report.times.get(MM)
    # With k = 1 the running top-k is one slot that rarely changes: the kernel's GEMM and tile
    # walk alone, which splits the fused encode's time into GEMM and selection.
    one = lambda: module.topk_encode_forward(p.x, p.W_enc, p.b_enc, p.b_dec, 1)  # noqa: E731
    with torch.no_grad():
        one()
        ms = time_ms(one)
    versus_mm = f", {ms / mm:.2f}× mm" if mm else ""
    report.add("encode default tiles, k=1 (its GEMM and tile walk, selection nearly free)",
               f"{ms:.3f} ms{versus_mm}")
    # The default encode with its ranges merged by torch ops instead of _merge_kernel.
    full = lambda: module.topk_encode_forward(p.x, p.W_enc, p.b_enc, p.b_dec, K)  # noqa: E731
    merge_width = module.MERGE_WIDTH
    module.MERGE_WIDTH = 0
    try:
        with torch.no_grad():
            full()
            ms = time_ms(full)
    finally:
        module.MERGE_WIDTH = merge_width
    report.add("encode default tiles, ranges merged by torch ops (not _merge_kernel)",
               f"{ms:.3f} ms")


def test_sparse_decode(report: Report, problem: Problem) -> None:
    """Issue 6: sparse decode forward + backward (values, W_dec, b_dec) against the dense one."""
    errors = len(report.errors)
    p = problem
    values = p.values.clone().requires_grad_()
    _, _, W_dec, b_dec = p.leaves()

    def forward_backward(decode: Callable[[], Tensor]) -> Callable[[], tuple[Tensor, ...]]:
        return lambda: torch.autograd.grad(decode(), (values, W_dec, b_dec), p.grad_x_hat)

    report.time(DECODE_SPARSE, forward_backward(
        lambda: ops.sparse_decode(values, p.indices, W_dec, b_dec, backend="triton")))
    report.time(DECODE_DENSE, forward_backward(
        lambda: reference.sparse_decode(values, p.indices, W_dec, b_dec)))
    report.check("issue 6: dense / sparse decode, fwd+bwd",
                 report.ratio(DECODE_DENSE, DECODE_SPARSE), 5.0, at_least=True)

    # The decode backward's two pair walks (grad_values, then grad_W_dec) against the one
    # fused walk that the backends now use.
    from sparsecode.triton_kernels.sparse_decode import sparse_decode_grad_values

    C = torch.ops.sparsecode_C
    g, W = p.grad_x_hat.contiguous(), W_dec.detach()
    report.time("decode backward: Triton grad_values + latent_rows_sum (two walks)",
                lambda: (sparse_decode_grad_values(g, p.indices, W),
                         C.latent_rows_sum(p.values, p.indices, g, W.shape[0])))
    report.time("decode backward: latent_rows_sum_dots (one walk)",
                lambda: C.latent_rows_sum_dots(p.values, p.indices, g, W))
    report.time("latent_rows_sum (CUDA cores)",
                lambda: C.latent_rows_sum(p.values, p.indices, g, W.shape[0]))
    # The same sums on the tensor cores (csrc/cuda/latent_rows_sum_mma.cu), which
    # SPARSECODE_TENSOR_CORES=1 turns on.
    with tensor_cores():
        report.time("decode backward: latent_rows_sum_dots (one walk), tensor cores",
                    lambda: C.latent_rows_sum_dots(p.values, p.indices, g, W))
        report.time("latent_rows_sum, tensor cores",
                    lambda: C.latent_rows_sum(p.values, p.indices, g, W.shape[0]))
    # A trained SAE has dense latents, which random codes lack: latent 0 in every row (8192
    # pairs, summed by a whole block rather than one warp; see csrc/cuda/latent_rows_sum.cu).
    dense = p.indices.clone()
    dense[:, 0] = 0
    report.time("decode backward: latent_rows_sum_dots, latent 0 in every row",
                lambda: C.latent_rows_sum_dots(p.values, dense, g, W))
    # The forward's gathers pipelined at the depth the autotuner picks, against depth 1, the walk
    # that waits for each slot's rows before it issues the next slot's (sparse_decode.autotuned).
    from sparsecode.triton_kernels.sparse_decode import sparse_decode_forward

    bias = b_dec.detach()
    for stages in (None, 1):
        report.time(f"decode forward: triton, {'autotuned' if stages is None else 'STAGES=1'}",
                    lambda stages=stages: sparse_decode_forward(p.values, p.indices, W, bias,
                                                                stages=stages))
    # The cuda backend's forward (gather_rows.cu): Nsight Compute found the Triton walk bound by
    # instruction issue (RESULTS.md, 2026-11-27 17:00 UTC), which CUDA C++ may issue fewer of.
    report.time("decode forward: cuda", lambda: C.sparse_decode_forward(p.values, p.indices, W,
                                                                         bias))
    report.fail_on_errors_since(errors)


def backward_floor_bytes() -> int:
    """The fewest bytes the encode + decode backward can move: each input read once and each
    output written once (bfloat16 2 bytes, int64 indices 8; intermediates such as grad_values,
    and grad_x, which training does not need, are not counted):

        reads   x [B, d], grad_x_hat [B, d], values [B, k], indices [B, k],
                W_enc [d, n], W_dec [n, d], b_dec [d]
        writes  grad_W_enc [d, n], grad_W_dec [n, d], grad_b_enc [n], grad_b_dec [d]

    At the benchmark's size: 4 x 302 MB of weights and weight gradients, 75 MB of x and
    grad_x_hat and 5 MB of code: about 1.29 GB.
    """
    e = DTYPE.itemsize
    reads = 2 * BATCH * D_MODEL * e + BATCH * K * (e + 8) + 2 * D_MODEL * D_SAE * e + D_MODEL * e
    writes = 2 * D_MODEL * D_SAE * e + D_SAE * e + D_MODEL * e
    return reads + writes


def copy_bandwidth() -> float:
    """Bytes per second of a 1 GiB device-to-device copy, counting bytes read and written."""
    src = torch.rand(2**29, device=DEVICE, dtype=DTYPE)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), runs=10)
    return 2 * src.nbytes / (ms / 1e3)


def test_sparse_backward(report: Report, problem: Problem) -> None:
    """Issue 7: the backward alone of encode + decode (x_hat's gradients of W_enc, b_enc,
    W_dec, b_dec; x does not require grad): the cuda backend against the dense reference's
    autograd and against the memory-traffic floor of backward_floor_bytes."""
    errors = len(report.errors)
    p = problem
    leaves = p.leaves()
    W_enc, b_enc, W_dec, b_dec = leaves

    def backward(backend: str | None) -> Callable[[], tuple[Tensor, ...]]:
        """Runs the forward once (backend None: the dense reference) and returns its backward."""
        if backend is None:
            values, indices = reference.topk_encode(p.x, W_enc, b_enc, b_dec, K)
            x_hat = reference.sparse_decode(values, indices, W_dec, b_dec)
        else:
            values, indices = ops.topk_encode(p.x, W_enc, b_enc, b_dec, K, backend=backend)
            x_hat = ops.sparse_decode(values, indices, W_dec, b_dec, backend=backend)
        return lambda: torch.autograd.grad(x_hat, leaves, p.grad_x_hat, retain_graph=True)

    for label, backend in ((BACKWARD_SPARSE, "cuda"), (BACKWARD_DENSE, None)):
        run = report.attempt(label, lambda: backward(backend))
        if run is not None:
            report.time(label, run)
        del run
    report.check("issue 7: dense / sparse backward",
                 report.ratio(BACKWARD_DENSE, BACKWARD_SPARSE), 10.0, at_least=True)
    # Its encode half alone: grad_W_enc by the transposed per-latent sums (with W_enc @
    # grad_b_enc in the same pass), the kernel that run 4's Nsight Compute timed at 1.01 ms
    # against 0.55 ms for the plain sums.
    grad_values = torch.randn_like(p.values)
    C = torch.ops.sparsecode_C
    report.time("encode backward alone: cuda (transposed per-latent sums, x without grad)",
                lambda: C.topk_encode_backward(grad_values, p.x, W_enc.detach(), b_dec.detach(),
                                               p.values, p.indices, False))

    floor_bytes = backward_floor_bytes()
    bandwidth = report.attempt("device copy bandwidth", copy_bandwidth)
    sparse = report.times.get(BACKWARD_SPARSE)
    floor_ms = None
    if bandwidth is not None:
        floor_ms = floor_bytes / bandwidth * 1e3
        report.add("sparse backward traffic floor",
                   f"{floor_bytes / GB:.3f} GB at {bandwidth / GB:.0f} GB/s (measured copy): "
                   f"{floor_ms:.3f} ms")
    report.check("issue 7: sparse backward / its traffic floor",
                 sparse / floor_ms if sparse is not None and floor_ms else None, 2.0,
                 at_least=False)
    report.fail_on_errors_since(errors)


def test_nested_prefix_loss(report: Report, problem: Problem) -> None:
    """Issue 7: the nested-prefix loss over all 6 prefixes, forward + backward (values, W_dec,
    b_dec), against one sparse decode forward + backward; both on the auto backend."""
    errors = len(report.errors)
    p = problem
    values = p.values.clone().requires_grad_()
    _, _, W_dec, b_dec = p.leaves()
    wrt = (values, W_dec, b_dec)

    def nested(backend: str) -> Callable[[], tuple[Tensor, ...]]:
        def run() -> tuple[Tensor, ...]:
            loss, _ = ops.nested_prefix_loss(p.x, values, p.indices, W_dec, b_dec, PREFIX_SIZES,
                                             PREFIX_WEIGHTS, backend=backend)
            return torch.autograd.grad(loss, wrt)
        return run

    def nested_forward(backend: str) -> Callable[[], tuple[Tensor, Tensor]]:
        def run() -> tuple[Tensor, Tensor]:
            with torch.no_grad():
                return ops.nested_prefix_loss(p.x, values, p.indices, W_dec, b_dec,
                                              PREFIX_SIZES, PREFIX_WEIGHTS, backend=backend)
        return run

    def decode() -> tuple[Tensor, ...]:
        x_hat = ops.sparse_decode(values, p.indices, W_dec, b_dec, backend="auto")
        return torch.autograd.grad(x_hat, wrt, p.grad_x_hat)

    report.time(NESTED, nested("auto"))
    report.time(DECODE_AUTO, decode)
    # The same two with the host's issuing kept out of the timed region (queued_ms): where the
    # host issues an op's many small launches more slowly than the device runs them, time_ms
    # counts the gaps.
    report.time_queued(NESTED, nested("auto"))
    report.time_queued(DECODE_AUTO, decode)
    device_ratio = report.ratio(queued_label(NESTED), queued_label(DECODE_AUTO))
    if device_ratio is not None:
        report.add("nested loss / one decode, fwd+bwd, device times, host queued ahead",
                   f"{device_ratio:.3g}")
    # The triton backend's nested loss is a Triton walk forward, which also makes the loss's own
    # suffix sums, and a walk-free backward (from the loss alone, the extension's per-latent
    # sums with dots over those), which auto picks; with SPARSECODE_TENSOR_CORES=1 the forward
    # is the tensor-core pass (csrc/cuda/nested_prefix_mma.cu). The cuda backend's is the
    # extension's kernels (H100, 2026-11-27 16:35 UTC: 3.66 ms against the earlier Triton walks'
    # 3.47 ms).
    report.time("nested_prefix_loss fwd+bwd: triton", nested("triton"))
    with tensor_cores():
        report.time("nested_prefix_loss fwd+bwd: triton, tensor cores", nested("triton"))
    report.time("nested_prefix_loss fwd+bwd: cuda", nested("cuda"))
    # What one forward + backward holds at its peak, beyond what was allocated before it (the
    # triton forward holds its residuals R and the suffix sums at once, then only the latter).
    def peak_bytes(run: Callable[[], object]) -> int:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        run()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before

    for backend in ("triton", "cuda"):
        label = f"nested_prefix_loss fwd+bwd: {backend}, peak memory above its inputs"
        peak = report.attempt(label, lambda: peak_bytes(nested(backend)))
        if peak is not None:
            report.add(label, f"{peak / GB:.3f} GB")
    report.time("nested_prefix_loss forward: triton", nested_forward("triton"))
    with tensor_cores():
        report.time("nested_prefix_loss forward: triton, tensor cores", nested_forward("triton"))
    report.time("nested_prefix_loss forward: cuda", nested_forward("cuda"))
    # The forward rows run under no_grad, where the triton forward makes no suffix sums: the
    # Triton walk at depth 1 (against the depth the autotuner picks, above); then the forward
    # with the suffix sums, as a training step's makes them, as the walk and on the tensor
    # cores. Then the backward alone: from the loss alone, the pass over the pairs from the
    # forward's suffix sums P; under other upstream gradients, the suffix sums made again (by
    # the walk through the residuals, freed before the pass over the pairs as the op's autograd
    # formula frees them; on the tensor cores from the rows), then the pass over the pairs.
    from sparsecode.triton_kernels.nested_prefix_loss import (
        nested_prefix_loss_forward, nested_prefix_loss_pair_grads, nested_prefix_loss_residuals,
        nested_prefix_loss_suffix_sums, nested_prefix_loss_suffix_sums_on_tensor_cores)

    def forward(stages: int | None = None, suffix_sums: bool = True) -> Callable[[], object]:
        return lambda: nested_prefix_loss_forward(p.x, p.values, p.indices, W_dec, b_dec,
                                                  PREFIX_SIZES, PREFIX_WEIGHTS, stages=stages,
                                                  suffix_sums=suffix_sums)

    with torch.no_grad():
        report.time("nested_prefix_loss forward: triton, STAGES=1",
                    forward(stages=1, suffix_sums=False))
        # The same walk at the depth the autotuner picks, called directly: against the row
        # above, the autotuner's cost a call; against "forward: triton" (the op, which run 4
        # timed at 1.176 ms where STAGES=1 took 0.800), the op's own.
        report.time("nested_prefix_loss forward: triton, direct call, autotuned",
                    forward(suffix_sums=False))
        report.time("nested_prefix_loss forward with the suffix sums (a training step's): triton",
                    forward())
        with tensor_cores():
            report.time("nested_prefix_loss forward with the suffix sums (a training step's): "
                        "triton, tensor cores", forward())
        training_forward = forward()

        def backward_from_loss(P: Tensor) -> tuple[Tensor, ...]:
            """The backward from the loss alone, from the forward's suffix sums P."""
            return (*nested_prefix_loss_pair_grads(P, p.values, p.indices, W_dec, PREFIX_SIZES),
                    -P[0].sum(0))

        P = training_forward()[3]
        report.time("nested_prefix_loss backward from the loss alone: triton",
                    lambda: backward_from_loss(P))
        del P

        def direct() -> tuple[Tensor, ...]:
            return backward_from_loss(training_forward()[3])

        # The two rows above as one call, without the op's custom ops and autograd: against
        # the NESTED row, what those layers cost (run 4: the forward and the backward timed
        # apart summed to 1.93 ms where the op took 2.77).
        report.time(NESTED_DIRECT, direct)
        report.time_queued(NESTED_DIRECT, direct)
        grad_loss = torch.ones((), device=DEVICE)
        grad_prefix_losses = torch.zeros(len(PREFIX_SIZES), device=DEVICE)

        def backward() -> tuple[Tensor, ...]:
            resid = nested_prefix_loss_residuals(p.x, p.values, p.indices, W_dec, b_dec,
                                                 PREFIX_SIZES)
            S, grad_x, grad_b_dec = nested_prefix_loss_suffix_sums(
                grad_loss, grad_prefix_losses, None, p.values, p.indices, W_dec, PREFIX_SIZES,
                PREFIX_WEIGHTS, resid)
            del resid
            return (grad_x, grad_b_dec,
                    *nested_prefix_loss_pair_grads(S, p.values, p.indices, W_dec, PREFIX_SIZES))

        report.time("nested_prefix_loss backward under other upstream gradients: triton "
                    "(the residuals walked again)", backward)

        def backward_on_tensor_cores() -> tuple[Tensor, ...]:
            S, grad_x, grad_b_dec = nested_prefix_loss_suffix_sums_on_tensor_cores(
                grad_loss, grad_prefix_losses, None, p.x, p.values, p.indices, W_dec, b_dec,
                PREFIX_SIZES, PREFIX_WEIGHTS)
            return (grad_x, grad_b_dec,
                    *nested_prefix_loss_pair_grads(S, p.values, p.indices, W_dec, PREFIX_SIZES))

        with tensor_cores():
            report.time("nested_prefix_loss backward under other upstream gradients: triton, "
                        "tensor cores (the suffix sums from the rows)", backward_on_tensor_cores)
    from sparsecode.triton_kernels.sparse_decode import picked_depths

    report.add("Triton walks: pipelining depths the autotuner picked",
               "; ".join(f"{name} {depths}" for name, depths in picked_depths().items()))
    report.check("issue 7: nested loss / one decode, fwd+bwd", report.ratio(NESTED, DECODE_AUTO),
                 1.2, at_least=False)
    report.fail_on_errors_since(errors)


class TrainStep:
    """One training step of `sae` on bfloat16 x [B, d_model]: the SAE's weights are bfloat16,
    their float32 masters and Adam moments live in a MasterWeightAdam; forward, loss and
    backward, with each weight stepped (and its gradient freed) as its gradient lands (with
    side_stream, on a second CUDA stream), or with after_backward, one optimiser step after the
    backward."""

    def __init__(self, sae: sparsecode.SAE, x: Tensor, after_backward: bool = False,
                 side_stream: bool = False) -> None:
        self.sae, self.x = sae.to(DTYPE), x
        self.after_backward = after_backward
        self.opt = MasterWeightAdam(sae.parameters(), lr=LR, step_in_backward=not after_backward,
                                    side_stream=side_stream)

    def __call__(self) -> None:
        self.sae(self.x).loss.backward()
        if self.after_backward:
            self.opt.step()
            self.opt.zero_grad()

    def time_adam(self, runs: int) -> float:
        """Median ms of the optimiser step alone, on random bfloat16 gradients."""
        for p in self.sae.parameters():
            p.grad = torch.randn_like(p)
        ms = time_ms(self.opt.step, runs=runs)
        self.opt.zero_grad()
        return ms


@dataclass(frozen=True)
class StepFigures:
    """A step's median time, its peak allocation above the memory at rest (rest_bytes: the
    bfloat16 weights, their float32 masters, the Adam moments and x) and, where measured, the
    bare encoder GEMM's and the Adam step's times."""

    batch: int
    ms: float
    peak_bytes: int
    rest_bytes: int
    gemm_ms: float | None = None
    adam_ms: float | None = None
    queued: tuple[float, float] | None = None  # queued_ms of the step: (device, host)

    def summary(self) -> str:
        queued = ""
        if self.queued is not None:
            queued = (f"; with the host queued ahead, device {self.queued[0]:.3f} ms, host "
                      f"{self.queued[1]:.3f} ms to issue")
        return (f"{self.ms:.3f} ms, {self.batch / self.ms * 1e3:,.0f} tokens/s, "
                f"peak {self.peak_bytes / GB:.2f} GB above rest ({self.rest_bytes / GB:.2f} GB)"
                f"{queued}")


def measure_step(kind: str, backend: str, batch: int, runs: int = 20,
                 floors: bool = False, queued: bool = False, after_backward: bool = False,
                 side_stream: bool = False) -> StepFigures:
    """Times the TrainStep of a `kind` ("matryoshka" or "topk") SAE on `backend` at `batch`
    rows, then measures one step's peak memory; with queued, also times the step with the host
    queued ahead (queued_ms); with floors, also the Adam step alone and the bare encoder GEMM
    x @ W_enc in bfloat16."""
    torch.manual_seed(SEED)
    if kind == "matryoshka":
        sae = sparsecode.MatryoshkaSAE(D_MODEL, D_SAE, K, list(PREFIX_SIZES), backend=backend,
                                       device=DEVICE)
    else:
        sae = sparsecode.TopKSAE(D_MODEL, D_SAE, K, backend=backend, device=DEVICE)
    x = torch.randn(batch, D_MODEL, device=DEVICE, dtype=DTYPE)
    step = TrainStep(sae, x, after_backward, side_stream)
    ms = time_ms(step, runs=runs)
    gemm_ms = adam_ms = None
    queued_figures = queued_ms(step, runs=runs) if queued else None
    if floors:
        adam_ms = step.time_adam(runs)
        W_enc = sae.W_enc.detach()
        gemm_ms = time_ms(lambda: torch.mm(x, W_enc), runs=runs)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    rest = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return StepFigures(batch, ms, torch.cuda.max_memory_allocated() - rest, rest, gemm_ms,
                       adam_ms, queued_figures)


def reference_step(report: Report) -> StepFigures:
    """The reference Matryoshka step at BATCH rows or, if that runs out of GPU memory, at the
    largest halved batch that fits (reported)."""
    batch = BATCH
    while True:
        try:
            return measure_step("matryoshka", "reference", batch, runs=8)
        except torch.cuda.OutOfMemoryError:
            if batch <= 512:
                raise
        torch.cuda.empty_cache()
        report.add(f"step: matryoshka, reference, B={batch}", "out of GPU memory")
        batch //= 2


def test_training_steps(report: Report) -> None:
    """Issue 7: the full Matryoshka training step on auto against the reference backend, the
    bare encoder GEMM plus the Adam step, its peak memory, and the TopKSAE step."""
    errors = len(report.errors)
    matryoshka = report.attempt(
        "step: matryoshka, auto",
        lambda: measure_step("matryoshka", "auto", BATCH, floors=True, queued=True))
    torch.cuda.empty_cache()
    # The same step without SAE._check_input, whose finite-input test reads a value back from
    # the device on every forward (a synchronisation): what that costs a step.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sparsecode.SAE, "_check_input", lambda self, x: None)
        unchecked = report.attempt(
            "step: matryoshka, auto, without the input check",
            lambda: measure_step("matryoshka", "auto", BATCH, queued=True))
    torch.cuda.empty_cache()
    topk = report.attempt("step: topk, auto", lambda: measure_step("topk", "auto", BATCH))
    torch.cuda.empty_cache()
    after = report.attempt("step: matryoshka, auto, Adam after the backward",
                           lambda: measure_step("matryoshka", "auto", BATCH, after_backward=True))
    torch.cuda.empty_cache()
    side = report.attempt("step: matryoshka, auto, Adam on a side stream",
                          lambda: measure_step("matryoshka", "auto", BATCH, side_stream=True))
    torch.cuda.empty_cache()
    with tensor_cores():
        on_tensor_cores = report.attempt("step: matryoshka, auto, tensor cores",
                                         lambda: measure_step("matryoshka", "auto", BATCH))
    torch.cuda.empty_cache()
    # auto, but the encode on the cuda backend (cuBLAS column chunks folded by topk_select.cu):
    # whether auto should take that encode rather than the Triton fused one.
    encode = sparsecode.sae.topk_encode
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sparsecode.sae, "topk_encode",
                      lambda *args, backend: encode(*args, backend="cuda"))
        cuda_encode = report.attempt("step: matryoshka, auto, the encode on cuda",
                                     lambda: measure_step("matryoshka", "auto", BATCH))
    torch.cuda.empty_cache()
    # Every op on the cuda backend: the encode by column chunks of cuBLAS (topk_select.cu)
    # where auto takes the Triton fused encode, and the CUDA nested loss.
    cuda = report.attempt("step: matryoshka, cuda",
                          lambda: measure_step("matryoshka", "cuda", BATCH))
    torch.cuda.empty_cache()
    ref = report.attempt("step: matryoshka, reference", lambda: reference_step(report))
    torch.cuda.empty_cache()

    for label, figures in (("step: matryoshka, auto", matryoshka), ("step: topk, auto", topk),
                           ("step: matryoshka, auto, Adam after the backward", after),
                           ("step: matryoshka, auto, Adam on a side stream", side),
                           ("step: matryoshka, auto, tensor cores", on_tensor_cores),
                           ("step: matryoshka, auto, without the input check", unchecked),
                           ("step: matryoshka, auto, the encode on cuda", cuda_encode),
                           ("step: matryoshka, cuda", cuda),
                           ("step: matryoshka, reference", ref)):
        if figures is not None:
            report.add(f"{label}, B={figures.batch}", figures.summary())
    if matryoshka is not None:
        report.add("bare encoder GEMM x @ W_enc, bf16", f"{matryoshka.gemm_ms:.3f} ms")
        report.add("Adam step alone (MasterWeightAdam, float32 masters)",
                   f"{matryoshka.adam_ms:.3f} ms")

    same_batch = matryoshka
    if ref is not None and ref.batch != BATCH:
        same_batch = report.attempt(f"step: matryoshka, auto, B={ref.batch}",
                                    lambda: measure_step("matryoshka", "auto", ref.batch))
        if same_batch is not None:
            report.add(f"step: matryoshka, auto, B={ref.batch}", same_batch.summary())
    both = ref is not None and same_batch is not None
    batch = ref.batch if ref is not None else BATCH
    report.check(f"issue 7: step tokens/s, auto / reference (B={batch})",
                 ref.ms / same_batch.ms if both else None, 4.0, at_least=True)
    report.check("issue 7: step / (encoder GEMM + Adam step)",
                 matryoshka.ms / (matryoshka.gemm_ms + matryoshka.adam_ms)
                 if matryoshka is not None else None, 1.3, at_least=False)
    report.check(f"issue 7: step peak memory, auto / reference (B={batch})",
                 same_batch.peak_bytes / ref.peak_bytes if both else None, 0.25, at_least=False)
    report.check("issue 7: Matryoshka step / TopK step",
                 matryoshka.ms / topk.ms if matryoshka is not None and topk is not None else None,
                 1.05, at_least=False)
    report.fail_on_errors_since(errors)


def test_encode_tma_sweep(report: Report, problem: Problem) -> None:
    """Issue 6: the fused encode with the tensor-descriptor (TMA) loads of TMA_SWEEP; last in
    the module, since a kernel fault would leave the CUDA context unusable."""
    sweep_encode_configs(report, problem, TMA_SWEEP)
    sweep_encode_configs(report, problem, [TMA_DEFAULT], label="encode config, again at the end")
