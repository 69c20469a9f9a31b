"""The `openai` teacher against real server processes on loopback (tests/support/openai_server.py): with a tiny
random Qwen2-VL, exact agreement with the `hf` teacher when the top-k covers the vocabulary and the k-th logprob
bound when it does not; with the stub (no model, answers drawn from a hash of image bytes and text), a job that
survives the server dying mid-way, and what goes over the wire: each file's own bytes, the first question of an image alone
and the others as prefix-cache hits, a full window per server over several servers, file:// URLs, retries, the
API key, and the one-line errors of replies without choices, JSON or logprobs."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
from collections import defaultdict

import numpy as np
import pytest
import torch
import yaml
from conftest import chat_loop_threads, question_set
from PIL import Image
from support.openai_server import Model, ServerProcess, digest, stub_top_logprobs
from support.random_models import save_random_vlm

from makd.clients.openai_chat import ChatClient, ServerConnection, parse_texts
from makd.data.base import ImageSplit, file_split, load_image, png_bytes
from makd.detection.crops import BoxCrops
from makd.errors import MakdError
from makd.labels import LabelStore, label_split
from makd.questions import QuestionSet
from makd.teachers import build_teacher
from makd.teachers.answers import logodds_from_top

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


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> ImageSplit:
    """Image files of several kinds: JPEGs (sent as they are), a grey PNG (as it is), an RGBA PNG (sent as the RGB
    PNG makd's loader makes of it), in folders root/<class>/."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(6):
        (root / f"c{i % 2}").mkdir(exist_ok=True)
        pixels = (rng.random((24 + i, 32, 3)) * 255).astype(np.uint8)
        path = root / f"c{i % 2}" / f"photo{i}.jpg"
        Image.fromarray(pixels).save(path, quality=90)
        paths.append(path)
    Image.fromarray((rng.random((20, 20)) * 255).astype(np.uint8)).save(paths[0].parent / "grey.png")
    Image.fromarray((rng.random((20, 20, 4)) * 255).astype(np.uint8)).save(paths[1].parent / "rgba.png")
    paths += [paths[0].parent / "grey.png", paths[1].parent / "rgba.png"]
    return file_split("train", root, paths, [int(p.parent.name[1]) for p in paths], ["c0", "c1"], "imagefolder")


def teacher(url, **options):
    return build_teacher({"name": "openai", "base_url": url, "model": "tiny", "api_key_env": None, "backoff": 0.01,
                          **options})


def stub_expected(payloads: list[bytes], texts: list[str], k: int = 20, yes=None, no=None):
    """(log-odds, flags) the stub's answers give, computed from the bytes each image should arrive as."""
    t = teacher("http://unused")
    rows = [[logodds_from_top(stub_top_logprobs(digest(p), f"{q} Answer with Yes or No.", k), yes or t.options.yes,
                              no or t.options.no) for q in texts] for p in payloads]
    return np.array([[r[0] for r in row] for row in rows], np.float32), np.array([[r[2] for r in row] for row in rows])


def by_image(requests: list[dict]) -> dict[str, list[dict]]:
    grouped = defaultdict(list)
    for r in sorted(requests, key=lambda r: r["arrived"]):
        grouped[r["image"]].append(r)
    return grouped


# -- against a real model -----------------------------------------------------------------------------------
def test_matches_hf_teacher_in_image_major_order(server, vlm, images, questions):
    torch.set_num_threads(1)
    before = len(server.requests())
    scores = teacher(server.base_url, top_logprobs=VOCAB, concurrency=1).score(images, questions)
    expected = build_teacher({"name": "hf", "model": vlm}).score(images, questions)
    np.testing.assert_allclose(scores.logodds, expected.logodds, atol=1e-4)
    np.testing.assert_allclose(scores.mass, expected.mass, atol=1e-5, rtol=1e-4)
    assert scores.flags is not None and not scores.flags.any()
    asked = defaultdict(list)
    for r in server.requests()[before:]:
        asked[r["image"]].append(r["text"])
    assert asked == {digest(png_bytes(img)): [f"{q} Answer with Yes or No." for q in QUESTIONS] for img in images}


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
    t = teacher(server.base_url, top_logprobs=k, concurrency=3)
    scores = t.score(images, questions)
    model = Model(vlm, text=False)
    for i, img in enumerate(images):
        for j, q in enumerate(QUESTIONS):
            messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "in images"}},
                                                     {"type": "text", "text": f"{q} Answer with Yes or No."}]}]
            full = model.top_logprobs(messages, [png_bytes(img)], VOCAB, {})
            top = full[:k]
            logodds, flags = expected_from_top(top, set(t.options.yes), set(t.options.no))
            assert scores.flags[i, j] == flags
            assert scores.logodds[i, j] == pytest.approx(logodds, abs=1e-4)
            # The bound really bounds every absent variant token.
            if flags & 1:
                assert max(lp for token, lp in full if token in t.options.yes) <= top[-1][1]
    assert scores.flags.any(), "with k=3 on a random model, Yes or No must fall outside the top-k somewhere"


