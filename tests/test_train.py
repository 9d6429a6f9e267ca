"""The trainer: schedule, AuxK, learning on planted features, checkpoints, resume after a kill,
data-parallel equivalence, and the ``sparsecode train`` command line."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sparsecode.cache import ActivationCache, CacheWriter, activation_key
from sparsecode.cli import main
from sparsecode.demo import PlantedDictionary
from sparsecode.lm import DEFAULT_HOOK, DEFAULT_MODEL
from sparsecode.sae import MatryoshkaSAE
from sparsecode.train import TrainConfig, aux_k_loss, lr_factor, train
from tests.conftest import assert_close

D_MODEL = 32


def _planted_cache(folder: Path, rows: int, *, key: dict | None = None, seed: int = 0) -> ActivationCache:
    """A cache of planted-dictionary activations (offset and scaled like a real residual stream)."""
    generator = torch.Generator().manual_seed(seed)
    data = PlantedDictionary(D_MODEL, 64, 4.0, 0.5, 0.01, generator)
    writer = CacheWriter(folder, key or {"model": "planted", "hook": "none", "text": "none",
                                         "split": "train", "context_length": 1, "dtype": "float32"})
    offset = torch.randn(D_MODEL, generator=generator)
    for start in range(0, rows, 4096):
        x, _ = data.sample(min(4096, rows - start))
        writer.add_shard(7.0 * (x + offset), contexts=x.shape[0], skip_positions=0)
    return ActivationCache.open(folder)


def test_lr_schedule_warms_up_holds_and_decays_to_zero():
    factors = [lr_factor(step, 100, 10, 0.2) for step in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == 1.0
    assert all(f == 1.0 for f in factors[10:80])
    assert all(a > b for a, b in zip(factors[80:], factors[81:]))
    assert factors[-1] == pytest.approx(1 / 20) and lr_factor(100, 100, 10, 0.2) == 0.0
    assert [lr_factor(s, 5, 0, 0.0) for s in range(5)] == [1.0] * 5


def _dense_aux(sae, x, x_hat, dead, aux_k):
    columns = dead.nonzero().flatten()
    pre = torch.relu((x - sae.b_dec.detach()) @ sae.W_enc[:, columns] + sae.b_enc[columns])
    values, slots = pre.topk(min(aux_k, columns.numel()), dim=1)
    aux_hat = torch.einsum("bj,bjd->bd", values, sae.W_dec[columns][slots])
    return (x - x_hat.detach() - aux_hat).pow(2).sum(dim=1).mean()


@pytest.mark.parametrize("n_dead", [1, 5, 40])
def test_aux_k_loss_matches_the_dense_formula(seed, n_dead):
    sae = MatryoshkaSAE(24, 64, 4, [16, 64])
    with torch.no_grad():
        sae.b_enc.normal_()
        sae.b_dec.normal_()
    x = torch.randn(37, 24)
    x_hat = torch.randn(37, 24)
    dead = torch.zeros(64, dtype=torch.bool)
    dead[torch.randperm(64)[:n_dead]] = True
    grads = []
    for fn in (aux_k_loss, _dense_aux):
        sae.zero_grad()
        loss = fn(sae, x, x_hat, dead, 12)
        loss.backward()
        grads.append((loss.detach(), *(p.grad.clone() for p in (sae.W_enc, sae.b_enc, sae.W_dec))))
    for name, got, ref in zip(("loss", "W_enc", "b_enc", "W_dec"), grads[0], grads[1]):
        assert_close(got, ref, 1e-5, name)
    assert sae.b_dec.grad is None or not sae.b_dec.grad.any()


@pytest.mark.parametrize("arch", ["topk", "matryoshka"])
def test_training_reconstructs_planted_activations(tmp_path, arch):
    cache = _planted_cache(tmp_path / "cache", 16384)
    config = TrainConfig(arch=arch, d_sae=128, k=8, tokens=256 * 300, batch_size=256, lr=3e-3,
                         log_every=25, checkpoint_every=100, dead_tokens=5000)
    result = train(config, cache, tmp_path / "run", progress=False)
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == list(range(25, 301, 25))
    for field in ("loss", "prefix_losses", "aux_loss", "fvu", "l0", "dead_fraction", "tokens_per_s", "lr"):
        assert field in lines[-1]
    assert len(lines[-1]["prefix_losses"]) == (1 if arch == "topk" else 5)
    assert lines[-1]["prefix_losses"][-1] < 0.5 * lines[0]["prefix_losses"][-1]
    assert lines[-1]["fvu"] < 0.15
    assert lines[-1]["lr"] == 0.0
    norms = result.sae.W_dec.norm(dim=1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)
    rows = torch.cat([next(cache.batches(4096)) for _ in range(4)])
    assert result.scale == pytest.approx(math.sqrt(D_MODEL / rows.pow(2).sum(1).mean().item()), rel=0.05)
    assert (result.run_dir / "checkpoint.pt").exists()
    assert (result.sae_dir / "cfg.json").exists() and (result.sae_dir / "sae_weights.safetensors").exists()


def test_bfloat16_training_keeps_float32_masters(tmp_path):
    """dtype="bfloat16": bfloat16 weights that are their float32 masters rounded, unit-norm
    decoder rows on the masters, and a planted dictionary learned about as well as in float32."""
    import sparsecode

    cache = _planted_cache(tmp_path / "cache", 16384)
    config = TrainConfig(d_sae=128, k=8, tokens=256 * 300, batch_size=256, lr=3e-3,
                         log_every=25, checkpoint_every=100, dead_tokens=5000, dtype="bfloat16")
    result = train(config, cache, tmp_path / "run", progress=False)
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["prefix_losses"][-1] < 0.5 * lines[0]["prefix_losses"][-1]
    assert lines[-1]["fvu"] < 0.15
    assert all(p.dtype == torch.bfloat16 for p in result.sae.parameters())
    state = torch.load(result.run_dir / "checkpoint.pt", weights_only=True)
    names = [name for name, _ in result.sae.named_parameters()]
    masters = {names[i]: s["master"] for i, s in state["optimizer"]["state"].items()}
    assert all(m.dtype == torch.float32 for m in masters.values())
    for name, param in result.sae.named_parameters():
        assert torch.equal(param.detach(), masters[name].to(torch.bfloat16)), name
    norms = masters["W_dec"].norm(dim=1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-6)
    assert sparsecode.load(result.sae_dir).W_enc.dtype == torch.bfloat16


def test_bfloat16_run_resumes_to_the_same_weights(tmp_path, monkeypatch):
    """A bfloat16 run stopped right after its first checkpoint and resumed ends with the weights
    of an uninterrupted run (the float32 masters travel in the checkpoint)."""
    import sparsecode.train as training

    cache = _planted_cache(tmp_path / "cache", 4096)
    config = TrainConfig(d_sae=64, k=4, prefix_sizes=[16, 64], tokens=256 * 12, batch_size=256,
                         checkpoint_every=5, dtype="bfloat16")
    whole = train(config, cache, tmp_path / "whole", progress=False)

    save = training._atomic_torch_save

    def save_then_stop(obj: dict, path: Path) -> None:
        save(obj, path)
        raise KeyboardInterrupt

    monkeypatch.setattr(training, "_atomic_torch_save", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        train(config, cache, tmp_path / "cut", progress=False)
    monkeypatch.undo()
    assert torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)["step"] == 5
    resumed = train(config, cache, tmp_path / "cut", resume=True, progress=False)
    for (name, a), b in zip(whole.sae.named_parameters(), resumed.sae.parameters()):
        assert torch.equal(a, b), name


def test_saved_sae_reconstructs_raw_activations(tmp_path):
    import sparsecode

    cache = _planted_cache(tmp_path / "cache", 4096)
    config = TrainConfig(d_sae=64, k=4, prefix_sizes=[16, 64], tokens=256 * 20, batch_size=256)
    result = train(config, cache, tmp_path / "run", progress=False)
    loaded = sparsecode.load(result.sae_dir)
    assert isinstance(loaded, MatryoshkaSAE) and loaded.prefix_sizes == [16, 64]
    x = next(cache.batches(512))
    with torch.no_grad():
        expected = result.sae(x * result.scale).x_hat / result.scale
        assert_close(loaded(x).x_hat, expected, 1e-5, "x_hat")


def test_dead_latents_get_the_aux_loss(tmp_path):
    cache = _planted_cache(tmp_path / "cache", 8192)
    config = TrainConfig(arch="topk", d_sae=512, k=4, tokens=256 * 40, batch_size=256,
                         dead_tokens=256 * 5, log_every=5)
    train(config, cache, tmp_path / "run", progress=False)
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["aux_loss"] == 0.0
    assert any(line["dead_fraction"] > 0 and line["aux_loss"] > 0 for line in lines[1:])


def test_existing_run_needs_resume(tmp_path):
    cache = _planted_cache(tmp_path / "cache", 1024)
    config = TrainConfig(d_sae=32, k=4, tokens=512, batch_size=256)
    train(config, cache, tmp_path / "run", progress=False)
    with pytest.raises(FileExistsError, match="--resume"):
        train(config, cache, tmp_path / "run", progress=False)
    with pytest.raises(ValueError, match="d_sae"):
        train(TrainConfig(d_sae=64, k=4, tokens=512, batch_size=256), cache, tmp_path / "run",
              resume=True, progress=False)


# --- the command line, in subprocesses: resume after SIGKILL, and torchrun data parallel ---

CLI_KEY = dict(model=DEFAULT_MODEL, hook=DEFAULT_HOOK, text=None, dataset=None, split="train",
               context_length=128, dtype="float32")


def _cli(cache: Path, out: Path, *extra: str) -> list[str]:
    return ["-m", "sparsecode", "train", "--cache", str(cache), "--cache-dtype", "float32",
            "--out", str(out), "--d-sae", "256", "--k", "8", "--prefix-sizes", "64,128,256",
            "--batch-size", "128", "--lr", "1e-3", "--log-every", "1", "--no-progress", *extra]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}


def _weights(out: Path) -> dict:
    return load_file(out / "sae" / "sae_weights.safetensors")


def test_killed_run_resumes_to_the_same_weights(tmp_path):
    _planted_cache(tmp_path / "cache", 8192, key=activation_key(**CLI_KEY))
    steps = ["--tokens", str(128 * 600), "--checkpoint-every", "7"]
    subprocess.run([sys.executable, *_cli(tmp_path / "cache", tmp_path / "whole", *steps)],
                   env=_env(), check=True, capture_output=True)

    out = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, *_cli(tmp_path / "cache", out, *steps)],
                               env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 30:
            break
        time.sleep(0.002)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (out / "sae").exists(), "the run finished before it was killed"
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    assert 28 <= checkpoint["step"] < 600
    subprocess.run([sys.executable, *_cli(tmp_path / "cache", out, *steps, "--resume")],
                   env=_env(), check=True, capture_output=True)
    whole, resumed = _weights(tmp_path / "whole"), _weights(out)
    for name in whole:
        assert torch.equal(whole[name], resumed[name]), name
    lines = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert lines == list(range(1, 601))


def test_two_gloo_processes_match_one_process_with_the_combined_batch(tmp_path):
    _planted_cache(tmp_path / "cache", 8192, key=activation_key(**CLI_KEY))
    steps = ["--tokens", str(128 * 60), "--checkpoint-every", "20"]
    subprocess.run([sys.executable, *_cli(tmp_path / "cache", tmp_path / "one", *steps)],
                   env=_env(), check=True, capture_output=True)
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    done = subprocess.run(
        [sys.executable, *torchrun, *_cli(tmp_path / "cache", tmp_path / "two", *steps)],
        env=_env(), capture_output=True, text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    for name in one:
        assert_close(two[name], one[name], 1e-5, name)


def test_command_line_trains_in_bfloat16(tmp_path):
    _planted_cache(tmp_path / "cache", 2048, key=activation_key(**CLI_KEY))
    argv = _cli(tmp_path / "cache", tmp_path / "run", "--tokens", str(128 * 4), "--dtype",
                "bfloat16")
    assert main(argv[2:]) == 0
    assert json.loads((tmp_path / "run" / "sae" / "cfg.json").read_text())["dtype"] == "bfloat16"
    assert _weights(tmp_path / "run")["W_enc"].dtype == torch.bfloat16


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--prefix-sizes", "64,32,256"], "prefix_sizes"),
        (["--prefix-sizes", "64,128"], "d_sae"),
        (["--prefix-sizes", "a,b"], "--prefix-sizes"),
        (["--k", "300"], "k=300"),
        (["--tokens", "100"], "batch_size"),
        (["--resume"], "--resume needs --out"),
        (["--text", "/no/such/file.txt"], "--text"),
        (["--arch", "topk", "--prefix-sizes", "64,256"], "matryoshka"),
        (["--dtype", "float16"], "--dtype"),
    ],
)
def test_bad_arguments_get_one_line_errors(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--d-sae", "256", "--k", "8", *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--hook", "blocks.99.hook_resid_post"], "blocks.99.hook_resid_post"),
        (["--model", "no-such-model-anywhere"], "no-such-model-anywhere"),
    ],
)
def test_bad_model_or_hook_fails_before_training(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "run"),
              "--tokens", "2048", "--batch-size", "1024", "--no-progress", *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
