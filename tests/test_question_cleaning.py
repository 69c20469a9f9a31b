"""The cleaner on a corpus of messy LLM outputs (tests/data/llm_outputs), with the expected verdicts."""

import json
from pathlib import Path

import numpy as np
import pytest

from makd.questions.clean import class_mentioned, clean, extract_candidates, normalise, rejection_reason

CORPUS = Path(__file__).parent / "data" / "llm_outputs"
EXPECTED = json.loads((CORPUS / "expected.json").read_text())
CLASSES = EXPECTED["classes"]


@pytest.mark.parametrize("name", sorted(EXPECTED["files"]))
def test_corpus_accepted_questions(name):
    result = clean([(name, (CORPUS / name).read_text())], CLASSES)
    assert result.accepted == EXPECTED["files"][name]
    reasons = {c.text: c.reason for c in result.candidates}
    for text, reason in EXPECTED["reasons"].get(name, {}).items():
        assert reasons[text] == reason, text
    # every line is accounted for: accepted, or rejected with a reason
    assert all(c.accepted == (c.reason is None) for c in result.candidates)
    assert all(c.origin.startswith(f"{name}:") for c in result.candidates)


def test_duplicates_across_rounds_and_paraphrases():
    vocab = {"Does it have laces?": [1, 0, 0], "Are there laces on it?": [0.99, 0.141, 0], "Is it worn on the feet?": [0, 1, 0]}

    def embed(texts):
        v = np.array([vocab[t] for t in texts], dtype=np.float64)
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    first = clean([("r0", "1. Does it have laces?")], CLASSES, embed=embed)
    second = clean([("r1", "1. Does it have laces?\n2. Are there laces on it?\n3. Is it worn on the feet?")], CLASSES,
                   embed=embed, already=first.accepted)
    assert second.accepted == ["Is it worn on the feet?"]
    verdicts = {c.text: (c.reason, c.duplicate_of) for c in second.candidates}
    assert verdicts["Does it have laces?"] == ("duplicate", "Does it have laces?")
    assert verdicts["Are there laces on it?"] == ("paraphrase", "Does it have laces?")


def test_class_names_leak_detection():
    assert class_mentioned("Is it a sneaker?", CLASSES) == "Sneaker"
    assert class_mentioned("Are these trousers?", CLASSES) == "Trouser"
    assert class_mentioned("Is it a T-shirt?", CLASSES) == "T-shirt/top"
    assert class_mentioned("Does it have a heel?", CLASSES) is None
    assert class_mentioned("Is it a baggy item?", CLASSES) is None  # 'bag' only as a whole word


def test_rules():
    assert rejection_reason("Does the object have wheels?", CLASSES) is None
    assert rejection_reason("Is it black and white?", CLASSES) is None
    assert rejection_reason("Does it have wheels and an engine?", CLASSES)[0] == "compound"
    assert rejection_reason("Is the item worn in winter, or in summer?", CLASSES)[0] == "compound"
    assert rejection_reason("How many wheels does it have?", CLASSES)[0] == "not a yes/no question"
    assert rejection_reason(" ".join(["Is"] + ["very"] * 3 + [f"w{i}" for i in range(20)]) + "?", CLASSES)[0] == "too long"
    assert normalise("Does the object have Wheels?!") == normalise("does it have wheels")
    assert [c.text for c in extract_candidates("Intro text. Is it round? Is it red?", "x")] == ["Is it round?", "Is it red?"]
