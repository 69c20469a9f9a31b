"""What an experiment leaves in `<out>/<grid name>/`: results.csv (one row per run), tables.md / tables.csv /
tables.tex (paper-style: rows = variants, columns = methods; and per variant the paired comparison with both
checkpoints), ablation curves and per-seed strip plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from makd.atomic import write_json, write_text
from makd.experiment.grid import Cell, Grid
from makd.experiment.runner import Outcome
from makd.report import plots
from makd.report.compare import compare_methods, comparison_table
from makd.report.tables import rows_csv

LABELS = {"test_top1": "test top-1", "test_top5": "test top-5", "val_top1": "validation top-1", "test_map": "test mAP",
          "test_map50": "test mAP50", "val_map": "validation mAP"}
METRICS = ("test_top1_best", "test_top1_last", "test_top5_best", "test_top5_last", "test_ece_best", "test_ece_last",
           "val_top1_best", "best_epoch", "train_seconds")


def result_row(cell: Cell, results: dict[str, Any]) -> dict[str, Any]:
    """One row of results.csv: every axis of the cell, then its numbers."""
    row: dict[str, Any] = {"run": cell.name, **cell.axes()}
    row.update({k: results.get(k) for k in METRICS})
    for which in ("best", "last"):
        agreement = results.get(f"aspect_agreement_{which}") or {}
        row[f"aspect_correlation_{which}"] = agreement.get("mean_correlation")
        row[f"aspect_auroc_{which}"] = agreement.get("mean_auroc")
    return row


def by_method(outcome: Outcome, variant: str, ablation: tuple[str, str] | None = None,
              methods: list[str] | None = None) -> dict[str, list[dict[str, Any]]]:
    """Results of one variant's cells by method (the ablation's cells, or the plain ones); a cell that is the same
    run as another (same config) reads that run's results."""
    grouped: dict[str, list[dict[str, Any]]] = {}
    for p in outcome.plan:
        c = p.cell
        run = p.same_as or c.name
        if c.variant_name != variant or c.ablation != ablation or run not in outcome.results:
            continue
        if methods is None or c.method in methods:
            grouped.setdefault(c.method, []).append(outcome.results[run])
    return grouped


def write_report(grid: Grid, outcome: Outcome) -> Path:
    """Write results.csv, tables.{md,csv,tex}, summary.json and the plots; returns the report folder."""
    spec, folder = grid.spec, grid.out / grid.spec.name
    reference = spec.reference_method
    rows = [result_row(p.cell, outcome.results[p.cell.name]) for p in outcome.plan
            if p.same_as is None and p.cell.name in outcome.results]
    write_text(folder / "results.csv", rows_csv(rows) if rows else "run\n")
    variants = list(dict.fromkeys(p.cell.variant_name for p in outcome.plan))
    lines = [f"# {spec.name}", "", f"Reference method: **{reference}**. Compared: {LABELS.get(spec.metric, spec.metric)} (%) on class "
             "logits only; "
             "“best on val” is the checkpoint chosen on the validation split, “last” the final epoch. Δ is the mean "
             "per-seed difference to the reference over the seeds both ran, with a 95 % Student-t interval (and a "
             "paired bootstrap one); the verdict is read off the t interval: *within noise* when it contains zero.",
             ""]
    summary: dict[str, Any] = {"grid": spec.model_dump(mode="json"), "reference": reference, "variants": {},
                               "failed": outcome.failed}
    wide: list[dict[str, Any]] = []
    for variant in variants:
        results = by_method(outcome, variant)
        if not results:
            continue
        table, numbers = comparison_table(results, reference, spec.metric, LABELS.get(spec.metric, spec.metric))
        summary["variants"][variant] = {"methods": numbers}
        lines += [f"## {variant}", "", *table, ""]
        wide.append(wide_row(variant, numbers, reference))
        slug = variant.replace("/", "-")
        plots.accuracy_by_method({m: [r[f"{spec.metric}_best"] for r in sorted(runs, key=lambda r: r["seed"])]
                                  for m, runs in results.items()}, folder / f"seeds-{slug}.png",
                                 f"{variant}: {LABELS.get(spec.metric, spec.metric)} per seed (best on val)", LABELS.get(spec.metric, spec.metric))
        lines += [f"![per-seed {LABELS.get(spec.metric, spec.metric)}, {variant}](seeds-{slug}.png)", ""]
        for axis, ablation in spec.ablations.items():
            section = ablation_section(outcome, variant, axis, list(ablation.values), reference, folder, spec.metric)
            if section:
                summary["variants"][variant].setdefault("ablations", {})[axis] = section.pop("numbers")
                lines += section["lines"]
    if wide:
        lines[4:4] = ["## Summary (best on validation; Δ vs reference)", "", *markdown(wide), ""]
        write_text(folder / "tables.csv", rows_csv(wide))
        write_text(folder / "tables.tex", latex(wide, spec.name))
    if outcome.failed:
        lines += ["## Failed cells", "", *[f"- `{name}`: {error}" for name, error in outcome.failed.items()], ""]
    write_text(folder / "tables.md", "\n".join(lines))
    write_json(folder / "summary.json", summary)
    return folder


