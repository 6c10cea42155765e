"""Every rank of a 2-rank gloo run exits as the run ended: 0 when it finished, 138 when SIGUSR1
stopped it, never SIGABRT at interpreter exit (issue 27).

The abort ("terminate called without an active exception", exit 134) came from gloo worker
threads still alive when the interpreter finalized: a worker releasing its last collective's
tensors takes the GIL, which a finalizing interpreter answers by ending the thread inside a
noexcept C++ release.  It struck a few launches in a hundred, so each launch here also checks
the cause itself: no gloo thread is left when the interpreter starts to exit, on any rank.

Launches run as srun starts its tasks (each rank its own process, exit code and output), two
launches at a time; every wait has a deadline, so a hang fails the test.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from .conftest import DEMO_CONFIG, TINY_MODEL, write_image_folder

# Of each kind (a finished run, a run stopped by SIGUSR1), about 5 s each, two at a time.
# Every launch also checks the cause itself (no gloo thread alive when the interpreter exits),
# which failed on every launch before the fix, so a few launches find a regression for sure;
# 5 of each (20 s a test here, 40 s at 10) leave CI's whole suite room inside its 30 minutes.
LAUNCHES = 5
PARALLEL = 2  # launches at a time (4 processes on CI's 2 cores: the load the aborts were seen under)
DEADLINE = 120  # seconds for one launch

# The console script's body (sys.exit(train_main())), with a report of the native threads still
# alive when the interpreter begins to exit: registered first, this atexit handler runs last,
# after the loaders' and multiprocessing's, just before finalization.
RANK_PROGRAM = """
import atexit, os, sys

def _threads_at_exit():
    names = []
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/comm") as fh:
                names.append(fh.read().strip())
        except OSError:  # a thread that ended meanwhile
            pass
    print("threads at exit: " + " ".join(sorted(names)), file=sys.stderr, flush=True)

