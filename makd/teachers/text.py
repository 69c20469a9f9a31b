"""The `text` teacher: LaViD's class-level mode — a text LLM answers each question about each class NAME.

No image is looked at: for C classes and Q questions the LLM scores C x Q prompts ("The image shows a
{class_name}. {question} Answer with Yes or No."), once per question set, and every image gets its class's
row. It is cheap (C x Q prompts instead of N x Q image prompts) and often about as good (LaViD, arXiv 2606.27527).
Backends: a local causal LM (`backend: hf`, any AutoModelForCausalLM, GGUF files included through
transformers' GGUF loading) or any OpenAI-compatible server (`backend: openai`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import numpy as np
import pydantic
from PIL import Image
from tqdm.auto import tqdm

from makd.clients.hf import (
    adds_special_tokens,
    load_pretrained,
    model_fingerprint,
    pad_with_eos,
    resolve_device,
    resolve_dtype,
    template_kwargs,
    torch_dtype,
)
from makd.clients.openai_chat import ChatClient
from makd.effects import EXECUTION, RESULTS, results_options
from makd.errors import MakdError
from makd.questions import QuestionSet
from makd.registry import Registry
from makd.teachers.answers import (
    FORMULA,
    AnswerTokens,
    HFOptions,
    logodds_and_mass,
    resolve_answer_tokens,
)
from makd.teachers.base import AspectScores
from makd.teachers.openai_api import ServerOptions, scores_from_tops, server_describe
from makd.teachers.registry import TEACHERS
from makd.validation import validate

DEFAULT_SUBJECT = "The image shows a {class_name}."


class ClassLevel(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)

    subject: str = pydantic.Field(DEFAULT_SUBJECT, json_schema_extra=RESULTS, description="says which class the "
                                  "question is about; must contain {class_name}")
    batch_size: int = pydantic.Field(1024, ge=1, json_schema_extra=EXECUTION, description="samples per score() call "
                                     "(answers are looked up, not computed)")

    @pydantic.field_validator("subject")
    @classmethod
    def _names_the_class(cls, value: str) -> str:
        if "{class_name}" not in value:
            raise ValueError("must contain {class_name}")
        return value


# Where the class-level answers come from (`teacher.backend`): a local causal LM or an OpenAI-compatible server.
TEXT_BACKENDS: Registry[type[pydantic.BaseModel]] = Registry("text-teacher backend", "teacher.backend",
                                                             modules=("makd.teachers.text",))


@TEXT_BACKENDS.register("hf")
class HFTextOptions(HFOptions, ClassLevel):
    backend: Literal["hf"] = pydantic.Field("hf", json_schema_extra=RESULTS)
    question_batch: int = pydantic.Field(32, ge=1, json_schema_extra=EXECUTION, description="prompts per forward")


@TEXT_BACKENDS.register("openai")
class ServerTextOptions(ServerOptions, ClassLevel):
    backend: Literal["openai"] = pydantic.Field(json_schema_extra=RESULTS)


@TEACHERS.register("text")
class TextTeacher:
    """Class-level answers broadcast to images; see the module docstring."""

    name: ClassVar[str] = "text"
    inputs: ClassVar[frozenset[str]] = frozenset({"classes"})

    def __init__(self, options: HFTextOptions | ServerTextOptions) -> None:
        self.options = options
        self.batch_size = options.batch_size
        self._tables: dict[str, AspectScores] = {}
        self._tokenizer: Any = None
        self._model: Any = None
        self._answers: AnswerTokens | None = None
        self._client: ChatClient | None = None
        self._pad_fallback = False  # the tokenizer had no pad token and pads with EOS
        if isinstance(options, HFTextOptions):
            self.device = resolve_device(options.device)
            self.dtype = resolve_dtype(options.dtype, self.device)

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> TextTeacher:
        return cls(validate(TEXT_BACKENDS.get(options.get("backend", "hf")), options, "teacher"))

    def close(self) -> None:
        """Stops the server client's loop and connections now, not when the teacher is collected (teachers/base.py)."""
        if self._client is not None:
            self._client.close()

    # -- prompts ------------------------------------------------------------------------------------------
    def user_text(self, class_name: str, question: str) -> str:
        return f"{self.options.subject.format(class_name=class_name)} {self.options.user_text(question)}"

    def messages(self, class_name: str, question: str) -> list[dict[str, str]]:
        system = [{"role": "system", "content": self.options.system}] if self.options.system else []
        return [*system, {"role": "user", "content": self.user_text(class_name, question)}]

    def _render(self, class_name: str, question: str) -> str:
        """The chat template's prompt, or a plain completion prompt for a base model without one."""
        tok = self.tokenizer
        if not tok.chat_template:
            return f"{self.user_text(class_name, question)}\nAnswer:"
        return tok.apply_chat_template(self.messages(class_name, question), add_generation_prompt=True, tokenize=False,
                                       **template_kwargs(tok.chat_template, self.options.chat_template_kwargs))

    # -- local model --------------------------------------------------------------------------------------
    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            tok = load_pretrained(AutoTokenizer, self.options, "tokenizer")
            self._pad_fallback = pad_with_eos(tok)
            tok.padding_side = "left"  # every row's last position is the answer position
            self._tokenizer = tok
        return self._tokenizer

    @property
    def model(self) -> Any:
        if self._model is None:
            from transformers import AutoModelForCausalLM

            model = load_pretrained(AutoModelForCausalLM, self.options, "model", dtype=torch_dtype(self.dtype))
            self._model = model.to(self.device).eval()
        return self._model

    @property
    def answers(self) -> AnswerTokens:
        if self._answers is None:
            self._answers = resolve_answer_tokens(self.tokenizer, self.options.yes, self.options.no,
                                                  self._render("{class_name}", "{question}"))
        return self._answers

    def _local_table(self, pairs: list[tuple[str, str]]) -> AspectScores:
        import torch

        prompts = [self._render(c, q) for c, q in pairs]
        special = adds_special_tokens(self.tokenizer, prompts[0])
        step = self.options.question_batch
        logodds, mass = [], []
        for start in tqdm(range(0, len(prompts), step), desc="text teacher: classes x questions", unit="batch",
                          leave=False):
            batch = self.tokenizer(prompts[start:start + step], return_tensors="pt", padding=True,
                                   add_special_tokens=special).to(self.device)
            with torch.inference_mode():
                logits = self.model(**batch, logits_to_keep=1).logits[:, -1]
            lo, m = logodds_and_mass(logits, self.answers)
            logodds.append(lo)
            mass.append(m)
        return AspectScores(np.concatenate(logodds)[:, None], np.concatenate(mass)[:, None])

    # -- contract -----------------------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        o = self.options
        common = {"name": self.name, "backend": o.backend, "subject": o.subject, "instruction": o.instruction,
                  "broadcast": "class-level: every image gets the answers for its class name (no image is seen)"}
        if isinstance(o, ServerTextOptions):
            return {**server_describe(o, self.name), **common,
                    "example": self.messages("{class_name}", "{question}")}
        described = {**common, "model": o.model, "revision": o.revision, "gguf_file": o.gguf_file,
                     "weights": model_fingerprint(o), "dtype": self.dtype, "trust_remote_code": o.trust_remote_code,
                     "example": self._render("{class_name}", "{question}"), "answer_tokens": self.answers.describe(),
                     "formula": FORMULA,
                     "options": results_options(o)}
        if self._pad_fallback:  # only then: stores of tokenizers with a pad token resume unchanged
            described["pad_token"] = f"eos fallback: {self.tokenizer.pad_token}"
        return described

    def class_table(self, questions: QuestionSet) -> AspectScores:
        """[C, Q] answers for every class name of the question set, computed once per set."""
        if questions.hash not in self._tables:
            pairs = [(c, q) for c in questions.classes for q in questions.texts]  # class-major
            shape = (len(questions.classes), len(questions))
            if isinstance(self.options, ServerTextOptions):
                if self._client is None:
                    self._client = ChatClient(self.options)
                tops = self._client.top_logprobs_many([self.messages(c, q) for c, q in pairs], self.options.top_logprobs)
                table = scores_from_tops(tops, self.options, shape)
            else:
                flat = self._local_table(pairs)
                table = AspectScores(flat.logodds.reshape(shape), flat.mass.reshape(shape))
            self._tables[questions.hash] = table
        return self._tables[questions.hash]

    def score(self, images: Sequence[Image.Image], questions: QuestionSet,
              classes: Sequence[int] | None = None) -> AspectScores:
        if classes is None:
            raise MakdError("the text teacher answers per class: it needs each sample's class (makd label passes it)")
        table = self.class_table(questions)
        rows = np.asarray(classes, dtype=np.int64)
        if len(rows) and (rows.min() < 0 or rows.max() >= len(questions.classes)):
            raise MakdError(f"class index {int(rows.max())} is outside the question set's {len(questions.classes)} classes")
        flags = table.flags[rows] if table.flags is not None else None
        return AspectScores(table.logodds[rows], table.mass[rows], flags)
