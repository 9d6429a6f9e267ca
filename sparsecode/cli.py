"""Command line: ``sparsecode demo`` trains and evaluates a Matryoshka SAE on planted
features; ``sparsecode backends`` reports which kernel backends are available."""

from __future__ import annotations

import argparse
import json
import time

import torch

from sparsecode.backends import BACKENDS, BackendUnavailableError, backends
from sparsecode.demo import run_demo


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sparsecode", description="Fast TopK and Matryoshka sparse autoencoders."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser(
        "demo",
        help="train a Matryoshka SAE on synthetic planted features and evaluate each prefix",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    demo.add_argument("--seed", type=int, default=0, help="random seed (data and init)")
    demo.add_argument("--steps", type=_positive_int, default=1000, help="training steps")
    demo.add_argument("--batch-size", type=_positive_int, default=512, help="samples per step")
    demo.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate")
    demo.add_argument("--d-model", type=_positive_int, default=128, help="activation width")
    demo.add_argument(
        "--n-features", type=_positive_int, default=256, help="planted dictionary size"
    )
    demo.add_argument("--d-sae", type=_positive_int, default=256, help="SAE dictionary size")
    demo.add_argument("--k", type=_positive_int, default=8, help="active latents per sample")
    demo.add_argument(
        "--prefix-sizes",
        type=_positive_int,
        nargs="+",
        default=None,
        help="nested prefix sizes, ending at d-sae (default: d_sae/8, d_sae/4, d_sae/2, d_sae)",
    )
    demo.add_argument(
        "--backend",
        default="auto",
        choices=BACKENDS,
        help="kernel backend",
    )
    demo.add_argument(
        "--threads",
        type=_positive_int,
        default=1,
        help="torch CPU threads (the demo's tensors are small: one thread avoids "
        "oversubscription overhead)",
    )
    demo.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    commands.add_parser("backends", help="print the available kernel backends as JSON")
    return parser


def _demo(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    try:
        result = run_demo(
            d_model=args.d_model,
            n_features=args.n_features,
            d_sae=args.d_sae,
            k=args.k,
            prefix_sizes=args.prefix_sizes,
            steps=args.steps,
            batch_size=args.batch_size,
            lr=args.lr,
            seed=args.seed,
            backend=args.backend,
            progress=not args.no_progress,
        )
    except (ValueError, BackendUnavailableError) as error:  # raised before training starts
        parser.error(str(error))
    seconds = time.perf_counter() - start
    print(
        f"Matryoshka SAE d_model={args.d_model} d_sae={args.d_sae} k={args.k} on "
        f"{result.n_features} planted features ({result.mean_active:.1f} active per sample), "
        f"{args.steps} steps in {seconds:.1f} s, final training loss {result.final_loss:.4f}\n"
    )
    print(result.to_markdown())
    print()
    print(result.interpretation())
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the ``sparsecode`` command line on argv (default sys.argv[1:]); return the exit code."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.command == "demo":
        return _demo(parser, args)
    print(json.dumps(backends(), indent=2))
    return 0
