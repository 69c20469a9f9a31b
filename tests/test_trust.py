"""Trust (issue 9): what a store returns is what the teacher said, for the right sample and question; every bad
input is one line; nothing is half-written or left behind; a config's samples are all covered."""

from __future__ import annotations

import errno
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import PixelTeacher, dead_pid, make_question_set
from safetensors.torch import load_file

from makd.cli import main
from makd.config import load_config
from makd.data import build_splits
from makd.data.config import DataConfig
from makd.data.imagefolder import IMAGE_EXTENSIONS
from makd.errors import MakdError
from makd.labels import LabelStore, label_split, samples_to_label
from makd.labels.store import META_FILE, TABLE_FILE, VALIDATION, shard_name, shard_table
from makd.questions import QuestionSet

TINY = ["data.train_per_class=4", "data.val_per_class=2", "data.test_per_class=3", "model.width=4",
        "train.epochs=3", "train.eval_every=1", "train.batch_size=8", "train.progress=false", "train.tensorboard=false"]


def one_line(err: str) -> str:
    """The single stderr line of a failed command, without its prefix."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("makd: error: "), err
    return lines[0].removeprefix("makd: error: ")


# -- every read of a label store validates what it returns ----------------------------------------------------------
@pytest.fixture()
def store12(tmp_path, fmnist_test):
    """12 samples x 3 questions in shards of 4 (rows 4-7 in shard 1, 8-11 in shard 2)."""
    split = fmnist_test.subset(np.arange(12), "part")
    questions = make_question_set(split.class_names, n=3)
    return split, label_split(split, PixelTeacher(), questions, tmp_path / "s", shard_size=4, progress=False)


def rewrite_shard(store: LabelStore, index: int, edit) -> None:
    """Rewrite shard `index` as edit(ids, logodds, mass) -> (ids, logodds, mass) returns it (another file: a new inode)."""
    table = pq.read_table(store.path / shard_name(index))
    q = table.column("logodds").type.list_size
    matrix = lambda name: table.column(name).combine_chunks().flatten().to_numpy().reshape(-1, q).copy()  # noqa: E731
    ids, logodds, mass = edit(table.column("sample_id").to_pylist(), matrix("logodds"), matrix("mass"))
    (store.path / shard_name(index)).unlink()
    pq.write_table(shard_table(ids, logodds, mass), store.path / shard_name(index))


def test_shards_narrower_than_the_question_list_never_reach_a_reader(store12):
    """The issue's silent misalignment: 2 values per row under a labels.json of 3 questions used to be reshaped
    into 8 rows of targets shifted across samples."""
    split, store = store12
    for i in range(3):
        rewrite_shard(store, i, lambda ids, lo, m: (ids, lo[:, :2], m[:, :2]))
    with pytest.raises(MakdError) as err:
        LabelStore.open(store.path).lookup(split.sample_ids)
    assert str(err.value).startswith(
        f"label store {store.path}: shard-00000.parquet: rows hold 2 logodds values but labels.json lists 3 questions "
        "(sample 'test/0' has no value for question q2): the shard was written for another question set; "
        "2 more problem(s): delete the shards named")
    assert "\n" not in str(err.value)
    # `labels check` finds the same, for every shard.
    problems = LabelStore.open(store.path).check().problems
    assert [p.split(":")[0] for p in problems] == ["shard-00000.parquet", "shard-00001.parquet", "shard-00002.parquet"]
    assert "(sample 'test/4' has no value for question q2)" in problems[1]


@pytest.mark.parametrize("column, row, question, value, says", [
    ("logodds", 5, 1, math.nan, "log-odds nan (they must be finite)"),
    ("logodds", 9, 2, -math.inf, "log-odds -inf (they must be finite)"),
    ("mass", 6, 0, 1.5, "answer mass 1.5, outside [0, 1]"),
    ("mass", 11, 2, math.nan, "answer mass nan, outside [0, 1]"),
])
def test_non_finite_log_odds_and_mass_outside_0_1_name_shard_sample_and_question(store12, column, row, question,
                                                                                  value, says):
    split, store = store12

    def spoil(ids, logodds, mass):
        (logodds if column == "logodds" else mass)[row % 4, question] = value
        return ids, logodds, mass

    rewrite_shard(store, row // 4, spoil)
    expected = f"shard-0000{row // 4}.parquet: sample 'test/{row}', question q{question}: {says}"
    with pytest.raises(MakdError, match=re.escape(f"label store {store.path}: {expected}: delete the shards named")):
        LabelStore.open(store.path).read()
    assert LabelStore.open(store.path).check().problems == [expected]
    assert main(["labels", "check", str(store.path)]) == 1


def test_mass_above_one_by_rounding_is_accepted(store12):
    """P(yes) + P(no) summed in float32 may exceed 1 by an ulp; that is a confident teacher, not a corrupt store."""
    split, store = store12
    rewrite_shard(store, 1, lambda ids, lo, m: (ids, lo, np.full_like(m, np.nextafter(np.float32(1), np.float32(2)))))
    assert LabelStore.open(store.path).lookup(split.sample_ids)[1][4, 0] > 1


def test_a_sample_with_two_rows_is_refused(store12, capsys):
    split, store = store12
    rewrite_shard(store, 1, lambda ids, lo, m: (split.sample_ids[:4], lo, m))
    with pytest.raises(MakdError, match=re.escape(
            "4 sample id(s) appear more than once, e.g. 'test/0' in shard-00000.parquet and shard-00001.parquet")):
        LabelStore.open(store.path).lookup(split.sample_ids[:4])


def test_labels_json_edited_by_hand_is_refused(store12):
    _, store = store12
    meta = json.loads((store.path / META_FILE).read_text())
    meta["questions"] = meta["questions"][:2]  # Q = 2 now, while the shards and the recorded hash say 3
    (store.path / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(MakdError, match=r"labels.json: its questions and classes hash to sha256:\w+, but it records "
                                        r"question set sha256:\w+ \(edited by hand\?\)"):
        LabelStore.open(store.path)


class SpoilingTeacher(PixelTeacher):
    """Answers like PixelTeacher, but NaN for the second image's third question."""

    def score(self, images, questions):
        scores = super().score(images, questions)
        if self.calls == 1:
            scores.logodds[1, 2] = np.nan
        return scores


