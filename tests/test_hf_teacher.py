"""The `hf` teacher on tiny randomly initialised models of real architectures, loaded from disk like a hub model.

Reference: transformers' documented path, one (image, question) at a time — `processor.apply_chat_template(...,
tokenize=True, return_dict=True)` and a full forward — with Yes/No log-odds and mass recomputed here in float64.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import REPO, make_question_set, question_set
from PIL import Image
from support.random_models import ARCHITECTURES, VARIANTS, save_random_lm, save_random_vlm

from makd.clients.hf import gpu_group, node_layout
from makd.errors import MakdError
from makd.labels import LabelStore, label_split
from makd.questions import QuestionSet
from makd.teachers import build_teacher
from makd.teachers.hf_adapter import SuffixLayout, suffix_layout
from makd.teachers.hf_backends import PackedBackend, PrefixBackend
from makd.teachers.hf_reuse import PROVEN_PREFIX_REUSE, reuse_mismatch
from makd.teachers.hf_vlm import HFVLMTeacher

QUESTIONS = ["Does the object have wheels?", "Is it worn on the feet?", "Does it have fur?", "Is the item red?",
             "Is it made of metal or wood?"]
YES, NO = ["Yes", "yes", " Yes", " yes"], ["No", "no", " No", " no"]
# 50 questions of 2 to 17 words, from templates.
SUBJECTS = ["wheels", "fur", "sleeves", "legs", "a handle", "laces", "a zipper", "buttons", "a hood", "pockets"]
TEMPLATES = ["Does it have {s}?", "Would you say it has {s}?", "Can you see {s} on the item in the image?",
             "Is the object in this photo an item that has {s}, as most items of its kind do?", "{S}?"]
MANY = [TEMPLATES[i % 5].format(s=SUBJECTS[i // 5], S=SUBJECTS[i // 5].capitalize()) for i in range(50)]

# How the default (auto) path scores each architecture of the sweep.
PLAIN = {"paligemma"}  # a prefix-LM: its prompt tokens attend both ways, so no prefix can be shared
BATCHED = {"gemma3", "internvl_sliding"}  # sliding windows shorter than the prompt: batched suffix rows
MODEL_TYPE = {arch: VARIANTS.get(arch, (arch,))[0] for arch in ARCHITECTURES}


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
    """Different sizes, aspect ratios and modes: landscape RGB noise, a square ramp, a grey portrait crop of a
    Fashion-MNIST image."""
    rng = np.random.default_rng(0)
    noise = Image.fromarray((rng.random((40, 56, 3)) * 255).astype(np.uint8))
    ramp = Image.fromarray(np.tile(np.linspace(0, 255, 64, dtype=np.uint8)[:, None, None], (1, 64, 3)))
    return [noise, ramp, fmnist_test.image(0).crop((4, 0, 24, 28))]


@pytest.fixture(scope="module")
def vlm_folder(tmp_path_factory):
    folders: dict[str, str] = {}

    def get(arch: str) -> str:
        if arch not in folders:
            folders[arch] = str(save_random_vlm(arch, tmp_path_factory.mktemp(arch)))
        return folders[arch]

    return get


@pytest.fixture(scope="module")
def reference(images):
    """(log-odds, mass) [images, questions] the slow, documented way, in float64; each (model, image, question)
    computed once per module, so the Q = 1, 5 and 50 tests share it."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    loaded: dict[str, tuple] = {}
    pairs: dict[tuple[str, int, str], tuple[float, float]] = {}

    def pair(folder: str, i: int, question: str) -> tuple[float, float]:
        if folder not in loaded:
            processor = AutoProcessor.from_pretrained(folder)
            tok = processor.tokenizer
            ids = [[tok.encode(v, add_special_tokens=False) for v in group] for group in (YES, NO)]
            loaded[folder] = (processor, AutoModelForImageTextToText.from_pretrained(folder).eval(),
                              *[sorted({i[0] for i in group if len(i) == 1}) for group in ids])
        processor, model, yes, no = loaded[folder]
        conv = [{"role": "user", "content": [{"type": "image", "image": images[i].convert("RGB")},
                                             {"type": "text", "text": f"{question} Answer with Yes or No."}]}]
        thinking = {"enable_thinking": False} if "enable_thinking" in processor.chat_template else {}
        inputs = processor.apply_chat_template(conv, add_generation_prompt=True, tokenize=True, return_dict=True,
                                               return_tensors="pt", **thinking)
        with torch.inference_mode():
            lp = torch.log_softmax(model(**inputs).logits[0, -1].double(), dim=-1)
        ly, ln = torch.logsumexp(lp[yes], 0), torch.logsumexp(lp[no], 0)
        return float(ly - ln), float(ly.exp() + ln.exp())

    def compute(folder: str, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        for i in range(len(images)):
            for q in texts:
                if (folder, i, q) not in pairs:
                    pairs[folder, i, q] = pair(folder, i, q)
        table = np.array([[pairs[folder, i, q] for q in texts] for i in range(len(images))])
        return table[..., 0], table[..., 1]

    return compute


def count_encodings(teacher) -> dict[str, int]:
    """Forwards given pixels (image encodings), counted as they run; teacher.counts has the backends' forwards."""
    calls = {"images": 0}

    def hook(_module, _args, kwargs):
        calls["images"] += kwargs.get("pixel_values") is not None

    teacher.model.register_forward_pre_hook(hook, with_kwargs=True)
    return calls


def forced_batched(monkeypatch):
    """Question tails as batched rows on every architecture (the form sliding windows and flash attention take)."""
    monkeypatch.setattr(HFVLMTeacher, "_prefix_backend", lambda self, batch, plan: self.batched)


def check_equal_to_reference(arch, teacher, images, qs, expected, caplog):
    """The default path for `arch` (teacher.score): all images of the batch prefilled in ONE forward (left-padded:
    their prompts differ in length where images make different numbers of tiles), each chunk of question tails
    continued from the cache; then the batched form of the tails on every architecture, and the plain path (the
    images' heads + each question's tail, in full)."""
    expected_lo, expected_mass = expected
    rows = teacher.options.question_batch
    chunks = -(-len(qs) // rows)
    teacher.counts.clear()
    encodings = count_encodings(teacher)
    with caplog.at_level(logging.WARNING, logger="makd"):
        scores = teacher.score(images, qs)
    assert scores.logodds.dtype == np.float32 and scores.logodds.shape == (len(images), len(qs))
    np.testing.assert_allclose(scores.logodds, expected_lo, atol=1e-4, rtol=0)
    np.testing.assert_allclose(scores.mass, expected_mass, atol=1e-5, rtol=1e-4)
    prepared, plan = teacher.preparer()(images), teacher.plan(qs)
    if arch in PLAIN:
        assert not teacher.policy.active and teacher.counts == {"plain": len(qs)}
    else:
        assert teacher.policy.active and encodings["images"] == 1  # every image encoded once, in one prefill
        form, per_chunk = ("batched", len(images)) if arch in BATCHED else ("packed", 1)
        assert teacher.counts == {"prefill": 1, form: chunks * per_chunk}
        if arch in BATCHED:
            assert "not packed, for prompts longer than its sliding attention window" in caplog.text
        # The batched form is exact on every architecture too (it serves sliding windows and flash attention).
        teacher.counts.clear()
        np.testing.assert_allclose(teacher.batched.score(prepared, plan, rows)[0], expected_lo, atol=1e-4, rtol=0)
        assert teacher.counts == {"prefill": 1, "batched": chunks * len(images)}
    # Plain rows: with 6 rows per forward, the 3 images' heads + the tails of 2 questions each.
    teacher.counts.clear()
    logodds, mass = teacher.plain.score(prepared, plan, 2 * len(images))
    np.testing.assert_allclose(logodds, expected_lo, atol=1e-4, rtol=0)
    np.testing.assert_allclose(mass, expected_mass, atol=1e-5, rtol=1e-4)
    assert teacher.counts == {"plain": -(-len(qs) // 2)}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_each_path_equals_reference(arch, vlm_folder, reference, images, questions, caplog):
    """Q = 5 questions in chunks of 2 (unequal suffix lengths, right-padded or packed), 3 images of different sizes
    in one batch; and Q = 1 (one token of the question, the instruction and the generation prompt per tail)."""
    folder = vlm_folder(arch)
    expected = reference(folder, QUESTIONS)
    # The image must matter and the question must matter, or equality would prove little (seeded_init: by 0.27 and
    # 0.15 at least, in log-odds, whatever transformers' own initialisation does).
    assert np.abs(expected[0][0] - expected[0][1]).max() > 0.1 and expected[0].std(axis=1).min() > 0.1
    assert ((expected[1] > 0) & (expected[1] < 1)).all()

    teacher = build_teacher({"name": "hf", "model": folder, "question_batch": 2, "check_reuse": False})
    check_equal_to_reference(arch, teacher, images, questions, expected, caplog)
    one = question_set(QUESTIONS[2:3])
    check_equal_to_reference(arch, teacher, images, one, reference(folder, QUESTIONS[2:3]), caplog)
    # The reference path of the reuse check: the processor on every full prompt.
    pairs = teacher.plain.score_pairs(images[:1], teacher.plan(questions), 4)
    np.testing.assert_allclose(pairs[0], expected[0][:1], atol=1e-4, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["qwen2_vl", "gemma3"])
def test_fifty_questions_equal_reference(arch, vlm_folder, reference, images, caplog):
    """Q = 50 questions of 2 to 17 words in chunks of 16 (the last one of 2), on one packed model (with M-RoPE) and
    one batched one (sliding windows): the long-question chunking. Every architecture's equality is proven above on
    5 questions in chunks of 2."""
    folder = vlm_folder(arch)
    teacher = build_teacher({"name": "hf", "model": folder, "question_batch": 16, "check_reuse": False})
    check_equal_to_reference(arch, teacher, images, question_set(MANY), reference(folder, MANY), caplog)


def test_proven_set_is_what_the_tests_sweep_and_the_docs_name():
    """Reuse by default exactly for the model types whose sweep above proves it; README and docs name that set."""
    proven = {MODEL_TYPE[arch] for arch in ARCHITECTURES if arch not in PLAIN}
    assert PROVEN_PREFIX_REUSE == proven
    for doc in (REPO / "README.md", REPO / "docs" / "teachers.md"):
        lists = re.findall(r"shared-prefix model types:([^—]*)—", doc.read_text())
        assert len(lists) == 1, doc
        assert sorted(re.findall(r"`(\w+)`", lists[0])) == sorted(proven), doc


def test_suffix_layout_is_read_from_the_config():
    """Packed only where one custom mask is right for every layer; the reason is named otherwise."""
    from transformers import (
        Gemma3Config,
        InternVLConfig,
        Llama4Config,
        LlavaConfig,
        MistralConfig,
        Qwen3NextConfig,
    )

    def loaded(config, implementation="sdpa"):
        config._attn_implementation = implementation
        return suffix_layout(config)

    assert loaded(LlavaConfig()) == SuffixLayout("packed", None, "")
    # Sliding windows: packed, but only for prompts that fit in the smallest window (checked per image).
    assert loaded(Gemma3Config(text_config={"sliding_window": 512})).window == 512
    assert loaded(MistralConfig(sliding_window=64)) == SuffixLayout("packed", 64, "")  # every layer slides: no layer_types
    sliding = InternVLConfig(text_config={"model_type": "qwen2", "use_sliding_window": True, "sliding_window": 16,
                                          "max_window_layers": 1, "num_hidden_layers": 2})
    assert loaded(sliding).window == 16
    assert loaded(InternVLConfig(text_config={"model_type": "qwen2", "sliding_window": 16})).window is None  # off
    # Attention that cannot take a custom 4-D mask: batched rows with the model's own masks.
    flash = loaded(LlavaConfig(), "flash_attention_2")
    assert flash.form == "batched" and "attn_implementation=flash_attention_2" in flash.reason
    # Layers a copied cache does not continue exactly: the plain path.
    chunked = loaded(Llama4Config(text_config={"num_hidden_layers": 4}))
    assert chunked.form == "plain" and "chunked_attention layers" in chunked.reason
    linear = loaded(Qwen3NextConfig(num_hidden_layers=4))
    assert linear.form == "plain" and "linear_attention layers" in linear.reason


def test_reuse_tolerance_in_16_bit_follows_the_measured_rounding():
    plain = np.array([-1.0, 0.5, 1.0])  # spread 2
    assert reuse_mismatch(plain + 0.09, plain, "bfloat16", None) is None  # within 5 % of the spread
    assert reuse_mismatch(plain + np.array([0, 0, 0.2]), plain, "bfloat16", None) == \
        "its log-odds differ from the plain forward's by 0.2 (> 0.1)"
    assert reuse_mismatch(plain + 0.2, plain, "bfloat16", None, noise=0.1) is None  # 3x the rounding measured
    assert reuse_mismatch(plain + 0.35, plain, "bfloat16", None, noise=0.1) is not None
    assert reuse_mismatch(plain[:1] + 0.03, plain[:1], "float16", None) is not None  # one question: 0.02
    assert reuse_mismatch(plain + 2e-4, plain, "float32", None, noise=1.0) is None  # float32: 1e-3, always
    assert reuse_mismatch(plain + 2e-3, plain, "float32", None, noise=1.0) is not None
    assert reuse_mismatch(plain + 0.3, plain, "bfloat16", 0.5) is None  # the option overrides


def shifted_positions(monkeypatch):
    """The kind of bug the reuse check is for: packed question tails one position off."""
    original = PackedBackend._continue

    def shifted(self, cache, mask, tails):
        forward = self.adapter.model.forward
        self.adapter.model.forward = lambda *a, **kw: forward(*a, **{**kw, "position_ids": kw["position_ids"] + 1})
        try:
            return original(self, cache, mask, tails)
        finally:
            del self.adapter.model.forward

    monkeypatch.setattr(PackedBackend, "_continue", shifted)


def test_reuse_check_in_bfloat16(vlm_folder, images, questions, caplog, monkeypatch):
    """bf16 rounding alone must not switch a correct shared prefix off; positions off by one must, for the rest of
    that shard only: the next shard checks again."""
    folder = vlm_folder("qwen2_vl")
    teacher = build_teacher({"name": "hf", "model": folder, "dtype": "bfloat16"})
    with caplog.at_level(logging.WARNING, logger="makd"):
        teacher.score(images, questions)
    assert teacher.policy.active and "prefix reuse off" not in caplog.text
    assert teacher.counters()["checks"] == 1 and teacher.counters()["shared_images"] == 3

    shifted_positions(monkeypatch)
    broken = build_teacher({"name": "hf", "model": folder, "dtype": "bfloat16"})
    with caplog.at_level(logging.WARNING, logger="makd"):
        broken.score(images[:2], questions)
    assert "for the rest of this shard (checked again on the next one): its log-odds differ from the plain " \
           "forward's" in caplog.text
    assert not broken.policy.active and broken.counters()["plain_images"] == 2
    broken.start_shard()
    assert broken.policy.active and broken.policy.wants_check  # a failed check is not for good
    broken.score(images[:1], questions)
    assert broken.counters()["checks"] == 2 and broken.counters()["check_failures"] == 2


def test_answer_tokens_metadata_and_resume(vlm_folder, fmnist_test, tmp_path):
    folder = vlm_folder("qwen2_vl")
    teacher = build_teacher({"name": "hf", "model": folder, "batch_size": 3})
    tok = teacher.processor.tokenizer
    answers = teacher.describe()["answer_tokens"]
    prompt = tok(teacher.describe()["prompt"]["example"])["input_ids"]

    def added(variant):  # the tokens a variant adds after the prompt, as the model would write it
        return tok(teacher.describe()["prompt"]["example"] + variant)["input_ids"][len(prompt):]

    # "No" is two tokens in this tokenizer: dropped and recorded, never silently merged.
    assert answers["dropped_not_single_token"] == {"No": added("No")} and len(added("No")) == 2
    assert answers["yes"] == {v: added(v)[0] for v in YES}
    assert answers["no"] == {v: added(v)[0] for v in NO[1:]}
    assert teacher.describe()["weights"]["config_sha256"] and "model.safetensors" in teacher.describe()["weights"]["weight_files"]
    assert "pad_token" not in teacher.describe()  # it has one: nothing to record

    split = fmnist_test.subset(np.arange(5), "part")
    qs = make_question_set(split.class_names, n=3)
    store = label_split(split, teacher, qs, tmp_path / "s", shard_size=2, rank=1, world_size=2, progress=False,
                        share_only=True)
    assert store.missing_shards() == [0, 2]
    meta = json.loads((tmp_path / "s" / "labels.json").read_text())
    assert meta["teacher"]["answer_tokens"] == answers and meta["teacher"]["dtype"] == "float32"
    assert "batch_size" not in meta["teacher"]["options"] and "device" not in meta["teacher"]["options"]
    # Resume with other execution-only options (batch sizes, reuse switch, placement) is the same teacher.
    other = build_teacher({"name": "hf", "model": folder, "batch_size": 1, "question_batch": 1, "prefix_reuse": "off",
                           "device_map": {"": "cpu"}})
    label_split(split, other, qs, tmp_path / "s", shard_size=2, rank=0, world_size=2, progress=False)
    ids, logodds, mass = LabelStore.open(tmp_path / "s").read()
    assert ids == split.sample_ids
    direct = build_teacher({"name": "hf", "model": folder}).score(split.images(range(5)), qs)
    np.testing.assert_allclose(logodds, direct.logodds, atol=1e-4)
    assert LabelStore.open(tmp_path / "s").read_flags() is None


def test_reuse_is_checked_on_the_first_image_of_every_shard(vlm_folder, fmnist_test, tmp_path, caplog):
    """Each shard's first batch is its first image alone, scored both ways; the next batches hold batch_size
    images, each batch's images prefilled in one forward. The label job warns about the low answer mass of these
    random models, per shard."""
    teacher = build_teacher({"name": "hf", "model": vlm_folder("llava"), "batch_size": 2})
    split = fmnist_test.subset(np.arange(7), "part")
    with caplog.at_level(logging.WARNING, logger="makd"):
        label_split(split, teacher, make_question_set(split.class_names, n=3), tmp_path / "s", shard_size=3,
                    progress=False)
    counters = teacher.counters()
    assert counters["checks"] == 3 and counters["check_failures"] == 0 and teacher.policy.active
    # Shards of 3, 3 and 1 images: batches [1, 2], [1, 2], [1]; the checked images are scored both ways.
    assert counters["prefill_forwards"] == 5 and counters["pairs_forwards"] == 3
    assert counters["shared_images"] == 7 and counters["plain_images"] == 0
    assert caplog.text.count("mean answer mass") == 3 and "shard-00002.parquet: mean answer mass" in caplog.text


def test_thinking_is_switched_off(vlm_folder):
    folder = vlm_folder("internvl")  # its template has Qwen3's enable_thinking switch
    example = build_teacher({"name": "hf", "model": folder}).describe()["prompt"]["example"]
    assert example.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert example.index("<IMG_CONTEXT>") < example.index("{question} Answer with Yes or No.")  # image first
    thinking = build_teacher({"name": "hf", "model": folder, "chat_template_kwargs": {}}).describe()["prompt"]["example"]
    assert "<think>" not in thinking


def test_reuse_check_falls_back_or_refuses(vlm_folder, images, questions, monkeypatch, caplog):
    folder = vlm_folder("llava")
    plain = build_teacher({"name": "hf", "model": folder, "prefix_reuse": "off"}).score(images[:2], questions)
    original = PrefixBackend.score
    monkeypatch.setattr(PrefixBackend, "score",  # a model whose prefix reuse were wrong
                        lambda self, batch, plan, rows: tuple(x + 0.01 for x in original(self, batch, plan, rows)))
    auto = build_teacher({"name": "hf", "model": folder})
    with caplog.at_level(logging.WARNING, logger="makd"):
        scores = auto.score(images[:2], questions)
    assert not auto.policy.active and "differ from the plain forward's by 0.01" in caplog.text
    np.testing.assert_allclose(scores.logodds, plain.logodds, atol=1e-5)
    with pytest.raises(MakdError, match="teacher.prefix_reuse=on: .* cannot share an image prefix: its log-odds differ"):
        build_teacher({"name": "hf", "model": folder, "prefix_reuse": "on"}).score(images[:1], questions)


def test_any_failure_of_the_reuse_path_falls_back(vlm_folder, images, questions, monkeypatch, caplog):
    """Not only the teacher's own PrefixReuseError: e.g. the size mismatch a mask that does not fit raises."""
    folder = vlm_folder("internvl")
    plain = build_teacher({"name": "hf", "model": folder, "prefix_reuse": "off"}).score(images, questions)

    def broken(self, cache, mask, tails):
        raise RuntimeError("The size of tensor a (43) must match the size of tensor b (15) at non-singleton dimension 3")

    monkeypatch.setattr(PackedBackend, "_continue", broken)
    auto = build_teacher({"name": "hf", "model": folder, "check_reuse": False})
    with caplog.at_level(logging.WARNING, logger="makd"):
        scores = auto.score(images, questions)
    assert "prefix reuse off for" in caplog.text and "failed (RuntimeError: The size of tensor a (43)" in caplog.text
    assert auto.counters()["forward_failures"] == 1 and auto.counters()["out_of_memory"] == 0
    np.testing.assert_allclose(scores.logodds, plain.logodds, atol=1e-5)
    with pytest.raises(MakdError, match=r"teacher.prefix_reuse=on: .* the shared-prefix forward failed \(RuntimeError"):
        build_teacher({"name": "hf", "model": folder, "prefix_reuse": "on"}).score(images[:1], questions)


@pytest.mark.parametrize("error", [torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                                   RuntimeError("MPS backend out of memory (MPS allocated: 30 GB)")])
def test_out_of_memory_retries_smaller_and_keeps_reuse(error, vlm_folder, reference, images, questions, monkeypatch,
                                                        caplog):
    """A forward that runs out of memory on more than one image, or on more than one question tail, is retried with
    halves of the batch, then with fewer tails per forward: the answers are the reference's, prefix reuse stays on,
    every incident is counted. With one image and one question it is a one-line error."""
    folder = vlm_folder("llava")
    original = PackedBackend._continue
    limit = {"images": 1, "tails": 1}

    def scarce(self, cache, mask, tails):
        if mask.shape[0] > limit["images"] or len(tails) > limit["tails"]:
            raise error
        return original(self, cache, mask, tails)

    monkeypatch.setattr(PackedBackend, "_continue", scarce)
    teacher = build_teacher({"name": "hf", "model": folder, "question_batch": 4, "check_reuse": False})
    with caplog.at_level(logging.WARNING, logger="makd"):
        scores = teacher.score(images, questions)
    np.testing.assert_allclose(scores.logodds, reference(folder, QUESTIONS)[0], atol=1e-4, rtol=0)
    counters = teacher.counters()
    # 3 images fail, then 1 (fails on 4 tails, then 2, then runs on 1) and 2 (fail, then 1 + 1 with 1 tail).
    assert teacher.policy.active and counters["shared_images"] == 3 and counters["forward_failures"] == 0
    assert counters["out_of_memory"] == 4 and teacher._rows == 1 and "retrying in halves" in caplog.text
    teacher.start_shard()
    assert teacher._rows == 4  # a new shard tries the configured size again
    limit["tails"] = 0
    with pytest.raises(MakdError, match="teacher: out of memory scoring one image of .* with one question per forward"):
        teacher.score(images[:1], questions)


def test_device_map_places_the_weights(vlm_folder, images, questions):
    """accelerate's placement (here every module on the CPU, the only device): the same answers as a model moved
    to one device, inputs sent to the input embeddings' device."""
    folder = vlm_folder("llava")
    one = build_teacher({"name": "hf", "model": folder, "check_reuse": False}).score(images, questions)
    for device_map in ({"": "cpu"}, "auto"):
        placed = build_teacher({"name": "hf", "model": folder, "device_map": device_map, "check_reuse": False})
        np.testing.assert_allclose(placed.score(images, questions).logodds, one.logodds, atol=1e-6)
        assert placed.adapter.device.type == "cpu" and {p.device.type for p in placed.model.parameters()} == {"cpu"}


def test_one_process_per_group_of_gpus():
    assert gpu_group(0, 4, 8) == [0, 1] and gpu_group(3, 4, 8) == [6, 7]  # torchrun --nproc_per_node=4, 8 GPUs
    assert gpu_group(0, 1, 8) == list(range(8)) and gpu_group(1, 3, 8) == [2, 3]
    assert gpu_group(1, 2, 2, own=True) == [0, 1]  # srun --gpus-per-task=2: a task sees its own two
    with pytest.raises(MakdError, match="teacher.device_map: 3 processes on this node but 2 GPUs"):
        gpu_group(0, 3, 2)
    assert node_layout(8, {"LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "4"}) == (4, 8, False)
    assert node_layout(2, {"SLURM_NTASKS_PER_NODE": "2(x3)", "SLURM_GPUS_PER_TASK": "2"}) == (2, 2, True)
    assert node_layout(4, {}) == (1, 4, False)


def test_processor_labels_are_dropped(vlm_folder, images, questions):
    """PaliGemma's processor returns `labels`; passed on, every forward would fail on a loss it cannot compute."""
    teacher = build_teacher({"name": "hf", "model": vlm_folder("paligemma"), "prefix_reuse": "off"})
    batch = teacher.processor(text=["<image>Is it red?"], images=[[images[0]]], return_tensors="pt")
    assert "labels" in batch and "labels" not in teacher.adapter.inputs(batch)
    assert teacher.score(images[:1], questions).logodds.shape == (1, 5)


def test_one_pad_rule_for_tokenizers_without_a_pad_token(vlm_folder, tmp_path):
    """LLaVA-NeXT's tokenizer here has none (as Llama and Mistral tokenizers ship): both teachers pad with EOS,
    say so in the provenance, and score as with a pad token (the sweep above checks the values)."""
    from transformers import AutoTokenizer

    folder = vlm_folder("llava_next")
    assert AutoTokenizer.from_pretrained(folder).pad_token is None
    teacher = build_teacher({"name": "hf", "model": folder})
    assert teacher.describe()["pad_token"] == "eos fallback: <|im_end|>"
    lm = save_random_lm(tmp_path / "lm", pad=False)
    text = build_teacher({"name": "text", "model": str(lm)})
    assert text.describe()["pad_token"] == "eos fallback: <|im_end|>"
    scores = text.score([], question_set(QUESTIONS[:3], ["cat", "dog"]), classes=[0, 1])
    assert np.isfinite(scores.logodds).all() and scores.logodds.shape == (2, 3)


def test_no_deprecated_cache_argument(vlm_folder, images, questions):
    """makd passes `cache=`, not `past_key_values=` (deprecated, removed in transformers 5.40)."""
    for arch, form in (("llava", "packed"), ("gemma3", "batched")):
        teacher = build_teacher({"name": "hf", "model": vlm_folder(arch), "check_reuse": False})
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            teacher.score(images[:1], questions)
        assert teacher.counts[form] > 0
        assert [str(w.message) for w in caught if issubclass(w.category, FutureWarning)] == []


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


@pytest.mark.slow  # a CLI subprocess, like tests/test_cli.py
def test_hub_id_without_network_fails_at_once(tmp_path, tiny_imagefolder):
    """No retries for minutes: one line naming the offline alternatives, through the real CLI."""
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    question_set(QUESTIONS, ["Sandal", "T-shirt_top", "Trouser"]).save(tmp_path / "questions.json")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({
        "name": "offline", "questions": "questions.json", "teacher": {"name": "hf", "model": "someorg/some-vlm"},
        "data": {"dataset": "imagefolder", "root": str(tiny_imagefolder), "train_per_class": 4, "val_per_class": 2},
        "labels": {"path": "labels"}}))
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_ENDPOINT=f"http://127.0.0.1:{port}", HF_HOME=str(tmp_path / "hf-home"))
    proc = subprocess.run([sys.executable, "-m", "makd", "label", "-c", "config.yaml"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr  # no "Retrying in 1s" lines either
    assert lines[0] == (f"makd: error: teacher.model: 'someorg/some-vlm' is not a local folder nor in the Hugging Face "
                        f"cache, and the hub at http://127.0.0.1:{port} cannot be reached (ConnectError): give the "
                        "folder of a downloaded model, or the offline teacher `teacher: {name: bridge}`")
    assert not Path(tmp_path / "labels" / "labels.json").exists()
