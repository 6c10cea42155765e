"""schedule.warmup_epochs under the paper's plateau schedule: a linear ramp to optim.lr, honoured
(it was once silently ignored), saved with the policy, and seen in a real run's metrics.jsonl."""
from __future__ import annotations

from pathlib import Path

import pytest

from alexnet_train.config import ScheduleConfig
from alexnet_train.schedule import LrPolicy

from .conftest import REPO, assert_bit_identical, checkpoint_weights as weights, read_metrics as metrics
from .conftest import run_train as run, tiny_overrides, write_image_folder
from .test_policy import run as lrs_for  # the lr each epoch runs at while the given val errors come in

PAPER = str(REPO / "configs" / "paper.yaml")


def test_plateau_ramps_up_linearly_over_warmup_epochs_then_holds_the_base_lr():
    policy = LrPolicy(ScheduleConfig(kind="plateau", warmup_epochs=4, patience=5), 0.04, 90)
    assert lrs_for(policy, [60, 55, 50, 45, 40, 35]) == pytest.approx([0.01, 0.02, 0.03, 0.04, 0.04, 0.04])


def test_plateau_patience_counts_only_after_warmup():
    # patience 1 would cut after any flat epoch; the flat warmup epochs cut nothing.
    policy = LrPolicy(ScheduleConfig(kind="plateau", warmup_epochs=3, patience=1, max_reductions=3), 0.03, 90)
    lrs = lrs_for(policy, [50, 50, 50, 50, 50])
    assert lrs == pytest.approx([0.01, 0.02, 0.03, 0.03, 0.003])
    assert policy.reductions == 2 and policy.best_error == 50  # warmup's first epoch set the best


def test_plateau_warmup_zero_is_the_paper_rule_unchanged():
    with_default = LrPolicy(ScheduleConfig(kind="plateau", patience=2), 0.01, 90)
    assert lrs_for(with_default, [50, 45, 46, 47, 44]) == pytest.approx([0.01, 0.01, 0.01, 0.01, 0.001])


def test_plateau_state_round_trips_mid_warmup():
    cfg = ScheduleConfig(kind="plateau", warmup_epochs=4, patience=1)
    a = LrPolicy(cfg, 0.04, 90)
    for error in (50, 50):
        a.epoch_end(error)
    b = LrPolicy(cfg, 0.04, 90)
    b.load_state_dict(a.state_dict())
    assert b.state_dict() == a.state_dict()
    assert a.lr == b.lr == pytest.approx(0.03)
    rest = [50, 50, 50, 49, 49]
    assert lrs_for(a, rest) == lrs_for(b, rest) == pytest.approx([0.03, 0.04, 0.04, 0.004, 0.004])
    assert a.state_dict() == b.state_dict() and a.lr == pytest.approx(0.0004)


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("warmup")
    classes = ["n01440764", "n01443537", "n01484850"]
    return (write_image_folder(root / "train", classes, 8, seed=1),
            write_image_folder(root / "val", classes, 3, seed=2))


def warm_args(train: Path, val: Path, out: Path, epochs: int) -> list[str]:
    # paper.yaml: schedule.kind plateau, optim.lr 0.01.
    return ["--config", PAPER, "--out", str(out), "--set", *tiny_overrides(train, val, 3, epochs),
            "data.batch_size=4", "schedule.warmup_epochs=2"]


@pytest.mark.slow
def test_paper_yaml_with_warmup_logs_the_ramp_and_resumes_mid_warmup_exactly(tree, tmp_path):
    train, val = tree
    straight = tmp_path / "straight"
    assert run(warm_args(train, val, straight, epochs=3)) == 0
    assert [row["lr"] for row in metrics(straight)] == pytest.approx([0.005, 0.01, 0.01])

    # Stopped after epoch 1 (mid-warmup), resumed to epoch 3: the same lrs and the same weights.
    split = tmp_path / "split"
    assert run(warm_args(train, val, split, epochs=1)) == 0
    assert run(warm_args(train, val, split, epochs=3)) == 0
    assert [row["lr"] for row in metrics(split)] == pytest.approx([0.005, 0.01, 0.01])
    assert_bit_identical(weights(straight / "last.pth"), weights(split / "last.pth"))
