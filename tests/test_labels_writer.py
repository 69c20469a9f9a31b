"""The public writer (any backend lands rows through it), unreadable images recorded and skipped, the image listing
shared by workers, `makd labels status`, and the store's one-line errors (extra or null values, another teacher or
sample list on resume)."""

from __future__ import annotations

import json
import os
import re
import shutil
import time

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from conftest import PixelTeacher, make_question_set

from makd.cli import main
from makd.config import load_config
from makd.data.base import file_split
from makd.errors import MakdError
from makd.labels import LabelStore, LabelWriter, label_from_config, label_split
from makd.labels.leases import LEASE_DIR, LeaseBoard
from makd.labels.listing import LISTING_FILE, listed_ids
from makd.labels.store import TABLE_FILE, shard_name

TEACHER = {"name": "made-up", "model": "org/vlm-8b", "prompt": "{question} Answer with Yes or No."}


def made_up_rows(ids, q, seed=0):
    rng = np.random.default_rng([seed, len(ids)])
    logodds = rng.normal(size=(len(ids), q)).astype(np.float32)
    mass = rng.uniform(0.5, 1.0, size=(len(ids), q)).astype(np.float32)
    flags = rng.integers(0, 4, size=(len(ids), q)).astype(np.uint8)
    return logodds, mass, flags


def one_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.startswith("makd: error:")]
    assert len(lines) == 1 and text.strip().count("\n") == 0, text
    return lines[0]


# -- the public writer ----------------------------------------------------------------------------------------------
def test_the_writer_lands_any_backends_rows_resumably_with_flags_and_skipped_samples(tmp_path):
    questions = make_question_set(["cat", "dog"], n=3)
    ids = [f"img/{i:03d}.jpg" for i in range(10)]
    writer = LabelWriter.open(tmp_path / "s", questions, TEACHER, ids, shard_size=4)
    assert writer.num_shards == 3 and writer.shard_ids(2) == ids[8:]
    shards = writer.claim_shards()
    first = next(shards)
    logodds, mass, flags = made_up_rows(writer.shard_ids(first), 3)
    writer.write_shard(first, writer.shard_ids(first), logodds, mass, flags)
    shards.close()  # the backend stops here (killed, out of time...)
    assert writer.missing_shards() == [1, 2] and not (tmp_path / "s" / LEASE_DIR / "shard-00000.0.lease").exists()

    resumed = LabelWriter.open(tmp_path / "s", questions, TEACHER, ids, shard_size=4)
    expected = {first: (logodds, mass, flags)}
    for index in resumed.claim_shards():
        assert index != first  # what was written is not redone
        done = [sid for sid in resumed.shard_ids(index) if sid != "img/005.jpg"]
        expected[index] = made_up_rows(done, 3, seed=index)
        resumed.write_shard(index, done, *expected[index], skipped={"img/005.jpg": "cannot decode:\n truncated"}
                            if index == 1 else None)
    store = resumed.finish()
    got_ids, got_logodds, got_mass = store.read()
    assert got_ids == [sid for sid in ids if sid != "img/005.jpg"]
    np.testing.assert_array_equal(got_logodds, np.concatenate([expected[i][0] for i in range(3)]))
    np.testing.assert_array_equal(got_mass, np.concatenate([expected[i][1] for i in range(3)]))
    np.testing.assert_array_equal(store.read_flags(), np.concatenate([expected[i][2] for i in range(3)]))
    assert [(s.position, s.sample_id, s.reason) for s in store.skipped()] == [(5, "img/005.jpg", "cannot decode: truncated")]
    assert store.meta["teacher"] == TEACHER and listed_ids(store.path) == ids
    coverage = store.check()
    assert coverage.complete and "img/005.jpg: cannot decode: truncated" in coverage.report()
    with pytest.raises(MakdError, match=r"sample 'img/005.jpg' has no row .*: its image could not be read when it was "
                                        r"labelled \(cannot decode: truncated\); 1 of 2 samples skipped so .*--retry-skipped"):
        store.lookup(["img/004.jpg", "img/005.jpg"])
    positions, rows, _ = store.available(["img/005.jpg", "img/006.jpg"])
    assert positions.tolist() == [1] and np.array_equal(rows, got_logodds[[5]])
    # Other tools read the shards as plain Parquet, the skipped sample in the file's metadata.
    frame = pd.read_parquet(tmp_path / "s" / shard_name(1))
    assert list(frame.sample_id) == ["img/004.jpg", "img/006.jpg", "img/007.jpg"]
    assert b"img/005.jpg" in pq.read_schema(tmp_path / "s" / shard_name(1)).metadata[b"makd.skipped"]


