"""The `hf` teacher on tiny randomly initialised models of five real architectures, loaded from disk like a hub model.

Reference: transformers' documented path, one (image, question) at a time — `processor.apply_chat_template(...,
tokenize=True, return_dict=True)` and a full forward — with Yes/No log-odds and mass recomputed here in float64.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from conftest import make_question_set, question_set
from PIL import Image
from support.random_models import ARCHITECTURES, save_random_vlm

from makd.errors import MakdError
from makd.labels import LabelStore, label_split
from makd.questions import QuestionSet
from makd.teachers import build_teacher

QUESTIONS = ["Does the object have wheels?", "Is it worn on the feet?", "Does it have fur?", "Is the item red?",
             "Is it made of metal or wood?"]
YES, NO = ["Yes", "yes", " Yes", " yes"], ["No", "no", " No", " no"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a busy 2-core machine OpenMP spin-waits make each small
    matmul ~500x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def questions() -> QuestionSet:
    return question_set(QUESTIONS)


@pytest.fixture(scope="module")
def images(fmnist_test) -> list[Image.Image]:
    """Different sizes, aspect ratios and modes (a grey Fashion-MNIST image among them)."""
    rng = np.random.default_rng(0)
    noise = Image.fromarray((rng.random((40, 56, 3)) * 255).astype(np.uint8))
    ramp = Image.fromarray(np.tile(np.linspace(0, 255, 64, dtype=np.uint8)[:, None, None], (1, 64, 3)))
    return [noise, ramp, fmnist_test.image(0)]


@pytest.fixture(scope="module")
def vlm_folder(tmp_path_factory):
    folders: dict[str, str] = {}

    def get(arch: str) -> str:
        if arch not in folders:
            folders[arch] = str(save_random_vlm(arch, tmp_path_factory.mktemp(arch)))
        return folders[arch]

    return get


def reference(folder: str, images, questions: QuestionSet) -> tuple[np.ndarray, np.ndarray]:
    """(log-odds, mass) [images, questions] the slow, documented way, in float64."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(folder)
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    tok = processor.tokenizer
    yes = sorted({tok.encode(v, add_special_tokens=False)[0] for v in YES if len(tok.encode(v, add_special_tokens=False)) == 1})
    no = sorted({tok.encode(v, add_special_tokens=False)[0] for v in NO if len(tok.encode(v, add_special_tokens=False)) == 1})
    logodds = np.zeros((len(images), len(questions)))
    mass = np.zeros_like(logodds)
    for i, img in enumerate(images):
        for j, q in enumerate(questions.texts):
            conv = [{"role": "user", "content": [{"type": "image", "image": img.convert("RGB")},
                                                 {"type": "text", "text": f"{q} Answer with Yes or No."}]}]
            inputs = processor.apply_chat_template(conv, add_generation_prompt=True, tokenize=True, return_dict=True,
                                                   return_tensors="pt",
                                                   **({"enable_thinking": False} if "enable_thinking" in processor.chat_template else {}))
            with torch.inference_mode():
                lp = torch.log_softmax(model(**inputs).logits[0, -1].double(), dim=-1)
            ly, ln = torch.logsumexp(lp[yes], 0), torch.logsumexp(lp[no], 0)
            logodds[i, j], mass[i, j] = float(ly - ln), float(ly.exp() + ln.exp())
    return logodds, mass


def count_image_forwards(teacher) -> list[int]:
    calls = [0]

    def hook(_module, _args, kwargs):
        calls[0] += kwargs.get("pixel_values") is not None

    teacher.model.register_forward_pre_hook(hook, with_kwargs=True)
    return calls


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_prefix_reuse_equals_full_forward(arch, vlm_folder, images, questions):
    folder = vlm_folder(arch)
    expected_lo, expected_mass = reference(folder, images, questions)
    # The image must matter and the question must matter, or equality would prove little.
    assert np.abs(expected_lo[0] - expected_lo[1]).max() > 1e-2 and expected_lo.std(axis=1).min() > 1e-2
    assert ((expected_mass > 0) & (expected_mass < 1)).all()

    # question_batch=2 < Q: several suffix batches of unequal lengths, right-padded.
    shared = build_teacher({"name": "hf", "model": folder, "question_batch": 2, "check_reuse": False})
    calls = count_image_forwards(shared)
    scores = shared.score(images, questions)
    assert shared._reuse is True and calls[0] == len(images)  # each image encoded and prefilled once
    assert scores.logodds.dtype == np.float32 and scores.logodds.shape == (3, 5)
    np.testing.assert_allclose(scores.logodds, expected_lo, atol=1e-4, rtol=0)
    np.testing.assert_allclose(scores.mass, expected_mass, atol=1e-5, rtol=1e-4)

    plain = build_teacher({"name": "hf", "model": folder, "question_batch": 4, "prefix_reuse": "off"})
    calls = count_image_forwards(plain)
    scores = plain.score(images, questions)  # batches of (image, question) pairs across images, left-padded
    assert calls[0] == 4  # ceil(15 pairs / 4)
    np.testing.assert_allclose(scores.logodds, expected_lo, atol=1e-4, rtol=0)
    np.testing.assert_allclose(scores.mass, expected_mass, atol=1e-5, rtol=1e-4)


