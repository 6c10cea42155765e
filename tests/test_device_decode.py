"""data.decode: device on the CPU: workers ship JPEG bytes and crop plans, the training
process decodes the batch (the same batched call a GPU gets, from each device backend that
loads here: TorchCodec, torchvision.io.decode_jpeg) and crops.  The crops must be the worker
path's, bit for bit where the decoders agree."""
from __future__ import annotations

import io
import random
import shutil
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from alexnet_train.config import DataConfig
from alexnet_train.data import decode as decode_mod
from alexnet_train.data.datasets import DataError, EncodedDataset, EncodedImage, ImageDataset, scan_image_folder
from alexnet_train.data.decode import DEVICE_DECODER_ENV, DEVICE_DECODERS, decode_bytes, decode_jpegs, exif_orientation
from alexnet_train.data.loaders import check_decode
from alexnet_train.data.batching import collate_encoded, collate_hwc, DecodeOnDevice
from alexnet_train.data.transforms import CenterPreset, TrainPreset, resize_shorter, resized_shape

from .conftest import (DEMO_CONFIG as DEMO, assert_bit_identical, checkpoint_weights, loader_batches, read_metrics,
                       run_train, tiny_overrides, write_image_folder)


@pytest.fixture(autouse=True)
def restore_device_decoder(monkeypatch):
    """Every test leaves the process's device backend as the environment chooses it: the test's
    environment and sys.modules changes are undone first (teardown order alone did not: a
    forced ``nvjpeg`` outlived its test and left later tests without a device decoder)."""
    yield
    monkeypatch.undo()
    decode_mod.use_device_decoder()


@pytest.fixture(params=DEVICE_DECODERS)
def backend(request) -> str:
    """Each device JPEG backend that loads here, chosen for the test."""
    if decode_mod.use_device_decoder(request.param) != request.param:
        pytest.skip(decode_mod.DEVICE_DECODER_PROBLEM)
    return request.param


def jpeg_bytes(img: Image.Image, **save) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90, **save)
    return buf.getvalue()


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


# Bit for bit also for torchvision's decoder: both backends and PIL (the worker's decoder
# without TorchCodec) wrap libjpeg-turbo with the same settings.  Measured on 320 generated
# JPEGs (sizes 40-200 px, RGB and grayscale, baseline and progressive, 4:2:0 / 4:2:2 / 4:4:4):
# torchvision 0.29.1 vs TorchCodec 0.17.0 and vs PIL 13.0, torchvision 0.26 vs TorchCodec 0.16.0
# and vs PIL; also three real photos (512x600, 720x477): max abs difference 0 on every image.
@pytest.mark.parametrize("augment", ["paper", "torchvision"])
@pytest.mark.parametrize("preset", [TrainPreset, CenterPreset])
def test_device_batches_equal_the_worker_batches_bit_for_bit(odd_tree, augment, preset, backend):
    cfg = DataConfig(resize_size=72, crop_size=64, augment=augment, center_square=augment == "paper")
    _, samples = scan_image_folder(str(odd_tree))
    worker = loader_batches(ImageDataset(samples, preset(cfg)), collate_hwc)
    device = loader_batches(EncodedDataset(samples, preset(cfg)), collate_encoded, decoder=DecodeOnDevice("cpu"))
    assert len(worker) == len(device) == 7  # 25 images, batches of 4
    for (wi, wt, wb), (di, dt, db) in zip(worker, device):
        assert torch.equal(wi, di) and torch.equal(wt, dt) and wb == db == []
        assert di.is_contiguous(memory_format=torch.channels_last)


def test_the_workers_ship_bytes_for_plain_jpegs_and_finished_crops_for_the_rest(odd_tree, backend):
    cfg = DataConfig(resize_size=72, crop_size=64)
    _, samples = scan_image_folder(str(odd_tree))
    ds = EncodedDataset(samples, TrainPreset(cfg))
    kinds = {Path(samples[i][0]).name: type(ds[(i, 0)][0]) for i in range(len(samples))}
    assert kinds["png_named.JPEG"] is kinds["cmyk.JPEG"] is kinds["turned.JPEG"] is torch.Tensor
    assert kinds["gray.JPEG"] is kinds["progressive.JPEG"] is kinds["n01_000.JPEG"] is EncodedImage


