"""Save and load SAEs in SAELens's folder format, so that SAELens users can load them.

A saved SAE is a folder holding

    cfg.json                  SAELens's config fields, plus sparsecode's own keys
    sae_weights.safetensors   W_enc [d_in, d_sae], W_dec [d_sae, d_in], b_enc [d_sae], b_dec [d_in]

with ``architecture: "topk"`` for TopK and Matryoshka SAEs alike: at inference a Matryoshka
SAE is a TopK SAE. sparsecode's keys sit beside SAELens's (which ignores keys it does not
know): ``matryoshka_widths`` (the prefix sizes) and ``prefix_weights`` mark a Matryoshka SAE;
``sparsecode_version``, ``activation_scale`` and ``training_tokens`` record provenance.

A BatchTopK SAE (``activation: "batchtopk"``) is saved as SAELens's inference form of one,
``architecture: "jumprelu"`` with the learnt threshold in the tensor ``threshold`` [d_sae] (the
same value for every latent), so SAELens loads it as a JumpReLU SAE; sparsecode's ``k`` and
``k_max`` keys let :func:`load` rebuild the BatchTopK SAE.

An SAE trained on scaled activations s * x is saved with s folded into its weights, so that
any loader reconstructs raw activations:

    W_enc' = s W_enc,   b_enc' = b_enc,   W_dec' = W_dec / s,   b_dec' = b_dec / s

gives (x - b_dec') W_enc' + b_enc' = (s x - b_dec) W_enc + b_enc (the same code) and
x_hat' = x_hat / s.

:func:`load` reads such folders and TopK SAEs saved by SAELens (6.x, and the older layout
with ``activation_fn: "topk"``), folding SAELens's ``rescale_acts_by_decoder_norm`` and
``apply_b_dec_to_input: false`` into the weights of the module-doc maths of sparsecode.sae.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, NamedTuple

import safetensors
import safetensors.torch
import torch
from torch import Tensor

import sparsecode
from sparsecode.files import fsync_path
from sparsecode.sae import SAE, MatryoshkaSAE, TopKSAE, _as_int, _check_prefixes

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
# The SAELens release whose format these folders follow (metadata.sae_lens_version); SAELens
# treats folders without a version >= 6 as its older layout.
SAELENS_FORMAT_VERSION = "6.54.0"
# The files an existing folder may hold for save_sae to replace it (sparsity.safetensors is
# the optional third file of a SAELens folder).
_SAE_FOLDER_FILES = frozenset({CFG_FILE, WEIGHTS_FILE, "sparsity.safetensors"})
_SAELENS_DTYPES = ("float32", "float64", "float16", "bfloat16")
_RESERVED_METADATA = ("sae_lens_version", "sae_lens_training_version", "hook_name", "model_name")


# --------------------------------------------------------------------------------- save


def save_sae(
    sae: SAE,
    path: str | os.PathLike[str],
    *,
    hook_name: str | None = None,
    model_name: str | None = None,
    activation_scale: float = 1.0,
    training_tokens: int | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Writes sae to the folder path (created, or replaced if it holds a saved SAE); returns it.

    hook_name, model_name: where the activations came from (transformer_lens names, e.g.
    "blocks.6.hook_resid_post"); default to ``sae.metadata``'s, which :func:`load` fills.
    activation_scale: the factor s the SAE was trained with (it saw s * x); folded into the
    saved weights so that the folder reconstructs raw activations x, and recorded.
    training_tokens: how many tokens the SAE was trained on, recorded.
    extra: JSON-serialisable entries added to cfg.json's ``metadata``.

    The write is atomic: files go to a temporary sibling folder, are flushed to disk, and the
    folder is renamed into place, so path never holds a half-written SAE.
    """
    if not isinstance(sae, SAE):
        raise TypeError(f"sae must be a sparsecode SAE, got {type(sae).__name__}")
    cfg = _saelens_cfg(
        sae,
        hook_name=sae.metadata.get("hook_name") if hook_name is None else hook_name,
        model_name=sae.metadata.get("model_name") if model_name is None else model_name,
        activation_scale=activation_scale,
        training_tokens=training_tokens,
        extra=extra,
    )
    target = _writable_folder(path)
    scale = cfg["activation_scale"]
    with torch.no_grad():
        tensors = {
            "W_enc": sae.W_enc * scale,
            "W_dec": sae.W_dec / scale,
            "b_enc": sae.b_enc.clone(),
            "b_dec": sae.b_dec / scale,
        }
        if sae.activation == "batchtopk":
            tensors["threshold"] = sae.threshold.float().expand(sae.d_sae).to(sae.W_enc.dtype)
    _write_atomically(target, {k: v.contiguous().cpu() for k, v in tensors.items()}, cfg)
    return target


