"""``sparsecode compare`` end to end with tiny settings on the default model and text."""

from __future__ import annotations

import json
import math

import pytest
import torch

from sparsecode.cli import main

TINY = ["--hook", "blocks.2.hook_resid_post", "--context-length", "32", "--d-sae", "96",
        "--k", "4", "--prefix-sizes", "24,48,96", "--tokens", "6144", "--batch-size", "256",
        "--eval-tokens", "2048", "--ce-contexts", "2", "--no-progress"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """The activation cache that the module's compare runs share."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def compared(tmp_path_factory, cache_dir):
    out = tmp_path_factory.mktemp("compare")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("sparsecode.compare.CompareConfig.importance_tokens", 4096)
        patch.setattr("sparsecode.compare.CompareConfig.interp_contexts", 16)
        patch.setattr("sparsecode.compare.CompareConfig.interp_latents", 4)
        assert main(["compare", *TINY, "--out", str(out), "--cache", str(cache_dir)]) == 0
    return out


def test_compare_writes_report_results_and_plots(compared):
    report = (compared / "report.md").read_text()
    for section in ("## Reading", "## Reconstruction", "## Spliced into the model",
                    "## Interpretability", "## Training throughput", "power-law fits"):
        assert section in report
    for plot in ("importance_vs_rank.png", "metrics_vs_size.png"):
        assert (compared / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({plot})" in report
    results = json.loads((compared / "results.json").read_text())
    assert results["sizes"] == [24, 48, 96]
    for variant in ("nested", "pruned_mean_sq", "pruned_frequency", "unsorted"):
        for mode in ("truncate", "reencode"):
            rows = results["reconstruction"][variant][mode]
            assert sorted(rows, key=int) == ["24", "48", "96"]
            assert all(0 <= row["fvu"] < 2 and row["l0"] <= 4 for row in rows.values())
        for row in results["spliced"][variant].values():
            assert math.isfinite(row["ce_recovered"]) and row["kl"] >= 0
    assert set(results["power_law"]) == {"mean_sq", "frequency", "mean"}
    assert results["throughput"]["matryoshka_over_topk"] > 0


def test_full_size_variants_agree(compared):
    """At the full width every pruned variant is the same TopK SAE, reordered."""
    results = json.loads((compared / "results.json").read_text())
    fvu = {v: results["reconstruction"][v]["truncate"]["96"]["fvu"]
           for v in ("pruned_mean_sq", "pruned_frequency", "unsorted")}
    assert max(fvu.values()) - min(fvu.values()) < 1e-5


def test_compare_loads_saved_saes(compared, tmp_path, monkeypatch):
    monkeypatch.setattr("sparsecode.compare.CompareConfig.importance_tokens", 4096)
    monkeypatch.setattr("sparsecode.compare.CompareConfig.interp_contexts", 16)
    monkeypatch.setattr("sparsecode.compare.CompareConfig.interp_latents", 4)
    argv = ["compare", *TINY, "--out", str(tmp_path / "again"),
            "--topk", str(compared / "topk" / "sae"),
            "--matryoshka", str(compared / "matryoshka" / "sae")]
    assert main(argv) == 0
    first = json.loads((compared / "results.json").read_text())["reconstruction"]
    again = json.loads((tmp_path / "again" / "results.json").read_text())["reconstruction"]
    assert again == first
    assert not (tmp_path / "again" / "topk").exists()


def test_compare_trains_in_bfloat16(compared, cache_dir, tmp_path, monkeypatch):
    """--dtype bfloat16 trains both SAEs in bfloat16 (saved so) and evaluates them in float32,
    reconstructing about as well as the float32 run."""
    from safetensors.torch import load_file

    monkeypatch.setattr("sparsecode.compare.CompareConfig.importance_tokens", 4096)
    monkeypatch.setattr("sparsecode.compare.CompareConfig.interp_contexts", 16)
    monkeypatch.setattr("sparsecode.compare.CompareConfig.interp_latents", 4)
    out = tmp_path / "bf16"
    assert main(["compare", *TINY, "--out", str(out), "--cache", str(cache_dir),
                 "--dtype", "bfloat16"]) == 0
    for arch in ("topk", "matryoshka"):
        weights = load_file(out / arch / "sae" / "sae_weights.safetensors")
        assert weights["W_enc"].dtype == torch.bfloat16
    full = {path: json.loads((path / "results.json").read_text())["reconstruction"]
            for path in (compared, out)}
    for variant in ("nested", "unsorted"):
        fvu = [full[path][variant]["truncate"]["96"]["fvu"] for path in (compared, out)]
        assert fvu[1] == pytest.approx(fvu[0], abs=0.02)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--topk", "/no/such/sae"], "--topk"),
        (["--prefix-sizes", "8,4"], "prefix_sizes"),
        (["--k", "500"], "k=500"),
    ],
)
def test_compare_bad_arguments(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["compare", "--d-sae", "256", *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