def test_an_undecodable_jpeg_is_reported_by_path_and_the_rest_of_the_batch_kept(odd_tree, backend):
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
def test_training_with_device_decoding_is_bit_identical_to_worker_decoding(tree, tmp_path, backend):
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


def test_decode_jpegs_gives_three_channels_for_grayscale_and_keeps_the_warning_to_itself(backend):
    rng = np.random.default_rng(11)
    photo = Image.fromarray(rng.integers(0, 255, (50, 70, 3), dtype=np.uint8), "RGB")
    files = {"rgb": jpeg_bytes(photo), "gray": jpeg_bytes(photo.convert("L")),
             "progressive": jpeg_bytes(photo, progressive=True)}
    tensors = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in files.values()]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torchvision >= 0.29's DeprecationWarning must not reach the caller
        filters = list(warnings.filters)
        out = decode_jpegs(tensors, list(files), torch.device("cpu"))
        assert warnings.filters == filters  # the silence is ours only: the caller's filters are as they were
    for x, (name, data) in zip(out, files.items()):
        assert x.dtype == torch.uint8 and x.shape == (3, 50, 70), name
        assert torch.equal(x, decode_bytes(data, f"{name}.JPEG")), name  # the worker's decode


@pytest.mark.cuda
def test_nvjpeg_never_writes_memory_that_queued_kernels_still_read(backend):
    """pytorch/vision#9606's check: free tensors that queued reductions still read, then decode,
    which is handed their blocks; a decoder that writes before those kernels ran changes the sums."""
    device = torch.device("cuda")
    rng = np.random.default_rng(5)
    photo = Image.fromarray(rng.integers(0, 255, (128, 128, 3), dtype=np.uint8), "RGB")
    files = [jpeg_bytes(photo), jpeg_bytes(photo, progressive=True), jpeg_bytes(photo.convert("L"))] * 4
    tensors = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in files]
    names = [f"{i}.JPEG" for i in range(len(files))]
    out = decode_jpegs(tensors, names, device)  # warm-up: nvJPEG's first call sets up its state
    assert all(x.shape == (3, 128, 128) and x.device.type == "cuda" for x in out)  # grayscale too
    numel = 3 * 128 * 128
    corrupted = 0
    for _ in range(30):
        blocks = [torch.full((numel,), 7, dtype=torch.uint8, device=device) for _ in files]  # the outputs' size
        torch.cuda.synchronize()
        torch.cuda._sleep(50_000_000)  # tens of ms of GPU time queued ahead of the reductions
        sums = [b.sum(dtype=torch.int64) for b in blocks]
        del blocks
        decode_jpegs(tensors, names, device)
        torch.cuda.synchronize()
        corrupted += sum(int(x) != 7 * numel for x in sums)
    assert corrupted == 0


@pytest.mark.cuda
def test_decoding_on_cuda_neither_waits_for_the_callers_queue_nor_lets_it_read_reused_memory(backend):
    """The decode runs on a stream of its own: it must not drain the caller's stream (the step
    before it keeps running), and a decoded image the caller's queued kernels still read must
    not be handed to the next decode (record_stream)."""
    device = torch.device("cuda")
    rng = np.random.default_rng(5)
    photo = Image.fromarray(rng.integers(0, 255, (128, 128, 3), dtype=np.uint8), "RGB")
    tensors = [torch.frombuffer(bytearray(jpeg_bytes(photo)), dtype=torch.uint8)] * 8
    names = [f"{i}.JPEG" for i in range(8)]
    first = decode_jpegs(tensors, names, device)  # warm-up: nvJPEG's state, the stream
    want = int(first[0].sum(dtype=torch.int64))
    torch.cuda.synchronize()
    started = torch.cuda.Event(enable_timing=True)
    ended = torch.cuda.Event(enable_timing=True)
    started.record()
    torch.cuda._sleep(300_000_000)
    ended.record()
    torch.cuda.synchronize()
    sleep_s = started.elapsed_time(ended) / 1000
    corrupted = 0
    for _ in range(10):
        out = decode_jpegs(tensors, names, device)
        torch.cuda._sleep(300_000_000)  # ~0.2 s queued on the caller's stream, ahead of the reads
        sums = [x.sum(dtype=torch.int64) for x in out]
        del out  # freed while the sums are still queued
        t0 = time.perf_counter()
        decode_jpegs(tensors, names, device)  # must not be handed those blocks, nor wait for the sleep
        waited = time.perf_counter() - t0
        torch.cuda.synchronize()
        corrupted += sum(int(s) != want for s in sums)
        assert waited < sleep_s / 2, (waited, sleep_s)
    assert corrupted == 0


