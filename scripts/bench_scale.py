"""ImageNet's size, rehearsed on one machine: scan, start-up, worker memory, epoch overhead, eval.

Usage::

    alexnet-data tiny-imagenet data/tiny-imagenet-200          # any folder of JPEGs will do
    python scripts/bench_scale.py --images data/tiny-imagenet-200/train --work /tmp/scale

It lays out an ImageNet-shaped tree under WORK (1,000 wnid folders, 1,281,167 training and
50,000 validation files, 50 per class) as hard links to the JPEGs found under --images (no
extra disk; made once, reused), then measures, side by side with torchvision's
``ImageFolder`` where it has an equivalent:

- the scan of the training tree, cold (after ``drop_caches``, where this process may write
  it) and warm: torchvision's ``ImageFolder``, our walk, our index read;
- the memory that holds the sample list in the main process (tracemalloc);
- launch to the first training step of ``alexnet-train`` (configs/tiny-imagenet-200.yaml with
  1,000 classes): fresh (walks the tree), resumed (reads the index), and 2 gloo ranks under
  torchrun (rank 0 walks, rank 1 reads what it wrote);
- each loader worker's private and PSS memory (``/proc/PID/smaps_rollup``) at step 100 and
  at step --steps of a real training run, and the same for a plain DataLoader loop over our
  dataset and over torchvision's ``ImageFolder`` (a list of tuples) with the same batch and
  workers;
- the epoch's overhead outside the steps: the sampler's order (ours against
  ``DistributedSampler`` at 8 ranks), and the loader's start;
- ``alexnet-stats`` (10,000 samples) and ``alexnet-eval`` centre crop over the 50,000
  validation images (wall, images/s), from the training run's checkpoint.

One line per figure, then ``summary:`` with the ratios.  ``--steps`` (default 5000) sizes
the memory runs; ``--skip`` names parts to leave out.
"""
from __future__ import annotations

import argparse
import gc
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "tiny-imagenet-200.yaml"
TRAIN_FILES = 1_281_167
VAL_PER_CLASS = 50
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
PARTS = ("scan", "launch", "memory", "loader_memory", "epoch", "stats", "eval")


def line(name: str, value: str) -> None:
    print(f"{name}: {value}", flush=True)


def wnids() -> list[str]:
    return (REPO / "alexnet_train" / "imagenet_wnids.txt").read_text().split()


def source_images(folder: Path) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        found.extend(os.path.join(dirpath, f) for f in sorted(filenames) if f.lower().endswith(IMAGE_EXTENSIONS))
    if not found:
        sys.exit(f"bench_scale: error: {folder}: no JPEG files to link to")
    return found


def lay_out(images: Path, work: Path, train_files: int, val_per_class: int) -> tuple[Path, Path, float]:
    """WORK/imagenet/{train,val}/<wnid>/..., hard links cycling through ``images``; made once."""
    root = work / "imagenet"
    done = root / "COMPLETE"
    train, val = root / "train", root / "val"
    shape = f"{train_files} train, {val_per_class * 1000} val\n"
    if done.exists() and done.read_text() == shape:
        return train, val, 0.0
    if root.exists():
        shutil.rmtree(root)
    started = time.perf_counter()
    sources = source_images(images)
    classes = wnids()
    per_class, extra = divmod(train_files, len(classes))
    k = 0
    for split, counts in (("train", [per_class + (i < extra) for i in range(len(classes))]),
                          ("val", [val_per_class] * len(classes))):
        for wnid, count in zip(classes, counts):
            folder = root / split / wnid
            folder.mkdir(parents=True)
            base = os.fspath(folder)
            for i in range(count):
                os.link(sources[k % len(sources)], f"{base}/{wnid}_{i}.JPEG")
                k += 1
    done.write_text(shape)
    return train, val, time.perf_counter() - started


DROP_CACHES = True


def drop_caches() -> bool:
    if not DROP_CACHES:
        return False
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as fh:
            fh.write("3\n")
        return True
    except OSError:
        return False


def remove_indexes(root: Path) -> None:
    from alexnet_train.data.treeindex import index_paths

    for path in index_paths(str(root)):
        path.unlink(missing_ok=True)


