"""`makd` command line: a thin layer over the library, one subcommand per pipeline stage."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from makd import __version__
from makd.errors import MakdError

log = logging.getLogger("makd")

OVERRIDES_HELP = "config overrides as dotted key=value, e.g. train.epochs=30 loss.aspect_bce.weight=2"
EPILOG = """\
pipeline:
  makd questions show makd:fashion_mnist/questions.json     inspect a question set
  makd label -c my.yaml                                     teacher targets -> label store (resumable)
  makd train -c my.yaml train.seed=1                        student with an aspect head -> run folder
  makd evaluate -m runs/x/best.safetensors                  test top-1/top-5 on class logits, aspect agreement
  makd predict -m runs/x/best.safetensors photo.jpg         class + top aspects per image
  makd demo                                                 every stage on the embedded offline default

All stages read one YAML config (see `makd demo --print-config` for a complete example).
"""


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", help="YAML config file (defaults < file < overrides)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help=OVERRIDES_HELP)


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
        print(f"  {q.id:>5}  [{q.category or '-'}]  {q.text}")
    return 0


def cmd_questions_import(args: argparse.Namespace) -> int:
    from makd.questions import QuestionSet

    if args.classes_file:
        classes = [c.strip() for c in Path(args.classes_file).read_text(encoding="utf-8").splitlines() if c.strip()]
    else:
        classes = [c.strip() for c in args.classes.split(",") if c.strip()]
    qs = QuestionSet.from_txt(args.file, classes, name=args.name or "")
    qs.save(args.output)
    print(f"wrote {args.output}: {len(qs)} questions, {len(classes)} classes, hash {qs.hash}")
    return 0


# -- label / train / evaluate / predict ------------------------------------------------------------
def _shard(value: str) -> tuple[int, int]:
    try:
        rank, world = (int(x) for x in value.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard expects i/n, e.g. 0/4, not {value!r}") from None
    return rank, world


def cmd_label(args: argparse.Namespace) -> int:
    from makd.labels import label_from_config

    config = _load(args)
    rank, world = args.shard or (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)))
    store = label_from_config(config, rank=rank, world_size=world, overwrite=args.overwrite)
    missing = store.missing_shards()
    print(f"label store {store.path}: {store.meta['num_samples']} samples x {store.num_questions} questions, "
          f"{store.num_shards - len(missing)}/{store.num_shards} shards done")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from makd.engine import train

    config = _load(args)
    results = train(config, resume=not args.no_resume)
    print(f"test top-1 {results['test_top1_best']:.2f} (checkpoint best on validation, epoch {results['best_epoch']}), "
          f"{results['test_top1_last']:.2f} (last epoch); report: {Path(config.out) / 'report.md'}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from makd.evaluate import evaluate_file

    report = evaluate_file(args.model, split=args.split, labels=args.labels, overrides=args.overrides)
    print(json.dumps(report, indent=2) if args.json else "\n".join(f"{k}: {v}" for k, v in report.items()
                                                                  if not isinstance(v, (list, dict))))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from makd.predict import predict_files

    results = predict_files(args.model, args.images, top_aspects=args.top_aspects)
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    for r in results:
        print(f"{r['image']}: {r['class']} ({100 * r['probability']:.1f}%)")
        for a in r.get("aspects", []):
            print(f"    {'yes' if a['p_yes'] >= 0.5 else 'no ':>3} {a['p_yes']:.2f}  {a['question']}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from makd.demo import demo_config_text, run_demo

    if args.print_config:
        print(demo_config_text(), end="")
        return 0
    run_demo(Path(args.out), seeds=args.seeds, overrides=args.overrides, progress=not args.no_progress)
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

    q = sub.add_parser("questions", help="inspect and import question sets", formatter_class=fmt)
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
    imp.set_defaults(func=cmd_questions_import)

    lab = sub.add_parser("label", help="score every (image, question) with a teacher into a label store",
                         description="Writes Parquet shards atomically; re-running resumes at the first missing shard.",
                         formatter_class=fmt)
    _config_args(lab)
    lab.add_argument("--shard", type=_shard, metavar="i/n", help="this worker's share (default: torchrun's RANK/WORLD_SIZE)")
    lab.add_argument("--overwrite", action="store_true", help="discard an existing store at labels.path")
    lab.set_defaults(func=cmd_label)

    tr = sub.add_parser("train", help="train a student (CE + aspect BCE by default)",
                        description="Resumes from <out>/checkpoints/last.pt when present.", formatter_class=fmt)
    _config_args(tr)
    tr.add_argument("--no-resume", action="store_true", help="start over even if a checkpoint exists")
    tr.set_defaults(func=cmd_train)

    ev = sub.add_parser("evaluate", help="top-1/top-5 on class logits; aspect agreement with the teacher")
    ev.add_argument("-m", "--model", required=True, help="student .safetensors (best.safetensors or last.safetensors)")
    ev.add_argument("--split", default="test", choices=["train", "val", "test"])
    ev.add_argument("--labels", help="label store for aspect agreement (default: the run's labels.path)")
    ev.add_argument("--json", action="store_true", help="print the full report as JSON")
    ev.add_argument("overrides", nargs="*", metavar="key=value", help="data config overrides, e.g. data.root=/data/x")
    ev.set_defaults(func=cmd_evaluate)

    pr = sub.add_parser("predict", help="class and top aspects for image files")
    pr.add_argument("-m", "--model", required=True, help="student .safetensors")
    pr.add_argument("images", nargs="+", help="image files (any format PIL reads)")
    pr.add_argument("-k", "--top-aspects", type=int, default=5, help="aspects to show per image (default 5)")
    pr.add_argument("--json", action="store_true", help="machine-readable output")
    pr.set_defaults(func=cmd_predict)

    de = sub.add_parser("demo", help="the whole pipeline on the embedded offline default (Fashion-MNIST)",
                        description="Questions -> bridge-teacher labels -> CE, MaKD and a permuted-target control over "
                                    "several seeds -> table, report.md and plots. Resumes where it stopped.",
                        formatter_class=fmt)
    de.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    de.add_argument("--seeds", type=int, default=5, help="seeds per method (default 5)")
    de.add_argument("--no-progress", action="store_true", help="no progress bars")
    de.add_argument("--print-config", action="store_true", help="print the demo's config and exit")
    de.add_argument("overrides", nargs="*", metavar="key=value", help=OVERRIDES_HELP)
    de.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # makd's own messages at INFO; other libraries only when something is wrong (or with --verbose).
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(message)s")
    logging.getLogger("makd").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    try:
        return args.func(args)
    except MakdError as exc:
        print(f"makd: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("makd: interrupted (re-run the same command to resume)", file=sys.stderr)
        return 130
