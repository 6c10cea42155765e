#!/usr/bin/env python3
"""Training-input throughput: ours against torchvision's standard pipeline, in one run.

    python scripts/bench_data.py --data data/imagenet-sample/train [--workers 2] [--prepared DIR]

The README's figures were measured on the 1000 full-resolution photos (one per
ILSVRC-2012 class) that ``alexnet-data imagenet-sample data/imagenet-sample`` lays
out; any ImageFolder of original JPEGs works (``alexnet-data imagenette DIR --size
full`` gives 13,000 more).

Both pipelines run through a real DataLoader over the same files:

- torchvision: ``ImageFolder`` + ``Resize(256)``, ``RandomCrop(224)``,
  ``RandomHorizontalFlip``, ``ToTensor``, ``Normalize`` on PIL images (what
  pytorch/examples' imagenet/main.py and the torchvision references do, modulo
  their RandomResizedCrop), float32 batches out of the workers;
- ours: the paper's train preset (shorter side 256, random 224 crop, flip) on
  uint8 tensors: libjpeg-turbo / DCT-scaled decoding, HWC memory, channels-last
  uint8 batches (4x fewer bytes; the float work runs on the device, in batch).

Each is timed on the original JPEGs and on the prepared 256x256 copy
(``alexnet-prepare``; made into a temporary folder unless ``--prepared`` is
given; not timed).  Throughput is per worker core: by default (``--workers 0``)
the loader runs in this one process, so images/s is exactly what one worker
core does (decode, augment, collate) with no inter-process transfer or
contention from the consuming process; ``--workers N`` times the whole
multi-process DataLoader instead and divides by N.  Every timed pass follows
an untimed one, so all files are in the page cache for both pipelines.  The last line compares ours
with torchvision on the original JPEGs:
``speedup: original=<ours on originals / tv> prepared=<ours on the copy / tv>``.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch
import torchvision.transforms as T
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder

from alexnet_train.config import DataConfig
from alexnet_train.data.datasets import ImageDataset, scan_image_folder
from alexnet_train.data.loaders import EpochSampler, worker_init
from alexnet_train.data.prepare import prepare_tree
from alexnet_train.data.transforms import TrainPreset, collate_hwc

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def torchvision_loader(root: str, batch: int, workers: int) -> DataLoader:
    tf = T.Compose([T.Resize(256), T.RandomCrop(224), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(MEAN, STD)])
    return DataLoader(ImageFolder(root, tf), batch_size=batch, shuffle=True, num_workers=workers,
                      worker_init_fn=worker_init if workers else None, persistent_workers=workers > 0)


def our_loader(root: str, batch: int, workers: int) -> DataLoader:
    _classes, samples = scan_image_folder(root)
    sampler = EpochSampler(len(samples), seed=0)
    return DataLoader(ImageDataset(samples, TrainPreset(DataConfig())), batch_size=batch, sampler=sampler,
                      collate_fn=collate_hwc, num_workers=workers,
                      worker_init_fn=worker_init if workers else None, persistent_workers=workers > 0)


def images_per_s(loader: DataLoader, repeats: int) -> tuple[float, int]:
    """Median images/s over ``repeats`` timed passes, each after an untimed warm pass."""
    rates = []
    for epoch in range(repeats):
        if isinstance(loader.sampler, EpochSampler):
            loader.sampler.set_epoch(epoch)
        for _ in loader:  # warm: page cache, worker start-up, allocator
            pass
        n = 0
        start = time.perf_counter()
        for batch in loader:
            n += len(batch[1])
        rates.append(n / (time.perf_counter() - start))
    return statistics.median(rates), n


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="ImageFolder of original JPEGs (e.g. data/imagenet-sample/train, from alexnet-data imagenet-sample)")
    p.add_argument("--workers", type=int, default=0,
                   help="DataLoader workers (default 0: in-process, the exact per-core cost)")
    p.add_argument("--prepared", help="the prepared 256x256 copy of --data (default: made into a temp folder)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3, help="timed passes per pipeline (median reported)")
    args = p.parse_args(argv)
    if not os.path.isdir(args.data):
        print(f"bench_data: error: --data {args.data}: directory not found", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    cores = max(1, args.workers)

    with tempfile.TemporaryDirectory(prefix="bench-prepared-") as tmp:
        prepared = args.prepared
        if prepared is None:
            prepared = os.path.join(tmp, "prepared")
            report = prepare_tree(args.data, prepared, size=256, quality=90, workers=os.cpu_count() or 1,
                                  log=lambda m: None)
            print(f"prepared copy: {report.written} images in {report.seconds:.1f}s -> {prepared}")
        runs = [
            ("torchvision", "original", torchvision_loader(args.data, args.batch_size, args.workers)),
            ("ours", "original", our_loader(args.data, args.batch_size, args.workers)),
            ("torchvision", "prepared", torchvision_loader(prepared, args.batch_size, args.workers)),
            ("ours", "prepared", our_loader(prepared, args.batch_size, args.workers)),
        ]
        results = {}
        print(f"{'pipeline':<13}{'data':<10}{'images':>8}{'img/s':>10}{'img/s/core':>12}{'vs tv same data':>17}")
        for name, data, loader in runs:
            rate, n = images_per_s(loader, args.repeats)
            results[name, data] = rate
            same = rate / results["torchvision", data]
            print(f"{name:<13}{data:<10}{n:>8}{rate:>10.0f}{rate / cores:>12.0f}{same:>16.2f}x", flush=True)
            del loader

    tv = results["torchvision", "original"]
    print(f"workers: {args.workers}; baseline for the speedup: torchvision on the original JPEGs")
    print(f"speedup: original={results['ours', 'original'] / tv:.2f} prepared={results['ours', 'prepared'] / tv:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
