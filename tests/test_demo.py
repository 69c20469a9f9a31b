"""`makd demo` end to end on a shrunken setting: every artifact exists and agrees with the runs behind it."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from support.cli import run_makd

from makd.config import resolve_path
from makd.data.fashion_mnist import load_fashion_mnist
from makd.labels import LabelStore
from makd.questions import QuestionSet

pytestmark = pytest.mark.slow

SMALL = ["--seeds", "2", "--no-progress", "train.epochs=2", "train.eval_every=1", "data.train_per_class=5",
         "data.val_per_class=5", "data.test_per_class=10", "labels.max_per_class.test=6"]


def run_demo(out, *extra):
    """`makd demo` as a user runs it: its own process, runs in two worker processes."""
    return subprocess.run([sys.executable, "-m", "makd", "demo", "--out", str(out), "--workers", "2", *SMALL, *extra],
                          capture_output=True, text=True, timeout=900)


def test_demo_small(tmp_path):
    out = tmp_path / "demo"
    proc = run_demo(out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| MaKD | 2 |" in proc.stdout and "report:" in proc.stdout

    store = LabelStore.open(out / "labels")
    assert store.meta["num_samples"] == 50 + 60 and not store.missing_shards()

    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["methods"]) == {"CE", "MaKD", "permuted"}
    for method, slug in (("CE", "ce"), ("MaKD", "makd"), ("permuted", "permuted")):
        per_seed = [json.loads((out / "runs" / f"{slug}-s{s}" / "results.json").read_text())["test_top1_best"] for s in (0, 1)]
        assert summary["methods"][method]["best"]["per_seed"] == per_seed
    diff = summary["methods"]["MaKD"]["best"]["difference"]
    ce, makd = summary["methods"]["CE"]["best"]["per_seed"], summary["methods"]["MaKD"]["best"]["per_seed"]
    assert diff["mean"] == pytest.approx(sum(m - c for m, c in zip(makd, ce)) / 2)
    half = 12.706204736174707 * abs((makd[0] - ce[0]) - (makd[1] - ce[1])) / 2  # t(0.975, 1 df) · sd / sqrt(2)
    assert (diff["mean"] - diff["low"], diff["high"] - diff["mean"]) == pytest.approx((half, half))
    # Each run trained in its own folder (two worker processes) under the embedded recipe.
    assert (out / "runs" / "makd-s1" / "checkpoints" / "last.pt").is_file()
    assert "crop_padding: 2" in (out / "runs" / "makd-s1" / "config.yaml").read_text()
    rows = (out / "comparison" / "results.csv").read_text().splitlines()
    assert len(rows) == 1 + 6 and rows[0].startswith("run,method,")
    # The permuted control really trained on other images' targets, and the CE run had no aspect head.
    assert "permute: images" in (out / "runs" / "permuted-s0" / "config.yaml").read_text()
    assert "aspect_agreement_best" not in json.loads((out / "runs" / "ce-s0" / "results.json").read_text())

    report = (out / "report.md").read_text()
    assert "| permuted | 2 |" in report and "hand-written" in report
    for png in ("accuracy.png", "aspect_agreement.png", "teacher_quality.png", "predictions.png"):
        with Image.open(out / png) as img:
            assert img.format == "PNG" and img.size[0] > 300
    quality = json.loads((out / "teacher_quality.json").read_text())
    assert len(quality["per_question"]) == 40
    # Recomputed: class-mean P(yes) on the training images against the hand-written answers, per question.
    train_ids = json.loads((out / "runs" / "ce-s0" / "splits.json").read_text())["train"]["sample_ids"]
    labels = load_fashion_mnist("train").targets[[int(sid.split("/")[1]) for sid in train_ids]]
    p_yes = 1 / (1 + np.exp(-store.lookup(train_ids)[0].astype(np.float64)))
    reference = QuestionSet.load(resolve_path("makd:fashion_mnist/questions.json")).reference_answers()
    means = np.stack([p_yes[labels == c].mean(0) for c in range(10)])
    r = [np.corrcoef(means[:, j], reference[:, j])[0, 1] for j in range(40) if means[:, j].std() * reference[:, j].std() > 0]
    assert quality["mean_correlation"] == pytest.approx(np.mean(r))

    # Re-running resumes: nothing is retrained, the summary is the same (in this process: the same command).
    mtime = (out / "runs" / "makd-s1" / "best.safetensors").stat().st_mtime_ns
    run_makd("demo", "--out", out, "--workers", "2", *SMALL)
    assert (out / "runs" / "makd-s1" / "best.safetensors").stat().st_mtime_ns == mtime
    assert json.loads((out / "summary.json").read_text())["methods"] == summary["methods"]


def test_demo_runs_on_a_selected_question_set_without_hand_written_answers(tmp_path):
    """What `makd questions select` writes has no class answers: the demo runs on it and says it cannot judge."""
    from makd.config import resolve_path
    from makd.questions import QuestionSet

    embedded = QuestionSet.load(resolve_path("makd:fashion_mnist/questions.json"))
    chosen = embedded.model_dump()
    chosen["questions"] = [{**q, "class_answers": None} for q in chosen["questions"][:6]]
    chosen["generation"] = {"source": "selected (test)"}
    path = tmp_path / "selected.json"
    QuestionSet.model_validate(chosen).save(path)

    out = tmp_path / "demo"  # in this process, one run after the other: what differs is the question set, not how runs run
    run_makd("demo", "--out", out, "--workers", "1", *SMALL, f"questions={path}", "train.epochs=1", "data.train_per_class=2",
             "data.val_per_class=2", "data.test_per_class=4", "labels.max_per_class.test=2")
    assert LabelStore.open(out / "labels").num_questions == 6
    assert not (out / "teacher_quality.json").exists()
    report = (out / "report.md").read_text()
    assert "no hand-written class answers" in report and "6 yes/no questions (selected (test)" in report
