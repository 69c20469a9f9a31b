"""Which ImageNet classes should the offline bridge teacher route questions through? `vocabulary: dataset`
(the ImageNet classes nearest to each dataset class name) against `vocabulary: imagenet` (all 1,000), measured
as agreement of the teacher's class-level answers with hand-written ones (`makd.report.teacher.teacher_quality`:
mean per-question correlation over classes, questions pointing the wrong way).

Data: Fashion-MNIST (50 training images per class, its 40 built-in questions with hand-written answers), and 60
natural photos that ship in the `foolbox` wheel (20 each of ImageNet, CIFAR-10 and CIFAR-100, labelled in their
file names), grouped two ways with 12 questions and hand-written answers below:
  fine:   11 everyday names (dog, bird, cat, frog, car, ship, airplane, fruit, flower, insect, horse);
  coarse: 5 newcomer-style names (animal, vehicle, plant, object, landscape).
The images are scored once; both vocabularies answer from the same ImageNet logits. Also printed, per dataset:
the mean over classes of the cosine between a class name and its nearest ImageNet class (the teacher's
`stand_ins`), the criterion `vocabulary: auto` decides by.

    .venv/bin/python benchmarks/bridge_vocabulary.py
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
from PIL import Image

from makd.config import resolve_path
from makd.data.base import per_class_sample
from makd.data.fashion_mnist import load_fashion_mnist
from makd.questions import QuestionSet
from makd.report.teacher import teacher_quality
from makd.teachers.bridge import BridgeTeacher

# foolbox file -> (fine class, coarse class); files not listed are left out (digits, Fashion-MNIST).
PHOTOS = {
    "imagenet_00_243": ("dog", "animal"), "imagenet_16_251": ("dog", "animal"), "cifar10_12_5": ("dog", "animal"),
    "cifar10_16_5": ("dog", "animal"), "cifar100_17_97": ("dog", "animal"),
    "imagenet_14_129": ("bird", "animal"), "imagenet_15_99": ("bird", "animal"), "imagenet_17_22": ("bird", "animal"),
    "cifar10_00_3": ("cat", "animal"), "cifar10_08_3": ("cat", "animal"), "cifar100_15_43": ("cat", "animal"),
    "cifar10_04_6": ("frog", "animal"), "cifar10_05_6": ("frog", "animal"), "cifar10_07_6": ("frog", "animal"),
    "cifar10_19_6": ("frog", "animal"),
    "imagenet_06_609": ("car", "vehicle"), "imagenet_07_609": ("car", "vehicle"), "cifar10_06_1": ("car", "vehicle"),
    "cifar10_09_1": ("car", "vehicle"), "cifar10_11_9": ("car", "vehicle"), "cifar10_14_9": ("car", "vehicle"),
    "cifar10_01_8": ("ship", "vehicle"), "cifar10_02_8": ("ship", "vehicle"), "cifar10_15_8": ("ship", "vehicle"),
    "cifar10_18_8": ("ship", "vehicle"), "cifar10_03_0": ("airplane", "vehicle"), "cifar10_10_0": ("airplane", "vehicle"),
    "imagenet_04_949": ("fruit", "plant"), "cifar100_09_0": ("fruit", "plant"), "cifar100_19_53": ("fruit", "plant"),
    "cifar100_05_92": ("flower", "plant"), "cifar100_16_92": ("flower", "plant"), "cifar100_18_70": ("flower", "plant"),
    "imagenet_18_317": ("insect", "animal"), "imagenet_19_305": ("insect", "animal"), "cifar100_07_14": ("insect", "animal"),
    "cifar10_13_7": ("horse", "animal"), "cifar10_17_7": ("horse", "animal"),
    "imagenet_03_990": (None, "plant"), "cifar100_03_51": (None, "plant"),
    "imagenet_01_559": (None, "object"), "imagenet_02_438": (None, "object"), "imagenet_09_455": (None, "object"),
    "imagenet_10_541": (None, "object"), "imagenet_11_630": (None, "object"), "imagenet_12_741": (None, "object"),
    "cifar100_14_40": (None, "object"),
    "cifar100_00_49": (None, "landscape"), "cifar100_01_33": (None, "landscape"), "cifar100_04_71": (None, "landscape"),
    "cifar100_10_71": (None, "landscape"), "cifar100_08_23": (None, "landscape"), "imagenet_05_853": (None, "landscape"),
}
FINE = ["dog", "bird", "cat", "frog", "car", "ship", "airplane", "fruit", "flower", "insect", "horse"]
COARSE = ["animal", "vehicle", "plant", "object", "landscape"]
# question -> hand-written answers (1 yes, 0 no, 0.5 depends) for the fine classes, then for the coarse ones.
QUESTIONS = {
    "Does it have fur?": ([1, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1], [0.5, 0, 0, 0, 0]),
    "Does it have feathers?": ([0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0], [0.5, 0, 0, 0, 0]),
    "Does it have wheels?": ([0, 0, 0, 0, 1, 0, 0.5, 0, 0, 0, 0], [0, 1, 0, 0, 0]),
    "Does it float on water?": ([0, 0.5, 0, 0.5, 0, 1, 0, 0, 0, 0, 0], [0.5, 0.5, 0, 0, 0]),
    "Does it have wings?": ([0, 1, 0, 0, 0, 0, 1, 0, 0, 1, 0], [0.5, 0.5, 0, 0, 0]),
    "Can it be eaten?": ([0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0], [0, 0, 0.5, 0, 0]),
    "Does it have petals?": ([0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0], [0, 0, 0.5, 0, 0]),
    "Is it made of metal?": ([0, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0], [0, 1, 0, 0.5, 0]),
    "Does it walk on four legs?": ([1, 0, 1, 1, 0, 0, 0, 0, 0, 0, 1], [0.5, 0, 0, 0, 0]),
    "Is it a living thing?": ([1, 1, 1, 1, 0, 0, 0, 0.5, 1, 1, 1], [1, 0, 1, 0, 0.5]),
    "Does it have eyes?": ([1, 1, 1, 1, 0, 0, 0, 0, 0, 1, 1], [1, 0, 0, 0, 0]),
    "Can it carry people?": ([0, 0, 0, 0, 1, 1, 1, 0, 0, 0, 1], [0.5, 1, 0, 0, 0]),
}


def question_set(classes: list[str], column: int) -> QuestionSet:
    return QuestionSet.model_validate({"classes": classes, "questions": [
        {"id": f"q{j:02d}", "text": text, "class_answers": dict(zip(classes, answers[column]))}
        for j, (text, answers) in enumerate(QUESTIONS.items())]})


def natural_photos() -> tuple[list[Image.Image], list[str]]:
    spec = importlib.util.find_spec("foolbox")
    folder = Path(spec.submodule_search_locations[0]) / "data"
    files = {p.stem: p for p in folder.iterdir()}
    names = sorted(PHOTOS)
    return [Image.open(files[n]).convert("RGB") for n in names], names


def measure(name: str, logits: np.ndarray, targets: np.ndarray, questions: QuestionSet) -> None:
    for vocabulary in ("dataset", "imagenet"):
        teacher = BridgeTeacher(BridgeTeacher.Options(vocabulary=vocabulary))
        p = np.clip(teacher.p_yes_from_logits(logits, questions), 1e-4, 1 - 1e-4)
        q = teacher_quality(questions, np.log(p) - np.log1p(-p), targets)
        closeness = np.mean([s[0]["cosine"] for s in teacher.stand_ins(questions.classes).values()])
        print(f"{name:14s} {len(targets):4d} images {len(questions.classes):3d} classes  vocabulary {vocabulary:8s}  "
              f"mean r {q['mean_correlation']:+.3f}  wrong way {q['wrong_way']:2d}/{q['num_scored']:2d}  "
              f"spread {q['mean_spread']:.3f}  name closeness {closeness:.3f}")


def main() -> None:
    teacher = BridgeTeacher()
    photos, names = natural_photos()
    photo_logits = teacher.image_logits(photos)
    for column, classes in ((0, FINE), (1, COARSE)):
        keep = [i for i, n in enumerate(names) if PHOTOS[n][column] is not None]
        targets = np.array([classes.index(PHOTOS[names[i]][column]) for i in keep])
        measure(f"photos-{'fine' if column == 0 else 'coarse'}", photo_logits[keep], targets, question_set(classes, column))
    train = load_fashion_mnist("train")
    sample = train.subset(per_class_sample(train.targets, 50, np.random.default_rng(0)))
    fmnist = QuestionSet.load(resolve_path("makd:fashion_mnist/questions.json"))
    logits = np.concatenate([teacher.image_logits(sample.images(range(i, min(i + 64, len(sample)))))
                             for i in range(0, len(sample), 64)])
    measure("fashion-mnist", logits, sample.targets, fmnist)


if __name__ == "__main__":
    main()
