"""Data: presets (transforms), datasets (ImageFolder and flat val), loaders, and the demo set."""
from __future__ import annotations

from typing import Callable

from ..config import Config, replace
from .datasets import BadImageError, DataError
from .loaders import Splits, resolve_splits

__all__ = ["BadImageError", "DataError", "Splits", "resolve_splits", "with_demo_data"]


def with_demo_data(cfg: Config, log: Callable[[str], None] = print) -> Config:
    """With ``data.demo: true``, fill an unset train_dir/val_dir with the demo ImageFolder (made once)."""
    if not cfg.data.demo or (cfg.data.train_dir and cfg.data.val_dir):
        return cfg
    from .demo import ensure_demo_dataset

    train_dir, val_dir = ensure_demo_dataset(cfg.data.demo_cache, log=log)
    return replace(cfg, "data", train_dir=cfg.data.train_dir or str(train_dir), val_dir=cfg.data.val_dir or str(val_dir))
