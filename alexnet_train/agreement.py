"""What the ranks of a run decide together: one unit, so every rank takes the same path.

Usage (the trainer's side)::

    agreement = RankAgreement(dist, device, bad_images, known=run_errors(),
                              count_bad=lambda n: ..., held_elsewhere=lambda: tracker.failure)
    for batch in agreement.guard(loader, steps, stop): ...  # the loader's error held as one line
    agreement.unreadable(bad, "train")   # a batch's unreadable files: judged now or at the next agreement
    agreement.fail(exc)                  # this rank's failure: raised at once alone, held under DDP
    decision = agreement.decide(stop=signum, save=time_due, nonfinite=not finite)  # at a log step
    signum = agreement.stop_now(stop=signum)   # between log steps, every ~2 s of steps
    agreement.settle()                   # after validation, a save, the run: act on what any rank holds

In one process every method acts at once (``fail`` raises, ``decide`` returns its own
values).  Under DDP a failure one rank meets alone (an unreadable image under ``error``, too
many unreadable images, a dead loader, rank 0's failed write, a NaN) is held until the
ranks' next agreement: there every rank learns of it and every rank raises the same error,
with one line for the run (rank 0 reports it).  A stop request, a time-based checkpoint and
a non-finite loss are agreed as the maximum over ranks, so every rank stops, saves or fails
at the same step.  No rank raises, skips a collective or stops alone.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .data.datasets import BadImageError, BadImages, TooManyBadImages
from .data.loaders import _worker_killed, batch_deadline, loader_failure
from .distributed import DistInfo, all_gather, all_reduce_max, rebuild_failure, save_group
from .errors import LoaderFailed


@dataclass(frozen=True)
class Decision:
    """What every rank does after a log step: stop (the signal number, 0 for none), save a
    time-based checkpoint, or fail for a non-finite loss on some rank; and the slowest rank's
    seconds per step over the interval (what the next stop checks are spaced by)."""

    stop: int
    save: bool
    nonfinite: bool
    step_seconds: float = 0.0


class RankAgreement:
    """Failures, unreadable files and per-step decisions that every rank must share."""

    def __init__(self, dist: DistInfo, device: torch.device, bad: BadImages, known: tuple[type, ...],
                 count_bad: Callable[[int], None],
                 held_elsewhere: Callable[[], BaseException | None] = lambda: None) -> None:
        self.dist = dist
        self.device = device
        self.bad = bad
        self.known = known  # errors that keep their class (and exit code) when every rank raises them
        self.count_bad = count_bad  # the epoch's count of unreadable files, all ranks'
        self.held_elsewhere = held_elsewhere  # e.g. the tracker's failed write on rank 0
        self.failure: BaseException | None = None
        self.pending_bad: list[tuple[str, str, str]] = []  # (split, path, reason) not yet shared

    @property
    def distributed(self) -> bool:
        return self.dist.distributed

    def reported(self, exc: BaseException) -> BaseException:
        """``exc`` as every rank raises it at the same step: rank 0 alone prints it."""
        exc.report = self.dist.is_main  # type: ignore[attr-defined]
        return exc

    def fail(self, exc: BaseException) -> None:
        """A failure of this rank: raised at once in one process, held under DDP (the first one)."""
        if not self.distributed:
            raise exc
        if self.failure is None:
            self.failure = exc

    def unreadable(self, bad: Sequence[tuple[str, str]], split: str) -> None:
        """A batch's unreadable files: judged at once in one process; under DDP at the ranks'
        next agreement, over every rank's files."""
        if not bad:
            return
        if not self.distributed:
            self.count_bad(len(bad))
            self.bad.check(bad, split)
            return
        if self.bad.policy == "error":
            self.fail(BadImageError(*bad[0]))
        else:
            self.pending_bad.extend((split, path, reason) for path, reason in bad)

    def guard(self, batches, steps: int, stop, blank: bool = True, timeout: float = 0.0):
        """``batches`` (at most ``steps``), with the loader's errors as one line, not a traceback.

        ``stop``: the run's stop request (``stop.signum`` set once a stop signal arrived).  A
        loader whose workers died of the stop signal itself (SIGTERM to the whole process
        group: torchrun's shutdown, scancel, ``timeout``) is the end of the data, not an error.
        Under DDP a rank whose loader is gone holds the failure and, with ``blank``, yields
        ``(None, None, [])`` for the epoch's remaining steps, so it keeps joining the gradient
        all-reduce until the ranks' next agreement (evaluation has no per-batch collective).
        ``timeout``: seconds a batch may take before the loader counts as failed
        (``data.loader_timeout``; 0 = wait forever).
        """
        it = iter(batches)
        done = 0
        while done < steps:
            try:
                with batch_deadline(timeout):
                    batch = next(it)
            except StopIteration:
                return
            except Exception as exc:  # noqa: BLE001 - whatever the loader raised, as one line
                if not (stop.signum is not None and _worker_killed(exc)):
                    self.fail(LoaderFailed(f"the data loader failed: {loader_failure(exc)}"))
                if not (blank and self.distributed):
                    return
                for _ in range(steps - done):
                    yield None, None, []
                return
            done += 1
            yield batch

    def agree(self, *values: float, group=None) -> list[float]:
        """The maximum of each value over all ranks (the values themselves in one process)."""
        if not self.distributed:
            return list(values)
        import torch.distributed as tdist

        device = self.device if tdist.get_backend(group) == "nccl" else torch.device("cpu")
        return all_reduce_max(torch.tensor(values, dtype=torch.float64, device=device), group).tolist()

    def agree_failures(self, *values: float, group=None) -> list[float]:
        """:meth:`agree` of ``values`` and of whether any rank holds a failure or unshared
        unreadable files; if one does, every rank settles (and raises, for a failure)."""
        if not self.distributed:
            return list(values)
        *agreed, failed, pending = self.agree(*values, self._held() is not None, len(self.pending_bad),
                                              group=group)
        if failed or pending:
            self._settle(group)
        return agreed

    def decide(self, stop: int, save: bool, nonfinite: bool, step_seconds: float = 0.0) -> Decision:
        """The log step's decision, the same on every rank (a held failure raises first)."""
        stop_, save_, nonfinite_, seconds = self.agree_failures(stop, save, nonfinite, step_seconds)
        return Decision(int(stop_), bool(save_), bool(nonfinite_), seconds)

    def stop_now(self, stop: int) -> int:
        """A stop check between log steps: the signal number any rank holds (0 for none)."""
        return int(self.agree(stop)[0])

    def settle(self, after_save: bool = False) -> None:
        """At a point every rank reaches (after validation, a save, the run): act on any
        rank's held failure or unreadable files.  ``after_save``: the ranks wait here for rank
        0's checkpoint write, in :func:`~alexnet_train.distributed.save_group` (its timeout is
        dist.save_timeout_minutes, and NCCL's watchdog does not watch it)."""
        self.agree_failures(group=save_group() if after_save else None)

    def _held(self) -> BaseException | None:
        return self.failure or self.held_elsewhere()

    def _settle(self, group=None) -> None:
        """Every rank's held failure and unreadable files, shared: rank 0 logs each file once,
        every rank counts them all against data.max_bad_fraction, and if a rank failed every
        rank raises its error (the same class and line; rank 0 reports it)."""
        failure = self._held()
        mine = None if failure is None else (type(failure).__module__, type(failure).__qualname__, str(failure))
        gathered = all_gather((mine, self.pending_bad), self.dist.world_size, group)
        self.pending_bad = []
        for _, bad in gathered:
            self.count_bad(len(bad))
            for split, path, reason in bad:
                self.bad.record(path, reason, split)
        for rank, (outcome, _) in enumerate(gathered):
            if outcome is not None:
                raise rebuild_failure(rank, *outcome, self.dist, self.known,
                                      own=failure if rank == self.dist.rank else None)
        for split in self.bad.seen:
            try:
                self.bad.check_fraction(split)
            except TooManyBadImages as exc:
                raise self.reported(exc) from None
