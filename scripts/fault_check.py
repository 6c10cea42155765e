#!/usr/bin/env python3
"""Fault injection for multi-node DDP runs: does alexnet-train stop, fail and resume as the
README promises when a worker is killed, a node is signalled, a file is unreadable, the disk
fills, or the nodes disagree about OUT?

    python scripts/fault_check.py                               # every fault, ~6 minutes on 2 cores
    python scripts/fault_check.py --only sigusr1 bad_image_error --keep --work /tmp/fc
    python scripts/fault_check.py --report fault_check.json --timeout 180
    python scripts/fault_check.py --list

Two "nodes" of two processes each run on this machine: two torchrun agents (each in its own
session, so a node is one process group to signal) meeting at a c10d rendezvous on loopback,
gloo, a tiny model on a tiny ImageFolder of real JPEGs drawn by the demo's generator
(alexnet_train.data.demo) under --work.  Each fault gets a fresh run and is judged on:

- the run ending within --timeout (else every process of it is SIGKILLed: a hang),
- every rank's exit code (0 done, 1 runtime failure, 2 refusal, 143 SIGTERM, 138 SIGUSR1),
- no "Traceback (most recent call last)" in any rank's log (torchrun's own output is kept
  in the report, not judged),
- every OUT/*.pth loading with alexnet_train.checkpoint.load_checkpoint,
- bit-identical final weights to an uninterrupted run of the same config where resume is
  promised (each reference is run once and reused),
- the one line rank 0 prints, where the fault has one.

It prints ``fault NAME: clean (S s)``, ``fault NAME: FAILED: why`` or ``fault NAME: skipped
(why)`` per fault, then ``faults: N tried, M clean``; exit 0 when no fault failed (a skipped
one, e.g. full_disk_rank0 without root, is not tried).  --work (default: a new temporary
folder) holds the data, every run's OUT and per-rank logs; it is removed at the end unless
--keep.

What it proves, and for which backend.  Every run here is gloo on CPUs, so what it proves is
what does not depend on the backend: every rank takes the same path (each decision is the same
collective call under gloo and NCCL), the exit codes, whole checkpoints, and exact resume.
Rank 0's slow checkpoint write is waited on in a gloo group of its own under either backend
(tests/test_ddp_agreement.py shows a write slower than dist.timeout_minutes is no lost peer).
What it cannot test here is NCCL's watchdog: with NCCL, a collective that outlives
dist.timeout_minutes is ended by PyTorch's watchdog thread, not by the call that waits.
alexnet-train sets TORCH_NCCL_ASYNC_ERROR_HANDLING=2 (unless it is set), so the watchdog aborts
the communicators and the error reaches the waiting call (one "lost contact" line, exit 1)
instead of SIGABRT; should that abort itself hang, PyTorch's heartbeat monitor ends the process
after TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC (480 s by default) with SIGABRT (exit 134).  Showing that
on a given driver and NCCL release takes two or more GPUs; the summary line says so.

Per-rank exit codes come from the kernel's proc connector (netlink, root), which sees every
process exit: torchrun reports no codes when it is itself signalled (it raises and prints its
own traceback), and when one worker fails it SIGTERMs that worker's local siblings before they
finish.  Without the connector the codes come from torchrun's failure summary, where it has one.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "demo.yaml"

NODES, PER_NODE = 2, 2
WORLD = NODES * PER_NODE
CLASSES = 8                    # the demo generator's shape classes
PER_CLASS = 8                  # 64 training images
BATCH = 8                      # global: 2 images per rank, 8 steps per epoch
EPOCHS = 3
SEED = 0                       # train.seed of configs/demo.yaml
STEPS = CLASSES * PER_CLASS // BATCH
IMAGE_PX = 48

# A narrow AlexNet with every layer of the paper's (as tests/conftest.py's TINY_MODEL); a step
# takes milliseconds, so a run's time is its processes' start.  checkpoint_steps=2 leaves a
# mid-epoch last.pth for kill -9 to fall back on; it writes no random state into the weights,
# so one reference serves every fault.
BASE = [
    "model.arch=custom", "model.conv_widths=[8,16,16,16,16]", "model.fc_widths=[32,32]", "model.groups=2",
    "model.init=kaiming", f"model.num_classes={CLASSES}",
    "data.demo=false", f"data.batch_size={BATCH}", "data.workers=1", "data.resize_size=72", "data.crop_size=64",
    "data.normalize=torchvision",
    f"train.epochs={EPOCHS}", "train.device=cpu", "train.log_interval=1", "train.checkpoint_steps=2",
    "dist.mode=ddp", "dist.backend=gloo",
]

TRACEBACK = "Traceback (most recent call last)"
ERROR_PREFIX = "alexnet-train: error:"
LOST_CONTACT = "lost contact with the other ranks"
SHARED_OUT = "must be on storage every node sees"
NO_SPACE = "cannot write (No space left on device)"
TAG_ENV = "FAULT_CHECK_TAG"
# Launcher variables of an enclosing job would leak into our torchruns' workers.
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT")


class Skipped(Exception):
    """The fault cannot be tried here (the reason is its message)."""


class ExitWatcher:
    """Every process exit on this machine (pid -> returncode as Popen gives it: the code, or
    minus the signal), from the kernel's proc connector (PROC_EVENT_EXIT over netlink).

    We are the parent of the torchruns only, so their workers' exits are not ours to wait for;
    the connector needs CAP_NET_ADMIN and the initial network namespace, and ``start`` says
    whether it works here by watching a child of its own exit 3.
    """

    NETLINK_CONNECTOR, CN_IDX_PROC, CN_VAL_PROC = 11, 1, 1
    PROC_CN_MCAST_LISTEN, PROC_EVENT_EXIT, NLMSG_DONE = 1, 0x80000000, 3

    def __init__(self) -> None:
        self.codes: dict[int, int] = {}
        self.problem: str | None = "not started"
        self._sock: socket.socket | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()

    def start(self) -> bool:
        """Listen (once per process); whether exits are seen."""
        if self.problem != "not started":
            return self.problem is None
        try:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, self.NETLINK_CONNECTOR)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
            sock.bind((0, self.CN_IDX_PROC))
            op = struct.pack("I", self.PROC_CN_MCAST_LISTEN)
            cn = struct.pack("IIIIHH", self.CN_IDX_PROC, self.CN_VAL_PROC, 0, 0, len(op), 0) + op
            sock.send(struct.pack("IHHII", 16 + len(cn), self.NLMSG_DONE, 0, 0, 0) + cn)
        except (OSError, AttributeError) as exc:
            self.problem = f"no proc connector ({exc})"
            return False
        self._sock = sock
        threading.Thread(target=self._read, name="exit-watcher", daemon=True).start()
        probe = subprocess.Popen(["/bin/sh", "-c", "exit 3"])
        probe.wait()
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            if self.code(probe.pid) == 3:
                self.problem = None
                return True
            time.sleep(0.01)
        self.problem = "the proc connector reports no exits here"
        self.stop()
        return False

    def stop(self) -> None:
        self._stop.set()
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def code(self, pid: int) -> int | None:
        with self._lock:
            return self.codes.get(pid)

    def _read(self) -> None:
        sock = self._sock
        while not self._stop.is_set() and sock is not None:
            try:
                ready, _, _ = select.select([sock], [], [], 0.5)
                if not ready:
                    continue
                data = sock.recv(1 << 16)
            except OSError:  # ENOBUFS (a burst of events): keep listening; closed: done
                if self._stop.is_set():
                    return
                continue
            offset = 0
            while offset + 16 <= len(data):
                length = struct.unpack_from("I", data, offset)[0]
                # nlmsghdr (16 bytes), cn_msg (20), proc_event: what, cpu, timestamp (16), then the event
                if length >= 68 and struct.unpack_from("I", data, offset + 36)[0] == self.PROC_EVENT_EXIT:
                    pid, tgid, status, _sig = struct.unpack_from("iiII", data, offset + 52)
                    if pid == tgid:  # a thread's exit is reported too
                        code = -(status & 0x7F) if status & 0x7F else (status >> 8) & 0xFF
                        with self._lock:
                            self.codes[pid] = code
                offset += max(length, 16) + (-length % 4)


WATCHER = ExitWatcher()


def make_tree(root: Path, per_class: int = PER_CLASS, size: int = IMAGE_PX) -> tuple[Path, Path]:
    """(train, val) under ``root``: the demo generator's real JPEGs, ``per_class`` training and
    one validation image for each of its 8 classes (made once; a later call reuses them)."""
    from alexnet_train.data.demo import ensure_demo_dataset

    train, val = ensure_demo_dataset(root, train_per_class=per_class, val_per_class=1, size=size, log=None)
    return Path(train), Path(val)


def copy_tree(train: Path, dest: Path) -> tuple[Path, Path]:
    """A copy of the (train, val) tree whose train folder is ``train``, to break files in."""
    shutil.copytree(train.parent, dest)
    return dest / "train", dest / "val"


def train_samples(train: Path) -> list[str]:
    """The training files in the order the trainer indexes them."""
    from alexnet_train.data.datasets import scan_image_folder

    return [path for path, _ in scan_image_folder(str(train))[1]]


def batch_files(train: Path, epoch: int, rank: int, step: int, world: int = WORLD, batch: int = BATCH,
                seed: int = SEED) -> list[str]:
    """The files ``rank`` reads at ``step`` (1-based, as the log counts) of ``epoch`` (1-based):
    the EpochSampler's order, a pure function of (seed, epoch, rank, world), cut into this
    rank's batches of ``batch // world``."""
    from alexnet_train.data.loaders import EpochSampler

    samples = train_samples(train)
    per_rank = batch // world
    try:
        sampler = EpochSampler(len(samples), seed, True, rank, world, per_rank)
    except TypeError:  # before the sampler knew the batch (it dropped only the tail of the world)
        sampler = EpochSampler(len(samples), seed, True, rank, world)
    sampler.set_epoch(epoch - 1)
    order = sampler.order()
    chunk = order[(step - 1) * per_rank: step * per_rank]
    if len(chunk) != per_rank:
        raise ValueError(f"rank {rank} has no step {step} in epoch {epoch}")
    return [samples[i] for i in chunk]


