"""The `hf` teacher: any Hugging Face vision-language model scores every (image, question) in one forward.

The prompt is the model's own chat template with the image first, then the question and an answer-format
instruction, then the generation prompt; "thinking" is switched off where templates have it. Log-odds and mass
come from the full-vocabulary log-softmax at the answer position (makd/teachers/answers.py). No `generate`.

Prefix reuse (docs/teachers.md): the Q prompts of one image share everything up to the first token where the
questions differ, and that prefix holds the image. It is run once per image with the KV cache kept; the Q
question suffixes then run as right-padded batches on copies of that cache (positions continue from the cache
length), each row read at its last real token. A suffix never needs an attention mask: right padding only puts pads after a row's real tokens, which
causal attention never lets them see. For Qwen2-VL's M-RoPE the model keeps the `rope_deltas` of the prefill
and continues positions from the cache; Gemma 3's sliding-window layers keep the window's tail. Architectures
whose equality with the plain full forward the tests prove use reuse by default; others run the plain batched
path unless `prefix_reuse=on`, and reuse is always re-checked against the plain path on the first image.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import inspect
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import pydantic
from PIL import Image

from makd.clients.hf import (
    adds_special_tokens,
    chat_messages,
    common_prefix_length,
    load_pretrained,
    model_fingerprint,
    resolve_device,
    resolve_dtype,
    template_kwargs,
    torch_dtype,
)
from makd.errors import MakdError
from makd.questions import QuestionSet
from makd.teachers.answers import (
    FORMULA,
    AnswerTokens,
    HFOptions,
    logodds_and_mass,
    resolve_answer_tokens,
)
from makd.teachers.base import AspectScores
from makd.teachers.registry import TEACHERS
from makd.validation import validate

log = logging.getLogger("makd")

# model_type values for which tests/test_hf_teacher.py proves prefix reuse equals the plain full forward.
PROVEN_PREFIX_REUSE = frozenset({"llava", "qwen2_vl", "idefics3", "internvl", "gemma3"})
# ...and for which the faster packed form of it is proven too: all question suffixes in one row behind the
# prefix, kept apart by a block mask, positions restarting after the prefix for each. Gemma 3 is not among
# them: its sliding-window layers would need their own mask.
PACKED_SUFFIXES = frozenset({"llava", "qwen2_vl", "idefics3", "internvl"})
MROPE = frozenset({"qwen2_vl", "qwen2_5_vl"})
SEQUENCE_KEYS_SKIP = ("pixel", "image")  # processor outputs that are never per-token, whatever their shape


class PrefixReuseError(Exception):
    """The prompts of this model do not split into a shared image prefix and per-question suffixes."""


@dataclass(frozen=True)
class PromptPlan:
    """Per question set: rendered prompts, and each question's token suffix after the longest shared prefix."""

    prompts: list[str]
    add_special_tokens: bool
    suffixes: list[list[int]]


