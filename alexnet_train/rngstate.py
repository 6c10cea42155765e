"""The run's random state: per-rank seeding, capture into checkpoints, the per-step noise seed.

Usage::

    seed_rank(seed, rank)                 # python, numpy and torch streams of this rank
    state = rng_state()                   # this process's streams, for a checkpoint
    ranks = gather_rng_states(dist)       # every rank's, in rank order (rank 0 saves them)
    restore_rng_states(checkpoint, dist)  # each rank continues its own streams
    recorded_run(checkpoint)              # (world size, device type, GPU name) that wrote them
    step_seed(seed, epoch, step)          # the colour noise's seed: a pure function

Dropout differs per rank (seed + rank), so exact resume needs every rank's own streams:
rank 0 gathers them at each save, one per rank, each with the device it was drawn on.  The
colour noise of a step is drawn from a generator seeded by (seed, epoch, step) alone, so a
resumed run draws exactly what an uninterrupted one drew at that step, on the same number of
ranks and the same device type.  Resumed on another number of ranks, each rank the
checkpoint has goes on with its own streams and each it lacks starts a fresh one of its own
(seeded from seed, rank and step): the run goes on, no longer exactly (docs/fault-tolerance.md,
"Resuming elsewhere").
"""
from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

from .distributed import DistInfo, all_gather


def seed_rank(seed: int, rank: int) -> None:
    random.seed(seed + rank)
    np.random.seed((seed + rank) % 2**32)
    torch.manual_seed(seed + rank)


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    state["device"], state["device_name"] = "cpu", None
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # The current GPU's alone, this rank's (the lifecycle makes it current): the states of
        # all visible GPUs would open a CUDA context on each, in every rank, at every save.
        state["cuda_device"] = torch.cuda.get_rng_state()
        # Which generator drew dropout, and on what (another GPU model rounds differently).
        state["device"], state["device_name"] = "cuda", torch.cuda.get_device_name()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_tuples(state["python"]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda_device" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda_device"])
    elif "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])  # a checkpoint written before "cuda_device"


def _tuples(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_tuples(v) for v in value)
    return value


def gather_rng_states(dist: DistInfo) -> list[dict]:
    """Every rank's :func:`rng_state`, in rank order (a collective under DDP: all ranks call it)."""
    state = rng_state()
    return all_gather(state, dist.world_size) if dist.distributed else [state]


def restore_rng_states(saved: dict, dist: DistInfo) -> None:
    """This rank's streams from a checkpoint.  A rank the checkpoint has no streams for (more
    ranks than wrote it, or one written before per-rank states, which holds rank 0's alone)
    starts fresh ones from (train.seed, rank, global step): not rank 0's, whose dropout masks
    it would repeat.  The same checkpoint resumed on the same ranks always draws the same."""
    ranks = saved.get("rng_ranks") or [saved["rng"]]
    if dist.rank < len(ranks):
        set_rng_state(ranks[dist.rank])
        if "cuda_device" not in ranks[dist.rank] and "cuda" not in ranks[dist.rank] and torch.cuda.is_available():
            torch.cuda.manual_seed(_fresh_seed(saved, dist.rank))  # written on the CPU: no CUDA stream to go on with
    else:
        seed_rank(_fresh_seed(saved, dist.rank), 0)


def _fresh_seed(saved: dict, rank: int) -> int:
    seed = int(((saved.get("config") or {}).get("train") or {}).get("seed") or 0)
    return step_seed(seed + rank, -1, int(saved.get("global_step") or 0))  # epoch -1: no colour noise seed's


def recorded_run(saved: dict) -> tuple[int | None, str | None, str | None]:
    """(world size, device type, GPU name) of the run that wrote checkpoint ``saved``, each None
    where it does not say: the number of per-rank states, and rank 0's device (a checkpoint from
    before ``device`` was recorded: cuda where it holds a CUDA state, else cpu; no GPU name)."""
    ranks = saved.get("rng_ranks")
    world = len(ranks) if isinstance(ranks, list) and ranks else None
    first = (ranks[0] if world else saved.get("rng")) or {}
    if "device" in first:
        return world, first["device"], first.get("device_name")
    if not first:
        return world, None, None
    return world, ("cuda" if "cuda_device" in first or "cuda" in first else "cpu"), None


def step_seed(seed: int, epoch: int, step: int) -> int:
    """Seed of the device-side colour noise of one training step (a pure function, for exact resume)."""
    return (((seed * 1_000_003) + epoch) * 1_000_003 + step) & 0x7FFF_FFFF_FFFF_FFFF