def break_files(paths: list[str]) -> None:
    """Garbage where a JPEG was: not an image PIL or any JPEG decoder accepts."""
    for path in paths:
        Path(path).write_bytes(b"this is not a JPEG file, only bytes that say so\n" * 8)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_command() -> list[str]:
    # The torchrun beside this Python; a pyenv shim on PATH would be a shell script.
    beside = Path(sys.executable).parent / "torchrun"
    return [str(beside)] if beside.is_file() else [sys.executable, "-m", "torch.distributed.run"]


def children(pid: int) -> list[int]:
    kids: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return kids
    for tid in tasks:
        try:
            kids += [int(x) for x in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()]
        except OSError:
            return _children_by_scan(pid)
    return kids


def _children_by_scan(pid: int) -> list[int]:
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(entry))
    return kids


def environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    env = {}
    for item in raw.split(b"\0"):
        key, sep, value = item.partition(b"=")
        if sep:
            env[key.decode(errors="replace")] = value.decode(errors="replace")
    return env


def tagged(tag: str) -> list[int]:
    """Every live process started under this tag (the torchruns, their workers, the workers'
    DataLoader processes: the tag is in their inherited environment)."""
    needle = f"{TAG_ENV}={tag}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                if needle in Path(f"/proc/{entry}/environ").read_bytes().split(b"\0"):
                    found.append(int(entry))
            except OSError:
                continue
    return found


@dataclass
class Worker:
    pid: int
    rank: int
    local_rank: int
    group_rank: int
    attempt: int              # TORCHELASTIC_RESTART_COUNT: the agent's own count of failed rounds
    generation: int           # how many workers of this local rank the node had before this one


@dataclass
class RankLog:
    node: int
    attempt: int
    local_rank: int
    rank: int | None
    folder: Path

    def stdout(self) -> str:
        return _read(self.folder / "stdout.log")

    def stderr(self) -> str:
        return _read(self.folder / "stderr.log")


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


@dataclass
class Node:
    index: int
    proc: subprocess.Popen
    log_dir: Path
    output: Path                  # torchrun's own stdout and stderr
    workers: dict[int, Worker] = field(default_factory=dict)

    @property
    def group_rank(self) -> int | None:
        ranks = {w.group_rank for w in self.workers.values()}
        return ranks.pop() if len(ranks) == 1 else None

    def text(self) -> str:
        return _read(self.output)