def test_a_shard_whose_only_sample_was_skipped_holds_no_rows_and_the_store_still_reads(tmp_path):
    questions = make_question_set(["cat", "dog"], n=2)
    ids = ["a", "b", "c"]
    writer = LabelWriter.open(tmp_path / "s", questions, TEACHER, ids, shard_size=2)
    logodds, mass, flags = made_up_rows(ids[:2], 2)
    writer.write_shard(0, ids[:2], logodds, mass, flags)
    empty = np.zeros((0, 2), np.float32)
    writer.write_shard(1, [], empty, empty, skipped={"c": "truncated file"})  # no flags: nothing to flag
    store = writer.finish()
    assert store.read()[0] == ["a", "b"] and store.read_flags().shape == (2, 2)
    assert [s.sample_id for s in store.skipped()] == ["c"] and store.check().complete


def test_the_writer_refuses_rows_that_do_not_fit_before_writing_anything(tmp_path):
    questions = make_question_set(["cat", "dog"], n=3)
    ids = [f"img/{i}" for i in range(6)]
    writer = LabelWriter.open(tmp_path / "s", questions, TEACHER, ids, shard_size=3)
    logodds, mass, _ = made_up_rows(ids[:3], 3)
    with pytest.raises(MakdError, match=r"shard-00000.parquet: row 1 is for 'img/2', expected 'img/1' \(3 rows for 3 "
                                        r"samples\): rows follow shard_ids\(0\), without the skipped samples"):
        writer.write_shard(0, ["img/0", "img/2", "img/1"], logodds, mass)
    with pytest.raises(MakdError, match=r"row 2 is for nothing, expected 'img/2' \(2 rows for 3 samples\)"):
        writer.write_shard(0, ids[:2], logodds[:2], mass[:2])
    with pytest.raises(MakdError, match=r"mass has shape \(3, 2\), expected \(3, 3\) = \(rows, questions\)"):
        writer.write_shard(0, ids[:3], logodds, mass[:, :2])
    with pytest.raises(MakdError, match="skipped sample 'img/4' is not one of this shard's samples"):
        writer.write_shard(0, ids[:3], logodds, mass, skipped={"img/4": "?"})
    spoiled = logodds.copy()
    spoiled[2, 1] = np.inf
    with pytest.raises(MakdError, match=r"^teacher made-up returned targets a label store cannot hold \(not written\): "
                                        r"shard-00000.parquet: sample 'img/2', question q1: log-odds inf"):
        writer.write_shard(0, ids[:3], spoiled, mass)
    assert writer.missing_shards() == [0, 1] and not list((tmp_path / "s").glob(".*.tmp"))
    with pytest.raises(MakdError, match="sample id 'a' occurs twice in the sample list"):
        LabelWriter.open(tmp_path / "t", questions, TEACHER, ["a", "b", "a"])
    with pytest.raises(MakdError, match="teacher must be a provenance mapping with a 'name'"):
        LabelWriter.open(tmp_path / "t", questions, {"model": "x"}, ids)


