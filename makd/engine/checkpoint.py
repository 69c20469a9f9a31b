"""Training-state checkpoints that load without unpickling arbitrary objects (students: makd/models/student_file.py).

- `last.pt`: the training state (weights, optimizer, grad scaler, epoch/step/data position, RNG states,
  history), only tensors and plain containers, loaded with `torch.load(weights_only=True)`. The one before it
  is kept as `last.prev.pt`, so a damaged newest file (disk full, bit rot, a copy cut short) costs one
  checkpoint interval, not the run.
It is written to a temporary name and renamed.
"""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from makd.atomic import atomic_path
from makd.errors import MakdError

log = logging.getLogger("makd.train")


def previous_state_path(path: Path) -> Path:
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def save_state(path: Path, state: dict[str, Any]) -> None:
    """Write `path` atomically, keeping the file it replaces as the previous state. The previous state is a hard
    link to the current file, so `path` exists at every moment (a kill between two renames used to leave only the
    previous state); where hard links are not supported, a rename does it (`load_newest_state` copes with both)."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
        if path.exists():
            previous = previous_state_path(path)
            previous.unlink(missing_ok=True)
            try:
                os.link(path, previous)
            except OSError:
                os.replace(path, previous)


def load_newest_state(path: Path) -> dict[str, Any] | None:
    """The newest training state that loads: `path`, else the one before it; None when there is none."""
    candidates = [p for p in (path, previous_state_path(path)) if p.is_file()]
    errors = []
    for candidate in candidates:
        try:
            state = load_state(candidate)
        except MakdError as exc:
            errors.append(str(exc))
            continue
        if errors:
            log.warning("%s; resuming from the previous checkpoint %s", errors[0], candidate)
        return state
    if errors:
        raise MakdError(" and ".join(errors) + ": delete them to start over, or use --resume never")
    return None


def load_state(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise MakdError(f"checkpoint not found: {path}") from None
    except Exception as exc:  # corrupt zip, or an object weights_only refuses to unpickle
        raise MakdError(f"cannot load checkpoint {path}: {str(exc).splitlines()[0]}") from None


def rng_states() -> dict[str, Any]:
    """Python, NumPy and torch (CPU and CUDA) generator states as tensors and plain values (weights_only-safe)."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": {"version": version, "state": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    if "python" in states:
        py = states["python"]
        random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))
    if "numpy" in states:
        n = states["numpy"]
        np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    if "cuda" in states and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])
