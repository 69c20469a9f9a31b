"""The `hf` teacher's scoring backends, one interface: `score(batch, plan, rows) -> (log-odds, mass)` [images, Q].

- plain: every (image, question) prompt in full, left-padded rows, `rows` per forward: the processed heads of the
  batch's images followed by each question's tail (or, for prompts that do not split, and as the reference the
  reuse check compares with, the processor run on each full prompt: `score_pairs`).
- packed / batched (prefix reuse): the batch's image heads are prefilled in ONE forward (left-padded rows, KV cache
  kept); the question tails then continue from that cache, `rows` questions at a time:
  - packed: per image, all tails of a chunk in ONE row behind its prefix, kept apart by a block attention mask,
    each at the positions it would have right after the prefix. One custom mask serves every layer, so this form
    needs an attention implementation that applies a custom 4-D mask (eager, sdpa) and no layer whose attention
    that mask would misstate: a sliding window shorter than the prompt (the packed row would see past it).
  - batched: per image, right-padded rows, one per tail, on broadcast views of its cache rows, with the model's own
    masks (sliding windows included: a sliding-window cache keeps the window's tail). Right padding only puts pads
    after a row's real tokens, which causal attention never lets them see.
Left padding of the prefill rows is masked everywhere; positions continue as the prefill counted them
(`TransformersAdapter.suffix_positions`). tests/test_hf_teacher.py proves each backend equal to transformers'
documented one-prompt-at-a-time forward for every supported architecture.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import Any, ClassVar

import numpy as np
from PIL import Image

from makd.teachers.answers import AnswerTokens, logodds_and_mass
from makd.teachers.hf_adapter import TransformersAdapter, per_token
from makd.teachers.hf_prompts import PreparedImages, PromptPlan

Scores = tuple[np.ndarray, np.ndarray]  # log-odds, mass: [images, questions] float32


class Backend:
    """What every backend shares: the adapter, the answer tokens, call counters (`counts[name]`: forwards run)."""

    name: ClassVar[str]

    def __init__(self, adapter: TransformersAdapter, answers: Callable[[], AnswerTokens], pad_token_id: int,
                 counts: Counter) -> None:
        self.adapter = adapter
        self.answers = answers
        self.pad = pad_token_id
        self.counts = counts

    def score(self, batch: PreparedImages, plan: PromptPlan, rows: int) -> Scores:
        raise NotImplementedError

    def head(self, batch: PreparedImages, plan: PromptPlan) -> dict[str, Any]:
        """The batch's processed heads on the device, without the `plan.cut` tokens the tails start with."""
        assert batch.head is not None and plan.split
        head = self.adapter.inputs(batch.head)
        if plan.cut:
            ids = head["input_ids"]
            head = {k: v[:, :v.shape[1] - plan.cut] if per_token(k, v, ids) else v for k, v in head.items()}
        return head

    def _scores(self, logits: Any) -> Scores:
        return logodds_and_mass(logits, self.answers())


def chunks(items: Sequence[Any], size: int) -> Iterator[tuple[int, Sequence[Any]]]:
    for start in range(0, len(items), size):
        yield start, items[start:start + size]


