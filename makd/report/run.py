"""`report.md` and `curves.png` of one training run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from makd.atomic import write_text
from makd.config import Config
from makd.report.plots import training_curves


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def checkpoint_rows(config: Config, results: dict[str, Any]) -> list[str]:
    """The test table, and which checkpoint it reports: best on validation, or the last one without validation."""
    test = [f"{results[f'test_{k}_{which}']:.2f}" for which in ("best", "last") for k in ("top1", "top5", "ece")]
    if results.get("val_top1_best") is None:
        return ["| checkpoint | epoch | test top-1 | test top-5 | test ECE |", "|---|---|---|---|---|",
                f"| last | {results['best_epoch']} | {' | '.join(test[3:])} |", "",
                "No validation images (data.val_per_class=0 or data.val_fraction=0): the last checkpoint is the one "
                "used, and evaluated once on test. Accuracy and calibration (ECE, 15 bins, %) use the class logits only."]
    return ["| checkpoint | epoch | val top-1 | test top-1 | test top-5 | test ECE |", "|---|---|---|---|---|---|",
            f"| best on validation | {results['best_epoch']} | {_pct(results['val_top1_best'])} | {' | '.join(test[:3])} |",
            f"| last | {config.train.epochs} | {_pct(results['val_top1_last'])} | {' | '.join(test[3:])} |", "",
            "Accuracy and calibration (ECE, 15 bins, %) use the class logits only. The checkpoint is chosen on the "
            "validation split, never on test."]


def write_run_report(run: Path, config: Config, results: dict[str, Any], history: list[dict[str, Any]]) -> None:
    training_curves(history, run / "curves.png")
    terms = ", ".join(f"{name} × {term.weight:g}" for name, term in config.loss.items() if term.weight > 0)
    lines = [
        f"# Run `{config.name}`",
        "",
        f"- model: `{config.model.name}` (width {config.model.width}), loss: {terms}, labels: "
        f"{config.labels.path or 'none'} (permute: {config.labels.permute})",
        f"- {config.train.epochs} epochs, batch {config.train.batch_size}, {config.optim.name} lr {config.optim.lr:g}, "
        f"{config.schedule.name} schedule, seed {config.train.seed}",
        "",
        *checkpoint_rows(config, results),
    ]
    agreement = results.get("aspect_agreement_best")
    if agreement:
        lines += ["", f"Aspect head vs teacher on {agreement['num_images']} labelled test images: mean per-question "
                      f"correlation {agreement['mean_correlation']:.3f}, mean |p_student − p_teacher| {agreement['mean_abs_error']:.3f}"
                      + (f", mean AUROC {agreement['mean_auroc']:.3f} against the teacher's yes/no over "
                         f"{agreement['auroc_questions']} non-constant questions." if agreement.get("mean_auroc") is not None else ".")]
    lines += ["", "![training curves](curves.png)", ""]
    write_text(run / "report.md", "\n".join(lines))