@dataclass
class Launch:
    """One launch of both nodes: what the harness started, saw and judged."""
    name: str
    nodes: list[Node]
    tag: str
    port: int
    started: float
    ended: float | None = None
    hung: bool = False
    hung_nodes: list[int] = field(default_factory=list)   # the torchruns still running at the timeout
    strays: list[int] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return (self.ended or time.monotonic()) - self.started

    def poll(self) -> None:
        """Record the workers each torchrun has now (their rank, local rank, node's group rank
        and restart count come from the environment torchrun gives them)."""
        for node in self.nodes:
            if node.proc.poll() is not None:
                continue
            for pid in children(node.proc.pid):
                if pid in node.workers:
                    continue
                env = environ(pid)
                if "RANK" not in env or "LOCAL_RANK" not in env:
                    continue
                local = int(env["LOCAL_RANK"])
                generation = sum(1 for w in node.workers.values() if w.local_rank == local)
                node.workers[pid] = Worker(pid, int(env["RANK"]), local, int(env.get("GROUP_RANK", -1)),
                                           int(env.get("TORCHELASTIC_RESTART_COUNT", 0)), generation)

    def running(self) -> bool:
        return any(node.proc.poll() is None for node in self.nodes)

    def group_ranks(self) -> dict[int, int]:
        """node index -> its group rank: as its workers' environment says; where none was seen,
        the rendezvous's own rule (nodes ranked by their agents' descriptors, host then pid)."""
        seen = {node.index: node.group_rank for node in self.nodes if node.group_rank is not None}
        if len(seen) == len(self.nodes):
            return seen
        by_pid = sorted(self.nodes, key=lambda n: n.proc.pid)
        return {node.index: seen.get(node.index, i) for i, node in enumerate(by_pid)}

    def workers(self) -> list[Worker]:
        """The workers each node started last.  Not by restart count: an agent that restarts
        its workers because another node rejoined (a membership change) does not count it, so
        its second generation has the first one's TORCHELASTIC_RESTART_COUNT."""
        out = []
        for node in self.nodes:
            last = max((w.generation for w in node.workers.values()), default=None)
            out += [w for w in node.workers.values() if w.generation == last]
        return sorted(out, key=lambda w: w.rank)

    def worker(self, rank: int) -> Worker | None:
        return next((w for w in self.workers() if w.rank == rank), None)

    def logs(self, attempt: int | None = None) -> list[RankLog]:
        """Every rank's log folder (all attempts, or one), ranks resolved per node."""
        groups = self.group_ranks()
        found = []
        for node in self.nodes:
            for log in rank_logs(node.log_dir):
                if attempt is None or log.attempt == attempt:
                    log.node = node.index
                    log.rank = groups[node.index] * PER_NODE + log.local_rank
                    found.append(log)
        return sorted(found, key=lambda log: (log.attempt, log.rank))

    def last_attempt(self) -> int:
        return max((log.attempt for log in self.logs()), default=0)

    def latest_logs(self) -> list[RankLog]:
        """Each node's logs of its latest attempt folder (the nodes' restart counts can differ)."""
        logs = self.logs()
        last = {node.index: max((log.attempt for log in logs if log.node == node.index), default=0)
                for node in self.nodes}
        return [log for log in logs if log.attempt == last[log.node]]

    def rank_log(self, rank: int, attempt: int | None = None) -> RankLog | None:
        logs = self.latest_logs() if attempt is None else self.logs(attempt)
        return next((log for log in logs if log.rank == rank), None)


def rank_logs(log_dir: Path) -> list[RankLog]:
    """The per-rank log folders torchrun --log-dir DIR --redirects 3 writes for one node:
    DIR/<rdzv-id>_<random>/attempt_<restart>/<local rank>/{stdout,stderr}.log."""
    found = []
    for folder in glob.glob(str(log_dir / "*" / "attempt_*" / "*")):
        path = Path(folder)
        if path.is_dir() and path.name.isdigit():
            found.append(RankLog(-1, int(path.parent.name.split("_")[1]), int(path.name), None, path))
    return found


def launch_nodes(name: str, argvs: list[list[str]], run_dir: Path, max_restarts: int = 0,
                 cwd: Path | None = None, extra_env: dict[str, str] | None = None) -> Launch:
    """Start one torchrun per entry of ``argvs`` (alexnet-train's arguments for that node), each
    ``--nnodes 2 --nproc-per-node 2`` at a c10d rendezvous on a free loopback port, each in
    its own session.  Node 0 hosts the rendezvous store (``is_host``; node 1's agent connects
    to it, retrying until it is up), so signalling node 1 leaves the store standing; the
    rendezvous ranks nodes by their agents' pids, and node 0 starts first, so it normally
    holds ranks 0 and 1."""
    run_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    tag = f"{name}-{uuid.uuid4().hex[:8]}"
    env = {k: v for k, v in os.environ.items()
           if k not in LAUNCH_VARS and not k.startswith(("SLURM_", "TORCHELASTIC_"))}
    env.update({TAG_ENV: tag, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
                "ALEXNET_TRAIN_CACHE": str(run_dir / "cache"), **(extra_env or {})})
    nodes = []
    started = time.monotonic()
    for index, argv in enumerate(argvs):
        log_dir = run_dir / f"logs-node{index}"
        output = run_dir / f"torchrun-node{index}.txt"
        cmd = [*torchrun_command(), "--nnodes", str(len(argvs)), "--nproc-per-node", str(PER_NODE),
               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", tag,
               "--rdzv-conf", f"is_host={int(index == 0)}",
               "--max-restarts", str(max_restarts), "--log-dir", str(log_dir), "--redirects", "3",
               "-m", "alexnet_train", *argv]
        with open(output, "wb") as fh:
            proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    cwd=str(cwd or REPO), env=env, start_new_session=True)
        nodes.append(Node(index, proc, log_dir, output))
        time.sleep(0.2)  # node 0's agent first: the rendezvous ranks the agents by pid
    return Launch(name, nodes, tag, port, started)


def kill_launch(launch: Launch) -> list[int]:
    """SIGKILL every process of the launch: each torchrun's group, each worker's group (torchrun
    starts its workers in sessions of their own), and whatever else carries the tag."""
    victims = set(tagged(launch.tag))
    for node in launch.nodes:
        victims.add(node.proc.pid)
        victims.update(node.workers)
    for pid in sorted(victims):
        for kill in (os.killpg, os.kill):
            try:
                kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    for node in launch.nodes:
        try:
            node.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
    return sorted(victims)


def wait_all(launch: Launch, timeout: float) -> bool:
    """Wait for both torchruns to end; False (and every process of the launch SIGKILLed) when
    they have not within ``timeout`` seconds of the launch's start.  Processes of the launch
    still alive after both torchruns ended (an orphaned worker) are killed and listed in
    ``launch.strays``."""
    deadline = launch.started + timeout
    while launch.running():
        launch.poll()
        if time.monotonic() > deadline:
            launch.ended = time.monotonic()
            launch.hung = True
            launch.hung_nodes = [node.index for node in launch.nodes if node.proc.poll() is None]
            kill_launch(launch)
            return False
        time.sleep(0.05)
    launch.ended = launch.ended or time.monotonic()
    grace = time.monotonic() + 5
    while (left := tagged(launch.tag)) and time.monotonic() < grace:
        time.sleep(0.1)
    if left:
        launch.strays = left
        kill_launch(launch)
    return True


