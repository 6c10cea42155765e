"""Tiny ImageNet (CS231n's ``tiny-imagenet-200.zip``): 200 classes, 64 px, laid out for ``alexnet-data``.

Usage::

    from alexnet_train.data.public_sets.tiny_imagenet import tiny_imagenet

    tiny_imagenet("data/tiny-imagenet-200")                          # download (248 MB), verify, lay out
    tiny_imagenet("data/tiny-imagenet-10", source="tiny-imagenet-200.zip",
                  classes=["n01443537", "n02124075"], train_per_class=50)

The checksum is the one published with the CS231n archive and used by the libraries
that download it (e.g. Avalanche: 248,100,043 bytes, MD5 90528d7c...).
"""
from __future__ import annotations

import os
import zipfile
import zlib
from pathlib import Path
from typing import IO, Callable, Sequence

from ..archives import _copy, _safe_parts
from ...errors import PublicDataError, UsageError
from ..integrity import Archive
from ..staging import Layout, _count_tree, _fetch_and_lay_out, write_synsets
from ..transport import ByteProgress

TINY_IMAGENET = Archive("tiny-imagenet-200.zip", "90528d7ca1a48142e341f4ef8d21d0de",
                        "http://cs231n.stanford.edu/tiny-imagenet-200.zip", 248_100_043)


def _tiny_prefix(names: Sequence[str], archive: Path) -> str:
    for name in names:
        if name.endswith("wnids.txt") and name.count("/") <= 1:
            return name[: -len("wnids.txt")]
    raise PublicDataError(f"{archive}: no wnids.txt at the top; not Tiny ImageNet's tiny-imagenet-200.zip layout")


def tiny_dataset_name(classes: Sequence[str] | None, train_per_class: int | None = None) -> str:
    name = "tiny-imagenet" if not classes else "tiny-imagenet:" + ",".join(sorted(classes))
    return name if train_per_class is None else f"{name}:train_per_class={train_per_class}"


def _tiny_text(zf: zipfile.ZipFile, prefix: str, member: str, archive: Path) -> str:
    """The UTF-8 text of ``prefix + member``; PublicDataError when the zip lacks it."""
    try:
        return zf.read(prefix + member).decode("utf-8")
    except KeyError:
        raise PublicDataError(f"{archive}: {prefix + member} is missing; not Tiny ImageNet's layout") from None