def wide_row(variant: str, numbers: dict[str, Any], reference: str) -> dict[str, Any]:
    """Paper style: one row per variant, a column per method: mean ± std (Δ, verdict)."""
    row: dict[str, Any] = {"variant": variant}
    for method, entry in numbers.items():
        best = entry["best"]
        text = f"{best['summary']['mean']:.2f} ± {best['summary']['std']:.2f}"
        if "difference" in best:
            d = best["difference"]
            text += f" ({d['mean']:+.2f}{'' if d['significant'] else ', n.s.'})"
        row[method] = text
    return row


def markdown(rows: list[dict[str, Any]]) -> list[str]:
    columns = list(dict.fromkeys(k for r in rows for k in r))
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns),
            *["| " + " | ".join(str(r.get(c, "—")) for c in columns) + " |" for r in rows]]


def latex(rows: list[dict[str, Any]], caption: str) -> str:
    columns = list(dict.fromkeys(k for r in rows for k in r))

    def escape(text: str) -> str:
        return text.replace("\\", r"\textbackslash{}").replace("_", r"\_").replace("%", r"\%").replace("&", r"\&") \
            .replace("±", r"$\pm$").replace("#", r"\#")

    body = [" & ".join(escape(str(r.get(c, "--"))) for c in columns) + r" \\" for r in rows]
    return "\n".join([r"\begin{table}[t]", r"\centering", r"\begin{tabular}{l" + "c" * (len(columns) - 1) + "}",
                      r"\toprule", " & ".join(escape(c) for c in columns) + r" \\", r"\midrule", *body, r"\bottomrule",
                      r"\end{tabular}", rf"\caption{{{escape(caption)}: test top-1 (\%), mean $\pm$ std over seeds, "
                      r"checkpoint chosen on validation; ($\Delta$ vs the reference; n.s.: 95\% interval contains 0).}",
                      r"\end{table}", ""])


def ablation_section(outcome: Outcome, variant: str, axis: str, values: list[str], reference: str,
                     folder: Path, metric: str = "test_top1") -> dict[str, Any] | None:
    """Δ vs the reference (its cells without the ablation) at each value of a one-factor ablation, as a table and a
    curve. An ablated reference method is compared with its own default cells."""
    base = by_method(outcome, variant).get(reference, [])
    curves: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for value in values:
        for method, runs in by_method(outcome, variant, (axis, value)).items():
            ablated = f"{method} ({axis} = {value})"
            numbers = compare_methods({reference: base, ablated: runs}, reference, metric)[ablated]
            if "difference" in numbers["best"]:
                curves.setdefault(method, []).append((value, numbers))
    if not curves:
        return None
    lines = [f"### Ablation: {axis} ({variant})", "",
             f"| method | {axis} | seeds | {LABELS.get(metric, metric)}, best on val | Δ vs {reference} [95% t CI] | Δ, last epoch | "
             "seeds better | verdict |", "|---|---|---|---|---|---|---|---|"]
    for method, points in curves.items():
        for value, n in points:
            b, la = n["best"]["difference"], n["last"]["difference"]
            lines.append(f"| {method} | {value} | {b['n']} | {n['best']['summary']['mean']:.2f} ± "
                         f"{n['best']['summary']['std']:.2f} | {b['mean']:+.2f} [{b['low']:+.2f}, {b['high']:+.2f}] | "
                         f"{la['mean']:+.2f} [{la['low']:+.2f}, {la['high']:+.2f}] | {b['wins']}/{b['n']} | {b['verdict']} |")
    name = f"ablation-{axis}-{variant.replace('/', '-')}.png"
    plots.ablation_curves({m: [(v, n["best"]["difference"]) for v, n in pts] for m, pts in curves.items()},
                          folder / name, axis, f"{variant}: Δ {LABELS.get(metric, metric)} vs {reference} (best on val, 95% t CI)")
    lines += ["", f"![ablation {axis}]({name})", ""]
    return {"lines": lines, "numbers": {m: {v: n for v, n in pts} for m, pts in curves.items()}}

