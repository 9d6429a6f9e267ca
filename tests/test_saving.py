"""save_sae / load: SAELens folder format, round trips, scale folding, atomic writes, errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import safetensors.torch
import torch

import sparsecode
from sparsecode import MatryoshkaSAE, TopKSAE
from sparsecode.saving import CFG_FILE, SAELENS_FORMAT_VERSION, WEIGHTS_FILE, save_sae
from tests.conftest import TOLERANCE, assert_close
from tests.test_sae import PARAMS, randomised


def dense_reference(
    x: torch.Tensor,
    weights: dict[str, torch.Tensor],
    k: int,
    *,
    rescale_acts_by_decoder_norm: bool = False,
    apply_b_dec_to_input: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(indices [B, k] sorted, values [B, k], x_hat [B, d]) of a SAELens TopK SAE, written
    densely from DESIGN §1 with SAELens's two options."""
    W_enc, b_enc, W_dec, b_dec = (weights[p] for p in ("W_enc", "b_enc", "W_dec", "b_dec"))
    norms = W_dec.norm(dim=1)
    pre = (x - b_dec * apply_b_dec_to_input) @ W_enc + b_enc
    if rescale_acts_by_decoder_norm:
        pre = pre * norms
    top = pre.relu().topk(k, dim=1)
    indices, order = top.indices.sort(dim=1)
    values = top.values.gather(1, order)
    z = torch.zeros_like(pre).scatter(1, indices, values)
    if rescale_acts_by_decoder_norm:
        z = z / norms
    return indices, values, z @ W_dec + b_dec


def folder_files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def test_topk_round_trip(tmp_path, seed):
    sae = randomised(TopKSAE(16, 64, 5))
    path = save_sae(
        sae, tmp_path / "sae", hook_name="blocks.6.hook_resid_post", model_name="gpt2",
        training_tokens=12345, extra={"dataset_path": "synthetic", "context_size": 128},
    )
    assert path == tmp_path / "sae"
    assert sorted(os.listdir(tmp_path)) == ["sae"]
    assert sorted(os.listdir(path)) == [CFG_FILE, WEIGHTS_FILE]

    cfg = json.loads((path / CFG_FILE).read_text())
    assert cfg["architecture"] == "topk"
    assert (cfg["d_in"], cfg["d_sae"], cfg["k"]) == (16, 64, 5)
    assert (cfg["dtype"], cfg["device"]) == ("float32", "cpu")
    assert cfg["apply_b_dec_to_input"] is True and cfg["normalize_activations"] == "none"
    assert "matryoshka_widths" not in cfg
    assert cfg["metadata"]["sae_lens_version"] == SAELENS_FORMAT_VERSION
    assert cfg["metadata"]["hook_name"] == "blocks.6.hook_resid_post"
    assert cfg["sparsecode_version"] == sparsecode.__version__
    stored = safetensors.torch.load_file(path / WEIGHTS_FILE)
    assert {p: tuple(t.shape) for p, t in stored.items()} == {
        "W_enc": (16, 64), "W_dec": (64, 16), "b_enc": (64,), "b_dec": (16,)
    }

    loaded = sparsecode.load(path)
    assert type(loaded) is TopKSAE and loaded.prefix_sizes == [64]
    for p in PARAMS:
        param = getattr(loaded, p)
        assert isinstance(param, torch.nn.Parameter) and param.requires_grad
        assert param.dtype == torch.float32 and torch.equal(param, getattr(sae, p)), p
    assert loaded.metadata["hook_name"] == "blocks.6.hook_resid_post"
    assert loaded.metadata["model_name"] == "gpt2"
    assert loaded.metadata["training_tokens"] == 12345
    assert loaded.metadata["activation_scale"] == 1.0
    assert loaded.metadata["context_size"] == 128
    x = torch.randn(9, 16)
    out, loaded_out = sae(x), loaded(x)
    assert torch.equal(out.code.indices, loaded_out.code.indices)
    assert torch.equal(out.code.values, loaded_out.code.values)
    assert torch.equal(out.x_hat, loaded_out.x_hat)


