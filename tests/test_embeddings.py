"""The embedding cache: large fixed text lists are encoded once per machine, read back by later processes."""

from __future__ import annotations

import numpy as np

from makd import embeddings


def test_cached_embeddings_are_read_back_and_a_damaged_entry_is_encoded_again(tmp_path, monkeypatch):
    monkeypatch.setenv("MAKD_CACHE", str(tmp_path))
    calls = []

    def fake_encode(texts, device):
        calls.append(list(texts))
        return np.arange(len(texts) * 384, dtype=np.float32).reshape(len(texts), 384) + len(calls)

    monkeypatch.setattr(embeddings, "_encode", fake_encode)
    first = embeddings.encode(["a photo of a cat", "a photo of a dog"], cached=True)
    again = embeddings.encode(["a photo of a cat", "a photo of a dog"], cached=True)
    assert len(calls) == 1 and np.array_equal(first, again)
    (entry,) = (tmp_path / "embeddings").glob("*.npy")
    other = embeddings.encode(["a photo of a cat"], cached=True)  # other texts: another entry
    assert len(calls) == 2 and len(list((tmp_path / "embeddings").glob("*.npy"))) == 2 and other.shape == (1, 384)
    embeddings.encode(["a photo of a cat", "a photo of a dog"], device="cuda:1", cached=True)  # another device type
    assert len(calls) == 3
    entry.write_bytes(b"not an array")
    repaired = embeddings.encode(["a photo of a cat", "a photo of a dog"], cached=True)
    assert len(calls) == 4 and np.array_equal(repaired, np.load(entry, allow_pickle=False))
    assert embeddings.encode(["x"]) is not None and len(calls) == 5  # not cached unless asked


def test_an_unwritable_cache_only_costs_time(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("MAKD_CACHE", str(tmp_path / "file"))  # a file where the folder should be
    monkeypatch.setattr(embeddings, "_encode", lambda texts, device: np.ones((len(texts), 384), np.float32))
    assert embeddings.encode(["a", "b"], cached=True).shape == (2, 384)  # no error: the cache is an optimisation
    assert list(tmp_path.iterdir()) == [tmp_path / "file"]
