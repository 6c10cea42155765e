"""Datasets: ImageFolder trees and flat validation folders, scored against the train classes.

Usage::

    classes, train = scan_image_folder("/data/imagenet/train")
    val = labelled_samples("/data/imagenet/val", classes)          # class subfolders
    val = labelled_samples("/data/val_flat", classes, "val.txt")   # flat + "filename wnid"
    ds = ImageDataset(train, TrainPreset(cfg.data))

Class indices always follow the sorted class folders of the train set (or the
checkpoint's class list), never the validation folder's own subfolders, so a
val set holding only some classes still scores against the right ones.
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps

# their home is .errors, so that decode (which this module calls) need not import this
# one; most callers import them from here
from ..errors import BadImageError, DataError, TooManyBadImages
from .samples import SampleList
from .shardindex import classes_of, eval_labels, shard_index
from .shards import expand, find_shards, is_shard_source
from .treeindex import list_tree

Sample = tuple[str, int]
Log = Callable[[str], None]


class BadImages:
    """The ``data.on_bad_image`` policy, applied in the main process to what the workers report.

    Workers never raise for an unreadable file (a worker's exception reaches the main
    process as a multi-line traceback); they hand back ``(path, reason)`` pairs with the
    batch, and :meth:`check` raises :class:`BadImageError` (``error``) or counts and logs
    each path once (``skip``), raising :class:`TooManyBadImages` past ``max_fraction``.
    """

    def __init__(self, policy: str, max_fraction: float, split_sizes: dict[str, int],
                 log: Callable[[str], None] = print) -> None:
        self.policy, self.max_fraction, self.split_sizes, self.log = policy, max_fraction, split_sizes, log
        self.seen: dict[str, set[str]] = {split: set() for split in split_sizes}

    def check(self, bad: Sequence[tuple[str, str]], split: str) -> None:
        if not bad:
            return
        if self.policy == "error":
            path, reason = bad[0]
            raise BadImageError(path, reason)
        for path, reason in bad:
            self.record(path, reason, split)
        self.check_fraction(split)

    def record(self, path: str, reason: str, split: str) -> None:
        """Count (and log, once) one skipped file: a DDP run records every rank's here."""
        if path not in self.seen[split]:
            self.seen[split].add(path)
            self.log(f"warning: skipping {path}: unreadable image ({reason})")

    def check_fraction(self, split: str) -> None:
        """TooManyBadImages once more of ``split`` is unreadable than ``max_fraction``."""
        seen, size = self.seen[split], self.split_sizes[split]
        if len(seen) > self.max_fraction * size:
            raise TooManyBadImages(
                f"data.max_bad_fraction: {len(seen)} of the {size} {split} images are unreadable "
                f"(> {100 * self.max_fraction:g}%), e.g. {sorted(seen)[0]}"
            )


def images_under(folder: str, log: Log | None = None) -> SampleList:
    """Every image file under ``folder`` (label: its top-level folder's index, -1 at the root),
    from the folder's index when it is current (see :mod:`~alexnet_train.data.treeindex`)."""
    if is_shard_source(folder):
        return shard_index(find_shards(folder, folder), log).samples
    if not os.path.isdir(folder):
        raise DataError(f"{folder}: data directory not found")
    return list_tree(folder, log).files


def class_folders(root: str) -> list[str]:
    """The sorted class folder names of an ImageFolder root (hidden folders are not classes)."""
    if not os.path.isdir(root):
        raise DataError(f"{root}: data directory not found")
    return sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))


def scan_image_folder(root: str, log: Log | None = None) -> tuple[list[str], SampleList]:
    """(sorted class names, samples) of a ``root/<class>/<image>`` tree, read from its index
    when that is current (see :mod:`~alexnet_train.data.treeindex`); ``log`` hears which.
    ``root`` may name WebDataset shards instead (:mod:`~alexnet_train.data.shards`)."""
    if is_shard_source(root):
        index = shard_index(find_shards(root, root), log)
        return classes_of(index, root), index.samples
    classes = class_folders(root)
    if not classes:
        raise DataError(f"{root}: no class folders (expected ROOT/<class>/<image files>)")
    return classes, _in_folders(list_tree(root, log), classes, root)


