"""The paper's down-sampled copy: every image once to ``size``×``size`` JPEG, same layout.

Usage::

    alexnet-prepare /data/imagenet/train /data/imagenet-256/train --workers 16
    alexnet-prepare /data/imagenet/val   /data/imagenet-256/val   --workers 16   # flat folder: mirrored as is

    report = prepare_tree("/data/imagenet/train", "/data/imagenet-256/train", workers=16,
                          progress=lambda total: tracker.progress(total, "prepare", interval=1000))
    report.written, report.skipped, report.failed, report.seconds

Each image under SRC (any depth) goes to the same relative path under DST,
under the same file name (``x.png`` stays ``x.png`` although it now holds a
JPEG: readers sniff the content, and unchanged names keep ``filename wnid``
labels files valid).  An image is decoded as ``load_rgb`` does (any mode to RGB,
EXIF orientation applied), its shorter side scaled to ``size`` and its central
square kept: the input that ``resize_shorter`` + ``center_crop`` would give the
training presets, paid once instead of every epoch.

Resumable: outputs appear only by ``os.replace`` of a finished temp file, so a
second run skips every destination that exists and redoes the rest; temp files
a killed run left behind are deleted.  Unreadable sources are logged, listed in
``DST/prepare-failures.txt`` and skipped without stopping.  ``DST/prepare.json``
records size and quality, so a resumed run cannot mix two settings in one tree.
Run one prepare per DST at a time: each run deletes the temp files it finds there.
"""
from __future__ import annotations

import contextlib
import io
import json
import multiprocessing
import os
import re
import signal
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
from PIL import ExifTags, Image

from ..checkpoint import atomic_write_bytes
from .datasets import BadImageError, DataError
from .treeindex import IMAGE_EXTENSIONS, is_image, sub_listing, walk_tree, write_index
from .decode import to_rgb

FAILURES_FILE = "prepare-failures.txt"
SETTINGS_FILE = "prepare.json"

# Files per pool task: large enough that pickling and IPC vanish next to ~2 ms of
# decoding per image, small enough that the last tasks balance across workers.
BATCH = 16

# Our own temp names (``.NAME.tmp-PID``), as this module and ``atomic_write_bytes`` make them.
_TEMP_RE = re.compile(r"^\..+\.tmp-\d+$")

# ImageOps.exif_transpose's table, applied here to the resized image rather than the full one.
_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


class _Unreadable(BadImageError):
    """BadImageError that keeps the bare reason, for the failures list."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(path, reason)
        self.reason = reason


@dataclass
class PrepareReport:
    written: int
    skipped: int
    failed: list[tuple[str, str]] = field(default_factory=list)  # (source path, reason), sorted by path
    seconds: float = 0.0


def shorter_side_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) with the shorter side ``size``: torchvision ``Resize(size)``'s rounding (truncation)."""
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def square_jpeg(path: str, size: int, quality: int) -> bytes:
    """The JPEG bytes of ``path``'s central ``size``×``size`` square; BadImageError if unreadable."""
    try:
        with Image.open(path) as img:
            target = shorter_side_size(*img.size, size)
            # libjpeg decodes at 1/2, 1/4 or 1/8 scale when the image is at least that
            # many times the target (PIL picks the scale; a no-op for other formats and
            # for smaller JPEGs): for large photos most of the decoding work disappears.
            # ``box`` is the original's extent in the reduced image, whose size is rounded
            # up, so the geometry below stays exactly that of a full decode.
            drafted = img.draft("RGB", target)
            box = drafted[1] if drafted else (0, 0, *img.size)
            rgb = to_rgb(img)
            orientation = img.getexif().get(ExifTags.Base.Orientation)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        # One line per failure in prepare-failures.txt: no tabs or newlines in the reason.
        raise _Unreadable(path, " ".join((str(exc) or type(exc).__name__).split())) from None
    # Antialiased bilinear is what ``transforms.resize_shorter`` uses on the fly (torchvision's
    # uint8 kernel reproduces PIL's), so training on this copy sees the same filter as
    # evaluating on the originals.
    # reducing_gap=3 box-reduces by an integer factor first when shrinking 3× or more
    # (large PNGs; JPEGs are already drafted): faster, and no visible difference.
    out = rgb.resize(target, Image.Resampling.BILINEAR, box=box, reducing_gap=3.0)
    # Orientation commutes with the (symmetric, separable) resize and the shorter-side
    # rule; turning the small image is cheaper than turning the full one.  The crop comes
    # after, so its rounding is that of torchvision's CenterCrop on the upright image.
    if orientation in _ORIENTATION:
        out = out.transpose(_ORIENTATION[orientation])
    width, height = out.size
    left, top = int(round((width - size) / 2.0)), int(round((height - size) / 2.0))
    out = out.crop((left, top, left + size, top + size))
    buf = io.BytesIO()
    # 4:2:0 chroma, like most of ImageNet's own JPEGs: this copy is decoded every epoch and
    # decoding is the loader's bottleneck; 4:4:4 decodes ~25% slower (measured on 300
    # 256-px q90 copies: 3,600 vs 4,700 images/s per core) for 25% bigger files and chroma
    # detail a classifier at 224 px barely uses.  No ``optimize``: 3% smaller for 2.5× the
    # encoding time.
    out.save(buf, "JPEG", quality=quality, subsampling=2)
    return buf.getvalue()


