"""An image tree's listing, walked once and then read from an index file.

Usage::

    listing = list_tree("/data/imagenet/train", log=print)
    listing.folders   # the root's sub-folders, sorted (hidden ones too: callers decide)
    listing.files     # SampleList of every image file under the root, in walk order;
                      # label = the index of its top-level folder in ``folders``, -1 at the root
    listing.how       # "read the index ..." or "scanned ..." (one line for the log)
    write_index(listing)  # after making a tree (alexnet-prepare): the next start reads it

Walking ImageNet's 1,281,167 training files takes seconds on a local disk and minutes per
rank on NFS or Lustre, and it came back with every rank of every start and requeue.  The
first walk writes an index (the relative paths, their folders, and the modification time
of every directory walked); later starts check it with one ``stat`` per directory (1,001
for ImageNet) instead of listing 1.28M files.

Staleness.  Adding, removing or renaming a file or folder changes its directory's
modification time, so an index whose directories all still have the times it recorded
lists the tree as it is; any other index is ignored and the tree walked again.  A
directory changed within ``RACY_SECONDS`` of the moment the walk read it could change
again within the same timestamp tick without its time moving (filesystems such as NFS
keep whole seconds): an index with such a directory is not written (git's "racy" rule).
A file rewritten in place keeps its directory's time; the sample list does not change.

Where.  ``<parent>/.alexnet-index/<name>-<hash>.npz``, beside the tree (``<parent>`` is the
folder holding it: ``/data/imagenet`` for ``/data/imagenet/train``), so every node and every
job on that storage finds it, and nothing is added inside the tree (torchvision's
ImageFolder would take a hidden folder there for a class).  When that folder cannot be
written (a read-only dataset: no write permission, or no write bit at all, which is respected
even by root) the index goes to ``<cache>/index/`` (``$ALEXNET_TRAIN_CACHE``,
else ``$XDG_CACHE_HOME/alexnet-train``, else ``~/.cache/alexnet-train``).  Both places are
read; the hash is of the tree's real path.  Writes are atomic (a temporary file renamed),
so a reader never sees half an index.
"""
from __future__ import annotations

import hashlib
import os
import socket
import time
import zipfile
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .samples import SampleList

INDEX_VERSION = 1
INDEX_DIR = ".alexnet-index"
RACY_SECONDS = 2.0
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


@dataclass(frozen=True)
class Listing:
    root: str
    folders: tuple[str, ...]
    files: SampleList  # prefix root + os.sep; label: top-level folder index, -1 for files at the root
    dirs: tuple[tuple[bytes, int], ...]  # (directory relative to root, st_mtime_ns) of every one walked
    racy: str | None = None  # a directory changed too recently to trust its time (then no index)
    how: str = ""


def list_tree(root: str, log: Callable[[str], None] | None = None, use_index: bool = True) -> Listing:
    """The listing of ``root``: from its index when that is current, else walked (and the
    index written when it can be).  ``log`` gets one line saying which."""
    root = str(root)
    started = time.perf_counter()
    if use_index:
        for path in index_paths(root):
            listing = read_index(path, root)
            if listing is not None:
                how = (f"{root}: {len(listing.files):,} files from the index {path} "
                       f"({time.perf_counter() - started:.1f} s)")
                if log:
                    log(f"data: {how}")
                return Listing(listing.root, listing.folders, listing.files, listing.dirs, None, how)
    listing = walk_tree(root)
    walked = f"{root}: {len(listing.files):,} files walked in {time.perf_counter() - started:.1f} s"
    note = ""
    if use_index:
        if listing.racy is not None:
            note = f"; no index written, {listing.racy} changed less than {RACY_SECONDS:g} s before it was read"
        else:
            written = write_index(listing)
            note = f"; index written to {written}" if written else "; no index written (no writable place)"
    how = walked + note
    if log:
        log(f"data: {how}")
    return Listing(listing.root, listing.folders, listing.files, listing.dirs, listing.racy, how)


def walk_tree(root: str) -> Listing:
    """Every image file under ``root``: the order and the files of
    ``os.walk(root, followlinks=True)`` with sorted folders and files (unreadable folders are
    passed over, as ``os.walk`` does).  Paths are kept as one byte buffer as they are found:
    no per-file Python object outlives its folder."""
    data = bytearray()
    lengths = array("q")
    labels = array("q")
    dirs: list[tuple[bytes, int]] = []
    racy: str | None = None
    folders: list[str] = []

    def visit(rel: bytes, full: str, label: int, top: bool) -> None:
        nonlocal racy
        try:
            st = os.stat(full)
            read_at = time.time()
            with os.scandir(full) as it:
                entries = list(it)
        except OSError:
            return
        dirs.append((rel, st.st_mtime_ns))
        if racy is None and read_at - st.st_mtime_ns / 1e9 < RACY_SECONDS:
            racy = full
        files, subdirs = [], []
        for entry in entries:
            try:
                is_dir = entry.is_dir()
            except OSError:
                is_dir = False
            (subdirs if is_dir else files).append(entry.name)
        files.sort()
        subdirs.sort()
        for name in files:
            if is_image(name):
                encoded = os.fsencode(name) if not rel else rel + b"/" + os.fsencode(name)
                data.extend(encoded)
                lengths.append(len(encoded))
                labels.append(label)
        if top:
            folders.extend(subdirs)
        for i, name in enumerate(subdirs):
            sub = os.fsencode(name) if not rel else rel + b"/" + os.fsencode(name)
            visit(sub, os.path.join(full, name), i if top else label, False)

    visit(b"", root, -1, True)
    files = _sample_list(bytes(data), np.frombuffer(lengths, dtype=np.int64), np.frombuffer(labels, dtype=np.int64),
                         root)
    return Listing(root, tuple(folders), files, tuple(dirs), racy)


