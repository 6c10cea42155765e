"""WebDataset tar shards: which files a split names, and the path of one sample inside a shard.

Usage::

    shards = find_shards("~/data/imagenet-1k-wds/imagenet1k-train-*.tar", "data.train_dir")
    is_shard_source("data/wds")                      # a folder of .tar files, or a shard pattern
    path = member_path(shards[0], "n01_1.jpg", 1536, 10840)   # "<shard>::n01_1.jpg@1536+10840"
    parse_member(path)                               # (shard, member, offset, size), or None for a file

A split is named the way webdataset names it: a folder that holds the shards of one split, a
single ``.tar``, or a shard pattern, ``DIR/PREFIX-*.tar`` or ``DIR/PREFIX-{0000..1023}.tar``
(brace expansion by the ``braceexpand`` package, which webdataset uses, so ``{0..010}`` pads
both ends to three digits as it does).  Shards are ``PREFIX-NNNN.tar`` or ``PREFIX_NNNN.tar``.
A folder holding several splits side by side (``timm/imagenet-1k-wds`` as downloaded: train
and validation) is an error that lists the patterns to choose from: which split a config
means is then written in the config, not guessed.  Compressed shards (``.tar.gz``) cannot be
read by byte offset; they are refused with one line that says how to decompress them.

Every path may be spelled as a user spells it: relative (``./x``, ``../x``), absolute,
through a symlink, or with ``~``.  The shards come back as absolute paths (symlinks kept as
named), so the samples an index lists do not depend on the working directory.

The index of a split's samples is :mod:`~.shardindex`; reading one sample is :mod:`~.shardread`.
"""
from __future__ import annotations

import glob
import os
import re

from ..errors import DataError
from .treeindex import is_image

SEP = "::"  # <shard>::<member>@<offset>+<size>
# The shard's path ends at the first ".tar::"; the member's byte range closes the path.  An
# image file's name ends in an image extension, never in "@<digits>+<digits>", so a folder
# with "::" in its name (".../ds::v1/n01/x.JPEG") is never taken for a shard member.
_MEMBER = re.compile(r"(?P<shard>.+?\.tar)::(?P<member>.+)@(?P<offset>\d+)\+(?P<size>\d+)", re.S)
SHARD_NAME = re.compile(r"^(?P<prefix>.+?)(?P<sep>[-_])(?P<number>\d+)\.tar$")
COMPRESSED = (".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar.zst")
_PATTERN_CHARS = ("*", "?", "[", "{")


def member_path(shard: str, member: str, offset: int, size: int) -> str:
    return f"{shard}{SEP}{member}@{offset}+{size}"


def parse_member(path: str) -> tuple[str, str, int, int] | None:
    """(shard, member name, data offset, size) of a sample path inside a shard; None for a file."""
    m = _MEMBER.fullmatch(path)
    if m is None:
        return None
    return m.group("shard"), m.group("member"), int(m.group("offset")), int(m.group("size"))


def is_member(path: str) -> bool:
    return _MEMBER.fullmatch(path) is not None


def expand(path: str | os.PathLike) -> str:
    """A path as the shell would have given it: ``~`` expanded."""
    return os.path.expanduser(os.fspath(path))


def _is_pattern(path: str) -> bool:
    return any(c in os.path.basename(path) for c in _PATTERN_CHARS) or any(c in path for c in ("*", "?"))


def _holds_images(folder: str) -> bool:
    try:
        with os.scandir(folder) as entries:
            return any(is_image(e.name) and not e.name.startswith(".") for e in entries)
    except OSError:
        return False


def _tar_files(folder: str) -> tuple[list[os.DirEntry], list[os.DirEntry], list[os.DirEntry]]:
    """(.tar files, compressed tars, sub-folders) of ``folder``, hidden entries left out."""
    tars, packed, dirs = [], [], []
    with os.scandir(folder) as entries:
        for e in entries:
            if e.name.startswith("."):
                continue
            if e.is_dir():
                dirs.append(e)
            elif e.name.endswith(".tar"):
                tars.append(e)
            elif e.name.endswith(COMPRESSED):
                packed.append(e)
    return tars, packed, dirs


def is_shard_source(path: str | os.PathLike | None) -> bool:
    """Whether ``path`` names WebDataset shards: a ``.tar`` file or pattern (or a compressed one,
    which :func:`find_shards` refuses), or a folder with tar files whose sub-folders hold no
    images (an ImageFolder's class folders do; ImageNet's train folder may also keep its
    per-class ``.tar`` files beside them)."""
    if not path:
        return False
    path = expand(path)
    if path.endswith((".tar",) + COMPRESSED) and (_is_pattern(path) or os.path.isfile(path)):
        return True
    if not os.path.isdir(path):
        return False
    tars, packed, dirs = _tar_files(path)
    return bool(tars or packed) and not any(_holds_images(d.path) for d in dirs)


def _splits_in(folder: str, names: list[str]) -> dict[str, list[str]]:
    """Pattern (``DIR/PREFIX-*.tar``) -> the shard files of that split, for the numbered names."""
    groups: dict[str, list[str]] = {}
    for name in sorted(names):
        m = SHARD_NAME.match(name)
        if m:
            pattern = os.path.join(folder, f"{m.group('prefix')}{m.group('sep')}*.tar")
            groups.setdefault(pattern, []).append(os.path.join(folder, name))
    return groups


def _refuse_compressed(key: str, spec: str, names: list[str]) -> None:
    raise DataError(f"{key}: {spec}: {len(names)} compressed shards ({os.path.basename(names[0])}, ...) cannot "
                    "be read by byte offset; decompress them beside the originals (gunzip -k DIR/*.tar.gz, "
                    "or zstd -d for .tar.zst) and name the .tar files")


def find_shards(spec: str | os.PathLike, key: str) -> list[str]:
    """The shard files ``spec`` names, sorted, as absolute paths; DataError naming ``key`` when
    there are none, when they are compressed, or when a folder holds several splits (the message
    lists a pattern for each)."""
    spec = expand(spec)
    if os.path.isdir(spec):
        tars, packed, _ = _tar_files(spec)
        if packed and not tars:
            _refuse_compressed(key, spec, sorted(e.path for e in packed))
        groups = _splits_in(spec, [e.name for e in tars])
        if len(groups) > 1:
            choices = ", ".join(f"{p} ({len(g)} shards)" for p, g in groups.items())
            raise DataError(f"{key}: {spec} holds the shards of {len(groups)} splits; name one: {choices}")
        files = next(iter(groups.values()), sorted(e.path for e in tars))
    elif "{" in spec:
        from braceexpand import braceexpand  # here: a run that names no brace pattern needs no braceexpand

        files = list(braceexpand(spec))
        if any(_is_pattern(f) for f in files):
            files = sorted({g for f in files for g in glob.glob(f)})
        missing = [f for f in files if not os.path.isfile(f)]
        if missing:
            raise DataError(f"{key}: {missing[0]}: shard not found ({len(missing)} of {len(files)} missing)")
    elif _is_pattern(spec):
        files = sorted(glob.glob(spec))
    else:
        files = [spec] if os.path.isfile(spec) else []
    packed = [f for f in files if f.endswith(COMPRESSED)]
    if packed:
        _refuse_compressed(key, spec, packed)
    files = [f for f in files if f.endswith(".tar")]
    if not files:
        raise DataError(f"{key}: no .tar shards found at {spec}")
    return [os.path.abspath(f) for f in files]