def wait_for_text(launch: Launch, needle: str, timeout: float, attempt: int | None = None) -> bool:
    """Wait until some rank's stdout holds ``needle`` (rank 0 alone logs training lines)."""
    deadline = min(time.monotonic() + timeout, launch.started + timeout)
    while time.monotonic() < deadline:
        launch.poll()
        for log in launch.logs(attempt):
            if needle in log.stdout():
                return True
        if not launch.running():
            return False
        time.sleep(0.03)
    return False


SUMMARY_ENTRY = re.compile(r"rank\s*:\s*(\d+)\s*\(local_rank:\s*(\d+)\)\s*\n\s*exitcode\s*:\s*(-?\d+)"
                           r"(?:\s*\(pid:\s*(\d+)\))?")
CLOSING = re.compile(r"Sending process (\d+) closing signal (\w+)")


def torchrun_exit_codes(text: str) -> dict[int, tuple[int, int | None]]:
    """rank -> (exitcode, pid) from torchrun's failure summary (``rank : 3 (local_rank: 1)`` /
    ``exitcode : 1 (pid: 1234)``, a negative code for a signal); the last summary wins (a
    restarted run can print more than one)."""
    codes: dict[int, tuple[int, int | None]] = {}
    for m in SUMMARY_ENTRY.finditer(text):
        codes[int(m.group(1))] = (int(m.group(3)), int(m.group(4)) if m.group(4) else None)
    return codes


def torchrun_closed(text: str) -> dict[int, str]:
    """pid -> signal name of every worker torchrun stopped itself ("Sending process P closing
    signal SIGTERM": its shutdown, or after a local worker failed)."""
    return {int(m.group(1)): m.group(2) for m in CLOSING.finditer(text)}


def rank_exit_codes(launch: Launch) -> dict[int, tuple[int | None, str]]:
    """rank -> (exit code or None, where it came from) for the last attempt's workers."""
    codes: dict[int, tuple[int | None, str]] = {}
    workers = {w.rank: w for w in launch.workers()}
    for node in launch.nodes:
        summary = torchrun_exit_codes(node.text())
        local = [r for r, w in workers.items() if w.pid in node.workers]
        ranks = local or [launch.group_ranks()[node.index] * PER_NODE + i for i in range(PER_NODE)]
        for rank in ranks:
            worker = workers.get(rank)
            code = WATCHER.code(worker.pid) if worker is not None else None
            if code is not None:
                codes[rank] = (code, "proc connector")
            elif rank in summary:
                codes[rank] = (summary[rank][0], "torchrun summary")
            elif node.proc.returncode == 0:
                codes[rank] = (0, "torchrun exit 0")
            else:
                codes[rank] = (None, "unknown: torchrun reported none" + (
                    f" ({WATCHER.problem})" if WATCHER.problem else ""))
    return dict(sorted(codes.items()))


def train_argv(train: Path, val: Path, out: Path, *extra: str) -> list[str]:
    return ["--config", str(CONFIG), "--out", str(out), "--set", *BASE, f"data.train_dir={train}",
            f"data.val_dir={val}", *extra]


def load_weights(path: Path) -> dict:
    from alexnet_train.checkpoint import load_checkpoint

    return load_checkpoint(path)["model"]


def weights_differ(a: Path, b: Path) -> str | None:
    """None when the two checkpoints' weights are bit-identical, else what differs."""
    import torch

    wa, wb = load_weights(a), load_weights(b)
    if wa.keys() != wb.keys():
        return f"{a} and {b} hold other tensors"
    differ = [k for k in wa if not torch.equal(wa[k], wb[k])]
    return f"{len(differ)} of {len(wa)} tensors differ (first {differ[0]})" if differ else None


def listing(root: Path) -> dict[str, tuple[int, int]]:
    """relative path -> (size, mtime_ns) of every file under ``root``."""
    out = {}
    for path in sorted(root.rglob("*")) if root.exists() else []:
        if path.is_file():
            st = path.stat()
            out[str(path.relative_to(root))] = (st.st_size, st.st_mtime_ns)
    return out


