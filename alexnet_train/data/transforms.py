"""Image presets: CPU workers decode and crop to uint8; the float work runs on the device.

Usage::

    train_tf = TrainPreset(cfg.data)          # uint8 (3, H, W) + random.Random -> uint8 crop
    eval_tf = CenterPreset(cfg.data)          # resize shorter side, centre crop
    prep = BatchPreprocess(cfg.data, device)  # uint8 NCHW batch -> normalised float
    x = prep(batch_uint8.to(device), train=True, generator=g)

    # data.decode: device: workers collate to one EncodedBatch, the training process decodes it
    loader = DataLoader(EncodedDataset(samples, train_tf), collate_fn=collate_encoded, ...)
    for packed, targets, bad in loader:
        images, targets, undecodable = DecodeOnDevice(device)(packed, targets)

Presets work on uint8 tensors (torchvision's uint8 resize kernels, no PIL
round trip, no float copies in the workers) and say via ``min_side`` how
small the decoder may shrink an image on load.  A preset is a ``plan`` (the
crop box, flip ... drawn from the image's size alone) and :func:`apply_plan`:
with ``data.decode: device`` the workers draw the plan from the JPEG header and
the training process applies it to the image it decoded on the device (:func:`apply_plans`,
batched, the same pixels).  Every random choice comes from
the ``random.Random`` they are handed, so a sample's augmentation is a pure
function of its seed (the sampler derives it from run seed, epoch and
position): the same crops come out whatever the number of workers, and a
resumed run sees what an uninterrupted one would have.
"""
from __future__ import annotations

import copy
import math
import os
import random
from typing import Sequence

import numpy as np
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


class Collated(tuple):
    """A collate function's (images, int64 targets, [(path, reason)]), whose targets cross from a
    loader worker inline in the pickle: as a tensor of their own they would be one more
    shared-memory segment and file descriptor, as dear to receive as a batch of images."""

    def __reduce__(self):
        images, targets, bad = self
        return _rebuild_collated, (images, targets.numpy(), bad)


def _rebuild_collated(images, targets, bad) -> Collated:
    return Collated((images, torch.from_numpy(targets), bad))


def _in_worker() -> bool:
    return torch.utils.data.get_worker_info() is not None


def _new_uint8(shape: tuple[int, ...], shared: bool) -> torch.Tensor:
    """An empty uint8 tensor, in shared memory when ``shared``.  In a loader worker that saves a
    copy: a private tensor is copied into a shared segment when it is pickled for the main
    process (default_collate allocates in shared memory for the same reason)."""
    if not shared:
        return torch.empty(shape, dtype=torch.uint8)
    storage = torch.UntypedStorage._new_shared(math.prod(shape))
    return torch.empty(0, dtype=torch.uint8).set_(storage).view(shape)


def _stack_channels_last(images: list[torch.Tensor], out: torch.Tensor | None = None) -> torch.Tensor:
    """(N, ..., 3, H, W) of equal (..., 3, H, W) images, channels last in memory, into ``out``
    (uint8 memory of that size) when given."""
    hwc = [x.movedim(-3, -1) for x in images]
    if out is not None:
        out = out.view(len(hwc), *hwc[0].shape)
    return torch.stack(hwc, out=out).movedim(-1, -3)


def collate_hwc(batch: list) -> Collated:
    """(channels-last uint8 images, int64 targets, [(path, reason) of unreadable files]).

    Images are (3, H, W) views of HWC memory, stacked without a transposing copy (in a
    loader worker, straight into shared memory).
    """
    good = [(img, t) for img, t in batch if img is not None]
    bad = [t for img, t in batch if img is None]
    if not good:
        return Collated((torch.empty(0, dtype=torch.uint8), torch.empty(0, dtype=torch.int64), bad))
    # (3, H, W) or, from TenCropPreset, (10, 3, H, W): channels last in memory either way.
    first = good[0][0]
    out = _new_uint8((len(good) * first.numel(),), _in_worker())
    images = _stack_channels_last([img for img, _ in good], out)
    return Collated((images, torch.tensor([t for _, t in good], dtype=torch.int64), bad))


