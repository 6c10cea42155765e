#!/usr/bin/env python3
"""WebDataset shards against the ImageFolder they were made from, in one run.

    python scripts/bench_shards.py --data data/imagenet-sample/train [--workers 2] [--batch-size 64]
                                   [--shard-size BYTES] [--epochs-warm 3] [--cold]

``--data`` is an ImageFolder of JPEGs: the 1000 full-size photos of ``alexnet-data
imagenet-sample DIR``, or their 256 px copy (``alexnet-prepare SRC DST``).  The script writes
shards of it into a temporary folder in the timm/imagenet-1k-wds layout (``KEY.jpg``,
``KEY.cls``: the class index in sorted-folder order, ``KEY.json``: ``{"filename":
"<wnid>/<file>", "label": i}``; samples shuffled with seed 0; about ``--shard-size`` bytes of
images a shard, by default an eighth of the folder), then measures both the same way:

- the training loader (``ImageDataset`` + the paper's ``TrainPreset`` through ``make_loader``,
  ``EpochSampler``, ``collate_hwc``, ``--workers`` workers, persistent): images/s of the first
  epoch (worker start included), of the warm ones after it (median of ``--epochs-warm``), and
  with ``--cold`` of one epoch after ``sync; echo 3 > /proc/sys/vm/drop_caches`` (root only).
  Both loaders are made first and take turns, epoch by epoch, in ABBA order: on a shared
  machine neither always runs second;
- files opened per epoch, counted in every loader process: a ``worker_init_fn`` wraps
  ``os.open``, ``builtins.open`` and ``io.open`` there and adds each open to shared counters
  (image files, shard files, anything else);
- the index build: walking the tree (``list_tree(root, use_index=False)``) against reading
  every shard's tar headers (``shard_index`` on shards that have no index yet: the new ones,
  then hard-linked copies), per 1,000 samples, the median of 3; with ``--cold`` once more
  after dropping the page cache; and the samples read back from each index;
- the sample list's memory (``SampleList.nbytes``, its three numpy buffers) per sample;
- launch to first step: seconds from starting ``alexnet-train --config configs/demo.yaml``
  (a narrow custom model on the CPU, batch 8, ``train.log_interval=1``, val = the same split)
  to its first ``train 1/`` progress line, the index of each already written; the median of
  3, taking turns.

Each figure is printed for files, for shards and as the ratio shards/files; the last lines
extrapolate the index build time and memory to ImageNet's 1,281,167 training images, and
``ratio shards/files: ...`` sums the ratios up on one line.
"""
from __future__ import annotations

import argparse
import builtins
import io
import json
import math
import multiprocessing
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch

from alexnet_train.config import DataConfig
from alexnet_train.data.batching import collate_hwc
from alexnet_train.data.datasets import ImageDataset, scan_image_folder
from alexnet_train.data.loaders import EpochSampler, close_loader, make_loader
from alexnet_train.data.shardindex import shard_index
from alexnet_train.data.shards import find_shards, is_shard_source
from alexnet_train.data.transforms import TrainPreset
from alexnet_train.data.treeindex import is_image, list_tree

REPO = Path(__file__).resolve().parents[1]
IMAGENET_TRAIN = 1_281_167
DROP_CACHES = "/proc/sys/vm/drop_caches"
SHARD_PREFIX = "imagenet1k-train"  # timm/imagenet-1k-wds's name for the training split
TARGET_SHARDS = 8
REPEATS = 3  # index builds and launches: the median of this many


