"""A training run's lifecycle, between the argv parser and the trainer.

Usage::

    result = run_training(cfg, resume="auto", log=print)   # cli maps its exceptions to exit codes
    dist = launch_environment(cfg.dist.mode)              # torchrun / srun / one process, checked
    join_process_group(dist, backend="auto", device=torch.device("cpu"))  # and leave_process_group() after

In order, :func:`run_training` reads the launch environment, locks OUT (a lock
that dies with this process and is never shared with its loader workers),
decides where to resume from, checks everything that can be wrong before OUT
is written, joins the process group, writes config.yaml, and trains with
SIGINT / SIGTERM / SIGUSR1 turned into a stop request (:class:`StopSignals`);
however it ends, it leaves the process group and releases the lock.

The errors it raises are :mod:`alexnet_train.errors`' (the caller maps them to exit
codes with :func:`~alexnet_train.errors.exit_code`).
"""
from __future__ import annotations

import os
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from . import checkpoint as ckpt
from .config import Config, ConfigError, replace
from .configload import dump_yaml
from .distributed import DistInfo, agree_on_failure, all_gather, is_collective_error
from .errors import REPEAT_SECONDS, USER_ERRORS, Aborted, Interrupted, PeerLost, first_line, run_errors
from .resume import (ResumePoint, check_resume_config, confirm_resume, confirm_shared_out, decide_resume,
                     resume_decision, resume_on_data, same_sample_lists, sample_lists, trim_metrics)

Log = Callable[[str], None]

# Signals that stop a run after saving; the exit code is 128 + the number.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


class StopSignals:
    """SIGINT / SIGTERM / SIGUSR1 as one stop request, read by the trainer between steps.

    The first stop signal sets ``signum``: the trainer finishes its step, saves a resumable
    checkpoint and raises Interrupted (exit 128 + signum).  Any stop signal within
    :data:`REPEAT_SECONDS` of the first is the same request and changes nothing; one
    :data:`REPEAT_SECONDS` or more after it aborts at once (:class:`~alexnet_train.errors.Aborted`:
    checkpoints are written atomically, so the previous one stays whole), once: the abort's own
    copies change nothing, so the way out (the loader workers' shutdown) is not cut short.  After
    :meth:`finished` (training is over: checkpoints written, the report to come) a stop
    signal is only noted in ``late``: the run ends as finished, exit 0.

    The handler only records: it never prints (a print inside a signal handler can meet the
    one the main thread is in the middle of).  The trainer says what it does when it acts.
    """

    def __init__(self, report: bool = True, clock: Callable[[], float] = time.monotonic) -> None:
        self.signum: int | None = None
        self.late: int | None = None
        self.repeats = 0  # deliveries taken as the same request
        self.report = report  # this process speaks for the run (rank 0)
        self.clock = clock
        self.first_at = 0.0
        self.done = False
        self.aborted = False
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> "StopSignals":
        for sig in STOP_SIGNALS:
            try:
                self.previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum: int, _frame: Any) -> None:
        now = self.clock()
        if self.done:
            self.late = self.late or signum
        elif self.aborted:  # the abort's own copies: raised again, they would cut the cleanup short
            self.repeats += 1
        elif self.signum is None:
            self.signum, self.first_at = signum, now
        elif now - self.first_at < REPEAT_SECONDS:
            self.repeats += 1
        else:
            self.aborted = True
            raise Aborted(signum, self.report)

    def finished(self) -> None:
        """Training is over: from now on a stop signal is noted, never acted on.  A request no
        step acted on (it came after the ranks' last agreement) is such a late one too."""
        self.done = True
        if self.signum is not None:
            self.late, self.signum = self.late or self.signum, None

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def ignore_stop_signals() -> None:
    """From here on this process ignores the stop signals (it is about to exit with its code)."""
    for sig in STOP_SIGNALS:
        try:
            signal.signal(sig, signal.SIG_IGN)
        except ValueError:  # not the main thread
            pass


