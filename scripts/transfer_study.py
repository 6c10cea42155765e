"""Transfer learning against training from scratch, on the same few images.

Run from the repository root after making the data and the pretrained weights
(docs/fine-tuning.md)::

    python scripts/transfer_study.py                     # the recipe of configs/tiny-imagenet-finetune.yaml and scratch
    python scripts/transfer_study.py --grid               # + the recipes it was chosen from
    python scripts/transfer_study.py --only scratch finetune --plot docs/transfer.png

Each variant is one ``alexnet-train --config CONFIG --set ... --out OUT/<variant>``
run (a finished one is reused, an interrupted one resumed), then
``alexnet-eval --ten-crop --json`` of its last epoch's checkpoint (``last.pth``, not
the best epoch: no choice is made on the validation images).  The script prints,
per variant, the val top-1 after every epoch and the final centre / ten-crop
numbers, writes ``OUT/summary.json`` and, if matplotlib is importable, the plot of
val top-1 per epoch.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from alexnet_train.tracking import read_metrics

# name -> (what it is, --set overrides on top of the config)
SCRATCH = ["model.weights=null", "model.freeze=none", "optim.head_lr_mult=1", "optim.lr=0.01"]
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "finetune": ("fine-tune, the config's recipe (conv1-5 frozen, fc6-8 trained, lr 0.01)", []),
    "scratch": ("from scratch, same epochs (tiny-imagenet.yaml's lr 0.01)", SCRATCH),
}
GRID: dict[str, tuple[str, list[str]]] = {
    "scratch-4x": ("from scratch, 4x the epochs", SCRATCH + ["train.epochs=120"]),
    "ft-all-lr0.01": ("fine-tune all layers, lr 0.01", ["model.freeze=none", "optim.lr=0.01", "optim.head_lr_mult=1"]),
    "ft-all-lr0.001": ("fine-tune all layers, lr 0.001, fc8 x1",
                       ["model.freeze=none", "optim.lr=0.001", "optim.head_lr_mult=1"]),
    "ft-all-lr0.001-head10": ("fine-tune all layers, lr 0.001, fc8 x10",
                              ["model.freeze=none", "optim.lr=0.001", "optim.head_lr_mult=10"]),
    "ft-fc8-lr0.01": ("all but fc8 frozen (linear probe), lr 0.01",
                      ["model.freeze=all_but_last", "optim.lr=0.01", "optim.head_lr_mult=1"]),
}


def run(cmd: list[str], log: Path) -> float:
    t0 = time.monotonic()
    with open(log, "a") as fh:
        rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        raise SystemExit(f"transfer_study.py: {' '.join(cmd)} exited {rc}; see {log}")
    return time.monotonic() - t0


def one_run(config: str, vout: Path, overrides: list[str], extra: list[str]) -> dict:
    vout.mkdir(parents=True, exist_ok=True)
    log = vout / "study.log"
    reused = (vout / "last.pth").exists()
    cmd = [sys.executable, "-m", "alexnet_train", "train", "--config", config, "--out", str(vout)]
    if overrides or extra:
        cmd += ["--set", *extra, *overrides]  # the variant's own settings win
    train_s = run(cmd, log)
    run([sys.executable, "-m", "alexnet_train", "eval", str(vout / "last.pth"), "--ten-crop",
         "--json", str(vout / "eval.json")], log)
    rows = read_metrics(vout)
    final = json.loads((vout / "eval.json").read_text())
    best = max(rows, key=lambda r: r["val_top1"])
    r = {"epochs": len(rows), "wall_s": None if reused else round(train_s, 1),
         "val_top1": [round(row["val_top1"], 2) for row in rows],
         "center": final["center"], "ten_crop": final["ten_crop"],
         "best_epoch": best["epoch"], "best_top1": best["val_top1"]}
    took = "continued from an earlier run" if reused else f"in {train_s:.0f} s"
    print(f"   {vout}: {r['epochs']} epochs {took}: final centre {r['center']['top1']:.1f}% / "
          f"{r['center']['top5']:.1f}%, ten-crop {r['ten_crop']['top1']:.1f}% / {r['ten_crop']['top5']:.1f}% "
          f"(top-1 / top-5); best epoch {r['best_epoch']} at {r['best_top1']:.1f}%", flush=True)
    return r


def study(config: str, out: Path, names: list[str], extra: list[str], seeds: list[int]) -> dict:
    """Per variant: its runs, one per seed (OUT/<variant> for seed 0, OUT/<variant>-seed<S> otherwise)."""
    table = {**VARIANTS, **GRID}
    results = {}
    for name in names:
        what, overrides = table[name]
        print(f"== {name}: {what}", flush=True)
        runs = {}
        for seed in seeds:
            vout = out / (name if seed == 0 else f"{name}-seed{seed}")
            runs[seed] = one_run(config, vout, overrides, [*extra, f"train.seed={seed}"])
        results[name] = {"what": what, "overrides": overrides, "seeds": runs}
    return results


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _stat(values: list[float]) -> str:
    return f"{_mean(values):.1f}" if len(values) == 1 else f"{_mean(values):.1f} ({min(values):.1f}-{max(values):.1f})"


def print_table(results: dict) -> None:
    seeds = len(next(iter(results.values()))["seeds"])
    print()
    if seeds > 1:
        print(f"mean over {seeds} seeds (min-max), final epoch, val top-1 / top-5 %:")
    print(f"{'variant':<24}{'epochs':>7}{'centre top-1':>20}{'top-5':>8}{'10-crop top-1':>20}{'top-5':>8}"
          f"{'epoch 1':>20}")
    for name, r in results.items():
        runs = list(r["seeds"].values())

        def pick(split: str, metric: str) -> list[float]:
            return [run[split][metric] for run in runs]

        print(f"{name:<24}{runs[0]['epochs']:>7}{_stat(pick('center', 'top1')):>20}"
              f"{_mean(pick('center', 'top5')):>8.1f}{_stat(pick('ten_crop', 'top1')):>20}"
              f"{_mean(pick('ten_crop', 'top5')):>8.1f}{_stat([run['val_top1'][0] for run in runs]):>20}")
    if "finetune" in results and "scratch" in results:
        def mean(name: str) -> float:
            return _mean([run["ten_crop"]["top1"] for run in results[name]["seeds"].values()])

        print(f"\ntransfer gain (ten-crop top-1, fine-tune - scratch): {mean('finetune') - mean('scratch'):+.1f} points")


def plot(results: dict, path: Path, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install matplotlib): no plot")
        return
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, r in results.items():
        run = r["seeds"][min(r["seeds"])]  # the first seed's curve
        ax.plot(range(1, len(run["val_top1"]) + 1), run["val_top1"],
                label=f"{name} ({run['ten_crop']['top1']:.1f}% 10-crop)",
                linewidth=2.2 if name in ("finetune", "scratch") else 1.2)
    ax.set_xlabel("epoch")
    ax.set_ylabel("val top-1 (%), centre crop")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/tiny-imagenet-finetune.yaml")
    p.add_argument("--out", default="runs/transfer")
    p.add_argument("--grid", action="store_true", help="also run the recipes the config's was chosen from")
    p.add_argument("--only", nargs="+", metavar="VARIANT", choices=[*VARIANTS, *GRID],
                   help=f"run only these ({', '.join([*VARIANTS, *GRID])})")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="overrides for every variant (a variant's own settings win)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], metavar="S",
                   help="train.seed of each run (default 0); the table gives mean and range over them")
    p.add_argument("--plot", default="docs/transfer.png")
    args = p.parse_args()
    names = args.only or ([*VARIANTS, *GRID] if args.grid else list(VARIANTS))
    out = Path(args.out)
    results = study(args.config, out, names, args.set, args.seeds)
    print_table(results)
    (out / "summary.json").write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {out / 'summary.json'}")
    first = min(args.seeds)
    plot(results, Path(args.plot), f"Tiny ImageNet: 10 held-out classes, 50 train images each (seed {first})")


if __name__ == "__main__":
    main()