def sub_listing(listing: Listing, name: str) -> Listing:
    """The listing of ``listing.root/name`` (a top-level folder), cut from ``listing``: the
    index of ``DST/train`` from one walk of ``DST``."""
    top = listing.folders.index(name)
    head = os.fsencode(name) + b"/"
    inside = np.flatnonzero(listing.files.labels == top)
    rels = [listing.files.relative(int(i))[len(head):] for i in inside]
    dirs = tuple((rel[len(head):] if rel != head[:-1] else b"", mtime) for rel, mtime in listing.dirs
                 if rel == head[:-1] or rel.startswith(head))
    folders = tuple(os.fsdecode(rel) for rel, _ in dirs if rel and b"/" not in rel)
    position = {os.fsencode(f): i for i, f in enumerate(folders)}
    labels = np.array([position.get(rel.split(b"/", 1)[0], -1) if b"/" in rel else -1 for rel in rels],
                      dtype=np.int64)
    root = os.path.join(listing.root, name)
    files = SampleList.from_encoded(rels, labels, prefix=_prefix(root))
    return Listing(root, folders, files, dirs)


def _sample_list(data: bytes, lengths: np.ndarray, labels: np.ndarray, root: str) -> SampleList:
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return SampleList(np.frombuffer(data, dtype=np.uint8), offsets, labels.copy(), prefix=_prefix(root))


def _prefix(root: str) -> str:
    return root if root.endswith(os.sep) else root + os.sep


def _key(root: str) -> str:
    real = os.path.realpath(root)
    name = os.path.basename(real.rstrip(os.sep)) or "root"
    return f"{name}-{hashlib.sha256(os.fsencode(real)).hexdigest()[:16]}.npz"


def index_paths(root: str) -> list[Path]:
    """Where ``root``'s index may be, in the order they are tried: beside the tree, then the cache."""
    return index_places(os.path.dirname(os.path.realpath(root).rstrip(os.sep)), _key(root))


def index_places(folder: str, name: str) -> list[Path]:
    """An index file ``name`` in ``folder``'s INDEX_DIR, then in the cache: where indexes are kept."""
    from .demo import default_cache_dir

    return [Path(folder) / INDEX_DIR / name, default_cache_dir() / "index" / name]


def _joined(names: list[bytes]) -> np.ndarray:
    return np.frombuffer(b"\0".join(names), dtype=np.uint8)


def _split(buffer: np.ndarray) -> list[bytes]:
    raw = buffer.tobytes()
    return raw.split(b"\0") if raw else []


def write_index(listing: Listing) -> Path | None:
    """Write ``listing``'s index to the first place that takes it; the path, or None."""
    data, offsets, labels = listing.files.buffers
    arrays = {
        "version": np.array([INDEX_VERSION], dtype=np.int64),
        "root": np.frombuffer(os.fsencode(os.path.realpath(listing.root)), dtype=np.uint8),
        "folders": _joined([os.fsencode(f) for f in listing.folders]),
        "data": data, "offsets": offsets, "labels": labels,
        "dir_names": _joined([rel for rel, _ in listing.dirs]),
        "dir_mtimes": np.array([mtime for _, mtime in listing.dirs], dtype=np.int64),
    }
    return write_arrays(index_paths(listing.root), arrays)


def write_arrays(paths: list[Path], arrays: dict[str, np.ndarray]) -> Path | None:
    """``arrays`` as an .npz at the first of ``paths`` whose folder takes it, atomically (a
    temporary file renamed: a reader never sees half of one); that path, or None."""
    for path in paths:
        if not _may_write(path.parent):
            continue
        tmp = path.with_name(f".{path.name}.{socket.gethostname()}-{os.getpid()}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as fh:
                np.savez(fh, **arrays)
            os.replace(tmp, path)
            return path
        except OSError:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass
    return None


def _may_write(folder: Path) -> bool:
    """Whether ``folder`` (or, not yet made, the folder that would hold it) takes files: its
    permission to this process, and a write bit in its mode, as root may write anywhere but a
    folder whose owner made it r-x (a shared dataset) is left alone."""
    existing = folder
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    try:
        mode = existing.stat().st_mode
    except OSError:
        return False
    return existing.is_dir() and os.access(existing, os.W_OK) and bool(mode & 0o222)


def read_index(path: Path, root: str) -> Listing | None:
    """The listing in the index at ``path`` if it is an index of ``root`` as the tree is now
    (every directory it walked has the time it recorded); None otherwise."""
    try:
        with np.load(path, allow_pickle=False) as index:
            arrays = {name: index[name] for name in index.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile):  # absent, cut short, not ours
        return None
    try:
        if int(arrays["version"][0]) != INDEX_VERSION:
            return None
        if arrays["root"].tobytes() != os.fsencode(os.path.realpath(root)):
            return None
        names = [b""] + _split(arrays["dir_names"])[1:] if len(arrays["dir_mtimes"]) else []
        if len(names) != len(arrays["dir_mtimes"]):
            return None
        for rel, mtime in zip(names, arrays["dir_mtimes"].tolist()):
            full = os.path.join(root, os.fsdecode(rel)) if rel else root
            if os.stat(full).st_mtime_ns != mtime:
                return None
        folders = tuple(os.fsdecode(f) for f in _split(arrays["folders"]))
        files = SampleList(arrays["data"], arrays["offsets"], arrays["labels"], prefix=_prefix(root))
        return Listing(root, folders, files, tuple(zip(names, arrays["dir_mtimes"].tolist())))
    except (OSError, KeyError, ValueError, IndexError):
        return None
