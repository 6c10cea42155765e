"""alexnet-prepare --shards: an image tree as WebDataset tar shards, laid out as timm/imagenet-1k-wds.

Usage::

    alexnet-prepare /data/imagenet/train /data/imagenet-wds --shards --workers 16
    alexnet-prepare /data/imagenet/val   /data/imagenet-wds --shards --labels LOC_val_solution.csv

    report = write_shards("/data/imagenet/train", "/data/imagenet-wds", workers=16)
    report.shards, report.written, report.skipped, report.failed, report.seconds

What is written to DST:

- ``{prefix}-{NNNN}.tar``: ``imagenet1k-train-0000.tar`` for a SRC named ``train``,
  ``imagenet1k-validation-0000.tar`` for ``val``/``validation``, else ``<SRC's name>-0000.tar``.
  Each sample is three members: ``KEY.jpg`` (the ``size``×``size`` copy ``prepare_tree`` makes,
  or with ``size=0`` the source file's bytes unchanged), ``KEY.cls`` (the class index as ASCII
  decimal) and ``KEY.json`` (``{"filename": "<wnid>/<name>", "label": i, "height": h, "width": w}``;
  ``<wnid>/<name>`` for a flat folder with a labels file too, as timm's validation shards have it).
  KEY is the source file's stem ('.' in it becomes '_': WebDataset readers take everything
  after a name's first dot for the extension).
- ``_info.json``: timm's split table (``filenames``, ``shard_lengths``, ``num_samples`` per
  split).  Only this split's entry is replaced: the other splits' entries and any other keys of
  an ``_info.json`` already there (ours or a download's) are kept.
- ``.{prefix}-progress.json``: the shards finished so far, for resuming, and every shard name this
  split's runs have claimed (``owned``).
- ``prepare-failures.txt``: this source's unreadable files; other lines are kept as they are.

Class indices are the sorted class folders (ImageFolder's order), or for a flat folder
with a labels file the sorted wnids of that file.  A SRC in class folders given a labels file
too (README step 1 leaves val sorted) is written from its folders, byte for byte as without the
file, after checking that the file labels every image as its folder does.  So the ``.cls`` of a split written alone
is that split's own numbering (a val that lacks some classes numbers the rest differently from
train): readers match a split to training's classes by the wnid in ``KEY.json``'s ``filename``,
not by ``.cls``.  Samples are shuffled across shards by
a keyed hash of their relative path (no shard holds one class, and the order is the same
on every platform and NumPy), then cut into shards of at most ``shard_size`` bytes
(but at least one sample each).  Members are USTAR, mtime 0, mode 0444, owner 0:
the same inputs give byte-identical shards.

Resumable: each shard is written as ``NAME.tar.tmp``, fsynced and renamed, then recorded
in the progress file; a re-run keeps the recorded shards whose size still matches and
writes on from the first one missing.  The plan (order, what was written with which
settings) is fingerprinted, so a resume cannot mix two sources or two settings.
Unreadable sources are logged, listed in ``DST/prepare-failures.txt`` and left out.

Never deletes or overwrites a file it did not write.  A file in DST that looks like a shard of
the split being written (``{prefix}-NNNN.tar``, ``{prefix}_NNNN.tar`` or such a name plus ``.tmp``)
but is not in that split's progress record (a downloaded timm/imagenet-1k-wds, another tool's
output) makes it refuse with a DataError naming the files, before anything in DST is touched;
write to another DST or move them away.  Shards of other splits are left alone.  Only shard names
the progress record lists are ever replaced or removed: a name is recorded before its temp file
is created, so whatever a kill leaves behind is recognised as ours on the next run.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import tarfile
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator

from PIL import Image

from ..checkpoint import atomic_write_bytes
from .datasets import DataError, check_sorted_labels, class_folders, read_labels_file
from .prepare import FAILURES_FILE, merge_failures, _ignore_sigint, _pool_context, _Unreadable, square_jpeg
from .treeindex import IMAGE_EXTENSIONS, is_image

INFO_FILE = "_info.json"
DEFAULT_SHARD_SIZE = 1_000_000_000
PROGRESS_VERSION = 1
# Samples per pool task: pickling and IPC vanish next to the decoding, and results come back in order.
CHUNK = 16


@dataclass(frozen=True, slots=True)  # slots: no dict per sample, of which ImageNet has 1.28M
class Sample:
    path: str      # the source file
    relname: str   # the json's "filename": its path under SRC, '/'-separated; "<wnid>/<name>" in a flat SRC
    key: str
    label: int


@dataclass
class ShardReport:
    shards: list[str]           # every shard of the split, in order
    written: int                # samples written by this run
    skipped: int                # samples in shards a previous run finished
    failed: list[tuple[str, str]] = field(default_factory=list)  # (source path, reason), sorted
    seconds: float = 0.0


def split_names(src: Path) -> tuple[str, str]:
    """(shard prefix, split name in _info.json) for a source tree, as timm's ImageNet names them."""
    base = src.resolve().name
    if base == "train":
        return "imagenet1k-train", "train"
    if base in ("val", "validation"):
        return "imagenet1k-validation", "validation"
    return base, base