# -- resuming with something else: one line naming the difference and the fix --------------------------------------
def test_resuming_with_another_teacher_or_sample_list_names_what_differs(tmp_path, tiny_imagefolder, capsys):
    qs = make_question_set(["Sandal", "T-shirt_top", "Trouser"], n=2)
    qs.save(tmp_path / "q.json")
    config = [f"questions={tmp_path / 'q.json'}", "data.dataset=imagefolder", f"data.root={tiny_imagefolder}",
              "data.train_per_class=4", "data.val_per_class=2", "labels.splits=[train]"]
    ids = label_from_config.__globals__["samples_to_label"](load_config(overrides=config)).sample_ids
    (tmp_path / "a.json").write_text(json.dumps({sid: [0.25, 0.75] for sid in ids}))
    (tmp_path / "b.json").write_text(json.dumps({sid: [0.5, 0.5] for sid in ids}))
    store = tmp_path / "labels"
    assert main(["labels", "import", "--json", str(tmp_path / "a.json"), "-o", str(store), *config]) == 0
    capsys.readouterr()
    assert main(["labels", "import", "--json", str(tmp_path / "b.json"), "-o", str(store), *config]) == 2
    err = one_line(capsys.readouterr().err)
    assert (f"label store {store} was started with another teacher: 2 setting(s) differ, first teacher.sha256 (" in err
            and "in the store" in err and "now): label into another folder (labels.path=...), or --overwrite to "
            "discard it, or resume with the teacher settings it was made with" in err)
    assert main(["labels", "import", "--json", str(tmp_path / "a.json"), "-o", str(store), *config,
                 "data.split_seed=5"]) == 2
    err = one_line(capsys.readouterr().err)
    assert f"label store {store} was started with another sample list: 12 samples there, " in err
    assert f"; sample 0 is {ids[0]!r} there, 'train/" in err
    assert err.endswith("resume with the data and labels.splits/max_per_class it was made with")


# -- values that do not fit the question set ------------------------------------------------------------------------
def test_rows_with_extra_or_missing_values_are_one_line_errors(tmp_path, fmnist_test, capsys):
    split = fmnist_test.subset(np.arange(8), "part")
    store = label_split(split, PixelTeacher(), make_question_set(split.class_names, n=3), tmp_path / "s",
                        shard_size=4, progress=False)
    expected = store.read()[1].copy()
    (tmp_path / "s" / TABLE_FILE).unlink()
    written = pq.read_table(tmp_path / "s" / shard_name(1)).to_pandas()
    # Rewritten by pandas (large strings, lists of doubles): the same values, read in the store's types.
    written.to_parquet(tmp_path / "s" / shard_name(1))
    np.testing.assert_array_equal(LabelStore.open(tmp_path / "s").read()[1], expected)
    (tmp_path / "s" / TABLE_FILE).unlink()

    extra = written.assign(mass=[list(row) + [0.5, 0.5] for row in written.mass])
    extra.to_parquet(tmp_path / "s" / shard_name(1))
    assert main(["labels", "check", str(tmp_path / "s")]) == 1
    assert ("shard-00001.parquet: sample 'test/4' has 5 mass values, but labels.json lists 3 questions (2 value(s) "
            "after the last question q2; 4 such row(s))") in capsys.readouterr().out
    with pytest.raises(MakdError, match=r"^label store .*: shard-00001.parquet: sample 'test/4' has 5 mass values"):
        LabelStore.open(tmp_path / "s").read()
    nulls = written.assign(logodds=[[None if (k, j) == (2, 1) else v for j, v in enumerate(row)]
                                    for k, row in enumerate(written.logodds)])
    nulls.to_parquet(tmp_path / "s" / shard_name(1))
    assert main(["labels", "check", str(tmp_path / "s")]) == 1
    assert "shard-00001.parquet: sample 'test/6' has no logodds for question q1" in capsys.readouterr().out
    assert main(["labels", "export", str(tmp_path / "s"), "-o", str(tmp_path / "o.json")]) == 2
    assert "shard-00001.parquet: sample 'test/6' has no logodds for question q1" in one_line(capsys.readouterr().err)


