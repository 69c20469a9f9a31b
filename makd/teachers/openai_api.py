"""The `openai` teacher: any OpenAI-compatible chat-completions server (vLLM, SGLang, llama.cpp, hosted APIs).

One request per (image, question): the image first, then the question and the answer instruction;
`max_tokens=1`, temperature 0, `logprobs` with `top_logprobs=k`. The log-odds come from the top-k list at the
answer position (answers.logodds_from_top): a Yes or No group with no variant in the top k gets the k-th logprob
as a bound, and the per-pair `flags` column of the label store records it.

The image goes as the file's own bytes (`ImageSplit.encoded`: a JPEG stays the JPEG; arrays and crops as a
lossless PNG) in a base64 data URL built once per image and spliced into each of its requests, or, with
`image_transport: file_url`, as a `file://` URL that a server sharing the filesystem reads itself (vLLM:
`--allowed-local-media-path`): then no image bytes cross the network. Both give the server the same file bytes,
so the transport never changes an answer. Per image, the first question goes alone and the others once it has
answered (the image's prefix is then in the server's cache); across images one window of requests stays in
flight per server (makd/clients/openai_chat.py). A `score()` call drains the window at its end, so calls are
large: `batch_size` defaults to the label store's shard size (one call per shard).
"""

from __future__ import annotations

import base64
import concurrent.futures
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import pydantic
from PIL import Image

from makd.clients.hf import chat_messages
from makd.clients.openai_chat import (
    SHARED,
    ChatClient,
    RequestGroup,
    ServerConnection,
    logprob_body,
    parse_top_logprobs,
    wait,
)
from makd.data.base import image_errors, png_bytes, sent_as_is
from makd.effects import EXECUTION, RESULTS, results_options
from makd.errors import MakdError
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


def data_url_json(data: bytes, mime: str) -> bytes:
    """The JSON string of the base64 data URL of a file's bytes (its characters need no escaping)."""
    return b"".join((b'"data:', mime.encode(), b";base64,", base64.b64encode(data), b'"'))


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


@dataclass(frozen=True)
class Submitted:
    """A submitted batch: `result()` waits for its answers and turns them into scores (in the caller's thread)."""

    future: concurrent.futures.Future
    finish: Callable[[Any], AspectScores]

    def result(self) -> AspectScores:
        return self.finish(wait(self.future))

    def cancel(self) -> None:
        self.future.cancel()


