"""Every stop saves, and every rank ends a run the same way (issue 34).

- A stop signal delivered twice in quick succession (the process group's copy and a
  forwarding launcher's) is one request; a deliberate second one, 5 s or more later, aborts.
- Under DDP the ranks act on a stop within ~2 s of steps, whatever train.log_interval is.
- A write error at close, a SIGUSR1 after training, a device out of memory: every rank ends
  the same way, with one line.

Real 2-process gloo runs started as srun starts its tasks, each under coreutils'
``timeout --foreground`` (which forwards the signals it gets to its child, as torchrun, srun
and batch-script traps do); every wait has a deadline, so a hang fails the test.  Where a
fault needs a moment no signal can hit by chance (a step slow enough to measure, a write
that fails at close, a signal during the report), a small program patches that one spot
and then runs the real console entry point.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from alexnet_train.errors import REPEAT_SECONDS, Aborted
from alexnet_train.lifecycle import StopSignals

from .conftest import console_script, write_image_folder
from .test_ddp_agreement import TRACEBACK, Ranks, args

TIMEOUT = shutil.which("timeout")

# Each rank's program: the console script's body after an optional patch (PATCH names one
# from PATCHES, read from the environment, so both ranks of a test run the same program).
PROGRAM = r"""
import os, signal, sys, time
patch = os.environ.get("PATCH", "")
rank = int(os.environ.get("SLURM_PROCID", "0"))
if patch == "slow_steps":  # a step of STEP_SECONDS: a data-starved loader, a big model
    from alexnet_train import train
    learn = train.Trainer._learn
    def _learn(self, *a):
        time.sleep(float(os.environ["STEP_SECONDS"]))
        return learn(self, *a)
    train.Trainer._learn = _learn
elif patch == "close_fails":  # rank 0's TensorBoard file cannot be flushed at close
    from alexnet_train import tracking
    from alexnet_train.errors import WriteError
    close = tracking.Tracker.close
    def _close(self):
        close(self)
        if self.enabled:
            raise WriteError(f"{self.out_dir / 'tb'}: cannot write (No space left on device)")
    tracking.Tracker.close = _close
elif patch == "late_usr1":  # SIGUSR1 to each rank during the report and while it leaves the group
    from alexnet_train import lifecycle
    say_done, leave = lifecycle._say_done, lifecycle.leave_process_group
    def _say_done(*a):
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.2)
        return say_done(*a)
    def _leave(*a):
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.2)
        return leave(*a)
    lifecycle._say_done, lifecycle.leave_process_group = _say_done, _leave
elif patch == "oom":  # the device runs out of memory at global step OOM_STEP on the ranks in OOM_RANKS
    import torch
    from alexnet_train import train
    learn = train.Trainer._learn
    def _learn(self, *a):
        if self.global_step + 1 == int(os.environ["OOM_STEP"]) and str(rank) in os.environ["OOM_RANKS"].split(","):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total "
                                         "capacity of 79.19 GiB of which 1.06 GiB is free.")
        return learn(self, *a)
    train.Trainer._learn = _learn
elif patch == "val_loader_dies":  # rank 1's validation loader dies after one batch; stop checks every batch
    from alexnet_train import train
    train.STOP_CHECK_SECONDS = 0.0
    batches = train.Trainer._batches
    def _batches(self, loader):
        it = batches(self, loader)
        if loader is self.loaders.val and rank == 1:
            yield next(it)
            raise RuntimeError("DataLoader worker (pid 4242) is killed by signal: Killed.")
        yield from it
    train.Trainer._batches = _batches
elif patch == "eval_oom":  # alexnet-eval's forward runs out of memory
    import torch
    from alexnet_train import evalrun
    def _evaluate_crops(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.19 GiB.")
    evalrun.evaluate_crops = _evaluate_crops
    from alexnet_train.cli import eval_main
    sys.exit(eval_main())
from alexnet_train.cli import train_main
sys.exit(train_main())
"""


def wrapped(forwarding: bool = True) -> list[str]:
    """Each rank's program, under ``timeout --foreground`` (a launcher that forwards signals)."""
    program = [sys.executable, "-c", PROGRAM]
    return [TIMEOUT, "--foreground", "300", *program] if forwarding else program


def ranks_env(monkeypatch, **env: str) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)


