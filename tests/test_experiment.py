"""`makd experiment`: grid expansion, cells as ordinary run folders, skip/resume, statistics and tables."""

from __future__ import annotations

import csv
import datetime
import json
import logging
import re

import numpy as np
import pytest
import yaml
from conftest import label_tiny_splits, make_question_set
from scipy import stats

from makd.cli import main as cli_main
from makd.config import load_config
from makd.errors import MakdError
from makd.experiment.grid import Grid
from makd.experiment.report import write_report
from makd.experiment.runner import DONE, TODO, finished, plan, run_grid
from makd.labels import LabelStore
from makd.report.compare import paired_difference

TINY = ["data.train_per_class=4", "data.val_per_class=2", "data.test_per_class=3", "model.width=4",
        "train.epochs=2", "train.eval_every=1", "train.batch_size=8", "train.progress=false", "train.tensorboard=false"]


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    return label_tiny_splits(tmp_path_factory.mktemp("exp-labels"), TINY)


def grid_file(tmp_path, labelled, **extra) -> object:
    spec = {"name": "tiny", "out": "out", "overrides": TINY + [f"questions={labelled / 'q.json'}",
                                                               f"labels.path={labelled / 'labels'}"],
            "methods": {"CE": ["loss.aspect_bce.weight=0"], "MaKD": None}, "seeds": 2, **extra}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_cells_cross_variants_methods_seeds_and_one_factor_ablations(tmp_path, labelled):
    path = grid_file(tmp_path, labelled, variants={"width": {"w4": None, "w8": ["model.width=8"]}},
                     ablations={"alpha": {"values": {"1": ["loss.aspect_bce.weight=1"], "8": ["loss.aspect_bce.weight=8"]},
                                          "seeds": 1}})
    grid = Grid.load(path)
    names = [c.name for c in grid.cells()]
    # 2 seeds x 2 widths x (CE, MaKD) + the ablation on MaKD only (not the reference), first seed only
    assert len(names) == 2 * 2 * 2 + 2 * 2 and len(set(names)) == len(names)
    assert names[:6] == ["w4-ce-s0", "w4-makd-s0", "w4-makd-alpha1-s0", "w4-makd-alpha8-s0", "w8-ce-s0", "w8-makd-s0"]
    assert not any("alpha" in n and n.endswith("-s1") for n in names)
    config = grid.config(next(c for c in grid.cells() if c.name == "w8-makd-alpha8-s0"))
    assert (config.model.width, config.loss["aspect_bce"].weight, config.train.seed) == (8, 8.0, 0)
    assert config.out == str(tmp_path / "out" / "runs" / "w8-makd-alpha8-s0") and config.name == "w8-makd-alpha8-s0"
    ce = grid.config(next(c for c in grid.cells() if c.name == "w4-ce-s1"))
    assert ce.loss["aspect_bce"].weight == 0 and ce.train.seed == 1 and ce.model.width == 4


def test_bad_grids_are_one_line_errors(tmp_path, labelled):
    with pytest.raises(MakdError, match=r"reference: 'KD' is not one of the methods"):
        Grid.load(grid_file(tmp_path, labelled, reference="KD"))
    with pytest.raises(MakdError, match=r"ablations.q.methods: 'LS' is not one of the methods"):
        Grid.load(grid_file(tmp_path, labelled, ablations={"q": {"methods": ["LS"], "values": {"2": {"subset_questions": 2}}}}))
    with pytest.raises(MakdError, match=r"ablations.q.seeds: 3 is more than the grid's 2 seeds"):
        Grid.load(grid_file(tmp_path, labelled, ablations={"q": {"seeds": 3, "values": {"2": {"subset_questions": 2}}}}))


