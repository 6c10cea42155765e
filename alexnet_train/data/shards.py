"""WebDataset tar shards, read by index: one ``pread`` of each image's exact bytes.

Usage::

    shards = find_shards("/data/imagenet-1k-wds/imagenet1k-train-*.tar", "data.train_dir")
    index = shard_index(shards, log=print)      # read from the index file when it is current
    index.samples                                # SampleList of "<shard>::<key>.jpg@<offset>+<size>"
    read_member(index.samples.path(0))           # the JPEG's bytes, one pread

A split is named the way webdataset names it: a folder that holds the shards of one split,
or a shard pattern, ``DIR/PREFIX-*.tar`` or ``DIR/PREFIX-{0000..1023}.tar``.  A folder that
holds several splits side by side (``timm/imagenet-1k-wds`` as downloaded: train and
validation) is an error that lists the patterns to choose from: which split a config means
is then written in the config, not guessed.

Samples stay map-style: each is a virtual path that names its shard, its member and the
member's byte range, so the sampler's exact permutation, mid-epoch resume, exact DDP
validation, the bad-image rules and ``data.decode: device`` work as they do on files.  A
worker keeps one descriptor per shard (opened on first use, never an mmap: it behaves badly
on network storage) and reads a sample with one ``pread``.

The index (the sample list, labels and the class list) is built once by reading every
shard's tar headers, and written where :mod:`~alexnet_train.data.treeindex` writes a tree's
(beside the data, else the cache; atomically; numpy arrays, no pickle).  It records each
shard's size and modification time: any change and the shards are read again.  Labels come
from ``KEY.cls``, checked against ``KEY.json``'s ``label`` and the wnid of its
``filename`` where present; a disagreement is a DataError naming the shard and the key.
A shard whose tail is cut serves the samples before the cut; the samples lost (from
``_info.json``'s ``shard_lengths``, else the one member cut) are kept as entries that
fail to read, so the bad-image rules count them.
"""
from __future__ import annotations

import errno
import glob
import hashlib
import json
import os
import re
import tarfile
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import BadImageError, DataError
from .samples import SampleList
from .treeindex import index_places, write_arrays

INDEX_VERSION = 2  # 2: the shards' folder stored once, as the sample list's prefix
SEP = "::"  # <shard>::<member>@<offset>+<size>
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
_SHARD = re.compile(r"^(?P<prefix>.+?)-(?P<number>\d+)\.tar$")
_BRACE = re.compile(r"\{(\d+)\.\.(\d+)\}")
Log = Callable[[str], None]


def is_shard_source(path: str | os.PathLike | None) -> bool:
    """Whether ``path`` names WebDataset shards: a ``.tar`` pattern, or a folder with ``.tar``
    files and no sub-folders (an ImageFolder has class folders)."""
    if not path:
        return False
    path = str(path)
    if path.endswith(".tar") and ("*" in path or "{" in path or os.path.isfile(path)):
        return True
    if not os.path.isdir(path):
        return False
    entries = [e for e in os.scandir(path) if not e.name.startswith(".")]
    return any(e.name.endswith(".tar") and e.is_file() for e in entries) and not any(e.is_dir() for e in entries)


def _splits_in(folder: str) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for name in sorted(os.listdir(folder)):
        m = _SHARD.match(name)
        if m and not name.startswith("."):
            groups.setdefault(m.group("prefix"), []).append(os.path.join(folder, name))
    return groups