def test_labelling_refuses_to_write_what_a_reader_would_refuse(tmp_path, fmnist_test):
    split = fmnist_test.subset(np.arange(8), "part")
    out = tmp_path / "s"
    with pytest.raises(MakdError, match=re.escape(
            "teacher pixel returned targets a label store cannot hold (not written): shard-00000.parquet: "
            "sample 'test/1', question q2: log-odds nan (they must be finite)")):
        label_split(split, SpoilingTeacher(), make_question_set(split.class_names, n=3), out, shard_size=4,
                    progress=False)
    assert not list(out.glob("shard-*")) and not list(out.glob(".*.tmp"))


def test_reads_of_the_validated_table_do_not_scan_values_again(store12, monkeypatch):
    """Validation runs once, when labels.arrow is built, and is recorded there; a table without that record (an
    older makd's) is rebuilt through it."""
    split, store = store12
    calls = []
    validate = LabelStore.validate_rows
    monkeypatch.setattr(LabelStore, "validate_rows", lambda self, shards: calls.append(len(shards)) or validate(self, shards))
    LabelStore.open(store.path).lookup(split.sample_ids)
    assert calls == []
    path = store.path / TABLE_FILE
    table = pa.ipc.open_file(pa.memory_map(str(path))).read_all()
    assert table.schema.metadata[b"makd.validated"] == VALIDATION.encode()
    older = table.replace_schema_metadata({b"makd.shards": table.schema.metadata[b"makd.shards"]})
    path.unlink()
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, older.schema) as writer:
        writer.write_table(older)
    logodds, _ = LabelStore.open(store.path).lookup(split.sample_ids)
    assert calls == [3] and logodds.shape == (12, 3)
    assert pa.ipc.open_file(str(path)).schema.metadata[b"makd.validated"] == VALIDATION.encode()


def test_training_on_a_misaligned_store_fails_before_the_first_step(tmp_path, capsys):
    config = load_config(overrides=TINY)
    splits = build_splits(config.data)
    questions = make_question_set(splits["train"].class_names, n=4)
    questions.save(tmp_path / "q.json")
    store = label_split(splits["train"], PixelTeacher(), questions, tmp_path / "labels", shard_size=16, progress=False)
    for i in range(store.num_shards):
        rewrite_shard(store, i, lambda ids, lo, m: (ids, lo[:, :3], m[:, :3]))
    run = tmp_path / "run"
    code = main(["train", *TINY, f"out={run}", f"questions={tmp_path / 'q.json'}", f"labels.path={tmp_path / 'labels'}"])
    assert code == 2
    assert "shard-00000.parquet: rows hold 3 logodds values but labels.json lists 4 questions" in one_line(
        capsys.readouterr().err)
    assert not run.exists()  # no checkpoint, no student file: predict and export have nothing to accept