class Verdict:
    """The problems found with one fault, and what was seen, for the report."""

    def __init__(self) -> None:
        self.problems: list[str] = []
        self.details: dict = {"launches": []}

    def expect(self, ok: bool, why: str) -> bool:
        if not ok:
            self.problems.append(why)
        return ok

    def record(self, launch: Launch) -> None:
        self.details["launches"].append({
            "name": launch.name, "seconds": round(launch.seconds, 1), "hung": launch.hung,
            "torchrun_exit": [node.proc.returncode for node in launch.nodes],
            "group_ranks": launch.group_ranks(),
            "rank_exit": {str(r): {"code": c, "source": s} for r, (c, s) in rank_exit_codes(launch).items()},
            "closed_by_torchrun": {str(p): s for node in launch.nodes for p, s in torchrun_closed(node.text()).items()},
            "attempts": launch.last_attempt() + 1,
            "strays": launch.strays,
            "logs": [str(node.log_dir) for node in launch.nodes],
            "torchrun_output_tail": [node.text()[-3000:] for node in launch.nodes],
        })

    def ended(self, launch: Launch, timeout: float) -> bool:
        """The launch ended by itself; a hang names the nodes still running (a torchrun whose
        workers all finished waits up to 300 s in its exit barrier for the other node's)."""
        self.record(launch)
        if launch.hung:
            ended = {n.index: n.proc.returncode for n in launch.nodes if n.index not in launch.hung_nodes}
            self.problems.append(f"{launch.name}: hang: node(s) {launch.hung_nodes} still running after "
                                 f"{timeout:.0f} s, killed" + (f" (torchrun exit of the others: {ended})"
                                                               if ended else ""))
            return False
        if launch.strays:
            self.problems.append(f"{launch.name}: {len(launch.strays)} processes outlived both torchruns "
                                 f"(killed: {launch.strays})")
        return True

    def exit_codes(self, launch: Launch, expected: int, torchrun_zero: bool | None = None) -> None:
        codes = rank_exit_codes(launch)
        closed = {p for node in launch.nodes for p in torchrun_closed(node.text())}
        workers = {w.rank: w for w in launch.workers()}
        wrong = []
        for rank in range(WORLD):
            code, source = codes.get(rank, (None, "no worker seen"))
            if code == expected:
                continue
            note = f"rank {rank} exit {code if code is not None else '?'} ({source})"
            if rank in workers and workers[rank].pid in closed:
                note += ", after torchrun sent it SIGTERM (a local sibling had ended)"
            wrong.append(note)
        self.expect(not wrong, f"{launch.name}: expected exit {expected} on every rank: " + "; ".join(wrong))
        if torchrun_zero is not None:
            rcs = [node.proc.returncode for node in launch.nodes]
            ok = all(rc == 0 for rc in rcs) if torchrun_zero else all(rc not in (0, None) for rc in rcs)
            self.expect(ok, f"{launch.name}: torchrun exit codes {rcs}, expected "
                            + ("0 on both nodes" if torchrun_zero else "non-zero on both nodes"))

    def no_tracebacks(self, launch: Launch) -> None:
        bad = [f"rank {log.rank} (attempt {log.attempt}) {stream}" for log in launch.logs()
               for stream, text in (("stdout", log.stdout()), ("stderr", log.stderr())) if TRACEBACK in text]
        self.expect(not bad, f"{launch.name}: traceback in " + ", ".join(bad))

    def error_line(self, launch: Launch, *needles: str) -> None:
        """Rank 0's stderr holds exactly one error line and it contains every needle; the other
        ranks print none."""
        logs = launch.latest_logs()
        rank0 = next((log for log in logs if log.rank == 0), None)
        if not self.expect(rank0 is not None, f"{launch.name}: no log of rank 0"):
            return
        lines = [ln for ln in rank0.stderr().splitlines() if ln.startswith(ERROR_PREFIX)]
        if self.expect(len(lines) == 1, f"{launch.name}: rank 0 printed {len(lines)} error lines, expected 1"
                       + (f": {lines}" if lines else "")):
            missing = [n for n in needles if n not in lines[0]]
            self.expect(not missing, f"{launch.name}: rank 0's error line lacks {missing}: {lines[0]!r}")
        for log in logs:
            if log.rank == 0:
                continue
            others = [ln for ln in log.stderr().splitlines() if ln.startswith(ERROR_PREFIX)]
            self.expect(not others, f"{launch.name}: rank {log.rank} printed an error line too: {others[0]!r}"
                        if others else "")

    def rank0_says(self, launch: Launch, needle: str, attempt: int | None = None) -> None:
        log = launch.rank_log(0, attempt)
        text = (log.stdout() + log.stderr()) if log else ""
        self.expect(needle in text, f"{launch.name}: rank 0 did not print {needle!r}")

    def checkpoints_load(self, out: Path) -> None:
        from alexnet_train.checkpoint import CheckpointError, load_checkpoint

        for path in sorted(out.glob("*.pth")) if out.exists() else []:
            try:
                load_checkpoint(path)
            except CheckpointError as exc:
                self.problems.append(f"{path.name} does not load: {exc}")

    def same_weights(self, out: Path, reference: Path) -> None:
        if not self.expect((out / "last.pth").is_file(), f"no {out / 'last.pth'} to compare"):
            return
        differ = weights_differ(out / "last.pth", reference / "last.pth")
        self.expect(differ is None, f"final weights differ from the uninterrupted run's: {differ}")


class Context:
    """The work folder, the pristine data and the reference runs (one per config)."""

    def __init__(self, work: Path, timeout: float = 150.0) -> None:
        self.work = Path(work)
        self.work.mkdir(parents=True, exist_ok=True)
        self.timeout = timeout
        self.references: dict[str, Path] = {}
        self.reference_seconds: dict[str, float] = {}
        self._tree: tuple[Path, Path] | None = None
        self.launches: list[Launch] = []

    @property
    def tree(self) -> tuple[Path, Path]:
        if self._tree is None:
            self._tree = make_tree(self.work / "data")
        return self._tree

    def dir(self, *parts: str) -> Path:
        path = self.work.joinpath(*parts)
        if path.exists():
            shutil.rmtree(path)
        path.mkdir(parents=True)
        return path

    def launch(self, name: str, run_dir: Path, argvs: list[list[str]], **kw) -> Launch:
        launch = launch_nodes(name, argvs, run_dir, **kw)
        self.launches.append(launch)
        return launch

    def run(self, name: str, run_dir: Path, argvs: list[list[str]], **kw) -> Launch:
        launch = self.launch(name, run_dir, argvs, **kw)
        wait_all(launch, self.timeout)
        return launch

    def reference(self, key: str, train: Path, val: Path, *extra: str) -> Path:
        """OUT of an uninterrupted run of this config (run on first use); Skipped-free: a
        failed reference raises RuntimeError naming what went wrong."""
        if key not in self.references:
            run_dir = self.dir("reference", key)
            out = run_dir / "out"
            launch = self.run(f"reference {key}", run_dir, [train_argv(train, val, out, *extra)] * NODES)
            self.reference_seconds[key] = round(launch.seconds, 1)
            verdict = Verdict()
            if verdict.ended(launch, self.timeout):
                verdict.exit_codes(launch, 0, torchrun_zero=True)
                verdict.no_tracebacks(launch)
                verdict.expect((out / "last.pth").is_file(), "no last.pth")
            if verdict.problems:
                raise RuntimeError(f"the uninterrupted reference run ({key}) failed: " + "; ".join(verdict.problems))
            self.references[key] = out
        return self.references[key]

    def cleanup(self) -> None:
        for launch in self.launches:
            if tagged(launch.tag):
                kill_launch(launch)
        self.launches = []


def _interrupt_and_resume(ctx: Context, name: str, signum: int, send: Callable[[Launch], str | None],
                          train: Path, val: Path, extra: tuple[str, ...], reference: Path,
                          when: str = f"epoch 1/{EPOCHS} train 2/{STEPS}", after_step: int | None = None) -> Verdict:
    """Start a run, ``send`` the signal once rank 0 logs ``when``, expect every rank to exit
    128 + signum with a resumable last.pth, then the same command again to finish with the
    reference's weights."""
    verdict = Verdict()
    run_dir = ctx.dir(name)
    out = run_dir / "out"
    argv = train_argv(train, val, out, *extra)
    launch = ctx.launch(f"{name} (interrupted)", run_dir / "first", [argv] * NODES)
    sent = wait_for_text(launch, when, ctx.timeout)
    if sent:
        problem = send(launch)
        sent = verdict.expect(problem is None, f"harness: {problem}")
    else:
        verdict.problems.append(f"rank 0 never logged {when!r} (the run ended or stalled before it)")
    wait_all(launch, ctx.timeout)
    if not verdict.ended(launch, ctx.timeout) or not sent:
        return verdict
    sig = signal.Signals(signum).name
    verdict.exit_codes(launch, 128 + signum, torchrun_zero=False)
    verdict.no_tracebacks(launch)
    verdict.rank0_says(launch, f"interrupted by {sig}; resumable checkpoint: {out / 'last.pth'}")
    for log in launch.logs():
        if log.rank != 0:
            verdict.expect("interrupted by" not in log.stdout() + log.stderr(),
                           f"rank {log.rank} printed an 'interrupted' line too (rank 0 speaks for the run)")
    verdict.checkpoints_load(out)
    if not verdict.expect((out / "last.pth").is_file(), f"no {out / 'last.pth'} after {sig}"):
        return verdict
    state = _position(out / "last.pth")
    verdict.details["saved_at"] = state
    if after_step is not None:
        verdict.expect(state["epoch"] > 0 or state["step_in_epoch"] > after_step,
                       f"the interruption saved at epoch {state['epoch'] + 1} step {state['step_in_epoch']}, "
                       f"not after step {after_step} (harness: signalled too early)")
    resumed = ctx.run(f"{name} (resumed)", run_dir / "second", [argv] * NODES)
    if not verdict.ended(resumed, ctx.timeout):
        return verdict
    verdict.exit_codes(resumed, 0, torchrun_zero=True)
    verdict.no_tracebacks(resumed)
    verdict.rank0_says(resumed, "resuming from")
    verdict.checkpoints_load(out)
    verdict.same_weights(out, reference)
    return verdict


