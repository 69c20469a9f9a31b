"""`makd questions select` as a library call: keep Q questions of a candidate pool, by data (the configured
teacher's answers on sampled training images), by the LLM (the paper's method) or at random.

It sits above labels and report (data-driven selection labels a sample of images and plots its choice), which
is why it is not part of makd.questions.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from makd.atomic import write_text
from makd.config import Config
from makd.data import build_splits
from makd.data.base import per_class_sample
from makd.errors import MakdError
from makd.labels import label_split
from makd.questions.generate import resolved_style
from makd.questions.llm import TextLLM
from makd.questions.questionset import QuestionSet
from makd.questions.select import select_by_data, select_by_llm, select_random
from makd.report.plots import selection_scatter
from makd.report.tables import rows_csv
from makd.teachers import build_teacher


def select_from_config(config: Config, pool_path: str | Path, output: str | Path) -> QuestionSet:
    """Choose `select.num_questions` of the pool by `select.method`; writes the set and, for `data`, a per-question
    report (CSV + PNG) and the label store of the pool on the sampled training images (reused when re-run)."""
    pool = QuestionSet.load(pool_path)
    s, output = config.select, Path(output)
    k = s.num_questions
    if k > len(pool):
        raise MakdError(f"select.num_questions: {k} requested, the pool {pool_path} has {len(pool)} questions")
    if s.method == "random":
        chosen, details = select_random(len(pool), k, s.seed), {}
    elif s.method == "llm":
        llm = TextLLM.from_options(config.generate.llm, cache=output.with_name(output.stem + ".llm-cache.json"))
        chosen, details = select_by_llm(pool, k, llm, resolved_style(config.generate.style, llm), s.seed)
        details["llm"] = llm.describe()
    else:
        chosen, details = _select_by_teacher(config, pool, output)
    selected = pool.model_copy(update={
        "name": f"{pool.name or 'pool'}-{s.method}{k}",
        "questions": tuple(pool.questions[i] for i in chosen),
        "generation": {**pool.generation, "selection": {"method": s.method, "from_pool": str(pool_path),
                                                        "pool_hash": pool.hash, "pool_size": len(pool),
                                                        "settings": s.model_dump(), **details}},
    })
    selected = type(pool).model_validate(selected.model_dump())
    selected.save(output)
    return selected


def _select_by_teacher(config: Config, pool: QuestionSet, output: Path) -> tuple[list[int], dict]:
    s = config.select
    train = build_splits(config.data, needed=("train",))["train"]
    if list(pool.classes) != train.class_names:
        raise MakdError(f"the pool's classes {list(pool.classes)[:3]}... are not the dataset's {train.class_names[:3]}...")
    sample = train.subset(per_class_sample(train.targets, s.images_per_class, np.random.default_rng(s.seed), at_most=True))
    teacher = build_teacher(config.teacher)
    store = label_split(sample, teacher, pool, output.with_name(output.stem + ".pool-labels"),
                        shard_size=config.labels.shard_size, progress=config.train.progress)
    rows, logodds, mass = store.available(sample.sample_ids)  # images that could not be read have no row
    chosen, report = select_by_data(logodds, mass, sample.targets[rows], s.num_questions, min_mass=s.min_mass,
                                    min_spread=s.min_spread, redundancy_weight=s.redundancy_weight)
    write_text(output.with_name(output.stem + ".selection.csv"), rows_csv(report.rows(pool.texts)))
    selection_scatter(report, output.with_name(output.stem + ".selection.png"), title=f"{len(pool)} candidates, "
                      f"{s.num_questions} chosen by data ({len(sample)} training images, teacher {teacher.name})")
    return chosen, {"teacher": teacher.describe().get("name"), "images": len(sample), "label_store": str(store.path),
                    "dropped": sum(d is not None for d in report.dropped)}