# -- question sets --------------------------------------------------------------------------------------------------
def test_the_same_question_under_two_ids_is_refused_naming_both(tmp_path):
    data = {"classes": ["Sandal", "Trouser"], "questions": [
        {"id": "laces", "text": "Does the item have laces?"}, {"id": "heel", "text": "Does the item have a heel?"},
        {"id": "laces2", "text": "does the item  have LACES"}]}
    (tmp_path / "q.json").write_text(json.dumps(data))
    with pytest.raises(MakdError, match=re.escape(
            "questions[2] (laces2): the same question as laces ('does the item  have LACES'); keep one of them")):
        QuestionSet.load(tmp_path / "q.json")


QUESTION_LINES = ["Does the item have laces?", "Describe the item in detail.", "", "Shoes", "Is it a sandal?",
                  "2. Does the item have a sole?"]


def test_importing_a_txt_applies_the_cleaning_rules_and_lists_every_refused_line(tmp_path, capsys):
    txt = tmp_path / "mine.txt"
    txt.write_text("\n".join(QUESTION_LINES) + "\n")
    args = ["questions", "import", str(txt), "--classes", "Sandal,Trouser", "-o", str(tmp_path / "q.json")]
    assert main(args) == 2
    assert one_line(capsys.readouterr().err) == (
        f"{txt}: 3 of 5 lines are not usable yes/no questions (line 2 'Describe the item in detail.': not a question; "
        "line 4 'Shoes': not a question; line 5 'Is it a sandal?': names a class ('Sandal': it would leak the label)); "
        "rewrite or remove them, or keep them flagged with --keep-invalid")
    assert not (tmp_path / "q.json").exists()

    assert main([*args, "--keep-invalid"]) == 0
    assert "3 kept despite the cleaning rules" in capsys.readouterr().out
    qs = QuestionSet.load(tmp_path / "q.json")
    assert qs.texts == ["Does the item have laces?", "Describe the item in detail.", "Shoes", "Is it a sandal?",
                        "Does the item have a sole?"]
    assert [q.kept_despite for q in qs.questions] == [
        None, "not a question", "not a question", "names a class ('Sandal': it would leak the label)", None]
    assert main(["questions", "show", str(tmp_path / "q.json")]) == 0
    assert "Shoes  (kept despite: not a question)" in capsys.readouterr().out

    txt.write_text("\n".join(QUESTION_LINES + ["does the item have laces"]) + "\n")
    with pytest.raises(MakdError, match=re.escape("line 7 'Does the item have laces' repeats line 1: remove the repeats")):
        QuestionSet.from_txt(txt, ["Sandal", "Trouser"], keep_invalid=True)


