"""Matplotlib figures (Agg backend: no display needed). Each function writes one PNG atomically."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from makd.atomic import atomic_path  # noqa: E402


def _save(fig: plt.Figure, path: Path) -> None:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def training_curves(history: list[dict[str, Any]], path: Path, metric: str = "top1", label: str = "top-1 (%)",
                    title: str = "accuracy (class logits)") -> None:
    """Loss terms per epoch (left) and train (when logged)/validation `metric` (right)."""
    epochs = [row["epoch"] for row in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.6))
    for key in [k for k in history[0] if k.startswith("loss")]:
        ax_loss.plot(epochs, [row.get(key, np.nan) for row in history], label=key.removeprefix("loss_") if key != "loss" else "total")
    ax_loss.set(xlabel="epoch", ylabel="weighted loss", yscale="log", title="training loss by term")
    ax_loss.legend(fontsize=8)
    if f"train_{metric}" in history[0]:
        ax_acc.plot(epochs, [row[f"train_{metric}"] for row in history], label="train")
    val = [(row["epoch"], row[f"val_{metric}"]) for row in history if f"val_{metric}" in row]
    if val:
        ax_acc.plot(*zip(*val), marker="o", ms=3, label="validation")
    ax_acc.set(xlabel="epoch", ylabel=label, title=title)
    ax_acc.legend(fontsize=8)
    _save(fig, path)


def accuracy_by_method(accuracies: dict[str, list[float]], path: Path, title: str, ylabel: str = "test top-1 (%)") -> None:
    """One point per seed, with mean ± std per method."""
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(accuracies), 3.8))
    rng = np.random.default_rng(0)
    for i, (method, values) in enumerate(accuracies.items()):
        values = np.asarray(values)
        ax.scatter(i + rng.uniform(-0.08, 0.08, len(values)), values, s=22, alpha=0.8, zorder=3)
        ax.errorbar(i + 0.22, values.mean(), yerr=values.std(ddof=1) if len(values) > 1 else 0, fmt="s", color="k",
                    capsize=4, zorder=4)
    ax.set_xticks(range(len(accuracies)), list(accuracies), rotation=10)
    ax.set(ylabel=ylabel, title=title)
    ax.grid(axis="y", alpha=0.3)
    _save(fig, path)


def per_question_bars(values: dict[str, np.ndarray], labels: list[str], path: Path, title: str, xlabel: str) -> None:
    """Horizontal bars per question (sorted by the first series), one colour per series."""
    names = list(values)
    order = np.argsort(np.nan_to_num(values[names[0]], nan=-2.0))
    height = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(8.5, 0.24 * len(labels) + 1.2))
    for k, name in enumerate(names):
        ax.barh(np.arange(len(labels)) + k * height, values[name][order], height=height, label=name)
    ax.set_yticks(np.arange(len(labels)) + 0.4 - height / 2, [labels[i] for i in order], fontsize=7)
    ax.axvline(0, color="k", lw=0.6)
    ax.set(xlabel=xlabel, title=title)
    ax.legend(fontsize=8, loc="lower right")
    _save(fig, path)


def prediction_gallery(images: list[np.ndarray], captions: list[str], path: Path, cols: int = 4) -> None:
    """Images with multi-line captions (predicted class, top aspects)."""
    rows = -(-len(images) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 4.1 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, img, caption in zip(axes.ravel(), images, captions):
        ax.imshow(img, cmap="gray" if img.ndim == 2 else None)
        ax.text(0.0, -0.03, caption, transform=ax.transAxes, fontsize=7, va="top", ha="left", family="monospace")
    _save(fig, path)


def selection_scatter(report: Any, path: Path, title: str) -> None:
    """Candidates by information about the class vs spread of answers: chosen (numbered), kept, filtered out."""
    fig, ax = plt.subplots(figsize=(7.5, 5))
    dropped = np.array([d is not None for d in report.dropped])
    chosen = report.rank > 0
    rest = ~dropped & ~chosen
    ax.scatter(report.spread[dropped], report.information[dropped], c="lightgrey", s=18, label="filtered out (mass/spread)")
    ax.scatter(report.spread[rest], report.information[rest], c="tab:blue", s=18, alpha=0.6, label="not chosen")
    ax.scatter(report.spread[chosen], report.information[chosen], c="tab:red", s=30, label="chosen")
    for j in np.flatnonzero(chosen):
        ax.annotate(str(report.rank[j]), (report.spread[j], report.information[j]), fontsize=7,
                    xytext=(3, 3), textcoords="offset points")
    ax.set(xlabel="spread of P(yes) over images", ylabel="information about the class (bits)", title=title)
    ax.legend(fontsize=8)
    _save(fig, path)
