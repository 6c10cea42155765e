"""Starting a run from trained weights (``model.weights``) and freezing layers (``model.freeze``).

Usage::

    pretrained = load_pretrained(cfg.model, splits.classes, cfg.data, log)  # before OUT is touched
    model = build_model(cfg.model)            # every layer drawn by model.init
    pretrained.apply(model)                   # matched layers overwritten by the weights
    frozen = freeze(model, cfg.model.freeze)  # requires_grad=False; build the optimizer after

Weights come from torchvision's ImageNet weights (``torchvision``: torchvision's
weights API, which downloads once into the torch hub cache), from an
alexnet-train checkpoint of any arch, or from a plain ``state_dict``.  Tensors
are matched by name and shape.  The last layer (FC8) is the one exception: when
the weights were trained on other classes (another count, or a known class list
that differs from this run's) it keeps its fresh ``model.init`` draw.  Any
other mismatch is a :class:`WeightsError` naming the layer and both shapes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from . import checkpoint as ckpt
from .config import DataConfig, ModelConfig
from .configload import config_from_dict
from .model import AlexNet, build_model
from .errors import WeightsError

HEAD = "classifier.6"  # FC8: the layer a fine-tune draws fresh
STRIP_PREFIXES = ("module.", "_orig_mod.")  # DDP / DataParallel and torch.compile wrappers


@dataclass
class LayerLoad:
    name: str  # module name, e.g. features.0
    label: str  # conv1 ... fc8
    shapes: str  # "weight 64x3x11x11, bias 64"
    loaded: bool
    reason: str = ""


@dataclass
class Pretrained:
    """Matched tensors from ``source`` and what happens to each layer of the model."""

    source: str
    description: str
    tensors: dict[str, torch.Tensor]
    layers: list[LayerLoad] = field(default_factory=list)

    @property
    def loaded(self) -> list[str]:
        return [row.name for row in self.layers if row.loaded]

    @property
    def initialised(self) -> list[str]:
        return [row.name for row in self.layers if not row.loaded]

    def apply(self, model: nn.Module) -> None:
        """Overwrite the matched tensors of ``model`` (whose other layers keep their fresh init)."""
        state = model.state_dict()
        with torch.no_grad():
            for key, tensor in self.tensors.items():
                state[key].copy_(tensor)

    def record(self) -> dict:
        """What a checkpoint keeps about where its weights started."""
        return {"weights": self.source, "description": self.description,
                "loaded": self.loaded, "initialised": self.initialised}

    def report(self, init: str) -> list[str]:
        lines = [f"weights: {self.description}"]
        width = max(len(row.name) for row in self.layers)
        for row in self.layers:
            what = "loaded" if row.loaded else f"initialised ({init}): {row.reason}"
            lines.append(f"  {row.label:<6}{row.name:<{width + 2}}{row.shapes:<30} {what}")
        lines.append(f"weights: {len(self.loaded)} layers loaded, {len(self.initialised)} initialised")
        return lines


def layer_labels(model: AlexNet) -> dict[str, str]:
    """Module name -> conv1..conv5 / fc6..fc8."""
    names = {id(m): n for n, m in model.named_modules()}
    labels = {names[id(m)]: f"conv{i}" for i, m in enumerate(model.convs(), 1)}
    labels.update({names[id(m)]: f"fc{i}" for i, m in enumerate(model.fcs(), 6)})
    return labels


def _shape(t: torch.Tensor) -> str:
    return "x".join(str(d) for d in t.shape)


def _strip(state: dict) -> dict:
    out = {}
    for key, value in state.items():
        # torch.compile(DDP(model)) nests them: _orig_mod.module.features...
        while key.startswith(STRIP_PREFIXES):
            key = key[len(next(p for p in STRIP_PREFIXES if key.startswith(p))):]
        out[key] = value
    return out


def _tensor_dict(state: object) -> bool:
    return isinstance(state, dict) and bool(state) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items())


@dataclass
class Source:
    state: dict[str, torch.Tensor]
    classes: list[str] | None  # None: unknown (a plain state_dict)
    data: DataConfig | None  # the preprocessing the weights expect, when known
    description: str


def read_source(spec: str, log: Callable[[str], None]) -> Source:
    """The weights ``model.weights`` names.  WeightsError (config) or CheckpointError (the file or download)."""
    if spec == "torchvision":
        from torchvision.models import AlexNet_Weights

        from .inference import imagenet_wnids

        weights = AlexNet_Weights.IMAGENET1K_V1
        state = ckpt.load_hub_weights(weights, log)
        data = DataConfig(resize_size=256, crop_size=224, normalize="torchvision")
        return Source(state, imagenet_wnids(), data, f"torchvision AlexNet_Weights.{weights.name} ({weights.url})")
    path = Path(spec)
    if not path.exists():
        raise WeightsError(f"model.weights: {path}: no such file (give torchvision, a checkpoint path, or null)")
    if path.is_dir():
        raise WeightsError(f"model.weights: {path}: is a directory, not a checkpoint file")
    try:
        state = ckpt.load_checkpoint(path)
    except ckpt.CheckpointError as exc:
        raise ckpt.CheckpointError(f"model.weights: {exc}") from None
    if ckpt.is_training_checkpoint(state):
        saved = config_from_dict(state["config"])
        epoch = state.get("epoch")
        classes = list(state["classes"])
        return Source(_strip(state["model"]), classes, saved.data,
                      f"{path} (alexnet-train checkpoint: arch {saved.model.arch}, {len(classes)} classes"
                      + (f", {epoch} epoch{'' if epoch == 1 else 's'}" if isinstance(epoch, int) else "") + ")")
    for inner in (state, state.get("state_dict"), state.get("model")):
        if _tensor_dict(inner):
            return Source(_strip(inner), None, None, f"{path} (plain state_dict)")
    raise WeightsError(f"model.weights: {path}: neither an alexnet-train checkpoint nor a state_dict of tensors")


def match(model: AlexNet, source: Source, spec: str, target_classes: Sequence[str] | None, arch: str) -> Pretrained:
    """Which tensors of ``source`` load into ``model``; WeightsError on anything that does not fit."""
    labels = layer_labels(model)
    target = model.state_dict()
    extra = sorted(set(source.state) - set(target))
    if extra:
        raise WeightsError(f"model.weights: {spec}: holds {extra[0]} ({_shape(source.state[extra[0]])}), "
                           f"which this model (arch {arch}) has no tensor for")
    tensors: dict[str, torch.Tensor] = {}
    layers: list[LayerLoad] = []
    modules: dict[str, list[str]] = {}
    for key in target:
        modules.setdefault(key.rsplit(".", 1)[0], []).append(key)
    for module, keys in modules.items():
        label = labels.get(module, module)
        shapes = ", ".join(f"{k.rsplit('.', 1)[1]} {_shape(target[k])}" for k in keys)
        head_reason = ""
        if module == HEAD:
            have = source.state.get(f"{HEAD}.weight")
            want = target[f"{HEAD}.weight"]
            if have is not None and have.shape[0] != want.shape[0] and have.shape[1:] == want.shape[1:]:
                head_reason = f"the weights have {have.shape[0]} classes, this run {want.shape[0]}"
            elif (source.classes is not None and target_classes is not None
                  and list(source.classes) != list(target_classes) and have is not None
                  and have.shape == want.shape):
                head_reason = f"the weights' {len(source.classes)} classes are not this run's (other names or order)"
        if head_reason:
            layers.append(LayerLoad(module, label, shapes, False, head_reason))
            continue
        for key in keys:
            if key not in source.state:
                raise WeightsError(f"model.weights: {spec}: has no {key} ({label}, {_shape(target[key])}) "
                                   f"for this model (arch {arch})")
            have, want = source.state[key], target[key]
            if have.shape != want.shape:
                raise WeightsError(f"model.weights: {spec}: layer {label} ({key}) is {_shape(have)} in the weights "
                                   f"but {_shape(want)} in this model (arch {arch})")
            tensors[key] = have.to(want.dtype)
        layers.append(LayerLoad(module, label, shapes, True))
    return Pretrained(spec, source.description, tensors, layers)


def preprocessing_notices(source: DataConfig | None, data: DataConfig) -> list[str]:
    """Where the run's input normalisation differs from the one the weights were trained with."""
    if source is None:
        return []
    notes = []
    if source.normalize != data.normalize:
        notes.append(f"warning: the weights were trained on data.normalize={source.normalize} inputs but this run "
                     f"uses {data.normalize}; set data.normalize={source.normalize} unless you mean it")
    elif tuple(source.mean) != tuple(data.mean) or (
            data.normalize == "torchvision" and tuple(source.std) != tuple(data.std)):
        notes.append("notice: data.mean/data.std differ from those the weights were trained with "
                     f"(mean {list(source.mean)}, std {list(source.std)})")
    return notes


