"""Shared fixtures: tiny real ImageFolders of JPEG files and a tiny-model config."""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
DEMO_CONFIG = str(REPO / "configs" / "demo.yaml")
CLASSES = ["n01440764", "n01443537", "n01484850"]

# A narrow AlexNet that still has every layer of the paper's (LRN, groups, dropout),
# small enough that a CLI run over a few dozen 64-px images takes seconds on a CPU.
TINY_MODEL = [
    "model.arch=custom",
    "model.conv_widths=[8,16,16,16,16]",
    "model.fc_widths=[32,32]",
    "model.groups=2",
    "model.init=kaiming",
]
TINY_DATA = [
    "data.batch_size=8",
    "data.workers=0",
    "data.resize_size=72",
    "data.crop_size=64",
    "data.normalize=torchvision",
]


def console_script(name: str) -> str:
    """Path of an installed console script (the real file beside this Python, not a pyenv shim)."""
    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return str(beside)
    found = shutil.which(name)
    assert found is not None, f"{name} is not installed: pip install -e ."
    return found


def read_metrics(out: Path) -> list[dict]:
    """The rows of OUT/metrics.jsonl."""
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def run_train(argv: list[str]) -> int:
    """alexnet-train in this process; its exit code."""
    from alexnet_train.cli import train_main

    try:
        train_main(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def checkpoint_weights(path: Path) -> dict:
    import torch

    return torch.load(path, weights_only=True)["model"]


def assert_bit_identical(a: dict, b: dict) -> None:
    import torch

    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def loader_batches(dataset, collate, batch_size: int = 4, seed: int = 5, decoder=None) -> list:
    """Every (images, targets, bad) batch of one shuffled epoch of ``dataset`` in this process,
    through ``decoder`` (a DecodeOnDevice) when given, as the trainer's batches go."""
    from alexnet_train.data.loaders import EpochSampler, make_loader

    sampler = EpochSampler(len(dataset), seed, True)
    sampler.set_epoch(1)
    out = []
    for images, targets, bad in make_loader(dataset, sampler, batch_size, 0, False, collate):
        if decoder is not None:
            images, targets, more = decoder(images, targets)
            bad = bad + more
        out.append((images, targets, bad))
    return out


@pytest.fixture
def tree(tmp_path: Path) -> tuple[Path, Path]:
    """(train, val) of 3 classes: 48 and 9 JPEGs (9: not divisible by 2 processes, so DDP must
    not pad or drop)."""
    classes = ["n01", "n02", "n03"]
    return (write_image_folder(tmp_path / "train", classes, 16, seed=1),
            write_image_folder(tmp_path / "val", classes, 3, seed=2))


def write_image_folder(root: Path, classes: list[str], per_class: int, size: int = 72, seed: int = 0) -> Path:
    """ROOT/<class>/<class>_<i>.JPEG: real JPEGs; each class has its own colour so a model can learn it."""
    rng = np.random.default_rng(seed)
    for ci, name in enumerate(classes):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        base = np.array([(ci * 97) % 256, (ci * 53 + 80) % 256, (ci * 151 + 30) % 256], dtype=np.float64)
        for i in range(per_class):
            w = size + int(rng.integers(0, 24))
            noise = rng.normal(0, 20, size=(size, w, 3))
            arr = np.clip(base + noise, 0, 255).astype(np.uint8)
            Image.fromarray(arr, "RGB").save(folder / f"{name}_{i:03d}.JPEG", quality=90)
    return root


def decoder_disagreement(root: Path, device: str = "cuda") -> float:
    """Mean |device decode - CPU decode| per pixel value over the whole JPEGs under ``root``: what
    the two JPEG decoders alone disagree by, before any crop or resize.

    nvJPEG's IDCT and chroma upsampling round differently from libjpeg-turbo's; on the noisy test
    JPEGs (sigma 20 at quality 90) that is a few grey levels (3-4 measured on an H200), so a test
    comparing the two pipelines' crops takes its tolerance from this, not from a fixed guess.
    """
    import torch

    from alexnet_train.data.decode import decode_bytes, decode_jpegs, is_jpeg

    files = [(str(p), p.read_bytes()) for p in sorted(root.rglob("*.JPEG"))]
    files = [(path, data) for path, data in files if is_jpeg(data)]
    encoded = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for _, data in files]
    decoded = decode_jpegs(encoded, [path for path, _ in files], torch.device(device))
    diffs = [(on_device.cpu().float() - decode_bytes(data, path).float()).abs().mean()
             for on_device, (path, data) in zip(decoded, files)]
    return float(torch.stack(diffs).mean())


@pytest.fixture
def image_tree(tmp_path: Path) -> tuple[Path, Path, list[str]]:
    """(train_dir, val_dir, classes): 3 classes, 8 train and 3 val JPEGs each."""
    classes = ["n01440764", "n01443537", "n01484850"]
    train = write_image_folder(tmp_path / "train", classes, 8, seed=1)
    val = write_image_folder(tmp_path / "val", classes, 3, seed=2)
    return train, val, classes


def tiny_overrides(train: Path, val: Path, num_classes: int, epochs: int = 2) -> list[str]:
    return TINY_MODEL + TINY_DATA + [
        f"data.train_dir={train}",
        f"data.val_dir={val}",
        f"model.num_classes={num_classes}",
        f"train.epochs={epochs}",
        "train.device=cpu",
        "train.log_interval=2",
    ]


def pytest_collection_modifyitems(config, items) -> None:
    """Tests marked ``cuda`` skip, saying why, where there is no CUDA GPU."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run pytest -m cuda on one, or scripts/gpu_check.py)")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Never write the demo cache into the user's home during tests."""
    if "ALEXNET_TRAIN_CACHE" not in os.environ:
        monkeypatch.setenv("ALEXNET_TRAIN_CACHE", str(tmp_path_factory.mktemp("cache")))