@TEACHERS.register("hf")
class HFVLMTeacher:
    """Scores with `AutoProcessor` + `AutoModelForImageTextToText`; see the module docstring."""

    name: ClassVar[str] = "hf"

    class Options(HFOptions):
        batch_size: int = pydantic.Field(8, ge=1)  # images per score() call
        # Rows per forward: question suffixes (reuse path), or (image, question) pairs (plain path). The reuse path
        # holds question_batch copies of the image prefix's KV cache: lower it for long prefixes on small GPUs.
        question_batch: int = pydantic.Field(16, ge=1)
        prefix_reuse: Literal["auto", "on", "off"] = "auto"  # auto: on for architectures the tests prove
        check_reuse: bool = True  # compare reuse with the plain forward on the first image
        reuse_tolerance: float | None = pydantic.Field(None, gt=0)  # max |log-odds difference|; default by dtype

    def __init__(self, options: Options) -> None:
        self.options = options
        self.batch_size = options.batch_size
        self.device = resolve_device(options.device)
        self.dtype = resolve_dtype(options.dtype, self.device)
        self._processor: Any = None
        self._model: Any = None
        self._answers: AnswerTokens | None = None
        self._plans: dict[str, PromptPlan] = {}
        self._reuse: bool | None = None  # decided at load time, may be switched off by the first-image check
        self._checked = False

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> HFVLMTeacher:
        return cls(validate(cls.Options, options, "teacher"))

    # -- loading ------------------------------------------------------------------------------------------
    @property
    def processor(self) -> Any:
        if self._processor is None:
            from transformers import AutoProcessor

            self._processor = load_pretrained(AutoProcessor, self.options, "processor")
            if getattr(self._processor, "tokenizer", None) is None:
                raise MakdError(f"teacher.model: the processor of {self.options.model!r} has no tokenizer")
            if not getattr(self._processor, "chat_template", None):
                raise MakdError(f"teacher.model: {self.options.model!r} has no chat template (not an instruction model?)")
            self._processor.tokenizer.padding_side = "left"  # plain path: every row's last position is the answer
        return self._processor

    @property
    def model(self) -> Any:
        if self._model is None:
            from transformers import AutoModelForImageTextToText

            kwargs = {"attn_implementation": self.options.attn_implementation} if self.options.attn_implementation else {}
            model = load_pretrained(AutoModelForImageTextToText, self.options, "model",
                                    dtype=torch_dtype(self.dtype), **kwargs)
            self._model = model.to(self.device).eval()
            self._keeps_logits = "logits_to_keep" in inspect.signature(self._model.forward).parameters
            mode = self.options.prefix_reuse
            self._reuse = mode == "on" or (mode == "auto" and self.model_type in PROVEN_PREFIX_REUSE)
        return self._model

    @property
    def model_type(self) -> str:
        if self._model is not None:
            return self._model.config.model_type
        from transformers import AutoConfig

        return load_pretrained(AutoConfig, self.options, "config").model_type

    @property
    def answers(self) -> AnswerTokens:
        if self._answers is None:
            self._answers = resolve_answer_tokens(self.processor.tokenizer, self.options.yes, self.options.no)
        return self._answers

    # -- provenance ---------------------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """Provenance for the label store, which compares it on resume: nothing run-specific goes in."""
        o = self.options
        template = self.processor.chat_template
        template = template if isinstance(template, str) else str(template)
        return {
            "name": self.name,
            "model": o.model,
            "revision": o.revision,
            "weights": model_fingerprint(o),
            "model_type": self.model_type,
            "dtype": self.dtype,
            "trust_remote_code": o.trust_remote_code,
            "prompt": {
                "chat_template_sha256": hashlib.sha256(template.encode()).hexdigest()[:16],
                "system": o.system,
                "user_content": "[image, question + ' ' + instruction]",
                "instruction": o.instruction,
                "chat_template_kwargs": o.chat_template_kwargs,
                "example": self._render("{question}"),
            },
            "answer_tokens": self.answers.describe(),
            "formula": FORMULA,
            "preprocessing": "images converted to RGB, then the model's own processor (resizing, tiling)",
            "options": o.model_dump(mode="json", exclude=set(o.EXECUTION_ONLY) | {"prefix_reuse", "check_reuse",
                                                                                "reuse_tolerance"}),
        }

    def _render(self, question: str) -> str:
        o = self.options
        content = [{"type": "image"}, {"type": "text", "text": o.user_text(question)}]
        return self.processor.apply_chat_template(chat_messages(content, o.system), add_generation_prompt=True,
                                                  tokenize=False, **template_kwargs(self.processor.chat_template,
                                                                                    o.chat_template_kwargs))

    def plan(self, questions: QuestionSet) -> PromptPlan:
        """Prompts and suffix token ids of a question set (image-independent, so computed once per set)."""
        if questions.hash not in self._plans:
            tokenizer = self.processor.tokenizer
            prompts = [self._render(q) for q in questions.texts]
            special = adds_special_tokens(tokenizer, prompts[0])
            ids = [list(tokenizer(p, add_special_tokens=special)["input_ids"]) for p in prompts]
            # Every suffix keeps at least one token: the answer is read at a suffix's last position.
            shared = min(common_prefix_length(ids), min(len(i) for i in ids) - 1)
            self._plans[questions.hash] = PromptPlan(prompts, special, [i[shared:] for i in ids])
        return self._plans[questions.hash]

    # -- scoring ------------------------------------------------------------------------------------------
    def score(self, images: Sequence[Image.Image], questions: QuestionSet) -> AspectScores:
        q = len(questions)
        if not images:
            empty = np.zeros((0, q), dtype=np.float32)
            return AspectScores(empty, empty.copy())
        rgb = [img if img.mode == "RGB" else img.convert("RGB") for img in images]
        plan = self.plan(questions)
        _ = self.model, self.answers
        first = self._check_reuse(rgb[0], plan) if self._reuse and not self._checked else None
        if not self._reuse:
            logodds, mass = self.score_plain(rgb, plan)
        else:
            parts = [first if i == 0 and first else self.score_shared(img, plan) for i, img in enumerate(rgb)]
            logodds, mass = np.stack([p[0] for p in parts]), np.stack([p[1] for p in parts])
        return AspectScores(logodds.reshape(len(rgb), q), mass.reshape(len(rgb), q))

    def _check_reuse(self, image: Image.Image, plan: PromptPlan) -> tuple[np.ndarray, np.ndarray] | None:
        """Reuse must reproduce the plain forward: checked once, on the first image a job scores. Returns that
        image's shared-prefix scores, or None after switching to the plain path."""
        self._checked = True
        strict = self.options.prefix_reuse == "on"
        try:
            shared = self.score_shared(image, plan)
        except PrefixReuseError as exc:
            if strict:
                raise MakdError(f"teacher.prefix_reuse=on: {exc}") from None
            log.warning("prefix reuse unavailable for %s (%s): using the plain path", self.options.model, exc)
            self._reuse = False
            return None
        if not self.options.check_reuse:
            return shared
        plain = self.score_plain([image], plan)[0]
        tolerance = self.options.reuse_tolerance or (1e-3 if self.dtype == "float32" else 0.25)
        diff = float(np.max(np.abs(shared[0] - plain)))
        if diff <= tolerance:
            return shared
        message = (f"shared-prefix log-odds differ from the plain forward by {diff:.3g} (> {tolerance:g}) for "
                   f"{self.options.model!r} ({self.model_type})")
        if strict:
            raise MakdError(f"teacher.prefix_reuse=on: {message}; use prefix_reuse=off")
        log.warning("%s: using the plain path", message)
        self._reuse = False
        return None

    def _inputs(self, prompts: list[str], images: list[list[Image.Image]], special: bool) -> Any:
        batch = self.processor(text=prompts, images=images, return_tensors="pt", padding=True,
                               add_special_tokens=special)
        return batch.to(self.device, dtype=torch_dtype(self.dtype))

    def score_plain(self, images: Sequence[Image.Image], plan: PromptPlan) -> tuple[np.ndarray, np.ndarray]:
        """Reference path: every (image, question) prompt in full, batched left-padded, image-major order."""
        import torch

        pairs = [(i, j) for i in range(len(images)) for j in range(len(plan.prompts))]
        logodds, mass = [], []
        step = self.options.question_batch
        for start in range(0, len(pairs), step):
            chunk = pairs[start:start + step]
            batch = self._inputs([plan.prompts[j] for _, j in chunk], [[images[i]] for i, _ in chunk],
                                 plan.add_special_tokens)
            with torch.inference_mode():
                logits = self._forward(**batch)
            lo, m = logodds_and_mass(logits[:, -1], self.answers)
            logodds.append(lo)
            mass.append(m)
        return np.concatenate(logodds), np.concatenate(mass)

    def score_shared(self, image: Image.Image, plan: PromptPlan) -> tuple[np.ndarray, np.ndarray]:
        """One image: prefill its shared prefix once, then the question suffixes in batches on cache copies."""
        import torch

        full = self._inputs([plan.prompts[0]], [[image]], plan.add_special_tokens)
        ids = full["input_ids"][0]
        first = plan.suffixes[0]
        if ids[-len(first):].tolist() != first:
            raise PrefixReuseError("the processor's prompt does not end with the question's own tokens")
        length = len(ids) - len(first)
        image_token = getattr(self.processor, "image_token_id", None)
        if image_token is not None and any(image_token in s for s in plan.suffixes):
            raise PrefixReuseError("image tokens fall after the point where the questions differ")
        prefill = {k: v[:, :length] if _per_token(k, v, full["input_ids"]) else v for k, v in full.items()}
        with torch.inference_mode():
            cache = self._forward(**prefill, use_cache=True, return_cache=True)
            score = self._score_packed if self.model_type in PACKED_SUFFIXES else self._score_batched
            parts = [score(cache, length, chunk) for chunk in self._chunks(plan.suffixes)]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def _chunks(self, suffixes: list[list[int]]) -> Iterator[list[list[int]]]:
        step = self.options.question_batch
        for start in range(0, len(suffixes), step):
            yield suffixes[start:start + step]

    def _score_batched(self, cache: Any, length: int, chunk: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        """Suffixes as right-padded rows, each on a (broadcast) copy of the prefix cache."""
        import torch

        width = max(len(s) for s in chunk)
        pad = self._pad_id()
        input_ids = torch.tensor([s + [pad] * (width - len(s)) for s in chunk], device=self.device)
        rows = torch.arange(len(chunk), device=self.device)
        last = torch.tensor([len(s) - 1 for s in chunk], device=self.device)
        with read_hidden_at(self.model, rows, last), grouped_kv_in_sdpa(self.device == "cpu"):
            # Positions continue from the cache's length (transformers derives them from it).
            out = self.model(input_ids=input_ids, past_key_values=repeat_cache(cache, len(chunk)), use_cache=True)
        return logodds_and_mass(out.logits[:, 0], self.answers)

    def _score_packed(self, cache: Any, length: int, chunk: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        """All suffixes of the chunk in ONE row after the prefix: each attends to the whole prefix and causally to
        its own tokens only (block mask), at the positions it would have right after the prefix. The prefix's
        keys/values are read once per layer instead of once per question: the cost of a single forward."""
        import torch

        lengths = torch.tensor([len(s) for s in chunk], device=self.device)
        segment = torch.repeat_interleave(torch.arange(len(chunk), device=self.device), lengths)
        offset = torch.cat([torch.arange(n, device=self.device) for n in lengths.tolist()])
        total = int(lengths.sum())
        allowed = (segment[:, None] == segment[None, :]) & (offset[:, None] >= offset[None, :])
        dtype = torch_dtype(self.dtype)
        mask = torch.zeros(1, 1, total, length + total, dtype=dtype, device=self.device)
        mask[0, 0, :, length:] = torch.where(allowed, 0.0, torch.finfo(dtype).min)
        positions = (length + offset)[None]
        if self.model_type in MROPE:  # text positions after the image continue from the prefill's rope_deltas
            positions = (positions + self.model.model.rope_deltas.to(positions)).expand(3, 1, total)
        input_ids = torch.tensor([t for s in chunk for t in s], device=self.device)[None]
        last = torch.cumsum(lengths, 0) - 1
        with read_hidden_at(self.model, torch.zeros_like(last), last):
            out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                             past_key_values=repeat_cache(cache, 1), use_cache=True)
        return logodds_and_mass(out.logits[:, 0], self.answers)

    def _forward(self, return_cache: bool = False, **inputs: Any) -> Any:
        """Logits at the last position only (no [B, T, V] tensor), or the KV cache of a prefill."""
        keep = {"logits_to_keep": 1} if self._keeps_logits else {}
        out = self.model(**inputs, **keep)
        return out.past_key_values if return_cache else out.logits[:, -1:]

    def _pad_id(self) -> int:
        tokenizer = self.processor.tokenizer
        for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
            if candidate is not None:
                return int(candidate)
        return 0


@contextlib.contextmanager
def grouped_kv_in_sdpa(enabled: bool) -> Iterator[None]:
    """On CPUs, let torch's SDPA handle grouped KV heads itself even with a mask (transformers' switch for it),
    instead of materialising the repeated heads for every question row: the suffix batch then costs 1.45x the
    limit of benchmarks/teacher_scoring.py instead of 1.8x. Off on GPUs, where a mask plus GQA would fall back to
    the slow math kernel."""
    key = "TRANSFORMERS_SDPA_FORCE_GQA"
    previous = os.environ.get(key)
    if enabled:
        os.environ[key] = "1"
    try:
        yield
    finally:
        if enabled:
            if previous is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = previous


def repeat_cache(cache: Any, rows: int) -> Any:
    """The prefix cache for `rows` suffixes. Dynamic (and sliding-window) layers get broadcast views of the prefix
    keys/values: their update concatenates into new tensors and never writes into the prefix, so no per-row copy
    of the prefix is made up front. Other cache types take the documented deepcopy + batch_repeat_interleave."""
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    if layers is None or not all(type(layer).update is DynamicLayer.update or type(layer).__name__ ==
                                 "DynamicSlidingWindowLayer" for layer in layers):
        copied = copy.deepcopy(cache)
        copied.batch_repeat_interleave(rows)
        return copied
    repeated = copy.copy(cache)
    repeated.layers = []
    for layer in layers:
        view = copy.copy(layer)
        if getattr(layer, "keys", None) is not None and layer.keys.numel():
            view.keys = layer.keys.expand(rows, *layer.keys.shape[1:])
            view.values = layer.values.expand(rows, *layer.values.shape[1:])
        repeated.layers.append(view)
    return repeated


def _per_token(key: str, value: Any, input_ids: Any) -> bool:
    """Processor outputs aligned with the tokens (masks, token types), which a prefix slice must cut too."""
    return (not key.startswith(SEQUENCE_KEYS_SKIP) and hasattr(value, "shape") and value.ndim == 2
            and tuple(value.shape) == tuple(input_ids.shape))


@contextlib.contextmanager
def read_hidden_at(model: Any, rows: Any, positions: Any) -> Iterator[None]:
    """Feed the output head only the hidden states at (rows[k], positions[k]): logits [k, 1, V], never [B, T, V]."""
    head = model.get_output_embeddings()

    def gather(_module: Any, args: tuple) -> tuple:
        hidden = args[0]
        if hidden.ndim != 3 or int(rows.max()) >= hidden.shape[0] or int(positions.max()) >= hidden.shape[1]:
            raise PrefixReuseError(f"output head got hidden states of shape {tuple(hidden.shape)}")
        return (hidden[rows, positions].unsqueeze(1), *args[1:])

    handle = head.register_forward_pre_hook(gather)
    try:
        yield
    finally:
        handle.remove()
