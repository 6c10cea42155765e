"""ILSVRC-2012 from image-net.org's tars (which need a login: the user passes them), for ``alexnet-data``.

Usage::

    from alexnet_train.data.public_sets.ilsvrc import ilsvrc

    ilsvrc("/data/imagenet", train_tar="ILSVRC2012_img_train.tar", val_tar="ILSVRC2012_img_val.tar",
           devkit="ILSVRC2012_devkit_t12.tar.gz")                 # verify, lay out train/ and val/
    ilsvrc("/data/imagenet", val_tar="ILSVRC2012_img_val.tar", labels="val.txt", val_layout="flat")

The train tar's per-class tars are unpacked in parallel, and a re-run skips the
classes already done.  The MD5s come from torchvision (``datasets.imagenet.ARCHIVE_META``),
which took them from image-net.org's files.
"""
from __future__ import annotations

import concurrent.futures
import os
import tarfile
import zlib
from pathlib import Path
from typing import IO, Callable

from ..archives import _copy, _safe_parts, _unpack_class_tar
from ...errors import PublicDataError, UsageError
from ..integrity import Archive, verify
from ..staging import STATE_DIR, Layout, _count_tree, write_synsets
from ..transport import ByteProgress


def ilsvrc_archives() -> dict[str, Archive]:
    from torchvision.datasets.imagenet import ARCHIVE_META

    return {split: Archive(name, md5) for split, (name, md5) in ARCHIVE_META.items()}


def _devkit_files(devkit: Path, stage: Path) -> tuple[Path, dict[str, str]]:
    """Extract the val ground truth and meta.mat; returns (ground-truth path, wnid -> names)."""
    wanted = {"ILSVRC2012_validation_ground_truth.txt", "meta.mat"}
    try:
        with tarfile.open(devkit, "r:*") as tf:
            for member in tf:
                base = member.name.rsplit("/", 1)[-1]
                if member.isfile() and base in wanted and member.name.split("/")[-2:-1] == ["data"]:
                    with tf.extractfile(member) as src:
                        _copy(src, stage / base)
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        raise PublicDataError(f"{devkit}: not a readable devkit tar.gz ({exc})") from None
    for name in wanted:
        if not (stage / name).is_file():
            raise PublicDataError(f"{devkit}: no data/{name}; not ILSVRC2012_devkit_t12.tar.gz")
    try:
        from scipy.io import loadmat
    except ImportError:
        raise PublicDataError(f"{devkit}: reading its meta.mat needs scipy (pip install scipy, "
                              f"or alexnet-train[devkit])") from None
    synsets = loadmat(str(stage / "meta.mat"), squeeze_me=True)["synsets"]
    names = {str(s["WNID"]): str(s["words"]) for s in synsets if int(s["num_children"]) == 0}
    return stage / "ILSVRC2012_validation_ground_truth.txt", names


def _class_tars(train_tar: Path) -> list[tarfile.TarInfo]:
    """The ``<wnid>.tar`` members of the train tar; PublicDataError if it is unreadable or has none."""
    try:
        with tarfile.open(train_tar, "r:") as tf:
            inner = [m for m in tf.getmembers() if m.isfile() and m.name.endswith(".tar")]
    except (tarfile.TarError, OSError) as exc:
        raise PublicDataError(f"{train_tar}: not a readable uncompressed tar ({exc})") from None
    if not inner:
        raise PublicDataError(f"{train_tar}: holds no <wnid>.tar members; not ILSVRC2012_img_train.tar")
    return inner


def _unpack_class_tars(train_tar: Path, todo: list[tarfile.TarInfo], stage: Path, workers: int,
                       progress: ByteProgress) -> None:
    """Unpack each of ``todo`` into ``stage/<wnid>/``, here or in a pool of ``workers``, counting on ``progress``."""
    n_workers = workers or os.cpu_count() or 1
    if n_workers <= 1:
        for m in todo:
            _unpack_class_tar(str(train_tar), m.offset_data, m.size, str(stage / Path(m.name).stem))
            progress.update(1)
    else:
        from ..prepare import _pool_context

        with concurrent.futures.ProcessPoolExecutor(n_workers, mp_context=_pool_context()) as pool:
            futures = [pool.submit(_unpack_class_tar, str(train_tar), m.offset_data, m.size,
                                   str(stage / Path(m.name).stem)) for m in todo]
            for fut in concurrent.futures.as_completed(futures):
                fut.result()
                progress.update(1)


def _lay_out_train(layout: Layout, train_tar: Path, workers: int, log: Callable[[str], None],
                   stream: IO[str] | None) -> dict:
    """Unpack the classes not yet in the kept staging folder, then commit ``train``; returns its counts."""
    stage = layout.begin("train", fresh=False)
    inner = _class_tars(train_tar)
    todo = [m for m in inner if not (stage / Path(m.name).stem).is_dir()]
    if len(todo) < len(inner):
        log(f"{train_tar.name}: {len(inner) - len(todo)} of {len(inner)} classes already unpacked")
    progress = ByteProgress(len(inner), "unpack train classes", initial=len(inner) - len(todo),
                            stream=stream, unit="classes")
    try:
        _unpack_class_tars(train_tar, todo, stage, workers, progress)
    except (tarfile.TarError, EOFError) as exc:
        raise PublicDataError(f"{train_tar}: a damaged per-class tar ({exc})") from None
    finally:
        progress.close()
    classes, images = _count_tree(stage)
    counts = {"classes": classes, "images": images}
    layout.commit("train", counts)
    log(f"{layout.root / 'train'}: {images:,} images in {classes} class folders")
    return counts


