#!/usr/bin/env python3
"""The paper's LRN alone, forward + backward: the one-pass LRN against F.local_response_norm.

    python scripts/bench_lrn.py [--device cpu|cuda] [--batch-size N] [--threads 1] [--repeats 20]
                                [--layers conv1 conv2] [--dtypes float32 bfloat16] [--formats nchw channels_last]
                                [--no-compile]

The baseline is what ``model.LocalResponseNorm`` ran before (commit d0c6b60):
``F.local_response_norm`` in float32, half inputs cast up and the result cast back.  Ours is
:func:`alexnet_train.lrn.lrn` as the model calls it: on the CPU the plain-torch twin; on CUDA
the Triton kernels, and also the plain-torch formulation (``torch``) and that formulation under
``torch.compile`` (``compiled``, after every eager row: compiling takes seconds per shape), the
alternatives the kernels have to beat.  Each row times
forward + backward on the paper's shapes at ``--batch-size`` (conv1: 96x55x55, conv2:
256x27x27; the input post-ReLU-like, on the 0-255 input's scale) and prints the best of
``--repeats`` runs (the median on CUDA, timed with events) and its ratio to the baseline in
the same layout and dtype.  The last line is ``speedup: <baseline / ours>`` at conv1 in the
first dtype and format, the figure issue 33 sets a target for (CPU, 1 thread, batch 8: >= 2x).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from alexnet_train.lrn import lrn
from alexnet_train.model import LRN_ALPHA, LRN_BETA, LRN_K, LRN_SIZE

SHAPES = {"conv1": (96, 55, 55), "conv2": (256, 27, 27)}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ALPHA = LRN_ALPHA * LRN_SIZE  # as nn.LocalResponseNorm takes it


def baseline(x: torch.Tensor, size: int = LRN_SIZE, alpha: float = ALPHA, beta: float = LRN_BETA,
             k: float = LRN_K) -> torch.Tensor:
    """The model's LRN before the one-pass one (commit d0c6b60): F.local_response_norm, in float32."""
    if x.dtype in (torch.float16, torch.bfloat16):
        with torch.autocast(x.device.type, enabled=False):
            return F.local_response_norm(x.float(), size, alpha, beta, k).to(x.dtype)
    return F.local_response_norm(x, size, alpha, beta, k)


def implementations(device: torch.device, compiled: bool) -> tuple[dict, dict]:
    """(the eager implementations, baseline first; the compiled ones, timed after every eager row)."""
    impls = {"F.local_response_norm": baseline}
    later = {}
    if device.type == "cuda":
        impls["ours: triton"] = lambda t: lrn(t, LRN_SIZE, ALPHA, LRN_BETA, LRN_K, use_triton=True)
        impls["ours: torch"] = lambda t: lrn(t, LRN_SIZE, ALPHA, LRN_BETA, LRN_K, use_triton=False)
        if compiled:
            # Compiling takes seconds per shape: last, so a caller that stops the run early keeps the rest.
            later["ours: torch, compiled"] = torch.compile(
                lambda t: lrn(t, LRN_SIZE, ALPHA, LRN_BETA, LRN_K, use_triton=False))
    else:
        impls["ours: torch"] = lambda t: lrn(t, LRN_SIZE, ALPHA, LRN_BETA, LRN_K)
    return impls, later


def time_ms(fn, x: torch.Tensor, g: torch.Tensor, repeats: int) -> float:
    def once() -> None:
        x.grad = None
        fn(x).backward(g)

    for _ in range(3):  # warm-up: allocator, autotuning, compiling
        once()
    if x.device.type == "cuda":
        times = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            once()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        once()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--batch-size", type=int, help="default: 8 on the CPU, 128 (the paper's batch) on CUDA")
    p.add_argument("--threads", type=int, default=1, help="torch threads on the CPU (default 1)")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--layers", nargs="+", default=["conv1", "conv2"], choices=list(SHAPES))
    p.add_argument("--dtypes", nargs="+", choices=list(DTYPES),
                   help="default: float32 on the CPU; bfloat16 and float32 on CUDA")
    p.add_argument("--formats", nargs="+", default=["nchw", "channels_last"], choices=["nchw", "channels_last"])
    p.add_argument("--no-compile", action="store_true", help="on CUDA, leave out the torch.compile'd formulation")
    args = p.parse_args(argv)
    if args.repeats < 1 or (args.batch_size is not None and args.batch_size < 1):
        p.error("--repeats and --batch-size must be >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    device = torch.device(args.device)
    batch = args.batch_size or (128 if device.type == "cuda" else 8)
    dtypes = args.dtypes or (["bfloat16", "float32"] if device.type == "cuda" else ["float32"])
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} thread(s)"
    print(f"{name}, torch {torch.__version__}, batch {batch}, forward + backward, "
          f"{'median' if device.type == 'cuda' else 'best'} of {args.repeats}")
    impls, later = implementations(device, not args.no_compile)
    cases = [(layer, dname, fmt) for layer in args.layers for dname in dtypes for fmt in args.formats]
    bases: dict[tuple, float] = {}
    headline = None
    for group in (impls, later):
        for layer, dname, fmt in cases:
            gen = torch.Generator().manual_seed(0)
            x = (torch.randn(batch, *SHAPES[layer], generator=gen) * 120).clamp_min(0)
            g = torch.randn(x.shape, generator=gen)
            memory = torch.channels_last if fmt == "channels_last" else torch.contiguous_format
            x = x.to(device, DTYPES[dname]).contiguous(memory_format=memory).requires_grad_()
            g = g.to(device, DTYPES[dname]).contiguous(memory_format=memory)
            for label, fn in group.items():
                ms = time_ms(fn, x, g, args.repeats)
                base = bases.setdefault((layer, dname, fmt), ms)
                ratio = base / ms
                print(f"{label:24s} {layer} {dname:9s} {fmt:13s} {ms:9.3f} ms  {ratio:5.2f}x", flush=True)
                if headline is None and label.startswith("ours"):
                    headline = ratio
    print(f"speedup: {headline:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
