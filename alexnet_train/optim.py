"""The run's SGD: parameter groups (decay, frozen layers, the head's lr multiplier) and
momentum buffers that exist before the first step.

Usage::

    optimizer = build_sgd(model, cfg.optim, fused=device.type == "cuda")
"""
from __future__ import annotations

import torch
from torch import nn

from .config import OptimConfig
from .transfer import HEAD


def param_groups(model: nn.Module, weight_decay: float, decay_biases: bool,
                 split_head: bool = False) -> list[dict]:
    """SGD groups over the trainable parameters (frozen ones get no decay and no momentum buffer).

    Weights (and biases, with ``decay_biases``) decay; with ``split_head`` the last layer
    (FC8, ``classifier.6``) gets groups of its own, marked ``head``, whose lr is the epoch's
    lr times ``optim.head_lr_mult``.  Empty groups are left out.
    """
    # Decaying group first: the order checkpoints written before the head split expect.
    groups: dict[tuple[bool, bool], list] = {(h, d): [] for h in (False, True) for d in (True, False)}
    for name, param in model.named_parameters():
        if param.requires_grad:
            head = split_head and name.startswith(HEAD + ".")
            groups[head, decay_biases or not name.endswith(".bias")].append(param)
    return [{"params": params, "weight_decay": weight_decay if decay else 0.0, "head": head}
            for (head, decay), params in groups.items() if params]


def build_sgd(model: nn.Module, cfg: OptimConfig, fused: bool) -> torch.optim.SGD:
    """The run's SGD over :func:`param_groups`, its momentum started (:func:`start_momentum`)."""
    optimizer = torch.optim.SGD(
        param_groups(model, cfg.weight_decay, cfg.decay_biases, split_head=cfg.head_lr_mult != 1.0),
        lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, **({"fused": True} if fused else {}),
    )
    start_momentum(optimizer)
    return optimizer


def start_momentum(optimizer: torch.optim.SGD) -> None:
    """Give every parameter a zero momentum buffer where it has none yet.

    SGD makes the buffers at its first step.  The fused kernel allocates them uninitialised
    (``empty_like``) and fills them in the kernel, which returns before writing anything when
    GradScaler passes it ``found_inf``: an fp16 overflow at the first step (likely at the
    starting scale of 65536) left garbage as momentum, and step 2 applied it to the weights.
    With a zero buffer the first real step is the same one SGD takes without it
    (momentum * 0 + grad = grad: dampening is 0), on every kernel.
    """
    for group in optimizer.param_groups:
        if not group["momentum"]:
            continue
        for param in group["params"]:
            state = optimizer.state[param]
            if state.get("momentum_buffer") is None:
                state["momentum_buffer"] = torch.zeros_like(param, memory_format=torch.preserve_format)