def smaps(pid: int) -> dict[str, int]:
    """kB fields of /proc/PID/smaps_rollup (Private = Private_Clean + Private_Dirty)."""
    fields = {}
    with open(f"/proc/{pid}/smaps_rollup") as fh:
        for text in fh:
            name, _, rest = text.partition(":")
            parts = rest.split()
            if len(parts) == 2 and parts[1] == "kB":
                fields[name] = int(parts[0])
    fields["Private"] = fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0)
    return fields


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            found.extend(int(c) for c in (task / "children").read_text().split())
        except OSError:
            pass
    return found


def mb(kb: int) -> str:
    return f"{kb / 1024:.0f} MB"


def train_argv(train: Path, val: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "alexnet_train", "train", "--config", str(CONFIG), "--out", str(out), "--set",
            "model.num_classes=1000", f"data.train_dir={train}", f"data.val_dir={val}", "train.epochs=1",
            "train.device=cpu", "train.keep_last=0", *extra]


STEP = re.compile(r"train (\d+)/(\d+)")


def until_step(proc: subprocess.Popen, step: int, seen: list[str], timeout: float) -> float | None:
    """Read ``proc``'s output until its progress line at ``step``; seconds since the call, or None."""
    started = time.perf_counter()
    deadline = started + timeout
    for text in proc.stdout:
        seen.append(text.rstrip())
        m = STEP.search(text)
        if m and int(m.group(1)) >= step:
            return time.perf_counter() - started
        if time.perf_counter() > deadline:
            return None
    return None


