#!/usr/bin/env python3
"""Ten-crop evaluation input throughput: ours against a torchvision TenCrop pipeline, in one run.

    python scripts/bench_eval.py --data data/imagenet-sample/train [--workers 0] [--repeats 3]

docs/benchmarks.md's figures were measured on the 1000 full-resolution photos (one per
ILSVRC-2012 class) that ``alexnet-data imagenet-sample data/imagenet-sample`` lays
out; any ImageFolder of original JPEGs works (``alexnet-data imagenette DIR --size
full`` gives 13,000 more).

Both produce, for every image, the ten normalised float 224x224 crops the
network is fed (4 corners + centre of the shorter-side-256 image, and their
mirrors), batched:

- torchvision: PIL decode, ``Resize(256)``, ``TenCrop(224)``, then
  ``ToTensor`` + ``Normalize`` on each of the ten PIL crops, stacked
  (the usual way to write the paper's test with torchvision);
- ours (``alexnet-eval --ten-crop``): one decode to uint8 (libjpeg-turbo /
  DCT-scaled), one uint8 resize, the ten crops cut as views and copied once,
  collated as uint8, then batched float conversion + normalisation, a
  batch-size chunk of crops at a time as the network consumes them (on the
  GPU in real use; here on this CPU, and counted).

By default (``--workers 0``) everything runs in this process, so images/s is
the per-core cost; ``--workers N`` times a real multi-process DataLoader and
divides by N.  Each timed pass follows an untimed one (warm page cache).  The
last line is ``speedup: <ours / torchvision images per second>`` for the work of a
loader worker (ours ends at uint8 crops, torchvision's at float crops); the
table also shows ours with the float work done on this CPU.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torchvision.transforms as T
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder

from alexnet_train.config import DataConfig
from alexnet_train.data.datasets import ImageDataset, scan_image_folder
from alexnet_train.data.loaders import EpochSampler, worker_init
from alexnet_train.data.batching import collate_hwc
from alexnet_train.data.transforms import BatchPreprocess, TenCropPreset

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def torchvision_loader(root: str, batch: int, workers: int) -> DataLoader:
    per_crop = T.Compose([T.ToTensor(), T.Normalize(MEAN, STD)])
    tf = T.Compose([T.Resize(256), T.TenCrop(224), T.Lambda(lambda crops: torch.stack([per_crop(c) for c in crops]))])
    return DataLoader(ImageFolder(root, tf), batch_size=batch, num_workers=workers,
                      worker_init_fn=worker_init if workers else None, persistent_workers=workers > 0)


def our_loader(root: str, batch: int, workers: int) -> DataLoader:
    _classes, samples = scan_image_folder(root)
    return DataLoader(ImageDataset(samples, TenCropPreset(DataConfig())), batch_size=batch,
                      sampler=EpochSampler(len(samples), shuffle=False), collate_fn=collate_hwc,
                      num_workers=workers, worker_init_fn=worker_init if workers else None,
                      persistent_workers=workers > 0)


def images_per_s(loader: DataLoader, finish, repeats: int) -> float:
    rates = []
    for _ in range(repeats):
        for batch in loader:  # warm pass
            finish(batch)
        n = 0
        start = time.perf_counter()
        for batch in loader:
            x = finish(batch)
            n += x.shape[0]
        rates.append(n / (time.perf_counter() - start))
    return statistics.median(rates)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="an ImageFolder of original JPEGs")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers (default 0: per-core cost)")
    p.add_argument("--batch-size", type=int, default=32, help="images per batch (x10 crops)")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    if not os.path.isdir(args.data):
        print(f"bench_eval: error: --data {args.data}: directory not found", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    cores = max(1, args.workers)
    prep = BatchPreprocess(DataConfig(normalize="torchvision"))
    tv = images_per_s(torchvision_loader(args.data, args.batch_size, args.workers), lambda b: b[0], args.repeats)

    def our_floats(batch) -> torch.Tensor:
        # As evaluate_crops feeds the network: chunks of batch-size crops, converted as they go.
        images = batch[0]
        for chunk in images.flatten(0, 1).split(images.shape[0]):
            prep(chunk)
        return images

    ours = images_per_s(our_loader(args.data, args.batch_size, args.workers), lambda b: b[0], args.repeats)
    ours_cpu = images_per_s(our_loader(args.data, args.batch_size, args.workers), our_floats, args.repeats)
    print(f"{'pipeline':<40}{'img/s':>10}{'img/s/core':>12}")
    print(f"{'torchvision (float crops, in workers)':<40}{tv:>10.1f}{tv / cores:>12.1f}")
    print(f"{'ours (uint8 crops, in workers)':<40}{ours:>10.1f}{ours / cores:>12.1f}")
    print(f"{'ours + normalising on this CPU':<40}{ours_cpu:>10.1f}{ours_cpu / cores:>12.1f}")
    print(f"workers: {args.workers}; the speedup compares the work of a loader worker core "
          f"(ours leaves the float work to the device); with the float work on this CPU too: {ours_cpu / tv:.2f}x")
    print(f"speedup: {ours / tv:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
