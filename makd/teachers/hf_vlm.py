"""The `hf` teacher: any Hugging Face vision-language model scores every (image, question) in one forward.

The prompt is the model's own chat template with the image first, then the question and an answer-format
instruction, then the generation prompt; "thinking" is switched off where templates have it. Log-odds and mass
come from the full-vocabulary log-softmax at the answer position (makd/teachers/answers.py). No `generate`.

The parts, each in its module:
- prompts (hf_prompts.py): the prompt of every question splits into an image head, processed per image in
  DataLoader workers ahead of the model (`preparer()`, makd/labels/inputs.py), and per-question token tails;
- scoring backends (hf_backends.py): plain (full prompts), packed and batched (the image heads of a batch
  prefilled in one forward, the question tails continued from the KV cache), behind one interface;
- the reuse policy (hf_reuse.py): which backend, a check against the plain path on the first image of every
  shard, counters; running out of memory retries the batch smaller (`_run`) and keeps prefix reuse;
- transformers' internals (hf_adapter.py): loading (a `device_map` for a teacher larger than one GPU), caches,
  positions, the output head.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Literal

import numpy as np
import pydantic
from PIL import Image

from makd.clients.hf import (
    device_map_kwargs,
    load_pretrained,
    model_fingerprint,
    pad_with_eos,
    resolve_device,
    resolve_dtype,
)
from makd.effects import EXECUTION, results_options
from makd.errors import MakdError
from makd.questions import QuestionSet
from makd.teachers.answers import FORMULA, AnswerTokens, HFOptions, resolve_answer_tokens
from makd.teachers.base import AspectScores
from makd.teachers.hf_adapter import TransformersAdapter
from makd.teachers.hf_backends import BatchedBackend, PackedBackend, PlainBackend, PrefixBackend, Scores
from makd.teachers.hf_prompts import HeadPreparer, PreparedImages, PromptPlan, PromptPlanner
from makd.teachers.hf_reuse import ReusePolicy, is_out_of_memory, reuse_mismatch
from makd.teachers.registry import TEACHERS
from makd.validation import validate

log = logging.getLogger("makd")
NOISE_PROBE_QUESTIONS = 8  # 16-bit reuse check: prompts scored alone to measure rounding (reuse_mismatch)


@TEACHERS.register("hf")
class HFVLMTeacher:
    """Scores with `AutoProcessor` + `AutoModelForImageTextToText`; see the module docstring."""

    name: ClassVar[str] = "hf"

    class Options(HFOptions):
        batch_size: int = pydantic.Field(8, ge=1, json_schema_extra=EXECUTION, description="images per score() call "
                                         "and per prefill forward (retried smaller when memory runs out)")
        question_batch: int = pydantic.Field(16, ge=1, json_schema_extra=EXECUTION, description="question tails per "
                                             "forward (reuse path; the batched form holds that many views of an "
                                             "image's cache), or rows per forward (plain path)")
        prefix_reuse: Literal["auto", "on", "off"] = pydantic.Field(
            "auto", json_schema_extra=EXECUTION, description="auto: on for the architectures the tests prove")
        check_reuse: bool = pydantic.Field(True, json_schema_extra=EXECUTION, description="compare reuse with the "
                                           "plain forward on the first image of every shard")
        reuse_tolerance: float | None = pydantic.Field(None, gt=0, json_schema_extra=EXECUTION, description="max "
                                                       "|log-odds difference| of that check; default: reuse_mismatch")
        device_map: str | dict[str, Any] | None = pydantic.Field(
            None, json_schema_extra=EXECUTION, description="accelerate's placement for a teacher larger than one GPU: "
            "auto (this process's group of GPUs: one process per group) or a {module: device} dict")

    def __init__(self, options: Options) -> None:
        self.options = options
        self.batch_size = options.batch_size
        self.device = resolve_device(options.device if options.device_map is None else "auto")
        self.dtype = resolve_dtype(options.dtype, self.device)
        self._processor: Any = None
        self._planner: PromptPlanner | None = None
        self._adapter: TransformersAdapter | None = None
        self._answers: AnswerTokens | None = None
        self._pad_fallback = False  # the tokenizer had no pad token and pads with EOS
        self._rows = options.question_batch  # rows per forward; halved for the shard after running out of memory
        self._told: set[str] = set()
        self.counts: Counter = Counter()  # forwards per backend
        self.policy: ReusePolicy | None = None

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> HFVLMTeacher:
        return cls(validate(cls.Options, options, "teacher"))

    # -- the label job's hooks (teachers/base.py) --------------------------------------------------------------
    def start_shard(self) -> None:
        """Before each shard: its first image re-checks prefix reuse (prompts grow with an image's tiles, so one
        image of a job proves little about the others), and a reuse turned off in the last shard is on again."""
        self._rows = self.options.question_batch
        if self.policy is not None:
            self.policy.start_shard()

    @property
    def first_batch_size(self) -> int:
        """A shard's first batch holds the one image the reuse check scores both ways."""
        return 1 if self.options.prefix_reuse != "off" and self.options.check_reuse else self.batch_size

    def preparer(self) -> HeadPreparer:
        """Decoded images -> PreparedImages (RGB + the processed prompt head), run in DataLoader workers."""
        return self.planner.preparer()

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
            processor.tokenizer.padding_side = "left"  # every row's last position is the answer
            self._processor = processor
        return self._processor

    @property
    def planner(self) -> PromptPlanner:
        if self._planner is None:
            self._planner = PromptPlanner(self.processor, self.options, self.options.chat_template_kwargs)
        return self._planner

    @property
    def adapter(self) -> TransformersAdapter:
        if self._adapter is None:
            placement = None if self.options.device_map is None else device_map_kwargs(self.options.device_map)
            adapter = TransformersAdapter.load(self.options, self.dtype, self.device, placement)
            pad = self.processor.tokenizer.pad_token_id
            self.plain = PlainBackend(adapter, lambda: self.answers, pad, self.counts, processor=self.processor)
            self.packed = PackedBackend(adapter, lambda: self.answers, pad, self.counts)
            self.batched = BatchedBackend(adapter, lambda: self.answers, pad, self.counts)
            self.layout = adapter.layout()
            self.policy = ReusePolicy(self.options.prefix_reuse, self.options.check_reuse, self.options.model,
                                      adapter.config.model_type, self.layout)
            self._adapter = adapter
        return self._adapter

    @property
    def model(self) -> Any:
        return self.adapter.model

    @property
    def model_type(self) -> str:
        if self._adapter is not None:
            return self._adapter.config.model_type
        from transformers import AutoConfig

        return load_pretrained(AutoConfig, self.options, "config").model_type

    @property
    def answers(self) -> AnswerTokens:
        if self._answers is None:
            self._answers = resolve_answer_tokens(self.processor.tokenizer, self.options.yes, self.options.no,
                                                  self.planner.render("{question}"))
        return self._answers

    def counters(self) -> dict[str, int]:
        """Images per path, checks, failures, out-of-memory retries, and forwards per backend, so far."""
        reuse = self.policy.counters.as_dict() if self.policy is not None else {}
        return {**reuse, **{f"{name}_forwards": n for name, n in sorted(self.counts.items())}}

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
                "example": self.planner.render("{question}"),
            },
            "answer_tokens": self.answers.describe(),
            "formula": FORMULA,
            "preprocessing": "images converted to RGB, then the model's own processor (resizing, tiling)",
            "options": results_options(o),
        }
        if self._pad_fallback:  # only then: stores of tokenizers with a pad token resume unchanged
            described["pad_token"] = f"eos fallback: {self.processor.tokenizer.pad_token}"
        return described

    def plan(self, questions: QuestionSet) -> PromptPlan:
        """Prompts of a question set and their split into image head and question tails (once per set)."""
        plan = self.planner.plan(questions.texts, questions.hash)
        if not plan.split:
            self._tell("split", f"the prompts of {self.options.model!r} do not split into an image head and question tails "
                       f"({plan.reason}): every (image, question) prompt is processed in full, without prefix reuse")
        return plan

    # -- scoring ------------------------------------------------------------------------------------------
    def score(self, images: Sequence[Image.Image] | PreparedImages, questions: QuestionSet, **_: Any) -> AspectScores:
        """Scores of a batch: PIL images, or what `preparer()` made of them (the label job's workers)."""
        if not len(images):
            empty = np.zeros((0, len(questions)), dtype=np.float32)
            return AspectScores(empty, empty.copy())
        plan = self.plan(questions)
        _ = self.adapter, self.answers
        if isinstance(images, PreparedImages):
            return AspectScores(*self._score(images, plan))
        step = self.batch_size
        parts = [self._score(self.preparer()(list(images[i:i + step])), plan) for i in range(0, len(images), step)]
        return AspectScores(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))

    def _score(self, batch: PreparedImages, plan: PromptPlan) -> Scores:
        assert self.policy is not None
        if not plan.split:
            return self._counted(self._run(lambda b, r: self.plain.score_pairs(b.images, plan, r), batch), "plain")
        if self.policy.active and self.policy.wants_check:
            first = batch if len(batch) == 1 else self.preparer()(batch.images[:1])
            checked = self._check(first, plan)
            if len(batch) == 1:
                return checked
            rest = self._score(self.preparer()(batch.images[1:]), plan)
            return np.concatenate([checked[0], rest[0]]), np.concatenate([checked[1], rest[1]])
        if self.policy.active:
            try:
                return self._counted(self._run(lambda b, r: self._prefix_backend(b, plan).score(b, plan, r), batch),
                                     "shared")
            except MakdError:
                raise
            except Exception as exc:  # noqa: BLE001 - whatever breaks, the plain path is the reference
                self.policy.failed(exc)
        return self._counted(self._run(lambda b, r: self.plain.score(b, plan, r), batch), "plain")

    def _check(self, batch: PreparedImages, plan: PromptPlan) -> Scores:
        """One image through the shared prefix and through the processor's full prompts, compared (hf_reuse.py)."""
        assert self.policy is not None
        plain = self._run(lambda b, r: self.plain.score_pairs(b.images, plan, r), batch)
        try:
            shared = self._run(lambda b, r: self._prefix_backend(b, plan).score(b, plan, r), batch)
        except MakdError:
            raise
        except Exception as exc:  # noqa: BLE001
            self.policy.failed(exc)
            return self._counted(plain, "plain")
        noise = self._rounding_noise(batch.images[0], plan, plain[0][0]) if self.dtype != "float32" else 0.0
        problem = reuse_mismatch(shared[0][0], plain[0][0], self.dtype, self.options.reuse_tolerance, noise)
        return self._counted(shared, "shared") if self.policy.verified(problem) else self._counted(plain, "plain")

    def _rounding_noise(self, image: Image.Image, plan: PromptPlan, plain: np.ndarray) -> float:
        """How far 16-bit rounding alone moves this image's log-odds: the first questions' prompts scored alone,
        against their rows in the padded batches of the plain path (both exact in real arithmetic)."""
        alone = [self.plain.score_pairs([image], PromptPlan([prompt], plan.add_special_tokens, False), 1)[0][0, 0]
                 for prompt in plan.prompts[:NOISE_PROBE_QUESTIONS]]
        return float(np.max(np.abs(np.asarray(alone) - plain[:len(alone)])))

    def _prefix_backend(self, batch: PreparedImages, plan: PromptPlan) -> PrefixBackend:
        """Packed tails unless the layout forbids them or a sliding window is shorter than this batch's prompts:
        the one packed mask would let the last tail tokens see prefix tokens their window hides."""
        if self.layout.form != "packed":
            return self.batched
        tokens = batch.head["input_ids"].shape[1] - plan.cut + max(map(len, plan.suffixes)) if batch.head else 0
        if self.layout.window is not None and tokens > self.layout.window:
            self._tell("window", f"question suffixes of {self.options.model!r} run as batched rows, not packed, for "
                       f"prompts longer than its sliding attention window of {self.layout.window} tokens (the first "
                       f"had {tokens}): one packed mask cannot express sliding windows")
            return self.batched
        return self.packed

    def _run(self, score: Callable[[PreparedImages, int], Scores], batch: PreparedImages) -> Scores:
        """`score(batch, rows)`, retried smaller when memory runs out: the batch's images in halves (processed
        again here), then fewer rows per forward for the rest of the shard. Prefix reuse stays on."""
        import torch

        try:
            return score(batch, self._rows)
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
        assert self.policy is not None
        self.policy.counters.out_of_memory += 1
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if len(batch) > 1:
            self._tell("images", f"out of memory scoring {len(batch)} images at once: retrying in halves (a "
                       "smaller teacher.batch_size avoids the retries)")
            half = len(batch) // 2
            parts = [self._run(score, self.preparer()(images)) for images in (batch.images[:half], batch.images[half:])]
            return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
        if self._rows > 1:
            self._rows //= 2
            self._tell(f"rows {self._rows}", f"out of memory: {self._rows} rows per forward for the rest of the shard "
                       "(teacher.question_batch)")
            return self._run(score, batch)
        raise MakdError(f"teacher: out of memory scoring one image of {self.options.model!r} with one question per "
                        "forward; use a smaller dtype, a device_map over several GPUs, or a smaller model")

    def _counted(self, scores: Scores, path: Literal["shared", "plain"]) -> Scores:
        assert self.policy is not None
        counters = self.policy.counters
        if path == "shared":
            counters.shared_images += len(scores[0])
        else:
            counters.plain_images += len(scores[0])
        return scores

    def _tell(self, key: str, message: str) -> None:
        """A warning once per kind (`key`) and process."""
        if key not in self._told:
            self._told.add(key)
            log.warning("%s", message)
