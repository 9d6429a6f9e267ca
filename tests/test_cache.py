"""The activation cache: atomic shards, key checks, and the shuffled, resumable, per-rank stream."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sparsecode.cache import MANIFEST, ActivationCache, CacheWriter, fill_cache

KEY = {"model": "m", "hook": "blocks.0.hook_resid_post", "text": "t", "split": "train",
       "context_length": 8, "dtype": "float32"}


def _rows(start: int, count: int, d_model: int = 6) -> torch.Tensor:
    """Rows whose column 0 is their global id (exact in bfloat16 below 256)."""
    rows = torch.randn(count, d_model)
    rows[:, 0] = torch.arange(start, start + count, dtype=torch.float32)
    return rows


def _cache(tmp_path, shard_sizes, dtype="float32") -> ActivationCache:
    writer = CacheWriter(tmp_path, {**KEY, "dtype": dtype})
    start = 0
    for size in shard_sizes:
        writer.add_shard(_rows(start, size), contexts=size, skip_positions=1)
        start += size
    return ActivationCache.open(tmp_path)


def _ids(batch: torch.Tensor) -> list[int]:
    return batch[:, 0].round().long().tolist()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("buffer_rows", [1, 20, 1000])
def test_each_epoch_reads_every_row_once(tmp_path, dtype, buffer_rows):
    cache = _cache(tmp_path, [7, 13, 5, 11], dtype)
    assert cache.tokens == 36 and cache.d_model == 6 and cache.skip_positions == 1
    stream = cache.batches(4, seed=3, buffer_rows=buffer_rows)
    first = [i for _ in range(9) for i in _ids(next(stream))]
    second = [i for _ in range(9) for i in _ids(next(stream))]
    assert sorted(first) == list(range(36)) and sorted(second) == list(range(36))
    assert first != second, "each epoch must be shuffled anew"
    assert first != list(range(36)), "rows must be shuffled"


def test_rows_come_back_exactly(tmp_path):
    writer = CacheWriter(tmp_path, {**KEY, "dtype": "bfloat16"})
    data = _rows(0, 10)
    writer.add_shard(data, contexts=2, skip_positions=0)
    batch = next(ActivationCache.open(tmp_path).batches(10))
    order = batch[:, 0].long()
    assert batch.dtype == torch.float32
    assert torch.equal(batch, data[order].to(torch.bfloat16).float())


def test_same_seed_same_stream_and_other_seed_differs(tmp_path):
    cache = _cache(tmp_path, [10, 10, 10])
    take = lambda seed: [_ids(b) for b, _ in zip(cache.batches(5, seed=seed), range(12))]
    assert take(1) == take(1)
    assert take(1) != take(2)


@pytest.mark.parametrize("start", [0, 1, 5, 7, 13])
def test_resume_at_any_batch(tmp_path, start):
    cache = _cache(tmp_path, [9, 4, 12])
    full = [_ids(b) for b, _ in zip(cache.batches(6, seed=0, buffer_rows=10), range(20))]
    resumed = cache.batches(6, seed=0, buffer_rows=10, start_batch=start)
    assert [_ids(b) for b, _ in zip(resumed, range(20 - start))] == full[start:]


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_read_disjoint_rows_that_make_the_global_batch(tmp_path, world):
    cache = _cache(tmp_path, [9, 14, 8])
    batch = 6
    single = [_ids(b) for b, _ in zip(cache.batches(batch, seed=4, buffer_rows=12), range(15))]
    ranks = [
        [_ids(b) for b, _ in zip(cache.batches(batch, seed=4, buffer_rows=12, rank=r,
                                               world_size=world), range(15))]
        for r in range(world)
    ]
    for t in range(15):
        assert sum((ranks[r][t] for r in range(world)), []) == single[t]


def test_batch_must_split_over_ranks(tmp_path):
    cache = _cache(tmp_path, [8])
    with pytest.raises(ValueError, match="multiple of the number of ranks"):
        next(cache.batches(5, world_size=2))


def test_tokens_limits_the_shards_used(tmp_path):
    cache = _cache(tmp_path, [5, 5, 5])
    ids = {i for b, _ in zip(cache.batches(5, tokens=7), range(20)) for i in _ids(b)}
    assert ids == set(range(10))


def test_windows_respect_the_buffer(tmp_path, monkeypatch):
    cache = _cache(tmp_path, [4, 4, 4, 4, 4])
    seen = []
    gather = cache._gather
    monkeypatch.setattr(cache, "_gather", lambda w, s, c: seen.append(sum(s)) or gather(w, s, c))
    for _, _ in zip(cache.batches(2, buffer_rows=9), range(10)):
        pass
    assert seen and max(seen) <= 9


def test_key_mismatch_rebuilds(tmp_path):
    _cache(tmp_path, [5, 5])
    writer = CacheWriter(tmp_path, {**KEY, "hook": "blocks.1.hook_resid_post"})
    assert writer.tokens == 0
    assert not list(tmp_path.glob("shard_*"))
    assert not (tmp_path / MANIFEST).exists()


def test_same_key_keeps_shards_and_appends(tmp_path):
    _cache(tmp_path, [5, 5])
    writer = CacheWriter(tmp_path, KEY)
    assert writer.tokens == 10 and writer.contexts == 10
    writer.add_shard(_rows(10, 3), contexts=3, skip_positions=1)
    assert ActivationCache.open(tmp_path).tokens == 13


def test_half_written_and_unlisted_shards_are_never_used(tmp_path):
    _cache(tmp_path, [5])
    (tmp_path / "shard_00001.npy.tmp").write_bytes(b"partial")
    (tmp_path / "shard_00001.npy").write_bytes(b"written but never listed")
    writer = CacheWriter(tmp_path, KEY)
    assert writer.tokens == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == [MANIFEST, "shard_00000.npy"]
    writer.add_shard(_rows(5, 4), contexts=4, skip_positions=1)
    ids = {i for b, _ in zip(ActivationCache.open(tmp_path).batches(9), range(2)) for i in _ids(b)}
    assert ids == set(range(9))


def test_crash_while_writing_a_shard_keeps_the_manifest_consistent(tmp_path, monkeypatch):
    writer = CacheWriter(tmp_path, KEY)
    writer.add_shard(_rows(0, 5), contexts=5, skip_positions=1)

    def crash(handle, array):
        handle.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(np, "save", crash)
    with pytest.raises(OSError):
        writer.add_shard(_rows(5, 5), contexts=5, skip_positions=1)
    monkeypatch.undo()
    cache = ActivationCache.open(tmp_path)
    assert cache.tokens == 5 and len(cache.shards) == 1
    assert CacheWriter(tmp_path, KEY).tokens == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == [MANIFEST, "shard_00000.npy"]


def test_fill_cache_groups_chunks_into_shards(tmp_path):
    writer = CacheWriter(tmp_path, KEY)
    chunks = [(_rows(4 * i, 4), 2) for i in range(5)]
    fill_cache(writer, iter(chunks), lambda: 1, shard_tokens=8)
    cache = ActivationCache.open(tmp_path)
    assert [(s.rows, s.contexts) for s in cache.shards] == [(8, 4), (8, 4), (4, 2)]
    assert cache.contexts == 10 and cache.tokens == 20


def test_open_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not an activation cache"):
        ActivationCache.open(tmp_path)
    (tmp_path / MANIFEST).write_text(json.dumps({"format": 999}))
    with pytest.raises(ValueError, match="delete the folder"):
        ActivationCache.open(tmp_path)
    with pytest.raises(ValueError, match="dtype"):
        CacheWriter(tmp_path / "x", {**KEY, "dtype": "int8"})


# --- end to end with the default model (SmolLM2 through TransformerLens) on the BBC text ---


def test_ensure_cache_extracts_extends_and_rebuilds(tmp_path, monkeypatch):
    import sparsecode.lm as lm
    from sparsecode.cache import activation_key, ensure_cache
    from sparsecode.text import iter_contexts, iter_documents

    loads = []
    load_model = lm.load_model
    monkeypatch.setattr(lm, "load_model", lambda *a, **kw: loads.append(a) or load_model(*a, **kw))
    key = activation_key(model=lm.DEFAULT_MODEL, hook="blocks.2.hook_resid_post", text=None,
                         dataset=None, split="eval", context_length=16, dtype="float32")
    small = ensure_cache(key, 100, folder=tmp_path, progress=False)
    assert small.skip_positions == 1 and small.key == key and small.d_model == 576
    assert small.tokens >= 100 and small.contexts * 15 == small.tokens

    grown = ensure_cache(key, 300, folder=tmp_path, progress=False)
    assert grown.tokens >= 300 and grown.shards[0] == small.shards[0]
    again = ensure_cache(key, 300, folder=tmp_path, progress=False)
    assert len(loads) == 2 and again.tokens == grown.tokens  # reused: no model load

    model = load_model()
    contexts = iter_contexts(model.tokenizer, iter_documents(split="eval"), 16)
    expected = torch.cat(list(lm.extract_activations(
        model, "blocks.2.hook_resid_post", [c for c, _ in zip(contexts, range(grown.contexts))],
        progress=False,
    )))
    cached = torch.cat([grown._load_rows(s, np.arange(s.rows)) for s in grown.shards])
    torch.testing.assert_close(cached, expected, rtol=1e-5, atol=1e-4)

    other = ensure_cache({**key, "hook": "blocks.1.hook_resid_post"}, 50, folder=tmp_path,
                         progress=False)
    assert other.key["hook"] == "blocks.1.hook_resid_post" and other.tokens < grown.tokens
