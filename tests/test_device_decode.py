"""data.decode: device on the CPU: workers ship JPEG bytes and crop plans, the training
process decodes the batch (the same batched TorchCodec call a GPU gets) and crops.  The
crops must be the worker path's, bit for bit where the decoders agree."""
from __future__ import annotations

import io
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from alexnet_train.config import DataConfig
from alexnet_train.data import decode as decode_mod
from alexnet_train.data.datasets import EncodedDataset, EncodedImage, ImageDataset, scan_image_folder
from alexnet_train.data.decode import exif_orientation
from alexnet_train.data.transforms import (CenterPreset, DecodeOnDevice, TrainPreset, collate_encoded, collate_hwc,
                                           resize_shorter, resized_shape)

from .conftest import (DEMO_CONFIG as DEMO, assert_bit_identical, checkpoint_weights, loader_batches, read_metrics,
                       run_train, tiny_overrides, write_image_folder)

pytestmark = pytest.mark.skipif(decode_mod.FAST_DECODER is None, reason="TorchCodec is not loadable here")


def exif(value: int) -> bytes:
    e = Image.Exif()
    e[0x0112] = value
    return e.tobytes()


@pytest.fixture
def odd_tree(tmp_path: Path) -> Path:
    """An ImageFolder of real JPEGs plus the files the device decoder leaves to the workers
    (PNG under a .JPEG name, CMYK, grayscale, an EXIF turn) and one it cannot decode."""
    root = write_image_folder(tmp_path / "train", ["n01", "n02"], 10, size=80, seed=3)
    rng = np.random.default_rng(7)
    photo = Image.fromarray(rng.integers(0, 255, (90, 120, 3), dtype=np.uint8), "RGB")
    photo.save(root / "n01" / "png_named.JPEG", "PNG")
    photo.convert("CMYK").save(root / "n01" / "cmyk.JPEG", "JPEG", quality=90)
    photo.convert("L").save(root / "n02" / "gray.JPEG", "JPEG", quality=90)
    photo.save(root / "n02" / "turned.JPEG", "JPEG", quality=90, exif=exif(6))
    photo.save(root / "n02" / "progressive.JPEG", "JPEG", quality=90, progressive=True)
    return root


@pytest.mark.parametrize("augment", ["paper", "torchvision"])
@pytest.mark.parametrize("preset", [TrainPreset, CenterPreset])
def test_device_batches_equal_the_worker_batches_bit_for_bit(odd_tree, augment, preset):
    cfg = DataConfig(resize_size=72, crop_size=64, augment=augment, center_square=augment == "paper")
    _, samples = scan_image_folder(str(odd_tree))
    worker = loader_batches(ImageDataset(samples, preset(cfg)), collate_hwc)
    device = loader_batches(EncodedDataset(samples, preset(cfg)), collate_encoded, decoder=DecodeOnDevice("cpu"))
    assert len(worker) == len(device) == 7  # 25 images, batches of 4
    for (wi, wt, wb), (di, dt, db) in zip(worker, device):
        assert torch.equal(wi, di) and torch.equal(wt, dt) and wb == db == []
        assert di.is_contiguous(memory_format=torch.channels_last)


def test_the_workers_ship_bytes_for_plain_jpegs_and_finished_crops_for_the_rest(odd_tree):
    cfg = DataConfig(resize_size=72, crop_size=64)
    _, samples = scan_image_folder(str(odd_tree))
    ds = EncodedDataset(samples, TrainPreset(cfg))
    kinds = {Path(samples[i][0]).name: type(ds[(i, 0)][0]) for i in range(len(samples))}
    assert kinds["png_named.JPEG"] is kinds["cmyk.JPEG"] is kinds["turned.JPEG"] is torch.Tensor
    assert kinds["gray.JPEG"] is kinds["progressive.JPEG"] is kinds["n01_000.JPEG"] is EncodedImage


