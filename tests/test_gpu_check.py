"""scripts/gpu_check.sh stays runnable on a GPU machine: its no-GPU path, its commands' arguments, its config, and
the training checks it calls (run here on the CPU)."""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from makd.config import load_config

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "gpu_check.sh"


def _python_commands() -> list[list[str]]:
    """Every `$PY <script> <args>` command of gpu_check.sh, as argument lists."""
    return [shlex.split(m.group(1)) for m in re.finditer(r"\$PY ((?:benchmarks|scripts)/\S+\.py[^\n]*)", SCRIPT.read_text())]


def _train_checks():
    spec = importlib.util.spec_from_file_location("gpu_train_checks", REPO / "scripts" / "gpu_train_checks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_script_is_valid_bash_and_executable() -> None:
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    assert os.access(SCRIPT, os.X_OK)


def test_without_a_gpu_it_says_so_in_one_line_and_exits_0() -> None:
    # This environment, without `make setup` (it may be the caller's own); no GPU for torch even where there is one.
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "GPU_CHECK_PYTHON": sys.executable}
    done = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_check: no CUDA GPU on this machine"), done.stdout


def test_every_command_parses_its_arguments() -> None:
    """Each benchmark/script the check calls accepts the options given (values checked by argparse, then --help)."""
    commands = _python_commands()
    assert {c[0] for c in commands} == {"scripts/gpu_train_checks.py", "benchmarks/label_pipeline.py",
                                        "benchmarks/cheap_seeds.py", "benchmarks/input_pipeline.py"}
    checks = _train_checks().CHECKS
    for script, *args in commands:
        if script == "scripts/gpu_train_checks.py":
            assert args[0] in checks, f"gpu_check.sh asks for check {args[0]!r}; gpu_train_checks.py has {sorted(checks)}"
            continue
        done = subprocess.run([sys.executable, script, *args, "--help"], cwd=REPO, capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, f"{script} {' '.join(args)}: {done.stderr.strip()}"
        for flag in (a for a in args if a.startswith("--")):
            assert flag in done.stdout, f"{script} has no option {flag}"


def test_the_launcher_checks_config_loads(tmp_path: Path) -> None:
    text = SCRIPT.read_text()
    heredoc = re.search(r'cat > "\$WORK/tiny.yaml" <<EOF\n(.*?)\nEOF', text, re.S).group(1)
    path = tmp_path / "tiny.yaml"
    path.write_text(heredoc.replace("$WORK", str(tmp_path)))
    config = load_config(path)
    assert (config.labels.path, config.out) == (str(tmp_path / "labels"), str(tmp_path / "run"))
    assert config.train.epochs == 2 and config.data.train_per_class == 20


@pytest.mark.slow
@pytest.mark.parametrize("check", ["channels-last", "detection"])  # amp-* and compile: the same code, slower here
def test_training_checks_pass_on_the_cpu(check: str) -> None:
    line = _train_checks().CHECKS[check]("cpu")
    assert line.startswith(f"{check}: ok"), line


def test_docs_describe_every_check() -> None:
    in_script = set(re.findall(r"^check (\S+) \d+ ", SCRIPT.read_text(), re.M))
    section = (REPO / "docs" / "training.md").read_text().split("### The GPU check")[1].split("\n## ")[0]
    in_docs = {name for row in re.findall(r"^\| (`.*?) \|", section, re.M) for name in re.findall(r"`([\w-]+)`", row)}
    assert len(in_script) == 10 and in_script == in_docs, (in_script ^ in_docs)