def shard_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:04d}.tar"


def _key(name: str) -> str:
    return os.path.splitext(name)[0].replace(".", "_")


def _folder_samples(src: Path) -> list[Sample]:
    classes = class_folders(str(src))
    samples = []
    for label, wnid in enumerate(classes):
        found = 0
        for dirpath, dirnames, filenames in os.walk(src / wnid, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filter(is_image, filenames)):
                path = os.path.join(dirpath, name)
                rel = os.path.relpath(path, src).replace(os.sep, "/")
                samples.append(Sample(path, rel, _key(name), label))
                found += 1
        if not found:
            raise DataError(f"{src / wnid}: class folder holds no image files")
    return samples


def _flat_samples(src: Path, labels_file: str) -> tuple[list[str], list[Sample]]:
    wnid_of = read_labels_file(labels_file)
    classes = sorted(set(wnid_of.values()))
    index = {w: i for i, w in enumerate(classes)}
    names = sorted(e.name for e in os.scandir(src) if e.is_file() and is_image(e.name))
    samples = []
    for name in names:
        wnid = wnid_of.get(os.path.splitext(name)[0])
        if wnid is None:
            raise DataError(f"{src / name}: no label for this file in {labels_file}")
        # "<wnid>/<name>" as in a class folder: readers take the wnid from it (timm's val shards do the same).
        samples.append(Sample(str(src / name), f"{wnid}/{name}", _key(name), index[wnid]))
    return classes, samples


def list_samples(src: Path, labels_file: str | None = None, log: Callable[[str], None] | None = None) -> list[Sample]:
    """Every image of SRC with its key and class index, sorted by path; DataError for a bad layout
    or two files with one key.

    A SRC already sorted into class folders with a labels file as well (README step 1's val and
    Kaggle's LOC_val_solution.csv) is written from its folders, as without the file, which is
    checked against them: each image must have a label there and it must be its folder's
    (:func:`~alexnet_train.data.datasets.check_sorted_labels`); ``log`` hears that it was."""
    if class_folders(str(src)):
        samples = _folder_samples(src)
        if labels_file is not None:
            checked = check_sorted_labels(((s.path, s.relname.partition("/")[0]) for s in samples),
                                          read_labels_file(labels_file), labels_file)
            if log:
                log(f"prepare: {src} is already sorted into class folders, which number the classes; "
                    f"{labels_file} agrees with them on all {checked} images")
    elif labels_file is not None:
        _classes, samples = _flat_samples(src, labels_file)
    else:
        raise DataError(f"{src}: no class folders; a flat folder of images needs --labels FILE")
    if not samples:
        raise DataError(f"{src}: no image files found (looked for {', '.join(IMAGE_EXTENSIONS)})")
    first: dict[str, str] = {}
    for s in samples:
        if s.key in first:
            raise DataError(f"{s.path}: its key {s.key!r} is also that of {first[s.key]} (keys are file stems "
                            "and must be unique in a split)")
        first[s.key] = s.path
    return samples


