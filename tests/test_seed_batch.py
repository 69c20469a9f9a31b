"""K seeds trained as one stacked model end where K separate runs end (within float tolerance)."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from conftest import label_tiny_splits
from safetensors.torch import load_file

from makd.config import ModelConfig, load_config
from makd.engine import train
from makd.engine.seed_batch import SeedBatchTask, group_config, train_seeds
from makd.engine.trainer import Trainer, lr_at
from makd.errors import MakdError
from makd.models import build_student
from makd.models.stacked import stack_students

TINY = ["data.train_per_class=4", "data.val_per_class=2", "data.test_per_class=3", "model.width=4",
        "train.epochs=3", "train.eval_every=1", "train.batch_size=8", "train.progress=false", "train.tensorboard=false"]


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    return label_tiny_splits(tmp_path_factory.mktemp("seed-batch-labels"), TINY, questions=3)


def configs(root, labelled, seeds, extra=()):
    return [load_config(overrides=TINY + [f"questions={labelled / 'q.json'}", f"labels.path={labelled / 'labels'}",
                                          f"out={root / f'run-s{s}'}", f"name=run-s{s}", f"train.seed={s}", *extra])
            for s in seeds]


@pytest.mark.parametrize("head", ["linear", "mlp"])
def test_stacked_students_compute_each_member(head):
    torch.manual_seed(0)
    students = [build_student(ModelConfig(name="resnet8", width=4, aspect_head=head), 1, 5, 3, (0.3,), (0.2,))
                for _ in range(3)]
    stacked = stack_students(students).eval()
    x = torch.rand(3, 2, 1, 28, 28)
    out = stacked(x)
    for k, s in enumerate(students):
        ref = s.eval()(x[k])
        torch.testing.assert_close(out.class_logits[k], ref.class_logits, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(out.aspect_logits[k], ref.aspect_logits, atol=1e-5, rtol=1e-4)
        state = stacked.member_state(k)
        assert state.keys() == s.state_dict().keys()
        for name, value in s.state_dict().items():
            torch.testing.assert_close(state[name], value)


def test_layers_that_mix_members_are_refused():
    class Mixer(torch.nn.Module):
        def forward(self, x):
            return x - x.mean(dim=1, keepdim=True)  # mixes channels, hence members

    students = [build_student(ModelConfig(name="resnet8", width=4), 1, 5, 0, (0.3,), (0.2,)) for _ in range(2)]
    for s in students:
        s.backbone.stem.append(Mixer())
    with pytest.raises(MakdError, match="cannot reproduce"):
        stack_students(students)


def test_a_step_of_the_batch_is_each_runs_step(tmp_path, labelled):
    """Same initialisation, batches (order, augmentation, targets), losses and optimiser update as each run alone."""
    members = configs(tmp_path, labelled, [0, 1, 2])
    singles = [Trainer(c) for c in members]
    group = Trainer(group_config(members), task=lambda c, d, di: SeedBatchTask(c, d, di, members=members))
    for k, single in enumerate(singles):
        for name, value in single.model.state_dict().items():
            assert torch.equal(group.model.member_state(k)[name], value), name
    batches = [next(iter(s.task.batches(0, 8, 0))) for s in singles]
    stacked = next(iter(group.task.batches(0, 8, 0)))
    for k, b in enumerate(batches):
        assert torch.equal(stacked.images[k], b.images) and torch.equal(stacked.targets[k].labels, b.targets.labels)
        assert torch.equal(stacked.targets[k].aspect_logodds, b.targets.aspect_logodds)
    lr = lr_at(members[0], 0, singles[0].steps_per_epoch)
    values = group.step_values(*group.train_step(stacked, lr))
    for k, (single, batch) in enumerate(zip(singles, batches)):
        one = single.step_values(*single.train_step(batch, lr))
        assert values[f"loss_ce@{k}"] == pytest.approx(one["loss_ce"], rel=1e-6)
        assert values[f"loss_aspect_bce@{k}"] == pytest.approx(one["loss_aspect_bce"], rel=1e-6)
        assert values[f"correct@{k}"] == one["correct"]
        state = group.model.member_state(k)
        for name, value in single.model.state_dict().items():  # weight decay, momentum: the same update
            torch.testing.assert_close(state[name], value, atol=1e-6, rtol=1e-5, msg=lambda m: f"{k} {name}: {m}")


def test_batched_seeds_end_where_separate_runs_end(tmp_path, labelled):
    """Whole runs: ReLU networks amplify float rounding chaotically (the same run with 1 or 2 threads ends ~1e-2
    apart in some weights), so the batch is held to the runs' losses and results, not to their last bits."""
    two_epochs = ["train.epochs=2"]  # 2 seeds x 2 epochs: the batch's epochs, validations, tests and files, at least cost
    separate = [train(c) for c in configs(tmp_path / "separate", labelled, [0, 1], two_epochs)]
    batched = train_seeds(configs(tmp_path / "batched", labelled, [0, 1], two_epochs))
    assert [r["seed"] for r in batched] == [0, 1] and [r["name"] for r in batched] == ["run-s0", "run-s1"]
    for s, (one, many) in enumerate(zip(separate, batched)):
        folder_a, folder_b = tmp_path / "separate" / f"run-s{s}", tmp_path / "batched" / f"run-s{s}"
        rows_a = list(csv.DictReader((folder_a / "metrics.csv").open()))
        rows_b = list(csv.DictReader((folder_b / "metrics.csv").open()))
        assert [r["epoch"] for r in rows_b] == [r["epoch"] for r in rows_a] and set(rows_b[0]) == set(rows_a[0])
        for ra, rb in zip(rows_a, rows_b):
            for key in ("loss", "loss_ce", "loss_aspect_bce"):
                assert float(rb[key]) == pytest.approx(float(ra[key]), rel=1e-3), (s, ra["epoch"], key)
        for key in ("val_top1_best", "test_top1_best", "test_top1_last"):  # at most one image apart
            assert abs(many[key] - one[key]) <= 100 / 20 + 1e-9, (s, key)
        saved = json.loads((folder_b / "results.json").read_text())
        assert saved == many and saved["aspect_agreement_best"]["num_images"] == 30
        assert load_file(folder_b / "best.safetensors").keys() == load_file(folder_a / "best.safetensors").keys()
        assert load_config(folder_b / "config.yaml") == load_config(folder_a / "config.yaml").model_copy(
            update={"out": str(folder_b)})
    # Finished members are not trained again.
    assert train_seeds(configs(tmp_path / "batched", labelled, [0, 1], two_epochs)) == []


def test_members_must_differ_only_in_the_seed(tmp_path, labelled):
    a, b = configs(tmp_path, labelled, [0, 1])
    b = load_config(base=b.model_dump(mode="json"), overrides=["optim.lr=0.2"])
    with pytest.raises(MakdError, match=r"differs from run-s0 in more than the seed \(optim\)"):
        group_config([a, b])
    with pytest.raises(MakdError, match="dropout"):
        group_config(configs(tmp_path, labelled, [0, 1], ["model.drop_rate=0.1"]))
