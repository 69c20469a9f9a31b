"""Launchers: which process is which under torchrun, srun, submitit and makd's worker pool; one device per process;
real torchrun labelling and a real 2-process DDP run from srun's variables."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import make_question_set

from makd.errors import MakdError
from makd.launchers import PORTS, Dist, expand_hostlist, from_env, process_device

SRUN = {"SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "0", "SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8",
        "SLURM_STEP_NUM_TASKS": "8", "SLURM_JOB_NODELIST": "gpu[01-03,07],cpu5", "SLURM_STEP_NODELIST": "gpu[02-03,07]"}


def test_slurm_host_lists_expand_like_scontrol():
    assert expand_hostlist("gpu[01-03,07],cpu5") == ["gpu01", "gpu02", "gpu03", "gpu07", "cpu5"]
    assert expand_hostlist("node7") == ["node7"]
    assert expand_hostlist("r[1-2]-n[08-09],x[010-011]") == ["r1-n08", "r1-n09", "r2-n08", "r2-n09", "x010", "x011"]
    for bad in ("gpu[01-", "gpu[3-1]", "gpu[a-b]", "gpu]1["):
        with pytest.raises(MakdError, match="Slurm node list"):
            expand_hostlist(bad)


def test_srun_variables_make_one_run_of_all_tasks():
    info = from_env(SRUN)
    assert (info.rank, info.world_size, info.local_rank, info.launcher) == (5, 8, 1, "srun")
    assert info.master_addr == "gpu02"  # the first host of the step (the job's nodes when the step has no list)
    assert from_env({k: v for k, v in SRUN.items() if k != "SLURM_STEP_NODELIST"}).master_addr == "gpu01"
    assert PORTS[0] <= info.master_port < PORTS[1] and from_env({**SRUN, "SLURM_PROCID": "0"}).master_port == info.master_port
    assert from_env({**SRUN, "SLURM_STEP_ID": "1"}).master_port != info.master_port  # concurrent steps of one job
    assert from_env({**SRUN, "MASTER_ADDR": "10.1.2.3", "MASTER_PORT": "29400"}).master_addr == "10.1.2.3"
    assert from_env({**SRUN, "MASTER_PORT": "29400"}).master_port == 29400
    single = from_env({**SRUN, "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_STEP_NUM_TASKS": "1", "SLURM_NTASKS": "1"})
    assert not single.enabled and single.master_addr is None  # `srun makd train` with one task: a plain run
    with pytest.raises(MakdError, match="SLURM_PROCID=8 is not a rank of SLURM_STEP_NUM_TASKS=8"):
        from_env({**SRUN, "SLURM_PROCID": "8"})


def test_torchrun_wins_over_slurm_and_a_batch_script_without_srun_runs_alone(caplog):
    inside = from_env({**SRUN, "RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "3", "SLURM_STEP_NUM_TASKS": "2"})
    assert (inside.rank, inside.world_size, inside.local_rank, inside.launcher) == (3, 4, 3, "torchrun")
    assert inside.master_addr is None  # torchrun's own MASTER_ADDR / MASTER_PORT (env://)
    batch = {"SLURM_JOB_ID": "77", "SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_JOB_NODELIST": "gpu[01-02]"}
    with caplog.at_level(logging.WARNING, logger="makd.launch"):
        alone = from_env(batch)
    assert (alone.rank, alone.world_size) == (0, 1) and "not started by srun" in caplog.text
    assert from_env({}) == Dist() and from_env({"MAKD_LOCAL_RANK": "3"}).local_rank == 3
    # A worker of makd's local pool runs alone on its own device, even when its parent was an srun or torchrun task.
    for parent in (SRUN, {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}):
        worker = from_env({**parent, "MAKD_LOCAL_RANK": "3"})
        assert (worker.rank, worker.world_size, worker.local_rank, worker.launcher) == (0, 1, 3, "local-worker")
    with pytest.raises(MakdError, match="RANK='x': expected a whole number"):
        from_env({"RANK": "x", "WORLD_SIZE": "2"})


def test_submitit_local_tasks_are_ranks_of_one_run():
    env = {"SUBMITIT_EXECUTOR": "local", "SUBMITIT_LOCAL_JOB_ID": "123", "SUBMITIT_LOCAL_NTASKS": "2",
           "SUBMITIT_LOCAL_GLOBALID": "1", "SUBMITIT_LOCAL_LOCALID": "1"}
    info = from_env(env)
    assert (info.rank, info.world_size, info.local_rank, info.master_addr) == (1, 2, 1, "127.0.0.1")
    assert info.master_port == from_env({**env, "SUBMITIT_LOCAL_GLOBALID": "0"}).master_port


def test_each_process_takes_its_own_device():
    assert [process_device("auto", rank, gpus=2) for rank in (0, 1)] == ["cuda:0", "cuda:1"]
    assert process_device("cuda", 3, gpus=4) == "cuda:3"
    assert process_device("auto", 3, gpus=1) == "cuda:0"  # a Slurm task that sees only its own GPU
    assert [process_device("auto", rank, gpus=0) for rank in (0, 1)] == ["cpu", "cpu"]
    assert process_device("cuda:1", 0, gpus=2) == "cuda:1" and process_device("cpu", 1, gpus=2) == "cpu"
    with pytest.raises(MakdError, match="teacher.device: cuda requested but no CUDA device"):
        process_device("cuda", 0, gpus=0, option="teacher.device")


def _env() -> dict[str, str]:
    launchers = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "MAKD_LOCAL_RANK")
    return {**{k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SUBMITIT_")) and k not in launchers},
            "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}


@pytest.mark.slow
def test_torchrun_label_puts_each_rank_on_its_device_and_completes_the_store(tmp_path):
    from support.random_models import save_random_lm

    from makd.config import load_config
    from makd.data import build_splits
    from makd.labels import LabelStore

    data = {"train_per_class": 2, "val_per_class": 1, "test_per_class": 1}
    classes = build_splits(load_config(overrides=[f"data.{k}={v}" for k, v in data.items()]).data)["train"].class_names
    make_question_set(classes, n=3).save(tmp_path / "q.json")
    config = {"data": data, "questions": "q.json", "labels": {"path": "labels", "shard_size": 4},
              "teacher": {"name": "text", "model": str(save_random_lm(tmp_path / "lm"))}, "train": {"progress": False}}
    (tmp_path / "label.yaml").write_text(yaml.safe_dump(config))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                           "makd", "label", "-c", "label.yaml"], cwd=tmp_path, env=_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):  # the CPU here; cuda:<rank> on a machine with GPUs (test_each_process_takes_its_own_device)
        assert f"teacher.device: cpu for process {rank} of 2 (local rank {rank}, launcher torchrun)" in proc.stderr
    coverage = LabelStore.open(tmp_path / "labels").check()
    assert coverage.complete and len(coverage.sample_ids) == 2 * len(classes)  # labels.splits: train


@pytest.mark.slow
def test_srun_tasks_train_one_ddp_run(tmp_path):
    """`srun -n2 makd train`: two processes that only srun's variables tie together train ONE run (rank 0 reports,
    the checkpoint records 2 processes), not two rank-0 runs into one folder."""
    import torch

    config = {"data": {"train_per_class": 2, "val_per_class": 1, "test_per_class": 1, "augment": "none"},
              "model": {"width": 4}, "loss": {"ce": {"weight": 1.0}, "aspect_bce": {"weight": 0.0}},
              "train": {"epochs": 1, "batch_size": 8, "progress": False, "tensorboard": False, "threads": 1}}
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(config))
    step = {"SLURM_JOB_ID": str(os.getpid()), "SLURM_STEP_ID": "0", "SLURM_NTASKS": "2", "SLURM_STEP_NUM_TASKS": "2",
            "SLURM_STEP_NODELIST": "localhost", "SLURM_JOB_NODELIST": "localhost"}
    tasks = [subprocess.Popen([sys.executable, "-m", "makd", "train", "-c", "train.yaml", "out=run"], cwd=tmp_path,
                              env={**_env(), **step, "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    outputs = [task.communicate(timeout=300) for task in tasks]
    assert all(task.returncode == 0 for task in tasks), outputs[0][1][-2000:] + outputs[1][1][-2000:]
    assert "test top-1" in outputs[0][0] and "test top-1" not in outputs[1][0]
    checkpoint = torch.load(Path(tmp_path / "run" / "checkpoints" / "last.pt"), weights_only=True)
    assert checkpoint["world_size"] == 2 and checkpoint["state"]["global_step"] == 3  # ceil(10 / 2 / 4) steps


def test_loader_cores_are_the_bound_share_or_the_nodes_cores_over_its_processes(monkeypatch):
    from makd.data import base

    monkeypatch.setattr(base.os, "cpu_count", lambda: 32)
    monkeypatch.setattr(base.os, "sched_getaffinity", lambda pid: set(range(32)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun does not bind: 4 processes share the node's 32 cores
    assert base.cores_per_process() == 8
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "8(x2)")  # srun without task affinity
    assert base.cores_per_process() == 4
    monkeypatch.setattr(base.os, "sched_getaffinity", lambda pid: set(range(6)), raising=False)  # Slurm bound 6 cores
    assert base.cores_per_process() == 6
