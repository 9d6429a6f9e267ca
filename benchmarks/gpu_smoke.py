"""A first run of the GPU kernels that no GPU has run yet, before gpu_check.sh's tests and
benchmarks: each check in a process of its own, so that a kernel that faults (leaving its
process's CUDA context unusable) fails only its own check, and the later stages can leave it
out rather than fail wholesale.

    python benchmarks/gpu_smoke.py [--env-file FILE] [--device cpu --small]

Checks (bfloat16, at awkward small shapes and at the benchmarks' size, B=8192, d_model=2304,
d_sae=65536, k=64, 6 prefix sizes):
- tensor_cores: the triton encode + decode backward (its cuda per-latent sums on the tensor
  cores) and the triton nested loss forward + backward (its pass over the rows on the tensor
  cores) against the same with SPARSECODE_TENSOR_CORES=0, finite and within bfloat16's
  tolerance;
- cuda_encode: the cuda backend's encode (cuBLAS column chunks folded into a running top k)
  against float32 pre-activations: ascending indices, values, and a top k within tolerance.

Prints one line per check and exits 1 if any failed. A check that raised or whose process died
(a fault, a refusal) is left out of the later stages: with --env-file the script writes there
the shell exports that do so, SPARSECODE_TENSOR_CORES=0 and SPARSECODE_SKIP_CUDA_ENCODE=1
(which tests/test_cuda_ops.py and benchmarks/test_gpu.py honour). A check whose results only
differ is kept: the tests stage shows where, and the benchmarks still time it.
--device cpu --small runs the checks' code on the CPU backends, to test this script without a
GPU (tests/test_gpu_smoke.py).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Callable

import torch
from torch import Tensor

TOLERANCE = 2e-2  # bfloat16's, DESIGN.md §5
SMALL = [(5, 264, 130, 17, (8, 20, 40, 130)), (33, 24, 100, 33, (1, 2, 3, 4, 5, 6, 7, 100))]
REAL = (8192, 2304, 65536, 64, (2048, 4096, 8192, 16384, 32768, 65536))
DIFFERS = 2  # a check's exit status where its results differ but nothing raised
EXPORTS = {"tensor_cores": "export SPARSECODE_TENSOR_CORES=0",
           "cuda_encode": "export SPARSECODE_SKIP_CUDA_ENCODE=1"}


def rel_error(out: Tensor, ref: Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (inf where out is not finite)."""
    if not bool(torch.isfinite(out).all()):
        return float("inf")
    ref64 = ref.double()
    return ((out.double() - ref64).norm() / ref64.norm().clamp_min(1e-30)).item()


def problem(B: int, d: int, n: int, k: int, device: str) -> list[Tensor]:
    """x [B, d], W_enc [d, n], b_enc [n], b_dec [d], W_dec [n, d] (unit rows), bfloat16."""
    generator = torch.Generator(device=device).manual_seed(B + d + n + k)
    W_dec = torch.randn(n, d, device=device, generator=generator)
    W_dec /= W_dec.norm(dim=1, keepdim=True)
    x = torch.randn(B, d, device=device, generator=generator)
    b_enc = 0.01 * torch.randn(n, device=device, generator=generator)
    b_dec = 0.01 * torch.randn(d, device=device, generator=generator)
    return [t.to(torch.bfloat16) for t in (x, W_dec.T.contiguous(), b_enc, b_dec, W_dec)]


def with_tensor_cores(on: bool, run: Callable[[], list[Tensor]]) -> list[Tensor]:
    """run() with SPARSECODE_TENSOR_CORES unset (on) or "0" (off), synchronised."""
    before = os.environ.pop("SPARSECODE_TENSOR_CORES", None)
    try:
        if not on:
            os.environ["SPARSECODE_TENSOR_CORES"] = "0"
        out = [t.detach().clone() for t in run()]
        if out[0].is_cuda:
            torch.cuda.synchronize()
        return out
    finally:
        os.environ.pop("SPARSECODE_TENSOR_CORES", None)
        if before is not None:
            os.environ["SPARSECODE_TENSOR_CORES"] = before