def _write_atomic(path: str, data: bytes, fsync: bool) -> None:
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f".{name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _prepare_batch(task: tuple[str, str, tuple[str, ...]], size: int, quality: int,
                   fsync: bool) -> tuple[int, list[tuple[str, str]]]:
    """(written, failures) of one folder's batch of names.  Top level, so spawn can pickle it.

    Only decoding failures are collected; a write failure (disk full, permissions) is
    raised, because it would fail every file after it too.
    """
    src_dir, dst_dir, names = task
    written, failed = 0, []
    for name in names:
        src = os.path.join(src_dir, name)
        try:
            data = square_jpeg(src, size, quality)
        except _Unreadable as exc:
            failed.append((src, exc.reason))
            continue
        _write_atomic(os.path.join(dst_dir, name), data, fsync)
        written += 1
    return written, failed


def _ignore_sigint() -> None:
    # Ctrl-C reaches the whole process group: the parent alone handles it (and
    # terminates the pool) instead of every worker printing a traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _check_args(src: Path, dst: Path, size: int, quality: int, workers: int) -> None:
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be an integer >= 1, got {size!r}")
    if not isinstance(quality, int) or not 1 <= quality <= 100:
        raise ValueError(f"quality must be an integer in 1..100, got {quality!r}")
    if not isinstance(workers, int) or workers < 0:
        raise ValueError(f"workers must be an integer >= 0, got {workers!r}")
    if not src.exists():
        raise DataError(f"{src}: source directory not found")
    if not src.is_dir():
        raise DataError(f"{src}: source is not a directory")
    real_src, real_dst = src.resolve(), dst.resolve()
    if real_dst == real_src or real_src in real_dst.parents:
        raise DataError(f"{dst}: destination is inside the source {src} (a later run would read its own output)")
    if dst.exists() and not dst.is_dir():
        raise DataError(f"{dst}: destination exists and is not a directory")


def _walk_images(src: Path) -> Iterator[tuple[str, list[str]]]:
    """(folder relative to src, sorted image names) for every folder holding images, sorted."""
    seen: set[tuple[int, int]] = set()

    def fail(err: OSError) -> None:
        # os.walk skips unreadable folders silently; a class folder missing from the copy must not be silent.
        raise DataError(f"{err.filename}: cannot list folder ({err.strerror})")

    for dirpath, dirnames, filenames in os.walk(src, onerror=fail, followlinks=True):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen:  # a symlink loop back up the tree
            dirnames.clear()
            continue
        seen.add((st.st_dev, st.st_ino))
        dirnames.sort()
        names = sorted(f for f in filenames if is_image(f))
        if names:
            yield os.path.relpath(dirpath, src), names


def _finished_outputs(folder: Path) -> set[str]:
    """Names of the whole outputs in ``folder``; deletes the temp files of a killed run."""
    done: set[str] = set()
    if not folder.is_dir():
        return done
    with os.scandir(folder) as entries:
        for entry in entries:
            if _TEMP_RE.match(entry.name):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
            # Zero bytes is what a rename without fsync can leave after a power loss
            # (ext4/XFS delayed allocation); it is redone, not trusted.
            elif entry.is_file() and entry.stat().st_size > 0:
                done.add(entry.name)
    return done