# Plan steps and their number of arguments; a step's code in an encoded plan is its index
# here + 1, and code 0 ends the plan.
_PLAN_STEPS = {"resize": 1, "center": 1, "crop": 4, "resized_crop": 5, "flip": 0}
_PLAN_CODES = tuple(_PLAN_STEPS)
_STEP_WIDTH = 1 + max(_PLAN_STEPS.values())
PLAN_WIDTH = 4 * _STEP_WIDTH  # the longest plan a preset draws: resize, center, crop, flip


def encode_plan(plan: tuple) -> list[int]:
    """A preset's plan as ``PLAN_WIDTH`` ints (:func:`decode_plan` reverses it), so that a
    batch's plans travel as one int64 array."""
    row: list[int] = []
    for op, *args in plan:
        row += [_PLAN_CODES.index(op) + 1, *args] + [0] * (_STEP_WIDTH - 1 - len(args))
    if len(row) > PLAN_WIDTH:
        raise ValueError(f"a plan of {len(plan)} steps; at most {PLAN_WIDTH // _STEP_WIDTH} fit: {plan}")
    return row + [0] * (PLAN_WIDTH - len(row))


def decode_plan(row: Sequence[int]) -> tuple:
    """The plan :func:`encode_plan` encoded as ``row``."""
    steps = []
    for at in range(0, PLAN_WIDTH, _STEP_WIDTH):
        if row[at] == 0:
            break
        op = _PLAN_CODES[row[at] - 1]
        steps.append((op, *row[at + 1 : at + 1 + _PLAN_STEPS[op]]))
    return tuple(steps)


class EncodedBatch:
    """A ``data.decode: device`` batch as a loader worker hands it over (:func:`collate_encoded`):
    everything in one uint8 buffer, ``data``, and the rest of its attributes views of it.

    However big the batch, it crosses to the training process as that one shared-memory
    tensor, so one file descriptor passed over a socket, and a pickle of a few numbers
    (:meth:`__reduce__`).  A tensor per image cost that once per image, and held a descriptor
    per image in flight (``scripts/bench_data.py --handoff``: 0.3 ms an image against ~10 us
    on a 2-core VM); small arrays pickled inline cost more than they weigh, as they fill the
    loader's pipe.  Layout, for n JPEGs and m finished crops::

        offsets    int64 (n + 1,)             JPEG i is jpeg_bytes[offsets[i] : offsets[i + 1]]
        plans      int64 (n, PLAN_WIDTH)      each JPEG's plan (encode_plan)
        from_jpeg  bool (n + m,)              the batch's order: True the next JPEG, False the next crop
        paths      n file names, NUL-separated, to name a JPEG that cannot be decoded
        jpeg_bytes the n files back to back
        crops      uint8 (m, c, c, 3)         what the workers finished (see :attr:`crops`)
    """

    def __init__(self, data: torch.Tensor, n: int, m: int, crop_size: tuple[int, int] | None, paths_nbytes: int,
                 jpeg_nbytes: int) -> None:
        self.data = data
        self.layout = (n, m, crop_size, paths_nbytes, jpeg_nbytes)
        if data.numel() != self.nbytes(*self.layout):
            raise ValueError(f"EncodedBatch: {data.numel()} bytes of data for a layout of {self.nbytes(*self.layout)}")
        at = 0

        def take(nbytes: int) -> torch.Tensor:
            nonlocal at
            at += nbytes
            return data[at - nbytes : at]

        self.offsets = take(8 * (n + 1)).view(torch.int64)
        self.plans = take(8 * n * PLAN_WIDTH).view(torch.int64).view(n, PLAN_WIDTH)
        self.from_jpeg = take(n + m).view(torch.bool)
        self._paths = take(paths_nbytes)
        self.jpeg_bytes = take(jpeg_nbytes)
        # uint8 (m, 3, c, c), channels last; None without finished crops
        self.crops = None if not m else take(3 * m * math.prod(crop_size)).view(m, *crop_size, 3).permute(0, 3, 1, 2)

    @staticmethod
    def nbytes(n: int, m: int, crop_size: tuple[int, int] | None, paths_nbytes: int, jpeg_nbytes: int) -> int:
        """The size of ``data`` for a layout (the constructor's arguments after it)."""
        crops = 3 * m * math.prod(crop_size) if m else 0
        return 8 * (n + 1) + 8 * n * PLAN_WIDTH + n + m + paths_nbytes + jpeg_nbytes + crops

    def __len__(self) -> int:
        return len(self.from_jpeg)

    @property
    def paths(self) -> list[str]:
        """The n JPEGs' files."""
        blob = self._paths.numpy().tobytes()
        return [os.fsdecode(p) for p in blob.split(b"\0")] if self.layout[0] else []

    def jpegs(self) -> list[torch.Tensor]:
        """The n JPEG files as uint8 views of ``data``, for :func:`~.decode.decode_jpegs`."""
        bounds = self.offsets.tolist()
        return [self.jpeg_bytes[a:b] for a, b in zip(bounds[:-1], bounds[1:])]

    def pin_memory(self) -> "EncodedBatch":
        """What the DataLoader's ``pin_memory`` calls: pins the crops, which are copied to the
        device as they are; the JPEG bytes are read by the decoder on the host."""
        pinned = copy.copy(self)
        if self.crops is not None:
            pinned.crops = self.crops.pin_memory()
        return pinned

    def __reduce__(self):
        return EncodedBatch, (self.data, *self.layout)