def check_tensor_cores(shape: tuple, device: str) -> str:
    """The tensor-core paths against SPARSECODE_TENSOR_CORES=0; '' or what differs."""
    from sparsecode import ops, reference

    B, d, n, k, sizes = shape
    # The triton backend's backward takes the cuda per-latent sums; its encode, not the cuda
    # one, keeps this check apart from the cuda_encode check.
    backend = "triton" if device == "cuda" else "cpp"
    x, W_enc, b_enc, b_dec, W_dec = problem(B, d, n, k, device)
    leaves = [t.requires_grad_() for t in (W_enc, b_enc, W_dec, b_dec)]
    with torch.no_grad():
        values, indices = reference.topk_encode(x, W_enc, b_enc, b_dec, k)
    grad_x_hat = torch.randn_like(x)
    weights = [1.0 / len(sizes)] * len(sizes)

    def backward() -> list[Tensor]:
        v, i = ops.topk_encode(x, W_enc, b_enc, b_dec, k, backend=backend)
        x_hat = ops.sparse_decode(v, i, W_dec, b_dec, backend=backend)
        return list(torch.autograd.grad(x_hat, leaves, grad_x_hat))

    def nested() -> list[Tensor]:
        code = values.clone().requires_grad_()
        loss, prefix_losses = ops.nested_prefix_loss(x, code, indices, W_dec, b_dec, sizes,
                                                     weights, backend=backend)
        grads = torch.autograd.grad(loss, [code, W_dec, b_dec])
        return [loss.reshape(1), prefix_losses, *grads]

    problems = []
    for name, run, names in [("encode + decode backward", backward,
                              ["grad W_enc", "grad b_enc", "grad W_dec", "grad b_dec"]),
                             ("nested loss", nested,
                              ["loss", "prefix losses", "grad values", "grad W_dec",
                               "grad b_dec"])]:
        on, off = with_tensor_cores(True, run), with_tensor_cores(False, run)
        for label, a, b in zip(names, on, off, strict=True):
            error = rel_error(a, b)
            if not error <= TOLERANCE:
                problems.append(f"{name}: {label} rel. error {error:.2e}")
    return "; ".join(problems)


def check_cuda_encode(shape: tuple, device: str) -> str:
    """The encode against float32 pre-activations; '' or what is wrong."""
    from sparsecode import ops

    B, d, n, k, _ = shape
    x, W_enc, b_enc, b_dec, _ = problem(B, d, n, k, device)
    with torch.no_grad():
        values, indices = ops.topk_encode(x, W_enc, b_enc, b_dec, k,
                                          backend="cuda" if device == "cuda" else "cpp")
        pre = (x.float() - b_dec.float()) @ W_enc.float() + b_enc.float()
    problems = []
    if not bool((indices[:, 1:] > indices[:, :-1]).all()):
        problems.append("indices not ascending and distinct")
    else:
        picked = pre.gather(1, indices)
        error = rel_error(values, torch.relu(picked))
        if not error <= TOLERANCE:
            problems.append(f"values rel. error {error:.2e}")
        others = pre.scatter(1, indices, float("-inf")).max(1).values
        slack = TOLERANCE * pre.abs().max()
        missed = (picked.min(1).values < others - slack).sum().item()
        if missed:
            problems.append(f"{missed} of {B} rows not a top {k}")
    return "; ".join(problems)


CHECKS = {"tensor_cores": check_tensor_cores, "cuda_encode": check_cuda_encode}


def run_check(name: str, device: str, small: bool) -> int:
    """Runs check `name` at every shape in this process; prints a line per shape. Returns 0,
    DIFFERS where results only differ, or 1 where the check raised."""
    status = 0
    for shape in SMALL + ([] if small else [REAL]):
        start = time.perf_counter()
        try:
            problems = CHECKS[name](shape, device)
        except Exception as err:  # a fault or a refusal: reported, and the check fails
            problems = f"{type(err).__name__}: {str(err)[:200]}"
            status = 1
        if problems and status == 0:
            status = DIFFERS
        verdict = f"FAILED: {problems}" if problems else "ok"
        print(f"{name} {shape[:4]}: {verdict} ({time.perf_counter() - start:.1f} s)", flush=True)
    return status


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", choices=CHECKS, help="run one check in this process")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--small", action="store_true", help="the small shapes only")
    parser.add_argument("--env-file", help="write the exports that leave out what failed")
    args = parser.parse_args()
    if args.check:
        return run_check(args.check, args.device, args.small)
    left_out, differs = [], []
    for name in CHECKS:
        command = [sys.executable, __file__, "--check", name, "--device", args.device]
        ran = subprocess.run(command + (["--small"] if args.small else []), text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        print(ran.stdout, end="", flush=True)
        if ran.returncode == DIFFERS:
            differs.append(name)
            print(f"{name}: FAILED, results differ; kept in the later stages (the tests show "
                  f"where)", flush=True)
        elif ran.returncode != 0:
            left_out.append(name)
            print(f"{name}: FAILED (exit {ran.returncode}); later stages run with "
                  f"`{EXPORTS[name]}`", flush=True)
    if args.env_file:
        with open(args.env_file, "w") as out:
            out.writelines(f"{EXPORTS[name]}\n" for name in left_out)
    return int(bool(left_out or differs))


if __name__ == "__main__":
    sys.exit(main())
