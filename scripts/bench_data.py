#!/usr/bin/env python3
"""Training-input throughput: ours against torchvision's standard pipeline, in one run.

    python scripts/bench_data.py --data data/imagenet-sample/train [--workers 2] [--prepared DIR]
    python scripts/bench_data.py --data data/imagenet-sample/train --handoff [--workers 2] [--batch-size 128]

docs/benchmarks.md's figures were measured on the 1000 full-resolution photos (one per
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

``--handoff`` measures instead what a batch costs the training process to receive
from a worker, for both ``data.decode`` modes: ours (``worker``: one stacked
channels-last tensor, :func:`collate_hwc`; ``device``: one
:class:`EncodedBatch`, the JPEGs in one shared buffer) against a baseline that
hands over one tensor per image (``data.decode: device`` did until it was
packed: each is a shared-memory segment and a file descriptor passed over a
socket).  Decoding is kept out of it: the items are made here first, the
workers (default 2, batch 128) only collate and send them, and every round
waits until the workers have the whole round's batches ready (prefetch 4 per
worker) before it times ``next()`` and the batch's release.  The last line:
``handoff: device=<us/image> worker=<us/image> baseline=<us/image> ratio=<baseline / device>``.
"""
from __future__ import annotations

import argparse
import io
import math
import os
import pickle
import statistics
import sys
import tempfile
import time

import torch
import torchvision.transforms as T
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder

from alexnet_train.config import DataConfig
from alexnet_train.data.datasets import EncodedDataset, EncodedImage, ImageDataset, scan_image_folder
from alexnet_train.data.decode import DEVICE_DECODER
from alexnet_train.data.loaders import EpochSampler, close_loader, make_loader, worker_init
from alexnet_train.data.prepare import prepare_tree
from alexnet_train.data.batching import collate_encoded, collate_hwc
from alexnet_train.data.transforms import TrainPreset

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


class Replay(torch.utils.data.Dataset):
    """Items made beforehand, so that the workers only collate and send."""

    def __init__(self, items: list) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: tuple[int, int]):
        return self.items[key[0]]


def collate_per_image(batch: list) -> tuple[list, torch.Tensor, list]:
    """The baseline: one tensor per image in a list (for data.decode: device, a JPEG's bytes as
    a uint8 tensor with its plan, as the hand-off was before EncodedBatch)."""
    good = [(item, t) for item, t in batch if item is not None]
    out = [(torch.frombuffer(bytearray(item.data), dtype=torch.uint8), item.path, item.plan)
           if isinstance(item, EncodedImage) else item for item, _ in good]
    return out, torch.tensor([t for _, t in good], dtype=torch.int64), [t for item, t in batch if item is None]


class _TensorCount(pickle.Pickler):
    """Counts the tensors a pickle holds: each crosses processes as its own shared-memory segment."""

    def __init__(self) -> None:
        super().__init__(io.BytesIO())
        self.tensors = 0

    def reducer_override(self, obj):
        if isinstance(obj, torch.Tensor):
            self.tensors += 1
            return torch.empty, (0,)
        return NotImplemented


def tensors_per_batch(batch) -> int:
    counter = _TensorCount()
    counter.dump(batch)
    return counter.tensors


def handoff_us(items: list, collate, batch: int, workers: int, rounds: int) -> tuple[float, float, int]:
    """(microseconds per image the main process spends in next(), and in releasing the batch,
    tensors per batch), each the median over ``rounds`` of a round's total, the workers ahead.

    A round is what make_loader keeps in flight at once (prefetch 4 per worker), so after the
    wait every batch of it is ready and no worker runs while it is timed.  Totals, not single
    batches: a next() that finds a later batch first unpickles that one too, for a later call.
    """
    n = min(len(items), workers * 4 * batch)
    items = items[:n]
    started = time.perf_counter()
    one = collate(items[:batch])
    collate_s = time.perf_counter() - started
    tensors = tensors_per_batch(one)
    del one
    # Time for the workers to collate and send every batch of a round, with room to spare.
    settle = 1.0 + 4 * math.ceil(math.ceil(n / batch) / workers) * collate_s
    loader = make_loader(Replay(items), EpochSampler(n, shuffle=False), batch, workers, False, collate)
    receive, release = [], []
    try:
        for _ in range(rounds + 1):  # the first round starts the workers: untimed
            it = iter(loader)
            time.sleep(settle)
            spent, freed, images = 0.0, 0.0, 0
            while True:
                started = time.perf_counter()
                try:
                    got = next(it)
                except StopIteration:
                    break
                received = time.perf_counter()
                images += len(got[1])
                del got  # the last reference: the shared memory is unmapped and freed here
                spent += received - started
                freed += time.perf_counter() - received
            receive.append(1e6 * spent / images)
            release.append(1e6 * freed / images)
    finally:
        close_loader(loader)
    return statistics.median(receive[1:]), statistics.median(release[1:]), tensors


