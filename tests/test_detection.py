"""Detection: data (COCO reader, canvases), aligned augmentations, the per-box aspect heads and their loss, stock
torchvision equivalence, mAP backends, box-crop labelling, the epoch's batches, and training through the loop."""

from __future__ import annotations

import copy
import csv
import json
import math
import re

import numpy as np
import pytest
import torch
from conftest import PixelTeacher, make_question_set
from safetensors.torch import load_file
from torch.nn import functional as F
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.models.detection.roi_heads import RoIHeads

from makd.config import load_config
from makd.detection.crops import box_crops, concat_crops, crop_box
from makd.detection.data import build_detection_splits, make_canvases, read_coco, write_coco
from makd.detection.heads import aspect_box_loss
from makd.detection.metrics import map_faster_coco_eval, map_torchmetrics
from makd.detection.models import DetectorOptions, build_detector, ground_truth_aspects
from makd.detection.pipeline import AUGMENTATIONS, augment_sample, build_augment, epoch_batches
from makd.engine import train
from makd.engine.trainer import Trainer
from makd.errors import MakdError
from makd.labels import LabelStore, label_split

CANVASES = ["task=detection", "detection.canvases={train: 12, val: 6, test: 6}", "train.progress=false", "train.threads=1",
            "train.tensorboard=false", "train.batch_size=4", "train.eval_every=1", "optim.lr=0.01", "train.eval_batch_size=8"]


@pytest.fixture(scope="module")
def canvases(tmp_path_factory):
    """Overrides for a config on 24 small canvases (written once for the module)."""
    return CANVASES + [f"detection.root={tmp_path_factory.mktemp('canvases') / 'c'}"]


def one_image_target(q: int = 3, boxes=((10.0, 12.0, 50.0, 60.0), (70.0, 20.0, 110.0, 90.0))) -> dict[str, torch.Tensor]:
    n = len(boxes)
    return {"boxes": torch.tensor(boxes), "labels": torch.arange(1, n + 1),
            "aspect_logodds": torch.linspace(-2, 2, n * q).view(n, q), "aspect_mass": torch.ones(n, q),
            "aspect_weight": torch.ones(n, q)}


# -- the aspect loss ------------------------------------------------------------------------------------------
def test_aspect_loss_golden_value():
    """Two images: positives matched to boxes 1, 0 and 1 (one box without a teacher row), T = 2, mass weighting."""
    targets = [{"aspect_logodds": torch.tensor([[2.0, -2.0], [0.0, 4.0]]), "aspect_mass": torch.tensor([[1.0, 0.5], [1.0, 1.0]]),
                "aspect_weight": torch.ones(2, 2)},
               {"aspect_logodds": torch.tensor([[1.0, 1.0]]), "aspect_mass": torch.ones(1, 2), "aspect_weight": torch.zeros(1, 2)}]
    logits = torch.tensor([[0.5, -1.0], [1.0, 0.0], [3.0, 3.0]])
    matched = [torch.tensor([1, 0]), torch.tensor([0])]

    def bce(z: float, t: float) -> float:
        p = 1 / (1 + math.exp(-t))
        return -(p * math.log(1 / (1 + math.exp(-z))) + (1 - p) * math.log(1 - 1 / (1 + math.exp(-z))))

    # Row 0: box 1 of image 0 (targets 0/2, 4/2); row 1: box 0 (2/2, -2/2, mass 1, 0.5); row 2 weighs 0.
    plain = (bce(0.5, 0.0) + bce(-1.0, 2.0) + bce(1.0, 1.0) + bce(0.0, -1.0)) / 4
    weighted = (bce(0.5, 0.0) + bce(-1.0, 2.0) + bce(1.0, 1.0) + 0.5 * bce(0.0, -1.0)) / 3.5
    assert aspect_box_loss(logits, matched, targets, temperature=2.0).item() == pytest.approx(plain, rel=1e-6)
    assert aspect_box_loss(logits, matched, targets, temperature=2.0, mass_weighting=True).item() == pytest.approx(weighted, rel=1e-6)
    empty = torch.zeros(0, 2, requires_grad=True)
    assert aspect_box_loss(empty, [torch.zeros(0, dtype=torch.long)] * 2, targets).item() == 0.0