def test_matryoshka_round_trip(tmp_path, seed):
    sae = randomised(
        MatryoshkaSAE(12, 48, 4, [6, 24, 48], [0.5, 0.2, 0.3], dtype=torch.float64)
    )
    path = sae.save(tmp_path / "nested" / "sae", hook_name="blocks.0.hook_resid_pre")
    cfg = json.loads((path / CFG_FILE).read_text())
    assert cfg["architecture"] == "topk" and cfg["matryoshka_widths"] == [6, 24, 48]
    assert cfg["dtype"] == "float64"

    loaded = sparsecode.load(path, backend="reference")
    assert type(loaded) is MatryoshkaSAE and loaded.backend == "reference"
    assert loaded.prefix_sizes == [6, 24, 48] and loaded.prefix_weights == [0.5, 0.2, 0.3]
    for p in PARAMS:
        assert torch.equal(getattr(loaded, p), getattr(sae, p)), p
    x = torch.randn(7, 12, dtype=torch.float64)
    out, loaded_out = sae(x), loaded(x)
    assert torch.equal(out.code.indices, loaded_out.code.indices)
    assert_close(loaded_out.prefix_losses, out.prefix_losses, 1e-12, "prefix_losses")
    assert_close(loaded_out.x_hat, out.x_hat, 1e-12, "x_hat")

    # Saving a loaded SAE keeps its hook name; dtype= casts on load.
    again = loaded.save(tmp_path / "again")
    assert json.loads((again / CFG_FILE).read_text())["metadata"]["hook_name"] == (
        "blocks.0.hook_resid_pre"
    )
    single = sparsecode.load(again, dtype=torch.float32)
    assert single.W_enc.dtype == torch.float32 and torch.equal(single.W_dec, sae.W_dec.float())


def test_activation_scale_is_folded_into_the_weights(tmp_path, seed):
    """An SAE trained on s*x, saved with s folded, reconstructs raw x as x_hat / s."""
    scale = 0.37
    sae = randomised(MatryoshkaSAE(16, 64, 6, [16, 64], dtype=torch.float64))
    x = torch.randn(11, 16, dtype=torch.float64) * 3.0
    scaled_out = sae(scale * x)

    path = save_sae(sae, tmp_path / "sae", activation_scale=scale)
    assert json.loads((path / CFG_FILE).read_text())["activation_scale"] == scale
    loaded = sparsecode.load(path)
    assert loaded.metadata["activation_scale"] == scale
    raw_out = loaded(x)
    assert torch.equal(raw_out.code.indices, scaled_out.code.indices)
    assert_close(raw_out.code.values, scaled_out.code.values, 1e-12, "values")
    assert_close(raw_out.x_hat, scaled_out.x_hat / scale, 1e-12, "x_hat")
    # The in-memory SAE is left as it was.
    assert torch.equal(sae(scale * x).x_hat, scaled_out.x_hat)


def saelens_cfg(d_in: int, d_sae: int, k: int, **changes: object) -> dict[str, object]:
    """cfg.json as SAELens 6.54 writes it for a TopK SAE (SAEConfig.to_dict's fields)."""
    cfg: dict[str, object] = {
        "d_in": d_in,
        "d_sae": d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {
            "sae_lens_version": "6.54.12",
            "sae_lens_training_version": "6.54.12",
            "hook_name": "blocks.3.hook_resid_post",
            "model_name": "tiny-stories-1M",
            "prepend_bos": True,
            "context_size": 512,
        },
        "k": k,
        "rescale_acts_by_decoder_norm": False,
        "architecture": "topk",
    }
    cfg.update(changes)
    return cfg


def write_folder(path: Path, cfg: dict[str, object], weights: dict[str, torch.Tensor]) -> Path:
    path.mkdir()
    (path / CFG_FILE).write_text(json.dumps(cfg))
    safetensors.torch.save_file(weights, path / WEIGHTS_FILE)
    return path


def random_weights(d_in: int, d_sae: int, dtype: torch.dtype = torch.float32):
    return {
        "W_enc": torch.randn(d_in, d_sae, dtype=dtype) / d_in**0.5,
        "W_dec": torch.randn(d_sae, d_in, dtype=dtype) * (0.5 + torch.rand(d_sae, 1, dtype=dtype)),
        "b_enc": 0.1 * torch.randn(d_sae, dtype=dtype),
        "b_dec": 0.2 * torch.randn(d_in, dtype=dtype),
    }


PRE_6_TOPK_CFG = {  # SAELens < 6: a "standard" SAE with a topk activation, fields at top level
    "architecture": "standard",
    "d_in": 10,
    "d_sae": 40,
    "activation_fn_str": "topk",
    "activation_fn_kwargs": {"k": 3},
    "apply_b_dec_to_input": True,
    "normalize_activations": "none",
    "dtype": "torch.float32",
    "device": "cpu",
    "hook_name": "blocks.1.hook_resid_post",
    "model_name": "gelu-1l",
    "sae_lens_training_version": "4.4.1",
}


