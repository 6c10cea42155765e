"""alexnet-prepare's library side: the 256 px copy of a tree, resumable, parallel, tolerant of bad files."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from alexnet_train.data.datasets import DataError, load_rgb
from alexnet_train.data.prepare import FAILURES_FILE, prepare_tree
from alexnet_train.data.transforms import center_crop, resize_shorter

from .conftest import write_image_folder

CLASSES = ["n01440764", "n01443537"]


def quiet(_: str) -> None:
    pass


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def images_under(root: Path) -> list[str]:
    """What prepare wrote but its own records: prepare.json, the failures, the split indexes."""
    return [f for f in files_under(root) if not f.startswith(("prepare", ".alexnet-index/"))]


def reference(path: Path, size: int) -> np.ndarray:
    """Independent of the module: full decode, upright, shorter side to ``size`` (bilinear), central square."""
    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img).convert("RGB")
    w, h = img.size
    scale = size / min(w, h)
    img = img.resize((max(size, int(w * scale)), max(size, int(h * scale))), Image.Resampling.BILINEAR)
    w, h = img.size
    left, top = round((w - size) / 2), round((h - size) / 2)
    return np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.float64)


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        assert img.format == "JPEG" and img.mode == "RGB"
        return np.asarray(img, dtype=np.float64)


def photo_like(width: int, height: int, seed: int = 0) -> np.ndarray:
    """Smooth colour gradients plus asymmetric blocks: a crop or turn in the wrong place shows in the mean error."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    arr = np.stack([255 * x / width, 255 * y / height, 128 + 100 * np.sin(x / width * 6 + y / height * 3)], axis=-1)
    rng = np.random.default_rng(seed)
    for _ in range(6):
        x0, y0 = int(rng.integers(0, width * 3 // 4)), int(rng.integers(0, height * 3 // 4))
        arr[y0:y0 + height // 5, x0:x0 + width // 6] = rng.integers(0, 256, 3)
    return arr.clip(0, 255).astype(np.uint8)


@pytest.fixture
def odd_images(tmp_path: Path) -> Path:
    """A flat folder of the awkward cases, each a real file as PIL writes it."""
    src = tmp_path / "odd"
    src.mkdir()
    Image.fromarray(photo_like(1001, 701), "RGB").save(src / "large.JPEG", quality=95)  # draft path, odd sizes
    Image.fromarray(photo_like(700, 1000, 1), "RGB").save(src / "tall.jpg", quality=95)
    Image.fromarray(photo_like(100, 60, 2), "RGB").save(src / "small.JPEG", quality=95)  # upscale path
    Image.fromarray(photo_like(300, 200, 3), "RGB").convert("CMYK").save(src / "cmyk.JPEG", quality=95)
    Image.fromarray(photo_like(300, 200, 4)[..., 0], "L").save(src / "gray.JPEG", quality=95)
    rgba = np.dstack([photo_like(200, 300, 5), np.full((300, 200), 200, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(src / "rgba.JPEG", format="PNG")  # PNG content, .JPEG name
    Image.fromarray(photo_like(160, 120, 6), "RGB").save(src / "plain.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: display after turning 90° clockwise
    Image.fromarray(photo_like(400, 300, 7), "RGB").save(src / "rotated.JPEG", quality=95, exif=exif.tobytes())
    return src


def test_tree_is_mirrored_with_same_names_as_square_rgb_jpegs(tmp_path: Path) -> None:
    src = write_image_folder(tmp_path / "train", CLASSES, 3, size=80)
    (src / "README.txt").write_text("not an image")
    (src / CLASSES[0] / "notes.csv").write_text("a,b\n")
    report = prepare_tree(src, tmp_path / "out", size=64, log=quiet)

    assert images_under(tmp_path / "out") == [f for f in files_under(src) if f.endswith(".JPEG")]
    assert (report.written, report.skipped, report.failed) == (6, 0, [])
    assert not (tmp_path / "out" / FAILURES_FILE).exists()
    for rel in images_under(tmp_path / "out"):
        with Image.open(tmp_path / "out" / rel) as img:
            assert (img.format, img.mode, img.size) == ("JPEG", "RGB", (64, 64))


def test_flat_folder_is_mirrored_flat_keeping_extensions(odd_images: Path, tmp_path: Path) -> None:
    report = prepare_tree(odd_images, tmp_path / "val", size=48, log=quiet)

    assert images_under(tmp_path / "val") == files_under(odd_images)
    assert report.written == len(files_under(odd_images))
    for rel in images_under(tmp_path / "val"):
        with Image.open(tmp_path / "val" / rel) as img:  # the .png names hold JPEGs now
            assert (img.format, img.mode, img.size) == ("JPEG", "RGB", (48, 48))


@pytest.mark.parametrize("size", [128, 256])
def test_content_matches_an_independent_resize_and_center_crop(odd_images: Path, tmp_path: Path, size: int) -> None:
    prepare_tree(odd_images, tmp_path / "out", size=size, quality=95, log=quiet)

    for name in files_under(odd_images):
        got, want = pixels(tmp_path / "out" / name), reference(odd_images / name, size)
        assert got.shape == (size, size, 3), name
        assert np.abs(got - want).mean() < 6, name


def test_exif_rotated_image_comes_out_upright(odd_images: Path, tmp_path: Path) -> None:
    prepare_tree(odd_images, tmp_path / "out", size=96, quality=95, log=quiet)

    got = pixels(tmp_path / "out" / "rotated.JPEG")
    with Image.open(odd_images / "rotated.JPEG") as img:
        sideways = img.convert("RGB")  # the stored pixels, orientation ignored
    w, h = sideways.size
    sideways = sideways.resize((int(w * 96 / h), 96), Image.Resampling.BILINEAR)
    left = round((sideways.size[0] - 96) / 2)
    ignored = np.asarray(sideways.crop((left, 0, left + 96, 96)), dtype=np.float64)
    assert np.abs(got - reference(odd_images / "rotated.JPEG", 96)).mean() < 6
    assert np.abs(got - ignored).mean() > 20  # the check above can tell the two apart


def test_matches_the_training_presets_on_the_fly_resize(odd_images: Path, tmp_path: Path) -> None:
    """Same filter and rounding as resize_shorter + center_crop, so the copy is what training would have seen."""
    noise = np.random.default_rng(0).integers(0, 256, (190, 250, 3), dtype=np.uint8)
    Image.fromarray(noise, "RGB").save(odd_images / "noise.png")  # where filters differ most
    prepare_tree(odd_images, tmp_path / "out", size=128, quality=100, log=quiet)

    # Compared on luma: the copy's 4:2:0 chroma blurs colour noise by design, while a
    # different resize filter shows in luma as much as anywhere.
    luma = np.array([0.299, 0.587, 0.114])
    for name in ["noise.png", "small.JPEG", "plain.png", "cmyk.JPEG", "rotated.JPEG"]:  # no draft: exact up to JPEG error
        x = torch.from_numpy(np.array(load_rgb(str(odd_images / name)))).permute(2, 0, 1)
        on_the_fly = center_crop(resize_shorter(x, 128), 128).permute(1, 2, 0).numpy().astype(np.float64)
        assert np.abs(pixels(tmp_path / "out" / name) @ luma - on_the_fly @ luma).mean() < 1.5, name


def test_second_run_skips_everything_and_touches_nothing(tmp_path: Path) -> None:
    src = write_image_folder(tmp_path / "train", CLASSES, 4, size=64)
    first = prepare_tree(src, tmp_path / "out", size=32, log=quiet)
    mtimes = {rel: os.stat(tmp_path / "out" / rel).st_mtime_ns for rel in images_under(tmp_path / "out")}

    second = prepare_tree(src, tmp_path / "out", size=32, log=quiet)

    assert (first.written, first.skipped) == (8, 0)
    assert (second.written, second.skipped, second.failed) == (0, 8, [])
    assert {rel: os.stat(tmp_path / "out" / rel).st_mtime_ns for rel in mtimes} == mtimes


def test_interrupted_run_is_finished_and_its_temp_files_removed(tmp_path: Path) -> None:
    src = write_image_folder(tmp_path / "train", CLASSES, 3, size=64)
    out = tmp_path / "out"
    prepare_tree(src, out, size=32, log=quiet)
    folder = out / CLASSES[1]
    victim = sorted(folder.iterdir())[0]
    victim.unlink()  # killed before its rename ...
    stale = folder / f".{victim.name}.tmp-999999"
    stale.write_bytes(b"\xff\xd8half a jpeg")  # ... leaving its temp file
    empty = sorted(folder.iterdir())[-1]
    empty.write_bytes(b"")  # what a rename without fsync can leave after a power loss

    report = prepare_tree(src, out, size=32, log=quiet)

    assert (report.written, report.skipped) == (2, 4)
    assert not stale.exists()
    assert not [p for p in out.rglob(".*")]
    for path in (victim, empty):
        assert pixels(path).shape == (32, 32, 3)


def test_unreadable_sources_are_reported_and_the_rest_written(tmp_path: Path) -> None:
    src = write_image_folder(tmp_path / "train", CLASSES, 3, size=64)
    good = (src / CLASSES[0] / f"{CLASSES[0]}_000.JPEG").read_bytes()
    truncated = src / CLASSES[0] / "truncated.JPEG"
    truncated.write_bytes(good[: len(good) * 2 // 3])
    empty = src / CLASSES[1] / "empty.jpg"
    empty.write_bytes(b"")
    lines: list[str] = []

    report = prepare_tree(src, tmp_path / "out", size=32, log=lines.append)

    assert [p for p, _ in report.failed] == [str(truncated), str(empty)]
    assert all(reason for _, reason in report.failed)
    assert report.written == 6
    assert len(images_under(tmp_path / "out")) == 6
    for path, reason in report.failed:
        assert lines.count(f"warning: {path}: unreadable image ({reason})") == 1
    listed = (tmp_path / "out" / FAILURES_FILE).read_text().splitlines()
    assert listed == [f"{p}\t{r}" for p, r in report.failed]

    truncated.unlink()
    empty.unlink()
    again = prepare_tree(src, tmp_path / "out", size=32, log=quiet)
    assert (again.written, again.skipped, again.failed) == (0, 6, [])
    assert not (tmp_path / "out" / FAILURES_FILE).exists()


def test_a_failures_list_another_source_wrote_is_kept_and_spellings_of_src_agree(tmp_path, monkeypatch):
    """DST/prepare-failures.txt: a run replaces its own source's lines, whether SRC is spelled
    'src' or './src', and leaves a list it did not write as it found it."""
    src = write_image_folder(tmp_path / "src", CLASSES, 2, size=64)
    good = (src / CLASSES[0] / f"{CLASSES[0]}_000.JPEG").read_bytes()
    truncated = src / CLASSES[0] / "truncated.JPEG"
    truncated.write_bytes(good[: len(good) // 2])
    out = tmp_path / "out"
    out.mkdir()
    foreign = "/elsewhere/n01/x.JPEG\tunreadable\n"
    (out / FAILURES_FILE).write_text(foreign)
    monkeypatch.chdir(tmp_path)
    report = prepare_tree("src", "out", size=32, log=quiet)
    assert [p for p, _ in report.failed] == [str(truncated)]
    assert (out / FAILURES_FILE).read_text() == "".join(sorted([foreign, f"{truncated}\t{report.failed[0][1]}\n"]))
    truncated.unlink()
    prepare_tree("./src", "out", size=32, log=quiet)
    assert (out / FAILURES_FILE).read_text() == foreign  # ours gone, theirs kept
    prepare_tree("./src", "./out", size=32, log=quiet)
    assert (out / FAILURES_FILE).read_text() == foreign


def test_worker_pool_writes_the_same_bytes_as_in_process(odd_images: Path, tmp_path: Path) -> None:
    write_image_folder(odd_images / "sub", CLASSES, 10, size=48)  # enough for several batches
    (odd_images / "sub" / CLASSES[0] / "empty.JPEG").write_bytes(b"")
    counted: list[int] = []

    serial = prepare_tree(odd_images, tmp_path / "serial", size=40, log=quiet)
    pooled = prepare_tree(odd_images, tmp_path / "pooled", size=40, workers=2, log=quiet,
                          progress=lambda total: counted.append(total) or ProgressProbe(counted))

    names = images_under(tmp_path / "serial")
    assert names == images_under(tmp_path / "pooled") and len(names) == serial.written == pooled.written == 28
    for rel in names:
        assert (tmp_path / "serial" / rel).read_bytes() == (tmp_path / "pooled" / rel).read_bytes(), rel
    assert [p for p, _ in pooled.failed] == [p for p, _ in serial.failed] == [str(odd_images / "sub" / CLASSES[0] / "empty.JPEG")]
    assert counted == [29, 29]  # the factory got the total; every file written or failed was counted


class ProgressProbe:
    def __init__(self, counted: list[int]) -> None:
        self.counted, self.count = counted, 0

    def update(self, n: int = 1) -> None:
        self.count += n

    def __enter__(self) -> "ProgressProbe":
        return self

    def __exit__(self, *exc: object) -> None:
        self.counted.append(self.count)


def test_progress_object_is_updated_per_file(tmp_path: Path) -> None:
    src = write_image_folder(tmp_path / "train", CLASSES, 2, size=40)
    probe = ProgressProbe([])
    prepare_tree(src, tmp_path / "out", size=24, progress=probe, log=quiet)
    assert probe.count == 4


def test_changed_settings_do_not_mix_into_one_tree(tmp_path: Path) -> None:
    src = write_image_folder(tmp_path / "train", CLASSES, 1, size=40)
    prepare_tree(src, tmp_path / "out", size=24, log=quiet)
    with pytest.raises(DataError, match="size=24 quality=90"):
        prepare_tree(src, tmp_path / "out", size=32, log=quiet)


def test_bad_arguments_fail_before_writing(tmp_path: Path) -> None:
    src = write_image_folder(tmp_path / "train", CLASSES, 1, size=40)
    with pytest.raises(DataError, match="missing"):
        prepare_tree(tmp_path / "missing", tmp_path / "out", log=quiet)
    with pytest.raises(DataError, match="not a directory"):
        prepare_tree(src / CLASSES[0] / f"{CLASSES[0]}_000.JPEG", tmp_path / "out", log=quiet)
    (tmp_path / "no-images").mkdir()
    (tmp_path / "no-images" / "labels.txt").write_text("x y\n")
    with pytest.raises(DataError, match="no-images: no image files"):
        prepare_tree(tmp_path / "no-images", tmp_path / "out", log=quiet)
    with pytest.raises(DataError, match="inside the source"):
        prepare_tree(src, src / "prepared", log=quiet)
    with pytest.raises(DataError, match="inside the source"):
        prepare_tree(src, src, log=quiet)
    for kwargs, word in [({"quality": 0}, "quality"), ({"quality": 101}, "quality"), ({"size": 0}, "size")]:
        with pytest.raises(ValueError, match=word):
            prepare_tree(src, tmp_path / "out", log=quiet, **kwargs)
    assert not (tmp_path / "out").exists()
    assert not (src / "prepared").exists()
