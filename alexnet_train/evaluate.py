"""Top-k accuracy and centre-crop evaluation.

Usage::

    result = evaluate(model, loader, preprocess, device)
    result.top1, result.top5, result.loss, result.images

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


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable,
    preprocess: Callable[[torch.Tensor], torch.Tensor],
    device: torch.device,
    progress=None,
    all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    bad_images: Callable[[list], None] | None = None,
) -> EvalResult:
    """Centre-crop evaluation of ``(images, targets, bad)`` batches.

    ``all_reduce`` sums the per-process totals under DDP; ``bad_images`` judges the
    unreadable files each batch reports (without it, any is an error).
    """
    was_training = model.training
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, top1, top5, images
    try:
        for images, targets, bad in loader:
            if bad:
                if bad_images is None:
                    from .data.datasets import BadImageError

                    raise BadImageError(*bad[0])
                bad_images(bad)
            if progress is not None:
                progress.update(1)
            if targets.numel() == 0:
                continue
            images = images.to(device, non_blocking=True)
            targets = targets.to(device, non_blocking=True)
            logits = model(preprocess(images)).float()
            c1, c5 = topk_correct(logits, targets)
            totals += torch.stack([
                F.cross_entropy(logits, targets, reduction="sum").double(),
                c1.double(), c5.double(), torch.tensor(float(targets.numel()), dtype=torch.float64, device=device),
            ])
    finally:
        model.train(was_training)
    if all_reduce is not None:
        totals = all_reduce(totals)
    loss_sum, c1, c5, n = totals.tolist()
    if n == 0:
        raise RuntimeError("evaluation saw no images")
    return EvalResult(top1=100.0 * c1 / n, top5=100.0 * c5 / n, loss=loss_sum / n, images=int(n))
