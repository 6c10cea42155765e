#!/usr/bin/env python3
"""Which weight initialisation learns: the paper's against the alternatives, on real images.

Run from the repository root (the config's data paths are relative to it)::

    python scripts/init_study.py [--config configs/tiny-imagenet.yaml] [--epochs 8]
                                 [--variants paper:paper caffe:paper torch:paper kaiming:torchvision ...]
                                 [--set KEY=VALUE ...] [--parallel 1] [--out runs/init-study]

Each variant is ``INIT:NORMALIZE`` (``model.init`` and ``data.normalize``):
the init schemes are tied to an input scale (the paper's N(0, 0.01) was
tuned for mean-subtracted 0-255 pixels, He's for unit-variance inputs), so
the study pairs them explicitly.  Every variant is a real ``alexnet-train``
run of the same config, seed and epochs (``python -m alexnet_train``,
``--out OUT/<init>-<normalize>``); ``--parallel N`` runs N at once (on one
GPU they share it).  The script reads each run's ``metrics.jsonl`` and
prints val top-1 per epoch side by side, then per variant: the first epoch
at twice chance, the best top-1 and the wall time.  A run that stops
(a non-finite loss, say) is reported with its exit code.  ``--json`` writes
the curves.

``--probe N`` trains nothing: it builds each variant's model (seeded, as
training would) and passes N of the config's val images (centre crop,
normalised as the variant says) through it in eval mode, then prints what
decides whether SGD can start: how much FC7's activations and the logits
vary between images, relative to their size.  A constant bias that swamps
the image-dependent part shows up as a small ``fc7 image/level`` ratio and a
tiny logit spread; such runs sit at chance.  It is cheap at any input size
(a forward pass), so it checks the full 224-px model on a CPU.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from alexnet_train.config import ConfigError
from alexnet_train.configload import load_config
from alexnet_train.data.datasets import ImageDataset, scan_image_folder
from alexnet_train.data.batching import collate_hwc
from alexnet_train.data.transforms import BatchPreprocess, CenterPreset
from alexnet_train.model import build_model
from alexnet_train.tracking import read_metrics

DEFAULT_VARIANTS = ["paper:paper", "caffe:paper", "torch:paper", "kaiming:torchvision", "paper:torchvision"]


def start(variant: str, args, out: Path) -> tuple[subprocess.Popen, float]:
    init, norm = variant.split(":")
    run_dir = out / f"{init}-{norm}"
    cmd = [sys.executable, "-m", "alexnet_train", "--config", args.config, "--out", str(run_dir),
           "--set", f"model.init={init}", f"data.normalize={norm}", f"train.epochs={args.epochs}", *args.sets]
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    log = open(out / f"{init}-{norm}.log", "w")
    print("$", " ".join(cmd), flush=True)
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), time.time()


@torch.no_grad()
def probe(cfg, n: int) -> dict:
    """At-init statistics of one variant's model on n val images (see the module docstring)."""
    _, samples = scan_image_folder(cfg.data.val_dir)
    step = max(1, len(samples) // n)
    picked = samples[::step][:n]  # spread over the classes
    images, _, bad = collate_hwc([ImageDataset(picked, CenterPreset(cfg.data))[(i, 0)] for i in range(len(picked))])
    if bad:
        raise SystemExit(f"init_study: unreadable images: {bad[:3]}")
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model).eval()
    x = BatchPreprocess(cfg.data)(images)
    feats = model.avgpool(model.features(x)).flatten(1)
    fc7 = model.classifier[:-1](feats)  # dropout is the identity in eval mode
    logits = model.classifier[-1](fc7)
    level = fc7.mean(0).abs().mean().item()  # the part every image shares
    spread = fc7.std(0).mean().item()  # the part that depends on the image
    return {"images": len(picked), "fc7_image_over_level": spread / max(level, 1e-12),
            "logit_spread": logits.std(0).mean().item(), "logit_scale": logits.abs().mean().item()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/tiny-imagenet.yaml")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, metavar="INIT:NORMALIZE")
    p.add_argument("--set", dest="sets", nargs="+", action="extend", default=[], metavar="KEY=VALUE")
    p.add_argument("--parallel", type=int, default=1, help="runs at once (default 1)")
    p.add_argument("--out", default="runs/init-study")
    p.add_argument("--json", help="write {variant: {rc, seconds, val_top1: [...], val_top5: [...]}} here")
    p.add_argument("--probe", type=int, metavar="N", help="no training: at-init statistics on N val images")
    args = p.parse_args(argv)
    for v in args.variants:
        if v.count(":") != 1:
            p.error(f"--variants: {v!r} is not INIT:NORMALIZE (e.g. kaiming:torchvision)")
    # A bad config, override or variant fails here (exit 2, naming the key), not in every run.
    configs = {}
    for v in args.variants:
        init, norm = v.split(":")
        try:
            configs[v] = cfg = load_config(args.config, [f"model.init={init}", f"data.normalize={norm}",
                                                         f"train.epochs={args.epochs}", *args.sets])
        except (ConfigError, OSError) as exc:
            print(f"init_study: {exc}", file=sys.stderr)
            return 2
    if args.probe:
        cfg = configs[args.variants[0]]
        print(f"at init, {cfg.model.arch} model, {cfg.data.crop_size}-px centre crops of {cfg.data.val_dir}")
        print(f"{'variant':22s} {'fc7 image/level':>16s} {'logit spread':>13s} {'logit scale':>12s}")
        stats = {}
        for v, vcfg in configs.items():
            stats[v] = r = probe(vcfg, args.probe)
            print(f"{v:22s} {r['fc7_image_over_level']:16.3g} {r['logit_spread']:13.3g} {r['logit_scale']:12.3g}",
                  flush=True)
        print(f"({stats[args.variants[0]]['images']} images; spread: std over images, averaged over units/classes)")
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(stats, indent=1))
        return 0
    chance = 100.0 / cfg.model.num_classes
    out = Path(args.out)

    results: dict[str, dict] = {}
    pending = list(args.variants)
    running: dict[str, tuple[subprocess.Popen, float]] = {}
    while pending or running:
        while pending and len(running) < max(1, args.parallel):
            v = pending.pop(0)
            running[v] = start(v, args, out)
        time.sleep(0.5)
        for v, (proc, t0) in list(running.items()):
            if proc.poll() is not None:
                del running[v]
                init, norm = v.split(":")
                run_dir = out / f"{init}-{norm}"
                rows = read_metrics(run_dir) if (run_dir / "metrics.jsonl").exists() else []
                results[v] = {"rc": proc.returncode, "seconds": round(time.time() - t0, 1),
                              "val_top1": [r["val_top1"] for r in rows], "val_top5": [r["val_top5"] for r in rows]}
                print(f"{v}: exit {proc.returncode} after {results[v]['seconds']} s, {len(rows)} epochs", flush=True)

    print(f"\nval top-1 (%) per epoch; chance {chance:.1f}%; config {args.config}"
          f"{' with ' + ' '.join(args.sets) if args.sets else ''}")
    names = list(args.variants)
    print("epoch " + " ".join(f"{n:>20s}" for n in names))
    for e in range(args.epochs):
        cells = []
        for n in names:
            top1 = results[n]["val_top1"]
            cells.append(f"{top1[e]:20.1f}" if e < len(top1) else f"{'-':>20s}")
        print(f"{e + 1:5d} " + " ".join(cells))
    print()
    for n in names:
        r = results[n]
        top1 = r["val_top1"]
        first = next((i + 1 for i, t in enumerate(top1) if t >= 2 * chance), None)
        best = max(top1) if top1 else float("nan")
        status = "" if r["rc"] == 0 else f"  (alexnet-train exit {r['rc']}: see {out / (n.replace(':', '-') + '.log')})"
        print(f"{n:20s} first epoch >= 2x chance: {first if first else 'never':>5}   best top-1 {best:5.1f}%   "
              f"{r['seconds']:7.1f} s{status}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0 if all(r["rc"] == 0 for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
