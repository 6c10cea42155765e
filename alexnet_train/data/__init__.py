"""Data: presets (transforms), datasets (ImageFolder and flat val), loaders, and the demo set."""
from __future__ import annotations

from typing import Callable

from ..config import Config, ConfigError, replace
from .datasets import BadImageError, DataError
from .loaders import Splits, resolve_splits

__all__ = ["BadImageError", "DataError", "Splits", "resolve_splits", "with_demo_data"]


def with_demo_data(cfg: Config, log: Callable[[str], None] = print) -> Config:
    """With ``data.demo: true``, generate the demo ImageFolder once and point train_dir/val_dir at it."""
    if not cfg.data.demo:
        return cfg
    if cfg.data.train_dir or cfg.data.val_dir:
        raise ConfigError("data.demo: true generates its own data; leave data.train_dir and data.val_dir unset")
    from .demo import ensure_demo_dataset

    train_dir, val_dir = ensure_demo_dataset(cfg.data.demo_cache, log=log)
    return replace(cfg, "data", train_dir=str(train_dir), val_dir=str(val_dir))
