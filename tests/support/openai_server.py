"""A small, real OpenAI-compatible chat-completions server around a local transformers model.

It runs as its own process on loopback (the tests start it with `start_server`), answers
`POST /v1/chat/completions` with `logprobs`/`top_logprobs` computed by a real forward pass of the model in
`--model` (a vision-language model, or a causal LM with `--text`) — or, without `logprobs`, with `n` texts
sampled by the causal LM (seeded by the request's `seed`) — and can misbehave on purpose:
`--fail-every N` answers every N-th request with 500 / 429 (Retry-After) / 503 in turn, and `--die-after N`
exits abruptly while handling request N + 1. Every request is appended to `--log` as a JSON line.

transformers' own `serve` command refuses `logprobs`, and vLLM / llama.cpp do not install on a CPU-only machine
without a long source build, so this is the honest stand-in: the HTTP, JSON, base64 and chat-template path
is the one a real deployment exercises, the numbers come from a real model.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

FAILURES = [(500, "internal error (injected)"), (429, "rate limited (injected)"), (503, "overloaded (injected)")]


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

    def inputs(self, messages: list[dict], template_kwargs: dict) -> dict:
        """The chat rendered with the model's template and tokenised (images decoded from data URLs)."""
        from PIL import Image

        from makd.clients.hf import adds_special_tokens
        from makd.clients.hf import template_kwargs as used_kwargs

        images, converted = [], []
        for message in messages:
            content = message["content"]
            if isinstance(content, str):
                content = [{"type": "text", "text": content}]
            parts = []
            for part in content:
                if part["type"] == "image_url":
                    header, payload = part["image_url"]["url"].split(",", 1)
                    assert header.startswith("data:image/") and header.endswith(";base64"), header
                    images.append(Image.open(io.BytesIO(base64.b64decode(payload))).convert("RGB"))
                    parts.append({"type": "image"})
                else:
                    parts.append({"type": "text", "text": part["text"]})
            converted.append({"role": message["role"],
                              "content": parts if not self.text else "".join(p["text"] for p in parts)})
        kwargs = used_kwargs(self.tokenizer.chat_template if self.text else self.processor.chat_template, template_kwargs)
        prompt = self.processor.apply_chat_template(converted, add_generation_prompt=True, tokenize=False, **kwargs)
        special = adds_special_tokens(self.tokenizer, prompt)
        if self.text:
            return self.tokenizer([prompt], return_tensors="pt", add_special_tokens=special)
        return self.processor(text=[prompt], images=[images] if images else None, return_tensors="pt",
                              add_special_tokens=special)

    def top_logprobs(self, messages: list[dict], k: int, template_kwargs: dict) -> list[tuple[int, float]]:
        import torch

        inputs = self.inputs(messages, template_kwargs)
        with self.lock, torch.inference_mode():
            logits = self.model(**inputs).logits[0, -1]
        lp = torch.log_softmax(logits.float(), dim=-1)
        values, ids = lp.topk(min(k, lp.numel()))
        return list(zip(ids.tolist(), values.tolist()))

    def generate(self, messages: list[dict], body: dict) -> list[str]:
        """Sampled completions, seeded by the request's `seed` (as vLLM does): n texts."""
        import torch

        inputs = self.inputs(messages, body.get("chat_template_kwargs") or {})
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


