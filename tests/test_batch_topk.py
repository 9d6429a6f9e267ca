"""BatchTopK: the batch selection on the sparse code against the dense reference, gradients,
the k_max cap and its counter, the learnt threshold, saving, pruning and training."""

from __future__ import annotations

import json

import pytest
import torch

import sparsecode
import sparsecode.cli
from sparsecode import MatryoshkaSAE, TopKSAE, batch_topk, reference
from sparsecode.progressive import prefix_reconstruction, prune
from sparsecode.saving import CFG_FILE
from sparsecode.train import TrainConfig, train
from tests.conftest import TOLERANCE, assert_close
from tests.test_sae import PARAMS, randomised
from tests.test_train import _planted_cache

SHAPES = [(1, 5, 17, 1), (7, 8, 33, 3), (33, 16, 130, 4), (64, 24, 257, 8)]


def make_sae(d: int, n: int, k: int, dtype: torch.dtype, **kwargs) -> sparsecode.SAE:
    sae = randomised(MatryoshkaSAE(d, n, k, [max(1, n // 4), n], activation="batchtopk",
                                   dtype=dtype, **kwargs))
    with torch.no_grad():
        sae.b_enc.add_(0.3)  # most pre-activations positive, so the batch cut falls among them
    return sae


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("B,d,n,k", SHAPES)
def test_code_equals_the_dense_batch_topk_with_a_high_cap(B, d, n, k, dtype, seed):
    sae = make_sae(d, n, k, dtype, k_max=n)
    x = torch.randn(B, d, dtype=dtype)
    code = sae.encode(x)
    dense = reference.dense_code(code.values, code.indices, n)
    expected = reference.batch_topk_encode(*(t.double() for t in (x, sae.W_enc, sae.b_enc, sae.b_dec)), k)
    assert int((dense > 0).sum()) == int((expected > 0).sum()) <= B * k
    assert torch.equal(dense > 0, expected > 0)
    assert_close(dense, expected, TOLERANCE[dtype], "code")
    assert int(sae.rows_over_k_max) == 0


@pytest.mark.parametrize("k", [1, 3])
def test_exact_ties_keep_the_earlier_entries(k, seed):
    """Integer inputs make the pre-activations exact integers, so the batch cut falls inside a
    run of equal values; the earlier (row, latent) entries are kept, as in the reference."""
    B, d, n = 9, 16, 40
    sae = MatryoshkaSAE(d, n, k, [n], activation="batchtopk", k_max=n, dtype=torch.float64)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randint(-2, 3, (d, n)))
        sae.b_enc.copy_(torch.randint(-2, 3, (n,)))
        sae.b_dec.zero_()
    x = torch.randint(-3, 4, (B, d)).double()
    code = sae.encode(x)
    dense = reference.dense_code(code.values, code.indices, n)
    expected = reference.batch_topk_encode(x, sae.W_enc, sae.b_enc, sae.b_dec, k)
    assert torch.equal(dense, expected.detach())


@pytest.mark.parametrize("B,d,n,k", SHAPES)
def test_gradients_match_the_dense_reference(B, d, n, k, seed):
    """The loss and every parameter gradient equal those of the dense BatchTopK code decoded
    once per prefix (float64 autograd); unkept slots get no gradient."""
    sae = make_sae(d, n, k, torch.float64, k_max=n)
    x = torch.randn(B, d, dtype=torch.float64)
    out = sae(x)
    out.loss.backward()
    ref = make_sae(d, n, k, torch.float64, k_max=n)
    ref.load_state_dict(sae.state_dict())
    dense = reference.batch_topk_encode(x, ref.W_enc, ref.b_enc, ref.b_dec, k)
    losses = torch.stack([
        ((x - (dense[:, :m] @ ref.W_dec[:m] + ref.b_dec)) ** 2).sum(-1).mean()
        for m in ref.prefix_sizes
    ])
    ref_loss = (torch.tensor(ref.prefix_weights, dtype=torch.float64) * losses).sum()
    ref_loss.backward()
    assert_close(out.loss, ref_loss, 1e-10, "loss")
    for p in PARAMS:
        assert_close(getattr(sae, p).grad, getattr(ref, p).grad, 1e-10, f"grad {p}")


def test_select_is_the_batch_top_and_counts_rows_over_the_cap(seed):
    values = torch.rand(6, 5)
    values[2] = 10.0 + torch.arange(5.0)  # row 2's smallest candidate (its probe) beats the cut
    chosen = batch_topk.select(values, total=8, probe=True)
    assert int(chosen.keep.sum()) == 8
    assert not bool(chosen.keep[2, 0])  # the probe is never kept
    assert bool(chosen.keep[2, 1:].all())
    assert int(chosen.rows_over_cap) == 1
    kept = values[chosen.keep]
    assert float(chosen.smallest_kept) == float(kept.min())
    dropped = values[~chosen.keep].clone()
    dropped[dropped == values[2, 0]] = -1.0
    assert float(dropped.max()) <= float(kept.min())


def test_a_low_cap_is_counted_not_silently_lost(seed):
    """rows_over_k_max counts the rows whose (k_max+1)-th activation beats the batch's cut."""
    B, k, k_max = 10, 4, 8
    sae = make_sae(16, 64, k, torch.float64, k_max=k_max)
    with torch.no_grad():
        sae.b_enc[:32] += 5.0  # every row wants about 32 latents, k_max allows 8
    x = torch.randn(B, 16, dtype=torch.float64)
    x[:3] *= 20.0  # three rows with far larger activations than the rest
    sae(x)
    acts = torch.relu((x - sae.b_dec) @ sae.W_enc + sae.b_enc).detach()
    top = acts.sort(dim=1, descending=True).values
    cut = top[:, :k_max].flatten().sort(descending=True).values[B * k - 1]
    expected = int((top[:, k_max] > cut).sum())
    assert expected > 0
    assert int(sae.rows_over_k_max) == expected


def test_threshold_is_a_moving_average_used_in_eval(seed):
    sae = make_sae(16, 64, 4, torch.float64)
    assert float(sae.threshold) == -1.0
    x1, x2 = torch.randn(20, 16, dtype=torch.float64), torch.randn(20, 16, dtype=torch.float64)
    first = sae.encode(x1).values.detach()
    smallest1 = float(first[first > 0].min())
    assert float(sae.threshold) == pytest.approx(smallest1)
    second = sae.encode(x2).values.detach()
    smallest2 = float(second[second > 0].min())
    assert float(sae.threshold) == pytest.approx(0.999 * smallest1 + 0.001 * smallest2)

    sae.eval()
    code = sae.encode(x1)
    assert code.values.shape == (20, sae.k_max)
    pre = ((x1 - sae.b_dec) @ sae.W_enc + sae.b_enc).detach()
    above = (pre > sae.threshold).sum(dim=1).clamp(max=sae.k_max)
    assert torch.equal((code.values > 0).sum(dim=1), above)
    with torch.no_grad():
        sae.threshold.fill_(-1.0)  # never trained: eval falls back to the batch selection
    assert int((sae.encode(x1).values > 0).sum()) <= 20 * sae.k


def test_save_load_keeps_the_threshold_and_marks_jumprelu(tmp_path, seed):
    sae = make_sae(16, 64, 4, torch.float32, k_max=12)
    x = torch.randn(30, 16)
    sae(x)
    path = sae.save(tmp_path / "sae", activation_scale=2.0)
    cfg = json.loads((path / CFG_FILE).read_text())
    assert cfg["architecture"] == "jumprelu" and cfg["activation"] == "batchtopk"
    loaded = sparsecode.load(path)
    assert loaded.activation == "batchtopk" and loaded.k_max == 12
    assert float(loaded.threshold) == pytest.approx(float(sae.threshold))
    sae.eval()
    loaded.eval()
    ours, theirs = sae.encode(2.0 * x), loaded.encode(x)
    assert torch.equal(ours.indices, theirs.indices)
    assert_close(theirs.values, ours.values, TOLERANCE[torch.float32], "eval code")


def test_saelens_loads_a_batch_topk_folder_as_jumprelu(tmp_path, seed):
    sae_lens = pytest.importorskip("sae_lens")
    sae = make_sae(16, 64, 4, torch.float32, k_max=64)
    x = torch.randn(30, 16)
    sae(x)
    theirs = sae_lens.SAE.load_from_disk(sae.save(tmp_path / "sae"))
    assert isinstance(theirs, sae_lens.JumpReLUSAE)
    sae.eval()
    code = sae.encode(x)
    with torch.no_grad():
        dense = reference.dense_code(code.values, code.indices, 64)
        assert_close(theirs.encode(x), dense, TOLERANCE[torch.float32], "SAELens code")


def test_prune_and_reencode_keep_the_activation(seed):
    sae = make_sae(16, 64, 4, torch.float64)
    sae(torch.randn(30, 16, dtype=torch.float64))
    sae.eval()
    small = prune(sae, 20)
    assert small.activation == "batchtopk" and small.k_max == min(sae.k_max, 20)
    assert float(small.threshold) == float(sae.threshold)
    x = torch.randn(9, 16, dtype=torch.float64)
    x_hat, l0 = prefix_reconstruction(sae, x, 20, "reencode")
    out = small(x)
    assert_close(x_hat, out.x_hat, 1e-12, "x_hat")
    assert torch.equal(l0, (out.code.values > 0).sum(dim=1))


def test_bad_activation_arguments_are_named():
    with pytest.raises(ValueError, match="activation must be one of"):
        TopKSAE(8, 32, 4, activation="relu")
    with pytest.raises(ValueError, match="k_max is for activation='batchtopk'"):
        TopKSAE(8, 32, 4, k_max=8)
    with pytest.raises(ValueError, match=r"k_max must be an int in \[k=4, d_sae=32\]"):
        TopKSAE(8, 32, 4, activation="batchtopk", k_max=2)


def test_training_a_batch_topk_matryoshka_logs_the_cap_and_threshold(tmp_path):
    cache = _planted_cache(tmp_path / "cache", 8192)
    config = TrainConfig(arch="matryoshka", d_sae=128, k=8, activation="batchtopk",
                         tokens=256 * 100, batch_size=256, lr=3e-3, log_every=25,
                         checkpoint_every=100, dead_tokens=5000)
    result = train(config, cache, tmp_path / "run", progress=False)
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert 0.0 <= lines[-1]["rows_over_k_max"] <= 1.0
    assert lines[-1]["threshold"] > 0
    assert lines[-1]["fvu"] < 0.3
    assert lines[-1]["l0"] <= 8.0 + 1e-6
    loaded = sparsecode.load(result.sae_dir)
    assert loaded.activation == "batchtopk"
    assert float(loaded.threshold) == pytest.approx(lines[-1]["threshold"])


def test_train_cli_takes_the_activation(tmp_path, capsys):
    from sparsecode.cache import activation_key
    from tests.test_train import CLI_KEY, _cli

    _planted_cache(tmp_path / "cache", 4096, key=activation_key(**CLI_KEY))
    args = _cli(tmp_path / "cache", tmp_path / "run", "--tokens", str(128 * 20),
                "--activation", "batchtopk", "--k-max", "16")
    assert sparsecode.cli.main(args[2:]) == 0
    loaded = sparsecode.load(tmp_path / "run" / "sae")
    assert loaded.activation == "batchtopk" and loaded.k_max == 16
    with pytest.raises(SystemExit):
        sparsecode.cli.main([*args[2:-4], "--activation", "batchtopk", "--k-max", "4"])
    assert "k_max must be an int in [k=8" in capsys.readouterr().err
