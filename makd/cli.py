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
  makd labels check labels/                                 every sample covered once? which shards are missing
  makd labels export labels/ -o targets.json                the official {image_name: [p_1..p_Q]} JSON (and import)
  makd train -c my.yaml train.seed=1                        student with an aspect head -> run folder
  makd evaluate -m runs/x/best.safetensors                  test top-1/top-5/ECE on class logits, aspect AUROC
  makd export -m runs/x/best.safetensors -o student.onnx    ONNX (class + aspect logits; --no-aspects for classes only)
  torchrun --nproc_per_node=N -m makd train -c my.yaml      the same training on N processes (DDP)
  makd predict -m runs/x/best.safetensors photo.jpg         class + top aspects per image
  makd demo                                                 every stage on the embedded offline default
  makd demo detection                                       the same for object detection (task: detection)

All stages read one YAML config (see `makd demo --print-config` for a complete example).
"""


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", action="append", metavar="FILE",
                   help="YAML config file; repeat to layer files (defaults < files in order < overrides)")
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


def cmd_questions_generate(args: argparse.Namespace) -> int:
    from makd.questions.generate import candidates_path, generate_from_config

    qs = generate_from_config(_load(args), args.output)
    g = qs.generation
    print(f"wrote {args.output}: {len(qs)} questions ({g['candidates_seen']} candidates in {g['rounds']} rounds; "
          f"rejected: {', '.join(f'{k} {v}' for k, v in g['rejected'].items()) or 'none'}); every response and "
          f"verdict: {candidates_path(Path(args.output))}")
    return 0


def cmd_questions_select(args: argparse.Namespace) -> int:
    from makd.selection import select_from_config

    config = _load(args)
    qs = select_from_config(config, args.pool, args.output)
    sel = qs.generation["selection"]
    extra = (f"; {sel['filled_at_random']} filled at random (the LLM named only {sel['chosen_by_llm']})"
             if sel.get("filled_at_random") else "")
    print(f"wrote {args.output}: {len(qs)} of {sel['pool_size']} questions by {sel['method']}{extra}, hash {qs.hash}")
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
    if config.task == "detection":  # one sample per ground-truth box crop, id <image id>/<annotation id>
        from makd.detection.crops import label_boxes_from_config as label_from_config
    store = label_from_config(config, rank=rank, world_size=world, overwrite=args.overwrite)
    missing = store.missing_shards()
    print(f"label store {store.path}: {store.meta['num_samples']} samples x {store.num_questions} questions, "
          f"{store.num_shards - len(missing)}/{store.num_shards} shards done"
          + (f" (the rest belong to other workers: `makd labels check {store.path}` when all are done)"
             if missing and world > 1 else ""))
    return 0


def cmd_labels_check(args: argparse.Namespace) -> int:
    from makd.labels import LabelStore

    store = LabelStore.open(args.path)
    coverage = store.check()
    print(f"label store {store.path} ({store.meta['teacher'].get('name', '?')}, {store.num_questions} questions)")
    print(coverage.report(args.world_size))
    return 0 if coverage.complete else 1


def cmd_labels_export(args: argparse.Namespace) -> int:
    from makd.labels import LabelStore
    from makd.labels.official import export_official

    n = export_official(LabelStore.open(args.path), args.output, key=args.key)
    print(f"wrote {args.output}: {n} images, P(yes) for each question in the store's question order")
    return 0


def cmd_labels_import(args: argparse.Namespace) -> int:
    from makd.labels.official import import_official

    config = _load(args)
    samples = None
    if config.task == "detection":  # keys are box sample ids <image id>/<annotation id>
        from makd.detection.crops import crops_to_label as samples
    store, imported, unmatched = import_official(config, args.file, args.output, overwrite=args.overwrite, samples=samples)
    print(f"label store {store.path}: {imported} samples imported from {args.file}"
          + (f"; {unmatched} keys matched no sample of labels.splits and were skipped" if unmatched else ""))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from makd.engine import train

    config = _load(args)
    results = train(config, resume=args.resume == "auto")
    if int(os.environ.get("RANK", 0)) == 0 and config.task == "detection":
        print(f"test mAP {results['test_map_best']:.2f} / mAP50 {results['test_map50_best']:.2f} (checkpoint best on "
              f"validation, epoch {results['best_epoch']}), mAP {results['test_map_last']:.2f} (last epoch); "
              f"report: {Path(config.out) / 'report.md'}")
    elif int(os.environ.get("RANK", 0)) == 0:  # under torchrun, one summary line
        print(f"test top-1 {results['test_top1_best']:.2f} (checkpoint best on validation, epoch {results['best_epoch']}), "
          f"{results['test_top1_last']:.2f} (last epoch); report: {Path(config.out) / 'report.md'}")
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
    from makd.demo import demo_config_text, run_demo

    if args.overrides[:1] == ["detection"]:  # `makd demo detection [key=value ...]`
        from makd.detection.demo import demo_config_text
        from makd.detection.demo import run_detection_demo as run_demo

        args.overrides = args.overrides[1:]
        if args.out == "runs/demo":
            args.out = "runs/demo-detection"
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
    imp.set_defaults(func=cmd_questions_import)
    gen = qsub.add_parser("generate", help="an LLM writes candidate questions from the class names",
                          description="The paper's generation prompt (or few-shot prompting for small models), "
                                      "rounds of sampling until generate.num_questions questions survive cleaning. "
                                      "LLM responses are cached beside the output: a re-run costs nothing.",
                          formatter_class=fmt)
    _config_args(gen)
    gen.add_argument("-o", "--output", required=True, help="question-set JSON to write (the candidate pool)")
    gen.set_defaults(func=cmd_questions_generate)
    sel = qsub.add_parser("select", help="keep Q of a pool: by data (teacher answers), by the LLM, or at random",
                          description="select.method=data scores the pool with the configured teacher on "
                                      "select.images_per_class training images per class and writes a per-question "
                                      "report (.selection.csv, .selection.png) beside the output.",
                          formatter_class=fmt)
    sel.add_argument("--pool", required=True, help="candidate question set (from `makd questions generate`)")
    _config_args(sel)
    sel.add_argument("-o", "--output", required=True, help="question-set JSON to write")
    sel.set_defaults(func=cmd_questions_select)

    lab = sub.add_parser("label", help="score every (image, question) with a teacher into a label store",
                         description="Writes Parquet shards atomically; re-running resumes at the first missing shard.",
                         formatter_class=fmt)
    _config_args(lab)
    lab.add_argument("--shard", type=_shard, metavar="i/n", help="this worker's share (default: torchrun's RANK/WORLD_SIZE)")
    lab.add_argument("--overwrite", action="store_true", help="discard an existing store at labels.path")
    lab.set_defaults(func=cmd_label)

    ls = sub.add_parser("labels", help="check, export and import label stores", formatter_class=fmt)
    lsub = ls.add_subparsers(dest="labels_command", required=True, metavar="action")
    chk = lsub.add_parser("check", help="merge check: every sample covered exactly once; list missing shards",
                          description="Exit status 0 when the store is complete and consistent, 1 otherwise.")
    chk.add_argument("path", help="label store folder")
    chk.add_argument("--world-size", type=int, help="also say which rank (of a --shard i/n job) owes each missing shard")
    chk.set_defaults(func=cmd_labels_check)
    exp = lsub.add_parser("export", help="write the official {image_name: [p_1, ..., p_Q]} JSON")
    exp.add_argument("path", help="label store folder")
    exp.add_argument("-o", "--output", required=True, help="JSON file to write")
    exp.add_argument("--key", choices=["id", "name"], default="id",
                     help="image_name = the sample id (default; e.g. train/cat/1.jpg) or the file name (1.jpg)")
    exp.set_defaults(func=cmd_labels_export)
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
    pr.add_argument("-m", "--model", required=True, help="student .safetensors")
    pr.add_argument("images", nargs="+", help="image files (any format PIL reads)")
    pr.add_argument("-k", "--top-aspects", type=int, default=5, help="aspects to show per image (default 5)")
    pr.add_argument("--json", action="store_true", help="machine-readable output")
    pr.add_argument("--out-dir", default="predictions", help="detectors: where the drawn images go (default predictions/)")
    pr.add_argument("--score-threshold", type=float, default=0.5, help="detectors: boxes scoring at least this (default 0.5)")
    pr.set_defaults(func=cmd_predict)

    de = sub.add_parser("demo", help="the whole pipeline on the embedded offline default (Fashion-MNIST); "
                        "`makd demo detection`: the same for object detection on Fashion-MNIST canvases",
                        description="Questions -> bridge-teacher labels -> CE, MaKD and a permuted-target control over "
                                    "several seeds -> table, report.md and plots. Resumes where it stopped. "
                                    "`makd demo detection [key=value ...]` runs the detection default (per-box aspects, "
                                    "COCO mAP; output in runs/demo-detection).",
                        formatter_class=fmt)
    de.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    de.add_argument("--seeds", type=int, default=5, help="seeds per method (default 5)")
    de.add_argument("--no-progress", action="store_true", help="no progress bars")
    de.add_argument("--print-config", action="store_true", help="print the demo's config and exit")
    de.add_argument("overrides", nargs="*", metavar="key=value", help=OVERRIDES_HELP)
    de.set_defaults(func=cmd_demo)
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
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
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
