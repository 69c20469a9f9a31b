"""The grid file of `makd experiment`: which runs make up a comparison, each an ordinary run folder.

```yaml
name: fmnist                    # title of the tables
out: runs/fmnist                # every cell is <out>/runs/<cell>/ (relative paths: to this file)
configs: [makd:demo]            # layered config files of every cell (makd:<name> = a built-in config)
overrides: [train.epochs=120]   # applied to every cell
variants:                       # optional axes crossed with each other: the rows of the tables
  data: {fmnist20: [data.train_per_class=20], fmnist50: [data.train_per_class=50]}
  student: {resnet8: {overrides: [model.name=resnet8]}, resnet20: {configs: [students/r20.yaml]}}
methods:                        # named override sets: the columns of the tables
  CE: [loss.aspect_bce.weight=0]
  MaKD: []
reference: CE                   # paired differences are against it (default: the first method)
seeds: 10                       # 0..9, or a list
ablations:                      # one factor at a time, for some methods, on the first `seeds` seeds
  alpha: {methods: [MaKD], seeds: 5, values: {1: [loss.aspect_bce.weight=1], 8: [loss.aspect_bce.weight=8]}}
  Q: {methods: [MaKD], values: {5: {subset_questions: 5}, 10: {subset_questions: 10}}}
executor: {name: local, workers: 1, threads: 2}
```

An override may say `{seed}`: it becomes the cell's seed (e.g. `questions=random-s{seed}.json`, one draw per seed).
A cell is (variant of each axis, method, at most one ablation value, seed). Its run folder is named after those,
so grids that share `out` share the cells they have in common (a reference run is trained once). An ablation
value is a list of overrides, or `{subset_questions: K}`: a seeded subset of K questions of the cell's question
set, with its label store cut from the cell's store (no teacher runs again).
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydantic
import yaml

from makd.config import Config, builtin_config, config_layers, deep_merge, load_config
from makd.config import ExecutorConfig as Executor  # where cells run: the same keys as `makd label`'s
from makd.errors import MakdError
from makd.validation import validate

Overrides = list[str]


class Setting(pydantic.BaseModel):
    """A named change: config files layered after the grid's, and/or overrides; or a question subset."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)

    configs: list[str] = []
    overrides: list[str] = []
    subset_questions: int | None = pydantic.Field(None, ge=1)
    subset_seed: int = 0


def _setting(value: Any) -> Any:
    """A bare list of overrides is shorthand for {overrides: [...]}; null means no change."""
    if value is None:
        return {}
    return {"overrides": value} if isinstance(value, list) else value


class Ablation(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)

    values: dict[str, Setting]
    methods: list[str] | None = None  # default: every method but the reference
    seeds: int | None = pydantic.Field(None, ge=1)  # the first n seeds of the grid (default: all)

    @pydantic.field_validator("values", mode="before")
    @classmethod
    def _shorthand(cls, values: Any) -> Any:
        return {str(k): _setting(v) for k, v in values.items()} if isinstance(values, dict) else values


class GridFile(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)

    name: str = "experiment"
    out: str = "runs/experiment"
    configs: list[str] = []
    overrides: list[str] = []
    variants: dict[str, dict[str, Setting]] = {}
    methods: dict[str, Setting]
    reference: str | None = None
    seeds: int | list[int] = 5
    ablations: dict[str, Ablation] = {}
    metric: str = "test_top1"  # what the tables compare: test_top1, test_top5, val_top1 (detection: test_map, ...)
    executor: Executor = Executor()

    @pydantic.field_validator("methods", mode="before")
    @classmethod
    def _method_shorthand(cls, methods: Any) -> Any:
        return {str(k): _setting(v) for k, v in methods.items()} if isinstance(methods, dict) else methods

    @pydantic.field_validator("variants", mode="before")
    @classmethod
    def _variant_shorthand(cls, variants: Any) -> Any:
        if not isinstance(variants, dict):
            return variants
        return {axis: {str(k): _setting(v) for k, v in (values or {}).items()} for axis, values in variants.items()}

    @pydantic.model_validator(mode="after")
    def _consistent(self) -> "GridFile":
        if not self.methods:
            raise ValueError("methods: name at least one method")
        if self.reference is not None and self.reference not in self.methods:
            raise ValueError(f"reference: {self.reference!r} is not one of the methods {list(self.methods)}")
        for axis, values in self.variants.items():
            if not values:
                raise ValueError(f"variants.{axis}: give at least one value")
        for name, ablation in self.ablations.items():
            unknown = [m for m in ablation.methods or [] if m not in self.methods]
            if unknown:
                raise ValueError(f"ablations.{name}.methods: {unknown[0]!r} is not one of the methods {list(self.methods)}")
            if ablation.seeds is not None and ablation.seeds > len(self.seed_list):
                raise ValueError(f"ablations.{name}.seeds: {ablation.seeds} is more than the grid's {len(self.seed_list)} seeds")
        return self

    @property
    def seed_list(self) -> list[int]:
        return list(range(self.seeds)) if isinstance(self.seeds, int) else list(self.seeds)

    @property
    def reference_method(self) -> str:
        return self.reference or next(iter(self.methods))


