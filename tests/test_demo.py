"""The planted-dictionary demo learns what was planted, and the CLI runs it."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import torch

from sparsecode.cli import main
from sparsecode.demo import PlantedDictionary, run_demo

# A shrunken default demo: 2x overcomplete planted dictionary, a few seconds on one core.
SMALL = dict(
    d_model=64,
    n_features=128,
    d_sae=128,
    k=6,
    mean_active=4.0,
    prefix_sizes=[16, 32, 64, 128],
    batch_size=512,
    lr=5e-3,
    eval_batch_size=4096,
    progress=False,
)


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """The demo's tensors are tiny: one thread is faster, more so on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_planted_dictionary_statistics() -> None:
    generator = torch.Generator().manual_seed(0)
    data = PlantedDictionary(32, 64, mean_active=4.0, alpha=0.5, noise_std=0.0,
                             generator=generator)
    torch.testing.assert_close(data.directions.norm(dim=1), torch.ones(64))
    assert bool((data.probs[:-1] >= data.probs[1:]).all()), "firing rates must fall with rank"
    x, acts = data.sample(20_000)
    active = (acts > 0).sum(dim=1).float().mean().item()
    assert abs(active - 4.0) < 0.1, f"mean active {active:.3f}, asked for 4"
    assert float(acts[acts > 0].min()) >= 0.5
    torch.testing.assert_close(x, acts @ data.directions)  # noise_std=0


def test_trained_prefixes_reconstruct_and_recover_planted_features() -> None:
    trained = run_demo(steps=600, seed=0, **SMALL)
    untrained = run_demo(steps=0, seed=0, **SMALL)

    sizes = [row.size for row in trained.rows]
    assert sizes == SMALL["prefix_sizes"]
    fvu = [row.fvu for row in trained.rows]
    recovered = [row.recovered for row in trained.rows]
    print("fvu", fvu, "recovered", recovered)

    # Each larger prefix reconstructs better, and the full dictionary reconstructs well.
    assert all(a > b for a, b in zip(fvu, fvu[1:])), fvu
    assert fvu[-1] < 0.2, fvu
    # Recovered features grow with the prefix (nested sets) and most are found by the end;
    # a prefix of m latents can recover at most m features.
    assert all(a <= b for a, b in zip(recovered, recovered[1:])), recovered
    assert recovered[-1] > 0.7, recovered
    for row in trained.rows:
        assert row.recovered <= row.size / SMALL["n_features"] + 1e-9
        assert 0 < row.l0 <= SMALL["k"]
    assert trained.rows[-1].l0 == pytest.approx(SMALL["k"], abs=0.05)
    # The smallest prefix already holds a good share of the most frequent features.
    assert trained.rows[0].recovered_frequent > 0.3, trained.rows[0]

    # Without training nothing is recovered and the reconstruction is much worse.
    assert untrained.rows[-1].recovered < 0.05
    assert untrained.rows[-1].fvu > 2 * fvu[-1]
    assert abs(trained.mean_active - 4.0) < 0.2


def test_run_demo_is_deterministic_and_leaves_global_rng_alone() -> None:
    settings = {**SMALL, "steps": 30, "eval_batch_size": 512}
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first = run_demo(seed=7, **settings)
    assert torch.equal(torch.get_rng_state(), before)
    assert run_demo(seed=7, **settings) == first
    assert run_demo(seed=8, **settings) != first


def test_cli_backends_prints_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["backends"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert "cpp" in report and "available" in report["cpp"]


def test_cli_demo_prints_table(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["demo", "--steps", "20", "--d-model", "16", "--n-features", "32", "--d-sae", "32",
            "--k", "2", "--batch-size", "64", "--no-progress"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    table = [line for line in out.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| prefix size | FVU")
    # Default prefixes for d_sae=32: 4, 8, 16, 32.
    assert [line.split("|")[1].strip() for line in table[1:]] == ["4", "8", "16", "32"]


def test_cli_demo_rejects_bad_prefixes(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--steps", "1", "--d-sae", "32", "--prefix-sizes", "8", "16",
              "--no-progress"])
    assert exit_info.value.code == 2
    assert "last prefix size must equal d_sae=32" in capsys.readouterr().err
