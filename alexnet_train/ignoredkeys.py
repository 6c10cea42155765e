"""The config keys that another setting makes ignored, each with one notice line at start.

Usage::

    from alexnet_train.ignoredkeys import ignored_notices

    for line in ignored_notices(cfg):   # rank 0, before training (lifecycle does this)
        log(line)   # notice: schedule.patience=8 has no effect under schedule.kind: cosine (only plateau uses it)

A key is named only when it is set away from its default, so a config that never mentions
it stays quiet, as for the model keys that only some archs use (``model.groups`` under
``model.arch: torchvision``: :meth:`~alexnet_train.config.ModelConfig.ignored_notices`,
whose lines come first here).  Each rule below was checked against the code that reads the
key; a key a setting really does change is not here (``data.pca_std`` works under
``augment: torchvision`` too, ``optim.head_lr_mult`` without ``model.weights``).  To add
one: a :class:`Rule` naming the keys, when they are unused, and the setting that makes them so.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

from .config import Config
from .data.shards import is_shard_source


@dataclass(frozen=True)
class Rule:
    keys: tuple[str, ...]               # "section.key", each with a default to compare against
    unused: Callable[[Config], bool]    # whether this config leaves them unread
    under: Callable[[Config], str]      # the setting that does, as the notice names it
    used: str                           # where they do matter, for the notice's parenthesis


RULES: tuple[Rule, ...] = (
    Rule(("data.val_labels",), lambda c: is_shard_source(c.data.val_dir),
         lambda c: f"data.val_dir: {c.data.val_dir}", "WebDataset shards carry their own labels"),
    Rule(("data.center_square",), lambda c: c.data.augment != "paper",
         lambda c: f"data.augment: {c.data.augment}", "only augment paper uses it"),
    Rule(("data.std",), lambda c: c.data.normalize != "torchvision",
         lambda c: f"data.normalize: {c.data.normalize}", "only normalize torchvision divides by it"),
    Rule(("data.eigval", "data.eigvec"), lambda c: c.data.pca_std == 0,
         lambda c: "data.pca_std: 0", "the PCA colour noise is off"),
    Rule(("data.max_bad_fraction",), lambda c: c.data.on_bad_image != "skip",
         lambda c: f"data.on_bad_image: {c.data.on_bad_image}", "only on_bad_image skip uses it"),
    Rule(("data.demo_cache",), lambda c: not c.data.demo or bool(c.data.train_dir and c.data.val_dir),
         lambda c: ("data.demo: false" if not c.data.demo else "data.train_dir and data.val_dir both set"),
         "only a demo run that fills in a folder uses it"),
    Rule(("model.towers",), lambda c: c.model.effective_groups == 1 and c.model.arch != "torchvision",
         lambda c: f"model.groups: {c.model.groups}", "only groups > 1 has towers"),
    Rule(("optim.decay_biases",), lambda c: c.optim.weight_decay == 0,
         lambda c: "optim.weight_decay: 0", "nothing decays"),
    Rule(("schedule.patience", "schedule.max_reductions", "schedule.threshold", "schedule.stop_after_last_plateau"),
         lambda c: c.schedule.kind != "plateau", lambda c: f"schedule.kind: {c.schedule.kind}",
         "only plateau uses it"),
    Rule(("schedule.factor",), lambda c: c.schedule.kind == "cosine",
         lambda c: f"schedule.kind: {c.schedule.kind}", "only plateau and step use it"),
    Rule(("schedule.step_size",), lambda c: c.schedule.kind != "step",
         lambda c: f"schedule.kind: {c.schedule.kind}", "only step uses it"),
    Rule(("schedule.min_lr",), lambda c: c.schedule.kind != "cosine",
         lambda c: f"schedule.kind: {c.schedule.kind}", "only cosine uses it"),
    Rule(("train.compile_mode",), lambda c: not c.train.compile,
         lambda c: "train.compile: false", "only a compiled model uses it"),
    Rule(("train.threads",), lambda c: c.train.device == "cuda",
         lambda c: "train.device: cuda", "only a CPU run sets torch's threads"),
    Rule(("train.tf32",), lambda c: c.train.device == "cpu",
         lambda c: "train.device: cpu", "TF32 is a CUDA setting"),
    Rule(("dist.backend", "dist.timeout_minutes", "dist.save_timeout_minutes"), lambda c: c.dist.mode != "ddp",
         lambda c: f"dist.mode: {c.dist.mode}", "only ddp has a process group"),
)


def _default(section: Any, key: str) -> Any:
    f = next(f for f in dataclasses.fields(section) if f.name == key)
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def _show(value: Any) -> str:
    """A value as it is written in YAML or ``--set``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, tuple):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    return f"{value:g}" if isinstance(value, float) else str(value)


def ignored_keys(cfg: Config) -> list[tuple[str, Rule]]:
    """(key, the rule that ignores it) for each key set away from its default that ``cfg`` does not use."""
    found = []
    for rule in RULES:
        if not rule.unused(cfg):
            continue
        for key in rule.keys:
            section, name = key.split(".")
            part = getattr(cfg, section)
            if getattr(part, name) != _default(part, name):
                found.append((key, rule))
    return found


def ignored_notices(cfg: Config) -> list[str]:
    """One ``notice:`` line per ignored key: the model's (arch) first, then :data:`RULES`'.  Reads
    the filesystem only to ask whether ``data.val_dir`` holds shards."""
    lines = cfg.model.ignored_notices()
    for key, rule in ignored_keys(cfg):
        section, name = key.split(".")
        value = _show(getattr(getattr(cfg, section), name))
        lines.append(f"notice: {key}={value} has no effect under {rule.under(cfg)} ({rule.used})")
    return lines
