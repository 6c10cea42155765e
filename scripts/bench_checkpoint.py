#!/usr/bin/env python3
"""What one mid-epoch checkpoint costs, against the training time it protects, in one run.

    python scripts/bench_checkpoint.py [--config configs/paper.yaml] [--out runs/bench-ckpt]
                                       [--device cpu|cuda] [--saves 5] [--steps 5] [--minutes 10]

Both sides use the config's model at its batch size, on the device:

- save: ``Trainer.save()`` as a ``train.checkpoint_steps`` / ``checkpoint_minutes``
  checkpoint runs it: the whole training state (weights, SGD momentum, lr
  policy, every RNG) to ``OUT/last.pth`` through a temporary file, fsync and
  rename.  Put ``--out`` on the disk your runs write to: that is what is timed.
- train: one SGD step (forward, backward, update) on random input, timed after
  warm-up; an epoch is ``images / batch size`` of them.  No data loading is
  counted, so the epoch is a lower bound and the cost fractions printed are
  upper bounds.

Prints the checkpoint's size, the seconds of one save, and the share of an
epoch and of ``--minutes`` of training that one save takes (the overhead of
``train.checkpoint_minutes: M``).  No data is read.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from alexnet_train.config import replace
from alexnet_train.configload import load_config
from alexnet_train.data.loaders import Splits
from alexnet_train.tracking import Tracker
from alexnet_train.train import Trainer

ROOT = Path(__file__).resolve().parents[1]
IMAGENET_TRAIN = 1_281_167


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "paper.yaml"))
    p.add_argument("--set", dest="overrides", nargs="+", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", default="runs/bench-checkpoint", help="where the checkpoints are written (timed)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--saves", type=int, default=5, help="timed saves (the median is reported)")
    p.add_argument("--steps", type=int, default=5, help="timed training steps (after 2 warm-up steps)")
    p.add_argument("--images", type=int, default=IMAGENET_TRAIN, help="images per epoch (ILSVRC-2012's)")
    p.add_argument("--minutes", type=float, default=10.0, help="the train.checkpoint_minutes to price")
    args = p.parse_args(argv)

    cfg = load_config(args.config, args.overrides)
    cfg = replace(cfg, "train", device=args.device, out_dir=args.out)
    cfg = replace(cfg, "model", num_classes=cfg.model.num_classes or 1000)
    cfg = replace(cfg, "data", workers=0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    classes = [f"c{i}" for i in range(cfg.model.num_classes)]
    # The loaders are built but never iterated: no image is read.
    splits = Splits(classes, [("unused.jpg", 0)], [("unused.jpg", 0)])
    trainer = Trainer(cfg, splits, out, Tracker(None, enabled=False))
    device, batch = trainer.device, cfg.data.batch_size
    size = cfg.data.crop_size
    inputs = torch.randn(batch, 3, size, size, device=device)
    targets = torch.randint(0, cfg.model.num_classes, (batch,), device=device)

    def step() -> None:
        loss = F.cross_entropy(trainer.net(inputs), targets)
        trainer.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        trainer.optimizer.step()

    trainer.net.train()
    for _ in range(2):  # warm-up; also fills the momentum buffers a real checkpoint holds
        step()
    sync(device)
    started = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync(device)
    step_s = (time.perf_counter() - started) / args.steps

    saves = []
    for _ in range(args.saves):
        started = time.perf_counter()
        path = trainer.save()
        saves.append(time.perf_counter() - started)
    save_s = statistics.median(saves)
    mib = path.stat().st_size / 2**20
    epoch_s = -(-args.images // batch) * step_s
    print(f"model {cfg.model.arch}, batch {batch}, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    print(f"checkpoint: {mib:.0f} MiB to {path}; one save {save_s:.2f} s (median of {args.saves}: "
          + ", ".join(f"{s:.2f}" for s in saves) + ")")
    print(f"train step: {step_s:.3f} s -> epoch of {args.images:,} images: {epoch_s:.0f} s ({epoch_s / 60:.1f} min)")
    print(f"one save / one epoch: {save_s / epoch_s:.3%}")
    print(f"overhead at train.checkpoint_minutes={args.minutes:g}: {save_s / (60 * args.minutes):.2%} "
          f"(one save per {args.minutes:g} min of training)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
