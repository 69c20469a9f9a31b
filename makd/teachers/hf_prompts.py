"""The `hf` teacher's prompts: the chat template rendered once per question set, split into an image HEAD shared by
every question (system turn, image, everything before the question text) and per-question TAILS of token ids.

The head depends on the image only, so it goes through the processor (resizing, tiling, image-token expansion)
in DataLoader workers ahead of the model (`HeadPreparer`, makd/labels/inputs.py). A question's full prompt is then
the processed head + its tail: `plan()` proves that on a probe image against the processor's own output for each
full prompt — the same tokens, the same per-token values, the same pixel tensors — and records how many tokens
the head loses at its end where the processor or the tokenizer joins them with the question (`cut`: PaliGemma's
processor appends a newline, a BPE merge can join the last head token with the question's first), and which
value each per-token output (attention mask, token types) takes on tail tokens. A processor whose prompts do
not split so gets every (image, question) pair processed in full, in the main process (`PromptPlan.split` False).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from makd.clients.hf import adds_special_tokens, chat_messages, common_prefix_length, template_kwargs
from makd.teachers.answers import PromptOptions
from makd.teachers.hf_adapter import per_token
from makd.transport import pack, unpack

QUESTION_SLOT = "\x00makd-question\x00"  # rendered in place of the question to find where the head ends


@dataclass(frozen=True)
class PromptPlan:
    """Per question set: the full prompts, and how they split into the image head and question tails."""

    prompts: list[str]
    add_special_tokens: bool
    split: bool  # the prompts split into head + tails (else `reason` says why)
    cut: int = 0  # tokens dropped from the end of a processed head
    suffixes: list[list[int]] = field(default_factory=list)  # each question's tokens after the cut head
    fills: dict[str, int] = field(default_factory=dict)  # per-token outputs: their value on tail tokens
    reason: str = ""


@dataclass
class PreparedImages:
    """A batch of images as the model takes them: their RGB pixels, and the prompt head of each through the
    processor (left-padded rows, pixel tensors as the processor batches them). `head` is None when the teacher's
    prompts do not split (every pair is then processed in full).

    Sent from a DataLoader worker as ONE shared-memory buffer (`__reduce__`): each tensor sent separately costs a
    round trip to the worker, and pickled images go through a pipe in small writes; both wait for the busy worker."""

    pixels: list[np.ndarray]  # [H, W, 3] uint8 per image
    head: dict[str, Any] | None

    @classmethod
    def of(cls, images: Sequence[Image.Image], head: dict[str, Any] | None) -> PreparedImages:
        return cls([np.array(img.convert("RGB") if img.mode != "RGB" else img) for img in images], head)

    @property
    def images(self) -> list[Image.Image]:
        """The images as PIL (for the processor on full prompts: the reuse check, a batch retried in halves)."""
        return [Image.fromarray(p) for p in self.pixels]

    def __len__(self) -> int:
        return len(self.pixels)

    def pin_memory(self) -> PreparedImages:
        """Page-locked head tensors (DataLoader's pin_memory thread calls this): faster copies to a GPU."""
        head = None if self.head is None else {k: v.pin_memory() if hasattr(v, "pin_memory") else v
                                               for k, v in self.head.items()}
        return PreparedImages(self.pixels, head)

    def __reduce__(self) -> tuple:
        import torch

        head = self.head or {}
        keys = [k for k, v in head.items() if isinstance(v, torch.Tensor)]
        others = {k: v for k, v in head.items() if k not in keys}
        buffer, layout = pack([torch.from_numpy(p) for p in self.pixels] + [head[k] for k in keys])
        return unpack_prepared, (buffer, layout, len(self.pixels), keys, others if self.head is not None else None)


def unpack_prepared(buffer: Any, layout: list, images: int, keys: list[str],
                    others: dict[str, Any] | None) -> PreparedImages:
    """PreparedImages whose arrays are views of one buffer (the inverse of `PreparedImages.__reduce__`)."""
    tensors = unpack(buffer, layout)
    head = None if others is None else {**dict(zip(keys, tensors[images:])), **others}
    return PreparedImages([t.numpy() for t in tensors[:images]], head)


@dataclass(frozen=True)
class HeadPreparer:
    """Runs in DataLoader workers (picklable: the processor and strings only): images -> PreparedImages."""

    processor: Any
    head: str | None  # None: the prompts do not split; images are only converted to RGB
    add_special_tokens: bool

    def __call__(self, images: Sequence[Image.Image]) -> PreparedImages:
        rgb = [img if img.mode == "RGB" else img.convert("RGB") for img in images]
        if self.head is None or not rgb:
            return PreparedImages.of(rgb, None)
        batch = self.processor(text=[self.head] * len(rgb), images=[[img] for img in rgb], return_tensors="pt",
                               padding=True, add_special_tokens=self.add_special_tokens)
        return PreparedImages.of(rgb, dict(batch))


class PromptPlanner:
    """Renders the teacher's prompts with the model's chat template and splits them (see the module docstring)."""

    def __init__(self, processor: Any, options: PromptOptions, template_variables: dict[str, Any]) -> None:
        self.processor = processor
        self.options = options
        self.template_variables = template_variables
        self._plans: dict[str, PromptPlan] = {}
        rendered = self.render(QUESTION_SLOT)
        self.head = rendered[:rendered.index(QUESTION_SLOT)] if QUESTION_SLOT in rendered else None
        self.add_special_tokens = adds_special_tokens(processor.tokenizer, rendered)

    def render(self, question: str) -> str:
        """The prompt of one question: image first, then the question and the instruction, then the generation
        prompt."""
        o = self.options
        content = [{"type": "image"}, {"type": "text", "text": o.user_text(question)}]
        return self.processor.apply_chat_template(
            chat_messages(content, o.system), add_generation_prompt=True, tokenize=False,
            **template_kwargs(self.processor.chat_template, self.template_variables))

    def preparer(self) -> HeadPreparer:
        return HeadPreparer(self.processor, self.head, self.add_special_tokens)

    def plan(self, texts: Sequence[str], key: str) -> PromptPlan:
        """The prompts of a question set (`key`: its hash) and their split, proven on a probe image."""
        if key not in self._plans:
            prompts = [self.render(q) for q in texts]
            self._plans[key] = self._split(prompts) if self.head is not None else PromptPlan(
                prompts, self.add_special_tokens, False, reason="the chat template does not render the question as given")
        return self._plans[key]

    def _process(self, texts: list[str], image: Image.Image) -> dict[str, Any]:
        return dict(self.processor(text=texts, images=[[image]] * len(texts), return_tensors="pt", padding=True,
                                   add_special_tokens=self.add_special_tokens))

    def _split(self, prompts: list[str]) -> PromptPlan:
        probe = probe_image()
        head = self._process([self.head], probe)
        fulls = [self._process([p], probe) for p in prompts]
        head_ids = head["input_ids"][0].tolist()
        full_ids = [f["input_ids"][0].tolist() for f in fulls]
        # Every tail keeps at least one token: the answer is read at a tail's last position.
        keep = min(common_prefix_length([head_ids, *full_ids]), min(map(len, full_ids)) - 1)
        problem, fills = self._mismatch(head, fulls, keep)
        special = self.add_special_tokens
        if problem:
            return PromptPlan(prompts, special, False, reason=problem)
        return PromptPlan(prompts, special, True, cut=len(head_ids) - keep, suffixes=[i[keep:] for i in full_ids],
                          fills=fills)

    def _mismatch(self, head: dict[str, Any], fulls: list[dict[str, Any]], keep: int) -> tuple[str, dict[str, int]]:
        """Why head[:keep] + tail is not each full prompt's processor output (empty when it is), and the values of
        per-token outputs on tail tokens."""
        import torch

        image_token = getattr(self.processor, "image_token_id", None)
        if image_token is not None:
            if image_token in head["input_ids"][0, keep:].tolist():
                return "image tokens follow the point where the questions differ", {}
            if any(image_token in f["input_ids"][0, keep:].tolist() for f in fulls):
                return "image tokens fall after the point where the questions differ", {}
        fills: dict[str, int] = {}
        for key, value in fulls[0].items():
            if key == "input_ids":
                continue
            for full in fulls:
                if key not in head or key not in full:
                    return f"the processor's output {key!r} is not there for every prompt", {}
                if per_token(key, full[key], full["input_ids"]):
                    tail = full[key][0, keep:].unique()
                    if not torch.equal(full[key][0, :keep], head[key][0, :keep]) or len(tail) != 1 or \
                            fills.setdefault(key, int(tail[0])) != int(tail[0]):
                        return f"the processor's {key!r} differs between the image head and the full prompts", {}
                elif not torch.equal(full[key], head[key]):
                    return f"the processor's {key!r} depends on the question", {}
        return "", fills


def probe_image() -> Image.Image:
    """A small, non-square, non-uniform image: tiling processors make several tiles of it."""
    ramp = np.linspace(0, 255, 48 * 72, dtype=np.float32).reshape(48, 72)
    return Image.fromarray(np.stack([ramp, ramp[::-1], np.full_like(ramp, 90)], axis=-1).astype(np.uint8))
