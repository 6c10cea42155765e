"""data.decode: device's hand-off: a worker ships a batch as one EncodedBatch (one buffer: the
JPEG files, the crops it finished, the plans and paths), whatever the batch size, and the
training process decodes it and applies the plans batched.  The pixels must be those of the
per-image path it replaced (decode, apply_plan image by image, stack), bit for bit."""
from __future__ import annotations

import dataclasses
import io
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from alexnet_train.config import DataConfig
from alexnet_train.data.datasets import EncodedDataset, EncodedImage, ImageDataset, scan_image_folder
from alexnet_train.data.decode import decode_bytes, decode_jpegs
from alexnet_train.data.loaders import EpochSampler, close_loader, make_loader
from alexnet_train.data.batching import (Collated, DecodeOnDevice, EncodedBatch, PLAN_WIDTH, apply_plans,
                                         collate_encoded, collate_hwc, decode_plan, encode_plan)
from alexnet_train.data.transforms import CenterPreset, TrainPreset, apply_plan

from .conftest import SHARED_DATA, decoder_disagreement, write_image_folder
from .test_device_decode import exif

PRESETS = {
    "paper": lambda cfg: TrainPreset(cfg),
    "paper-square": lambda cfg: TrainPreset(dataclasses.replace(cfg, center_square=True)),
    "torchvision": lambda cfg: TrainPreset(dataclasses.replace(cfg, augment="torchvision")),
    "center": lambda cfg: CenterPreset(cfg),
}


@pytest.fixture
def mixed_tree(tmp_path: Path) -> Path:
    """An ImageFolder of JPEGs in a few repeated sizes (so that batches hold images of one size
    to resize together), plus what the workers finish themselves (PNG named .JPEG, CMYK, an
    EXIF turn), a grayscale and a progressive JPEG, and one whose scan data is noise."""
    rng = np.random.default_rng(3)
    sizes = [(64, 80), (80, 64), (72, 72), (90, 120), (75, 100)]
    for c, name in enumerate(["n01", "n02"]):
        folder = tmp_path / "train" / name
        folder.mkdir(parents=True)
        for i in range(14):
            h, w = sizes[(i + c) % len(sizes)]
            arr = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
            Image.fromarray(arr, "RGB").save(folder / f"{name}_{i:03d}.JPEG", quality=90)
    root = tmp_path / "train"
    photo = Image.fromarray(rng.integers(0, 255, (90, 120, 3), dtype=np.uint8), "RGB")
    photo.save(root / "n01" / "png_named.JPEG", "PNG")
    photo.convert("CMYK").save(root / "n01" / "cmyk.JPEG", "JPEG", quality=90)
    photo.convert("L").save(root / "n02" / "gray.JPEG", "JPEG", quality=90)
    photo.save(root / "n02" / "turned.JPEG", "JPEG", quality=90, exif=exif(6))
    photo.save(root / "n02" / "progressive.JPEG", "JPEG", quality=90, progressive=True)
    good = (root / "n01" / "n01_000.JPEG").read_bytes()
    (root / "n02" / "broken.JPEG").write_bytes(good[:600] + bytes(rng.integers(0, 256, 4000, dtype=np.uint8)))
    return root


def per_image_path(batch: list, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor, list]:
    """What data.decode: device did before EncodedBatch, from the dataset's items: decode the
    JPEGs in one call, apply each plan image by image, stack; (images, targets, all bad files)."""
    good = [(item, t) for item, t in batch if item is not None]
    bad = [t for item, t in batch if item is None]
    jpegs = [(i, item) for i, (item, _) in enumerate(good) if isinstance(item, EncodedImage)]
    decoded = decode_jpegs([torch.frombuffer(bytearray(it.data), dtype=torch.uint8) for _, it in jpegs],
                           [it.path for _, it in jpegs], torch.device(device))
    done = {}
    for (i, it), x in zip(jpegs, decoded):
        if isinstance(x, str):
            bad.append((it.path, x))
        else:
            done[i] = apply_plan(x, it.plan)
    for i, (item, _) in enumerate(good):
        if not isinstance(item, EncodedImage):
            done[i] = item
    keep = sorted(done)
    images = torch.stack([done[i].movedim(-3, -1) for i in keep]).movedim(-1, -3)
    return images, torch.tensor([good[i][1] for i in keep]), bad


