"""Typed, frozen configuration loaded from YAML with ``--set`` overrides.

Usage::

    cfg = load_config("configs/paper.yaml", ["optim.lr=0.02", "model.groups=1"])
    cfg.optim.lr          # 0.02
    print(dump_yaml(cfg))  # the resolved config

Every section is a frozen dataclass.  Unknown sections or keys, values of the
wrong type and inconsistent combinations raise :class:`ConfigError` with a
one-line message that names the key (and the file or ``--set`` it came from).
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

# ImageNet's mean pixel and per-channel std on the 0-255 scale (RGB), and the
# eigen-decomposition of its RGB covariance used by the paper's PCA colour
# augmentation, with pixels on the 0-1 scale (the values fb.resnet.torch and
# most reimplementations use).  Eigenvalues descending; eigenvectors are the
# columns of the 3x3 matrix (rows are R, G, B).
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)
IMAGENET_EIGVAL = (0.2175, 0.0188, 0.0045)
IMAGENET_EIGVEC = (
    (-0.5675, 0.7192, 0.4009),
    (-0.5808, -0.0045, -0.8140),
    (-0.5836, -0.6948, 0.4203),
)


class ConfigError(ValueError):
    """A bad config: the CLI prints it on one line and exits with status 2."""


@dataclass(frozen=True)
class DataConfig:
    train_dir: Optional[str] = None
    val_dir: Optional[str] = None
    # A flat validation folder's labels file (lines "filename wnid").
    val_labels: Optional[str] = None
    # Where train_dir/val_dir are unset, generate (once) and use the synthetic demo ImageFolder.
    demo: bool = False
    demo_cache: Optional[str] = None
    batch_size: int = 128
    workers: int = 4
    resize_size: int = 256
    crop_size: int = 224
    # paper: shorter side to resize_size, (optionally) centre square, random crop_size crop;
    # torchvision: RandomResizedCrop(crop_size) as in torchvision's reference recipe.
    augment: Literal["paper", "torchvision"] = "paper"
    center_square: bool = False
    hflip: bool = True
    # Std of the paper's PCA colour noise (alpha ~ N(0, pca_std)); 0 turns it off.
    pca_std: float = 0.1
    # paper: subtract the mean pixel (0-255 scale); torchvision: (x - mean) / std
    # (what model.init=kaiming needs: He init on 0-255 inputs diverges).
    normalize: Literal["paper", "torchvision"] = "paper"
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    eigval: tuple[float, ...] = IMAGENET_EIGVAL
    eigvec: tuple[tuple[float, ...], ...] = IMAGENET_EIGVEC
    # error: an unreadable image stops the run (exit 1, naming it); skip: log it once,
    # count it in metrics.jsonl, and stop only if more than max_bad_fraction of a split is bad.
    on_bad_image: Literal["error", "skip"] = "error"
    max_bad_fraction: float = 0.001
    # worker: loader processes decode and crop; device: they only read the file bytes and
    # draw the crops, and the training process decodes each batch on the training device
    # (TorchCodec; nvJPEG on a GPU) and crops there.  Same crops either way.
    decode: Literal["worker", "device"] = "worker"

    def __post_init__(self) -> None:
        _positive(self, "batch_size", "resize_size", "crop_size")
        if self.workers < 0:
            raise ConfigError(f"data.workers: must be >= 0, got {self.workers}")
        if self.crop_size > self.resize_size and self.augment == "paper":
            raise ConfigError(
                f"data.crop_size: {self.crop_size} is larger than data.resize_size {self.resize_size}"
            )
        if self.crop_size < 63:
            raise ConfigError(
                f"data.crop_size: AlexNet's strides need at least 63 px, got {self.crop_size}"
            )
        for key in ("mean", "std", "eigval"):
            if len(getattr(self, key)) != 3:
                raise ConfigError(f"data.{key}: expected 3 values (R, G, B), got {getattr(self, key)!r}")
        if any(s <= 0 for s in self.std):
            raise ConfigError(f"data.std: values must be > 0, got {self.std!r}")
        if len(self.eigvec) != 3 or any(len(row) != 3 for row in self.eigvec):
            raise ConfigError("data.eigvec: expected a 3x3 matrix (eigenvectors as columns)")
        if self.pca_std < 0:
            raise ConfigError(f"data.pca_std: must be >= 0, got {self.pca_std}")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ConfigError(f"data.max_bad_fraction: must be within [0, 1], got {self.max_bad_fraction}")


# The model keys that only some archs use, and those archs; every other model key applies to all.
ARCH_KEYS = {
    "groups": ("paper", "custom"),
    "conv_widths": ("custom",),
    "fc_widths": ("custom",),
    "lrn": ("custom",),
}

PAPER_CONV = (96, 256, 384, 384, 256)
PAPER_FC = (4096, 4096)


@dataclass(frozen=True)
class ModelConfig:
    arch: Literal["paper", "torchvision", "custom"] = "paper"
    # null: the number of class folders in data.train_dir (what a fine-tuning config wants).
    num_classes: Optional[int] = 1000
    # 2 = the paper's two-GPU towers: conv2, conv4 and conv5 see only their own half
    # (arch paper and custom; torchvision's AlexNet has none, so it ignores this, with a notice).
    groups: int = 1
    # paper: N(0, 0.01), bias 1 in conv2/4/5 and FC6/7; caffe: bvlc_alexnet's
    # (N(0, 0.01) convs, N(0, 0.005) FC6/7, bias 0.1); kaiming: He-normal for ReLUs;
    # torch: PyTorch's defaults.  caffe by default: the paper's own init sat at
    # chance in every measurement (scripts/init_study.py, README "Initialisation").
    init: Literal["paper", "caffe", "kaiming", "torch"] = "caffe"
    dropout: float = 0.5
    # arch=custom only: five conv widths, two FC widths, LRN after conv1/conv2.
    # The rule for every arch-specific key (these and groups): an arch that does not use
    # a key ignores it, with a notice naming it, so --set model.arch=... works on any config.
    conv_widths: Optional[tuple[int, ...]] = None
    fc_widths: Optional[tuple[int, ...]] = None
    lrn: Optional[bool] = None
    # Start from trained weights instead of model.init: null (none), torchvision
    # (torchvision's ImageNet weights, arch torchvision, via the torch hub cache) or
    # the path of an alexnet-train checkpoint or a plain state_dict.  Layers are
    # matched by name and shape; a last layer of another class count is drawn fresh.
    weights: Optional[str] = None
    # none: train every layer; features: only the FC layers (conv1-conv5 fixed);
    # all_but_last: only the last layer (FC8).  Frozen parameters get no gradient,
    # no weight decay and no momentum buffer.
    freeze: Literal["none", "features", "all_but_last"] = "none"

    def __post_init__(self) -> None:
        _positive(self, "groups")
        if self.num_classes is not None:
            _positive(self, "num_classes")
        if self.weights is not None and not self.weights.strip():
            raise ConfigError("model.weights: empty; use null for no weights, torchvision, or a checkpoint path")
        if self.weights == "torchvision" and self.arch != "torchvision":
            raise ConfigError(f"model.weights: torchvision's ImageNet weights fit model.arch=torchvision only "
                              f"(arch is {self.arch}); set model.arch=torchvision or give a checkpoint path")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout: must be within [0, 1), got {self.dropout}")
        if self.conv_widths is not None and (len(self.conv_widths) != 5 or min(self.conv_widths) < 1):
            raise ConfigError(f"model.conv_widths: expected 5 positive ints, got {list(self.conv_widths)}")
        if self.fc_widths is not None and (len(self.fc_widths) != 2 or min(self.fc_widths) < 1):
            raise ConfigError(f"model.fc_widths: expected 2 positive ints, got {list(self.fc_widths)}")
        if self.effective_groups > 1:
            conv = self.widths()[0]
            # Grouped layers are conv2 (input conv1), conv4 (input conv3), conv5 (input conv4).
            for name, width in (("conv1", conv[0]), ("conv2", conv[1]), ("conv3", conv[2]),
                                ("conv4", conv[3]), ("conv5", conv[4])):
                if width % self.groups:
                    raise ConfigError(
                        f"model.groups: {self.groups} does not divide the {width} filters of {name}"
                    )

    def unused_keys(self) -> list[str]:
        """The model keys (without ``model.``) that this config's arch does not use."""
        return [key for key, archs in ARCH_KEYS.items() if self.arch not in archs]

    def ignored_keys(self) -> list[str]:
        """Keys set (away from their defaults) in this config that its arch does not use."""
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        return [f"model.{k}" for k in self.unused_keys() if getattr(self, k) != defaults[k]]

    def ignored_notices(self) -> list[str]:
        """One notice per ignored key, naming the archs that use it."""
        return [f"notice: {key} is ignored: model.arch={self.arch} does not use it "
                f"(only {' and '.join(ARCH_KEYS[key[len('model.'):]])} do)" for key in self.ignored_keys()]

    @property
    def effective_groups(self) -> int:
        """``groups`` as the model is built: torchvision's AlexNet has no grouped convolutions."""
        return 1 if "groups" in self.unused_keys() else self.groups

    def widths(self) -> tuple[tuple[int, ...], tuple[int, ...], bool]:
        """(conv widths, FC widths, LRN) this config describes."""
        if self.arch == "torchvision":
            return (64, 192, 384, 256, 256), PAPER_FC, False
        if self.arch == "paper":
            return PAPER_CONV, PAPER_FC, True
        return (
            tuple(self.conv_widths or PAPER_CONV),
            tuple(self.fc_widths or PAPER_FC),
            True if self.lrn is None else self.lrn,
        )


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    # The paper decays every weight; False exempts biases (and LRN has none).
    decay_biases: bool = True
    # The last layer (FC8, the one a fine-tune draws fresh) learns at lr * head_lr_mult.
    head_lr_mult: float = 1.0

    def __post_init__(self) -> None:
        _positive(self, "lr", "head_lr_mult")
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError(f"optim.momentum: must be within [0, 1), got {self.momentum}")
        if self.weight_decay < 0:
            raise ConfigError(f"optim.weight_decay: must be >= 0, got {self.weight_decay}")
        if self.nesterov and self.momentum == 0:
            raise ConfigError("optim.nesterov: needs optim.momentum > 0")


