"""`makd experiment` as a library call: plan the cells of a grid, run the missing ones, collect the results.

Finished cells (a results.json written with the same config) are read back, interrupted ones resume from their
checkpoint, a cell whose folder holds a run of another config is an error (never silently reused). The label
stores the cells learn from are made first, once each, through the same executor as the cells.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from makd.atomic import read_json
from makd.config import Config, load_config, resolve_path, to_dict
from makd.engine.trainer import config_changes
from makd.errors import MakdError
from makd.experiment.executors import EXECUTORS, Job, SampleSource, job_configs, label_workers
from makd.experiment.grid import Cell, Executor, Grid
from makd.labels import LabelStore, samples_to_label
from makd.labels.store import META_FILE
from makd.questions import QuestionSet

log = logging.getLogger("makd.experiment")
DONE, PARTIAL, TODO = "done", "resume", "todo"


@dataclass
class PlannedCell:
    cell: Cell
    config: Config
    status: str
    same_as: str | None = None  # an earlier cell with the same config (an ablation value equal to the default)

    @property
    def run(self) -> Path:
        return Path(self.config.out)


@dataclass
class Outcome:
    """What running a grid gave: a row per finished cell, and the cells that failed (with the reason)."""

    plan: list[PlannedCell]
    results: dict[str, dict[str, Any]] = field(default_factory=dict)  # cell name -> results.json
    failed: dict[str, str] = field(default_factory=dict)


def status_of(config: Config) -> str:
    run = Path(config.out)
    saved = run / "config.yaml"
    if saved.is_file():
        changed = config_changes(to_dict(load_config(saved)), to_dict(config))
        if changed:
            raise MakdError(f"{run} holds a run with another {changed[0]}: use another grid `out`, or delete that "
                            "folder to rerun the cell")
    if (run / "results.json").is_file():
        return DONE
    return PARTIAL if (run / "checkpoints").is_dir() else TODO


def question_subset(config: Config, size: int, seed: int, folder: Path, write: bool = True) -> tuple[str, str]:
    """A seeded subset of `size` of the config's questions, as a question set and a label store cut from the
    config's store (no teacher runs again); made once, reused by every cell that asks for it."""
    questions = QuestionSet.load(resolve_path(config.questions or ""))
    if size > len(questions):
        raise MakdError(f"subset_questions: {size} asked, the question set {config.questions} has {len(questions)}")
    out = folder / f"{questions.hash.split(':')[-1][:8]}-q{size}-seed{seed}"
    chosen = sorted(np.random.default_rng(seed).choice(len(questions), size=size, replace=False).tolist())
    subset = questions.model_copy(update={"name": f"{questions.name or 'questions'}-subset{size}",
                                          "questions": tuple(questions.questions[i] for i in chosen)})
    subset = type(questions).model_validate(subset.model_dump())
    if write and not (out / "labels" / "labels.json").is_file():
        subset.save(out / "questions.json")
        LabelStore.open(config.labels.path).subset(subset, out / "labels")
    return str(out / "questions.json"), str(out / "labels")


def plan(grid: Grid, prepare: bool = True) -> list[PlannedCell]:
    """Every cell with its resolved config and status; `prepare` writes the question subsets cells need."""
    planned: list[PlannedCell] = []
    seen: dict[str, PlannedCell] = {}
    for cell in grid.cells():
        subset = grid.subset_setting(cell)
        paths = None
        if subset is not None:
            paths = question_subset(grid.config(cell), subset.subset_questions, subset.subset_seed, grid.out / "subsets",
                                    write=prepare)
        config = grid.config(cell, paths)
        key = json.dumps({k: v for k, v in to_dict(config).items() if k not in ("name", "out")}, sort_keys=True)
        if key in seen:  # e.g. alpha = 4 in an ablation whose default is 4: the method's own cell, not a new run
            first = seen[key]
            planned.append(PlannedCell(cell, first.config, first.status, same_as=first.cell.name))
            continue
        planned_cell = PlannedCell(cell, config, status_of(config))
        seen[key] = planned_cell
        planned.append(planned_cell)
    return planned


def batch_jobs(cells: Sequence[PlannedCell], batch_seeds: int) -> list[Job]:
    """Jobs of up to `batch_seeds` cells that differ only in their seed (trained as one batched model when the
    engine can); every other cell is a job of its own."""
    if batch_seeds <= 1:
        return [job_configs([c.config]) for c in cells]
    groups: dict[str, list[PlannedCell]] = {}
    for c in cells:
        key = c.cell.name.rsplit("-s", 1)[0]
        groups.setdefault(key, []).append(c)
    jobs = []
    for members in groups.values():
        for start in range(0, len(members), batch_seeds):
            jobs.append(job_configs([m.config for m in members[start:start + batch_seeds]]))
    return jobs


# What a store is made from: what `makd label` reads (labels.permute only decides how a cell uses the store).
LABELLING_KEYS = ("task", "questions", "data", "teacher", "detection")


def made_from(config: Config) -> dict[str, Any]:
    settings = to_dict(config)
    return {**{k: settings[k] for k in LABELLING_KEYS},
            "labels": {k: v for k, v in settings["labels"].items() if k != "permute"}}