def _in_folders(listing, classes: Sequence[str], root: str, labels_of: Sequence[int] | None = None,
                allow_empty: bool = False) -> SampleList:
    """The listing's files inside the folders ``classes`` (sorted, as the listing's are), each
    labelled ``labels_of[i]`` for ``classes[i]`` (default: ``i``); DataError for a folder
    without images."""
    position = {name: i for i, name in enumerate(listing.folders)}
    relabel = np.full(len(listing.folders) + 1, -1, dtype=np.int64)  # [-1]: files at the root
    for i, name in enumerate(classes):
        relabel[position[name]] = i
    picked = relabel[listing.files.labels]
    counts = np.bincount(picked[picked >= 0], minlength=len(classes))
    for i, name in enumerate(classes):
        if counts[i] == 0 and not allow_empty:
            raise DataError(f"{os.path.join(root, name)}: class folder holds no image files")
    keep = np.flatnonzero(picked >= 0)
    targets = picked[keep] if labels_of is None else np.asarray(labels_of, dtype=np.int64)[picked[keep]]
    return listing.files.take(keep).relabelled(targets)


def _stem(name: str) -> str:
    return os.path.splitext(os.path.basename(name))[0]


def read_labels_file(path: str) -> dict[str, str]:
    """A validation labels file -> {file stem: wnid}, in any of the formats ILSVRC-2012 comes with.

    - ``filename wnid`` lines (Caffe's ``val.txt`` with wnids, ``val_ground_truth_synsets.txt``);
    - Kaggle's ``LOC_val_solution.csv`` (``ImageId,PredictionString``: the first wnid is the label);
    - the devkit's ``ILSVRC2012_validation_ground_truth.txt`` (one ILSVRC2012_ID per line, for
      ``ILSVRC2012_val_00000001.JPEG`` onwards), with the devkit's ``meta.mat`` beside it
      (read with scipy) mapping those IDs to wnids.
    Keys are file names without extension, so ``.JPEG``/``.jpg`` copies match too.
    """
    try:
        with open(path) as fh:
            lines = [line.strip() for line in fh]
    except FileNotFoundError:
        raise DataError(f"{path}: labels file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read labels file ({exc})") from None
    lines = [line for line in lines if line]
    if not lines:
        raise DataError(f"{path}: labels file is empty")
    if lines[0].replace(" ", "").lower().startswith("imageid,predictionstring"):
        return _kaggle_labels(path, lines[1:])
    if all(line.isdigit() for line in lines[:100]):
        return _devkit_labels(path, lines)
    labels: dict[str, str] = {}
    for lineno, line in enumerate(lines, 1):
        parts = line.split()
        if len(parts) != 2:
            raise DataError(f"{path}:{lineno}: expected 'filename wnid', got {line!r}")
        labels[_stem(parts[0])] = parts[1]
    return labels


def _kaggle_labels(path: str, rows: list[str]) -> dict[str, str]:
    labels = {}
    for lineno, row in enumerate(rows, 2):
        image_id, _, prediction = row.partition(",")
        tokens = prediction.split()
        if not image_id or not tokens:
            raise DataError(f"{path}:{lineno}: expected 'ImageId,wnid x y x y ...', got {row!r}")
        labels[_stem(image_id)] = tokens[0]
    return labels


def read_devkit_meta(meta_path: str) -> dict[int, str]:
    """ILSVRC2012_ID -> wnid from the devkit's ``meta.mat``."""
    try:
        from scipy.io import loadmat
    except ImportError:
        raise DataError(f"{meta_path}: reading the devkit's meta.mat needs scipy (pip install scipy)") from None
    try:
        synsets = loadmat(meta_path, squeeze_me=True)["synsets"]
        return {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets}
    except (OSError, KeyError, ValueError, TypeError) as exc:
        raise DataError(f"{meta_path}: not the devkit's meta.mat ({exc})") from None