@dataclass(frozen=True)
class ScheduleConfig:
    kind: Literal["plateau", "step", "cosine"] = "plateau"
    # plateau: lr *= factor after this many epochs in a row without improvement of val top-1
    # error (>= 1).  PyTorch's ReduceLROnPlateau counts one fewer: its patience=N is our N + 1
    # (its 0, cut after the first bad epoch, is our 1).
    patience: int = 5
    factor: float = 0.1
    max_reductions: int = 3
    # plateau: an improvement must beat the best error by more than this (percentage points).
    threshold: float = 0.0
    # plateau: after max_reductions and one more plateau, end the run (the paper's stopping rule).
    stop_after_last_plateau: bool = True
    # step: lr *= factor every step_size epochs.
    step_size: int = 30
    # cosine: anneal from lr to min_lr over the epochs after warmup.
    min_lr: float = 0.0
    warmup_epochs: int = 0

    def __post_init__(self) -> None:
        _positive(self, "step_size")
        if self.patience < 1:
            raise ConfigError(
                f"schedule.patience: must be >= 1, got {self.patience}: it counts the epochs in a row without "
                "improvement before lr is cut (PyTorch's ReduceLROnPlateau(patience=N) is our N + 1, "
                "so its 0 is our 1)")
        if not 0.0 < self.factor < 1.0:
            raise ConfigError(f"schedule.factor: must be within (0, 1), got {self.factor}")
        for key in ("max_reductions", "warmup_epochs"):
            if getattr(self, key) < 0:
                raise ConfigError(f"schedule.{key}: must be >= 0, got {getattr(self, key)}")
        if self.threshold < 0 or self.min_lr < 0:
            raise ConfigError("schedule.threshold and schedule.min_lr must be >= 0")


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 90
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    out_dir: str = "runs/paper"
    # How many epoch-NNN.pth checkpoints to keep besides last.pth and best.pth (0: none).
    keep_last: int = 2
    # Steps between log lines / TensorBoard scalars.
    log_interval: int = 50
    # torch.set_num_threads on CPU; 0 leaves torch's default.
    threads: int = 0
    # Mixed precision on CUDA (fp16 uses a GradScaler); a notice and fp32 elsewhere.
    amp: Literal["none", "bf16", "fp16"] = "none"
    # Model and batches in channels-last memory (faster convolutions on tensor cores).
    channels_last: bool = False
    # torch.compile the model (a notice and eager mode where it is unavailable).
    compile: bool = False
    # On CUDA, float32 matrix products and convolutions on TF32 tensor cores (10-bit
    # mantissa; PyTorch's own default leaves matmuls in full float32).
    tf32: bool = True
    # A resumable mid-epoch last.pth at least every N minutes / N steps (0: off), so a kill -9,
    # the OOM killer or a lost spot VM costs at most that much training.  The minutes are
    # checked at log-interval steps (which all DDP ranks share).
    checkpoint_minutes: float = 0.0
    checkpoint_steps: int = 0

    def __post_init__(self) -> None:
        _positive(self, "epochs", "log_interval")
        for key in ("keep_last", "threads", "seed", "checkpoint_minutes", "checkpoint_steps"):
            if getattr(self, key) < 0:
                raise ConfigError(f"train.{key}: must be >= 0, got {getattr(self, key)}")
        if not self.out_dir:
            raise ConfigError("train.out_dir: must not be empty")