def no_tracebacks(results) -> None:
    for rank, (_, out, err) in enumerate(results):
        assert TRACEBACK not in out + err, f"rank {rank}:\n{err[-3000:]}"


@pytest.fixture
def long_tree(tmp_path: Path) -> tuple[Path, Path]:
    """4 classes of 60 small JPEGs: 120 steps an epoch for each of 2 ranks at 1 image a step."""
    classes = ["n01", "n02", "n03", "n04"]
    return (write_image_folder(tmp_path / "train", classes, 60, seed=1),
            write_image_folder(tmp_path / "val", classes, 2, seed=2))


# --------------------------------------------------------------------------- the rule itself


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_repeat_within_the_window_is_the_same_request_and_a_later_one_aborts():
    clock = Clock()
    stop = StopSignals(clock=clock)
    stop._handle(signal.SIGTERM, None)
    clock.now += 0.01
    stop._handle(signal.SIGTERM, None)  # the launcher's forward of the same request
    clock.now += REPEAT_SECONDS - 0.02
    stop._handle(signal.SIGINT, None)  # still inside the window, whatever the signal
    assert (stop.signum, stop.repeats) == (signal.SIGTERM, 2)
    clock.now += 0.02
    with pytest.raises(Aborted) as caught:  # a person asking again
        stop._handle(signal.SIGINT, None)
    assert caught.value.signum == signal.SIGINT and isinstance(caught.value, KeyboardInterrupt)
    assert "aborted by a second SIGINT without saving" in str(caught.value)
    stop._handle(signal.SIGINT, None)  # the abort's own copy, during the cleanup: nothing happens
    assert stop.repeats == 3


def test_after_training_a_stop_signal_is_noted_never_acted_on():
    clock = Clock()
    stop = StopSignals(clock=clock)
    stop._handle(signal.SIGUSR1, None)  # arrived after the ranks' last agreement
    stop.finished()
    assert (stop.signum, stop.late) == (None, signal.SIGUSR1)
    clock.now += 60
    stop._handle(signal.SIGINT, None)  # no abort: the run is done
    assert stop.late == signal.SIGUSR1


def test_the_handlers_are_installed_and_given_back():
    before = signal.getsignal(signal.SIGUSR1)
    with StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGUSR1)
        deadline = time.monotonic() + 5
        while stop.signum is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert stop.signum == signal.SIGUSR1
    assert signal.getsignal(signal.SIGUSR1) is before


# --------------------------------------------------------------------------- 2 ranks, real signals

STEP_SECONDS = 0.25
LOG_INTERVAL = 50  # 12.5 s of steps: a stop agreed only at log steps would take that long


def slow_args(train: Path, val: Path, out: Path, *extra: str) -> list[str]:
    return args(train, val, out, "data.batch_size=2", "data.workers=2", f"train.log_interval={LOG_INTERVAL}",
                "model.num_classes=4", *extra)


def at_first_log_step(ranks: Ranks, send) -> float:
    """``send()`` once rank 0 has logged its first interval; the moment it was sent."""
    for line in ranks.procs[0].stdout:
        if line.startswith(f"epoch 1/2 train {LOG_INTERVAL}/"):
            send()
            return time.monotonic()
    raise AssertionError("rank 0 ended before its first log step")