def _saelens_cfg(
    sae: SAE,
    *,
    hook_name: str | None,
    model_name: str | None,
    activation_scale: float,
    training_tokens: int | None,
    extra: dict[str, Any] | None,
) -> dict[str, Any]:
    """cfg.json's contents for sae, checked to be JSON-serialisable."""
    for name, value in (("hook_name", hook_name), ("model_name", model_name)):
        if value is not None and not isinstance(value, str):
            raise TypeError(f"{name} must be a str or None, got {type(value).__name__}")
    try:
        scale = float(activation_scale)
    except (TypeError, ValueError):
        raise TypeError(
            f"activation_scale must be a positive float, got {activation_scale!r}"
        ) from None
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"activation_scale must be a finite positive float, got {scale}")
    if training_tokens is not None and (_as_int(training_tokens) is None or training_tokens < 0):
        raise ValueError(
            f"training_tokens must be a non-negative int or None, got {training_tokens!r}"
        )
    dtype = str(sae.W_enc.dtype).removeprefix("torch.")
    if dtype not in _SAELENS_DTYPES:
        raise ValueError(
            f"SAELens folders hold {', '.join(_SAELENS_DTYPES)} weights, but the SAE is {dtype}: "
            "cast it first, e.g. sae.float()"
        )
    extra = {} if extra is None else extra
    if not isinstance(extra, dict) or not all(isinstance(key, str) for key in extra):
        raise TypeError(f"extra must be a dict with str keys, got {extra!r}")
    clashes = sorted(set(extra) & set(_RESERVED_METADATA))
    if clashes:
        raise ValueError(
            f"extra must not set {clashes}: sparsecode writes them; pass hook_name= and "
            "model_name= as keywords"
        )

    cfg: dict[str, Any] = {
        "architecture": "topk",
        "d_in": sae.d_model,
        "d_sae": sae.d_sae,
        "k": sae.k,
        "rescale_acts_by_decoder_norm": False,
        "dtype": dtype,
        "device": str(sae.W_enc.device),
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {
            **extra,
            "sae_lens_version": SAELENS_FORMAT_VERSION,
            "sae_lens_training_version": None,
            "hook_name": hook_name,
            "model_name": model_name,
        },
        "sparsecode_version": sparsecode.__version__,
        "activation_scale": scale,
        "training_tokens": None if training_tokens is None else int(training_tokens),
    }
    if sae.activation == "batchtopk":
        cfg.update(architecture="jumprelu", activation="batchtopk", k_max=sae.k_max)
    if isinstance(sae, MatryoshkaSAE) or len(sae.prefix_sizes) > 1:
        cfg["matryoshka_widths"] = list(sae.prefix_sizes)
        cfg["prefix_weights"] = list(sae.prefix_weights)
    try:
        json.dumps(cfg, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise ValueError(f"extra must hold JSON-serialisable, finite values: {err}") from None
    return cfg


def _writable_folder(path: str | os.PathLike[str]) -> Path:
    """path as an absolute folder path that save_sae may create or replace; parents created."""
    target = Path(os.path.abspath(os.fspath(path)))
    if target.exists() and not target.is_dir():
        raise FileExistsError(
            f"path={os.fspath(path)!r} is a file: pass a folder path (the folder is created)"
        )
    if target.is_dir():
        foreign = sorted(p.name for p in target.iterdir() if p.name not in _SAE_FOLDER_FILES)
        if foreign:
            raise FileExistsError(
                f"path={os.fspath(path)!r} exists and holds files that are not a saved SAE "
                f"({', '.join(foreign[:5])}): pass a new folder path, or an SAE folder to replace"
            )
    target.parent.mkdir(parents=True, exist_ok=True)
    return target


def _write_atomically(target: Path, tensors: dict[str, Tensor], cfg: dict[str, Any]) -> None:
    """Writes the two files into a temporary sibling of target, then renames it into place.

    An existing target is renamed aside, the new folder renamed in, and the old one deleted;
    if the second rename fails the old folder is put back. On any failure the temporary
    folder is removed.
    """
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        safetensors.torch.save_file(tensors, tmp / WEIGHTS_FILE, metadata={"format": "pt"})
        fsync_path(tmp / WEIGHTS_FILE)
        with open(tmp / CFG_FILE, "w", encoding="utf-8") as f:
            json.dump(cfg, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        fsync_path(tmp)
        if target.exists():
            old = target.parent / f".{target.name}.old-{uuid.uuid4().hex}"
            os.rename(target, old)
            try:
                os.rename(tmp, target)
            except BaseException:
                os.rename(old, target)
                raise
            shutil.rmtree(old, ignore_errors=True)  # the new SAE is in place either way
        else:
            os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_path(target.parent)


# --------------------------------------------------------------------------------- load


class _FolderCfg(NamedTuple):
    """What cfg.json says about the SAE, in sparsecode's terms."""

    d_in: int
    d_sae: int
    k: int
    prefix_sizes: list[int] | None  # None: a TopK SAE
    prefix_weights: list[float] | None
    activation: str  # "topk" or "batchtopk"
    k_max: int | None
    dtype: torch.dtype | None  # None: as stored
    rescale_acts_by_decoder_norm: bool
    apply_b_dec_to_input: bool
    metadata: dict[str, Any]


def load(
    path: str | os.PathLike[str],
    *,
    backend: str = "auto",
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> SAE:
    """Loads the SAE saved in the folder path: a :class:`MatryoshkaSAE` where cfg.json has
    ``matryoshka_widths``, else a :class:`TopKSAE`.

    Reads folders written by :func:`save_sae` and TopK SAEs saved by SAELens. device defaults
    to the CPU, dtype to cfg.json's. The returned SAE's ``metadata`` dict holds cfg.json's
    ``metadata`` (``hook_name``, ``model_name``, ...) and sparsecode's ``activation_scale``,
    ``training_tokens`` and ``sparsecode_version`` where recorded.
    """
    folder = Path(os.fspath(path))
    if not folder.is_dir():
        what = "is a file" if folder.exists() else "does not exist"
        raise FileNotFoundError(
            f"path={os.fspath(path)!r} {what}: pass the folder that holds {CFG_FILE} and "
            f"{WEIGHTS_FILE}"
        )
    for name in (CFG_FILE, WEIGHTS_FILE):
        if not (folder / name).is_file():
            raise FileNotFoundError(
                f"path={os.fspath(path)!r} has no {name}: a saved SAE folder holds {CFG_FILE} "
                f"and {WEIGHTS_FILE} (save one with sparsecode.saving.save_sae or SAELens's "
                "save_model)"
            )
    cfg = _read_cfg(folder / CFG_FILE)
    stored = _read_weights(folder / WEIGHTS_FILE, cfg)
    target_dtype = dtype if dtype is not None else cfg.dtype
    if target_dtype is None:
        target_dtype = stored["W_enc"].dtype
    threshold = stored.pop("threshold", None)
    state = _fold_saelens_variants(
        {k: v.to(device=device or "cpu", dtype=target_dtype) for k, v in stored.items()}, cfg
    )
    activation = {"activation": cfg.activation, "k_max": cfg.k_max}
    if cfg.prefix_sizes is None:
        sae: SAE = TopKSAE(
            cfg.d_in, cfg.d_sae, cfg.k, backend, **activation, dtype=target_dtype, device="meta"
        )
    else:
        sae = MatryoshkaSAE(
            cfg.d_in, cfg.d_sae, cfg.k, cfg.prefix_sizes, cfg.prefix_weights, backend,
            **activation, dtype=target_dtype, device="meta",
        )
    if threshold is not None:
        state["threshold"] = threshold[0].float().to(device or "cpu")
    sae.load_state_dict(state, assign=True)
    sae.metadata = cfg.metadata
    return sae


def _fold_saelens_variants(tensors: dict[str, Tensor], cfg: _FolderCfg) -> dict[str, Tensor]:
    """The weights, in their dtype, of pre = (x - b_dec) W_enc + b_enc, x_hat = z W_dec + b_dec
    for SAELens's rescale_acts_by_decoder_norm and apply_b_dec_to_input=false variants
    (folded in at least float32); the tensors themselves (made contiguous) for the plain form."""
    dtype = tensors["W_enc"].dtype
    wide = torch.promote_types(dtype, torch.float32)
    W_enc, b_enc, W_dec, b_dec = (tensors[k].to(wide) for k in ("W_enc", "b_enc", "W_dec", "b_dec"))
    if cfg.rescale_acts_by_decoder_norm:
        # SAELens: z = TopK(ReLU(pre * n)), x_hat = (z / n) W_dec + b_dec, n = ||W_dec rows||.
        norms = W_dec.norm(dim=1).clamp(min=1e-8)
        W_enc, b_enc, W_dec = W_enc * norms, b_enc * norms, W_dec / norms[:, None]
    if not cfg.apply_b_dec_to_input:
        # SAELens: pre = x W_enc + b_enc = (x - b_dec) W_enc + (b_enc + b_dec W_enc).
        b_enc = b_enc + b_dec @ W_enc
    folded = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}
    return {k: v.to(dtype).contiguous() for k, v in folded.items()}


def _read_cfg(cfg_file: Path) -> _FolderCfg:
    """Parses and checks cfg.json (SAELens 6 layout, or the older one with top-level fields)."""
    try:
        raw = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{cfg_file} is not valid JSON ({err}): re-save the SAE") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{cfg_file} must hold a JSON object, got {type(raw).__name__}")

    # SAELens < 6 saved TopK SAEs as architecture "standard" with activation_fn(_str) "topk"
    # and k in activation_fn_kwargs.
    architecture = raw.get("architecture", "standard")
    activation_fn = raw.get("activation_fn", raw.get("activation_fn_str"))
    fn_kwargs = raw.get("activation_fn_kwargs")
    fn_kwargs = fn_kwargs if isinstance(fn_kwargs, dict) else {}
    if architecture == "standard" and activation_fn == "topk":
        architecture = "topk"
    activation = "batchtopk" if architecture == "jumprelu" and raw.get("activation") == "batchtopk" else "topk"
    if architecture != "topk" and activation != "batchtopk":
        raise ValueError(
            f"{cfg_file}: architecture {architecture!r} is not supported: sparsecode loads TopK "
            "SAEs (architecture 'topk', as saved by sparsecode or SAELens's TopKSAE) and its own "
            "BatchTopK SAEs (saved as 'jumprelu' with activation 'batchtopk'); other "
            "architectures (standard, jumprelu, gated, ...) encode differently"
        )
    normalize = raw.get("normalize_activations", "none")
    if normalize not in ("none", None, False):
        raise ValueError(
            f"{cfg_file}: normalize_activations={normalize!r} is not supported: sparsecode loads "
            "SAEs with normalize_activations 'none'; fold the normalisation into the weights "
            "first (SAELens: fold_activation_norm_scaling_factor) and save again"
        )

    d_in, d_sae = raw.get("d_in"), raw.get("d_sae")
    k = raw.get("k", fn_kwargs.get("k"))
    for name, value in (("d_in", d_in), ("d_sae", d_sae), ("k", k)):
        if _as_int(value) is None or value < 1:
            raise ValueError(f"{cfg_file}: {name} must be a positive int, got {value!r}")
    if k > d_sae:
        raise ValueError(f"{cfg_file}: k={k} must be at most d_sae={d_sae}: the file is corrupt")
    k_max = raw.get("k_max") if activation == "batchtopk" else None
    if activation == "batchtopk" and (_as_int(k_max) is None or not k <= k_max <= d_sae):
        raise ValueError(f"{cfg_file}: k_max must be an int in [k, d_sae], got {k_max!r}")

    dtype = None
    if raw.get("dtype") is not None:
        dtype = getattr(torch, str(raw["dtype"]).removeprefix("torch."), None)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(
                f"{cfg_file}: dtype={raw['dtype']!r} is not a torch floating-point dtype "
                f"(e.g. {', '.join(_SAELENS_DTYPES)})"
            )

    prefix_sizes = prefix_weights = None
    if raw.get("matryoshka_widths") is not None:
        try:
            prefix_sizes, prefix_weights = _check_prefixes(
                d_sae, raw["matryoshka_widths"], raw.get("prefix_weights")
            )
        except (TypeError, ValueError) as err:
            raise ValueError(f"{cfg_file}: matryoshka_widths / prefix_weights: {err}") from None

    metadata = raw.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise ValueError(f"{cfg_file}: metadata must be a JSON object, got {metadata!r}")
    metadata = dict(metadata)
    metadata.setdefault("hook_name", raw.get("hook_name", raw.get("hook_point")))
    metadata.setdefault("model_name", raw.get("model_name"))
    for key in ("sparsecode_version", "activation_scale", "training_tokens"):
        if key in raw:
            metadata[key] = raw[key]
    return _FolderCfg(
        d_in=int(d_in),
        d_sae=int(d_sae),
        k=int(k),
        prefix_sizes=prefix_sizes,
        prefix_weights=prefix_weights,
        activation=activation,
        k_max=None if k_max is None else int(k_max),
        dtype=dtype,
        rescale_acts_by_decoder_norm=bool(raw.get("rescale_acts_by_decoder_norm", False)),
        apply_b_dec_to_input=bool(raw.get("apply_b_dec_to_input", True)),
        metadata=metadata,
    )


def _read_weights(weights_file: Path, cfg: _FolderCfg) -> dict[str, Tensor]:
    """The four tensors of weights_file, on the CPU as stored, checked against cfg."""
    try:
        tensors = safetensors.torch.load_file(weights_file)
    except safetensors.SafetensorError as err:
        raise ValueError(
            f"{weights_file} could not be read as safetensors ({err}): re-save the SAE"
        ) from None
    expected = {
        "W_enc": (cfg.d_in, cfg.d_sae),
        "W_dec": (cfg.d_sae, cfg.d_in),
        "b_enc": (cfg.d_sae,),
        "b_dec": (cfg.d_in,),
    }
    if cfg.activation == "batchtopk":
        expected["threshold"] = (cfg.d_sae,)
    if set(tensors) != set(expected):
        raise ValueError(
            f"{weights_file} holds tensors {sorted(tensors)}, but a {cfg.activation} SAE has "
            f"exactly {sorted(expected)}"
        )
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise ValueError(
                f"{weights_file}: {name} has shape {list(tensors[name].shape)}, but cfg.json "
                f"(d_in={cfg.d_in}, d_sae={cfg.d_sae}) needs {list(shape)}: cfg.json and the "
                "weights do not belong together; re-save the SAE"
            )
        if not tensors[name].dtype.is_floating_point:
            raise ValueError(f"{weights_file}: {name} has dtype {tensors[name].dtype}, not float")
    if cfg.activation == "batchtopk" and not bool((tensors["threshold"] == tensors["threshold"][0]).all()):
        raise ValueError(
            f"{weights_file}: a BatchTopK SAE has one threshold for every latent, but the stored "
            "thresholds differ: the file is a per-latent JumpReLU SAE, which sparsecode does not load"
        )
    return tensors
