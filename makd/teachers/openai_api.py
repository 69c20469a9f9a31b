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
import os
import random
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ClassVar, Literal

import numpy as np
import pydantic
from PIL import Image

from makd.errors import MakdError
from makd.questions import QuestionSet
from makd.teachers.answers import NO_BOUNDED, YES_BOUNDED, PromptOptions, logodds_from_top
from makd.teachers.base import AspectScores
from makd.teachers.hf_common import chat_messages
from makd.validation import validate

log = logging.getLogger("makd")
RETRY_STATUS = frozenset({408, 409, 429}) | frozenset(range(500, 600))
FLAGS = {f"flags & {YES_BOUNDED}": "no Yes variant in the top-k: ly is the k-th logprob (an upper bound for each Yes token)",
         f"flags & {NO_BOUNDED}": "no No variant in the top-k: ln is the k-th logprob (an upper bound for each No token)"}


class ServerConnection(pydantic.BaseModel):
    """Where an OpenAI-compatible server is and how hard to push it (teachers and question generators)."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True, protected_namespaces=())

    base_url: str = pydantic.Field(pattern=r"^https?://")  # e.g. http://localhost:8000/v1
    model: str = pydantic.Field(min_length=1)  # the served model's name
    api_key_env: str | None = "OPENAI_API_KEY"  # environment variable holding the key; unset = no auth header
    extra_body: dict[str, Any] = pydantic.Field(default_factory=dict)  # e.g. {"chat_template_kwargs": {...}}
    concurrency: int = pydantic.Field(8, ge=1, le=256)
    timeout: float = pydantic.Field(120.0, gt=0)  # seconds per request
    max_retries: int = pydantic.Field(8, ge=0)
    backoff: float = pydantic.Field(1.0, ge=0)  # first retry delay in seconds, doubled each retry
    max_backoff: float = pydantic.Field(60.0, ge=0)


class ServerOptions(ServerConnection, PromptOptions):
    """A teacher behind a server."""

    top_logprobs: int = pydantic.Field(20, ge=1, le=1000)  # hosted OpenAI caps it at 20; vLLM at --max-logprobs

    # Where the server is and how hard to push it never changes the answers.
    EXECUTION_ONLY: ClassVar[tuple[str, ...]] = ("batch_size", "base_url", "api_key_env", "concurrency", "timeout",
                                                 "max_retries", "backoff", "max_backoff")


class ChatClient:
    """Thread-safe chat-completions client: retries, bounded concurrency, the API key from the environment."""

    def __init__(self, o: ServerConnection, section: str = "teacher") -> None:
        import httpx

        self.options = o
        self.section = section  # the config section errors name
        headers = {}
        if o.api_key_env and os.environ.get(o.api_key_env):
            headers["Authorization"] = f"Bearer {os.environ[o.api_key_env]}"
        self._http = httpx.Client(base_url=o.base_url.rstrip("/") + "/", headers=headers, timeout=o.timeout,
                                  limits=httpx.Limits(max_connections=o.concurrency))
        self._lock = threading.Lock()
        self.retries = 0  # retried requests so far (a health signal, shown in the log)

    def top_logprobs_many(self, conversations: Sequence[list[dict[str, Any]]], k: int) -> list[list[tuple[str, float]]]:
        """Requests submitted in order, at most `concurrency` in flight; results in input order."""
        if self.options.concurrency == 1:
            return [self.top_logprobs(c, k) for c in conversations]
        with ThreadPoolExecutor(self.options.concurrency, thread_name_prefix="makd-openai") as pool:
            return list(pool.map(lambda c: self.top_logprobs(c, k), conversations))

    def top_logprobs(self, messages: list[dict[str, Any]], k: int) -> list[tuple[str, float]]:
        """The answer position's top-k (token, logprob) list: one token, greedy."""
        body = {"messages": messages, "max_tokens": 1, "temperature": 0, "logprobs": True, "top_logprobs": k}
        return parse_top_logprobs(self.post(body), self.options.base_url, self.section)

    def complete(self, messages: list[dict[str, Any]], **sampling: Any) -> list[str]:
        """Generated texts of one conversation (`n`, `temperature`, `top_p`, `max_tokens`, `seed`...)."""
        data = self.post({"messages": messages, **sampling})
        try:
            return [str(choice["message"]["content"] or "") for choice in data["choices"]]
        except (KeyError, TypeError):
            raise MakdError(f"{self.section}.base_url: {self.options.base_url} returned no choices") from None

    def post(self, body: dict[str, Any]) -> dict[str, Any]:
        """POST chat/completions with the model and extra_body added; retries 429, 5xx, timeouts, lost connections."""
        import httpx

        o = self.options
        body = {**o.extra_body, "model": o.model, **body}
        problem = ""
        for attempt in range(o.max_retries + 1):
            if attempt:
                with self._lock:
                    self.retries += 1
            try:
                response = self._http.post("chat/completions", json=body)
            except httpx.TimeoutException:
                problem, wait = f"no answer within {o.timeout:g} s", None
            except httpx.TransportError as exc:
                problem, wait = f"connection failed ({type(exc).__name__})", None
            else:
                if response.status_code == 200:
                    try:
                        return response.json()
                    except ValueError:
                        raise MakdError(f"{self.section}.base_url: {o.base_url} answered with invalid JSON") from None
                problem = f"HTTP {response.status_code}: {error_message(response)}"
                if response.status_code not in RETRY_STATUS:
                    raise MakdError(f"{self.section}.base_url: {o.base_url} answered {problem}")
                wait = retry_after(response)
            if attempt < o.max_retries:
                delay = min(o.max_backoff, wait if wait is not None else o.backoff * 2**attempt * (0.5 + random.random()))
                log.debug("request failed (%s); retry %d in %.2f s", problem, attempt + 1, delay)
                time.sleep(delay)
        raise MakdError(f"{self.section}.base_url: {o.base_url} failed {o.max_retries + 1} times, last: {problem} "
                        f"(finished work is kept: re-run to resume)")

    def close(self) -> None:
        self._http.close()


def parse_top_logprobs(data: dict[str, Any], where: str, section: str) -> list[tuple[str, float]]:
    try:
        first = data["choices"][0]["logprobs"]["content"][0]
        top = [(str(t["token"]), float(t["logprob"])) for t in first.get("top_logprobs") or []]
        return top or [(str(first["token"]), float(first["logprob"]))]
    except (KeyError, IndexError, TypeError):
        raise MakdError(f"{section}.base_url: {where} returned no logprobs for the first token (does the server "
                        f"support logprobs/top_logprobs? vLLM: --max-logprobs)") from None


def error_message(response: Any) -> str:
    try:
        detail = response.json().get("error", response.text)
        detail = detail.get("message", detail) if isinstance(detail, dict) else detail
    except ValueError:
        detail = response.text
    return " ".join(str(detail).split())[:200]


def retry_after(response: Any) -> float | None:
    try:
        return max(0.0, float(response.headers.get("retry-after", "")))
    except ValueError:
        return None


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
        "options": o.model_dump(mode="json", exclude=set(o.EXECUTION_ONLY)),
    }


class OpenAITeacher:
    """Scores images through a server; see the module docstring."""

    name: ClassVar[str] = "openai"

    class Options(ServerOptions):
        batch_size: int = pydantic.Field(16, ge=1)  # images per score() call
        image_format: Literal["png", "jpeg"] = "png"

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
