"""Process topology from the launch environment (torchrun, Slurm's srun, or none), and collectives.

Usage::

    dist = DistInfo.from_env()      # rank 0 of 1 when launched by neither torchrun nor srun
    dist.launcher, dist.init_method # "torchrun" / "env://"; "slurm" / "tcp://node01:21234"
    if dist.is_main: write_logs()
    totals = all_reduce_sum(totals)  # exact metrics over the shards of a val set

The launchers are one table (:data:`LAUNCHERS`), read in order: torchrun's
variables win where both are set (torchrun started inside a Slurm job).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Mapping

import torch
from .errors import RankFailed


@dataclass(frozen=True)
class Launcher:
    """Where one launcher keeps rank, world size and local rank; ``marker`` says it is present."""

    name: str
    marker: str
    rank: str
    world_size: str
    local_rank: str


# srun sets SLURM_STEP_ID only in the tasks of a job step; a batch script (and what it starts
# without srun) has SLURM_PROCID=0 and SLURM_NTASKS of the whole allocation but no step, so
# it must not wait for tasks that were never launched.
LAUNCHERS = (
    Launcher("torchrun", marker="WORLD_SIZE", rank="RANK", world_size="WORLD_SIZE", local_rank="LOCAL_RANK"),
    Launcher("slurm", marker="SLURM_STEP_ID", rank="SLURM_PROCID", world_size="SLURM_NTASKS",
             local_rank="SLURM_LOCALID"),
)

SLURM_BASE_PORT = 20000  # + job id mod 10000: below Linux's ephemeral range (32768-60999)


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    launcher: str = "none"  # "none" | "torchrun" | "slurm"
    init_method: str = "env://"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "DistInfo":
        """The first launcher of :data:`LAUNCHERS` whose marker is set (pure: no process group)."""
        env = os.environ if env is None else env
        for launcher in LAUNCHERS:
            if launcher.marker not in env:
                continue
            rank, world_size, local_rank = (
                _number(launcher.name, key, env.get(key, default))
                for key, default in ((launcher.rank, "0"), (launcher.world_size, "1"), (launcher.local_rank, "0"))
            )
            if not 0 <= rank < world_size:
                raise ValueError(f"{launcher.name} environment: rank {rank} is outside world size {world_size}")
            init = "env://" if launcher.name == "torchrun" else slurm_init_method(env)
            return cls(rank, world_size, local_rank, launcher.name, init)
        return cls()


def _tasks_on_node(env: Mapping[str, str]) -> int | None:
    """Slurm's tasks of this step on this node, from ``SLURM_STEP_TASKS_PER_NODE`` (or
    ``SLURM_TASKS_PER_NODE``), e.g. ``4(x2),2`` and ``SLURM_NODEID``; None if unreadable."""
    spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    if not spec:
        return None
    per_node: list[int] = []
    try:
        for part in spec.split(","):
            count, _, repeat = part.partition("(x")
            per_node += [int(count)] * (int(repeat.rstrip(")")) if repeat else 1)
        node = int(env.get("SLURM_NODEID", "0"))
    except ValueError:
        return None
    return per_node[node] if 0 <= node < len(per_node) else None


def ranks_sharing_cores(dist: DistInfo, cores: int, env: Mapping[str, str] | None = None) -> int:
    """How many training processes on this node share this process's ``cores``.

    torchrun starts its local ranks with one CPU set: ``LOCAL_WORLD_SIZE`` of them share it.
    Slurm binds each task to its own cores where ``--cpus-per-task`` is given (the affinity
    then already is this task's share); otherwise the step's tasks on this node share them.
    """
    env = os.environ if env is None else env
    if dist.launcher == "torchrun":
        return max(1, int(env.get("LOCAL_WORLD_SIZE") or 1))
    if dist.launcher == "slurm":
        per_task = env.get("SLURM_CPUS_PER_TASK", "")
        if per_task.isdigit() and cores <= int(per_task):
            return 1
        return max(1, _tasks_on_node(env) or 1)
    return 1


def rank_gpu(local_rank: int, visible: int) -> int:
    """The index, among the ``visible`` GPUs this process sees, of the one GPU of the process
    with ``local_rank``: the rule every part of a run (DDP's ``device_ids``, the inputs,
    evaluation, checkpoint loading) follows.  Pure.

    - one process per GPU with all of the node's GPUs visible (torchrun, or srun with
      ``--gres=gpu:N``): GPU ``local_rank``;
    - one visible GPU per task (Slurm ``--gpus-per-task=1``, or ``CUDA_VISIBLE_DEVICES`` set
      per rank): GPU 0, whatever the local rank;
    - one process over all visible GPUs (``dist.mode: dp``, or no launcher): GPU 0, the first.

    More local ranks than visible GPUs would put two ranks on one GPU, which NCCL refuses:
    ValueError, saying what is wrong.
    """
    if visible < 1:
        raise ValueError("this process sees no CUDA device")
    if visible == 1:
        return 0
    if 0 <= local_rank < visible:
        return local_rank
    raise ValueError(f"local rank {local_rank} but this process sees only {visible} GPUs (0-{visible - 1}): "
                     "start at most one process per visible GPU (torchrun --nproc_per_node, or Slurm's "
                     "--ntasks-per-node), or give each task its own GPU (--gpus-per-task=1)")


def slurm_init_method(env: Mapping[str, str]) -> str:
    """``tcp://HOST:PORT`` of rank 0 in a Slurm step; MASTER_ADDR / MASTER_PORT override either part."""
    nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    host = env.get("MASTER_ADDR") or (first_host(nodes) if nodes else "127.0.0.1")
    port = env.get("MASTER_PORT")
    if port is None:
        port = str(SLURM_BASE_PORT + _number("slurm", "SLURM_JOB_ID", env.get("SLURM_JOB_ID", "0")) % 10000)
    return f"tcp://{host}:{port}"


def _number(launcher: str, key: str, value: str) -> int:
    # Stricter than int(), which also reads "4_2" and "+1".
    if not value.strip().isdigit():
        raise ValueError(f"{launcher} environment: {key} is {value!r}, not a number")
    return int(value)


_HOSTLIST = re.compile(r"([^,\[]*)(?:\[([^\]]*)\])?")


def first_host(nodelist: str) -> str:
    """The first host of a Slurm host list: ``gpu[07-12,15],login1`` -> ``gpu07``."""
    match = _HOSTLIST.match(nodelist.strip())
    prefix, ranges = match.group(1), match.group(2)
    if not prefix and not ranges:
        raise ValueError(f"slurm environment: cannot read the node list {nodelist!r}")
    if ranges is None:
        return prefix
    first = ranges.split(",")[0].split("-")[0]  # zero padding is part of the name: keep it
    return prefix + first


# A CPU (gloo) group over every rank with dist.save_timeout_minutes, for the wait on rank 0's
# checkpoint writes; set by lifecycle.join_process_group (None: the default group is used).
SAVE_GROUP = None


def save_group():
    """The group in which the ranks wait for rank 0's checkpoint write (None: the default one)."""
    import torch.distributed as tdist

    return SAVE_GROUP if SAVE_GROUP is not None and tdist.is_initialized() else None


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over all processes of the initialised group (in place) and return it."""
    import torch.distributed as tdist

    tdist.all_reduce(t)
    return t


def all_reduce_max(t: torch.Tensor, group=None) -> torch.Tensor:
    """Element-wise maximum of ``t`` over all processes (in place): what every rank agrees on."""
    import torch.distributed as tdist

    tdist.all_reduce(t, op=tdist.ReduceOp.MAX, group=group)
    return t


def all_gather(value: object, world_size: int, group=None) -> list:
    """``value`` of every rank, in rank order (any picklable object)."""
    import torch.distributed as tdist

    gathered: list = [None] * world_size
    tdist.all_gather_object(gathered, value, group=group)
    return gathered


def agree_on_failure(dist: DistInfo, failure: BaseException | None, known: tuple[type, ...]) -> None:
    """Every rank says whether a step it took alone failed; if any did, every rank raises the
    same error, the first failed rank's, and returns otherwise.

    The error keeps its class where it is one of ``known`` (so every rank exits with the code
    that class maps to) and its message, prefixed by the failed rank's number; ``report`` is
    set on rank 0 only, so the run prints one line.  A rank whose own failure is not ``known``
    (a bug) re-raises it with its traceback; the others raise :class:`RankFailed`.
    """
    mine = None if failure is None else (type(failure).__module__, type(failure).__qualname__, str(failure))
    outcomes = all_gather(mine, dist.world_size)
    failed = [(rank, outcome) for rank, outcome in enumerate(outcomes) if outcome is not None]
    if not failed:
        return
    rank, (module, name, message) = failed[0]
    raise rebuild_failure(rank, module, name, message, dist, known,
                          own=failure if rank == dist.rank else None)


def rebuild_failure(rank: int, module: str, name: str, message: str, dist: DistInfo, known: tuple[type, ...],
                    own: BaseException | None = None) -> BaseException:
    """The exception every rank raises for rank ``rank``'s failure (see :func:`agree_on_failure`)."""
    import importlib

    cls: type | None = None
    try:
        cls = getattr(importlib.import_module(module), name.split(".")[-1], None)
    except ImportError:
        pass
    if rank != 0 and not message.startswith("rank "):
        message = f"rank {rank}: {message}"
    if isinstance(cls, type) and issubclass(cls, known):
        exc = cls.__new__(cls)
        Exception.__init__(exc, message)  # our errors' text is their one argument
    elif own is not None:
        return own
    else:
        exc = RankFailed(f"{message} ({name}; its traceback is in rank {rank}'s log)")
    exc.report = dist.is_main  # type: ignore[attr-defined]
    return exc


def is_collective_error(exc: BaseException) -> bool:
    """Whether ``exc`` is a failed collective (a peer gone, a timeout) rather than our own error."""
    import torch.distributed as tdist

    if isinstance(exc, getattr(tdist, "DistError", ())):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(
        mark in text for mark in ("gloo", "Gloo", "NCCL", "Connection closed by peer", "Connection reset by peer",
                                  "ProcessGroup", "Timed out", "timed out", "Broken pipe"))
