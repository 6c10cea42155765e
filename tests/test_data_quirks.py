"""ImageNet's real-world file quirks, unreadable files, flat-val label formats and pixel statistics.

Every image here is a real file written by PIL into tmp_path (no mocks of torch or PIL);
the decoder is checked on both of its paths (libjpeg-turbo and ``use_libjpeg=False``)
against PIL's own reading of the same file.  Tests on ``../shared/data`` skip when it
is absent.  The command-line side of the same features is in ``test_cli_data.py``.
"""
from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image, ImageOps, PngImagePlugin

from alexnet_train.config import DataConfig
from alexnet_train.configload import load_config
from alexnet_train.data.datasets import (
    BadImageError,
    BadImages,
    DataError,
    ImageDataset,
    TooManyBadImages,
    labelled_samples,
    read_labels_file,
)
from alexnet_train.data.decode import decode_rgb, jpeg_info
from alexnet_train.data.loaders import EpochSampler, make_loader
from alexnet_train.data.stats import compute_stats, stats_yaml
from alexnet_train.data.transforms import CenterPreset, TenCropPreset, TrainPreset, resize_shorter

from .conftest import SHARED_DATA

CLASSES = ["n01440764", "n01443537", "n01484850"]
LIBJPEG = pytest.mark.parametrize("use_libjpeg", [True, False], ids=["libjpeg", "pil"])
needs_shared = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"{SHARED_DATA} is absent")


# --------------------------------------------------------------------------- helpers