def needs_labels(config: Config) -> bool:
    """Does the cell's loss learn from teacher answers (a term registered with needs_aspects, weight > 0)?"""
    from makd.losses import LOSSES

    return any(term.weight > 0 and name in LOSSES.names() and LOSSES.entry(name).info.get("needs_aspects")
               for name, term in config.loss.items())


def stores_to_label(grid: Grid) -> dict[str, Config]:
    """The label stores the grid's cells learn from that are missing or incomplete, each with the config of the
    first cell that needs it. Cells that share a store must agree on what it is made from."""
    stores: dict[str, tuple[Cell, Config, dict[str, Any]]] = {}
    for cell in grid.cells():
        config = grid.config(cell)  # the cell's own store (a question subset is cut from it afterwards)
        if not needs_labels(config) or not config.labels.path:
            continue  # (the cell itself says what is missing)
        path, settings = str(config.labels.path), made_from(config)
        first, _, first_settings = stores.setdefault(path, (cell, config, settings))
        differ = [k for k in settings if settings[k] != first_settings[k]]
        if differ and not complete(path):
            raise MakdError(f"cells {first.name} and {cell.name} learn from the label store {path} but label it with "
                            f"different {differ[0]} settings: give them different labels.path, or make the store "
                            f"once with `makd label`")
    return {path: config for path, (_, config, _) in stores.items() if not complete(path)}


def complete(path: str) -> bool:
    return (Path(path) / META_FILE).is_file() and not LabelStore.open(path).missing_shards()


def label_stores(grid: Grid, executor: Executor, samples_of: Callable[[Config], SampleSource] | None = None) -> None:
    """Make the label stores the cells need (`executor.workers` label workers each, through the cells' executor);
    `samples_of(config)` says what a config labels (default: its images; the CLI passes detection's box crops)."""
    stores = stores_to_label(grid)
    for path, config in stores.items():
        if samples_of is None and config.task != "classification":
            raise MakdError(f"label store {path}: label it first with `makd label` (what a {config.task} config labels "
                            "is for the command line to say)")
        log.info("%s: labelling %s first (%d worker(s) on %s), which its cells learn from", grid.spec.name, path,
                 executor.workers, executor.name)
    works = [work for config in stores.values() for work in
             label_workers(config, executor.workers, samples_of(config) if samples_of else samples_to_label)]
    failed = [(work, error) for work, _, error in EXECUTORS.get(executor.name)(works, executor, grid.out) if error]
    if failed:
        raise MakdError(f"{failed[0][0].names[0]} failed: {failed[0][1]} (the cells that learn from it cannot train; "
                        "re-run to resume the labelling)")
    unfinished = [path for path in stores if not complete(path)]
    if unfinished:
        raise MakdError(f"label store {unfinished[0]} is still incomplete after its workers ended: `makd labels check "
                        f"{unfinished[0]}` lists its missing shards; re-run to label them")


def run_grid(grid: Grid, executor: Executor | None = None, progress: bool = True,
             samples_of: Callable[[Config], SampleSource] | None = None) -> Outcome:
    """Make the label stores the cells need, then run every cell not yet done; returns the results of all
    finished cells."""
    executor = executor or grid.spec.executor
    EXECUTORS.get(executor.name)  # an unknown executor fails before any work
    if executor.batch_seeds > 1 and (executor.nodes > 1 or (executor.tasks_per_node or executor.gpus) > 1):
        raise MakdError("executor.batch_seeds trains several seeds as one model in one process: use it with one "
                        "process a job (nodes 1, gpus and tasks_per_node at most 1)")
    label_stores(grid, executor, samples_of)
    planned = plan(grid)
    outcome = Outcome(planned)
    todo = [p for p in planned if p.status != DONE and p.same_as is None]
    jobs = batch_jobs(todo, executor.batch_seeds)
    log.info("%s: %d cells, %d done, %d to run (%d jobs) on %s", grid.spec.name, len(planned),
             len(planned) - len(todo), len(todo), len(jobs), executor.name)
    with logging_redirect_tqdm(), tqdm(total=len(todo), desc=grid.spec.name, unit="run", disable=not progress) as bar:
        for job, results, error in EXECUTORS.get(executor.name)(jobs, executor, grid.out):
            if error is not None:
                for name in job.names:
                    outcome.failed[name] = error
                log.error("%s failed: %s", ", ".join(job.names), error)
            bar.update(len(job.names))
            if results:
                bar.set_postfix_str(f"{job.names[-1]}: {results[-1].get('test_top1_best', float('nan')):.2f}")
    return finished(grid, outcome)


def finished(grid: Grid, outcome: Outcome | None = None) -> Outcome:
    """The results of the grid's finished cells (read back, nothing trains): what a report can show so far."""
    outcome = outcome or Outcome(plan(grid, prepare=False))
    for p in outcome.plan:
        done = p.run / "results.json"
        if done.is_file():
            outcome.results[p.cell.name] = read_json(done, "results")
    return outcome
