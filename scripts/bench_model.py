#!/usr/bin/env python3
"""Model-only training-step throughput on one device: what the GPU can do when data is free.

    python scripts/bench_model.py [--device cuda] [--batch-size 128] [--steps 50] [--max-seconds S]
                                  [--archs paper torchvision] [--amps none tf32 bf16]
                                  [--memory-formats nchw channels_last] [--compile | --compiled-only]
                                  [--compile-modes default reduce-overhead ...] [--breakdown]

Every variant runs one SGD step (forward, cross-entropy, backward, momentum
update; weight decay 5e-4) on a batch that already lives on the device, so
the number is the model's ceiling, not the pipeline's: ``bench_train.py``
measures the whole thing.  The baseline is ``torchvision.models.alexnet`` in
float32, NCHW, PyTorch's default precision (TF32 for convolutions, not for
matrix products), stepped the way pytorch/examples' ``imagenet/main.py`` does;
each of ours is built by ``build_model`` from ``configs/<arch>.yaml`` and
stepped the way ``alexnet-train`` does (``train.tf32``, ``train.amp`` autocast, float32 loss,
GradScaler for fp16, optional ``channels_last``, fused SGD on CUDA).  Every row prints its
images/s, its ratio to the baseline and the ImageNet epoch (1,281,167
images) it implies if the loader keeps up; the last line is
``speedup: <best of ours / baseline>``.

``--breakdown`` times instead what only the paper's model has, at its widths, in each of
``--amps`` (default bf16 on CUDA, none on the CPU): LRN off / the one-pass LRN (``fused``) /
``F.local_response_norm`` as the model ran it before (``legacy``), x groups 1 / groups 2 as one
grouped convolution (``grouped``) / as dense convolutions per tower (``split``, model.towers) x
``--memory-formats``.  Each row as above, then a table of milliseconds per step and what LRN and
the towers cost per step, each over the variant without them in the same run.

Variants run in the order of ``--archs``, ``--amps`` and ``--memory-formats`` as
given, each row printed as soon as it is measured, so a caller that has to stop
the run early (``scripts/gpu_check.py``) still has the rows it cared most about.
``--max-seconds`` ends each variant's timed steps after that long (at least one
step), so the whole run can be sized to a time instead of a step count.
"""
from __future__ import annotations

import argparse
import sys
import time
import typing
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision

from alexnet_train.config import PAPER_CONV, PAPER_FC, TrainConfig
from alexnet_train.configload import load_config
from alexnet_train.model import AlexNet, LocalResponseNorm, build_model, init_weights
from alexnet_train.optim import build_sgd
from alexnet_train.wrapping import uses_cuda_graphs

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_lrn import baseline as legacy_lrn  # noqa: E402

COMPILE_MODES = typing.get_args(typing.get_type_hints(TrainConfig)["compile_mode"])  # train.compile_mode's

ROOT = Path(__file__).resolve().parents[1]
IMAGENET_TRAIN = 1_281_167  # ILSVRC-2012 training images: one epoch


