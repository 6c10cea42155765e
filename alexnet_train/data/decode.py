"""Fast image decoding to uint8 RGB tensors.

Usage::

    x = decode_rgb("n01440764_10026.JPEG", min_side=256)   # uint8 (3, H, W), H/W >= 256 where possible

JPEGs go through TorchCodec's ``decode_jpeg`` (libjpeg-turbo, the maintained
successor of ``torchvision.io``'s codecs) where TorchCodec is installed: faster
than PIL's decoder, straight into a tensor, and the same call decodes a batch
on a GPU (nvJPEG; :func:`decode_jpegs`).  Without it PIL decodes everything.  A JPEG whose
shorter side is at least twice ``min_side`` is decoded by PIL at a reduced DCT
scale instead (``Image.draft``: 1/2, 1/4 or 1/8 of the pixels to reconstruct),
since the pipeline would throw those pixels away in the resize anyway.
Everything else PIL can read (PNG, also when named ``.JPEG``; CMYK; palette;
grayscale; RGBA) goes through PIL.  EXIF orientation is applied in both paths.

``data.decode: device`` (:func:`decode_jpegs`) has its own backend, ``DEVICE_DECODER``:
TorchCodec's ``decode_jpeg`` where it loads, else ``torchvision.io.decode_jpeg``
(deprecated since torchvision 0.29, but the only batched nvJPEG call in images that ship
torch without TorchCodec), else None.  ``ALEXNET_TRAIN_DEVICE_DECODER=torchcodec|torchvision``
forces one; a forced one that does not load leaves ``DEVICE_DECODER`` None and says why in
``DEVICE_DECODER_PROBLEM`` (``loaders.check_decode`` raises it), rather than failing the import::

    use_device_decoder("torchvision")   # force a backend for this process (tests, benchmarks)
    use_device_decoder()                # back to the environment's / the automatic choice
"""
from __future__ import annotations

import io
import math
import os
import warnings
from typing import Callable

import numpy as np
import torch
from PIL import Image, ImageOps

from ..errors import BadImageError
from .shards import is_member  # <shard>::<member>@<offset>+<size>

# ImageNet's largest files are ~ 20 megapixels; PIL's bomb guard (89 MP warning,
# 179 MP error) would only stop legitimate scans.  A hard cap still refuses garbage.
Image.MAX_IMAGE_PIXELS = 400_000_000

# TorchCodec's wheels are built for one torch release: a mismatched pair fails to load its
# native library (OSError / RuntimeError), and then PIL decodes everything.
try:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torchcodec.decoders import decode_jpeg as _decode_jpeg
except (ImportError, OSError, RuntimeError):  # pragma: no cover - depends on what is installed
    _decode_jpeg = None

FAST_DECODER = "torchcodec" if _decode_jpeg is not None else None

DEVICE_DECODER_ENV = "ALEXNET_TRAIN_DEVICE_DECODER"
DEVICE_DECODERS = ("torchcodec", "torchvision")  # the automatic choice takes the first that loads
DEVICE_DECODER_LABELS = {"torchcodec": "TorchCodec", "torchvision": "torchvision.io.decode_jpeg"}

# A backend: (list of CPU uint8 byte tensors, device) -> list of uint8 (3, H, W) tensors on device.
DeviceDecode = Callable[[list, torch.device], list]


def _load_torchcodec() -> DeviceDecode:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torchcodec.decoders import decode_jpeg

    return lambda tensors, device: list(decode_jpeg(tensors, mode="RGB", device=device))


def _load_torchvision() -> DeviceDecode:
    from torchvision.io import ImageReadMode, decode_jpeg

    torch.ops.image.decode_jpeg  # AttributeError when torchvision's image library did not load

    def decode(tensors: list, device: torch.device) -> list:
        # Deprecated since torchvision 0.29; the warning is silenced here only, where we chose it knowingly.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            # RGB also for grayscale JPEGs: libjpeg / nvJPEG convert, so every image has 3 channels.
            return list(decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device))

    return decode


_DEVICE_LOADERS = {"torchcodec": _load_torchcodec, "torchvision": _load_torchvision}


def _why(exc: BaseException) -> str:
    """An exception as one short line (a dlopen error can run to several)."""
    text = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__


