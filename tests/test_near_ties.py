"""The tolerance the cuda tests compare devices and precisions by: it passes what rounding can
do and fails a prediction that changed for another reason."""
from __future__ import annotations

import pytest
import torch

from .near_ties import ROUNDOFF, assert_same_up_to_near_ties, logit_bound, near_ties


def logits() -> torch.Tensor:
    return torch.tensor([[4.0, 1.0, 0.0],     # confident
                         [2.0, 1.999, 0.0],   # a near tie
                         [0.0, 3.0, -1.0]])   # confident


def test_rounding_within_the_bound_passes_and_may_flip_only_a_near_tie():
    ref = logits()
    bound = logit_bound(ref, "bf16")
    assert bound == pytest.approx(16 * 2 ** -8 * 5.0)
    got = ref.clone()
    got[1, 0], got[1, 1] = 1.999, 2.0  # the near tie flips
    got[0] += bound / 2
    assert assert_same_up_to_near_ties(ref, got, "bf16") == 1
    assert near_ties(ref, bound).tolist() == [False, True, False]


def test_a_confident_prediction_that_changed_fails():
    ref = logits()
    got = ref.clone()
    got[0, 0], got[0, 1] = 1.0, 4.0
    with pytest.raises(AssertionError, match="moved by 3"):
        assert_same_up_to_near_ties(ref, got, "bf16")


def test_a_change_beyond_the_formats_roundoff_fails_even_without_a_flip():
    ref = logits()
    got = ref + 10 * logit_bound(ref, "tf32")
    with pytest.raises(AssertionError, match="more than tf32's bound"):
        assert_same_up_to_near_ties(ref, got, "tf32")
    assert ROUNDOFF["tf32"] == ROUNDOFF["fp16"] < ROUNDOFF["bf16"]
