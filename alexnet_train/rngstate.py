"""The run's random state: per-rank seeding, capture into checkpoints, the per-step noise seed.

Usage::

    seed_rank(seed, rank)                 # python, numpy and torch streams of this rank
    state = rng_state()                   # this process's streams, for a checkpoint
    ranks = gather_rng_states(dist)       # every rank's, in rank order (rank 0 saves them)
    restore_rng_states(checkpoint, dist)  # each rank continues its own streams
    step_seed(seed, epoch, step)          # the colour noise's seed: a pure function

Dropout differs per rank (seed + rank), so exact resume needs every rank's own streams:
rank 0 gathers them at each save.  The colour noise of a step is drawn from a generator
seeded by (seed, epoch, step) alone, so a resumed run draws exactly what an uninterrupted
one drew at that step.
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
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # The current GPU's alone, this rank's (the lifecycle makes it current): the states of
        # all visible GPUs would open a CUDA context on each, in every rank, at every save.
        state["cuda_device"] = torch.cuda.get_rng_state()
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
    """This rank's streams from a checkpoint; one from another world size, or from before
    per-rank states, gives every rank rank 0's."""
    ranks = saved.get("rng_ranks") or []
    set_rng_state(ranks[dist.rank] if len(ranks) == dist.world_size else saved["rng"])


def step_seed(seed: int, epoch: int, step: int) -> int:
    """Seed of the device-side colour noise of one training step (a pure function, for exact resume)."""
    return (((seed * 1_000_003) + epoch) * 1_000_003 + step) & 0x7FFF_FFFF_FFFF_FFFF