# -- unreadable images ----------------------------------------------------------------------------------------------
def test_an_unreadable_image_is_recorded_and_skipped_then_labelled_once_repaired(tmp_path, tiny_imagefolder):
    root = tmp_path / "data"
    shutil.copytree(tiny_imagefolder, root)
    paths = sorted((root / "test").rglob("*.png"))
    split = file_split("test", root, paths, [0] * len(paths), ["Sandal", "T-shirt_top", "Trouser"], "imagefolder")
    good = paths[4].read_bytes()
    paths[4].write_bytes(b"not an image at all")
    qs = make_question_set(split.class_names, n=2)
    store = label_split(split, PixelTeacher(batch_size=2), qs, tmp_path / "s", shard_size=3, progress=False)
    assert store.check().complete
    [skipped] = store.skipped()
    assert (skipped.position, skipped.sample_id) == (4, split.sample_ids[4])
    assert skipped.reason == f"cannot read image {paths[4]}: not an image, or a corrupt one"
    ids = store.read()[0]
    assert ids == split.sample_ids[:4] + split.sample_ids[5:]
    # A rerun does nothing; --retry-skipped after the repair labels the sample, and only its shard is redone.
    teacher = PixelTeacher()
    label_split(split, teacher, qs, tmp_path / "s", shard_size=3, progress=False)
    assert teacher.calls == 0
    paths[4].write_bytes(good)
    mtimes = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "s").glob("shard-*")}
    store = label_split(split, teacher, qs, tmp_path / "s", shard_size=3, progress=False, retry_skipped=True)
    assert teacher.calls == 1 and store.skipped() == [] and store.read()[0] == split.sample_ids
    assert [n for n, t in mtimes.items() if (tmp_path / "s" / n).stat().st_mtime_ns != t] == [shard_name(1)]
    reference = label_split(split, PixelTeacher(), qs, tmp_path / "ref", shard_size=3, progress=False)
    np.testing.assert_array_equal(store.read()[1], reference.read()[1])

    # A shard none of whose images can be read is a missing dataset, not a corrupt image: the job stops.
    for path in paths[6:9]:
        path.unlink()
    with pytest.raises(MakdError, match=r"none of the 3 images of shard-00002.parquet could be read \(test/.*image not "
                                        r"found.*\): is the dataset where the config says\?"):
        label_split(split, PixelTeacher(), qs, tmp_path / "t", shard_size=3, progress=False)
    assert LabelStore.open(tmp_path / "t").missing_shards() == [2]


# -- the image listing shared by workers ----------------------------------------------------------------------------
def test_workers_read_the_stores_image_listing_until_the_images_change(tmp_path, tiny_imagefolder, monkeypatch):
    root = tmp_path / "data"
    shutil.copytree(tiny_imagefolder, root)
    qs = make_question_set(["Sandal", "T-shirt_top", "Trouser"], n=2)
    qs.save(tmp_path / "q.json")
    overrides = [f"questions={tmp_path / 'q.json'}", "data.dataset=imagefolder", f"data.root={root}",
                 "data.val_per_class=1", f"labels.path={tmp_path / 'labels'}", "labels.shard_size=4",
                 "labels.splits=[train,test]", "train.progress=false"]
    monkeypatch.setattr("makd.labels.job.build_teacher", lambda options: PixelTeacher())
    listed = []
    real = label_from_config.__globals__["build_splits"]
    monkeypatch.setattr("makd.labels.job.build_splits", lambda *a, **k: listed.append(1) or real(*a, **k))
    store = label_from_config(load_config(overrides=overrides))
    assert listed == [1] and (tmp_path / "labels" / LISTING_FILE).is_file()
    ids = store.read()[0]
    assert listed_ids(tmp_path / "labels") == ids and len(ids) == 15 + 9

    # Another worker (or a rerun): the listing, not the images.
    assert label_from_config(load_config(overrides=[*overrides, "data.num_workers=0"])).read()[0] == ids
    assert listed == [1]
    # Another config: listed again (and refused, since the store holds other samples).
    with pytest.raises(MakdError, match="another sample list: 24 samples there, 21 now"):
        label_from_config(load_config(overrides=[*overrides, "data.val_per_class=2"]))
    assert listed == [1, 1]
    # An image added to a class folder: listed again, and resuming is refused naming the first difference.
    shutil.copy(root / "train" / "Trouser" / sorted((root / "train" / "Trouser").iterdir())[0].name,
                root / "train" / "Trouser" / "img0-copy.png")
    with pytest.raises(MakdError, match=r"another sample list: 24 samples there, 25 now; sample \d+ is 'train/Trouser/.*' "
                                        r"there, 'train/Trouser/img0-copy.png' now"):
        label_from_config(load_config(overrides=overrides))
    assert listed == [1, 1, 1]


