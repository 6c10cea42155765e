"""imagenet-sample: one real ILSVRC-2012 training photo per class (full size), for benchmarks.

Usage::

    from alexnet_train.data.public_sets.imagenet_sample import imagenet_sample

    imagenet_sample("data/imagenet-sample")       # download (107 MB), check, lay out train/<wnid>/

The photos come from a pinned commit of EliSchwartz/imagenet-sample-images, as GitHub
zips it; GitHub publishes no checksum of its zips, so the files are checked by their
git tree id instead (:func:`~alexnet_train.data.integrity.git_tree_id`).
"""
from __future__ import annotations

import os
import zipfile
import zlib
from pathlib import Path
from typing import IO, Callable

from ..archives import _safe_parts
from ...errors import PublicDataError
from ..integrity import Archive, git_tree_id
from ..staging import Layout, _count_tree, _fetch_and_lay_out, write_synsets

# One real ILSVRC-2012 training photo per class (full resolution), as GitHub serves
# the pinned commit of EliSchwartz/imagenet-sample-images.  GitHub publishes no
# checksum of its generated zip, so the content is checked instead: the git tree
# id of the files (every blob's SHA-1, as git computes it) must be the commit's.
SAMPLE_COMMIT = "bc69043e2862758a1906c6a24a792bb28c6bb2ff"
SAMPLE_TREE = "0a95d9cc62e5337173fc2ec8b26f1f4a1f74eaa2"
IMAGENET_SAMPLE = Archive(f"imagenet-sample-images-{SAMPLE_COMMIT[:7]}.zip", md5="",
                          url=f"https://github.com/EliSchwartz/imagenet-sample-images/archive/{SAMPLE_COMMIT}.zip")


def layout_imagenet_sample(archive: Path, root: Path, log: Callable[[str], None], no_verify: bool) -> dict:
    """``root/train/<wnid>/<wnid>_<name>.JPEG`` (one photo per class) and ``root/synset_words.txt``."""
    layout = Layout(root, "imagenet-sample")
    layout.check_free(["train", "synset_words.txt"])
    try:
        with zipfile.ZipFile(archive) as zf:
            files = {}
            for info in zf.infolist():
                if info.is_dir():
                    continue
                parts = _safe_parts(info.filename, archive)
                if len(parts) != 2:
                    raise PublicDataError(f"{archive}: unexpected member {info.filename}; not "
                                          f"imagenet-sample-images' layout")
                files[parts[1]] = zf.read(info)
    except (zipfile.BadZipFile, OSError, zlib.error) as exc:
        raise PublicDataError(f"{archive}: not a readable zip archive, or damaged ({exc})") from None
    if no_verify:
        log(f"{archive}: not verified (--no-verify)")
    else:
        got = git_tree_id(files)
        if got != SAMPLE_TREE:
            raise PublicDataError(f"{archive}: its files' git tree id {got} is not {SAMPLE_TREE} of commit "
                                  f"{SAMPLE_COMMIT[:7]} (a different or damaged archive; --no-verify accepts it)")
        log(f"{archive}: content verified (git tree {SAMPLE_TREE[:12]} of commit {SAMPLE_COMMIT[:7]})")
    images = {n: d for n, d in files.items() if n.endswith(".JPEG") and n.startswith("n") and "_" in n}
    if not images:
        raise PublicDataError(f"{archive}: holds no <wnid>_<name>.JPEG files")
    stage = layout.begin("train")
    names = {}
    for name, data in images.items():
        wnid, _, label = name[: -len(".JPEG")].partition("_")
        (stage / wnid).mkdir(exist_ok=True)
        (stage / wnid / name).write_bytes(data)
        names[wnid] = label.replace("_", " ")
    classes, count = _count_tree(stage)
    layout.commit("train", {"classes": classes, "images": count})
    log(f"{root / 'train'}: {count:,} images in {classes} class folders")
    path = layout.begin("synset_words.txt")
    write_synsets(path, names, names)
    layout.commit("synset_words.txt", {"classes": len(names)})
    layout.finish()
    return {"train": {"classes": classes, "images": count}}


def imagenet_sample(root: str | os.PathLike, source: str | None = None, no_verify: bool = False,
                    keep_archive: bool = False, log: Callable[[str], None] = print,
                    stream: IO[str] | None = None) -> dict:
    root = Path(root)
    # no MD5 for GitHub's zip: obtain() skips it and layout_imagenet_sample checks the content
    return _fetch_and_lay_out(IMAGENET_SAMPLE, Layout(root, "imagenet-sample"), ("train", "synset_words.txt"),
                              "imagenet-sample", source, False, keep_archive, log, stream,
                              lambda path: layout_imagenet_sample(path, root, log, no_verify))