def find_shards(spec: str, key: str) -> list[str]:
    """The shard files ``spec`` names, sorted; DataError naming ``key`` when there are none, or
    when a folder holds several splits (the message lists a pattern for each)."""
    spec = str(spec)
    if os.path.isdir(spec):
        groups = _splits_in(spec)
        if len(groups) > 1:
            choices = ", ".join(f"{os.path.join(spec, p)}-*.tar ({len(g)} shards)" for p, g in groups.items())
            raise DataError(f"{key}: {spec} holds the shards of {len(groups)} splits; name one: {choices}")
        files = next(iter(groups.values()), sorted(str(p) for p in Path(spec).glob("*.tar")))
    else:
        m = _BRACE.search(spec)
        if m:
            width, lo, hi = len(m.group(1)), int(m.group(1)), int(m.group(2))
            files = [spec[: m.start()] + f"{i:0{width}d}" + spec[m.end():] for i in range(lo, hi + 1)]
            missing = [f for f in files if not os.path.isfile(f)]
            if missing:
                raise DataError(f"{key}: {missing[0]}: shard not found ({len(missing)} of {len(files)} missing)")
        else:
            files = sorted(glob.glob(spec))
    if not files:
        raise DataError(f"{key}: no .tar shards found at {spec}")
    return files


@dataclass(frozen=True)
class ShardIndex:
    samples: SampleList  # virtual paths; labels from KEY.cls
    wnids: dict[int, str]  # label -> wnid, where KEY.json named one
    lost: int  # samples of cut shards that could not be read (entries that fail to read)
    how: str = ""


def shard_index(shards: list[str], log: Log | None = None) -> ShardIndex:
    """The samples of ``shards``, from their index when it is current, else read and indexed."""
    started = time.perf_counter()
    stats = [os.stat(s) for s in shards]
    for path in _index_paths(shards):
        index = _read_index(path, shards, stats)
        if index is not None:
            how = f"{len(index.samples):,} samples of {len(shards)} shards from the index {path}"
            break
    else:
        index = _build(shards)
        written = _write_index(index, shards, stats)
        how = (f"{len(index.samples):,} samples of {len(shards)} shards read in {time.perf_counter() - started:.1f} s"
               + (f"; index written to {written}" if written else "; no index written (no writable place)"))
    if log:
        log(f"data: {os.path.dirname(shards[0]) or '.'}: {how}")
        if index.lost:
            log(f"warning: {index.lost} samples of cut shards are lost; they count as unreadable images")
    return ShardIndex(index.samples, index.wnids, index.lost, how)


def _members(shard: str):
    """(name, data offset, size) of each regular member, then how many more ``_info.json``
    promises; a cut tail ends the list (the member it cut is not listed)."""
    out, cut = [], False
    try:
        with tarfile.open(shard, "r:") as tar:
            while True:
                try:
                    info = tar.next()
                except (tarfile.ReadError, EOFError, OSError):
                    cut = True
                    break
                if info is None:
                    break
                if info.isfile():
                    out.append((info.name, info.offset_data, info.size))
    except tarfile.ReadError as exc:
        raise DataError(f"{shard}: not a readable tar shard ({exc})") from None
    size = os.path.getsize(shard)
    if out and out[-1][1] + out[-1][2] > size:  # the last member's data runs past the end
        out.pop()
        cut = True
    return out, cut


def _read_small(fh, offset: int, size: int) -> bytes:
    fh.seek(offset)
    return fh.read(size)


def _shard_samples(shard: str, number: int, paths: list[str], labels: list[int], wnids: dict[int, str]) -> tuple[int, bool]:
    """Append one shard's samples; (samples read, whether its tail was cut)."""
    members, cut = _members(shard)
    by_key: dict[str, dict[str, tuple[int, int, str]]] = {}
    for name, offset, size in members:
        stem, dot, ext = name.rpartition(".")
        if dot:
            by_key.setdefault(stem, {})[ext.lower()] = (offset, size, name)
    count = 0
    with open(shard, "rb") as fh:
        for key, parts in by_key.items():
            image = next((parts[e[1:]] for e in IMAGE_SUFFIXES if e[1:] in parts), None)
            if image is None or "cls" not in parts:
                if image is not None or "cls" in parts:
                    raise DataError(f"{shard}: {key}: a sample needs an image and a .cls member")
                continue
            try:
                label = int(_read_small(fh, *parts["cls"][:2]).decode("ascii").strip())
            except ValueError:
                raise DataError(f"{shard}: {key}.cls: not a class index") from None
            if "json" in parts:
                _check_json(shard, key, label, _read_small(fh, *parts["json"][:2]), wnids)
            offset, size, name = image
            paths.append(f"{shard}{SEP}{name}@{offset}+{size}")
            labels.append(label)
            count += 1
    return count, cut


