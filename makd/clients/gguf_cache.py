"""GGUF models dequantised once, not on every load.

transformers re-parses a GGUF file each time it loads one (about half a minute for the 135 M SmolLM2 that writes
the default questions: it reads the 49 k-token vocabulary field by field, then dequantises). The tokenizer and the
dequantised weights it produced are kept in makd's cache folder as an ordinary transformers folder (safetensors),
which loads in under a second with the same tensors and the same tokenization.

An entry is keyed by the GGUF file (resolved path, size, modification time), the loader, the dtype and the
transformers version. Only a local file with no other loading argument is cached: placement arguments
(`device_map`, `max_memory`) change from run to run and a hub GGUF is kept by the hub's own cache. Deleting the
folder costs one conversion; an unreadable entry is converted again.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import importlib.metadata
import json
import logging
import shutil
from pathlib import Path
from typing import Any

from makd.atomic import atomic_folder, remove_stale_temporaries
from makd.cache import cache_dir

CACHEABLE_KWARGS = frozenset({"dtype"})
log = logging.getLogger("makd.gguf")


def load_gguf(loader: Any, folder: str, gguf_file: str, **kwargs: Any) -> Any:
    """`loader.from_pretrained(folder, gguf_file=gguf_file, **kwargs)`, from the cached conversion when there is one."""
    convert = functools.partial(loader.from_pretrained, folder, gguf_file=gguf_file, trust_remote_code=False, **kwargs)
    source = Path(folder).expanduser() / gguf_file
    if set(kwargs) - CACHEABLE_KWARGS or not source.is_file():
        return convert()
    entry = cache_dir() / "gguf" / entry_key(loader, source, kwargs)
    try:
        cached = entry.is_dir()
    except OSError:  # an unreadable cache folder: a miss
        cached = False
    if cached:
        try:
            return loader.from_pretrained(str(entry), local_files_only=True, trust_remote_code=False, **kwargs)
        except Exception as exc:  # noqa: BLE001 - any unreadable entry (safetensors, tokenizers raise their own)
            log.warning("GGUF cache entry %s unreadable (%s): converting %s again", entry, exc, source)
            shutil.rmtree(entry, ignore_errors=True)
    loaded = convert()
    save_entry(loaded, entry)
    return loaded


def entry_key(loader: Any, source: Path, kwargs: dict[str, Any]) -> str:
    stat = source.stat()
    blob = json.dumps({"gguf": str(source.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                       "loader": getattr(loader, "__name__", repr(loader)),
                       "kwargs": {k: str(v) for k, v in sorted(kwargs.items())},
                       "transformers": importlib.metadata.version("transformers")}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def save_entry(loaded: Any, entry: Path) -> None:
    """A reader sees a whole entry or none (written aside, then renamed); a failure leaves the cache as it was and
    the run goes on (the cache is an optimisation only)."""
    try:
        remove_stale_temporaries(entry.parent)  # what a killed conversion left (half a gigabyte for SmolLM2)
        with atomic_folder(entry) as tmp:
            if hasattr(loaded, "state_dict"):
                _save_model(loaded, tmp)
            else:
                loaded.save_pretrained(str(tmp))
    except Exception as exc:  # noqa: BLE001 - a full disk, a read-only home (safetensors raises its own error type)
        log.warning("GGUF conversion not cached in %s: %s", entry, exc)


def _save_model(model: Any, folder: Path) -> None:
    """transformers refuses `save_pretrained` on a model loaded from a GGUF (it counts as quantized), but its weights
    are plain dequantised tensors: the config without the GGUF marker and the tensors as safetensors."""
    from safetensors.torch import save_model

    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(str(folder))
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(str(folder))
    save_model(model, str(folder / "model.safetensors"), metadata={"format": "pt"})