def make_handler(model: Model, args: argparse.Namespace):
    counter = {"n": 0}
    counter_lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *_):  # quiet; requests go to --log
            pass

        def reply(self, status: int, body: dict, headers: dict | None = None) -> None:
            data = json.dumps(body).encode()
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
            length = int(self.headers.get("Content-Length", 0))
            raw = self.rfile.read(length)
            with counter_lock:
                counter["n"] += 1
                n = counter["n"]
            if args.die_after and n > args.die_after:
                os._exit(3)  # mid-request, no answer: as a crashed or preempted server
            if self.path != "/v1/chat/completions":
                return self.reply(404, {"error": {"message": f"no route {self.path}"}})
            if args.api_key and self.headers.get("Authorization") != f"Bearer {args.api_key}":
                return self.reply(401, {"error": {"message": "invalid API key"}})
            body = json.loads(raw)
            record = {"n": n, "text": " | ".join(p["text"] for m in body["messages"] for p in
                                                 (m["content"] if isinstance(m["content"], list) else [{"text": m["content"]}])
                                                 if "text" in p),
                      "image": next((hashlib.sha256(p["image_url"]["url"].encode()).hexdigest()[:12]
                                     for m in body["messages"] if isinstance(m["content"], list)
                                     for p in m["content"] if p["type"] == "image_url"), None)}
            status = 200
            if args.fail_every and n % args.fail_every == 0:
                status, message = FAILURES[(n // args.fail_every) % len(FAILURES)]
            elif body.get("model") != args.served_name:
                status, message = 404, f"model {body.get('model')!r} not found"
            elif not body.get("logprobs") and not model.text:
                status, message = 400, "this server generates text only with a causal LM (--text)"
            elif body.get("logprobs") and body.get("max_tokens") != 1:
                status, message = 400, "this server scores the first token only: max_tokens=1 with logprobs"
            with open(args.log, "a") as f:
                f.write(json.dumps({**record, "status": status}) + "\n")
            if status != 200:
                return self.reply(status, {"error": {"message": message}}, {"Retry-After": "0"} if status == 429 else None)
            if not body.get("logprobs"):
                texts = model.generate(body["messages"], body)
                return self.reply(200, {
                    "id": f"chatcmpl-{n}", "object": "chat.completion", "created": int(time.time()),
                    "model": args.served_name,
                    "choices": [{"index": i, "finish_reason": "length", "message": {"role": "assistant", "content": t}}
                                for i, t in enumerate(texts)]})
            top = model.top_logprobs(body["messages"], int(body.get("top_logprobs") or 1),
                                     body.get("chat_template_kwargs") or {})
            tokens = [{"token": model.tokenizer.decode([i]), "logprob": lp,
                       "bytes": list(model.tokenizer.decode([i]).encode())} for i, lp in top]
            self.reply(200, {
                "id": f"chatcmpl-{n}", "object": "chat.completion", "created": int(time.time()),
                "model": args.served_name,
                "choices": [{"index": 0, "finish_reason": "length",
                             "message": {"role": "assistant", "content": tokens[0]["token"]},
                             "logprobs": {"content": [{**tokens[0], "top_logprobs": tokens}]}}],
                "usage": {"prompt_tokens": 0, "completion_tokens": 1, "total_tokens": 1}})

    return Handler


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--served-name", default="tiny")
    parser.add_argument("--text", action="store_true", help="a causal LM instead of a vision-language model")
    parser.add_argument("--port-file", required=True)
    parser.add_argument("--log", required=True)
    parser.add_argument("--api-key")
    parser.add_argument("--fail-every", type=int, default=0)
    parser.add_argument("--die-after", type=int, default=0)
    args = parser.parse_args()
    model = Model(args.model, args.text)
    server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(model, args))
    tmp = Path(args.port_file + ".tmp")
    tmp.write_text(str(server.server_address[1]))
    tmp.replace(args.port_file)
    server.serve_forever()


class ServerProcess:
    """`with ServerProcess(folder, tmp_path, ...) as server:` — started, reachable at `server.base_url`, stopped."""

    def __init__(self, model: str | Path, workdir: Path, *extra: str, name: str = "server") -> None:
        self.port_file = workdir / f"{name}.port"
        self.log = workdir / f"{name}.jsonl"
        self.port_file.unlink(missing_ok=True)
        self.proc = subprocess.Popen([sys.executable, __file__, "--model", str(model), "--port-file", str(self.port_file),
                                      "--log", str(self.log), *extra],
                                     stdout=subprocess.DEVNULL, stderr=open(workdir / f"{name}.stderr", "w"),
                                     env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).parents[2])})
        deadline = time.time() + 180
        while not self.port_file.exists():
            if self.proc.poll() is not None or time.time() > deadline:
                self.stop()
                raise RuntimeError(f"test server did not start: {(workdir / f'{name}.stderr').read_text()[-2000:]}")
            time.sleep(0.05)
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
