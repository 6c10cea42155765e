"""In what precision a process computes: the autocast dtype of ``train.amp`` on a device, and
a module that runs under it in whatever thread calls it (DataParallel's replicas).

Usage::

    dtype = amp_dtype(cfg.train.amp, device, log)      # None: float32
    net = Autocast(model.features, "cuda", dtype)
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn


class Autocast(nn.Module):
    """Runs ``module`` under autocast to ``dtype`` (None: as it is), inside its own forward.

    DataParallel runs each replica in a thread of its own, and autocast's state is per
    thread: its ``parallel_apply`` re-enables autocast there, but with the device's
    default dtype (fp16), so a bf16 run's replicas ran in fp16.  Autocast inside the
    replicated forward is PyTorch's documented remedy.
    """

    def __init__(self, module: nn.Module, device_type: str, dtype: torch.dtype | None) -> None:
        super().__init__()
        self.module, self.device_type, self.dtype = module, device_type, dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device_type, dtype=self.dtype, enabled=self.dtype is not None):
            return self.module(x)


def native_bf16() -> bool:
    """Whether the current CUDA GPU computes in bfloat16 itself (Ampere and later).  Plain
    ``torch.cuda.is_bf16_supported()`` also says yes where bf16 is only emulated (V100, T4:
    pytorch/pytorch#148322), slower than float32 there, so ``train.amp: auto`` asks this."""
    return torch.cuda.is_bf16_supported(including_emulation=False)


def amp_dtype(amp: str, device: torch.device, log: Callable[[str], None]) -> torch.dtype | None:
    """The autocast dtype of ``train.amp`` on ``device`` (None: float32), saying why when it falls back.

    ``auto`` is bf16 where the GPU has it natively and float32 elsewhere, silently: it is what the
    shipped configs ask for, and a CPU run of them is no mistake worth a notice."""
    if amp == "none":
        return None
    if amp == "auto":
        usable = device.type == "cuda" and native_bf16()
        return torch.bfloat16 if usable else None
    if device.type != "cuda":
        log(f"notice: train.amp={amp} needs a CUDA device; training in float32")
        return None
    if amp == "bf16" and not torch.cuda.is_bf16_supported():
        log("notice: train.amp=bf16: this GPU has no bfloat16; training in float32")
        return None
    return torch.bfloat16 if amp == "bf16" else torch.float16
