"""The `data` section of the config (and the base of every section): which dataset, where, which subsets."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator

from makd.effects import EXECUTION, RESULTS


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    # Where a path with several candidates was looked for (data.manifest: under data.root, then beside the config
    # file), so that "not found" can name every place; set by makd.config.load_config, never saved.
    _searched: dict[str, list[str]] = PrivateAttr(default_factory=dict)


# Marks a path field in the schema: a relative value is relative to the config file that names it (the current
# folder for command-line overrides); `makd:` resources, hub ids (hf-hub:...) and URLs are not paths.
PATH = {"path": True}


class DataConfig(Section):
    dataset: str = Field("fashion_mnist", json_schema_extra=RESULTS, description="a registered dataset reader (makd/data/registry.py): "
                         "fashion_mnist, imagefolder, manifest, or one of the paper's datasets by name")
    root: str | None = Field(None, json_schema_extra=PATH | RESULTS, description="dataset folder (fashion_mnist: the IDX files; default: Debian's package; "
                             "torchvision datasets: the folder their download would have created; manifest: the folder "
                             "image paths are relative to, default the manifest's own folder)")
    manifest: str | None = Field(None, json_schema_extra=PATH | RESULTS, description="dataset manifest: CSV or JSONL file with "
                                 "path,label[,split] rows; a relative path is looked for under data.root first")
    classes: str | list[str] | None = Field(None, json_schema_extra=PATH | RESULTS, description="manifest: class names in label order (a list, or a file "
                                            "with one per line); default: the sorted distinct labels")
    holdout_fraction: float = Field(0.2, gt=0, lt=1, json_schema_extra=RESULTS, description="datasets without a test split (Caltech101, manifests "
                                    "without test rows): this fraction of each class is the test split (seeded)")
    train_per_class: int | None = Field(None, ge=1, json_schema_extra=RESULTS, description="few-shot: this many training images per class, a seeded "
                                        "subset (the demo asks for 20); null = all of them")
    val_per_class: int | None = Field(None, ge=0, json_schema_extra=RESULTS, description="validation images per class: a cap on the dataset's own "
                                      "validation split (null = all of it), or held out of the training pool (null = "
                                      "data.val_fraction of it); 0 = no validation, the last checkpoint is the one used")
    val_fraction: float = Field(0.1, ge=0, lt=1, json_schema_extra=RESULTS, description="datasets without a validation split, when val_per_class is "
                                "null: this fraction of each class's training pool (rounded, at least one image) is held "
                                "out for validation (seeded); 0 = no validation, the last checkpoint is the one used")
    test_per_class: int | None = Field(None, ge=1, json_schema_extra=RESULTS, description="subsample the test split (quick runs); null = all")
    split_seed: int = Field(0, json_schema_extra=RESULTS, description="seed of every subset drawn here (few-shot, validation, held-out test)")
    image_size: int | None = Field(None, ge=8, json_schema_extra=RESULTS, description="resize to this size; null = native (small-image datasets)")
    augment: Literal["auto", "crop_flip", "resized_crop_flip", "none"] = Field(
        "auto", json_schema_extra=RESULTS, description="training augmentation (auto: resized_crop_flip when images are resized, else crop_flip)")
    crop_padding: int | None = Field(None, ge=0, json_schema_extra=RESULTS, description="crop_flip: zero padding (pixels) before the random "
                                     "crop back to size; null = 1/8 of the image side")
    train_complement: bool = Field(False, json_schema_extra=RESULTS, description="train on the pool minus the few-shot training subset and the "
                                   "validation split: a KD teacher that never saw the student's images")
    channels: Literal["auto", 1, 3] = Field("auto", json_schema_extra=RESULTS, description="channels the model takes: "
                                            "1 (greyscale) or 3 (RGB); auto: an in-memory dataset's own, and for image "
                                            "files 1 only when every training image is greyscale (a folder mixing "
                                            "greyscale and colour images is read as RGB, and the log says so)")
    num_workers: Annotated[int, Field(ge=0)] | Literal["auto"] = Field(
        "auto", json_schema_extra=EXECUTION, description="loader processes per training process that decode and "
        "augment images ahead of the model (training, validation and test); auto: for a model on a GPU the CPU cores "
        "available to each training process, none for in-memory datasets (a batch is fetched faster than it could be "
        "passed between processes) or a model on the CPU (its threads use the cores); 0 = load in the training "
        "process. Changes nothing computed: every batch's random draws are seeded by its step")
    prefetch_factor: int = Field(2, ge=1, json_schema_extra=EXECUTION,
                                 description="batches each loader process prepares ahead of the model")

    @field_validator("dataset")
    @classmethod
    def _registered(cls, value: str) -> str:
        from makd.data.registry import DATASETS

        return DATASETS.check(value)