def _check_settings(dst: Path, size: int, quality: int) -> None:
    path = dst / SETTINGS_FILE
    wanted = {"size": size, "quality": quality}
    try:
        recorded = json.loads(path.read_text())
    except FileNotFoundError:
        atomic_write_bytes(path, lambda fh: fh.write((json.dumps(wanted) + "\n").encode()))
        return
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: unreadable ({exc})") from None
    if {k: recorded.get(k) for k in wanted} != wanted:
        raise DataError(
            f"{dst}: prepared with size={recorded.get('size')} quality={recorded.get('quality')} ({SETTINGS_FILE}); "
            f"this run asks size={size} quality={quality}: use those settings or another destination"
        )


def merge_failures(dst: Path, src: Path, failed: list[tuple[str, str]]) -> None:
    """DST/prepare-failures.txt with this source's lines replaced by ``failed`` (another source written
    to the same DST keeps its lines).  A file with no line of this source is left untouched when there
    is nothing to add, and the file is deleted only when every line in it was this source's."""
    path = dst / FAILURES_FILE
    mine = str(src) + os.sep
    try:
        old = path.read_bytes().decode("utf-8", "surrogateescape").splitlines(keepends=True)
    except FileNotFoundError:
        old = None
    others = [ln for ln in old or [] if not ln.startswith(mine)]
    if old is not None and len(others) == len(old) and not failed:
        return  # not ours to rewrite: nothing of this source in it, nothing to add
    lines = others + [f"{p}\t{reason}\n" for p, reason in failed]
    if not lines:
        path.unlink(missing_ok=True)
        return
    text = "".join(sorted(lines)).encode("utf-8", "surrogateescape")
    atomic_write_bytes(path, lambda fh: fh.write(text))


def _pool_context() -> Any:
    # fork on Linux: workers share the parent's already imported torch instead of
    # each importing it again (~3 s and ~800 MB apiece under spawn/forkserver).  The
    # pool is made before any progress bar starts a thread.  Elsewhere fork is unsafe
    # (macOS) or missing, and the platform default works since the worker is top level.
    if sys.platform.startswith("linux"):
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context()


def _write_indexes(dst: Path) -> list[tuple[Path, Path | None]]:
    """The indexes of the trees training will read in what prepare made, so its first start
    reads them instead of walking: DST's splits (DST/train, DST/val: top-level folders whose
    images are all in sub-folders), cut from one walk of DST, else DST itself.  Written
    whatever the folders' times: this run made them, and no one else writes a tree
    alexnet-prepare is filling."""
    listing = walk_tree(str(dst))
    labels = listing.files.labels
    splits = []
    for i, name in enumerate(listing.folders):
        mine = np.flatnonzero(labels == i)
        if len(mine) and not name.startswith(".") and all(b"/" in listing.files.relative(int(j))[len(name) + 1:]
                                                          for j in mine):
            splits.append(name)
    if not splits:
        return [(dst, write_index(listing))]
    return [(dst / name, write_index(sub_listing(listing, name))) for name in splits]


def _list_sources_ready_dst(src: Path, dst: Path, size: int, quality: int,
                            workers: int) -> tuple[list[tuple[str, list[str]]], int]:
    """Check the arguments, list SRC's images and ready DST (made, settings checked or recorded, a
    killed run's temp files gone); returns (each folder with its image names, how many images)."""
    _check_args(src, dst, size, quality, workers)
    folders = list(_walk_images(src))
    found = sum(len(names) for _, names in folders)
    if not found:
        raise DataError(f"{src}: no image files found (looked for {', '.join(IMAGE_EXTENSIONS)})")
    dst.mkdir(parents=True, exist_ok=True)
    _check_settings(dst, size, quality)
    _finished_outputs(dst)  # the root too, for temp files of prepare-failures.txt / prepare.json
    return folders, found


def _plan(src: Path, dst: Path, folders: list[tuple[str, list[str]]]
          ) -> tuple[list[tuple[str, str, tuple[str, ...]]], int]:
    """Make the output folders that get files; returns (the batches still to write, as
    ``_prepare_batch`` takes them, how many images are already done)."""
    tasks: list[tuple[str, str, tuple[str, ...]]] = []
    skipped = 0
    for rel, names in folders:
        out_dir = dst / rel
        done = _finished_outputs(out_dir)
        todo = [n for n in names if n not in done]
        skipped += len(names) - len(todo)
        if todo:
            out_dir.mkdir(parents=True, exist_ok=True)
            tasks.extend((str(src / rel), str(out_dir), tuple(todo[i:i + BATCH])) for i in range(0, len(todo), BATCH))
    return tasks, skipped


