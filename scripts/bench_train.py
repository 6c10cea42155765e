#!/usr/bin/env python3
"""Training-step throughput: our trainer against a plain pytorch/examples-style loop, in one run.

    python scripts/bench_train.py --data data/imagenet-sample/train [--config configs/paper.yaml]
                                  [--set KEY=VALUE ...] [--steps 20] [--seconds S] [--workers 2] [--device cpu|cuda]

docs/benchmarks.md's figures were measured on the 1000 full-resolution photos (one per
ILSVRC-2012 class) that ``alexnet-data imagenet-sample data/imagenet-sample`` lays
out; any ImageFolder of original JPEGs works (``alexnet-data imagenette DIR --size
full`` gives 13,000 more).

Both sides train the same model (built from the config), at the same batch
size, on the same ImageFolder, with the same number of loader workers and
torch threads:

- plain: what pytorch/examples' ``imagenet/main.py`` does each step: an
  ``ImageFolder`` with PIL transforms to normalised float tensors (the
  config's crop; RandomResizedCrop + flip there, the same here), ``model(x)``,
  ``CrossEntropyLoss``, ``zero_grad``/``backward``/``step``, and its per-step
  bookkeeping (``loss.item()`` and top-1/top-5 accuracy every step); on
  CUDA, as there, pinned batches copied with ``non_blocking`` and AlexNet's
  ``features`` wrapped in ``DataParallel``, in float32;
- ours: ``Trainer.train_epoch`` as ``alexnet-train`` runs it: uint8 workers,
  device-side normalisation and PCA noise, one host sync per log interval.

Each side runs ``--warmup`` untimed steps, then ``--steps`` timed ones
(wall-clock from the first timed batch request to the last optimizer step);
``--seconds`` ends each side's timed steps after that long (at least one), so a
caller can size the run to a time (``scripts/gpu_check.py``).  Loader workers
live as long as the timed run on both sides: pytorch/examples starts them once
per 1.28M-image epoch, which a small folder re-read every few steps would turn
into a restart every few steps.
The last line is ``speedup: <ours / plain images per second>``.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
import torchvision.transforms as T
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder

from alexnet_train.config import replace
from alexnet_train.configload import load_config
from alexnet_train.data.datasets import scan_image_folder
from alexnet_train.data.loaders import Splits, worker_init
from alexnet_train.distributed import DistInfo
from alexnet_train.evaluate import topk_correct
from alexnet_train.model import build_model
from alexnet_train.tracking import Tracker
from alexnet_train.lifecycle import StopSignals
from alexnet_train.train import Trainer

ROOT = Path(__file__).resolve().parents[1]


def clock(device: torch.device) -> float:
    """perf_counter once the device has finished the work queued so far."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


class _TimeUp(Exception):
    """Raised from our loop's step hook once ``--seconds`` of timed steps have run."""


def plain_loop(cfg, data: str, steps: int, warmup: int, device: torch.device, seconds: float = 0.0) -> float:
    """images/s of a pytorch/examples-style training loop."""
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model)
    cuda = device.type == "cuda"
    if cuda:
        model.features = torch.nn.DataParallel(model.features)
    model.to(device)
    criterion = torch.nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), cfg.optim.lr, momentum=cfg.optim.momentum,
                                weight_decay=cfg.optim.weight_decay)
    tf = T.Compose([T.RandomResizedCrop(cfg.data.crop_size), T.RandomHorizontalFlip(), T.ToTensor(),
                    T.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])])
    loader = DataLoader(ImageFolder(data, tf), batch_size=cfg.data.batch_size, shuffle=True,
                        num_workers=cfg.data.workers, worker_init_fn=worker_init if cfg.data.workers else None,
                        drop_last=True, pin_memory=cuda, persistent_workers=cfg.data.workers > 0)
    model.train()
    seen, start, step = 0, None, 0
    losses, top1, top5 = [], [], []  # main.py's AverageMeters
    while step < warmup + steps:
        for images, target in loader:
            if step == warmup:
                start = clock(device)
            images = images.to(device, non_blocking=True)
            target = target.to(device, non_blocking=True)
            output = model(images)
            loss = criterion(output, target)
            c1, c5 = topk_correct(output, target)
            losses.append(loss.item())
            top1.append(c1.item())
            top5.append(c5.item())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            if step > warmup:
                seen += target.shape[0]
            # loss.item() above has synced already: the clock reads finished work
            if step == warmup + steps or (seconds and step > warmup and time.perf_counter() - start >= seconds):
                steps = step - warmup  # ends the while loop too
                break
    return seen / (clock(device) - start)


