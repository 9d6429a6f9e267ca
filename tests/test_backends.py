"""Backend discovery, choice, the environment override, and life without the extension."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

import sparsecode
from sparsecode import reference
from sparsecode.backends import BackendUnavailableError, resolve_backend


def test_report_names_every_backend():
    report = sparsecode.backends()
    assert set(report) == {"cpp", "cuda", "triton", "reference"}
    for entry in report.values():
        assert isinstance(entry["available"], bool)
        assert (entry["reason"] is None) == entry["available"]
    assert report["cpp"]["available"], report["cpp"]["reason"]
    assert report["reference"]["available"]
    assert isinstance(report["triton"]["interpreted"], bool)
    if not torch.cuda.is_available():
        assert "CUDA" in report["cuda"]["reason"]


def test_auto_picks_cpp_on_cpu():
    assert resolve_backend("auto", torch.device("cpu")) == "cpp"


def test_cpp_refuses_other_devices():
    with pytest.raises(BackendUnavailableError, match="cpp backend runs on CPU tensors"):
        resolve_backend("cpp", torch.device("meta"))


def test_environment_overrides_the_constructor(monkeypatch):
    calls = []
    real = reference.topk_encode

    def counting(*args):
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(reference, "topk_encode", counting)
    sae = sparsecode.TopKSAE(8, 32, 3, backend="cpp")
    x = torch.randn(5, 8)
    sae(x)
    assert not calls
    monkeypatch.setenv("SPARSECODE_BACKEND", "reference")
    sae(x)
    assert len(calls) == 1
    monkeypatch.setenv("SPARSECODE_BACKEND", "cuda")
    with pytest.raises(BackendUnavailableError, match="'cuda' is not available"):
        sae(x)


def test_package_works_without_the_extension():
    """With sparsecode._C unimportable: one warning naming why, cpp reported unavailable,
    auto falls back to the reference, asking for cpp explicitly is a clear error."""
    script = textwrap.dedent(
        """
        import sys, warnings
        sys.modules["sparsecode._C"] = None  # makes `from sparsecode import _C` fail
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import sparsecode
        import torch
        messages = [str(w.message) for w in caught if "sparsecode" in str(w.message)]
        assert len(messages) == 1 and "sparsecode._C" in messages[0], messages
        report = sparsecode.backends()
        assert not report["cpp"]["available"] and "sparsecode._C" in report["cpp"]["reason"]
        sae = sparsecode.MatryoshkaSAE(8, 32, 3, [8, 32])
        out = sae(torch.randn(4, 8))
        out.loss.backward()
        assert "GeneratedBackwardFor_sparsecode" not in type(out.loss.grad_fn).__name__
        try:
            sparsecode.TopKSAE(8, 32, 3, backend="cpp")
        except sparsecode.BackendUnavailableError as err:
            assert "sparsecode._C" in str(err)
        else:
            raise AssertionError("backend='cpp' should fail without the extension")
        print("ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_auto_on_cuda_takes_triton_then_cuda_and_the_environment_wins(monkeypatch):
    """On CUDA tensors, auto picks triton where available, else cuda, else the reference; the
    environment override still names the backend outright."""
    cuda = torch.device("cuda")
    available = {"triton", "cuda"}
    # sparsecode.backends is also the name of a function, so patch the module's namespace.
    monkeypatch.setitem(resolve_backend.__globals__, "_missing",
                        lambda name: None if name in available | {"reference"} else "absent")
    assert resolve_backend("auto", cuda) == "triton"
    available.discard("triton")
    assert resolve_backend("auto", cuda) == "cuda"
    available.clear()
    assert resolve_backend("auto", cuda) == "reference"
    available.update({"triton", "cuda"})
    monkeypatch.setenv("SPARSECODE_BACKEND", "cuda")
    assert resolve_backend("auto", cuda) == "cuda"
