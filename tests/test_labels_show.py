"""`makd labels show`: the teacher's answers per image and per class, its agreement with hand-written class
answers, a heatmap; light commands start without torch."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import yaml
from conftest import PixelTeacher
from PIL import Image

from makd.cli import main
from makd.config import load_config
from makd.labels import label_split, samples_to_label
from makd.labels.show import read_answers
from makd.labels.store import LabelStore
from makd.questions import QuestionSet

CLASSES = ["Sandal", "T-shirt_top", "Trouser"]


@pytest.fixture(scope="module")
def labelled(tmp_path_factory, tiny_imagefolder):
    """A config (relative paths), a question set with hand-written answers and a store of the pixel teacher."""
    root = tmp_path_factory.mktemp("show")
    QuestionSet.model_validate({"classes": CLASSES, "questions": [
        {"id": "bright", "text": "Is the item bright?", "class_answers": {"Sandal": 0, "T-shirt_top": 1, "Trouser": 0.5}},
        {"id": "feet", "text": "Is it worn on the feet?", "class_answers": {"Sandal": 1, "T-shirt_top": 0, "Trouser": 0}},
        {"id": "legs", "text": "Does it have two legs?", "class_answers": {"Sandal": 0, "T-shirt_top": 0, "Trouser": 1}},
    ]}).save(root / "q.json")
    (root / "c.yaml").write_text(yaml.safe_dump({
        "questions": "q.json", "labels": {"path": "labels", "splits": ["train", "test"]},
        "data": {"dataset": "imagefolder", "root": str(tiny_imagefolder), "val_per_class": 0}}))
    config = load_config(root / "c.yaml")
    label_split(samples_to_label(config), PixelTeacher(), QuestionSet.load(root / "q.json"), root / "labels",
                shard_size=8, progress=False)
    return root


def test_per_image_and_per_class_answers(labelled, capsys, tmp_path):
    assert main(["labels", "show", str(labelled / "labels"), "-c", str(labelled / "c.yaml"), "--images", "3",
                 "--answers", "1", "--plot", str(tmp_path / "answers.png")]) == 0
    out = capsys.readouterr()
    store = LabelStore.open(labelled / "labels")
    answers = read_answers(store, load_config(labelled / "c.yaml"))
    p_yes = 1 / (1 + np.exp(-store.read()[1].astype(np.float64)))
    # One image of each class, each with its most confident yes and its clearest no.
    shown = [line for line in out.out.splitlines() if line.startswith(("train/", "test/"))]
    assert [s.split(" [")[1].rstrip("]") for s in shown] == CLASSES
    first = answers.ids.index(shown[0].split(" ")[0])
    lines = out.out.splitlines()
    at = lines.index(shown[0])
    best, worst = int(p_yes[first].argmax()), int(p_yes[first].argmin())
    assert lines[at + 1].endswith(answers.questions[best]) and f"{p_yes[first, best]:.2f}" in lines[at + 1]
    assert lines[at + 2].endswith(answers.questions[worst]) and f"{p_yes[first, worst]:.2f}" in lines[at + 2]
    # The per-class table holds the class means of P(yes).
    header = next(line for line in lines if line.startswith("mean P(yes) per class"))
    assert header.split()[-3:] == CLASSES
    row = next(line for line in lines if line.startswith("Is it worn on the feet?"))
    expected = [p_yes[answers.targets == c, 1].mean() for c in range(3)]
    assert [float(v) for v in row.split()[-3:]] == pytest.approx(expected, abs=0.006)
    assert "correlate" in out.out and "hand-written" in out.out
    with Image.open(tmp_path / "answers.png") as img:
        assert img.size[0] > 200 and img.size[1] > 100


def test_without_a_config_the_classes_are_unknown(labelled, capsys):
    ids = LabelStore.open(labelled / "labels").read()[0]
    assert main(["labels", "show", str(labelled / "labels"), "--ids", ids[-1], ids[0]]) == 0
    out = capsys.readouterr().out
    assert [line for line in out.splitlines() if line.startswith(("train/", "test/"))] == [ids[-1], ids[0]]
    assert "give the store's config (-c my.yaml)" in out and "mean P(yes) per class" not in out


def test_a_weak_teacher_is_reported_with_a_warning(labelled, caplog):
    from makd.labels.show import label_report

    config = load_config(labelled / "c.yaml")
    store = LabelStore.open(labelled / "labels")
    with caplog.at_level("WARNING", logger="makd.labels"):
        lines = label_report(config, store)
    # The pixel teacher knows nothing of sandals and legs: its answers cannot agree with the hand-written ones.
    assert lines and lines[0].startswith("Against the hand-written per-class answers")
    assert any("the teacher's answers look weak" in r.getMessage() for r in caplog.records)


LIGHT = [["--help"], ["questions", "show", "makd:fashion_mnist/questions.json"],
         ["questions", "import", "{q_txt}", "--classes", "a,b", "-o", "{tmp}/q.json"],
         ["labels", "check", "{store}"], ["labels", "status", "{store}"], ["labels", "show", "{store}", "-c", "{config}", "--plot", "{tmp}/h.png"],
         ["labels", "export", "{store}", "-o", "{tmp}/t.json"], ["train", "-c", "{config}", "--print-config"]]


@pytest.mark.parametrize("argv", LIGHT, ids=lambda a: " ".join(a[:2]))
def test_light_commands_do_not_import_torch(labelled, tmp_path, argv):
    (tmp_path / "q.txt").write_text("Is the item red in colour?\nIs the object round in shape?\n")
    argv = [a.format(q_txt=tmp_path / "q.txt", tmp=tmp_path, store=labelled / "labels", config=labelled / "c.yaml")
            for a in argv]
    code = ("import sys\nfrom makd.cli import main\ntry:\n    code = main(sys.argv[1:])\nexcept SystemExit as e:\n"
            "    code = e.code\nprint('TORCH' if 'torch' in sys.modules else 'NO-TORCH', code)")
    proc = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=300)
    assert proc.stdout.strip().splitlines()[-1] == "NO-TORCH 0", proc.stdout[-2000:] + proc.stderr[-2000:]


def test_every_key_of_the_config_is_printed_with_its_meaning(labelled, capsys, tmp_path):
    from makd.config import Config, to_dict
    from makd.data.config import Section

    assert main(["label", "-c", str(labelled / "c.yaml"), "--print-config", "train.epochs=7"]) == 0
    printed = capsys.readouterr().out
    (tmp_path / "printed.yaml").write_text(printed)
    config = load_config(labelled / "c.yaml", ["train.epochs=7"])
    assert load_config(tmp_path / "printed.yaml") == config  # it is the resolved config, reloadable as is

    def keys(data: dict, prefix: str = "") -> set[str]:
        return {k for name, v in data.items() for k in
                (keys(v, f"{prefix}{name}.") if isinstance(v, dict) and name not in ("teacher", "loss") else {prefix + name})}

    assert keys(yaml.safe_load(printed)) == keys(to_dict(Config())) | {"loss"}

    def described(model, prefix=""):
        for name, field in model.model_fields.items():
            if isinstance(field.annotation, type) and issubclass(field.annotation, Section):
                yield from described(field.annotation, f"{prefix}{name}.")
            else:
                yield prefix + name, field.description

    for key, description in described(Config):
        assert description, f"{key} has no description"
        assert f"# {description}" in printed, key
    assert yaml.safe_load(printed)["questions"] == str(labelled / "q.json")  # relative to the config file


def test_demo_prints_its_whole_resolved_config(capsys):
    assert main(["demo", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["data"]["train_per_class"] == 20 and printed["data"]["val_fraction"] == 0.1
    assert printed["train"]["wandb_project"] == "makd"  # a key the demo's own YAML does not set


def test_questions_select_help_lists_its_methods(capsys):
    with pytest.raises(SystemExit):
        main(["questions", "select", "--help"])
    out = capsys.readouterr().out
    for method in ("data", "llm", "random"):
        assert any(line.strip().startswith(f"{method} ") for line in out.splitlines()), method
