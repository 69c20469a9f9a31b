"""OpenAI-compatible chat-completions servers (vLLM, SGLang, llama.cpp, hosted APIs): where they are, and a client
that keeps each server busy.

Used by the `openai` and `text` teachers and by the question LLMs. The client runs an asyncio event loop in a
background thread that outlives each call, with one window of `concurrency` requests in flight per server
(`base_url` may list several, e.g. one server per GPU). Work comes as groups of requests that share a prompt
prefix (`RequestGroup`, e.g. one image's questions): a group's first request goes alone and the others follow once
it has answered, so the server's prefix cache (vLLM's block hashes include the image) holds the prefix when they
arrive; all of a group's requests go to the server that took its first. Servers take new groups as they have room
(the least loaded first), so several servers balance themselves. 429, 5xx, timeouts and dropped connections
are retried with exponential backoff (honouring Retry-After). The API key is read from the environment variable
named by `api_key_env` and is never logged. The loop and connections stop at `close()`, when the client is
collected, or at exit.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import os
import random
import threading
import weakref
from collections import deque
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import pydantic

from makd.effects import EXECUTION, RESULTS
from makd.errors import MakdError

log = logging.getLogger("makd")
RETRY_STATUS = frozenset({408, 409, 429}) | frozenset(range(500, 600))
# Stands for a group's shared part in a request body while it is serialised (see RequestGroup).
SHARED = "\x00makd-shared-part\x00"
# Requests kept queued behind each server's window (waiting for their group's first answer, or ready), in windows:
# enough that new groups' first requests, sent while the queue is still long, are answered before it runs out
# even when they take three times as long as the others (an image's prefill against a cached prefix).
LOOKAHEAD = 4
# httpx's connection pool scans all its connections for every request: with hundreds that costs more CPU than the
# request itself (encode/httpx#3215; measured here: 11 ms a request with 256 connections in one client, 2.3 ms in
# clients of 8). So a server's window is spread over clients of this many connections, one per slot.
CONNECTIONS_PER_CLIENT = 8
T = TypeVar("T")


class ServerConnection(pydantic.BaseModel):
    """Where OpenAI-compatible servers are and how hard to push them (teachers and question generators)."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True, protected_namespaces=())

    base_url: str | list[str] = pydantic.Field(json_schema_extra=EXECUTION, description="e.g. http://localhost:8000/v1, "
                                               "or a list (one server per GPU) to balance over")
    model: str = pydantic.Field(min_length=1, json_schema_extra=RESULTS, description="the served model's name")
    api_key_env: str | None = pydantic.Field("OPENAI_API_KEY", json_schema_extra=EXECUTION, description="environment "
                                             "variable holding the key; unset = no auth header")
    extra_body: dict[str, Any] = pydantic.Field(default_factory=dict, json_schema_extra=RESULTS,
                                                description='e.g. {"chat_template_kwargs": {...}}')
    concurrency: int = pydantic.Field(256, ge=1, le=8192, json_schema_extra=EXECUTION,
                                      description="requests in flight per server (vLLM batches hundreds)")
    timeout: float = pydantic.Field(300.0, gt=0, json_schema_extra=EXECUTION,
                                    description="seconds per request, time queued in the server included")
    max_retries: int = pydantic.Field(8, ge=0, json_schema_extra=EXECUTION)
    backoff: float = pydantic.Field(1.0, ge=0, json_schema_extra=EXECUTION,
                                    description="first retry delay in seconds, doubled each retry")
    max_backoff: float = pydantic.Field(60.0, ge=0, json_schema_extra=EXECUTION)

    @pydantic.field_validator("base_url")
    @classmethod
    def _urls(cls, value: str | list[str]) -> str | list[str]:
        urls = [value] if isinstance(value, str) else value
        if not urls:
            raise ValueError("give at least one server URL")
        for url in urls:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"{url!r} is not an http(s):// URL")
        if len(set(urls)) != len(urls):
            raise ValueError("lists a server twice")
        return value

    @property
    def urls(self) -> list[str]:
        return [self.base_url] if isinstance(self.base_url, str) else list(self.base_url)


class BadReply(Exception):
    """A 200 answer that does not hold what was asked for (the client names the server)."""


@dataclass(frozen=True)
class RequestGroup:
    """Requests that share a prompt prefix (e.g. one image's questions), sent first-alone to one server.

    Request j's body is `templates[j][0] + shared + templates[j][1]`: the shared part (e.g. an image's data URL,
    JSON-encoded) is serialised once per group, not once per request. `name` says in errors what it is about."""

    shared: bytes
    templates: Sequence[tuple[bytes, bytes]]
    name: str = ""

    def body(self, j: int) -> bytes:
        head, tail = self.templates[j]
        return b"".join((head, self.shared, tail))


