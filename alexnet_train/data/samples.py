"""The sample list of a split as flat numpy buffers that forked loader workers share.

Usage::

    samples = SampleList.from_pairs([("train/n01/a.JPEG", 0), ("train/n01/b.JPEG", 0)])
    path, label = samples[1]          # ("train/n01/b.JPEG", 0)
    len(samples), samples[::100]      # a SampleList too
    samples.labels                    # numpy int64 array, one label per sample
    SampleList.from_encoded([b"n01/a.JPEG"], [0], prefix="/data/train/")  # paths "/data/train/n01/a.JPEG"

A Python list of ``(str, int)`` tuples costs ~200 bytes a sample, and every DataLoader
worker that indexes it writes the objects' reference counts: copy-on-write then gives each
persistent worker its own copy of the pages it touched, ~200 MB per worker at ImageNet's
1.28M files within minutes (pytorch/pytorch#13246).  Here the paths are one ``uint8``
buffer (UTF-8, with file-system bytes kept by ``surrogateescape``) plus an ``int64``
offset array, and the labels an ``int64`` array: three objects in all, whose pages a worker
only reads.  Indexing builds the one ``str`` it returns and nothing else.  A ``prefix`` that
every path shares (the tree's root) is kept once: ImageNet's 1.28M training paths are then
~30 bytes each (``n01440764/n01440764_10026.JPEG``), ~55 MB in all with offsets and labels.
"""
from __future__ import annotations

import hashlib
import os
from typing import Iterable, Iterator, Sequence, overload

import numpy as np


def _encode(path: str) -> bytes:
    return os.fsencode(path)


def _decode(data: bytes) -> str:
    return os.fsdecode(data)


