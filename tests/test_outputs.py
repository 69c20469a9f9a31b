"""What makd writes: permissions that follow the umask, readable plots."""

from __future__ import annotations

import stat
import subprocess
import sys

import numpy as np
import pytest


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_follow_the_umask(tmp_path, umask, mode):
    # In a subprocess: the umask is a process-wide setting the test must not change for the others.
    code = (f"import os; os.umask({umask}); from makd.atomic import write_json, atomic_path; "
            f"write_json({str(tmp_path / 'a.json')!r}, {{'x': 1}})\n"
            f"with atomic_path({str(tmp_path / 'sub' / 'b.bin')!r}) as tmp: tmp.write_bytes(b'1')")
    subprocess.run([sys.executable, "-c", code], check=True)
    for name in ("a.json", "sub/b.bin"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode, name
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