def launch_environment(mode: str | None = None) -> DistInfo:
    """The process's place in the launch (torchrun, srun or none), checked against ``dist.mode``.

    ``mode`` None (evaluation) accepts any launch.  ``ddp`` without a launcher is one process
    (:func:`joins_group` says so); several processes need ``ddp``.  ConfigError says what to change.
    """
    try:
        dist = DistInfo.from_env()
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if mode is not None and mode != "ddp" and dist.distributed:
        raise ConfigError(f"launched by {dist.launcher} with {dist.world_size} processes but dist.mode is "
                          f"{mode!r}; set dist.mode=ddp")
    return dist


def joins_group(mode: str, dist: DistInfo) -> bool:
    """Whether this process joins a process group: dist.mode=ddp under torchrun or srun.

    dist.mode=ddp without a launcher (a multi-GPU recipe tried on one GPU or a CPU) trains as
    one process, with :data:`SINGLE_PROCESS_NOTICE`.
    """
    return mode == "ddp" and dist.launcher != "none"


SINGLE_PROCESS_NOTICE = (
    "notice: dist.mode=ddp, but no launcher started this process: training as one process "
    "(for N GPUs: torchrun --nproc_per_node N -m alexnet_train --config ..., or srun)")


def join_process_group(dist: DistInfo, backend: str, device, timeout_minutes: float = 5.0,
                       save_timeout_minutes: float | None = None) -> None:
    """Join the group of ``dist.world_size`` processes (any launch under dist.mode=ddp).

    ``device`` is this process's device from :func:`~alexnet_train.device.resolve_device` (a
    ``torch.device`` with its index on CUDA; a bare type string is taken as that type's first
    device): a CUDA one is made current here, whatever the backend, so that nothing that
    allocates on "the current device" lands on another rank's GPU.
    ``timeout_minutes`` (dist.timeout_minutes) bounds every collective of the group, the
    rendezvous included: a rank that stops answering ends the run instead of hanging it.
    ``save_timeout_minutes`` (dist.save_timeout_minutes), when given, bounds the wait for rank
    0's checkpoint writes instead, in a CPU group of its own (:func:`~alexnet_train.distributed.save_group`).

    Under NCCL, a collective that outlives the timeout is handled by PyTorch's watchdog thread.
    Its default (``TORCH_NCCL_ASYNC_ERROR_HANDLING=3``) kills the process with SIGABRT and a C++
    dump; here it defaults to 2, which aborts the communicators and lets the error reach this
    thread, so the rank ends as gloo's do: one "lost contact" line and exit 1.  A value the
    user set is kept.
    """
    from datetime import timedelta

    import torch
    import torch.distributed as tdist

    from . import distributed

    device = torch.device(device)
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() and device.type == "cuda" else "gloo"
    if device.type == "cuda":
        device = torch.device("cuda", device.index or 0)
        torch.cuda.set_device(device)
    options = {}
    if backend == "nccl":
        for key, value in NCCL_ENVIRONMENT.items():
            os.environ.setdefault(key, value)
        if device.type == "cuda":
            options["device_id"] = device  # binds the group to this rank's GPU: no guess at barrier()
    distributed.SAVE_GROUP = None
    try:
        tdist.init_process_group(backend, init_method=dist.init_method, rank=dist.rank,
                                 world_size=dist.world_size, timeout=timedelta(minutes=timeout_minutes),
                                 **options)
        if save_timeout_minutes is not None:
            distributed.SAVE_GROUP = tdist.new_group(backend="gloo",
                                                     timeout=timedelta(minutes=save_timeout_minutes))
    except Exception as exc:  # noqa: BLE001 - the rendezvous or the backend's connect: one line
        if not is_collective_error(exc):
            raise
        hint = ""
        if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0" and \
                os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            hint = ("; torchrun restarted this worker with the store its agents share, where a restart "
                    "can read the previous attempt's addresses (pytorch/pytorch#135712): run torchrun with "
                    "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1")
        raise PeerLost(f"rank {dist.rank}: cannot join the {dist.world_size} processes at {dist.init_method} "
                       f"({first_line(exc)}){hint}") from None


