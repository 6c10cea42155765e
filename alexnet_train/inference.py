"""Load a model for evaluation, export or prediction: our checkpoints or a torchvision state_dict.

Usage::

    loaded = load_for_inference("runs/paper/best.pth")           # ours
    loaded = load_for_inference("alexnet-owt-7be5be79.pth")      # torchvision's weights
    loaded.model, loaded.classes, loaded.data    # eval-mode model, wnids, preprocessing (DataConfig)

A plain torchvision AlexNet state_dict (``features.0.weight`` ...) is evaluated
as torchvision evaluates it: its ``alexnet`` architecture, resize 256, centre
224, ImageNet mean/std, and the 1000 ILSVRC-2012 classes in sorted wnid order.
"""
from __future__ import annotations

from dataclasses import dataclass
from importlib import resources

import torch
from torch import nn

from . import checkpoint as ckpt
from .config import Config, DataConfig, ModelConfig, replace
from .configload import config_from_dict
from .model import build_model

TORCHVISION_KEYS = ("features.0.weight", "features.3.weight", "classifier.6.weight")


def imagenet_wnids() -> list[str]:
    """The 1000 ILSVRC-2012 class wnids in sorted (ImageFolder) order."""
    text = resources.files("alexnet_train").joinpath("imagenet_wnids.txt").read_text()
    return text.split()


@dataclass
class Loaded:
    model: nn.Module
    classes: list[str]
    data: DataConfig  # preprocessing: resize/crop sizes, normalisation
    config: Config | None  # None for a plain state_dict
    kind: str  # "alexnet-train" or "torchvision state_dict"


def is_torchvision_state_dict(state: dict) -> bool:
    return all(k in state and isinstance(state[k], torch.Tensor) for k in TORCHVISION_KEYS) and "config" not in state


def load_for_inference(path: str, device: torch.device | str = "cpu") -> Loaded:
    """The model in eval mode on ``device``; CheckpointError names the file when it is neither kind."""
    state = ckpt.load_checkpoint(path)
    if ckpt.is_training_checkpoint(state):
        cfg = config_from_dict(state["config"])
        model = build_model(replace(cfg, "model", init="torch").model)
        model.load_state_dict(state["model"])
        loaded = Loaded(model, list(state["classes"]), cfg.data, cfg, "alexnet-train")
    elif is_torchvision_state_dict(state):
        num_classes = state["classifier.6.weight"].shape[0]
        if num_classes != 1000:
            raise ckpt.CheckpointError(
                f"{path}: a plain state_dict with {num_classes} classes: its class list is unknown "
                "(only ImageNet's 1000 are assumed)"
            )
        if state["features.0.weight"].shape[0] != 64:
            raise ckpt.CheckpointError(f"{path}: a state_dict, but not of torchvision's AlexNet")
        model = build_model(ModelConfig(arch="torchvision", num_classes=1000, init="torch"))
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            raise ckpt.CheckpointError(f"{path}: not torchvision's AlexNet state_dict ({str(exc).splitlines()[0]})") from None
        data = DataConfig(resize_size=256, crop_size=224, normalize="torchvision", pca_std=0.0)
        loaded = Loaded(model, imagenet_wnids(), data, None, "torchvision state_dict")
    else:
        raise ckpt.CheckpointError(f"{path}: neither an alexnet-train checkpoint nor a torchvision AlexNet state_dict")
    loaded.model.to(device).eval()
    return loaded
