"""Integrity checks for ``alexnet-data``: a file against its published MD5, a set of files
against a git tree id.

Usage::

    from alexnet_train.data.integrity import Archive, git_tree_id, verify

    archive = Archive("tiny-imagenet-200.zip", "90528d7ca1a48142e341f4ef8d21d0de")
    verify(Path("tiny-imagenet-200.zip"), archive, state=Path("DIR/.alexnet-data"))  # PublicDataError if not
    git_tree_id({"README.md": b"...", "n01440764_tench.JPEG": b"..."})   # == the commit's tree hash
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from ..errors import PublicDataError
from .transport import CHUNK, ByteProgress


@dataclass(frozen=True)
class Archive:
    """A dataset's file as published: ``md5`` "" where none is (its content is checked while it is
    laid out), ``url`` None where it needs a login (the user passes the file)."""

    filename: str
    md5: str
    url: str | None = None
    size: int | None = None  # bytes, where published


def git_tree_id(files: dict[str, bytes]) -> str:
    """The id git gives a flat tree of regular files (mode 100644): what a commit's tree hash names."""
    entries = b""
    for name in sorted(files):
        blob = hashlib.sha1(b"blob %d\0" % len(files[name]) + files[name], usedforsecurity=False).digest()
        entries += b"100644 " + name.encode() + b"\0" + blob
    return hashlib.sha1(b"tree %d\0" % len(entries) + entries, usedforsecurity=False).hexdigest()


def md5_of(path: Path, stream: IO[str] | None = None) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    progress = ByteProgress(path.stat().st_size, f"verify {path.name}", stream=stream)
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(4 * CHUNK), b""):
            digest.update(chunk)
            progress.update(len(chunk))
    progress.close()
    return digest.hexdigest()


def verify(path: Path, archive: Archive, state: Path, stream: IO[str] | None = None) -> None:
    """Check ``path`` against the published MD5, once: a stamp (size, mtime) skips it on re-runs."""
    stamp = state / f"{archive.filename}.verified"
    st = path.stat()
    key = {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "md5": archive.md5}
    try:
        if json.loads(stamp.read_text()) == key:
            return
    except (OSError, ValueError):
        pass
    got = md5_of(path, stream)
    if got != archive.md5:
        raise PublicDataError(
            f"{path}: MD5 {got} is not the published {archive.md5} of {archive.filename} (a different, "
            f"damaged or repacked file; --no-verify accepts a repacked archive of the same layout)")
    state.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps(key))