def our_loop(cfg, data: str, steps: int, warmup: int, seconds: float = 0.0) -> float:
    """images/s of Trainer.train_epoch over warmup + steps batches (fewer once ``seconds`` have run)."""
    classes, samples = scan_image_folder(data)
    n = (warmup + steps) * cfg.data.batch_size
    samples = (samples * (n // len(samples) + 1))[:n]
    cfg = replace(cfg, "train", epochs=1, log_interval=max(1, steps))
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(cfg, Splits(classes, samples, samples[: cfg.data.batch_size]), Path(out), Tracker(None, enabled=False),
                          DistInfo())
        timings = {}
        original_update = trainer.optimizer.step

        def step_hook(*a, **k):
            result = original_update(*a, **k)
            done = trainer.step_in_epoch + 1
            if done == warmup:
                timings["start"] = clock(trainer.device)
            # Read without a sync: the stop may come a few queued steps late, the end time below is exact.
            time_up = seconds and done > warmup and time.perf_counter() - timings["start"] >= seconds
            if done == warmup + steps or time_up:
                timings["end"] = clock(trainer.device)
                timings["steps"] = done - warmup
                if time_up:
                    raise _TimeUp
            return result

        trainer.optimizer.step = step_hook
        with StopSignals() as stop:
            try:
                trainer.train_epoch(stop)
            except _TimeUp:
                pass
    return timings["steps"] * cfg.data.batch_size / (timings["end"] - timings["start"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="an ImageFolder (e.g. data/imagenet-sample/train, from alexnet-data imagenet-sample)")
    p.add_argument("--config", default=str(ROOT / "configs" / "paper.yaml"))
    p.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--seconds", type=float, default=0.0,
                   help="end each side's timed steps after this many seconds (0: run all --steps)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 1 or args.seconds < 0:
        p.error("--steps and --warmup must be >= 1 (the timed steps start after a warm-up step), --seconds >= 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    classes, _ = scan_image_folder(args.data)
    cfg = load_config(args.config, [f"model.num_classes={len(classes)}", f"data.workers={args.workers}",
                                    f"data.batch_size={args.batch_size}", f"train.device={args.device}", *args.overrides])
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True  # main.py sets it too; the trainer sets it on CUDA
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"model {cfg.model.arch} (groups {cfg.model.effective_groups}), batch {cfg.data.batch_size}, crop {cfg.data.crop_size}, "
          f"{cfg.data.workers} workers, {torch.get_num_threads()} torch threads, {args.steps} timed steps"
          f"{f' (at most {args.seconds:g} s a side)' if args.seconds else ''}, on {name}; "
          f"ours: amp {cfg.train.amp}, channels_last {cfg.train.channels_last}, tf32 {cfg.train.tf32}")
    plain = plain_loop(cfg, args.data, args.steps, args.warmup, device, args.seconds)
    print(f"plain (pytorch/examples style): {plain:8.1f} images/s", flush=True)
    ours = our_loop(cfg, args.data, args.steps, args.warmup, args.seconds)
    print(f"ours (alexnet-train):           {ours:8.1f} images/s", flush=True)
    print(f"speedup: {ours / plain:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