def epoch_keys(n: int, seed: int = 5) -> list:
    sampler = EpochSampler(n, seed, True)
    sampler.set_epoch(1)
    return list(sampler)


class TensorCount(pickle.Pickler):
    """Pickles with each tensor replaced by a stub, counting them: every tensor a loader worker
    sends is a shared-memory segment and a file descriptor for the training process."""

    def __init__(self) -> None:
        self.buffer = io.BytesIO()
        super().__init__(self.buffer, protocol=pickle.HIGHEST_PROTOCOL)
        self.tensors = 0

    def reducer_override(self, obj):
        if isinstance(obj, torch.Tensor):
            self.tensors += 1
            return torch.empty, (0,)
        return NotImplemented


def sent(obj) -> tuple[int, int]:
    """(tensors, bytes of pickle besides them) ``obj`` crosses processes as."""
    counter = TensorCount()
    counter.dump(obj)
    return counter.tensors, len(counter.buffer.getvalue())


def test_a_batch_crosses_as_one_tensor_and_a_few_bytes_whatever_its_size(mixed_tree):
    cfg = DataConfig(resize_size=72, crop_size=64)
    _, samples = scan_image_folder(str(mixed_tree))
    ds = EncodedDataset(samples, TrainPreset(cfg))
    items = [ds[key] for key in epoch_keys(len(samples))]
    assert any(not isinstance(it, EncodedImage) and it is not None for it, _ in items)  # finished crops too
    for size in (2, 8, len(items)):
        collated = collate_encoded(items[:size])
        packed, targets, bad = collated
        tensors, nbytes = sent(collated)
        assert tensors == 1  # the buffer: JPEG bytes, crops, plans and paths in one; the targets ride inline
        assert nbytes < 400 + 10 * size  # numbers, not per-image objects (the targets: 8 bytes an image)
        storage = packed.data.untyped_storage().data_ptr()
        assert packed.jpeg_bytes.untyped_storage().data_ptr() == storage
        assert packed.crops is None or packed.crops.untyped_storage().data_ptr() == storage
        assert len(packed) == len(targets) == size - len(bad)
    assert sent(collate_hwc([ImageDataset(samples, TrainPreset(cfg))[k] for k in epoch_keys(len(samples))[:8]]))[0] == 1


def test_an_encoded_batch_survives_the_pickle_a_worker_sends(mixed_tree):
    import torch.multiprocessing  # noqa: F401  (registers the reductions: tensors as shared memory)
    from multiprocessing.reduction import ForkingPickler  # what a loader worker's queue pickles with

    cfg = DataConfig(resize_size=72, crop_size=64)
    _, samples = scan_image_folder(str(mixed_tree))
    ds = EncodedDataset(samples, CenterPreset(cfg))
    collated = collate_encoded([ds[key] for key in epoch_keys(len(samples))])
    packed, targets, bad = collated
    back = pickle.loads(ForkingPickler.dumps(collated))
    assert isinstance(back, Collated) and isinstance(back[0], EncodedBatch)
    assert torch.equal(back[1], targets) and back[2] == bad
    assert back[0].paths == packed.paths and torch.equal(back[0].plans, packed.plans)
    assert [torch.equal(a, b) for a, b in zip(back[0].jpegs(), packed.jpegs())] == [True] * len(packed.paths)
    assert torch.equal(back[0].crops, packed.crops) and torch.equal(back[0].from_jpeg, packed.from_jpeg)