@pytest.mark.slow
@pytest.mark.skipif(TIMEOUT is None, reason="needs coreutils' timeout")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_sent_to_the_group_under_a_forwarding_launcher_saves_on_both_ranks_within_10_s(
        long_tree, tmp_path, monkeypatch, sig):
    """Each rank gets the signal twice (the group's and its launcher's), 12.5 s of steps before
    the next log step: both save at the same step and exit 128 + sig within 10 s.  SIGINT:
    what Ctrl-C in a terminal plus a launcher's forward deliver."""
    train, val = long_tree
    ranks_env(monkeypatch, PATCH="slow_steps", STEP_SECONDS=str(STEP_SECONDS))
    out = tmp_path / "out"
    ranks = Ranks([slow_args(train, val, out)] * 2, one_group=True, program=wrapped())
    sent = at_first_log_step(ranks, lambda: os.killpg(ranks.procs[0].pid, sig))
    results = ranks.wait(timeout=60)
    took = time.monotonic() - sent
    assert [code for code, _, _ in results] == [128 + sig] * 2, results[0][2][-2000:] + results[1][2][-2000:]
    assert took < 10, f"{took:.1f} s from the signal to both ranks' exit"
    no_tracebacks(results)
    name = signal.Signals(sig).name
    assert f"{name} received: saving a resumable checkpoint (epoch 1, step " in results[0][1]
    assert f"interrupted by {name}; resumable checkpoint: {out / 'last.pth'}" in results[0][1]
    assert "interrupted" not in results[1][1] + results[1][2]  # rank 0 speaks for the run
    state = torch.load(out / "last.pth", weights_only=True)
    # Saved within ~2 s of steps of the signal (the check every ~8 steps at 0.25 s a step).
    assert LOG_INTERVAL < state["step_in_epoch"] <= LOG_INTERVAL + 2 / STEP_SECONDS + 2, state["step_in_epoch"]


@pytest.mark.slow
@pytest.mark.skipif(TIMEOUT is None, reason="needs coreutils' timeout")
def test_a_deliberate_second_ctrl_c_aborts_both_ranks_with_one_line_and_keeps_the_checkpoint(
        long_tree, tmp_path, monkeypatch):
    train, val = long_tree
    # Steps of 8 s: the first Ctrl-C's save waits for the step in flight, the second comes 5.5 s later.
    ranks_env(monkeypatch, PATCH="slow_steps", STEP_SECONDS="8")
    out = tmp_path / "out"
    ranks = Ranks([slow_args(train, val, out, "train.log_interval=1", "train.checkpoint_steps=1")] * 2,
                  one_group=True, program=wrapped())
    for line in ranks.procs[0].stdout:
        if line.startswith("checkpoint: "):  # step 1's checkpoint is on disk, step 2 under way
            break
    saved = (out / "last.pth").read_bytes()
    os.killpg(ranks.procs[0].pid, signal.SIGINT)  # twice to each rank: the group's and timeout's
    time.sleep(REPEAT_SECONDS + 0.5)
    os.killpg(ranks.procs[0].pid, signal.SIGINT)  # the second press, delivered twice as well
    pressed = time.monotonic()
    results = ranks.wait(timeout=30)
    assert [code for code, _, _ in results] == [130, 130], results[0][2][-2000:] + results[1][2][-2000:]
    # At once: an abort raised again by its own second copy cut the loader's shutdown short, and
    # the workers then held the exit for their 30 s SIGTERM grace (1 launch in ~10 hung so).
    assert time.monotonic() - pressed < 10
    no_tracebacks(results)
    assert results[0][2].strip().splitlines() == [
        "alexnet-train: aborted by a second SIGINT without saving; the last checkpoint in OUT, if any, is "
        "whole, and the same command resumes from it"]
    assert results[1][2].strip() == ""
    assert "interrupted by" not in results[0][1]
    assert (out / "last.pth").read_bytes() == saved  # step 1's, whole: nothing was written after it
    assert torch.load(out / "last.pth", weights_only=True)["step_in_epoch"] == 1


@pytest.mark.slow
def test_a_write_error_at_close_is_every_ranks_exit_1_with_one_line(tree, tmp_path, monkeypatch):
    train, val = tree
    ranks_env(monkeypatch, PATCH="close_fails")
    out = tmp_path / "out"
    results = Ranks([args(train, val, out, epochs=1)] * 2, program=wrapped(forwarding=False)).wait(timeout=90)
    assert [code for code, _, _ in results] == [1, 1], results[0][2][-2000:] + results[1][2][-2000:]
    no_tracebacks(results)
    assert results[0][2].strip().splitlines() == [
        f"alexnet-train: error: {out / 'tb'}: cannot write (No space left on device)"]
    assert results[1][2].strip() == ""