def logprob_body(messages: list[dict[str, Any]], k: int) -> dict[str, Any]:
    """The request for the answer position's top-k (token, logprob) list: one token, greedy."""
    return {"messages": messages, "max_tokens": 1, "temperature": 0, "logprobs": True, "top_logprobs": k}


class _Batch(Generic[T]):
    """One call's groups and their answers; failed or cancelled = done, and its queued requests are dropped."""

    def __init__(self, groups: list[RequestGroup], parse: Callable[[dict[str, Any]], T], future: asyncio.Future) -> None:
        self.groups, self.parse, self.future = groups, parse, future
        self.results: list[list[Any]] = [[None] * len(g.templates) for g in groups]
        self.left = sum(len(g.templates) for g in groups)

    @property
    def done(self) -> bool:
        return self.future.done()

    def store(self, g: int, j: int, value: T) -> None:
        self.results[g][j] = value
        self.left -= 1
        if not self.left and not self.done:
            self.future.set_result(self.results)

    def fail(self, exc: BaseException) -> None:
        if not self.done:
            self.future.set_exception(exc)


class _Server:
    """One base URL: its connections, requests in flight, and the requests queued for it."""

    def __init__(self, url: str, clients: list[Any], window: int) -> None:
        self.url, self.clients, self.window = url, clients, window
        self.free = list(range(window))[::-1]  # request slots; slot s uses clients[s // CONNECTIONS_PER_CLIENT]
        self.ready: deque[tuple[_Batch, int, int]] = deque()  # (batch, group, request) whose first has answered
        self.waiting = 0  # requests of groups whose first request is still out
        self.wake = asyncio.Event()

    @property
    def load(self) -> int:
        """Requests this server has to answer: in flight, and queued for it."""
        return self.window - len(self.free) + len(self.ready) + self.waiting


class ChatClient:
    """Thread-safe chat-completions client; see the module docstring. Its loop and connections are an `_Engine`
    that holds no reference back to it, so that a client dropped without `close()` (a teacher or LLM built per
    config in a long process) is collected, and its finalizer stops them then (or at exit)."""

    def __init__(self, o: ServerConnection, section: str = "teacher") -> None:
        self.options = o
        self.section = section  # the config section errors name
        self._engine = _Engine(o, section)
        weakref.finalize(self, self._engine.close)

    @property
    def retries(self) -> int:
        """Retried requests so far (a health signal, shown in the log)."""
        return self._engine.retries

    # -- requests, from any thread -----------------------------------------------------------------------
    def request_template(self, body: dict[str, Any]) -> tuple[bytes, bytes]:
        """`body` with the model and extra_body, serialised and cut where its one value equal to SHARED is (a
        body without it: the whole body and b"")."""
        o = self.options
        text = json.dumps({**o.extra_body, "model": o.model, **body})
        head, _, tail = text.partition(json.dumps(SHARED))
        return head.encode(), tail.encode()

    def submit_groups(self, groups: Sequence[RequestGroup],
                      parse: Callable[[dict[str, Any]], T]) -> concurrent.futures.Future[list[list[T]]]:
        """Starts every request of every group (after the groups submitted before); the future's result is
        `results[group][request]`, parsed. The first error (after retries) fails it with one line; cancelling it
        drops its requests still queued."""
        return asyncio.run_coroutine_threadsafe(self._engine.run(list(groups), parse), self._engine.started())

    def run_groups(self, groups: Sequence[RequestGroup], parse: Callable[[dict[str, Any]], T]) -> list[list[T]]:
        """`submit_groups(...)`'s results, waited for."""
        return wait(self.submit_groups(groups, parse))

    def top_logprobs_many(self, conversations: Sequence[list[dict[str, Any]]], k: int) -> list[list[tuple[str, float]]]:
        """The answer position's top-k list of each conversation (one request each); results in input order."""
        groups = [RequestGroup(b"", [self.request_template(logprob_body(c, k))]) for c in conversations]
        return [answers[0] for answers in self.run_groups(groups, parse_top_logprobs)]

    def complete(self, messages: list[dict[str, Any]], **sampling: Any) -> list[str]:
        """Generated texts of one conversation (`n`, `temperature`, `top_p`, `max_tokens`, `seed`...)."""
        group = RequestGroup(b"", [self.request_template({"messages": messages, **sampling})])
        return self.run_groups([group], parse_texts)[0][0]

    def close(self) -> None:
        """Closes the connections and stops the background loop (a later request starts them again)."""
        self._engine.close()