@dataclass(frozen=True)
class DistConfig:
    mode: Literal["none", "dp", "ddp"] = "none"
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    # How long any collective (the process group's rendezvous, a gradient all-reduce, the
    # ranks' agreements) may wait for a rank that has stopped answering before the run ends
    # with an error: NCCL's own default is 10 minutes, gloo's 30.  Longer than the slowest
    # honest wait between ranks other than a checkpoint write: one rank's data scan at start.
    timeout_minutes: float = 5.0
    # How long the other ranks wait for rank 0 to write a checkpoint (last.pth and its copies)
    # before the run ends with "lost contact": a slow shared filesystem is not a dead peer.
    # They wait in a CPU (gloo) group of its own, which NCCL's watchdog does not watch.
    save_timeout_minutes: float = 30.0

    def __post_init__(self) -> None:
        _positive(self, "timeout_minutes")
        _positive(self, "save_timeout_minutes")


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)


SECTIONS: dict[str, type] = typing.get_type_hints(Config)


def _positive(obj: Any, *keys: str) -> None:
    section = _section_name(obj)
    for key in keys:
        value = getattr(obj, key)
        if value <= 0:
            raise ConfigError(f"{section}.{key}: must be > 0, got {value}")


def _section_name(obj: Any) -> str:
    for name, cls in SECTIONS.items():
        if isinstance(obj, cls):
            return name
    return type(obj).__name__


def replace(cfg: Config, section: str, **changes: Any) -> Config:
    """A copy of ``cfg`` with fields of one section changed (the config stays frozen)."""
    return dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **changes)})


# Reading, --set and dumping live in configload; their names stay importable from here.
from .configload import (  # noqa: E402,F401  (re-exported)
    build_config,
    config_from_dict,
    config_to_dict,
    dump_yaml,
    load_config,
    parse_override,
)
