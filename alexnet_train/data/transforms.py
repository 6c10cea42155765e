"""Image presets: CPU workers decode and crop to uint8; the float work runs on the device.

Usage::

    train_tf = TrainPreset(cfg.data)          # uint8 (3, H, W) + random.Random -> uint8 crop
    eval_tf = CenterPreset(cfg.data)          # resize shorter side, centre crop
    prep = BatchPreprocess(cfg.data, device)  # uint8 NCHW batch -> normalised float
    x = prep(batch_uint8.to(device), train=True, generator=g)

Collation and ``data.decode: device``'s hand-off live in :mod:`alexnet_train.data.batching`.

Presets work on uint8 tensors (torchvision's uint8 resize kernels, no PIL
round trip, no float copies in the workers) and say via ``min_side`` how
small the decoder may shrink an image on load.  A preset is a ``plan`` (the
crop box, flip ... drawn from the image's size alone) and :func:`apply_plan`:
with ``data.decode: device`` the workers draw the plan from the JPEG header and
the training process applies it to the image it decoded on the device
(:func:`~alexnet_train.data.batching.apply_plans`, batched, the same pixels).  Every random choice comes from
the ``random.Random`` they are handed, so a sample's augmentation is a pure
function of its seed (the sampler derives it from run seed, epoch and
position): the same crops come out whatever the number of workers, and a
resumed run sees what an uninterrupted one would have.
"""
from __future__ import annotations

import math
import random

import torch
import torchvision.transforms.v2.functional as F

from ..config import DataConfig


def resize_shorter(x: torch.Tensor, size: int) -> torch.Tensor:
    """Shorter side to ``size``, aspect kept (torchvision's ``Resize(size)``, bilinear, antialiased)."""
    if min(x.shape[-2:]) == size:
        return x
    return F.resize(x, [size], antialias=True)


def to_hwc_memory(x: torch.Tensor, flip: bool = False) -> torch.Tensor:
    """(3, H, W) view over height-width-channel memory, optionally mirrored, in one copy.

    Decoders hand out HWC memory; keeping it saves a transposing copy per image in
    the workers (a third of the time on a prepared 256-px copy), and the batch
    collates to a channels-last (N, 3, H, W) tensor without another one.
    """
    hwc = x.permute(1, 2, 0)
    hwc = hwc.flip(1) if flip else hwc.contiguous()
    return hwc.permute(2, 0, 1)


def resized_shape(h: int, w: int, size: int) -> tuple[int, int]:
    """(H, W) after :func:`resize_shorter` (torchvision's rule: the longer side is truncated)."""
    if min(h, w) == size:
        return h, w
    return (size, int(size * w / h)) if h <= w else (int(size * h / w), size)


def apply_plan(x: torch.Tensor, plan: tuple) -> torch.Tensor:
    """Run a preset's plan on a (3, H, W) uint8 image, on whatever device it lives.

    Steps: ``("resize", size)`` shorter side, ``("center", size)`` centre square,
    ``("crop", top, left, h, w)``, ``("resized_crop", top, left, h, w, size)``,
    ``("flip",)``.  The result is (3, c, c) over HWC memory (:func:`to_hwc_memory`).
    """
    flip = False
    for op, *args in plan:
        if op == "resize":
            x = resize_shorter(x, args[0])
        elif op == "center":
            x = center_crop(x, args[0])
        elif op == "crop":
            top, left, h, w = args
            x = x[..., top : top + h, left : left + w]
        elif op == "resized_crop":
            top, left, h, w, size = args
            x = F.resized_crop(x, top, left, h, w, [size, size], antialias=True)
        elif op == "flip":
            flip = True
        else:  # pragma: no cover - plans are made by the presets below
            raise ValueError(f"unknown plan step {op!r}")
    return to_hwc_memory(x, flip=flip)


def center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    if h < size or w < size:
        return F.center_crop(x, [size, size])  # pads: only for images smaller than the crop
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return x[..., top : top + size, left : left + size]


class CenterPreset:
    """Eval: shorter side to ``resize_size``, centre ``crop_size`` crop (torchvision's eval preset)."""

    def __init__(self, cfg: DataConfig) -> None:
        self.resize_size = cfg.resize_size
        self.crop_size = cfg.crop_size
        # Evaluation decodes every pixel: a DCT-scaled decode of a big JPEG would differ from
        # torchvision's Resize by a few grey levels, and test numbers must be exact.
        self.min_side = None

    def plan(self, h: int, w: int, rng: random.Random | None = None) -> tuple:
        return (("resize", self.resize_size), ("center", self.crop_size))

    def __call__(self, x: torch.Tensor, rng: random.Random | None = None) -> torch.Tensor:
        return apply_plan(x, self.plan(*x.shape[-2:]))


