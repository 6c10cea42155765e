"""Public datasets, downloaded, verified and laid out as ImageFolder trees (``alexnet-data``).

    alexnet-data tiny-imagenet data/tiny-imagenet-200            # download (248 MB), verify, lay out
    alexnet-data tiny-imagenet data/tiny-imagenet-200 --from ~/Downloads/tiny-imagenet-200.zip
    alexnet-data imagenette data/imagenette-320 --size 320
    alexnet-data imagenet-sample data/imagenet-sample               # 1000 full-size photos, for benchmarks
    alexnet-data ilsvrc /data/imagenet --train-tar ILSVRC2012_img_train.tar \\
        --val-tar ILSVRC2012_img_val.tar --devkit ILSVRC2012_devkit_t12.tar.gz

    from alexnet_train.data import public
    public.tiny_imagenet("data/tiny-imagenet-10", classes=public.parse_classes("n01443537,n02124075"))

Every dataset ends as ``DIR/train/<wnid>/*`` and ``DIR/val/<wnid>/*`` (or a flat
``DIR/val`` with ``DIR/val_labels.txt``) plus ``DIR/synset_words.txt``
(``wnid name, name...`` lines, what ``alexnet-predict --synsets`` reads).

Safety: a split is unpacked under ``DIR/.alexnet-data/staging`` and moved into
place by one rename when it is whole, so ``DIR/train`` is either absent or
complete; ``DIR/.alexnet-data/done.json`` lists the finished splits.  A cut
download resumes from its ``.part`` file (HTTP Range); archives are checked
against the published MD5 before anything is unpacked.  ILSVRC's per-class
train tars are unpacked in parallel and a re-run skips the classes already done.

Checksums: Tiny ImageNet's is the one published with the CS231n archive and used
by the libraries that download it (e.g. Avalanche: 248,100,043 bytes, MD5
90528d7c...); Imagenette's and ILSVRC-2012's come from torchvision
(``datasets.Imagenette._ARCHIVES``, ``datasets.imagenet.ARCHIVE_META``), which
took them from fast.ai's and image-net.org's files.  imagenet-sample (one ILSVRC-2012
training photo per class, from a pinned commit of EliSchwartz/imagenet-sample-images)
is checked by its files' git tree id, since GitHub publishes no checksum of its zips.

This module is the front door; the work is done in ``transport`` (download, resume,
retries, progress), ``integrity`` (MD5, git tree id), ``archives`` (member names,
tars in a tar), ``staging`` (``DIR/.alexnet-data``: downloads, staged splits, the
fetch-and-lay-out flow) and one module per dataset in ``public_sets``.  A dataset's
constants (e.g. ``public_sets.tiny_imagenet.TINY_IMAGENET``) are not re-exported
here: they are read where they are defined, so that is where to patch them.
"""
from __future__ import annotations

import os
from pathlib import Path

from ..errors import PublicDataError, UsageError
from .integrity import Archive
from .public_sets.ilsvrc import ilsvrc
from .public_sets.imagenet_sample import imagenet_sample
from .public_sets.imagenette import imagenette
from .public_sets.tiny_imagenet import tiny_imagenet
from .staging import STATE_DIR

__all__ = ["STATE_DIR", "Archive", "PublicDataError", "UsageError", "ilsvrc", "imagenet_sample", "imagenette",
           "parse_classes", "tiny_imagenet"]


def parse_classes(spec: str | None) -> list[str] | None:
    """``--classes``: comma-separated wnids, or a file of them (one per line or space-separated)."""
    if not spec:
        return None
    if os.path.isfile(spec):
        try:
            wnids = Path(spec).read_text().split()
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"--classes {spec}: cannot read it ({exc})") from None
    else:
        wnids = [w.strip() for w in spec.split(",") if w.strip()]
    if not wnids:
        raise UsageError(f"--classes {spec}: no wnids")
    return sorted(set(wnids))
