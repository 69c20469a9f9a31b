"""Every option says once what changing it does: RESULTS (it changes what is computed: targets, checkpoints, metrics)
or EXECUTION (only how it runs: speed, placement, logging, where a server is). The lists that used to be kept in
sync by hand are derived from these marks:
- a teacher's provenance (labels.json) records its RESULTS options only, so a labelling job resumes with other
  batch sizes, devices or servers (`results_options`);
- a training run resumes after a change of EXECUTION keys only (`execution_keys(Config)`, engine/trainer.py);
- a label store's identity is the RESULTS keys of its metadata (labels/store.py).

A mark is pydantic's `json_schema_extra` (as config.py marks paths), combined with other marks by `|`:
    batch_size: int = Field(8, ge=1, json_schema_extra=EXECUTION, description="images per call")
    root: str | None = Field(None, json_schema_extra=PATH | RESULTS, description="dataset folder")
tests/test_effects.py fails for any option without exactly one of the two marks.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel

RESULTS: dict[str, Any] = {"effect": "results"}
EXECUTION: dict[str, Any] = {"effect": "execution"}
Effect = Literal["results", "execution"]


def effect_of(model: type[BaseModel], name: str) -> Effect | None:
    """The mark of field `name` of `model`, or None when it has none."""
    extra = model.model_fields[name].json_schema_extra
    value = extra.get("effect") if isinstance(extra, dict) else None
    return value if value in ("results", "execution") else None


def marked(model: type[BaseModel], effect: Effect) -> frozenset[str]:
    """Names of the fields of `model` with this mark (not those of nested models)."""
    return frozenset(name for name in model.model_fields if effect_of(model, name) == effect)


def results_options(options: BaseModel) -> dict[str, Any]:
    """The options that change results, as JSON: what a teacher's provenance records."""
    return options.model_dump(mode="json", exclude=set(marked(type(options), "execution")))


def nested_models(model: type[BaseModel]) -> dict[str, type[BaseModel]]:
    """Fields of `model` that are themselves option models (config sections), by name."""
    return {name: field.annotation for name, field in model.model_fields.items()
            if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)}


def execution_keys(model: type[BaseModel], prefix: str = "") -> frozenset[str]:
    """Dotted keys of every EXECUTION field of `model` and of its nested sections."""
    keys = {prefix + name for name in marked(model, "execution")}
    for name, section in nested_models(model).items():
        keys |= execution_keys(section, f"{prefix}{name}.")
    return frozenset(keys)


def unmarked(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Dotted keys of fields (nested sections included) with neither mark: each must get one."""
    sections = nested_models(model)
    missing = [prefix + name for name in model.model_fields if name not in sections and effect_of(model, name) is None]
    for name, section in sections.items():
        missing += unmarked(section, f"{prefix}{name}.")
    return missing
