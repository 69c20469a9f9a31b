"""A small, real OpenAI-compatible chat-completions server, around a local transformers model or a stub.

It runs as its own process on loopback (the tests and benchmarks/openai_client.py start it with `ServerProcess`)
and answers `POST /v1/chat/completions`:
- with `--model`, `logprobs`/`top_logprobs` computed by a real forward pass of that model (a vision-language
  model, or a causal LM with `--text`), or, without `logprobs`, `n` texts sampled by the causal LM (seeded by the
  request's `seed`);
- with `--stub`, a top-k list drawn from a hash of (image bytes, text) (`stub_top_logprobs`): no model, so a
  benchmark measures the client, not this process.
Answers are shaped like vLLM's (`logprobs.content[0]` with `token`, `logprob`, `bytes` and `top_logprobs`).
Images come as base64 data URLs or, under `--allowed-local-media-path`, as `file://` URLs (as vLLM takes them);
each image is decoded once (a broken one is a 400, as in vLLM).

Like a GPU server it has `--slots` requests in service at once (the others wait in arrival order) and holds each
for `--latency` seconds, or `--miss-latency` when the request's image is not in its prefix cache: an image is cached
once a request with it has been answered (vLLM caches the blocks a finished prefill computed; requests arriving
while the image's first is still in service miss too). It can misbehave on purpose: `--fail-every N` answers
every N-th request with 500 / 429 (Retry-After) / 503 in turn, `--die-after N` exits abruptly while handling
request N + 1, `--reply` answers 200 with no choices, invalid JSON or no logprobs. Every request is appended to
`--log` as a JSON line: its text, image digest, body bytes, cache hit, arrival, service start and answer times,
requests open at arrival, the client's port (its connection), status.

transformers' own `serve` command refuses `logprobs`, and vLLM / llama.cpp do not install on a CPU-only machine
without a long source build, so this is the honest stand-in: the HTTP, JSON, base64 and chat-template path
is the one a real deployment exercises; with `--model` the numbers come from a real model.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import math
import os
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

FAILURES = [(500, "internal error (injected)"), (429, "rate limited (injected)"), (503, "overloaded (injected)")]
STUB_VOCAB = ["Yes", "No", "yes", "no", " Yes", " No", "Maybe", "The", "It", "I", "A", "This", "There", "Not", "Y",
              "N", "yeah", "nope", "Sure", "Correct", "Probably", "Unclear", "None", "One", "Two"]


def digest(data: bytes) -> str:
    """How the server's log names an image: its bytes' sha256, 12 hex digits."""
    return hashlib.sha256(data).hexdigest()[:12]


def stub_top_logprobs(image: str | None, text: str, k: int) -> list[tuple[str, float]]:
    """The stub's answer: log-softmax of logits drawn from a hash of (image digest, text) over STUB_VOCAB, top k."""
    seed = hashlib.sha256(f"{image}|{text}".encode()).digest()
    logits = [seed[i % len(seed)] / 32.0 - 4.0 + (2.0 if i < 6 else 0.0) for i in range(len(STUB_VOCAB))]
    norm = max(logits) + math.log(sum(math.exp(x - max(logits)) for x in logits))
    ranked = sorted(((t, x - norm) for t, x in zip(STUB_VOCAB, logits)), key=lambda p: -p[1])
    return ranked[:k]