@pytest.mark.slow
def test_a_sigusr1_after_training_changes_nothing_every_rank_exits_0(tree, tmp_path, monkeypatch):
    """Slurm's warning can come while rank 0 writes its report, or as the ranks leave: the run is
    done, and a requeue would only find nothing to do."""
    train, val = tree
    ranks_env(monkeypatch, PATCH="late_usr1")
    out = tmp_path / "out"
    results = Ranks([args(train, val, out, epochs=1)] * 2, program=wrapped(forwarding=False)).wait(timeout=90)
    assert [code for code, _, _ in results] == [0, 0], results[0][2][-2000:] + results[1][2][-2000:]
    no_tracebacks(results)
    assert "SIGUSR1 received after training finished: nothing left to save, the run is done" in results[0][1]
    assert f"report: {out / 'report.png'}" in results[0][1] or "report.png not drawn" in results[0][1]


# --------------------------------------------------------------------------- out of memory


def oom_line(out: Path, rank: str = "", per: str = "") -> str:
    return (f"alexnet-train: error: {rank}cpu out of memory in training at epoch 1, step 2, with "
            f"data.batch_size=4{per}: lower data.batch_size (halve optim.lr with it: --set data.batch_size=2 "
            f"optim.lr=0.005) or free the device of other processes; ")


@pytest.mark.slow
def test_out_of_memory_is_one_line_naming_the_batch_size_and_exit_1(tree, tmp_path, monkeypatch):
    train, val = tree
    ranks_env(monkeypatch, PATCH="oom", OOM_STEP="3", OOM_RANKS="0")
    out = tmp_path / "out"

    proc = subprocess.run([*wrapped(forwarding=False), *args(train, val, out, "dist.mode=none")],
                          capture_output=True, text=True, timeout=90)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert TRACEBACK not in proc.stderr
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(oom_line(out)), err
    assert err[0].endswith(f"no checkpoint was written yet, {out} holds none of this run")


@pytest.mark.slow
def test_out_of_memory_on_both_ranks_is_each_ranks_one_line_and_exit_1(tree, tmp_path, monkeypatch):
    train, val = tree
    ranks_env(monkeypatch, PATCH="oom", OOM_STEP="3", OOM_RANKS="0,1")
    out = tmp_path / "out"
    results = Ranks([args(train, val, out, "data.batch_size=4")] * 2,
                    program=wrapped(forwarding=False)).wait(timeout=90)
    assert [code for code, _, _ in results] == [1, 1], results[0][2][-2000:] + results[1][2][-2000:]
    no_tracebacks(results)
    for rank, (_, _, err) in enumerate(results):
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(oom_line(out, f"rank {rank}: ", " (2 per process)")), lines


@pytest.mark.slow
def test_out_of_memory_on_one_rank_ends_the_other_with_a_lost_peer_promptly(tree, tmp_path, monkeypatch):
    train, val = tree
    ranks_env(monkeypatch, PATCH="oom", OOM_STEP="3", OOM_RANKS="1")
    out = tmp_path / "out"
    started = time.monotonic()
    results = Ranks([args(train, val, out, "data.batch_size=4")] * 2,
                    program=wrapped(forwarding=False)).wait(timeout=90)
    assert [code for code, _, _ in results] == [1, 1], results[0][2][-2000:] + results[1][2][-2000:]
    assert time.monotonic() - started < 60
    no_tracebacks(results)
    assert results[1][2].strip().splitlines()[0].startswith(oom_line(out, "rank 1: ", " (2 per process)"))
    assert "rank 0: lost contact with the other ranks" in results[0][2]


# --------------------------------------------------------------------------- torchrun's exit code


@pytest.mark.slow
def test_torchrun_returns_1_for_a_stop_its_workers_saved(tree, tmp_path):
    """What docs/fault-tolerance.md's launcher table says of torchrun (torch 2.14): signalled, it
    passes the signal to its workers, which save and exit 143; torchrun itself exits 1."""

    train, val = tree
    out = tmp_path / "out"
    argv = [console_script("torchrun"), "--standalone", "--nproc_per_node", "2", "-m", "alexnet_train",
            *args(train, val, out, "train.log_interval=1")]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PATCH"))}
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        for line in proc.stdout:
            if line.startswith("epoch 1/2 train 3/"):
                proc.send_signal(signal.SIGTERM)
                break
        rest, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == 1, err[-2000:]
    assert f"interrupted by SIGTERM; resumable checkpoint: {out / 'last.pth'}" in rest
    assert "SignalException" in err  # torchrun's own traceback, not a worker's
    state = torch.load(out / "last.pth", weights_only=True)
    assert state["epoch"] == 0 and state["step_in_epoch"] >= 3