def use_device_decoder(name: str | None = None) -> str | None:
    """Choose the backend of :func:`decode_jpegs`; returns ``DEVICE_DECODER`` as it now is.

    ``name`` (``torchcodec`` | ``torchvision``) forces that backend, as does
    ``$ALEXNET_TRAIN_DEVICE_DECODER`` when ``name`` is None; neither: the first of
    ``DEVICE_DECODERS`` that loads.  A forced backend that does not load, or an unknown
    name, sets ``DEVICE_DECODER`` None and ``DEVICE_DECODER_PROBLEM`` to a one-line reason;
    the other backend is never taken instead, so a forced choice is never silently ignored.
    Call it before the DataLoader forks its workers, which read the choice.
    """
    global DEVICE_DECODER, DEVICE_DECODER_FORCED, DEVICE_DECODER_PROBLEM, _device_decode
    forced = name or os.environ.get(DEVICE_DECODER_ENV, "").strip() or None
    source = f"use_device_decoder({name!r})" if name else f"{DEVICE_DECODER_ENV}={forced}"
    DEVICE_DECODER, DEVICE_DECODER_PROBLEM, _device_decode = None, None, None
    DEVICE_DECODER_FORCED = source if forced else None
    if forced is not None and forced not in _DEVICE_LOADERS:
        DEVICE_DECODER_PROBLEM = f"{source}: unknown device JPEG decoder; expected one of {', '.join(DEVICE_DECODERS)}"
        return None
    for candidate in [forced] if forced else DEVICE_DECODERS:
        try:
            _device_decode = _DEVICE_LOADERS[candidate]()
        except (ImportError, OSError, RuntimeError, AttributeError) as exc:  # what a missing or mismatched build raises
            if forced:
                DEVICE_DECODER_PROBLEM = (f"{source}, but {DEVICE_DECODER_LABELS[candidate]} cannot be loaded here "
                                          f"({_why(exc)})")
        else:
            DEVICE_DECODER = candidate
            return candidate
    return None


DEVICE_DECODER: str | None = None
DEVICE_DECODER_FORCED: str | None = None  # what forced the choice ("ALEXNET_TRAIN_DEVICE_DECODER=..."), if anything
DEVICE_DECODER_PROBLEM: str | None = None
_device_decode: DeviceDecode | None = None
use_device_decoder()

_SOF_MARKERS = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def is_jpeg(data: bytes) -> bool:
    return data[:3] == b"\xff\xd8\xff"


def jpeg_info(data: bytes) -> tuple[int, int, bool] | None:
    """(width, height, has_exif) from a JPEG's headers, without decoding; None if no frame header.

    ``has_exif`` matters for speed: libjpeg-turbo's EXIF orientation handling costs
    about a third of a 256-px decode, so it is only asked for where an EXIF block exists.
    """
    found = _frame_header(data)
    if found is None:
        return None
    i, has_exif = found
    height = int.from_bytes(data[i + 5 : i + 7], "big")
    width = int.from_bytes(data[i + 7 : i + 9], "big")
    return (width, height, has_exif) if width and height else None


def jpeg_components(data: bytes) -> int | None:
    """Colour components of a JPEG's frame (1 grey, 3 YCbCr, 4 CMYK/YCCK); None if no frame header."""
    found = _frame_header(data)
    return data[found[0] + 9] if found is not None and found[0] + 9 < len(data) else None


def _frame_header(data: bytes) -> tuple[int, bool] | None:
    """(offset of the SOF marker, whether an EXIF block came before it), walking the markers."""
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
            return i, has_exif
        if marker == 0xDA:  # start of scan: no frame header before it
            return None
        i += 2 + length
    return None


def exif_orientation(data: bytes) -> int:
    """The EXIF orientation tag (1-8) of a JPEG; 1 (upright) when it has none or it is unreadable.

    (For ``data.decode: device``, which leaves turned JPEGs to the workers.)"""
    i, n = 2, len(data)
    while i + 4 < n and data[i] == 0xFF:
        marker, length = data[i + 1], int.from_bytes(data[i + 2 : i + 4], "big")
        if marker == 0xDA:
            return 1
        if marker == 0xE1 and data[i + 4 : i + 10] == b"Exif\x00\x00":
            tiff = data[i + 10 : i + 2 + length]
            order = "little" if tiff[:2] == b"II" else "big"
            ifd = int.from_bytes(tiff[4:8], order)
            count = int.from_bytes(tiff[ifd : ifd + 2], order)
            for e in range(ifd + 2, ifd + 2 + 12 * count, 12):
                if int.from_bytes(tiff[e : e + 2], order) == 0x0112:
                    value = int.from_bytes(tiff[e + 8 : e + 10], order)
                    return value if 1 <= value <= 8 else 1
            return 1
        i += 2 + length
    return 1


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


def read_bytes(path: str) -> bytes:
    if is_member(path):  # a sample of a WebDataset shard: one pread of its byte range
        from .shardread import read_member

        return read_member(path)
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        raise BadImageError(path, exc.strerror or str(exc)) from None
    if not data:
        raise BadImageError(path, "empty file")
    return data


