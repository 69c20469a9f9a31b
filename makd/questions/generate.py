"""`makd questions generate`: an LLM writes candidate yes/no questions from the class names alone.

Rounds of sampling continue until N candidates survive cleaning (makd/questions/clean.py) or the round budget
is spent. Two prompt styles:
- `paper`: the paper's generation instruction, as a chat turn (for instruction-following models);
- `few_shot`: a completion prompt with worked examples from another domain, each round focused on one class
  ("questions that tell a sandal apart from the other classes"), which small models like the embedded
  SmolLM2-135M follow far better than instructions.
Everything the LLM said is kept beside the accepted set, with the verdict on every line.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from makd.atomic import write_json
from makd.config import Config
from makd.errors import MakdError
from makd.questions.clean import Candidate, clean
from makd.questions.llm import Prompt, TextLLM
from makd.questions.questionset import QuestionSet

log = logging.getLogger("makd.questions")

PAPER_PROMPT = ("The dataset consists of {C} classes and {M} images. The class list is as follows: {CLASSES}, "
                "Generate {N} feature-specific yes or no questions, focusing on clear and distinct aspects of the "
                "objects in the images in the dataset.")
FEW_SHOT_EXAMPLES = """\
Dataset: photos of animals and vehicles. Classes: airplane, automobile, bird, cat, deer, dog, frog, horse, ship, truck
Yes/no questions about visible features that tell a cat apart from the other classes:
1. Does the object have fur?
2. Does the object have whiskers?
3. Is the object smaller than a person?
4. Does the object have pointed ears?
5. Is the object a living animal?
6. Does the object have wheels?

Dataset: photos of kitchen tools. Classes: fork, knife, spoon, pan, kettle, cup, plate, bowl
Yes/no questions about visible features that tell a kettle apart from the other classes:
1. Does the object have a spout?
2. Does the object have a handle?
3. Is the object made of metal?
4. Does the object have a lid?
5. Is the object used to heat water?
6. Is the object flat?
"""


def build_prompt(style: str, classes: list[str], n: int, num_images: int, description: str | None,
                 focus: str) -> Prompt:
    names = ", ".join(classes)
    if style == "paper":
        text = PAPER_PROMPT.format(C=len(classes), M=num_images, CLASSES=names, N=n)
        if description:
            text = f"{description.rstrip('.')}. {text}"
        return [{"role": "user", "content": text}]
    dataset = description.rstrip(".") if description else "photos of objects"
    return (f"{FEW_SHOT_EXAMPLES}\nDataset: {dataset}. Classes: {names}\n"
            f"Yes/no questions about visible features that tell a {focus} apart from the other classes:\n1.")


def resolved_style(style: str, llm: TextLLM) -> str:
    if style != "auto":
        return style
    return "few_shot" if llm.options.backend == "smollm2" else "paper"


def generate_questions(classes: list[str], llm: TextLLM, *, n: int, num_images: int, description: str | None = None,
                       style: str = "auto", samples: int = 4, max_rounds: int = 12, seed: int = 0,
                       similarity: float = 0.9, progress: bool = True) -> tuple[QuestionSet, dict[str, Any]]:
    """(candidate question set, raw log: every response and every candidate's verdict)."""
    from makd import embeddings

    style = resolved_style(style, llm)
    accepted: list[Candidate] = []
    responses: list[dict[str, Any]] = []
    candidates: list[Candidate] = []
    with tqdm(total=n, desc="questions", unit="q", disable=not progress) as bar:
        for round_no in range(max_rounds):
            focus = classes[round_no % len(classes)]
            prompt = build_prompt(style, classes, n, num_images, description, focus)
            texts = llm.generate(prompt, samples, seed=seed * 100_003 + round_no)
            origin = [f"round {round_no + 1} sample {j + 1}" for j in range(len(texts))]
            responses += [{"origin": o, "focus": focus if style == "few_shot" else None, "text": t} for o, t in zip(origin, texts)]
            result = clean(list(zip(origin, texts)), classes, embed=embeddings.encode, similarity=similarity,
                           already=[c.text for c in accepted])
            candidates += result.candidates
            accepted += [c for c in result.candidates if c.accepted]
            bar.update(min(n, len(accepted)) - bar.n)
            if len(accepted) >= n:
                break
    if not accepted:
        raise MakdError(f"the LLM produced no usable question in {max_rounds} rounds (see the candidates file): "
                        "try generate.style, a larger model, or more rounds")
    if len(accepted) < n:
        log.warning("only %d of %d questions after %d rounds (generate.max_rounds)", len(accepted), n, max_rounds)
    kept = accepted[:n]
    width = len(str(len(kept)))
    generation = {
        "source": "llm", "llm": llm.describe(), "style": style,
        "prompt": PAPER_PROMPT if style == "paper" else "few-shot completion (makd/questions/generate.py)",
        "example_prompt": build_prompt(style, classes, n, num_images, description, classes[0]),
        "requested": n, "accepted": len(kept), "rounds": round_no + 1, "samples_per_round": samples, "seed": seed,
        "candidates_seen": len(candidates),
        "rejected": dict(sorted(_counts(candidates).items(), key=lambda kv: -kv[1])),
    }
    qs = QuestionSet.model_validate({
        "name": "generated", "classes": classes, "dataset": {"description": description, "num_images": num_images},
        "generation": generation,
        "questions": [{"id": f"g{i + 1:0{width}d}", "text": c.text, "source": c.origin} for i, c in enumerate(kept)],
    })
    return qs, {"responses": responses, "candidates": [c.to_dict() for c in candidates]}


def _counts(candidates: list[Candidate]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for c in candidates:
        if not c.accepted:
            counts[c.reason] = counts.get(c.reason, 0) + 1
    return counts


def candidates_path(output: Path) -> Path:
    return output.with_name(output.stem + ".candidates.json")


def generate_from_config(config: Config, output: str | Path) -> QuestionSet:
    """Class names (and image count) from the configured dataset; writes the set and its candidates log."""
    from makd.data import build_splits

    output = Path(output)
    train = build_splits(config.data, needed=("train",))["train"]
    g = config.generate
    llm = TextLLM.from_options(g.llm, cache=output.with_name(output.stem + ".llm-cache.json"))
    qs, log_ = generate_questions(train.class_names, llm, n=g.num_questions, num_images=len(train),
                                  description=g.description, style=g.style, samples=g.samples,
                                  max_rounds=g.max_rounds, seed=g.seed, similarity=g.similarity,
                                  progress=config.train.progress)
    write_json(candidates_path(output), log_)
    qs.save(output)
    return qs
