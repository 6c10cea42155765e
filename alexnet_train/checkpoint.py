"""The only reader and writer of checkpoints: atomic saves, safe loads, resume discovery.

Usage::

    save_checkpoint(state, out / "last.pth")     # tmp file, fsync, os.replace, fsync dir
    state = load_checkpoint("runs/x/best.pth")    # CheckpointError names the file
    path = find_resume(out, log=print)            # newest loadable checkpoint, or None

Checkpoints hold only tensors and plain Python containers, so they load with
``torch.load(weights_only=True)``: opening one never runs pickled code.
"""
from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Any, Callable

import torch
from .errors import CheckpointError, RunLocked, WriteError

CHECKPOINT_FORMAT = 1
EPOCH_RE = re.compile(r"^epoch-(\d+)\.pth$")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_error(path: str | os.PathLike, exc: BaseException) -> WriteError:
    """A one-line WriteError for ``exc`` raised while writing ``path``.

    torch's zip writer turns the OSError of a full disk into ``RuntimeError: [enforce fail at
    inline_container.cc ...]``; the OSError it hides is found on the exception's chain.
    """
    seen = exc
    while seen is not None and not isinstance(seen, OSError):
        seen = seen.__cause__ or seen.__context__
    if isinstance(seen, OSError):
        cause = seen.strerror or str(seen) or type(seen).__name__
    else:
        cause = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
    return WriteError(f"{path}: cannot write ({cause})")


def atomic_write_bytes(path: str | os.PathLike, write: Callable[[Any], None]) -> None:
    """Call ``write(fileobj)`` on a temporary sibling, fsync it, then rename it over ``path``.

    A kill at any instant leaves either the old file or the new one, whole.  Any failure
    to write (a full disk, say) removes the temporary file, keeps the old one and raises
    :class:`WriteError` naming ``path``.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        if isinstance(exc, (OSError, RuntimeError)) and not isinstance(exc, WriteError):
            kept = "; the previous version is kept" if path.exists() else ""
            err = write_error(path, exc)
            raise WriteError(f"{err}{kept}") from None
        raise
    _fsync_dir(path.parent)


def save_checkpoint(state: dict, path: str | os.PathLike) -> None:
    state = {"format": CHECKPOINT_FORMAT, **state}
    atomic_write_bytes(path, lambda fh: torch.save(state, fh))


def save_state_dict(state: dict, path: str | os.PathLike) -> None:
    """A bare state_dict (no ``format`` key), atomically: what torchvision's loaders expect."""
    atomic_write_bytes(path, lambda fh: torch.save(state, fh))