@pytest.mark.slow
def test_label_job_survives_the_server_dying(tiny_imagefolder, tmp_path):
    """`makd label` against a server that dies after 20 requests: the job fails with a one-line error keeping
    finished shards; the server is restarted (on another port); the resumed job completes every row once."""
    question_set(QUESTIONS, ["Sandal", "T-shirt_top", "Trouser"]).save(tmp_path / "questions.json")
    config = {"questions": "questions.json", "data": {"dataset": "imagefolder", "root": str(tiny_imagefolder),
                                                   "train_per_class": 4, "val_per_class": 2},
              "teacher": {"name": "openai", "model": "tiny", "concurrency": 2,
                          "max_retries": 2, "backoff": 0.05, "api_key_env": "MAKD_TEST_KEY", "batch_size": 2},
              "labels": {"path": "labels", "splits": ["train"], "shard_size": 4}, "train": {"progress": False}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    secret = "sk-never-printed-42"
    env = {**os.environ, "MAKD_TEST_KEY": secret, "HF_HUB_OFFLINE": "1"}

    def label(base_url: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "makd", "label", "-c", "config.yaml", f"teacher.base_url={base_url}"],
                              cwd=tmp_path, capture_output=True, text=True, env=env, timeout=600)

    with ServerProcess(None, tmp_path, "--die-after", "20", "--api-key", secret, name="first") as first:
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

    with ServerProcess(None, tmp_path, "--api-key", secret, name="second") as second:
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
    expected, flags = stub_expected([split.encoded(i)[0] for i in range(len(split))], QUESTIONS)
    np.testing.assert_allclose(logodds, expected, atol=1e-5)
    np.testing.assert_array_equal(store.read_flags(), flags)


# -- what a split sends --------------------------------------------------------------------------------------
def test_encoded_images_are_the_files_own_bytes(photos, tmp_path):
    for i, path in enumerate(photos.paths):
        data, mime = photos.encoded(i)
        if path.name == "rgba.png":  # not sent as it is: the RGB image makd's loader makes, losslessly
            assert mime == "image/png" and data != path.read_bytes()
            np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(data))), np.asarray(load_image(path)))
        else:
            assert (data, mime) == (path.read_bytes(), "image/jpeg" if path.suffix == ".jpg" else "image/png")
    pixels = (np.random.default_rng(2).random((3, 9, 7)) * 255).astype(np.uint8)
    arrays = ImageSplit("test", ["a", "b", "c"], [0, 1, 0], ["x", "y"], array=pixels)
    data, mime = arrays.encoded(1)
    assert mime == "image/png" and arrays.image_file(1) is None
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(data))), pixels[1])
    crops = BoxCrops("train", ["c0"], np.array([0]), ["x"], paths=[photos.paths[2]], crops=[(3, 2, 20, 15)])
    data, mime = crops.encoded(0)
    assert mime == "image/png" and crops.image_file(0) is None
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(data))), np.asarray(crops.image(0)))
    (tmp_path / "notes.jpg").write_text("not a picture")
    broken = file_split("train", tmp_path, [tmp_path / "notes.jpg"], [0], ["x"], "imagefolder")
    with pytest.raises(MakdError, match=r"cannot read image .*notes.jpg: not an image"):
        broken.encoded(0)


