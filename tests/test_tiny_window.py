"""scripts/tiny_window.py and configs/tiny-imagenet-200-gpu.yaml end to end on a 2-class subset:
chunks written, checked and unpacked, a damaged or missing chunk caught, then one epoch of the
shipped config (full-width paper model, 224 px crops of upsampled 64 px images) and a ten-crop
evaluation, on the CPU, as the GPU window would run them."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import REPO, console_script, read_metrics, write_image_folder

SCRIPT = str(REPO / "scripts" / "tiny_window.py")
CONFIG = str(REPO / "configs" / "tiny-imagenet-200-gpu.yaml")
CLASSES = ["n01443537", "n01629819"]


def window(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=300, cwd=cwd)


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    """A Tiny ImageNet tree as alexnet-data lays it out: 64 px JPEGs, train/ and val/, synsets."""
    root = tmp_path / "tiny-imagenet-2"
    write_image_folder(root / "train", CLASSES, 6, size=64, seed=1)
    write_image_folder(root / "val", CLASSES, 2, size=64, seed=2)
    (root / "synset_words.txt").write_text("".join(f"{w} class {w}\n" for w in CLASSES))
    return root


def test_the_plan_fits_the_window_from_the_measured_rate():
    done = window("plan", "--config", CONFIG)
    assert done.returncode == 0, done.stderr
    assert "40 epochs x 11.2 s = 448 s of training at 9233 images/s" in done.stdout and "fits" in done.stdout
    slow = window("plan", "--config", CONFIG, "--rate", "5000")
    assert slow.returncode == 1 and "DOES NOT FIT" in slow.stdout


@pytest.mark.slow
def test_chunks_go_over_checked_and_the_shipped_config_trains_and_evaluates(tiny, tmp_path):
    out = tmp_path / "window"
    packed = window("pack", str(tiny), str(out), "--chunk-mib", "0.012")
    assert packed.returncode == 0, packed.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    chunks = sorted(out.glob("chunk-*.tar.gz"))
    assert len(chunks) == len(manifest["chunks"]) >= 3
    assert manifest["train"] == {"images": 12, "classes": 2, "per_class": [6]} and manifest["files"] == 17
    dest = tmp_path / "there"

    early = window("check", str(dest), "--manifest", str(out / "manifest.json"))
    assert early.returncode == 1 and "tiny_window: error:" in early.stderr
    damaged = tmp_path / chunks[0].name
    damaged.write_bytes(chunks[0].read_bytes()[:-10] + b"0123456789")
    bad = window("unpack", str(damaged), str(dest), "--manifest", str(out / "manifest.json"))
    assert bad.returncode == 1 and "does not match its SHA-256" in bad.stderr and not dest.exists()

    for chunk in chunks:  # as the calls would: each from the checkout's root, relative paths
        done = window("unpack", str(chunk.relative_to(tmp_path)), "there", "--manifest", "window/manifest.json",
                      cwd=tmp_path)
        assert done.returncode == 0, done.stderr
    checked = window("check", str(dest), "--manifest", str(out / "manifest.json"))
    assert checked.returncode == 0 and "as the manifest says" in checked.stdout, checked.stderr
    assert (dest / "train" / CLASSES[0] / f"{CLASSES[0]}_000.JPEG").read_bytes() == \
        (tiny / "train" / CLASSES[0] / f"{CLASSES[0]}_000.JPEG").read_bytes()

    run = tmp_path / "run"
    train = subprocess.run([console_script("alexnet-train"), "--config", CONFIG, "--out", str(run), "--set",
                            f"data.train_dir={dest / 'train'}", f"data.val_dir={dest / 'val'}", "model.num_classes=2",
                            "train.epochs=1", "data.batch_size=4", "data.workers=0", "train.device=cpu",
                            "train.log_interval=1"], capture_output=True, text=True, timeout=600)
    assert train.returncode == 0, train.stdout[-2000:] + train.stderr[-2000:]
    assert "notice" not in train.stdout + train.stderr  # no key of the shipped config goes unread
    rows = read_metrics(run)
    assert len(rows) == 1 and rows[0]["val_images"] == 4
    evaluated = subprocess.run([console_script("alexnet-eval"), str(run / "best.pth"), "--ten-crop", "--json",
                                str(run / "eval.json"), "--device", "cpu", "--workers", "0"],
                               capture_output=True, text=True, timeout=600)
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    result = json.loads((run / "eval.json").read_text())
    assert result["center"]["images"] == result["ten_crop"]["images"] == 4