class Model:
    def __init__(self, folder: str, text: bool) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

        torch.set_num_threads(1)
        self.text = text
        if text:
            self.processor = self.tokenizer = AutoTokenizer.from_pretrained(folder)
            self.model = AutoModelForCausalLM.from_pretrained(folder).eval()
        else:
            self.processor = AutoProcessor.from_pretrained(folder)
            self.tokenizer = self.processor.tokenizer
            self.model = AutoModelForImageTextToText.from_pretrained(folder).eval()
        self.lock = threading.Lock()

    def inputs(self, messages: list[dict], images: list[bytes], template_kwargs: dict) -> dict:
        """The chat rendered with the model's template and tokenised; `images` are the image parts' file bytes."""
        from PIL import Image

        from makd.clients.hf import adds_special_tokens
        from makd.clients.hf import template_kwargs as used_kwargs

        converted = []
        for message in messages:
            content = message["content"]
            if isinstance(content, str):
                content = [{"type": "text", "text": content}]
            parts = [{"type": "image"} if part["type"] == "image_url" else {"type": "text", "text": part["text"]}
                     for part in content]
            converted.append({"role": message["role"],
                              "content": parts if not self.text else "".join(p["text"] for p in parts)})
        kwargs = used_kwargs(self.tokenizer.chat_template if self.text else self.processor.chat_template, template_kwargs)
        prompt = self.processor.apply_chat_template(converted, add_generation_prompt=True, tokenize=False, **kwargs)
        special = adds_special_tokens(self.tokenizer, prompt)
        if self.text:
            return self.tokenizer([prompt], return_tensors="pt", add_special_tokens=special)
        pictures = [Image.open(io.BytesIO(data)).convert("RGB") for data in images]
        return self.processor(text=[prompt], images=[pictures] if pictures else None, return_tensors="pt",
                              add_special_tokens=special)

    def top_logprobs(self, messages: list[dict], images: list[bytes], k: int,
                     template_kwargs: dict) -> list[tuple[str, float]]:
        import torch

        inputs = self.inputs(messages, images, template_kwargs)
        with self.lock, torch.inference_mode():
            logits = self.model(**inputs).logits[0, -1]
        lp = torch.log_softmax(logits.float(), dim=-1)
        values, ids = lp.topk(min(k, lp.numel()))
        return [(self.tokenizer.decode([i]), v) for i, v in zip(ids.tolist(), values.tolist())]

    def generate(self, messages: list[dict], body: dict) -> list[str]:
        """Sampled completions, seeded by the request's `seed` (as vLLM does): n texts."""
        import torch

        inputs = self.inputs(messages, [], body.get("chat_template_kwargs") or {})
        temperature = float(body.get("temperature", 1.0))
        with self.lock, torch.inference_mode():
            torch.manual_seed(int(body.get("seed", 0)))
            out = self.model.generate(**inputs, do_sample=temperature > 0, temperature=temperature or None,
                                      top_p=float(body.get("top_p", 1.0)), max_new_tokens=int(body.get("max_tokens", 16)),
                                      num_return_sequences=int(body.get("n", 1)),
                                      pad_token_id=self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None
                                      else self.tokenizer.eos_token_id)
        start = inputs["input_ids"].shape[1]
        return [self.tokenizer.decode(row[start:], skip_special_tokens=True) for row in out]


class BadImage(Exception):
    """The request's image cannot be fetched or decoded (a 400, as in vLLM)."""


class Images:
    """Fetches the image parts of a request (data URLs; file URLs under the allowed folder), each image decoded
    once to check it, and the prefix cache: which images a finished request has seen (LRU of `capacity`)."""

    def __init__(self, allowed: str | None, capacity: int) -> None:
        self.allowed = Path(allowed).resolve() if allowed else None
        self.capacity = capacity
        self.checked: set[str] = set()
        self.cached: OrderedDict[str, None] = OrderedDict()
        self.lock = threading.Lock()

    def fetch(self, url: str) -> bytes:
        if url.startswith("data:"):
            header, _, payload = url.partition(",")
            if not (header.startswith("data:image/") and header.endswith(";base64")):
                raise BadImage(f"unsupported data URL {header[:40]!r}")
            return base64.b64decode(payload)
        if url.startswith("file:"):
            path = Path(unquote(urlparse(url).path)).resolve()
            if self.allowed is None or self.allowed not in path.parents:
                raise BadImage("cannot load local files without --allowed-local-media-path"
                               if self.allowed is None else f"{path} is not under --allowed-local-media-path")
            return path.read_bytes()
        raise BadImage(f"unsupported image URL {url[:40]!r}")

    def load(self, url: str) -> tuple[bytes, str]:
        """(bytes, digest); the first time an image is seen it is decoded, as a server's processor would."""
        from PIL import Image

        try:
            data = self.fetch(url)
        except (OSError, ValueError) as exc:
            raise BadImage(f"cannot fetch the image: {exc}") from None
        name = digest(data)
        with self.lock:
            seen = name in self.checked
        if not seen:
            try:
                with Image.open(io.BytesIO(data)) as img:
                    img.load()
            except Exception as exc:
                raise BadImage(f"cannot decode the image: {exc}") from None
            with self.lock:
                self.checked.add(name)
        return data, name

    def hit(self, name: str | None) -> bool:
        with self.lock:
            if name in self.cached:
                self.cached.move_to_end(name)
                return True
            return False

    def remember(self, name: str) -> None:
        with self.lock:
            self.cached[name] = None
            self.cached.move_to_end(name)
            while self.capacity and len(self.cached) > self.capacity:
                self.cached.popitem(last=False)


