"""GGUF conversions kept in makd's cache: converted once, reused while the file is unchanged, never trusted blindly.

A stand-in loader (a tokenizer-like object that saves itself) keeps these tests fast; the real SmolLM2 GGUF goes
through the cache in tests/test_question_generation.py.
"""

from __future__ import annotations

import logging
import os

import pytest
from conftest import dead_pid

from makd.atomic import HOST, atomic_folder
from makd.clients import gguf_cache
from makd.errors import OutputError


class Loaded:
    def __init__(self, value: str) -> None:
        self.value = value

    def save_pretrained(self, folder: str) -> None:
        with open(os.path.join(folder, "vocab.txt"), "w") as f:
            f.write(self.value)


class StandInLoader:
    """from_pretrained(folder, gguf_file=...) "converts" the GGUF (its text); from_pretrained(entry) reads the entry."""

    calls: list[tuple[str, dict]] = []

    @classmethod
    def from_pretrained(cls, path: str, **kwargs):
        cls.calls.append((path, kwargs))
        if "gguf_file" in kwargs:
            return Loaded(open(os.path.join(path, kwargs["gguf_file"])).read())
        return Loaded(open(os.path.join(path, "vocab.txt")).read())  # OSError when the entry lacks it


@pytest.fixture
def gguf(tmp_path, monkeypatch):
    monkeypatch.setenv("MAKD_CACHE", str(tmp_path / "cache"))
    StandInLoader.calls = []
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "m.gguf").write_text("vocab-1")
    return folder


def conversions() -> int:
    return sum("gguf_file" in kwargs for _, kwargs in StandInLoader.calls)


def test_converted_once_then_loaded_from_the_entry(gguf, tmp_path):
    assert gguf_cache.load_gguf(StandInLoader, str(gguf), "m.gguf", dtype="float32").value == "vocab-1"
    again = gguf_cache.load_gguf(StandInLoader, str(gguf), "m.gguf", dtype="float32")
    assert again.value == "vocab-1" and conversions() == 1
    entry, kwargs = StandInLoader.calls[-1]
    assert entry.startswith(str(tmp_path / "cache" / "gguf")) and kwargs == {"local_files_only": True, "trust_remote_code": False, "dtype": "float32"}
    # Another dtype is another entry.
    gguf_cache.load_gguf(StandInLoader, str(gguf), "m.gguf", dtype="bfloat16")
    assert conversions() == 2 and len(list((tmp_path / "cache" / "gguf").iterdir())) == 2


def test_a_changed_gguf_file_is_converted_again(gguf):
    gguf_cache.load_gguf(StandInLoader, str(gguf), "m.gguf")
    (gguf / "m.gguf").write_text("vocab-2, longer")
    assert gguf_cache.load_gguf(StandInLoader, str(gguf), "m.gguf").value == "vocab-2, longer"
    assert conversions() == 2


def test_placement_arguments_bypass_the_cache(gguf, tmp_path):
    gguf_cache.load_gguf(StandInLoader, str(gguf), "m.gguf", device_map="auto")
    gguf_cache.load_gguf(StandInLoader, str(gguf), "m.gguf", device_map="auto")
    assert conversions() == 2 and not (tmp_path / "cache").exists()


def test_an_unreadable_entry_is_converted_again(gguf, caplog):
    gguf_cache.load_gguf(StandInLoader, str(gguf), "m.gguf")
    (entry,) = (gguf.parent / "cache" / "gguf").iterdir()
    (entry / "vocab.txt").unlink()
    with caplog.at_level(logging.WARNING, "makd.gguf"):
        assert gguf_cache.load_gguf(StandInLoader, str(gguf), "m.gguf").value == "vocab-1"
    assert conversions() == 2 and "unreadable" in caplog.text and (entry / "vocab.txt").read_text() == "vocab-1"


def test_an_unwritable_cache_costs_the_conversion_not_the_run(gguf, monkeypatch, caplog):
    (gguf.parent / "file").write_text("")
    monkeypatch.setenv("MAKD_CACHE", str(gguf.parent / "file"))
    with caplog.at_level(logging.WARNING, "makd.gguf"):
        assert gguf_cache.load_gguf(StandInLoader, str(gguf), "m.gguf").value == "vocab-1"
    assert "not cached" in caplog.text and "file is a file, not a folder" in caplog.text


def test_a_killed_conversion_is_cleaned_up_by_the_next(gguf, tmp_path):
    left = tmp_path / "cache" / "gguf" / f".0123abcd.{HOST}-{dead_pid()}.a1b2c3d4.tmp"
    left.mkdir(parents=True)
    (left / "model.safetensors").write_bytes(b"partial")
    gguf_cache.load_gguf(StandInLoader, str(gguf), "m.gguf")
    assert not left.exists() and len(list(left.parent.iterdir())) == 1


def test_atomic_folder_keeps_nothing_of_a_failed_block_and_a_finished_writers_folder(tmp_path):
    with pytest.raises(RuntimeError), atomic_folder(tmp_path / "entry") as tmp:
        (tmp / "half").write_text("x")
        raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "entry").mkdir()  # an empty folder is replaced
    with atomic_folder(tmp_path / "entry") as tmp:
        (tmp / "a").write_text("first")
    with atomic_folder(tmp_path / "entry") as tmp:  # another writer's finished folder is kept
        (tmp / "a").write_text("second")
    assert [p.name for p in tmp_path.iterdir()] == ["entry"] and (tmp_path / "entry" / "a").read_text() == "first"
    (tmp_path / "blocker").write_text("")
    with pytest.raises(OutputError, match=r"^cannot write .*blocker/x: .*blocker is a file, not a folder$"):
        with atomic_folder(tmp_path / "blocker" / "x"):
            pass
