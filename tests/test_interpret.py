"""Interpretability measures: latent activations, simulation scores (token and LLM explainers,
reply parsing, the OpenAI-compatible client), pooled codes, sparse probing, BBC topic labels."""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
import torch

from sparsecode import TopKSAE
from sparsecode.interpret import (
    Examples,
    LLMExplainer,
    TokenExplainer,
    TokenExplanation,
    document_tokens,
    encode_contexts,
    latent_activations,
    openai_generate,
    parse_activations,
    pearson,
    pooled_codes,
    simulation_scores,
    sparse_probing,
)
from sparsecode.text import iter_documents, labelled_documents

TOKEN_LATENT, RANDOM_LATENT, DEAD_LATENT = 3, 5, 9
FIRING_TOKEN = 7


def sparse(dense: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-k code of dense activations [..., d]: values, indices [..., k], indices sorted."""
    values, indices = dense.topk(k, dim=-1)
    indices, order = indices.sort(dim=-1)
    return values.gather(-1, order), indices


def synthetic(seed: int = 0, contexts: int = 40, length: int = 24, vocab: int = 50):
    """tokens [C, L] and a 4-sparse code over 16 latents: TOKEN_LATENT fires (about 2) exactly
    on FIRING_TOKEN, RANDOM_LATENT at random positions, DEAD_LATENT never; latent 0 is noise."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(vocab, (contexts, length), generator=g)
    dense = torch.zeros(contexts, length, 16)
    strength = 2 + 0.2 * torch.rand(tokens.shape, generator=g)
    dense[..., TOKEN_LATENT] = (tokens == FIRING_TOKEN) * strength
    fires = torch.rand(tokens.shape, generator=g) < 0.2
    dense[..., RANDOM_LATENT] = fires * torch.rand(tokens.shape, generator=g)
    dense[..., 0] = 0.1 * torch.rand(tokens.shape, generator=g)
    return (tokens, *sparse(dense, 4))


def test_latent_activations():
    values = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])  # [1, 2, 2]
    indices = torch.tensor([[[0, 5], [2, 5]]])
    out = latent_activations(values, indices, [5, 2, 7])
    assert out.shape == (1, 2, 3)
    assert torch.equal(out, torch.tensor([[[2.0, 0.0, 0.0], [4.0, 3.0, 0.0]]]))
    with pytest.raises(ValueError, match="latents"):
        latent_activations(values, indices, [])
    with pytest.raises(ValueError, match="repeat"):
        latent_activations(values, indices, [5, 5])
    with pytest.raises(ValueError, match="one shape"):
        latent_activations(values, indices[..., :1], [0])


def test_pearson():
    x = torch.tensor([1.0, 2.0, 3.0])
    assert pearson(x, 2 * x + 1) == pytest.approx(1.0)
    assert pearson(x, -x) == pytest.approx(-1.0)
    assert pearson(x, torch.full((3,), 0.1)) == 0.0  # constant: 0, not rounding noise
    assert pearson(torch.zeros(3), x) == 0.0


def test_token_explainer():
    tokens = torch.tensor([[1, 7, 2, 7], [3, 4, 7, 1]])
    acts = torch.tensor([[0.0, 2.0, 0.0, 4.0], [0.0, 0.0, 3.0, 0.0]])
    explanation = TokenExplainer().explain(Examples(tokens, acts))
    assert explanation.tokens == {7: pytest.approx(3.0)}
    assert explanation.bigrams == {(1, 7): 2.0, (2, 7): 4.0, (4, 7): 3.0}
    predicted = TokenExplainer().simulate(explanation, torch.tensor([[7, 2, 7, 5, 7]]))
    assert predicted.tolist() == [[3.0, 0.0, 4.0, 0.0, 3.0]]
    assert TokenExplainer().explain(Examples(tokens, torch.zeros(2, 4))) == TokenExplanation()


def test_simulation_scores_separate_token_and_random_latents():
    tokens, values, indices = synthetic()
    result = simulation_scores(
        tokens, values, indices, [TOKEN_LATENT, RANDOM_LATENT, DEAD_LATENT]
    )
    assert result.scores[TOKEN_LATENT] > 0.95
    assert FIRING_TOKEN in result.explanations[TOKEN_LATENT].tokens
    assert abs(result.scores[RANDOM_LATENT]) < 0.3
    assert result.scores[DEAD_LATENT] == 0.0 and result.explanations[DEAD_LATENT] is None
    assert result.mean == pytest.approx(sum(result.scores.values()) / 3)


