"""Where a process computes and in what precision: the device choice, TF32, and the
DataParallel wrappers that run each replica under the run's autocast.

Usage::

    device, line = resolve_device(cfg.train.device, dist.local_rank, dist.world_size)
    configure_cuda(cfg.train.tf32)
    net = FeaturesDataParallel(model, amp_dtype=torch.bfloat16)   # dist.mode: dp
"""
from __future__ import annotations

from typing import Callable

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


def amp_dtype(amp: str, device: torch.device, log: Callable[[str], None]) -> torch.dtype | None:
    """The autocast dtype of ``train.amp`` on ``device`` (None: float32), saying why when it falls back.

    ``auto`` is bf16 where the GPU has it and float32 elsewhere, silently: it is what the
    shipped configs ask for, and a CPU run of them is no mistake worth a notice."""
    if amp == "none":
        return None
    if amp == "auto":
        usable = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if usable else None
    if device.type != "cuda":
        log(f"notice: train.amp={amp} needs a CUDA device; training in float32")
        return None
    if amp == "bf16" and not torch.cuda.is_bf16_supported():
        log("notice: train.amp=bf16: this GPU has no bfloat16; training in float32")
        return None
    return torch.bfloat16 if amp == "bf16" else torch.float16


# train.compile_mode values whose compiled steps replay as CUDA graphs
GRAPH_MODES = ("reduce-overhead", "max-autotune")


def compiled(net: nn.Module, enabled: bool, log: Callable[[str], None], mode: str = "default") -> nn.Module:
    """``torch.compile(net, mode=...)`` for ``train.compile`` / ``train.compile_mode``, where this torch has it."""
    if not enabled:
        return net
    if not hasattr(torch, "compile"):
        log("notice: train.compile: this torch has no torch.compile; running eagerly")
        return net
    return torch.compile(net, mode=None if mode == "default" else mode)


def uses_cuda_graphs(enabled: bool, mode: str, device: torch.device) -> bool:
    """Whether the compiled steps run as CUDA graphs (each step then marks its start)."""
    return enabled and mode in GRAPH_MODES and device.type == "cuda"


def wrap(model: nn.Module, mode: str, device: torch.device, distributed: bool, dtype: torch.dtype | None,
         log: Callable[[str], None]) -> nn.Module:
    """``model`` as ``dist.mode`` runs it: DataParallel over the features (dp, 2+ GPUs), DDP on
    this rank's device (ddp under a launch of several processes), or as it is."""
    if mode == "dp":
        if device.type != "cuda" or torch.cuda.device_count() < 2:
            log("notice: dist.mode=dp needs 2+ CUDA devices; training on one device")
            return model
        return FeaturesDataParallel(model, dtype)
    if mode == "ddp" and distributed:
        ids = [device.index] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)
    return model


def settle_ddp_buckets(net: nn.Module, optimizer: torch.optim.Optimizer, blank: torch.Tensor,
                       dtype: torch.dtype | None) -> None:
    """One zero-weight forward and backward before the first step, so every step of every
    launch all-reduces its gradients in the same bucket layout.

    DDP lays its buckets out anew after its first backward pass, in the order gradients
    became ready.  A resumed launch's first step would otherwise all-reduce in the initial
    layout where the uninterrupted run, at that step, used the rebuilt one; with more than
    two ranks the sums then run in another order and the weights differ in the last bit
    (measured with 4 gloo ranks).  The optimizer does not step and dropout's random state
    is put back, so the run is as without it.  ``blank``: zeros in the input's shape and layout.
    """
    device = blank.device
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        logits = net(blank)
    (logits.float().sum() * 0.0).backward()
    optimizer.zero_grad(set_to_none=True)
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)


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
