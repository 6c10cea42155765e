"""The index of a split's WebDataset shards: every sample's shard, byte range and label.

Usage::

    index = shard_index(find_shards("data/wds/imagenet1k-train-*.tar", "data.train_dir"), log=print)
    index.samples            # SampleList of "<shard>::<key>.jpg@<offset>+<size>" (absolute shard paths)
    index.wnids              # label -> wnid, where KEY.json names one
    index.lost               # samples promised but lost to damage: entries that fail to read
    classes_of(index, spec)  # a training split's class list

Built once by reading every shard's tar headers (not the images) with :func:`walk_tar`, and
written where :mod:`~alexnet_train.data.treeindex` writes a tree's (beside the data, else the
cache; atomically; numpy arrays, no pickle).  The index stores each sample's path relative to
the shards' folder, and is found by the shards' real paths and checked against each one's size
and modification time: a run from another working directory, or through a symlink, reads the
same index and gets its own absolute paths.

Members are grouped into samples as webdataset groups them: the key is the member's name up to
the first dot of its base name (``KEY.seg.png`` belongs to ``KEY``).  A sample is an image
(``.jpg``, ``.jpeg``, ``.png``, ``.webp``) and a class index (``KEY.cls``, else an integer
``label`` in ``KEY.json``); where ``KEY.json`` is present its ``label`` must agree, and the wnid
of its ``filename`` (or a ``label`` that is a wnid) names the class.

Damage, one rule: the samples before the damage are served; the samples lost count as bad
images (entries that fail to read, judged by ``data.on_bad_image``); nothing is invented and
nothing vanishes silently.  Damage is a shard that ends inside a header or a member's data, a
header whose checksum is wrong, or a shard that ends without tar's end-of-archive blocks.  How
many are lost: where ``_info.json`` (timm's schema, beside the shards) promises the shard's
sample count, promised - served; else the sample whose member the cut went through, if that
left it incomplete, and a warning that more may be missing (a cut between members leaves no
trace of what followed).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import DataError
from .samples import SampleList
from .shards import SHARD_NAME, member_path
from .treeindex import index_places, write_arrays

INDEX_VERSION = 3  # 3: paths relative to the shards' folder; the damage notes kept
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
BLOCK = 512
# webdataset's key: everything up to the first dot of the base name; the rest is the extension.
_KEY = re.compile(r"^((?:.*/|)[^./][^.]*)\.([^/]*)$", re.S)
_WNID = re.compile(r"^n\d{8}$")
Log = Callable[[str], None]


@dataclass(frozen=True)
class ShardIndex:
    samples: SampleList  # virtual paths; labels from KEY.cls (-1: a lost sample)
    wnids: dict[int, str]  # label -> wnid, where KEY.json named one
    lost: int  # samples of damaged shards that could not be read (entries that fail to read)
    how: str = ""
    notes: tuple[str, ...] = ()  # one line per damaged shard


@dataclass
class TarWalk:
    """What :func:`walk_tar` found: the regular members, and how the archive ended."""

    members: list[tuple[str, int, int]] = field(default_factory=list)  # (name, data offset, size)
    end: str = "end"  # end: the end-of-archive blocks; eof: none; cut: inside a header or data; damaged
    at: int = 0  # the byte offset where the walk stopped
    cut_member: str | None = None  # the member whose data the file ends inside


def _number(field_: bytes) -> int:
    """A tar header's numeric field: octal ASCII, or GNU's base-256 for large values."""
    if field_[0] & 0x80:
        return int.from_bytes(bytes([field_[0] & 0x7F]) + field_[1:], "big")
    text = field_.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def _checksum_ok(header: bytes) -> bool:
    try:
        stored = _number(header[148:156])
    except ValueError:
        return False
    unsigned = sum(header[:148]) + 8 * 32 + sum(header[156:])
    signed = unsigned - 2 * sum(b for b in header[:148] + header[156:] if b > 127)
    return stored in (unsigned, signed)


def _text(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _pax(raw: bytes) -> dict[str, str]:
    """PAX records (``"%d %s=%s\\n"``) as a dict."""
    out, pos = {}, 0
    while pos < len(raw):
        space = raw.find(b" ", pos)
        if space < 0:
            break
        length = int(raw[pos:space])
        if length <= 0:
            break
        key, _, value = raw[space + 1 : pos + length - 1].partition(b"=")
        out[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return out


def walk_tar(path: str) -> TarWalk:
    """The regular members of the tar at ``path`` (USTAR, GNU long names, PAX), read header by
    header.  A walk never fails on damage past the first header: it says where it stopped and
    why (``tarfile`` takes a missing header for a clean end).  DataError when the first header
    is not a tar header."""
    walk = TarWalk()
    size = os.path.getsize(path)
    pax: dict[str, str] = {}
    long_name: str | None = None
    offset = 0
    with open(path, "rb") as fh:
        while True:
            walk.at = offset
            if offset >= size:  # no end-of-archive blocks; after an extension header, inside a member
                walk.end = "cut" if pax or long_name else "eof"
                walk.cut_member = pax.get("path") or long_name
                return walk
            header = os.pread(fh.fileno(), BLOCK, offset)
            if len(header) < BLOCK:
                walk.end, walk.cut_member = "cut", pax.get("path") or long_name
                return walk
            if header == bytes(BLOCK):
                walk.end = "end"
                return walk
            if not _checksum_ok(header):
                if offset == 0:
                    raise DataError(f"{path}: not a readable tar shard (its first block is no tar header)")
                walk.end = "damaged"
                return walk
            try:
                length = _number(header[124:136])
            except ValueError:
                walk.end = "damaged"
                return walk
            kind = header[156:157]
            data = offset + BLOCK
            if kind in (b"0", b"\0", b"7"):
                name = pax.get("path") or long_name or _ustar_name(header)
                if "size" in pax:
                    length = int(pax["size"])
                pax, long_name = {}, None
                if data + length > size:
                    walk.end, walk.cut_member = "cut", name
                    return walk
                walk.members.append((name, data, length))
            elif kind in (b"x", b"X", b"L"):
                if data + length > size:
                    walk.end = "cut"
                    return walk
                raw = os.pread(fh.fileno(), length, data)
                if kind == b"L":
                    long_name = _text(raw)
                else:
                    try:
                        pax = _pax(raw)
                    except ValueError:
                        walk.end = "damaged"
                        return walk
            else:  # directories, links, global PAX headers: nothing to read
                pax, long_name = {}, None
            offset = data + -(-length // BLOCK) * BLOCK


def _ustar_name(header: bytes) -> str:
    name = _text(header[:100])
    if header[257:263] == b"ustar\x00":  # POSIX: a prefix field; GNU's "ustar  " uses it otherwise
        prefix = _text(header[345:500])
        if prefix:
            return f"{prefix}/{name}"
    return name


def split_key(name: str) -> tuple[str, str] | None:
    """(key, extension) of a member name, as webdataset splits it; None for a name without one."""
    m = _KEY.match(name)
    return (m.group(1), m.group(2).lower()) if m else None


def _read(fh, offset: int, size: int) -> bytes:
    return os.pread(fh.fileno(), size, offset)


def _label_of(shard: str, key: str, parts: dict, fh, wnids: dict[int, str]) -> int | None:
    """The sample's class index from ``.cls`` and ``.json`` (checked against each other, the
    wnid recorded); None when neither gives a number."""
    label = None
    if "cls" in parts:
        text = _read(fh, *parts["cls"][:2]).decode("utf-8", "replace").strip()
        try:
            label = int(text)
        except ValueError:
            raise DataError(f"{shard}: {key}.cls: not a class index ({text[:40]!r})") from None
    if "json" not in parts:
        return label
    try:
        meta = json.loads(_read(fh, *parts["json"][:2]))
    except ValueError:
        raise DataError(f"{shard}: {key}.json: not JSON") from None
    if not isinstance(meta, dict):
        return label
    wnid = None
    filename = str(meta.get("filename", ""))
    if "/" in filename:
        wnid = filename.split("/")[0]
    named = meta.get("label")
    if isinstance(named, str) and not named.strip().lstrip("-").isdigit():
        # A wnid where an index would be: the class's name, checked against the filename's.
        if wnid is not None and named != wnid:
            raise DataError(f"{shard}: {key}.json: label {named!r} but filename {filename!r}")
        wnid = named
    elif named is not None and not isinstance(named, bool):
        try:
            number = int(named)
        except (TypeError, ValueError):
            raise DataError(f"{shard}: {key}.json: label {named!r} is neither a class index nor a wnid") from None
        if label is not None and number != label:
            raise DataError(f"{shard}: {key}: .cls says {label} but .json's label is {named}")
        label = number
    if wnid is not None and label is not None:
        known = wnids.setdefault(label, wnid)
        if known != wnid:
            raise DataError(f"{shard}: {key}: class {label} is {wnid} here but {known} in an earlier sample")
    return label


@dataclass
class _ShardRead:
    served: list[tuple[str, int]]  # (member path, label)
    partial: int  # samples the damage left incomplete
    walk: TarWalk


def _read_shard(shard: str, wnids: dict[int, str]) -> _ShardRead:
    walk = walk_tar(shard)
    by_key: dict[str, dict[str, tuple[int, int, str]]] = {}
    for name, offset, size in walk.members:
        split = split_key(name)
        if split:
            by_key.setdefault(split[0], {})[split[1]] = (offset, size, name)
    damaged = walk.end in ("cut", "damaged", "eof")
    cut_key = split_key(walk.cut_member)[0] if walk.cut_member and split_key(walk.cut_member) else None
    last_key = split_key(walk.members[-1][0])[0] if walk.members and split_key(walk.members[-1][0]) else None
    served, partial = [], 0
    if cut_key is not None and cut_key not in by_key:
        partial += 1  # the cut went through the first member of a sample
    with open(shard, "rb") as fh:
        for key, parts in by_key.items():
            image = next((parts[e] for e in IMAGE_EXTS if e in parts), None)
            at_damage = damaged and key in (cut_key, last_key)
            if image is None and not at_damage:
                if "cls" in parts:
                    raise DataError(f"{shard}: {key}: a sample needs an image and a .cls member")
                continue  # not a sample (metadata of another kind)
            label = _label_of(shard, key, parts, fh, wnids) if not (at_damage and image is None) else None
            if image is None or label is None:
                if at_damage:
                    partial += 1
                    continue
                raise DataError(f"{shard}: {key}: a sample needs an image and a class (.cls, or .json's label)")
            offset, size, name = image
            served.append((member_path(shard, name, offset, size), label))
    return _ShardRead(served, partial, walk)


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
        if isinstance(split, dict):
            for name, n in zip(split.get("filenames", []), split.get("shard_lengths", [])):
                promised[os.path.basename(str(name))] = int(n)
    return promised


_ENDS = {"cut": "is cut", "damaged": "has a damaged tar header", "eof": "ends without tar's end-of-archive blocks"}


def _damage(shard: str, read: _ShardRead, promise: int | None) -> tuple[int, str | None]:
    """(samples lost, the note to log) for one shard under the damage rule."""
    served, walk = len(read.served), read.walk
    where = f"{shard}: {_ENDS.get(walk.end, '')} at byte {walk.at:,}"
    if promise is not None:
        lost = max(0, promise - served)
        if walk.end == "end" and lost:
            return 0, (f"{shard}: _info.json promises {promise} samples but the shard, whole, holds {served}; "
                       "none counted as lost (is _info.json out of date?)")
        if walk.end == "end" and served > promise:
            return 0, f"{shard}: holds {served} samples, {promise} promised by _info.json (out of date?)"
        if walk.end == "end":
            return 0, None
        return lost, f"{where}: {served} samples served, {lost} of the {promise} promised by _info.json lost"
    if walk.end == "end":
        return 0, None
    lost = read.partial
    return lost, (f"{where}: {served} samples served, {lost} lost; samples after the damage, if any, "
                  "cannot be counted without _info.json")


def _build(shards: list[str]) -> ShardIndex:
    served: list[tuple[str, int]] = []
    wnids: dict[int, str] = {}
    promised = _promised(shards)
    lost, notes = 0, []
    for shard in shards:
        read = _read_shard(shard, wnids)
        served.extend(read.served)
        missing, note = _damage(shard, read, promised.get(os.path.basename(shard)))
        served.extend((member_path(shard, f"lost-{i}", 0, 0), -1) for i in range(missing))
        lost += missing
        if note:
            notes.append(note)
    if not served:
        raise DataError(f"{os.path.dirname(shards[0])}: the shards hold no samples (KEY.jpg + KEY.cls)")
    prefix = _prefix(shards)
    relative = [os.fsencode(path[len(prefix):]) for path, _ in served]
    samples = SampleList.from_encoded(relative, [label for _, label in served], prefix)
    return ShardIndex(samples, wnids, lost, notes=tuple(notes))


def _prefix(shards: list[str]) -> str:
    """The folder every shard path starts with, ending in a separator (paths are absolute)."""
    return os.path.join(os.path.commonpath([os.path.dirname(s) for s in shards]), "")


def shard_index(shards: list[str], log: Log | None = None) -> ShardIndex:
    """The samples of ``shards`` (absolute paths, as :func:`~.shards.find_shards` gives them),
    from their index when it is current, else read and indexed."""
    started = time.perf_counter()
    shards = [os.path.abspath(s) for s in shards]
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
        log(f"data: {os.path.dirname(shards[0])}: {how}")
        for note in index.notes:
            log(f"warning: {note}")
        if index.lost:
            log(f"warning: {index.lost} samples of damaged shards are lost; they count as unreadable images")
    return ShardIndex(index.samples, index.wnids, index.lost, how, index.notes)


def _real(shards: list[str]) -> bytes:
    return os.fsencode("\0".join(os.path.realpath(s) for s in shards))


def _key(shards: list[str]) -> str:
    m = SHARD_NAME.match(os.path.basename(shards[0]))
    name = m.group("prefix") if m else "shards"
    return f"{name}-shards-{hashlib.sha256(_real(shards)).hexdigest()[:16]}.npz"


def _index_paths(shards: list[str]) -> list[Path]:
    return index_places(os.path.dirname(os.path.realpath(shards[0])), _key(shards))


def _fingerprint(stats: list[os.stat_result]) -> np.ndarray:
    return np.array([[s.st_size, s.st_mtime_ns] for s in stats], dtype=np.int64)


def _bytes(text: str) -> np.ndarray:
    return np.frombuffer(os.fsencode(text), dtype=np.uint8)


def _write_index(index: ShardIndex, shards: list[str], stats: list[os.stat_result]) -> Path | None:
    data, offsets, labels = index.samples.buffers
    arrays = {
        "version": np.array([INDEX_VERSION], dtype=np.int64),
        "shards": np.frombuffer(_real(shards), dtype=np.uint8),
        "fingerprint": _fingerprint(stats),
        "data": data, "offsets": offsets, "labels": labels,
        "wnid_labels": np.array(sorted(index.wnids), dtype=np.int64),
        "wnids": _bytes("\0".join(index.wnids[k] for k in sorted(index.wnids))),
        "lost": np.array([index.lost], dtype=np.int64),
        "notes": _bytes("\n".join(index.notes)),
    }
    return write_arrays(_index_paths(shards), arrays)


def _read_index(path: Path, shards: list[str], stats: list[os.stat_result]) -> ShardIndex | None:
    try:
        with np.load(path, allow_pickle=False) as index:
            a = {name: index[name] for name in index.files}
        if int(a["version"][0]) != INDEX_VERSION or a["shards"].tobytes() != _real(shards):
            return None
        if not np.array_equal(a["fingerprint"], _fingerprint(stats)):
            return None
        names = a["wnids"].tobytes().decode().split("\0") if len(a["wnid_labels"]) else []
        notes = os.fsdecode(a["notes"].tobytes())
        # The paths are relative to the shards' folder: this caller's spelling of it is the prefix.
        samples = SampleList(a["data"], a["offsets"], a["labels"], _prefix(shards))
        return ShardIndex(samples, dict(zip(a["wnid_labels"].tolist(), names)), int(a["lost"][0]),
                          notes=tuple(notes.split("\n")) if notes else ())
    except (OSError, ValueError, EOFError, KeyError, IndexError):
        return None


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


def eval_labels(index: ShardIndex, classes: list[str], spec: str, log: Log | None = None) -> SampleList:
    """An evaluation split's samples with labels in the training classes' numbering: matched by
    wnid where the shards name them (a split written alone numbers its own classes, and may lack
    some), else taken as they are, checked only against the number of classes."""
    samples = index.samples
    labels = samples.labels
    present = sorted(set(labels.tolist()) - {-1})
    if index.wnids:
        position = {w: i for i, w in enumerate(classes)}
        table = np.full((present[-1] + 1) if present else 1, -1, dtype=np.int64)
        for label in present:
            wnid = index.wnids.get(label)
            if wnid is None:
                raise DataError(f"{spec}: no sample of class {label} names its wnid (.json filename)")
            if wnid not in position:
                raise DataError(f"{spec}: class {label} is {wnid} in the shards, which is not one of the "
                                f"{len(classes)} training classes")
            table[label] = position[wnid]
        return samples.relabelled(np.where(labels >= 0, table[np.maximum(labels, 0)], -1))
    if present and present[-1] >= len(classes):
        raise DataError(f"{spec}: class index {present[-1]} in the shards, but training has {len(classes)} classes")
    if log and not all(c.startswith("class") for c in classes):
        log(f"warning: {spec}: the shards name no wnids (no .json filename); their .cls indices are taken "
            "as the training classes' unchecked")
    return samples