def _run_batches(tasks: list[tuple[str, str, tuple[str, ...]]], work: Callable, workers: int, progress: Any,
                 total: int, log: Callable[[str], None]) -> tuple[int, list[tuple[str, str]]]:
    """Returns (written, failures) of ``work`` over ``tasks``, here or in a pool of ``workers``,
    each file counted on ``progress`` (see ``prepare_tree``) and each failure logged."""
    written, failed = 0, []
    with contextlib.ExitStack() as stack:
        results: Iterable[tuple[int, list[tuple[str, str]]]]
        if workers > 0 and len(tasks) > 0:
            pool = stack.enter_context(
                _pool_context().Pool(min(workers, len(tasks)), initializer=_ignore_sigint)
            )
            results = pool.imap_unordered(work, tasks)
        else:
            results = map(work, tasks)
        bar = progress
        if progress is not None and not hasattr(progress, "update"):
            bar = progress(total)
            if hasattr(bar, "__exit__"):
                stack.enter_context(bar)
        for batch_written, batch_failed in results:
            written += batch_written
            for path, reason in batch_failed:
                log(f"warning: {path}: unreadable image ({reason})")
            failed.extend(batch_failed)
            if bar is not None:
                # One at a time: tracking.Progress logs when its count lands on a
                # multiple of its interval, which steps of a batch would jump over.
                for _ in range(batch_written + len(batch_failed)):
                    bar.update(1)
    return written, failed


def _say_done(log: Callable[[str], None], dst: Path, written: int, skipped: int, failed: list[tuple[str, str]],
              seconds: float, indexes: list[tuple[Path, Path | None]]) -> None:
    """Log what the run wrote, skipped and failed, where the failures are listed and the indexes written."""
    log(f"prepare: wrote {written}, skipped {skipped}, failed {len(failed)} in {seconds:.1f}s "
        f"({written / seconds if seconds > 0 else 0.0:.0f} images/s)")
    if failed:
        log(f"prepare: {len(failed)} unreadable images listed in {dst / FAILURES_FILE}")
    for tree, index in indexes:
        log(f"prepare: index of {tree} written to {index}" if index else
            f"prepare: no index of {tree} written (neither beside it nor in the cache folder could be written)")


def prepare_tree(
    src: str | Path,
    dst: str | Path,
    size: int = 256,
    quality: int = 90,
    workers: int = 0,
    progress: Any = None,
    log: Callable[[str], None] = print,
    fsync: bool = False,
) -> PrepareReport:
    """Write the ``size``×``size`` JPEG copy of every image under ``src`` to the same path under ``dst``.

    ``workers=0`` works in this process, ``workers=N`` in a pool of N.  ``progress``
    is None, an object with ``update(n)`` (counting the files this run writes or
    fails), or a callable taking that count once it is known and returning such an
    object (e.g. ``lambda n: tracker.progress(n, "prepare")``; closed at the end if
    it is a context manager).

    ``fsync=False`` by default: the rename alone makes every output whole against a
    killed process, which is what resuming needs; per-file fsync would add a journal
    commit to each of 1.28M small files (hours on disks, worse on NFS).  What a
    power loss can leave (zero-byte files) is redone by the next run, and one
    ``os.sync()`` at the end makes a finished run durable.

    Raises DataError for a missing or image-free ``src`` or a ``dst`` inside it,
    ValueError for a bad ``size``/``quality``/``workers``, OSError when writing fails.
    """
    started = time.monotonic()
    src, dst = Path(os.path.abspath(src)), Path(dst)  # failure lines name SRC alike however it is spelled
    folders, found = _list_sources_ready_dst(src, dst, size, quality, workers)
    tasks, skipped = _plan(src, dst, folders)
    total = found - skipped
    log(f"prepare: {found} images in {src}: {total} to write, {skipped} already done -> {dst} "
        f"({size}x{size}, JPEG quality {quality}, {f'{workers} workers' if workers else 'in-process'})")

    work = partial(_prepare_batch, size=size, quality=quality, fsync=fsync)
    written, failed = _run_batches(tasks, work, workers, progress, total, log)

    failed.sort()
    merge_failures(dst, src, failed)
    indexes = _write_indexes(dst)
    if written and hasattr(os, "sync"):
        os.sync()
    seconds = time.monotonic() - started
    _say_done(log, dst, written, skipped, failed, seconds, indexes)
    return PrepareReport(written=written, skipped=skipped, failed=failed, seconds=seconds)

