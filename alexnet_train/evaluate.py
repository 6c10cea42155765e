"""Top-k accuracy, centre-crop evaluation and the paper's ten-crop test (alexnet-eval's program,
which runs them on a checkpoint, is :mod:`alexnet_train.evalrun`).

Usage::

    result = evaluate(model, loader, preprocess, device)
    result.top1, result.top5, result.loss, result.images
    both = evaluate_crops(model, ten_crop_loader, preprocess, device, ten_crop=True)
    both["center"], both["ten_crop"]

Sums (not means) are accumulated, so results from shards of a val set add up
to exactly what one process would report on the whole set.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class EvalResult:
    top1: float  # percent accuracy
    top5: float
    loss: float  # mean cross-entropy
    images: int

    def as_dict(self) -> dict:
        return asdict(self)


def topk_correct(logits: torch.Tensor, targets: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> list[torch.Tensor]:
    """Number of samples whose target is within the top-k predictions, for each k (capped at #classes)."""
    maxk = min(max(ks), logits.shape[1])
    pred = logits.topk(maxk, dim=1).indices
    hits = pred.eq(targets.view(-1, 1))
    return [hits[:, : min(k, maxk)].any(dim=1).sum() for k in ks]


def evaluate(
    model: nn.Module,
    loader: Iterable,
    preprocess: Callable[[torch.Tensor], torch.Tensor],
    device: torch.device,
    progress=None,
    all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    bad_images: Callable[[list], None] | None = None,
    amp_dtype: torch.dtype | None = None,
) -> EvalResult:
    """Centre-crop evaluation of ``(images, targets, bad)`` batches (the model's mode is kept).

    ``all_reduce`` sums the per-process totals under DDP; ``bad_images`` judges the
    unreadable files each batch reports (without it, any is an error); ``amp_dtype``:
    autocast to it (the training's precision), None for float32.
    """
    was_training = model.training
    try:
        return evaluate_crops(model, loader, preprocess, device, ten_crop=False, progress=progress,
                              all_reduce=all_reduce, bad_images=bad_images, amp_dtype=amp_dtype)["center"]
    finally:
        model.train(was_training)


@torch.no_grad()
def evaluate_crops(
    model: nn.Module,
    loader: Iterable,
    preprocess: Callable[[torch.Tensor], torch.Tensor],
    device: torch.device,
    ten_crop: bool,
    progress=None,
    all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    bad_images: Callable[[list], None] | None = None,
    on_batch: Callable[[torch.Tensor, torch.Tensor, list], None] | None = None,
    amp_dtype: torch.dtype | None = None,
) -> dict[str, EvalResult]:
    """Centre crop, and with ``ten_crop`` the paper's ten-crop test, from one pass over ``loader``.

    With ``ten_crop`` the loader yields (B, 10, 3, H, W) uint8 crops from
    :class:`~alexnet_train.data.transforms.TenCropPreset`; crop 4 is the centre
    crop, so both results come from one decode and one forward pass.  The ten-crop
    prediction is the network's softmax averaged over the ten crops; its loss is
    the cross-entropy of that average.  Crops go through the network in chunks of
    the loader's batch size, so memory is that of a centre-crop evaluation.
    ``on_batch(scores, targets, bad)`` sees each batch's final scores (ten-crop
    probabilities, else centre logits; None when all its images were skipped), e.g.
    to write predictions.
    """
    model.eval()
    keys = ("center", "ten_crop") if ten_crop else ("center",)
    # Loss sum, top-1 and top-5 hits stay on the device and are read once at the end: no
    # host sync per batch.  The image count is known on the host.
    totals = torch.zeros(len(keys), 3, dtype=torch.float64, device=device)
    images_seen = 0
    for images, targets, bad in loader:
        if bad:
            _judge_bad_images(bad, bad_images)
        if progress is not None:
            progress.update(1)
        if targets.numel() == 0:  # every image of the batch was unreadable (and skipped)
            if on_batch is not None:
                on_batch(None, targets, bad)
            continue
        targets = targets.to(device, non_blocking=True)
        scores = _batch_scores(model, images, targets, preprocess, device, ten_crop, amp_dtype)
        images_seen += targets.shape[0]
        for row, (s, loss) in enumerate(scores):
            c1, c5 = topk_correct(s, targets)
            totals[row] += torch.stack([loss.double(), c1.double(), c5.double()])
        if on_batch is not None:
            on_batch(scores[-1][0], targets, bad)
    return _results_from_totals(keys, totals, images_seen, device, all_reduce)


def _judge_bad_images(bad: list, bad_images: Callable[[list], None] | None) -> None:
    """None once ``bad_images`` has judged a batch's unreadable files (it raises on those it will not skip);
    without it, BadImageError for the first."""
    if bad_images is None:
        from .data.datasets import BadImageError

        raise BadImageError(*bad[0])
    bad_images(bad)


def _batch_scores(
    model: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    preprocess: Callable[[torch.Tensor], torch.Tensor],
    device: torch.device,
    ten_crop: bool,
    amp_dtype: torch.dtype | None,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(scores, loss sum) of one batch, on the device: the centre logits' and, with ``ten_crop``,
    the ten-crop probabilities' after them."""
    n = targets.shape[0]
    if ten_crop:
        crops = images.flatten(0, 1)  # (B*10, 3, H, W)
        logits = torch.cat([
            _forward(model, preprocess(chunk.to(device, non_blocking=True)), amp_dtype)
            for chunk in crops.split(max(1, n), dim=0)
        ]).view(n, 10, -1)
        center = logits[:, 4]
        probs = logits.softmax(dim=-1).mean(dim=1)
        ten_loss = F.nll_loss(probs.clamp_min(1e-12).log(), targets, reduction="sum")
        return [(center, F.cross_entropy(center, targets, reduction="sum")), (probs, ten_loss)]
    center = _forward(model, preprocess(images.to(device, non_blocking=True)), amp_dtype)
    return [(center, F.cross_entropy(center, targets, reduction="sum"))]


def _results_from_totals(
    keys: tuple[str, ...],
    totals: torch.Tensor,
    images_seen: int,
    device: torch.device,
    all_reduce: Callable[[torch.Tensor], torch.Tensor] | None,
) -> dict[str, EvalResult]:
    """An EvalResult per key from this process's (loss sum, top-1, top-5) rows, summed over
    processes by ``all_reduce``; the one host sync of the evaluation."""
    counts = torch.full((len(keys), 1), float(images_seen), dtype=torch.float64, device=device)
    totals = torch.cat([totals, counts], dim=1)  # loss sum, top1, top5, images
    if all_reduce is not None:
        totals = all_reduce(totals)
    results = {}
    for key, (loss_sum, c1, c5, count) in zip(keys, totals.tolist()):
        if count == 0:
            raise RuntimeError("evaluation saw no images")
        results[key] = EvalResult(top1=100.0 * c1 / count, top5=100.0 * c5 / count, loss=loss_sum / count,
                                  images=int(count))
    return results


def _forward(model: nn.Module, x: torch.Tensor, amp_dtype: torch.dtype | None) -> torch.Tensor:
    with torch.autocast(x.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        return model(x).float()