@pytest.mark.parametrize("preset", list(PRESETS))
def test_two_workers_hand_over_batches_that_decode_to_the_per_image_pixels(mixed_tree, preset):
    cfg = DataConfig(resize_size=72, crop_size=64)
    _, samples = scan_image_folder(str(mixed_tree))
    ds = EncodedDataset(samples, PRESETS[preset](cfg))
    sampler = EpochSampler(len(samples), 5, True)
    sampler.set_epoch(1)
    keys = list(sampler)
    loader = make_loader(ds, sampler, 8, 2, False, collate_encoded)
    try:
        batches = list(loader)
    finally:
        close_loader(loader)
    decoder = DecodeOnDevice("cpu")
    assert len(batches) == 5  # 34 files, batches of 8
    named = []
    for k, (packed, targets, bad) in enumerate(batches):
        images, kept, undecodable = decoder(packed, targets)
        want_images, want_targets, want_bad = per_image_path([ds[key] for key in keys[8 * k : 8 * k + 8]])
        assert torch.equal(images, want_images) and torch.equal(kept, want_targets)
        assert bad + undecodable == want_bad
        assert images.is_contiguous(memory_format=torch.channels_last)
        named += undecodable
    assert [Path(p).name for p, _ in named] == ["broken.JPEG"] and named[0][1]


def test_a_mixed_batch_keeps_its_order_and_names_every_bad_file(mixed_tree):
    cfg = DataConfig(resize_size=72, crop_size=64)
    preset = TrainPreset(cfg)
    root = mixed_tree
    files = ["n01/n01_000.JPEG", "n01/png_named.JPEG", "n02/broken.JPEG", "n02/n02_003.JPEG", "n01/cmyk.JPEG",
             "n02/gray.JPEG", "n02/turned.JPEG"]
    ds = EncodedDataset([(str(root / f), t) for t, f in enumerate(files)], preset)
    items = [ds[(i, 100 + i)] for i in range(len(files))]
    items.insert(3, (None, ("/nowhere/missing.JPEG", "No such file or directory")))  # what a worker reports
    kinds = [type(it).__name__ for it, _ in items]
    assert kinds == ["EncodedImage", "Tensor", "EncodedImage", "NoneType", "EncodedImage", "Tensor", "EncodedImage",
                     "Tensor"]
    packed, targets, bad = collate_encoded(items)
    assert packed.from_jpeg.tolist() == [True, False, True, True, False, True, False]
    images, kept, undecodable = DecodeOnDevice("cpu")(packed, targets)
    assert kept.tolist() == [0, 1, 3, 4, 5, 6]  # the broken JPEG (2) and the missing file left out, in order
    assert bad == [("/nowhere/missing.JPEG", "No such file or directory")]
    assert [p for p, _ in undecodable] == [str(root / "n02/broken.JPEG")]
    for image, t in zip(images, kept.tolist()):
        path = str(root / files[t])
        x = decode_bytes(Path(path).read_bytes(), path)
        assert torch.equal(image, preset(x, random.Random(100 + t))), files[t]


