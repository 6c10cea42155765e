"""Image presets: CPU workers decode and crop to uint8; the float work runs on the device.

Usage::

    train_tf = TrainPreset(cfg.data)          # PIL image + seed -> uint8 CHW tensor
    eval_tf = CenterPreset(cfg.data)          # resize shorter side, centre crop
    prep = BatchPreprocess(cfg.data, device)  # uint8 NCHW batch -> normalised float
    x = prep(batch_uint8.to(device), train=True, generator=g)

Every random choice a preset makes comes from the ``random.Random`` it is
handed, so a sample's augmentation is a pure function of its seed (the sampler
derives it from run seed, epoch and position): the same images come out
whatever the number of workers, and a resumed run sees what an uninterrupted
one would have.
"""
from __future__ import annotations

import math
import random

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from ..config import DataConfig


def to_uint8_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> uint8 tensor (3, H, W)."""
    arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def resize_shorter(img: Image.Image, size: int) -> Image.Image:
    """Shorter side to ``size`` (aspect kept), as torchvision's ``Resize(size)`` on a PIL image."""
    return TF.resize(img, size, interpolation=TF.InterpolationMode.BILINEAR, antialias=True)


def center_crop(img: Image.Image, size: int) -> Image.Image:
    return TF.center_crop(img, [size, size])


class CenterPreset:
    """Eval: shorter side to ``resize_size``, centre ``crop_size`` crop (torchvision's eval preset)."""

    def __init__(self, cfg: DataConfig) -> None:
        self.resize_size = cfg.resize_size
        self.crop_size = cfg.crop_size

    def __call__(self, img: Image.Image, rng: random.Random | None = None) -> torch.Tensor:
        return to_uint8_tensor(center_crop(resize_shorter(img, self.resize_size), self.crop_size))


class TrainPreset:
    """Train: the paper's (or torchvision's) random crop and horizontal flip, to uint8."""

    def __init__(self, cfg: DataConfig) -> None:
        self.augment = cfg.augment
        self.resize_size = cfg.resize_size
        self.crop_size = cfg.crop_size
        self.center_square = cfg.center_square
        self.hflip = cfg.hflip

    def __call__(self, img: Image.Image, rng: random.Random) -> torch.Tensor:
        if self.augment == "paper":
            img = resize_shorter(img, self.resize_size)
            if self.center_square:
                img = center_crop(img, self.resize_size)
            w, h = img.size
            left = rng.randint(0, w - self.crop_size)
            top = rng.randint(0, h - self.crop_size)
            img = img.crop((left, top, left + self.crop_size, top + self.crop_size))
        else:
            top, left, h, w = random_resized_box(img.size, rng)
            img = TF.resized_crop(img, top, left, h, w, [self.crop_size, self.crop_size], antialias=True)
        if self.hflip and rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return to_uint8_tensor(img)


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

    def __init__(self, cfg: DataConfig, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.mean = torch.tensor(cfg.mean, device=self.device).view(1, 3, 1, 1)
        std = cfg.std if cfg.normalize == "torchvision" else (1.0, 1.0, 1.0)
        self.inv_std = (1.0 / torch.tensor(std, device=self.device)).view(1, 3, 1, 1)
        self.pca_std = cfg.pca_std
        self.eigval = torch.tensor(cfg.eigval, device=self.device)
        self.eigvec = torch.tensor(cfg.eigvec, device=self.device)

    def colour_noise(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """(batch, 3) RGB offsets on the 0-255 scale."""
        alpha = torch.randn(batch, 3, generator=generator) * self.pca_std
        alpha = alpha.to(self.device)
        return 255.0 * (alpha * self.eigval) @ self.eigvec.T

    def __call__(
        self, x: torch.Tensor, train: bool = False, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        x = x.float()
        if train and self.pca_std > 0:
            x = x + self.colour_noise(x.shape[0], generator).view(-1, 3, 1, 1)
        return (x - self.mean) * self.inv_std