def test_check_decode_names_the_backend_that_decodes(backend):
    notice = check_decode(DataConfig(decode="device"))
    if backend == "torchcodec":
        assert notice == "data.decode: device: JPEGs decoded by TorchCodec (nvJPEG on CUDA)"
    else:
        assert notice == ("data.decode: device: JPEGs decoded by torchvision.io.decode_jpeg "
                          "(deprecated; forced by use_device_decoder('torchvision'))")
    assert check_decode(DataConfig(decode="worker")) is None


def test_without_torchcodec_device_decoding_falls_back_to_torchvision(monkeypatch):
    monkeypatch.delenv(DEVICE_DECODER_ENV, raising=False)
    monkeypatch.setitem(sys.modules, "torchcodec.decoders", None)  # import fails, as with no TorchCodec
    assert decode_mod.use_device_decoder() == "torchvision"
    assert decode_mod.DEVICE_DECODER_PROBLEM is None
    assert check_decode(DataConfig(decode="device")) == ("data.decode: device: JPEGs decoded by "
                                                         "torchvision.io.decode_jpeg (deprecated; TorchCodec is not "
                                                         "loadable here)")


def test_an_unknown_forced_backend_is_a_one_line_data_error(monkeypatch):
    monkeypatch.setenv(DEVICE_DECODER_ENV, "nvjpeg")
    assert decode_mod.use_device_decoder() is None
    assert decode_mod.device_decodable(jpeg_bytes(Image.new("RGB", (8, 8)))) is None  # workers decode everything
    with pytest.raises(DataError) as err:
        check_decode(DataConfig(decode="device"))
    msg = str(err.value)
    assert "\n" not in msg and f"{DEVICE_DECODER_ENV}=nvjpeg" in msg and "torchcodec, torchvision" in msg
    assert check_decode(DataConfig(decode="worker")) is None  # the worker path does not care


def refused_device_run(tree, tmp_path, capsys) -> str:
    """A data.decode: device run that must exit 2 in one line before writing OUT; that line."""
    train, val = tree
    out = tmp_path / "out"
    code = run_train(["--config", DEMO, "--out", str(out), "--set", *tiny_overrides(train, val, 3, 1),
                      "data.decode=device"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "data.decode" in err
    assert not out.exists()
    return err


def test_device_decoding_without_any_backend_exits_2_before_writing(tree, tmp_path, capsys, monkeypatch):
    # Neither TorchCodec nor torchvision's decode_jpeg loads (what an import-time choice of None means).
    monkeypatch.setattr(decode_mod, "DEVICE_DECODER", None)
    monkeypatch.setattr(decode_mod, "DEVICE_DECODER_PROBLEM", None)
    err = refused_device_run(tree, tmp_path, capsys)
    assert "TorchCodec" in err and "torchvision's decode_jpeg" in err and "data.decode: worker" in err


def test_a_forced_backend_that_cannot_load_exits_2_before_writing(tree, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(DEVICE_DECODER_ENV, "torchcodec")
    monkeypatch.setitem(sys.modules, "torchcodec.decoders", None)
    assert decode_mod.use_device_decoder() is None  # torchvision loads, but was not asked for
    err = refused_device_run(tree, tmp_path, capsys)
    assert f"{DEVICE_DECODER_ENV}=torchcodec" in err and "TorchCodec cannot be loaded here" in err
