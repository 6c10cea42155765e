"""The pure learning-rate policy: the paper's plateau rule, step, cosine, and its saved state."""
from __future__ import annotations

import math

import pytest

from alexnet_train.config import ScheduleConfig
from alexnet_train.schedule import LrPolicy


def run(policy: LrPolicy, errors: list[float]) -> list[float]:
    """lr used in each epoch while feeding the given validation errors."""
    lrs = []
    for e in errors:
        if policy.should_stop:
            break
        lrs.append(policy.lr)
        policy.epoch_end(e)
    return lrs


def test_plateau_divides_by_ten_after_patience_epochs_without_improvement():
    policy = LrPolicy(ScheduleConfig(kind="plateau", patience=2, factor=0.1, max_reductions=3), 0.01, 90)
    lrs = run(policy, [50, 45, 46, 47, 44])
    assert lrs == pytest.approx([0.01, 0.01, 0.01, 0.01, 0.001])
    assert policy.reductions == 1 and policy.best_error == 44


def test_plateau_stops_after_max_reductions_and_a_final_plateau():
    policy = LrPolicy(ScheduleConfig(kind="plateau", patience=1, factor=0.1, max_reductions=3), 0.01, 90)
    lrs = run(policy, [50.0] * 20)
    # epoch 1 sets the best; each later flat epoch is a plateau: three reductions, then the stop.
    assert lrs == pytest.approx([0.01, 0.01, 0.001, 1e-4, 1e-5])
    assert policy.should_stop and policy.reductions == 3


def test_plateau_threshold_ignores_tiny_improvements():
    policy = LrPolicy(ScheduleConfig(kind="plateau", patience=2, threshold=0.5), 0.01, 90)
    events = [policy.epoch_end(e) for e in (50, 49.8, 49.7)]
    assert policy.current == pytest.approx(0.001)
    assert events[-1] and "0.01 -> 0.001" in events[-1][0]


def test_plateau_state_round_trips_mid_plateau():
    cfg = ScheduleConfig(kind="plateau", patience=3)
    a = LrPolicy(cfg, 0.01, 90)
    for e in (40, 41, 42):
        a.epoch_end(e)
    b = LrPolicy(cfg, 0.01, 90)
    b.load_state_dict(a.state_dict())
    assert b.state_dict() == a.state_dict()
    a.epoch_end(43), b.epoch_end(43)
    assert a.lr == b.lr == pytest.approx(0.001)


def test_state_of_another_kind_is_refused():
    state = LrPolicy(ScheduleConfig(kind="step"), 0.1, 10).state_dict()
    with pytest.raises(ValueError, match="plateau"):
        LrPolicy(ScheduleConfig(kind="plateau"), 0.1, 10).load_state_dict(state)


def test_step_schedule():
    policy = LrPolicy(ScheduleConfig(kind="step", step_size=30, factor=0.1), 0.01, 90)
    lrs = run(policy, [50.0] * 90)
    assert lrs[0] == lrs[29] == pytest.approx(0.01)
    assert lrs[30] == lrs[59] == pytest.approx(0.001)
    assert lrs[60] == lrs[89] == pytest.approx(1e-4)
    assert not policy.should_stop  # step runs to train.epochs


def test_cosine_with_warmup():
    policy = LrPolicy(ScheduleConfig(kind="cosine", warmup_epochs=2, min_lr=0.0), 0.1, 12)
    lrs = run(policy, [50.0] * 12)
    assert lrs[:2] == pytest.approx([0.05, 0.1])
    assert lrs[2] == pytest.approx(0.1)
    assert lrs[7] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 5 / 10)))
    assert all(x > y for x, y in zip(lrs[2:], lrs[3:]))