def _tiny_labels(zf: zipfile.ZipFile, prefix: str, archive: Path, classes: Sequence[str] | None
                 ) -> tuple[list[str], list[str], dict[str, str], dict[str, str]]:
    """Returns (wnids.txt's wnids, those kept by ``classes``, wnid -> words.txt's names, val file -> wnid)."""
    wnids = [w.strip() for w in _tiny_text(zf, prefix, "wnids.txt", archive).split() if w.strip()]
    if classes:
        unknown = sorted(set(classes) - set(wnids))
        if unknown:
            raise UsageError(f"--classes: {unknown[0]} is not one of the {len(wnids)} classes in "
                             f"{archive}'s wnids.txt")
        wanted = set(classes)
    words = {}
    for line in _tiny_text(zf, prefix, "words.txt", archive).splitlines():
        wnid, _, name = line.partition("\t")
        words[wnid.strip()] = name.strip()
    val_labels = {}
    for lineno, line in enumerate(_tiny_text(zf, prefix, "val/val_annotations.txt", archive).splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split("\t") if "\t" in line else line.split()
        if len(fields) < 2 or fields[1] not in wnids:
            raise PublicDataError(f"{archive}: val/val_annotations.txt:{lineno}: expected 'file wnid ...' "
                                  f"with a wnid from wnids.txt, got {line!r}")
        val_labels[fields[0]] = fields[1]
    kept = [w for w in wnids if w in wanted] if classes else wnids
    return wnids, kept, words, val_labels


def _tiny_members(zf: zipfile.ZipFile, prefix: str, archive: Path, all_wnids: list[str], wnids: list[str],
                  val_labels: dict[str, str]) -> dict[str, list[tuple[zipfile.ZipInfo, Path]]]:
    """The images of the kept classes, per split: (zip member, path under the split as ``<wnid>/<file>``)."""
    members: dict[str, list[tuple[zipfile.ZipInfo, Path]]] = {"train": [], "val": []}
    for info in zf.infolist():
        if info.is_dir() or not info.filename.startswith(prefix):
            continue
        parts = _safe_parts(info.filename[len(prefix):], archive)
        if len(parts) == 4 and parts[0] == "train" and parts[2] == "images":
            if parts[1] not in all_wnids:
                raise PublicDataError(f"{archive}: {info.filename}: class {parts[1]} is not in wnids.txt")
            if parts[1] in wnids:
                members["train"].append((info, Path(parts[1]) / parts[3]))
        elif len(parts) == 3 and parts[:2] == ["val", "images"]:
            wnid = val_labels.get(parts[2])
            if wnid is None:
                raise PublicDataError(f"{archive}: {info.filename} has no line in val/val_annotations.txt")
            if wnid in wnids:
                members["val"].append((info, Path(wnid) / parts[2]))
    missing = sorted(set(wnids) - {p.parts[0] for _, p in members["train"]})
    if missing:
        raise PublicDataError(f"{archive}: no train/{missing[0]}/images/ for {len(missing)} class(es) "
                              f"of wnids.txt; an incomplete archive")
    return members


def _first_per_class(train: list[tuple[zipfile.ZipInfo, Path]], train_per_class: int,
                     archive: Path) -> list[tuple[zipfile.ZipInfo, Path]]:
    """The first ``train_per_class`` training members of each class, by file name."""
    by_class: dict[str, list] = {}
    for info, rel in sorted(train, key=lambda m: m[1].as_posix()):
        by_class.setdefault(rel.parts[0], []).append((info, rel))
    short = sorted(w for w, files in by_class.items() if len(files) < train_per_class)
    if short:
        raise UsageError(f"--train-per-class {train_per_class}: class {short[0]} has only "
                         f"{len(by_class[short[0]])} training images in {archive}")
    return [m for files in by_class.values() for m in files[:train_per_class]]


def _unpack_tiny_split(zf: zipfile.ZipFile, layout: Layout, split: str, wnids: list[str],
                       members: list[tuple[zipfile.ZipInfo, Path]], archive: Path,
                       stream: IO[str] | None) -> dict:
    """Unpack ``members`` into a fresh staging folder and commit it as ``split``; returns its counts."""
    stage = layout.begin(split)
    for wnid in wnids:
        (stage / wnid).mkdir()
    progress = ByteProgress(len(members), f"unpack {split}", stream=stream, unit="files")
    try:
        for info, rel in members:
            with zf.open(info) as src:
                _copy(src, stage / rel)
            progress.update(1)
    except (zipfile.BadZipFile, zlib.error) as exc:
        raise PublicDataError(f"{archive}: damaged member ({exc}); download it again") from None
    finally:
        progress.close()
    classes, images = _count_tree(stage)
    counts = {"classes": classes, "images": images}
    layout.commit(split, counts)
    return counts


def layout_tiny_imagenet(archive: Path, root: Path, log: Callable[[str], None],
                         stream: IO[str] | None = None, classes: Sequence[str] | None = None,
                         train_per_class: int | None = None) -> dict:
    """Unpack the CS231n zip into ``root/train/<wnid>/``, ``root/val/<wnid>/`` and ``root/synset_words.txt``.

    The zip has ``train/<wnid>/images/*.JPEG`` (+ ``<wnid>_boxes.txt``),
    ``val/images/*.JPEG`` with ``val/val_annotations.txt`` (``file wnid x y w h``),
    an unlabelled ``test/`` (left out), ``wnids.txt`` and ``words.txt``.
    ``classes`` (wnids) keeps only those classes, e.g. the ten of tiny-imagenet-10;
    ``train_per_class`` keeps the first N training images of each class (by file name),
    for few-shot runs such as the fine-tuning proof (docs/results.md).  Val is always whole.
    """
    layout = Layout(root, tiny_dataset_name(classes, train_per_class))
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as exc:
        raise PublicDataError(f"{archive}: not a readable zip archive ({exc})") from None
    summary = {}
    with zf:
        prefix = _tiny_prefix(zf.namelist(), archive)
        all_wnids, wnids, words, val_labels = _tiny_labels(zf, prefix, archive, classes)
        members = _tiny_members(zf, prefix, archive, all_wnids, wnids, val_labels)
        if train_per_class is not None:
            members["train"] = _first_per_class(members["train"], train_per_class, archive)
        layout.check_free(["train", "val", "synset_words.txt"])
        for split in ("train", "val"):
            if layout.is_done(split):
                log(f"{root / split}: already laid out")
                summary[split] = layout.done()["splits"][split]
                continue
            summary[split] = _unpack_tiny_split(zf, layout, split, wnids, members[split], archive, stream)
            log(f"{root / split}: {summary[split]['images']:,} images in "
                f"{summary[split]['classes']} class folders")
        if not layout.is_done("synset_words.txt"):
            path = layout.begin("synset_words.txt")
            write_synsets(path, words, wnids)
            layout.commit("synset_words.txt", {"classes": len(wnids)})
    layout.finish()
    return summary


def tiny_imagenet(root: str | os.PathLike, source: str | None = None, no_verify: bool = False,
                  keep_archive: bool = False, log: Callable[[str], None] = print,
                  stream: IO[str] | None = None, classes: Sequence[str] | None = None,
                  train_per_class: int | None = None) -> dict:
    root = Path(root)
    if train_per_class is not None and train_per_class < 1:
        raise UsageError(f"--train-per-class: must be >= 1, got {train_per_class}")
    return _fetch_and_lay_out(TINY_IMAGENET, Layout(root, tiny_dataset_name(classes, train_per_class)),
                              ("train", "val", "synset_words.txt"), "Tiny ImageNet", source, no_verify,
                              keep_archive, log, stream,
                              lambda path: layout_tiny_imagenet(path, root, log, stream, classes, train_per_class))
