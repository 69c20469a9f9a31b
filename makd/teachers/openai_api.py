"""The `openai` teacher: any OpenAI-compatible chat-completions server (vLLM, SGLang, llama.cpp, hosted APIs).

One request per (image, question): the image as a base64 data URL first, then the question and the answer
instruction; `max_tokens=1`, temperature 0, `logprobs` with `top_logprobs=k`. The log-odds come from the
top-k list at the answer position (answers.logodds_from_top): a Yes or No group with no variant in the top k
gets the k-th logprob as a bound, and the per-pair `flags` column of the label store records it.

Requests go out image-major (all questions of one image, then the next), so a server's prefix cache — whose
block hashes include the image — serves the image prefix once per image. At most `concurrency` requests are
in flight; 429, 5xx, timeouts and dropped connections are retried with exponential backoff (honouring
Retry-After). The API key is read from the environment variable named by `api_key_env` and is never logged
nor recorded.
"""

from __future__ import annotations

import base64
import io
import logging
from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import numpy as np
import pydantic
from PIL import Image

from makd.clients.hf import chat_messages
from makd.clients.openai_chat import ChatClient, ServerConnection
from makd.effects import EXECUTION, RESULTS, results_options
from makd.questions import QuestionSet
from makd.teachers.answers import (
    NO_BOUNDED,
    YES_BOUNDED,
    PromptOptions,
    logodds_from_top,
)
from makd.teachers.base import AspectScores
from makd.teachers.registry import TEACHERS
from makd.validation import validate

log = logging.getLogger("makd")
FLAGS = {f"flags & {YES_BOUNDED}": "no Yes variant in the top-k: ly is the k-th logprob (an upper bound for each Yes token)",
         f"flags & {NO_BOUNDED}": "no No variant in the top-k: ln is the k-th logprob (an upper bound for each No token)"}


class ServerOptions(ServerConnection, PromptOptions):
    """A teacher behind a server."""

    top_logprobs: int = pydantic.Field(20, ge=1, le=1000, json_schema_extra=RESULTS,
                                       description="hosted OpenAI caps it at 20; vLLM at --max-logprobs")


def data_url(image: Image.Image, fmt: str) -> str:
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    buffer = io.BytesIO()
    rgb.save(buffer, format="PNG" if fmt == "png" else "JPEG", **({"quality": 95} if fmt == "jpeg" else {}))
    return f"data:image/{fmt};base64,{base64.b64encode(buffer.getvalue()).decode()}"


def scores_from_tops(tops: Sequence[list[tuple[str, float]]], o: PromptOptions,
                     shape: tuple[int, int]) -> AspectScores:
    rows = [logodds_from_top(top, o.yes, o.no) for top in tops]
    logodds, mass, flags = (np.array([r[i] for r in rows]).reshape(shape) for i in range(3))
    return AspectScores(logodds.astype(np.float32), mass.astype(np.float32), flags.astype(np.uint8))


def server_describe(o: ServerOptions, name: str) -> dict[str, Any]:
    return {
        "name": name,
        "server": "OpenAI-compatible chat completions",
        "model": o.model,
        "request": {"max_tokens": 1, "temperature": 0, "logprobs": True, "top_logprobs": o.top_logprobs,
                    **o.extra_body},
        "formula": "ly = logsumexp of the top-k logprobs whose token string is a Yes variant (the k-th logprob "
                   "when none is), ln likewise; logodds = ly - ln; mass = exp(ly) + exp(ln)",
        "flags": FLAGS,
        "options": results_options(o),
    }


@TEACHERS.register("openai")
class OpenAITeacher:
    """Scores images through a server; see the module docstring."""

    name: ClassVar[str] = "openai"

    class Options(ServerOptions):
        batch_size: int = pydantic.Field(16, ge=1, json_schema_extra=EXECUTION, description="images per score() call")
        image_format: Literal["png", "jpeg"] = pydantic.Field("png", json_schema_extra=RESULTS)

    def __init__(self, options: Options) -> None:
        self.options = options
        self.batch_size = options.batch_size
        self._client: ChatClient | None = None

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> OpenAITeacher:
        return cls(validate(cls.Options, options, "teacher"))

    @property
    def client(self) -> ChatClient:
        if self._client is None:
            self._client = ChatClient(self.options)
        return self._client

    def describe(self) -> dict[str, Any]:
        return {**server_describe(self.options, self.name),
                "user_content": "[image_url (base64 data URL), question + ' ' + instruction]",
                "preprocessing": f"RGB, sent losslessly as {self.options.image_format}; the server's processor resizes"}

    def score(self, images: Sequence[Image.Image], questions: QuestionSet) -> AspectScores:
        o = self.options
        conversations = []
        for image in images:  # image-major: the server's prefix cache holds one image's prefix at a time
            part = {"type": "image_url", "image_url": {"url": data_url(image, o.image_format)}}
            for q in questions.texts:
                conversations.append(chat_messages([part, {"type": "text", "text": o.user_text(q)}], o.system))
        before = self.client.retries
        tops = self.client.top_logprobs_many(conversations, o.top_logprobs)
        if self.client.retries > before:
            log.info("openai teacher: %d requests retried", self.client.retries - before)
        return scores_from_tops(tops, o, (len(images), len(questions)))
