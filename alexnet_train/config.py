"""Typed, frozen configuration loaded from YAML with ``--set`` overrides.

Usage (reading a config, ``--set`` and dumping live in :mod:`alexnet_train.configload`)::

    from alexnet_train.configload import dump_yaml, load_config

    cfg = load_config("configs/paper.yaml", ["optim.lr=0.02", "model.groups=1"])
    cfg.optim.lr          # 0.02
    print(dump_yaml(cfg))  # the resolved config

Every section is a frozen dataclass; the string under each field documents that
key, and docs/configuration.md is rendered from them (``python -m
alexnet_train.configref``).  Unknown sections or keys, values of the wrong type
and inconsistent combinations raise :class:`ConfigError` with a one-line message
that names the key (and the file or ``--set`` it came from).  Reading YAML and
``--set`` lives in :mod:`alexnet_train.configload`; its names are importable from here.
"""
from __future__ import annotations

import os

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from .errors import ConfigError


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


def _expand_home(section, *keys: str) -> None:
    """``~`` in path keys expanded, as a shell would have: YAML and ``--set`` keep it as typed."""
    for key in keys:
        value = getattr(section, key)
        if isinstance(value, str) and value.startswith("~"):
            object.__setattr__(section, key, os.path.expanduser(value))


@dataclass(frozen=True)
class DataConfig:
    """Where the images come from, how they are cropped, coloured and normalized, and who decodes them."""

    train_dir: Optional[str] = None
    """The training images: an ImageFolder (one folder per class; its class folders give the
    class list), or WebDataset tar shards: a folder holding one split's, or a pattern such as
    ``DIR/imagenet1k-train-*.tar`` (docs/shards.md)."""
    val_dir: Optional[str] = None
    """The validation images: an ImageFolder, a flat folder with ``data.val_labels``, or
    WebDataset shards (a folder of one split's, or a pattern such as
    ``DIR/imagenet1k-validation-*.tar``)."""
    val_labels: Optional[str] = None
    """A flat validation folder's labels file (lines ``filename wnid``)."""
    demo: bool = False
    """Where ``train_dir``/``val_dir`` are unset, generate (once) and use the synthetic demo ImageFolder."""
    demo_cache: Optional[str] = None
    """Where the demo ImageFolder is kept; null: ``$ALEXNET_TRAIN_CACHE``, else the user's cache
    folder (``$XDG_CACHE_HOME`` or ``~/.cache``) under ``alexnet-train``."""
    batch_size: int = 128
    """Images per step over all processes (the global batch; must be > 0 and divisible by the
    number of DDP processes)."""
    workers: typing.Union[int, Literal["auto"]] = "auto"
    """Loader worker processes per training process (must be >= 0); 0 loads in the training
    process.  auto: this process's share of the cores it may run on (``sched_getaffinity``,
    divided among the ranks on the node that share them), less one for the training process,
    at most 32; the log's ``data.workers:`` line says the number and why."""
    resize_size: int = 256
    """The shorter side is resized to this many pixels before cropping: always in evaluation,
    in training with augment paper (must be > 0)."""
    crop_size: int = 224
    """The side of the square crop the model sees (must be >= 63, AlexNet's strides need it;
    with augment paper, no larger than ``resize_size``)."""
    augment: Literal["paper", "torchvision"] = "paper"
    """paper: shorter side to ``resize_size``, (optionally) centre square, random ``crop_size``
    crop; torchvision: RandomResizedCrop(``crop_size``) as in torchvision's reference recipe."""
    center_square: bool = False
    """augment paper: take the centre square of the resized image before the random crop."""
    hflip: bool = True
    """Flip training crops horizontally with probability 0.5."""
    pca_std: float = 0.1
    """Std of the paper's PCA colour noise (alpha ~ N(0, pca_std)); 0 turns it off (must be >= 0)."""
    normalize: Literal["paper", "torchvision"] = "paper"
    """paper: subtract the mean pixel (0-255 scale); torchvision: (x - mean) / std
    (what model.init=kaiming needs: He init on 0-255 inputs diverges)."""
    mean: tuple[float, ...] = IMAGENET_MEAN
    """The mean pixel, R, G, B on the 0-255 scale (3 values; ImageNet's by default)."""
    std: tuple[float, ...] = IMAGENET_STD
    """Per-channel std, R, G, B on the 0-255 scale (3 values, each > 0), for normalize torchvision."""
    eigval: tuple[float, ...] = IMAGENET_EIGVAL
    """Eigenvalues of the RGB covariance (pixels on the 0-1 scale; 3 values, descending) for the
    PCA colour noise."""
    eigvec: tuple[tuple[float, ...], ...] = IMAGENET_EIGVEC
    """The matching eigenvectors: a 3x3 matrix whose columns are the eigenvectors (rows are R, G, B)."""
    on_bad_image: Literal["error", "skip"] = "error"
    """error: an unreadable image stops the run (exit 1, naming it); skip: log it once, count
    it in metrics.jsonl, and stop only if more than ``max_bad_fraction`` of a split is bad."""
    max_bad_fraction: float = 0.001
    """on_bad_image skip: the largest fraction of a split that may be unreadable (within [0, 1])."""
    decode: Literal["worker", "device"] = "worker"
    """worker: loader processes decode and crop; device: they only read the file bytes and draw
    the crops, and the training process decodes each batch on the training device (TorchCodec;
    nvJPEG on a GPU) and crops there.  Same crops either way."""
    loader_timeout: float = 300.0
    """Seconds a loader with workers may go without delivering a batch before the run ends with
    one line (exit 1, resumable from the last checkpoint) instead of waiting forever on a worker
    that is stuck or can no longer send (out of file descriptors, a hung network mount);
    0 = wait forever."""

    def __post_init__(self) -> None:
        _expand_home(self, "train_dir", "val_dir", "val_labels", "demo_cache")
        if self.loader_timeout < 0:
            raise ConfigError(f"data.loader_timeout: must be >= 0 seconds (0 = wait forever), got {self.loader_timeout}")
        _positive(self, "batch_size", "resize_size", "crop_size")
        if self.workers != "auto" and self.workers < 0:
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
    "towers": ("paper", "custom"),
}