def write_shards(samples, classes: list[str], out: str, shard_size: int, seed: int = 0) -> list[str]:
    """Shards of ``samples`` in ``out``, timm's layout, shuffled; a shard is closed once it holds
    ``shard_size`` bytes of images."""
    order = list(range(len(samples)))
    random.Random(seed).shuffle(order)
    shards: list[str] = []
    tar, held = None, 0
    for i in order:
        path, label = samples[i]
        data = Path(path).read_bytes()
        if tar is None or held >= shard_size:
            if tar is not None:
                tar.close()
            shards.append(os.path.join(out, f"{SHARD_PREFIX}-{len(shards):04d}.tar"))
            tar, held = tarfile.open(shards[-1], "w", format=tarfile.USTAR_FORMAT), 0
        name = os.path.basename(path)
        key, ext = os.path.splitext(name)
        ext = "jpg" if ext.lower() in (".jpg", ".jpeg") else ext.lower().lstrip(".")
        meta = {"filename": f"{classes[label]}/{name}", "label": int(label)}
        for member, payload in ((f"{key}.cls", str(label).encode()), (f"{key}.{ext}", data),
                                (f"{key}.json", json.dumps(meta).encode())):
            info = tarfile.TarInfo(member)
            info.size, info.mode, info.mtime = len(payload), 0o644, 0
            tar.addfile(info, io.BytesIO(payload))
        held += len(data)
    if tar is not None:
        tar.close()
    return shards


class OpenCounts:
    """Opens of image files, shard files and anything else, added up across processes."""

    def __init__(self) -> None:
        self.values = [multiprocessing.Value("q", 0) for _ in range(3)]
        self._saved = None

    def note(self, path) -> None:
        if isinstance(path, int):
            return  # a descriptor already open
        name = os.fsdecode(path)
        kind = 1 if name.endswith(".tar") else 0 if is_image(os.path.basename(name)) else 2
        with self.values[kind].get_lock():
            self.values[kind].value += 1

    def install(self) -> None:
        """Count every open of this process from now on."""
        real_os_open, real_open = os.open, builtins.open
        self._saved = (real_os_open, real_open, io.open)

        def os_open(path, *args, **kwargs):
            self.note(path)
            return real_os_open(path, *args, **kwargs)

        def any_open(file, *args, **kwargs):
            self.note(file)
            return real_open(file, *args, **kwargs)

        os.open, builtins.open, io.open = os_open, any_open, any_open

    def uninstall(self) -> None:
        if self._saved is not None:
            os.open, builtins.open, io.open = self._saved
            self._saved = None

    def take(self) -> tuple[int, int, int]:
        """(images, shards, other) since the last take."""
        got = []
        for v in self.values:
            with v.get_lock():
                got.append(v.value)
                v.value = 0
        return got[0], got[1], got[2]


class CountingInit:
    """The loader's own worker_init_fn, then :meth:`OpenCounts.install` in the worker."""

    def __init__(self, inner, counts: OpenCounts) -> None:
        self.inner, self.counts = inner, counts

    def __call__(self, worker_id: int) -> None:
        if self.inner is not None:
            self.inner(worker_id)
        self.counts.install()


def drop_caches() -> str | None:
    """Drop the page cache (``sync; echo 3 > drop_caches``); None when done, else why not."""
    if not os.access(DROP_CACHES, os.W_OK):
        return "drop_caches not writable"
    os.sync()
    try:
        with open(DROP_CACHES, "w") as fh:
            fh.write("3\n")
    except OSError as exc:
        return f"drop_caches not writable ({exc.strerror})"
    return None


class Timed:
    """One loader over ``samples`` (its workers kept across epochs) and its open counts."""

    def __init__(self, samples, args) -> None:
        self.counts = OpenCounts()
        self.sampler = EpochSampler(len(samples), seed=0, batch=args.batch_size)
        self.loader = make_loader(ImageDataset(samples, TrainPreset(DataConfig())), self.sampler, args.batch_size,
                                  args.workers, False, collate_hwc)
        self.in_process = args.workers == 0
        if not self.in_process:
            self.loader.worker_init_fn = CountingInit(self.loader.worker_init_fn, self.counts)
        self.epochs: list[tuple[str, float, tuple[int, int, int]]] = []  # (kind, images/s, opens)

    def epoch(self, kind: str) -> None:
        if kind == "cold" and drop_caches() is not None:
            raise RuntimeError(f"cold epoch: {DROP_CACHES} could be written at the start but not now")
        self.sampler.set_epoch(len(self.epochs))
        self.counts.take()
        if self.in_process:
            self.counts.install()
        try:
            n, start = 0, time.perf_counter()
            for batch in self.loader:
                n += len(batch[1])
            seconds = time.perf_counter() - start
        finally:
            self.counts.uninstall()
        self.epochs.append((kind, n / seconds, self.counts.take()))

    def close(self) -> None:
        close_loader(self.loader)


