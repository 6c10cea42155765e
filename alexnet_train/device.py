"""Where a process computes: the device choice (one place), CUDA's settings, the memory
format, and the device's memory when it runs out.

Usage::

    device, line = resolve_device(cfg.train.device, dist.local_rank, dist.world_size)
    configure_device(device, cfg.train.tf32, cfg.train.threads)
    model = model.to(device, memory_format=MEMORY_FORMATS[cfg.train.channels_last])
"""
from __future__ import annotations

import torch

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


# train.channels_last -> the memory format of the model's weights and of its inputs
MEMORY_FORMATS = {False: torch.preserve_format, True: torch.channels_last}


def configure_device(device: torch.device, tf32: bool, threads: int) -> None:
    """CUDA's settings (:func:`configure_cuda`) on a GPU; ``train.threads`` (0: torch's choice) on the CPU."""
    if device.type == "cuda":
        configure_cuda(tf32)
    elif threads:
        torch.set_num_threads(threads)


def configure_cuda(tf32: bool) -> None:
    """cuDNN autotuning (the input size is fixed) and the TF32 choice for float32 work."""
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32


# What the CPU allocator's failure says (a RuntimeError, not torch.OutOfMemoryError).
_CPU_OOM = ("DefaultCPUAllocator: can't allocate memory", "DefaultCPUAllocator: not enough memory")


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is a device running out of memory: CUDA's OutOfMemoryError, the CPU
    allocator's failure, or Python's MemoryError."""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(exc, RuntimeError) and any(text in str(exc) for text in _CPU_OOM)


def memory_line(device: torch.device) -> str:
    """The device's memory as the out-of-memory message gives it (empty where it cannot be read)."""
    if device.type != "cuda":
        return ""
    try:
        free, total = torch.cuda.mem_get_info(device)
        held = torch.cuda.memory_reserved(device)
    except Exception:  # noqa: BLE001 - a broken context: the message goes without it
        return ""
    gib = 2 ** 30
    return f"; {device}: {total / gib:.1f} GiB, {held / gib:.1f} GiB held by this process, {free / gib:.1f} GiB free"
