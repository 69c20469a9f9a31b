"""`makd questions select`: the data-driven criterion on known answers, the paper's LLM selection, random, and
the CLI on the real bridge teacher."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import question_set
from support.cli import run_makd
from test_question_generation import ScriptedLLM

from makd.errors import MakdError
from makd.questions import QuestionSet
from makd.questions.select import class_information, parse_selection, select_by_data, select_by_llm, select_random


def logit(p):
    return np.log(p / (1 - p))


def known_answers():
    """4 classes x 25 images. q0 splits classes {0,1} | {2,3}; q1 is a near copy of q0; q2 is image noise;
    q3 is constant; q4 splits {0,2} | {1,3}; q5 has low answer mass."""
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 25)
    p = np.stack([np.isin(labels, [0, 1]) * 0.9 + 0.05, np.isin(labels, [0, 1]) * 0.88 + 0.06,
                  rng.uniform(0.2, 0.8, 100), np.full(100, 0.5), np.isin(labels, [0, 2]) * 0.8 + 0.1,
                  np.isin(labels, [0, 3]) * 0.9 + 0.05], axis=1)
    mass = np.ones_like(p)
    mass[:, 5] = 0.2
    return logit(p), mass, labels


def test_information_is_in_bits_and_zero_for_class_independent_answers():
    labels = np.repeat([0, 1], 10)
    perfect = np.where(labels == 0, 1 - 1e-9, 1e-9)[:, None]
    assert class_information(perfect, labels)[0] == pytest.approx(1.0, abs=1e-6)
    assert class_information(np.full((20, 1), 0.7), labels)[0] == pytest.approx(0.0, abs=1e-9)


def test_data_selection_prefers_informative_distinct_answered_questions():
    logodds, mass, labels = known_answers()
    chosen, report = select_by_data(logodds, mass, labels, 3)
    assert chosen == [0, 4, 2]  # the near copy of q0 is redundant, however informative
    assert report.dropped[3].startswith("near-constant") and report.dropped[5].startswith("answer mass 0.20")
    assert report.rank.tolist() == [1, 0, 3, 0, 2, 0]
    assert report.redundancy[4] == pytest.approx(0.0, abs=0.05)
    # Without the redundancy term, information alone picks the copy second.
    assert select_by_data(logodds, mass, labels, 2, redundancy_weight=0.0)[0] == [0, 1]
    with pytest.raises(MakdError, match="only 4 of 6 candidate questions pass"):
        select_by_data(logodds, mass, labels, 5)


def test_random_selection_is_seeded():
    assert select_random(10, 4, seed=1) == select_random(10, 4, seed=1) != select_random(10, 4, seed=2)
    with pytest.raises(MakdError):
        select_random(3, 4, seed=0)


POOL = question_set(["Is it red?", "Does it have wheels?", "Is it big?", "Can it fly?", "Is it soft?"], ["a", "b"])


def test_llm_answers_are_parsed_by_number_or_text():
    assert parse_selection("I choose 2, 4\n3. Is it big?\n99\nDoes it have wheels?", POOL) == [1, 3, 2]


def test_llm_selection_reports_what_it_filled_at_random():
    chosen, details = select_by_llm(POOL, 3, ScriptedLLM([["1. Is it red?\nnumber 5"]]), "few_shot", seed=0,
                                    max_rounds=2)
    assert chosen[:2] == [0, 4] and len(set(chosen)) == 3
    assert details["chosen_by_llm"] == 2 and details["filled_at_random"] == 1 and len(details["responses"]) == 2


def makd(*args, cwd):
    proc = subprocess.run([sys.executable, "-m", "makd", *args], cwd=cwd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


@pytest.mark.slow
def test_cli_select_by_data_and_random_on_the_bridge(tmp_path):
    pool = QuestionSet.model_validate({
        "name": "pool", "classes": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                                    "Sneaker", "Bag", "Ankle boot"],
        "questions": [{"id": f"g{i}", "text": t} for i, t in enumerate([
            "Is the item worn on the feet?", "Does the item have sleeves?", "Does the item have laces?",
            "Does the item have a handle?", "Is the item made of fabric?", "Does the item have a sole?",
            "Is the object a living animal?", "Does the object have wings?"])]})
    pool.save(tmp_path / "pool.json")
    common = ["--pool", "pool.json", "select.num_questions=3", "select.images_per_class=3",
              "data.train_per_class=5", "data.val_per_class=1", "train.progress=false"]
    out = makd("questions", "select", *common, "-o", "data.json", cwd=tmp_path)
    assert "3 of 8 questions by data" in out
    chosen = QuestionSet.load(tmp_path / "data.json")
    assert len(chosen) == 3 and set(chosen.texts) <= set(pool.texts)
    assert chosen.generation["selection"]["pool_hash"] == pool.hash
    rows = (tmp_path / "data.selection.csv").read_text().splitlines()
    assert rows[0] == "question,mass,spread,information_bits,redundancy,rank,dropped" and len(rows) == 9
    assert (tmp_path / "data.selection.png").stat().st_size > 5000
    assert json.loads((tmp_path / "data.pool-labels" / "labels.json").read_text())["num_samples"] == 30
    run_makd("questions", "select", *common, "select.method=random", "-o", "random.json", cwd=tmp_path)  # in this process
    assert len(QuestionSet.load(tmp_path / "random.json")) == 3