def test_run_skip_report_and_refuse_a_changed_cell(tmp_path, labelled, monkeypatch):
    path = grid_file(tmp_path, labelled, ablations={"Q": {"values": {"2": {"subset_questions": 2, "subset_seed": 3}}, "seeds": 1}})
    grid = Grid.load(path)
    assert {p.status for p in plan(grid, prepare=False)} == {TODO}
    assert not (tmp_path / "out" / "subsets").exists()  # a dry plan writes nothing
    outcome = run_grid(grid, progress=False)
    assert set(outcome.results) == {"ce-s0", "makd-s0", "makd-q2-s0", "ce-s1", "makd-s1"} and not outcome.failed
    # The Q ablation trained on a seeded subset of the questions, cut from the grid's label store.
    subset_run = outcome.results["makd-q2-s0"]
    assert len(subset_run["aspect_agreement_best"]["per_question_correlation"]) == 2
    run_config = load_config(tmp_path / "out" / "runs" / "makd-q2-s0" / "config.yaml")
    subset = LabelStore.open(run_config.labels.path)
    full_ids, full, _ = LabelStore.open(labelled / "labels").read()
    ids, part, _ = subset.read()
    chosen = sorted(np.random.default_rng(3).choice(4, size=2, replace=False).tolist())
    assert ids == full_ids and np.array_equal(part, full[:, chosen])

    folder = write_report(grid, outcome)
    rows = list(csv.DictReader((folder / "results.csv").open()))
    assert len(rows) == 5 and {r["method"] for r in rows} == {"CE", "MaKD"}
    by_run = {r["run"]: r for r in rows}
    assert float(by_run["makd-s1"]["test_top1_best"]) == pytest.approx(outcome.results["makd-s1"]["test_top1_best"])
    summary = json.loads((folder / "summary.json").read_text())
    diff = summary["variants"]["default"]["methods"]["MaKD"]["best"]["difference"]
    makd = [outcome.results[f"makd-s{s}"]["test_top1_best"] for s in (0, 1)]
    ce = [outcome.results[f"ce-s{s}"]["test_top1_best"] for s in (0, 1)]
    d = np.subtract(makd, ce)  # the t interval computed directly from the two cells' own results (d may be all 0 here)
    half = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
    assert (diff["mean"], diff["low"], diff["high"]) == pytest.approx((d.mean(), d.mean() - half, d.mean() + half))
    tables = (folder / "tables.md").read_text()
    assert "| MaKD | 2 |" in tables and "### Ablation: Q (default)" in tables and "| MaKD | 2 | 1 |" in tables
    assert (folder / "tables.tex").read_text().count(r"\\") >= 2 and (folder / "ablation-Q-default.png").stat().st_size > 0

    # Finished cells are read back, never retrained.
    import makd.experiment.executors as executors

    monkeypatch.setattr(executors, "train", lambda config: pytest.fail(f"retrained {config.name}"))
    assert {p.status for p in plan(grid)} == {DONE}
    assert set(run_grid(grid, progress=False).results) == set(outcome.results)
    # A cell whose folder holds a run of another config is refused, not silently reused.
    changed = Grid.load(path, ["train.epochs=3"])
    with pytest.raises(MakdError, match=r"holds a run with another train.epochs"):
        plan(changed)

    # `--report` tables what has finished so far and trains nothing (the monkeypatch above still fails any training).
    (tmp_path / "out" / "runs" / "ce-s1" / "results.json").unlink()
    assert set(finished(grid).results) == set(outcome.results) - {"ce-s1"}
    assert cli_main(["experiment", str(path), "--report", "--no-progress"]) == 0
    assert [r["run"] for r in csv.DictReader((folder / "results.csv").open())] == ["ce-s0", "makd-s0", "makd-q2-s0", "makd-s1"]
    assert not (tmp_path / "out" / "runs" / "ce-s1" / "results.json").exists()


def test_bootstrap_and_t_intervals_of_a_paired_difference():
    rng = np.random.default_rng(0)
    base = rng.normal(70, 1, size=20)
    better = base + 0.5 + rng.normal(0, 0.3, size=20)
    d = paired_difference(better, base)
    diff = better - base
    assert d.mean == pytest.approx(diff.mean()) and d.wins == int((diff > 0).sum()) and d.n == 20
    # The t interval is scipy's paired t-test's; the bootstrap interval is scipy's percentile bootstrap of the mean
    # (another resampling stream: equal within the Monte-Carlo error of 10,000 resamples, ~0.005 here).
    t = stats.ttest_rel(better, base).confidence_interval(0.95)
    assert (d.low, d.high) == pytest.approx((t.low, t.high), abs=1e-12)
    boot = stats.bootstrap((diff,), np.mean, confidence_level=0.95, method="percentile", n_resamples=100_000,
                           random_state=np.random.default_rng(1)).confidence_interval
    assert (d.boot_low, d.boot_high) == pytest.approx((boot.low, boot.high), abs=0.01)
    assert d.low > 0 and d.verdict == "better"
    noise = paired_difference(base + rng.normal(0, 1, size=20), base)
    assert noise.low < 0 < noise.high and noise.verdict == "within noise"
    worse = paired_difference(base - 2, base + rng.normal(0, 0.1, size=20))
    assert worse.verdict == "worse"