def tiny(num_aspects: int = 3, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_detector(DetectorOptions(**kw), 4, num_aspects, 1, (0.2,), (0.3,))


def test_background_rois_add_no_aspect_loss_and_an_image_without_boxes_trains():
    model = tiny().train()
    seen = {}
    select = model.roi_heads.select_training_samples

    def sampled(proposals, targets):
        seen["s"] = select(proposals, targets)
        return seen["s"]

    def keep(module, inputs, out):
        out.retain_grad()
        seen["features"] = out

    model.roi_heads.select_training_samples = sampled

    model.roi_heads.box_head.register_forward_hook(keep)
    images = [torch.rand(1, 128, 128), torch.rand(1, 128, 128)]
    empty = {k: v[:0] for k, v in one_image_target().items()}
    torch.manual_seed(1)
    losses = model(images, [one_image_target(), empty])
    losses["loss_aspect"].backward()
    labels = torch.cat(seen["s"][2])
    grad = seen["features"].grad.abs().sum(1)
    assert (labels == 0).sum() > 10 and (labels > 0).sum() >= 2  # the sample has background and positive RoIs
    assert torch.all(grad[labels == 0] == 0) and torch.all(grad[labels > 0] > 0)
    # Only the image without boxes: every RoI is background, the aspect loss is 0, and the step still trains.
    model.zero_grad()
    torch.manual_seed(1)
    losses = model(images[1:], [empty])
    assert losses["loss_aspect"].item() == 0.0 and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert model.roi_heads.aspect_score.weight.grad is not None and model.roi_heads.box_predictor.cls_score.weight.grad.abs().sum() > 0


def stock_copy(model: FasterRCNN) -> FasterRCNN:
    """The same detector with torchvision's own RoIHeads (same modules and settings)."""
    stock = copy.deepcopy(model)
    r = model.roi_heads
    stock.roi_heads = RoIHeads(r.box_roi_pool, r.box_head, r.box_predictor, r.proposal_matcher.high_threshold,
                               r.proposal_matcher.low_threshold, r.fg_bg_sampler.batch_size_per_image,
                               r.fg_bg_sampler.positive_fraction, r.box_coder.weights, r.score_thresh, r.nms_thresh,
                               r.detections_per_img)
    return stock


def test_num_aspects_zero_is_stock_torchvision():
    images = [torch.rand(1, 128, 128), torch.rand(1, 128, 128)]
    targets = [one_image_target(), one_image_target(boxes=((5.0, 5.0, 40.0, 30.0),))]
    model = tiny(num_aspects=0).train()
    stock = stock_copy(model)
    assert type(stock.roi_heads) is RoIHeads and type(model.roi_heads) is not RoIHeads
    torch.manual_seed(3)
    ours = model(images, targets)
    torch.manual_seed(3)
    theirs = stock(images, targets)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    # A torchvision architecture: the R18-FPN builder against torchvision's own constructor, same weights.
    options = DetectorOptions(name="fasterrcnn_resnet18_fpn", min_size=64, max_size=64)
    torch.manual_seed(0)
    r18 = build_detector(options, 4, 0, 3, (0.5,) * 3, (0.25,) * 3).train()
    backbone = resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=5, norm_layer=torch.nn.BatchNorm2d)
    reference = FasterRCNN(backbone, 5, min_size=64, max_size=64, image_mean=[0.5] * 3, image_std=[0.25] * 3).train()
    reference.load_state_dict(r18.state_dict())
    rgb = [x[:, ::2, ::2].expand(3, -1, -1) for x in images]
    targets = [{**t, "boxes": t["boxes"] / 2} for t in targets]
    torch.manual_seed(4)
    ours = r18(rgb, targets)
    torch.manual_seed(4)
    theirs = reference(rgb, targets)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs) and ours.keys() == theirs.keys()
    with_aspects = build_detector(options, 4, 3, 3, (0.5,) * 3, (0.25,) * 3).train()
    torch.manual_seed(4)
    assert "loss_aspect" in with_aspects(rgb, targets)