def _check_json(shard: str, key: str, label: int, raw: bytes, wnids: dict[int, str]) -> None:
    try:
        meta = json.loads(raw)
    except ValueError:
        raise DataError(f"{shard}: {key}.json: not JSON") from None
    if "label" in meta and int(meta["label"]) != label:
        raise DataError(f"{shard}: {key}: .cls says {label} but .json's label is {meta['label']}")
    wnid = str(meta.get("filename", "")).split("/")[0] if "/" in str(meta.get("filename", "")) else None
    if wnid:
        known = wnids.setdefault(label, wnid)
        if known != wnid:
            raise DataError(f"{shard}: {key}: class {label} is {wnid} here but {known} in an earlier sample")


def _promised(shards: list[str]) -> dict[str, int]:
    """Shard name -> sample count from an ``_info.json`` beside the shards (timm's schema), if any."""
    info = os.path.join(os.path.dirname(shards[0]), "_info.json")
    try:
        with open(info) as fh:
            splits = json.load(fh).get("splits", {})
    except (OSError, ValueError, AttributeError):
        return {}
    promised: dict[str, int] = {}
    for split in splits.values() if isinstance(splits, dict) else []:
        for name, n in zip(split.get("filenames", []), split.get("shard_lengths", [])):
            promised[os.path.basename(name)] = int(n)
    return promised


def _build(shards: list[str]) -> ShardIndex:
    paths: list[str] = []
    labels: list[int] = []
    wnids: dict[int, str] = {}
    promised = _promised(shards)
    lost = 0
    for number, shard in enumerate(shards):
        count, cut = _shard_samples(shard, number, paths, labels, wnids)
        if cut:
            missing = max(1, promised.get(os.path.basename(shard), count + 1) - count)
            for i in range(missing):
                paths.append(f"{shard}{SEP}lost-{i}@0+0")
                labels.append(-1)
            lost += missing
    if not paths:
        raise DataError(f"{os.path.dirname(shards[0])}: the shards hold no samples (KEY.jpg + KEY.cls)")
    # The shards' folder once, as the list's prefix, not in every sample's path.
    prefix = os.path.join(os.path.commonpath([os.path.dirname(s) or "." for s in shards]), "")
    relative = [os.fsencode(path[len(prefix):]) for path in paths]
    return ShardIndex(SampleList.from_encoded(relative, labels, prefix), wnids, lost)


def _key(shards: list[str]) -> str:
    real = "\0".join(os.path.realpath(s) for s in shards)
    m = _SHARD.match(os.path.basename(shards[0]))
    name = m.group("prefix") if m else "shards"
    return f"{name}-shards-{hashlib.sha256(os.fsencode(real)).hexdigest()[:16]}.npz"


def _index_paths(shards: list[str]) -> list[Path]:
    return index_places(os.path.dirname(os.path.realpath(shards[0])), _key(shards))


def _fingerprint(stats: list[os.stat_result]) -> np.ndarray:
    return np.array([[s.st_size, s.st_mtime_ns] for s in stats], dtype=np.int64)


def _write_index(index: ShardIndex, shards: list[str], stats: list[os.stat_result]) -> Path | None:
    data, offsets, labels = index.samples.buffers
    arrays = {
        "version": np.array([INDEX_VERSION], dtype=np.int64),
        "shards": np.frombuffer(os.fsencode("\0".join(os.path.realpath(s) for s in shards)), dtype=np.uint8),
        "fingerprint": _fingerprint(stats),
        "data": data, "offsets": offsets, "labels": labels,
        "prefix": np.frombuffer(os.fsencode(index.samples.prefix), dtype=np.uint8),
        "wnid_labels": np.array(sorted(index.wnids), dtype=np.int64),
        "wnids": np.frombuffer("\0".join(index.wnids[k] for k in sorted(index.wnids)).encode(), dtype=np.uint8),
        "lost": np.array([index.lost], dtype=np.int64),
    }
    return write_arrays(_index_paths(shards), arrays)


