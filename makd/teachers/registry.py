"""Teachers by name, built from a config mapping whose options each teacher validates itself."""

from __future__ import annotations

from typing import Any

from makd.registry import Registry
from makd.teachers.base import Teacher

# The modules only import torch and transformers when a teacher first scores, so listing them stays cheap.
TEACHERS: Registry[type] = Registry("teacher", "teacher.name", modules=(
    "makd.teachers.bridge", "makd.teachers.hf_vlm", "makd.teachers.openai_api", "makd.teachers.text"))


def build_teacher(config: dict[str, Any]) -> Teacher:
    options = dict(config)
    return TEACHERS.get(options.pop("name", None)).from_options(options)