# -- one error path for the CLI -------------------------------------------------------------------------------------
def test_os_errors_are_one_line_naming_the_path_and_the_operation(tmp_path, capsys):
    (tmp_path / "q.txt").write_text("Does the item have laces?\n")
    blocker = tmp_path / "afile"
    blocker.write_text("not a folder")
    import_to = ["questions", "import", str(tmp_path / "q.txt"), "--classes", "a,b", "-o"]
    cases = [
        ([*import_to, f"{blocker}/q.json"], f"cannot write {blocker}/q.json: {blocker} is a file, not a folder"),
        ([*import_to, f"{blocker}/sub/q.json"], f"cannot write {blocker}/sub/q.json: {blocker} is a file, not a folder"),
        (["questions", "show", f"{blocker}/q.json"], f"cannot read {blocker}/q.json: {blocker} is a file, not a folder"),
        (["train", *TINY, "loss.aspect_bce.weight=0", f"out={blocker}/run"],
         f"cannot create folder {blocker}/run: {blocker} is a file, not a folder"),
        (["train", *TINY, "loss.aspect_bce.weight=0", f"out={blocker}"],
         f"cannot create folder {blocker}: {blocker} is a file, not a folder"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        assert one_line(capsys.readouterr().err) == message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "q.txt"]
    # A read-only place (sysfs refuses even root).
    assert main([*import_to, "/sys/makd-test.json"]) == 2
    assert one_line(capsys.readouterr().err).startswith("cannot write /sys/makd-test.json: ")


def test_a_full_disk_is_one_line_and_the_old_file_stays_whole(tmp_path, capsys, monkeypatch):
    (tmp_path / "q.txt").write_text("Does the item have laces?\n")
    out = tmp_path / "q.json"
    assert main(["questions", "import", str(tmp_path / "q.txt"), "--classes", "a,b", "-o", str(out)]) == 0
    before = out.read_bytes()
    (tmp_path / "q.txt").write_text("Does the item have laces?\nIs the item made of leather?\n")
    write_text = Path.write_text

    def disk_fills_up(self, data, *args, **kwargs):  # half the bytes reach the disk, then it is full
        write_text(self, data[: len(data) // 2], *args, **kwargs)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Path, "write_text", disk_fills_up)
    assert main(["questions", "import", str(tmp_path / "q.txt"), "--classes", "a,b", "-o", str(out)]) == 2
    assert one_line(capsys.readouterr().err) == f"cannot write {out}: No space left on device"
    assert out.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["q.json", "q.txt"]


def run_makd(*args: str, cwd: Path, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "makd", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600, **kwargs)


def test_a_closed_pipe_ends_quietly(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "makd", "questions", "show", "makd:fashion_mnist/questions.json",
                             "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before makd writes a byte (`| head -0`)
    assert proc.wait(timeout=120) == 0
    assert proc.stderr.read() == b""


@pytest.mark.slow
def test_a_real_full_disk(tmp_path):
    """A 64 KiB tmpfs in a private mount namespace, filled up: the CLI's write and a checkpoint's torch.save (which
    reports a full disk as a RuntimeError of its own) both end as one line, leaving the old file whole."""
    if shutil.which("unshare") is None or subprocess.run(
            ["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {tmp_path}"]).returncode != 0:
        pytest.skip("needs a private mount namespace (unshare -m, root)")
    disk = tmp_path / "disk"
    disk.mkdir()
    (tmp_path / "q1.txt").write_text("Does the item have laces?\n")
    (tmp_path / "q2.txt").write_text("Does the item have laces?\nIs the item made of leather?\n")
    save = ("import torch; from pathlib import Path; from makd.engine.checkpoint import save_state\n"
            "from makd.errors import MakdError\n"
            f"try: save_state(Path('{disk}/last.pt'), {{'w': torch.zeros(100000)}})\n"
            "except MakdError as e: print(e)")
    makd = f"{sys.executable} -m makd questions import --classes a,b"
    script = f"""
        mount -t tmpfs -o size=64k tmpfs {disk} || exit 99
        {makd} {tmp_path}/q1.txt -o {disk}/q.json > /dev/null || exit 98
        cp {disk}/q.json {tmp_path}/before.json
        dd if=/dev/zero of={disk}/fill bs=4k 2> /dev/null
        {makd} {tmp_path}/q2.txt -o {disk}/q.json 2> {tmp_path}/err.txt; echo $? > {tmp_path}/rc.txt
        cp {disk}/q.json {tmp_path}/after.json
        {sys.executable} -c "{save}" > {tmp_path}/torch.txt 2>&1
        ls -A {disk} > {tmp_path}/ls.txt
    """
    proc = subprocess.run(["unshare", "-m", "sh", "-c", script], env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "rc.txt").read_text().strip() == "2"
    assert one_line((tmp_path / "err.txt").read_text()) == f"cannot write {disk}/q.json: No space left on device"
    assert (tmp_path / "after.json").read_bytes() == (tmp_path / "before.json").read_bytes()
    assert (tmp_path / "torch.txt").read_text().strip() == f"cannot write {disk}/last.pt: No space left on device"
    assert (tmp_path / "ls.txt").read_text().split() == ["fill", "q.json"]  # no temporary file left


# -- stale temporary files ------------------------------------------------------------------------------------------
def test_only_temporaries_of_writers_that_are_gone_are_removed(tmp_path):
    from makd.atomic import HOST, STALE_AFTER_S, remove_stale_temporaries

    files = {
        "dead": f".last.pt.{HOST}-{dead_pid()}.x1y2z3.tmp",  # killed on this host
        "live": f".last.pt.{HOST}-{os.getpid()}.a1b2c3.tmp",  # being written right now
        "other_host_recent": ".shard-00001.parquet.0badcafe-123.q9w8e7.tmp",  # another machine on a shared disk
        "other_host_old": ".shard-00002.parquet.0badcafe-123.r5t6y7.tmp",
        "older_makd_recent": ".config.yaml.k3j4h5.tmp",  # no writer in the name: judged by age
        "older_makd_old": ".metrics.csv.m6n7b8.tmp",
    }
    folders = {  # atomic_folder's (a cache entry, generated canvases), judged the same way
        "dead_folder": f".0a1b2c.{HOST}-{dead_pid()}.d4e5f6.tmp",
        "live_folder": f".0a1b2c.{HOST}-{os.getpid()}.g7h8i9.tmp",
    }
    for name in files.values():
        (tmp_path / name).write_bytes(b"partial")
    for name in folders.values():
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"partial")
    old = time.time() - STALE_AFTER_S - 60
    for key in ("other_host_old", "older_makd_old"):
        os.utime(tmp_path / files[key], (old, old))
    (tmp_path / "last.pt").write_bytes(b"finished")
    assert remove_stale_temporaries(tmp_path) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [files["live"], files["other_host_recent"], files["older_makd_recent"], folders["live_folder"], "last.pt"])


def test_labelling_removes_a_killed_workers_temporary_files_but_not_a_live_ones(tmp_path, fmnist_test, capsys):
    from makd.atomic import HOST

    split = fmnist_test.subset(np.arange(8), "part")
    questions = make_question_set(split.class_names, n=2)
    out = tmp_path / "s"
    label_split(split, PixelTeacher(), questions, out, shard_size=4, rank=0, world_size=2, progress=False,
                share_only=True)
    killed, live = f".shard-00001.parquet.{HOST}-{dead_pid()}.abc123.tmp", f".shard-00001.parquet.{HOST}-{os.getpid()}.def456.tmp"
    for name in (killed, live):
        (out / name).write_bytes(b"partial")
    assert LabelStore.open(out).check().leftovers == 1  # the live writer's file is not a leftover
    label_split(split, PixelTeacher(), questions, out, shard_size=4, rank=0, world_size=2, progress=False,
                share_only=True)
    assert sorted(p.name for p in out.glob(".*.tmp")) == [live]


# A `makd train` process that SIGKILLs itself in the middle of its 8th checkpoint write (epoch 2, step 2 of 5: one
# checkpoint per step plus one after each epoch's validation), with the temporary file half written.
DIE_IN_A_CHECKPOINT_WRITE = """
import os, signal, sys, torch
writes, real_save = 0, torch.save

def save_then_die(obj, f, *args, **kwargs):
    global writes
    real_save(obj, f, *args, **kwargs)
    if os.path.basename(str(f)).startswith(".last.pt."):
        writes += 1
        if writes == 8:
            os.truncate(f, os.path.getsize(f) // 2)
            os.kill(os.getpid(), signal.SIGKILL)

torch.save = save_then_die
from makd.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_a_training_killed_while_writing_a_checkpoint_leaves_nothing_behind_and_resumes_exactly(tmp_path):
    # One thread in the killed process and in this one alike (bitwise equality needs the same reductions).
    args = [*TINY, "train.checkpoint_every_steps=1", "loss.aspect_bce.weight=0", "model.drop_rate=0.2", "train.threads=1"]
    run, folder = tmp_path / "killed", tmp_path / "killed" / "checkpoints"
    proc = subprocess.run([sys.executable, "-c", DIE_IN_A_CHECKPOINT_WRITE, "train", *args, f"out={run}"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    partial = list(folder.glob(".last.pt.*.tmp"))
    assert len(partial) == 1 and 0 < partial[0].stat().st_size < (folder / "last.pt").stat().st_size
    state = torch.load(folder / "last.pt", weights_only=True)["state"]
    assert (state["epoch"], state["step_in_epoch"]) == (1, 1)  # the 7th write: a mid-epoch state to resume from
    assert main(["train", *args, f"out={run}"]) == 0
    assert not list(folder.glob(".*.tmp")) and not list(run.glob(".*.tmp"))
    assert main(["train", *args, f"out={tmp_path / 'whole'}"]) == 0
    a, b = load_file(tmp_path / "whole" / "last.safetensors"), load_file(run / "last.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    whole, resumed = (json.loads((tmp_path / r / "results.json").read_text()) for r in ("whole", "killed"))
    assert (resumed["test_top1_best"], resumed["best_epoch"]) == (whole["test_top1_best"], whole["best_epoch"])


@pytest.mark.slow
def test_ctrl_c_ends_with_status_130_a_resumable_checkpoint_and_no_temporary_file(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "makd", "train", *TINY, "train.epochs=100", "loss.aspect_bce.weight=0",
                             "train.threads=1", f"out={run}"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (run / "checkpoints" / "last.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert err.strip().splitlines()[-1] == "makd: interrupted (re-run the same command to resume)"
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["state"]
    assert 1 <= state["epoch"] < 100 and not list(run.rglob(".*.tmp"))


# -- data: classes without images -----------------------------------------------------------------------------------
def test_an_empty_class_folder_is_an_error_naming_the_class(tmp_path, tiny_imagefolder):
    root = tmp_path / "data"
    shutil.copytree(tiny_imagefolder, root)
    (root / "train" / "Coat").mkdir()
    (root / "train" / "Coat" / "notes.txt").write_text("no images here")
    with pytest.raises(MakdError, match=re.escape(
            f"{root / 'train' / 'Coat'}: class 'Coat' has no images ({', '.join(IMAGE_EXTENSIONS)}): add images, or "
            "remove its folder from every split to drop the class")):
        build_splits(DataConfig(dataset="imagefolder", root=str(root), train_per_class=None, val_per_class=1))
    shutil.rmtree(root / "train" / "Coat")
    for image in (root / "test" / "Trouser").iterdir():
        image.unlink()
    with pytest.raises(MakdError, match=re.escape(f"{root / 'test' / 'Trouser'}: class 'Trouser' has no images")):
        build_splits(DataConfig(dataset="imagefolder", root=str(root), train_per_class=None, val_per_class=1))


def test_a_manifest_class_without_images_is_an_error_naming_the_class(tmp_path, tiny_imagefolder):
    images = sorted(tiny_imagefolder.rglob("*.png"))
    rows = [f"{p.relative_to(tiny_imagefolder)},{p.parent.name},{p.parts[-3]}" for p in images]
    sandal = [r for r in rows if ",Sandal,train" in r]
    (tmp_path / "all.csv").write_text("\n".join(["path,label,split", *rows]) + "\n")
    (tmp_path / "no_sandal.csv").write_text("\n".join(["path,label,split", *[r for r in rows if r not in sandal]]) + "\n")
    config = dict(dataset="manifest", root=str(tiny_imagefolder), train_per_class=None, val_per_class=1)
    with pytest.raises(MakdError, match=re.escape(
            f"{tmp_path / 'no_sandal.csv'}: class 'Sandal' has no training images (1 such class(es): 'Sandal'): add "
            "training rows for it, or remove its rows")):
        build_splits(DataConfig(**config, manifest=str(tmp_path / "no_sandal.csv")))
    with pytest.raises(MakdError, match=re.escape(
            f"{tmp_path / 'all.csv'}: class 'Boot' of data.classes has no images (1 such class(es): 'Boot'): add "
            "training rows for it, or drop it from data.classes")):
        build_splits(DataConfig(**config, manifest=str(tmp_path / "all.csv"),
                                classes=["T-shirt_top", "Trouser", "Sandal", "Boot"]))


# -- a config's samples against a store -----------------------------------------------------------------------------
def test_labels_check_and_import_report_the_configs_samples_without_a_row(tmp_path, tiny_imagefolder, capsys):
    qs = make_question_set(["Sandal", "T-shirt_top", "Trouser"], n=2)
    qs.save(tmp_path / "q.json")
    overrides = [f"questions={tmp_path / 'q.json'}", "data.dataset=imagefolder", f"data.root={tiny_imagefolder}",
                 "data.train_per_class=4", "data.val_per_class=2", "labels.splits=[train,test]", "labels.shard_size=5"]
    ids = samples_to_label(load_config(overrides=overrides)).sample_ids  # 12 train, then 9 test
    left_out = [ids[1], ids[7], ids[15]]
    (tmp_path / "targets.json").write_text(json.dumps({sid: [0.25, 0.75] for sid in ids if sid not in left_out}))
    store = tmp_path / "labels"
    assert main(["labels", "import", "--json", str(tmp_path / "targets.json"), "-o", str(store), *overrides]) == 0
    out = capsys.readouterr().out
    assert (f"left without a row: train: 10 of 12 samples have a row; 2 missing ({ids[1]!r}, {ids[7]!r}): "
            "`makd train` needs a row for every training sample") in out
    assert f"left without a row: test: 8 of 9 samples have a row; 1 missing ({ids[15]!r})" in out

    assert main(["labels", "check", str(store)]) == 0  # complete as a store...
    capsys.readouterr()
    assert main(["labels", "check", f"labels.path={store}", *overrides]) == 1  # ...but not for this config
    out = capsys.readouterr().out
    assert f"train: 10 of 12 samples have a row; 2 missing ({ids[1]!r}, {ids[7]!r})" in out
    assert f"test: 8 of 9 samples have a row; 1 missing ({ids[15]!r})" in out
