"""Progress lines and the run's ETA: the pure clock, the line format, the TTY bar."""
from __future__ import annotations

import io
import re

import pytest

from alexnet_train import tracking
from alexnet_train.tracking import Progress, RunClock, format_field


def test_fields_have_one_unit_and_precision_each():
    assert [format_field(k, v) for k, v in
            [("loss", 2.30258), ("lr", 0.001), ("img_s", 975.8), ("data_wait", 0.07199)]] == \
        ["loss 2.3026", "lr 0.001", "976 img/s", "data wait 7%"]


def test_run_clock_adds_validation_and_the_epochs_to_come():
    clock = RunClock(epochs=10, train_steps=100, val_steps=20)
    # Epoch 1 (0-based 0), 40 training steps left at 0.5 s each; validation not yet timed:
    # a third of a training step each.
    epoch_left, run_left = clock.left(0, "train", 40, 0.5)
    assert epoch_left == pytest.approx(40 * 0.5 + 20 * 0.5 / 3)
    assert run_left == pytest.approx(epoch_left + 9 * (100 * 0.5 + 20 * 0.5 / 3))
    clock.finished("train", 0.5)
    clock.finished("val", 0.25)  # measured: replaces the guess
    epoch_left, run_left = clock.left(0, "val", 5, 0.25)
    assert epoch_left == pytest.approx(5 * 0.25)
    assert run_left == pytest.approx(1.25 + 9 * (50 + 5))
    # The last epoch: nothing after it.
    assert clock.left(9, "train", 10, 0.5) == pytest.approx((5 + 5, 5 + 5))
    assert clock.left(9, "val", 0, 0.25) == (0.0, 0.0)


def test_plain_progress_line_at_each_log_interval_with_etas(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(tracking.time, "monotonic", lambda: now[0])
    monkeypatch.setattr(tracking.time, "time", lambda: 1_700_000_000.0)
    clock = RunClock(epochs=3, train_steps=10, val_steps=2)
    stream = io.StringIO()
    bar = Progress(10, "epoch 1/3 train", interval=5, enabled=True, stream=stream,
                   eta=lambda left, per_step: clock.left(0, "train", left, per_step))
    for step in range(10):
        now[0] += 3.0  # 3 s per step
        bar.set(loss=2.1, lr=0.01, img_s=42.6, data_wait=0.5)
        bar.update(1)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2  # steps 5 and 10
    # step 5: 5 steps left at 3 s, then 2 val steps at 1 s, then 2 epochs of 30 + 2 s
    assert re.fullmatch(r"epoch 1/3 train 5/10 \| loss 2\.1000 \| lr 0\.01 \| 43 img/s \| data wait 50% \| "
                        r"elapsed 15s \| ETA epoch 17s, run 1m21s \(ends \d{4}-\d\d-\d\d \d\d:\d\d\)", lines[0]), lines[0]
    assert lines[1].startswith("epoch 1/3 train 10/10 | ") and "ETA epoch 2s, run 1m06s" in lines[1]
    assert bar.seconds_per_step() == pytest.approx(3.0)


def test_a_resumed_epoch_times_only_its_own_steps(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(tracking.time, "monotonic", lambda: now[0])
    stream = io.StringIO()
    bar = Progress(100, "eval", interval=10, enabled=True, stream=stream, initial=80)
    assert bar.seconds_per_step() is None
    now[0] = 20.0
    bar.update(10)
    assert bar.seconds_per_step() == pytest.approx(2.0)
    assert stream.getvalue().strip() == "eval 90/100 | elapsed 20s | ETA 20s"


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_tty_bar_shows_the_same_fields_and_the_run_eta():
    stream = _Tty()
    with Progress(4, "epoch 1/2 train", interval=1, enabled=True, stream=stream,
                  eta=lambda left, per_step: (left * per_step, 100.0 + left * per_step)) as bar:
        bar.update(1)
        bar.set(loss=1.5, img_s=10.2, data_wait=0.25)
        bar.bar.refresh()
    shown = stream.getvalue()
    assert "loss 1.5000, 10 img/s, data wait 25%, run ETA 1m4" in shown  # 100 s + 3 steps' worth
    assert "img_s=" not in shown and "data_wait=" not in shown