class TenCropPreset:
    """The paper's test-time crops: shorter side to ``resize_size``, then the four corner
    ``crop_size`` patches and the centre one, and their horizontal mirrors.

    Output: uint8 (10, 3, crop, crop) in torchvision's ``TenCrop`` order (tl, tr, bl, br,
    centre, then the same of the mirrored image).  On an original image the patches come
    from the shorter-side-256 image (exactly ``Resize(256)`` + ``TenCrop(224)``); on the
    prepared 256x256 copy, from that square, as in the paper.
    """

    def __init__(self, cfg: DataConfig) -> None:
        self.resize_size = cfg.resize_size
        self.crop_size = cfg.crop_size
        self.min_side = None  # exact, as CenterPreset

    def __call__(self, x: torch.Tensor, rng: random.Random | None = None) -> torch.Tensor:
        x = resize_shorter(x, self.resize_size)
        c = self.crop_size
        h, w = x.shape[-2:]
        if h < c or w < c:
            x = F.center_crop(x, [max(h, c), max(w, c)])  # pad images smaller than the crop
            h, w = x.shape[-2:]
        top, left = int(round((h - c) / 2.0)), int(round((w - c) / 2.0))
        boxes = [(0, 0), (0, w - c), (h - c, 0), (h - c, w - c), (top, left)]
        hwc = x.permute(1, 2, 0)
        crops = [hwc[t : t + c, l : l + c] for t, l in boxes]
        # The mirrored image's corners are the mirrors of the opposite corners.
        mirrored = [crops[1], crops[0], crops[3], crops[2]]
        mirror_centre = hwc[top : top + c, w - c - left : w - left]
        out = torch.stack(crops + [m.flip(1) for m in mirrored] + [mirror_centre.flip(1)])
        return out.permute(0, 3, 1, 2)


class TrainPreset:
    """Train: the paper's (or torchvision's) random crop and horizontal flip, on uint8."""

    def __init__(self, cfg: DataConfig) -> None:
        self.augment = cfg.augment
        self.resize_size = cfg.resize_size
        self.crop_size = cfg.crop_size
        self.center_square = cfg.center_square
        self.hflip = cfg.hflip
        # RandomResizedCrop may zoom into 8% of the image: it needs every decoded pixel.
        self.min_side = cfg.resize_size if cfg.augment == "paper" else None

    def plan(self, h: int, w: int, rng: random.Random) -> tuple:
        """The crop and flip of an (h, w) image, drawn from ``rng`` (in this order)."""
        c = self.crop_size
        if self.augment == "paper":
            steps = [("resize", self.resize_size)]
            h, w = resized_shape(h, w, self.resize_size)
            if self.center_square:
                steps.append(("center", self.resize_size))
                h = w = self.resize_size
            top, left = rng.randint(0, h - c), rng.randint(0, w - c)
            steps.append(("crop", top, left, c, c))
        else:
            top, left, bh, bw = random_resized_box((w, h), rng)
            steps = [("resized_crop", top, left, bh, bw, c)]
        if self.hflip and rng.random() < 0.5:
            steps.append(("flip",))
        return tuple(steps)

    def __call__(self, x: torch.Tensor, rng: random.Random) -> torch.Tensor:
        return apply_plan(x, self.plan(*x.shape[-2:], rng))


def random_resized_box(
    size: tuple[int, int],
    rng: random.Random,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """(top, left, height, width) of an Inception-style crop, the rule of torchvision's RandomResizedCrop."""
    width, height = size
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    # Fallback: the whole image cropped to the nearest allowed aspect ratio.
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class BatchPreprocess:
    """uint8 NCHW batch on the device -> float, PCA colour noise (train), normalised.

    ``normalize: paper`` subtracts the mean pixel on the 0-255 scale, as the
    paper did; ``torchvision`` also divides by the per-channel std.  The
    paper's colour noise adds, per image, ``P (alpha * lambda)`` with
    ``alpha ~ N(0, pca_std)``, ``P``/``lambda`` the eigenvectors/eigenvalues of
    the RGB covariance on the 0-1 scale, scaled here to the 0-255 scale.
    """

    def __init__(self, cfg: DataConfig, device: torch.device | str = "cpu", channels_last: bool = False) -> None:
        self.device = torch.device(device)
        # Batches arrive channels-last (HWC memory from the workers); the float copy made
        # here anyway lays them out as the model wants them.
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.mean = torch.tensor(cfg.mean, device=self.device).view(1, 3, 1, 1)
        std = cfg.std if cfg.normalize == "torchvision" else (1.0, 1.0, 1.0)
        self.inv_std = (1.0 / torch.tensor(std, device=self.device)).view(1, 3, 1, 1)
        self.pca_std = cfg.pca_std
        self.eigval = torch.tensor(cfg.eigval, device=self.device)
        self.eigvec = torch.tensor(cfg.eigvec, device=self.device)

    def colour_noise(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """(batch, 3) RGB offsets on the 0-255 scale, drawn on the device (``generator`` lives
        there too): no host-to-device copy, so no sync in the training step."""
        alpha = torch.randn(batch, 3, generator=generator, device=self.device) * self.pca_std
        return 255.0 * (alpha * self.eigval) @ self.eigvec.T

    def __call__(
        self, x: torch.Tensor, train: bool = False, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        if x.dim() == 4:
            x = x.to(torch.float32, memory_format=self.memory_format, copy=True)
        else:
            x = x.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
        # In place on the fresh float copy: one pass less and no second full-size allocation.
        shift = self.mean
        if train and self.pca_std > 0:
            shift = self.mean - self.colour_noise(x.shape[0], generator).view(-1, 3, 1, 1)
        return x.sub_(shift).mul_(self.inv_std)
