"""Command line: ``sparsecode compare`` answers "nested or pruned?" with a report;
``sparsecode train`` trains a TopK or Matryoshka SAE on a language model's activations; ``sparsecode demo`` trains and evaluates a Matryoshka SAE on planted features;
``sparsecode backends`` reports which kernel backends are available."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import time
from pathlib import Path

import torch

from sparsecode.backends import BACKENDS, BackendUnavailableError, backends
from sparsecode.demo import run_demo


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _int_list(text: str) -> list[int]:
    try:
        return [int(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be comma-separated integers such as 512,1024,2048, got {text!r}"
        ) from None


def _float_list(text: str) -> list[float]:
    try:
        return [float(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be comma-separated numbers such as 1,1,1,1, got {text!r}"
        ) from None


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _add_shared_arguments(parser: argparse.ArgumentParser, tokens: int, out_help: str) -> None:
    """The model, text, cache and SAE flags that train and compare share."""
    from sparsecode.lm import DEFAULT_HOOK, DEFAULT_MODEL
    from sparsecode.sae import ACTIVATIONS
    from sparsecode.train import DTYPES, TrainConfig

    defaults = TrainConfig()
    parser.add_argument("--d-sae", type=_positive_int, default=defaults.d_sae, help="latents")
    parser.add_argument("--k", type=_positive_int, default=defaults.k,
                        help="active latents per token (the average, for --activation batchtopk)")
    parser.add_argument(
        "--activation", choices=ACTIVATIONS, default=defaults.activation,
        help="topk: k latents per token; batchtopk: the batch's B*k largest, learnt threshold "
        "at inference",
    )
    parser.add_argument("--k-max", type=_positive_int, default=None,
                        help="batchtopk: most latents one token may use (default 4*k)")
    parser.add_argument(
        "--prefix-sizes", type=_int_list, default=None,
        help="Matryoshka prefix sizes, comma-separated, ending at --d-sae "
        "(default d_sae/16,d_sae/8,d_sae/4,d_sae/2,d_sae)",
    )
    parser.add_argument("--tokens", type=_positive_int, default=tokens,
                        help="training tokens (activations extracted once into the cache)")
    parser.add_argument("--batch-size", type=_positive_int, default=defaults.batch_size,
                        help="tokens per optimiser step (all processes together)")
    parser.add_argument("--lr", type=_positive_float, default=defaults.lr, help="Adam learning rate")
    parser.add_argument("--dtype", choices=DTYPES, default=defaults.dtype,
                        help="SAE weight and activation dtype while training (bfloat16 keeps "
                        "float32 master weights in the optimiser; it pays on GPUs, while on a "
                        "CPU a step takes about as long as in float32)")
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="transformer_lens model name, or a .gguf file (Llama architecture)")
    parser.add_argument("--hook", default=DEFAULT_HOOK, help="transformer_lens hook name")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--text", default=None,
                        help="a .txt/.jsonl file or a folder of them (default: BBC News articles)")
    source.add_argument("--dataset", default=None, help="a Hugging Face dataset name (needs the hub)")
    parser.add_argument("--context-length", type=_positive_int, default=128,
                        help="tokens per context fed to the model")
    parser.add_argument("--cache", default=None,
                        help="activation cache folder (default: one per model/hook/text under "
                        "$SPARSECODE_HOME or ~/.cache/sparsecode)")
    parser.add_argument("--cache-dtype", choices=("bfloat16", "float32"), default="bfloat16",
                        help="dtype of the cached activations")
    parser.add_argument("--out", default=None, help=out_help)
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if any)")
    parser.add_argument("--backend", default="auto", choices=BACKENDS, help="kernel backend")
    parser.add_argument("--seed", type=int, default=0, help="random seed (init and data order)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def _add_train_parser(commands) -> None:
    from sparsecode.train import ARCHS, TrainConfig

    defaults = TrainConfig()
    train = commands.add_parser(
        "train",
        help="train a TopK or Matryoshka SAE on a language model's activations",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    train.add_argument("--arch", choices=ARCHS, default=defaults.arch, help="SAE architecture")
    _add_shared_arguments(train, defaults.tokens,
                          "run folder (default: runs/<arch>-<d_sae>-k<k>-<date-time>)")
    train.add_argument(
        "--prefix-weights", type=_float_list, default=None,
        help="one weight per prefix, comma-separated (default uniform 1/G)",
    )
    train.add_argument("--resume", action="store_true",
                       help="continue the run in --out from its last checkpoint")
    train.add_argument("--log-every", type=_positive_int, default=defaults.log_every,
                       help="steps between metrics lines")
    train.add_argument("--checkpoint-every", type=_positive_int, default=defaults.checkpoint_every,
                       help="steps between checkpoints")


def _add_compare_parser(commands) -> None:
    from sparsecode.compare import CompareConfig

    defaults = CompareConfig(model="", hook="")
    compare = commands.add_parser(
        "compare",
        help="nested or pruned? train a TopK and a Matryoshka SAE and compare every size",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _add_shared_arguments(compare, defaults.tokens,
                          "output folder (default: runs/compare-<d_sae>-k<k>-<date-time>)")
    compare.add_argument("--topk", default=None,
                         help="use this saved TopK SAE folder instead of training one")
    compare.add_argument("--matryoshka", default=None,
                         help="use this saved Matryoshka SAE folder instead of training one")
    compare.add_argument("--eval-tokens", type=_positive_int, default=defaults.eval_tokens,
                         help="held-out tokens for reconstruction metrics")
    compare.add_argument("--ce-contexts", type=_positive_int, default=defaults.ce_contexts,
                         help="held-out contexts spliced for CE-loss recovered, KL and RSA")


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

    _add_train_parser(commands)
    _add_compare_parser(commands)
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


def _device(parser: argparse.ArgumentParser, requested: str | None) -> str:
    """--device, defaulting to cuda when torch sees a GPU; a parser error for a missing GPU."""
    device = requested or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {device}: torch sees no CUDA device here; use --device cpu")
    return device


def _train(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    import torch.distributed as dist

    from sparsecode.cache import activation_key, ensure_cache
    from sparsecode.train import TrainConfig, train

    if args.resume and args.out is None:
        parser.error("--resume needs --out RUN_FOLDER: the run to continue")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = _device(parser, args.device)
    if device == "cuda" and world > 1:
        device = f"cuda:{local_rank}"
    config = TrainConfig(
        arch=args.arch, d_sae=args.d_sae, k=args.k, activation=args.activation,
        k_max=args.k_max, prefix_sizes=args.prefix_sizes,
        prefix_weights=args.prefix_weights, tokens=args.tokens, batch_size=args.batch_size,
        lr=args.lr, seed=args.seed, backend=args.backend, device=device, dtype=args.dtype,
        log_every=args.log_every, checkpoint_every=args.checkpoint_every,
    )
    try:
        config.check()
        if args.arch == "matryoshka":
            from sparsecode.sae import _check_prefixes

            _check_prefixes(args.d_sae, config.resolved_prefix_sizes(), args.prefix_weights)
        if args.text is not None and not Path(args.text).exists():
            raise ValueError(f"--text {args.text}: no such file or folder")
        key = activation_key(
            model=args.model, hook=args.hook, text=args.text, dataset=args.dataset,
            split="train", context_length=args.context_length, dtype=args.cache_dtype,
        )
    except ValueError as error:
        parser.error(str(error))
    out = Path(args.out) if args.out else Path("runs") / (
        f"{args.arch}-{args.d_sae}-k{args.k}-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    )
    if (out / "checkpoint.pt").exists() and not args.resume:
        parser.error(f"--out {out} already holds a run: add --resume to continue it, or pick "
                     "another --out")
    if args.resume and not (out / "checkpoint.pt").exists():
        parser.error(f"--resume: --out {out} holds no checkpoint.pt to continue from")
    if world > 1:
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    rank = dist.get_rank() if world > 1 else 0
    try:
        if rank == 0:
            try:
                cache = ensure_cache(
                    key, args.tokens, folder=args.cache, text=args.text, dataset=args.dataset,
                    device=device, progress=not args.no_progress,
                )
            except (ValueError, ModuleNotFoundError) as error:  # bad --model/--hook/--text
                parser.error(str(error))
        if world > 1:
            folder = [str(cache.folder) if rank == 0 else None]
            dist.broadcast_object_list(folder, src=0)
            if rank != 0:
                from sparsecode.cache import ActivationCache

                cache = ActivationCache.open(folder[0])
        if cache.tokens < args.tokens:
            print(f"the text holds only {cache.tokens} tokens: training {args.tokens} tokens "
                  "goes over them more than once")
        result = train(config, cache, out, resume=args.resume, progress=not args.no_progress)
    finally:
        if world > 1:
            dist.destroy_process_group()
    if rank == 0:
        last = result.metrics
        print(
            f"trained {args.arch} SAE d_sae={args.d_sae} k={args.k} on {config.steps * args.batch_size} "
            f"tokens of {args.model} {args.hook}: FVU {last.get('fvu', float('nan')):.3f}, "
            f"L0 {last.get('l0', float('nan')):.1f}, dead {last.get('dead_fraction', 0):.1%}"
        )
        print(f"SAE saved to {result.sae_dir} (SAELens format; load with sparsecode.load)")
        print(f"metrics in {out / 'metrics.jsonl'}, checkpoint in {out / 'checkpoint.pt'}")
    return 0


def _compare(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from sparsecode.compare import CompareConfig, run_compare

    device = _device(parser, args.device)
    config = CompareConfig(
        model=args.model, hook=args.hook, text=args.text, dataset=args.dataset,
        context_length=args.context_length, cache=args.cache, cache_dtype=args.cache_dtype,
        d_sae=args.d_sae, k=args.k, activation=args.activation, k_max=args.k_max,
        prefix_sizes=args.prefix_sizes, tokens=args.tokens,
        batch_size=args.batch_size, lr=args.lr, seed=args.seed, backend=args.backend,
        device=device, dtype=args.dtype, topk_path=args.topk, matryoshka_path=args.matryoshka,
        eval_tokens=args.eval_tokens, ce_contexts=args.ce_contexts,
    )
    try:
        for arch in ("topk", "matryoshka"):
            train_config = config.train_config(arch)
            train_config.check()
        from sparsecode.sae import _check_prefixes

        _check_prefixes(args.d_sae, config.train_config("matryoshka").resolved_prefix_sizes(), None)
        for flag, path in (("--text", args.text), ("--topk", args.topk), ("--matryoshka", args.matryoshka)):
            if path is not None and not Path(path).exists():
                raise ValueError(f"{flag} {path}: no such file or folder")
    except ValueError as error:
        parser.error(str(error))
    out = Path(args.out) if args.out else Path("runs") / (
        f"compare-{args.d_sae}-k{args.k}-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    )
    try:
        results = run_compare(config, out, progress=not args.no_progress)
    except (ValueError, ModuleNotFoundError) as error:  # bad --model/--hook/--text or SAEs
        parser.error(str(error))
    sizes = results["sizes"]
    print(f"compared nested and pruned SAEs of sizes {sizes} (d_sae={args.d_sae}, k={args.k})")
    print(f"report: {out / 'report.md'} (tables, reading and plots; every number in "
          f"{out / 'results.json'})")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the ``sparsecode`` command line on argv (default sys.argv[1:]); return the exit code."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.command == "demo":
        return _demo(parser, args)
    if args.command == "train":
        return _train(parser, args)
    if args.command == "compare":
        return _compare(parser, args)
    print(json.dumps(backends(), indent=2))
    return 0
