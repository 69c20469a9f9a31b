"""The `hf` teacher: any Hugging Face vision-language model scores every (image, question) in one forward.

The prompt is the model's own chat template with the image first, then the question and an answer-format
instruction, then the generation prompt; "thinking" is switched off where templates have it. Log-odds and mass
come from the full-vocabulary log-softmax at the answer position (makd/teachers/answers.py). No `generate`.

Prefix reuse (docs/teachers.md): the Q prompts of one image share everything up to the first token where the
questions differ, and that prefix holds the image. It is run once per image with the KV cache kept; the Q
question suffixes then continue from that cache in one of two forms, chosen per model from its config
(`suffix_layout`) and, for sliding windows, per image from the prompt's length:
- packed: all suffixes of a chunk in ONE row behind the prefix, kept apart by a block attention mask, each at the
  positions it would have right after the prefix. One custom mask serves every layer, so this form needs an
  attention implementation that applies a custom 4-D mask (eager, sdpa) and no layer whose attention that mask
  would misstate: a sliding window shorter than the prompt (the packed row would see past it).
- batched: right-padded rows, one per suffix, on broadcast views of the cache, with the model's own masks
  (sliding windows included: a sliding-window cache keeps the window's tail). A suffix needs no padding mask:
  right padding only puts pads after a row's real tokens, which causal attention never lets them see.
Layers the cache cannot continue exactly (chunked attention, recurrent or linear-attention layers, shared KV)
take the plain path. For M-RoPE models (Qwen-VL) the model keeps the prefill's `rope_deltas`.
Architectures whose equality with the naive one-question-per-forward reference the tests prove use reuse by
default; others run the plain batched path unless `prefix_reuse=on`. Reuse is re-checked against the plain path
on the first image of every shard (`start_shard`), and any failure of it falls back to the plain path.
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
    pad_with_eos,
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

# model_type values for which tests/test_hf_teacher.py proves prefix reuse equal to the naive one-question-per-forward
# reference (README and docs/teachers.md list exactly these; a test checks it).
PROVEN_PREFIX_REUSE = frozenset({
    "aya_vision", "gemma3", "idefics3", "internvl", "llava", "llava_next", "llava_onevision", "mistral3", "qwen2_5_vl",
    "qwen2_vl", "qwen3_vl", "smolvlm"})
MASKABLE_ATTENTION = frozenset({"eager", "sdpa"})  # apply a custom 4-D mask as given, in every layer
CONTINUABLE_LAYERS = frozenset({"full_attention", "sliding_attention"})  # a cache copy continues them exactly
SEQUENCE_KEYS_SKIP = ("pixel", "image")  # processor outputs that are never per-token, whatever their shape
REUSE_OPTIONS = ("prefix_reuse", "check_reuse", "reuse_tolerance")  # execution only: never change an answer
NOISE_PROBE_QUESTIONS = 8  # 16-bit reuse check: prompts scored alone to measure rounding (reuse_mismatch)


class PrefixReuseError(Exception):
    """The prompts of this model do not split into a shared image prefix and per-question suffixes."""


@dataclass(frozen=True)
class PromptPlan:
    """Per question set: rendered prompts, and each question's token suffix after the longest shared prefix."""

    prompts: list[str]
    add_special_tokens: bool
    suffixes: list[list[int]]


@dataclass(frozen=True)
class SuffixLayout:
    """How question suffixes continue from an image's cached prefix (see the module docstring)."""

    form: Literal["packed", "batched", "plain"]
    window: int | None  # the language model's smallest sliding window: packed only for prompts that fit in it
    reason: str  # why the form is not `packed`; empty when it is


