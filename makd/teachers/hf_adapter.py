"""What the `hf` teacher needs from transformers' internals, in one place (they move between releases): loading
with a device map, the forward's arguments (`cache`, `logits_to_keep`), the layer types and sliding windows a
cache continues, broadcast views of a KV cache, M-RoPE's `rope_deltas`, the SDPA grouped-KV switch, and reading
the output head at chosen positions only. Everything else in makd/teachers/hf_*.py uses plain tensors.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from makd.clients.hf import HFModelOptions, load_pretrained, torch_dtype

MASKABLE_ATTENTION = frozenset({"eager", "sdpa"})  # apply a custom 4-D mask as given, in every layer
CONTINUABLE_LAYERS = frozenset({"full_attention", "sliding_attention"})  # a cache copy continues them exactly
SEQUENCE_KEYS_SKIP = ("pixel", "image")  # processor outputs that are never per-token, whatever their shape


class PrefixReuseError(Exception):
    """The prompts of this model do not split into a shared image prefix and per-question suffixes."""


@dataclass(frozen=True)
class SuffixLayout:
    """How question suffixes continue from an image's cached prefix (makd/teachers/hf_backends.py)."""

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


def per_token(key: str, value: Any, input_ids: Any) -> bool:
    """Processor outputs aligned with the tokens (masks, token types), which a prefix slice must cut too."""
    return (not key.startswith(SEQUENCE_KEYS_SKIP) and hasattr(value, "shape") and value.ndim == 2
            and tuple(value.shape) == tuple(input_ids.shape))


class TransformersAdapter:
    """A loaded `AutoModelForImageTextToText` and the calls makd makes on it."""

    def __init__(self, model: Any) -> None:
        self.model = model
        parameters = inspect.signature(model.forward).parameters
        self.keeps_logits = "logits_to_keep" in parameters
        named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        # Processor outputs the forward takes; never `labels` (PaliGemma's processor returns them, and a loss over
        # the whole prompt fails against logits kept at the last position only).
        self.accepted = frozenset(k for k, p in parameters.items() if p.kind in named) - {"labels"}
        self.dtype = next(model.parameters()).dtype

    @classmethod
    def load(cls, options: HFModelOptions, dtype: str, device: str,
             placement: Mapping[str, Any] | None = None) -> TransformersAdapter:
        """Weights on `device`, or spread over devices by accelerate (`placement`: from_pretrained's device_map and
        max_memory arguments for this process, `clients.hf.device_map_kwargs`)."""
        from transformers import AutoModelForImageTextToText

        kwargs: dict[str, Any] = {"dtype": torch_dtype(dtype), **(placement or {})}
        if options.attn_implementation:
            kwargs["attn_implementation"] = options.attn_implementation
        model = load_pretrained(AutoModelForImageTextToText, options, "model", **kwargs)
        return cls((model if placement else model.to(device)).eval())

    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def device(self) -> Any:
        """Where inputs go: the input embeddings' device (the first of a device map's)."""
        return self.model.get_input_embeddings().weight.device

    def layout(self) -> SuffixLayout:
        return suffix_layout(self.model.config)

    def inputs(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """The processor outputs the forward takes, on the input device, floating ones in the model's dtype."""
        out = {}
        for key, value in batch.items():
            if key not in self.accepted:
                continue
            if hasattr(value, "to"):
                value = value.to(self.device, dtype=self.dtype) if value.is_floating_point() else \
                    value.to(self.device)
            out[key] = value
        return out

    def last_logits(self, **inputs: Any) -> Any:
        """[B, V] logits at the last position of every row (no [B, T, V] tensor)."""
        keep = {"logits_to_keep": 1} if self.keeps_logits else {}
        return self.model(**inputs, **keep).logits[:, -1]

    def prefill(self, **inputs: Any) -> Any:
        """The KV cache of a forward over `inputs` (logits of the last position only)."""
        keep = {"logits_to_keep": 1} if self.keeps_logits else {}
        return self.model(**inputs, use_cache=True, **keep).cache

    def logits_at(self, cache: Any, rows: Any, positions: Any, **inputs: Any) -> Any:
        """[n, V] logits of rows[k] at positions[k] of a forward that continues `cache`; only those hidden states
        reach the output head."""
        with read_hidden_at(self.model, rows, positions), grouped_kv_in_sdpa(self.device.type == "cpu"):
            out = self.model(cache=cache, use_cache=True, **inputs)
        return out.logits[:, 0]

    def rope_deltas(self) -> Any:
        """M-RoPE models (Qwen-VL): per row, the offset of text positions after the image that the prefill left;
        None for models with 1-D positions."""
        return getattr(getattr(self.model, "model", None), "rope_deltas", None)

    def suffix_positions(self, prefix_mask: Any, offsets: Any, images: Any) -> Any:
        """Position ids of tokens at `offsets` [n, T] after the prefix of prefill row `images[k]` for row k (its
        padding mask `prefix_mask` [n, L]), as the prefill counted positions: 1-D models count padding too (arange
        over the row), so they continue at the prefix's width; M-RoPE models count real tokens only and keep
        `rope_deltas` per row, so they continue at its real length + delta ([3, n, T])."""
        deltas = self.rope_deltas()
        if deltas is None:
            return prefix_mask.shape[1] + offsets
        start = prefix_mask.sum(dim=1, keepdim=True) + deltas.to(prefix_mask.device)[images]
        return (start + offsets)[None].expand(3, *offsets.shape)

    def cache_views(self, cache: Any, row: int | None = None, rows: int = 1) -> Any:
        """The prefix cache to continue: every row as it is (`row` None), or row `row` repeated `rows` times.
        Dynamic (and sliding-window) layers get views of the prefix keys/values: their update concatenates into new
        tensors and never writes into the prefix, so no copy of the prefix is made. Other cache types take the
        documented deepcopy + batch_select_indices / batch_repeat_interleave."""
        import torch
        from transformers.cache_utils import DynamicLayer

        layers = getattr(cache, "layers", None)
        if layers is None or not all(type(layer).update is DynamicLayer.update or type(layer).__name__ ==
                                     "DynamicSlidingWindowLayer" for layer in layers):
            copied = copy.deepcopy(cache)
            if row is not None:
                copied.batch_select_indices(torch.tensor([row]))
                copied.batch_repeat_interleave(rows)
            return copied
        repeated = copy.copy(cache)
        repeated.layers = []
        for layer in layers:
            view = copy.copy(layer)
            if row is not None and getattr(layer, "keys", None) is not None and layer.keys.numel():
                view.keys = layer.keys[row:row + 1].expand(rows, *layer.keys.shape[1:])
                view.values = layer.values[row:row + 1].expand(rows, *layer.values.shape[1:])
            repeated.layers.append(view)
        return repeated


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


@contextlib.contextmanager
def read_hidden_at(model: Any, rows: Any, positions: Any) -> Iterator[None]:
    """Feed the output head only the hidden states at (rows[k], positions[k]): logits [k, 1, V], never [B, T, V]."""
    head = model.get_output_embeddings()

    def gather(_module: Any, args: tuple) -> tuple:
        hidden = args[0]
        if hidden.ndim != 3 or int(rows.max()) >= hidden.shape[0] or int(positions.max()) >= hidden.shape[1]:
            raise PrefixReuseError(f"output head got hidden states of shape {tuple(hidden.shape)}")
        return (hidden[rows.to(hidden.device), positions.to(hidden.device)].unsqueeze(1), *args[1:])

    handle = head.register_forward_pre_hook(gather)
    try:
        yield
    finally:
        handle.remove()
