"""Shards are claimed with leases: exclusive, renewed, taken over when their worker is gone; several worker processes
share one store without scoring a shard twice, and a killed worker's shard is finished by another."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import PixelTeacher, dead_pid, make_question_set

from makd.labels import LabelStore, LabelWriter, label_split
from makd.labels.leases import LEASE_DIR, LeaseBoard, claim_each
from makd.labels.status import status_lines, store_status

TESTS = Path(__file__).resolve().parent
# A worker process: waits for `go`, then labels 16 Fashion-MNIST test images (8 shards of 2) with a teacher that
# takes `delay` s per image and appends the ids it scored to `log`.
WORKER = """
import sys, time
from pathlib import Path
sys.path.insert(0, {tests!r})
from conftest import PixelTeacher, make_question_set
from makd.data.fashion_mnist import load_fashion_mnist
from makd.labels import label_split

out, log, delay, timeout = Path(sys.argv[1]), sys.argv[2], float(sys.argv[3]), float(sys.argv[4])

class Slow(PixelTeacher):
    inputs = frozenset({{"images", "sample_ids"}})

    def score(self, images, questions, *, sample_ids):
        time.sleep(delay * len(images))
        with open(log, "a") as f:
            f.write("".join(s + "\\n" for s in sample_ids))
        return super().score(images, questions)

split = load_fashion_mnist("test").subset(range(16), "part")
Path(log + ".ready").touch()
while not (out.parent / "go").exists():
    time.sleep(0.02)
label_split(split, Slow(batch_size=1), make_question_set(split.class_names, n=3), out, shard_size=2, progress=False,
            lease_timeout=timeout)
"""


def start_worker(tmp_path: Path, name: str, delay: float, timeout: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", WORKER.format(tests=str(TESTS)), str(tmp_path / "s"),
                             str(tmp_path / f"{name}.log"), str(delay), str(timeout)], cwd=tmp_path)


def scored(tmp_path: Path, name: str) -> list[str]:
    path = tmp_path / f"{name}.log"
    return path.read_text().split() if path.exists() else []


def reference(tmp_path, fmnist_test):
    split = fmnist_test.subset(np.arange(16), "part")
    store = label_split(split, PixelTeacher(), make_question_set(split.class_names, n=3), tmp_path / "ref",
                        shard_size=2, progress=False)
    return split, store.read()


def wait_until(condition, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.02)


# -- the leases themselves ------------------------------------------------------------------------------------------
def test_a_lease_is_exclusive_and_free_again_once_released(tmp_path):
    a, b = LeaseBoard(tmp_path, "a", timeout=30), LeaseBoard(tmp_path, "b", timeout=30)
    lease = a.try_claim("shard-00003")
    assert lease is not None and b.try_claim("shard-00003") is None
    holder = b.holders()["shard-00003"]
    assert (holder.worker, holder.pid, holder.attempt) == ("a", os.getpid(), 0) and not holder.expired()
    assert lease.renew() and b.holders()["shard-00003"].heartbeat >= holder.heartbeat
    lease.release()
    assert b.holders() == {} and not list(tmp_path.iterdir())
    with b.try_claim("shard-00003") as again:
        assert again is not None and a.try_claim("shard-00003") is None


def test_a_silent_lease_is_taken_over_after_its_timeout_and_its_holder_learns_it(tmp_path):
    a = LeaseBoard(tmp_path, "a", timeout=30)
    lease = a.try_claim("shard-00000")
    lease._stop.set()  # a worker that stopped beating (hung, or on a host whose clock we trust)
    path = lease.path
    fields = json.loads(path.read_text())
    path.write_text(json.dumps({**fields, "host": "ffffffff", "heartbeat": time.time() - 31}))  # another host's
    b = LeaseBoard(tmp_path, "b", timeout=30)
    assert b.holders()["shard-00000"].expired()
    taken = b.try_claim("shard-00000")
    assert taken is not None and taken.holder.attempt == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard-00000.1.lease"]  # the expired attempt is gone
    assert not lease.renew() and lease.lost  # the old holder sees it lost the shard...
    lease.release()
    assert b.holders()["shard-00000"].worker == "b"  # ...and leaves the new lease alone
    taken.release()
    assert not list(tmp_path.iterdir())


def test_a_lease_of_a_dead_process_on_this_host_is_taken_over_at_once(tmp_path):
    a = LeaseBoard(tmp_path, "a", timeout=3600)
    lease = a.try_claim("samples")
    lease._stop.set()
    fields = json.loads(lease.path.read_text())
    lease.path.write_text(json.dumps({**fields, "pid": dead_pid()}))
    assert LeaseBoard(tmp_path, "b", timeout=3600).try_claim("samples") is not None


def dead_lease(board: LeaseBoard, name: str) -> None:
    """`name` claimed by `board`'s worker, which then died (its lease may be taken over at once)."""
    lease = board.try_claim(name)
    lease._stop.set()
    fields = json.loads(lease.path.read_text())
    lease.path.write_text(json.dumps({**fields, "pid": dead_pid()}))