# What join_process_group sets for NCCL unless the environment already does.  2: at a
# collective's timeout the watchdog aborts the communicators and the waiting call raises (see
# join_process_group); the heartbeat monitor (TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC, 480 s by
# default) still ends a process whose watchdog itself hangs in that abort.
NCCL_ENVIRONMENT = {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "2"}


def leave_process_group(failure: BaseException | None = None) -> None:
    """Destroy the process group(s), and with them their backends' threads, before this process exits.

    ``failure``: the error the run is leaving with, if any (its traceback holds the trainer).

    destroy_process_group only unregisters a group; gloo's worker threads end in the group's
    C++ destructor, when the last reference to it goes: ours (SAVE_GROUP), DDP's reducer
    (the model sits in reference cycles, freed only by a collection) and the frames of a
    failure's traceback.  Left alive until the interpreter exits, a worker still releasing
    its last collective's tensors takes the GIL to drop their Python objects; once the
    interpreter is finalizing, taking it ends the thread (pthread_exit), and that unwinding
    through torch's noexcept release is std::terminate: "terminate called without an active
    exception" and SIGABRT, on a rank of a run that finished.  Destroyed here, with Python
    alive, the destructor waits for the workers (releasing the GIL while it does).
    """
    import gc

    import torch.distributed as tdist

    from . import distributed

    if not (tdist.is_available() and tdist.is_initialized()):
        return
    tdist.destroy_process_group()
    distributed.SAVE_GROUP = None
    chain, seen = [failure], set()
    while chain:  # the failure and the errors it was raised from or while handling
        exc = chain.pop()
        if exc is None or id(exc) in seen:
            continue
        seen.add(id(exc))
        # Only the locals of frames that have returned go (a traceback still prints); a frame
        # still executing (run_training's, its callers') is left alone.
        traceback.clear_frames(exc.__traceback__)
        chain += [exc.__cause__, exc.__context__]
    gc.collect()


# --------------------------------------------------------------------------- the run