def decode_rgb(path: str, min_side: int | None = None, use_libjpeg: bool = True) -> torch.Tensor:
    """Decode any image PIL or libjpeg-turbo reads into a uint8 RGB tensor (3, H, W).

    ``min_side``: the shorter side the caller will resize to; JPEGs at least twice that
    size are decoded at a reduced DCT scale that still leaves the shorter side >= it.
    ``use_libjpeg=False`` forces the PIL path (as does a missing TorchCodec).  Raises
    :class:`BadImageError` naming ``path`` for unreadable files.
    """
    return decode_bytes(read_bytes(path), path, min_side, use_libjpeg)


def decode_bytes(data: bytes, path: str, min_side: int | None = None, use_libjpeg: bool = True) -> torch.Tensor:
    """:func:`decode_rgb` of a file's bytes (``path`` names it in errors)."""
    if is_jpeg(data):
        info = jpeg_info(data)
        if min_side and info is not None and min(info[:2]) >= 2 * min_side:
            return decode_pil(data, path, min_side)
        if use_libjpeg and _decode_jpeg is not None and info is not None:
            try:
                x = _decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode="RGB")
            except RuntimeError:
                pass  # let PIL decide: it reads some variants libjpeg-turbo refuses, or names the fault
            else:
                return x  # TorchCodec applies the EXIF orientation itself
    return decode_pil(data, path, min_side)


def device_decodable(data: bytes) -> tuple[int, int] | None:
    """(height, width) of a JPEG :func:`decode_jpegs` takes as it is; None for anything else.

    Turned JPEGs (EXIF orientation other than 1) are left to the workers, whose decode
    turns them upright: their size before the turn is not the size the crops are for.
    So are CMYK / YCCK ones (4 components; Adobe's inverted inks), which not every GPU
    decoder reads the way libjpeg-turbo does.
    """
    if DEVICE_DECODER is None:
        return None
    info = jpeg_info(data)
    if info is None or jpeg_components(data) not in (1, 3) or (info[2] and exif_orientation(data) != 1):
        return None
    return info[1], info[0]


_decode_streams: dict[int, "torch.cuda.Stream"] = {}


def _decode_stream(device: torch.device) -> "torch.cuda.Stream":
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _decode_streams:
        _decode_streams[index] = torch.cuda.Stream(index)
    return _decode_streams[index]


def _decode_on(encoded: list[torch.Tensor], device: torch.device) -> list:
    if device.type != "cuda":
        return _device_decode(encoded, device)
    # A stream of its own, because the backends cannot be trusted with memory that kernels queued
    # on the caller's stream still read: torchvision decodes on a private stream never ordered
    # after the caller's (pytorch/vision#9606, every nvJPEG path), and nvJPEG's hardware batched
    # path writes before the work queued on its stream has run (meta-pytorch/torchcodec#1634,
    # TorchCodec 0.16; both measured on H100).  Either harms only through the caching allocator
    # handing the decoder a block that queued kernels still read.  On this stream only decodes
    # allocate, so the outputs come from its pool, and record_stream keeps each block out of that
    # pool until the caller's kernels that read it have run; and nothing is ever queued on it
    # ahead of a decode, so there is nothing to overtake.  TorchCodec's host sync of the stream it
    # decodes on then waits for the decode alone, not for the training step queued on the
    # caller's: no drain per batch.  (vision#9606's thread reports its reproducer clean when the
    # decode is called under another stream than the one that freed the memory; not yet run here.)
    caller = torch.cuda.current_stream(device)
    decoding = _decode_stream(device)
    with torch.cuda.stream(decoding):
        out = _device_decode(encoded, device)
    caller.wait_stream(decoding)
    for x in out:
        x.record_stream(caller)
    return out


def decode_jpegs(encoded: list[torch.Tensor], paths: list[str], device: torch.device) -> list:
    """Decode JPEG byte tensors (on the CPU) on ``device`` in one batched call (nvJPEG on CUDA),
    with the ``DEVICE_DECODER`` backend.

    Returns, per input, a uint8 (3, H, W) tensor on ``device`` or the reason it could not
    be decoded.  On CUDA the decode neither waits for nor overtakes the work queued on the
    current stream, and what it returns is ready for that stream.  A batch the decoder
    refuses is retried one by one, and an image it refuses goes to PIL, as
    :func:`decode_rgb` does, so the bad file is named.
    """
    if not encoded:
        return []
    if _device_decode is None:
        raise RuntimeError(DEVICE_DECODER_PROBLEM or "data.decode: device: no device JPEG decoder loads here")
    device = torch.device(device)
    try:
        return _decode_on(encoded, device)
    except RuntimeError:
        pass  # one bad file fails the whole batch (nvJPEG returns no partial results)
    out: list = []
    for data, path in zip(encoded, paths):
        try:
            out.append(_decode_on([data], device)[0])
        except RuntimeError:
            try:
                out.append(decode_pil(data.numpy().tobytes(), path).to(device))
            except BadImageError as exc:
                out.append(exc.reason)
    return out