def test_a_lease_taken_over_while_another_worker_reads_the_folder_is_seen_held(tmp_path, monkeypatch):
    """C lists attempt 0 (B's, expired); A takes it over (links attempt 1, removes 0) before C reads attempt 0:
    C must list the folder again and see A's lease, not take the vanished file for a free shard."""
    dead_lease(LeaseBoard(tmp_path, "b", timeout=30), "shard-00000")
    a, c = LeaseBoard(tmp_path, "a", timeout=30), LeaseBoard(tmp_path, "c", timeout=30)
    read, taken = LeaseBoard._read, []

    def takeover_before_c_reads(board, name, attempt):
        if board is c and not taken:
            taken.append(a.try_claim(name))
        return read(board, name, attempt)

    monkeypatch.setattr(LeaseBoard, "_read", takeover_before_c_reads)
    assert c.holders()["shard-00000"].worker == "a"
    assert taken[0] is not None and taken[0].holder.attempt == 1
    taken[0].release()


def test_a_claim_linked_after_a_takeover_it_did_not_see_is_given_up(tmp_path, monkeypatch):
    """C scans an empty folder; before C links attempt 0, B claims it and dies and A takes it over (attempt 1,
    attempt 0 removed), so C's link succeeds: C must find attempt 1 and give its claim up."""
    a, b, c = (LeaseBoard(tmp_path, worker, timeout=30) for worker in "abc")
    write, taken = LeaseBoard.write_temporary, []

    def takeover_before_c_links(board, beside, holder):
        if board is c and not taken:
            dead_lease(b, holder.name)
            taken.append(a.try_claim(holder.name))
        return write(board, beside, holder)

    monkeypatch.setattr(LeaseBoard, "write_temporary", takeover_before_c_links)
    assert c.try_claim("shard-00000") is None
    assert taken[0] is not None and taken[0].holder.attempt == 1
    assert [p.name for p in tmp_path.iterdir()] == ["shard-00000.1.lease"]  # C's attempt 0 is gone
    taken[0].release()


def test_claims_exclude_each_other_where_hard_links_fail(tmp_path, monkeypatch):
    """gcsfuse, s3fs, SMB: link() fails with EPERM; leases are then created exclusively (O_EXCL)."""
    def no_hard_links(src, dst):
        raise PermissionError(errno.EPERM, os.strerror(errno.EPERM), str(src), None, str(dst))

    monkeypatch.setattr(os, "link", no_hard_links)
    a, b = LeaseBoard(tmp_path, "a", timeout=30), LeaseBoard(tmp_path, "b", timeout=30)
    lease = a.try_claim("shard-00000")
    assert lease is not None and b.try_claim("shard-00000") is None
    assert b.holders()["shard-00000"].worker == "a" and not b.holders()["shard-00000"].expired()
    monkeypatch.setattr(b, "holders", lambda: {})  # B listed the folder before A claimed: the creation refuses it
    assert b.try_claim("shard-00000") is None
    lease.release()
    assert not list(tmp_path.iterdir())  # no lease, no temporary file left
    with b.try_claim("shard-00000") as again:
        assert again is not None and a.try_claim("shard-00000") is None


