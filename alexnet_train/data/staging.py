"""``DIR/.alexnet-data`` for ``alexnet-data``: archives downloaded into ``downloads/``, splits
built under ``staging/`` and renamed into ``DIR`` when whole, ``done.json`` naming the finished ones.

Usage::

    from alexnet_train.data.staging import Layout, _fetch_and_lay_out

    layout = Layout(root, "imagenette")            # PublicDataError if DIR holds another dataset
    layout.check_free(["train", "val", "synset_words.txt"])
    stage = layout.begin("train")                  # an empty DIR/.alexnet-data/staging/train
    ...                                            # fill stage/<wnid>/
    layout.commit("train", {"classes": 10, "images": 9469})   # one rename, then done.json
    layout.finish()

    # a downloadable dataset's whole flow: done already? else obtain (download or --from,
    # then MD5), lay_out(path), drop the download
    _fetch_and_lay_out(archive, layout, ("train", "val", "synset_words.txt"), "Imagenette", source,
                       no_verify, keep_archive, log, stream, lambda path: lay_out(path, root))
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import IO, Callable, Iterable, Sequence

from ..errors import PublicDataError, UsageError
from .integrity import Archive, verify
from .transport import download

STATE_DIR = ".alexnet-data"


class Layout:
    """Splits built under ``DIR/.alexnet-data/staging`` and renamed into ``DIR`` when whole."""

    def __init__(self, root: str | os.PathLike, dataset: str) -> None:
        self.root = Path(root)
        self.dataset = dataset
        self.state = self.root / STATE_DIR
        self.staging = self.state / "staging"
        self.marker = self.state / "done.json"

    def done(self) -> dict:
        try:
            info = json.loads(self.marker.read_text())
        except FileNotFoundError:
            return {"dataset": self.dataset, "splits": {}}
        except (OSError, ValueError) as exc:
            raise PublicDataError(f"{self.marker}: unreadable ({exc}); remove it to redo the layout") from None
        if info.get("dataset") != self.dataset:
            raise PublicDataError(f"{self.root}: holds {info.get('dataset')!r}, not {self.dataset!r}; "
                                  f"choose another DIR")
        return info

    def is_done(self, name: str) -> bool:
        return name in self.done()["splits"] and (self.root / name).exists()

    def check_free(self, names: Iterable[str]) -> None:
        """Refuse to write over anything in DIR that this tool did not finish."""
        done = self.done()["splits"]
        for name in names:
            if (self.root / name).exists() and name not in done:
                raise PublicDataError(f"{self.root / name}: already exists and was not made by alexnet-data "
                                      f"{self.dataset}; move it away or choose another DIR")

    def begin(self, name: str, fresh: bool = True) -> Path:
        """An empty (``fresh``) or kept staging folder for ``name``."""
        path = self.staging / name
        if fresh and path.exists():
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
        path.parent.mkdir(parents=True, exist_ok=True)
        if name.endswith(".txt"):
            return path
        path.mkdir(parents=True, exist_ok=True)
        return path

    def commit(self, name: str, info: dict) -> None:
        """Move the staged ``name`` into DIR (one rename) and record it as done."""
        os.sync()  # the files' data on disk before the marker says they are whole
        os.replace(self.staging / name, self.root / name)
        done = self.done()
        done["splits"][name] = info
        tmp = self.marker.with_name(self.marker.name + ".tmp")
        tmp.write_text(json.dumps(done, indent=1, sort_keys=True))
        os.replace(tmp, self.marker)

    def finish(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)


def write_synsets(path: Path, names: dict[str, str], wnids: Sequence[str]) -> None:
    path.write_text("".join(f"{w} {names.get(w, w)}\n" for w in sorted(wnids)))


def _count_tree(root: Path) -> tuple[int, int]:
    classes = [d for d in root.iterdir() if d.is_dir()]
    return len(classes), sum(len(os.listdir(d)) for d in classes)


def obtain(archive: Archive, root: Path, source: Path | None, no_verify: bool, log: Callable[[str], None],
           stream: IO[str] | None = None) -> tuple[Path, bool]:
    """The archive on disk: ``source`` (``--from``) or downloaded into ``DIR/.alexnet-data``.

    Returns (path, downloaded).  Checked against the published MD5 unless ``no_verify``.
    """
    state = root / STATE_DIR
    if source is not None:
        if not source.is_file():
            raise UsageError(f"--from {source}: no such file")
        path, downloaded = source, False
    else:
        if archive.url is None:
            raise UsageError(f"{archive.filename} cannot be downloaded without a login; pass the file you have")
        path = state / "downloads" / archive.filename
        if not path.exists():
            log(f"downloading {archive.url}")
            download(archive.url, path, log, expected_size=archive.size, stream=stream)
        downloaded = True
    if no_verify:
        log(f"{path}: not verified (--no-verify)")
    elif archive.md5:  # (no MD5: the archive's content is checked while it is laid out)
        try:
            verify(path, archive, state, stream)
        except PublicDataError:
            if downloaded:  # ours, and wrong: the next run must fetch it again, not trust it
                path.unlink(missing_ok=True)
            raise
        log(f"{path}: MD5 {archive.md5} verified")
    return path, downloaded


def _fetch_and_lay_out(archive: Archive, layout: Layout, names: Sequence[str], title: str, source: str | None,
                       no_verify: bool, keep_archive: bool, log: Callable[[str], None], stream: IO[str] | None,
                       lay_out: Callable[[Path], dict]) -> dict:
    """The downloadable datasets' one flow: done already? else obtain, ``lay_out(path)``, drop the download."""
    if all(layout.is_done(n) for n in names):
        log(f"{layout.root}: {title} is already laid out ({', '.join(n + '/' if '.' not in n else n for n in names)})")
        return layout.done()["splits"]
    path, downloaded = obtain(archive, layout.root, Path(source) if source else None, no_verify, log, stream)
    t0 = time.monotonic()
    try:
        summary = lay_out(path)
    except PublicDataError:
        if downloaded:  # a damaged download must be fetched again, not reused
            path.unlink(missing_ok=True)
        raise
    log(f"laid out in {time.monotonic() - t0:.0f} s")
    if downloaded and not keep_archive:
        path.unlink(missing_ok=True)
    return summary

