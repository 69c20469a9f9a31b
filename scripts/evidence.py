"""Reproduce docs/evidence.md: does MaKD help on the embedded default, against honest baselines, beyond noise?

One command (`make evidence`, or `.venv/bin/python scripts/evidence.py`) runs, in order, the grids of
configs/evidence/ — the CE-only recipe search on the validation split, the KD teacher, the main comparison, the second
regime, the ablations of Q and alpha (and, after the main grid, the check that channels-last training costs CE
nothing) — then writes docs/evidence.md (and its figures in docs/evidence/) from their
results. Every run is an ordinary run folder under runs/evidence/: an interrupted evidence run resumes, finished runs
are read back. Hours on 2 CPU cores; `--dry-run` lists what is left, `--grids` runs some of the grids, and
`--report-only` rewrites the document from the runs finished so far (a grid with missing runs says so).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from makd.atomic import write_text
from makd.config import resolve_path
from makd.data import build_splits
from makd.experiment.grid import Grid
from makd.experiment.report import write_report
from makd.experiment.runner import DONE, finished, plan, run_grid
from makd.labels import label_from_config
from makd.questions import QuestionSet
from makd.report.compare import CONFIDENCE, paired_difference
from makd.report.teacher import teacher_quality

REPO = Path(__file__).resolve().parents[1]
GRIDS = REPO / "configs" / "evidence"
ORDER = ["recipe-search", "kd-teacher", "main", "layout", "regime", "ablations"]  # the order they run in
DOC = REPO / "docs" / "evidence.md"
FIGURES = REPO / "docs" / "evidence"


def ensure_labels(grid: Grid) -> None:
    """Label what the grid's cells train on (the bridge teacher, once per store; a finished store costs nothing).
    Cells on a question subset read a store cut from their method's store, made when the grid runs."""
    done: set[str] = set()
    for p in plan(grid, prepare=False):
        if grid.subset_setting(p.cell) or p.config.loss["aspect_bce"].weight == 0 or p.config.labels.path in done:
            continue
        done.add(p.config.labels.path)
        label_from_config(p.config)


def demo_store() -> tuple[Any, Any]:
    """The main grid's label store and config (the demo setting: training images and 1,000 test images)."""
    config = Grid.load(GRIDS / "main.yaml").config(Grid.load(GRIDS / "main.yaml").cells()[0])
    return label_from_config(config), config


def teacher_section(store: Any, config: Any) -> tuple[list[str], dict[str, Any]]:
    """How the teacher's class-level answers compare with the hand-written ones: what limits the method here."""
    questions = QuestionSet.load(resolve_path(config.questions))
    train = build_splits(config.data)["train"]
    quality = teacher_quality(questions, store.lookup(train.sample_ids)[0], train.targets)
    rows = sorted(quality["per_question"], key=lambda q: q["correlation"])
    lines = [f"Against the hand-written class answers of the question set, the bridge teacher's class-mean P(yes) on "
             f"the {quality['num_images']} training images correlates **{quality['mean_correlation']:.2f}** on average "
             f"over {quality['num_scored']} questions; **{quality['wrong_way']}** questions point the wrong way; the "
             f"answers are flat (mean per-question spread of P(yes) over images {quality['mean_spread']:.3f}).", "",
             "| question | r with hand-written answers | spread of P(yes) |", "|---|---|---|"]
    lines += [f"| {q['text']} | {q['correlation']:+.2f} | {q['spread']:.3f} |" for q in rows[:8]]
    lines += ["| … | | |"] + [f"| {q['text']} | {q['correlation']:+.2f} | {q['spread']:.3f} |" for q in rows[-5:]]
    return lines, quality


def grid_section(name: str, folder: Path) -> list[str]:
    """A grid's tables (its title dropped) with its figures copied next to this document."""
    FIGURES.mkdir(parents=True, exist_ok=True)
    text = (folder / "tables.md").read_text(encoding="utf-8").split("\n", 2)[2]
    text = "\n".join("#" + line if line.startswith("#") else line for line in text.splitlines())  # under this doc's ##
    for png in sorted(folder.glob("*.png")):
        target = FIGURES / f"{name}-{png.name}"
        shutil.copyfile(png, target)
        text = text.replace(f"]({png.name})", f"](evidence/{target.name})")
    return [text.strip()]


def runs_left(grid: Grid) -> tuple[int, int]:
    """(runs the grid has, runs not finished yet), not counting cells that reuse another cell's run."""
    cells = [p for p in plan(grid, prepare=False) if p.same_as is None]
    return len(cells), sum(p.status != DONE for p in cells)