def test_claims_skip_what_others_hold_and_wait_for_them_to_finish(tmp_path):
    other = LeaseBoard(tmp_path, "other", timeout=30).try_claim("item-1")
    done = {"item-0": False, "item-1": False, "item-2": False}
    board = LeaseBoard(tmp_path, "me", timeout=30)
    got = []
    for item, lease in claim_each(board, lambda: [k for k, v in done.items() if not v], str, poll_s=0.05):
        assert board.holders()[item].worker == "me"
        got.append(item)
        done[item] = True
        if item == "item-2":  # the other worker finishes item-1 while this one waits for it
            done["item-1"] = True
            other.release()
    assert got == ["item-0", "item-2"]
    held = LeaseBoard(tmp_path, "x", timeout=30).try_claim("item-8")
    assert list(claim_each(board, lambda: ["item-8"], str, wait=False)) == []  # held, no waiting: nothing
    held.release()
    assert next(claim_each(board, lambda: ["item-8"], str, wait=False))[0] == "item-8"  # free again: claimed


def test_holding_two_claims_keeps_the_one_before_until_the_ask_after(tmp_path):
    """hold=2 (the label job ahead of a server): item k stays leased while k+1 is started, and is released at the
    ask after (the caller has finished it by then); when only items this worker holds are left, None asks it to
    finish them, and what it holds is never waited for."""
    done = {f"item-{i}": False for i in range(3)}
    board = LeaseBoard(tmp_path, "me", timeout=30)
    claims = claim_each(board, lambda: [k for k, v in done.items() if not v], str, hold=2, poll_s=0.05)
    assert next(claims)[0] == "item-0"
    assert next(claims)[0] == "item-1" and set(board.holders()) == {"item-0", "item-1"}
    done["item-0"] = True
    assert next(claims)[0] == "item-2" and set(board.holders()) == {"item-1", "item-2"}
    done["item-1"] = True  # the caller finishes item k before it asks after k + 1
    assert next(claims) is None and set(board.holders()) == {"item-2"}  # only its own is left: finish it
    done["item-2"] = True
    assert list(claims) == [] and board.holders() == {}
    other = LeaseBoard(tmp_path, "other", timeout=30).try_claim("item-9")
    claims = claim_each(board, lambda: ["item-8", "item-9"], str, hold=2, poll_s=0.05)
    assert next(claims)[0] == "item-8"
    assert next(claims) is None  # item-9 is another's: finish item-8 before waiting for it
    other.release()
    claims.close()
    assert board.holders() == {}


def test_a_worker_whose_lease_was_taken_over_does_not_write_over_the_new_holders_shard(tmp_path):
    questions = make_question_set(["cat", "dog"], n=2)
    ids = [f"img/{i}" for i in range(4)]
    slow = LabelWriter.open(tmp_path / "s", questions, {"name": "made-up"}, ids, shard_size=2)
    shards = slow.claim_shards(lease_timeout=30)
    assert next(shards) == 0
    # Paused past its timeout: another worker (another host) takes shard 0 over and writes it.
    lease_file = tmp_path / "s" / LEASE_DIR / "shard-00000.0.lease"
    fields = json.loads(lease_file.read_text())
    lease_file.write_text(json.dumps({**fields, "host": "ffffffff", "heartbeat": time.time() - 60}))
    fast = LabelWriter.open(tmp_path / "s", questions, {"name": "made-up"}, ids, shard_size=2)
    other = LeaseBoard(tmp_path / "s" / LEASE_DIR, "fast", timeout=30).try_claim("shard-00000")
    assert other is not None and other.holder.attempt == 1
    ones = np.ones((2, 2), np.float32)
    fast.write_shard(0, ids[:2], ones, ones * 0.5)
    written = (tmp_path / "s" / "shard-00000.parquet").stat().st_mtime_ns
    slow.write_shard(0, ids[:2], -ones, ones * 0.25)  # the paused worker wakes up: its copy is dropped
    assert (tmp_path / "s" / "shard-00000.parquet").stat().st_mtime_ns == written
    other.release()
    shards.close()
    assert next(slow.claim_shards(wait=False)) == 1  # shard 0 is done: the next claim is shard 1
    assert pq.read_table(tmp_path / "s" / "shard-00000.parquet").column("mass").to_pylist() == [[0.5, 0.5]] * 2