def copy_file(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Atomically make ``dst`` an independent copy of ``src``.

    A copy, not a hard link: damage done in place to one name (an interrupted
    ``cp`` over last.pth, say) must not reach best.pth or the epoch files.
    """
    import shutil

    with open(src, "rb") as fin:
        atomic_write_bytes(dst, lambda fout: shutil.copyfileobj(fin, fout, 16 << 20))


_UNSAFE_GLOBAL = re.compile(r"GLOBAL ([\w.]+) was not an allowed global")


def refused_pickle_message(path: str | os.PathLike, text: str) -> str:
    """One line, in our words, for a file that ``torch.load(weights_only=True)`` refused.

    ``text`` is torch's own multi-line explanation; only the name of the first object it
    refused is taken from it.
    """
    found = _UNSAFE_GLOBAL.search(text)
    what = f" (the first: {found.group(1)})" if found else ""
    return (f"{path}: holds pickled Python objects{what}, not only tensors; refusing to load it, as "
            "unpickling them could run code from the file. If you trust its source, load it once with "
            "torch.load(..., weights_only=False) and torch.save its state_dict")


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint of ours or a plain state_dict; CheckpointError names the file on failure."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    with open(path, "rb") as fh:
        magic = fh.read(4)
    # torch.save writes a zip archive; files from before PyTorch 1.6 are a bare pickle.
    if magic[:2] != b"PK" and magic[:1] != b"\x80":
        raise CheckpointError(f"{path}: unreadable checkpoint (not a PyTorch file: "
                              f"{'empty' if not magic else 'unknown format'})")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # truncated zip, unpickling refused ...
        text = str(exc)
        if "Weights only load failed" in text or "WeightsUnpickler" in text:
            raise CheckpointError(refused_pickle_message(path, text)) from None
        if "zip archive" in text or "central directory" in text or "PytorchStreamReader" in text:
            reason = "truncated or corrupt archive"
        else:
            lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
            reason = lines[0] if lines else type(exc).__name__
        raise CheckpointError(f"{path}: unreadable checkpoint ({reason})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a checkpoint (holds a {type(state).__name__}, not a dict)")
    return state


def load_hub_weights(weights: Any, log: Callable[[str], None] = print) -> dict:
    """A torchvision ``WeightsEnum``'s state_dict through torchvision's own API.

    The file is downloaded once (progress on stderr, SHA-256 prefix checked) into
    ``torch.hub.get_dir()/checkpoints`` and read from there after; it is loaded
    with ``weights_only=True``.  CheckpointError says where to put the file when
    it cannot be downloaded, and names a cached file that cannot be read.
    """
    import urllib.error
    from urllib.parse import urlparse

    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(weights.url).path)
    if cached.exists():
        log(f"weights: reading {cached} (torch hub cache)")
    else:
        log(f"weights: downloading {weights.url} to {cached} (once; later runs read the cache)")
    try:
        state = weights.get_state_dict(progress=True, check_hash=True, weights_only=True)
    except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise CheckpointError(
            f"{weights.url}: cannot download torchvision's weights ({reason}); on a machine without "
            f"internet, copy that file to {cached} (torch.hub.get_dir() honours $TORCH_HOME)") from None
    except Exception as exc:  # a bad download's hash, or a damaged cache file (zip or unpickling errors)
        text = str(exc)
        if isinstance(exc, RuntimeError) and "invalid hash value" in text:
            raise CheckpointError(f"{weights.url}: the download does not match its SHA-256 prefix; "
                                  "nothing was cached, run again") from None
        first = next((ln.strip() for ln in text.splitlines() if ln.strip()), type(exc).__name__)
        raise CheckpointError(f"{cached}: unreadable cached weights ({first}); delete it to download "
                              "it again") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{cached}: not a state_dict (holds a {type(state).__name__})")
    return state


def file_digest(path: str | os.PathLike) -> tuple[int, str]:
    """(size in bytes, SHA-256 hex) of a file: how DDP ranks check they resume from the same one."""
    import hashlib

    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(8 << 20):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def resume_candidates(out_dir: str | os.PathLike) -> list[Path]:
    """The checkpoints :func:`find_resume` tries, in its order, that exist in ``out_dir``."""
    out = Path(out_dir)
    return [p for p in [out / "last.pth", *epoch_checkpoints(out), out / "best.pth"] if p.exists()]


def is_training_checkpoint(state: dict) -> bool:
    return isinstance(state.get("model"), dict) and "config" in state and "classes" in state


def epoch_checkpoints(out_dir: str | os.PathLike) -> list[Path]:
    """``epoch-NNN.pth`` files in ``out_dir``, newest (highest epoch) first."""
    out = Path(out_dir)
    if not out.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out.iterdir() if (m := EPOCH_RE.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def find_resume(out_dir: str | os.PathLike, log: Callable[[str], None] = print) -> tuple[Path, dict] | None:
    """The newest loadable training checkpoint in ``out_dir`` and its state; None if it holds none.

    Tries ``last.pth``, then ``epoch-NNN.pth`` from the newest, then ``best.pth``; unreadable
    ones are reported by name.  If checkpoints exist but none loads, raises CheckpointError
    rather than let a fresh run overwrite what is left of the old one.
    """
    out = Path(out_dir)
    candidates = resume_candidates(out)
    problems = []
    for path in candidates:
        try:
            state = load_checkpoint(path)
        except CheckpointError as exc:
            problems.append(str(exc))
            log(f"warning: {exc}; trying an older checkpoint")
            continue
        if not is_training_checkpoint(state):
            problems.append(f"{path}: not a training checkpoint of alexnet-train")
            log(f"warning: {problems[-1]}; trying an older checkpoint")
            continue
        return path, state
    if candidates:
        raise CheckpointError(
            f"{problems[0]}; no checkpoint in {out} is readable: restore one, resume from a file "
            "with --resume PATH, or start over in another --out"
        )
    return None


class RunLock:
    """An exclusive POSIX record lock on ``OUT/.lock``, held while a run writes into OUT.

    A POSIX lock (``fcntl(F_SETLK)``) belongs to the process that took it: a child made
    by ``fork`` (a DataLoader worker) does not inherit it, and the kernel drops it the
    moment that process dies, however it dies.  So a restart right after ``kill -9`` is
    never refused by workers still shutting down, and a lock file left by a crashed run
    never blocks the next one.  (An ``flock`` would be shared with every forked worker.)

    POSIX locks do not conflict inside one process, and closing any descriptor of the
    file drops them, so this process's own locks are kept in :attr:`held` and checked
    before the file is opened.
    """

    held: set[Path] = set()  # lock files held by this process

    def __init__(self, out_dir: str | os.PathLike) -> None:
        self.path = Path(out_dir) / ".lock"
        self.fd: int | None = None

    def acquire(self) -> "RunLock":
        try:
            import fcntl
        except ImportError:  # not POSIX: no locking
            return self
        key = self.path.resolve()
        if key in RunLock.held:
            raise RunLocked(f"{self.path}: another alexnet-train (pid {os.getpid()} on {os.uname().nodename}, "
                            f"this process) is running in {self.path.parent}")
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunLocked(f"{self.path}: another alexnet-train ({holder}) is running in {self.path.parent}") from None
        try:  # who holds it, for the message of a refused run (on a full disk: the lock still holds)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {os.uname().nodename}\n".encode(), 0)
        except OSError:
            pass
        self.fd = fd
        RunLock.held.add(key)
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the lock
            self.fd = None
            RunLock.held.discard(self.path.resolve())

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def prune_epoch_checkpoints(out_dir: str | os.PathLike, keep_last: int) -> None:
    for path in epoch_checkpoints(out_dir)[keep_last:]:
        path.unlink(missing_ok=True)


class SaveSchedule:
    """When a mid-epoch ``last.pth`` is due: every ``train.checkpoint_steps`` global steps and
    every ``train.checkpoint_minutes`` (0 = off); the end of an epoch always saves.

    The time is this process's clock, so under DDP the trainer agrees on :meth:`time_due`
    (any rank's yes) before any rank saves; the step count is the same on every rank.
    """

    def __init__(self, steps: int, minutes: float) -> None:
        self.steps = steps
        self.seconds = 60.0 * minutes
        self.saved_at = time.monotonic()

    def steps_due(self, global_step: int, at_epoch_end: bool) -> bool:
        return bool(self.steps) and global_step % self.steps == 0 and not at_epoch_end

    def time_due(self, at_epoch_end: bool) -> bool:
        return bool(self.seconds) and not at_epoch_end and time.monotonic() - self.saved_at >= self.seconds

    def saved(self) -> None:
        self.saved_at = time.monotonic()
