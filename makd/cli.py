"""`makd` command line: a thin layer over the library, one subcommand per pipeline stage."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from makd import __version__
from makd.errors import MakdError, os_error_message

if TYPE_CHECKING:  # the CLI imports the heavy modules inside its commands
    from makd.config import Config
    from makd.labels import LabelStore
    from makd.labels.show import SampleSource

log = logging.getLogger("makd")

OVERRIDES_HELP = "config overrides as dotted key=value, e.g. train.epochs=30 loss.aspect_bce.weight=2"
EPILOG = """\
pipeline:
  makd questions show makd:fashion_mnist/questions.json     inspect a question set
  makd label -c my.yaml                                     teacher targets -> label store (resumable)
  makd labels check labels/                                 every sample covered once? which shards are missing
  makd labels status labels/                                a running job: shards done / leased / left, ETA
  makd labels show labels/ -c my.yaml --plot answers.png    what the teacher said, per image and per class
  makd labels export labels/ -o targets.json                the official {image_name: [p_1..p_Q]} JSON (and import)
  makd train -c my.yaml train.seed=1                        student with an aspect head -> run folder
  makd evaluate -m runs/x/best.safetensors                  test top-1/top-5/ECE on class logits, aspect AUROC
  makd export -m runs/x/best.safetensors -o student.onnx    ONNX (class + aspect logits; --no-aspects for classes only)
  torchrun --nproc_per_node=N -m makd train -c my.yaml      the same training on N processes (DDP)
  makd predict -m runs/x/best.safetensors photo.jpg         class + top aspects per image
  makd demo                                                 every stage on the embedded offline default
  makd demo detection                                       the same for object detection (task: detection)

