"""Matplotlib figures (Agg backend: no display needed). Each function writes one PNG atomically."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from makd.atomic import atomic_path  # noqa: E402


def _save(fig: plt.Figure, path: Path) -> None:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def training_curves(history: list[dict[str, Any]], path: Path, metric: str = "top1", label: str = "top-1 (%)",
                    title: str = "accuracy (class logits)") -> None:
    """Loss terms per epoch (left) and train (when logged)/validation `metric` (right)."""
    _save(curves_figure(history, metric, label, title), path)


def curves_figure(history: list[dict[str, Any]], metric: str = "top1", label: str = "top-1 (%)",
                  title: str = "accuracy (class logits)") -> plt.Figure:
    """The figure of `training_curves`; epochs are whole numbers, so are the epoch ticks."""
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
    for ax in (ax_loss, ax_acc):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return fig


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


def ablation_curves(curves: dict[str, list[tuple[str, dict[str, Any]]]], path: Path, axis: str, title: str) -> None:
    """Mean paired difference (with its interval) at each value of an ablation axis, a line per method."""
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for method, points in curves.items():
        labels = [v for v, _ in points]
        try:
            x = [float(v) for v in labels]
        except ValueError:
            x = list(range(len(labels)))
            ax.set_xticks(x, labels)
        mean = np.array([d["mean"] for _, d in points])
        err = np.array([[d["mean"] - d["low"] for _, d in points], [d["high"] - d["mean"] for _, d in points]])
        ax.errorbar(x, mean, yerr=err, marker="o", capsize=4, label=method)
    ax.axhline(0, color="k", lw=0.8)
    ax.set(xlabel=axis, ylabel="Δ test top-1 (points)", title=title)
    if all(_is_number(v) for pts in curves.values() for v, _ in pts) and min(
            float(v) for pts in curves.values() for v, _ in pts) > 0:
        ax.set_xscale("log", base=2)
        values = sorted({float(v) for pts in curves.values() for v, _ in pts})
        ax.set_xticks(values, [f"{v:g}" for v in values])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def class_heatmap(p_yes: np.ndarray, questions: list[str], classes: list[str], path: Path, title: str,
                  reference: np.ndarray | None = None) -> None:
    """Mean P(yes) per question (rows) and class (columns); hand-written answers, where given, as 'Y'/'N'/'~'."""
    fig, ax = plt.subplots(figsize=(2.5 + 0.55 * len(classes), 1.2 + 0.28 * len(questions)))
    image = ax.imshow(p_yes, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(len(classes)), classes, rotation=40, ha="right", fontsize=8)
    ax.set_yticks(range(len(questions)), [q if len(q) <= 60 else q[:57] + "..." for q in questions], fontsize=7)
    for (i, j), value in np.ndenumerate(p_yes):
        mark = "" if reference is None or np.isnan(reference[i, j]) else {1.0: " Y", 0.0: " N"}.get(float(reference[i, j]), " ~")
        ax.text(j, i, f"{value:.2f}{mark}", ha="center", va="center", fontsize=6)
    fig.colorbar(image, ax=ax, label="mean P(yes)", fraction=0.04)
    ax.set_title(title, fontsize=9)
    _save(fig, path)
