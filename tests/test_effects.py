"""Every option is marked once as changing results or execution only (makd/effects.py), and the lists that used
to be kept in sync by hand are derived from the marks."""

from __future__ import annotations

import json

import numpy as np
import pydantic
from conftest import PixelTeacher, make_question_set

from makd.config import Config
from makd.effects import EXECUTION, RESULTS, execution_keys, marked, results_options, unmarked
from makd.engine.trainer import RESUMABLE_CHANGES, config_changes
from makd.labels import label_split
from makd.labels.store import IDENTITY_KEYS, StoreMetadata
from makd.questions.llm import LLM_BACKENDS
from makd.teachers.registry import TEACHERS
from makd.teachers.text import TEXT_BACKENDS


def option_models() -> dict[str, type[pydantic.BaseModel]]:
    """The training config, every registered teacher's options (the text teacher's per backend), every question
    LLM backend's options."""
    models: dict[str, type[pydantic.BaseModel]] = {"config": Config}
    for name in TEACHERS.names():
        options = getattr(TEACHERS.get(name), "Options", None)
        if options is not None:
            models[f"teacher {name}"] = options
    models.update({f"teacher text backend {b}": TEXT_BACKENDS.get(b) for b in TEXT_BACKENDS.names()})
    models.update({f"llm backend {b}": LLM_BACKENDS.get(b) for b in LLM_BACKENDS.names()})
    return models


def test_every_option_is_classified():
    models = option_models()
    assert {"teacher bridge", "teacher hf", "teacher openai", "teacher text backend hf", "llm backend openai"} <= set(models)
    problems = {name: unmarked(model) for name, model in models.items() if unmarked(model)}
    assert problems == {}, f"give these options json_schema_extra=RESULTS or EXECUTION (makd/effects.py): {problems}"


def test_the_check_sees_an_unmarked_option():
    class Options(pydantic.BaseModel):
        speed: int = pydantic.Field(1, json_schema_extra=EXECUTION)
        answer: int = pydantic.Field(1, json_schema_extra=RESULTS)
        forgotten: int = 1

    class Nested(pydantic.BaseModel):
        inner: Options = Options()
        where: str = pydantic.Field("x", json_schema_extra={"path": True} | EXECUTION)

    assert unmarked(Nested) == ["inner.forgotten"]
    assert execution_keys(Nested) == {"where", "inner.speed"}
    assert results_options(Options(speed=3)) == {"answer": 1, "forgotten": 1}  # unmarked counts as a result


def test_training_resumes_across_execution_keys_only():
    assert RESUMABLE_CHANGES == execution_keys(Config)
    assert {"train.threads", "train.progress", "data.num_workers", "train.eval_batch_size"} <= RESUMABLE_CHANGES
    assert not {"train.epochs", "train.seed", "optim.lr", "data.root"} & RESUMABLE_CHANGES
    old = Config().model_dump(mode="json")
    new = Config(train={"threads": 3, "epochs": 7}).model_dump(mode="json")
    assert config_changes(old, new) == ["train.epochs"]


def test_teacher_provenance_keeps_results_options_only():
    from makd.teachers.hf_vlm import HFVLMTeacher

    options = HFVLMTeacher.Options(model="x", batch_size=3, device_map="auto", instruction="Say Yes or No.")
    recorded = results_options(options)
    assert set(recorded) == marked(HFVLMTeacher.Options, "results")
    assert "batch_size" not in recorded and "device_map" not in recorded and recorded["instruction"] == "Say Yes or No."
    assert {"batch_size", "question_batch", "prefix_reuse", "check_reuse", "reuse_tolerance", "device", "device_map",
            "attn_implementation"} == marked(HFVLMTeacher.Options, "execution")


def test_store_identity_is_the_results_keys_of_its_metadata(fmnist_test, tmp_path):
    """labels.json holds exactly the keys StoreMetadata marks; the RESULTS ones are the identity a resumed job
    must match."""
    split = fmnist_test.subset(np.arange(4), "part")
    label_split(split, PixelTeacher(), make_question_set(split.class_names, n=2), tmp_path / "s", shard_size=2,
                progress=False)
    meta = json.loads((tmp_path / "s" / "labels.json").read_text())
    assert set(meta) == set(StoreMetadata.model_fields)
    StoreMetadata.model_validate(meta)
    assert set(IDENTITY_KEYS) == marked(StoreMetadata, "results")
    assert {"teacher", "question_set_hash", "sample_ids_hash", "shard_size"} <= set(IDENTITY_KEYS)
    assert not {"created", "software", "dataset"} & set(IDENTITY_KEYS)
