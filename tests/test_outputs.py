"""What makd writes: permissions that follow the umask, readable plots."""

from __future__ import annotations

import stat
import subprocess
import sys

import numpy as np
import pytest
from support.data_packages import foolbox_photos


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_follow_the_umask(tmp_path, umask, mode):
    # In a subprocess: the umask is a process-wide setting the test must not change for the others.
    # safetensors' writer (student files, best.safetensors) makes its files 0600 whatever the umask: the one atomic
    # write path gives them the umask's mode too.
    code = (f"import os; os.umask({umask}); from makd.atomic import write_json, atomic_path; "
            "import numpy as np; from safetensors.numpy import save_file\n"
            f"write_json({str(tmp_path / 'a.json')!r}, {{'x': 1}})\n"
            f"with atomic_path({str(tmp_path / 'sub' / 'b.bin')!r}) as tmp: tmp.write_bytes(b'1')\n"
            f"with atomic_path({str(tmp_path / 'c.safetensors')!r}) as tmp: save_file({{'w': np.zeros(2)}}, str(tmp))\n"
            "from makd.atomic import atomic_folder\n"
            f"with atomic_folder({str(tmp_path / 'd')!r}) as tmp: (tmp / 'e.bin').write_bytes(b'1')")
    subprocess.run([sys.executable, "-c", code], check=True)
    for name in ("a.json", "sub/b.bin", "c.safetensors", "d/e.bin"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode, name
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == mode | (mode & 0o444) >> 2  # folders: x where r
    assert not list(tmp_path.rglob("*.tmp"))


def test_curves_have_whole_epoch_ticks():
    from makd.report.plots import curves_figure

    history = [{"epoch": e, "loss": 1.0 / e, "loss_ce": 0.5 / e, "train_top1": 10.0 * e} for e in (1, 2, 3)]
    history[-1]["val_top1"] = 25.0
    fig = curves_figure(history)
    for ax in fig.axes:
        low, high = ax.get_xlim()
        ticks = [t for t in ax.get_xticks() if low <= t <= high]
        assert len(ticks) >= 2 and np.allclose(ticks, np.round(ticks)), ticks


FOOLBOX_PHOTOS = ["imagenet_00_243.jpg", "imagenet_04_949.jpg", "imagenet_16_251.jpg"]


def foolbox_photo(name: str):
    return foolbox_photos() / name


def test_onnx_carries_metadata_and_predicts_like_the_student_file(tmp_path):
    import json

    import onnx
    import torch

    from makd.cli import main
    from makd.config import ModelConfig
    from makd.models import build_student
    from makd.models.student_file import export_student
    from makd.predict import predict_files

    torch.manual_seed(0)
    model = build_student(ModelConfig(name="resnet8", width=4), 3, 3, 4, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    spec = {"in_chans": 3, "height": 40, "width": 40, "resized": True, "crop_pct": 0.8, "interpolation": "bicubic"}
    meta = {"model": ModelConfig(name="resnet8", width=4).model_dump(mode="json"), "input": spec,
            "classes": ["dog", "fruit", "spotted dog"], "question_set_hash": "x",
            "questions": [{"id": f"q{i}", "text": f"Question {i}?"} for i in range(4)]}
    export_student(tmp_path / "s.safetensors", model, meta)
    assert main(["export", "-m", str(tmp_path / "s.safetensors"), "-o", str(tmp_path / "s.onnx")]) == 0

    props = {p.key: json.loads(p.value) for p in onnx.load(str(tmp_path / "s.onnx")).metadata_props}
    assert props["classes"] == meta["classes"] and props["questions"] == meta["questions"] and props["input"] == spec
    assert props["mean"] == pytest.approx([0.5, 0.4, 0.3]) and props["std"] == pytest.approx([0.2, 0.25, 0.3])

    photos = [foolbox_photo(name) for name in FOOLBOX_PHOTOS]
    from_file = predict_files(tmp_path / "s.safetensors", photos, top_aspects=4)
    from_onnx = predict_files(tmp_path / "s.onnx", photos, top_aspects=4)
    for a, b in zip(from_file, from_onnx):
        assert a["class"] == b["class"] and a["probability"] == pytest.approx(b["probability"], abs=1e-4)
        assert [x["question"] for x in a["aspects"]] == [x["question"] for x in b["aspects"]]
        assert [x["p_yes"] for x in a["aspects"]] == pytest.approx([x["p_yes"] for x in b["aspects"]], abs=1e-4)


def test_predicting_with_a_foreign_onnx_file_says_what_is_missing(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    from makd.errors import MakdError
    from makd.predict import predict_files

    graph = helper.make_graph([helper.make_node("Identity", ["image"], ["y"])], "g",
                              [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(graph), str(tmp_path / "other.onnx"))
    with pytest.raises(MakdError, match="was not exported by `makd export` .*classes and preprocessing unknown"):
        predict_files(tmp_path / "other.onnx", [foolbox_photo(FOOLBOX_PHOTOS[0])])