def photo(w: int, h: int, seed: int = 0) -> np.ndarray:
    """An asymmetric, smooth-ish RGB picture (H, W, 3): orientation errors show, JPEG noise stays small."""
    rng = np.random.default_rng(seed)
    x = np.linspace(0, 230, w, dtype=np.float32)[None, :]
    y = np.linspace(0, 230, h, dtype=np.float32)[:, None]
    r = np.broadcast_to(x, (h, w))
    g = np.broadcast_to(y, (h, w))
    b = (x * 0.5 + y * 0.5) * ((np.arange(w)[None, :] // 8 + np.arange(h)[:, None] // 8) % 2 * 0.4 + 0.6)
    arr = np.stack([r, g, b], axis=-1) + rng.integers(0, 12, (h, w, 3), dtype=np.uint8)
    return np.clip(arr, 0, 255).astype(np.uint8)


def chw(img: Image.Image | np.ndarray) -> torch.Tensor:
    arr = np.asarray(img.convert("RGB") if isinstance(img, Image.Image) else img, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def pil_reference(path: Path) -> torch.Tensor:
    """What PIL shows for the file: EXIF orientation applied, converted to RGB."""
    with Image.open(path) as img:
        return chw(ImageOps.exif_transpose(img))


def mean_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).abs().mean().item()


def exif_with_orientation(value: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = value
    return exif.tobytes()


# --------------------------------------------------------------------------- the quirks, as files


BASE_W, BASE_H = 96, 64


@pytest.fixture(scope="module")
def quirks(tmp_path_factory) -> dict[str, Path]:
    """name -> file: the odd cases ILSVRC-2012 really holds, written as PIL writes them."""
    root = tmp_path_factory.mktemp("quirks")
    base = Image.fromarray(photo(BASE_W, BASE_H), "RGB")
    files: dict[str, Path] = {}

    def put(name: str) -> Path:
        files[name] = root / name
        return files[name]

    # CMYK, as Photoshop (and PIL) write it: Adobe APP14 marker, inverted ink values.
    base.convert("CMYK").save(put("cmyk.JPEG"), "JPEG", quality=95)
    ink = np.random.default_rng(3).integers(0, 256, (BASE_H // 8, BASE_W // 8, 4), dtype=np.uint8)
    ink = np.kron(ink, np.ones((8, 8, 1), dtype=np.uint8))  # blocks: little JPEG ringing
    Image.fromarray(ink, "CMYK").save(put("cmyk_black_ink.JPEG"), "JPEG", quality=95)
    base.convert("L").save(put("gray.JPEG"), "JPEG", quality=95)
    rgba = np.dstack([photo(BASE_W, BASE_H, 1), np.full((BASE_H, BASE_W), 128, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(put("rgba.png"))
    base.convert("P", palette=Image.Palette.ADAPTIVE, colors=64).save(put("palette.png"))
    # ILSVRC-2012's one PNG among the JPEGs, under its real name.
    base.convert("RGBA").save(put("n02105855_2933.JPEG"), "PNG")
    for orientation in (3, 6, 8):
        base.save(put(f"exif{orientation}.JPEG"), "JPEG", quality=95, exif=exif_with_orientation(orientation))
    base.save(put("exif6.png"), "PNG", exif=exif_with_orientation(6))  # PNG's eXIf chunk
    base.save(put("progressive.JPEG"), "JPEG", quality=95, progressive=True)
    base.save(put("plain.JPEG"), "JPEG", quality=95)
    Image.fromarray(photo(40, 30, 2), "RGB").save(put("small.JPEG"), "JPEG", quality=95)
    big = Image.fromarray(photo(3000, 2000, 4), "RGB")
    big.save(put("big.JPEG"), "JPEG", quality=90)
    big.save(put("big_exif6.JPEG"), "JPEG", quality=90, exif=exif_with_orientation(6))
    medium = Image.fromarray(photo(1200, 800, 5), "RGB")
    medium.convert("CMYK").save(put("big_cmyk.JPEG"), "JPEG", quality=90)
    medium.convert("L").save(put("big_gray.JPEG"), "JPEG", quality=90)
    medium.save(put("big_progressive.JPEG"), "JPEG", quality=90, progressive=True)
    return files


DECODABLE = ["cmyk.JPEG", "cmyk_black_ink.JPEG", "gray.JPEG", "rgba.png", "palette.png", "n02105855_2933.JPEG",
             "exif3.JPEG", "exif6.JPEG", "exif8.JPEG", "exif6.png", "progressive.JPEG", "plain.JPEG", "small.JPEG"]


@LIBJPEG
@pytest.mark.parametrize("name", DECODABLE)
def test_decode_rgb_matches_pils_upright_rgb_reading(quirks, name, use_libjpeg):
    x = decode_rgb(str(quirks[name]), use_libjpeg=use_libjpeg)
    assert x.dtype == torch.uint8 and x.ndim == 3 and x.shape[0] == 3
    # Both decoders are libjpeg-turbo underneath: the same pixels, up to IDCT/upsampling rounding.
    assert mean_abs(x, pil_reference(quirks[name])) < 1.0, name


def test_the_cmyk_files_are_the_adobe_inverted_kind(quirks):
    """PIL writes CMYK the way Photoshop does (APP14 "Adobe" marker, inverted values): the variant ImageNet holds."""
    for name in ("cmyk.JPEG", "cmyk_black_ink.JPEG"):
        data = quirks[name].read_bytes()
        app14 = data.find(b"\xff\xee")
        assert app14 > 0 and data[app14 + 4 : app14 + 9] == b"Adobe", name
        with Image.open(quirks[name]) as img:
            assert img.mode == "CMYK"


@LIBJPEG
def test_cmyk_jpeg_decodes_to_the_colours_it_was_made_from(quirks, use_libjpeg):
    x = decode_rgb(str(quirks["cmyk.JPEG"]), use_libjpeg=use_libjpeg)
    assert mean_abs(x, chw(photo(BASE_W, BASE_H))) < 3.0  # not inverted, not black
    # With black ink: R = (255 - C)(255 - K) / 255 on the stored (uninverted) inks.
    ink = np.kron(np.random.default_rng(3).integers(0, 256, (BASE_H // 8, BASE_W // 8, 4), dtype=np.uint8),
                  np.ones((8, 8, 1), dtype=np.uint8)).astype(np.float64)
    want = (255 - ink[..., :3]) * (255 - ink[..., 3:]) / 255
    got = decode_rgb(str(quirks["cmyk_black_ink.JPEG"]), use_libjpeg=use_libjpeg)
    assert mean_abs(got, torch.from_numpy(want).permute(2, 0, 1)) < 4.0


@LIBJPEG
@pytest.mark.parametrize("name", ["gray.JPEG", "rgba.png", "palette.png", "n02105855_2933.JPEG"])
def test_other_modes_come_out_as_three_channel_rgb(quirks, name, use_libjpeg):
    x = decode_rgb(str(quirks[name]), use_libjpeg=use_libjpeg)
    assert x.shape == (3, BASE_H, BASE_W)
    if name == "gray.JPEG":
        assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])
    if name == "n02105855_2933.JPEG":  # PNG content under a .JPEG name: lossless, so exact
        assert torch.equal(x, chw(photo(BASE_W, BASE_H)))


@LIBJPEG
@pytest.mark.parametrize("orientation, turn", [(3, 2), (6, -1), (8, 1)])  # np.rot90 k: +1 = 90° counter-clockwise
def test_exif_orientation_is_applied_upright(quirks, orientation, turn, use_libjpeg):
    path = quirks[f"exif{orientation}.JPEG"]
    x = decode_rgb(str(path), use_libjpeg=use_libjpeg)
    with Image.open(path) as img:
        stored = np.asarray(img.convert("RGB"))  # the pixels as stored, orientation ignored
        assert mean_abs(x, chw(ImageOps.exif_transpose(img))) < 1.0  # PIL's reference
    # Turned independently of PIL's table: the same pixels, up to the decoders' rounding.
    assert mean_abs(x, chw(np.rot90(stored, k=turn))) < 1.0
    assert mean_abs(x, chw(np.rot90(photo(BASE_W, BASE_H), k=turn))) < 6.0  # and the picture it was made from
    if stored.shape == (x.shape[1], x.shape[2], 3):  # 180°: same shape, so show the check tells the two apart
        assert mean_abs(x, chw(stored)) > 20


# --------------------------------------------------------------------------- through ImageDataset + presets


def presets() -> list:
    cfg = DataConfig()  # 256 -> 224, as on ImageNet
    return [TrainPreset(cfg), TrainPreset(DataConfig(augment="torchvision")),
            TrainPreset(DataConfig(center_square=True)), CenterPreset(cfg)]


@pytest.mark.parametrize("name", DECODABLE + ["big.JPEG", "big_exif6.JPEG", "big_cmyk.JPEG", "big_gray.JPEG"])
def test_every_quirk_goes_through_the_dataset_and_presets_to_a_crop(quirks, name):
    for preset in presets():
        ds = ImageDataset([(str(quirks[name]), 2)], preset)
        x, target = ds[(0, 11)]
        assert target == 2
        assert x.dtype == torch.uint8 and x.shape == (3, 224, 224), (name, type(preset).__name__)


def test_image_smaller_than_the_crop_still_gives_a_full_crop(quirks):
    """40x30 (ILSVRC has a few such): upscaled by the resize, never padded with black."""
    path = str(quirks["small.JPEG"])
    for preset in presets():
        for seed in range(3):
            x, _ = ImageDataset([(path, 0)], preset)[(0, seed)]
            assert x.shape == (3, 224, 224), type(preset).__name__
            assert x.float().mean(0).min() > 0, "black padding in the crop"
    tens, _ = ImageDataset([(path, 0)], TenCropPreset(DataConfig()))[0]
    assert tens.shape == (10, 3, 224, 224)


def test_center_crop_of_a_quirk_equals_the_preset_on_pils_reading(quirks):
    preset = CenterPreset(DataConfig(resize_size=72, crop_size=64))
    for name in ("cmyk.JPEG", "exif6.JPEG", "n02105855_2933.JPEG", "palette.png"):
        x, _ = ImageDataset([(str(quirks[name]), 0)], preset)[0]
        assert mean_abs(x, preset(pil_reference(quirks[name]))) < 1.0, name


# --------------------------------------------------------------------------- the DCT-scaled path for big JPEGs


@LIBJPEG
def test_big_jpeg_is_decoded_at_a_reduced_dct_scale(quirks, use_libjpeg):
    path = str(quirks["big.JPEG"])
    small = decode_rgb(path, min_side=256, use_libjpeg=use_libjpeg)
    assert 256 <= min(small.shape[1:]) < 512, small.shape
    assert small.shape[2] / small.shape[1] == pytest.approx(1.5, abs=0.01)  # aspect kept
    full = decode_rgb(path, use_libjpeg=use_libjpeg)
    assert full.shape == (3, 2000, 3000)
    a, b = resize_shorter(small, 256), resize_shorter(full, 256)
    assert mean_abs(a, b) < 1.5
    assert (a.float() - b.float()).abs().quantile(0.99) <= 8


@LIBJPEG
def test_big_exif_rotated_jpeg_is_reduced_and_upright(quirks, use_libjpeg):
    small = decode_rgb(str(quirks["big_exif6.JPEG"]), min_side=256, use_libjpeg=use_libjpeg)
    assert small.shape[1] > small.shape[2] and 256 <= small.shape[2] < 512  # portrait now
    reference = resize_shorter(chw(np.rot90(photo(3000, 2000, 4), k=-1)), 256)
    assert mean_abs(resize_shorter(small, 256), reference) < 3.0


@LIBJPEG
@pytest.mark.parametrize("name", ["big_cmyk.JPEG", "big_gray.JPEG", "big_progressive.JPEG"])
def test_dct_scaling_of_cmyk_gray_and_progressive_jpegs(quirks, name, use_libjpeg):
    path = str(quirks[name])
    small = decode_rgb(path, min_side=256, use_libjpeg=use_libjpeg)
    assert small.shape == (3, 400, 600)  # 1200x800 at 1/2
    full = decode_rgb(path, use_libjpeg=use_libjpeg)
    assert full.shape == (3, 800, 1200)
    assert mean_abs(resize_shorter(small, 256), resize_shorter(full, 256)) < 1.5
    assert mean_abs(full, pil_reference(quirks[name])) < 1.0


@pytest.mark.parametrize("size", [(1023, 513), (513, 1023), (2049, 1025), (4100, 520), (1600, 1600)])
def test_dct_scaling_never_goes_below_min_side(tmp_path, size):
    path = tmp_path / "odd.JPEG"
    w, h = size
    Image.new("RGB", size, (120, 60, 30)).save(path, "JPEG", quality=80)
    for min_side in (128, 256):
        x = decode_rgb(str(path), min_side=min_side)
        assert min(x.shape[1:]) >= min_side, (size, min_side, x.shape)
        assert x.shape[2] / x.shape[1] == pytest.approx(w / h, rel=0.01)
        if min(size) >= 2 * min_side:
            assert min(x.shape[1:]) < min(size)  # and it was reduced


def test_min_side_below_half_the_image_keeps_the_full_decode(quirks):
    x = decode_rgb(str(quirks["plain.JPEG"]), min_side=40)  # 64 < 2 * 40: no reduction
    assert x.shape == (3, BASE_H, BASE_W)
    y = decode_rgb(str(quirks["big.JPEG"]), min_side=1200)  # 2000 < 2400: full size
    assert y.shape == (3, 2000, 3000)


# --------------------------------------------------------------------------- jpeg_info


def test_jpeg_info_reads_size_and_exif_from_the_headers(quirks):
    assert jpeg_info(quirks["plain.JPEG"].read_bytes()) == (BASE_W, BASE_H, False)
    assert jpeg_info(quirks["progressive.JPEG"].read_bytes()) == (BASE_W, BASE_H, False)
    # The stored size: orientation is applied after decoding.
    assert jpeg_info(quirks["exif6.JPEG"].read_bytes()) == (BASE_W, BASE_H, True)
    assert jpeg_info(quirks["big.JPEG"].read_bytes()) == (3000, 2000, False)
    assert jpeg_info(quirks["cmyk.JPEG"].read_bytes()) == (BASE_W, BASE_H, False)
    assert jpeg_info(quirks["gray.JPEG"].read_bytes()) == (BASE_W, BASE_H, False)


def test_jpeg_info_is_none_for_a_png(quirks):
    assert jpeg_info(quirks["rgba.png"].read_bytes()) is None
    assert jpeg_info(quirks["n02105855_2933.JPEG"].read_bytes()) is None
    assert jpeg_info(b"") is None and jpeg_info(b"\xff\xd8\xff") is None


def _png_with_bytes_like_a_sof(path: Path) -> bytes:
    """A valid PNG whose text chunk happens to hold FF C0 (a JPEG frame header's marker), as compressed data can."""
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "\xff\xc0\x00\x11\x08\x01\x00\x02\x00\x03\x01\x22\x00\x02\x11\x01\x03\x11\x01",
                  zip=False)
    Image.fromarray(photo(32, 24), "RGB").save(path, "PNG", pnginfo=info)
    return path.read_bytes()


def test_jpeg_info_is_none_for_a_png_that_contains_ff_c0(tmp_path):
    data = _png_with_bytes_like_a_sof(tmp_path / "sneaky.png")
    with Image.open(io.BytesIO(data)) as img:
        assert img.size == (32, 24)  # a perfectly good PNG
    assert jpeg_info(data) is None


def test_a_png_that_contains_ff_c0_still_decodes_through_pil(tmp_path):
    """decode_rgb itself is safe from the jpeg_info bug above: it checks the JPEG signature first."""
    data = _png_with_bytes_like_a_sof(tmp_path / "sneaky.JPEG")
    assert torch.equal(decode_rgb(str(tmp_path / "sneaky.JPEG")), chw(Image.open(io.BytesIO(data))))


def test_16_bit_grayscale_png_keeps_its_content(tmp_path):
    deep = np.linspace(0, 65535, 48 * 64).reshape(48, 64).astype(np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as img:
        assert img.mode == "I;16"  # a real 16-bit PNG
    x = decode_rgb(str(tmp_path / "deep.png"))
    assert x.shape == (3, 48, 64)
    assert mean_abs(x[0], torch.from_numpy((deep >> 8).astype(np.uint8))) < 1.0


# --------------------------------------------------------------------------- unreadable files


def _write_bad(root: Path, kind: str) -> Path:
    path = root / f"{kind}.JPEG"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("<html><body>404 Not Found</body></html>\n")
    else:
        buf = io.BytesIO()
        Image.fromarray(photo(300, 200), "RGB").save(buf, "JPEG", quality=90)
        data = buf.getvalue()
        path.write_bytes(data[: {"truncated_header": 200, "truncated_scan": len(data) // 2}[kind]])
    return path


BAD_KINDS = ["truncated_scan", "truncated_header", "empty", "text"]


@LIBJPEG
@pytest.mark.parametrize("kind", BAD_KINDS)
def test_unreadable_file_raises_bad_image_error_naming_it(tmp_path, kind, use_libjpeg):
    path = _write_bad(tmp_path, kind)
    for min_side in (None, 64):
        with pytest.raises(BadImageError) as info:
            decode_rgb(str(path), min_side=min_side, use_libjpeg=use_libjpeg)
        assert info.value.path == str(path)
        assert str(info.value).startswith(f"{path}: unreadable image (")
        assert info.value.reason and "\n" not in str(info.value)


def test_truncated_big_jpeg_on_the_dct_path_raises_too(tmp_path, quirks):
    data = quirks["big.JPEG"].read_bytes()
    path = tmp_path / "big_truncated.JPEG"
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(BadImageError, match="big_truncated.JPEG: unreadable image"):
        decode_rgb(str(path), min_side=256)


def test_missing_file_raises_bad_image_error(tmp_path):
    with pytest.raises(BadImageError, match="gone.JPEG: unreadable image"):
        decode_rgb(str(tmp_path / "gone.JPEG"))


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_dataset_returns_the_bad_image_marker(tmp_path, kind):
    path = _write_bad(tmp_path, kind)
    for preset in (TrainPreset(DataConfig()), CenterPreset(DataConfig())):
        image, marker = ImageDataset([(str(path), 1)], preset)[(0, 5)]
        assert image is None
        bad_path, reason = marker
        assert bad_path == str(path) and isinstance(reason, str) and reason


def test_bad_markers_cross_the_worker_boundary_as_data(tmp_path, quirks):
    """With 2 worker processes the loader hands the (path, reason) pairs back beside the good images."""
    bad = [_write_bad(tmp_path, kind) for kind in ("truncated_scan", "text")]
    good = [quirks["plain.JPEG"], quirks["cmyk.JPEG"], quirks["palette.png"], quirks["exif6.JPEG"]]
    samples = [(str(p), i) for i, p in enumerate(good[:2] + bad[:1] + good[2:] + bad[1:])]
    ds = ImageDataset(samples, CenterPreset(DataConfig(resize_size=72, crop_size=64)))
    loader = make_loader(ds, EpochSampler(len(samples), shuffle=False), batch_size=3, workers=2, pin_memory=False)
    batches = list(loader)
    targets = [t for _, y, _ in batches for t in y.tolist()]
    reported = [b for _, _, bad_list in batches for b in bad_list]
    assert targets == [0, 1, 3, 4]
    assert [p for p, _ in reported] == [str(p) for p in bad]
    assert sum(x.shape[0] for x, _, _ in batches) == 4


# --------------------------------------------------------------------------- the BadImages policy


def test_policy_error_raises_naming_the_first_bad_file():
    policy = BadImages("error", 0.5, {"train": 10, "val": 4}, log=lambda m: pytest.fail(f"logged {m!r}"))
    policy.check([], "train")  # nothing bad: nothing happens
    with pytest.raises(BadImageError) as info:
        policy.check([("/d/a.JPEG", "image file is truncated"), ("/d/b.JPEG", "empty file")], "train")
    assert info.value.path == "/d/a.JPEG"
    assert str(info.value) == "/d/a.JPEG: unreadable image (image file is truncated)"


def test_policy_skip_logs_each_path_once_per_split():
    logged: list[str] = []
    policy = BadImages("skip", 0.5, {"train": 10, "val": 4}, log=logged.append)
    policy.check([("/d/a.JPEG", "truncated")], "train")
    policy.check([("/d/a.JPEG", "truncated"), ("/d/b.JPEG", "empty file")], "train")  # a again: next epoch
    policy.check([("/d/b.JPEG", "empty file")], "train")
    policy.check([("/d/v.JPEG", "truncated"), ("/d/v.JPEG", "truncated")], "val")  # twice in one batch
    assert logged == [
        "warning: skipping /d/a.JPEG: unreadable image (truncated)",
        "warning: skipping /d/b.JPEG: unreadable image (empty file)",
        "warning: skipping /d/v.JPEG: unreadable image (truncated)",
    ]


def test_policy_skip_stops_past_max_fraction_naming_the_setting():
    logged: list[str] = []
    policy = BadImages("skip", 0.2, {"train": 10, "val": 4}, log=logged.append)
    policy.check([("/d/0.JPEG", "x"), ("/d/1.JPEG", "x")], "train")  # 2 of 10 = 20%: allowed
    policy.check([("/d/0.JPEG", "x"), ("/d/1.JPEG", "x")], "train")  # the same two again: still 2
    with pytest.raises(TooManyBadImages) as info:
        policy.check([("/d/2.JPEG", "x")], "train")
    message = str(info.value)
    assert message.startswith("data.max_bad_fraction: 3 of the 10 train images are unreadable")
    assert "20%" in message and "/d/0.JPEG" in message and "\n" not in message
    # Splits are judged on their own sizes: 1 of 4 val images is over 20% too.
    with pytest.raises(TooManyBadImages, match="data.max_bad_fraction: 1 of the 4 val images"):
        policy.check([("/d/v.JPEG", "x")], "val")


def test_policy_skip_with_zero_fraction_stops_at_the_first_bad_image():
    policy = BadImages("skip", 0.0, {"train": 1000}, log=lambda _m: None)
    with pytest.raises(TooManyBadImages, match="data.max_bad_fraction"):
        policy.check([("/d/a.JPEG", "x")], "train")


# --------------------------------------------------------------------------- flat validation folders: label formats


# The devkit numbers synsets in its own order; ILSVRC2012_ID 1 is *not* the first sorted wnid.
DEVKIT_IDS = {CLASSES[2]: 1, CLASSES[0]: 2, CLASSES[1]: 3}
FLAT_LABELS = [CLASSES[i] for i in (2, 0, 1, 1, 2, 0, 0)]  # val image 1..7


def write_flat_val(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i, _wnid in enumerate(FLAT_LABELS, 1):
        Image.fromarray(photo(80, 70, i), "RGB").save(root / f"ILSVRC2012_val_{i:08d}.JPEG", quality=90)
    return root


def write_meta_mat(path: Path, ids: dict[str, int]) -> None:
    """The devkit's meta.mat: a ``synsets`` struct array (leaves first, then inner nodes) as scipy writes it."""
    savemat = pytest.importorskip("scipy.io").savemat
    dtype = [("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("num_children", "O")]
    rows = [(wnid, i) for wnid, i in ids.items()] + [("n00001740", len(ids) + 1)]  # + 'entity', an inner node
    synsets = np.zeros((len(rows), 1), dtype=dtype)
    for k, (wnid, i) in enumerate(rows):
        synsets[k, 0] = (np.array([[i]], dtype=np.float64), wnid, f"words of {wnid}",
                         np.array([[0 if i <= len(ids) else len(ids)]], dtype=np.float64))
    savemat(str(path), {"synsets": synsets})


def write_labels(folder: Path, fmt: str, labels: list[str] = FLAT_LABELS) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    if fmt == "lines":
        path = folder / "val.txt"
        path.write_text("".join(f"ILSVRC2012_val_{i:08d}.JPEG {w}\n" for i, w in enumerate(labels, 1)))
    elif fmt == "kaggle":
        path = folder / "LOC_val_solution.csv"
        rows = [f"ILSVRC2012_val_{i:08d},{w} 10 20 30 40 {w} 1 2 3 4" for i, w in enumerate(labels, 1)]
        path.write_text("ImageId,PredictionString\n" + "\n".join(reversed(rows)) + "\n")  # any row order
    else:
        path = folder / "ILSVRC2012_validation_ground_truth.txt"
        path.write_text("".join(f"{DEVKIT_IDS[w]}\n" for w in labels))
        write_meta_mat(folder / "meta.mat", DEVKIT_IDS)
    return path


@pytest.fixture(scope="module")
def flat_val(tmp_path_factory) -> Path:
    return write_flat_val(tmp_path_factory.mktemp("flat") / "val")


@pytest.mark.parametrize("fmt", ["lines", "kaggle", "devkit"])
def test_every_labels_format_gives_the_same_samples(flat_val, tmp_path, fmt):
    labels = write_labels(tmp_path / fmt, fmt)
    assert read_labels_file(str(labels)) == {f"ILSVRC2012_val_{i:08d}": w for i, w in enumerate(FLAT_LABELS, 1)}
    samples = labelled_samples(str(flat_val), CLASSES, str(labels))
    # Indices follow the train set's sorted wnids (0, 1, 2), not the devkit's ILSVRC2012_IDs (2, 3, 1).
    want = [(str(flat_val / f"ILSVRC2012_val_{i:08d}.JPEG"), CLASSES.index(w)) for i, w in enumerate(FLAT_LABELS, 1)]
    assert samples == want
    assert [t for _, t in samples] == [2, 0, 1, 1, 2, 0, 0]


def test_devkit_ground_truth_without_meta_mat_names_it(flat_val, tmp_path):
    labels = write_labels(tmp_path / "devkit", "devkit")
    (tmp_path / "devkit" / "meta.mat").unlink()
    with pytest.raises(DataError, match="meta.mat") as info:
        labelled_samples(str(flat_val), CLASSES, str(labels))
    assert str(labels) in str(info.value)


def test_devkit_id_missing_from_meta_mat_is_a_data_error(flat_val, tmp_path):
    labels = write_labels(tmp_path / "devkit", "devkit")
    labels.write_text(labels.read_text() + "999\n")
    with pytest.raises(DataError, match=r"ILSVRC2012_validation_ground_truth.txt:8: ILSVRC2012_ID 999"):
        read_labels_file(str(labels))


def test_meta_mat_that_is_not_the_devkits_is_a_data_error(tmp_path):
    labels = write_labels(tmp_path / "devkit", "devkit")
    pytest.importorskip("scipy.io").savemat(str(tmp_path / "devkit" / "meta.mat"), {"something": np.eye(2)})
    with pytest.raises(DataError, match="meta.mat: not the devkit's meta.mat"):
        read_labels_file(str(labels))


@pytest.mark.parametrize("fmt", ["lines", "kaggle", "devkit"])
def test_a_wnid_that_is_not_a_training_class_is_a_data_error(flat_val, tmp_path, fmt):
    labels = write_labels(tmp_path / fmt, fmt)
    with pytest.raises(DataError, match=CLASSES[2]) as info:
        labelled_samples(str(flat_val), CLASSES[:2], str(labels))  # a train set without the 3rd class
    assert "not a training class" in str(info.value)


def test_kaggle_row_without_a_label_is_a_data_error(tmp_path):
    path = tmp_path / "LOC_val_solution.csv"
    path.write_text("ImageId,PredictionString\nILSVRC2012_val_00000001,\n")
    with pytest.raises(DataError, match="LOC_val_solution.csv:2"):
        read_labels_file(str(path))


@needs_shared
def test_real_val_ground_truth_synsets_parses_to_50000_labels():
    path = SHARED_DATA / "imagenet-meta" / "val_ground_truth_synsets.txt"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    labels = read_labels_file(str(path))
    assert len(labels) == 50000
    assert labels["ILSVRC2012_val_00000001"] == "n01751748"
    assert labels["ILSVRC2012_val_00050000"].startswith("n")
    synsets = SHARED_DATA / "imagenet-meta" / "synset_words.txt"
    if synsets.is_file():
        wnids = [line.split()[0] for line in synsets.read_text().splitlines() if line.strip()]
        assert set(labels.values()) == set(wnids) and wnids == sorted(wnids)


# --------------------------------------------------------------------------- pixel statistics


def write_solid(root: Path, colours: list[tuple[int, int, int]], sides: list[int]) -> Path:
    """One lossless PNG per (colour, side): squares of varied sizes, so after the resize each weighs the same."""
    root.mkdir(parents=True, exist_ok=True)
    for ci, colour in enumerate(colours):
        folder = root / f"c{ci}"
        folder.mkdir(exist_ok=True)
        for side in sides:
            Image.new("RGB", (side, side), colour).save(folder / f"{side}.png")
    return root


def test_stats_of_two_solid_colours_equal_the_closed_form(tmp_path):
    """Half (200, 0, 0), half (0, 0, 200): mean (100, 0, 100), std (100, 0, 100) and a rank-one covariance
    a [[1, 0, -1], [0, 0, 0], [-1, 0, 1]] with a = (200/255)^2 / 4: eigenvalues 2a, 0, 0."""
    root = write_solid(tmp_path / "solid", [(200, 0, 0), (0, 0, 200)], [40, 64, 300])
    stats = compute_stats(str(root), samples=100, resize_size=64)
    assert stats.images == 6 and stats.pixels == 6 * 64 * 64
    assert stats.mean == pytest.approx((100.0, 0.0, 100.0), abs=1e-3)
    assert stats.std == pytest.approx((100.0, 0.0, 100.0), abs=1e-3)
    a = (200 / 255) ** 2 / 4
    assert stats.eigval == pytest.approx((2 * a, 0.0, 0.0), abs=2e-6)
    p = np.array(stats.eigvec)
    assert p[:, 0] == pytest.approx([-1 / math.sqrt(2), 0.0, 1 / math.sqrt(2)], abs=2e-4)  # first component < 0
    assert p.T @ p == pytest.approx(np.eye(3), abs=1e-3)  # orthonormal columns
    assert stats.source == str(root.resolve())


def test_stats_of_three_colours_equal_the_covariance_of_the_colours(tmp_path):
    colours = [(200, 30, 10), (20, 180, 60), (90, 90, 250)]
    root = write_solid(tmp_path / "solid", colours, [50, 128])
    stats = compute_stats(str(root), samples=100, resize_size=96, workers=2)
    c = np.array(colours, dtype=np.float64)
    mean = c.mean(0)
    cov = ((c - mean).T @ (c - mean)) / len(c) / 255.0**2  # equal weights: same pixels per image
    eigval, eigvec = np.linalg.eigh(cov)
    eigval, eigvec = eigval[::-1], eigvec[:, ::-1]
    eigvec = eigvec * np.where(eigvec[0] > 0, -1.0, 1.0)
    assert stats.mean == pytest.approx(tuple(mean), abs=1e-3)
    assert stats.std == pytest.approx(tuple(np.sqrt(np.diag(cov)) * 255), abs=1e-3)
    assert stats.eigval == pytest.approx(tuple(np.clip(eigval, 0, None)), abs=2e-6)
    assert list(stats.eigval) == sorted(stats.eigval, reverse=True)
    p = np.array(stats.eigvec)
    assert np.linalg.norm(p, axis=0) == pytest.approx([1.0, 1.0, 1.0], abs=1e-3)  # unit columns
    assert p[:, :2] == pytest.approx(eigvec[:, :2], abs=2e-4)  # the non-degenerate ones are unique up to sign
    # P diag(lambda) P^T gives the covariance back.
    assert p @ np.diag(stats.eigval) @ p.T == pytest.approx(cov, abs=1e-4)


def test_stats_sample_a_subset_reproducibly(tmp_path):
    root = write_solid(tmp_path / "solid", [(200, 0, 0), (0, 0, 200), (0, 200, 0)], [32, 48, 64])
    a = compute_stats(str(root), samples=4, resize_size=32, seed=1)
    b = compute_stats(str(root), samples=4, resize_size=32, seed=1)
    assert a == b and a.images == 4


def test_stats_yaml_loads_as_a_config_include(tmp_path):
    colours = [(200, 30, 10), (20, 180, 60), (90, 90, 250)]
    stats = compute_stats(str(write_solid(tmp_path / "solid", colours, [40])), resize_size=64)
    text = stats_yaml(stats)
    assert text.startswith("# alexnet-stats: 3 images")
    (tmp_path / "stats.yaml").write_text(text)
    (tmp_path / "run.yaml").write_text("include: stats.yaml\ndata:\n  batch_size: 16\noptim:\n  lr: 0.02\n")
    cfg = load_config(tmp_path / "run.yaml")
    assert cfg.data.batch_size == 16 and cfg.optim.lr == 0.02
    assert cfg.data.mean == pytest.approx(stats.mean, abs=1e-3)
    assert cfg.data.std == pytest.approx(stats.std, abs=1e-3)
    assert cfg.data.eigval == pytest.approx(stats.eigval, rel=1e-5, abs=1e-9)
    assert np.array(cfg.data.eigvec) == pytest.approx(np.array(stats.eigvec), abs=1e-6)
    assert yaml.safe_load(text)["data"].keys() == {"mean", "std", "eigval", "eigvec"}


def test_stats_yaml_small_eigenvalues_still_load_as_numbers(tmp_path):
    """:g writes 2e-05 without a dot, which YAML 1.1 reads as a string; the config must take it as a number."""
    from dataclasses import replace as dc_replace

    stats = compute_stats(str(write_solid(tmp_path / "solid", [(200, 30, 10), (20, 180, 60)], [40])), resize_size=64)
    stats = dc_replace(stats, eigval=(0.2, 2e-05, 0.0))
    (tmp_path / "stats.yaml").write_text(stats_yaml(stats))
    (tmp_path / "run.yaml").write_text("include: stats.yaml\n")
    assert load_config(tmp_path / "run.yaml").data.eigval == pytest.approx((0.2, 2e-05, 0.0))


def test_stats_errors(tmp_path):
    with pytest.raises(DataError, match="nope: data directory not found"):
        compute_stats(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no image files"):
        compute_stats(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="--samples"):
        compute_stats(str(write_solid(tmp_path / "s", [(1, 2, 3)], [8])), samples=0)


@needs_shared
def test_stats_of_real_imagenet_photos_are_imagenets():
    sample = SHARED_DATA / "imagenet-sample-1k"
    if not sample.is_dir():
        pytest.skip(f"{sample} is absent")
    stats = compute_stats(str(sample), samples=200, workers=2, seed=0)
    assert stats.images == 200
    for got, want in zip(stats.mean, (123.7, 116.3, 103.5)):
        assert abs(got - want) <= 8, stats.mean
    assert 0.1 <= stats.eigval[0] <= 0.35, stats.eigval
    assert list(stats.eigval) == sorted(stats.eigval, reverse=True)
    p = np.array(stats.eigvec)
    assert p.T @ p == pytest.approx(np.eye(3), abs=1e-3)
    # The brightness direction: all three components of the first eigenvector share a sign.
    assert (p[:, 0] < 0).all(), p[:, 0]
