"""alexnet-eval's program: a checkpoint evaluated on a folder, centre and ten-crop, in one
process or under torchrun / srun (each rank its shard, rank 0 prints and writes).

Usage (``cli.eval_main`` does this)::

    run_eval(eval_parser().parse_args(["runs/paper/best.pth", "--ten-crop", "--json", "eval.json"]))

It sits beside :mod:`alexnet_train.lifecycle` (whose process-group handling it uses) and
calls the evaluation library, :mod:`alexnet_train.evaluate`, as the Trainer does.
"""
from __future__ import annotations

import json
import os
import time

import torch

from .evaluate import evaluate_crops


def _resized_image_kind(samples: list, resize: int) -> str:
    """Say what the ten crops are cut from: the prepared square copy, or a shorter-side resize."""
    from .data.decode import jpeg_info, read_bytes
    from .data.shards import is_member

    step = max(1, len(samples) // 20)
    for path, _ in samples[::step]:
        if is_member(path):  # a shard's sample: one pread of the whole member
            info = jpeg_info(read_bytes(path))
        else:
            with open(path, "rb") as fh:
                info = jpeg_info(fh.read(65536))
        if info is None or info[:2] != (resize, resize):
            return f"crops of the shorter-side-{resize} image (torchvision's Resize({resize}) + TenCrop)"
    return f"crops of the {resize}x{resize} prepared image, as in the paper"


def _eval_inputs(args, dist):
    """(device, loaded checkpoint, data folder, labelled samples) for alexnet-eval's arguments."""
    from .data.datasets import check_dir, labelled_samples
    from .errors import DataError
    from .inference import load_for_inference
    from .device import resolve_device

    # The training's rule: under torchrun or srun each rank takes the GPU of its local rank.
    device, _ = resolve_device(args.device, dist.local_rank, dist.world_size, setting="--device")
    if device.type == "cuda":
        torch.cuda.set_device(device)  # before anything allocates on "the current device"
        torch.backends.cudnn.benchmark = True
    loaded = load_for_inference(args.checkpoint, device)
    cfg = loaded.config
    if args.data is None and cfg is None:
        raise DataError("--data: required for a plain state_dict (it names no validation set)")
    data_dir = args.data or cfg.data.val_dir
    check_dir(data_dir, "--data" if args.data else "data.val_dir (from the checkpoint; pass --data)")
    labels = args.labels or (cfg.data.val_labels if not args.data and cfg is not None else None)
    if labels is not None and not os.path.isfile(labels):
        raise DataError(f"--labels: file not found: {labels}")
    return device, loaded, data_dir, labelled_samples(data_dir, loaded.classes, labels)


class _Predictions:
    """The rows of ``--predictions`` for this rank: (path, label, pred1..pred5) in wnids.

    A batch covers the next ``len(targets) + len(bad)`` of this rank's samples, in loader order.
    """

    def __init__(self, own: list, classes: list[str]) -> None:
        self.own, self.classes, self.cursor, self.rows = own, classes, 0, []

    def __call__(self, scores: torch.Tensor | None, targets: torch.Tensor, bad: list) -> None:
        bad_paths = {p for p, _ in bad}
        span = self.own[self.cursor : self.cursor + targets.shape[0] + len(bad)]
        self.cursor += len(span)
        if scores is None:
            return
        batch = [path for path, _ in span if path not in bad_paths]
        top = scores.topk(min(5, scores.shape[1]), dim=1).indices.tolist()
        for path, target, preds in zip(batch, targets.tolist(), top):
            self.rows.append((path, self.classes[target], *[self.classes[i] for i in preds]))


def _write_outputs(args, results: dict, rows: list) -> None:
    """``--json`` and ``--predictions``, each written atomically."""
    from .checkpoint import atomic_write_bytes

    if args.json:
        payload = json.dumps({k: r.as_dict() for k, r in results.items()}, indent=2) + "\n"
        atomic_write_bytes(args.json, lambda fh: fh.write(payload.encode()))
    if args.predictions:
        import csv
        import io

        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["path", "label", "pred1", "pred2", "pred3", "pred4", "pred5"])
        writer.writerows(sorted(rows))
        atomic_write_bytes(args.predictions, lambda fh: fh.write(buf.getvalue().encode()))