def loader_epochs(files, shards, args, cold: bool) -> dict[str, list]:
    """The first epoch, ``--epochs-warm`` warm ones and, with ``cold``, one after the page cache
    is dropped, of both loaders taking turns (ABBA: neither always runs second)."""
    runs = {"files": Timed(files, args), "shards": Timed(shards, args)}
    try:
        for i, kind in enumerate(["first"] + ["warm"] * args.epochs_warm + (["cold"] if cold else [])):
            for name in ("files", "shards") if i % 2 == 0 else ("shards", "files"):
                runs[name].epoch(kind)
    finally:
        for run in runs.values():
            run.close()
    return {name: run.epochs for name, run in runs.items()}


def timed(fn):
    start = time.perf_counter()
    got = fn()
    return got, time.perf_counter() - start


def linked_copy(shards: list[str], folder: str) -> str:
    """The shards again under ``folder`` (hard links, else copies): no index there yet."""
    os.makedirs(folder)
    for s in shards:
        target = os.path.join(folder, os.path.basename(s))
        try:
            os.link(s, target)
        except OSError:
            shutil.copyfile(s, target)
    return folder


def launch_to_first_step(data: str, classes: int, workers: int, out: str) -> tuple[float, str]:
    """Seconds from starting alexnet-train on ``data`` to its first ``train 1/`` line, and how
    it got its samples (its ``data:`` lines); the run is then killed."""
    cmd = [sys.executable, "-m", "alexnet_train", "train", "--config", str(REPO / "configs" / "demo.yaml"),
           "--out", out, "--set", f"data.train_dir={data}", f"data.val_dir={data}", "data.demo=false",
           f"model.num_classes={classes}", "model.arch=custom", "model.conv_widths=[8,16,16,16,16]",
           "model.fc_widths=[32,32]", "train.epochs=1", "train.device=cpu", "data.batch_size=8",
           f"data.workers={workers}", "train.log_interval=1"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    lines: list[str] = []
    seconds = None
    try:
        for line in proc.stdout:
            if re.search(r"(^|\s)train 1/", line):
                seconds = time.perf_counter() - start
                break
            lines.append(line.rstrip())
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: the run and its loader workers
        except ProcessLookupError:
            pass
        proc.wait()
    if seconds is None:
        raise RuntimeError("alexnet-train ended before its first step:\n" + "\n".join(lines[-20:]))
    how = "; ".join(sorted({_how(line) for line in lines if line.startswith("data:")}))
    return seconds, how


def _how(line: str) -> str:
    return ("from the index" if "from the index" in line else "walked" if "walked" in line
            else "read" if "read in" in line else line)


def ratio(shards: float | None, files: float | None) -> str:
    if shards is None or files is None or files == 0:
        return "-"
    return f"{shards / files:.2f}"


def row(name: str, files, shards, fmt: str = "{:.0f}", r: str | None = None) -> None:
    f = fmt.format(files) if isinstance(files, (int, float)) else str(files)
    s = fmt.format(shards) if isinstance(shards, (int, float)) else str(shards)
    print(f"{name:<46}{f:>10}{s:>10}{r if r is not None else ratio(shards, files):>14}", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True,
                   help="ImageFolder of JPEGs (e.g. from alexnet-data imagenet-sample DIR, or its alexnet-prepare copy)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers (default 2)")
    p.add_argument("--batch-size", type=int, default=64, help="loader batch (default 64)")
    p.add_argument("--shard-size", type=int,
                   help=f"bytes of images a shard (default: the folder's / {TARGET_SHARDS}, ~{TARGET_SHARDS} shards)")
    p.add_argument("--epochs-warm", type=int, default=3,
                   help="warm epochs after the first, median reported (default 3)")
    p.add_argument("--cold", action="store_true",
                   help="also time one epoch and the index build after dropping the page cache (root only)")
    args = p.parse_args(argv)
    if not os.path.isdir(args.data) or is_shard_source(args.data):
        print(f"bench_shards: error: --data {args.data}: not an ImageFolder (a directory of class folders)",
              file=sys.stderr)
        return 2
    if args.workers < 0 or args.batch_size < 1 or args.epochs_warm < 1 or (args.shard_size or 1) < 1:
        print("bench_shards: error: --workers >= 0, --batch-size, --epochs-warm and --shard-size >= 1",
              file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    cold_why = drop_caches() if args.cold else "--cold not given"  # tried once here: cold only where it works
    data = os.path.abspath(args.data)
    classes, files = scan_image_folder(data)
    total = sum(os.path.getsize(path) for path, _ in files)
    if len(files) < args.batch_size:
        print(f"bench_shards: error: --batch-size {args.batch_size} is more than the {len(files)} images",
              file=sys.stderr)
        return 2
    shard_size = args.shard_size or math.ceil(total / TARGET_SHARDS)

    with tempfile.TemporaryDirectory(prefix="bench-shards-") as tmp:
        folder = os.path.join(tmp, "train")
        os.makedirs(folder)
        shards, wrote_s = timed(lambda: write_shards(files, classes, folder, shard_size))
        sizes = [os.path.getsize(s) for s in shards]
        print(f"data: {len(files):,} images of {len(classes)} classes, {total / 1e6:.1f} MB")
        print(f"shards: {len(shards)} written in {wrote_s:.1f} s ({SHARD_PREFIX}-*.tar, {min(sizes) / 1e6:.1f}-"
              f"{max(sizes) / 1e6:.1f} MB, shuffled with seed 0) to a temporary folder")

        walk_s = statistics.median(timed(lambda: list_tree(data, use_index=False))[1] for _ in range(REPEATS))
        builds = []
        for i in range(REPEATS):  # the shards, then fresh links to them: never an index there yet
            where = folder if i == 0 else linked_copy(shards, os.path.join(tmp, f"copy-{i}"))
            built, seconds = timed(lambda: shard_index(find_shards(where, "--data")))
            assert "read in" in built.how, built.how
            builds.append(seconds)
        build_s = statistics.median(builds)
        _, files_load_s = timed(lambda: scan_image_folder(data))
        (shard_classes, shard_samples), shards_load_s = timed(lambda: scan_image_folder(folder))
        assert shard_classes == classes and len(shard_samples) == len(files), "the shards do not hold --data"

        launches: dict[str, list] = {"files": [], "shards": []}
        for i in range(REPEATS):
            for name in ("files", "shards") if i % 2 == 0 else ("shards", "files"):
                launches[name].append(launch_to_first_step(data if name == "files" else folder, len(classes),
                                                           args.workers, os.path.join(tmp, f"run-{name}-{i}")))
        launch_files, launch_shards = ((statistics.median(s for s, _ in launches[name]), launches[name][0][1])
                                       for name in ("files", "shards"))

        cold = cold_why is None
        epochs = loader_epochs(files, shard_samples, args, cold)
        cold_build = None
        if cold:
            why = drop_caches()
            _, cold_walk_s = timed(lambda: list_tree(data, use_index=False))
            copy = linked_copy(shards, os.path.join(tmp, "copy-cold"))
            why = why or drop_caches()
            _, cold_shard_s = timed(lambda: shard_index(find_shards(copy, "--data")))
            cold_build = None if why else (cold_walk_s, cold_shard_s)

    n = len(files)
    print(f"loader: ImageDataset + TrainPreset (256, crop 224) via make_loader, {args.workers} workers, "
          f"batch {args.batch_size}; opens counted in every loader process (os.open, open)")
    print(f"{'figure':<46}{'files':>10}{'shards':>10}{'shards/files':>14}")
    figures: dict[str, str] = {}

    def rate(kind: str, name: str) -> float | None:
        got = [r for k, r, _ in epochs[name] if k == kind]
        return statistics.median(got) if got else None

    for kind, label in (("first", "first epoch (workers start), img/s"),
                        ("warm", f"warm epoch (median of {args.epochs_warm}), img/s"),
                        ("cold", "cold epoch (page cache dropped), img/s")):
        f, s = rate(kind, "files"), rate(kind, "shards")
        if f is None:
            print(f"cold: not measured ({cold_why})")
            figures[kind] = "-"
            continue
        row(label, f, s)
        figures[kind] = ratio(s, f)
    for kind in [k for k in ("first", "warm", "cold") if any(k == e[0] for e in epochs["files"])]:
        f = next(c for k, _, c in epochs["files"] if k == kind)
        s = next(c for k, _, c in epochs["shards"] if k == kind)
        row(f"files opened, {kind} epoch: images+shards", f"{f[0]}+{f[1]}", f"{s[0]}+{s[1]}",
            r=ratio(s[0] + s[1], f[0] + f[1]))
        if f[2] or s[2]:
            row(f"  other files (library metadata), {kind} epoch", f[2], s[2], r="")
        figures[f"opens_{kind}"] = ratio(s[0] + s[1], f[0] + f[1])
    per_k = (1000 * walk_s / n, 1000 * build_s / n)
    row(f"index build, warm (median of {REPEATS}), s/1,000", *per_k, fmt="{:.3f}")
    figures["index_build"] = ratio(per_k[1], per_k[0])
    if cold_build is not None:
        row("index build, page cache dropped, s/1,000", 1000 * cold_build[0] / n, 1000 * cold_build[1] / n,
            fmt="{:.3f}")
        figures["index_build_cold"] = ratio(cold_build[1], cold_build[0])
    row("samples from the index, s", files_load_s, shards_load_s, fmt="{:.3f}")
    memory = (files.nbytes / n, shard_samples.nbytes / n)
    row("index memory (SampleList), bytes per sample", *memory, fmt="{:.1f}")
    figures["index_memory"] = ratio(memory[1], memory[0])
    row(f"launch to first step (median of {REPEATS}), s", launch_files[0], launch_shards[0], fmt="{:.2f}")
    figures["launch"] = ratio(launch_shards[0], launch_files[0])
    print("index build: files walk the tree; shards read every tar header and write the index file")
    print(f"launch: samples {launch_files[1]} (files), {launch_shards[1]} (shards)")

    scale = IMAGENET_TRAIN / 1000
    print(f"ImageNet, {IMAGENET_TRAIN:,} training images, extrapolated linearly from these {n:,}:")
    print(f"  index build: files {per_k[0] * scale:.1f} s, shards {per_k[1] * scale:.1f} s "
          f"(s per 1,000 samples, warm cache, x {scale:.3f})")
    if cold_build is not None:
        print(f"  index build, cache dropped: files {1000 * cold_build[0] / n * scale:.1f} s, "
              f"shards {1000 * cold_build[1] / n * scale:.1f} s")
    print(f"  index memory: files {memory[0] * IMAGENET_TRAIN / 1e6:.1f} MB, shards {memory[1] * IMAGENET_TRAIN / 1e6:.1f} MB "
          f"(SampleList.nbytes / {n:,} x {IMAGENET_TRAIN:,}; paths as long as this run's)")
    print("ratio shards/files: " + " ".join(f"{k}={v}" for k, v in figures.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