def test_an_undecodable_jpeg_is_reported_by_path_and_the_rest_of_the_batch_kept(odd_tree):
    good = (odd_tree / "n01" / "n01_000.JPEG").read_bytes()
    # A real header (so the worker ships it) over scan data that is noise.
    broken = odd_tree / "n01" / "broken.JPEG"
    broken.write_bytes(good[:600] + bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8)))
    cfg = DataConfig(resize_size=72, crop_size=64)
    _, samples = scan_image_folder(str(odd_tree))
    ds = EncodedDataset(samples, CenterPreset(cfg))
    index = [Path(p).name for p, _ in samples].index("broken.JPEG")
    assert isinstance(ds[(index, 0)][0], EncodedImage)
    items, targets, _ = collate_encoded([ds[(i, 0)] for i in (index - 1, index, index + 1)])
    images, kept, bad = DecodeOnDevice("cpu")(items, targets)
    assert images.shape == (2, 3, 64, 64) and kept.tolist() == [targets[0].item(), targets[2].item()]
    assert len(bad) == 1 and bad[0][0] == str(broken) and bad[0][1]


def test_resized_shape_is_what_resize_shorter_makes():
    rng = random.Random(0)
    for _ in range(200):
        h, w, size = rng.randint(20, 700), rng.randint(20, 700), rng.choice([64, 72, 256])
        x = torch.zeros(3, h, w, dtype=torch.uint8)
        assert resized_shape(h, w, size) == tuple(resize_shorter(x, size).shape[-2:]), (h, w, size)


@pytest.mark.parametrize("value", range(1, 9))
def test_exif_orientation_reads_the_tag_pil_writes(value):
    buf = io.BytesIO()
    Image.new("RGB", (40, 30)).save(buf, "JPEG", exif=exif(value))
    assert exif_orientation(buf.getvalue()) == value
    plain = io.BytesIO()
    Image.new("RGB", (40, 30)).save(plain, "JPEG")
    assert exif_orientation(plain.getvalue()) == 1


@pytest.mark.slow
def test_training_with_device_decoding_is_bit_identical_to_worker_decoding(tree, tmp_path):
    train, val = tree
    shutil.copy(train / "n01" / "n01_000.JPEG", train / "n01" / "extra.JPEG")
    Image.open(train / "n02" / "n02_000.JPEG").save(train / "n02" / "png.JPEG", "PNG")  # decoded by a worker

    def argv(out: Path, *extra: str) -> list[str]:
        return ["--config", DEMO, "--out", str(out), "--set", *tiny_overrides(train, val, 3, 2),
                "data.batch_size=4", *extra]

    assert run_train(argv(tmp_path / "worker")) == 0
    assert run_train(argv(tmp_path / "device", "data.decode=device", "data.workers=1")) == 0
    assert_bit_identical(checkpoint_weights(tmp_path / "worker" / "last.pth"),
                         checkpoint_weights(tmp_path / "device" / "last.pth"))
    assert [r["val_top1"] for r in read_metrics(tmp_path / "worker")] == \
        [r["val_top1"] for r in read_metrics(tmp_path / "device")]


@pytest.mark.slow
def test_a_bad_image_under_device_decoding_follows_on_bad_image(tree, tmp_path, capsys):
    train, val = tree
    good = (train / "n01" / "n01_000.JPEG").read_bytes()
    broken = train / "n01" / "broken.JPEG"
    broken.write_bytes(good[:600] + bytes(np.random.default_rng(1).integers(0, 256, 3000, dtype=np.uint8)))
    base = ["--config", DEMO, "--set", *tiny_overrides(train, val, 3, 1), "data.batch_size=4", "data.decode=device"]
    assert run_train([*base, "--out", str(tmp_path / "error")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(broken) in err
    assert run_train([*base, "data.on_bad_image=skip", "data.max_bad_fraction=0.1",
                      "--out", str(tmp_path / "skip")]) == 0
    assert read_metrics(tmp_path / "skip")[0]["bad_images"] == 1


def test_device_decoding_without_torchcodec_exits_2_before_writing(tree, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(decode_mod, "FAST_DECODER", None)
    train, val = tree
    out = tmp_path / "out"
    code = run_train(["--config", DEMO, "--out", str(out), "--set", *tiny_overrides(train, val, 3, 1),
                      "data.decode=device"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "data.decode" in err and "TorchCodec" in err
    assert not out.exists()
