"""Reading a config: YAML files (with ``include:``), ``--set`` overrides, type checks, dumping.

The sections and their validation live in :mod:`alexnet_train.config`, which this
module reads and which imports nothing from here::

    from alexnet_train.configload import load_config, dump_yaml
"""
from __future__ import annotations

import dataclasses
import math
import os
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from .config import SECTIONS, Config
from .errors import ConfigError


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin is typing.Union:
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        args = typing.get_args(tp)
        return f"list of {_type_name(args[0])}"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Return ``value`` as type ``tp`` or raise ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    bad = ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    if origin is typing.Union:
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except ConfigError:
                pass
        raise bad
    if origin is Literal:
        if value in typing.get_args(tp) and isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected one of {_type_name(tp)}, got {value!r}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise bad
        (inner, *_rest) = typing.get_args(tp)
        return tuple(_coerce(f"{key}[{i}]", v, inner) for i, v in enumerate(value))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(float(value)):
                raise ConfigError(f"{key}: must be a finite number, got {value!r}")
            return float(value)
        # YAML 1.1 reads "5e-4" (no dot) as a string; accept it as the number it means.
        if isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                raise bad from None
            if math.isfinite(number):
                return number
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        # Paths like 2012 or numbers as names are still strings to the user.
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad
    raise bad


def _build_section(name: str, raw: Any, where: str) -> Any:
    cls = SECTIONS[name]
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: section '{name}' must be a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    valid = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        if key not in hints:
            raise ConfigError(
                f"{where}: unknown key '{name}.{key}' (valid keys in {name}: {', '.join(valid)})"
            )
        kwargs[key] = _coerce(f"{name}.{key}", value, hints[key])
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _read_yaml(path: Path) -> dict:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config ({exc.strerror})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}: invalid YAML{at}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    return raw


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _load_raw(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """The file's mapping with its ``include:`` files merged underneath it."""
    raw = _read_yaml(path)
    includes = raw.pop("include", None) or []
    if isinstance(includes, str):
        includes = [includes]
    if not isinstance(includes, list) or not all(isinstance(i, str) for i in includes):
        raise ConfigError(f"{path}: 'include' must be a file name or a list of file names")
    merged: dict = {}
    for inc in includes:
        inc_path = (path.parent / inc) if not os.path.isabs(inc) else Path(inc)
        if inc_path.resolve() in seen:
            raise ConfigError(f"{path}: include cycle through {inc_path}")
        merged = _merge(merged, _load_raw(inc_path, seen + (path.resolve(),)))
    return _merge(merged, raw)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"optim.lr=0.1"`` -> (["optim", "lr"], 0.1); the value is a YAML scalar (or flow list)."""
    if "=" not in text:
        raise ConfigError(f"--set {text}: expected KEY=VALUE, e.g. optim.lr=0.02")
    key, _, value_text = text.partition("=")
    parts = key.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"--set {text}: KEY must be SECTION.NAME, e.g. optim.lr")
    try:
        value = yaml.safe_load(value_text) if value_text.strip() else ""
    except yaml.YAMLError:
        raise ConfigError(f"--set {text}: value is not valid YAML") from None
    return parts, value


def build_config(raw: dict, where: str = "config") -> Config:
    unknown = [k for k in raw if k not in SECTIONS]
    if unknown:
        raise ConfigError(
            f"{where}: unknown section '{unknown[0]}' (valid sections: {', '.join(SECTIONS)})"
        )
    return Config(**{name: _build_section(name, raw.get(name), where) for name in SECTIONS})


def load_config(path: str | os.PathLike | None = None, overrides: list[str] = ()) -> Config:
    """The config from ``path`` (or the defaults) with ``--set`` overrides applied, validated."""
    raw = _load_raw(Path(path)) if path is not None else {}
    where = str(path) if path is not None else "config"
    for text in overrides:
        (section, key), value = parse_override(text)
        if section not in SECTIONS:
            raise ConfigError(f"--set {text}: unknown section '{section}' (valid sections: {', '.join(SECTIONS)})")
        sect = raw.get(section)
        raw[section] = dict(sect) if isinstance(sect, dict) else {}
        raw[section][key] = value
        # Type-check each override on its own so the message names the --set at fault;
        # cross-field checks run on the whole config below.
        hints = typing.get_type_hints(SECTIONS[section])
        if key not in hints:
            raise ConfigError(
                f"--set {text}: unknown key '{section}.{key}' (valid keys in {section}: {', '.join(hints)})"
            )
        try:
            _coerce(f"{section}.{key}", value, hints[key])
        except ConfigError as exc:
            raise ConfigError(f"--set {text}: {exc}") from None
    if overrides:
        where = f"{where} with --set"
    return build_config(raw, where)


def config_to_dict(cfg: Config) -> dict:
    def plain(value: Any) -> Any:
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(dataclasses.asdict(cfg))


def config_from_dict(raw: dict) -> Config:
    """Rebuild a Config saved by :func:`config_to_dict` (e.g. from a checkpoint)."""
    return build_config(raw, "checkpoint config")


class _Dumper(yaml.SafeDumper):
    """Block-style sections with short lists of numbers on one line."""


def _represent_list(dumper: yaml.SafeDumper, data: list) -> yaml.Node:
    flow = all(not isinstance(v, (list, dict)) for v in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_Dumper.add_representer(list, _represent_list)


def dump_yaml(cfg: Config | dict) -> str:
    data = cfg if isinstance(cfg, dict) else config_to_dict(cfg)
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, default_flow_style=False)
