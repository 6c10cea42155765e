"""Reading archive members for ``alexnet-data``: safe member names, copies, tars inside a tar.

Usage::

    from alexnet_train.data.archives import _copy, _safe_parts, _unpack_class_tar

    parts = _safe_parts(member.name, archive)      # PublicDataError for "../x" or "/etc/x"
    with tf.extractfile(member) as src:
        _copy(src, stage / parts[-1])
    # one <wnid>.tar of ILSVRC2012_img_train.tar, read in place (no copy of the inner tar)
    _unpack_class_tar("ILSVRC2012_img_train.tar", m.offset_data, m.size, "stage/n01440764")
"""
from __future__ import annotations

import io
import os
import shutil
import tarfile
from pathlib import Path
from typing import IO

from ..errors import PublicDataError
from .transport import CHUNK


def _safe_parts(name: str, archive: Path) -> list[str]:
    parts = [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts) or name.startswith("/"):
        raise PublicDataError(f"{archive}: member {name!r} points outside the archive; refusing to unpack it")
    return parts


def _copy(src: IO[bytes], dst: Path) -> None:
    with open(dst, "wb") as out:
        shutil.copyfileobj(src, out, CHUNK)


class _Window(io.RawIOBase):
    """``size`` bytes of a file from ``offset``: one member of an uncompressed tar, read in place."""

    def __init__(self, path: Path, offset: int, size: int) -> None:
        self.fh = open(path, "rb")
        self.fh.seek(offset)
        self.left = size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = min(len(buffer), self.left)
        if n <= 0:
            return 0
        got = self.fh.readinto(memoryview(buffer)[:n])
        self.left -= got
        return got

    def close(self) -> None:
        self.fh.close()
        super().close()


def _unpack_class_tar(outer: str, offset: int, size: int, dest: str) -> int:
    """Unpack one per-class tar (at ``offset`` in the train tar) into ``dest``; returns the file count."""
    final = Path(dest)
    tmp = final.with_name(final.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    count = 0
    with _Window(Path(outer), offset, size) as raw, tarfile.open(fileobj=io.BufferedReader(raw, CHUNK),
                                                                  mode="r|") as tf:
        for member in tf:
            if not member.isfile():
                continue
            parts = _safe_parts(member.name, Path(outer))
            src = tf.extractfile(member)
            if src is not None:
                _copy(src, tmp / parts[-1])
                count += 1
    os.replace(tmp, final)
    return count