def make_handler(model: Model | None, args: argparse.Namespace):
    counter = {"n": 0, "open": 0}
    counter_lock = threading.Lock()
    log_lock = threading.Lock()
    slots = threading.Semaphore(args.slots) if args.slots else None
    images = Images(args.allowed_local_media_path, args.cache_images)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *_):  # quiet; requests go to --log
            pass

        def reply(self, status: int, body: dict | bytes, headers: dict | None = None) -> None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            if self.path.rstrip("/") in ("/health", "/v1/models"):
                self.reply(200, {"object": "list", "data": [{"id": args.served_name, "object": "model"}]})
            else:
                self.reply(404, {"error": {"message": f"no route {self.path}"}})

        def do_POST(self) -> None:
            arrived = time.monotonic()
            raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            with counter_lock:
                counter["n"] += 1
                counter["open"] += 1
                n, open_requests = counter["n"], counter["open"]
            try:
                self.answer(raw, n, arrived, open_requests)
            finally:
                with counter_lock:
                    counter["open"] -= 1

        def answer(self, raw: bytes, n: int, arrived: float, open_requests: int) -> None:
            if args.die_after and n > args.die_after:
                os._exit(3)  # mid-request, no answer: as a crashed or preempted server
            if self.path != "/v1/chat/completions":
                return self.reply(404, {"error": {"message": f"no route {self.path}"}})
            if args.api_key and self.headers.get("Authorization") != f"Bearer {args.api_key}":
                return self.reply(401, {"error": {"message": "invalid API key"}})
            body = json.loads(raw)
            parts = [p for m in body["messages"] for p in (m["content"] if isinstance(m["content"], list)
                                                            else [{"type": "text", "text": m["content"]}])]
            text = " | ".join(p["text"] for p in parts if p["type"] == "text")
            urls = [p["image_url"]["url"] for p in parts if p["type"] == "image_url"]
            record = {"n": n, "text": text, "bytes": len(raw), "arrived": arrived, "open": open_requests,
                      "port": self.client_address[1],
                      "transport": urls[0].partition(":")[0] if urls else None}
            status, message, pictures, name = 200, "", [], None
            try:
                loaded = [images.load(url) for url in urls]
                pictures, name = [data for data, _ in loaded], (loaded[0][1] if loaded else None)
            except BadImage as exc:
                status, message = 400, str(exc)
            record["image"] = name
            if status != 200:
                pass
            elif args.fail_every and n % args.fail_every == 0:
                status, message = FAILURES[(n // args.fail_every) % len(FAILURES)]
            elif body.get("model") != args.served_name:
                status, message = 404, f"model {body.get('model')!r} not found"
            elif not body.get("logprobs") and (model is None or not model.text):
                status, message = 400, "this server generates text only with a causal LM (--text)"
            elif body.get("logprobs") and body.get("max_tokens") != 1:
                status, message = 400, "this server scores the first token only: max_tokens=1 with logprobs"
            if status != 200:
                self.write_log({**record, "status": status, "answered": time.monotonic()})
                return self.reply(status, {"error": {"message": message}}, {"Retry-After": "0"} if status == 429 else None)
            if slots is not None:
                slots.acquire()
            try:
                started = time.monotonic()
                hit = images.hit(name)
                time.sleep(args.latency if hit or name is None else args.miss_latency)
                if body.get("logprobs"):
                    k = int(body.get("top_logprobs") or 1)
                    top = (stub_top_logprobs(name, text, k) if model is None else
                           model.top_logprobs(body["messages"], pictures, k, body.get("chat_template_kwargs") or {}))
                else:
                    texts = model.generate(body["messages"], body)
                if name is not None:
                    images.remember(name)
                answered = time.monotonic()
            finally:
                if slots is not None:
                    slots.release()
            self.write_log({**record, "status": 200, "cache": "hit" if hit else "miss", "started": started,
                            "answered": answered})
            head = {"id": f"chatcmpl-{n}", "object": "chat.completion", "created": int(time.time()),
                    "model": args.served_name}
            if not body.get("logprobs"):
                return self.reply(200, {**head, "choices": [
                    {"index": i, "finish_reason": "length", "message": {"role": "assistant", "content": t}}
                    for i, t in enumerate(texts)]})
            tokens = [{"token": t, "logprob": lp, "bytes": list(t.encode())} for t, lp in top]
            choice = {"index": 0, "finish_reason": "length", "message": {"role": "assistant", "content": tokens[0]["token"]},
                      "logprobs": {"content": [{**tokens[0], "top_logprobs": tokens}]}}
            usage = {"prompt_tokens": 0, "completion_tokens": 1, "total_tokens": 1}
            if args.reply == "no-choices":
                return self.reply(200, {**head, "choices": [], "usage": usage})
            if args.reply == "bad-json":
                return self.reply(200, b'{"id": "chatcmpl-' + str(n).encode() + b'", "choices": [')
            if args.reply == "no-logprobs":
                choice.pop("logprobs")
            self.reply(200, {**head, "choices": [choice], "usage": usage})

        def write_log(self, record: dict) -> None:
            with log_lock, open(args.log, "a") as f:
                f.write(json.dumps(record) + "\n")

    return Handler


class Server(ThreadingHTTPServer):
    request_queue_size = 1024  # hundreds of clients connect at once


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", help="a transformers model folder (else --stub)")
    parser.add_argument("--stub", action="store_true", help="answers drawn from a hash, no model")
    parser.add_argument("--served-name", default="tiny")
    parser.add_argument("--text", action="store_true", help="a causal LM instead of a vision-language model")
    parser.add_argument("--port-file", required=True)
    parser.add_argument("--log", required=True)
    parser.add_argument("--api-key")
    parser.add_argument("--slots", type=int, default=0, help="requests in service at once (0: no limit)")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds in service per request")
    parser.add_argument("--miss-latency", type=float, help="seconds in service when the image is not cached")
    parser.add_argument("--cache-images", type=int, default=0, help="images the prefix cache holds (0: no limit)")
    parser.add_argument("--allowed-local-media-path", help="folder whose files file:// URLs may name")
    parser.add_argument("--fail-every", type=int, default=0)
    parser.add_argument("--die-after", type=int, default=0)
    parser.add_argument("--reply", choices=["ok", "no-choices", "bad-json", "no-logprobs"], default="ok")
    args = parser.parse_args()
    if args.miss_latency is None:
        args.miss_latency = args.latency
    if bool(args.model) == args.stub:
        parser.error("give --model or --stub")
    model = Model(args.model, args.text) if args.model else None
    server = Server(("127.0.0.1", 0), make_handler(model, args))
    tmp = Path(args.port_file + ".tmp")
    tmp.write_text(str(server.server_address[1]))
    tmp.replace(args.port_file)
    server.serve_forever()


class ServerProcess:
    """`with ServerProcess(folder, tmp_path, ...) as server:` — started, reachable at `server.base_url`, stopped.
    `folder=None` starts the stub."""

    def __init__(self, model: str | Path | None, workdir: Path, *extra: str, name: str = "server") -> None:
        self.port_file = workdir / f"{name}.port"
        self.log = workdir / f"{name}.jsonl"
        self.port_file.unlink(missing_ok=True)
        self.log.unlink(missing_ok=True)
        which = ["--stub"] if model is None else ["--model", str(model)]
        self.proc = subprocess.Popen([sys.executable, __file__, *which, "--port-file", str(self.port_file),
                                      "--log", str(self.log), *extra],
                                     stdout=subprocess.DEVNULL, stderr=open(workdir / f"{name}.stderr", "w"),
                                     env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).parents[2])})
        deadline = time.time() + 180
        while not self.port_file.exists():
            if self.proc.poll() is not None or time.time() > deadline:
                self.stop()
                raise RuntimeError(f"test server did not start: {(workdir / f'{name}.stderr').read_text()[-2000:]}")
            time.sleep(0.02)
        self.base_url = f"http://127.0.0.1:{self.port_file.read_text()}/v1"

    def requests(self) -> list[dict]:
        return [json.loads(line) for line in self.log.read_text().splitlines()] if self.log.exists() else []

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *_) -> None:
        self.stop()


if __name__ == "__main__":
    main()