def epoch_minutes(rate: float) -> str:
    return f"{IMAGENET_TRAIN / rate / 60:7.1f} min/epoch"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def images_per_second(model: torch.nn.Module, device: torch.device, batch: int, steps: int, warmup: int,
                      amp: str = "none", channels_last: bool = False, crop: int = 224,
                      max_seconds: float = 0.0, optimizer=None, graphs: bool = False) -> tuple[float, bool]:
    """(images/s, whether the loss and the weights stayed finite).  ``optimizer``: a function
    of the model that builds its optimizer (default: stock SGD, as imagenet/main.py's); ``graphs``:
    the model is compiled into CUDA graphs, so each step marks its start (as alexnet-train's does)."""
    model = model.to(device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    model.train()
    opt = (optimizer(model) if optimizer is not None else
           torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4))
    dtype = {"none": None, "tf32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    torch.backends.cuda.matmul.allow_tf32 = amp == "tf32"  # PyTorch's default: off (cuDNN's: on)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(batch, 3, crop, crop, device=device, generator=gen).contiguous(memory_format=fmt)
    y = torch.randint(0, model_classes(model), (batch,), device=device, generator=gen)

    def step() -> torch.Tensor:
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        return loss.detach()

    for _ in range(warmup):
        step()
    sync(device)
    start = time.perf_counter()
    done = 0
    # On a GPU the clock is read after a sync, every few steps only: a sync per step would
    # drain the launch queue that keeps the GPU busy and lower the rate measured.
    every = 5 if device.type == "cuda" else 1
    while done < steps:
        loss = step()
        done += 1
        if max_seconds and done % every == 0:
            sync(device)
            if time.perf_counter() - start >= max_seconds:
                break
    sync(device)
    rate = done * batch / (time.perf_counter() - start)
    # A variant that trains garbage has no speed worth printing (fp16 once went NaN at step 2).
    finite = bool(torch.isfinite(loss)) and all(bool(torch.isfinite(p).all()) for p in model.parameters())
    return rate, finite


def model_classes(model: torch.nn.Module) -> int:
    last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    return last.out_features


class LegacyLRN(torch.nn.Module):
    """The model's LRN before the one-pass one (commit d0c6b60): F.local_response_norm in float32."""

    def __init__(self, lrn: LocalResponseNorm) -> None:
        super().__init__()
        self.size, self.alpha, self.beta, self.k = lrn.size, lrn.alpha, lrn.beta, lrn.k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return legacy_lrn(x, self.size, self.alpha, self.beta, self.k)


LRN_KINDS = ("off", "fused", "legacy")
TOWER_KINDS = ("1", "2 grouped", "2 split")


def breakdown_model(lrn: str, towers: str) -> torch.nn.Module:
    """The paper's widths with LRN ``lrn`` (LRN_KINDS) and towers ``towers`` (TOWER_KINDS)."""
    groups = 1 if towers == "1" else 2
    model = AlexNet(1000, PAPER_CONV, PAPER_FC, lrn != "off", groups, 0.5, "split" if towers == "2 split" else "grouped")
    init_weights(model, "caffe")
    if lrn == "legacy":
        for i, m in enumerate(model.features):
            if isinstance(m, LocalResponseNorm):
                model.features[i] = LegacyLRN(m)
    return model


def breakdown(args, device: torch.device, base: float) -> float:
    """The breakdown's rows, its table and its costs; the best rate of its rows."""
    amps = args.amps or (["bf16"] if device.type == "cuda" else ["none"])
    rates: dict[tuple, float] = {}
    for amp in amps:
        for fmt in args.memory_formats:
            for towers in TOWER_KINDS:
                for lrn in LRN_KINDS:
                    torch.manual_seed(0)
                    make = partial(build_sgd, cfg=load_config(ROOT / "configs" / "paper.yaml").optim,
                                   fused=device.type == "cuda")
                    rate, finite = images_per_second(breakdown_model(lrn, towers), device, args.batch_size,
                                                     args.steps, args.warmup, amp, fmt == "channels_last",
                                                     max_seconds=args.max_seconds, optimizer=make)
                    label = f"ours: paper widths, {amp}, lrn {lrn}, groups {towers}, {fmt}"
                    if not finite:
                        print(f"{label:58s} the loss or the weights became NaN/inf: no figure", flush=True)
                        continue
                    rates[amp, fmt, towers, lrn] = rate
                    print(f"{label:58s} {rate:9.1f} images/s  {rate / base:.2f}x  {epoch_minutes(rate)}", flush=True)
    ms = {key: args.batch_size / rate * 1e3 for key, rate in rates.items()}
    print(f"\nms per step at batch {args.batch_size} (rows: towers; columns: LRN)")
    for amp in amps:
        for fmt in args.memory_formats:
            print(f"{amp}, {fmt}:".ljust(24) + "".join(f"{'lrn ' + lrn:>14s}" for lrn in LRN_KINDS))
            for towers in TOWER_KINDS:
                cells = [f"{ms[amp, fmt, towers, lrn]:14.2f}" if (amp, fmt, towers, lrn) in ms else f"{'-':>14s}"
                         for lrn in LRN_KINDS]
                print(f"  groups {towers}".ljust(24) + "".join(cells))
    print()
    for (amp, fmt, towers, lrn), value in ms.items():  # LRN's cost over no LRN, same towers
        if lrn != "off" and (amp, fmt, towers, "off") in ms:
            print(f"cost: lrn {lrn} at {amp}, {fmt}, groups {towers}: {value - ms[amp, fmt, towers, 'off']:+.2f} ms/step")
    for (amp, fmt, towers, lrn), value in ms.items():  # the towers' cost over groups 1, same LRN
        if towers != "1" and (amp, fmt, "1", lrn) in ms:
            print(f"cost: groups {towers} at {amp}, {fmt}, lrn {lrn}: {value - ms[amp, fmt, '1', lrn]:+.2f} ms/step")
    return max(rates.values(), default=0.0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--archs", nargs="+", default=["paper", "torchvision"], choices=["paper", "torchvision"])
    p.add_argument("--amps", nargs="+", choices=["none", "tf32", "bf16", "fp16"],
                   help="none: float32 with PyTorch's defaults; tf32: float32 with TF32 matmuls (train.tf32, "
                        "alexnet-train's default on CUDA); bf16/fp16: train.amp (default: none tf32 bf16; "
                        "with --breakdown bf16 on CUDA, none on the CPU)")
    p.add_argument("--breakdown", action="store_true",
                   help="time LRN off/fused/legacy x groups 1/2 grouped/2 split x --memory-formats at the paper's "
                        "widths instead of the --archs grid")
    p.add_argument("--memory-formats", nargs="+", default=["nchw", "channels_last"], choices=["nchw", "channels_last"],
                   help="memory formats, in this order (train.channels_last)")
    p.add_argument("--compile", action="store_true", help="also time torch.compile'd variants")
    p.add_argument("--compiled-only", action="store_true", help="time only the torch.compile'd variants")
    p.add_argument("--compile-modes", nargs="+", default=["default"], choices=list(COMPILE_MODES),
                   help="torch.compile modes of the compiled variants (train.compile_mode; reduce-overhead and "
                        "max-autotune replay the step as CUDA graphs)")
    p.add_argument("--max-seconds", type=float, default=0.0,
                   help="end each variant's timed steps after this many seconds (0: run all --steps)")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.max_seconds < 0:
        p.error("--steps must be >= 1, --warmup and --max-seconds >= 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{name}, torch {torch.__version__}, batch {args.batch_size}, {args.steps} timed steps after {args.warmup}")

    torch.manual_seed(0)
    base, finite = images_per_second(torchvision.models.alexnet(), device, args.batch_size, args.steps,
                                     args.warmup, max_seconds=args.max_seconds)
    if not finite:
        print("baseline: the loss or the weights became NaN/inf; no figures", flush=True)
        return 1
    print(f"{'baseline: torchvision.models.alexnet, float32':58s} {base:9.1f} images/s  1.00x  "
          f"{epoch_minutes(base)}", flush=True)
    if args.breakdown:
        print(f"speedup: {breakdown(args, device, base) / base:.2f}")
        return 0
    args.amps = args.amps or ["none", "tf32", "bf16"]
    best = 0.0
    for arch in args.archs:
        cfg = load_config(ROOT / "configs" / f"{arch}.yaml")
        for amp in args.amps:
            for cl in (fmt == "channels_last" for fmt in args.memory_formats):
                compiles = [mode for mode in args.compile_modes] if args.compile or args.compiled_only else []
                for mode in ([] if args.compiled_only else [None]) + compiles:
                    torch.manual_seed(0)
                    model = build_model(cfg.model)
                    if mode is not None:
                        model = torch.compile(model, mode=None if mode == "default" else mode)
                    # alexnet-train's own SGD: fused on CUDA (no host sync under fp16's scaler)
                    make = partial(build_sgd, cfg=cfg.optim, fused=device.type == "cuda")
                    graphs = uses_cuda_graphs(mode is not None, mode or "default", device)
                    rate, finite = images_per_second(model, device, args.batch_size, args.steps, args.warmup,
                                                     amp, cl, max_seconds=args.max_seconds, optimizer=make,
                                                     graphs=graphs)
                    compiled = "" if mode is None else ", compiled" + ("" if mode == "default" else f" {mode}")
                    label = f"ours: {arch}, {amp}{', channels_last' if cl else ''}{compiled}"
                    if not finite:
                        print(f"{label:58s} the loss or the weights became NaN/inf: no figure", flush=True)
                        continue
                    best = max(best, rate)
                    print(f"{label:58s} {rate:9.1f} images/s  {rate / base:.2f}x  {epoch_minutes(rate)}", flush=True)
    print(f"speedup: {best / base:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
