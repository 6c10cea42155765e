"""Learning curve on Tiny ImageNet: this project's trainer against a plain baseline.

Run from the repository root (the configs' data paths are relative to it; make
the data first with ``alexnet-data``, as each config's header says)::

    python scripts/learning_curve.py                          # tiny-imagenet-10, ~7 min on 2 CPU cores
    python scripts/learning_curve.py --config configs/tiny-imagenet-200.yaml --out runs/tiny-imagenet-200 \
        --plot docs/learning_curve_200.png                    # all 200 classes, ~3 h on 2 CPU cores

1. Trains the config with ``alexnet-train`` (a subprocess, ``--out OUT``) and reads
   per-epoch val top-1/top-5 from its ``metrics.jsonl``; ``--skip-ours`` reuses a
   finished OUT instead (a run made by hand, interrupted and resumed, say).
2. Evaluates ``best.pth`` with ``alexnet-eval --ten-crop --json OUT/eval.json`` (centre and ten-crop).
3. Trains the same model (``alexnet_train.model.build_model(cfg.model)``, same epochs,
   batch, lr schedule, SGD settings and seed) the way pytorch/examples'
   ``imagenet/main.py`` does: torchvision ``ImageFolder`` with
   RandomResizedCrop(crop) + RandomHorizontalFlip + ToTensor + Normalize for training,
   Resize(resize) + CenterCrop(crop) for validation, ``nn.CrossEntropyLoss``, SGD,
   a centre-crop evaluation after every epoch; then a ten-crop evaluation
   (torchvision ``TenCrop`` on the Resize(resize) image, softmax averaged) of its best epoch.
4. Prints both runs side by side per epoch and the final centre / ten-crop numbers, writes
   ``OUT/baseline.json`` and, if matplotlib is importable, the plot (``--plot``).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision import datasets, transforms

from alexnet_train.configload import load_config
from alexnet_train.model import build_model
from alexnet_train.tracking import read_metrics

# pytorch/examples imagenet/main.py's normalisation (0-1 scale).
TV_MEAN = [0.485, 0.456, 0.406]
TV_STD = [0.229, 0.224, 0.225]


def lr_at(cfg, epoch: int) -> float:
    """The lr for 0-based ``epoch`` under the config's step/cosine schedule (as alexnet-train)."""
    s, base, epochs = cfg.schedule, cfg.optim.lr, cfg.train.epochs
    if s.kind == "plateau":
        raise SystemExit("learning_curve.py: the baseline mirrors step/cosine schedules only")
    if s.warmup_epochs and epoch < s.warmup_epochs:
        return base * (epoch + 1) / s.warmup_epochs
    if s.kind == "step":
        return base * s.factor ** (epoch // s.step_size)
    span = max(1, epochs - s.warmup_epochs)
    t = min(1.0, (epoch - s.warmup_epochs) / span)
    return s.min_lr + (base - s.min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))


def run_ours(config: str, out: Path, sets: list[str], train: bool = True) -> tuple[list[dict], dict, float]:
    t0 = time.time()
    if train:
        cmd = ["alexnet-train", "--config", config, "--out", str(out)]
        if sets:
            cmd += ["--set", *sets]
        print("$", " ".join(cmd), flush=True)
        rc = subprocess.call(cmd)
        if rc != 0:
            raise SystemExit(f"alexnet-train exited with {rc}")
    train_s = time.time() - t0 if train else float("nan")
    metrics = read_metrics(out)
    eval_json = out / "eval.json"
    if train or not eval_json.is_file():
        cmd = ["alexnet-eval", str(out / "best.pth"), "--ten-crop", "--json", str(eval_json)]
        print("$", " ".join(cmd), flush=True)
        rc = subprocess.call(cmd)
        if rc != 0:
            raise SystemExit(f"alexnet-eval exited with {rc}")
    return metrics, json.loads(eval_json.read_text()), train_s