# -- against the stub --------------------------------------------------------------------------------------
def test_label_job_sends_each_file_once_encoded_first_question_alone(photos, questions, tmp_path):
    """Through `label_split`: each request carries the file's own bytes (the RGBA PNG as RGB PNG), every image's
    first request is answered before its others arrive, and those are all prefix-cache hits."""
    with ServerProcess(None, tmp_path, "--latency", "0.01", "--miss-latency", "0.04") as stub:
        t = teacher(stub.base_url, concurrency=6)
        store = label_split(photos, t, questions, tmp_path / "labels", shard_size=5, progress=False)
        log = stub.requests()
    payloads = [photos.encoded(i)[0] for i in range(len(photos))]
    assert payloads[0] == photos.paths[0].read_bytes()
    expected, flags = stub_expected(payloads, QUESTIONS)
    ids, logodds, _ = store.read()
    assert ids == photos.sample_ids
    np.testing.assert_allclose(logodds, expected, atol=1e-5)
    np.testing.assert_array_equal(store.read_flags(), flags)
    grouped = by_image(log)
    assert set(grouped) == {digest(p) for p in payloads} and len(log) == len(photos) * len(QUESTIONS)
    for requests in grouped.values():
        first, others = requests[0], requests[1:]
        assert first["cache"] == "miss" and all(r["arrived"] >= first["answered"] for r in others)
        assert [r["cache"] for r in others] == ["hit"] * (len(QUESTIONS) - 1)
    assert max(r["open"] for r in log) <= 6


def test_two_workers_ahead_of_the_server_score_each_shard_once(photos, questions, tmp_path):
    """Two label workers (threads, ranks 0 and 1) each holding two shards' leases as they submit ahead: every shard
    written once, every image asked about once, the store complete and right."""
    many = ImageSplit.concat([photos] * 3, "train")
    many.sample_ids = [f"{k}/{sid}" for k in range(3) for sid in photos.sample_ids]
    with ServerProcess(None, tmp_path, "--latency", "0.01") as stub:
        errors, teachers = [], [teacher(stub.base_url, concurrency=3) for _ in range(2)]

        def worker(rank: int) -> None:
            try:
                label_split(many, teachers[rank], questions, tmp_path / "labels", shard_size=2, rank=rank,
                            world_size=2, progress=False, lease_timeout=2)
            except Exception as exc:  # noqa: BLE001 (reported below)
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(r,)) for r in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        log = stub.requests()
    assert not errors
    store = LabelStore.open(tmp_path / "labels")
    assert store.check().complete
    ids, logodds, _ = store.read()
    assert ids == many.sample_ids
    expected, _ = stub_expected([many.encoded(i)[0] for i in range(len(many))], QUESTIONS)
    np.testing.assert_allclose(logodds, expected, atol=1e-5)
    assert len(log) == len(many) * len(QUESTIONS)  # no shard scored twice


