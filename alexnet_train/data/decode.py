"""Fast image decoding to uint8 RGB tensors.

Usage::

    x = decode_rgb("n01440764_10026.JPEG", min_side=256)   # uint8 (3, H, W), H/W >= 256 where possible

JPEGs go through libjpeg-turbo (``torchvision.io.decode_jpeg``), which is
faster than PIL's decoder and writes straight into a tensor.  A JPEG whose
shorter side is at least twice ``min_side`` is decoded by PIL at a reduced DCT
scale instead (``Image.draft``: 1/2, 1/4 or 1/8 of the pixels to reconstruct),
since the pipeline would throw those pixels away in the resize anyway.
Everything else PIL can read (PNG, also when named ``.JPEG``; CMYK; palette;
grayscale; RGBA) goes through PIL.  EXIF orientation is applied in both paths.
"""
from __future__ import annotations

import io
import math
import warnings

import numpy as np
import torch
from PIL import Image, ImageOps

from .datasets import BadImageError

# ImageNet's largest files are ~ 20 megapixels; PIL's bomb guard (89 MP warning,
# 179 MP error) would only stop legitimate scans.  A hard cap still refuses garbage.
Image.MAX_IMAGE_PIXELS = 400_000_000

# torchvision 0.29 deprecates its image codecs in favour of TorchCodec; while they exist
# they are the fastest JPEG path we have, and when they are gone PIL decodes everything.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    try:
        from torchvision.io import ImageReadMode as _ReadMode
        from torchvision.io import decode_jpeg as _decode_jpeg
    except ImportError:  # pragma: no cover - depends on the installed torchvision
        _decode_jpeg = None
warnings.filterwarnings("ignore", message=".*image decoding and encoding capabilities of TorchVision.*")

_SOF_MARKERS = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def is_jpeg(data: bytes) -> bool:
    return data[:3] == b"\xff\xd8\xff"


def jpeg_info(data: bytes) -> tuple[int, int, bool] | None:
    """(width, height, has_exif) from a JPEG's headers, without decoding; None if no frame header.

    ``has_exif`` matters for speed: libjpeg-turbo's EXIF orientation handling costs
    about a third of a 256-px decode, so it is only asked for where an EXIF block exists.
    """
    if not is_jpeg(data):
        return None
    i, n = 2, len(data)
    has_exif = False
    while i + 9 < n:
        if data[i] != 0xFF:
            i += 1
            continue
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # markers without a length
            i += 2
            continue
        length = int.from_bytes(data[i + 2 : i + 4], "big")
        if marker == 0xE1 and data[i + 4 : i + 10] == b"Exif\x00\x00":
            has_exif = True
        if marker in _SOF_MARKERS:
            height = int.from_bytes(data[i + 5 : i + 7], "big")
            width = int.from_bytes(data[i + 7 : i + 9], "big")
            return (width, height, has_exif) if width and height else None
        if marker == 0xDA:  # start of scan: no frame header before it
            return None
        i += 2 + length
    return None


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode as 8-bit RGB; 16/32-bit grayscale is scaled down, not clipped at 255."""
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        arr = np.asarray(img)
        if arr.max(initial=0) > 255:  # 16-bit samples (PNG) live in 0..65535
            arr = arr.astype(np.uint32) >> 8
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "L")
    return img.convert("RGB")


def _to_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).contiguous()


def decode_pil(data: bytes, path: str, min_side: int | None = None) -> torch.Tensor:
    try:
        with Image.open(io.BytesIO(data)) as img:
            if min_side and img.format == "JPEG":
                w, h = img.size
                scale = min_side / min(w, h)
                # draft never goes below the requested size, so the shorter side stays >= min_side.
                img.draft("RGB", (math.ceil(w * scale), math.ceil(h * scale)))
            img = ImageOps.exif_transpose(img)
            return _to_tensor(to_rgb(img))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise BadImageError(path, str(exc) or type(exc).__name__) from None


def decode_rgb(path: str, min_side: int | None = None, use_libjpeg: bool = True) -> torch.Tensor:
    """Decode any image PIL or libjpeg-turbo reads into a uint8 RGB tensor (3, H, W).

    ``min_side``: the shorter side the caller will resize to; JPEGs at least twice that
    size are decoded at a reduced DCT scale that still leaves the shorter side >= it.
    ``use_libjpeg=False`` forces the PIL path.  Raises :class:`BadImageError` naming
    ``path`` for unreadable files.
    """
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        raise BadImageError(path, exc.strerror or str(exc)) from None
    if not data:
        raise BadImageError(path, "empty file")
    if is_jpeg(data):
        info = jpeg_info(data)
        if min_side and info is not None and min(info[:2]) >= 2 * min_side:
            return decode_pil(data, path, min_side)
        if use_libjpeg and _decode_jpeg is not None and info is not None:
            try:
                return _decode_jpeg(
                    torch.frombuffer(bytearray(data), dtype=torch.uint8),
                    mode=_ReadMode.RGB,
                    apply_exif_orientation=info[2],
                )
            except RuntimeError:
                pass  # let PIL decide: it reads some variants libjpeg-turbo refuses, or names the fault
    return decode_pil(data, path, min_side)