def run_training(cfg: Config, resume: str = "auto", log: Log = print, provenance: str = "",
                 exiting: bool = False):
    """Train ``cfg`` from start or from where OUT stopped; returns the trainer's FitResult.

    ``provenance`` heads OUT/config.yaml (versions, git SHA).  Under DDP every step a rank
    takes alone before training (the checks, the resume decision, rank 0's first writes) ends
    in an agreement: if any rank failed, every rank raises that rank's error (:class:`Together`).
    So do the steps after it: rank 0's report and the tracker's close (a write error there
    is every rank's exit 1).  From training on, stop signals are :class:`StopSignals`'; after
    training they change nothing (a finished run exits 0).  ``exiting``: the process exits
    when this returns (the console script), so the stop signals stay ignored instead of
    getting their default handlers back, which would turn a late SIGUSR1 into a kill.
    """
    from .train import fit

    dist = launch_environment(cfg.dist.mode)
    say = log if dist.is_main else (lambda _m: None)
    out = Path(cfg.train.out_dir)
    group = joins_group(cfg.dist.mode, dist)
    device = _announce(cfg, dist, group, say)
    stop = StopSignals(report=dist.is_main)
    try:
        with ckpt.RunLock(out) as lock:
            if group:
                say(f"dist: rank {dist.rank} of {dist.world_size} from {dist.launcher}"
                    + (f", rendezvous {dist.init_method}" if dist.launcher == "slurm" else ""))
                join_process_group(dist, cfg.dist.backend, device, cfg.dist.timeout_minutes,
                                   cfg.dist.save_timeout_minutes)
            tracker = None
            try:
                together = Together(dist, group)
                cfg, splits, point, pretrained, lists = _agree_on_inputs(cfg, resume, out, lock, dist, group,
                                                                         together, say)
                tracker = together(lambda: _start_out(cfg, out, lock, point, provenance, dist))
                if group:
                    mine = together(lambda: ckpt.file_digest(out / "config.yaml") if dist.is_main else None)
                    written = all_gather(mine, dist.world_size)[0]
                    together(lambda: confirm_shared_out(out, written, dist))
                if point is not None:
                    say(f"resuming from {point.path} (epoch {point.state['epoch'] + 1}, "
                        f"step {point.state['step_in_epoch']} of that epoch)")
                    _say_elsewhere(point.state, dist, device, say)
                tracker.text("config", dump_yaml(cfg))
                say(f"training {cfg.model.arch} on {len(splits.train)} images / {len(splits.classes)} classes, "
                    f"validating on {len(splits.val)}; output in {out}")
                stop.__enter__()
                try:
                    result = fit(cfg, splits, out, tracker, dist, point.state if point else None, pretrained,
                                 stop=stop, resume_path=point.path if point else None, device=device,
                                 sample_lists=lists)
                except Interrupted as exc:
                    exc.report = dist.is_main
                    raise
                stop.finished()
                together(lambda: _say_done(result, out, dist, say))
                closing, tracker = tracker, None
                together(lambda: _close(closing))  # rank 0's failed write at close is every rank's
                if stop.late is not None:
                    say(f"{signal.Signals(stop.late).name} received after training finished: nothing left to "
                        "save, the run is done")
                return result
            except Exception as exc:
                if group:
                    raise _leaving_together(exc, dist)
                raise
            finally:
                try:
                    if tracker is not None:  # a failure is being reported: the close's own is not
                        try:
                            tracker.close()
                        except ckpt.WriteError:
                            pass
                finally:  # also when the close raised: the group must not outlive the run
                    if group:
                        leave_process_group(sys.exc_info()[1])
    finally:
        if exiting:
            ignore_stop_signals()
        else:
            stop.__exit__()


def _close(tracker) -> None:
    """The tracker's close, and a write error it held back (DDP ranks defer them) raised."""
    tracker.close()
    if tracker.failure is not None:
        raise tracker.failure


def _announce(cfg: Config, dist: DistInfo, group: bool, say: Log):
    """The run's notices and this process's device, chosen (ConfigError before OUT is touched)
    and made current before the process group: NCCL or gloo depends on it.  A rank without its
    GPU fails alone here; the others give up at the rendezvous after dist.timeout_minutes."""
    from .device import resolve_device

    if cfg.dist.mode == "ddp" and not group:
        say(SINGLE_PROCESS_NOTICE)
    from .ignoredkeys import ignored_notices

    for notice in ignored_notices(cfg):  # the arch's model keys, then every key another setting leaves unread
        say(notice)
    device, device_line = resolve_device(cfg.train.device, dist.local_rank)
    say(f"device: {device_line}")
    if device.type == "cuda":
        import torch

        torch.cuda.set_device(device)  # the one GPU of this process, current before anything allocates
    return device


def _agree_on_inputs(cfg: Config, resume: str, out: Path, lock: ckpt.RunLock, dist: DistInfo, group: bool,
                     together: "Together", say: Log):
    """(cfg, splits, resume point, pretrained weights, the splits' sample lists as a checkpoint
    records them), every check agreed by all ranks.

    Everything that can be wrong with the config or data is checked before OUT is touched; an
    existing OUT is locked first, so no other run writes it while we read it.  Rank 0 first:
    its walk of the data writes the index the other ranks then read (one walk of ImageNet's
    1.28M files per job, not one per rank).  Collectives stay outside the steps (a step that
    raises must not skip one).
    """
    data_lines: list[str] = []  # the other ranks' "data: ..." lines, for rank 0's summary
    heard = say if dist.is_main else data_lines.append
    first = together(lambda: _check_and_decide(cfg, resume, out, lock, dist, say, heard) if dist.is_main else None)
    rest = together(lambda: None if dist.is_main else _check_and_decide(cfg, resume, out, lock, dist, say, heard))
    cfg, splits, point = first if dist.is_main else rest
    decision = None
    if group:
        say(how_ranks_read_the_data(all_gather(data_lines, dist.world_size)))
        mine = together(lambda: resume_decision(point, out) if dist.is_main else None)
        decision = all_gather(mine, dist.world_size)[0]
    point, pretrained = together(lambda: _confirm(cfg, splits, point, decision, out, dist, group, say))
    # Every rank compares its checkpoint (the same file on all: _confirm) with its sample lists,
    # agreed to be rank 0's first: so a resume on changed data takes the same path on every rank.
    lists = together(lambda: sample_lists(splits))
    if group:
        gathered = all_gather(lists, dist.world_size)
        together(lambda: same_sample_lists(gathered))
    point = together(lambda: None if point is None else
                     ResumePoint(point.path, resume_on_data(point.state, lists, cfg, say)))
    return cfg, splits, point, pretrained, lists