def _position(path: Path) -> dict:
    from alexnet_train.checkpoint import load_checkpoint

    state = load_checkpoint(path)
    return {"epoch": int(state.get("epoch", -1)), "step_in_epoch": int(state.get("step_in_epoch", -1))}


def fault_kill9_restart(ctx: Context) -> Verdict:
    """kill -9 of one worker of node 1 after a mid-epoch checkpoint, torchrun --max-restarts 1:
    all workers restarted, the run resumes from last.pth and ends as the uninterrupted one."""
    train, val = ctx.tree
    reference = ctx.reference("base", train, val)
    verdict = Verdict()
    run_dir = ctx.dir("kill9_restart")
    out = run_dir / "out"
    # torchrun's agents share their rendezvous store with the workers by default, and then a
    # restarted worker may read the previous attempt's addresses (pytorch/pytorch#135712): its
    # gloo or NCCL connect is refused.  The README tells --max-restarts users to set this.
    launch = ctx.launch("kill9_restart", run_dir, [train_argv(train, val, out)] * NODES, max_restarts=1,
                        extra_env={"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"})
    victim = None
    if wait_for_text(launch, "checkpoint: ", ctx.timeout):
        group = launch.group_ranks()
        node1 = next(n for n in launch.nodes if group[n.index] == 1)
        mine = sorted((w for w in node1.workers.values() if w.attempt == 0), key=lambda w: w.local_rank)
        if mine:
            victim = mine[-1]
            os.kill(victim.pid, signal.SIGKILL)
            verdict.details["killed"] = {"pid": victim.pid, "rank": victim.rank}
        else:
            verdict.problems.append("harness: no worker of node 1 found to kill")
    else:
        verdict.problems.append("rank 0 never logged a 'checkpoint:' line before the run ended")
    wait_all(launch, ctx.timeout)
    if not verdict.ended(launch, ctx.timeout):
        return verdict
    rcs = [node.proc.returncode for node in launch.nodes]
    verdict.expect(rcs == [0] * NODES, f"torchrun exit codes {rcs}, expected 0 on both nodes after the restart")
    restarted = any(log.attempt > 0 for log in launch.logs())
    if victim is not None:
        verdict.expect(restarted, "no restart seen (no attempt_1 log folder): the kill came too late?")
    verdict.exit_codes(launch, 0)
    verdict.no_tracebacks(launch)
    # What the killed generation's survivors printed is allowed (a "lost contact" line) and kept
    # for the report.  An agent that restarts because the other node rejoined keeps its restart
    # count, so its new workers write over the old ones' attempt_0 logs: latest_logs() is each
    # node's newest generation, whatever its folder.
    verdict.details["attempt0_error_lines"] = {
        str(log.rank): [ln for ln in log.stderr().splitlines() if ln.startswith(ERROR_PREFIX)]
        for log in launch.logs(0)}
    for rank, lines in verdict.details["attempt0_error_lines"].items():
        other = [ln for ln in lines if LOST_CONTACT not in ln]
        verdict.expect(not other, f"rank {rank} of the killed generation printed {other[:1]}, not '{LOST_CONTACT}'")
    if restarted:
        verdict.rank0_says(launch, "resuming from")
        for log in launch.latest_logs():
            errors = [ln for ln in log.stderr().splitlines() if ln.startswith(ERROR_PREFIX)]
            verdict.expect(not errors, f"rank {log.rank} of the restart printed {errors[:1]}")
    verdict.checkpoints_load(out)
    verdict.same_weights(out, reference)
    return verdict


def fault_sigterm_node_group(ctx: Context) -> Verdict:
    """SIGTERM to node 1's whole process group (torchrun passes it to its workers' groups):
    every rank on both nodes exits 143 with last.pth saved; the same command resumes exactly."""
    train, val = ctx.tree
    reference = ctx.reference("base", train, val)

    def send(launch: Launch) -> str | None:
        group = launch.group_ranks()
        node1 = next(n for n in launch.nodes if group[n.index] == 1)
        os.killpg(node1.proc.pid, signal.SIGTERM)  # start_new_session: its pgid is its pid
        return None

    return _interrupt_and_resume(ctx, "sigterm_node_group", signal.SIGTERM, send, train, val, (), reference)


def fault_sigusr1(ctx: Context) -> Verdict:
    """SIGUSR1 (Slurm's warning) to rank 1's main process alone: all 4 ranks exit 138, the
    resume ends as the uninterrupted run."""
    train, val = ctx.tree
    reference = ctx.reference("base", train, val)
    return _interrupt_and_resume(ctx, "sigusr1", signal.SIGUSR1, _signal_rank(1, signal.SIGUSR1),
                                 train, val, (), reference)


def _signal_rank(rank: int, signum: int) -> Callable[[Launch], str | None]:
    def send(launch: Launch) -> str | None:
        worker = launch.worker(rank)
        if worker is None:
            return f"no worker process of rank {rank} found"
        os.kill(worker.pid, signum)
        return None
    return send


# The unreadable file of the bad-image faults: rank 2 (node 1, not rank 0) reads it at step 3
# of epoch 1, after the step-2 checkpoint, so an error run leaves a checkpoint to load.
BAD_RANK, BAD_STEP = 2, 3


def _bad_image_tree(ctx: Context, name: str) -> tuple[Path, Path, str]:
    train, _ = ctx.tree
    train, val = copy_tree(train, ctx.dir(name) / "data")
    bad = batch_files(train, 1, BAD_RANK, BAD_STEP)[0]
    break_files([bad])
    return train, val, bad


