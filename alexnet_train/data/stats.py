"""Mean pixel, per-channel std and the RGB covariance's eigen-decomposition of a training set.

Usage::

    stats = compute_stats("/data/imagenet/train", samples=10000, workers=8)
    print(stats_yaml(stats))        # a config fragment: `include: stats.yaml` in a config

The statistics are over the pixels the network sees: each sampled image is
resized (shorter side ``resize_size``) as training resizes it.  ``mean`` and
``std`` are on the 0-255 scale (``data.mean`` / ``data.std``); ``eigval`` and
``eigvec`` are of the covariance of 0-1 scaled RGB values, the convention of
``data.eigval`` / ``data.eigvec`` used by the PCA colour noise.
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import Callable

import torch
from torch.utils.data import DataLoader, Dataset

from ..errors import BadImageError, LoaderFailed
from .datasets import DataError, images_under
from .shards import is_shard_source
from .decode import decode_rgb
from .loaders import worker_init
from .transforms import resize_shorter


@dataclass(frozen=True)
class PixelStats:
    mean: tuple[float, float, float]  # 0-255
    std: tuple[float, float, float]  # 0-255
    eigval: tuple[float, float, float]  # covariance of 0-1 RGB, descending
    eigvec: tuple[tuple[float, float, float], ...]  # columns are eigenvectors; rows R, G, B
    images: int
    pixels: int
    source: str


class _Moments(Dataset):
    """Per image: (pixel count, sum of RGB, sum of RGB outer products), in float64 on the 0-1 scale,
    or for an unreadable file ``(0, None, None, (path, reason))``: a worker never raises for one
    (its exception would reach the main process as a multi-line traceback), the main process does."""

    def __init__(self, paths: list[str], resize_size: int) -> None:
        self.paths, self.resize_size = paths, resize_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, torch.Tensor | None, tuple[str, str] | None]:
        try:
            image = decode_rgb(self.paths[i], self.resize_size)
        except BadImageError as exc:
            return 0, None, None, (exc.path, exc.reason)
        px = resize_shorter(image, self.resize_size).reshape(3, -1).to(torch.float64) / 255.0
        return px.shape[1], px.sum(dim=1), px @ px.T, None


def compute_stats(
    data_dir: str,
    samples: int = 10000,
    resize_size: int = 256,
    workers: int = 0,
    seed: int = 0,
    progress: Callable[[int], object] | None = None,
) -> PixelStats:
    """Statistics of ``samples`` images drawn at random (all if fewer) from the tree at ``data_dir``.

    An unreadable image stops it with :class:`BadImageError` naming the file, as training's
    default ``data.on_bad_image: error`` does: statistics of a set that training would then
    stop on are no use, and the first unreadable file in the draw is the same for any
    ``workers``.  Another failure of a loader worker is :class:`LoaderFailed`.
    """
    if not (os.path.isdir(data_dir) or is_shard_source(data_dir)):
        raise DataError(f"{data_dir}: data directory not found")
    if samples < 1:
        raise ValueError(f"--samples: must be >= 1, got {samples}")
    files = images_under(data_dir)
    if not len(files):
        raise DataError(f"{data_dir}: no image files found")
    # The same draw as from a list of the paths (random.sample picks positions), without one.
    if samples < len(files):
        paths = sorted(files.path(i) for i in random.Random(seed).sample(range(len(files)), samples))
    else:
        paths = [files.path(i) for i in range(len(files))]
    loader = DataLoader(_Moments(paths, resize_size), batch_size=None, num_workers=workers,
                        worker_init_fn=worker_init if workers else None)
    bar = progress(len(paths)) if progress is not None else None
    count = 0
    total = torch.zeros(3, dtype=torch.float64)
    outer = torch.zeros(3, 3, dtype=torch.float64)
    batches = iter(loader)
    try:
        for n, s, o, bad in batches:
            if bad is not None:
                raise BadImageError(*bad)
            count += int(n)
            total += s
            outer += o
            if bar is not None:
                bar.update(1)
    except BadImageError:
        raise
    except RuntimeError as exc:
        if "DataLoader worker" not in str(exc):
            raise
        # torch's text: "Caught X in DataLoader worker process N." ... the traceback ... "X: message".
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        raise LoaderFailed(f"{data_dir}: a loader worker failed: {lines[-1]}") from None
    finally:
        # Now, not at interpreter exit: there multiprocessing ends the workers with SIGTERM, which
        # a worker answers only after its grace (loaders.worker_init) -- the 30 s wait and the
        # "killed by signal: Alarm clock" of an error that a traceback kept the iterator alive for.
        shutdown = getattr(batches, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
    if bar is not None and hasattr(bar, "__exit__"):
        bar.__exit__(None, None, None)
    mean = total / count
    cov = outer / count - torch.outer(mean, mean)
    eigval, eigvec = torch.linalg.eigh(cov)  # ascending
    order = torch.argsort(eigval, descending=True)
    eigval, eigvec = eigval[order].clamp_min(0.0), eigvec[:, order]
    # Eigenvectors have no sign; fix one (first component negative, as in the usual ImageNet table).
    signs = torch.where(eigvec[0] > 0, -1.0, 1.0).to(torch.float64)
    eigvec = eigvec * signs
    std = cov.diagonal().clamp_min(0.0).sqrt()
    return PixelStats(
        mean=tuple(round(v * 255.0, 3) for v in mean.tolist()),
        std=tuple(round(v * 255.0, 3) for v in std.tolist()),
        eigval=tuple(round(v, 6) for v in eigval.tolist()),
        eigvec=tuple(tuple(round(v, 4) for v in row) for row in eigvec.tolist()),
        images=len(paths),
        pixels=count,
        source=os.path.abspath(data_dir),
    )


def stats_yaml(stats: PixelStats) -> str:
    """A config fragment holding ``data.mean/std/eigval/eigvec``, for ``include:``."""
    def row(values) -> str:
        return "[" + ", ".join(f"{v:g}" for v in values) + "]"

    lines = [
        f"# alexnet-stats: {stats.images} images ({stats.pixels:,} pixels) of {stats.source}",
        "# mean/std: 0-255 scale; eigval/eigvec: covariance of 0-1 RGB (eigenvectors are columns)",
        "data:",
        f"  mean: {row(stats.mean)}",
        f"  std: {row(stats.std)}",
        f"  eigval: {row(stats.eigval)}",
        "  eigvec:",
        *[f"  - {row(r)}" for r in stats.eigvec],
    ]
    return "\n".join(lines) + "\n"