@pytest.mark.slow
def test_alexnet_eval_out_of_memory_is_one_line_naming_its_batch_size(tree, tmp_path, monkeypatch):

    train, val = tree
    out = tmp_path / "out"
    assert subprocess.run([*wrapped(forwarding=False), *args(train, val, out, "dist.mode=none", epochs=1)],
                          capture_output=True, timeout=90).returncode == 0
    monkeypatch.setenv("PATCH", "eval_oom")
    proc = subprocess.run([*wrapped(forwarding=False), str(out / "last.pth"), "--ten-crop", "--batch-size", "6"],
                          capture_output=True, text=True, timeout=90)
    assert proc.returncode == 1 and TRACEBACK not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [
        "alexnet-eval: error: cpu out of memory evaluating ten crops of batches of 6 images: lower --batch-size "
        "(ten-crop runs 10 crops of each image)"]


@pytest.mark.slow
def test_a_validation_loader_that_dies_on_one_rank_stops_both_with_one_line_not_a_hang(tree, tmp_path, monkeypatch):
    """Validation's stop checks are collectives: the rank whose val batches end early still takes
    them, so both ranks reach the agreement where the held loader failure stops them."""
    train, val = tree
    ranks_env(monkeypatch, PATCH="val_loader_dies")
    out = tmp_path / "out"
    started = time.monotonic()
    results = Ranks([args(train, val, out, "data.batch_size=2", epochs=1)] * 2,
                    program=wrapped(forwarding=False)).wait(timeout=90)
    assert [code for code, _, _ in results] == [1, 1], results[0][2][-2000:] + results[1][2][-2000:]
    assert time.monotonic() - started < 60
    no_tracebacks(results)
    assert results[0][2].strip().splitlines() == [
        "alexnet-train: error: rank 1: the data loader failed: DataLoader worker (pid 4242) is killed by signal: "
        "Killed."]
    assert results[1][2].strip() == ""


@pytest.mark.slow
@pytest.mark.skipif(TIMEOUT is None, reason="needs coreutils' timeout")
def test_a_stop_only_rank_1_gets_is_acted_on_by_both_ranks_at_the_same_step_within_10_s(long_tree, tmp_path,
                                                                                       monkeypatch):
    """SIGTERM to rank 1 alone (an OOM-killer's neighbour, a `kill` of one task), twice through its
    launcher: rank 0 learns of it at the next stop check, and both save the same step."""
    train, val = long_tree
    ranks_env(monkeypatch, PATCH="slow_steps", STEP_SECONDS=str(STEP_SECONDS))
    out = tmp_path / "out"
    ranks = Ranks([slow_args(train, val, out)] * 2, program=wrapped())

    def rank_1_alone():  # twice: directly and through its launcher
        launcher = ranks.procs[1].pid
        os.kill(int(Path(f"/proc/{launcher}/task/{launcher}/children").read_text().split()[0]), signal.SIGTERM)
        os.kill(launcher, signal.SIGTERM)

    sent = at_first_log_step(ranks, rank_1_alone)
    results = ranks.wait(timeout=60)
    took = time.monotonic() - sent
    assert [code for code, _, _ in results] == [143, 143], results[0][2][-2000:] + results[1][2][-2000:]
    assert took < 10, f"{took:.1f} s from the signal to both ranks' exit"
    no_tracebacks(results)
    assert "SIGTERM received: saving a resumable checkpoint (epoch 1, step " in results[0][1]
    state = torch.load(out / "last.pth", weights_only=True)
    assert LOG_INTERVAL < state["step_in_epoch"] <= LOG_INTERVAL + 2 / STEP_SECONDS + 2, state["step_in_epoch"]