def fault_bad_image_error(ctx: Context) -> Verdict:
    """One JPEG rank 2 reads in epoch 1 is garbage, data.on_bad_image=error: every rank exits 1
    at once, rank 0 prints the one line naming the file."""
    train, val, bad = _bad_image_tree(ctx, "bad_image_error")
    verdict = Verdict()
    verdict.details["bad_file"] = bad
    out = ctx.work / "bad_image_error" / "out"
    launch = ctx.run("bad_image_error", ctx.work / "bad_image_error" / "run",
                     [train_argv(train, val, out, "data.on_bad_image=error")] * NODES)
    if not verdict.ended(launch, ctx.timeout):
        return verdict
    verdict.exit_codes(launch, 1, torchrun_zero=False)
    verdict.no_tracebacks(launch)
    verdict.error_line(launch, bad, "unreadable image")
    verdict.checkpoints_load(out)
    return verdict


def fault_bad_image_skip(ctx: Context) -> Verdict:
    """The same file with data.on_bad_image=skip: the run finishes, rank 0 logs the skip of a
    file another rank read, and metrics.jsonl counts it."""
    train, val, bad = _bad_image_tree(ctx, "bad_image_skip")
    verdict = Verdict()
    verdict.details["bad_file"] = bad
    out = ctx.work / "bad_image_skip" / "out"
    launch = ctx.run("bad_image_skip", ctx.work / "bad_image_skip" / "run",
                     [train_argv(train, val, out, "data.on_bad_image=skip", "data.max_bad_fraction=0.5")] * NODES)
    if not verdict.ended(launch, ctx.timeout):
        return verdict
    verdict.exit_codes(launch, 0, torchrun_zero=True)
    verdict.no_tracebacks(launch)
    verdict.rank0_says(launch, f"warning: skipping {bad}: unreadable image")
    rows = _metrics(out)
    verdict.details["bad_images"] = [r.get("bad_images") for r in rows]
    first = next((r for r in rows if r.get("epoch") == 1), None)
    verdict.expect(first is not None and first.get("bad_images") == 1,
                   f"metrics.jsonl's epoch 1 has bad_images {first.get('bad_images') if first else None}, expected 1")
    verdict.checkpoints_load(out)
    return verdict


def _metrics(out: Path) -> list[dict]:
    rows = []
    for line in _read(out / "metrics.jsonl").splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            pass
    return rows


# Rank 3's whole batch at step 2 of epoch 1 is unreadable: it must still join that step.
EMPTY_RANK, EMPTY_STEP = 3, 2


def fault_unreadable_batch(ctx: Context) -> Verdict:
    """Every file of rank 3's batch at epoch 1, step 2 is garbage (skip): the run finishes; a run
    interrupted (SIGUSR1 to rank 0) after that step and resumed ends bit-identical to it."""
    train, _ = ctx.tree
    # Not under the run's folder, which _interrupt_and_resume makes anew.
    train, val = copy_tree(train, ctx.dir("unreadable_batch-data") / "data")
    broken = batch_files(train, 1, EMPTY_RANK, EMPTY_STEP)
    break_files(broken)
    extra = ("data.on_bad_image=skip", "data.max_bad_fraction=0.5")
    try:
        reference = ctx.reference("unreadable_batch", train, val, *extra)
    except RuntimeError as exc:
        verdict = Verdict()
        verdict.problems.append(str(exc))
        return verdict
    verdict = _interrupt_and_resume(ctx, "unreadable_batch", signal.SIGUSR1, _signal_rank(0, signal.SIGUSR1),
                                    train, val, extra, reference,
                                    when=f"epoch 1/{EPOCHS} train {EMPTY_STEP}/{STEPS}", after_step=EMPTY_STEP)
    verdict.details["broken_files"] = broken
    verdict.details["reference_bad_images"] = [r.get("bad_images") for r in _metrics(reference)]
    return verdict


def fault_full_disk_rank0(ctx: Context) -> Verdict:
    """OUT on a tmpfs with room for config.yaml and one checkpoint, not for the next one's
    temporary copy: every rank exits 1, rank 0 says the write failed for lack of space, and
    every checkpoint left in OUT loads."""
    if os.geteuid() != 0:
        raise Skipped("needs root to mount tmpfs")
    train, val = ctx.tree
    reference = ctx.reference("base", train, val)
    checkpoint = (reference / "last.pth").stat().st_size
    # Small files (config.yaml, metrics.jsonl, TensorBoard's events, the lock) take a page or a
    # few each; the first last.pth fits, the second one's temporary copy beside it does not.
    size_k = (64 * 1024 + checkpoint * 3 // 2) // 1024
    verdict = Verdict()
    verdict.details["tmpfs_kib"] = size_k
    verdict.details["checkpoint_bytes"] = checkpoint
    run_dir = ctx.dir("full_disk_rank0")
    mnt = run_dir / "mnt"
    mnt.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_k}k", "tmpfs", str(mnt)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        raise Skipped(f"cannot mount tmpfs: {(mounted.stderr or mounted.stdout).strip()}")
    try:
        out = mnt / "out"
        launch = ctx.run("full_disk_rank0", run_dir / "run", [train_argv(train, val, out)] * NODES)
        if verdict.ended(launch, ctx.timeout):
            verdict.exit_codes(launch, 1, torchrun_zero=False)
            verdict.no_tracebacks(launch)
            verdict.error_line(launch, NO_SPACE)
            verdict.checkpoints_load(out)
            verdict.details["left_in_out"] = sorted(listing(out))
    finally:
        ctx.cleanup()
        umount = subprocess.run(["umount", str(mnt)], capture_output=True, text=True)
        if umount.returncode != 0:
            verdict.problems.append(f"harness: umount {mnt} failed: {umount.stderr.strip()}")
    return verdict


