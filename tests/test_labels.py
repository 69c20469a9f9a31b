import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from conftest import PixelTeacher, make_question_set

from makd.errors import MakdError
from makd.labels import LabelStore, label_split
from makd.labels.store import META_FILE, TABLE_FILE, shard_table


@pytest.fixture()
def split(fmnist_test):
    return fmnist_test.subset(np.arange(10), "part")


@pytest.fixture()
def questions(split):
    return make_question_set(split.class_names, n=5)


def direct_scores(split, questions):
    return PixelTeacher().score(split.images(range(len(split))), questions)


def test_store_roundtrip_matches_direct_scoring(tmp_path, split, questions):
    store = label_split(split, PixelTeacher(batch_size=3), questions, tmp_path / "s", shard_size=4, progress=False)
    ids, logodds, mass = store.read()
    expected = direct_scores(split, questions)
    assert ids == split.sample_ids
    np.testing.assert_array_equal(logodds, expected.logodds)
    np.testing.assert_array_equal(mass, expected.mass)
    assert logodds.dtype == np.float32 and logodds.shape == (10, 5)
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == [
        "labels.arrow", "labels.json", "samples.parquet", "shard-00000.parquet", "shard-00001.parquet",
        "shard-00002.parquet"]
    meta = store.meta
    assert meta["question_set_hash"] == questions.hash and meta["num_samples"] == 10 and meta["shard_size"] == 4
    assert meta["teacher"]["name"] == "pixel" and "torch" in meta["software"]
    # Plain Parquet: other tools read it without makd.
    frame = pd.read_parquet(tmp_path / "s" / "shard-00001.parquet")
    assert list(frame.columns) == ["sample_id", "logodds", "mass"] and list(frame.sample_id) == split.sample_ids[4:8]


def test_resume_after_crash_recomputes_only_missing_shards(tmp_path, split, questions):
    out = tmp_path / "s"
    with pytest.raises(RuntimeError, match="simulated crash"):
        label_split(split, PixelTeacher(batch_size=4, fail_after_calls=2), questions, out, shard_size=4, progress=False)
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == [
        "labels.json", "samples.parquet", "shard-00000.parquet", "shard-00001.parquet"]
    assert not list((out / "leases").iterdir())  # the crashed worker's lease was released
    finished = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*")}
    teacher = PixelTeacher(batch_size=4)
    store = label_split(split, teacher, questions, out, shard_size=4, progress=False)
    assert teacher.calls == 1  # only the last shard
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("shard-0000[01].parquet")} == finished
    reference = label_split(split, PixelTeacher(), questions, tmp_path / "ref", shard_size=4, progress=False)
    for a, b in zip(store.read(), reference.read()):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_resume_refuses_a_different_question_set(tmp_path, split, questions):
    label_split(split, PixelTeacher(), questions, tmp_path / "s", shard_size=4, progress=False)
    other = make_question_set(split.class_names, n=6)
    with pytest.raises(MakdError, match="different question_set_hash"):
        label_split(split, PixelTeacher(), other, tmp_path / "s", shard_size=4, progress=False)
    store = label_split(split, PixelTeacher(), other, tmp_path / "s", shard_size=4, progress=False, overwrite=True)
    assert store.num_questions == 6 and store.read()[1].shape == (10, 6)


def test_sharded_workers_cover_every_sample_once(tmp_path, split, questions):
    out = tmp_path / "s"
    label_split(split, PixelTeacher(), questions, out, shard_size=3, rank=1, world_size=2, progress=False,
                share_only=True)
    store = LabelStore.open(out)
    assert store.missing_shards() == [0, 2]
    with pytest.raises(MakdError, match="incomplete: 2 of 4 shards missing"):
        store.read()
    # Rank 1 again, claiming: its share is done, so it takes rank 0's shards (nobody holds them).
    teacher = PixelTeacher(batch_size=3)
    label_split(split, teacher, questions, out, shard_size=3, rank=1, world_size=2, progress=False)
    assert teacher.calls == 2 and not store.missing_shards()
    ids, logodds, _ = store.read()
    assert ids == split.sample_ids
    np.testing.assert_array_equal(logodds, direct_scores(split, questions).logodds)


def test_join_is_by_sample_id(tmp_path, split, questions):
    store = label_split(split, PixelTeacher(), questions, tmp_path / "s", shard_size=4, progress=False)
    ids, logodds, _ = store.read()
    wanted = [ids[7], ids[2], ids[9]]
    got, _ = store.lookup(wanted)
    np.testing.assert_array_equal(got, logodds[[7, 2, 9]])
    with pytest.raises(MakdError, match=r"sample 'test/9999' has no row in label store"):
        store.lookup([ids[0], "test/9999"])
    positions, rows, _ = store.available(["test/9999", ids[3]])
    assert positions.tolist() == [1] and np.array_equal(rows, logodds[[3]])


def test_question_set_mismatch_and_not_a_store(tmp_path, split, questions):
    store = label_split(split, PixelTeacher(), questions, tmp_path / "s", shard_size=4, progress=False)
    with pytest.raises(MakdError, match="was made for question set"):
        store.check_questions(make_question_set(split.class_names, n=2), "q.json")
    with pytest.raises(MakdError, match="is not a label store"):
        LabelStore.open(tmp_path)
    (tmp_path / "s" / META_FILE).write_text("{")
    with pytest.raises(MakdError, match="not valid JSON"):
        LabelStore.open(tmp_path / "s")


