"""Every error a user can meet, in one module that imports nothing of the package.

Usage::

    from alexnet_train.errors import ConfigError, DataError, exit_code

    raise DataError(f"{root}: no image files found")    # one line naming the path at fault
    sys.exit(exit_code(exc))                            # cli: the exit code of any of them

Each class's message is the one line the user reads (``alexnet-train: error: ...``);
the modules that raise them import them from here, so none imports another's code for
an exception class.
"""
from __future__ import annotations

import signal
from pathlib import Path

# Bad usage, config or data: exit 2, nothing written.
class ConfigError(ValueError):
    """A bad config: the CLI prints it on one line and exits with status 2."""


class DataError(ValueError):
    """Bad data layout or labels; carries a one-line message naming the path."""


class UsageError(ValueError):
    """Bad arguments (exit 2): a missing file given on the command line, an unknown size."""


class WeightsError(ValueError):
    """``model.weights`` does not fit the model: a config error (exit 2), one line naming the layer."""


# Another run holds OUT: exit 75.
class RunLocked(RuntimeError):
    """Another live process holds the output directory's lock."""


# A stop signal: exit 128 + the signal's number.
class Interrupted(Exception):
    """SIGINT/SIGTERM/SIGUSR1 arrived; a resumable checkpoint was saved first."""

    def __init__(self, signum: int, path: Path | None) -> None:
        super().__init__(f"interrupted by {signal.Signals(signum).name}; resumable checkpoint: {path}")
        self.signum = signum
        self.path = path
        self.report = True  # False on DDP ranks other than 0: one line for the run, not one per rank


# A stop signal that arrives within this many seconds of the first is the same request,
# delivered again: a process group's copy and a launcher's forward of it (torchrun, srun,
# `timeout --foreground`, a batch script's trap) arrive milliseconds apart.  Later, it is a
# person asking again (a second Ctrl-C), and the run aborts without saving (Aborted).
REPEAT_SECONDS = 5.0


class Aborted(KeyboardInterrupt):
    """A deliberate second stop request (see :class:`~alexnet_train.lifecycle.StopSignals`): the run
    stops at once, without saving.  A KeyboardInterrupt, so no ``except Exception`` swallows it."""

    def __init__(self, signum: int, report: bool = True) -> None:
        super().__init__(f"aborted by a second {signal.Signals(signum).name} without saving; the last "
                         "checkpoint in OUT, if any, is whole, and the same command resumes from it")
        self.signum = signum
        self.report = report


# Runtime failures: exit 1, one line naming the file or setting at fault.
class BadImageError(RuntimeError):
    """An image file that cannot be decoded; the message names the file."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: unreadable image ({reason})")
        self.path = path
        self.reason = reason


class TooManyBadImages(RuntimeError):
    """More of a split is unreadable than ``data.max_bad_fraction`` allows."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or is not ours; the message names the file."""


class WriteError(RuntimeError):
    """A file of the run could not be written (a full disk, a read-only mount ...).

    The message names the file and the cause; the file's previous version, if any, is intact.
    """


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN/inf; nothing was saved from the bad state."""


class OutOfMemory(RuntimeError):
    """The device ran out of memory in a step; the message names the batch size and what to try."""


class LoaderFailed(RuntimeError):
    """This process's data loader raised (a worker died, a read failed); one line says what."""


class RankFailed(RuntimeError):
    """Another rank failed in a way this one cannot name (an unexpected error: see its log)."""


class PeerLost(RuntimeError):
    """A collective failed or timed out: another rank died, hung, or left the run alone."""


class PublicDataError(RuntimeError):
    """A download, archive or layout problem; the message names the file or URL at fault."""


class ReportError(Exception):
    """OUT cannot be reported on; the message is one line naming the file at fault."""


class PlotUnavailable(ReportError):
    """matplotlib cannot be imported; the message says how to install it."""


class ExportError(RuntimeError):
    """OUT cannot be written, or an exported file does not reproduce the model; names the file."""


def first_line(exc: BaseException, with_type: bool = False) -> str:
    """The first non-empty line of an exception's text (the DataLoader's run to pages);
    ``with_type``: after the class name, at most 200 characters (for errors of other libraries)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    if not with_type:
        return lines[0][:300] if lines else type(exc).__name__
    text = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


EXIT_RUNTIME = 1
EXIT_CONFIG = 2  # argparse's code for bad usage
EXIT_LOCKED = 75  # EX_TEMPFAIL: try again later

# Each class once: its exit code, and whether a DDP rank's error of that class is raised as
# itself on every rank (True) or, as an error the others cannot name, as RankFailed.  A
# subclass comes before its base.  Adding a failure kind: its class above, its row here.
EXITS: tuple[tuple[type, int, bool], ...] = (
    (ConfigError, EXIT_CONFIG, True),
    (DataError, EXIT_CONFIG, True),
    (UsageError, EXIT_CONFIG, False),
    (WeightsError, EXIT_CONFIG, True),
    (RunLocked, EXIT_LOCKED, True),
    (BadImageError, EXIT_RUNTIME, True),
    (TooManyBadImages, EXIT_RUNTIME, True),
    (CheckpointError, EXIT_RUNTIME, True),
    (WriteError, EXIT_RUNTIME, True),
    (NonFiniteLoss, EXIT_RUNTIME, True),
    (OutOfMemory, EXIT_RUNTIME, True),
    (LoaderFailed, EXIT_RUNTIME, True),
    (RankFailed, EXIT_RUNTIME, False),
    (PeerLost, EXIT_RUNTIME, False),
    (PublicDataError, EXIT_RUNTIME, False),
    (ReportError, EXIT_RUNTIME, False),
    (ExportError, EXIT_RUNTIME, False),
    (OSError, EXIT_RUNTIME, True),  # a read or write that failed: a vanished file, an I/O error
)

# What a command reports on one line with its exit code; anything else is a bug (a traceback).
USER_ERRORS: tuple[type, ...] = (Interrupted, *(cls for cls, _, _ in EXITS))


def run_errors() -> tuple[type, ...]:
    """The errors of a run that keep their class (and so their exit code) when every DDP rank
    raises one rank's error (see :func:`~alexnet_train.distributed.agree_on_failure`)."""
    return tuple(cls for cls, _, agreed in EXITS if agreed)


def exit_code(exc: BaseException) -> int:
    """The process exit code for ``exc``: 128 + the signal for a stop, else its row in EXITS."""
    if isinstance(exc, (Interrupted, Aborted)):
        return 128 + exc.signum
    return next((code for cls, code, _ in EXITS if isinstance(exc, cls)), EXIT_RUNTIME)


def message(exc: BaseException) -> str:
    """The one line a command prints for ``exc`` (after ``PROG: error:``)."""
    if isinstance(exc, OSError):
        return f"{exc.filename or ''}: {exc.strerror or exc}".lstrip(": ")
    return str(exc)