def collate_encoded(batch: list) -> Collated:
    """``data.decode: device``: (:class:`EncodedBatch`, int64 targets, [(path, reason) of unreadable files]).

    Runs in the worker (the DataLoader collates there), straight into the batch's one
    shared buffer: each JPEG's bytes are copied once, and the crops finished in the
    worker are stacked there too.
    """
    from .datasets import EncodedImage

    good = [(item, t) for item, t in batch if item is not None]
    bad = [t for item, t in batch if item is None]
    jpegs = [item for item, _ in good if isinstance(item, EncodedImage)]
    finished = [item for item, _ in good if not isinstance(item, EncodedImage)]
    paths = b"\0".join(os.fsencode(it.path) for it in jpegs)
    offsets = np.zeros(len(jpegs) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(it.data) for it in jpegs], dtype=np.int64)
    layout = (len(jpegs), len(finished), tuple(finished[0].shape[-2:]) if finished else None, len(paths),
              int(offsets[-1]))
    packed = EncodedBatch(_new_uint8((EncodedBatch.nbytes(*layout),), _in_worker()), *layout)
    packed.offsets.numpy()[:] = offsets
    if jpegs:
        packed.plans.copy_(torch.tensor([encode_plan(it.plan) for it in jpegs], dtype=torch.int64))
    packed.from_jpeg.copy_(torch.tensor([isinstance(item, EncodedImage) for item, _ in good], dtype=torch.bool))
    packed._paths.numpy()[:] = np.frombuffer(paths, dtype=np.uint8)
    flat = packed.jpeg_bytes.numpy()
    for it, a, b in zip(jpegs, offsets[:-1].tolist(), offsets[1:].tolist()):
        flat[a:b] = np.frombuffer(it.data, dtype=np.uint8)
    if finished:
        _stack_channels_last(finished, packed.crops.permute(0, 2, 3, 1))
    return Collated((packed, torch.tensor([t for _, t in good], dtype=torch.int64), bad))


class DecodeOnDevice:
    """``data.decode: device``: a batch from :func:`collate_encoded` -> what :func:`collate_hwc` gives.

    The JPEGs are decoded on ``device`` in one batched call (nvJPEG on CUDA, libjpeg-turbo
    on the CPU: the same call either way) and the plans the workers drew are applied
    there, batched (:func:`apply_plans`); crops the workers finished are moved over in one
    copy.  Returns (channels-last uint8 batch on ``device``, the targets of the images kept,
    [(path, reason)] of undecodable files), in the batch's order.
    """

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)

    def __call__(self, batch: EncodedBatch, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list]:
        from .decode import decode_jpegs

        paths = batch.paths
        decoded = decode_jpegs(batch.jpegs(), paths, self.device)
        plans = [decode_plan(row) for row in batch.plans.tolist()]
        crops = None if batch.crops is None else batch.crops.to(self.device, non_blocking=True)
        keep: list[int] = []
        slots: list = []  # per image kept, in order: a finished crop, or the index of its decoded JPEG
        bad = []
        jpeg = crop = 0
        for i, from_jpeg in enumerate(batch.from_jpeg.tolist()):
            if not from_jpeg:
                keep.append(i)
                slots.append(crops[crop])
                crop += 1
            elif isinstance(decoded[jpeg], str):
                bad.append((paths[jpeg], decoded[jpeg]))
                jpeg += 1
            else:
                keep.append(i)
                slots.append(jpeg)
                jpeg += 1
        if not keep:
            return torch.empty(0, dtype=torch.uint8, device=self.device), targets[:0], bad
        done, flips = apply_plans([(k, decoded[s], plans[s]) for k, s in enumerate(slots) if isinstance(s, int)])
        images = _stack_channels_last([done[k] if isinstance(s, int) else s for k, s in enumerate(slots)])
        if flips:
            # One indexed flip of the batch instead of a mirrored copy per image.
            index = torch.tensor(flips)
            if self.device.type == "cuda":
                index = index.pin_memory().to(self.device, non_blocking=True)  # pageable memory could block
            images[index] = images[index].flip(-1)
        return images, targets if len(keep) == len(targets) else targets[keep], bad