def _devkit_labels(path: str, lines: list[str]) -> dict[str, str]:
    meta = os.path.join(os.path.dirname(os.path.abspath(path)), "meta.mat")
    if not os.path.isfile(meta):
        raise DataError(f"{path}: devkit ground truth (ILSVRC2012_IDs) needs the devkit's meta.mat beside it")
    id_to_wnid = read_devkit_meta(meta)
    labels = {}
    for i, line in enumerate(lines, 1):
        wnid = id_to_wnid.get(int(line))
        if wnid is None:
            raise DataError(f"{path}:{i}: ILSVRC2012_ID {line} is not in {meta}")
        labels[f"ILSVRC2012_val_{i:08d}"] = wnid
    return labels


def check_sorted_labels(images: Iterable[tuple[str, str]], labels_of: dict[str, str], labels_file: str) -> int:
    """A labels file given for a folder already sorted into class folders (``alexnet-data ilsvrc``
    leaves val so): each ``(image path, its class folder)`` must have a label there, and that
    folder's.  DataError names the first image that has none or another; returns how many were
    checked.  A val sorted by a wrong mapping (the devkit's ILSVRC2012_IDs are not the sorted
    wnids' order) is caught here rather than scored against shuffled labels."""
    checked, wrong = 0, []
    for path, folder in images:
        wnid = labels_of.get(_stem(path))
        if wnid is None:
            raise DataError(f"{path}: no label for this file in {labels_file}")
        if wnid != folder:
            wrong.append((path, folder, wnid))
        checked += 1
    if wrong:
        path, folder, wnid = wrong[0]
        more = f" ({len(wrong) - 1} more images disagree)" if len(wrong) > 1 else ""
        raise DataError(f"{path}: sorted into class folder {folder} but {labels_file} labels it {wnid}{more}; "
                        "the class folders already label these images: leave the labels file out, "
                        "or fix whichever is wrong")
    return checked


def labelled_samples(root: str, classes: Sequence[str], labels_file: str | None = None,
                     log: Log | None = None) -> SampleList:
    """Samples of an evaluation folder, indexed by ``classes``.

    With class subfolders, each must be one of ``classes``.  Without any (a
    flat folder, as ILSVRC ships val), ``labels_file`` gives each file's wnid.  WebDataset
    shards carry their labels (``KEY.cls``, in the same sorted-wnid order).
    """
    if is_shard_source(root):
        return _shard_eval_samples(root, classes, log)
    index = {name: i for i, name in enumerate(classes)}
    subfolders = class_folders(root)
    if labels_file is None:
        if not subfolders:
            raise DataError(
                f"{root}: no class folders; a flat folder of images needs data.val_labels (or --labels)"
            )
        unknown = [c for c in subfolders if c not in index]
        if unknown:
            raise DataError(
                f"{root}: class folder '{unknown[0]}' is not one of the {len(classes)} training classes"
                + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else "")
            )
        samples = _in_folders(list_tree(root, log), subfolders, root, [index[c] for c in subfolders],
                              allow_empty=True)
    else:
        labels_of = read_labels_file(labels_file)
        files = list_tree(root, log).files
        if subfolders:  # already sorted: the labels must agree with the folders
            check_sorted_labels(_in_class_folder(files, root), labels_of, labels_file)
        targets = np.empty(len(files), dtype=np.int64)
        for i in range(len(files)):
            path = files.path(i)
            wnid = labels_of.get(_stem(path))
            if wnid is None:
                raise DataError(f"{path}: no label for this file in {labels_file}")
            if wnid not in index:
                raise DataError(f"{labels_file}: label '{wnid}' of {os.path.basename(path)} is not a training class")
            targets[i] = index[wnid]
        samples = files.relabelled(targets)
    if not len(samples):
        raise DataError(f"{root}: no image files found")
    return samples


