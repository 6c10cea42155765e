"""The learning-rate schedule: a pure policy whose whole state is saved with the checkpoint.

Usage::

    policy = LrPolicy(cfg.schedule, base_lr=0.01, epochs=90)
    policy.lr                        # lr for the next epoch
    policy.epoch_end(val_error=42.0) # -> ["lr 0.01 -> 0.001 (no improvement for 5 epochs)"]
"""
from __future__ import annotations

import math

from .config import ScheduleConfig


class LrPolicy:
    """Learning rate per epoch; pure (no optimizer), and its whole state is in ``state_dict``.

    plateau: the paper's rule.  After each epoch, if validation top-1 error has
    not improved on the best by more than ``threshold`` for ``patience``
    epochs, lr *= ``factor``; once ``max_reductions`` reductions are spent, the
    next plateau ends the run (``should_stop``).
    step: lr *= ``factor`` every ``step_size`` epochs.  cosine: from lr to
    ``min_lr`` over the epochs.  All three ramp up linearly over
    ``warmup_epochs`` first (lr x 1/W, 2/W, ... W/W, one value per epoch, as in
    Goyal et al. 2017's warmup for large batches); under plateau the warmup
    epochs still set the best error, but a warmup epoch without improvement
    does not count towards ``patience``: no cut comes during warmup.
    """

    def __init__(self, cfg: ScheduleConfig, base_lr: float, epochs: int) -> None:
        self.cfg = cfg
        self.base_lr = base_lr
        self.epochs = epochs
        self.epoch = 0  # epochs completed
        self.current = base_lr  # plateau's lr
        self.best_error = math.inf
        self.bad_epochs = 0
        self.reductions = 0
        self.should_stop = False

    @property
    def lr(self) -> float:
        """The learning rate for epoch ``self.epoch`` (0-based)."""
        cfg, e = self.cfg, self.epoch
        if cfg.kind == "plateau":
            # current, not base_lr: plateau's lr is the saved one on resume (no cut comes during warmup).
            return self.current * self.warmup_factor
        if cfg.warmup_epochs and e < cfg.warmup_epochs:
            return self.base_lr * self.warmup_factor
        if cfg.kind == "step":
            return self.base_lr * cfg.factor ** (e // cfg.step_size)
        span = max(1, self.epochs - cfg.warmup_epochs)
        t = min(1.0, (e - cfg.warmup_epochs) / span)
        return cfg.min_lr + (self.base_lr - cfg.min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))

    @property
    def warmup_factor(self) -> float:
        """What the lr of epoch ``self.epoch`` is multiplied by during warmup: (epoch + 1) / warmup_epochs, then 1."""
        w = self.cfg.warmup_epochs
        return (self.epoch + 1) / w if self.epoch < w else 1.0

    def epoch_end(self, val_error: float) -> list[str]:
        """Record one finished epoch's validation top-1 error (percent); return what changed."""
        events: list[str] = []
        warming = self.epoch < self.cfg.warmup_epochs
        self.epoch += 1
        if self.cfg.kind != "plateau":
            return events
        if val_error < self.best_error - self.cfg.threshold:
            self.best_error = val_error
            self.bad_epochs = 0
            return events
        if warming:  # patience counts only the epochs after warmup
            return events
        self.bad_epochs += 1
        if self.bad_epochs >= self.cfg.patience:
            self.bad_epochs = 0
            if self.reductions < self.cfg.max_reductions:
                old = self.current
                self.current *= self.cfg.factor
                self.reductions += 1
                events.append(
                    f"lr {old:.4g} -> {self.current:.4g} (val error not improved for {self.cfg.patience} epochs; "
                    f"reduction {self.reductions}/{self.cfg.max_reductions})"
                )
            elif self.cfg.stop_after_last_plateau:
                self.should_stop = True
                events.append(f"stop: val error plateaued after {self.reductions} lr reductions")
        return events

    def state_dict(self) -> dict:
        return {
            "kind": self.cfg.kind,
            "epoch": self.epoch,
            "current": self.current,
            "best_error": self.best_error,
            "bad_epochs": self.bad_epochs,
            "reductions": self.reductions,
            "should_stop": self.should_stop,
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != self.cfg.kind:
            raise ValueError(f"lr policy in checkpoint is {state.get('kind')!r}, config says {self.cfg.kind!r}")
        for key in ("epoch", "current", "best_error", "bad_epochs", "reductions", "should_stop"):
            setattr(self, key, state[key])