def accuracy(output: torch.Tensor, target: torch.Tensor, topk=(1, 5)) -> list[float]:
    """Number of correct predictions in the top-k (as main.py's accuracy(), unscaled)."""
    maxk = min(max(topk), output.size(1))
    _, pred = output.topk(maxk, 1, True, True)
    correct = pred.t().eq(target.view(1, -1).expand_as(pred.t()))
    return [correct[: min(k, maxk)].reshape(-1).float().sum().item() for k in topk]


def validate(model: nn.Module, loader, criterion, ten_crop: bool = False) -> dict:
    model.eval()
    n, loss_sum, c1, c5 = 0, 0.0, 0.0, 0.0
    with torch.no_grad():
        for images, target in loader:
            if ten_crop:  # (B, 10, C, H, W): average the softmax over the ten crops
                b, ncrops = images.shape[:2]
                probs = F.softmax(model(images.flatten(0, 1)), dim=1).view(b, ncrops, -1).mean(1)
                loss = F.nll_loss(probs.clamp_min(1e-12).log(), target, reduction="sum")
                output = probs
            else:
                output = model(images)
                loss = criterion(output, target) * images.size(0)
            a1, a5 = accuracy(output, target)
            n += images.size(0)
            loss_sum += loss.item()
            c1 += a1
            c5 += a5
    return {"top1": 100.0 * c1 / n, "top5": 100.0 * c5 / n, "loss": loss_sum / n, "images": n}


