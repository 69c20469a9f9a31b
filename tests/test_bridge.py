"""The offline ImageNet-bridge teacher, with its real (bundled) models, loaded once for the module."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from support.data_packages import foolbox_photos

from makd.data.fashion_mnist import CLASSES, load_fashion_mnist
from makd.errors import MakdError
from makd.questions import QuestionSet
from makd.teachers import build_teacher
from makd.teachers.bridge import BridgeTeacher, imagenet_classes, is_dark_background, preprocess

QUESTIONS = QuestionSet.model_validate({
    "classes": list(CLASSES),
    "questions": [
        {"id": "feet", "text": "Is the item worn on the feet?"},
        {"id": "sleeves", "text": "Does the item have sleeves?"},
        {"id": "handle", "text": "Does the item have a handle?"},
    ],
})
FOOTWEAR, TOPS = (5, 7, 9), (2, 6)  # sandal, sneaker, ankle boot; pullover, shirt


@pytest.fixture(scope="module")
def teacher() -> BridgeTeacher:
    return build_teacher({"name": "bridge", "batch_size": 8})


@pytest.fixture(scope="module")
def fashion() -> tuple[list[Image.Image], np.ndarray]:
    """10 footwear and 10 tops from the test split, in their native 'L' mode."""
    split = load_fashion_mnist("test")
    foot = np.flatnonzero(np.isin(split.targets, FOOTWEAR))[:10]
    tops = np.flatnonzero(np.isin(split.targets, TOPS))[:10]
    idx = np.concatenate([foot, tops])
    return split.images(idx), np.isin(split.targets[idx], FOOTWEAR)


def test_scores_shape_dtype_finite_and_mass_one(teacher, fashion):
    images, _ = fashion
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 200, 3), dtype=np.uint8))
    scores = teacher.score([*images[:3], photo], QUESTIONS)
    assert scores.logodds.shape == scores.mass.shape == (4, len(QUESTIONS))
    assert scores.logodds.dtype == scores.mass.dtype == np.float32
    assert np.isfinite(scores.logodds).all()
    assert (scores.mass == 1.0).all()


def test_deterministic(teacher, fashion):
    images, _ = fashion
    first = teacher.score(images[:4], QUESTIONS).logodds
    assert np.array_equal(first, teacher.score(images[:4], QUESTIONS).logodds)


def test_batching_invariance(teacher, fashion):
    images, _ = fashion
    together = teacher.score(images[:4], QUESTIONS).logodds
    alone = np.concatenate([teacher.score([img], QUESTIONS).logodds for img in images[:4]])
    np.testing.assert_allclose(together, alone, atol=1e-5)


def test_question_relevance_is_cached_per_question_set(teacher):
    assert teacher.relevance(QUESTIONS) is teacher.relevance(QUESTIONS)


def test_auto_inversion_of_dark_background_only():
    item = np.zeros((28, 28), dtype=np.uint8)
    item[8:20, 8:20] = 200
    dark, light = Image.fromarray(item), Image.fromarray(255 - item)
    assert is_dark_background(dark) and not is_dark_background(light)
    # after preprocessing both show a dark item on a light background: identical inputs
    np.testing.assert_array_equal(preprocess(dark, 64, "auto", 0.0), preprocess(light, 64, "auto", 0.0))
    corner = preprocess(dark, 64, "auto", 0.0)[:, 0, 0]
    assert (corner > 0.9).all()  # white background after (x - 127) / 128
    assert (preprocess(dark, 64, "never", 0.0)[:, 0, 0] < -0.9).all()
    assert (preprocess(light, 64, "always", 0.0)[:, 0, 0] < -0.9).all()


def test_colour_photo_is_not_inverted_and_padded_to_square():
    photo = np.full((40, 80, 3), 250, dtype=np.uint8)
    photo[10:30, 20:60] = (200, 30, 30)
    x = preprocess(Image.fromarray(photo), 64, "auto", 0.0)
    assert x.shape == (3, 64, 64)
    assert (x[:, 0, 0] > 0.9).all()  # padding in the (light) border colour, not black


def test_footwear_says_yes_to_worn_on_the_feet(teacher, fashion):
    images, is_foot = fashion
    p_yes = 1.0 / (1.0 + np.exp(-teacher.score(images, QUESTIONS).logodds[:, 0]))
    assert p_yes[is_foot].mean() > p_yes[~is_foot].mean() + 0.05


def test_photos_dog_has_fur_jeep_has_wheels(teacher):
    """Real RGB photos (foolbox's bundled ImageNet samples): a bull mastiff vs two jeeps."""
    files = [foolbox_photos() / f"imagenet_{name}.jpg" for name in ("00_243", "06_609", "07_609")]
    questions = QuestionSet.model_validate({
        "classes": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"],
        "questions": [{"id": "fur", "text": "Does it have fur?"}, {"id": "wheels", "text": "Does it have wheels?"}],
    })
    logodds = teacher.score([Image.open(f) for f in files], questions).logodds
    assert logodds[0, 0] > max(logodds[1:, 0]) and logodds[0, 1] < min(logodds[1:, 1])


def test_empty_batch(teacher):
    scores = teacher.score([], QUESTIONS)
    assert scores.logodds.shape == scores.mass.shape == (0, len(QUESTIONS))


def test_describe_is_json_provenance(teacher):
    info = teacher.describe()
    json.dumps(info)
    assert info["image_model"]["weights"].endswith(".pth") and len(info["image_model"]["sha256"]) == 16
    assert info["name"] == "bridge" and "MiniLM" in info["text_model"] and "1 by construction" in info["mass"]
    # the label store compares describe() on resume: execution-only options must not change it
    assert BridgeTeacher.from_options({"batch_size": 3, "forward_batch": 1}).describe() == info


def test_options_defaults_and_batch_size():
    teacher = BridgeTeacher.from_options({})
    assert teacher.batch_size == BridgeTeacher.Options().batch_size
    assert BridgeTeacher.from_options({"batch_size": 3}).batch_size == 3


@pytest.mark.parametrize("options, name", [({"invert": "sometimes"}, "invert"), ({"image_size": 100}, "image_size"),
                                           ({"colour": "red"}, "colour")])
def test_invalid_option_names_the_option(options, name):
    with pytest.raises(MakdError, match=rf"^teacher: {name}:"):
        BridgeTeacher.from_options(options)


def test_provenance_names_the_imagenet_stand_ins_and_warns_of_poor_ones(teacher, caplog):
    questions = QuestionSet.model_validate({"classes": ["Dalmatian", "jeep", "landscape"],
                                            "questions": [{"id": "q", "text": "Does it have spots?"}]})
    with caplog.at_level("WARNING", logger="makd.teachers"):
        stand_ins = teacher.describe_questions(questions)["stand_ins"]
    assert list(stand_ins) == ["Dalmatian", "jeep", "landscape"] and all(len(s) == 3 for s in stand_ins.values())
    assert stand_ins["Dalmatian"][0]["imagenet"].startswith("dalmatian") and stand_ins["jeep"][0]["imagenet"].startswith("jeep")
    cosines = [s["cosine"] for s in stand_ins["jeep"]]
    assert cosines == sorted(cosines, reverse=True) and cosines[0] >= 0.6
    # The vocabulary the teacher answers through is exactly the union of the stand-ins.
    names = imagenet_classes()[0]
    vocab, _ = teacher.relevance(questions)
    assert sorted(names[k] for k in vocab) == sorted({s["imagenet"] for c in stand_ins.values() for s in c})
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "1 of 3 class names have no close ImageNet class" in warnings[0]
    assert "'landscape' -> " in warnings[0] and "Dalmatian" not in warnings[0]
    json.dumps(stand_ins)  # provenance goes into labels.json
