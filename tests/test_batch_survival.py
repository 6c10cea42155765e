"""What batch machines do to a run: kill -9 and an immediate restart, mid-epoch checkpoints,
a full disk, a NaN before any checkpoint, and Slurm's preemption signal."""
from __future__ import annotations

import errno
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from alexnet_train.checkpoint import RunLock, RunLocked

from .conftest import DEMO_CONFIG as DEMO, assert_bit_identical, checkpoint_weights as weights, console_script
from .conftest import read_metrics, run_train as run, tiny_overrides

pytestmark = pytest.mark.slow


def args(tree: tuple[Path, Path], out: Path, *extra: str, epochs: int = 2) -> list[str]:
    train, val = tree
    # 48 images in batches of 2: 24 steps an epoch, a log line each.
    return ["--config", DEMO, "--out", str(out), "--set", *tiny_overrides(train, val, 3, epochs),
            "data.batch_size=2", "train.log_interval=1", *extra]


def start(argv: list[str], env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([console_script("alexnet-train"), *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1, env=env)


def wait_for(proc: subprocess.Popen, prefix: str) -> list[str]:
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith(prefix):
            return seen
    proc.wait()
    raise AssertionError(f"no line starting {prefix!r}; exit {proc.returncode}:\n" + "".join(seen[-30:]))


def processes_with(needle: str) -> list[int]:
    """Live processes whose command line mentions ``needle`` (zombies excluded)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if needle in cmdline and state != "Z":
            pids.append(int(entry.name))
    return pids


# --------------------------------------------------------------------------- kill -9, restart at once


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_restart_right_after_kill_9_is_not_refused_by_the_dead_runs_workers(tree, tmp_path):
    out = tmp_path / "killed-run"
    argv = args(tree, out, "data.workers=2", epochs=1)
    proc = start(argv)
    wait_for(proc, "epoch 1/1 train 4/")
    assert len(processes_with(str(out))) == 3  # the trainer and its 2 loader workers
    proc.kill()
    proc.wait()
    # The next run's first act on OUT, at once: no worker of the dead run may still hold the lock.
    RunLock(out).acquire().release()
    # What a supervisor does: start again at once (`until alexnet-train ...; do sleep 1; done`).
    again = subprocess.run([console_script("alexnet-train"), *argv], capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stdout[-1500:] + again.stderr[-1500:]
    assert "another alexnet-train" not in again.stderr
    assert read_metrics(out)[-1]["epoch"] == 1
    # The workers died with their parent instead of lingering until their next status check.
    deadline = time.monotonic() + 2
    while processes_with(str(out)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert processes_with(str(out)) == []


def test_the_run_lock_is_not_inherited_by_forked_children(tmp_path):
    # A process takes the lock, forks a child that outlives it, and is killed with SIGKILL.
    code = (
        "import os, sys, time\n"
        "from alexnet_train.checkpoint import RunLock\n"
        f"RunLock({str(tmp_path)!r}).acquire()\n"
        "if os.fork() == 0:\n"
        "    time.sleep(30); os._exit(0)\n"
        "print('locked', flush=True); time.sleep(30)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunLocked, match=rf"pid {holder.pid} "):
            RunLock(tmp_path).acquire()
        holder.kill()
        holder.wait()
        lock = RunLock(tmp_path).acquire()  # the child is still alive, and holds nothing
        lock.release()
    finally:
        holder.kill()
        subprocess.run(["pkill", "-KILL", "-f", f"RunLock\\({str(tmp_path)!r}"], check=False)


def test_one_process_cannot_take_its_own_lock_twice(tmp_path):
    with RunLock(tmp_path).acquire():
        with pytest.raises(RunLocked, match="this process"):
            RunLock(tmp_path).acquire()
        # A refused attempt must not drop the held lock (closing any descriptor of the file would).
        probe = subprocess.run([sys.executable, "-c", f"from alexnet_train.checkpoint import RunLock; "
                                f"RunLock({str(tmp_path)!r}).acquire()"], capture_output=True, text=True)
        assert probe.returncode != 0 and "RunLocked" in probe.stderr
    RunLock(tmp_path).acquire().release()


# --------------------------------------------------------------------------- mid-epoch checkpoints


def test_checkpoint_steps_bounds_a_kill_9_and_the_resume_is_bit_identical(tree, tmp_path):
    straight = tmp_path / "straight"
    assert run(args(tree, straight, "train.checkpoint_steps=5")) == 0

    out = tmp_path / "killed"
    proc = start(args(tree, out, "train.checkpoint_steps=5"))
    seen = wait_for(proc, "checkpoint: ")
    assert f"{out / 'last.pth'} at epoch 1, step 5 (" in seen[-1]
    wait_for(proc, "epoch 1/2 train 8/")
    proc.kill()  # no signal handler runs: what survives is what was on disk
    proc.wait()
    state = torch.load(out / "last.pth", weights_only=True)
    assert (state["epoch"], state["step_in_epoch"]) == (0, 5)  # at most 5 steps lost

    resumed = subprocess.run([console_script("alexnet-train"), *args(tree, out, "train.checkpoint_steps=5")],
                             capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stdout[-1500:] + resumed.stderr[-1500:]
    assert "(epoch 1, step 5 of that epoch)" in resumed.stdout
    assert_bit_identical(weights(straight / "last.pth"), weights(out / "last.pth"))
    assert [m["train_loss"] for m in read_metrics(out)] == [m["train_loss"] for m in read_metrics(straight)]


def test_checkpoint_minutes_writes_mid_epoch_checkpoints_at_log_steps(tree, tmp_path, capsys):
    out = tmp_path / "out"
    # 0.0005 min = 30 ms: due at almost every log step; never at an epoch's last step
    # (the epoch's own checkpoint follows it).
    assert run(args(tree, out, "train.checkpoint_minutes=0.0005", epochs=1)) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("checkpoint: ")]
    assert lines and all("at epoch 1, step " in ln for ln in lines)
    assert all(int(ln.split("step ")[1].split()[0]) < 24 for ln in lines)
    state = torch.load(out / "last.pth", weights_only=True)
    assert (state["epoch"], state["step_in_epoch"]) == (1, 0)


@pytest.mark.parametrize("bad", ["train.checkpoint_minutes=-1", "train.checkpoint_steps=-5"])
def test_negative_checkpoint_intervals_exit_2_naming_the_key(bad, tree, tmp_path, capsys):
    assert run(args(tree, tmp_path / "out", bad)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and bad.split("=")[0] in err
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- a NaN before any checkpoint


def test_a_nan_in_the_first_epoch_says_no_checkpoint_was_written(tree, tmp_path, capsys):
    out = tmp_path / "out"
    assert run(args(tree, out, "optim.lr=1e12", epochs=1)) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "training loss is" in err
    assert "no checkpoint was written yet" in err and "last good checkpoint" not in err
    assert not (out / "last.pth").exists()


def test_a_nan_after_a_checkpoint_names_it(tree, tmp_path, capsys):
    out = tmp_path / "out"
    assert run(args(tree, out, epochs=1)) == 0
    capsys.readouterr()
    assert run(args(tree, out, "optim.lr=1e12", epochs=2)) == 1
    err = capsys.readouterr().err.strip()
    assert f"the checkpoint this run resumed from, {out / 'last.pth'} (after epoch 1), is kept" in err


# --------------------------------------------------------------------------- SIGUSR1 (Slurm)


def child_pids(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_sigusr1_to_every_process_saves_exits_138_and_resumes_exactly(tree, tmp_path):
    straight = tmp_path / "straight"
    assert run(args(tree, straight, "data.workers=1")) == 0

    out = tmp_path / "preempted"
    proc = start(args(tree, out, "data.workers=1"))
    wait_for(proc, "epoch 1/2 train 6/")
    # scancel --signal=USR1 / pkill -USR1 -f reach the loader worker too: it must not die of it.
    for pid in [proc.pid, *child_pids(proc.pid)]:
        os.kill(pid, signal.SIGUSR1)
    rest = proc.communicate(timeout=60)[0]
    assert proc.returncode == 128 + signal.SIGUSR1 == 138, rest
    assert "SIGUSR1 received (Slurm's warning before a time limit or preemption)" in rest
    assert "Traceback" not in rest and "interrupted by SIGUSR1; resumable checkpoint" in rest
    assert 0 < torch.load(out / "last.pth", weights_only=True)["step_in_epoch"] < 24

    assert run(args(tree, out, "data.workers=1")) == 0
    assert_bit_identical(weights(straight / "last.pth"), weights(out / "last.pth"))


# --------------------------------------------------------------------------- a full disk


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if not sys.platform.startswith("linux") or os.geteuid() != 0:
        return False
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True)
    return done.returncode == 0


@pytest.fixture
def small_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A real 3 MiB filesystem (tmpfs) where the machine allows a mount, else a faked one.

    ``fill()`` leaves it full, ``free()`` gives the space back.  The fake (no mount
    privilege) makes every fsync and write of this process under the directory fail
    with ENOSPC, as a full disk does.
    """
    root = tmp_path / "disk"
    real = _mount_tmpfs(root, "3m")

    class Disk:
        path = root
        is_real = real
        full = False

        def fill(self) -> None:
            self.full = True
            if real:
                with open(root / "filler", "wb") as fh:
                    try:
                        while True:
                            fh.write(b"\0" * 65536)
                            fh.flush()
                    except OSError:
                        pass

        def free(self) -> None:
            self.full = False
            (root / "filler").unlink(missing_ok=True)

    disk = Disk()
    if not real:
        real_fsync, real_write = os.fsync, os.write

        def fsync(fd: int) -> None:
            if disk.full and os.readlink(f"/proc/self/fd/{fd}").startswith(str(root)):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            real_fsync(fd)

        def write(fd: int, data) -> int:
            if disk.full and os.readlink(f"/proc/self/fd/{fd}").startswith(str(root)):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real_write(fd, data)

        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "write", write)
    yield disk
    if real:
        subprocess.run(["umount", "-l", str(root)], check=False)


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if ".tmp-" in p.name)