PAPER_CONV = (96, 256, 384, 384, 256)
PAPER_FC = (4096, 4096)


@dataclass(frozen=True)
class ModelConfig:
    """Which AlexNet, its initialisation, and the weights it starts from."""

    arch: Literal["paper", "torchvision", "custom"] = "paper"
    """paper: the 2012 network (96-256-384-384-256 convs, LRN); torchvision: torchvision's
    AlexNet (64-192-384-256-256, no LRN); custom: the paper's layout with the widths below."""
    num_classes: Optional[int] = 1000
    """Outputs of the last layer (must be > 0); null: the number of class folders in
    data.train_dir (what a fine-tuning config wants)."""
    groups: int = 1
    """2 = the paper's two-GPU towers: conv2, conv4 and conv5 see only their own half (must be
    > 0 and divide every conv width; arch paper and custom; torchvision's AlexNet has none, so it
    ignores this, with a notice)."""
    towers: Literal["grouped", "split"] = "grouped"
    """How the towers' convolutions run where groups > 1: grouped: one convolution with groups=G
    (cuDNN's grouped kernels); split: one dense convolution per tower on views of the one weight,
    outputs concatenated.  The same state_dict and the same outputs (to the convolution
    algorithm's rounding); which is faster depends on the GPU and precision
    (scripts/bench_model.py --breakdown measures both)."""
    init: Literal["paper", "caffe", "kaiming", "torch"] = "caffe"
    """paper: N(0, 0.01), bias 1 in conv2/4/5 and FC6/7; caffe: bvlc_alexnet's (N(0, 0.01)
    convs, N(0, 0.005) FC6/7, bias 0.1); kaiming: He-normal for ReLUs; torch: PyTorch's defaults.
    caffe by default: the paper's own init sat at chance in every measurement
    (scripts/init_study.py, docs/training.md "Initialisation")."""
    dropout: float = 0.5
    """Dropout probability before FC6 and FC7 (within [0, 1))."""
    # The rule for every arch-specific key (these three and groups, see ARCH_KEYS): an arch that
    # does not use a key ignores it, with a notice naming it, so --set model.arch=... works on any config.
    conv_widths: Optional[tuple[int, ...]] = None
    """arch custom: the five conv widths (5 positive ints); null: the paper's."""
    fc_widths: Optional[tuple[int, ...]] = None
    """arch custom: the two hidden FC widths (2 positive ints); null: the paper's 4096, 4096."""
    lrn: Optional[bool] = None
    """arch custom: local response normalization after conv1 and conv2; null: on, as in the paper."""
    weights: Optional[str] = None
    """Start from trained weights instead of model.init: null (none), torchvision (torchvision's
    ImageNet weights, arch torchvision, via the torch hub cache) or the path of an alexnet-train
    checkpoint or a plain state_dict.  Layers are matched by name and shape; a last layer of
    another class count is drawn fresh."""
    freeze: Literal["none", "features", "all_but_last"] = "none"
    """none: train every layer; features: only the FC layers (conv1-conv5 fixed); all_but_last:
    only the last layer (FC8).  Frozen parameters get no gradient, no weight decay and no
    momentum buffer."""

    def __post_init__(self) -> None:
        _expand_home(self, "weights")
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
    """SGD with momentum, as in the paper."""

    lr: float = 0.01
    """The base learning rate (must be > 0); ``schedule`` changes it from epoch to epoch."""
    momentum: float = 0.9
    """SGD momentum (within [0, 1))."""
    weight_decay: float = 5e-4
    """L2 weight decay (must be >= 0)."""
    nesterov: bool = False
    """Nesterov momentum (needs optim.momentum > 0)."""
    decay_biases: bool = True
    """The paper decays every weight; false exempts biases (and LRN has none)."""
    head_lr_mult: float = 1.0
    """The last layer (FC8, the one a fine-tune draws fresh) learns at lr * head_lr_mult (must be > 0)."""

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
    """How the learning rate changes from epoch to epoch, and the paper's stopping rule."""

    kind: Literal["plateau", "step", "cosine"] = "plateau"
    """plateau: the paper's rule, lr *= factor when validation top-1 error stops improving;
    step: lr *= factor every step_size epochs; cosine: anneal from lr to min_lr."""
    patience: int = 5
    """plateau: lr *= factor after this many epochs in a row without improvement of val top-1
    error (must be >= 1).  PyTorch's ReduceLROnPlateau counts one fewer: its patience=N is our
    N + 1 (its 0, cut after the first bad epoch, is our 1)."""
    factor: float = 0.1
    """plateau and step: what each cut multiplies lr by (within (0, 1))."""
    max_reductions: int = 3
    """plateau: how many times lr is cut (must be >= 0)."""
    threshold: float = 0.0
    """plateau: an improvement must beat the best error by more than this (percentage points; must be >= 0)."""
    stop_after_last_plateau: bool = True
    """plateau: after max_reductions and one more plateau, end the run (the paper's stopping rule)."""
    step_size: int = 30
    """step: lr *= factor every step_size epochs (must be > 0)."""
    min_lr: float = 0.0
    """cosine: anneal from lr to min_lr over the epochs after warmup (must be >= 0)."""
    warmup_epochs: int = 0
    """All kinds: ramp lr up linearly over this many first epochs (must be >= 0): epoch e (1-based) runs
    at lr x e / warmup_epochs, so 1 changes nothing and 5 is Goyal et al. 2017's warmup for a
    large batch (docs/scaling.md).  plateau: patience counts only the epochs after warmup."""

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
    """The run: its length, seed, device, precision, output folder and checkpoints."""

    epochs: int = 90
    """Epochs to train (must be > 0); schedule plateau may end the run sooner."""
    seed: int = 0
    """Base seed (must be >= 0): each rank seeds its RNGs with seed + rank; the shuffle, crops and
    colour noise are drawn from (seed, epoch, sample or step) alone, so a resumed run draws what
    an uninterrupted one would, with any number of workers.  The shuffle and crops are the same
    for any number of ranks; the colour noise (drawn per process's share of a step) and dropout
    are not (docs/fault-tolerance.md, "Resuming elsewhere")."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto: CUDA if a GPU is usable, else the CPU (and says why); cuda without a usable GPU is an error."""
    out_dir: str = "runs/paper"
    """The output folder (checkpoints, metrics.jsonl, TensorBoard; must not be empty); ``--out`` overrides it."""
    keep_last: int = 2
    """How many epoch-NNN.pth checkpoints to keep besides last.pth and best.pth (0: none; must be >= 0)."""
    log_interval: int = 50
    """Steps between log lines / TensorBoard scalars (must be > 0)."""
    threads: int = 0
    """torch.set_num_threads on CPU (must be >= 0); 0 leaves torch's default."""
    amp: Literal["none", "auto", "bf16", "fp16"] = "none"
    """Mixed precision on CUDA (fp16 uses a GradScaler); a notice and fp32 elsewhere.  auto: bf16 on
    a CUDA GPU that has it, float32 elsewhere without a notice (what the shipped configs use:
    docs/training.md "Device and precision")."""
    channels_last: bool = False
    """Model and batches in channels-last memory (faster convolutions on tensor cores)."""
    compile: bool = False
    """torch.compile the model (a notice and eager mode where it is unavailable)."""
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    """train.compile's torch.compile mode: reduce-overhead and max-autotune replay each step's
    kernels as CUDA graphs (less CPU time per step); max-autotune* also benchmark kernel
    choices while compiling (minutes).  Resume under the CUDA-graph modes: docs/training.md."""
    tf32: bool = True
    """On CUDA, float32 matrix products and convolutions on TF32 tensor cores (10-bit mantissa;
    PyTorch's own default leaves matmuls in full float32)."""
    checkpoint_minutes: float = 0.0
    """A resumable mid-epoch last.pth at least every this many minutes (0: off; must be >= 0), so a kill -9,
    the OOM killer or a lost spot VM costs at most that much training.  Checked at
    log-interval steps (which all DDP ranks share)."""
    checkpoint_steps: int = 0
    """A resumable mid-epoch last.pth at least every this many steps (0: off; must be >= 0)."""

    def __post_init__(self) -> None:
        _positive(self, "epochs", "log_interval")
        for key in ("keep_last", "threads", "seed", "checkpoint_minutes", "checkpoint_steps"):
            if getattr(self, key) < 0:
                raise ConfigError(f"train.{key}: must be >= 0, got {getattr(self, key)}")
        if not self.out_dir:
            raise ConfigError("train.out_dir: must not be empty")
        _expand_home(self, "out_dir")


@dataclass(frozen=True)
class DistConfig:
    """Several GPUs: DataParallel in one process, or DDP over torchrun/Slurm processes."""

    mode: Literal["none", "dp", "ddp"] = "none"
    """none: one device; dp: DataParallel over the conv layers of the GPUs this process sees (the
    FC layers stay on the first); ddp: DistributedDataParallel, one process per GPU, launched
    by torchrun or srun (without a launcher: one process, with a notice)."""
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    """ddp's process group backend; auto: nccl on CUDA, gloo on the CPU."""
    timeout_minutes: float = 5.0
    """How long any collective (the process group's rendezvous, a gradient all-reduce, the
    ranks' agreements) may wait for a rank that has stopped answering before the run ends with
    an error (must be > 0): NCCL's own default is 10 minutes, gloo's 30.  Longer than the
    slowest honest wait between ranks other than a checkpoint write: one rank's data scan at start."""
    save_timeout_minutes: float = 30.0
    """How long the other ranks wait for rank 0 to write a checkpoint (last.pth and its copies)
    before the run ends with "lost contact" (must be > 0): a slow shared filesystem is not a
    dead peer.  They wait in a CPU (gloo) group of its own, which NCCL's watchdog does not watch."""

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