def verdicts(summaries: dict[str, dict[str, Any]]) -> list[str]:
    """One sentence per comparison against CE, read off the paired t intervals (best-on-validation checkpoint)."""
    lines = []
    for grid, summary in summaries.items():
        if grid == "ablations":  # its plain comparison repeats main's on fewer seeds; its tables show the ablations
            continue
        for variant, numbers in summary["variants"].items():
            for method, entry in numbers["methods"].items():
                d = entry["best"].get("difference")
                if d is None:
                    continue
                last = entry["last"]["difference"]
                lines.append(f"- {grid} / {variant}: **{method}** vs {summary['reference']}: {d['mean']:+.2f} points "
                             f"[{d['low']:+.2f}, {d['high']:+.2f}] ({d['wins']}/{d['n']} seeds better) — "
                             f"**{d['verdict']}**; last epoch {last['mean']:+.2f} [{last['low']:+.2f}, "
                             f"{last['high']:+.2f}] — {last['verdict']}.")
    return lines


def ablation_family(summary: dict[str, Any]) -> list[str]:
    """The ablation cells as one family of comparisons against CE: each one's 95 % interval, and the Bonferroni
    intervals that keep the chance of any false verdict in the family at 5 % (at 95 % each, one cell in twenty
    looks better or worse by luck)."""
    cells: dict[str, dict[str, Any]] = {}
    for variant in summary["variants"].values():
        reference = variant["methods"].get(summary["reference"])
        for axis, methods in variant.get("ablations", {}).items():
            for method, values in methods.items():
                for value, entry in values.items():
                    # The default value's cell is one run set under every axis: count it once.
                    key = json.dumps(entry["best"]["per_seed"])
                    cells.setdefault(key, {"label": f"{method}, {axis} = {value}", "entry": entry, "reference": reference})
    if not cells or any(c["reference"] is None for c in cells.values()):
        return []
    level = 1 - (1 - CONFIDENCE) / len(cells)
    lines = [f"The {len(cells)} ablation cells are one family of comparisons against {summary['reference']}: at 95 % "
             f"each, about {len(cells) * (1 - CONFIDENCE):.1f} of them would look better or worse by chance alone. "
             f"Bonferroni intervals ({100 * level:.2f} % each, 95 % for the family):", "",
             "| cell | Δ [95 % t CI] | Δ [family-wise CI] | family-wise verdict |", "|---|---|---|---|"]
    for cell in cells.values():
        entry, reference = cell["entry"], cell["reference"]
        theirs = dict(zip(reference["seeds"], reference["best"]["per_seed"]))
        seeds = [s for s in entry["seeds"] if s in theirs]
        mine = dict(zip(entry["seeds"], entry["best"]["per_seed"]))
        wide = paired_difference([mine[s] for s in seeds], [theirs[s] for s in seeds], confidence=level)
        d = entry["best"]["difference"]
        lines.append(f"| {cell['label']} | {d['mean']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}] | "
                     f"{wide.mean:+.2f} [{wide.low:+.2f}, {wide.high:+.2f}] | {wide.verdict} |")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="list the runs each grid still needs")
    parser.add_argument("--grids", nargs="+", choices=ORDER, default=ORDER,
                        help="grids to run (default all, in order); the others enter the document with the runs they have")
    parser.add_argument("--report-only", action="store_true", help="rewrite the document from the finished runs; train nothing")
    args = parser.parse_args()
    os.chdir(REPO)
    start = time.perf_counter()
    grids = {name: Grid.load(GRIDS / f"{name}.yaml") for name in ORDER}
    if args.dry_run:
        for name, grid in grids.items():
            runs, left = runs_left(grid)
            print(f"{name}: {runs} runs, {left} to run")
        return 0
    summaries, sections, trained = {}, {}, {}
    for name, grid in grids.items():
        runs, left = runs_left(grid)  # counted when the grid's turn comes: earlier grids may have run its cells
        missing = [f"*{left} of {runs} runs not run yet: `.venv/bin/python scripts/evidence.py --grids {name}` "
                   "completes them.*", ""] if left else []
        if args.report_only or (name not in args.grids and left):
            outcome = finished(grid)
            if not outcome.results:
                sections[name] = missing
                continue
        else:
            ensure_labels(grid)
            outcome = run_grid(grid)
            missing = []
            if outcome.failed:
                print(f"makd: error: {name}: {len(outcome.failed)} run(s) failed: {next(iter(outcome.failed.values()))}",
                      file=sys.stderr)
                return 1
        for planned in outcome.plan:  # a run shared by two grids counts once
            if planned.cell.name in outcome.results:
                trained[str(planned.run)] = outcome.results[planned.cell.name].get("train_seconds") or 0.0
        folder = write_report(grid, outcome)
        summaries[name] = json.loads((folder / "summary.json").read_text())
        sections[name] = missing + grid_section(name, folder)
    teacher_lines, quality = teacher_section(*demo_store())
    hours = sum(trained.values()) / 3600
    write_text(DOC, render(sections, summaries, teacher_lines, quality, hours))
    print(f"wrote {DOC} ({len(trained)} runs, {hours:.1f} hours of training; this command {(time.perf_counter() - start) / 3600:.1f} h)")
    return 0