@pytest.mark.parametrize(
    "cfg",
    [
        saelens_cfg(10, 40, 3),
        saelens_cfg(10, 40, 3, rescale_acts_by_decoder_norm=True),
        saelens_cfg(10, 40, 3, apply_b_dec_to_input=False),
        saelens_cfg(10, 40, 3, rescale_acts_by_decoder_norm=True, apply_b_dec_to_input=False),
        PRE_6_TOPK_CFG,
    ],
    ids=["6.54", "rescale_by_decoder_norm", "no_b_dec_on_input", "both", "pre-6.0"],
)
def test_loads_a_saelens_topk_folder(cfg, tmp_path, seed):
    weights = random_weights(10, 40)
    path = write_folder(tmp_path / "sae", cfg, weights)
    loaded = sparsecode.load(path, dtype=torch.float64)
    assert type(loaded) is TopKSAE and (loaded.d_model, loaded.d_sae, loaded.k) == (10, 40, 3)
    assert loaded.metadata["hook_name"].startswith("blocks.")
    assert loaded.metadata["model_name"] in ("tiny-stories-1M", "gelu-1l")

    x = torch.randn(13, 10, dtype=torch.float64)
    options = {
        "rescale_acts_by_decoder_norm": cfg.get("rescale_acts_by_decoder_norm", False),
        "apply_b_dec_to_input": cfg["apply_b_dec_to_input"],
    }
    weights64 = {p: w.double() for p, w in weights.items()}
    indices, values, x_hat = dense_reference(x, weights64, 3, **options)
    out = loaded(x)
    assert torch.equal(out.code.indices, indices)
    assert_close(out.code.values, values, 1e-12, "values")
    assert_close(out.x_hat, x_hat, 1e-12, "x_hat")

    as_stored = sparsecode.load(path)
    assert as_stored.W_enc.dtype == torch.float32
    assert_close(as_stored(x.float()).x_hat, x_hat, TOLERANCE[torch.float32], "x_hat float32")


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"architecture": "jumprelu"}, "architecture 'jumprelu' is not supported.*'topk'"),
        ({"architecture": "standard"}, "architecture 'standard' is not supported"),
        ({"architecture": "batchtopk"}, "architecture 'batchtopk' is not supported"),
        ({"architecture": "matryoshka_batchtopk"}, "'matryoshka_batchtopk' is not supported"),
        ({"normalize_activations": "expected_average_only_in"}, "normalize_activations=.*'none'"),
        ({"normalize_activations": "layer_norm"}, "normalize_activations='layer_norm'"),
        ({"normalize_activations": True}, "normalize_activations=True"),
    ],
)
def test_unsupported_saelens_folders_are_named(changes, match, tmp_path):
    path = write_folder(tmp_path / "sae", saelens_cfg(10, 40, 3, **changes), random_weights(10, 40))
    with pytest.raises(ValueError, match=match):
        sparsecode.load(path)


