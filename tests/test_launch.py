"""The launch environments (torchrun, Slurm's srun, none) and a 2-task gloo run launched as srun
launches it: rank, world and rendezvous from SLURM_* alone, preempted by SIGUSR1, resumed exactly."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
from pathlib import Path

import pytest
import torch

from alexnet_train.config import ConfigError
from alexnet_train.distributed import SLURM_BASE_PORT, DistInfo, first_host
from alexnet_train.lifecycle import joins_group, launch_environment

from .conftest import DEMO_CONFIG as DEMO, assert_bit_identical, checkpoint_weights, console_script, read_metrics
from .conftest import tiny_overrides

# What srun exports to task 1 of a 2-task step on two nodes (names as Slurm writes them).
SRUN_TASK_1 = {
    "SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "0", "SLURM_PROCID": "1", "SLURM_NTASKS": "2",
    "SLURM_LOCALID": "0", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_STEP_NODELIST": "gpu[07-08]",
}
# The batch script itself: the allocation's task count, but no step (nothing was launched by srun).
BATCH_SHELL = {"SLURM_JOB_ID": "4242", "SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0",
               "SLURM_JOB_NODELIST": "gpu[07-08]"}
TORCHRUN = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}


def test_no_launcher_is_one_process():
    assert DistInfo.from_env({}) == DistInfo(0, 1, 0, "none", "env://")


def test_srun_tasks_read_rank_world_and_rendezvous_from_slurm():
    dist = DistInfo.from_env(SRUN_TASK_1)
    assert (dist.rank, dist.world_size, dist.local_rank, dist.launcher) == (1, 2, 0, "slurm")
    assert dist.init_method == f"tcp://gpu07:{SLURM_BASE_PORT + 4242}"


def test_the_batch_shell_is_not_a_task_of_a_step():
    assert DistInfo.from_env(BATCH_SHELL) == DistInfo()


def test_torchrun_wins_inside_a_slurm_job():
    dist = DistInfo.from_env({**SRUN_TASK_1, **TORCHRUN})
    assert (dist.rank, dist.world_size, dist.local_rank, dist.launcher, dist.init_method) == (
        3, 4, 1, "torchrun", "env://")


def test_master_addr_and_port_override_the_slurm_rendezvous():
    env = {**SRUN_TASK_1, "MASTER_ADDR": "10.1.2.3", "MASTER_PORT": "12345"}
    assert DistInfo.from_env(env).init_method == "tcp://10.1.2.3:12345"


def test_the_port_stays_in_its_range_for_any_job_id():
    for job in ("1", "9999", "10000", "123456789"):
        port = int(DistInfo.from_env({**SRUN_TASK_1, "SLURM_JOB_ID": job}).init_method.rsplit(":", 1)[1])
        assert SLURM_BASE_PORT <= port < SLURM_BASE_PORT + 10000


@pytest.mark.parametrize("nodelist, first", [
    ("node01", "node01"), ("gpu[07-12,15],login1", "gpu07"), ("a1,b2", "a1"), ("rack1-n[003-010]", "rack1-n003"),
    ("x[5,2-3]", "x5"),
])
def test_first_host_of_a_slurm_node_list(nodelist, first):
    assert first_host(nodelist) == first


@pytest.mark.parametrize("env, needle", [
    ({**SRUN_TASK_1, "SLURM_PROCID": "x"}, "slurm environment"),
    ({**SRUN_TASK_1, "SLURM_PROCID": "2"}, "rank 2 is outside world size 2"),
    ({**TORCHRUN, "WORLD_SIZE": "two"}, "torchrun environment"),
    ({**SRUN_TASK_1, "SLURM_JOB_ID": "4242_7"}, "SLURM_JOB_ID"),
])
def test_a_broken_launch_environment_is_a_config_error(env, needle, monkeypatch):
    for key in [k for k in os.environ if k.startswith("SLURM_") or k in TORCHRUN]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError, match=needle):
        launch_environment("ddp")


def test_two_srun_tasks_with_dist_mode_none_are_refused(monkeypatch):
    for key, value in SRUN_TASK_1.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError, match="launched by slurm with 2 processes but dist.mode is 'none'"):
        launch_environment("none")


# --------------------------------------------------------------------------- a 2-task run, as srun starts it


def _free_port_in_slurm_range() -> int:
    for job in range(os.getpid() % 5000, 10000):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", SLURM_BASE_PORT + job))
            except OSError:
                continue
            return job
    raise RuntimeError("no free port")


def _srun(argv: list[str], job: int) -> list[subprocess.Popen]:
    """Start the two tasks of a one-node step with the environment srun gives them."""
    procs = []
    for rank in (0, 1):
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")
               and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
        env.update(SLURM_JOB_ID=str(job), SLURM_STEP_ID="0", SLURM_PROCID=str(rank), SLURM_NTASKS="2",
                   SLURM_LOCALID=str(rank), SLURM_JOB_NODELIST="localhost", SLURM_STEP_NODELIST="localhost")
        procs.append(subprocess.Popen([console_script("alexnet-train"), *argv], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True, bufsize=1))
    return procs


@pytest.mark.slow
def test_a_preempted_two_task_slurm_run_resumes_bit_identically(tree, tmp_path):
    train, val = tree

    def argv(out: Path) -> list[str]:
        return ["--config", DEMO, "--out", str(out), "--set", *tiny_overrides(train, val, 3, 2),
                "data.batch_size=4", "train.log_interval=1", "dist.mode=ddp", "dist.backend=gloo"]

    job = _free_port_in_slurm_range()
    straight = _srun(argv(tmp_path / "straight"), job)
    logs = [p.communicate(timeout=180)[0] for p in straight]
    assert [p.returncode for p in straight] == [0, 0], logs[0][-2000:] + logs[1][-2000:]
    assert f"dist: rank 0 of 2 from slurm, rendezvous tcp://localhost:{SLURM_BASE_PORT + job}" in logs[0]

    out = tmp_path / "preempted"
    tasks = _srun(argv(out), _free_port_in_slurm_range())
    seen = []
    for line in tasks[0].stdout:  # rank 0 logs; a few steps into epoch 1
        seen.append(line)
        if line.startswith("epoch 1/2 train 4/"):
            break
    for task in tasks:  # what scancel --signal=USR1 does: every task gets it
        task.send_signal(signal.SIGUSR1)
    logs = [p.communicate(timeout=120)[0] for p in tasks]
    assert [p.returncode for p in tasks] == [138, 138], "".join(seen) + logs[0][-2000:] + logs[1][-2000:]
    assert "interrupted by SIGUSR1" in logs[0] and "interrupted" not in logs[1]  # rank 0 speaks for the run
    state = torch.load(out / "last.pth", weights_only=True)
    assert state["epoch"] == 0 and 4 <= state["step_in_epoch"] < 12 and len(state["rng_ranks"]) == 2

    requeued = _srun(argv(out), _free_port_in_slurm_range())
    logs = [p.communicate(timeout=180)[0] for p in requeued]
    assert [p.returncode for p in requeued] == [0, 0], logs[0][-2000:] + logs[1][-2000:]
    assert "resuming from" in logs[0]
    assert_bit_identical(checkpoint_weights(tmp_path / "straight" / "last.pth"), checkpoint_weights(out / "last.pth"))
    assert [m["val_top1"] for m in read_metrics(out)] == [m["val_top1"] for m in read_metrics(tmp_path / "straight")]


@pytest.mark.parametrize("env, mode, joins", [
    ({}, "ddp", False),              # a multi-GPU config tried without torchrun: one process
    (BATCH_SHELL, "ddp", False),     # the batch script itself, not an srun task
    (SRUN_TASK_1, "ddp", True),
    (TORCHRUN, "ddp", True),
    ({"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0"}, "ddp", True),  # torchrun --nproc_per_node 1
    ({}, "none", False),
])
def test_ddp_joins_a_process_group_only_under_a_launcher(env, mode, joins, monkeypatch):
    for key in [k for k in os.environ if k.startswith("SLURM_") or k in TORCHRUN]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert joins_group(mode, launch_environment(mode)) is joins
