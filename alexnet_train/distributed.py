"""Process topology from torchrun's environment, and model wrapping.

Usage::

    dist = DistInfo.from_env()      # rank 0 of 1 when not launched by torchrun
    if dist.is_main: write_logs()
    totals = all_reduce_sum(totals)  # exact metrics over the shards of a val set
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping

import torch


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "DistInfo":
        """Read RANK / WORLD_SIZE / LOCAL_RANK as torchrun sets them (pure: no process group)."""
        env = os.environ if env is None else env
        try:
            return cls(
                rank=int(env.get("RANK", 0)),
                world_size=int(env.get("WORLD_SIZE", 1)),
                local_rank=int(env.get("LOCAL_RANK", 0)),
            )
        except ValueError as exc:
            raise ValueError(f"torchrun environment: {exc}") from None


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over all processes of the initialised group (in place) and return it."""
    import torch.distributed as tdist

    tdist.all_reduce(t)
    return t