def test_simulation_scores_are_deterministic():
    tokens, values, indices = synthetic(seed=1)
    latents = [0, TOKEN_LATENT, RANDOM_LATENT]
    first = simulation_scores(tokens, values, indices, latents, seed=3)
    again = simulation_scores(tokens, values, indices, latents, seed=3)
    assert first == again
    # A latent's score does not depend on the other latents scored with it.
    alone = simulation_scores(tokens, values, indices, [RANDOM_LATENT], seed=3)
    assert alone.scores[RANDOM_LATENT] == first.scores[RANDOM_LATENT]
    repeated = simulation_scores(tokens, values, indices, [RANDOM_LATENT] * 2, seed=3)
    assert repeated == alone
    other = simulation_scores(tokens, values, indices, latents, seed=4)
    assert other.scores != first.scores


def test_simulation_scores_errors():
    tokens, values, indices = synthetic()
    with pytest.raises(ValueError, match="int64"):
        simulation_scores(tokens.float(), values, indices, [0])
    with pytest.raises(ValueError, match="to match tokens"):
        simulation_scores(tokens[:, 1:], values, indices, [0])
    with pytest.raises(ValueError, match="at least 2 contexts"):
        simulation_scores(tokens[:1], values[:1], indices[:1], [0])
    with pytest.raises(ValueError, match="top_contexts"):
        simulation_scores(tokens, values, indices, [0], top_contexts=0)


class WordTokenizer:
    """Token i is the text " t<i>"."""

    def decode(self, ids: list[int]) -> str:
        return "".join(f" t{i}" for i in ids)


def test_llm_explainer_with_a_fake_model():
    prompts: list[str] = []

    def generate(prompt: str) -> str:
        prompts.append(prompt)
        if "what the neuron detects" in prompt:
            return f"\n  Fires on t{FIRING_TOKEN}.\nMore text."
        listed = re.findall(r"^(\d+)\t t(\d+)$", prompt, flags=re.MULTILINE)
        return "\n".join(f"{i}\t{10 if int(t) == FIRING_TOKEN else 0}" for i, t in listed)

    tokens, values, indices = synthetic()
    explainer = LLMExplainer(generate, WordTokenizer())
    result = simulation_scores(
        tokens, values, indices, [TOKEN_LATENT], explainer=explainer, holdout_contexts=4
    )
    assert result.explanations[TOKEN_LATENT] == f"Fires on t{FIRING_TOKEN}."
    assert result.scores[TOKEN_LATENT] > 0.95
    assert len(prompts) == 1 + 4  # one explanation, one simulation per held-out context
    excerpts = prompts[0].split("Excerpt ")[1:]  # the top contexts where the latent fires
    assert 0 < len(excerpts) <= 10 and all(f"[[ t{FIRING_TOKEN}|" in e for e in excerpts)
    assert f"[[ t{FIRING_TOKEN}|10]]" in prompts[0]
    assert prompts[1].count("\n") > tokens.shape[1]
    assert f"explained as follows: Fires on t{FIRING_TOKEN}." in prompts[1]


def test_parse_activations():
    assert parse_activations("0\t3\n1: 7\n2 | t5 | 12\n", 4).tolist() == [3, 7, 10, 0]
    # indexed lines win; other lines, out-of-range indices and negative values are dropped/0
    assert parse_activations("Sure!\n1\t4\n9\t9\n0\t-2", 3).tolist() == [0, 4, 0]
    assert parse_activations("2\n0\n5.5", 4).tolist() == [2, 0, 5.5, 0]  # numbers, in order
    assert parse_activations("no idea", 2).tolist() == [0, 0]
    assert parse_activations("", 0).shape == (0,)


def test_openai_generate_against_a_local_server():
    seen: list[tuple[str, str | None, dict]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append((self.path, self.headers.get("Authorization"), body))
            prompt = body["messages"][0]["content"]
            status = 500 if prompt == "fail" else 200
            reply = {"choices": [{"message": {"content": prompt.upper()}}]}
            data = b"boom" if status == 500 else json.dumps(reply).encode()
            self.send_response(status)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        assert openai_generate(url, "judge", api_key="secret")("hello") == "HELLO"
        assert openai_generate(url + "/v1/", "judge")("again") == "AGAIN"
        assert seen[0][:2] == ("/v1/chat/completions", "Bearer secret")
        assert seen[1][:2] == ("/v1/chat/completions", None)
        assert seen[0][2]["model"] == "judge" and seen[0][2]["temperature"] == 0
        with pytest.raises(RuntimeError, match="HTTP 500: boom"):
            openai_generate(url, "judge")("fail")
    finally:
        server.shutdown()
        server.server_close()
    with pytest.raises(RuntimeError, match="could not reach"):
        openai_generate(url, "judge", timeout=5)("hello")


def test_pooled_codes():
    values = torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[5.0, 6.0], [7.0, 8.0]]])  # [2, 2, 2]
    indices = torch.tensor([[[0, 3], [1, 3]], [[0, 1], [2, 3]]])
    assert torch.equal(
        pooled_codes(values, indices, 4),
        torch.tensor([[0.5, 1.5, 0.0, 3.0], [2.5, 3.0, 3.5, 4.0]]),
    )
    mask = torch.tensor([[True, False], [True, True]])
    assert torch.equal(
        pooled_codes(values, indices, 2, mask), torch.tensor([[1.0, 0.0], [2.5, 3.0]])
    )
    with pytest.raises(ValueError, match="every row needs a True"):
        pooled_codes(values, indices, 2, torch.tensor([[False, False], [True, True]]))
    with pytest.raises(ValueError, match="mask must be a bool tensor"):
        pooled_codes(values, indices, 2, mask.int())