All stages read one YAML config: `makd <command> -c my.yaml --print-config` prints it resolved, every key with
its default and what it means (`makd demo --print-config`: the demo's). Relative paths in a config file are
relative to that file; on the command line, to the current folder.
"""


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", action="append", metavar="FILE",
                   help="YAML config file; repeat to layer files (defaults < files in order < overrides); its relative "
                        "paths are relative to it")
    _print_config_arg(p)
    p.add_argument("overrides", nargs="*", metavar="key=value", help=OVERRIDES_HELP)


def _required(value: str | None, option: str) -> str:
    """Options required except with --print-config (which needs only the config)."""
    if value is None:
        raise MakdError(f"the option {option} is required")
    return value


def _print_config_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config (every key, its value and what it means) and exit")


def cmd_print_config(args: argparse.Namespace) -> int:
    from makd.config import config_yaml

    print(config_yaml(_load(args)), end="")
    return 0


def _load(args: argparse.Namespace):
    from makd.config import load_config

    return load_config(args.config, args.overrides)


# -- questions --------------------------------------------------------------------------------------
def cmd_questions_show(args: argparse.Namespace) -> int:
    from makd.config import resolve_path
    from makd.questions import QuestionSet

    qs = QuestionSet.load(resolve_path(args.file))
    if args.json:
        print(json.dumps(qs.model_dump(mode="json", exclude_none=True), indent=2, ensure_ascii=False))
        return 0
    print(f"{qs.name or args.file}: {len(qs)} questions, {len(qs.classes)} classes, hash {qs.hash}")
    print(f"classes: {', '.join(qs.classes)}")
    if qs.generation:
        print(f"source: {qs.generation.get('source', '?')}")
    for q in qs.questions:
        print(f"  {q.id:>5}  [{q.category or '-'}]  {q.text}" + (f"  (kept despite: {q.kept_despite})" if q.kept_despite else ""))
    return 0


def cmd_questions_import(args: argparse.Namespace) -> int:
    from makd.questions import QuestionSet

    if args.classes_file:
        classes = [c.strip() for c in Path(args.classes_file).read_text(encoding="utf-8").splitlines() if c.strip()]
    else:
        classes = [c.strip() for c in args.classes.split(",") if c.strip()]
    qs = QuestionSet.from_txt(args.file, classes, name=args.name or "", keep_invalid=args.keep_invalid)
    qs.save(args.output)
    kept = [q for q in qs.questions if q.kept_despite]
    print(f"wrote {args.output}: {len(qs)} questions, {len(classes)} classes, hash {qs.hash}"
          + (f"; {len(kept)} kept despite the cleaning rules (flagged kept_despite): "
             + "; ".join(f"{q.id} {q.text!r}: {q.kept_despite}" for q in kept) if kept else ""))
    return 0


def cmd_questions_generate(args: argparse.Namespace) -> int:
    from makd.questions.generate import candidates_path, generate_from_config

    qs = generate_from_config(_load(args), _required(args.output, "-o/--output"))
    g = qs.generation
    print(f"wrote {args.output}: {len(qs)} questions ({g['candidates_seen']} candidates in {g['rounds']} rounds; "
          f"rejected: {', '.join(f'{k} {v}' for k, v in g['rejected'].items()) or 'none'}); every response and "
          f"verdict: {candidates_path(Path(args.output))}")
    return 0


def cmd_questions_select(args: argparse.Namespace) -> int:
    from makd.selection import select_from_config

    config = _load(args)
    qs = select_from_config(config, _required(args.pool, "--pool"), _required(args.output, "-o/--output"))
    sel = qs.generation["selection"]
    extra = (f"; {sel['filled_at_random']} filled at random (the LLM named only {sel['chosen_by_llm']})"
             if sel.get("filled_at_random") else "")
    print(f"wrote {args.output}: {len(qs)} of {sel['pool_size']} questions by {sel['method']}{extra}, hash {qs.hash}")
    return 0


# -- label / train / evaluate / predict ------------------------------------------------------------
def _positive(value: str) -> int:
    """argparse type: a whole number >= 1 (argparse turns the ValueError into a one-line usage error)."""
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, not {value!r}")
    return number


def _shard(value: str) -> tuple[int, int]:
    try:
        rank, world = (int(x) for x in value.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard expects i/n, e.g. 0/4, not {value!r}") from None
    return rank, world


def cmd_label(args: argparse.Namespace) -> int:
    from makd.labels import label_from_config
    from makd.launchers import from_env

    config = _load(args)
    samples_of = _samples_of(config)
    if args.executor or args.workers:
        return _label_with_workers(args, config, samples_of)
    info = from_env()  # torchrun, srun, or one process
    rank, world = args.shard or (info.rank, info.world_size)
    if args.overwrite and world > 1:  # each process would discard what the others had already written
        raise MakdError(f"--overwrite is for one process, not {world}: delete the store folder "
                        f"({config.labels.path}) first to start over")
    store = label_from_config(config, rank=rank, world_size=world, overwrite=args.overwrite,
                              retry_skipped=args.retry_skipped, samples=samples_of)
    return _label_summary(config, store, samples_of)


def _label_with_workers(args: argparse.Namespace, config: Config, samples_of: SampleSource) -> int:
    """`makd label --executor local|slurm --workers N`: N label workers (processes, or one Slurm job array)."""
    from makd.experiment.executors import EXECUTORS, label_workers
    from makd.labels import LabelStore

    if args.shard or args.overwrite or args.retry_skipped:
        option = "--shard" if args.shard else "--overwrite" if args.overwrite else "--retry-skipped"
        raise MakdError(f"{option} is for one worker; --executor/--workers start all of them (delete the store folder "
                        "to start over, or run one worker with the option)")
    if not config.labels.path:
        raise MakdError("labels.path: where should the label store go? (e.g. labels.path=labels/my-dataset)")
    executor = config.executor.model_copy(update={k: v for k, v in (("name", args.executor), ("workers", args.workers))
                                                  if v is not None})
    works = label_workers(config, executor.workers, samples_of)
    workdir = Path(config.labels.path).resolve().parent
    failed = [(work, error) for work, _, error in EXECUTORS.get(executor.name)(works, executor, workdir) if error]
    if failed:
        raise MakdError(f"{failed[0][0].names[0]} failed: {failed[0][1]}" + (f"; {len(failed) - 1} more worker(s) "
                        "failed" if len(failed) > 1 else "") + " (re-run to resume)")
    return _label_summary(config, LabelStore.open(config.labels.path), samples_of)


def _label_summary(config: Config, store: LabelStore, samples_of: SampleSource) -> int:
    missing = store.missing_shards()
    print(f"label store {store.path}: {store.meta['num_samples']} samples x {store.num_questions} questions, "
          f"{store.num_shards - len(missing)}/{store.num_shards} shards done"
          + (f" (the rest are being labelled by other workers: `makd labels status {store.path}`)" if missing else ""))
    if not missing:
        from makd.labels.listing import listed_or_built
        from makd.labels.show import label_report

        print("\n".join(label_report(config, store, lambda c: listed_or_built(c, store.path, samples_of))))
    return 0


def _samples_of(config: Config) -> SampleSource:
    """What a config labels: its images, or for `task: detection` one box crop per ground-truth box
    (id <image id>/<annotation id>)."""
    if config.task == "detection":
        from makd.detection.crops import crops_to_label

        return crops_to_label
    from makd.labels import samples_to_label

    return samples_to_label


def cmd_labels_show(args: argparse.Namespace) -> int:
    from makd.labels.show import show

    config = _load(args) if args.config or args.overrides else None
    print("\n".join(show(args.path, config, images=args.images, per_side=args.answers, sample_ids=args.ids,
                         plot=args.plot, **({"samples_of": _samples_of(config)} if config else {}))))
    return 0


def _store_and_config(args: argparse.Namespace) -> tuple[str, Config | None]:
    """`labels check|status [path] [-c my.yaml] [key=value...]`: the store folder, and the config when one is given."""
    if args.path and "=" in args.path and not Path(args.path).exists():  # `check -c my.yaml key=value`
        args.overrides, args.path = [args.path, *args.overrides], None
    config = _load(args) if args.config or args.overrides else None
    path = args.path or (config.labels.path if config else None)
    if not path:
        raise MakdError(f"labels {args.labels_command}: name the label store folder, or give the config whose "
                        "labels.path it is (-c)")
    return path, config


def cmd_labels_check(args: argparse.Namespace) -> int:
    from makd.labels import LabelStore, split_coverage

    path, config = _store_and_config(args)
    store = LabelStore.open(path)
    coverage = store.check()
    print(f"label store {store.path} ({store.meta['teacher'].get('name', '?')}, {store.num_questions} questions)")
    print(coverage.report(args.world_size))
    if config is None:
        return 0 if coverage.complete else 1
    print(f"against the samples of {', '.join(args.config or ['the default config'])} (labels.splits {config.labels.splits}):")
    splits = split_coverage(config, coverage.sample_ids, None if config.task != "detection" else _samples_of(config),
                            coverage.skipped)
    print("\n".join(s.report() for s in splits))
    covered = not any(s.missing for s in splits)
    return 0 if coverage.complete and covered else 1


def cmd_labels_status(args: argparse.Namespace) -> int:
    from makd.labels.status import status_lines, store_status

    status = store_status(_store_and_config(args)[0])
    print(json.dumps(status.to_json(), indent=2) if args.json else "\n".join(status_lines(status)))
    return 0


def cmd_labels_export(args: argparse.Namespace) -> int:
    from makd.labels import LabelStore
    from makd.labels.official import export_official

    n = export_official(LabelStore.open(args.path), args.output, key=args.key)
    print(f"wrote {args.output}: {n} images, P(yes) for each question in the store's question order")
    return 0


def cmd_labels_import(args: argparse.Namespace) -> int:
    from makd.labels import split_coverage
    from makd.labels.official import import_official

    config = _load(args)
    samples = _samples_of(config) if config.task == "detection" else None  # keys: <image id>/<annotation id>
    store, imported, unmatched = import_official(config, args.file, args.output, overwrite=args.overwrite, samples=samples)
    print(f"label store {store.path}: {imported} samples imported from {args.file}"
          + (f"; {unmatched} keys matched no sample of labels.splits and were skipped" if unmatched else ""))
    for split in split_coverage(config, store.check().sample_ids, samples):
        if split.missing:
            print(f"left without a row: {split.report()}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from makd.engine import train
    from makd.launchers import from_env

    config = _load(args)
    results = train(config, resume=args.resume == "auto")
    report = Path(config.out) / "report.md"
    if not from_env().main:  # under torchrun or srun, one summary line
        pass
    elif config.task == "detection":
        print(f"test mAP {results['test_map_best']:.2f} / mAP50 {results['test_map50_best']:.2f} (checkpoint best on "
              f"validation, epoch {results['best_epoch']}), mAP {results['test_map_last']:.2f} (last epoch); "
              f"report: {report}")
    elif results["val_top1_best"] is None:
        print(f"test top-1 {results['test_top1_last']:.2f} (last epoch: no validation images); report: {report}")
    else:
        print(f"test top-1 {results['test_top1_best']:.2f} (checkpoint best on validation, epoch "
              f"{results['best_epoch']}), {results['test_top1_last']:.2f} (last epoch); report: {report}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from makd.detection.model_file import is_detector_file
    from makd.evaluate import evaluate_file

    if is_detector_file(args.model):  # mAP, mAP50, mAP75; aspect agreement on the split's labelled boxes
        from makd.detection.evaluate import evaluate_detector_file as evaluate_file
    report = evaluate_file(args.model, split=args.split, labels=args.labels, overrides=args.overrides)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    for which, part in (report.items() if "best" in report else [(None, report)]):  # a run folder: both checkpoints
        if which:
            print(f"[{which}]")
        print("\n".join(f"{k}: {v}" for k, v in part.items() if not isinstance(v, (list, dict))))
        aspects = part.get("aspects")
        if aspects:
            print(f"aspect head vs teacher ({aspects.get('num_boxes', aspects['num_images'])} "
                  f"{'boxes' if 'num_boxes' in aspects else 'images'}): mean correlation "
                  f"{aspects['mean_correlation']:.3f}, mean AUROC {aspects['mean_auroc'] if aspects['mean_auroc'] is None else round(aspects['mean_auroc'], 3)}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from makd.detection.model_file import is_detector_file
    from makd.export import export_onnx

    if is_detector_file(args.model):  # one image in; boxes, labels, scores (and aspect logits) out
        from makd.detection.predict import export_detector_onnx as export_onnx
    report = export_onnx(args.model, args.output, aspects=not args.no_aspects, opset=args.opset)
    print(f"wrote {report['output']}: outputs {', '.join(report['outputs'])}, input {report['input']}; "
          f"max |ONNX - PyTorch| {report['max_abs_diff']:.2g} ({report['checked_with']})")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from makd.detection.model_file import is_detector_file
    from makd.predict import predict_files

    if is_detector_file(args.model):
        return _predict_detections(args)
    results = predict_files(args.model, args.images, top_aspects=args.top_aspects)
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    for r in results:
        print(f"{r['image']}: {r['class']} ({100 * r['probability']:.1f}%)")
        for a in r.get("aspects", []):
            print(f"    {'yes' if a['p_yes'] >= 0.5 else 'no ':>3} {a['p_yes']:.2f}  {a['question']}")
    return 0


def _predict_detections(args: argparse.Namespace) -> int:
    from makd.detection.predict import predict_detection_files

    results = predict_detection_files(args.model, args.images, top_aspects=min(args.top_aspects, 3) if args.top_aspects
                                      else 0, score_threshold=args.score_threshold, out_dir=args.out_dir)
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    for r in results:
        print(f"{r['image']}: {len(r['boxes'])} boxes (score >= {args.score_threshold}), drawn to {r['drawn']}")
        for b in r["boxes"]:
            print(f"  {b['class']} {100 * b['score']:.1f}% at {b['box']}")
            for a in b.get("aspects", []):
                print(f"      {'yes' if a['p_yes'] >= 0.5 else 'no ':>3} {a['p_yes']:.2f}  {a['question']}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from makd.config import config_yaml

    detection = args.overrides[:1] == ["detection"]  # `makd demo detection [key=value ...]`
    if detection:
        from makd.detection.demo import demo_config
        from makd.detection.demo import run_detection_demo as run_demo

        args.overrides = args.overrides[1:]
        if args.out == "runs/demo":
            args.out = "runs/demo-detection"
    else:
        from makd.demo import demo_config, run_demo
    if args.print_config:
        print(config_yaml(demo_config(Path(args.out), args.overrides)), end="")
        return 0
    run_demo(Path(args.out), seeds=args.seeds or (5 if detection else 12), overrides=args.overrides,
             progress=not args.no_progress, workers=args.workers or (1 if detection else 2))
    return 0


def cmd_experiment(args: argparse.Namespace) -> int:
    from makd.experiment.grid import Grid
    from makd.experiment.runner import DONE, plan, run_grid, stores_to_label

    grid = Grid.load(args.grid, args.overrides)
    executor = grid.spec.executor.model_copy(update={k: v for k, v in (
        ("name", args.executor), ("workers", args.workers), ("threads", args.threads),
        ("batch_seeds", args.batch_seeds)) if v is not None})
    if args.dry_run:
        cells = plan(grid, prepare=False)
        for p in cells:
            print(f"{p.status:>6}  {p.cell.name}  ->  {p.run}" + (f"  (same config as {p.same_as})" if p.same_as else ""))
        done = sum(p.status == DONE or p.same_as is not None for p in cells)
        print(f"{len(cells)} cells: {done} done, {len(cells) - done} to run (executor {executor.name}, "
              f"{executor.workers} worker(s), batch_seeds {executor.batch_seeds})")
        for path in stores_to_label(grid):
            print(f"label store {path}: to label first ({executor.workers} label worker(s))")
        return 0
    from makd.experiment.report import write_report
    from makd.experiment.runner import finished

    outcome = finished(grid) if args.report else run_grid(grid, executor, progress=not args.no_progress,
                                                          samples_of=_samples_of)
    folder = write_report(grid, outcome)
    print((folder / "tables.md").read_text(encoding="utf-8"))
    print(f"results: {folder / 'results.csv'}; tables: {folder / 'tables.md'} (.csv, .tex); plots in {folder}")
    if outcome.failed:
        print(f"makd: error: {len(outcome.failed)} cell(s) failed (listed in tables.md); re-run to retry them",
              file=sys.stderr)
        return 1
    return 0


# -- parser -----------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog="makd", formatter_class=fmt, epilog=EPILOG,
                                     description="Multi-aspect knowledge distillation (arXiv 2501.13341): distil "
                                                 "yes/no aspect answers of a (multimodal) LLM into a small image classifier.")
    parser.add_argument("--version", action="version", version=f"makd {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")

    q = sub.add_parser("questions", help="generate, select, inspect and import question sets", formatter_class=fmt)
    qsub = q.add_subparsers(dest="questions_command", required=True, metavar="action")
    show = qsub.add_parser("show", help="print a question set and its hash")
    show.add_argument("file", help="question-set JSON, or makd:<resource> (e.g. makd:fashion_mnist/questions.json)")
    show.add_argument("--json", action="store_true", help="print the whole file as JSON")
    show.set_defaults(func=cmd_questions_show)
    imp = qsub.add_parser("import", help="import the official one-question-per-line .txt")
    imp.add_argument("file", help="text file, one question per line")
    group = imp.add_mutually_exclusive_group(required=True)
    group.add_argument("--classes", help="comma-separated class names, in label order")
    group.add_argument("--classes-file", help="file with one class name per line, in label order")
    imp.add_argument("-o", "--output", required=True, help="question-set JSON to write")
    imp.add_argument("--name", help="name of the question set")
    imp.add_argument("--keep-invalid", action="store_true",
                     help="keep lines the cleaning rules refuse (not a yes/no question, names a class...), each "
                          "flagged with the reason in its kept_despite field; without it they are an error")
    imp.set_defaults(func=cmd_questions_import)
    gen = qsub.add_parser("generate", help="an LLM writes candidate questions from the class names",
                          description="The paper's generation prompt (or few-shot prompting for small models), "
                                      "rounds of sampling until generate.num_questions questions survive cleaning. "
                                      "LLM responses are cached beside the output: a re-run costs nothing.",
                          formatter_class=fmt)
    _config_args(gen)
    gen.add_argument("-o", "--output", help="question-set JSON to write (the candidate pool; required)")
    gen.set_defaults(func=cmd_questions_generate)
    sel = qsub.add_parser("select", help="keep Q of a pool: by data (teacher answers), by the LLM, or at random",
                          description="Keeps select.num_questions of the pool's questions. Methods (select.method=...):\n"
                                      "  data    the configured teacher answers every candidate on select.images_per_class\n"
                                      "          training images per class; keeps the questions that say most about the\n"
                                      "          class and least what the others say (default; writes .selection.csv/.png\n"
                                      "          beside the output)\n"
                                      "  llm     the generation LLM (generate.llm) picks them, as in the paper\n"
                                      "  random  a seeded random choice (select.seed): the baseline the others must beat\n"
                                      "All options: `makd questions select -c my.yaml --print-config` (section select).",
                          formatter_class=fmt)
    sel.add_argument("--pool", help="candidate question set (from `makd questions generate`; required)")
    _config_args(sel)
    sel.add_argument("-o", "--output", help="question-set JSON to write (required)")
    sel.set_defaults(func=cmd_questions_select)

    lab = sub.add_parser("label", help="score every (image, question) with a teacher into a label store",
                         description="Writes Parquet shards atomically; re-running resumes at the first missing shard.",
                         formatter_class=fmt)
    _config_args(lab)
    lab.add_argument("--shard", type=_shard, metavar="i/n", help="the share this worker claims first, then any shard no "
                     "live worker holds (default: the launcher's rank and world size: torchrun, srun)")
    lab.add_argument("--executor", choices=["local", "slurm"],
                     help="start the label workers: local processes, or one Slurm job array through submitit (its "
                          "options: the config's executor section, e.g. executor.partition=gpu executor.gpus=1)")
    lab.add_argument("--workers", type=_positive, help="label workers (with --executor; default: executor.workers)")
    lab.add_argument("--overwrite", action="store_true", help="discard an existing store at labels.path")
    lab.add_argument("--retry-skipped", action="store_true",
                     help="label again the shards that skipped unreadable images (after repairing them)")
    lab.set_defaults(func=cmd_label)

    ls = sub.add_parser("labels", help="check, export and import label stores", formatter_class=fmt)
    lsub = ls.add_subparsers(dest="labels_command", required=True, metavar="action")
    chk = lsub.add_parser("check", help="merge check: every sample covered exactly once; list missing shards",
                          description="Validates every row (width, finite log-odds, mass in [0, 1], one row per "
                                      "sample); with -c, also checks that every sample the config trains and "
                                      "evaluates on has a row, per split. Exit status 0 when all is well, 1 otherwise.")
    chk.add_argument("path", nargs="?", help="label store folder (default: labels.path of the config)")
    chk.add_argument("--world-size", type=int, help="also say which rank (of a --shard i/n job) owes each missing shard")
    _config_args(chk)
    chk.set_defaults(func=cmd_labels_check)
    sts = lsub.add_parser("status", help="progress of a labelling job: shards done, leased (by whom) and left, "
                                         "throughput, time left",
                          description="Reads only file names and times (no shard is opened): cheap to run while "
                                      "workers label. Throughput is over the shards written in the last 15 minutes, "
                                      "all workers together.")
    sts.add_argument("path", nargs="?", help="label store folder (default: labels.path of the config)")
    sts.add_argument("--json", action="store_true", help="print the status as JSON (for scripts)")
    _config_args(sts)
    sts.set_defaults(func=cmd_labels_status)
    exp = lsub.add_parser("export", help="write the official {image_name: [p_1, ..., p_Q]} JSON")
    exp.add_argument("path", help="label store folder")
    exp.add_argument("-o", "--output", required=True, help="JSON file to write")
    exp.add_argument("--key", choices=["id", "name"], default="id",
                     help="image_name = the sample id (default; e.g. train/cat/1.jpg) or the file name (1.jpg)")
    exp.set_defaults(func=cmd_labels_export)
    shw = lsub.add_parser("show", help="what the teacher said: per image, per class (table and heatmap)",
                          description="Per image, the teacher's most confident yes and no answers. With -c (the config\n"
                                      "the store was made with: it says each sample's class), also the mean P(yes) per\n"
                                      "question and class, and the teacher's agreement with the question set's\n"
                                      "hand-written class_answers.", formatter_class=fmt)
    shw.add_argument("path", help="label store folder")
    _config_args(shw)
    shw.add_argument("--images", type=int, default=5, help="images to show, spread over the classes (default 5)")
    shw.add_argument("--ids", nargs="+", metavar="ID", help="show these sample ids instead")
    shw.add_argument("--answers", type=int, default=3, help="yes and no answers per image (default 3 each)")
    shw.add_argument("--plot", metavar="FILE.png", help="also draw the per-class table as a heatmap PNG (needs -c)")
    shw.set_defaults(func=cmd_labels_show)
    imp2 = lsub.add_parser("import", help="label store from an official {image_name: [p_1, ..., p_Q]} JSON",
                           description="Keys match a sample whose id equals them or ends with '/' + key; the config "
                                       "gives the data, labels.splits and the question set the columns follow.")
    imp2.add_argument("--json", required=True, dest="file", help="official target JSON")
    _config_args(imp2)
    imp2.add_argument("-o", "--output", help="label store folder (default: labels.path)")
    imp2.add_argument("--overwrite", action="store_true", help="discard an existing store there")
    imp2.set_defaults(func=cmd_labels_import)

    tr = sub.add_parser("train", help="train a student (CE + aspect BCE by default)",
                        description="Resumes from <out>/checkpoints/ when a checkpoint is there (--resume never starts over).", formatter_class=fmt)
    _config_args(tr)
    tr.add_argument("--resume", choices=["auto", "never"], default="auto",
                    help="auto (default): continue from the newest valid checkpoint in <out>/checkpoints/ "
                         "(last.pt, else last.prev.pt); never: start over")
    tr.set_defaults(func=cmd_train)

    ev = sub.add_parser("evaluate", help="top-1/top-5/ECE on class logits; per-aspect AUROC against the teacher")
    ev.add_argument("-m", "--model", required=True, help="student .safetensors, or a run folder (best and last)")
    ev.add_argument("--split", default="test", choices=["train", "val", "test"])
    ev.add_argument("--labels", help="label store for aspect agreement (default: the run's labels.path)")
    ev.add_argument("--json", action="store_true", help="print the full report as JSON")
    ev.add_argument("overrides", nargs="*", metavar="key=value", help="data config overrides, e.g. data.root=/data/x")
    ev.set_defaults(func=cmd_evaluate)

    ex = sub.add_parser("export", help="ONNX model of a student (checked against PyTorch)")
    ex.add_argument("-m", "--model", required=True, help="student .safetensors")
    ex.add_argument("-o", "--output", required=True, help="ONNX file to write")
    ex.add_argument("--no-aspects", action="store_true", help="class logits only (leave the aspect head out)")
    ex.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    ex.set_defaults(func=cmd_export)

    pr = sub.add_parser("predict", help="class and top aspects for image files")
    pr.add_argument("-m", "--model", required=True, help="student .safetensors, or its ONNX export (same output)")
    pr.add_argument("images", nargs="+", help="image files (any format PIL reads)")
    pr.add_argument("-k", "--top-aspects", type=int, default=5, help="aspects to show per image (default 5)")
    pr.add_argument("--json", action="store_true", help="machine-readable output")
    pr.add_argument("--out-dir", default="predictions", help="detectors: where the drawn images go (default predictions/)")
    pr.add_argument("--score-threshold", type=float, default=0.5, help="detectors: boxes scoring at least this (default 0.5)")
    pr.set_defaults(func=cmd_predict)

    de = sub.add_parser("demo", help="the whole pipeline on the embedded offline default (Fashion-MNIST); "
                        "`makd demo detection`: the same for object detection on Fashion-MNIST canvases",
                        description="Questions -> bridge-teacher labels -> CE, MaKD and a permuted-target control over "
                                    "paired seeds (an experiment grid, see `makd experiment`) -> table, report.md and "
                                    "plots. Resumes where it stopped. `makd demo detection [key=value ...]` runs the "
                                    "detection default (per-box aspects, COCO mAP; output in runs/demo-detection).",
                        formatter_class=fmt)
    de.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    de.add_argument("--seeds", type=_positive, help="paired seeds per method (default 12: ~9 minutes on 2 CPU cores; detection: 5)")
    de.add_argument("--workers", type=_positive,
                    help="runs trained at a time, in worker processes of one torch thread each (default 2; detection: "
                         "1). On 2 CPU cores two 1-thread runs finish ~1.1-1.2x more runs per hour than one 2-thread "
                         "run; with the demo recipe's settings, ~1.5-1.6x the runs of before "
                         "(benchmarks/cheap_seeds.py)")
    de.add_argument("--no-progress", action="store_true", help="no progress bars")
    _print_config_arg(de)
    de.add_argument("overrides", nargs="*", metavar="key=value", help=OVERRIDES_HELP)
    de.set_defaults(func=cmd_demo)

    ex = sub.add_parser("experiment", help="methods x datasets x students x seeds from a grid file, with tables",
                        description="Every cell of the grid is an ordinary run folder: finished cells are read back, "
                                    "interrupted ones resume. Writes <out>/<name>/results.csv, tables.md (.csv, .tex: "
                                    "mean ± std, paired Δ vs the reference with 95%% t and bootstrap intervals, seeds "
                                    "better, verdict), ablation curves and per-seed plots. The grid format is "
                                    "documented in docs/experiments.md.", formatter_class=fmt)
    ex.add_argument("grid", help="grid YAML file (see configs/evidence/ and configs/paper/grid.yaml)")
    ex.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides applied to every cell")
    ex.add_argument("--dry-run", action="store_true", help="list the cells, their status and folders; run nothing")
    ex.add_argument("--report", action="store_true",
                    help="write the tables and plots from the cells finished so far; train nothing (e.g. while the grid "
                         "runs elsewhere)")
    ex.add_argument("--executor", choices=["local", "slurm"], help="where cells run (default: the grid's executor)")
    ex.add_argument("--workers", type=_positive, help="local: worker processes (default: the grid's, 1)")
    ex.add_argument("--threads", type=_positive, help="local: torch threads per worker (default: cores / workers)")
    ex.add_argument("--batch-seeds", type=_positive, help="train up to this many seeds of a cell as one batched model")
    ex.add_argument("--no-progress", action="store_true", help="no progress bars")
    ex.set_defaults(func=cmd_experiment)
    return parser


def parse(argv: list[str] | None) -> argparse.Namespace:
    """Like parse_args, but `key=value` overrides may also come after options (`--resume never a.b=1`), which
    argparse alone refuses once the positional list has been consumed."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    unknown = [e for e in extra if e.startswith("-") or "=" not in e]
    if unknown or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(unknown or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    if getattr(args, "print_config", False) and args.func is not cmd_demo:
        args.func = cmd_print_config
    return args


def main(argv: list[str] | None = None) -> int:
    """Run one command; every failure a user can act on ends as one line on stderr and exit status 2."""
    args = parse(argv)
    # makd's own messages at INFO; other libraries only when something is wrong (or with --verbose).
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(message)s")
    logging.getLogger("makd").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    try:
        _remove_stale_temporaries(args)
        code = args.func(args)
        sys.stdout.flush()  # a closed pipe shows here, where it is handled, not at interpreter exit
        return code
    except MakdError as exc:
        print(f"makd: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `makd questions show ... | head -1`: the reader has what it wanted
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so the flush at exit does not fail again
        return 0
    except OSError as exc:  # permission, a folder that is a file, a full disk, a read-only file system...
        print(f"makd: error: {os_error_message(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("makd: interrupted (re-run the same command to resume)", file=sys.stderr)
        return 130


def _remove_stale_temporaries(args: argparse.Namespace) -> None:
    """Beside a file a command writes (-o), what killed writers left; run and store folders are cleaned by the
    training and labelling code that knows them."""
    from makd.atomic import remove_stale_temporaries

    output, out = getattr(args, "output", None), getattr(args, "out", None)  # -o FILE, or demo's --out FOLDER
    for folder in ([Path(output).parent] if output else []) + ([Path(out)] if out else []):
        remove_stale_temporaries(folder)