def stop(proc: subprocess.Popen, timeout: float = 120) -> int:
    """SIGTERM to the run's whole process group (as torchrun's shutdown or scancel sends it)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
    return proc.returncode


def start(argv: list[str], env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **(env or {})}, start_new_session=True)


def data_lines(seen: list[str]) -> str:
    return "; ".join(s.split("data: ", 1)[1].split(": ", 1)[1] for s in seen if s.startswith("data: "))


def part_scan(train: Path, results: dict) -> None:
    from torchvision.datasets import ImageFolder

    from alexnet_train.data.datasets import scan_image_folder
    from alexnet_train.data.treeindex import list_tree, walk_tree

    for state in ("cold", "warm"):
        if state == "cold" and not drop_caches():
            line("scan cold", "skipped: --no-drop-caches, or /proc/sys/vm/drop_caches is not writable here")
            continue
        t = time.perf_counter()
        theirs = ImageFolder(str(train))
        results[f"scan_{state}_torchvision"] = time.perf_counter() - t
        n = len(theirs.samples)
        del theirs
        gc.collect()
        if state == "cold":
            drop_caches()
        t = time.perf_counter()
        walked = walk_tree(str(train))
        results[f"scan_{state}_walk"] = time.perf_counter() - t
        line(f"scan {state}", f"torchvision ImageFolder {results[f'scan_{state}_torchvision']:.2f} s, "
                              f"alexnet-train walk {results[f'scan_{state}_walk']:.2f} s ({n:,} / {len(walked.files):,} files)")
        del walked
    remove_indexes(train)
    list_tree(str(train))  # writes the index (the tree is older than the racy window by now)
    if drop_caches():
        t = time.perf_counter()
        listing = list_tree(str(train))
        results["index_cold"] = time.perf_counter() - t
        assert "from the index" in listing.how, listing.how
    t = time.perf_counter()
    listing = list_tree(str(train))
    results["index_warm"] = time.perf_counter() - t
    line("index read", f"cold {results.get('index_cold', float('nan')):.2f} s, warm {results['index_warm']:.2f} s "
                       f"({len(listing.files):,} files, {listing.how.split('index ')[-1].split(' (')[0]})")
    del listing
    gc.collect()
    tracemalloc.start()
    theirs = ImageFolder(str(train))
    held_theirs = tracemalloc.get_traced_memory()[0]
    del theirs
    gc.collect()
    tracemalloc.stop()
    tracemalloc.start()
    _, ours = scan_image_folder(str(train))
    held_ours = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    results["held_torchvision"], results["held_ours"] = held_theirs, held_ours
    line("sample list held in the main process", f"torchvision ImageFolder {held_theirs / 2**20:.0f} MB, "
                                                  f"alexnet-train {held_ours / 2**20:.0f} MB (SampleList "
                                                  f"{ours.nbytes / 2**20:.0f} MB)")


def part_launch(train: Path, val: Path, work: Path, results: dict) -> None:
    out = work / "runs" / "launch"
    shutil.rmtree(out, ignore_errors=True)
    remove_indexes(train)
    remove_indexes(val)
    cold = drop_caches()
    for name, what in (("fresh", f"fresh run{', cold cache' if cold else ''}, no index"),
                       ("resumed", "resumed run, index read")):
        seen: list[str] = []
        proc = start(train_argv(train, val, out, "train.log_interval=1"))
        took = until_step(proc, 1, seen, timeout=600)
        code = stop(proc)
        results[f"launch_{name}"] = took
        line(f"launch to first step, {what}",
             f"{took:.1f} s (exit {code} after SIGTERM to its group; {data_lines(seen)})" if took
             else f"no step: {seen[-3:]}")
    # Two ranks, no index: rank 0 walks and writes it, rank 1 reads it once rank 0 has.
    remove_indexes(train)
    remove_indexes(val)
    out2 = work / "runs" / "launch-ddp"
    shutil.rmtree(out2, ignore_errors=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = train_argv(train, val, out2, "train.log_interval=1", "dist.mode=ddp", "dist.backend=gloo")
    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
            "--master-port", str(port), "-m", "alexnet_train", *argv[4:]]
    seen = []
    proc = start(argv, {"OMP_NUM_THREADS": "1"})
    took = until_step(proc, 1, seen, timeout=600)
    code = stop(proc)
    results["launch_ddp"] = took
    line("launch to first step, 2 gloo ranks (torchrun), no index",
         f"{took:.1f} s (exit {code} after SIGTERM to its group; {data_lines(seen)})" if took
             else f"no step: {seen[-3:]}")


def part_memory(train: Path, val: Path, work: Path, steps: int, results: dict) -> None:
    out = work / "runs" / "memory"
    shutil.rmtree(out, ignore_errors=True)
    proc = start(train_argv(train, val, out, "train.log_interval=100"))
    seen: list[str] = []
    try:
        for at in (100, steps):
            if until_step(proc, at, seen, timeout=3600) is None:
                line("worker memory, training", f"no step {at}: {seen[-3:]}")
                return
            workers = children(proc.pid)
            mem = {pid: smaps(pid) for pid in workers}
            main = smaps(proc.pid)
            results[f"train_workers_{at}"] = [m["Private"] for m in mem.values()]
            results[f"train_main_{at}"] = main["Private"]
            line(f"worker memory, training, step {at}",
                 ", ".join(f"private {mb(m['Private'])} PSS {mb(m['Pss'])}" for m in mem.values())
                 + f"; main process private {mb(main['Private'])} PSS {mb(main['Pss'])}")
    finally:
        stop(proc)
    results["checkpoint"] = out / "last.pth"


def _loader_memory(dataset, batch: int, workers: int, steps: int, sampler=None) -> dict[int, list[int]]:
    import torch
    from torch.utils.data import DataLoader

    loader = DataLoader(dataset, batch_size=batch, shuffle=sampler is None, sampler=sampler, num_workers=workers,
                        persistent_workers=True, prefetch_factor=4,
                        generator=torch.Generator().manual_seed(0), collate_fn=lambda items: len(items))
    seen = {}
    step = 0
    while step < steps:  # epochs, until ``steps`` batches
        if sampler is not None:
            sampler.set_epoch(step)
        for _ in loader:
            step += 1
            if step in (100, steps):
                seen[step] = [smaps(pid)["Private"] for pid in children(os.getpid())]
            if step >= steps:
                break
    del loader
    gc.collect()
    return seen


def part_loader_memory(train: Path, steps: int, results: dict) -> None:
    """A plain DataLoader loop, the same for both: our dataset against ImageFolder's list of tuples."""
    from torchvision.datasets import ImageFolder
    from torchvision.transforms import PILToTensor

    from alexnet_train.configload import load_config
    from alexnet_train.data.datasets import ImageDataset, scan_image_folder
    from alexnet_train.data.loaders import EpochSampler, resolve_workers
    from alexnet_train.data.transforms import TrainPreset

    cfg = load_config(CONFIG, ["model.num_classes=1000"])
    batch, workers = cfg.data.batch_size, resolve_workers(cfg.data.workers)[0]
    theirs = ImageFolder(str(train), transform=PILToTensor())
    seen_theirs = _loader_memory(theirs, batch, workers, steps)
    del theirs
    gc.collect()
    _, samples = scan_image_folder(str(train))
    ours = ImageDataset(samples, TrainPreset(cfg.data))
    sampler = EpochSampler(len(samples), 0, True, 0, 1, batch)
    seen_ours = _loader_memory(ours, batch, workers, steps, sampler)
    for step in (100, steps):
        results[f"loader_theirs_{step}"] = seen_theirs.get(step, [])
        results[f"loader_ours_{step}"] = seen_ours.get(step, [])
        line(f"worker memory, DataLoader loop, step {step}",
             "torchvision ImageFolder private " + ", ".join(mb(k) for k in seen_theirs.get(step, []))
             + "; alexnet-train private " + ", ".join(mb(k) for k in seen_ours.get(step, [])))


