"""Batches between the loader's workers and the training step: collation into shared
memory, and ``data.decode: device``'s hand-off (one buffer of JPEG bytes and crop plans per
batch, decoded and cropped on the device).

Usage::

    loader = DataLoader(ImageDataset(samples, preset), collate_fn=collate_hwc, ...)    # uint8 NCHW
    loader = DataLoader(EncodedDataset(samples, preset), collate_fn=collate_encoded, ...)
    for packed, targets, bad in loader:
        images, targets, undecodable = DecodeOnDevice(device)(packed, targets)
"""
from __future__ import annotations

import copy
import math
import os
from typing import Sequence

import numpy as np
import torch
import torchvision.transforms.v2.functional as F

from . import ring
from .transforms import apply_plan, center_crop, resize_shorter


class Collated(tuple):
    """A collate function's (images, int64 targets, [(path, reason)]), whose targets cross from a
    loader worker inline in the pickle: as a tensor of their own they would be one more
    shared-memory segment and file descriptor, as dear to receive as a batch of images."""

    def __reduce__(self):
        images, targets, bad = self
        return _rebuild_collated, (ring.ship(images), targets.numpy(), bad)


def _rebuild_collated(images, targets, bad) -> Collated:
    return Collated((images, torch.from_numpy(targets), bad))


def _in_worker() -> bool:
    return torch.utils.data.get_worker_info() is not None


def _new_uint8(shape: tuple[int, ...], shared: bool) -> torch.Tensor:
    """An empty uint8 tensor, in shared memory when ``shared``: a free slot of this worker's
    :mod:`~.ring` (reused, and received without a new mapping), else a fresh segment.  In a
    loader worker that saves a copy: a private tensor is copied into a shared segment when
    it is pickled for the main process (default_collate allocates in shared memory for the
    same reason)."""
    if not shared:
        return torch.empty(shape, dtype=torch.uint8)
    slot = ring.take(math.prod(shape))
    if slot is not None:
        return slot.view(shape)
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
    tensor, and a pickle of a few numbers (:meth:`__reduce__`): in a worker's reused
    :mod:`~.ring` slot, a slot number; else one file descriptor passed over a socket.  A
    tensor per image cost a descriptor once per image, and held one per image in flight
    (``scripts/bench_data.py --handoff``: 0.3 ms an image against ~10 us on a 2-core VM, and
    under 1 us in a ring slot); small arrays pickled inline cost more than they weigh, as
    they fill the loader's pipe.  Layout, for n JPEGs and m finished crops::

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
        return EncodedBatch, (ring.ship(self.data), *self.layout)


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