class SampleList(Sequence):
    """An immutable sequence of ``(path, label)``: paths in one byte buffer, labels in an array."""

    __slots__ = ("_data", "_offsets", "_labels", "prefix")

    def __init__(self, data: np.ndarray, offsets: np.ndarray, labels: np.ndarray, prefix: str = "") -> None:
        if offsets.ndim != 1 or labels.ndim != 1 or len(offsets) != len(labels) + 1:
            raise ValueError("SampleList: offsets must be one longer than labels")
        self.prefix = prefix  # shared by every path; a str, so a worker never writes to it
        self._data = np.ascontiguousarray(data, dtype=np.uint8)
        self._offsets = np.ascontiguousarray(offsets, dtype=np.int64)
        self._labels = np.ascontiguousarray(labels, dtype=np.int64)
        for array in (self._data, self._offsets, self._labels):
            array.setflags(write=False)

    @classmethod
    def from_pairs(cls, pairs: Iterable[tuple[str, int]]) -> "SampleList":
        encoded: list[bytes] = []
        labels: list[int] = []
        for path, label in pairs:
            encoded.append(_encode(path))
            labels.append(int(label))
        return cls.from_encoded(encoded, labels)

    @classmethod
    def from_encoded(cls, paths: Sequence[bytes], labels: Sequence[int], prefix: str = "") -> "SampleList":
        """From file-system-encoded paths (bytes, after ``prefix``) and their labels."""
        lengths = np.fromiter((len(p) for p in paths), dtype=np.int64, count=len(paths))
        offsets = np.zeros(len(paths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        data = np.frombuffer(b"".join(paths), dtype=np.uint8) if paths else np.zeros(0, dtype=np.uint8)
        return cls(data, offsets, np.asarray(labels, dtype=np.int64), prefix)

    @classmethod
    def concat(cls, parts: Sequence["SampleList"]) -> "SampleList":
        if not parts:
            return cls.from_encoded([], [])
        if len({p.prefix for p in parts}) > 1:
            parts = [p.without_prefix() for p in parts]
        data = np.concatenate([p._data for p in parts])
        starts = np.cumsum([0] + [len(p._data) for p in parts[:-1]])
        offsets = np.concatenate([parts[0]._offsets[:1]] + [p._offsets[1:] + s for p, s in zip(parts, starts)])
        return cls(data, offsets, np.concatenate([p._labels for p in parts]), parts[0].prefix)

    def __len__(self) -> int:
        return len(self._labels)

    @overload
    def __getitem__(self, index: int) -> tuple[str, int]: ...

    @overload
    def __getitem__(self, index: slice) -> "SampleList": ...

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.take(np.arange(len(self))[index])
        i = int(index)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"sample {index} of {len(self)}")
        start, end = int(self._offsets[i]), int(self._offsets[i + 1])
        return self.prefix + _decode(self._data[start:end].tobytes()), int(self._labels[i])

    def path(self, index: int) -> str:
        return self[index][0]

    def relative(self, index: int) -> bytes:
        """The path of sample ``index`` after the prefix, as stored (file-system bytes)."""
        return self._data[int(self._offsets[index]):int(self._offsets[index + 1])].tobytes()

    def without_prefix(self) -> "SampleList":
        """The same samples with the prefix written into every path."""
        if not self.prefix:
            return self
        head = _encode(self.prefix)
        return SampleList.from_encoded([head + self.relative(i) for i in range(len(self))], self._labels)

    def __iter__(self) -> Iterator[tuple[str, int]]:
        for i in range(len(self)):
            yield self[i]

    def __mul__(self, times: int) -> "SampleList":
        """The samples repeated ``times`` times, as a list repeats (benchmarks stretch a small tree)."""
        return self.take(np.tile(np.arange(len(self), dtype=np.int64), max(0, int(times))))

    __rmul__ = __mul__

    def take(self, indices: Sequence[int] | np.ndarray) -> "SampleList":
        """The samples at ``indices``, in that order (a new SampleList)."""
        idx = np.asarray(indices, dtype=np.int64)
        starts, ends = self._offsets[idx], self._offsets[idx + 1]
        lengths = ends - starts
        offsets = np.zeros(len(idx) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        if len(idx):
            # One gather of every byte: the position of each output byte in the source buffer.
            positions = np.repeat(starts - offsets[:-1], lengths) + np.arange(offsets[-1])
            data = self._data[positions]
        else:
            data = np.zeros(0, dtype=np.uint8)
        return SampleList(data, offsets, self._labels[idx], self.prefix)

    def relabelled(self, labels: Sequence[int] | np.ndarray) -> "SampleList":
        """The same paths with ``labels`` (one per sample)."""
        return SampleList(self._data, self._offsets, np.asarray(labels, dtype=np.int64), self.prefix)

    @property
    def labels(self) -> np.ndarray:
        return self._labels

    @property
    def buffers(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(path bytes, offsets, labels): what an index file stores."""
        return self._data, self._offsets, self._labels

    @property
    def nbytes(self) -> int:
        """Memory the list holds (its three buffers)."""
        return self._data.nbytes + self._offsets.nbytes + self._labels.nbytes

    def __eq__(self, other: object) -> bool:
        if isinstance(other, SampleList):
            if self.prefix != other.prefix:
                return list(self) == list(other)
            return (np.array_equal(self._labels, other._labels) and np.array_equal(self._offsets, other._offsets)
                    and np.array_equal(self._data, other._data))
        if isinstance(other, (list, tuple)):
            return len(other) == len(self) and all(tuple(a) == b for a, b in zip(other, self))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        head = ", ".join(repr(s) for s in list(self[:2]))
        return f"SampleList({len(self)} samples{': ' + head + ', ...' if len(self) else ''})"


def fingerprint(samples: SampleList) -> str:
    """SHA-256 (hex) of a sample list: every path after the prefix (the split's root), with its
    label, in order.

    The same data gives the same fingerprint however its root is spelled (relative, absolute,
    through a symlink, from another working directory, a node-local copy); a file added,
    removed or renamed, or a label changed, gives another.  It hashes the three flat buffers
    as they are, ~35 ms for ImageNet's 1.28M training samples.
    """
    data, offsets, labels = samples.buffers
    start, end = (int(offsets[0]), int(offsets[-1])) if len(offsets) else (0, 0)
    digest = hashlib.sha256()
    digest.update(np.int64(len(labels)).astype("<i8").tobytes())
    digest.update(np.ascontiguousarray(offsets - start, dtype="<i8"))
    digest.update(np.ascontiguousarray(labels, dtype="<i8"))
    digest.update(data[start:end])
    return digest.hexdigest()