@dataclass(frozen=True)
class Cell:
    """One run of the grid."""

    variant: tuple[tuple[str, str], ...]  # ((axis, value), ...)
    method: str
    seed: int
    ablation: tuple[str, str] | None = None  # (axis, value)
    settings: tuple[Setting, ...] = ()  # in the order they apply: variants, method, ablation

    @property
    def name(self) -> str:
        parts = [value for _, value in self.variant] + [self.method]
        if self.ablation:
            parts.append(f"{self.ablation[0]}{self.ablation[1]}")
        return "-".join(slug(p) for p in parts) + f"-s{self.seed}"

    @property
    def variant_name(self) -> str:
        return "/".join(value for _, value in self.variant) or "default"

    def axes(self) -> dict[str, str]:
        """The cell's coordinates, as results.csv records them."""
        return {**dict(self.variant), "method": self.method, "ablation": self.ablation[0] if self.ablation else "",
                "ablation_value": self.ablation[1] if self.ablation else "", "seed": str(self.seed)}


def slug(text: str) -> str:
    """A folder-name-safe version of a label ("CE + KD" -> "ce-kd")."""
    return re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-") or "x"


@dataclass
class Grid:
    """A parsed grid file and where it lives (relative paths in it are relative to that folder)."""

    spec: GridFile
    folder: Path
    source: str = ""
    extra_overrides: list[str] = field(default_factory=list)  # from the command line, after everything else

    @classmethod
    def load(cls, path: str | Path, overrides: list[str] | None = None) -> "Grid":
        path = Path(path)
        data: dict[str, Any] = {}
        for layer, _ in config_layers(path):  # the grid file itself may `include:` a shared one
            data = deep_merge(data, layer)
        spec = validate(GridFile, data, f"grid {path}")
        return cls(spec, path.parent.resolve(), str(path), list(overrides or []))

    @property
    def out(self) -> Path:
        return self._path(self.spec.out)

    def _path(self, value: str) -> Path:
        return Path(value) if Path(value).is_absolute() else self.folder / value

    def _config_path(self, value: str) -> str:
        return value if value.startswith("makd:") else str(self._path(value))

    def cells(self) -> list[Cell]:
        """Every cell, seed-major (an interrupted grid has balanced partial results), without duplicates."""
        spec = self.spec
        variants = [[(axis, name, setting) for name, setting in values.items()] for axis, values in spec.variants.items()]
        cells: list[Cell] = []
        seen: set[str] = set()
        for seed in spec.seed_list:
            for combo in itertools.product(*variants) if variants else [()]:
                variant = tuple((axis, name) for axis, name, _ in combo)
                base = tuple(setting for _, _, setting in combo)
                for method, setting in spec.methods.items():
                    candidates = [Cell(variant, method, seed, None, (*base, setting))]
                    for axis, ablation in spec.ablations.items():
                        applies = ablation.methods if ablation.methods is not None else [
                            m for m in spec.methods if m != spec.reference_method]
                        if method in applies and seed in spec.seed_list[:ablation.seeds or len(spec.seed_list)]:
                            candidates += [Cell(variant, method, seed, (axis, value), (*base, setting, change))
                                           for value, change in ablation.values.items()]
                    for cell in candidates:
                        if cell.name not in seen:
                            seen.add(cell.name)
                            cells.append(cell)
        return cells

    def config(self, cell: Cell, subset_paths: tuple[str, str] | None = None) -> Config:
        """The cell's resolved config: the grid's files and overrides, then each setting's, then the cell's own
        name, output folder and seed (and, for a question subset, the prepared question set and label store),
        then the command line's overrides. Paths in the grid's overrides are relative to the grid file."""
        files = [self._config_path(c) for c in self.spec.configs]
        overrides = list(self.spec.overrides)
        for setting in cell.settings:
            files += [self._config_path(c) for c in setting.configs]
            overrides += setting.overrides
        overrides = [o.replace("{seed}", str(cell.seed)) for o in overrides]  # e.g. a question set drawn per seed
        overrides += [f"name={cell.name}", f"out={self.out / 'runs' / cell.name}", f"train.seed={cell.seed}"]
        if subset_paths:
            overrides += [f"questions={subset_paths[0]}", f"labels.path={subset_paths[1]}"]
        return load_grid_config(files, [(overrides, self.folder)], self.extra_overrides)

    def subset_setting(self, cell: Cell) -> Setting | None:
        subset = [s for s in cell.settings if s.subset_questions]
        return subset[-1] if subset else None

    def describe(self) -> str:
        return yaml.safe_dump(self.spec.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


def load_grid_config(files: list[str], grid_overrides: list[tuple[list[str], Path]], overrides: list[str]) -> Config:
    """Built-in configs (`makd:<name>`) are layered like files (first: they are the base the files change)."""
    base: dict[str, Any] = {}
    paths = []
    for f in files:
        if f.startswith("makd:"):
            if paths:
                raise MakdError(f"configs: put the built-in config {f} first (it is the base the files change)")
            base = deep_merge(base, builtin_config(f.removeprefix("makd:")))
        else:
            paths.append(f)
    return load_config(paths, overrides, base=base, file_overrides=grid_overrides)