class _Engine:
    """A ChatClient's background event loop and what runs on it: connections, queued groups, each server's pump.
    Nothing here refers to the ChatClient (its finalizer closes this)."""

    def __init__(self, o: ServerConnection, section: str) -> None:
        self.options = o
        self.section = section
        self.retries = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._start = threading.Lock()
        self._servers: list[_Server] = []
        self._pending: deque[tuple[_Batch, int]] = deque()  # groups no server has taken yet, in order
        self._tasks: set[asyncio.Task] = set()

    def started(self) -> asyncio.AbstractEventLoop:
        """The running loop, started (with the connections) by the first request after creation or `close()`."""
        with self._start:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                self._thread = threading.Thread(target=loop.run_forever, name="makd-openai", daemon=True)
                self._thread.start()
                asyncio.run_coroutine_threadsafe(self._open(), loop).result()
                self._loop = loop
            return self._loop

    def close(self) -> None:
        """Stops the loop, its tasks and connections closed first (a loop dropped with tasks pending complains)."""
        with self._start:
            loop, self._loop, thread = self._loop, None, self._thread
        if loop is None:
            return
        if threading.current_thread() is thread:  # the finalizer run by a collection on the loop's own thread:
            threading.Thread(target=self._stop, args=(loop, thread), name="makd-openai-close").start()  # cannot wait
        else:
            self._stop(loop, thread)

    def _stop(self, loop: asyncio.AbstractEventLoop, thread: threading.Thread) -> None:
        asyncio.run_coroutine_threadsafe(self._close(), loop).result()
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)  # the loop keeps only weak references to tasks
        task.add_done_callback(self._tasks.discard)

    async def _open(self) -> None:
        import httpx

        o = self.options
        headers = {"Content-Type": "application/json"}
        if o.api_key_env and os.environ.get(o.api_key_env):
            headers["Authorization"] = f"Bearer {os.environ[o.api_key_env]}"
        per = CONNECTIONS_PER_CLIENT
        limits = httpx.Limits(max_connections=per, max_keepalive_connections=per)
        tls = tls_context() if any(url.startswith("https:") for url in o.urls) else False  # False: no TLS anyway
        self._servers = [_Server(url, [httpx.AsyncClient(base_url=url.rstrip("/") + "/", headers=headers,
                                                         timeout=o.timeout, limits=limits, verify=tls)
                                       for _ in range(-(-o.concurrency // per))], o.concurrency) for url in o.urls]
        for server in self._servers:
            self._spawn(self._pump(server))

    async def _close(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for server in self._servers:
            for client in server.clients:
                await client.aclose()
        self._servers, self._pending = [], deque()

    async def run(self, groups: list[RequestGroup], parse: Callable[[dict[str, Any]], T]) -> list[list[T]]:
        """The groups' results, parsed (ChatClient.submit_groups)."""
        batch = _Batch(groups, parse, asyncio.get_running_loop().create_future())
        if not batch.left:
            return batch.results
        self._pending.extend((batch, g) for g in range(len(groups)) if groups[g].templates)
        for server in self._servers:
            server.wake.set()
        return await batch.future  # cancelling this call cancels the future: the batch is done

    async def _pump(self, server: _Server) -> None:
        """Keeps `concurrency` requests in flight on `server` while there is work."""
        window = self.options.concurrency
        while True:
            while server.free and (item := self._next(server, window)) is not None:
                self._spawn(self._send(server, server.free.pop(), *item))
            server.wake.clear()
            await server.wake.wait()

    def _next(self, server: _Server, window: int) -> tuple[_Batch, int, int] | None:
        """A new group's first request while the requests queued for this server are fewer than LOOKAHEAD
        windows (its answer then comes back before they run out) and no server has less work, else the next
        queued request."""
        while (self._pending and len(server.ready) + server.waiting < LOOKAHEAD * window
               and server.load <= min(s.load for s in self._servers)):
            batch, g = self._pending.popleft()
            if not batch.done:
                server.waiting += len(batch.groups[g].templates) - 1
                for other in self._servers:  # now perhaps the least loaded: its turn to take a group
                    other.wake.set()
                return batch, g, 0
        while server.ready:
            item = server.ready.popleft()
            if not item[0].done:
                return item
        return None

    async def _send(self, server: _Server, slot: int, batch: _Batch, g: int, j: int) -> None:
        group = batch.groups[g]
        about = f" ({group.name})" if group.name else ""
        try:
            value = batch.parse(await self._post(server, server.clients[slot // CONNECTIONS_PER_CLIENT], group.body(j),
                                                 about))
        except BadReply as exc:
            batch.fail(MakdError(f"{self.section}.base_url: {server.url} {exc}{about}"))
        except MakdError as exc:
            batch.fail(exc)
        except Exception as exc:  # a bug: raised in the caller's thread
            batch.fail(exc)
        else:
            batch.store(g, j, value)
        finally:
            if j == 0 and len(group.templates) > 1:
                server.waiting -= len(group.templates) - 1
                if not batch.done:
                    server.ready.extend((batch, g, k) for k in range(1, len(group.templates)))
            server.free.append(slot)
            server.wake.set()

    async def _post(self, server: _Server, http: Any, body: bytes, about: str) -> dict[str, Any]:
        """POST chat/completions; retries 429, 5xx, timeouts and lost connections, holding the request's slot."""
        import httpx

        o = self.options
        problem = ""
        for attempt in range(o.max_retries + 1):
            if attempt:
                self.retries += 1
            try:
                response = await http.post("chat/completions", content=body)
            except httpx.TimeoutException:
                problem, wait = f"no answer within {o.timeout:g} s", None
            except httpx.TransportError as exc:
                problem, wait = f"connection failed ({type(exc).__name__})", None
            else:
                if response.status_code == 200:
                    try:
                        return response.json()
                    except ValueError:
                        raise BadReply("answered with invalid JSON") from None
                problem = f"HTTP {response.status_code}: {error_message(response)}"
                if response.status_code not in RETRY_STATUS:
                    raise MakdError(f"{self.section}.base_url: {server.url} answered {problem}{about}")
                wait = retry_after(response)
            if attempt < o.max_retries:
                delay = min(o.max_backoff, wait if wait is not None else o.backoff * 2**attempt * (0.5 + random.random()))
                log.debug("request to %s failed (%s); retry %d in %.2f s", server.url, problem, attempt + 1, delay)
                await asyncio.sleep(delay)
        raise MakdError(f"{self.section}.base_url: {server.url} failed {o.max_retries + 1} times, last: {problem}"
                        f"{about} (finished work is kept: re-run to resume)")


def wait(future: concurrent.futures.Future[T]) -> T:
    """The future's result; interrupted (Ctrl-C) or failed, its requests still queued are dropped."""
    try:
        return future.result()
    except BaseException:
        future.cancel()
        raise


def tls_context() -> Any:
    """httpx's default TLS context, made once: each httpx client would otherwise load the CA bundle itself (35 ms a
    client, over a second for a 256-request window)."""
    import httpx

    if hasattr(httpx, "create_ssl_context"):  # httpx >= 0.28 (honours SSL_CERT_FILE / SSL_CERT_DIR)
        return httpx.create_ssl_context()
    import ssl

    import certifi

    return ssl.create_default_context(cafile=certifi.where())


def _first_choice(data: Any) -> dict[str, Any]:
    choices = data.get("choices") if isinstance(data, dict) else None
    if not choices or not isinstance(choices, list) or not isinstance(choices[0], dict):
        error = data.get("error") if isinstance(data, dict) else None
        said = f": {error_text(error)}" if error else ""
        raise BadReply(f"returned no choices{said}")
    return choices[0]


def parse_top_logprobs(data: dict[str, Any]) -> list[tuple[str, float]]:
    """The answer position's top-k (token, logprob) list of a logprobs reply."""
    first = _first_choice(data)
    try:
        token = first["logprobs"]["content"][0]
        top = [(str(t["token"]), float(t["logprob"])) for t in token.get("top_logprobs") or []]
        return top or [(str(token["token"]), float(token["logprob"]))]
    except (KeyError, IndexError, TypeError, ValueError, AttributeError):
        raise BadReply("returned no logprobs for the first token (does the server support logprobs/top_logprobs? "
                       "vLLM: --max-logprobs)") from None


def parse_texts(data: dict[str, Any]) -> list[str]:
    """The generated text of every choice."""
    _first_choice(data)
    try:
        return [str(choice["message"]["content"] or "") for choice in data["choices"]]
    except (KeyError, TypeError):
        raise BadReply("returned a choice without a message") from None


def error_text(detail: Any) -> str:
    detail = detail.get("message", detail) if isinstance(detail, dict) else detail
    return " ".join(str(detail).split())[:200]


def error_message(response: Any) -> str:
    try:
        return error_text(response.json().get("error", response.text))
    except (ValueError, AttributeError):
        return error_text(response.text)


def retry_after(response: Any) -> float | None:
    try:
        return max(0.0, float(response.headers.get("retry-after", "")))
    except ValueError:
        return None