def _split_plan(plan: tuple) -> tuple[tuple, tuple | None, bool] | None:
    """(leading resize / centre steps, the crop step or None, whether to mirror) of a preset's plan;
    None for a plan of another shape."""
    steps = list(plan)
    flip = bool(steps) and steps[-1] == ("flip",)
    if flip:
        steps.pop()
    box = steps.pop() if steps and steps[-1][0] in ("crop", "resized_crop") else None
    if any(op not in ("resize", "center") for op, *_ in steps):
        return None
    return tuple(steps), box, flip


def _channels_innermost(x: torch.Tensor) -> bool:
    return x.stride(-3) < x.stride(-1)


def _stack_like(images: list[torch.Tensor]) -> torch.Tensor:
    """(N, 3, H, W) of equal images, in their own memory layout (a plain copy, where stacking
    HWC images as CHW would transpose each); one image is a view, not a copy."""
    if len(images) == 1:
        return images[0].unsqueeze(0)
    if _channels_innermost(images[0]):
        return torch.stack([x.movedim(-3, -1) for x in images]).movedim(-1, -3)
    return torch.stack(images)


def apply_plans(items: list[tuple[int, torch.Tensor, tuple]]) -> tuple[dict[int, torch.Tensor], list[int]]:
    """:func:`apply_plan` for many (key, (3, H, W) uint8 image, plan) at once, the same pixels.

    Returns ({key: (3, c, c) crop}, [keys whose plan mirrors]): the mirror is left to the
    caller, to do for the whole batch in one indexed flip.  Batched where sizes allow:
    images of one size and layout whose plans start with the same resize / centre steps
    are resized as one stack, and ``resized_crop`` boxes of one size as one stack, where a
    resize per image costs a few kernel launches each.  A crop is a view.
    """
    done: dict[int, torch.Tensor] = {}
    flips: list[int] = []
    by_source: dict[tuple, list] = {}
    boxed: list[tuple[int, torch.Tensor, tuple | None]] = []  # (key, image after its leading steps, crop step)
    for key, x, plan in items:
        split = _split_plan(plan)
        if split is None:  # not a preset's shape: image by image
            done[key] = apply_plan(x, plan)
            continue
        leading, box, flip = split
        if flip:
            flips.append(key)
        if leading:
            by_source.setdefault((tuple(x.shape), _channels_innermost(x), leading), []).append((key, x, box))
        else:
            boxed.append((key, x, box))
    for (_, _, leading), group in by_source.items():
        y = _stack_like([x for _, x, _ in group])
        for op, size in leading:
            y = resize_shorter(y, size) if op == "resize" else center_crop(y, size)
        boxed += [(key, image, box) for (key, _, box), image in zip(group, y)]
    by_box: dict[tuple, list] = {}
    for key, y, box in boxed:
        if box is None:
            done[key] = y
            continue
        top, left, h, w = box[1:5]
        y = y[..., top : top + h, left : left + w]
        if box[0] == "crop":
            done[key] = y
        else:  # resized_crop
            by_box.setdefault((h, w, box[5], _channels_innermost(y)), []).append((key, y))
    for (_, _, size, _), group in by_box.items():
        y = F.resize(_stack_like([c for _, c in group]), [size, size], antialias=True)
        done.update((key, image) for (key, _), image in zip(group, y))
    return done, flips


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