def _say_elsewhere(state: dict, dist: DistInfo, device, say: Log) -> None:
    """A notice for each way this run differs from the checkpoint's that makes the resume inexact
    (another number of processes, device type or GPU model: :func:`~alexnet_train.resume.resume_elsewhere`)."""
    from .resume import resume_elsewhere

    name = None
    if device.type == "cuda":
        import torch

        name = torch.cuda.get_device_name(device)
    for line in resume_elsewhere(state, dist.world_size, device.type, name):
        say(line)


def _say_done(result, out: Path, dist: DistInfo, say: Log) -> None:
    """The run's last lines, and rank 0's report (OUT/report.png and the summary)."""
    if result.last is None:
        say(f"done: nothing to do, {out} already holds {result.epochs_run} epochs")
        return
    say(f"done: {result.epochs_run} epochs, final val top-1 {result.last.top1:.2f}% "
        f"top-5 {result.last.top5:.2f}%, best top-1 {result.best_top1:.2f}%; checkpoints in {out}")
    if dist.is_main:
        from .errors import ReportError
        from .report import report_run

        try:
            report_run(out, say)
        except ReportError as exc:  # the run is done: a report it cannot draw is a warning
            say(f"warning: no report: {exc}")


def _leaving_together(exc: Exception, dist: DistInfo) -> Exception:
    """What a rank of a process group leaves with: ``exc``, or a lost peer for a collective's error.

    Every rank is leaving at the same step with the same code.  torchrun SIGTERMs a worker's
    siblings the moment one exits: taken now, that SIGTERM would turn this rank's agreed exit
    (1, 2, 143 ...) into a kill, so the stop signals are ignored from here on.
    """
    ignore_stop_signals()
    if not isinstance(exc, USER_ERRORS) and is_collective_error(exc):
        lost = PeerLost(f"rank {dist.rank}: lost contact with the other ranks ({first_line(exc)}); "
                        "stopped without saving; OUT's last checkpoint is kept, and the same command "
                        "resumes from it")
        lost.__suppress_context__ = True  # as "raise ... from None": one line, not the collective's chain
        return lost
    return exc


class Together:
    """Runs a step each rank takes alone, then has all ranks agree on its outcome.

    One process: the step's error propagates as it is.  Under DDP each rank's error is held
    until every rank has finished the step; then, if any failed, every rank raises the first
    failed rank's error (:func:`~alexnet_train.distributed.agree_on_failure`): the same exit
    code everywhere, one line (rank 0's), and no rank left waiting in a collective.
    """

    def __init__(self, dist: DistInfo, group: bool) -> None:
        self.dist, self.group = dist, group

    def __call__(self, step: Callable[[], Any]) -> Any:
        if not self.group:
            return step()
        failure, result = None, None
        try:
            result = step()
        except Exception as exc:  # noqa: BLE001 - every rank must learn of it, whatever it is
            failure = exc
        agree_on_failure(self.dist, failure, run_errors())
        return result


