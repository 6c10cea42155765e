#!/usr/bin/env python3
"""Training-input throughput: ours against torchvision's standard pipeline, in one run.

    python scripts/bench_data.py --data data/imagenet-sample/train [--workers 2] [--prepared DIR]
    python scripts/bench_data.py --data data/imagenet-sample/train --handoff [--workers 2] [--batch-size 128]
    python scripts/bench_data.py --data data/imagenet-sample/train --rate --workers 8 12 16 [--images 8192]
                                 [--prepared DIR] [--shards DIR] [--batch-size 128]

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
from a worker and to release, for both ``data.decode`` modes (``worker``: one
stacked channels-last tensor, :func:`collate_hwc`; ``device``: one
:class:`EncodedBatch`, the JPEGs in one shared buffer), each three ways:

- ``per-image tensors / fresh``: one tensor per image (``data.decode: device`` did
  until it was packed: each a shared-memory segment and a file descriptor passed
  over a socket);
- ``<collation> / fresh``: the batch in one fresh shared-memory segment (what
  ``make_loader`` did before the ring: a descriptor passed, a mapping made, and on
  release every page unmapped and freed), ``make_loader(ring_slots=0)``;
- ``<collation> / ring``: ours, the batch in one of the worker's reused slots
  (``alexnet_train/data/ring.py``): a slot number crosses, and releasing hands the
  slot back.

Decoding is kept out of it: the items are made here first, the workers (default 2,
batch 128) only collate and send them, and every round waits until the workers
have the whole round's batches ready (prefetch 4 per worker) before it times
``next()`` and dropping the batch.  The last line, in us per image received and
released (the totals), the baseline being a fresh segment per batch:
``handoff: device=<ring, device> worker=<ring, worker> baseline=<fresh, device> ratio=<baseline / device>``.

``--rate`` prints the loader-only rate (no model, no training process work but
receiving): our training loader (``make_loader``, the paper's ``TrainPreset``,
``data.decode: worker``, ``collate_hwc``, the ring) over the 256 px copy as files
(``alexnet-prepare``; ``--prepared DIR``, else made into a temporary folder) and as
WebDataset shards of the same copy (what ``alexnet-prepare --shards`` writes;
``--shards DIR``, else written into a temporary folder, about an eighth of the copy
a shard), against the baseline of torchvision's ``ImageFolder`` pipeline (above)
on the same files, at each of the ``--workers`` counts (``--workers 8 12 16``: all
in one run).  An epoch is ``--images`` images (default 8192: the folder repeated,
so that every worker has batches to make); each figure is the median of
``--repeats`` epochs (default 3) after an untimed one that starts the workers.
The last line: ``rate: workers=8,12,16 tv_files=<img/s,...> files=<img/s,...>
shards=<img/s,...>``.
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
from alexnet_train.data.loaders import RING_SLOTS, EpochSampler, close_loader, make_loader, worker_init
from alexnet_train.data.prepare import prepare_tree
from alexnet_train.data.batching import collate_encoded, collate_hwc
from alexnet_train.data.transforms import TrainPreset

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def torchvision_loader(root: str, batch: int, workers: int, images: int | None = None) -> DataLoader:
    """``images``: an epoch's images (the folder repeated; default: the folder once)."""
    tf = T.Compose([T.Resize(256), T.RandomCrop(224), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(MEAN, STD)])
    dataset = ImageFolder(root, tf)
    sampler = torch.utils.data.RandomSampler(dataset, num_samples=images) if images else None
    return DataLoader(dataset, batch_size=batch, shuffle=sampler is None, sampler=sampler, num_workers=workers,
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


def handoff_us(items: list, collate, batch: int, workers: int, rounds: int, ring_slots: int) -> tuple[float, float, int]:
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
    loader = make_loader(Replay(items), EpochSampler(n, shuffle=False), batch, workers, False, collate,
                         ring_slots=ring_slots)
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
                del got  # the last reference: the shared memory is unmapped and freed, or its slot handed back
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
    workers = (args.workers[0] if args.workers else 0) or 2
    print(f"hand-off: {workers} workers, batch {args.batch_size}, median of {args.repeats} rounds, workers ahead; "
          "main process, us/image: receive = next(), release = dropping the batch")
    print(f"{'data.decode':<13}{'collation':<19}{'buffer':<8}{'tensors/batch':>14}{'receive':>9}{'release':>9}"
          f"{'total':>8}{'total vs fresh':>16}")
    total = {}
    for mode, items, ours in (("device", encoded, collate_encoded), ("worker", finished, collate_hwc)):
        for name, collate, slots in (("per-image", collate_per_image, 0), ("fresh", ours, 0),
                                     ("ring", ours, RING_SLOTS)):
            got, freed, tensors = handoff_us(items, collate, args.batch_size, workers, args.repeats, slots)
            total[mode, name] = got + freed
            label = "per-image tensors" if name == "per-image" else ours.__name__
            vs = f"{total[mode, 'fresh'] / total[mode, name]:.1f}x" if name != "per-image" else "-"
            print(f"{mode:<13}{label:<19}{'ring' if name == 'ring' else 'fresh':<8}{tensors:>14}{got:>9.2f}"
                  f"{freed:>9.2f}{got + freed:>8.2f}{vs:>16}", flush=True)
    baseline = total["device", "fresh"]
    print(f"handoff: device={total['device', 'ring']:.2f} worker={total['worker', 'ring']:.2f} "
          f"baseline={baseline:.2f} ratio={baseline / total['device', 'ring']:.1f}")
    return 0


def shard_copy(prepared: str, out: str) -> str:
    """WebDataset shards of the 256 px copy ``prepared`` (its bytes as they are, as
    ``alexnet-prepare --shards --size 0`` writes them), about an eighth of it a shard."""
    from alexnet_train.data.shardwriter import write_shards

    nbytes = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(prepared) for f in files)
    write_shards(prepared, out, size=0, shard_size=max(1 << 20, nbytes // 8), workers=os.cpu_count() or 1,
                 log=lambda m: None)
    return out


def epoch_rate(loader: DataLoader, repeats: int) -> float:
    """Median images/s of ``repeats`` epochs, after an untimed one (worker start, page cache)."""
    rates = []
    for epoch in range(repeats + 1):
        if isinstance(loader.sampler, EpochSampler):
            loader.sampler.set_epoch(epoch)
        n = 0
        start = time.perf_counter()
        for batch in loader:
            n += len(batch[1])
        if epoch:
            rates.append(n / (time.perf_counter() - start))
    close_loader(loader)
    return statistics.median(rates)


def prepared_copy(data: str, tmp: str) -> str:
    """The 256 px copy of ``data`` (alexnet-prepare) made into ``tmp``; its path."""
    prepared = os.path.join(tmp, "prepared")
    report = prepare_tree(data, prepared, size=256, quality=90, workers=os.cpu_count() or 1, log=lambda m: None)
    print(f"prepared copy: {report.written} images in {report.seconds:.1f}s -> {prepared}")
    return prepared


def rate_main(args) -> int:
    counts = args.workers or [2]
    with tempfile.TemporaryDirectory(prefix="bench-rate-") as tmp:
        prepared = args.prepared or prepared_copy(args.data, tmp)
        shards = args.shards
        if shards is None:
            started = time.perf_counter()
            shards = shard_copy(prepared, os.path.join(tmp, "shards"))
            print(f"shards of it: {len(os.listdir(shards))} files in {time.perf_counter() - started:.1f}s -> {shards}")
        _classes, files = scan_image_folder(prepared)
        _classes, members = scan_image_folder(shards)
        times = max(1, -(-args.images // len(files)))
        cfg = DataConfig()
        print(f"loader-only rate: the 256 px copy ({len(files)} images; epochs of {len(files) * times}), batch "
              f"{args.batch_size}, data.decode worker, {RING_SLOTS} ring slots a worker; images/s, median of "
              f"{args.repeats} epochs after a warm one; baseline: torchvision's ImageFolder pipeline on the files")
        print(f"{'workers':>7}{'tv files':>10}{'files':>9}{'shards':>9}{'files/tv':>10}{'shards/files':>14}"
              f"{'files/worker':>14}")
        rows = []
        for workers in counts:
            tv = torchvision_loader(prepared, args.batch_size, workers, len(files) * times)
            got = [epoch_rate(tv, args.repeats)]
            for samples in (files, members):
                n = len(samples) * times
                loader = make_loader(ImageDataset(samples * times, TrainPreset(cfg)),
                                     EpochSampler(n, seed=0, batch=args.batch_size), args.batch_size, workers, False)
                got.append(epoch_rate(loader, args.repeats))
            rows.append(got)
            print(f"{workers:>7}{got[0]:>10.0f}{got[1]:>9.0f}{got[2]:>9.0f}{got[1] / got[0]:>9.2f}x"
                  f"{got[2] / got[1]:>13.2f}x{got[1] / max(1, workers):>14.0f}", flush=True)
    print(f"rate: workers={','.join(map(str, counts))} " + " ".join(
        f"{name}={','.join(f'{r[k]:.0f}' for r in rows)}" for k, name in enumerate(("tv_files", "files", "shards"))))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="ImageFolder of original JPEGs (e.g. data/imagenet-sample/train, from alexnet-data imagenet-sample)")
    p.add_argument("--workers", type=int, nargs="+", default=None, metavar="N",
                   help="DataLoader workers (default 0: in-process, the exact per-core cost; 2 with --handoff "
                        "and --rate); --rate takes several (--workers 8 12 16), the other modes one")
    p.add_argument("--prepared", help="the prepared 256x256 copy of --data (default: made into a temp folder)")
    p.add_argument("--rate", action="store_true",
                   help="loader-only images/s of the 256 px copy as files and as WebDataset shards, at each "
                        "--workers count, against torchvision's pipeline on the files")
    p.add_argument("--shards", metavar="DIR",
                   help="with --rate: WebDataset shards of the 256 px copy (default: written into a temp folder)")
    p.add_argument("--images", type=int, default=8192,
                   help="with --rate: images an epoch, the folder repeated (default 8192)")
    p.add_argument("--batch-size", type=int, help="default 64; 128 (the paper's batch) with --handoff and --rate")
    p.add_argument("--repeats", type=int, help="timed passes per pipeline, median reported (default 3; 9 "
                   "rounds with --handoff)")
    p.add_argument("--handoff", action="store_true",
                   help="measure what receiving a batch from a worker costs the training process, per data.decode "
                        "mode, against one tensor per image (--workers default 2)")
    args = p.parse_args(argv)
    if args.workers and (len(args.workers) > 1 and not args.rate or min(args.workers) < 0):
        p.error("--workers: one count >= 0 (several only with --rate)")
    if args.handoff and args.rate:
        p.error("--handoff and --rate: one at a time")
    if not os.path.isdir(args.data):
        print(f"bench_data: error: --data {args.data}: directory not found", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    if args.handoff:
        args.batch_size = args.batch_size or 128
        args.repeats = args.repeats or 9
        return handoff_main(args)
    if args.rate:
        args.batch_size = args.batch_size or 128
        args.repeats = args.repeats or 3
        return rate_main(args)
    args.batch_size = args.batch_size or 64
    args.repeats = args.repeats or 3
    args.workers = args.workers[0] if args.workers else 0
    cores = max(1, args.workers)

    with tempfile.TemporaryDirectory(prefix="bench-prepared-") as tmp:
        prepared = args.prepared or prepared_copy(args.data, tmp)
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
