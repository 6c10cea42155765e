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


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's text (the DataLoader's run to pages)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return lines[0][:300] if lines else type(exc).__name__


def run_errors() -> tuple[type, ...]:
    """The errors of a run that keep their class (and so their exit code) when every DDP rank
    raises one rank's error (see :func:`~alexnet_train.distributed.agree_on_failure`)."""
    return (ConfigError, DataError, WeightsError, RunLocked, CheckpointError, WriteError,
            NonFiniteLoss, BadImageError, TooManyBadImages, LoaderFailed, OSError)
