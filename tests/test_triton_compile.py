"""Every Triton kernel compiles for sm_80 and sm_90, without a GPU.

triton.compile with an explicit target lowers a kernel to PTX and runs Triton's own ptxas, so
a kernel that would fail to compile on a GPU fails here. Each kernel is compiled with the tiles
its launcher uses on a GPU, for float32, bfloat16 and float16; the fused encode with k padded
to 1 and 64 slots (and 256, the largest k, in bfloat16), for sm_90 also with its
tensor-descriptor (TMA) loads, and in bfloat16 also with the other options and tiles that the
GPU benchmark's sweep runs (pointer tiles folded by column halves, insertion steps before the
test across warps); its range merge at the widths it takes; the
nested loss's plan, forward and backward; and every bfloat16 kernel with its sizes
specialised to 1, as Triton does at launch for an int argument equal to 1. The two
architectures compile in parallel child processes.

The CPU test session runs Triton interpreted (TRITON_INTERPRET=1, which makes every
@triton.jit an interpreter object), so the compiles run in a child process without it:
``python tests/test_triton_compile.py ARCH``.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("triton", reason="the triton package is not installed (pip install triton)")

ROOT = Path(__file__).resolve().parent.parent
ARCHITECTURES = [80, 90]
TRITON_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def cases(arch: int) -> list[tuple[str, Any, dict[str, str], dict[str, Any], dict[str, int]]]:
    """(label, kernel, signature, constexprs, options) of every kernel compile for sm_<arch>."""
    import torch

    from sparsecode.triton_kernels import (master_adam, nested_prefix_loss, sparse_decode,
                                           topk_encode)

    found = []
    block_b, block_d = sparse_decode._blocks()
    for name, t in TRITON_DTYPES.items():
        dtype = getattr(torch, name)
        tma_options = (False, True) if arch >= 90 and name != "float32" else (False,)
        pads = (1, 64, 256) if name == "bfloat16" else (1, 64)
        variants = [(topk_encode.default_tiles(dtype, tma), pads) for tma in tma_options]
        if name == "bfloat16":
            # The benchmark's sweep also folds the pointer tiles by halves, takes insertion
            # steps before testing across warps (some, or the count alone) with the last tiles.
            pointer, last = variants[0][0], variants[-1][0]
            variants.append((dataclasses.replace(pointer, select_halves=True), pads))
            variants += [(dataclasses.replace(last, unchecked_steps=steps), (64,))
                         for steps in (16, 128)]
        for tiles, k_pads in variants:
            tma = tiles.tma
            for k_pad in k_pads:
                found.append((
                    f"topk_encode {name} tma={tma} select_halves={tiles.select_halves} "
                    f"unchecked_steps={tiles.unchecked_steps} block_n={tiles.block_n} "
                    f"stages={tiles.num_stages} K_PAD={k_pad}",
                    topk_encode._encode_kernel,
                    {"xc_ptr": f"*{t}", "w_ptr": f"*{t}", "b_ptr": f"*{t}",
                     "cand_v_ptr": "*fp32", "cand_i_ptr": "*i32", "B": "i32", "d": "i32",
                     "n": "i32", "k": "i32", "tiles_per_split": "i32"},
                    {"BLOCK_B": tiles.block_b, "BLOCK_N": tiles.block_n,
                     "BLOCK_D": tiles.block_d, "K_PAD": k_pad, "INPUT_PRECISION": "ieee",
                     "TMA": tma, "SELECT_SPLIT": 2 if tiles.select_halves else 1,
                     "KEYED": topk_encode._keyed(dtype, tiles),
                     "UNCHECKED": tiles.unchecked_steps},
                    {"num_warps": tiles.num_warps, "num_stages": tiles.num_stages},
                ))
        cap = sparse_decode.walk_registers(dtype)
        # 64-bit offsets (WIDE, R_WIDE) only from 2^31 elements: at depth 1 alone.
        decode_walks = [
            ("sparse_decode", sparse_decode._decode_kernel,
             {"val_ptr": f"*{t}", "idx_ptr": "*i64", "w_ptr": f"*{t}", "bias_ptr": f"*{t}",
              "out_ptr": f"*{t}", "B": "i32", "k": "i32", "d": "i32"}),
            ("sparse_decode grad_values", sparse_decode._grad_values_kernel,
             {"g_ptr": f"*{t}", "idx_ptr": "*i64", "w_ptr": f"*{t}", "partial_ptr": "*fp32",
              "B": "i32", "k": "i32", "d": "i32"}),
        ]
        walks = [
            (f"{label}{' WIDE' if wide else ''}", kernel, signature, {"WIDE": wide},
             sparse_decode._WARPS, cap, (1,) if wide else sparse_decode.DECODE_STAGES)
            for label, kernel, signature in decode_walks for wide in (False, True)
        ] + [
            # The forward (SUFFIX: with the loss's suffix sums) and the residuals walked again.
            (f"nested_prefix_loss forward SUFFIX={suffix}{' WIDE' if wide else ''}",
             nested_prefix_loss._forward_kernel,
             {"x_ptr": f"*{t}", "bias_ptr": f"*{t}", "slot_ptr": "*i64", "present_ptr": "*i32",
              "w_ptr": f"*{t}", "xhat_ptr": f"*{t}", "resid_ptr": "*fp32",
              "partial_ptr": "*fp32", "coef_ptr": "*fp32", "p_ptr": f"*{t}", "B": "i32",
              "k": "i32", "d": "i32", "G": "i32"},
             {"SUFFIX": suffix, "WIDE": wide, "R_WIDE": wide}, nested_prefix_loss._WARPS, cap,
             (1,) if wide else nested_prefix_loss.NESTED_STAGES)
            for suffix in (True, False) for wide in (False, True)
        ]
        # Every pipelining depth that the autotuner may pick on a GPU, with the launchers'
        # register caps.
        for label, kernel, signature, constexprs, warps, max_registers, depths in walks:
            for depth in depths:
                found.append((
                    f"{label} {name} STAGES={depth}", kernel, signature,
                    {"BLOCK_B": block_b, "BLOCK_D": block_d, **constexprs, "STAGES": depth},
                    {"num_warps": warps, "maxnreg": max_registers},
                ))
        # The suffix sums, with the tiles of a d_model of 256 or more.
        for has_gxh in (False, True):
            found.append((
                f"nested_prefix_loss suffix {name} HAS_GXH={has_gxh}",
                nested_prefix_loss._suffix_kernel,
                {"resid_ptr": "*fp32", "s_ptr": f"*{t}", "gxh_ptr": f"*{t}", "scale_ptr": "*fp32",
                 "gx_ptr": f"*{t}", "B": "i32", "d": "i32", "G": "i32"},
                {"HAS_GXH": has_gxh, "BLOCK_B": nested_prefix_loss._SUFFIX_ROWS,
                 "BLOCK_D": nested_prefix_loss._SUFFIX_COLS},
                {"num_warps": nested_prefix_loss._SUFFIX_WARPS},
            ))
        found.append((
            f"master_adam {name}", master_adam._master_adam_kernel,
            {"param_ptr": f"*{t}", "grad_ptr": f"*{t}", "master_ptr": "*fp32", "m_ptr": "*fp32",
             "v_ptr": "*fp32", "n": "i32", "step_size": "fp32", "beta1": "fp32",
             "beta2": "fp32", "eps": "fp32", "bc2_sqrt": "fp32"},
            {"HAS_MASTER": name != "float32", "BLOCK": master_adam._block()}, {},
        ))
    for w_pad in (1, topk_encode.MERGE_WIDTH):
        for name, t in TRITON_DTYPES.items():
            found.append((
                f"topk_encode merge {name} W_PAD={w_pad}", topk_encode._merge_kernel,
                {"cand_v_ptr": "*fp32", "cand_i_ptr": "*i32", "val_ptr": f"*{t}",
                 "idx_ptr": "*i64", "k": "i32", "width": "i32"},
                {"W_PAD": w_pad}, {"num_warps": topk_encode._merge_warps(w_pad)},
            ))
    # Triton makes an int argument equal to 1 a constexpr at launch (B = 1, k = 1, d = 1, G = 1):
    # each bfloat16 kernel (walks at depth 1) compiles with its sizes so specialised too (with
    # tensor descriptors only B and k: d and n are multiples of 8 there).
    specialised = []
    for label, kernel, signature, constexprs, options in found:
        if "bfloat16" not in label or any(f"STAGES={s}" in label for s in (2, 3, 4)):
            continue
        ones = [name for name in ("B", "k", "d", "n", "G", "width") if name in signature
                and not (constexprs.get("TMA") and name in ("d", "n"))]
        specialised.append((f"{label} ({', '.join(ones)} specialised to 1)", kernel,
                            {name: kind for name, kind in signature.items() if name not in ones},
                            {**constexprs, **dict.fromkeys(ones, 1)}, options))
    found += specialised
    for k_pad in (1, 64, 256):
        found.append((
            f"nested_prefix_loss plan K_PAD={k_pad}", nested_prefix_loss._plan_kernel,
            {"idx_ptr": "*i64", "val_ptr": "*bf16", "sizes_ptr": "*i64", "slot_ptr": "*i64",
             "present_ptr": "*i32", "B": "i32", "k": "i32", "G": "i32"},
            {"BLOCK_P": nested_prefix_loss._plan_rows(k_pad), "K_PAD": k_pad}, {},
        ))
    return found


def compile_all(arch: int) -> list[str]:
    """Compiles every case for sm_<arch>; returns a line per failure."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    failures = []
    for label, kernel, signature, constexprs, options in cases(arch):
        types = {**signature, **dict.fromkeys(constexprs, "constexpr")}
        source = ASTSource(fn=kernel, signature=types, constexprs=constexprs)
        try:
            compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
            assert compiled.asm.get("cubin"), "no cubin"
        except Exception as error:  # noqa: BLE001 - every failure is reported, then the test fails
            failures.append(f"{label}: {type(error).__name__}: {str(error)[:2000]}")
    return failures


def test_every_triton_kernel_compiles() -> None:
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    children = {arch: subprocess.Popen([sys.executable, __file__, str(arch)], cwd=ROOT, env=env,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for arch in ARCHITECTURES}
    failures = []
    for arch, child in children.items():
        out, err = child.communicate(timeout=600)
        if child.returncode != 0:
            failures.append(f"sm_{arch} (exit {child.returncode}):\n{out}\n{err[-4000:]}")
    assert not failures, "Triton compiles failed:\n" + "\n".join(failures)


if __name__ == "__main__":
    problems = compile_all(int(sys.argv[1]))
    print("\n".join(problems) or "all compiled")
    sys.exit(1 if problems else 0)