def test_subset_of_questions_equals_relabelling(tmp_path, split, questions):
    pool = label_split(split, PixelTeacher(), questions, tmp_path / "pool", shard_size=4, progress=False)
    chosen = questions.model_copy(update={"questions": (questions.questions[3], questions.questions[1])})
    chosen = type(questions).model_validate(chosen.model_dump())
    sub = pool.subset(chosen, tmp_path / "sub")
    direct = label_split(split, PixelTeacher(), chosen, tmp_path / "direct", shard_size=4, progress=False)
    for a, b in zip(sub.read(), direct.read()):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert sub.meta["question_set_hash"] == chosen.hash and sub.meta["derived_from"]["path"] == str(pool.path)
    sub.check_questions(chosen)
    other = make_question_set(split.class_names, n=7)
    with pytest.raises(MakdError, match="question q5 .* is not in label store"):
        pool.subset(other, tmp_path / "bad")


def test_reads_are_memory_mapped_views_of_the_consolidated_table(tmp_path, split, questions):
    store = label_split(split, PixelTeacher(), questions, tmp_path / "s", shard_size=4, progress=False)
    logodds, mass = LabelStore.open(store.path).lookup(split.sample_ids)
    # Same order as stored: no join, no copy; nobody can write into the targets.
    assert not logodds.flags.owndata and not logodds.flags.writeable and not mass.flags.writeable
    np.testing.assert_array_equal(logodds, direct_scores(split, questions).logodds)
    shuffled, _ = store.lookup(split.sample_ids[::-1])
    assert not shuffled.flags.writeable
    np.testing.assert_array_equal(shuffled, logodds[::-1])


def test_consolidated_table_follows_the_shards(tmp_path, split, questions, monkeypatch):
    out = tmp_path / "s"
    store = label_split(split, PixelTeacher(), questions, out, shard_size=4, progress=False)
    built = (out / TABLE_FILE).stat().st_mtime_ns
    store.read()
    assert (out / TABLE_FILE).stat().st_mtime_ns == built  # reused, not rebuilt
    # A shard rewritten (e.g. redone after `labels check` found it damaged) invalidates the table.
    expected = direct_scores(split, questions)
    redone = shard_table(split.sample_ids[4:8], expected.logodds[4:8] + 1.0, expected.mass[4:8])
    pq.write_table(redone, out / "shard-00001.parquet")
    logodds = np.array(LabelStore.open(out).read()[1])  # a copy: the garbage below overwrites the mapped file
    np.testing.assert_array_equal(logodds[:4], expected.logodds[:4])
    np.testing.assert_array_equal(logodds[4:8], expected.logodds[4:8] + 1.0)
    # A damaged table is rebuilt from the shards, not trusted.
    (out / TABLE_FILE).write_bytes(b"garbage")
    np.testing.assert_array_equal(LabelStore.open(out).read()[1], logodds)
    # A store nobody may write to is still readable (from the shards).
    (out / TABLE_FILE).unlink()

    def read_only(path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr("makd.labels.store.atomic_path", read_only)
    np.testing.assert_array_equal(LabelStore.open(out).lookup(split.sample_ids)[0], logodds)
    assert not (out / TABLE_FILE).exists()


def test_an_unreadable_shard_is_a_one_line_error(tmp_path, split, questions):
    out = tmp_path / "s"
    label_split(split, PixelTeacher(), questions, out, shard_size=4, progress=False)
    (out / TABLE_FILE).unlink()
    (out / "shard-00001.parquet").write_bytes(b"not parquet")
    with pytest.raises(MakdError, match=r"shard-00001.parquet: unreadable .*makd labels check"):
        LabelStore.open(out).lookup(split.sample_ids)
    assert not (out / TABLE_FILE).exists()


class Pending:
    """What SubmittingTeacher.submit returns: its scores when waited for, or `error`; records `cancel()`."""

    def __init__(self, scores, error=None):
        self.scores, self.error, self.cancelled = scores, error, False

    def result(self):
        if self.error is not None:
            raise self.error
        return self.scores

    def cancel(self):
        self.cancelled = True


class SubmittingTeacher(PixelTeacher):
    """A teacher with `submit` (as the openai one) whose first batch's answer is an error."""

    def __init__(self):
        super().__init__(batch_size=2)
        self.submitted = []

    def submit(self, images, questions):
        error = RuntimeError("the server went away") if not self.submitted else None
        self.submitted.append(Pending(self.score(images, questions), error))
        return self.submitted[-1]


def test_a_shard_whose_answer_fails_cancels_its_own_batches_and_those_submitted_ahead(tmp_path, split, questions):
    teacher = SubmittingTeacher()
    with pytest.raises(RuntimeError, match="went away"):
        label_split(split, teacher, questions, tmp_path / "s", shard_size=4, progress=False)
    assert len(teacher.submitted) == 4  # shard 0's two batches, and shard 1's, submitted before shard 0 is written
    assert [part.cancelled for part in teacher.submitted[1:]] == [True, True, True]