def fault_node_local_out(ctx: Context) -> Verdict:
    """Each node its own --out, only one of them holding a checkpoint (on node 1's side, then
    on rank 0's): every rank exits 2 with one line saying OUT must be shared storage, and
    neither OUT gets a new file (but .lock) or a changed one."""
    train, val = ctx.tree
    reference = ctx.reference("base", train, val)
    verdict = Verdict()
    for variant, holder in (("checkpoint on node 1 only", 1), ("checkpoint on rank 0's node only", 0)):
        run_dir = ctx.dir("node_local_out", f"holder{holder}")
        outs = [run_dir / "out_a", run_dir / "out_b"]
        for out in outs:
            out.mkdir()
        # A finished OUT of the same config; train.epochs=4 leaves it an epoch to do, so a run
        # that wrongly went ahead would train (and write) rather than find nothing to do.
        for item in reference.iterdir():
            if item.name != ".lock":
                (shutil.copytree if item.is_dir() else shutil.copy2)(item, outs[holder] / item.name)
        before = [listing(out) for out in outs]
        argvs = [train_argv(train, val, out, "train.epochs=4") for out in outs]
        launch = ctx.run(f"node_local_out ({variant})", run_dir / "run", argvs)
        if not verdict.ended(launch, ctx.timeout):
            continue
        if launch.group_ranks() != {0: 0, 1: 1}:
            verdict.problems.append(f"harness: rank 0 landed on node 1 ({launch.group_ranks()}); "
                                    "the variant's OUTs were swapped")
        verdict.exit_codes(launch, 2, torchrun_zero=False)
        verdict.no_tracebacks(launch)
        verdict.error_line(launch, SHARED_OUT)
        for out, was in zip(outs, before):
            now = listing(out)
            changed = sorted(k for k in set(now) | set(was) if now.get(k) != was.get(k) and k != ".lock")
            verdict.expect(not changed, f"{launch.name}: {out.name} changed: {changed[:6]}")
    return verdict


def fault_schedule_kind_changed(ctx: Context) -> Verdict:
    """A finished run's OUT resumed with schedule.kind changed (step -> cosine): every rank exits
    2, one line names schedule.kind with both values, OUT (config.yaml first) is unchanged."""
    train, val = ctx.tree
    reference = ctx.reference("base", train, val)
    verdict = Verdict()
    run_dir = ctx.dir("schedule_kind_changed")
    out = run_dir / "out"
    shutil.copytree(reference, out)
    config_before = (out / "config.yaml").read_bytes()
    before = listing(out)
    launch = ctx.run("schedule_kind_changed", run_dir / "run",
                     [train_argv(train, val, out, "schedule.kind=cosine")] * NODES)
    if not verdict.ended(launch, ctx.timeout):
        return verdict
    verdict.exit_codes(launch, 2, torchrun_zero=False)
    verdict.no_tracebacks(launch)
    verdict.error_line(launch, "schedule.kind", "step", "cosine")
    verdict.expect((out / "config.yaml").read_bytes() == config_before, "OUT/config.yaml was rewritten")
    now = listing(out)
    changed = sorted(k for k in set(now) | set(before) if now.get(k) != before.get(k) and k != ".lock")
    verdict.expect(not changed, f"OUT changed: {changed[:6]}")
    return verdict


FAULTS: dict[str, Callable[[Context], Verdict]] = {
    "kill9_restart": fault_kill9_restart,
    "sigterm_node_group": fault_sigterm_node_group,
    "sigusr1": fault_sigusr1,
    "bad_image_error": fault_bad_image_error,
    "bad_image_skip": fault_bad_image_skip,
    "unreadable_batch": fault_unreadable_batch,
    "full_disk_rank0": fault_full_disk_rank0,
    "node_local_out": fault_node_local_out,
    "schedule_kind_changed": fault_schedule_kind_changed,
}


@dataclass
class Outcome:
    name: str
    status: str               # clean | failed | skipped
    seconds: float
    problems: list[str]
    details: dict

    def line(self) -> str:
        if self.status == "skipped":
            return f"fault {self.name}: skipped ({self.problems[0]})"
        if self.status == "clean":
            return f"fault {self.name}: clean ({self.seconds:.0f} s)"
        return f"fault {self.name}: FAILED: " + "; ".join(self.problems)


def run_fault(ctx: Context, name: str) -> Outcome:
    """One fault, judged; a harness error is a failure that says so, never an escape."""
    WATCHER.start()
    started = time.monotonic()
    try:
        verdict = FAULTS[name](ctx)
        status = "clean" if not verdict.problems else "failed"
        problems, details = verdict.problems, verdict.details
    except Skipped as exc:
        status, problems, details = "skipped", [str(exc)], {}
    except Exception as exc:  # noqa: BLE001 - reported as this fault's failure
        status, problems = "failed", [f"{type(exc).__name__}: {exc}"]
        details = {"traceback": traceback.format_exc()}
    finally:
        ctx.cleanup()
    details["exit_codes_from"] = "proc connector" if WATCHER.problem is None else f"torchrun ({WATCHER.problem})"
    return Outcome(name, status, round(time.monotonic() - started, 1), problems, details)


def _stop_harness(_signum: int, _frame) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, help="folder for data, runs and logs (default: a new temporary one)")
    p.add_argument("--only", nargs="+", metavar="NAME", choices=list(FAULTS), help="these faults only")
    p.add_argument("--keep", action="store_true", help="keep --work afterwards (default: removed)")
    p.add_argument("--timeout", type=float, default=150.0, metavar="S",
                   help="seconds one launch of both nodes may take before it counts as a hang (default 150)")
    p.add_argument("--report", type=Path, metavar="FILE", help="write the outcomes as JSON")
    p.add_argument("--list", action="store_true", help="list the faults and exit")
    p.add_argument("--no-proc-connector", action="store_true",
                   help="read exit codes from torchrun's failure summaries only, as where the kernel's "
                        "proc connector is not available (fewer ranks' codes are known)")
    args = p.parse_args(argv)
    if args.list:
        for name, fn in FAULTS.items():
            print(f"{name}: {' '.join((fn.__doc__ or '').split())}")
        return 0
    if args.no_proc_connector:
        WATCHER.problem = "--no-proc-connector"
    work = args.work or Path(tempfile.mkdtemp(prefix="fault_check-"))
    ctx = Context(work, args.timeout)
    # The torchruns live in sessions of their own: a harness stopped by SIGTERM kills them first.
    signal.signal(signal.SIGTERM, _stop_harness)
    WATCHER.start()
    outcomes = []
    try:
        for name in args.only or list(FAULTS):
            outcome = run_fault(ctx, name)
            outcomes.append(outcome)
            print(outcome.line(), flush=True)
    except KeyboardInterrupt:
        ctx.cleanup()
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        WATCHER.stop()
    tried = [o for o in outcomes if o.status != "skipped"]
    clean = [o for o in tried if o.status == "clean"]
    print(f"faults: {len(tried)} tried, {len(clean)} clean")
    print("backend: gloo on CPUs; NCCL's watchdog (what ends a rank whose NCCL peer stops answering) "
          "is not exercised: see --help")
    if args.report:
        report = {"tried": len(tried), "clean": len(clean), "work": str(work) if args.keep else None,
                  "reference_seconds": ctx.reference_seconds,
                  "faults": [o.__dict__ for o in outcomes]}
        args.report.write_text(json.dumps(report, indent=1, default=str) + "\n")
    if args.keep:
        print(f"work folder kept: {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if len(clean) == len(tried) else 1


if __name__ == "__main__":
    sys.exit(main())