def render(sections: dict[str, list[str]], summaries: dict[str, dict[str, Any]], teacher: list[str],
           quality: dict[str, Any], hours: float) -> str:
    headline = headline_sentence(summaries["main"]) if "main" in summaries else "*The main comparison has not run yet.*"
    return "\n".join([
        "# Evidence: MaKD on the embedded default, against CE, a permuted control and classic distillation", "",
        "Reproduce: `make evidence` (= `.venv/bin/python scripts/evidence.py`), which runs the grids of "
        f"`configs/evidence/` and rewrites this file. Last run: {datetime.date.today().isoformat()}, "
        f"{hours:.1f} hours of training (summed over the runs shown, two at a time) on {os.cpu_count()} CPU cores "
        f"({platform.machine()}), runs in `runs/evidence/`.", "",
        "Setting: Fashion-MNIST, 20 training images per class (seeded), 100 validation images per class from the rest "
        "of the training set, the full 10,000-image test set; 40 hand-written yes/no questions; the offline bridge "
        "teacher (EfficientNet-Lite0 ImageNet posteriors x MiniLM relevance); a ResNet-8 (width 16) from scratch, 120 "
        "epochs. Paired seeds: a seed fixes the split, the initialisation and the batch order for "
        "every method. Test top-1 on class logits only; the checkpoint is chosen on validation (the last epoch is "
        "reported too).",
        "", "## Headline", "", headline, "", "## Every comparison against CE, as computed", "", *verdicts(summaries), "",
        "## 1. The fair recipe (chosen for CE only, on validation)", "",
        "Each change from the demo's original recipe was tried alone for CE, 4 paired seeds each, compared on the "
        "**validation** split (the test split was not looked at). Kept in `makd/configs/demo.yaml`: crop padding 2 "
        "— the only change ahead in every seed, though its interval still contains zero at 4 seeds. PyTorch's default init (for He fan-out), "
        "warm-up and Nesterov did not help; bfloat16 autocast and shorter schedules (which would have made seeds "
        "cheaper) cost validation accuracy. The `epochs` rows compare against the original recipe: against crop "
        "padding 2 at 120 epochs (its own row above) both shorter schedules lose more than a point.", "",
        *sections["recipe-search"], "",
        "## 1b. The memory layout: channels-last training (CE, validation, 20 paired seeds)", "",
        "On this CPU, channels-last (NHWC) tensors make a run about 1.2x faster (oneDNN skips a layout reorder around "
        "every convolution), but its batch-norm backward sums in a less careful order: gradients about 1e-3 off in "
        "relative terms, against 1e-6 in NCHW (both against float64). Adopted (`train.channels_last: true` in "
        "makd/configs/demo.yaml) because it costs CE nothing on validation at 20 paired seeds "
        "(`configs/evidence/layout.yaml`, its NCHW cells are the main grid's CE cells). The runs of the other grids "
        "here were trained in NCHW, before the change: a run in the other layout ends elsewhere by rounding alone, "
        "as a run on another thread count does, so rerunning them gives other per-seed numbers from the same "
        "distribution.", "",
        *sections["layout"], "",
        "## 2. Main comparison (20 paired seeds)", "",
        "KD, MaKD + KD and LS-KD distil a ResNet-14 trained by makd on the Fashion-MNIST training images outside the "
        "students' subset and validation split (`configs/evidence/kd-teacher.yaml`; its own numbers below). "
        "KD: CE x 0.1 + KD x 0.9 at T = 4 (mdistiller's setting); LS-KD: CE x 0.1 + KD on standardised logits x 9 at "
        "T = 2 (the logit-standardisation paper's CIFAR setting); MaKD + KD adds the aspect BCE x 4 to KD.", "",
        *sections["main"], "",
        "The KD teacher:", "", *sections["kd-teacher"], "",
        "## 3. Ablations (10 paired seeds): the number of questions Q and the aspect weight alpha", "",
        "Its CE and MaKD (Q = 40, alpha = 4) cells are the main grid's first 10 seeds: compare that row with the main "
        "comparison's to see how much 10 seeds move the estimate.", "",
        *(ablation_family(summaries["ablations"]) if "ablations" in summaries else []), "",
        *sections["ablations"], "",
        "## 4. A second regime: 10 training images per class", "", *sections["regime"], "",
        "## 5. The teacher: what limits the method here", "", *teacher, "",
    ])


def headline_sentence(summary: dict[str, Any]) -> str:
    main_numbers = summary["variants"]["default"]["methods"]
    makd, control = (main_numbers.get(m, {}).get("best", {}).get("difference") for m in ("MaKD", "permuted"))
    if makd is None or control is None:
        return "*The main comparison has too few finished runs for a headline yet.*"
    headline = (f"On the embedded default, MaKD changes test top-1 by **{makd['mean']:+.2f}** points over CE "
                f"(95 % CI [{makd['low']:+.2f}, {makd['high']:+.2f}], {makd['n']} paired seeds): "
                f"**{makd['verdict']}**. The permuted-target control: {control['mean']:+.2f} "
                f"[{control['low']:+.2f}, {control['high']:+.2f}] ({control['verdict']}).")
    if makd["low"] <= 0:
        headline += (" MaKD does not beat CE with an interval above zero here; the teacher section below shows what "
                     "limits it.")
    return headline


if __name__ == "__main__":
    sys.exit(main())
