"""`makd label` with the hf teacher, files on disk to label store, against the same model's forward alone.

Does the teacher wait for the CPU? JPEG photos in a folder are labelled by the whole pipeline (`label_split`: the
label job's batches made in DataLoader workers — decoding, the processor's resizing and tiling, the prompt head —
then the model, then Parquet shards), and the same images, prepared beforehand in memory, are scored by the same
teacher object shard by shard (the forward alone: every image prefilled, every question tail scored; the reuse
check is off in both). Both arms run twice, alternately, so load changes hit them alike; the label
job without workers (everything in the scoring process) runs too, as the reference for what the workers hide.

Model: a randomly initialised SmolVLM-style Idefics3 (real architecture: a 512 px photo becomes 2x2 tiles of
`--tile` px plus a global view) whose language model has SmolLM2-135M's width, heads and vocabulary size with
`--layers` of its 30 layers, and a scaled-down vision tower (as benchmarks/teacher_scoring.py): small enough that
the CPU's decoding and processing are not negligible next to the forward, which is what the benchmark is about. Photos: the 20 ImageNet JPEGs of
the foolbox wheel (512 x 512), copied as often as `--images` asks.

With `--device cuda` it first checks the teacher on the GPU against the CPU (tiny models of three architectures:
Qwen2-VL packed with M-RoPE, Gemma 3 batched with sliding windows, Idefics3 tiled; float32, TF32 off), then runs
the pipeline there (bf16 by default): the GPU check of scripts/gpu_check.sh.
Last line: `pipeline_vs_forward=<x> pipeline_without_workers_vs_forward=<y>` (+ ` gpu_vs_cpu_max_diff=<d>` on CUDA).
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # tests/support: tiny random VLMs

import numpy as np  # noqa: E402
import torch  # noqa: E402
from support.random_models import build_random_vlm, save_random_vlm  # noqa: E402

from makd.config import resolve_path  # noqa: E402
from makd.data.base import file_split  # noqa: E402
from makd.labels import LabelStore, label_split  # noqa: E402
from makd.labels.inputs import shard_batches  # noqa: E402
from makd.questions import QuestionSet  # noqa: E402
from makd.teachers.hf_vlm import HFVLMTeacher  # noqa: E402

# Language models: SmolLM2-135M's shape (SmolVLM-256M's LM) and a tiny one with its vocabulary, for CPUs: small
# enough that decoding and processing the photos (~10 ms each on one core) are not negligible next to its forward.
LANGUAGE_MODELS = {
    "smollm2": {"hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9, "num_key_value_heads": 3,
                "vocab_size": 49152, "num_hidden_layers": 30},
    "tiny": {"hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 4, "num_key_value_heads": 2,
             "vocab_size": 49152, "num_hidden_layers": 4},
}
VISION = {"hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 4, "num_attention_heads": 4}
TINY_VISION = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}
CHECKED = ("qwen2_vl", "gemma3", "idefics3")  # the GPU check's architectures: packed + M-RoPE, batched, tiled
GPU_TOLERANCE = 1e-3  # max |log-odds difference|, float32: the reuse check's bound


def photos(folder: Path, n: int) -> list[Path]:
    spec = importlib.util.find_spec("foolbox")
    if spec is None:
        sys.exit("needs the foolbox wheel (make setup installs it): it carries the ImageNet photos")
    sources = sorted((Path(spec.submodule_search_locations[0]) / "data").glob("imagenet_*.jpg"))
    paths = []
    for i in range(n):
        paths.append(folder / f"photo{i:04d}.jpg")
        shutil.copyfile(sources[i % len(sources)], paths[-1])
    return paths


def questions(n: int, classes: list[str]) -> QuestionSet:
    texts = list(QuestionSet.load(resolve_path("makd:fashion_mnist/questions.json")).texts)[:n]
    return QuestionSet.model_validate({"classes": classes, "questions": [{"id": f"q{i}", "text": t}
                                                                         for i, t in enumerate(texts)]})


def forward_alone(teacher: HFVLMTeacher, prepared: list[list], qs: QuestionSet) -> float:
    """Seconds to score prepared shards (lists of prepared batches), as the label job calls the teacher."""
    start = time.perf_counter()
    for shard in prepared:
        teacher.start_shard()
        for batch in shard:
            teacher.score(batch, qs)
    return time.perf_counter() - start


def pipeline(teacher: HFVLMTeacher, split, qs: QuestionSet, shard_size: int, workers: int, out: Path,
             scoring: dict[str, float]) -> float:
    """Seconds of `makd label` (label_split); adds the seconds spent inside teacher.score to scoring[workers]."""
    shutil.rmtree(out, ignore_errors=True)
    score = teacher.score

    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return score(*args, **kwargs)
        finally:
            scoring[workers] = scoring.get(workers, 0.0) + time.perf_counter() - start

    teacher.score = timed
    try:
        start = time.perf_counter()
        label_split(split, teacher, qs, out, shard_size=shard_size, workers=workers, progress=False)
        return time.perf_counter() - start
    finally:
        del teacher.score


def gpu_check(device: str, folder: Path) -> float:
    """Largest |log-odds difference| of the teacher on `device` vs on the CPU, over three tiny architectures."""
    from PIL import Image

    rng = np.random.default_rng(0)
    images = [Image.fromarray((rng.random((40 + 8 * i, 56 - 8 * i, 3)) * 255).astype(np.uint8)) for i in range(3)]
    qs = questions(5, ["a", "b"])
    worst = 0.0
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        for arch in CHECKED:
            model = str(save_random_vlm(arch, folder / arch))
            scores = {d: HFVLMTeacher.from_options({"model": model, "device": d, "dtype": "float32", "question_batch": 2})
                      .score(images, qs).logodds for d in ("cpu", device)}
            diff = float(np.abs(scores[device] - scores["cpu"]).max())
            print(f"{arch}: {device} vs cpu, max |log-odds difference| {diff:.2e}", flush=True)
            worst = max(worst, diff)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto", help="auto: bfloat16 on CUDA, float32 on the CPU")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--questions", type=int, default=10)
    parser.add_argument("--model", choices=("tiny", "smollm2"), help="the language model and vision tower: tiny "
                        "(default on CPUs) or SmolLM2-135M's shape with a scaled-down SigLIP (default on GPUs)")
    parser.add_argument("--layers", type=int, help="language-model depth (default: the model's)")
    parser.add_argument("--tile", type=int, help="tile side in pixels (a 512 px photo becomes 2 x 2 tiles + a global "
                        "view; default 128 for tiny, 256 for smollm2)")
    parser.add_argument("--batch-size", type=int, default=8, help="teacher.batch_size: images per prefill")
    parser.add_argument("--shard-size", type=int, default=256, help="labels.shard_size (512 by default in makd)")
    parser.add_argument("--workers", type=int, default=1, help="DataLoader workers of the label job")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    args.model = args.model or ("smollm2" if args.device.startswith("cuda") else "tiny")
    args.tile = args.tile or {"tiny": 128, "smollm2": 256}[args.model]
    logging.getLogger("makd").setLevel(logging.ERROR)  # the random model's low answer mass warns every shard
    torch.manual_seed(0)
    if args.device == "cpu":
        torch.set_num_threads(1)  # one core for the model, one for the worker: what a 2-core machine offers

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        gpu_diff = gpu_check(args.device, tmp / "checked") if args.device.startswith("cuda") else None
        if gpu_diff is not None and gpu_diff > GPU_TOLERANCE:  # before spending minutes on the benchmark
            sys.exit(f"the teacher on {args.device} differs from the CPU by {gpu_diff:.2e} (> {GPU_TOLERANCE})")
        text = {**LANGUAGE_MODELS[args.model], **({"num_hidden_layers": args.layers} if args.layers else {})}
        model, processor = build_random_vlm("idefics3", text=text, vision=VISION if args.model == "smollm2" else
                                            TINY_VISION, image=args.tile, std=0.02)
        model.save_pretrained(tmp / "model")
        processor.save_pretrained(tmp / "model")
        del model
        (tmp / "photos").mkdir()
        paths = photos(tmp / "photos", args.images)
        split = file_split("train", tmp / "photos", paths, [i % 2 for i in range(len(paths))], ["a", "b"], "photos")
        qs = questions(args.questions, split.class_names)
        # No reuse check: on shards this small its full prompts (the image encoded once per question) would be most
        # of the work, in both arms alike; what is measured is the steady path of a shard.
        teacher = HFVLMTeacher.from_options({"model": str(tmp / "model"), "device": args.device, "dtype": args.dtype,
                                             "batch_size": args.batch_size, "question_batch": len(qs),
                                             "check_reuse": False})
        teacher.score(split.images(range(2)), qs)  # load, warm up (not timed)
        shards = [range(s, min(s + args.shard_size, len(split))) for s in range(0, len(split), args.shard_size)]
        start = time.perf_counter()
        prepared = [[b.inputs["images"] for b in shard_batches(split, rows, teacher)] for rows in shards]
        preparing = time.perf_counter() - start  # decoding + the processor, in this process
        tokens = prepared[0][-1].head["input_ids"].shape[1]
        times = {"forward": 0.0, "pipeline": 0.0, "without_workers": 0.0}
        scoring: dict[int, float] = {}
        for r in range(args.rounds):
            times["forward"] += forward_alone(teacher, prepared, qs)
            times["pipeline"] += pipeline(teacher, split, qs, args.shard_size, args.workers, tmp / "labels", scoring)
            times["without_workers"] += pipeline(teacher, split, qs, args.shard_size, 0, tmp / "labels", scoring)
            print(f"round {r + 1}: " + ", ".join(f"{k} {v:.1f}s" for k, v in times.items()) + " (cumulative)",
                  file=sys.stderr, flush=True)
        stored = LabelStore.open(tmp / "labels").read()[1]
        direct = np.concatenate([teacher.score(b, qs).logodds for shard in prepared for b in shard])
        same = float(np.abs(stored - direct).max())
        counters = teacher.counters()

    n = args.rounds * len(split)
    print(f"model: Idefics3 (SmolVLM-style), random init, language model {args.model} ({text['num_hidden_layers']} "
          f"layers of width {text['hidden_size']}); prompt head {tokens} tokens (5 tiles of {args.tile} px); "
          f"Q = {len(qs)}; {len(split)} JPEG "
          f"photos, shards of {args.shard_size}, teacher.batch_size {args.batch_size}, {args.workers} worker(s); "
          f"{args.device}, {teacher.dtype}, torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    print("| path | images / s | vs forward |")
    print("|---|---|---|")
    for key, name in (("forward", "the teacher's forward on prepared inputs"),
                      ("pipeline", f"makd label, {args.workers} DataLoader worker(s)"),
                      ("without_workers", "makd label, no workers (decoding and processor in the scoring process)")):
        print(f"| {name} | {n / times[key]:.2f} | {times['forward'] / times[key]:.2f} |")
    print(f"decoding + processor alone: {preparing / len(split) * 1000:.0f} ms per image; the forward: "
          f"{times['forward'] / n * 1000:.0f} ms per image; makd label with {args.workers} worker(s) spent "
          f"{(times['pipeline'] - scoring[args.workers]) / n * 1000:.1f} ms per image outside teacher.score (waiting "
          f"for inputs, writing shards), without workers {(times['without_workers'] - scoring[0]) / n * 1000:.1f} ms")
    print(f"stored targets vs the forward on prepared inputs: max |log-odds difference| {same:.1e}; teacher counters "
          f"{counters}")
    last = (f"pipeline_vs_forward={times['forward'] / times['pipeline']:.2f} "
            f"pipeline_without_workers_vs_forward={times['forward'] / times['without_workers']:.2f}")
    print(last + (f" gpu_vs_cpu_max_diff={gpu_diff:.1e}" if gpu_diff is not None else ""))


if __name__ == "__main__":
    main()