class PlainBackend(Backend):
    name = "plain"

    def __init__(self, *args: Any, processor: Any) -> None:
        super().__init__(*args)
        self.processor = processor  # score_pairs runs it on full prompts

    def score(self, batch: PreparedImages, plan: PromptPlan, rows: int) -> Scores:
        """Rows (question j, image b), question-major, `rows` per forward (at least one question's worth)."""
        import torch

        if batch.head is None or not plan.split:
            return self.score_pairs(batch.images, plan, rows)
        head = self.head(batch, plan)
        images = len(batch)
        logodds = np.zeros((images, len(plan.suffixes)), np.float32)
        mass = np.zeros_like(logodds)
        for start, tails in chunks(plan.suffixes, max(1, rows // images)):
            with torch.inference_mode():
                logits = self.adapter.last_logits(**self._rows(head, tails, plan.fills))
            self.counts[self.name] += 1
            lo, m = self._scores(logits)
            logodds[:, start:start + len(tails)] = lo.reshape(len(tails), images).T
            mass[:, start:start + len(tails)] = m.reshape(len(tails), images).T
        return logodds, mass

    def _rows(self, head: dict[str, Any], tails: Sequence[list[int]], fills: dict[str, int]) -> dict[str, Any]:
        """Every image's head + each tail, left-padded to one width (the answer is every row's last position);
        the pixel inputs repeated once per tail."""
        import torch

        ids = head["input_ids"]
        images, device = ids.shape[0], ids.device
        width = max(map(len, tails))
        parts: dict[str, list[Any]] = {}
        for tail in tails:
            pad, n = width - len(tail), len(tail)
            for key, value in head.items():
                if key == "input_ids":
                    row = [torch.full((images, pad), self.pad, dtype=ids.dtype, device=device), value,
                           torch.tensor(tail, dtype=ids.dtype, device=device).expand(images, n)]
                elif per_token(key, value, ids):
                    fill = 1 if key == "attention_mask" else fills.get(key, 0)
                    row = [torch.zeros((images, pad), dtype=value.dtype, device=device), value,
                           torch.full((images, n), fill, dtype=value.dtype, device=device)]
                else:
                    row = [value]
                parts.setdefault(key, []).append(torch.cat(row, dim=1) if len(row) > 1 else row[0])
        return {key: torch.cat(values) for key, values in parts.items()}

    def score_pairs(self, images: Sequence[Image.Image], plan: PromptPlan, rows: int) -> Scores:
        """The reference: the processor on every full (image, question) prompt, left-padded, image-major."""
        import torch

        processor = self.processor
        pairs = [(i, j) for i in range(len(images)) for j in range(len(plan.prompts))]
        logodds, mass = [], []
        for _, chunk in chunks(pairs, rows):
            batch = processor(text=[plan.prompts[j] for _, j in chunk], images=[[images[i]] for i, _ in chunk],
                              return_tensors="pt", padding=True, add_special_tokens=plan.add_special_tokens)
            with torch.inference_mode():
                logits = self.adapter.last_logits(**self.adapter.inputs(batch))
            self.counts["pairs"] += 1
            lo, m = self._scores(logits)
            logodds.append(lo)
            mass.append(m)
        shape = (len(images), len(plan.prompts))
        return np.concatenate(logodds).reshape(shape), np.concatenate(mass).reshape(shape)


class PrefixBackend(Backend):
    """Prefill the batch's image heads once, then continue the question tails from the cache (`_continue`)."""

    def score(self, batch: PreparedImages, plan: PromptPlan, rows: int) -> Scores:
        import torch

        head = self.head(batch, plan)
        mask = head.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(head["input_ids"])
        with torch.inference_mode():
            cache = self.adapter.prefill(**head)
            self.counts["prefill"] += 1
            parts = [self._continue(cache, mask, tails) for _, tails in chunks(plan.suffixes, rows)]
        return np.concatenate([p[0] for p in parts], axis=1), np.concatenate([p[1] for p in parts], axis=1)

    def _continue(self, cache: Any, mask: Any, tails: Sequence[list[int]]) -> Scores:
        raise NotImplementedError


class PackedBackend(PrefixBackend):
    """Per image one row: all tails of the chunk behind the image's prefix (see the module docstring). The prefix's
    keys and values are read once per layer instead of once per question: the cost of a single forward."""

    name = "packed"

    def _continue(self, cache: Any, mask: Any, tails: Sequence[list[int]]) -> Scores:
        import torch

        images, length = mask.shape
        device = mask.device
        lengths = torch.tensor([len(t) for t in tails], device=device)
        segment = torch.repeat_interleave(torch.arange(len(tails), device=device), lengths)
        offset = torch.cat([torch.arange(n, device=device) for n in lengths.tolist()])
        total = int(lengths.sum())
        allowed = (segment[:, None] == segment[None, :]) & (offset[:, None] >= offset[None, :])
        dtype = self.adapter.dtype
        blocked = torch.finfo(dtype).min
        attend = torch.zeros(images, 1, total, length + total, dtype=dtype, device=device)
        attend[:, 0, :, :length] = torch.where(mask[:, None, :].bool(), 0.0, blocked)
        attend[:, 0, :, length:] = torch.where(allowed, 0.0, blocked)
        positions = self.adapter.suffix_positions(mask, offset.expand(images, total), torch.arange(images, device=device))
        input_ids = torch.tensor([t for tail in tails for t in tail], device=device).expand(images, total)
        last = (torch.cumsum(lengths, 0) - 1).repeat(images)
        rows = torch.arange(images, device=device).repeat_interleave(len(tails))
        logits = self.adapter.logits_at(self.adapter.cache_views(cache), rows, last, input_ids=input_ids,
                                        attention_mask=attend, position_ids=positions)
        self.counts[self.name] += 1
        lo, m = self._scores(logits)
        return lo.reshape(images, len(tails)), m.reshape(images, len(tails))


class BatchedBackend(PrefixBackend):
    """Per image, one right-padded row per tail on views of its cache row; the model makes its own (causal,
    sliding-window) masks from the padding mask."""

    name = "batched"

    def _continue(self, cache: Any, mask: Any, tails: Sequence[list[int]]) -> Scores:
        import torch

        images, length = mask.shape
        device = mask.device
        width = max(map(len, tails))
        input_ids = torch.tensor([t + [self.pad] * (width - len(t)) for t in tails], device=device)
        last = torch.tensor([len(t) - 1 for t in tails], device=device)
        rows = torch.arange(len(tails), device=device)
        offsets = torch.arange(width, device=device).expand(len(tails), width)
        out = []
        for image in range(images):
            prefix = mask[image:image + 1].expand(len(tails), length)
            attention = torch.cat([prefix, torch.ones(len(tails), width, dtype=mask.dtype, device=device)], dim=1)
            positions = self.adapter.suffix_positions(prefix, offsets, torch.full_like(rows, image))
            logits = self.adapter.logits_at(self.adapter.cache_views(cache, image, len(tails)), rows, last,
                                            input_ids=input_ids, attention_mask=attention, position_ids=positions)
            self.counts[self.name] += 1
            out.append(self._scores(logits))
        return np.stack([o[0] for o in out]), np.stack([o[1] for o in out])