def test_one_window_per_server_and_each_image_on_one_server(tmp_path):
    """Two servers, 4 requests in flight on each: both windows full (never more), kept over two calls on the same
    connections, every image's questions on the server that answered its first; answers in the right cells."""
    images = [Image.fromarray(np.full((8, 8, 3), i * 9, np.uint8)) for i in range(16)]
    texts = [f"Question {j}?" for j in range(6)]
    with ServerProcess(None, tmp_path, "--latency", "0.02", name="a") as a, \
            ServerProcess(None, tmp_path, "--latency", "0.02", name="b") as b:
        t = teacher([a.base_url, b.base_url], concurrency=4)
        first = t.score(images[:8], question_set(texts))
        second = t.score(images[8:], question_set(texts))
        logs = a.requests(), b.requests()
    expected, _ = stub_expected([png_bytes(img) for img in images], texts)
    np.testing.assert_allclose(np.concatenate([first.logodds, second.logodds]), expected, atol=1e-5)
    for log in logs:
        assert max(r["open"] for r in log) == 4
        assert len({r["port"] for r in log}) <= 4  # one set of connections for both calls
    served = [set(by_image(log)) for log in logs]
    assert min(map(len, served)) >= 4 and not served[0] & served[1]  # balanced (16 images), none on both
    assert all(len(requests) == len(texts) for log in logs for requests in by_image(log).values())


def test_file_urls_send_no_image_bytes(photos, questions, tmp_path):
    root = photos.paths[0].parents[1]
    files = photos.subset([i for i, p in enumerate(photos.paths) if p.name != "rgba.png"])
    with ServerProcess(None, tmp_path, "--allowed-local-media-path", str(root)) as stub:
        t = teacher(stub.base_url, image_transport="file_url")
        assert t.inputs == {"image_files", "sample_ids"}
        store = label_split(files, t, questions, tmp_path / "labels", progress=False)
        log = stub.requests()
        with pytest.raises(MakdError, match=r"file_url sends only JPEG, PNG and WebP files .*rgba.png"):
            t.score([], questions, image_files=photos.paths[-1:], sample_ids=["x"])
        arrays = ImageSplit("test", ["a"], [0], ["x"], array=np.zeros((1, 4, 4), np.uint8))
        with pytest.raises(MakdError, match=r"file_url needs image files; sample 'a' is not one"):
            t.score([], questions, image_files=[arrays.image_file(0)], sample_ids=arrays.sample_ids)
    expected, _ = stub_expected([p.read_bytes() for p in files.paths], QUESTIONS)
    np.testing.assert_allclose(store.read()[1], expected, atol=1e-5)
    assert {r["transport"] for r in log} == {"file"} and max(r["bytes"] for r in log) < 1000
    assert set(by_image(log)) == {digest(p.read_bytes()) for p in files.paths}
    with ServerProcess(None, tmp_path, name="elsewhere") as closed:  # no --allowed-local-media-path
        with pytest.raises(MakdError, match=r"answered HTTP 400: cannot load local files without --allowed-local-media-path \(sample 'c0/photo0.jpg'\)"):
            teacher(closed.base_url, image_transport="file_url").score(
                [], questions, image_files=files.paths[:1], sample_ids=files.sample_ids[:1])


def test_unreadable_image_names_the_sample(photos, questions, tmp_path):
    data = photos.paths[0].read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    cut = file_split("train", tmp_path, [tmp_path / "cut.jpg"], [0], ["x"], "imagefolder")
    with ServerProcess(None, tmp_path) as stub:
        with pytest.raises(MakdError, match=r"^teacher.base_url: \S+ answered HTTP 400: cannot decode the image.* "
                                            r"\(sample 'cut.jpg'\)$"):
            teacher(stub.base_url, max_retries=0).score([], questions, encoded_images=[cut.encoded(0)],
                                                        sample_ids=cut.sample_ids)


@pytest.mark.parametrize("reply, message", [
    ("no-choices", "returned no choices"),
    ("bad-json", "answered with invalid JSON"),
    ("no-logprobs", r"returned no logprobs for the first token \(does the server support logprobs/top_logprobs\? "
                    r"vLLM: --max-logprobs\)"),
])
def test_bad_replies_are_one_line_errors(reply, message, images, questions, tmp_path):
    with ServerProcess(None, tmp_path, "--reply", reply) as stub:
        with pytest.raises(MakdError, match=rf"^teacher.base_url: {stub.base_url} {message} \(image 0 of the batch\)$"):
            teacher(stub.base_url).score(images[:1], questions)


