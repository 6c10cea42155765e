"""Reading one sample of a WebDataset shard: one ``pread`` of its exact bytes.

Usage::

    raise_open_files_limit()          # once, at start: the soft limit up to the hard one
    read_member(index.samples.path(0))   # the JPEG's bytes; BadImageError names shard and member

A process keeps at most ``MAX_OPEN`` shards open (least recently used closed first; never
an mmap: it behaves badly on network storage).  The bound is fixed and small, so a loader
worker's descriptors stay well under any limit whatever the number of shards: the samples
of a shuffled epoch come from every shard, and a worker also needs descriptors of its own
for every batch it sends (shared memory, pipes), which an open that fails at the limit
would not leave room for.  webdataset's ``wids`` keeps 10.
"""
from __future__ import annotations

import os
from collections import OrderedDict

from ..errors import BadImageError
from .shards import parse_member

MAX_OPEN = 8  # shards open per process
_descriptors: "OrderedDict[tuple[int, str], int]" = OrderedDict()  # oldest use first


def raise_open_files_limit() -> tuple[int, int]:
    """Raise this process's soft limit of open files to its hard limit (children inherit it);
    (soft, hard) after."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft, hard


def _descriptor(shard: str) -> int:
    key = (os.getpid(), shard)  # a forked worker opens its own: its parent's may be shared or closed
    fd = _descriptors.get(key)
    if fd is not None:
        _descriptors.move_to_end(key)
        return fd
    for old in [k for k in _descriptors if k[0] != os.getpid()]:
        os.close(_descriptors.pop(old))  # a forked worker's copies of its parent's: this process's to close
    while len(_descriptors) >= MAX_OPEN:
        _, oldest = _descriptors.popitem(last=False)
        os.close(oldest)
    fd = _descriptors[key] = os.open(shard, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    return fd


def open_count() -> int:
    """Shards this process holds open."""
    return sum(1 for k in _descriptors if k[0] == os.getpid())


def read_member(path: str) -> bytes:
    """The bytes of the member a virtual sample path names: one ``pread`` from this process's
    descriptor of its shard.  BadImageError names the shard and the member."""
    parsed = parse_member(path)
    if parsed is None:
        raise BadImageError(path, "not a sample of a shard")
    shard, name, offset, size = parsed
    if name.startswith("lost-") and size == 0:
        raise BadImageError(path, "lost: the shard is damaged before this sample")
    try:
        data = os.pread(_descriptor(shard), size, offset)
    except OSError as exc:
        raise BadImageError(path, exc.strerror or str(exc)) from None
    if len(data) != size:
        raise BadImageError(path, f"cut short: {len(data)} of {size} bytes")
    return data
