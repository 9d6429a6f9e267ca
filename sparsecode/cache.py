"""Activation cache: a model's activations written once to disk and streamed back shuffled.

Layout of a cache folder:

    manifest.json        what the activations are (the key: model, hook, text, split,
                         context length, dtype), d_model, skip_positions, and the list of
                         complete shards with their row and context counts
    shard_00000.npy      [rows, d_model] activations, float32, or bfloat16 stored as uint16

Each shard is written to a temporary file, flushed, fsynced and renamed into place, and
the manifest (rewritten the same way) lists a shard only after that: a half-written
shard is never read. Extraction can therefore stop anywhere and go on later from the
next shard, and a cache can be extended to more tokens. A cache whose key differs from
the one asked for is deleted and rebuilt, never reused.

Reading (:meth:`ActivationCache.batches`) streams the rows in a shuffled order that is a
pure function of the seed: each epoch permutes the shards, groups consecutive shards into
windows of at most ``buffer_rows`` rows, and permutes the rows of each window. Only one
window's rows are in memory at a time. Global batch t is stream rows [t*B, (t+1)*B); with
``world_size`` ranks, rank r reads only its rows [t*B + r*b, t*B + (r+1)*b), b = B/world,
so the ranks read disjoint rows and together see exactly what one process with batch B
sees. Resuming at batch t recomputes the order without reading the skipped rows.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from sparsecode.files import atomic_write

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
_SHARD_PATTERN = re.compile(r"^shard_\d{5}\.npy(\.tmp)?$")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _write_json(path: Path, data: dict) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2) + "\n"))


def _stream_seed(*parts: int) -> int:
    """A 63-bit seed derived from parts (stable across processes and Python versions)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def key_digest(key: dict) -> str:
    """A short stable hash of a cache key (for default cache folder names)."""
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Shard:
    """One shard file: rows activations taken from contexts consecutive contexts."""

    file: str
    rows: int
    contexts: int


