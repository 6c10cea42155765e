"""The model as the run executes it: DataParallel over the features (dist.mode dp), DDP on this
rank's device (ddp), torch.compile, and DDP's bucket layout settled before the first step.

Usage::

    net = wrap(model, cfg.dist.mode, device, dist.distributed, dtype, log)
    net = compiled(net, cfg.train.compile, log, cfg.train.compile_mode)
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .precision import Autocast


class FeaturesDataParallel(nn.Module):
    """DataParallel over the conv ``features`` only; the FC layers run on the first GPU.

    The FC layers hold 58 of AlexNet's 61M parameters but little of its compute:
    DataParallel re-broadcasts every replicated parameter each step, so replicating
    them costs more than it saves (pytorch/examples' imagenet/main.py wraps AlexNet
    this way for that reason).  The wrapped model's own state_dict is unchanged.
    ``amp_dtype``: the autocast dtype each replica runs in (see :class:`~alexnet_train.precision.Autocast`).
    """

    def __init__(self, model: nn.Module, amp_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.module = model
        self.parallel_features = nn.DataParallel(Autocast(model.features, "cuda", amp_dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.parallel_features(x)
        x = self.module.avgpool(x)
        return self.module.classifier(torch.flatten(x, 1))


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