def test_a_full_disk_is_one_line_keeps_every_checkpoint_and_the_run_resumes(small_disk, tree, tmp_path, capsys):
    out = small_disk.path / "run"
    assert run(args(tree, out, "train.keep_last=1", epochs=1)) == 0
    before = {p.name: p.read_bytes() for p in out.glob("*.pth")}
    assert set(before) == {"last.pth", "best.pth", "epoch-001.pth"}
    capsys.readouterr()

    small_disk.fill()
    code = run(args(tree, out, "train.keep_last=1", epochs=2))
    err = capsys.readouterr().err.strip()
    assert code == 1, err
    assert len(err.splitlines()) == 1 and "No space left on device" in err, err
    assert f"{out}" in err and "inline_container" not in err
    assert {p.name: p.read_bytes() for p in out.glob("*.pth")} == before
    assert leftovers(out) == []

    small_disk.free()
    assert run(args(tree, out, "train.keep_last=1", epochs=2)) == 0
    assert "resuming from" in capsys.readouterr().out
    assert [m["epoch"] for m in read_metrics(out)] == [1, 2]


def test_a_checkpoint_that_does_not_fit_names_last_pth_and_keeps_the_old_one(small_disk, tree, tmp_path, capsys,
                                                                            monkeypatch):
    out = small_disk.path / "run"
    assert run(args(tree, out, "train.keep_last=0", epochs=1)) == 0
    before = (out / "last.pth").read_bytes()
    capsys.readouterr()
    if small_disk.is_real:  # leave room for config.yaml and metrics, not for a checkpoint
        small_disk.fill()
        (small_disk.path / "filler").write_bytes(b"\0" * (os.path.getsize(small_disk.path / "filler")
                                                          - len(before) // 2))
        small_disk.full = False
    else:
        import alexnet_train.checkpoint as ckpt

        real_save = ckpt.save_checkpoint

        def save(state, path):
            small_disk.full = True
            try:
                real_save(state, path)
            finally:
                small_disk.full = False

        monkeypatch.setattr(ckpt, "save_checkpoint", save)
    code = run(args(tree, out, "train.keep_last=0", "train.checkpoint_steps=3", epochs=2))
    err = capsys.readouterr().err.strip()
    assert code == 1
    assert err == (f"alexnet-train: error: {out / 'last.pth'}: cannot write (No space left on device); "
                   "the previous version is kept")
    assert (out / "last.pth").read_bytes() == before and leftovers(out) == []


def test_metrics_and_tensorboard_on_a_full_disk_are_one_line_errors(small_disk, tmp_path):
    from alexnet_train.checkpoint import WriteError
    from alexnet_train.tracking import Tracker

    out = small_disk.path / "run"
    out.mkdir()
    tracker = Tracker(out, tensorboard=small_disk.is_real)
    tracker.epoch_metrics({"epoch": 1, "val_top1": 1.0})
    first = (out / "metrics.jsonl").read_bytes()
    small_disk.fill()
    with pytest.raises(WriteError, match=rf"^{re.escape(str(out / 'metrics.jsonl'))}: cannot write \(No space left on device\)$"):
        tracker.epoch_metrics({"epoch": 2, "val_top1": 2.0, "pad": "x" * 8192})
    assert (out / "metrics.jsonl").read_bytes() == first  # no half row
    if small_disk.is_real:  # the fake cannot reach TensorBoard's writer thread
        with pytest.raises(WriteError, match=r"events\.out\.tfevents.*: cannot write \(No space left on device\)"):
            for step in range(2000):
                tracker.scalar("x", 1.0, step)
            tracker.flush()
    tracker.close()