def how_ranks_read_the_data(lines_of: list[list[str]]) -> str:
    """Rank 0's one line on how the other ranks got the data's file lists: from the index, or
    by a walk of their own (an index they could not see: storage that is not shared, or not
    yet current)."""
    others = len(lines_of) - 1
    walked = [(rank, line.split("data: ", 1)[1].split(":", 1)[0]) for rank, lines in enumerate(lines_of)
              for line in lines if rank and " walked " in line]
    if not walked:
        return f"data: the other {others} rank{'s' if others > 1 else ''} read the index"
    ranks = sorted({rank for rank, _ in walked})
    return (f"data: {len(ranks)} of the other {others} ranks walked the data themselves (rank {ranks[0]}: "
            f"{walked[0][1]}): they found no current index (not written, or not on storage they see)")


def _check_and_decide(cfg: Config, resume: str, out: Path, lock: ckpt.RunLock, dist: DistInfo, say: Log,
                      heard: Log):
    """Every rank: the config and the data (``heard`` gets the data lines).  Rank 0: OUT's lock
    and the resume point."""
    from .data import resolve_splits, with_demo_data
    from .data.loaders import check_decode

    if dist.is_main and out.is_dir():
        lock.acquire()
    cfg = with_demo_data(cfg, say)
    decode_notice = check_decode(cfg.data)
    if decode_notice:
        say(decode_notice)
    splits = resolve_splits(cfg.data, heard)
    if cfg.model.num_classes is None:  # a new head for whatever classes train_dir holds
        cfg = replace(cfg, "model", num_classes=len(splits.classes))
        say(f"model.num_classes: {len(splits.classes)}, the class folders of {cfg.data.train_dir}")
    if cfg.model.num_classes != len(splits.classes):
        raise ConfigError(f"model.num_classes: is {cfg.model.num_classes} but {cfg.data.train_dir} "
                          f"has {len(splits.classes)} class folders")
    point = None
    if dist.is_main:
        point = decide_resume(resume, out, say)
        if point is not None:
            check_resume_config(point.state["config"], cfg, say)
            if list(point.state["classes"]) != splits.classes:
                raise ConfigError(f"{cfg.data.train_dir}: its classes differ from those of checkpoint {point.path}")
    return cfg, splits, point


def _confirm(cfg: Config, splits, point, decision, out: Path, dist: DistInfo, group: bool, say: Log):
    """Every rank: rank 0's resume point, read from the same file (or none, as for rank 0);
    then the weights of a fresh fine-tune."""
    from .transfer import load_pretrained

    if group and not dist.is_main:
        point = confirm_resume(decision, out, dist)
    pretrained = None
    if point is None and cfg.model.weights is not None:
        pretrained = load_pretrained(cfg.model, splits.classes, cfg.data, say)
    elif cfg.model.weights is not None:
        say("model.weights: not read, the resumed checkpoint holds the weights")
    return point, pretrained


def _start_out(cfg: Config, out: Path, lock: ckpt.RunLock, point, provenance: str, dist: DistInfo):
    """Rank 0: create and lock OUT, write config.yaml (with this start's time, host and pid, so
    every rank can tell it is the same file) and trim metrics.jsonl; every rank: its tracker."""
    import os
    import socket
    import time

    from .tracking import Tracker

    if dist.is_main:
        if lock.fd is None:
            try:
                out.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise ckpt.WriteError(f"{out}: cannot create the output directory ({exc.strerror or exc})") from None
            lock.acquire()  # RunLocked if another run created OUT meanwhile
        started = f"# started {time.strftime('%Y-%m-%dT%H:%M:%S%z')} on {socket.gethostname()}, pid {os.getpid()}\n"
        text = provenance + started + dump_yaml(cfg)
        ckpt.atomic_write_bytes(out / "config.yaml", lambda fh: fh.write(text.encode()))
        trim_metrics(out / "metrics.jsonl", point.state["epoch"] if point else 0)
    return Tracker(out, enabled=dist.is_main, defer_errors=dist.distributed)