def _in_class_folder(files, root: str) -> Iterator[tuple[str, str]]:
    """(path, class folder) of each file below a folder of ``root`` (files at the root itself have none)."""
    for i in range(len(files)):
        path = files.path(i)
        head, sep, _ = os.path.relpath(path, root).replace(os.sep, "/").partition("/")
        if sep:
            yield path, head


def _shard_eval_samples(root: str, classes: Sequence[str], log: Log | None) -> SampleList:
    return eval_labels(shard_index(find_shards(root, root), log), list(classes), root, log)


def load_rgb(path: str) -> Image.Image:
    """Open any image PIL reads (CMYK, grayscale, palette, RGBA, EXIF-rotated) as RGB."""
    try:
        with Image.open(path) as img:
            from .decode import to_rgb

            return to_rgb(ImageOps.exif_transpose(img))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise BadImageError(path, str(exc) or type(exc).__name__) from None


class ImageDataset(torch.utils.data.Dataset):
    """(path, class) samples -> (uint8 CHW tensor, class).

    Indexed by ``(index, seed)`` pairs (from :class:`~alexnet_train.data.loaders.EpochSampler`)
    the transform draws its randomness from ``random.Random(seed)``; a plain index uses seed 0.
    An unreadable file yields ``(None, (path, reason))`` for :class:`BadImages` to judge.
    """

    def __init__(self, samples: Sequence[Sample], transform: Callable) -> None:
        # Flat buffers that forked workers only read: a list of tuples would be copied into
        # every persistent worker as it indexes them (pytorch/pytorch#13246).
        self.samples = samples if isinstance(samples, SampleList) else SampleList.from_pairs(samples)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor | None, int | tuple[str, str]]:
        from .decode import decode_rgb

        index, seed = key if isinstance(key, tuple) else (key, 0)
        path, target = self.samples[index]
        try:
            image = decode_rgb(path, getattr(self.transform, "min_side", None))
        except BadImageError as exc:
            return None, (path, exc.reason)
        return self.transform(image, random.Random(seed)), target


@dataclass
class EncodedImage:
    """A JPEG's bytes and the preset's plan for it, for the training process to decode.

    Plain bytes: it never leaves the worker as it is, but collated with the rest of its
    batch into one :class:`~alexnet_train.data.batching.EncodedBatch`."""

    path: str
    data: bytes
    plan: tuple


class EncodedDataset(ImageDataset):
    """``data.decode: device``: (path, class) -> (:class:`EncodedImage`, class).

    A worker reads the file and draws the transform's plan from the JPEG header's size,
    with the same seed (so the same crops) as :class:`ImageDataset`.  Files the device
    decoder does not take as they are (PNG, CMYK, an EXIF turn ...) are decoded here, as
    ``data.decode: worker`` would, and come as a finished uint8 crop.  Collate with
    :func:`~alexnet_train.data.batching.collate_encoded`.
    """

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[object, int | tuple[str, str]]:
        from .decode import decode_bytes, device_decodable, read_bytes

        index, seed = key if isinstance(key, tuple) else (key, 0)
        path, target = self.samples[index]
        rng = random.Random(seed)
        try:
            data = read_bytes(path)
            size = device_decodable(data)
            if size is not None:
                return EncodedImage(path, data, self.transform.plan(*size, rng)), target
            image = decode_bytes(data, path, getattr(self.transform, "min_side", None))
        except BadImageError as exc:
            return None, (path, exc.reason)
        return self.transform(image, rng), target


def check_dir(path: str | None, key: str) -> Path:
    """The directory at ``path`` or a DataError naming the config ``key``."""
    if not path:
        raise DataError(f"{key}: not set")
    path = expand(path)
    if is_shard_source(path):
        find_shards(path, key)  # a folder of several splits, or a pattern naming none, is an error here
        return Path(path)
    p = Path(path)
    if not p.is_dir():
        raise DataError(f"{key}: directory not found: {path}")
    return p
