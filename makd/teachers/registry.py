"""Teachers by name, built from a config mapping whose options each teacher validates itself."""

from __future__ import annotations

import importlib
from typing import Any

from makd.errors import MakdError
from makd.teachers.base import Teacher

# name -> "module:Class"; imported lazily so `makd --help` never loads torch models.
TEACHERS: dict[str, str] = {
    "bridge": "makd.teachers.bridge:BridgeTeacher",
    "hf": "makd.teachers.hf_vlm:HFVLMTeacher",
    "openai": "makd.teachers.openai_api:OpenAITeacher",
    "text": "makd.teachers.text:TextTeacher",
}


def build_teacher(config: dict[str, Any]) -> Teacher:
    options = dict(config)
    name = options.pop("name", None)
    if name not in TEACHERS:
        raise MakdError(f"teacher.name: unknown teacher {name!r} (choose from {', '.join(sorted(TEACHERS))})")
    module, cls_name = TEACHERS[name].split(":")
    cls = getattr(importlib.import_module(module), cls_name)
    return cls.from_options(options)
