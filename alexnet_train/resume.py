"""Where a run resumes from, decided by rank 0 and confirmed by every rank.

Usage::

    point = decide_resume("auto", out, log)            # OUT's newest readable checkpoint, or None
    check_resume_config(point.state["config"], cfg, log)  # a changed model is refused
    state = resume_on_data(point.state, sample_lists(splits), cfg, log)  # changed data: a notice
    for line in resume_elsewhere(point.state, dist.world_size, device.type, gpu_name):  # ranks, device
        log(line)
    trim_metrics(out / "metrics.jsonl", point.state["epoch"])

Under DDP rank 0 decides (:func:`resume_decision`: the file, its size and SHA-256) and every
other rank confirms it reads the same file from the same OUT (:func:`confirm_resume`,
:func:`confirm_shared_out`): OUT must be one directory for all ranks.  Every rank reads the same
sample lists (:func:`same_sample_lists`), so :func:`resume_on_data`, a function of the checkpoint
and the lists alone, takes the same path on every rank.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import checkpoint as ckpt
from .config import Config
from .configload import config_to_dict
from .data.samples import SampleList, fingerprint
from .distributed import DistInfo
from .errors import ConfigError
from .rngstate import recorded_run

Log = Callable[[str], None]

# Keys outside the model section a checkpoint cannot be resumed under another value of: the
# optimizer's parameter groups (decay_biases, head_lr_mult) and the lr policy's saved state
# (schedule.kind) are shaped by them.
UNRESUMABLE = {("optim", "head_lr_mult"), ("optim", "decay_biases"), ("schedule", "kind")}

SHARED_OUT = "must be on storage every node sees (a shared filesystem), not node-local scratch"


@dataclass
class ResumePoint:
    path: Path
    state: dict


def decide_resume(resume: str, out: Path, log: Log) -> ResumePoint | None:
    """``--resume``: auto (OUT's newest readable checkpoint, if any), none (a fresh run; refused
    over an existing one) or a file."""
    if resume == "auto":
        found = ckpt.find_resume(out, log=log)
        return ResumePoint(*found) if found is not None else None
    if resume == "none":
        existing = [p for p in [out / "last.pth", *ckpt.epoch_checkpoints(out)] if p.exists()]
        if existing:
            raise ConfigError(f"{existing[0]}: {out} already holds a run; pass --resume auto to continue it "
                              "or choose another --out")
        return None
    path = Path(resume)
    state = ckpt.load_checkpoint(path)
    if not ckpt.is_training_checkpoint(state):
        raise ConfigError(f"{path}: not a training checkpoint of alexnet-train")
    return ResumePoint(path, state)


def check_resume_config(saved: dict, cfg: Config, log: Log) -> None:
    """Refuse a resume whose model differs from the checkpoint's; report other changed keys."""
    new = config_to_dict(cfg)
    defaults = config_to_dict(Config())  # for keys added since the checkpoint was written
    for section, values in new.items():
        old_values = saved.get(section, {})
        for key, value in values.items():
            old = old_values.get(key, defaults[section][key])
            if old == value:
                continue
            if section == "data" and key in ("train_dir", "val_dir") and old is not None:
                # Another spelling of the same folder (a symlink, another working directory) says
                # nothing; whether the data itself changed is resume_on_data's to say.
                if _same_folder(old, value):
                    continue
                log(f"notice: data.{key} changed since the checkpoint: {old!r} -> {value!r}")
                continue
            if section == "model" and key in cfg.model.unused_keys():
                continue  # the arch (unchanged, or refused above) does not use it: the model is the same
            if section == "model" and key in ("init", "weights"):
                # Only a fresh run draws or loads weights: the checkpoint's are kept (and a config
                # that changed its default init, as paper.yaml did, still resumes).
                log(f"notice: model.{key} changed since the checkpoint: {old!r} -> {value!r}; "
                    "it applies to fresh runs only, the checkpoint's weights are used")
                continue
            if section == "model" or (section, key) in UNRESUMABLE:
                raise ConfigError(
                    f"{section}.{key}: is {value!r} but the checkpoint was trained with {old!r}; "
                    f"use the checkpoint's {section} settings or another --out"
                )
            plateau = (section, key) == ("optim", "lr") and cfg.schedule.kind == "plateau"
            log(f"notice: {section}.{key} changed since the checkpoint: {old!r} -> {value!r}"
                + ("; under schedule.kind plateau the run goes on at the checkpoint's current lr (the new value "
                   "starts a fresh run: another --out)" if plateau else ""))


def _same_folder(a: str, b: str | None) -> bool:
    """Whether two spellings name one folder (a relative one as from this working directory: a
    checkpoint does not record the one its run started in)."""
    if b is None:
        return False
    try:
        return os.path.realpath(os.path.expanduser(a)) == os.path.realpath(os.path.expanduser(b))
    except (OSError, ValueError):
        return False


