import json

import numpy as np
import pytest

from makd.config import resolve_path
from makd.errors import MakdError
from makd.questions import QuestionSet

BUILTIN = "makd:fashion_mnist/questions.json"


def test_builtin_set_is_valid_and_has_reference_answers():
    qs = QuestionSet.load(resolve_path(BUILTIN))
    assert len(qs) == 40  # as the README says
    assert len(qs.classes) == 10
    assert all(q.text.endswith("?") for q in qs.questions)
    ref = qs.reference_answers()
    assert ref.shape == (10, len(qs)) and not np.isnan(ref).any()
    assert qs.generation["source"] == "hand-written"


def test_hash_covers_texts_and_classes_only():
    qs = QuestionSet.load(resolve_path(BUILTIN))
    data = qs.model_dump()
    data["questions"][0]["category"] = "something else"
    data["questions"][0]["class_answers"] = None
    assert QuestionSet.model_validate(data).hash == qs.hash
    data["questions"][0]["text"] = "Is the item red?"
    assert QuestionSet.model_validate(data).hash != qs.hash
    data = qs.model_dump()
    data["classes"] = list(reversed(data["classes"]))
    assert QuestionSet.model_validate(data).hash != qs.hash


def test_save_load_roundtrip(tmp_path):
    qs = QuestionSet.load(resolve_path(BUILTIN))
    qs.save(tmp_path / "q.json")
    again = QuestionSet.load(tmp_path / "q.json")
    assert again == qs and again.hash == qs.hash


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d["questions"].append(dict(d["questions"][0])), "duplicate id 'q01'"),
    (lambda d: d["questions"][1]["class_answers"].update({"Unicorn": 1.0}), "unknown class 'Unicorn'"),
    (lambda d: d["questions"][2]["class_answers"].update({"Bag": 2.0}), "is not in [0, 1]"),
    (lambda d: d["questions"][3].pop("text"), "questions.3.text: Field required"),
    (lambda d: d.update(colour="blue"), "colour: Extra inputs are not permitted"),
])
def test_invalid_sets_give_one_line_errors_naming_the_problem(tmp_path, mutate, message):
    data = json.loads(resolve_path(BUILTIN).read_text())
    mutate(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(MakdError) as err:
        QuestionSet.load(path)
    assert message in str(err.value) and str(path) in str(err.value)
    assert "\n" not in str(err.value)


def test_malformed_json_and_missing_file(tmp_path):
    bad = tmp_path / "q.json"
    bad.write_text("{not json")
    with pytest.raises(MakdError, match="not valid JSON"):
        QuestionSet.load(bad)
    with pytest.raises(MakdError, match="question set not found"):
        QuestionSet.load(tmp_path / "absent.json")


def test_import_official_txt(tmp_path):
    txt = tmp_path / "questions.txt"
    txt.write_text("Does the object have wheels?\n\n  Is the object a living animal?  \nDoes it have fur?\n")
    qs = QuestionSet.from_txt(txt, ["car", "cat"])
    assert qs.texts == ["Does the object have wheels?", "Is the object a living animal?", "Does it have fur?"]
    assert qs.ids == ["q1", "q2", "q3"]
    assert qs.questions[1].source == "questions.txt:2"
    with pytest.raises(MakdError, match="plain-text question list"):
        QuestionSet.load(txt)