def handoff_main(args) -> int:
    cfg = DataConfig()
    _classes, samples = scan_image_folder(args.data)
    keys = list(EpochSampler(len(samples), seed=0))
    started = time.perf_counter()
    encoded_ds, worker_ds = EncodedDataset(samples, TrainPreset(cfg)), ImageDataset(samples, TrainPreset(cfg))
    encoded = [encoded_ds[key] for key in keys]
    finished = [worker_ds[key] for key in keys]
    jpegs = sum(isinstance(item, EncodedImage) for item, _ in encoded)
    print(f"items: {len(keys)} made in {time.perf_counter() - started:.1f}s; data.decode: device ships {jpegs} as "
          f"JPEG bytes ({DEVICE_DECODER} decodes them), {len(keys) - jpegs} as crops finished in the worker")
    workers = args.workers or 2
    print(f"hand-off: {workers} workers, batch {args.batch_size}, median of {args.repeats} rounds, workers ahead; "
          "main process, us/image: receive = next(), release = dropping the batch")
    print(f"{'data.decode':<13}{'collation':<19}{'tensors/batch':>14}{'receive':>9}{'release':>9}{'total':>8}"
          f"{'receive vs baseline':>21}")
    receive = {}
    for mode, items, ours in (("device", encoded, collate_encoded), ("worker", finished, collate_hwc)):
        for name, collate in (("baseline", collate_per_image), ("ours", ours)):
            got, freed, tensors = handoff_us(items, collate, args.batch_size, workers, args.repeats)
            receive[mode, name] = got
            label = "per-image tensors" if name == "baseline" else ours.__name__
            print(f"{mode:<13}{label:<19}{tensors:>14}{got:>9.1f}{freed:>9.1f}{got + freed:>8.1f}"
                  f"{receive[mode, 'baseline'] / got:>20.1f}x", flush=True)
    baseline = receive["device", "baseline"]
    print(f"handoff: device={receive['device', 'ours']:.1f} worker={receive['worker', 'ours']:.1f} "
          f"baseline={baseline:.1f} ratio={baseline / receive['device', 'ours']:.1f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="ImageFolder of original JPEGs (e.g. data/imagenet-sample/train, from alexnet-data imagenet-sample)")
    p.add_argument("--workers", type=int, default=0,
                   help="DataLoader workers (default 0: in-process, the exact per-core cost)")
    p.add_argument("--prepared", help="the prepared 256x256 copy of --data (default: made into a temp folder)")
    p.add_argument("--batch-size", type=int, help="default 64; 128 (the paper's batch) with --handoff")
    p.add_argument("--repeats", type=int, help="timed passes per pipeline, median reported (default 3; 9 "
                   "rounds with --handoff)")
    p.add_argument("--handoff", action="store_true",
                   help="measure what receiving a batch from a worker costs the training process, per data.decode "
                        "mode, against one tensor per image (--workers default 2)")
    args = p.parse_args(argv)
    if not os.path.isdir(args.data):
        print(f"bench_data: error: --data {args.data}: directory not found", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    if args.handoff:
        args.batch_size = args.batch_size or 128
        args.repeats = args.repeats or 9
        return handoff_main(args)
    args.batch_size = args.batch_size or 64
    args.repeats = args.repeats or 3
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