# What a checkpoint records of each split's data, and the config key that names the split.
SPLIT_KEYS = {"train": "data.train_dir", "val": "data.val_dir"}


def sample_lists(splits) -> dict[str, dict]:
    """Per split (train, val): ``{"samples": count, "fingerprint": ...}`` of the sample list the
    run reads (:func:`~alexnet_train.data.samples.fingerprint`: its paths relative to the
    split's root, and labels), for a checkpoint to record and a resume to compare."""
    recorded = {}
    for split in SPLIT_KEYS:
        samples = getattr(splits, split)
        if not isinstance(samples, SampleList):
            samples = SampleList.from_pairs(samples)
        recorded[split] = {"samples": len(samples), "fingerprint": fingerprint(samples)}
    return recorded


def same_sample_lists(gathered: list[dict[str, dict]]) -> None:
    """ConfigError unless every rank (``gathered``: each rank's :func:`sample_lists`, in rank
    order) reads rank 0's sample lists.  Ranks that read other lists would pick other images
    for the same index and, counting other steps per epoch, leave one another waiting; and
    they could not agree on what a resume on changed data does."""
    first = gathered[0]
    for rank, lists in enumerate(gathered):
        for split, key in SPLIT_KEYS.items():
            if lists[split] != first[split]:
                raise ConfigError(
                    f"{key}: rank {rank} reads another sample list than rank 0 ({lists[split]['samples']} samples, "
                    f"rank 0 {first[split]['samples']}): every rank must read the same data (a node-local "
                    "copy that is complete, or storage every node sees)")