class CharTokenizer:
    eos_token_id = 0

    def __call__(self, documents: list[str], add_special_tokens: bool, verbose: bool) -> dict:
        assert not add_special_tokens
        return {"input_ids": [[ord(c) for c in document] for document in documents]}


def test_document_tokens():
    tokens, mask = document_tokens(CharTokenizer(), ["abcdef", "xy"], length=4)
    assert tokens.tolist() == [[97, 98, 99, 100], [120, 121, 0, 0]]
    assert mask.tolist() == [[True] * 4, [True, True, False, False]]
    assert document_tokens(CharTokenizer(), ["xy"], length=3, pad=5)[0].tolist() == [[120, 121, 5]]


def labelled_features(seed: int, informative: bool) -> tuple[torch.Tensor, list[str]]:
    """Noise features [120, 30] for 5 classes of 24 documents; feature c carries class c."""
    g = torch.Generator().manual_seed(seed)
    classes = ["a", "b", "c", "d", "e"]
    labels = [classes[i % 5] for i in range(120)]
    features = torch.randn(120, 30, generator=g)
    if informative:
        for c, name in enumerate(classes):
            features[:, 10 + c] = torch.tensor([float(label == name) for label in labels])
            features[:, 10 + c] += 0.1 * torch.randn(120, generator=g)
    return features, labels


def test_sparse_probing_finds_the_label_feature():
    features, labels = labelled_features(0, informative=True)
    accuracy = sparse_probing(features, labels, top=(1, 5))
    assert set(accuracy) == {1, 5}
    assert accuracy[1] > 0.97 and accuracy[5] > 0.9
    assert sparse_probing(features, labels, top=(1, 5)) == accuracy  # deterministic


def test_sparse_probing_on_noise_is_near_chance():
    features, labels = labelled_features(1, informative=False)
    accuracy = sparse_probing(features, labels, top=(1, 5), seed=2)
    assert accuracy[1] < 0.7 and accuracy[5] < 0.7


def test_sparse_probing_errors():
    features, labels = labelled_features(0, informative=True)
    with pytest.raises(ValueError, match="one label per row"):
        sparse_probing(features, labels[:-1])
    with pytest.raises(ValueError, match="top must list sizes"):
        sparse_probing(features, labels, top=(31,))
    with pytest.raises(ValueError, match="class 'z' has 1 document"):
        sparse_probing(features, labels[:-1] + ["z"])
    with pytest.raises(ValueError, match="at least 2 classes"):
        sparse_probing(features, ["a"] * 120)


def test_labelled_documents():
    held_out = labelled_documents()
    assert held_out == labelled_documents("eval")  # default split, deterministic
    assert [text for text, _ in held_out] == list(iter_documents(split="eval"))
    topics = {topic for _, topic in held_out}
    assert topics == {"business", "entertainment", "politics", "sports", "tech"}
    assert held_out[0][1] == "business"  # business/001.txt
    train = labelled_documents("train")
    assert len(train) == 2020 and {topic for _, topic in train} == topics
    assert not {text for text, _ in train} & {text for text, _ in held_out}
    with pytest.raises(ValueError, match="split"):
        labelled_documents("test")


@pytest.mark.filterwarnings("ignore:HookedTransformer is deprecated:DeprecationWarning")
def test_encode_contexts_matches_sae_encode():
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(
        n_layers=1, d_model=16, d_head=4, n_heads=4, d_mlp=32, n_ctx=16, d_vocab=50,
        act_fn="gelu", normalization_type="LN", seed=0,
    )
    model = HookedTransformer(cfg).eval()
    sae = TopKSAE(16, 32, 4)
    sae.metadata["hook_name"] = hook = "blocks.0.hook_resid_post"
    tokens = torch.randint(50, (5, 8))
    codes = encode_contexts(model, sae, tokens, skip_positions=1, batch_size=2)
    _, cache = model.run_with_cache(tokens, names_filter=hook)
    expected = sae.encode(cache[hook][:, 1:].reshape(-1, 16))
    assert codes.skip_positions == 1 and torch.equal(codes.tokens, tokens[:, 1:])
    assert torch.equal(codes.indices, expected.indices.view(5, 7, 4))
    torch.testing.assert_close(codes.values, expected.values.view(5, 7, 4))
    sae.metadata.clear()
    with pytest.raises(ValueError, match="hook_name"):
        encode_contexts(model, sae, tokens)