def _eval_loader(args, data_cfg, samples: list, dist, device: torch.device):
    """(sampler, loader) of this rank's shard of ``samples``, centre or ten-crop as ``args`` ask."""
    from .data.datasets import ImageDataset
    from .data.loaders import Deadlined, EpochSampler, make_loader, resolve_workers
    from .data.transforms import CenterPreset, TenCropPreset

    preset = TenCropPreset(data_cfg) if args.ten_crop else CenterPreset(data_cfg)
    sampler = EpochSampler(len(samples), shuffle=False, rank=dist.rank, world=dist.world_size)
    workers = resolve_workers(data_cfg.workers, dist)[0] if args.workers is None else args.workers
    timeout = getattr(data_cfg, "loader_timeout", 300.0)  # a checkpoint's config from before the key: default
    loader = make_loader(ImageDataset(samples, preset), sampler, args.batch_size or data_cfg.batch_size,
                         workers, device.type == "cuda")
    return sampler, loader, Deadlined(loader, timeout)


def _print_results(args, loaded, data_dir: str, samples: list, results: dict, seconds: float) -> None:
    """Print alexnet-eval's summary: what was evaluated, then a row per result; returns nothing."""
    print(f"{args.checkpoint} ({loaded.kind}) on {data_dir}: {results['center'].images} images in {seconds:.1f}s"
          + (f"; ten-crop: {_resized_image_kind(samples, loaded.data.resize_size)}" if args.ten_crop else ""))
    print(f"{'':<10}{'top-1':>9}{'top-5':>9}{'loss':>9}")
    for key, label in (("center", "center"), ("ten_crop", "ten-crop")):
        if key in results:
            r = results[key]
            print(f"{label:<10}{r.top1:>8.2f}%{r.top5:>8.2f}%{r.loss:>9.4f}")


def run_eval(args) -> None:
    """alexnet-eval's program, for the arguments of :func:`alexnet_train.cli.eval_parser`.

    Raises the errors of :mod:`alexnet_train.errors` (the caller maps them to exit codes).
    Under torchrun or srun every rank evaluates its shard and rank 0 prints and writes.
    """
    from .data.datasets import BadImages
    from .data.transforms import BatchPreprocess
    from .distributed import all_gather, all_reduce_sum
    from .lifecycle import join_process_group, launch_environment, leave_process_group
    from .errors import OutOfMemory
    from .device import is_out_of_memory, memory_line
    from .tracking import Tracker

    dist = launch_environment()
    device, loaded, data_dir, samples = _eval_inputs(args, dist)
    if dist.distributed:
        join_process_group(dist, "auto", device)
    failure, loader = None, None
    try:
        data_cfg = loaded.data
        amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp) if device.type == "cuda" else None
        tracker = Tracker(None, enabled=dist.is_main, tensorboard=False)
        if args.amp != "none" and amp_dtype is None:
            tracker.log(f"notice: --amp {args.amp} needs a CUDA device; evaluating in float32")
        sampler, loader, batches = _eval_loader(args, data_cfg, samples, dist, device)
        record = _Predictions([samples[i] for i in sampler.order()], loaded.classes)
        bad = BadImages(data_cfg.on_bad_image, data_cfg.max_bad_fraction, {"val": len(samples)}, tracker.log)
        started = time.monotonic()
        with tracker.progress(len(loader), "eval ten-crop" if args.ten_crop else "eval center", interval=50) as bar:
            results = evaluate_crops(
                loaded.model, batches, BatchPreprocess(data_cfg, device), device, ten_crop=args.ten_crop,
                progress=bar, all_reduce=all_reduce_sum if dist.distributed else None,
                bad_images=lambda b: bad.check(b, "val"), on_batch=record if args.predictions else None,
                amp_dtype=amp_dtype,
            )
        rows = record.rows
        if args.predictions and dist.distributed:
            rows = [row for part in all_gather(rows, dist.world_size) for row in part]
    except BaseException as exc:
        failure = exc
        if isinstance(exc, Exception) and is_out_of_memory(exc):
            batch = loader.batch_size if loader is not None else args.batch_size
            failure = OutOfMemory(
                f"{'rank ' + str(dist.rank) + ': ' if dist.distributed else ''}{device} out of memory evaluating "
                f"{'ten crops' if args.ten_crop else 'the centre crop'} of batches of {batch} images"
                f"{memory_line(device)}: lower --batch-size"
                + (" (ten-crop runs 10 crops of each image)" if args.ten_crop else ""))
            raise failure from None
        raise
    finally:
        if dist.distributed:
            leave_process_group(failure)
    if not dist.is_main:
        return
    _print_results(args, loaded, data_dir, samples, results, time.monotonic() - started)
    _write_outputs(args, results, rows)