def test_retries_through_injected_errors(images, questions, tmp_path):
    with ServerProcess(None, tmp_path, "--fail-every", "3") as flaky:
        t = teacher(flaky.base_url, concurrency=4)
        scores = t.score(images, questions)
        statuses = [r["status"] for r in flaky.requests()]
    assert {500, 429, 503} <= set(statuses) and statuses.count(200) == 9 and t.client.retries == len(statuses) - 9
    np.testing.assert_allclose(scores.logodds, stub_expected([png_bytes(img) for img in images], QUESTIONS)[0],
                               atol=1e-5)


def test_api_key_comes_from_the_environment(images, questions, tmp_path, monkeypatch, caplog):
    secret = "sk-makd-test-0123456789"
    with ServerProcess(None, tmp_path, "--api-key", secret) as locked:
        options = {"name": "openai", "base_url": locked.base_url, "model": "tiny", "api_key_env": "MAKD_TEST_KEY",
                   "max_retries": 0}
        monkeypatch.delenv("MAKD_TEST_KEY", raising=False)
        with pytest.raises(MakdError, match=r"teacher.base_url: .* answered HTTP 401: invalid API key"):
            build_teacher(options).score(images[:1], questions)
        monkeypatch.setenv("MAKD_TEST_KEY", secret)
        t = build_teacher(options)
        with caplog.at_level("DEBUG", logger="makd"):
            assert t.score(images[:1], questions).logodds.shape == (1, 3)
        assert secret not in json.dumps(t.describe()) + caplog.text
        with pytest.raises(MakdError, match=r"answered HTTP 404: model 'other' not found"):
            build_teacher({**options, "model": "other"}).score(images[:1], questions)


def test_options_are_checked():
    with pytest.raises(MakdError, match=r"^teacher: base_url: 'ftp://x' is not an http\(s\):// URL"):
        teacher(["http://a/v1", "ftp://x"])
    with pytest.raises(MakdError, match=r"lists a server twice"):
        teacher(["http://a/v1", "http://a/v1"])
    with pytest.raises(MakdError, match=r"image_transport"):
        teacher("http://a/v1", image_transport="multipart")
    assert teacher("http://a/v1").inputs == {"encoded_images", "sample_ids"}
    described = teacher("http://a/v1", image_transport="file_url", concurrency=3).describe()
    assert described == teacher(["http://b/v1", "http://c/v1"]).describe()  # neither changes an answer


def test_a_dropped_client_stops_its_loop_and_a_closed_teacher_its_client():
    """Clients are closed when dropped (a teacher or LLM per config, in a long process) or closed, not at exit."""
    before = chat_loop_threads()
    client = ChatClient(ServerConnection(base_url="http://127.0.0.1:9/v1", model="tiny", concurrency=8))
    assert client.run_groups([], parse_texts) == []  # starts the loop (and sends nothing)
    started = chat_loop_threads() - before
    assert len(started) == 1
    del client
    assert not any(thread.is_alive() for thread in started)
    t = teacher("http://127.0.0.1:9/v1", concurrency=8)
    for _ in range(2):  # a request after close() starts the loop again; close() stops it again
        assert t.client.run_groups([], parse_texts) == [] and len(chat_loop_threads() - before) == 1
        t.close()
        assert chat_loop_threads() - before == set()


def test_a_client_closed_on_its_loops_own_thread_does_not_wait_for_itself():
    """A collection that runs the finalizer on the loop's thread: the loop is stopped by another thread."""
    before = chat_loop_threads()
    client = ChatClient(ServerConnection(base_url="http://127.0.0.1:9/v1", model="tiny", concurrency=8))
    loop = client._engine.started()
    (loop_thread,) = chat_loop_threads() - before
    loop.call_soon_threadsafe(client.close)
    loop_thread.join(timeout=60)
    for closer in [t for t in threading.enumerate() if t.name == "makd-openai-close"]:
        closer.join(timeout=60)
    assert not loop_thread.is_alive() and loop.is_closed()