def test_bad_folders_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="path=.*missing.*does not exist"):
        sparsecode.load(tmp_path / "missing")
    (tmp_path / "file").write_text("")
    with pytest.raises(FileNotFoundError, match="is a file"):
        sparsecode.load(tmp_path / "file")

    weights = random_weights(10, 40)
    no_cfg = tmp_path / "no_cfg"
    no_cfg.mkdir()
    safetensors.torch.save_file(weights, no_cfg / WEIGHTS_FILE)
    with pytest.raises(FileNotFoundError, match="has no cfg.json"):
        sparsecode.load(no_cfg)
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / CFG_FILE).write_text(json.dumps(saelens_cfg(10, 40, 3)))
    with pytest.raises(FileNotFoundError, match="has no sae_weights.safetensors"):
        sparsecode.load(no_weights)

    cases = [
        (saelens_cfg(10, 41, 3), weights, r"W_enc has shape \[10, 40\].*needs \[10, 41\]"),
        (saelens_cfg(11, 40, 3), weights, r"W_enc has shape \[10, 40\].*d_in=11"),
        (saelens_cfg(10, 40, 41), weights, "k=41 must be at most d_sae=40"),
        (saelens_cfg(10, 40, 0), weights, "k must be a positive int, got 0"),
        ({**saelens_cfg(10, 40, 3), "d_sae": None}, weights, "d_sae must be a positive int"),
        (saelens_cfg(10, 40, 3, dtype="float31"), weights, "dtype='float31'"),
        (saelens_cfg(10, 40, 3, matryoshka_widths=[8, 16]), weights, "matryoshka_widths.*d_sae=40"),
        (saelens_cfg(10, 40, 3), {**weights, "threshold": torch.ones(40)}, "holds tensors"),
        (saelens_cfg(10, 40, 3), {"W_enc": weights["W_enc"]}, "holds tensors"),
    ]
    for i, (cfg, tensors, match) in enumerate(cases):
        path = write_folder(tmp_path / f"case{i}", cfg, tensors)
        with pytest.raises(ValueError, match=match):
            sparsecode.load(path)

    corrupt = write_folder(tmp_path / "corrupt", saelens_cfg(10, 40, 3), weights)
    (corrupt / WEIGHTS_FILE).write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="could not be read as safetensors"):
        sparsecode.load(corrupt)
    (corrupt / CFG_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        sparsecode.load(corrupt)


def test_bad_save_arguments(tmp_path):
    sae = TopKSAE(8, 16, 2)
    with pytest.raises(ValueError, match="activation_scale must be a finite positive"):
        sae.save(tmp_path / "a", activation_scale=0.0)
    with pytest.raises(ValueError, match="training_tokens"):
        sae.save(tmp_path / "a", training_tokens=-1)
    with pytest.raises(ValueError, match="extra must not set.*hook_name"):
        sae.save(tmp_path / "a", extra={"hook_name": "x"})
    with pytest.raises(ValueError, match="JSON-serialisable"):
        sae.save(tmp_path / "a", extra={"tensor": torch.ones(1)})
    (tmp_path / "file").write_text("keep")
    with pytest.raises(FileExistsError, match="is a file"):
        sae.save(tmp_path / "file")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="not a saved SAE.*notes.txt"):
        sae.save(tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"
    assert sorted(os.listdir(tmp_path)) == ["file", "mine"]


def test_save_replaces_a_saved_sae_atomically(tmp_path, monkeypatch, seed):
    path = tmp_path / "sae"
    first, second = TopKSAE(8, 32, 3), TopKSAE(8, 32, 3)
    first.save(path, hook_name="first")
    before = folder_files(path)

    def crash_midway(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\x00" * 16)
        raise OSError("No space left on device (simulated)")

    with monkeypatch.context() as patch:
        patch.setattr(safetensors.torch, "save_file", crash_midway)
        with pytest.raises(OSError, match="simulated"):
            second.save(path)
    assert folder_files(path) == before
    assert sorted(os.listdir(tmp_path)) == ["sae"]

    # A failure while renaming the new folder in puts the previous one back.
    real_rename = os.rename

    def failing_rename(src, dst):
        if Path(src).name.startswith(".sae.tmp-"):
            raise OSError("rename failed (simulated)")
        real_rename(src, dst)

    with monkeypatch.context() as patch:
        patch.setattr(os, "rename", failing_rename)
        with pytest.raises(OSError, match="simulated"):
            second.save(path)
    assert folder_files(path) == before
    assert sorted(os.listdir(tmp_path)) == ["sae"]

    second.save(path, hook_name="second")
    assert sorted(os.listdir(tmp_path)) == ["sae"]
    loaded = sparsecode.load(path)
    assert loaded.metadata["hook_name"] == "second"
    assert torch.equal(loaded.W_dec, second.W_dec)


def test_saelens_loads_sparsecode_folders_and_back(tmp_path, seed):
    sae_lens = pytest.importorskip("sae_lens")
    x = torch.randn(17, 16)

    # sparsecode -> SAELens: a Matryoshka SAE trained on scaled activations.
    scale = 1.7
    ours = randomised(MatryoshkaSAE(16, 64, 5, [8, 32, 64]))
    path = ours.save(tmp_path / "ours", hook_name="blocks.2.hook_resid_post", model_name="gpt2",
                     activation_scale=scale)
    theirs = sae_lens.SAE.load_from_disk(path)
    assert isinstance(theirs, sae_lens.TopKSAE) and theirs.cfg.k == 5
    assert theirs.cfg.metadata.hook_name == "blocks.2.hook_resid_post"
    our_out = ours(scale * x)
    dense = torch.zeros(17, 64).scatter(1, our_out.code.indices, our_out.code.values)
    with torch.no_grad():
        assert_close(theirs.encode(x), dense, TOLERANCE[torch.float32], "SAELens code")
        assert_close(theirs(x), our_out.x_hat / scale, TOLERANCE[torch.float32], "SAELens x_hat")

    # SAELens -> sparsecode, with and without SAELens's decoder-norm rescaling.
    for rescale in (False, True):
        cfg = sae_lens.TopKSAEConfig(
            d_in=16, d_sae=64, k=5, dtype="float32", device="cpu",
            rescale_acts_by_decoder_norm=rescale,
        )
        cfg.metadata.hook_name, cfg.metadata.model_name = "blocks.4.hook_resid_post", "pythia-70m"
        theirs = sae_lens.TopKSAE(cfg)
        with torch.no_grad():
            for p in PARAMS:
                getattr(theirs, p).copy_(random_weights(16, 64)[p])
        folder = tmp_path / f"theirs-{rescale}"
        theirs.save_model(folder)
        loaded = sparsecode.load(folder)
        assert type(loaded) is TopKSAE and loaded.k == 5
        assert loaded.metadata["hook_name"] == "blocks.4.hook_resid_post"
        with torch.no_grad():
            out = loaded(x)
            dense = torch.zeros(17, 64).scatter(1, out.code.indices, out.code.values)
            assert_close(dense, theirs.encode(x), TOLERANCE[torch.float32], f"code {rescale=}")
            assert_close(out.x_hat, theirs(x), TOLERANCE[torch.float32], f"x_hat {rescale=}")