atexit.register(_threads_at_exit)
from alexnet_train.cli import train_main
sys.exit(train_main())
"""

GLOO_THREADS = ("gloo_tcp_loop", "pt_gloo_runloop")  # gloo's transport loop, ProcessGroupGloo's workers


@pytest.fixture(scope="module")
def tiny_tree(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """2 classes: 4 train JPEGs each (two steps of 2 images per rank and epoch), 1 val JPEG each."""
    root = tmp_path_factory.mktemp("exit-stress")
    return (write_image_folder(root / "train", ["n01", "n02"], 4, seed=1),
            write_image_folder(root / "val", ["n01", "n02"], 1, seed=2))


def _argv(train: Path, val: Path, out: Path, epochs: int) -> list[str]:
    return ["--config", DEMO_CONFIG, "--out", str(out), "--set", *TINY_MODEL,
            f"data.train_dir={train}", f"data.val_dir={val}", "model.num_classes=2", f"train.epochs={epochs}",
            "data.batch_size=4", "data.workers=0", "data.resize_size=72", "data.crop_size=64",
            "data.normalize=torchvision", "train.device=cpu", "train.log_interval=1",
            "dist.mode=ddp", "dist.backend=gloo"]


_ports_lock = threading.Lock()
_jobs_taken: set[int] = set()


def _free_job() -> int:
    """A Slurm job id whose rendezvous port (20000 + id) is free and not handed to a launch still running."""
    from alexnet_train.distributed import SLURM_BASE_PORT

    with _ports_lock:
        for job in range(os.getpid() % 4000 + 5000, 10000):
            if job in _jobs_taken:
                continue
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", SLURM_BASE_PORT + job))
                except OSError:
                    continue
            _jobs_taken.add(job)
            return job
    raise RuntimeError("no free port")


@dataclass
class Launch:
    codes: list[int | None]
    logs: list[str]
    note: str = ""

    def problems(self, want: int) -> list[str]:
        found = []
        if self.note:
            found.append(self.note)
        if self.codes != [want, want]:
            found.append(f"exit codes {self.codes}, not [{want}, {want}]")
        for rank, log in enumerate(self.logs):
            if "terminate called" in log:
                found.append(f"rank {rank} aborted: terminate called")
            left = [line for line in log.splitlines() if line.startswith("threads at exit: ")]
            if not left:
                found.append(f"rank {rank} never reached the interpreter's exit")
            elif any(name in left[-1].split() for name in GLOO_THREADS):
                found.append(f"rank {rank}: gloo threads still alive at interpreter exit ({left[-1]})")
        return found

    def tails(self) -> str:
        return "".join(f"\n--- rank {rank}:\n{log[-1500:]}" for rank, log in enumerate(self.logs))


def _launch(argv: list[str], interrupt: bool) -> Launch:
    """Two ranks of one run; with ``interrupt``, both get SIGUSR1 (what scancel --signal=USR1
    does) once rank 0 has logged its first training step."""
    job = _free_job()
    procs: list[subprocess.Popen] = []
    try:
        for rank in (0, 1):
            env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")
                   and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
            env.update(SLURM_JOB_ID=str(job), SLURM_STEP_ID="0", SLURM_PROCID=str(rank), SLURM_NTASKS="2",
                       SLURM_LOCALID=str(rank), SLURM_STEP_NODELIST="localhost")
            procs.append(subprocess.Popen([sys.executable, "-c", RANK_PROGRAM, *argv], env=env, text=True,
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, bufsize=1))
        timed_out = threading.Event()

        def kill() -> None:
            timed_out.set()
            for p in procs:
                p.kill()

        watchdog = threading.Timer(DEADLINE, kill)  # also bounds the wait for rank 0's first step
        watchdog.start()
        try:
            seen = []
            if interrupt:
                for line in procs[0].stdout:
                    seen.append(line)
                    if line.startswith("epoch 1/") and " train 1/" in line:
                        for p in procs:
                            p.send_signal(signal.SIGUSR1)
                        break
            logs = [p.communicate()[0] for p in procs]
            logs[0] = "".join(seen) + logs[0]
        finally:
            watchdog.cancel()
        note = f"killed after {DEADLINE} s (a hang)" if timed_out.is_set() else ""
        if interrupt and not any(" train 1/" in line for line in seen):
            note = note or "rank 0 never logged a training step"
        return Launch([p.returncode for p in procs], logs, note)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
        with _ports_lock:
            _jobs_taken.discard(job)


def _stress(tree: tuple[Path, Path], tmp_path: Path, interrupt: bool, want: int) -> None:
    train, val = tree
    # A stopped run gets epochs to spare: SIGUSR1 must land inside training, not after it.
    epochs = 20 if interrupt else 1
    started = time.monotonic()
    with ThreadPoolExecutor(PARALLEL) as pool:
        launches = list(pool.map(lambda i: _launch(_argv(train, val, tmp_path / f"run{i}", epochs), interrupt),
                                 range(LAUNCHES)))
    failed = [(i, launch, launch.problems(want)) for i, launch in enumerate(launches) if launch.problems(want)]
    aborts = sum(any("aborted" in p for p in problems) for _, _, problems in failed)
    summary = (f"{len(failed)} of {LAUNCHES} launches failed ({aborts} aborted) "
               f"in {time.monotonic() - started:.0f} s")
    assert not failed, summary + "".join(f"\nlaunch {i}: {'; '.join(problems)}{launch.tails()}"
                                         for i, launch, problems in failed[:3])
    if interrupt:
        for i in range(LAUNCHES):
            assert (tmp_path / f"run{i}" / "last.pth").exists()  # it saved before it stopped


@pytest.mark.slow
def test_every_rank_of_a_finished_two_rank_run_exits_0_many_times(tiny_tree, tmp_path):
    _stress(tiny_tree, tmp_path, interrupt=False, want=0)


@pytest.mark.slow
def test_every_rank_of_a_two_rank_run_stopped_by_sigusr1_exits_138_many_times(tiny_tree, tmp_path):
    _stress(tiny_tree, tmp_path, interrupt=True, want=128 + signal.SIGUSR1)