class ClosingTeacher(PixelTeacher):
    closed = 0

    def close(self):
        self.closed += 1


def test_label_from_config_closes_the_teacher_it_built_even_when_labelling_fails(tmp_path, tiny_imagefolder,
                                                                                  monkeypatch):
    make_question_set(["Sandal", "T-shirt_top", "Trouser"], n=2).save(tmp_path / "q.json")
    config = load_config(overrides=[f"questions={tmp_path / 'q.json'}", "data.dataset=imagefolder",
                                    f"data.root={tiny_imagefolder}", f"labels.path={tmp_path / 'labels'}",
                                    "data.num_workers=0", "train.progress=false"])
    built = [ClosingTeacher(fail_after_calls=0), ClosingTeacher()]  # the first one fails
    monkeypatch.setattr("makd.labels.job.build_teacher", lambda options, teachers=iter(built): next(teachers))
    with pytest.raises(RuntimeError, match="simulated crash"):
        label_from_config(config)
    assert len(label_from_config(config).read()[0]) > 0
    assert [t.closed for t in built] == [1, 1]


# -- progress across workers ----------------------------------------------------------------------------------------
def test_labels_status_shows_done_leased_and_left_shards(tmp_path, fmnist_test, capsys):
    split = fmnist_test.subset(np.arange(10), "part")
    out = tmp_path / "s"
    label_split(split, PixelTeacher(), make_question_set(split.class_names, n=2), out, shard_size=2, rank=0,
                world_size=2, progress=False, share_only=True)
    now = time.time()
    for age, index in ((20, 0), (10, 2), (0, 4)):  # written 10 s apart: 4 samples in the 20 s after the first
        os.utime(out / shard_name(index), (now - age, now - age))
    lease = LeaseBoard(out / LEASE_DIR, "gpu-7:4242 rank 1/2", timeout=60).try_claim("shard-00001")
    try:
        assert main(["labels", "status", str(out)]) == 0
        text = capsys.readouterr().out
        assert main(["labels", "status", str(out), "--json"]) == 0
        report = json.loads(capsys.readouterr().out)
    finally:
        lease.release()
    assert "done          3 shards  6 samples (60.0 %)" in text and "left          1 shards (3)" in text
    assert re.search(r"shard-00001.parquet  gpu-7:4242 rank 1/2, since \S+ \(\d s\), heartbeat \d s ago", text)
    assert "throughput 0.2 samples/s (all workers, over the last 3 shards, 20 s); about 20 s left" in text
    assert (report["done"], report["left"], report["left_shards"], report["samples_done"]) == (3, 1, [3], 6)
    assert [(r["shard"], r["worker"], r["expired"]) for r in report["leased"]] == [(1, "gpu-7:4242 rank 1/2", False)]
    assert report["complete"] is False
    assert report["samples_per_s"] == pytest.approx(0.2, rel=0.05) and report["eta_s"] == pytest.approx(20, rel=0.1)