class ActivationCache:
    """A cache folder's manifest and a reader over its shards (see the module doc)."""

    def __init__(self, folder: Path, manifest: dict) -> None:
        self.folder = folder
        self.manifest = manifest
        self.key: dict = manifest["key"]
        self.d_model: int = manifest["d_model"]
        self.dtype: torch.dtype = _DTYPES[self.key["dtype"]]
        self.skip_positions: int = manifest["skip_positions"]
        self.exhausted: bool = manifest["exhausted"]
        self.shards = [Shard(**shard) for shard in manifest["shards"]]
        self.tokens = sum(shard.rows for shard in self.shards)
        self.contexts = sum(shard.contexts for shard in self.shards)

    @classmethod
    def open(cls, folder: str | os.PathLike) -> ActivationCache:
        """The cache in folder; FileNotFoundError when it has no manifest."""
        folder = Path(folder)
        path = folder / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(
                f"{folder} is not an activation cache (no {MANIFEST}): build one with "
                "sparsecode train (or sparsecode.cache.ensure_cache)"
            )
        manifest = json.loads(path.read_text())
        if manifest.get("format") != FORMAT_VERSION:
            raise ValueError(
                f"{path} has cache format {manifest.get('format')!r}, this sparsecode reads "
                f"{FORMAT_VERSION}: delete the folder to rebuild it"
            )
        return cls(folder, manifest)

    def _load_rows(self, shard: Shard, rows: np.ndarray) -> Tensor:
        """rows (sorted int64) of shard as a [len(rows), d_model] tensor in the cache dtype."""
        array = np.load(self.folder / shard.file, mmap_mode="r")
        taken = torch.from_numpy(np.ascontiguousarray(array[rows]))
        return taken.view(torch.bfloat16) if self.dtype == torch.bfloat16 else taken

    def _windows(self, order: list[int], buffer_rows: int) -> list[list[int]]:
        windows: list[list[int]] = []
        rows = 0
        for index in order:
            if windows and rows + self.shards[index].rows <= buffer_rows:
                windows[-1].append(index)
                rows += self.shards[index].rows
            else:
                windows.append([index])
                rows = self.shards[index].rows
        return windows

    def batches(
        self,
        batch_size: int,
        *,
        seed: int = 0,
        start_batch: int = 0,
        rank: int = 0,
        world_size: int = 1,
        buffer_rows: int = 1 << 18,
        tokens: int | None = None,
    ) -> Iterator[Tensor]:
        """Endless float32 batches [batch_size // world_size, d_model] for this rank (each a
        fresh tensor the caller may modify).

        batch_size: the global batch (a multiple of world_size). start_batch: the global
        batch to start from (to resume). buffer_rows: most rows of one window (memory bound
        is buffer_rows / world_size rows). tokens: use only the first shards holding at
        least this many rows (default all).
        """
        if batch_size < 1 or batch_size % world_size:
            raise ValueError(
                f"batch_size={batch_size} must be a positive multiple of the number of "
                f"ranks ({world_size})"
            )
        if not self.shards:
            raise ValueError(f"the cache in {self.folder} holds no activations")
        shards = len(self.shards)
        if tokens is not None:
            total = 0
            for shards, shard in enumerate(self.shards, start=1):
                total += shard.rows
                if total >= tokens:
                    break
        local = batch_size // world_size
        epoch_rows = sum(shard.rows for shard in self.shards[:shards])
        position = start_batch * batch_size  # global stream position of the next row
        epoch = position // epoch_rows
        pending: list[Tensor] = []
        pending_rows = 0
        while True:
            generator = torch.Generator().manual_seed(_stream_seed(seed, epoch))
            order = torch.randperm(shards, generator=generator).tolist()
            window_start = epoch * epoch_rows
            for number, window in enumerate(self._windows(order, buffer_rows)):
                sizes = [self.shards[i].rows for i in window]
                rows = sum(sizes)
                window_end = window_start + rows
                if window_end <= position:
                    window_start = window_end
                    continue
                generator.manual_seed(_stream_seed(seed, epoch, number))
                permutation = torch.randperm(rows, generator=generator)
                stream = torch.arange(window_start, window_end)
                mine = (stream >= position) & ((stream % batch_size) // local == rank)
                chosen = permutation[mine]
                pending.append(self._gather(window, sizes, chosen))
                pending_rows += pending[-1].shape[0]
                position = window_end
                window_start = window_end
                if pending_rows >= local:
                    data = torch.cat(pending) if len(pending) > 1 else pending[0]
                    for start in range(0, data.shape[0] - local + 1, local):
                        yield data[start : start + local].to(torch.float32, copy=True)
                    tail = data.shape[0] % local
                    pending = [data[data.shape[0] - tail :]] if tail else []
                    pending_rows = tail
            epoch += 1

    def _gather(self, window: list[int], sizes: list[int], chosen: Tensor) -> Tensor:
        """Rows chosen (window-local ids, in stream order) of the shards in window."""
        out = torch.empty(chosen.numel(), self.d_model, dtype=self.dtype)
        offsets = np.cumsum([0] + sizes)
        ids = chosen.numpy()
        for slot, index in enumerate(window):
            inside = np.nonzero((ids >= offsets[slot]) & (ids < offsets[slot + 1]))[0]
            if inside.size == 0:
                continue
            local = ids[inside] - offsets[slot]
            order = np.argsort(local, kind="stable")
            rows = self._load_rows(self.shards[index], local[order])
            out[torch.from_numpy(inside[order])] = rows
        return out


class CacheWriter:
    """Appends shards to a cache folder for one key, deleting a cache with another key.

    key: what the activations are (JSON-serialisable dict with at least "dtype").
    """

    def __init__(self, folder: str | os.PathLike, key: dict) -> None:
        if key.get("dtype") not in _DTYPES:
            raise ValueError(f"cache dtype must be one of {sorted(_DTYPES)}, got {key.get('dtype')!r}")
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.manifest = {
            "format": FORMAT_VERSION,
            "key": key,
            "d_model": None,
            "skip_positions": None,
            "exhausted": False,
            "shards": [],
        }
        path = self.folder / MANIFEST
        existing = json.loads(path.read_text()) if path.is_file() else None
        if (
            existing is not None
            and existing.get("format") == FORMAT_VERSION
            and existing["key"] == key
        ):
            self.manifest = existing
        else:
            self._clear()
        self._remove_unlisted()

    def _clear(self) -> None:
        (self.folder / MANIFEST).unlink(missing_ok=True)
        for path in self.folder.iterdir():
            if _SHARD_PATTERN.match(path.name):
                path.unlink()

    def _remove_unlisted(self) -> None:
        listed = {shard["file"] for shard in self.manifest["shards"]}
        for path in self.folder.iterdir():
            if _SHARD_PATTERN.match(path.name) and path.name not in listed:
                path.unlink()

    @property
    def tokens(self) -> int:
        """Rows in the complete shards."""
        return sum(shard["rows"] for shard in self.manifest["shards"])

    @property
    def contexts(self) -> int:
        """Contexts the complete shards were extracted from."""
        return sum(shard["contexts"] for shard in self.manifest["shards"])

    def add_shard(self, activations: Tensor, contexts: int, skip_positions: int) -> None:
        """Write activations [rows, d_model] (from contexts contexts) as the next shard."""
        dtype = _DTYPES[self.manifest["key"]["dtype"]]
        data = activations.detach().to("cpu", dtype).contiguous()
        array = data.view(torch.uint16).numpy() if dtype == torch.bfloat16 else data.numpy()
        name = f"shard_{len(self.manifest['shards']):05d}.npy"

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as handle:
                np.save(handle, array)

        atomic_write(self.folder / name, write)
        self.manifest["skip_positions"] = skip_positions
        self.manifest["d_model"] = data.shape[1]
        self.manifest["shards"].append({"file": name, "rows": data.shape[0], "contexts": contexts})
        _write_json(self.folder / MANIFEST, self.manifest)

    def mark_exhausted(self) -> None:
        """Record that the text has no more contexts (the cache cannot grow)."""
        self.manifest["exhausted"] = True
        _write_json(self.folder / MANIFEST, self.manifest)


def fill_cache(
    writer: CacheWriter,
    chunks: Iterable[tuple[Tensor, int]],
    skip_positions: Callable[[], int],
    *,
    shard_tokens: int = 1 << 16,
) -> None:
    """Append chunks to writer's cache, one shard per about shard_tokens rows.

    chunks: (activations [rows, d_model], number of contexts they come from), in context
    order, starting at the first context not yet in the cache. skip_positions() -> the
    leading positions of each context left out of the activations (recorded in the
    manifest; asked after the first chunk, when an extractor has decided it).
    """
    pending: list[Tensor] = []
    rows = contexts = 0
    for activations, n_contexts in chunks:
        pending.append(activations)
        rows += activations.shape[0]
        contexts += n_contexts
        if rows >= shard_tokens:
            writer.add_shard(torch.cat(pending), contexts, skip_positions())
            pending, rows, contexts = [], 0, 0
    if pending:
        writer.add_shard(torch.cat(pending), contexts, skip_positions())


def sparsecode_home() -> Path:
    """Where sparsecode keeps caches: $SPARSECODE_HOME, else ~/.cache/sparsecode."""
    return Path(os.environ.get("SPARSECODE_HOME", Path.home() / ".cache" / "sparsecode"))


def activation_key(
    *,
    model: str,
    hook: str,
    text: str | os.PathLike | None,
    dataset: str | None,
    split: str,
    context_length: int,
    dtype: str,
) -> dict:
    """The key that says which activations a cache holds."""
    from sparsecode.text import text_fingerprint

    return {
        "model": model,
        "hook": hook,
        "text": text_fingerprint(text, dataset),
        "split": split,
        "context_length": context_length,
        "dtype": dtype,
    }


def ensure_cache(
    key: dict,
    tokens: int,
    *,
    folder: str | os.PathLike | None = None,
    text: str | os.PathLike | None = None,
    dataset: str | None = None,
    device: str = "cpu",
    batch_size: int = 16,
    progress: bool = True,
) -> ActivationCache:
    """The cache for key holding at least tokens activations (fewer when the text runs out),
    extracting what is missing with the model and text the key names.

    folder: default sparsecode_home()/activations/<key digest>. text, dataset: the source
    the key's fingerprint was made from (see sparsecode.text).
    """
    folder = Path(folder) if folder is not None else sparsecode_home() / "activations" / key_digest(key)
    writer = CacheWriter(folder, key)
    if writer.tokens < tokens and not writer.manifest["exhausted"]:
        _extract_into(writer, tokens, text, dataset, device, batch_size, progress)
    return ActivationCache.open(folder)


def _extract_into(
    writer: CacheWriter,
    tokens: int,
    text: str | os.PathLike | None,
    dataset: str | None,
    device: str,
    batch_size: int,
    progress: bool,
) -> None:
    """Run the key's model on the contexts not yet in writer's cache until it holds tokens rows."""
    from sparsecode.lm import extract_activations, load_model
    from sparsecode.text import iter_contexts, iter_documents

    key = writer.manifest["key"]
    model = load_model(key["model"], device=device)
    length = key["context_length"]
    contexts = iter_contexts(model.tokenizer, iter_documents(text, dataset, key["split"]), length)
    for _ in range(writer.contexts):  # already extracted
        if next(contexts, None) is None:
            break
    known_skip = writer.manifest["skip_positions"]
    rows_per_context = length - (known_skip if known_skip is not None else 1)
    wanted = math.ceil((tokens - writer.tokens) / max(1, rows_per_context))
    todo = [context for _, context in zip(range(wanted), contexts)]
    stream = extract_activations(
        model, key["hook"], todo, batch_size=batch_size,
        skip_positions=known_skip, progress=progress,
    )

    def chunks() -> Iterator[tuple[Tensor, int]]:
        for activations in stream:
            yield activations, activations.shape[0] // (length - stream.skip_positions)

    fill_cache(writer, chunks(), lambda: stream.skip_positions)
    if len(todo) < wanted:
        writer.mark_exhausted()
