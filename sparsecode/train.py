"""Training a TopK or Matryoshka SAE on cached activations.

One step on a batch x [B, d_model] of cached activations (scaled by the run's fixed factor
s, chosen once so that E||s x||^2 = d_model):

    loss = sum_g w_g mean_b ||x - x_hat_g||^2 + aux_coeff * AuxK       (see sae.py)

AuxK (Gao et al. 2024, arXiv 2406.04093): latents that have not fired for ``dead_tokens``
tokens are dead; the top ``aux_k`` of the dead latents' pre-activations reconstruct the
residual x - x_hat (x_hat detached, no decoder bias), and their squared error is the
auxiliary loss. It runs through the same sparse ops as the main loss: the TopK encode over
the dead columns of W_enc, then the sparse decode.

Optimisation: Adam; the learning rate warms up linearly over ``warmup_steps`` and decays
linearly to zero over the last ``decay_fraction`` of the steps. Decoder rows stay at unit
norm: before each step the gradient's component along each row is removed, after it each
row is renormalised (as in Gao et al. and Bussmann et al.'s Matryoshka code). ``b_dec``
starts at the mean of a sample of the (scaled) activations.

Precision: ``dtype="float32"`` trains float32 weights with torch's Adam. ``dtype="bfloat16"``
keeps the SAE's weights, the activations and the gradients in bfloat16 and their float32
masters in a :class:`sparsecode.optim.MasterWeightAdam` (the decoder rows are renormalised on
the masters); it halves the memory of the weights the step reads and runs the bfloat16 kernels.

A run folder holds ``metrics.jsonl`` (one JSON line every ``log_every`` steps),
``checkpoint.pt`` (written atomically every ``checkpoint_every`` steps and at the end:
weights, optimiser, schedule, data position, dead-latent counters, RNG) and, at the end,
``sae/`` in SAELens's format with the scale folded into the weights. ``resume=True``
continues from the checkpoint and ends with the same weights as an uninterrupted run.

Data parallel: under ``torchrun`` (WORLD_SIZE > 1) each rank reads its own rows of every
global batch (``batch_size`` is the global batch), gradients are averaged by
DistributedDataParallel (gloo on CPU, NCCL on GPU), and rank 0 alone writes files.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm import tqdm

from sparsecode.cache import ActivationCache
from sparsecode.files import atomic_write
from sparsecode.optim import MasterWeightAdam
from sparsecode.sae import SAE, MatryoshkaSAE, SAEOutput, TopKSAE, _check_activation
from sparsecode.sparse_decode import sparse_decode
from sparsecode.topk_encode import topk_encode

ARCHS = ("topk", "matryoshka")
DTYPES = ("float32", "bfloat16")
CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"


@dataclass
class TrainConfig:
    """What to train and how. tokens: training tokens (steps = tokens // batch_size)."""

    arch: str = "matryoshka"
    d_sae: int = 4096
    k: int = 32
    activation: str = "topk"
    k_max: int | None = None
    prefix_sizes: list[int] | None = None
    prefix_weights: list[float] | None = None
    tokens: int = 131_072
    batch_size: int = 1024
    lr: float = 1e-3
    warmup_steps: int = 10
    decay_fraction: float = 0.2
    aux_k: int | None = None
    aux_coeff: float = 1 / 32
    dead_tokens: int = 100_000
    init_tokens: int = 65_536
    log_every: int = 10
    checkpoint_every: int = 50
    buffer_rows: int = 1 << 18
    seed: int = 0
    backend: str = "auto"
    device: str = "cpu"
    dtype: str = "float32"
    metadata: dict = field(default_factory=dict)

    def resolved_prefix_sizes(self) -> list[int]:
        """The prefix sizes: [d_sae] for TopK; default d_sae/16, /8, /4, /2, 1 for Matryoshka."""
        if self.arch == "topk":
            return [self.d_sae]
        if self.prefix_sizes is not None:
            return list(self.prefix_sizes)
        return sorted({max(1, self.d_sae >> shift) for shift in (4, 3, 2, 1, 0)})

    def check(self) -> None:
        """ValueError naming the field when the config cannot be trained."""
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, got {self.arch!r}")
        if self.arch == "topk" and (self.prefix_sizes or self.prefix_weights):
            raise ValueError("prefix_sizes/prefix_weights are for arch 'matryoshka', not 'topk'")
        for name in ("d_sae", "k", "tokens", "batch_size", "log_every", "checkpoint_every",
                     "init_tokens", "buffer_rows", "dead_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.k > self.d_sae:
            raise ValueError(f"k={self.k} must be at most d_sae={self.d_sae}: lower k or raise d_sae")
        _check_activation(self.activation, self.k, self.k_max, self.d_sae)
        if self.tokens < self.batch_size:
            raise ValueError(
                f"tokens={self.tokens} is less than one batch (batch_size={self.batch_size}): "
                "raise tokens or lower batch_size"
            )
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr}")
        if not 0 <= self.decay_fraction <= 1:
            raise ValueError(f"decay_fraction must be in [0, 1], got {self.decay_fraction}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.warmup_steps < 0 or self.aux_coeff < 0:
            raise ValueError("warmup_steps and aux_coeff must be non-negative")

    @property
    def steps(self) -> int:
        """Optimiser steps in the run."""
        return self.tokens // self.batch_size


def lr_factor(step: int, steps: int, warmup_steps: int, decay_fraction: float) -> float:
    """The learning-rate multiplier at step (0-based) of steps: linear warm-up, flat, linear
    decay to zero over the last decay_fraction of the steps."""
    warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    decay_steps = decay_fraction * steps
    if decay_steps <= 0:
        return warm
    return warm * min(1.0, max(0.0, (steps - step) / decay_steps))


def aux_k_loss(sae: SAE, x: Tensor, x_hat: Tensor, dead: Tensor, aux_k: int) -> Tensor:
    """The AuxK loss: mean_b ||(x - x_hat) - sum_top-aux_k-dead z_j W_dec[j]||^2.

    x, x_hat [B, d_model] (x_hat is detached); dead [d_sae] bool with at least one True.
    The code of the dead latents comes from the TopK encode over W_enc's dead columns, so
    the gradient touches only the B * aux_k selected entries.
    """
    columns = dead.nonzero().flatten()
    k = min(aux_k, columns.numel())
    values, slots = topk_encode(
        x, sae.W_enc[:, columns], sae.b_enc[columns], sae.b_dec.detach(), k, backend=sae.backend
    )
    zero_bias = torch.zeros_like(sae.b_dec)
    aux_hat = sparse_decode(values, columns[slots], sae.W_dec, zero_bias, backend=sae.backend)
    return (x - x_hat.detach() - aux_hat).pow(2).sum(dim=1).mean()


class _Step(nn.Module):
    """The SAE plus its AuxK term as one module, so DistributedDataParallel sees both."""

    def __init__(self, sae: SAE, aux_k: int) -> None:
        super().__init__()
        self.sae = sae
        self.aux_k = aux_k

    def forward(self, x: Tensor, dead: Tensor | None) -> tuple[SAEOutput, Tensor]:
        out = self.sae(x)
        if dead is None:
            return out, out.loss.new_zeros(())
        return out, aux_k_loss(self.sae, x, out.x_hat, dead, self.aux_k)


def build_sae(config: TrainConfig, d_model: int) -> SAE:
    """The untrained SAE of config (initialised from config.seed, the global RNG untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        activation = {"activation": config.activation, "k_max": config.k_max}
        if config.arch == "topk":
            sae: SAE = TopKSAE(d_model, config.d_sae, config.k, config.backend, **activation)
        else:
            sae = MatryoshkaSAE(
                d_model, config.d_sae, config.k, config.resolved_prefix_sizes(),
                config.prefix_weights, config.backend, **activation,
            )
    return sae.to(device=config.device, dtype=getattr(torch, config.dtype))


def _all_reduce(tensor: Tensor, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=op)
    return tensor


def _init_statistics(
    batches, n_batches: int, device: str
) -> tuple[float, Tensor]:
    """(scale, mean) over the first n_batches (all ranks together): scale so that E||s x||^2
    = d_model, and the mean [d_model] of the unscaled activations."""
    total = None
    squares = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    for _ in range(n_batches):
        x = next(batches).to(device, torch.float64)
        total = x.sum(dim=0) if total is None else total + x.sum(dim=0)
        squares += x.pow(2).sum()
        count += x.shape[0]
    _all_reduce(total)
    _all_reduce(squares)
    _all_reduce(count)
    d_model = total.numel()
    scale = math.sqrt(d_model / (squares / count).item())
    return scale, (total / count).float()


def _atomic_torch_save(obj: dict, path: Path) -> None:
    def write(tmp: Path) -> None:
        torch.save(obj, tmp)

    atomic_write(path, write)


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop the lines logged after step (written by a run that was interrupted)."""
    if not path.is_file():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [line for line in lines if json.loads(line)["step"] <= step]
    atomic_write(path, lambda tmp: tmp.write_text("".join(line + "\n" for line in kept)))


@dataclass
class TrainResult:
    """Where a finished run put things, and its last logged metrics."""

    run_dir: Path
    sae_dir: Path
    sae: SAE
    scale: float
    metrics: dict


def train(
    config: TrainConfig,
    cache: ActivationCache,
    run_dir: str | os.PathLike,
    *,
    resume: bool = False,
    progress: bool = True,
) -> TrainResult:
    """Train config's SAE on cache's activations, logging and checkpointing into run_dir.

    Under torch.distributed (initialised by the caller) every rank calls this with the same
    arguments. Returns the trained SAE (its weights on the scaled activations) and the scale.
    """
    config.check()
    run_dir = Path(run_dir)
    distributed = dist.is_available() and dist.is_initialized()
    rank = dist.get_rank() if distributed else 0
    world = dist.get_world_size() if distributed else 1
    if config.batch_size % world:
        raise ValueError(
            f"batch_size={config.batch_size} must be a multiple of the number of processes ({world})"
        )
    steps = config.steps
    checkpoint_path = run_dir / CHECKPOINT
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        if checkpoint_path.exists() and not resume:
            raise FileExistsError(
                f"{run_dir} already holds a run: pass --resume to continue it or choose "
                "another --out"
            )
    if resume and not checkpoint_path.exists():
        raise FileNotFoundError(f"--resume: no {CHECKPOINT} in {run_dir} to continue from")

    sae = build_sae(config, cache.d_model)
    aux_k = config.aux_k if config.aux_k is not None else max(1, cache.d_model // 2)
    step_module = _Step(sae, aux_k)
    wrapped: nn.Module = step_module
    if distributed:
        wrapped = nn.parallel.DistributedDataParallel(step_module)
    if config.dtype == "float32":
        optimizer = torch.optim.Adam(sae.parameters(), lr=config.lr,
                                     fused=config.device == "cpu")
    else:
        optimizer = MasterWeightAdam(sae.parameters(), lr=config.lr, backend=config.backend)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_factor(step, steps, config.warmup_steps, config.decay_fraction),
    )
    since_fired = torch.zeros(config.d_sae, dtype=torch.long, device=config.device)
    start = 0
    if resume:
        state = torch.load(checkpoint_path, map_location=config.device, weights_only=True)
        saved = state["config"]
        defaults = asdict(TrainConfig())
        for name in ("arch", "d_sae", "k", "activation", "k_max", "batch_size", "tokens", "seed",
                     "prefix_sizes", "prefix_weights", "dtype"):
            if saved.get(name, defaults[name]) != asdict(config)[name]:
                raise ValueError(
                    f"--resume: the run in {run_dir} has {name}={saved.get(name)!r}, not "
                    f"{asdict(config)[name]!r}; pass the same settings or another --out"
                )
        sae.load_state_dict(state["sae"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        since_fired.copy_(state["since_fired"])
        torch.set_rng_state(state["rng"])
        scale, start = state["scale"], state["step"]
        if rank == 0:
            _truncate_metrics(run_dir / METRICS, start)
    else:
        init_batches = cache.batches(
            config.batch_size, seed=config.seed, rank=rank, world_size=world,
            buffer_rows=config.buffer_rows, tokens=config.tokens,
        )
        n_init = max(1, min(steps, config.init_tokens // config.batch_size))
        scale, mean = _init_statistics(init_batches, n_init, config.device)
        with torch.no_grad():
            sae.b_dec.copy_(mean * scale)

    batches = cache.batches(
        config.batch_size, seed=config.seed, start_batch=start, rank=rank, world_size=world,
        buffer_rows=config.buffer_rows, tokens=config.tokens,
    )
    metrics: dict = {}
    bar = tqdm(
        total=steps * config.batch_size, initial=start * config.batch_size, unit="tok",
        unit_scale=True, desc="training", disable=not progress or rank != 0,
    )
    window_start, window_steps = time.perf_counter(), 0
    for step in range(start, steps):
        x = next(batches).to(config.device).mul_(scale).to(sae.W_enc.dtype)  # fresh copies
        dead = since_fired >= config.dead_tokens
        use_aux = config.aux_coeff > 0 and bool(dead.any())
        out, aux = wrapped(x, dead if use_aux else None)
        loss = out.loss + config.aux_coeff * aux if use_aux else out.loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():
            W_dec, grad = sae.W_dec, sae.W_dec.grad
            grad.addcmul_(torch.einsum("nd,nd->n", grad, W_dec).unsqueeze(1), W_dec, value=-1)
        optimizer.step()
        scheduler.step()
        with torch.no_grad():
            W_dec = optimizer.master(sae.W_dec) if config.dtype != "float32" else sae.W_dec
            W_dec /= W_dec.norm(dim=1, keepdim=True)
            sae.W_dec.copy_(W_dec)
            fired = torch.zeros(config.d_sae, dtype=torch.int32, device=config.device)
            fired[out.code.indices[out.code.values > 0]] = 1
            _all_reduce(fired, dist.ReduceOp.MAX)
            since_fired += config.batch_size
            since_fired[fired.bool()] = 0
        window_steps += 1
        done = step + 1
        if done % config.log_every == 0 or done == steps:
            metrics = _metrics(sae, out, x, aux, since_fired, config, scheduler, done)
            elapsed = time.perf_counter() - window_start
            metrics["tokens_per_s"] = window_steps * config.batch_size / elapsed
            window_start, window_steps = time.perf_counter(), 0
            if rank == 0:
                with open(run_dir / METRICS, "a") as handle:
                    handle.write(json.dumps(metrics) + "\n")
                bar.set_postfix(loss=f"{metrics['loss']:.4g}", fvu=f"{metrics['fvu']:.3f}",
                                dead=f"{metrics['dead_fraction']:.1%}")
        bar.update(config.batch_size)
        if rank == 0 and (done % config.checkpoint_every == 0 or done == steps):
            _atomic_torch_save(
                {
                    "config": asdict(config),
                    "step": done,
                    "scale": scale,
                    "sae": sae.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "since_fired": since_fired,
                    "rng": torch.get_rng_state(),
                    "world_size": world,
                },
                checkpoint_path,
            )
    bar.close()
    sae_dir = run_dir / "sae"
    if rank == 0:
        sae.save(
            sae_dir,
            hook_name=cache.key.get("hook"),
            model_name=cache.key.get("model"),
            activation_scale=scale,
            training_tokens=steps * config.batch_size,
            extra={"train_config": asdict(config)},
        )
    if distributed:
        dist.barrier()
    return TrainResult(run_dir, sae_dir, sae, scale, metrics)


def _metrics(
    sae: SAE,
    out: SAEOutput,
    x: Tensor,
    aux: Tensor,
    since_fired: Tensor,
    config: TrainConfig,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    step: int,
) -> dict:
    """The logged numbers of a step, averaged over ranks."""
    with torch.no_grad():
        x = x.float()
        residual = (x - out.x_hat.float()).pow(2).sum()
        variance = (x - x.mean(dim=0)).pow(2).sum()
        l0 = (out.code.values > 0).sum(dim=1).float().mean()
        over_cap = getattr(sae, "rows_over_k_max", None)
        over_cap = l0.new_zeros(()) if over_cap is None else over_cap.float() / x.shape[0]
        local = torch.stack([out.loss.detach(), aux.detach(), residual, variance, l0, over_cap,
                             *out.prefix_losses.detach()]).double()
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        values = (_all_reduce(local) / world).tolist()
    loss, aux_loss, residual, variance, l0, over_cap, *prefix = values
    logged = {
        "step": step,
        "tokens": step * config.batch_size,
        "loss": loss,
        "prefix_losses": prefix,
        "aux_loss": aux_loss,
        "fvu": residual / variance,
        "l0": l0,
        "dead_fraction": float((since_fired >= config.dead_tokens).float().mean()),
        "lr": scheduler.get_last_lr()[0],
    }
    if config.activation == "batchtopk":
        logged["rows_over_k_max"] = over_cap
        logged["threshold"] = float(sae.threshold)
    return logged
