"""Comparing predictions computed in two number formats (CPU float32 against a GPU's TF32, or
float32 against bf16 / fp16 autocast) with a tolerance that has a basis, not a guess.

Each format rounds a value to a relative error of at most its unit roundoff u: 2^-24 for
float32, 2^-11 for TF32 and fp16 (10 stored mantissa bits), 2^-8 for bf16 (7).  AlexNet's
8 layers round twice each on the way in (activations and weights), so 16 roundings reach
the logits; taking each at its worst and adding them (ReLU, max-pool and dropout's identity
at eval never enlarge a difference) bounds the change of a logit by 16 u times the logits'
scale.  Real differences are far smaller, since roundings cancel; the bound is what may
never be exceeded.  A prediction may then differ only where the reference's two best
classes are within twice that bound of each other: a near tie.
"""
from __future__ import annotations

import torch

ROUNDOFF = {"float32": 2.0 ** -24, "tf32": 2.0 ** -11, "fp16": 2.0 ** -11, "bf16": 2.0 ** -8}
ROUNDINGS = 16  # 8 layers x (activations, weights)


def logit_bound(ref: torch.Tensor, fmt: str) -> float:
    """How far any logit computed in ``fmt`` may be from ``ref``'s."""
    return ROUNDINGS * ROUNDOFF[fmt] * (float(ref.abs().max()) + 1.0)


def near_ties(ref: torch.Tensor, bound: float) -> torch.Tensor:
    """Rows whose two best scores in ``ref`` are within ``2 * bound``: where a flip is allowed."""
    top2 = ref.topk(2, dim=1).values
    return (top2[:, 0] - top2[:, 1]) <= 2 * bound


def assert_same_up_to_near_ties(ref: torch.Tensor, got: torch.Tensor, fmt: str, factor: float = 1.0) -> int:
    """``got``'s logits (N, C) stay within :func:`logit_bound` of ``ref``'s, and its top-1
    differs only at near ties; returns how many near ties ``ref`` has.  ``factor``: for scores
    that move ``factor`` times as far as the logits they come from (2 for the log of a softmax
    averaged over crops: each crop's probabilities change by at most a factor exp(2 d) when
    its logits move by d)."""
    ref, got = ref.float().cpu(), got.float().cpu()
    assert ref.shape == got.shape
    bound = factor * logit_bound(ref, fmt)
    worst = float((got - ref).abs().max())
    assert worst <= bound, f"logits moved by {worst:.4g}, more than {fmt}'s bound {bound:.4g}"
    flipped = ref.argmax(1) != got.argmax(1)
    ties = near_ties(ref, bound)
    assert not (flipped & ~ties).any(), f"top-1 changed at rows {(flipped & ~ties).nonzero().flatten().tolist()}"
    return int(ties.sum())