# -- worker processes -----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_two_workers_started_at_once_finish_the_store_without_scoring_a_shard_twice(tmp_path, fmnist_test):
    workers = [start_worker(tmp_path, name, delay=0.1, timeout=30) for name in ("a", "b")]
    wait_until(lambda: all((tmp_path / f"{n}.log.ready").exists() for n in ("a", "b")))
    (tmp_path / "go").touch()
    assert [w.wait(timeout=120) for w in workers] == [0, 0]
    a, b = scored(tmp_path, "a"), scored(tmp_path, "b")
    split, (ids, logodds, mass) = reference(tmp_path, fmnist_test)
    assert sorted(a + b) == sorted(split.sample_ids)  # every image scored exactly once, by one of them
    assert a and b  # both worked
    store = LabelStore.open(tmp_path / "s")
    got = store.read()
    assert got[0] == ids
    np.testing.assert_array_equal(got[1], logodds)
    assert not (tmp_path / "s" / "leases").exists()  # released, and removed once the store was complete


@pytest.mark.slow
def test_a_killed_workers_shard_is_finished_by_another_worker(tmp_path, fmnist_test):
    """Worker A is SIGKILLed in the middle of a shard; its lease is made to look like another host's, so nothing
    but the timeout frees it. Worker B labels the rest, waits for A's lease to expire, then finishes A's shard."""
    a = start_worker(tmp_path, "a", delay=0.3, timeout=2)
    wait_until(lambda: (tmp_path / "a.log.ready").exists())
    (tmp_path / "go").touch()
    store_dir, leases = tmp_path / "s", tmp_path / "s" / "leases"
    # Killed once one shard is written and the first image of the next one is scored (its second is under way).
    wait_until(lambda: len(scored(tmp_path, "a")) >= 3 and len(list(store_dir.glob("shard-*"))) == 1
               or a.poll() is not None)
    a.send_signal(signal.SIGKILL)
    assert a.wait() == -signal.SIGKILL
    written = sorted(p.name for p in store_dir.glob("shard-*"))
    held = [p for p in leases.glob("shard-*.lease")]
    assert written == ["shard-00000.parquet"] and [p.name for p in held] == ["shard-00001.0.lease"]
    fields = json.loads(held[0].read_text())
    held[0].write_text(json.dumps({**fields, "host": "ffffffff"}))  # as if A ran on another machine
    status = store_status(store_dir)
    assert [i for i, _ in status.leased] == [1] and status.done == [0] and len(status.left) == 6
    assert any("shard-00001" in line and "rank" not in line for line in status_lines(status))

    b = start_worker(tmp_path, "b", delay=0.0, timeout=2)
    assert b.wait(timeout=120) == 0
    assert time.time() - fields["heartbeat"] > 2  # it had to wait for the lease to expire (A's last sign of life)
    split, (ids, logodds, _) = reference(tmp_path, fmnist_test)
    by_a, by_b = scored(tmp_path, "a"), scored(tmp_path, "b")
    shard1 = split.sample_ids[2:4]
    assert set(shard1) <= set(by_b)  # A's shard was finished by B
    assert not set(by_a) & set(by_b) - set(shard1)  # and nothing A wrote was redone
    assert sorted(set(by_a + by_b)) == sorted(split.sample_ids)
    got = LabelStore.open(store_dir).read()
    assert got[0] == ids
    np.testing.assert_array_equal(got[1], logodds)