def resume_on_data(state: dict, now: dict[str, dict], cfg: Config, log: Log) -> dict:
    """The checkpoint ``state`` to resume from, given the sample lists the run reads ``now``
    (:func:`sample_lists`); a one-line notice for each split that changed since the checkpoint.

    Between epochs the run goes on with the new lists.  Mid-epoch on a changed training list
    the epoch restarts from its first step: the checkpoint's step k is a position in the old
    list's shuffle order, and step k of the new list's order would see some images twice and
    skip others.  The restarted epoch sees every image of the new list once (the k steps
    already taken on the old order were extra training, as in a longer epoch), and its row in
    metrics.jsonl is of the restarted epoch alone.  A checkpoint written before sample lists
    were recorded resumes as it is, with a note that the data cannot be checked.

    A function of ``state`` and ``now`` alone: under DDP every rank holds the same checkpoint
    (:func:`confirm_resume`) and the same lists (:func:`same_sample_lists`), so every rank
    takes the same path.
    """
    saved = state.get("sample_lists")
    if not isinstance(saved, dict):
        log("note: the checkpoint records no fingerprint of its sample lists (written by an older "
            "alexnet-train): whether data.train_dir or data.val_dir changed since cannot be checked")
        return state
    epoch, step = int(state["epoch"]), int(state["step_in_epoch"])
    restart = trained = False
    for split, key in SPLIT_KEYS.items():
        old, new = saved.get(split), now[split]
        if old is None or old == new:
            continue
        counts = (f"{old['samples']} -> {new['samples']} samples" if old["samples"] != new["samples"]
                  else f"{new['samples']} samples")
        line = f"notice: {key} changed since the checkpoint ({counts}, sample list differs): "
        if split == "val":
            line += f"validation from epoch {epoch + 1} on is of the new list"
        elif step == 0:
            line += f"the run goes on with the new list from epoch {epoch + 1}"
        elif step >= _steps_per_epoch(old["samples"], state):
            line += (f"epoch {epoch + 1}'s training was complete (step {step}); its validation runs, and the new "
                     "list is used from the next epoch")
            trained = True
        else:
            line += (f"epoch {epoch + 1} restarts from its first step in the new list's order (the checkpoint is at "
                     f"step {step} of the old list's order; going on there would see some images twice and "
                     "skip others)")
            restart = True
        log(line)
    if restart:
        accum = {name: type(value)() for name, value in dict(state.get("accum") or {}).items()}
        return dict(state, step_in_epoch=0, accum=accum)
    if trained:  # the new list's whole epoch: nothing of it left to train
        return dict(state, step_in_epoch=now["train"]["samples"] // cfg.data.batch_size)
    return state


NOT_EXACT = "the run goes on, no longer bit for bit (docs/fault-tolerance.md, \"Resuming elsewhere\")"


def resume_elsewhere(state: dict, world_size: int, device_type: str, device_name: str | None = None) -> list[str]:
    """One notice line for each way this run differs from the one that wrote checkpoint ``state``
    (:func:`~alexnet_train.rngstate.recorded_run`) that makes the resume no longer exact: another
    number of processes, another device type, another GPU model.  Nothing where the checkpoint
    does not say (written before it recorded that).  Changed data is :func:`resume_on_data`'s."""
    world, device, name = recorded_run(state)
    lines = []
    if world is not None and world != world_size:
        lines.append(
            f"notice: the checkpoint was written by {world} process{'es' if world > 1 else ''}, this run has "
            f"{world_size}: each step still trains on the same images (the global batch) with the same crops, "
            f"but dropout and the colour noise are drawn per process, so from here on they differ from what "
            f"{world} would have drawn (ranks the checkpoint has go on with their own random streams, others "
            f"start fresh ones); {NOT_EXACT}")
    if device is not None and device != device_type:
        was = f"{device} ({name})" if name else device
        lines.append(
            f"notice: the checkpoint was written on {was}, this run is on {device_type}: the weights, optimizer, "
            f"lr schedule, data order and crops carry over, but dropout and the colour noise come from "
            f"{device_type}'s random generators, not the checkpoint's {device} ones, and the kernels round "
            f"differently; {NOT_EXACT}")
    elif device == device_type == "cuda" and name and device_name and name != device_name:
        lines.append(
            f"notice: the checkpoint was written on {name}, this run is on {device_name}: the random states "
            f"carry over, but kernels (dropout's included) may run and round differently on another GPU "
            f"model; {NOT_EXACT}")
    return lines


def _steps_per_epoch(samples: int, state: dict) -> int:
    """Training steps of a whole epoch of ``samples`` under the checkpoint's global batch (the
    ragged tail is left out: :class:`~alexnet_train.data.loaders.EpochSampler`)."""
    batch = int((state.get("config") or {}).get("data", {}).get("batch_size") or 1)
    return samples // max(1, batch)


def trim_metrics(path: Path, epochs_done: int) -> None:
    """Keep only the rows of epochs the resumed checkpoint already holds.

    A crash may have left one more row, or (a full disk, before rows were written in one
    piece) half of one: both go.
    """
    if not path.exists():
        return
    rows = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    keep = []
    for line in rows:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and row.get("epoch", 0) <= epochs_done:
            keep.append(line)
    if len(keep) != len(rows):
        ckpt.atomic_write_bytes(path, lambda fh: fh.write("".join(line + "\n" for line in keep).encode()))


def resume_decision(point: "ResumePoint | None", out: Path) -> tuple[str, bool, int, str] | None:
    """Rank 0's resume point as the other ranks check it: (path, whether it is a file of OUT,
    size, SHA-256), or None.  A file of OUT is named within OUT: each rank reads its own OUT
    (the same --out on every node, which must be one directory)."""
    if point is None:
        return None
    size, sha = ckpt.file_digest(point.path)
    in_out = point.path.parent.resolve() == out.resolve()
    return (point.path.name if in_out else str(point.path)), in_out, size, sha


def _where(dist: DistInfo) -> str:
    import socket

    return f"rank {dist.rank} (host {socket.gethostname()})"


def confirm_resume(decision: tuple[str, bool, int, str] | None, out: Path, dist: DistInfo) -> "ResumePoint | None":
    """This rank's copy of rank 0's resume point; ConfigError when it sees another OUT."""
    where = _where(dist)
    if decision is None:
        found = ckpt.resume_candidates(out)
        if found:
            raise ConfigError(f"{where} finds {found[0]}, but rank 0 finds no checkpoint in {out}: "
                              f"OUT {SHARED_OUT}")
        return None
    name, in_out, size, sha = decision
    path = out / name if in_out else Path(name)
    try:
        mine = ckpt.file_digest(path)
    except OSError as exc:
        raise ConfigError(f"{where} cannot read {path}, the checkpoint rank 0 resumes from "
                          f"({exc.strerror or exc}): OUT and the checkpoint {SHARED_OUT}") from None
    if mine != (size, sha):
        differs = f"{mine[0]} bytes, rank 0's {size}" if mine[0] != size else "same size, other content"
        raise ConfigError(f"{where} reads another {path} than rank 0 does ({differs}): "
                          f"OUT and the checkpoint {SHARED_OUT}")
    return ResumePoint(Path(path), ckpt.load_checkpoint(path))


def confirm_shared_out(out: Path, digest: tuple[int, str], dist: DistInfo) -> None:
    """Every rank sees the config.yaml rank 0 has just written (``digest``): OUT is one
    directory for all."""
    if dist.is_main:
        return
    try:
        mine = ckpt.file_digest(out / "config.yaml")
    except OSError:
        mine = None
    if mine != digest:
        raise ConfigError(f"{_where(dist)} does not see the {out / 'config.yaml'} rank 0 has just written: "
                          f"OUT {SHARED_OUT}")
