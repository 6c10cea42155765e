"""fast.ai's Imagenette (10 classes; full size, 320 or 160 px), laid out for ``alexnet-data``.

Usage::

    from alexnet_train.data.public_sets.imagenette import imagenette

    imagenette("data/imagenette-320", size="320")                   # download, verify, lay out
    imagenette("data/imagenette-320", size="320", source="imagenette2-320.tgz")

The archives' URLs and MD5s come from torchvision (``datasets.Imagenette._ARCHIVES``),
which took them from fast.ai's files.
"""
from __future__ import annotations

import os
import tarfile
import zlib
from pathlib import Path
from typing import IO, Callable

from ..archives import _copy, _safe_parts
from ...errors import PublicDataError, UsageError
from ..integrity import Archive
from ..staging import Layout, _count_tree, _fetch_and_lay_out, write_synsets
from ..transport import ByteProgress


def imagenette_archive(size: str) -> Archive:
    """fast.ai's Imagenette at ``size`` (``full``, ``320`` or ``160``), as torchvision publishes it."""
    from torchvision.datasets.imagenette import Imagenette

    key = {"full": "full", "320": "320px", "160": "160px"}.get(str(size))
    if key is None:
        raise UsageError(f"--size {size}: expected full, 320 or 160")
    url, md5 = Imagenette._ARCHIVES[key]
    return Archive(url.rsplit("/", 1)[1], md5, url)


def layout_imagenette(archive: Path, root: Path, log: Callable[[str], None],
                      stream: IO[str] | None = None) -> dict:
    """Unpack fast.ai's ``imagenette2*.tgz`` (``imagenette2*/{train,val}/<wnid>/*.JPEG``) into ``root``."""
    from torchvision.datasets.imagenette import Imagenette

    layout = Layout(root, "imagenette")
    layout.check_free(["train", "val", "synset_words.txt"])
    todo = [s for s in ("train", "val") if not layout.is_done(s)]
    for split in ("train", "val"):
        if split not in todo:
            log(f"{root / split}: already laid out")
    stages = {split: layout.begin(split) for split in todo}
    seen: set[str] = set()
    progress = ByteProgress(None, f"unpack {archive.name}", stream=stream, unit="files")
    try:
        with tarfile.open(archive, "r:*") as tf:
            for member in tf:
                parts = _safe_parts(member.name, archive)
                if len(parts) == 4 and parts[1] in ("train", "val"):
                    seen.add(parts[1])
                    if not member.isfile() or parts[1] not in stages:
                        continue
                    folder = stages[parts[1]] / parts[2]
                    folder.mkdir(exist_ok=True)
                    src = tf.extractfile(member)
                    if src is not None:
                        _copy(src, folder / parts[3])
                    progress.update(1)
    except (tarfile.TarError, EOFError, zlib.error) as exc:
        raise PublicDataError(f"{archive}: not a readable tar.gz archive, or damaged ({exc})") from None
    finally:
        progress.close()
    if seen != {"train", "val"}:
        raise PublicDataError(f"{archive}: no {'/'.join(sorted({'train', 'val'} - seen))}/<wnid>/ folders; "
                              f"not Imagenette's layout")
    summary = {}
    for split, stage in stages.items():
        classes, images = _count_tree(stage)
        summary[split] = {"classes": classes, "images": images}
        layout.commit(split, summary[split])
        log(f"{root / split}: {images:,} images in {classes} class folders")
    if not layout.is_done("synset_words.txt"):
        names = {w: ", ".join(n) for w, n in Imagenette._WNID_TO_CLASS.items()}
        path = layout.begin("synset_words.txt")
        write_synsets(path, names, sorted(d.name for d in (root / "train").iterdir() if d.is_dir()))
        layout.commit("synset_words.txt", {"classes": len(names)})
    layout.finish()
    return summary


def imagenette(root: str | os.PathLike, size: str = "320", source: str | None = None, no_verify: bool = False,
               keep_archive: bool = False, log: Callable[[str], None] = print,
               stream: IO[str] | None = None) -> dict:
    root = Path(root)
    return _fetch_and_lay_out(imagenette_archive(size), Layout(root, "imagenette"),
                              ("train", "val", "synset_words.txt"), "Imagenette", source, no_verify,
                              keep_archive, log, stream, lambda path: layout_imagenette(path, root, log, stream))