def part_epoch(train: Path, results: dict) -> None:
    import torch
    from torch.utils.data import DistributedSampler

    from alexnet_train.configload import load_config
    from alexnet_train.data.datasets import ImageDataset, scan_image_folder
    from alexnet_train.data.loaders import EpochSampler, close_loader, make_loader
    from alexnet_train.data.batching import collate_hwc
    from alexnet_train.data.transforms import TrainPreset

    _, samples = scan_image_folder(str(train))
    n = len(samples)
    t = time.perf_counter()
    sampler = EpochSampler(n, 0, True, 0, 8, 16)
    sampler.set_epoch(3)
    order = sampler.order()
    steps = len(sampler)
    ours = time.perf_counter() - t
    t = time.perf_counter()
    theirs_sampler = DistributedSampler(range(n), num_replicas=8, rank=0, shuffle=True, seed=0, drop_last=True)
    theirs_sampler.set_epoch(3)
    theirs_order = list(iter(theirs_sampler))
    theirs = time.perf_counter() - t
    results["order_ours"], results["order_theirs"] = ours, theirs
    line("epoch order, 8 ranks", f"EpochSampler {ours * 1000:.0f} ms ({len(order):,} images of rank 0 in "
                                 f"{steps // 16:,} batches of 16), "
                                 f"DistributedSampler {theirs * 1000:.0f} ms ({len(theirs_order):,})")
    cfg = load_config(CONFIG, ["model.num_classes=1000"])
    sampler = EpochSampler(n, 0, True, 0, 1, cfg.data.batch_size)
    loader = make_loader(ImageDataset(samples, TrainPreset(cfg.data)), sampler, cfg.data.batch_size,
                         cfg.data.workers, False, collate_hwc)
    starts = []
    for epoch in (0, 1):
        t = time.perf_counter()
        sampler.set_epoch(epoch)
        next(iter(loader))
        starts.append(time.perf_counter() - t)
    close_loader(loader)
    results["loader_start"] = starts
    line("loader start to first batch", f"first epoch {starts[0]:.2f} s (workers start), "
                                        f"next epoch {starts[1]:.2f} s (persistent workers)")
    del torch


def part_stats(train: Path, results: dict) -> None:
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "alexnet_train", "stats", str(train), "--samples", "10000",
                           "--resize-size", "72", "--workers", "2"],
                          cwd=REPO, capture_output=True, text=True)
    took = time.perf_counter() - t
    results["stats"] = took
    line("alexnet-stats, 10,000 samples (shorter side 72, 2 workers)", f"{took:.1f} s wall, exit {proc.returncode}")