def suffix_layout(config: Any) -> SuffixLayout:
    """The form a model's config allows: from its language model's layer types (as transformers' own cache reads
    them), their sliding windows and the attention implementation it was loaded with."""
    from transformers.cache_utils import get_layer_types_and_kwargs

    text = config.get_text_config(decoder=True)
    types, kwargs = get_layer_types_and_kwargs(text)
    others = sorted(set(types) - CONTINUABLE_LAYERS)
    if others:
        return SuffixLayout("plain", None, f"its language model has {', '.join(others)} layers, which a copied "
                                           "prefix cache does not continue exactly")
    windows = [k["sliding_window"] for t, k in zip(types, kwargs) if t == "sliding_attention" and k.get("sliding_window")]
    window = min(windows) if windows else None
    implementation = getattr(text, "_attn_implementation", None) or getattr(config, "_attn_implementation", None)
    if implementation not in MASKABLE_ATTENTION:
        return SuffixLayout("batched", window, f"attn_implementation={implementation} cannot apply the custom attention "
                                               "mask of packed suffixes")
    return SuffixLayout("packed", window, "")


def reuse_mismatch(shared: np.ndarray, plain: np.ndarray, dtype: str, tolerance: float | None,
                   noise: float = 0.0) -> str | None:
    """Why shared-prefix log-odds of one image do not reproduce the plain forward's, or None when they do.

    float32: max |difference| <= 1e-3 (measured up to 1.6e-4 on a trained 30-layer LM, 3e-6 on the test models).
    16-bit: rounding alone moves log-odds by amounts that depend on the model (measured 0.02-0.06 on the test
    models, 0.3 on a trained 30-layer LM in bf16, where an off-by-one position moves them 1.3), so no fixed bound
    fits: the bound is 3x `noise` — the rounding measured on this image, scoring prompts alone vs in their padded
    batch (`HFVLMTeacher._rounding_noise`) — and at least 5 % of the spread of the plain log-odds over the
    questions, and 0.02 (docs/teachers.md gives the measurements).
    """
    diff = float(np.max(np.abs(shared - plain)))
    if tolerance is None:
        spread = float(np.ptp(plain)) if plain.size else 0.0
        tolerance = 1e-3 if dtype == "float32" else max(3 * noise, 0.05 * spread, 0.02)
    if diff <= tolerance:
        return None
    return f"its log-odds differ from the plain forward's by {diff:.3g} (> {tolerance:.3g})"