@TEACHERS.register("openai")
class OpenAITeacher:
    """Scores images through servers; see the module docstring."""

    name: ClassVar[str] = "openai"

    class Options(ServerOptions):
        batch_size: int = pydantic.Field(512, ge=1, json_schema_extra=EXECUTION,
                                         description="images per score() call; the window drains once per call")
        image_transport: Literal["data_url", "file_url"] = pydantic.Field(
            "data_url", json_schema_extra=EXECUTION, description="data_url: each image's file bytes, base64, in the "
            "requests; file_url: a file:// URL the server reads itself (it must see the same files: vLLM's "
            "--allowed-local-media-path) — the same bytes either way, so the same answers")

    def __init__(self, options: Options) -> None:
        self.options = options
        self.batch_size = options.batch_size
        self._client: ChatClient | None = None
        self._templates: tuple[str, list[tuple[bytes, bytes]]] | None = None  # (question set hash, per question)
        self._retries_logged = 0

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> OpenAITeacher:
        return cls(validate(cls.Options, options, "teacher"))

    @property
    def inputs(self) -> frozenset[str]:
        """What `makd label` passes (teachers/base.py): the files' bytes, or with file_url their paths."""
        return frozenset({"image_files" if self.options.image_transport == "file_url" else "encoded_images",
                          "sample_ids"})

    @property
    def client(self) -> ChatClient:
        if self._client is None:
            self._client = ChatClient(self.options)
        return self._client

    def close(self) -> None:
        """Stops the client's loop and connections now, not when the teacher is collected (teachers/base.py)."""
        if self._client is not None:
            self._client.close()

    def describe(self) -> dict[str, Any]:
        return {**server_describe(self.options, self.name),
                "user_content": "[image_url, question + ' ' + instruction]",
                "preprocessing": "the image file's own bytes when it is a JPEG, PNG or WebP in RGB or grey, else a "
                                 "lossless PNG of the RGB image (in-memory arrays and crops: of the image as it is); "
                                 "the server decodes and resizes"}

    def score(self, images: Sequence[Image.Image], questions: QuestionSet,
              encoded_images: Sequence[tuple[bytes, str]] | None = None,
              image_files: Sequence[Path | None] | None = None,
              sample_ids: Sequence[str] | None = None) -> AspectScores:
        """`encoded_images` (data_url) or `image_files` (file_url) as `makd label` passes them; without them, each
        of `images` is sent as a lossless PNG."""
        return self.submit(images, questions, encoded_images, image_files, sample_ids).result()

    def submit(self, images: Sequence[Image.Image], questions: QuestionSet,
               encoded_images: Sequence[tuple[bytes, str]] | None = None,
               image_files: Sequence[Path | None] | None = None,
               sample_ids: Sequence[str] | None = None) -> Submitted:
        """`score` without waiting: the requests join the window behind those submitted before (the label job
        submits the next shard before writing this one, so the window never drains between shards)."""
        urls = self._image_urls(images, encoded_images, image_files, sample_ids)
        names = [f"sample {sid!r}" for sid in sample_ids] if sample_ids is not None else \
            [f"image {i} of the batch" for i in range(len(urls))]
        templates = self._question_templates(questions)
        groups = [RequestGroup(url, templates, name) for url, name in zip(urls, names)]
        return Submitted(self.client.submit_groups(groups, parse_top_logprobs),
                         lambda answers: self._scores(answers, len(questions)))

    def _scores(self, answers: list[list[list[tuple[str, float]]]], questions: int) -> AspectScores:
        if self.client.retries > self._retries_logged:
            log.info("openai teacher: %d requests retried", self.client.retries - self._retries_logged)
            self._retries_logged = self.client.retries
        return scores_from_tops([top for image in answers for top in image], self.options, (len(answers), questions))

    def _image_urls(self, images: Sequence[Image.Image], encoded: Sequence[tuple[bytes, str]] | None,
                    files: Sequence[Path | None] | None, sample_ids: Sequence[str] | None) -> list[bytes]:
        """Each image's URL as a JSON string, made once per image."""
        if self.options.image_transport == "data_url":
            if encoded is None:
                encoded = [(png_bytes(image), "image/png") for image in images]
            return [data_url_json(data, mime) for data, mime in encoded]
        if files is None:
            raise MakdError("teacher.image_transport: file_url needs the images' files (makd label passes them)")
        urls = []
        for i, path in enumerate(files):
            sample = repr(sample_ids[i]) if sample_ids is not None else f"{i} of the batch"
            if path is None:
                raise MakdError(f"teacher.image_transport: file_url needs image files; sample {sample} is not one "
                                f"(in-memory data, or a crop): use data_url")
            with image_errors(Path(path)):
                as_is = sent_as_is(path)
            if not as_is:
                raise MakdError(f"teacher.image_transport: file_url sends only JPEG, PNG and WebP files in RGB or "
                                f"grey, which servers decode as makd does; {path} is not one: use data_url")
            urls.append(json.dumps(Path(path).resolve().as_uri()).encode())
        return urls

    def _question_templates(self, questions: QuestionSet) -> list[tuple[bytes, bytes]]:
        """Each question's request body around the image's URL, serialised once per question set."""
        if self._templates is None or self._templates[0] != questions.hash:
            o = self.options
            image = {"type": "image_url", "image_url": {"url": SHARED}}
            self._templates = (questions.hash, [
                self.client.request_template(logprob_body(
                    chat_messages([image, {"type": "text", "text": o.user_text(q)}], o.system), o.top_logprobs))
                for q in questions.texts])
        return self._templates[1]