def shuffled(samples: list[Sample], seed: int) -> list[Sample]:
    """``samples`` in a fixed pseudo-random order: by a keyed hash of each relative path, so the
    order depends on nothing but the names and the seed (not on Python's or NumPy's generators)."""
    salt = seed.to_bytes(8, "little", signed=True)
    return sorted(samples, key=lambda s: hashlib.blake2b(s.relname.encode("utf-8", "surrogateescape"),
                                                         digest_size=16, key=salt).digest())


def _encode(path: str, size: int, quality: int) -> tuple[bytes, int, int] | tuple[None, str, None]:
    """(JPEG bytes, height, width) to store for ``path``, or (None, reason, None) if it is unreadable.
    Top level, so a pool can pickle it."""
    if size > 0:
        try:
            return square_jpeg(path, size, quality), size, size
        except _Unreadable as exc:
            return None, exc.reason, None
    try:
        with open(path, "rb") as fh:
            data = fh.read()
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            # Decoded at 1/8 scale where the format allows: a truncated or corrupt file still fails,
            # at a fraction of a full decode's cost.
            img.draft("RGB", (max(1, width // 8), max(1, height // 8)))
            img.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        return None, " ".join((str(exc) or type(exc).__name__).split()), None
    return data, height, width


def _member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def _sample_members(sample: Sample, data: bytes, height: int, width: int) -> list[tuple[str, bytes]]:
    meta = {"filename": sample.relname, "label": sample.label, "height": height, "width": width}
    return [(f"{sample.key}.jpg", data), (f"{sample.key}.cls", str(sample.label).encode()),
            (f"{sample.key}.json", json.dumps(meta).encode())]


def _tar_bytes(members: list[tuple[str, bytes]]) -> int:
    """What these members add to a tar: a 512-byte header each, contents padded to 512."""
    return sum(512 + -(-len(data) // 512) * 512 for _, data in members)


class _ShardFile:
    """One shard being written: ``NAME.tar.tmp``, renamed to ``NAME.tar`` when finished."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.tmp = path.with_name(path.name + ".tmp")
        self.fh = open(self.tmp, "wb")
        self.tar = tarfile.open(fileobj=self.fh, mode="w", format=tarfile.USTAR_FORMAT)
        self.samples = 0
        self.bytes = 1024  # the end-of-archive blocks

    def add(self, sample: Sample, members: list[tuple[str, bytes]]) -> None:
        for name, data in members:
            try:
                _member(self.tar, name, data)
            except ValueError as exc:  # a name USTAR cannot hold
                raise DataError(f"{sample.path}: cannot be stored in a USTAR tar as {name!r} ({exc})") from None
        self.samples += 1
        self.bytes += _tar_bytes(members)

    def size_with(self, members: list[tuple[str, bytes]]) -> int:
        """The file's size if ``members`` were added: tarfile pads the archive to whole records."""
        return -(-(self.bytes + _tar_bytes(members)) // tarfile.RECORDSIZE) * tarfile.RECORDSIZE

    def finish(self) -> int:
        self.tar.close()
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()
        os.replace(self.tmp, self.path)
        return self.path.stat().st_size

    def discard(self) -> None:
        with contextlib.suppress(OSError):
            self.fh.close()
        with contextlib.suppress(OSError):
            self.tmp.unlink()


def _fingerprint(plan: list[Sample], settings: dict[str, Any]) -> str:
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for s in plan:
        h.update(f"{s.relname}\t{s.key}\t{s.label}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: unreadable ({exc})") from None


def _write_json(path: Path, obj: Any) -> None:
    text = (json.dumps(obj, indent=1) + "\n").encode()
    atomic_write_bytes(path, lambda fh: fh.write(text))


def _read_progress(progress: Path, fingerprint: str) -> dict[str, Any] | None:
    """The progress record of a previous run with this plan, or None; DataError for another plan's."""
    state = _read_json(progress)
    if state is None:
        return None
    if (not isinstance(state, dict) or state.get("version") != PROGRESS_VERSION
            or not isinstance(state.get("shards", []), list) or not isinstance(state.get("owned", []), list)):
        raise DataError(f"{progress}: not a progress file of this version of alexnet-prepare")
    if state.get("plan") != fingerprint:
        raise DataError(f"{progress}: these shards were written from other source files or with other settings "
                        f"({state.get('settings')}); use those, another destination, or delete this split's "
                        "shards and this file")
    return state


def _owned(state: dict[str, Any] | None) -> set[str]:
    """The shard names (``NAME.tar``) a progress record says this split's runs created or were creating."""
    if state is None:
        return set()
    # "owned" is absent from a record written before it existed: its finished shards are all it knew.
    return {s["filename"] for s in state.get("shards", [])} | set(state.get("owned", []))


def _finished_shards(dst: Path, state: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The recorded shards of a previous run with this plan that are still whole on disk, in order."""
    kept = []
    for shard in (state or {}).get("shards", []):
        path = dst / shard["filename"]
        if not path.is_file() or path.stat().st_size != shard["bytes"]:
            break
        kept.append(shard)
    return kept


def _shard_pattern(prefix: str) -> re.Pattern[str]:
    # '_' as well as '-': readers take 'train_0000.tar' for a shard of 'train' too, so such a file
    # beside ours would be read as part of the split we write.
    return re.compile(re.escape(prefix) + r"[-_]\d+\.tar(\.tmp)?$")


def _refuse_foreign(dst: Path, prefix: str, owned: set[str], progress: Path) -> None:
    """DataError naming the files in DST that look like shards (or shard temps) of this split but that
    our progress record does not list: a download or another tool's output, which we must neither
    overwrite nor delete, nor leave beside ours for a reader to mix in."""
    if not dst.is_dir():
        return
    pattern = _shard_pattern(prefix)
    foreign = sorted(e.name for e in os.scandir(dst)
                     if pattern.match(e.name) and e.name.removesuffix(".tmp") not in owned)
    if foreign:
        named = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        record = f"{progress.name} does not list them" if progress.exists() else f"there is no {progress.name}"
        raise DataError(f"{dst}: {len(foreign)} file(s) named like shards of {prefix!r} were not written by "
                        f"alexnet-prepare ({record}): {named}; nothing was changed: write to another destination, "
                        "or move them away")


def _remove_temps(dst: Path, owned: set[str]) -> None:
    """Delete the temp files a killed run of ours left.  A temp is ours when its shard's name is in
    our progress record: the name is recorded (and fsynced) before the temp is created, so a kill
    at any instant leaves no temp of ours unrecorded, and a temp whose name we never recorded is
    someone else's (refused earlier by _refuse_foreign, and never deleted here)."""
    for name in sorted(owned):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(dst / f"{name}.tmp")


def _remove_stale(dst: Path, keep: set[str], owned: set[str], log: Callable[[str], None]) -> None:
    """Delete shards an earlier run of ours wrote that this plan no longer has (a reader that globs
    the folder must not find them); only names in ``owned``, our progress record's."""
    for name in sorted(owned - keep):
        path = dst / name
        if path.is_file():
            log(f"prepare: removing {path}: a shard an earlier run wrote, not one of this plan")
            path.unlink()


def _merge_info(dst: Path, prefix: str, split: str, shards: list[dict[str, Any]], check_only: bool = False) -> None:
    """Replace ``split``'s entry in DST/_info.json, keeping everything else in it (a download's other
    splits and keys); with ``check_only``, only raise the DataError a bad file would give."""
    path = dst / INFO_FILE
    info = _read_json(path) or {"name": "imagenet-1k" if prefix.startswith("imagenet1k-") else dst.resolve().name}
    if not isinstance(info, dict) or not isinstance(info.setdefault("splits", {}), dict):
        raise DataError(f"{path}: not a WebDataset _info.json (expected {{'name': ..., 'splits': {{...}}}})")
    if check_only:
        return
    info["splits"][split] = {
        "name": split,
        "filenames": [s["filename"] for s in shards],
        "shard_lengths": [s["samples"] for s in shards],
        "num_samples": sum(s["samples"] for s in shards),
    }
    _write_json(path, info)


def _check_args(src: Path, dst: Path, size: int, quality: int, shard_size: int, workers: int) -> None:
    if not isinstance(size, int) or size < 0:
        raise ValueError(f"size must be an integer >= 0 (0: the original bytes), got {size!r}")
    if not isinstance(quality, int) or not 1 <= quality <= 100:
        raise ValueError(f"quality must be an integer in 1..100, got {quality!r}")
    if not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"shard size must be an integer >= 1 (bytes), got {shard_size!r}")
    if not isinstance(workers, int) or workers < 0:
        raise ValueError(f"workers must be an integer >= 0, got {workers!r}")
    if not src.is_dir():
        raise DataError(f"{src}: source directory not found" if not src.exists() else
                        f"{src}: source is not a directory")
    real_src, real_dst = src.resolve(), dst.resolve()
    if real_dst == real_src or real_src in real_dst.parents:
        raise DataError(f"{dst}: destination is inside the source {src} (a later run would read its own output)")
    if dst.exists() and not dst.is_dir():
        raise DataError(f"{dst}: destination exists and is not a directory")


def _results(plan: list[Sample], work: Callable, workers: int, stack: contextlib.ExitStack) -> Iterator:
    paths = [s.path for s in plan]
    if workers > 0 and len(paths) > CHUNK:
        pool = stack.enter_context(_pool_context().Pool(workers, initializer=_ignore_sigint))
        return pool.imap(work, paths, chunksize=CHUNK)
    return map(work, paths)


def _write_plan(dst: Path, prefix: str, plan: list[Sample], done: list[dict[str, Any]], shard_size: int,
                save: Callable[[list[dict[str, Any]]], None], claim: Callable[[str, list[dict[str, Any]]], None],
                work: Callable, workers: int, progress: Any,
                log: Callable[[str], None]) -> tuple[list[dict[str, Any]], int]:
    """Write the shards after ``done``, claiming each name in the progress record before its file is
    created and recording each as it is finished; returns (every shard's record, samples written)."""
    shards = list(done)
    start = sum(s["consumed"] for s in done)
    todo = plan[start:]
    written = 0
    current: _ShardFile | None = None
    consumed, failed = 0, []

    def close() -> None:
        nonlocal current, consumed, failed
        assert current is not None
        size = current.finish()
        shards.append({"filename": current.path.name, "samples": current.samples, "consumed": consumed,
                       "bytes": size, "failed": failed})
        save(shards)
        current, consumed, failed = None, 0, []

    with contextlib.ExitStack() as stack:
        results = _results(todo, work, workers, stack)  # the pool forks before a progress bar starts a thread
        bar = progress(len(todo)) if progress is not None and not hasattr(progress, "update") else progress
        if hasattr(bar, "__exit__"):
            stack.enter_context(bar)
        try:
            for sample, (data, height, width) in zip(todo, results):
                if bar is not None:
                    bar.update(1)
                if data is None:
                    log(f"warning: {sample.path}: unreadable image ({height})")
                    failed.append([sample.path, height])
                    consumed += 1
                    continue
                members = _sample_members(sample, data, height, width)
                if current is not None and current.samples and current.size_with(members) > shard_size:
                    close()
                if current is None:
                    name = shard_name(prefix, len(shards))
                    claim(name, shards)
                    current = _ShardFile(dst / name)
                current.add(sample, members)
                consumed += 1
                written += 1
            if current is not None:
                close()
        finally:
            if current is not None:
                current.discard()
    if consumed:  # unreadable files after the last shard: recorded with it
        if not shards:
            raise DataError(f"{plan[0].path}: no readable image in the source (all {len(plan)} failed)")
        shards[-1] = {**shards[-1], "consumed": shards[-1]["consumed"] + consumed,
                      "failed": shards[-1]["failed"] + failed}
        save(shards)
    return shards, written


def write_shards(
    src: str | Path,
    dst: str | Path,
    size: int = 256,
    quality: int = 90,
    shard_size: int = DEFAULT_SHARD_SIZE,
    workers: int = 0,
    labels_file: str | None = None,
    seed: int = 0,
    progress: Any = None,
    log: Callable[[str], None] = print,
) -> ShardReport:
    """Write SRC's images to DST as WebDataset shards (see the module docstring); resumable.

    ``workers`` and ``progress`` as for :func:`~alexnet_train.data.prepare.prepare_tree`.
    Raises DataError for a bad source layout, labels file, or a DST written with another plan;
    ValueError for bad numbers; OSError when writing fails.
    """
    started = time.monotonic()
    src, dst = Path(os.path.abspath(src)), Path(dst)  # failure lines name SRC alike however it is spelled
    _check_args(src, dst, size, quality, shard_size, workers)
    prefix, split = split_names(src)
    settings = {"size": size, "quality": quality, "shard_size": shard_size, "seed": seed}
    plan = shuffled(list_samples(src, labels_file, log), seed)
    fingerprint = _fingerprint(plan, settings)
    progress_path = dst / f".{prefix}-progress.json"
    # Every check before the first change to DST: a refusal leaves it as it was.
    state = _read_progress(progress_path, fingerprint)
    owned = _owned(state)
    _refuse_foreign(dst, prefix, owned, progress_path)
    _merge_info(dst, prefix, split, [], check_only=True)
    dst.mkdir(parents=True, exist_ok=True)
    _remove_temps(dst, owned)
    done = _finished_shards(dst, state)
    skipped = sum(s["samples"] for s in done)
    log(f"prepare: {len(plan)} images in {src} -> {dst}/{prefix}-NNNN.tar (split {split!r}; "
        f"{f'{size}x{size}, JPEG quality {quality}' if size else 'original bytes'}; shards of <= {shard_size} bytes); "
        f"{len(done)} shards ({skipped} images) already done")

    def save(shards: list[dict[str, Any]]) -> None:
        owned.update(s["filename"] for s in shards)
        _write_json(progress_path, {"version": PROGRESS_VERSION, "plan": fingerprint, "settings": settings,
                                    "samples": len(plan), "shards": shards, "owned": sorted(owned)})

    def claim(name: str, shards: list[dict[str, Any]]) -> None:
        if name not in owned:
            owned.add(name)
            save(shards)

    work = partial(_encode, size=size, quality=quality)
    shards, written = _write_plan(dst, prefix, plan, done, shard_size, save, claim, work, workers, progress, log)
    keep = {s["filename"] for s in shards}
    if owned != keep:
        _remove_stale(dst, keep, owned, log)
        owned.intersection_update(keep)
        save(shards)
    failed = sorted((p, r) for s in shards for p, r in s["failed"])
    merge_failures(dst, src, failed)
    _merge_info(dst, prefix, split, shards)
    seconds = time.monotonic() - started
    log(f"prepare: wrote {written} images in {len(shards) - len(done)} shards, kept {skipped} in {len(done)}, "
        f"failed {len(failed)} in {seconds:.1f}s; {dst / INFO_FILE} lists {len(shards)} shards")
    if failed:
        log(f"prepare: {len(failed)} unreadable images listed in {dst / FAILURES_FILE}")
    return ShardReport(shards=[s["filename"] for s in shards], written=written, skipped=skipped,
                       failed=failed, seconds=seconds)