@pytest.mark.slow
def test_slurm_cells_run_as_one_array_at_most_array_parallelism_at_once(tmp_path, labelled, caplog):
    """submitit's local cluster has no arrays: makd keeps the window itself (on Slurm: --array=0-1%1)."""
    path = grid_file(tmp_path, labelled, seeds=1, executor={"name": "slurm", "cluster": "local", "array_parallelism": 1},
                     overrides=[*TINY, "train.epochs=1", f"questions={labelled / 'q.json'}", f"labels.path={labelled / 'labels'}"])
    with caplog.at_level(logging.INFO, logger="makd.experiment"):
        outcome = run_grid(Grid.load(path), progress=False)
    assert set(outcome.results) == {"ce-s0", "makd-s0"} and not outcome.failed
    assert outcome.results["makd-s0"]["aspect_agreement_best"]["num_images"] == 30
    assert "2 job(s) as one array on the local cluster, at most 1 at once; time limit 240 min a job" in caplog.text
    spans = sorted(job_span(log) for log in (tmp_path / "out" / "submitit").glob("*_0_log.*") if "Starting" in log.read_text())
    assert len(spans) == 2 and spans[0][1] <= spans[1][0]  # the second job started after the first had finished


def job_span(log) -> tuple[datetime.datetime, datetime.datetime]:
    """(start, end) of a submitit job from its log's time stamps."""
    stamps = re.findall(r"\((\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\) - (Starting with|Job completed successfully)",
                        log.read_text())
    times = {what: datetime.datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f") for stamp, what in stamps}
    return times["Starting with"], times["Job completed successfully"]


def test_an_ablation_value_equal_to_the_default_reuses_the_methods_cell_and_the_reference_can_be_ablated(tmp_path, labelled):
    path = grid_file(tmp_path, labelled, seeds=1, metric="val_top1",
                     ablations={"alpha": {"methods": ["MaKD"], "values": {"4": None, "8": ["loss.aspect_bce.weight=8"]}},
                                "lr": {"methods": ["CE"], "values": {"0.2": ["optim.lr=0.2"]}}})
    grid = Grid.load(path)
    planned = {p.cell.name: p for p in plan(grid, prepare=False)}
    assert planned["makd-alpha4-s0"].same_as == "makd-s0" and planned["makd-alpha8-s0"].same_as is None
    outcome = run_grid(grid, progress=False)
    assert not (tmp_path / "out" / "runs" / "makd-alpha4-s0").exists()  # not trained twice
    folder = write_report(grid, outcome)
    tables = (folder / "tables.md").read_text()
    assert "validation top-1" in tables and "test top-1" not in tables
    summary = json.loads((folder / "summary.json").read_text())["variants"]["default"]["ablations"]
    assert set(summary["alpha"]["MaKD"]) == {"4", "8"} and set(summary["lr"]["CE"]) == {"0.2"}
    d = summary["alpha"]["MaKD"]["4"]["best"]["difference"]  # alpha = 4 is the MaKD run itself, against CE
    assert d["mean"] == pytest.approx(outcome.results["makd-s0"]["val_top1_best"] - outcome.results["ce-s0"]["val_top1_best"])
    lr = summary["lr"]["CE"]["0.2"]["best"]["difference"]
    assert lr["mean"] == pytest.approx(outcome.results["ce-lr0.2-s0"]["val_top1_best"] - outcome.results["ce-s0"]["val_top1_best"])
    rows = list(csv.DictReader((folder / "results.csv").open()))
    assert sorted(r["run"] for r in rows) == ["ce-lr0.2-s0", "ce-s0", "makd-alpha8-s0", "makd-s0"]


def test_subset_questions_larger_than_the_question_set_is_one_line(tmp_path, labelled):
    path = grid_file(tmp_path, labelled, ablations={"Q": {"values": {"9": {"subset_questions": 9}}}})
    with pytest.raises(MakdError, match=r"^subset_questions: 9 asked, the question set .*q\.json has 4$"):
        plan(Grid.load(path))


def test_a_failing_cell_leaves_the_others_results_and_exits_1(tmp_path, labelled, capsys):
    path = grid_file(tmp_path, labelled, seeds=1, methods={"CE": ["loss.aspect_bce.weight=0"],
                                                           "broken": ["model.name=resnet9000"], "MaKD": None})
    assert cli_main(["experiment", str(path), "--no-progress"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "makd: error: 1 cell(s) failed (listed in tables.md); re-run to retry them"
    folder = tmp_path / "out" / "tiny"
    assert [r["run"] for r in csv.DictReader((folder / "results.csv").open())] == ["ce-s0", "makd-s0"]
    assert "- `broken-s0`: model.name: unknown model 'resnet9000'" in (folder / "tables.md").read_text()
    assert json.loads((tmp_path / "out" / "runs" / "makd-s0" / "results.json").read_text())["test_top1_best"] >= 0


def test_worker_processes_run_without_epoch_bars():
    """Two workers' epoch bars would overwrite each other under the grid's bar: their jobs run quiet."""
    from makd.experiment.executors import Job

    job = Job(({"name": "ce-s0", "train": {"progress": True, "epochs": 3}},))
    assert job.quiet().configs == ({"name": "ce-s0", "train": {"progress": False, "epochs": 3}},)
    assert job.configs[0]["train"]["progress"] is True and job.quiet().names == ["ce-s0"]


@pytest.mark.slow
def test_the_grid_labels_the_store_its_cells_learn_from_once_before_training_them(tmp_path, caplog):
    """No `makd label` first: the MaKD cell and its permuted control share one store, labelled once (through the
    grid's executor: here one local worker, in this process); the CE cell needs none."""
    from support.random_models import save_random_lm

    from makd.data import build_splits
    from makd.experiment.runner import stores_to_label

    tiny = ["data.train_per_class=2", "data.val_per_class=1", "data.test_per_class=1", "model.width=4",
            "train.epochs=1", "train.batch_size=8", "train.progress=false", "train.tensorboard=false"]
    make_question_set(build_splits(load_config(overrides=tiny).data)["train"].class_names, n=3).save(tmp_path / "q.json")
    spec = {"name": "auto", "out": "out", "seeds": 1,
            "overrides": tiny + ["questions=q.json", "labels.path=store", "labels.shard_size=8", "teacher.name=text",
                                 f"teacher.model={save_random_lm(tmp_path / 'lm')}"],
            "methods": {"CE": ["loss.aspect_bce.weight=0"], "MaKD": None, "permuted": ["labels.permute=images"]}}
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(spec))
    grid = Grid.load(tmp_path / "grid.yaml")
    assert list(stores_to_label(grid)) == [str(tmp_path / "store")]
    with caplog.at_level(logging.INFO, logger="makd.experiment"):
        outcome = run_grid(grid, progress=False)
    assert set(outcome.results) == {"ce-s0", "makd-s0", "permuted-s0"} and not outcome.failed
    assert caplog.text.count("labelling") == 1 and LabelStore.open(tmp_path / "store").check().complete
    assert stores_to_label(grid) == {}  # made: a re-run labels nothing


def test_cells_that_share_a_store_must_agree_on_what_it_is_made_from(tmp_path):
    from makd.experiment.runner import stores_to_label

    spec = {"name": "clash", "out": "out", "overrides": ["labels.path=store", "questions=q.json"], "seeds": 1,
            "variants": {"data": {"few": ["data.train_per_class=2"], "more": ["data.train_per_class=4"]}},
            "methods": {"MaKD": None, "permuted": ["labels.permute=images"]}}
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(MakdError, match=r"cells few-makd-s0 and more-makd-s0 learn from the label store .*store but "
                                        r"label it with different data settings"):
        stores_to_label(Grid.load(tmp_path / "grid.yaml"))
    same = Grid.load(tmp_path / "grid.yaml", ["data.train_per_class=3"])  # permute alone differs: one store
    assert list(stores_to_label(same)) == [str(tmp_path / "store")]
    with pytest.raises(MakdError, match="executor.batch_seeds trains several seeds as one model in one process"):
        run_grid(same, same.spec.executor.model_copy(update={"name": "slurm", "batch_seeds": 2, "gpus": 2}))