def test_answer_tokens_metadata_and_resume(vlm_folder, fmnist_test, tmp_path):
    folder = vlm_folder("qwen2_vl")
    teacher = build_teacher({"name": "hf", "model": folder, "batch_size": 3})
    tok = teacher.processor.tokenizer
    answers = teacher.describe()["answer_tokens"]
    # "No" is two tokens in this tokenizer: dropped and recorded, never silently merged.
    assert answers["dropped_not_single_token"] == {"No": tok.encode("No", add_special_tokens=False)}
    assert answers["yes"] == {v: tok.encode(v, add_special_tokens=False)[0] for v in YES}
    assert answers["no"] == {v: tok.encode(v, add_special_tokens=False)[0] for v in NO[1:]}
    assert teacher.describe()["weights"]["config_sha256"] and "model.safetensors" in teacher.describe()["weights"]["weight_files"]

    split = fmnist_test.subset(np.arange(5), "part")
    qs = make_question_set(split.class_names, n=3)
    store = label_split(split, teacher, qs, tmp_path / "s", shard_size=2, rank=1, world_size=2, progress=False)
    assert store.missing_shards() == [0, 2]
    meta = json.loads((tmp_path / "s" / "labels.json").read_text())
    assert meta["teacher"]["answer_tokens"] == answers and meta["teacher"]["dtype"] == "float32"
    assert "batch_size" not in meta["teacher"]["options"] and "device" not in meta["teacher"]["options"]
    # Resume with other execution-only options (batch sizes, reuse switch) is the same teacher.
    other = build_teacher({"name": "hf", "model": folder, "batch_size": 1, "question_batch": 1, "prefix_reuse": "off"})
    label_split(split, other, qs, tmp_path / "s", shard_size=2, rank=0, world_size=2, progress=False)
    ids, logodds, mass = LabelStore.open(tmp_path / "s").read()
    assert ids == split.sample_ids
    direct = build_teacher({"name": "hf", "model": folder}).score(split.images(range(5)), qs)
    np.testing.assert_allclose(logodds, direct.logodds, atol=1e-4)
    assert LabelStore.open(tmp_path / "s").read_flags() is None


def test_thinking_is_switched_off(vlm_folder):
    folder = vlm_folder("internvl")  # its template has Qwen3's enable_thinking switch
    example = build_teacher({"name": "hf", "model": folder}).describe()["prompt"]["example"]
    assert example.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert example.index("<IMG_CONTEXT>") < example.index("{question} Answer with Yes or No.")  # image first
    thinking = build_teacher({"name": "hf", "model": folder, "chat_template_kwargs": {}}).describe()["prompt"]["example"]
    assert "<think>" not in thinking


def test_reuse_check_falls_back_or_refuses(vlm_folder, images, questions, monkeypatch, caplog):
    from makd.teachers.hf_vlm import HFVLMTeacher

    folder = vlm_folder("llava")
    original = HFVLMTeacher.score_shared
    monkeypatch.setattr(HFVLMTeacher, "score_shared",  # a model whose prefix reuse were wrong
                        lambda self, image, plan: tuple(x + 0.01 for x in original(self, image, plan)))
    auto = build_teacher({"name": "hf", "model": folder})
    with caplog.at_level(logging.WARNING, logger="makd"):
        scores = auto.score(images[:2], questions)
    assert auto._reuse is False and "differ from the plain forward by 0.01" in caplog.text
    plain = build_teacher({"name": "hf", "model": folder, "prefix_reuse": "off"}).score(images[:2], questions)
    np.testing.assert_array_equal(scores.logodds, plain.logodds)
    with pytest.raises(MakdError, match="teacher.prefix_reuse=on: shared-prefix log-odds differ"):
        build_teacher({"name": "hf", "model": folder, "prefix_reuse": "on"}).score(images[:1], questions)


def test_bad_options_are_one_line_errors(vlm_folder, tmp_path, questions, images):
    with pytest.raises(MakdError, match=r"teacher.model: cannot load the processor of '/nonexistent/m'"):
        build_teacher({"name": "hf", "model": "/nonexistent/m"}).describe()
    with pytest.raises(MakdError, match=r"teacher: question_batch: Input should be greater than or equal to 1"):
        build_teacher({"name": "hf", "model": "x", "question_batch": 0})
    with pytest.raises(MakdError, match=r"teacher: tempreature: Extra inputs are not permitted"):
        build_teacher({"name": "hf", "model": "x", "tempreature": 0})
    with pytest.raises(MakdError, match=r"teacher.no: none of the variants \['Nope!'\] is a single token"):
        build_teacher({"name": "hf", "model": vlm_folder("llava"), "no": ["Nope!"]}).score(images[:1], questions)
    # Code shipped with a model runs only on request.
    custom = tmp_path / "custom"
    custom.mkdir()
    (custom / "config.json").write_text(json.dumps({"model_type": "makd-custom", "auto_map": {
        "AutoConfig": "configuration_custom.CustomConfig", "AutoModelForImageTextToText": "modeling_custom.Custom"}}))
    (custom / "configuration_custom.py").write_text("raise SystemExit('remote code ran')\n")
    with pytest.raises(MakdError, match="trust_remote_code"):
        build_teacher({"name": "hf", "model": str(custom)}).model