def test_fcos_aspect_loss():
    """FCOS: the aspect conv on the classification tower, BCE on foreground locations only; detections carry
    their location's aspect logits."""
    torch.manual_seed(0)
    model = build_detector(DetectorOptions(name="fcos_resnet50_fpn", min_size=64, max_size=64), 4, 3, 3,
                           (0.5,) * 3, (0.25,) * 3).train()
    seen = {}
    compute = model.head.compute_loss
    model.head.compute_loss = lambda t, h, a, m: seen.update(outputs=h, matched=m) or compute(t, h, a, m)
    image, target = torch.rand(3, 64, 64), one_image_target(boxes=((5.0, 6.0, 25.0, 30.0), (35.0, 10.0, 55.0, 45.0)))
    losses = model([image], [target])
    assert set(losses) == {"classification", "bbox_regression", "bbox_ctrness", "aspect"}
    matched = seen["matched"][0]
    fg = matched >= 0
    assert 0 < fg.sum() < len(matched)
    logits = seen["outputs"]["aspect_logits"][0]
    expected = F.binary_cross_entropy_with_logits(logits[fg], torch.sigmoid(target["aspect_logodds"][matched[fg]]))
    assert losses["aspect"].item() == pytest.approx(expected.item(), rel=1e-5)
    losses["aspect"].backward()
    assert model.head.aspect_logits.weight.grad.abs().sum() > 0
    assert model.head.classification_head.cls_logits.weight.grad is None  # the aspect term trains the tower, not cls
    no_rows = {**target, "aspect_weight": torch.zeros(2, 3)}
    assert model([image], [no_rows])["aspect"].item() == 0.0
    model.eval()
    model.score_thresh = 0.0
    out = model([image])[0]
    assert out["aspect_logits"].shape == (len(out["boxes"]), 3) and len(out["boxes"]) > 0


# -- data -------------------------------------------------------------------------------------------------------
def test_coco_round_trip_and_bad_rows(tmp_path, fmnist_test):
    opts = {"size": 96, "min_items": 1, "max_items": 4, "min_item": 20, "max_item": 40, "max_iou": 0.1}
    images, boxes, labels = make_canvases(fmnist_test.array[:200], fmnist_test.targets[:200], 10, opts, np.random.default_rng(5))
    write_coco(tmp_path, "val", images, boxes, labels, fmnist_test.class_names)
    split = read_coco(tmp_path / "val", tmp_path / "annotations" / "instances_val.json", "val")
    assert split.image_ids == list(range(1, 11)) and split.class_names == fmnist_test.class_names
    for i in range(10):
        np.testing.assert_array_equal(split.boxes[i], boxes[i])
        np.testing.assert_array_equal(split.labels[i], labels[i])
        np.testing.assert_array_equal(np.asarray(split.image(i)), images[i])
        # tight boxes: the item's pixels touch every side of its box
        for x1, y1, x2, y2 in boxes[i].astype(int):
            patch = images[i][y1:y2, x1:x2]
            assert min(patch[0].max(), patch[-1].max(), patch[:, 0].max(), patch[:, -1].max()) > 16
    assert sum(len(b) for b in boxes) >= 15 and split.all_box_ids()[0] == "1/1"

    data = json.loads((tmp_path / "annotations" / "instances_val.json").read_text())
    data["annotations"][0]["iscrowd"] = 1
    data["annotations"].append({"id": 999, "image_id": 2, "category_id": 3, "bbox": [5, 5, 0, 10]})  # empty: dropped
    (tmp_path / "edited.json").write_text(json.dumps(data))
    edited = read_coco(tmp_path / "val", tmp_path / "edited.json", "val")
    assert len(edited.boxes[0]) == len(boxes[0]) - 1 and len(edited.crowd[0]) == 1 and edited.info["dropped_empty_boxes"] == 1
    for change, message in [({"image_id": 77}, "annotation 1 (image 77): no image with this id"),
                            ({"bbox": [1, 2, -3, 4]}, "annotation 1 (image 1): bbox must be"),
                            ({"category_id": 42}, "annotation 1 (image 1): unknown category_id 42")]:
        bad = copy.deepcopy(data)
        bad["annotations"][0].update(change)
        (tmp_path / "bad.json").write_text(json.dumps(bad))
        with pytest.raises(MakdError, match=re.escape(message)) as err:
            read_coco(tmp_path / "val", tmp_path / "bad.json", "val")
        assert "bad.json" in str(err.value) and "\n" not in str(err.value)