def _read_index(path: Path, shards: list[str], stats: list[os.stat_result]) -> ShardIndex | None:
    try:
        with np.load(path, allow_pickle=False) as index:
            a = {name: index[name] for name in index.files}
        if int(a["version"][0]) != INDEX_VERSION:
            return None
        if a["shards"].tobytes() != os.fsencode("\0".join(os.path.realpath(s) for s in shards)):
            return None
        if not np.array_equal(a["fingerprint"], _fingerprint(stats)):
            return None
        names = a["wnids"].tobytes().decode().split("\0") if len(a["wnid_labels"]) else []
        wnids = dict(zip(a["wnid_labels"].tolist(), names))
        samples = SampleList(a["data"], a["offsets"], a["labels"], os.fsdecode(a["prefix"].tobytes()))
        return ShardIndex(samples, wnids, int(a["lost"][0]))
    except (OSError, ValueError, EOFError, KeyError, IndexError):
        return None


def is_member_path(path: str) -> bool:
    return SEP in path


_descriptors: "OrderedDict[tuple[int, str], int]" = OrderedDict()  # oldest use first


def _open_shard(shard: str) -> int:
    """A descriptor of ``shard``.  ImageNet's 1,024 train shards are about the usual soft limit
    of open files per process (1,024): at EMFILE the soft limit is raised to the hard one, and
    where that is spent the least recently used half of this process's shards is closed."""
    try:
        return os.open(shard, os.O_RDONLY)
    except OSError as exc:
        if exc.errno != errno.EMFILE:
            raise
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else soft * 4, hard))
    else:
        mine = [k for k in _descriptors if k[0] == os.getpid()]
        for k in mine[: max(1, len(mine) // 2)]:
            os.close(_descriptors.pop(k))
    return os.open(shard, os.O_RDONLY)


def read_member(path: str) -> bytes:
    """The bytes of the member a virtual sample path names: one ``pread`` from this process's
    descriptor of its shard.  BadImageError names the shard and the member."""
    shard, _, rest = path.partition(SEP)
    name, _, where = rest.rpartition("@")
    offset, _, size = where.partition("+")
    if name.startswith("lost-") and size == "0":
        raise BadImageError(path, "lost: the shard is cut before this sample")
    key = (os.getpid(), shard)  # a forked worker opens its own: a descriptor is per process here
    fd = _descriptors.get(key)
    try:
        if fd is None:
            fd = _descriptors[key] = _open_shard(shard)
        else:
            _descriptors.move_to_end(key)
        data = os.pread(fd, int(size), int(offset))
    except OSError as exc:
        raise BadImageError(path, exc.strerror or str(exc)) from None
    if len(data) != int(size):
        raise BadImageError(path, f"cut short: {len(data)} of {size} bytes")
    return data


def classes_of(index: ShardIndex, spec: str) -> list[str]:
    """The class list of a training split: the wnids its ``.json`` members name, by label
    (ImageFolder's sorted-wnid order); without them, ``class0000``... by label."""
    present = sorted(set(index.samples.labels.tolist()) - {-1})
    if not present:
        raise DataError(f"{spec}: no labelled samples")
    n = present[-1] + 1
    if index.wnids:
        missing = [i for i in range(n) if i not in index.wnids]
        if missing:
            raise DataError(f"{spec}: no sample of class {missing[0]} names its wnid (.json filename)")
        return [index.wnids[i] for i in range(n)]
    return [f"class{i:04d}" for i in range(n)]
