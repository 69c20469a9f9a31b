"""The `openai` teacher against a real server process on loopback (tests/support/openai_server.py) that runs a
tiny random Qwen2-VL: exact agreement with the `hf` teacher when the top-k covers the vocabulary, the k-th
logprob bound when it does not, retries through injected 429/5xx, the API key, and a job that survives the
server dying mid-way."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from conftest import question_set
from PIL import Image
from support.openai_server import Model, ServerProcess
from support.random_models import save_random_vlm

from makd.errors import MakdError
from makd.labels import LabelStore
from makd.questions import QuestionSet
from makd.teachers import build_teacher
from makd.teachers.openai_api import data_url

QUESTIONS = ["Does the object have wheels?", "Is it worn on the feet?", "Does it have fur?"]
VOCAB = 1000  # >= the tiny tokenizer's vocabulary: the top-k is the whole distribution


@pytest.fixture(scope="module")
def vlm(tmp_path_factory) -> str:
    return str(save_random_vlm("qwen2_vl", tmp_path_factory.mktemp("qwen2_vl")))


@pytest.fixture(scope="module")
def server(vlm, tmp_path_factory):
    with ServerProcess(vlm, tmp_path_factory.mktemp("server")) as s:
        yield s


@pytest.fixture(scope="module")
def questions() -> QuestionSet:
    return question_set(QUESTIONS)


@pytest.fixture(scope="module")
def images(fmnist_test) -> list[Image.Image]:
    rng = np.random.default_rng(1)
    return [Image.fromarray((rng.random((40, 56, 3)) * 255).astype(np.uint8)), fmnist_test.image(3),
            fmnist_test.image(7)]


def teacher(server, **options):
    return build_teacher({"name": "openai", "base_url": server.base_url, "model": "tiny", "api_key_env": None,
                          "backoff": 0.01, **options})


def test_matches_hf_teacher_in_image_major_order(server, vlm, images, questions):
    torch.set_num_threads(1)
    before = len(server.requests())
    scores = teacher(server, top_logprobs=VOCAB, concurrency=1).score(images, questions)
    expected = build_teacher({"name": "hf", "model": vlm}).score(images, questions)
    np.testing.assert_allclose(scores.logodds, expected.logodds, atol=1e-4)
    np.testing.assert_allclose(scores.mass, expected.mass, atol=1e-5, rtol=1e-4)
    assert scores.flags is not None and not scores.flags.any()
    log = server.requests()[before:]
    hashes = [data_url(img, "png") for img in images]
    order = [(r["image"], r["text"]) for r in log]
    assert order == [(hashlib.sha256(h.encode()).hexdigest()[:12], f"{q} Answer with Yes or No.")
                     for h in hashes for q in QUESTIONS]


def expected_from_top(top: list[tuple[str, float]], yes, no) -> tuple[float, int]:
    """The bound rule, written out again: absent groups take the k-th logprob."""
    kth = top[-1][1]
    ly = [lp for t, lp in top if t in yes]
    ln = [lp for t, lp in top if t in no]
    flags = (0 if ly else 1) | (0 if ln else 2)
    ly_value = np.logaddexp.reduce(ly) if ly else kth
    ln_value = np.logaddexp.reduce(ln) if ln else kth
    return float(ly_value - ln_value), flags


def test_top_k_bound_is_recorded(server, vlm, images, questions):
    k = 3
    t = teacher(server, top_logprobs=k, concurrency=3)
    scores = t.score(images, questions)
    model = Model(vlm, text=False)
    for i, img in enumerate(images):
        url = data_url(img, "png")
        for j, q in enumerate(QUESTIONS):
            messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                     {"type": "text", "text": f"{q} Answer with Yes or No."}]}]
            full = model.top_logprobs(messages, VOCAB, {})
            top = [(model.tokenizer.decode([tid]), lp) for tid, lp in full[:k]]
            logodds, flags = expected_from_top(top, set(t.options.yes), set(t.options.no))
            assert scores.flags[i, j] == flags
            assert scores.logodds[i, j] == pytest.approx(logodds, abs=1e-4)
            # The bound really bounds every absent variant token.
            if flags & 1:
                assert max(lp for tid, lp in full if model.tokenizer.decode([tid]) in t.options.yes) <= top[-1][1]
    assert scores.flags.any(), "with k=3 on a random model, Yes or No must fall outside the top-k somewhere"


def test_retries_through_injected_errors(vlm, images, questions, tmp_path):
    with ServerProcess(vlm, tmp_path, "--fail-every", "3") as flaky:
        t = teacher(flaky, top_logprobs=VOCAB, concurrency=4)
        scores = t.score(images, questions)
        statuses = [r["status"] for r in flaky.requests()]
    assert {500, 429, 503} <= set(statuses) and statuses.count(200) == 9 and t.client.retries == len(statuses) - 9
    reference = build_teacher({"name": "hf", "model": vlm}).score(images, questions)
    np.testing.assert_allclose(scores.logodds, reference.logodds, atol=1e-4)


def test_api_key_comes_from_the_environment(vlm, images, questions, tmp_path, monkeypatch):
    secret = "sk-makd-test-0123456789"
    with ServerProcess(vlm, tmp_path, "--api-key", secret) as locked:
        options = {"name": "openai", "base_url": locked.base_url, "model": "tiny", "api_key_env": "MAKD_TEST_KEY",
                   "max_retries": 0}
        monkeypatch.delenv("MAKD_TEST_KEY", raising=False)
        with pytest.raises(MakdError, match=r"teacher.base_url: .* answered HTTP 401: invalid API key"):
            build_teacher(options).score(images[:1], questions)
        monkeypatch.setenv("MAKD_TEST_KEY", secret)
        t = build_teacher(options)
        assert t.score(images[:1], questions).logodds.shape == (1, 3)
        assert secret not in json.dumps(t.describe())
        with pytest.raises(MakdError, match=r"answered HTTP 404: model 'other' not found"):
            build_teacher({**options, "model": "other"}).score(images[:1], questions)


@pytest.mark.slow
def test_label_job_survives_the_server_dying(vlm, tiny_imagefolder, tmp_path):
    """`makd label` against a server that dies after 20 requests: the job fails with a one-line error keeping
    finished shards; the server is restarted (on another port); the resumed job completes every row once."""
    question_set(QUESTIONS, ["Sandal", "T-shirt_top", "Trouser"]).save(tmp_path / "questions.json")
    config = {"questions": "questions.json", "data": {"dataset": "imagefolder", "root": str(tiny_imagefolder),
                                                   "train_per_class": 4, "val_per_class": 2},
              "teacher": {"name": "openai", "model": "tiny", "top_logprobs": VOCAB, "concurrency": 2,
                          "max_retries": 2, "backoff": 0.05, "api_key_env": "MAKD_TEST_KEY", "batch_size": 2},
              "labels": {"path": "labels", "splits": ["train"], "shard_size": 4}, "train": {"progress": False}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    secret = "sk-never-printed-42"
    env = {**os.environ, "MAKD_TEST_KEY": secret, "HF_HUB_OFFLINE": "1"}

    def label(base_url: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "makd", "label", "-c", "config.yaml", f"teacher.base_url={base_url}"],
                              cwd=tmp_path, capture_output=True, text=True, env=env, timeout=600)

    with ServerProcess(vlm, tmp_path, "--die-after", "20", "--api-key", secret, name="first") as first:
        failed = label(first.base_url)
    assert failed.returncode == 2, failed.stderr
    lines = [line for line in failed.stderr.splitlines() if line.startswith("makd: error")]
    assert len(lines) == 1 and "failed 3 times, last: connection failed" in lines[0], failed.stderr
    assert secret not in failed.stderr + failed.stdout
    done = sorted(p.name for p in (tmp_path / "labels").glob("shard-*.parquet"))
    assert done == ["shard-00000.parquet"] and not list((tmp_path / "labels").glob(".*.tmp"))
    check = subprocess.run([sys.executable, "-m", "makd", "labels", "check", "labels"], cwd=tmp_path,
                           capture_output=True, text=True, env=env)
    assert check.returncode == 1 and "missing shards: 1-2" in check.stdout

    with ServerProcess(vlm, tmp_path, "--api-key", secret, name="second") as second:
        resumed = label(second.base_url)
        assert resumed.returncode == 0, resumed.stderr
        assert len(second.requests()) == (12 - 4) * len(QUESTIONS)  # only the unfinished shards were asked for
    assert secret not in resumed.stderr + resumed.stdout + (tmp_path / "labels" / "labels.json").read_text()

    store = LabelStore.open(tmp_path / "labels")
    assert store.check().complete
    ids, logodds, _ = store.read()
    from makd.config import load_config
    from makd.data import build_splits

    split = build_splits(load_config(tmp_path / "config.yaml").data)["train"]
    assert ids == split.sample_ids and len(set(ids)) == len(ids) == 12
    reference = build_teacher({"name": "hf", "model": vlm}).score(split.images(range(len(split))),
                                                                  QuestionSet.load(tmp_path / "questions.json"))
    np.testing.assert_allclose(logodds, reference.logodds, atol=1e-4)
    assert not store.read_flags().any()