@TEACHERS.register("hf")
class HFVLMTeacher:
    """Scores with `AutoProcessor` + `AutoModelForImageTextToText`; see the module docstring."""

    name: ClassVar[str] = "hf"

    class Options(HFOptions):
        batch_size: int = pydantic.Field(8, ge=1)  # images per score() call
        # Rows per forward: question suffixes (reuse path), or (image, question) pairs (plain path). The batched
        # suffix form holds question_batch copies of the image prefix's KV cache: lower it on small GPUs.
        question_batch: int = pydantic.Field(16, ge=1)
        prefix_reuse: Literal["auto", "on", "off"] = "auto"  # auto: on for architectures the tests prove
        check_reuse: bool = True  # compare reuse with the plain forward on the first image of every shard
        reuse_tolerance: float | None = pydantic.Field(None, gt=0)  # max |log-odds difference|; default: reuse_mismatch

    def __init__(self, options: Options) -> None:
        self.options = options
        self.batch_size = options.batch_size
        self.device = resolve_device(options.device)
        self.dtype = resolve_dtype(options.dtype, self.device)
        self._processor: Any = None
        self._model: Any = None
        self._answers: AnswerTokens | None = None
        self._plans: dict[str, PromptPlan] = {}
        self._pad_fallback = False  # the tokenizer had no pad token and pads with EOS
        self._inputs_accepted: frozenset[str] = frozenset()  # processor outputs the model's forward takes
        self._layout = SuffixLayout("plain", None, "")
        self._reuse: bool | None = None  # decided at load time; a failed check switches it off
        self._checked = False  # the current shard's first image was compared with the plain path
        self._told_window = False  # warned that sliding windows make this model's suffixes batched

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> HFVLMTeacher:
        return cls(validate(cls.Options, options, "teacher"))

    def start_shard(self) -> None:
        """The label job calls this before each shard: the shard's first image re-checks prefix reuse (prompts
        grow with an image's tiles, so one image of a job proves little about the others)."""
        self._checked = False

    # -- loading ------------------------------------------------------------------------------------------
    @property
    def processor(self) -> Any:
        if self._processor is None:
            from transformers import AutoProcessor

            processor = load_pretrained(AutoProcessor, self.options, "processor")
            if getattr(processor, "tokenizer", None) is None:
                raise MakdError(f"teacher.model: the processor of {self.options.model!r} has no tokenizer")
            if not getattr(processor, "chat_template", None):
                raise MakdError(f"teacher.model: {self.options.model!r} has no chat template (not an instruction model?)")
            self._pad_fallback = pad_with_eos(processor.tokenizer)
            processor.tokenizer.padding_side = "left"  # plain path: every row's last position is the answer
            self._processor = processor
        return self._processor

    @property
    def model(self) -> Any:
        if self._model is None:
            from transformers import AutoModelForImageTextToText

            kwargs = {"attn_implementation": self.options.attn_implementation} if self.options.attn_implementation else {}
            model = load_pretrained(AutoModelForImageTextToText, self.options, "model",
                                    dtype=torch_dtype(self.dtype), **kwargs)
            self._model = model.to(self.device).eval()
            parameters = inspect.signature(self._model.forward).parameters
            self._keeps_logits = "logits_to_keep" in parameters
            named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
            self._inputs_accepted = frozenset(k for k, p in parameters.items() if p.kind in named) - {"labels"}
            self._decide_reuse()
        return self._model

    def _decide_reuse(self) -> None:
        mode = self.options.prefix_reuse
        self._layout = suffix_layout(self._model.config)
        self._reuse = mode == "on" or (mode == "auto" and self.model_type in PROVEN_PREFIX_REUSE)
        if self._reuse and self._layout.form == "plain":
            self._give_up(self._layout.reason)
        elif self._reuse and self._layout.form == "batched":
            log.warning("question suffixes of %s run as batched rows, not packed: %s", self.options.model,
                        self._layout.reason)

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
        described = {
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
            "options": o.model_dump(mode="json", exclude=set(o.EXECUTION_ONLY) | set(REUSE_OPTIONS)),
        }
        if self._pad_fallback:  # only then: stores of tokenizers with a pad token resume unchanged
            described["pad_token"] = f"eos fallback: {self.processor.tokenizer.pad_token}"
        return described

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
        parts: list[tuple[np.ndarray, np.ndarray]] = []
        for image in rgb:  # shared prefix per image, until (if ever) reuse is switched off
            scored = self._score_reusing(image, plan) if self._reuse else None
            if scored is None:
                break
            parts.append(scored)
        if len(parts) < len(rgb):
            logodds, mass = self.score_plain(rgb[len(parts):], plan)
            parts += list(zip(logodds.reshape(-1, q), mass.reshape(-1, q)))
        return AspectScores(np.stack([p[0] for p in parts]), np.stack([p[1] for p in parts]))

    def _score_reusing(self, image: Image.Image, plan: PromptPlan) -> tuple[np.ndarray, np.ndarray] | None:
        """One image through the shared prefix; on the first image of a shard also through the plain path, and
        compared. Returns None after switching reuse off (any failure of it: a warning, or with prefix_reuse=on an
        error)."""
        try:
            shared = self.score_shared(image, plan)
        except Exception as exc:  # noqa: BLE001 - whatever breaks, the plain path is the reference
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            return self._give_up(f"the shared-prefix forward failed ({type(exc).__name__}: {first[:200]})")
        if self._checked or not self.options.check_reuse:
            return shared
        self._checked = True
        plain = self.score_plain([image], plan)[0]
        noise = self._rounding_noise(image, plan, plain) if self.dtype != "float32" else 0.0
        problem = reuse_mismatch(shared[0], plain, self.dtype, self.options.reuse_tolerance, noise)
        return shared if problem is None else self._give_up(problem)

    def _rounding_noise(self, image: Image.Image, plan: PromptPlan, plain: np.ndarray) -> float:
        """How far 16-bit rounding alone moves this image's log-odds: the first questions' prompts scored alone,
        against their rows in the padded batches of the plain path (both exact in real arithmetic)."""
        alone = [self.score_plain([image], PromptPlan([prompt], plan.add_special_tokens, [suffix]))[0][0]
                 for prompt, suffix in list(zip(plan.prompts, plan.suffixes))[:NOISE_PROBE_QUESTIONS]]
        return float(np.max(np.abs(np.asarray(alone) - plain[:len(alone)])))

    def _give_up(self, reason: str) -> None:
        """Switch prefix reuse off for the rest of the job (prefix_reuse=on: stop instead)."""
        if self.options.prefix_reuse == "on":
            raise MakdError(f"teacher.prefix_reuse=on: {self.options.model!r} ({self.model_type}) cannot share an image "
                            f"prefix: {reason}; use prefix_reuse=off or auto")
        log.warning("prefix reuse off for %s (%s): %s; scoring with the plain path", self.options.model,
                    self.model_type, reason)
        self._reuse = False
        return None

    def _inputs(self, prompts: list[str], images: list[list[Image.Image]], special: bool) -> dict[str, Any]:
        """Processor outputs the model's forward takes, on the device: never `labels` (PaliGemma's processor
        returns them, and a loss over the whole prompt fails against logits kept at the last position only)."""
        batch = self.processor(text=prompts, images=images, return_tensors="pt", padding=True,
                               add_special_tokens=special)
        batch = batch.to(self.device, dtype=torch_dtype(self.dtype))
        return {k: v for k, v in batch.items() if k in self._inputs_accepted}

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
        """One image: prefill its shared prefix once, then the question suffixes in chunks on the cache."""
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
        score = self._score_packed if self._packs(length + max(map(len, plan.suffixes))) else self._score_batched
        with torch.inference_mode():
            cache = self._forward(**prefill, use_cache=True, return_cache=True)
            parts = [score(cache, length, chunk) for chunk in self._chunks(plan.suffixes)]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def _packs(self, prompt_tokens: int) -> bool:
        """Packed suffixes for a prompt of this length? Not past a sliding window: the one packed mask would
        let the last suffix tokens see prefix tokens that their window hides."""
        layout = self._layout
        if layout.form != "packed":
            return False
        if layout.window is not None and prompt_tokens > layout.window:
            if not self._told_window:
                self._told_window = True
                log.warning("question suffixes of %s run as batched rows, not packed, for prompts longer than its "
                            "sliding attention window of %d tokens (the first had %d): one packed mask cannot express "
                            "sliding windows", self.options.model, layout.window, prompt_tokens)
            return False
        return True

    def _chunks(self, suffixes: list[list[int]]) -> Iterator[list[list[int]]]:
        step = self.options.question_batch
        for start in range(0, len(suffixes), step):
            yield suffixes[start:start + step]

    def _score_batched(self, cache: Any, length: int, chunk: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        """Suffixes as right-padded rows, each on a (broadcast) copy of the prefix cache; the model makes its
        own (causal, sliding-window) masks and positions, continuing from the cache's length."""
        import torch

        width = max(len(s) for s in chunk)
        pad = self.processor.tokenizer.pad_token_id
        input_ids = torch.tensor([s + [pad] * (width - len(s)) for s in chunk], device=self.device)
        rows = torch.arange(len(chunk), device=self.device)
        last = torch.tensor([len(s) - 1 for s in chunk], device=self.device)
        with read_hidden_at(self.model, rows, last), grouped_kv_in_sdpa(self.device == "cpu"):
            out = self.model(input_ids=input_ids, cache=repeat_cache(cache, len(chunk)), use_cache=True)
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
        deltas = getattr(getattr(self.model, "model", None), "rope_deltas", None)
        if deltas is not None:  # M-RoPE: text positions after the image continue from the prefill's rope_deltas
            positions = (positions + deltas.to(positions)).expand(3, 1, total)
        input_ids = torch.tensor([t for s in chunk for t in s], device=self.device)[None]
        last = torch.cumsum(lengths, 0) - 1
        with read_hidden_at(self.model, torch.zeros_like(last), last):
            out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                             cache=repeat_cache(cache, 1), use_cache=True)
        return logodds_and_mass(out.logits[:, 0], self.answers)

    def _forward(self, return_cache: bool = False, **inputs: Any) -> Any:
        """Logits at the last position only (no [B, T, V] tensor), or the KV cache of a prefill."""
        keep = {"logits_to_keep": 1} if self._keeps_logits else {}
        out = self.model(**inputs, **keep)
        return out.cache if return_cache else out.logits[:, -1:]


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
