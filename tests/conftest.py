"""Shared fixtures: tiny real-format datasets and a deterministic stand-in teacher for store tests."""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import tempfile
import threading
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# makd's cache (the bridge's ImageNet prompt embeddings, canvases, GGUF conversions) for this session only, shared by
# the pytest workers (made by the main process, which starts them) and the commands the tests start: nothing from a
# user's ~/.cache/makd, nothing left there. Its entries are written atomically: workers may fill one at once.
if not os.environ.get("MAKD_TEST_SESSION_CACHE"):
    os.environ["MAKD_TEST_SESSION_CACHE"] = tempfile.mkdtemp(prefix="makd-test-cache-")
    atexit.register(shutil.rmtree, os.environ["MAKD_TEST_SESSION_CACHE"], ignore_errors=True)
os.environ["MAKD_CACHE"] = os.environ["MAKD_TEST_SESSION_CACHE"]
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs one pytest worker per core (pytest-xdist): each worker and the processes its tests start use
    # one thread, so that two workers never ask for four cores (OpenMP threads spinning against each other).
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from makd.data.fashion_mnist import load_fashion_mnist  # noqa: E402
from makd.questions import QuestionSet  # noqa: E402
from makd.teachers.base import AspectScores  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


class PixelTeacher:
    """Deterministic, image-dependent scores (a function of pixel statistics), for label-store tests."""

    name: ClassVar[str] = "pixel"

    def __init__(self, batch_size: int = 4, fail_after_calls: int | None = None) -> None:
        self.batch_size = batch_size
        self.calls = 0
        self.fail_after_calls = fail_after_calls

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "formula": "3 tanh(mean pixel * f(question)) - 1, f from the text's CRC"}

    def score(self, images: Sequence[Image.Image], questions: QuestionSet) -> AspectScores:
        self.calls += 1
        if self.fail_after_calls is not None and self.calls > self.fail_after_calls:
            raise RuntimeError("simulated crash")
        means = np.array([np.asarray(img, dtype=np.float32).mean() / 255.0 for img in images])
        # Each question is answered on its own (as every real teacher does), from its text.
        factor = np.array([zlib.crc32(t.encode()) % 97 / 10 + 0.5 for t in questions.texts])
        logodds = np.tanh(means[:, None] * factor[None, :]).astype(np.float32) * 3 - 1
        mass = np.broadcast_to((0.5 + factor / 20).astype(np.float32), logodds.shape).copy()
        return AspectScores(logodds, mass)


def pytest_configure(config: pytest.Config) -> None:
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _restore_torch_threads() -> Any:
    """A run with `train.threads` sets torch's process-wide thread count: later tests must not inherit it."""
    import torch

    threads = torch.get_num_threads()
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def make_question_set(classes: list[str], n: int = 4) -> QuestionSet:
    return QuestionSet.model_validate({
        "name": "tiny", "classes": classes,
        "questions": [{"id": f"q{i}", "text": f"Is this question number {i}?", "category": "visual"} for i in range(n)],
    })


def label_tiny_splits(root: Path, overrides: list[str], questions: int = 4) -> Path:
    """`root/q.json` (`questions` questions) and `root/labels`, the PixelTeacher's store over the train and test
    splits of the config that `overrides` make: what a test's runs train on."""
    from makd.config import load_config
    from makd.data import build_splits
    from makd.data.base import ImageSplit
    from makd.labels import label_split

    splits = build_splits(load_config(overrides=overrides).data)
    question_set_ = make_question_set(splits["train"].class_names, n=questions)
    question_set_.save(root / "q.json")
    label_split(ImageSplit.concat([splits["train"], splits["test"]], "all"), PixelTeacher(), question_set_, root / "labels",
                shard_size=16, progress=False)
    return root


def question_set(texts: list[str], classes: list[str] | tuple[str, ...] = ("a", "b")) -> QuestionSet:
    """A question set with the given question texts (ids q0, q1, ...)."""
    return QuestionSet.model_validate({"classes": list(classes),
                                       "questions": [{"id": f"q{i}", "text": t} for i, t in enumerate(texts)]})


@pytest.fixture(scope="session")
def fmnist_test() -> Any:
    return load_fashion_mnist("test")


FMNIST_CLASSES = ["T-shirt/top", "Trouser", "Sandal"]


@pytest.fixture(scope="session")
def tiny_imagefolder(tmp_path_factory: pytest.TempPathFactory, fmnist_test: Any) -> Path:
    """root/{train,test}/<class>/*.png from real Fashion-MNIST images: 3 classes x (6 train + 3 test)."""
    root = tmp_path_factory.mktemp("imagefolder")
    wanted = {0: "T-shirt_top", 1: "Trouser", 5: "Sandal"}
    for label, folder in wanted.items():
        idx = np.flatnonzero(fmnist_test.targets == label)
        for split, chosen in (("train", idx[:6]), ("test", idx[6:9])):
            (root / split / folder).mkdir(parents=True, exist_ok=True)
            for i in chosen:
                Image.fromarray(fmnist_test.array[i]).save(root / split / folder / f"img{i}.png")
    return root


def chat_loop_threads() -> set[threading.Thread]:
    """The running background loops of ChatClients (makd/clients/openai_chat.py)."""
    return {thread for thread in threading.enumerate() if thread.name == "makd-openai"}


def dead_pid() -> int:
    """The id of a process of this host that has exited (for a killed writer's leftover temporary files)."""
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid
