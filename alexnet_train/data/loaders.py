"""Samplers and DataLoaders for training and evaluation.

Usage::

    splits = resolve_splits(cfg.data)                 # classes + samples, checked
    loaders = build_loaders(cfg.data, splits, dist, seed=cfg.train.seed, pin_memory=True)
    loaders.train.sampler.set_epoch(epoch)
    for images_uint8, targets in loaders.train: ...
"""
from __future__ import annotations

import atexit
import contextlib
import functools
import os
import re
import signal
import sys
import threading
import weakref
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping, Sequence

import torch
from torch.utils.data import DataLoader, Sampler

from ..config import DataConfig
from ..distributed import DistInfo, ranks_sharing_cores
from ..errors import first_line
from .datasets import DataError, EncodedDataset, ImageDataset, Sample, check_dir, labelled_samples, scan_image_folder
from . import ring
from .samples import SampleList
from .shardread import raise_open_files_limit
from .batching import collate_encoded, collate_hwc
from .transforms import CenterPreset, TrainPreset


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The augmentation seed of one sample in one epoch: independent of rank, workers and position."""
    return ((seed * 1_000_003 + epoch) << 32) + index


class EpochSampler(Sampler):
    """Yields ``(index, augmentation seed)`` for this rank's share of one epoch.

    Shuffled order is a pure function of (seed, epoch).  Training shards drop
    the ragged tail, so every rank gets the same number of whole ``batch``-sized
    batches: each epoch leaves out fewer than ``world * batch`` images, another
    set each epoch as the order is reshuffled (ImageNet on 8 ranks of 16 would
    otherwise end every epoch with a step of 1 image per rank).  Evaluation
    shards (``shuffle=False``) are ``rank::world`` with no padding, so across
    ranks every image is seen exactly once.  ``start`` skips that many of this
    rank's samples (resuming inside an epoch).
    """

    def __init__(self, n: int, seed: int = 0, shuffle: bool = True, rank: int = 0, world: int = 1,
                 batch: int = 1) -> None:
        self.n, self.seed, self.shuffle, self.rank, self.world = n, seed, shuffle, rank, world
        self.batch = batch
        self.epoch = 0
        self.start = 0

    @property
    def left_out(self) -> int:
        """Training images each epoch leaves out (the ragged tail)."""
        return self.n % (self.world * self.batch) if self.shuffle else 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def order(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
            order = order[: self.n - self.n % (self.world * self.batch)]
        else:
            order = list(range(self.n))
        return order[self.rank :: self.world]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for index in self.order()[self.start :]:
            yield index, sample_seed(self.seed, self.epoch, index)

    def __len__(self) -> int:
        # Counted, not drawn: order() is a permutation of all n (1.28M for ImageNet).
        n = self.n - self.left_out
        return max(0, len(range(self.rank, n, self.world)) - self.start)


@dataclass(frozen=True)
class Splits:
    classes: list[str]
    train: SampleList | Sequence[Sample]  # a SampleList from resolve_splits; datasets convert lists
    val: SampleList | Sequence[Sample]


def resolve_splits(cfg: DataConfig, log: Callable[[str], None] | None = None) -> Splits:
    """Scan ``train_dir`` (for the class list) and ``val_dir``, or read their indexes (see
    :mod:`~alexnet_train.data.treeindex`; ``log`` hears which); DataError names the key or
    path at fault."""
    check_dir(cfg.train_dir, "data.train_dir")
    check_dir(cfg.val_dir, "data.val_dir")
    if cfg.val_labels is not None and not os.path.isfile(cfg.val_labels):
        raise DataError(f"data.val_labels: file not found: {cfg.val_labels}")
    classes, train = scan_image_folder(cfg.train_dir, log)
    val = labelled_samples(cfg.val_dir, classes, cfg.val_labels, log)
    return Splits(classes, train, val)


def worker_init(_worker_id: int, ring_slots: int | None = None) -> None:
    # PIL decodes on one thread; torch's intra-op pool in every worker only oversubscribes the cores.
    torch.set_num_threads(1)
    if ring_slots is not None:
        ring.configure(ring_slots)
    # Stopping is the main process's decision: Ctrl-C (to the whole process group) or Slurm's
    # scancel --signal=USR1 (to every process of a task, under proctrack/linuxproc) reach the
    # workers too, and a worker killed by one is a crash report instead of a saved checkpoint.
    for sig in (signal.SIGINT, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)
    # SIGTERM to the whole process group (torchrun's shutdown, scancel without --signal,
    # coreutils timeout, pkill) reaches the workers with the main process, which goes on to
    # the ranks' next agreed step before it saves: it needs its data until then.  So a worker
    # keeps serving for WORKER_STOP_GRACE seconds, then SIGALRM ends it.  The DataLoader's own
    # terminate() of a worker that did not stop when told is bounded by the same grace, and a
    # dead main process still takes its workers with it (PR_SET_PDEATHSIG below).
    signal.signal(signal.SIGTERM, _stop_after_grace)
    _die_with_parent()


WORKER_STOP_GRACE = 30  # s: Slurm's default KillWait and torchrun's wait before its SIGKILL


def _stop_after_grace(_signum: int, _frame) -> None:
    earlier = signal.alarm(WORKER_STOP_GRACE)
    if earlier:  # a second SIGTERM keeps the first one's deadline
        signal.alarm(earlier)


def _die_with_parent() -> None:
    """Linux: SIGKILL this worker the moment the main process dies (``kill -9`` included).

    Without it workers notice a dead parent only at their next status check, seconds later.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if _loader_pid is not None and os.getppid() != _loader_pid:  # it died before prctl took effect
        os._exit(1)


_loader_pid: int | None = None  # the process that made the loaders (its workers' parent)

PREFETCH = 4  # batches each worker works ahead
# Reused shared-memory slots per worker (data/ring.py): the PREFETCH batches it works ahead,
# plus the two the training process may hold meanwhile (the step's, and the next, received
# before the step's is dropped).  More held batches are still correct: fresh segments, slower.
RING_SLOTS = PREFETCH + 2


def make_loader(
    dataset: ImageDataset, sampler: EpochSampler, batch_size: int, workers: int, pin_memory: bool,
    collate_fn=collate_hwc, ring_slots: int = RING_SLOTS,
) -> DataLoader:
    """The DataLoader of a split.  ``ring_slots``: reused shared-memory buffers per worker for
    the batches (:mod:`~.ring`; 0 = a fresh segment per batch).

    It has no ``timeout`` of its own: with one, torch waits on its result queue for the whole
    timeout in one call and checks whether its workers are alive only after it, so a killed
    worker (the SIGCHLD handler is off, below) went unnoticed for ``data.loader_timeout``
    seconds.  Without one torch checks them every 5 s; the data.loader_timeout deadline is
    :func:`batch_deadline`'s, set around each batch by the loops that read it."""
    global _loader_pid
    _loader_pid = os.getpid()
    # torch's SIGCHLD handler raises a dead worker's error from wherever the main process is
    # (inside a checkpoint write, a DDP collective); without it the same error comes from the
    # loader's next batch (within 5 s), where the trainer makes it one line and DDP ranks agree.
    from torch.utils.data._utils import signal_handling

    signal_handling._SIGCHLD_handler_set = True
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=collate_fn,
        num_workers=workers,
        pin_memory=pin_memory,
        persistent_workers=workers > 0,
        worker_init_fn=functools.partial(worker_init, ring_slots=ring_slots) if workers > 0 else None,
        prefetch_factor=PREFETCH if workers > 0 else None,
        # Every iterator draws a base seed from this generator; from the global one it
        # would shift dropout's random stream with the worker count and resume point.
        # (Augmentation takes its randomness from the sampler's per-sample seeds.)
        generator=torch.Generator().manual_seed(0),
    )
    if workers > 0:
        _open_loaders.add(loader)
    return loader


# data.workers auto's most: each worker holds RING_SLOTS batches, and 32 VM-class cores load
# over 20k images/s of the original JPEGs and several times that of the 256 px copy
# (scripts/bench_data.py), against the 9.2k images/s one H200 trained paper.yaml at through
# alexnet-train, and the 9.7k-30k its model steps alone reach (docs/benchmarks.md).
WORKERS_CAP = 32


def auto_workers(cores: int, local_ranks: int = 1) -> int:
    """``data.workers: auto``: this rank's share of ``cores`` (the node's usable cores shared by
    ``local_ranks`` training processes), less one for the training process itself, at most
    ``WORKERS_CAP``; 0 (load in the training process) where that leaves none."""
    share = cores // max(1, local_ranks)
    return max(0, min(WORKERS_CAP, share - 1))


def usable_cores() -> int:
    """The cores this process may run on (its affinity: a cgroup's or taskset's share), else all."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def resolve_workers(setting: int | str, dist: DistInfo | None = None, cores: int | None = None,
                    env: Mapping[str, str] | None = None) -> tuple[int, str]:
    """(loader workers, a log line saying how many and why) for a ``data.workers`` setting."""
    if setting != "auto":
        return int(setting), f"data.workers: {setting}"
    dist = dist or DistInfo()
    cores = usable_cores() if cores is None else cores
    ranks = ranks_sharing_cores(dist, cores, env)
    n = auto_workers(cores, ranks)
    shared = f", shared by {ranks} ranks on this node" if ranks > 1 else ""
    return n, (f"data.workers: auto = {n} loader processes ({cores} usable cores{shared}, one for the training "
               f"process{f', capped at {WORKERS_CAP}' if n == WORKERS_CAP else ''})")


@dataclass
class Loaders:
    train: DataLoader
    val: DataLoader
    workers: int = 0  # loader processes of each (data.workers resolved)
    workers_line: str = ""  # how many and why, for the log

    def close(self) -> None:
        """Stop the persistent workers now (a run's end, however it ends)."""
        for loader in (self.train, self.val):
            close_loader(loader)


def close_loader(loader: DataLoader) -> None:
    """Tell ``loader``'s persistent workers to exit, and wait for them (a few seconds at most).

    Left to multiprocessing's exit, they would be ended by SIGTERM, which a worker answers
    only after its grace (see :func:`worker_init`).
    """
    iterator = getattr(loader, "_iterator", None)
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        workers = getattr(iterator, "_workers", [])
        if _timed_out:  # stuck workers: torch would give each 5 s to exit, then SIGTERM it (our grace)
            _kill_alive(workers)
        iterator._shutdown_workers()
        # A worker still alive after that (stopped, or stuck where SIGTERM does not reach it) would
        # make multiprocessing's exit handler wait for it forever, holding OUT's lock.
        _kill_alive(workers)
    loader._iterator = None
    ring.forget_dead()  # its workers' slots: batches still held keep their own


def _kill_alive(workers) -> None:
    """SIGKILL the workers still alive, and reap them (5 s at most each)."""
    for w in workers:
        if w.is_alive():
            with contextlib.suppress(OSError):
                os.kill(w.pid, signal.SIGKILL)
            w.join(timeout=5)


_open_loaders: "weakref.WeakSet[DataLoader]" = weakref.WeakSet()
_timed_out = False  # a batch missed data.loader_timeout in this process: its loaders' workers are stuck


@atexit.register
def _close_open_loaders() -> None:
    # Registered after multiprocessing's own exit handler, so it runs before it.
    for loader in list(_open_loaders):
        close_loader(loader)


def per_process_batch(cfg: DataConfig, dist: DistInfo) -> int:
    if cfg.batch_size % dist.world_size:
        raise DataError(
            f"data.batch_size: {cfg.batch_size} (the global batch) is not divisible by the {dist.world_size} processes"
        )
    return cfg.batch_size // dist.world_size


def check_decode(cfg: DataConfig) -> str | None:
    """For ``data.decode: device``, a one-line notice naming the JPEG backend that decodes
    (None for ``data.decode: worker``); DataError when no backend can run here."""
    from . import decode

    if cfg.decode != "device":
        return None
    fix = "pip install the torchcodec built for this torch, or use data.decode: worker"
    if decode.DEVICE_DECODER_PROBLEM:  # a forced backend that does not load: never silently take the other
        raise DataError(f"data.decode: device: {decode.DEVICE_DECODER_PROBLEM}; unset "
                        f"{decode.DEVICE_DECODER_ENV}, or {fix}")
    if decode.DEVICE_DECODER is None:
        raise DataError("data.decode: device needs TorchCodec's decode_jpeg or torchvision's decode_jpeg, "
                        f"and neither can be loaded here ({fix})")
    if decode.DEVICE_DECODER == "torchcodec":
        return "data.decode: device: JPEGs decoded by TorchCodec (nvJPEG on CUDA)"
    forced = decode.DEVICE_DECODER_FORCED
    why = f"forced by {forced}" if forced else "TorchCodec is not loadable here"
    return (f"data.decode: device: JPEGs decoded by {decode.DEVICE_DECODER_LABELS[decode.DEVICE_DECODER]} "
            f"(deprecated; {why})")


def build_loaders(cfg: DataConfig, splits: Splits, dist: DistInfo, seed: int, pin_memory: bool = False) -> Loaders:
    """Train and val loaders; with ``data.decode: device`` their batches go through
    :class:`~alexnet_train.data.batching.DecodeOnDevice` in the training process."""
    check_decode(cfg)
    raise_open_files_limit()  # before the workers fork: they inherit it (shards, shared memory, pipes)
    batch = per_process_batch(cfg, dist)
    if len(splits.train) < cfg.batch_size:
        raise DataError(f"data.batch_size: {cfg.batch_size} is more than the {len(splits.train)} training images "
                        f"of {cfg.train_dir}: an epoch would have no full batch")
    workers, line = resolve_workers(cfg.workers, dist)
    train_sampler = EpochSampler(len(splits.train), seed, True, dist.rank, dist.world_size, batch)
    val_sampler = EpochSampler(len(splits.val), seed, False, dist.rank, dist.world_size)
    dataset, collate = (EncodedDataset, collate_encoded) if cfg.decode == "device" else (ImageDataset, collate_hwc)
    return Loaders(
        train=make_loader(dataset(splits.train, TrainPreset(cfg)), train_sampler, batch, workers, pin_memory,
                          collate),
        val=make_loader(dataset(splits.val, CenterPreset(cfg)), val_sampler, batch, workers, pin_memory,
                        collate),
        workers=workers,
        workers_line=line,
    )


class LoaderTimeout(RuntimeError):
    """No batch within ``data.loader_timeout`` seconds."""


@contextlib.contextmanager
def batch_deadline(seconds: float) -> Iterator[None]:
    """Raise LoaderTimeout in the block if it runs longer than ``seconds`` (0: never).

    data.loader_timeout is enforced here, not by the DataLoader's own ``timeout``: that covers
    only its wait on the result queue (and costs its 5 s check of dead workers, see
    :func:`make_loader`); a batch whose shared memory must be fetched from a worker that stopped
    answering (torch's file-descriptor sharing asks the worker for it) waits inside
    unpickling, where nothing times out.  A timer signal interrupts either wait wherever the
    main thread is.  Main thread only (signals)."""
    if seconds <= 0 or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expired(_signum, _frame):
        global _timed_out
        _timed_out = True
        raise LoaderTimeout(f"DataLoader timed out after {seconds:g} seconds")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class Deadlined:
    """``loader`` with every batch due within ``seconds`` (:func:`batch_deadline`), and a loader
    that fails as one LoaderFailed line: for loops that have no :class:`RankAgreement` guard
    (alexnet-eval's)."""

    def __init__(self, loader: DataLoader, seconds: float) -> None:
        self.loader, self.seconds = loader, seconds

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        from ..errors import LoaderFailed

        it = iter(self.loader)
        while True:
            try:
                with batch_deadline(self.seconds):
                    batch = next(it)
            except StopIteration:
                return
            except Exception as exc:
                if isinstance(exc, LoaderTimeout) or _worker_killed(exc):
                    raise LoaderFailed(f"the data loader failed: {loader_failure(exc)}") from None
                raise
            yield batch


def _worker_killed(exc: BaseException) -> bool:
    """The DataLoader's error for a worker that died (a signal, the OOM killer).

    Its own message names the worker; but a worker killed while it was sending a batch can
    break the pipe under the main process first, which then reads a connection error.
    """
    return (isinstance(exc, RuntimeError) and "DataLoader worker" in str(exc)) or isinstance(
        exc, (ConnectionError, EOFError))


def loader_failure(exc: BaseException) -> str:
    """One line for an exception the data loader raised."""
    timed_out = re.match(r"DataLoader timed out after (\S+) seconds", str(exc))
    if timed_out:
        return (f"no batch from the loader's workers for {float(timed_out.group(1)):g} s (data.loader_timeout): "
                "a worker is stuck or can no longer send (out of open files? ulimit -n; a hung network mount?)")
    if isinstance(exc, (ConnectionError, EOFError)):
        return f"a DataLoader worker died while sending a batch ({first_line(exc)})"
    return first_line(exc)