def test_apply_plans_batches_what_it_can_and_keeps_every_pixel():
    rng = np.random.default_rng(0)
    images, plans = [], []
    for i in range(40):
        h, w = [(60, 80), (80, 60), (64, 64)][i % 3]
        x = torch.from_numpy(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        images.append(x.permute(2, 0, 1) if i % 4 else x.permute(2, 0, 1).contiguous())  # both decoder layouts
        box = (i % 5, 2, 40, 50) if i % 2 else (3, 4, 40, 50)  # equal box sizes: one resize for several
        plans.append([(("resize", 72), ("center", 72), ("crop", i % 7, i % 5, 64, 64)),
                      (("resize", 70), ("crop", 1, 2, 64, 64), ("flip",)),
                      (("resized_crop", *box, 64), ("flip",)),
                      (("resized_crop", 0, 0, h - i % 3, w, 64),),
                      (("resize", 64), ("center", 64)),
                      (("crop", 0, 0, 40, 40), ("resize", 64), ("center", 64))][i % 6])  # not a preset's: one by one
    done, flips = apply_plans([(k, x, p) for k, (x, p) in enumerate(zip(images, plans))])
    assert sorted(flips) == [k for k, p in enumerate(plans) if p[-1] == ("flip",)]
    for k, (x, plan) in enumerate(zip(images, plans)):
        got = done[k].flip(-1) if k in flips else done[k]
        assert torch.equal(got, apply_plan(x, plan)), (k, plan)


def test_plans_travel_as_numbers_and_come_back_the_same():
    rng = random.Random(0)
    for name, make in PRESETS.items():
        preset = make(DataConfig())
        for _ in range(50):
            h, w = rng.randint(224, 900), rng.randint(224, 900)
            plan = preset.plan(h, w, rng)
            row = encode_plan(plan)
            assert len(row) == PLAN_WIDTH and decode_plan(row) == plan, name
    with pytest.raises(ValueError):
        encode_plan((("flip",),) * 5)


needs_shared = pytest.mark.skipif(not (SHARED_DATA / "imagenet-sample-1k").is_dir(),
                                  reason=f"{SHARED_DATA / 'imagenet-sample-1k'} is absent")


@needs_shared
@pytest.mark.parametrize("preset", list(PRESETS))
def test_real_photos_decode_to_the_per_image_pixels(preset):
    """256 of the 1000 full-size ImageNet photos (68-2400 px, their sizes as ImageNet mixes them),
    in two batches of 128, at the training sizes."""
    _, samples = scan_image_folder(str(SHARED_DATA / "imagenet-sample-1k"))
    ds = EncodedDataset(samples, PRESETS[preset](DataConfig()))
    keys = epoch_keys(len(samples))[:256]
    decoder = DecodeOnDevice("cpu")
    for start in (0, 128):
        items = [ds[key] for key in keys[start : start + 128]]
        images, targets, bad = decoder(*collate_encoded(items)[:2])
        want_images, want_targets, want_bad = per_image_path(items)
        assert images.shape == (128, 3, 224, 224) and bad == want_bad == []
        assert torch.equal(images, want_images) and torch.equal(targets, want_targets)


@pytest.mark.cuda
def test_pinned_batches_from_two_workers_decode_on_cuda(tmp_path):
    root = write_image_folder(tmp_path / "train", ["n01", "n02"], 12, size=80, seed=4)
    Image.open(root / "n01" / "n01_000.JPEG").save(root / "n01" / "png_named.JPEG", "PNG")  # a worker's crop
    cfg = DataConfig(resize_size=72, crop_size=64)
    _, samples = scan_image_folder(str(root))
    sampler = EpochSampler(len(samples), 5, True)
    sampler.set_epoch(1)
    loader = make_loader(EncodedDataset(samples, TrainPreset(cfg)), sampler, 8, 2, True, collate_encoded)
    try:
        batches = list(loader)
    finally:
        close_loader(loader)
    assert any(packed.crops is not None for packed, _, _ in batches)
    disagreement = decoder_disagreement(root)
    assert disagreement < 8.0, f"nvJPEG and the CPU decoder disagree by {disagreement:.2f} levels per pixel"
    for packed, targets, bad in batches:
        assert packed.crops is None or packed.crops.is_pinned()
        on_cuda, kept, undecodable = DecodeOnDevice("cuda")(packed, targets)
        on_cpu, kept_cpu, undecodable_cpu = DecodeOnDevice("cpu")(packed, targets)
        assert on_cuda.device.type == "cuda" and on_cuda.shape == on_cpu.shape
        assert torch.equal(kept, kept_cpu) and bad == undecodable == undecodable_cpu == []
        assert on_cuda.is_contiguous(memory_format=torch.channels_last)
        # The decoders alone disagree by a few grey levels (conftest.decoder_disagreement).
        diff = float((on_cuda.cpu().float() - on_cpu.float()).abs().mean())
        assert diff < 1.25 * disagreement + 0.25, f"crops differ by {diff:.2f}, decoders by {disagreement:.2f}"
