"""Yes/No answer tokens found where the model writes its answer: after the chat template's generation prompt.

Two tiny tokenizers trained offline with the `tokenizers` library: byte-level BPE (GPT-2, Qwen, SmolLM) and
SentencePiece-style BPE with a metaspace pre-tokenizer (Llama 2, Mistral, Gemma), whose word-start piece makes
"yes" written after "<|im_start|>assistant\\n" another token than "yes" tokenized alone.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
from conftest import question_set
from support.random_models import build_tokenizer, save_random_lm

from makd.errors import MakdError
from makd.teachers import build_teacher
from makd.teachers.answers import DEFAULT_NO, DEFAULT_YES, resolve_answer_tokens, warn_low_mass


def rendered_prompt(tok) -> str:
    conversation = [{"role": "user", "content": "Is it red? Answer with Yes or No."}]
    return tok.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)


def test_byte_level_bpe_variants_in_context():
    tok = build_tokenizer("qwen2_vl", style="bpe")
    prompt = rendered_prompt(tok)
    assert prompt.endswith("<|im_start|>assistant\n")
    answers = resolve_answer_tokens(tok, DEFAULT_YES, DEFAULT_NO, prompt)
    ids = tok.convert_tokens_to_ids
    assert answers.yes == {"Yes": ids("Yes"), "yes": ids("yes"), " Yes": ids("ĠYes"), " yes": ids("Ġyes")}
    # Byte-level BPE has no word-start piece: a variant is the same token alone and in context.
    assert all(tok.encode(v, add_special_tokens=False) == [i] for v, i in answers.yes.items())
    assert answers.dropped == {"No": [ids("N"), ids("o")]}  # two tokens here, recorded, never merged


def test_metaspace_variants_in_context():
    """"yes" right after the generation prompt is the piece `yes`; tokenized alone it would be `▁yes` (the token of
    " yes"), which the old resolution counted instead, twice, and missed `yes`."""
    tok = build_tokenizer("qwen2_vl", style="metaspace")
    prompt = rendered_prompt(tok)
    answers = resolve_answer_tokens(tok, DEFAULT_YES, DEFAULT_NO, prompt)
    ids = tok.convert_tokens_to_ids
    assert tok.encode("yes", add_special_tokens=False) == [ids("▁yes")]  # alone: the word-start piece
    assert answers.yes == {"yes": ids("yes"), " Yes": ids("▁Yes"), " yes": ids("▁yes")}
    assert answers.no == {"no": ids("no"), " No": ids("▁No"), " no": ids("▁no")}
    # "Yes" after the newline is two pieces: not an answer token of its own (alone it is ▁Yes, " Yes"'s token).
    assert answers.dropped == {"Yes": [ids("Y"), ids("es")], "No": [ids("N"), ids("o")]}
    assert tok.encode("Yes", add_special_tokens=False) == [ids("▁Yes")]
    with pytest.raises(MakdError, match=r"teacher.yes: none of the variants \['Yes'\] is a single token of this "
                                        r"model's tokenizer after its prompt"):
        resolve_answer_tokens(tok, ["Yes"], DEFAULT_NO, prompt)


@pytest.mark.parametrize("style", ["bpe", "metaspace"])
def test_text_teacher_resolves_in_context_too(style, tmp_path):
    """The text teacher renders its own prompt (subject + question) and finds the tokens after it alike."""
    teacher = build_teacher({"name": "text", "model": str(save_random_lm(tmp_path / "lm", style=style))})
    tok = teacher.tokenizer
    prompt = teacher.describe()["example"]
    context = tok(prompt)["input_ids"]
    for variant, token in {**teacher.answers.yes, **teacher.answers.no}.items():
        assert tok(prompt + variant)["input_ids"] == [*context, token]
    expected_yes = {"bpe": {"Yes", "yes", " Yes", " yes"}, "metaspace": {"yes", " Yes", " yes"}}[style]
    assert set(teacher.answers.yes) == expected_yes
    scores = teacher.score([], question_set(["Is it red?"], ["cat", "dog"]), classes=[0, 1])
    assert np.isfinite(scores.logodds).all()


def test_low_answer_mass_warns_with_the_worst_questions(caplog):
    mass = np.array([[0.9, 0.05, 0.3], [0.8, 0.01, 0.2]], np.float32)  # mean 0.377
    with caplog.at_level(logging.WARNING, logger="makd"):
        message = warn_low_mass(mass, ["q0", "q1", "q2"], "shard 4")
    assert message is not None and message in caplog.text
    assert message.startswith("shard 4: mean answer mass 0.377 < 0.5: the teacher mostly answers neither Yes nor No "
                              "(lowest: q1 0.03, q2 0.25, q0 0.85)")
    assert warn_low_mass(mass + 0.2, ["q0", "q1", "q2"], "shard 4") is None
    assert warn_low_mass(np.zeros((0, 3), np.float32), ["q0", "q1", "q2"], "shard 4") is None
