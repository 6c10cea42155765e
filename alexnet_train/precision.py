"""Where a process computes and in what precision: the device choice, TF32, and the
DataParallel wrappers that run each replica under the run's autocast.

Usage::

    device, line = resolve_device(cfg.train.device, dist.local_rank, dist.world_size)
    configure_cuda(cfg.train.tf32)
    net = FeaturesDataParallel(model, amp_dtype=torch.bfloat16)   # dist.mode: dp
"""
from __future__ import annotations

import torch
from torch import nn

from .distributed import rank_gpu
from .errors import ConfigError


def cuda_problem() -> str | None:
    """None where CUDA works here; otherwise what torch reported, as one line."""
    try:
        torch.cuda.init()  # raises with torch's reason: no driver, no device, a build without CUDA ...
    except Exception as exc:  # noqa: BLE001 - whatever it raises is the reason to report
        return " ".join(str(exc).split()) or type(exc).__name__
    if torch.cuda.device_count() == 0:
        return "torch.cuda.device_count() is 0"
    return None


def resolve_device(kind: str, local_rank: int = 0, world_size: int = 1,
                   setting: str = "train.device") -> tuple[torch.device, str]:
    """(device, what it is and why) for ``kind``: auto | cpu | cuda (and cuda:N, for evaluation
    in one process).  The one place a process's device is chosen.

    A CUDA device always carries its index, the GPU of :func:`~alexnet_train.distributed.rank_gpu`
    for ``local_rank`` among the GPUs this process sees, so nothing that later moves a tensor or
    a model depends on which device happens to be current.  ``cuda`` without a usable GPU, a
    ``cuda:N`` under a launch of several processes (every rank would take GPU N), or more local
    ranks than visible GPUs is a ConfigError naming ``setting``; ``auto`` without a GPU falls
    back to the CPU and says why.
    """
    if kind == "cpu":
        return torch.device("cpu"), f"cpu ({setting}: cpu)"
    try:
        requested = torch.device(kind if kind != "auto" else "cuda")
    except RuntimeError as exc:
        raise ConfigError(f"{setting}: {kind!r}: {exc}") from None
    if requested.type != "cuda":
        raise ConfigError(f"{setting}: {kind!r}: expected auto, cpu, cuda or cuda:N")
    if requested.index is not None and world_size > 1:
        raise ConfigError(f"{setting}: {kind} under a launch of {world_size} processes would put every rank "
                          "on that one GPU; pass cuda (each rank takes the GPU of its local rank)")
    problem = cuda_problem()
    if problem is not None:
        if kind != "auto":
            raise ConfigError(f"{setting}: {kind}, but there is no usable CUDA device here: {problem}")
        return torch.device("cpu"), f"cpu: no CUDA device ({problem})"
    visible = torch.cuda.device_count()
    if requested.index is not None:
        if requested.index >= visible:
            raise ConfigError(f"{setting}: {kind}, but this process sees {visible} GPU(s)")
        index = requested.index
    else:
        try:
            index = rank_gpu(local_rank, visible)
        except ValueError as exc:
            raise ConfigError(f"{setting}: {kind}: {exc}") from None
    return torch.device("cuda", index), f"cuda:{index} {torch.cuda.get_device_name(index)} ({setting}: {kind})"


def configure_cuda(tf32: bool) -> None:
    """cuDNN autotuning (the input size is fixed) and the TF32 choice for float32 work."""
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32


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


class FeaturesDataParallel(nn.Module):
    """DataParallel over the conv ``features`` only; the FC layers run on the first GPU.

    The FC layers hold 58 of AlexNet's 61M parameters but little of its compute:
    DataParallel re-broadcasts every replicated parameter each step, so replicating
    them costs more than it saves (pytorch/examples' imagenet/main.py wraps AlexNet
    this way for that reason).  The wrapped model's own state_dict is unchanged.
    ``amp_dtype``: the autocast dtype each replica runs in (see :class:`Autocast`).
    """

    def __init__(self, model: nn.Module, amp_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.module = model
        self.parallel_features = nn.DataParallel(Autocast(model.features, "cuda", amp_dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.parallel_features(x)
        x = self.module.avgpool(x)
        return self.module.classifier(torch.flatten(x, 1))
