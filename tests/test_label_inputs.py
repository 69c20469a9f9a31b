"""The label job's input batches (makd/labels/inputs.py): made ahead of the teacher in DataLoader worker processes
— decoding and the hf teacher's processor — equal to the ones made in the calling process, in order; a sample that
cannot be read, or that the teacher's processor rejects, is reported and the rest of its batch scored."""

from __future__ import annotations

import multiprocessing

import numpy as np
import pytest
import torch
from conftest import PixelTeacher, make_question_set, question_set
from PIL import Image
from support.random_models import save_random_lm, save_random_vlm

from makd.data.base import file_split
from makd.labels import LabelStore, label_split
from makd.labels.inputs import WorkerPool, shard_batches
from makd.teachers import build_teacher
from makd.teachers.hf_prompts import PreparedImages

QUESTIONS = ["Does it have wheels?", "Is it red?", "Is it worn on the feet?"]


@pytest.fixture(scope="module")
def jpeg_split(tmp_path_factory, fmnist_test):
    """7 JPEG files of different sizes, modes and aspect ratios, as `makd label` reads a folder of photos."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(7):
        size = (24 + 8 * i, 40 - 2 * i)
        image = Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype(np.uint8))
        if i == 3:
            image = Image.fromarray(fmnist_test.array[i])  # grey
        paths.append(root / f"img{i}.jpg")
        image.save(paths[-1], quality=90)
    return file_split("train", root, paths, [i % 2 for i in range(7)], ["a", "b"], "photos")


@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    return str(save_random_vlm("qwen2_vl", tmp_path_factory.mktemp("qwen2_vl")))


@pytest.mark.slow  # DataLoader worker processes
def test_worker_batches_equal_in_process_ones(jpeg_split, vlm, tmp_path):
    teacher = build_teacher({"name": "hf", "model": vlm, "batch_size": 3})
    in_process = list(shard_batches(jpeg_split, range(0, 7), teacher))
    in_workers = list(shard_batches(jpeg_split, range(0, 7), teacher, workers=2))
    # The shard's first batch is its first image alone (the reuse check), then batches of batch_size.
    assert [b.positions for b in in_workers] == [[0], [1, 2, 3], [4, 5, 6]] == [b.positions for b in in_process]
    for a, b in zip(in_process, in_workers):
        assert isinstance(b.inputs["images"], PreparedImages) and b.failed == []
        assert a.inputs["images"].head.keys() == b.inputs["images"].head.keys()
        assert all(torch.equal(a.inputs["images"].head[k], b.inputs["images"].head[k]) for k in a.inputs["images"].head)
    qs = question_set(QUESTIONS, ["a", "b"])
    direct = teacher.score(jpeg_split.images(range(7)), qs).logodds
    prepared = np.concatenate([teacher.score(b.inputs["images"], qs).logodds for b in in_workers])
    np.testing.assert_allclose(prepared, direct, atol=1e-5)
    # The whole label job with 2 workers: the same targets.
    label_split(jpeg_split, teacher, qs, tmp_path / "s", shard_size=4, workers=2, progress=False)
    np.testing.assert_allclose(LabelStore.open(tmp_path / "s").read()[1], direct, atol=1e-5)


@pytest.mark.slow  # DataLoader worker processes
def test_unreadable_and_rejected_samples_are_reported(jpeg_split, vlm, tmp_path):
    """A truncated JPEG fails decoding; a 1 x 300 px strip fails Qwen2-VL's processor (aspect ratio over 200):
    each is reported with a one-line reason, and the other samples of their batches are prepared."""
    paths = list(jpeg_split.paths)
    paths[1] = tmp_path / "truncated.jpg"
    paths[1].write_bytes(jpeg_split.paths[1].read_bytes()[:200])
    paths[5] = tmp_path / "strip.jpg"
    Image.new("RGB", (300, 1), (200, 30, 30)).save(paths[5])
    split = file_split("train", tmp_path, paths, jpeg_split.targets, ["a", "b"], "photos")
    teacher = build_teacher({"name": "hf", "model": vlm, "batch_size": 3, "check_reuse": False})
    batches = list(shard_batches(split, range(0, 7), teacher, workers=1))
    assert [b.positions for b in batches] == [[0, 2], [3, 4], [6]]
    failed = dict(f for b in batches for f in b.failed)
    assert sorted(failed) == [1, 5]
    assert failed[1].startswith(f"cannot read image {paths[1]}") and "\n" not in failed[1]
    assert failed[5].startswith("the teacher's processor rejects it: ") and "aspect ratio" in failed[5]
    assert [len(b.inputs["images"]) for b in batches] == [2, 2, 1]


@pytest.mark.slow  # DataLoader worker processes
def test_class_level_teachers_never_decode_images(jpeg_split, tmp_path):
    """The text teacher takes class indices: a corrupt image file is never opened, so it is no failure."""
    paths = list(jpeg_split.paths)
    paths[2] = tmp_path / "broken.jpg"
    paths[2].write_bytes(b"not an image")
    split = file_split("train", tmp_path, paths, jpeg_split.targets, ["a", "b"], "photos")
    teacher = build_teacher({"name": "text", "model": str(save_random_lm(tmp_path / "lm")), "batch_size": 4})
    batches = list(shard_batches(split, range(1, 7), teacher, workers=1))
    assert [b.positions for b in batches] == [[1, 2, 3, 4], [5, 6]] and all(b.failed == [] for b in batches)
    assert [list(b.inputs["classes"]) for b in batches] == [[1, 0, 1, 0], [1, 0]] and "images" not in batches[0].inputs


@pytest.mark.slow  # DataLoader worker processes
def test_the_worker_processes_stop_when_the_label_job_ends(jpeg_split, tmp_path, monkeypatch):
    """They serve every shard of the job (kept between shards), and no longer: the process goes on (e.g. to train)."""
    before, pools, start = set(multiprocessing.active_children()), [], WorkerPool.__init__
    monkeypatch.setattr(WorkerPool, "__init__", lambda pool, *args: pools.append(pool) or start(pool, *args))
    teacher = PixelTeacher(batch_size=2)
    store = label_split(jpeg_split, teacher, make_question_set(["a", "b"], n=2), tmp_path / "s", shard_size=3,
                        workers=2, progress=False)
    assert len(store.read()[0]) == 7 and teacher.calls == 5  # 3 shards, in batches of 2
    assert len(pools) == 1  # one pool for the 3 shards
    assert set(multiprocessing.active_children()) - before == set()
