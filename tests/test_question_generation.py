"""`makd questions generate`: prompts, the sampling loop, the response cache, the local/API backends, and a real
run of the embedded SmolLM2-135M."""

from __future__ import annotations

import json

import pytest
from conftest import chat_loop_threads
from support.openai_server import ServerProcess
from support.random_models import save_random_lm

from makd.errors import MakdError
from makd.questions.clean import YES_NO_OPENERS, class_mentioned, normalise
from makd.questions.generate import build_prompt, generate_questions
from makd.questions.llm import EmbeddedLLM, TextLLM

CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


class ScriptedLLM(TextLLM):
    """Answers from a script (one list of responses per round) instead of a model: tests the loop around it."""

    def __init__(self, script: list[list[str]], cache=None) -> None:
        super().__init__(EmbeddedLLM(), cache)
        self.script, self.calls = script, 0

    def _local(self, prompt, n, seed):
        self.calls += 1
        return self.script[min(self.calls - 1, len(self.script) - 1)][:n]


def test_prompts():
    paper = build_prompt("paper", CLASSES, 50, 200, None, "Sandal")
    assert paper[0]["role"] == "user" and "10 classes and 200 images" in paper[0]["content"]
    assert "Generate 50 feature-specific yes or no questions" in paper[0]["content"]
    few = build_prompt("few_shot", CLASSES, 50, 200, "photos of clothes", "Sandal")
    assert few.endswith("tell a Sandal apart from the other classes:\n1.")
    assert "Classes: T-shirt/top, Trouser" in few and "Dataset: photos of clothes." in few


def test_loop_collects_until_n_and_keeps_every_verdict(tmp_path):
    script = [["Does it have laces?\n2. Is it a sneaker?\n3. What colour is it?"],
              ["Does it have laces?\n2. Is it made of leather?"],
              ["Does it have a zipper?\n2. Does it have a hood?"]]
    llm = ScriptedLLM(script, cache=tmp_path / "cache.json")
    qs, log = generate_questions(CLASSES, llm, n=3, num_images=200, samples=1, max_rounds=10, progress=False)
    assert qs.texts == ["Does it have laces?", "Is it made of leather?", "Does it have a zipper?"]
    assert llm.calls == 3 and qs.generation["rounds"] == 3 and qs.generation["style"] == "few_shot"
    assert [q.source for q in qs.questions] == ["round 1 sample 1:1", "round 2 sample 1:2", "round 3 sample 1:1"]
    assert qs.generation["rejected"] == {"names a class": 1, "not a yes/no question": 1, "duplicate": 1}
    assert len(log["responses"]) == 3 and all(r["focus"] for r in log["responses"])
    assert sum(c["accepted"] for c in log["candidates"]) == 4  # the 4th accepted one is beyond N
    # A re-run answers from the cache: the script is not consulted again.
    again = ScriptedLLM([["Is it red?"]], cache=tmp_path / "cache.json")
    qs2, _ = generate_questions(CLASSES, again, n=3, num_images=200, samples=1, max_rounds=10, progress=False)
    assert again.calls == 0 and qs2.texts == qs.texts


def test_no_usable_question_is_an_error():
    with pytest.raises(MakdError, match="no usable question in 2 rounds"):
        generate_questions(CLASSES, ScriptedLLM([["What is it?"]]), n=5, num_images=10, samples=1, max_rounds=2,
                           progress=False)


def test_unknown_backend_and_bad_option():
    with pytest.raises(MakdError, match="llm.backend: unknown LLM backend 'vllm'"):
        TextLLM.from_options({"backend": "vllm"})
    with pytest.raises(MakdError, match="llm: temperature"):
        TextLLM.from_options({"backend": "smollm2", "temperature": 9})


@pytest.fixture(scope="module")
def lm(tmp_path_factory) -> str:
    return str(save_random_lm(tmp_path_factory.mktemp("lm")))


def test_local_backend_is_seeded_and_cached(lm, tmp_path):
    options = {"backend": "hf", "model": lm, "max_new_tokens": 12}
    first = TextLLM.from_options(options, cache=tmp_path / "c.json")
    a = first.generate("Questions:\n1.", 2, seed=3)
    assert len(a) == 2 and a == first.generate("Questions:\n1.", 2, seed=3)
    assert a != first.generate("Questions:\n1.", 2, seed=4)
    cached = TextLLM.from_options(options, cache=tmp_path / "c.json")
    assert cached.generate("Questions:\n1.", 2, seed=3) == a and cached._model is None  # never loaded
    assert len(json.loads((tmp_path / "c.json").read_text())) == 2


def test_openai_backend_matches_the_same_model_run_locally(lm, tmp_path):
    chat = [{"role": "user", "content": "Write yes/no questions about shoes."}]
    local = TextLLM.from_options({"backend": "hf", "model": lm, "max_new_tokens": 10})
    with ServerProcess(lm, tmp_path, "--text") as server:
        remote = TextLLM.from_options({"backend": "openai", "base_url": server.base_url, "model": "tiny",
                                       "api_key_env": None, "max_new_tokens": 10})
        before = chat_loop_threads()
        assert remote.generate(chat, 2, seed=7) == local.generate(chat, 2, seed=7)
        assert len(server.requests()) == 1 and len(chat_loop_threads() - before) == 1
        remote.close()
        assert chat_loop_threads() - before == set()


@pytest.mark.slow
def test_embedded_smollm2_writes_distinct_well_formed_questions(tmp_path, monkeypatch):
    monkeypatch.setenv("MAKD_CACHE", str(tmp_path / "makd-cache"))  # this test's own: the GGUF is converted here
    llm = TextLLM.from_options({"backend": "smollm2", "max_new_tokens": 80}, cache=tmp_path / "cache.json")
    qs, log = generate_questions(CLASSES, llm, n=8, num_images=200, samples=2, max_rounds=8, progress=False)
    assert len(qs) == 8
    assert len({normalise(t) for t in qs.texts}) == 8
    for text in qs.texts:
        assert text.endswith("?") and text.split()[0].lower() in YES_NO_OPENERS, text
        assert class_mentioned(text, CLASSES) is None, text
    assert qs.generation["llm"]["backend"] == "smollm2" and log["responses"]

    # The dequantised tokenizer and weights were kept (tests/test_gguf_cache.py): the next load reads them, not the
    # GGUF, and gets the same tensors and the same tokens.
    import transformers

    loads = []
    for auto in (transformers.AutoTokenizer, transformers.AutoModelForCausalLM):
        original = auto.from_pretrained.__func__
        monkeypatch.setattr(auto, "from_pretrained", classmethod(
            lambda cls, path, *a, _original=original, **kw: loads.append((path, kw)) or _original(cls, path, *a, **kw)))
    model, tokenizer = llm._load_local()
    model_again, tokenizer_again = TextLLM.from_options({"backend": "smollm2"})._load_local()
    weights, weights_again = model.state_dict(), model_again.state_dict()
    assert weights.keys() == weights_again.keys() and all(weights[k].equal(weights_again[k]) for k in weights)
    text = " ".join(qs.texts) + " Ünïcode, ÷ and 12,345 tokens."
    chat = [{"role": "user", "content": text}]
    assert tokenizer_again.apply_chat_template(chat, tokenize=False) == tokenizer.apply_chat_template(chat, tokenize=False)
    assert tokenizer_again(text).input_ids == tokenizer(text).input_ids
    assert len(loads) == 2 and all(p.startswith(str(tmp_path / "makd-cache" / "gguf")) and "gguf_file" not in kw
                                   for p, kw in loads), loads