def test_files_that_are_not_coco_or_hold_bad_numbers_are_one_line_errors(tmp_path, fmnist_test):
    opts = {"size": 64, "min_items": 1, "max_items": 2, "min_item": 20, "max_item": 30, "max_iou": 0.1}
    images, boxes, labels = make_canvases(fmnist_test.array[:20], fmnist_test.targets[:20], 3, opts, np.random.default_rng(1))
    write_coco(tmp_path, "val", images, boxes, labels, fmnist_test.class_names)
    good = json.loads((tmp_path / "annotations" / "instances_val.json").read_text())
    bad = tmp_path / "bad.json"

    def refused(data: object, message: str) -> None:
        bad.write_text(data if isinstance(data, str) else json.dumps(data))
        with pytest.raises(MakdError, match=re.escape(message)) as err:
            read_coco(tmp_path / "val", bad, "val")
        assert str(bad) in str(err.value) and "\n" not in str(err.value)

    refused([{"id": 1}], "not a COCO instances file (needs lists images, annotations, categories)")
    refused({"images": [], "annotations": []}, "not a COCO instances file")
    refused("{not json", "bad.json")
    refused({**good, "categories": good["categories"] + [{"id": 3, "name": "again"}]}, "category id 3 appears twice")
    refused({**good, "images": good["images"] + [dict(good["images"][1])]}, "image id 2 appears twice")
    refused({**good, "images": [{**good["images"][0], "height": 0}] + good["images"][1:]}, "height and width >= 1")
    # Python's json reads NaN and Infinity: a box holding one is refused where it is read (not in the crops later).
    for value in ("NaN", "Infinity"):
        text = json.dumps({**good, "annotations": [{**good["annotations"][0], "bbox": [1, 2, 3, 4]}] + good["annotations"][1:]})
        refused(text.replace("[1, 2, 3, 4]", f"[1, 2, {value}, 4]"), "annotation 1 (image 1): bbox must be [x, y, width, "
                "height] of finite numbers")


def test_val_holdout_larger_than_the_training_set_is_one_line(tmp_path, fmnist_test):
    opts = {"size": 64, "min_items": 1, "max_items": 2, "min_item": 20, "max_item": 30, "max_iou": 0.1}
    images, boxes, labels = make_canvases(fmnist_test.array[:20], fmnist_test.targets[:20], 3, opts, np.random.default_rng(1))
    write_coco(tmp_path, "train", images, boxes, labels, fmnist_test.class_names)
    config = load_config(overrides=["task=detection", "detection.dataset=coco", f"detection.train_images={tmp_path / 'train'}",
                                    f"detection.train_annotations={tmp_path / 'annotations' / 'instances_train.json'}",
                                    "detection.val_holdout=3"])
    with pytest.raises(MakdError, match=r"^detection.val_holdout 3: the training set has only 3 images$"):
        build_detection_splits(config)


def test_augmentations_keep_boxes_labels_and_aspect_rows_aligned():
    """Three boxes filled with distinct grey levels; each row carries its box's level. After every augmentation
    (and the detector's own resize) the pixels inside each remaining box still have its row's level."""
    image = torch.zeros(1, 100, 120, dtype=torch.uint8)
    rects, levels = [(5, 10, 35, 50), (45, 20, 95, 60), (60, 70, 110, 95)], [60, 130, 220]
    for (x1, y1, x2, y2), level in zip(rects, levels):
        image[:, y1:y2, x1:x2] = level
    target = {"boxes": torch.tensor(rects, dtype=torch.float32), "labels": torch.tensor([1, 2, 3]),
              "aspect_logodds": torch.tensor(levels, dtype=torch.float32)[:, None].repeat(1, 2),
              "aspect_mass": torch.ones(3, 2), "aspect_weight": torch.ones(3, 2), "box_index": torch.arange(3)}
    model = tiny().eval()
    for name in [*AUGMENTATIONS, "hflip+zoom_out+iou_crop"]:
        augment = build_augment(name.split("+"))
        changed = 0
        for seed in range(12):
            img, out = augment_sample(image.clone(), copy.deepcopy(target), augment, seed)
            changed += not torch.equal(out["boxes"], target["boxes"])
            resized, [out] = model.transform([img], [out])
            assert len({len(out[k]) for k in ("boxes", "labels", "aspect_logodds", "aspect_mass", "aspect_weight", "box_index")}) == 1
            for box, row, label, index in zip(out["boxes"], out["aspect_logodds"], out["labels"], out["box_index"]):
                x1, y1, x2, y2 = (int(v) for v in box.round())
                inside = resized.tensors[0, 0, y1 + 2:y2 - 2, x1 + 2:x2 - 2] * model.transform.image_std[0] + model.transform.image_mean[0]
                assert abs(inside.median().item() * 255 - row[0].item()) < 3, (name, seed)
                assert levels[int(index)] == row[0].item() and int(label) == int(index) + 1
        assert changed > 0, f"{name} never changed the boxes"
    with pytest.raises(MakdError, match="detection.augment: unknown augmentation 'blur'"):
        build_augment(["blur"])


