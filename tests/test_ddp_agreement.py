"""Many ranks, one run: what one rank meets alone, every rank acts on, at the same step.

Real 2-process gloo runs, started as srun starts its tasks (each its own stdout, stderr and
exit code), over real JPEG trees; every wait has a timeout, so a hang fails the test.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch

from alexnet_train.config import Config, ConfigError, replace
from alexnet_train.configload import config_to_dict
from alexnet_train.data.loaders import EpochSampler
from alexnet_train.distributed import DistInfo, RankFailed, rebuild_failure
from alexnet_train.resume import check_resume_config
from alexnet_train.tracking import Tracker

from .conftest import DEMO_CONFIG as DEMO, assert_bit_identical, checkpoint_weights, console_script
from .conftest import read_metrics, run_train, tiny_overrides

TRACEBACK = "Traceback (most recent call last)"


# --------------------------------------------------------------------------- pure pieces


def test_the_training_sampler_drops_the_ragged_tail_and_validation_stays_exact():
    # ImageNet's 1,281,167 images on 8 ranks of 16: 160,145 per rank left a last step of 1.
    sampler = EpochSampler(1_281_167, seed=0, shuffle=True, rank=3, world=8, batch=16)
    assert len(sampler) % 16 == 0 and len(sampler) == 1_281_167 // 128 * 16
    assert sampler.left_out == 1_281_167 % 128 < 8 * 16

    n, world, batch = 23, 2, 4
    epochs = []
    for epoch in (0, 1):
        shards = [EpochSampler(n, 7, True, rank, world, batch) for rank in range(world)]
        for s in shards:
            s.set_epoch(epoch)
        orders = [[i for i, _ in s] for s in shards]
        assert [len(o) for o in orders] == [8, 8]  # 2 whole batches each; 7 images left out
        seen = set(orders[0]) | set(orders[1])
        assert len(seen) == 16 and not set(orders[0]) & set(orders[1])
        epochs.append(set(range(n)) - seen)
    assert epochs[0] != epochs[1]  # another tail each epoch

    val = [[i for i, _ in EpochSampler(n, 7, False, rank, world)] for rank in range(world)]
    assert sorted(val[0] + val[1]) == list(range(n))  # every val image exactly once


def test_a_rank_failure_is_rebuilt_with_its_class_and_rank_and_rank_0_reports_it():
    from alexnet_train.data.datasets import BadImageError
    from alexnet_train.errors import run_errors

    for rank in (0, 1):
        me = DistInfo(rank=rank, world_size=2, launcher="torchrun")
        exc = rebuild_failure(1, BadImageError.__module__, "BadImageError", "/d/x.JPEG: unreadable image (bad)",
                              me, run_errors())
        assert type(exc) is BadImageError and str(exc) == "rank 1: /d/x.JPEG: unreadable image (bad)"
        assert exc.report is (rank == 0)
    # A rank's unexpected error (a bug): the others name it; the rank itself keeps its own.
    other = rebuild_failure(1, "builtins", "ZeroDivisionError", "division by zero",
                            DistInfo(rank=0, world_size=2, launcher="torchrun"), run_errors())
    assert isinstance(other, RankFailed) and "rank 1: division by zero" in str(other)
    own = ZeroDivisionError("division by zero")
    assert rebuild_failure(1, "builtins", "ZeroDivisionError", "division by zero",
                           DistInfo(rank=1, world_size=2, launcher="torchrun"), run_errors(), own=own) is own


@pytest.mark.parametrize("section, key, new", [("schedule", "kind", "cosine"), ("optim", "decay_biases", False)])
def test_a_change_the_checkpoint_cannot_resume_under_is_refused_naming_key_old_and_new(section, key, new):
    saved = config_to_dict(Config())
    old = saved[section][key]
    with pytest.raises(ConfigError) as info:
        check_resume_config(saved, replace(Config(), section, **{key: new}), log=lambda _m: None)
    assert str(info.value).startswith(f"{section}.{key}: is {new!r} but the checkpoint was trained with {old!r}")


def test_dist_timeout_minutes_must_be_positive():
    with pytest.raises(ConfigError, match="dist.timeout_minutes: must be > 0"):
        replace(Config(), "dist", timeout_minutes=0)


class _ClosedPipe:
    name = "<stdout>"

    def isatty(self) -> bool:
        return False

    def write(self, _text: str) -> int:
        raise BrokenPipeError(32, "Broken pipe")

    def flush(self) -> None:
        pass


def test_a_deferring_tracker_keeps_its_first_failed_write_and_stops_writing(tmp_path):
    tracker = Tracker(tmp_path, enabled=True, tensorboard=False, stream=_ClosedPipe(), defer_errors=True)
    tracker.log("a line nobody can read")  # does not raise: rank 0 alone must not leave the others
    assert tracker.failure is not None and "cannot write (Broken pipe)" in str(tracker.failure)
    tracker.log("another")
    assert not tracker.enabled
    strict = Tracker(tmp_path, enabled=True, tensorboard=False, stream=_ClosedPipe())
    with pytest.raises(Exception, match="Broken pipe"):
        strict.log("one process: the failure is raised at once")


# --------------------------------------------------------------------------- real runs


def args(train: Path, val: Path, out: Path, *extra: str, epochs: int = 2) -> list[str]:
    return ["--config", DEMO, "--out", str(out), "--set", *tiny_overrides(train, val, 3, epochs),
            "data.batch_size=4", "train.log_interval=2", "dist.mode=ddp", "dist.backend=gloo", *extra]


def _port_job() -> int:
    from alexnet_train.distributed import SLURM_BASE_PORT

    for job in range(os.getpid() % 4000 + 3000, 10000):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", SLURM_BASE_PORT + job))
            except OSError:
                continue
            return job
    raise RuntimeError("no free port")


class Ranks:
    """Two srun-like tasks of one step; ``argv`` per rank; optionally one process group.
    ``program``: what each task runs (default: the alexnet-train console script)."""

    def __init__(self, argvs: list[list[str]], one_group: bool = False, program: list[str] | None = None) -> None:
        job = _port_job()
        self.procs: list[subprocess.Popen] = []
        for rank, argv in enumerate(argvs):
            env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")
                   and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
            env.update(SLURM_JOB_ID=str(job), SLURM_STEP_ID="0", SLURM_PROCID=str(rank), SLURM_NTASKS="2",
                       SLURM_LOCALID=str(rank), SLURM_STEP_NODELIST="localhost")
            group = {}
            if one_group:
                group = {"process_group": 0 if rank == 0 else self.procs[0].pid}  # one group, this session
            self.procs.append(subprocess.Popen([*(program or [console_script("alexnet-train")]), *argv],
                                               env=env, text=True,
                                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=1,
                                               **group))

    def wait(self, timeout: float = 120) -> list[tuple[int, str, str]]:
        done = []
        deadline = time.monotonic() + timeout
        try:
            for p in self.procs:
                out, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
                done.append((p.returncode, out, err))
        finally:
            for p in self.procs:
                if len(done) <= self.procs.index(p):  # not read to the end: killed (if alive) and read
                    if p.poll() is None:
                        p.kill()
                    try:  # bounded: an orphaned grandchild (a loader worker) can hold the pipes open
                        p.communicate(timeout=10)
                    except subprocess.TimeoutExpired:
                        pass
        return done


def _no_tracebacks(results) -> None:
    for rank, (_, out, err) in enumerate(results):
        assert TRACEBACK not in out + err, f"rank {rank}:\n{err[-3000:]}"


def _file_read_by(rank: int, train: Path, step: int = 1, epoch: int = 0) -> Path:
    """The first file rank ``rank`` of 2 reads at ``step`` (0-based) of ``epoch`` (batch 2 per rank)."""
    from alexnet_train.data.datasets import scan_image_folder

    _, samples = scan_image_folder(str(train))
    sampler = EpochSampler(len(samples), 0, True, rank, 2, 2)
    sampler.set_epoch(epoch)
    return Path(samples[[i for i, _ in sampler][2 * step]][0])


def _batch_read_by(rank: int, train: Path, step: int, epoch: int = 0) -> list[Path]:
    from alexnet_train.data.datasets import scan_image_folder

    _, samples = scan_image_folder(str(train))
    sampler = EpochSampler(len(samples), 0, True, rank, 2, 2)
    sampler.set_epoch(epoch)
    order = [i for i, _ in sampler]
    return [Path(samples[i][0]) for i in order[2 * step: 2 * step + 2]]


@pytest.mark.slow
def test_a_broken_image_one_rank_reads_under_error_stops_both_ranks_with_one_line(tree, tmp_path):
    train, val = tree
    broken = _file_read_by(1, train, step=1)
    broken.write_bytes(b"not a jpeg at all")
    out = tmp_path / "out"
    started = time.monotonic()
    results = Ranks([args(train, val, out), args(train, val, out)]).wait(timeout=90)
    assert [code for code, _, _ in results] == [1, 1], results[0][2][-2000:] + results[1][2][-2000:]
    assert time.monotonic() - started < 80
    _no_tracebacks(results)
    lines = results[0][2].strip().splitlines()
    assert lines == [f"alexnet-train: error: rank 1: {broken}: unreadable image ({lines[0].split('(', 1)[1]}"]
    assert results[1][2].strip() == ""  # rank 0 speaks for the run
    assert not (out / "last.pth").exists()  # nothing saved from a run told to stop at a bad image


@pytest.mark.slow
def test_bad_images_under_skip_are_counted_over_all_ranks_and_logged_by_rank_0(tree, tmp_path):
    train, val = tree
    broken = _file_read_by(1, train, step=1)
    broken.write_bytes(b"\xff\xd8 truncated")
    out = tmp_path / "out"
    # 1 of 48 is allowed; a second bad file on rank 1 would pass per rank (1 of 24) but not in all.
    results = Ranks([args(train, val, out, "data.on_bad_image=skip", "data.max_bad_fraction=0.03")] * 2).wait()
    assert [code for code, _, _ in results] == [0, 0], results[0][2][-2000:] + results[1][2][-2000:]
    _no_tracebacks(results)
    assert f"warning: skipping {broken}: unreadable image" in results[0][1]
    assert "warning" not in results[1][1]
    assert [row["bad_images"] for row in read_metrics(out)] == [1, 1]  # read once per epoch, by rank 1

    second = _file_read_by(1, train, step=4)
    second.write_bytes(b"also broken")
    results = Ranks([args(train, val, tmp_path / "two", "data.on_bad_image=skip",
                          "data.max_bad_fraction=0.03")] * 2).wait()
    assert [code for code, _, _ in results] == [1, 1]
    _no_tracebacks(results)
    err = results[0][2].strip().splitlines()
    assert len(err) == 1 and "data.max_bad_fraction: 2 of the 48 train images are unreadable" in err[0]


@pytest.mark.slow
def test_a_batch_wholly_unreadable_on_one_rank_is_a_zero_weight_step_and_resume_stays_exact(tree, tmp_path):
    train, val = tree
    for path in _batch_read_by(1, train, step=2):
        path.write_bytes(b"garbage")
    extra = ("data.on_bad_image=skip", "data.max_bad_fraction=0.5", "train.log_interval=1")
    straight = tmp_path / "straight"
    results = Ranks([args(train, val, straight, *extra)] * 2).wait()
    assert [code for code, _, _ in results] == [0, 0], results[0][2][-2000:] + results[1][2][-2000:]
    _no_tracebacks(results)
    assert read_metrics(straight)[0]["bad_images"] == 2

    out = tmp_path / "split"
    ranks = Ranks([args(train, val, out, *extra)] * 2)
    for line in ranks.procs[0].stdout:  # after the unreadable step (step 3 of epoch 1)
        if line.startswith("epoch 1/2 train 5/"):
            ranks.procs[0].send_signal(signal.SIGUSR1)
            break
    results = ranks.wait()
    assert [code for code, _, _ in results] == [138, 138], results[0][2][-2000:] + results[1][2][-2000:]
    state = torch.load(out / "last.pth", weights_only=True)
    assert state["epoch"] == 0 and 5 <= state["step_in_epoch"] < 12
    results = Ranks([args(train, val, out, *extra)] * 2).wait()
    assert [code for code, _, _ in results] == [0, 0], results[0][2][-2000:]
    assert_bit_identical(checkpoint_weights(straight / "last.pth"), checkpoint_weights(out / "last.pth"))


@pytest.mark.slow
def test_node_local_out_is_refused_by_every_rank_before_anything_is_written(tree, tmp_path):
    train, val = tree
    done = tmp_path / "done"
    assert run_train(args(train, val, done, "dist.mode=none", epochs=1)) == 0
    a, b = tmp_path / "node0", tmp_path / "node1"
    b.mkdir()
    (b / "last.pth").write_bytes((done / "last.pth").read_bytes())
    for first, second in ((a, b), (b, a)):  # rank 1's OUT holds the checkpoint, then rank 0's does
        before = {p: p.stat().st_mtime_ns for p in b.iterdir()}
        results = Ranks([args(train, val, first), args(train, val, second)]).wait(timeout=90)
        assert [code for code, _, _ in results] == [2, 2], results[0][2][-2000:] + results[1][2][-2000:]
        _no_tracebacks(results)
        err = results[0][2].strip().splitlines()
        assert len(err) == 1 and "must be on storage every node sees" in err[0] and "rank 1 (host" in err[0]
        assert results[1][2].strip() == ""
        assert not a.exists()  # rank 0 made no OUT
        assert {p: p.stat().st_mtime_ns for p in b.iterdir() if p.name != ".lock"} == \
            {p: m for p, m in before.items() if p.name != ".lock"}


@pytest.mark.slow
def test_a_resume_under_another_schedule_kind_exits_2_before_out_is_touched(tree, tmp_path, capsys):
    train, val = tree
    out = tmp_path / "out"
    assert run_train(args(train, val, out, "dist.mode=none", epochs=1)) == 0
    config = (out / "config.yaml").read_bytes()
    capsys.readouterr()
    assert run_train(args(train, val, out, "dist.mode=none", "schedule.kind=cosine")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["alexnet-train: error: schedule.kind: is 'cosine' but the checkpoint was trained with 'step'; "
                   "use the checkpoint's schedule settings or another --out"]
    assert (out / "config.yaml").read_bytes() == config


@pytest.mark.slow
def test_sigterm_to_the_whole_process_group_saves_and_resumes_exactly(tree, tmp_path):
    """What torchrun's shutdown, scancel without --signal and coreutils timeout do: SIGTERM to
    every process, the DataLoader workers included."""
    train, val = tree
    extra = ("data.workers=2", "train.log_interval=1")
    straight = tmp_path / "straight"
    results = Ranks([args(train, val, straight, *extra)] * 2).wait()
    assert [code for code, _, _ in results] == [0, 0], results[0][2][-2000:]

    out = tmp_path / "out"
    ranks = Ranks([args(train, val, out, *extra)] * 2, one_group=True)
    for line in ranks.procs[0].stdout:
        if line.startswith("epoch 1/2 train 4/"):
            os.killpg(ranks.procs[0].pid, signal.SIGTERM)
            break
    results = ranks.wait(timeout=60)
    assert [code for code, _, _ in results] == [143, 143], results[0][2][-2000:] + results[1][2][-2000:]
    _no_tracebacks(results)
    assert "interrupted by SIGTERM; resumable checkpoint" in results[0][1]
    results = Ranks([args(train, val, out, *extra)] * 2).wait()
    assert [code for code, _, _ in results] == [0, 0], results[0][2][-2000:]
    assert_bit_identical(checkpoint_weights(straight / "last.pth"), checkpoint_weights(out / "last.pth"))


@pytest.mark.slow
def test_a_rank_that_stops_answering_ends_the_run_within_dist_timeout(tree, tmp_path):
    train, val = tree
    out = tmp_path / "out"
    ranks = Ranks([args(train, val, out, "dist.timeout_minutes=0.1", "train.log_interval=1", epochs=4)] * 2)
    try:
        for line in ranks.procs[0].stdout:
            if line.startswith("epoch 1/4 train 3/"):
                ranks.procs[1].send_signal(signal.SIGSTOP)  # hung: alive, but never answers
                stopped = time.monotonic()
                break
        ranks.procs[0].wait(timeout=60)
        waited = time.monotonic() - stopped
    finally:
        ranks.procs[1].kill()
    code, _, err = ranks.wait(timeout=30)[0]
    assert code == 1 and waited < 45, err[-2000:]
    assert TRACEBACK not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("alexnet-train: error: rank 0: lost contact with the other ranks")


# alexnet-train whose rank 0 takes SLOW_SAVE_SECONDS to write each checkpoint: a shared
# filesystem under load, or a slow NFS server (the write itself is the real one).
SLOW_SAVE = """
import os, sys, time
from alexnet_train import checkpoint
from alexnet_train.cli import train_main
write = checkpoint.save_checkpoint
def slow_write(*args, **kwargs):
    if os.environ["SLURM_PROCID"] == "0":
        time.sleep(float(os.environ["SLOW_SAVE_SECONDS"]))
    return write(*args, **kwargs)
