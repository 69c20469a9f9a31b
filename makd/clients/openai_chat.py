"""OpenAI-compatible chat-completions servers (vLLM, SGLang, llama.cpp, hosted APIs): where they are, and a
client that retries, bounds concurrency and reads the API key from the environment (never logging it).

Used by the `openai` and `text` teachers and by the question LLMs.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pydantic

from makd.effects import EXECUTION, RESULTS
from makd.errors import MakdError

log = logging.getLogger("makd")
RETRY_STATUS = frozenset({408, 409, 429}) | frozenset(range(500, 600))


class ServerConnection(pydantic.BaseModel):
    """Where an OpenAI-compatible server is and how hard to push it (teachers and question generators)."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True, protected_namespaces=())

    base_url: str = pydantic.Field(pattern=r"^https?://", json_schema_extra=EXECUTION,
                                   description="e.g. http://localhost:8000/v1")
    model: str = pydantic.Field(min_length=1, json_schema_extra=RESULTS, description="the served model's name")
    api_key_env: str | None = pydantic.Field("OPENAI_API_KEY", json_schema_extra=EXECUTION, description="environment "
                                             "variable holding the key; unset = no auth header")
    extra_body: dict[str, Any] = pydantic.Field(default_factory=dict, json_schema_extra=RESULTS,
                                                description='e.g. {"chat_template_kwargs": {...}}')
    concurrency: int = pydantic.Field(8, ge=1, le=256, json_schema_extra=EXECUTION, description="requests in flight")
    timeout: float = pydantic.Field(120.0, gt=0, json_schema_extra=EXECUTION, description="seconds per request")
    max_retries: int = pydantic.Field(8, ge=0, json_schema_extra=EXECUTION)
    backoff: float = pydantic.Field(1.0, ge=0, json_schema_extra=EXECUTION,
                                    description="first retry delay in seconds, doubled each retry")
    max_backoff: float = pydantic.Field(60.0, ge=0, json_schema_extra=EXECUTION)


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