def test_epoch_batches_group_pad_and_split_over_processes():
    groups = np.array([0, 1] * 10 + [1])
    one = epoch_batches(21, groups, 4, 1, seed=3, epoch=2)
    assert len(one) == math.ceil(21 / 4) and sorted(i for b in one for i in b) == list(range(21))
    assert all(len(set(groups[b])) == 1 for b in one[:-2])  # full batches come from one group
    two = epoch_batches(21, groups, 4, 2, seed=3, epoch=2)
    assert len(two) == math.ceil(22 / 4) and all(len(b) % 2 == 0 for b in two)  # padded to 22: equal shares
    counts = np.bincount([i for b in two for i in b], minlength=21)
    assert counts.sum() == 22 and (counts >= 1).all() and (counts == 2).sum() == 1  # one image repeated as padding
    assert all(len(b[0::2]) == len(b[1::2]) for b in two)  # rank r takes b[r::2]: the shares are equal
    assert epoch_batches(21, groups, 4, 2, seed=3, epoch=2) == two and epoch_batches(21, groups, 4, 2, 3, 3) != two


def test_map_backends_agree_on_the_same_predictions(canvases):
    test = build_detection_splits(load_config(overrides=canvases))["test"]
    rng = np.random.default_rng(0)
    detections = []
    for boxes, labels in zip(test.boxes, test.labels):
        noisy = boxes + rng.normal(0, 2.5, boxes.shape).astype(np.float32)
        wrong = labels.copy()
        wrong[rng.random(len(wrong)) < 0.3] = rng.integers(0, 10)
        extra = np.array([[10, 10, 50, 60], [60, 5, 120, 40]], np.float32)
        detections.append({"boxes": np.concatenate([noisy, extra]), "scores": rng.random(len(boxes) + 2).astype(np.float32),
                           "labels": np.concatenate([wrong, rng.integers(0, 10, 2)])})
    a, b = map_faster_coco_eval(test, detections), map_torchmetrics(test, detections)
    assert 5 < a["map"] < 95 and a["map50"] > a["map75"]
    assert all(abs(a[k] - b[k]) < 1e-4 for k in a), (a, b)
    perfect = [{"boxes": bx, "scores": np.ones(len(bx), np.float32), "labels": lb} for bx, lb in zip(test.boxes, test.labels)]
    assert map_faster_coco_eval(test, perfect)["map"] == pytest.approx(100.0)