def part_eval(val: Path, images: int, results: dict) -> None:
    ckpt = results.get("checkpoint")
    if ckpt is None or not Path(ckpt).exists():
        line("alexnet-eval", "skipped: no checkpoint (the memory part makes it)")
        return
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "alexnet_train", "eval", str(ckpt), "--data", str(val),
                           "--batch-size", "256", "--workers", "2", "--device", "cpu"],
                          cwd=REPO, capture_output=True, text=True)
    took = time.perf_counter() - t
    results["eval"] = took
    line(f"alexnet-eval centre crop, {images:,} val images",
         f"{took:.1f} s wall, {images / took:.0f} images/s, exit {proc.returncode}"
         + ("" if proc.returncode == 0 else f": {proc.stderr.strip().splitlines()[-1:]}"))


def summary(results: dict, steps: int) -> None:
    ratios = []
    if results.get("index_warm") and results.get("scan_warm_torchvision"):
        ratios.append(f"scan warm: index {results['scan_warm_torchvision'] / results['index_warm']:.1f}x faster "
                      "than ImageFolder")
    if results.get("index_cold") and results.get("scan_cold_torchvision"):
        ratios.append(f"cold: {results['scan_cold_torchvision'] / results['index_cold']:.1f}x")
    if results.get("held_ours"):
        ratios.append(f"list held: {results['held_torchvision'] / results['held_ours']:.1f}x less")
    theirs, ours = results.get(f"loader_theirs_{steps}"), results.get(f"loader_ours_{steps}")
    if theirs and ours:
        grow_t = max(theirs) - max(results.get("loader_theirs_100") or [0])
        grow_o = max(ours) - max(results.get("loader_ours_100") or [0])
        ratios.append(f"worker growth 100->{steps}: ImageFolder +{grow_t / 1024:.0f} MB, ours +{grow_o / 1024:.0f} MB")
    train_end, train_start = results.get(f"train_workers_{steps}"), results.get("train_workers_100")
    if train_end and train_start:
        ratios.append(f"training workers +{(max(train_end) - max(train_start)) / 1024:.0f} MB over {steps - 100} steps")
    if results.get("order_ours"):
        ratios.append(f"epoch order {results['order_theirs'] / results['order_ours']:.1f}x DistributedSampler's speed")
    print("summary: " + "; ".join(ratios), flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=Path, required=True, help="a folder of JPEGs to hard-link to (searched recursively)")
    p.add_argument("--work", type=Path, required=True, help="where the tree and the runs go (same filesystem as --images)")
    p.add_argument("--steps", type=int, default=5000, help="training steps for the memory figures (default 5000)")
    p.add_argument("--train-files", type=int, default=TRAIN_FILES, help=f"default {TRAIN_FILES:,} (ImageNet's)")
    p.add_argument("--val-per-class", type=int, default=VAL_PER_CLASS, help=f"default {VAL_PER_CLASS}")
    p.add_argument("--skip", action="append", default=[], choices=PARTS, help="leave a part out (repeatable)")
    p.add_argument("--no-drop-caches", action="store_true",
                   help="never drop the page cache (it is the whole machine's): no cold figures")
    args = p.parse_args(argv)
    global DROP_CACHES
    DROP_CACHES = not args.no_drop_caches
    args.work.mkdir(parents=True, exist_ok=True)
    train, val, took = lay_out(args.images, args.work, args.train_files, args.val_per_class)
    line("tree", f"{train.parent}: 1,000 classes, {args.train_files:,} train + {args.val_per_class * 1000:,} val "
                 "hard links "
                 + (f"made in {took:.1f} s" if took else "(made earlier)"))
    time.sleep(2.5)  # past the index's racy window for the folders just made
    results: dict = {}
    skip = set(args.skip)
    if "scan" not in skip:
        part_scan(train, results)
    if "launch" not in skip:
        part_launch(train, val, args.work, results)
    if "memory" not in skip:
        part_memory(train, val, args.work, args.steps, results)
    if "loader_memory" not in skip:
        part_loader_memory(train, args.steps, results)
    if "epoch" not in skip:
        part_epoch(train, results)
    if "stats" not in skip:
        part_stats(train, results)
    if "eval" not in skip:
        part_eval(val, args.val_per_class * 1000, results)
    summary(results, args.steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