checkpoint.save_checkpoint = slow_write
train_main(sys.argv[1:])
"""


@pytest.mark.slow
def test_rank_0s_checkpoint_write_slower_than_dist_timeout_is_no_lost_peer(tree, tmp_path, monkeypatch):
    """The other ranks wait for rank 0's write under dist.save_timeout_minutes (30 by default),
    not dist.timeout_minutes: here 12 s against 6 s once ended both ranks with "lost contact"."""
    import sys

    train, val = tree
    out = tmp_path / "out"
    monkeypatch.setenv("SLOW_SAVE_SECONDS", "12")
    started = time.monotonic()
    results = Ranks([args(train, val, out, "dist.timeout_minutes=0.1", epochs=1)] * 2,
                    program=[sys.executable, "-c", SLOW_SAVE]).wait(timeout=150)
    assert [code for code, _, _ in results] == [0, 0], results[0][2][-2000:] + results[1][2][-2000:]
    _no_tracebacks(results)
    assert time.monotonic() - started > 12  # the slow write did happen
    assert torch.load(out / "last.pth", weights_only=True)["epoch"] == 1

    # The same write against a save timeout shorter than it (3 s): every rank ends, with one line.
    monkeypatch.setenv("SLOW_SAVE_SECONDS", "8")
    again = tmp_path / "again"
    results = Ranks([args(train, val, again, "dist.save_timeout_minutes=0.05", epochs=1)] * 2,
                    program=[sys.executable, "-c", SLOW_SAVE]).wait(timeout=150)
    assert [code for code, _, _ in results] == [1, 1], results[0][2][-2000:] + results[1][2][-2000:]
    _no_tracebacks(results)
    assert "lost contact" in results[1][2]
    assert torch.load(again / "last.pth", weights_only=True)["epoch"] == 1  # rank 0's write finished whole


@pytest.mark.slow
def test_rank_0s_failed_write_stops_every_rank_at_the_same_step_with_one_line(tree, tmp_path):
    """Only rank 0 writes: its full disk must not leave rank 1 waiting in the next all-reduce."""
    train, val = tree
    out = tmp_path / "out"
    ranks = Ranks([args(train, val, out)] * 2)
    for line in ranks.procs[0].stdout:
        if line.startswith("training "):  # OUT exists; metrics.jsonl is written at epoch 1's end
            (out / "metrics.jsonl").symlink_to("/dev/full")  # every write: No space left on device
            break
    results = ranks.wait(timeout=90)
    assert [code for code, _, _ in results] == [1, 1], results[0][2][-2000:] + results[1][2][-2000:]
    _no_tracebacks(results)
    assert results[0][2].strip().splitlines() == [
        f"alexnet-train: error: {out / 'metrics.jsonl'}: cannot write (No space left on device)"]
    assert results[1][2].strip() == ""
    assert not (out / "last.pth").exists()  # the epoch whose line could not be written was not saved


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        found.extend(int(c) for c in text)
    return found


@pytest.mark.slow
def test_a_loader_worker_killed_on_one_rank_stops_both_ranks_with_one_line(tree, tmp_path):
    """The OOM killer takes one rank's loader worker: that rank keeps joining the all-reduce
    with zero-weight steps until the ranks' next agreement, then every rank exits 1."""
    train, val = tree
    out = tmp_path / "out"
    ranks = Ranks([args(train, val, out, "data.workers=1", "train.log_interval=4", epochs=3)] * 2)
    for line in ranks.procs[0].stdout:
        if line.startswith("epoch 1/3 train 4/"):
            workers = _children(ranks.procs[1].pid)
            assert workers, "rank 1 has no loader worker"
            for pid in workers:
                os.kill(pid, signal.SIGKILL)
            break
    results = ranks.wait(timeout=90)
    assert [code for code, _, _ in results] == [1, 1], results[0][2][-2000:] + results[1][2][-2000:]
    _no_tracebacks(results)
    lines = results[0][2].strip().splitlines()
    # The DataLoader's own "DataLoader worker (pid N) is killed by signal: Killed", or, when the
    # worker died mid-send and the main process read the broken pipe first, our line saying so.
    assert len(lines) == 1 and lines[0].startswith("alexnet-train: error: rank 1: the data loader failed: "), lines
    assert "DataLoader worker" in lines[0] and "Traceback" not in lines[0], lines
    assert results[1][2].strip() == ""


def test_a_changed_lr_under_plateau_says_the_checkpoints_lr_goes_on():
    saved = config_to_dict(Config())
    lines: list[str] = []
    check_resume_config(saved, replace(Config(), "optim", lr=0.02), log=lines.append)
    assert lines == ["notice: optim.lr changed since the checkpoint: 0.01 -> 0.02; under schedule.kind plateau the "
                     "run goes on at the checkpoint's current lr (the new value starts a fresh run: another --out)"]
    lines.clear()
    step = replace(Config(), "schedule", kind="step")
    check_resume_config(config_to_dict(step), replace(step, "optim", lr=0.02), log=lines.append)
    assert lines == ["notice: optim.lr changed since the checkpoint: 0.01 -> 0.02"]
