"""Label store at ImageNet scale: write, load into the training join, peak memory — against the official JSON.

1,281,167 samples x 50 questions of synthetic float32 log-odds and mass, stored the way `makd label` stores them
(`label_split`: Parquet shards of `labels.shard_size` rows, labels.json, and the consolidated, memory-mapped
labels.arrow), then loaded the way `makd train` loads them (`LabelStore.lookup(train sample ids)`, which
joins by sample id). The first pass over all targets (what the first epoch reads) is timed separately, since a
memory-mapped load defers page faults to it. The official format is one JSON object
`{image_name: [p_1, ..., p_50]}`, loaded with `json.load` and joined by name the same way.
Each load runs in a fresh process (cold Python, warm page cache), whose peak RSS is reported.
Last line: `load_s=<makd load> speedup_vs_json=<json load / makd load>`.

    .venv/bin/python benchmarks/label_store.py [--samples 1281167] [--questions 50] [--shard-size 512]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from makd.labels.store import TABLE_FILE

# Libraries are imported before the clock starts in both children (pyarrow imports pandas on first use).
LOAD_MAKD = """
import sys, time, numpy as np, pandas
from makd.labels import LabelStore
n, q = int(sys.argv[2]), int(sys.argv[3])
ids = [f"train/n{i // 1300:05d}/img_{i:07d}.JPEG" for i in range(n)]
t = time.perf_counter()
logodds, mass = LabelStore.open(sys.argv[1]).lookup(ids)
elapsed = time.perf_counter() - t
assert logodds.shape == (n, q) and mass.shape == (n, q) and logodds.dtype == np.float32
t = time.perf_counter()
float(logodds.sum()) + float(mass.sum())  # the first epoch reads every row once
first_pass = time.perf_counter() - t
peak_kb = next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM"))
print(elapsed, first_pass, float(logodds[12345, 7]), peak_kb)
"""

LOAD_JSON = """
import sys, time, json, numpy as np, pandas
n, q = int(sys.argv[2]), int(sys.argv[3])
ids = [f"train/n{i // 1300:05d}/img_{i:07d}.JPEG" for i in range(n)]
t = time.perf_counter()
with open(sys.argv[1]) as f:
    data = json.load(f)
p = np.array([data[i] for i in ids], dtype=np.float32)
elapsed = time.perf_counter() - t
assert p.shape == (n, q)
t = time.perf_counter()
float(p.sum())
first_pass = time.perf_counter() - t
peak_kb = next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM"))
print(elapsed, first_pass, float(np.log(p[12345, 7] / (1 - p[12345, 7]))), peak_kb)
"""


def sample_ids(n: int) -> list[str]:
    """ImageNet-like relative paths (the sample ids of an ImageFolder tree)."""
    return [f"train/n{i // 1300:05d}/img_{i:07d}.JPEG" for i in range(n)]


def timed_child(code: str, path: Path, n: int, q: int) -> tuple[float, float, float, float]:
    """(load seconds, first-pass seconds, a checked value, the child's peak RSS in GB), as the child reports."""
    argv = [sys.executable, "-c", code, str(path), str(n), str(q)]
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    seconds, first_pass, value, peak_kb = (float(x) for x in out.split())
    return seconds, first_pass, value, peak_kb / 1024 / 1024


class SyntheticTeacher:
    """Returns precomputed rows by sample id, so `makd label`'s own writer does the writing."""

    name = "synthetic"
    inputs = frozenset({"sample_ids"})

    def __init__(self, logodds: np.ndarray, mass: np.ndarray, batch_size: int) -> None:
        self.logodds, self.mass, self.batch_size = logodds, mass, batch_size

    def describe(self) -> dict:
        return {"name": self.name}

    def score(self, images, questions, sample_ids):
        from makd.teachers.base import AspectScores

        rows = [int(sid[-12:-5]) for sid in sample_ids]  # ".../img_0001234.JPEG"
        return AspectScores(self.logodds[rows], self.mass[rows])


def write_store(folder: Path, ids: list[str], logodds: np.ndarray, mass: np.ndarray, shard_size: int) -> None:
    """`label_split`, the writer of `makd label`: atomic Parquet shards, then the consolidated table."""
    from makd.data.base import ImageSplit
    from makd.labels import label_split
    from makd.questions import QuestionSet

    classes = [f"n{c:05d}" for c in range(-(-len(ids) // 1300))]
    split = ImageSplit("train", ids, np.arange(len(ids)) // 1300, classes, paths=[Path(i) for i in ids])
    questions = QuestionSet.model_validate({"name": "benchmark", "classes": classes, "questions": [
        {"id": f"q{j}", "text": f"Is this question number {j}?"} for j in range(logodds.shape[1])]})
    label_split(split, SyntheticTeacher(logodds, mass, batch_size=shard_size), questions, folder,
                shard_size=shard_size, progress=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=1_281_167)
    parser.add_argument("--questions", type=int, default=50)
    parser.add_argument("--shard-size", type=int, default=512, help="labels.shard_size (makd's default: 512)")
    args = parser.parse_args()
    n, q = args.samples, args.questions
    rng = np.random.default_rng(0)
    logodds = rng.normal(0, 2, (n, q)).astype(np.float32)
    mass = rng.uniform(0.5, 1, (n, q)).astype(np.float32)
    ids = sample_ids(n)
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        store, official = Path(tmp) / "store", Path(tmp) / "official.json"
        store.mkdir()
        t = time.perf_counter()
        write_store(store, ids, logodds, mass, args.shard_size)
        write_makd = time.perf_counter() - t
        p = 1 / (1 + np.exp(-logodds.astype(np.float64)))
        t = time.perf_counter()
        with open(official, "w") as f:
            json.dump({sid: row for sid, row in zip(ids, p.tolist())}, f)
        write_json = time.perf_counter() - t
        size_shards = sum(f.stat().st_size for f in store.glob("shard-*.parquet")) / 1e9
        size_table = (store / TABLE_FILE).stat().st_size / 1e9
        size_json = official.stat().st_size / 1e9
        load_makd, pass_makd, value_makd, rss_makd = timed_child(LOAD_MAKD, store, n, q)
        load_json, pass_json, value_json, rss_json = timed_child(LOAD_JSON, official, n, q)
    assert abs(value_makd - logodds[12345, 7]) < 1e-6 and abs(value_json - logodds[12345, 7]) < 1e-4
    print(f"{n:,} samples x {q} questions (log-odds + mass, float32), {-(-n // args.shard_size):,} shards of "
          f"{args.shard_size}; {os.cpu_count()} CPUs; warm page cache; each load in a fresh process")
    print()
    print("| format | write (s) | on disk (GB) | load + join by sample id (s) | first pass over all targets (s) "
          "| peak RSS (GB) |")
    print("|---|---|---|---|---|---|")
    print(f"| makd label store (Parquet shards + {TABLE_FILE}) | {write_makd:.1f} | {size_shards:.2f} + "
          f"{size_table:.2f} | {load_makd:.3f} | {pass_makd:.2f} | {rss_makd:.2f} |")
    print(f"| official JSON (P(yes) only) | {write_json:.1f} | {size_json:.2f} | {load_json:.2f} | {pass_json:.2f} "
          f"| {rss_json:.2f} |")
    print()
    print(f"load_s={load_makd:.3f} speedup_vs_json={load_json / load_makd:.1f}")


if __name__ == "__main__":
    main()