def _unpack_val(val_tar: Path, stage: Path, val_labels: dict[str, str], label_file: Path,
                val_layout: str, stream: IO[str] | None) -> list[str]:
    """Unpack the val tar into ``stage/<wnid>/`` (flat: ``stage``); returns the flat ``file wnid`` lines."""
    flat_labels: list[str] = []
    progress = ByteProgress(len(val_labels), "unpack val", stream=stream, unit="files")
    try:
        with tarfile.open(val_tar, "r:*") as tf:
            for member in tf:
                if not member.isfile():
                    continue
                base = _safe_parts(member.name, val_tar)[-1]
                wnid = val_labels.get(os.path.splitext(base)[0])
                if wnid is None:
                    raise PublicDataError(f"{val_tar}: {member.name} has no label in {label_file}")
                if val_layout == "flat":
                    dest = stage / base
                    flat_labels.append(f"{base} {wnid}\n")
                else:
                    (stage / wnid).mkdir(exist_ok=True)
                    dest = stage / wnid / base
                with tf.extractfile(member) as src:
                    _copy(src, dest)
                progress.update(1)
    except (tarfile.TarError, EOFError, zlib.error) as exc:
        raise PublicDataError(f"{val_tar}: not a readable tar, or damaged ({exc})") from None
    finally:
        progress.close()
    return flat_labels


def _lay_out_val(layout: Layout, val_tar: Path, label_file: Path, val_layout: str, log: Callable[[str], None],
                 stream: IO[str] | None) -> dict:
    """Unpack val by ``label_file``'s labels and commit it (flat: with ``val_labels.txt``); returns its counts."""
    from ..datasets import DataError, read_labels_file

    try:
        val_labels = read_labels_file(str(label_file))
    except DataError as exc:
        raise PublicDataError(str(exc)) from None
    stage = layout.begin("val")
    flat_labels = _unpack_val(val_tar, stage, val_labels, label_file, val_layout, stream)
    if val_layout == "flat":
        path = layout.begin("val_labels.txt")
        path.write_text("".join(sorted(flat_labels)))
        layout.commit("val_labels.txt", {"images": len(flat_labels)})
        counts = {"images": len(flat_labels), "layout": "flat"}
    else:
        classes, images = _count_tree(stage)
        counts = {"classes": classes, "images": images}
    layout.commit("val", counts)
    log(f"{layout.root / 'val'}: {counts['images']:,} images" +
        (f" in {counts['classes']} class folders" if val_layout != "flat"
         else f", labels in {layout.root / 'val_labels.txt'}"))
    return counts


def layout_ilsvrc(root: Path, log: Callable[[str], None], train_tar: Path | None = None,
                  val_tar: Path | None = None, devkit: Path | None = None, labels: Path | None = None,
                  val_layout: str = "folders", workers: int = 0, stream: IO[str] | None = None) -> dict:
    """ILSVRC-2012 from image-net.org's tars: ``train/<wnid>/``, val sorted (or flat + labels), synsets."""
    layout = Layout(root, "ilsvrc")
    names_to_check = ["synset_words.txt"] + (["train"] if train_tar else []) + (["val"] if val_tar else [])
    if val_tar and val_layout == "flat":
        names_to_check.append("val_labels.txt")
    layout.check_free(names_to_check)
    summary: dict = {}
    names: dict[str, str] = {}
    if devkit is not None:
        gt, names = _devkit_files(devkit, layout.begin("devkit"))
    if train_tar is not None and not layout.is_done("train"):
        summary["train"] = _lay_out_train(layout, train_tar, workers, log, stream)
    if val_tar is not None and not layout.is_done("val"):
        if devkit is not None:
            label_file = gt
        elif labels is not None:
            label_file = labels
        else:
            raise UsageError("--val-tar needs --devkit (or --labels FILE) to know each image's class")
        summary["val"] = _lay_out_val(layout, val_tar, label_file, val_layout, log, stream)
    if names and not layout.is_done("synset_words.txt"):
        path = layout.begin("synset_words.txt")
        write_synsets(path, names, names)
        layout.commit("synset_words.txt", {"classes": len(names)})
    layout.finish()
    return summary


def ilsvrc(root: str | os.PathLike, train_tar: str | None = None, val_tar: str | None = None,
           devkit: str | None = None, labels: str | None = None, val_layout: str = "folders",
           no_verify: bool = False, workers: int = 0, log: Callable[[str], None] = print,
           stream: IO[str] | None = None) -> dict:
    root = Path(root)
    if not train_tar and not val_tar:
        raise UsageError("give --train-tar and/or --val-tar (ILSVRC-2012 needs an image-net.org login; "
                         "download the tars there first)")
    if val_layout not in ("folders", "flat"):
        raise UsageError(f"--val-layout {val_layout}: expected folders or flat")
    archives = ilsvrc_archives()
    paths: dict[str, Path | None] = {}
    for split, given in (("train", train_tar), ("val", val_tar), ("devkit", devkit)):
        if given is None:
            paths[split] = None
            continue
        p = Path(given)
        if not p.is_file():
            raise UsageError(f"--{'devkit' if split == 'devkit' else split + '-tar'} {given}: no such file")
        paths[split] = p
    if labels is not None and not Path(labels).is_file():
        raise UsageError(f"--labels {labels}: no such file")
    layout = Layout(root, "ilsvrc")
    for split, p in paths.items():
        if p is None or (split in ("train", "val") and layout.is_done(split)):
            continue
        if no_verify:
            log(f"{p}: not verified (--no-verify)")
        else:
            verify(p, archives[split], root / STATE_DIR, stream)
            log(f"{p}: MD5 {archives[split].md5} verified")
    return layout_ilsvrc(root, log, paths["train"], paths["val"], paths["devkit"],
                         Path(labels) if labels else None, val_layout, workers, stream)