# -- labelling ------------------------------------------------------------------------------------------------
def test_box_crops_label_through_the_store_and_resume_after_a_crash(canvases, tmp_path):
    config = load_config(overrides=canvases)
    train = build_detection_splits(config)["train"]
    crops = box_crops(train, 0.1, 32)
    assert crops.sample_ids == train.all_box_ids() and len(crops) == train.num_boxes
    x1, y1, x2, y2 = crop_box(np.array([10.0, 100.0, 20.0, 126.0]), (128, 128), 0.1, 32)
    assert (x1, y1, x2, y2) == (0, 97, 31, 128)  # grown to 32 around the centre (15, 113), clipped to the image
    k = 3
    img = np.asarray(train.image(int(crops.sample_ids[k].split("/")[0]) - 1))
    left, top, right, bottom = crops.crops[k]
    np.testing.assert_array_equal(np.asarray(crops.image(k)), img[top:bottom, left:right])

    questions = make_question_set(train.class_names, n=3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        label_split(crops, PixelTeacher(batch_size=2, fail_after_calls=3), questions, tmp_path / "crashed", shard_size=4,
                    progress=False)
    from conftest import dead_pid

    from makd.atomic import HOST

    (tmp_path / "crashed" / f".shard-00004.parquet.{HOST}-{dead_pid()}.x.tmp").write_bytes(b"a killed writer's leftover")
    done = sorted(p.name for p in (tmp_path / "crashed").glob("shard-*.parquet"))
    assert 0 < len(done) < math.ceil(len(crops) / 4)
    teacher = PixelTeacher(batch_size=2)
    resumed = label_split(crops, teacher, questions, tmp_path / "crashed", shard_size=4, progress=False)
    assert teacher.calls == math.ceil((len(crops) - 4 * len(done)) / 2)  # only the missing shards were scored
    reference = label_split(crops, PixelTeacher(batch_size=2), questions, tmp_path / "ref", shard_size=4, progress=False)
    assert resumed.check().complete and not list((tmp_path / "crashed").glob(".*.tmp"))
    a, b = resumed.read(), reference.read()
    assert a[0] == b[0] == crops.sample_ids and np.array_equal(a[1], b[1])


# -- training through the loop ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def labelled(canvases, tmp_path_factory):
    root = tmp_path_factory.mktemp("det-labels")
    config = load_config(overrides=canvases)
    splits = build_detection_splits(config)
    questions = make_question_set(splits["train"].class_names, n=3)
    questions.save(root / "q.json")
    crops = concat_crops([box_crops(splits[s], 0.1, 32) for s in ("train", "test")], "train+test")
    label_split(crops, PixelTeacher(batch_size=8), questions, root / "labels", shard_size=16, progress=False)
    return canvases + [f"questions={root / 'q.json'}", f"labels.path={root / 'labels'}"]


def test_detection_trains_resumes_bit_exactly_and_reports(labelled, tmp_path, monkeypatch):
    common = labelled + ["train.epochs=2", "train.checkpoint_every_steps=1", "detection.augment=[hflip, iou_crop]"]
    reference = train(load_config(overrides=common + [f"out={tmp_path / 'ref'}"]))
    rows = list(csv.DictReader((tmp_path / "ref" / "metrics.csv").open()))
    assert len(rows) == 2 and float(rows[0]["loss_aspect"]) > 0 and {"val_map", "val_map50", "loss_classifier"} <= set(rows[0])
    assert reference["aspect_agreement_best"]["num_boxes"] == build_detection_splits(load_config(overrides=labelled))["test"].num_boxes
    assert 0 <= reference["test_map_best"] <= reference["test_map50_best"] <= 100
    splits = json.loads((tmp_path / "ref" / "splits.json").read_text())
    assert splits["train"]["num_images"] == 12 and "image_ids" in splits["val"]
    assert "test mAP" in (tmp_path / "ref" / "report.md").read_text()

    original, calls = Trainer.train_step, {"n": 0}

    def interrupting(self, *args):
        calls["n"] += 1
        if calls["n"] == 5:  # epoch 2, step 2 of 3
            raise KeyboardInterrupt
        return original(self, *args)

    monkeypatch.setattr(Trainer, "train_step", interrupting)
    config = load_config(overrides=common + [f"out={tmp_path / 'crash'}"])
    with pytest.raises(KeyboardInterrupt):
        train(config)
    monkeypatch.setattr(Trainer, "train_step", original)
    resumed = train(config)
    a, b = load_file(tmp_path / "ref" / "last.safetensors"), load_file(tmp_path / "crash" / "last.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["test_map_best"] == reference["test_map_best"]


def test_aspect_head_reads_ground_truth_boxes_and_bad_configs_are_one_line(labelled, tmp_path):
    model = tiny(num_aspects=3).eval()
    boxes = [torch.tensor([[10.0, 10.0, 60.0, 70.0], [64.0, 0.0, 128.0, 64.0]]), torch.zeros(0, 4)]
    logits = ground_truth_aspects(model, [torch.rand(1, 128, 128), torch.rand(1, 128, 128)], boxes)
    assert [tuple(t.shape) for t in logits] == [(2, 3), (0, 3)]
    with pytest.raises(MakdError, match="loss.kd: not a detection loss term"):
        Trainer(load_config(overrides=labelled + ["loss.kd.weight=1"]))
    with pytest.raises(MakdError, match="detection.model.name: unknown detector 'yolo'"):
        Trainer(load_config(overrides=labelled + ["detection.model={name: yolo}"]))
    with pytest.raises(MakdError, match="backbone_weights: file not found"):
        build_detector(DetectorOptions(name="fasterrcnn_resnet18_fpn", backbone_weights=str(tmp_path / "r18.pth")), 3, 0, 3,
                       (0.5,) * 3, (0.2,) * 3)
    other = make_question_set(["a", "b"], n=3)
    other.save(tmp_path / "other.json")
    with pytest.raises(MakdError, match="was made for question set"):
        Trainer(load_config(overrides=labelled + [f"questions={tmp_path / 'other.json'}"]))
    assert LabelStore.open(labelled[-1].split("=", 1)[1]).meta["dataset"]["crops"] == {"margin": 0.1, "min_side": 32}


def test_paper_coco_configs():
    """configs/paper/coco/: Faster R-CNN R18/R50-FPN, the 1x schedule, multi-scale, COCO folders; every key valid."""
    from pathlib import Path

    from makd.detection.models import detector_options

    coco = Path(__file__).resolve().parent.parent / "configs" / "paper" / "coco"
    for student, name in (("r18_fpn", "fasterrcnn_resnet18_fpn"), ("r50_fpn", "fasterrcnn_resnet50_fpn")):
        config = load_config([coco / "recipe.yaml", coco / f"{student}.yaml"])
        options = detector_options(config.detection.model)
        assert (config.task, options.name, config.train.epochs, config.schedule.milestones) == ("detection", name, 12, [8, 11])
        assert options.sizes == (640, 672, 704, 736, 768, 800) and options.max_size == 1333 and options.backbone_weights
        assert 0 < config.schedule.warmup_epochs < 1 and config.detection.dataset == "coco" and config.detection.group_aspect_ratio
        assert config.detection.test_annotations.endswith("instances_val2017.json") and config.loss["aspect_bce"].weight > 0


def test_backbone_weights_from_a_local_file_and_the_mobilenet_builder(tmp_path):
    from torchvision.models import resnet18

    torch.manual_seed(7)
    state = resnet18(weights=None).state_dict()
    torch.save(state, tmp_path / "r18.pth")
    options = DetectorOptions(name="fasterrcnn_resnet18_fpn", backbone_weights=str(tmp_path / "r18.pth"), min_size=64, max_size=64)
    model = build_detector(options, 3, 2, 3, (0.5,) * 3, (0.25,) * 3)
    body = model.backbone.body
    assert torch.equal(body.conv1.weight, state["conv1.weight"]) and torch.equal(body.layer4[1].conv2.weight, state["layer4.1.conv2.weight"])
    assert not body.conv1.weight.requires_grad and body.layer4[0].conv1.weight.requires_grad  # 3 trainable stages
    torch.save({"not": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(MakdError, match="matches only 0 of the"):
        build_detector(DetectorOptions(name="fasterrcnn_resnet18_fpn", backbone_weights=str(tmp_path / "other.pth")), 3, 0, 3,
                       (0.5,) * 3, (0.25,) * 3)
    mobile = build_detector(DetectorOptions(name="fasterrcnn_mobilenet_v3_large_fpn", min_size=64, max_size=64), 3, 2, 3,
                            (0.5,) * 3, (0.25,) * 3).train()
    losses = mobile([torch.rand(3, 64, 64)], [one_image_target(q=2, boxes=((4.0, 4.0, 40.0, 44.0),))])
    assert {"loss_classifier", "loss_objectness", "loss_aspect"} <= set(losses) and all(torch.isfinite(v) for v in losses.values())


def test_official_json_round_trip_of_box_labels(labelled, tmp_path):
    from makd.detection.crops import crops_to_label
    from makd.labels.official import export_official, import_official

    config = load_config(overrides=labelled + ["labels.splits=[train, test]"])
    store = LabelStore.open(config.labels.path)
    assert export_official(store, tmp_path / "targets.json") == store.meta["num_samples"]
    imported, count, unmatched = import_official(config, tmp_path / "targets.json", tmp_path / "imported", samples=crops_to_label)
    ids, logodds, _ = store.read()
    again, relogodds, _ = imported.read()
    assert (count, unmatched) == (len(ids), 0) and again == ids and "/" in ids[0]
    np.testing.assert_allclose(relogodds, logodds, atol=1e-4)