def run_baseline(cfg) -> tuple[list[dict], dict, float]:
    """pytorch/examples imagenet/main.py's training loop, with this config's model and hyper-parameters."""
    t0 = time.time()
    torch.manual_seed(cfg.train.seed)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    d = cfg.data
    normalize = transforms.Normalize(mean=TV_MEAN, std=TV_STD)
    train_ds = datasets.ImageFolder(d.train_dir, transforms.Compose([
        transforms.RandomResizedCrop(d.crop_size),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        normalize,
    ]))
    val_tf = transforms.Compose([
        transforms.Resize(d.resize_size),
        transforms.CenterCrop(d.crop_size),
        transforms.ToTensor(),
        normalize,
    ])
    val_ds = datasets.ImageFolder(d.val_dir, val_tf)
    ten_ds = datasets.ImageFolder(d.val_dir, transforms.Compose([
        transforms.Resize(d.resize_size),
        transforms.TenCrop(d.crop_size),
        transforms.Lambda(lambda crops: torch.stack([normalize(transforms.functional.to_tensor(c)) for c in crops])),
    ]))
    if train_ds.classes != val_ds.classes:
        raise SystemExit("baseline: train and val class folders differ")
    from alexnet_train.data.loaders import resolve_workers

    workers = resolve_workers(d.workers)[0]  # data.workers: auto -> this machine's number
    train_loader = torch.utils.data.DataLoader(train_ds, batch_size=d.batch_size, shuffle=True,
                                               num_workers=workers, persistent_workers=workers > 0)
    val_loader = torch.utils.data.DataLoader(val_ds, batch_size=d.batch_size, shuffle=False,
                                             num_workers=workers, persistent_workers=workers > 0)

    model = build_model(cfg.model)
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), cfg.optim.lr, momentum=cfg.optim.momentum,
                                weight_decay=cfg.optim.weight_decay)
    history, best_top1, best_state = [], -1.0, None
    for epoch in range(cfg.train.epochs):
        lr = lr_at(cfg, epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        model.train()
        te = time.time()
        loss_sum, n = 0.0, 0
        for images, target in train_loader:
            output = model(images)
            loss = criterion(output, target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            loss_sum += loss.item() * images.size(0)
            n += images.size(0)
        res = validate(model, val_loader, criterion)
        row = {"epoch": epoch + 1, "lr": lr, "train_loss": loss_sum / n, "val_loss": res["loss"],
               "val_top1": res["top1"], "val_top5": res["top5"], "seconds": time.time() - te}
        history.append(row)
        print(f"baseline epoch {epoch + 1}/{cfg.train.epochs} lr {lr:.4g} train_loss {row['train_loss']:.3f} "
              f"val top1 {res['top1']:.2f} top5 {res['top5']:.2f} ({row['seconds']:.0f}s)", flush=True)
        if res["top1"] > best_top1:  # main.py keeps model_best by top-1
            best_top1, best_state = res["top1"], copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    ten_loader = torch.utils.data.DataLoader(ten_ds, batch_size=max(1, d.batch_size // 10), shuffle=False,
                                             num_workers=workers)
    final = {"center": validate(model, val_loader, criterion),
             "ten_crop": validate(model, ten_loader, criterion, ten_crop=True)}
    return history, final, time.time() - t0


def plot(ours: list[dict], base: list[dict], path: Path, title: str) -> str:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return ("matplotlib is not installed: no plot written "
                "(pip install matplotlib; it would be an optional [plot] extra)")
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for rows, name, style in ((ours, "alexnet-train", "-o"), (base, "pytorch/examples-style baseline", "-s")):
        ax.plot([r["epoch"] for r in rows], [r["val_top1"] for r in rows], style, label=f"{name} top-1")
        ax.plot([r["epoch"] for r in rows], [r["val_top5"] for r in rows], style, alpha=0.4,
                label=f"{name} top-5")
    ax.set_xlabel("epoch")
    ax.set_ylabel("val accuracy (%, centre crop)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return f"wrote {path}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/tiny-imagenet.yaml")
    p.add_argument("--out", default="runs/tiny-imagenet")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="overrides for both runs (as alexnet-train --set)")
    p.add_argument("--plot", default="docs/learning_curve.png")
    p.add_argument("--skip-ours", action="store_true",
                   help="reuse OUT's finished run (metrics.jsonl, best.pth; eval.json is made if missing)")
    args = p.parse_args(argv)

    t_start = time.time()
    cfg = load_config(args.config, args.set)
    out = Path(args.out)
    ours, ours_final, ours_s = run_ours(args.config, out, args.set, train=not args.skip_ours)
    print("baseline: pytorch/examples imagenet/main.py-style loop, same model/epochs/batch/lr schedule", flush=True)
    base, base_final, base_s = run_baseline(cfg)

    print()
    print(f"{'':6}{'alexnet-train':>22}   {'baseline (main.py)':>22}")
    print(f"{'epoch':6}{'top1':>11}{'top5':>11}   {'top1':>11}{'top5':>11}")
    for i in range(max(len(ours), len(base))):
        o = ours[i] if i < len(ours) else None
        b = base[i] if i < len(base) else None
        cell = lambda r: f"{r['val_top1']:11.2f}{r['val_top5']:11.2f}" if r else f"{'-':>11}{'-':>11}"
        print(f"{i + 1:<6}{cell(o)}   {cell(b)}")
    print("final (best epoch's weights)")
    for key, name in (("center", "centre crop"), ("ten_crop", "ten-crop")):
        o, b = ours_final.get(key), base_final.get(key)
        print(f"{name:12}  ours top1 {o['top1']:6.2f} top5 {o['top5']:6.2f}   "
              f"baseline top1 {b['top1']:6.2f} top5 {b['top5']:6.2f}")
    ours_wall = "reused" if math.isnan(ours_s) else f"{ours_s / 60:.1f} min (train; eval extra)"
    print(f"wall: ours {ours_wall}, baseline {base_s / 60:.1f} min, total {(time.time() - t_start) / 60:.1f} min")
    (out / "baseline.json").write_text(json.dumps({"epochs": base, "final": base_final, "seconds": base_s},
                                                  indent=1))
    name = Path(cfg.data.train_dir).parent.name if cfg.data.train_dir else "?"
    title = f"AlexNet on {name} ({cfg.model.num_classes} classes)"
    print(plot(ours, base, Path(args.plot), title))
    return 0


if __name__ == "__main__":
    sys.exit(main())