def load_pretrained(model_cfg: ModelConfig, target_classes: Sequence[str] | None, data: DataConfig,
                    log: Callable[[str], None]) -> Pretrained | None:
    """Read and check ``model.weights`` against a model of ``model_cfg``; None without weights."""
    if model_cfg.weights is None:
        return None
    source = read_source(model_cfg.weights, log)
    with torch.device("meta"):  # shapes only: nothing allocated
        shell = build_model(model_cfg)
    pretrained = match(shell, source, model_cfg.weights, target_classes, model_cfg.arch)
    for line in pretrained.report(model_cfg.init) + preprocessing_notices(source.data, data):
        log(line)
    return pretrained


def frozen_names(model: AlexNet, mode: str) -> list[str]:
    """Parameter names ``model.freeze=mode`` fixes."""
    if mode == "none":
        return []
    if mode == "features":
        return [f"features.{n}" for n, _ in model.features.named_parameters()]
    if mode == "all_but_last":
        return [n for n, _ in model.named_parameters() if not n.startswith(HEAD + ".")]
    raise ValueError(f"unknown model.freeze {mode!r}")


def freeze(model: AlexNet, mode: str) -> list[str]:
    """Set requires_grad=False on the parameters ``mode`` fixes; return their layers' labels."""
    names = set(frozen_names(model, mode))
    labels = layer_labels(model)
    fixed = []
    for name, param in model.named_parameters():
        param.requires_grad_(name not in names)
        if name in names:
            fixed.append(labels[name.rsplit(".", 1)[0]])
    return list(dict.fromkeys(fixed))


def start_model(cfg: ModelConfig, pretrained: Pretrained | None, resuming: bool,
                log: Callable[[str], None]) -> AlexNet:
    """The run's model before its first step: drawn by ``model.init``, the pretrained weights
    applied (not when resuming: the checkpoint's weights follow), ``model.freeze`` applied."""
    model = build_model(cfg)
    if pretrained is not None and not resuming:
        pretrained.apply(model)
    frozen = freeze(model, cfg.freeze)
    if frozen:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        log(f"model.freeze={cfg.freeze}: {', '.join(frozen)} fixed; training {trainable:,} of {total:,} parameters")
    return model
