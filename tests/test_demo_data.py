"""Tests for the synthetic demo dataset generator (alexnet_train.data.demo)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from alexnet_train.data import demo
from alexnet_train.data.demo import (
    DEMO_CLASSES,
    DEMO_VERSION,
    default_cache_dir,
    demo_root,
    ensure_demo_dataset,
)

SMALL = dict(train_per_class=6, val_per_class=2, size=64)


def _files(root):
    return sorted(p for p in root.rglob("*.JPEG"))


def _mtimes(root):
    return {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def test_classes_are_sorted_and_unique():
    assert len(DEMO_CLASSES) == 8
    assert list(DEMO_CLASSES) == sorted(set(DEMO_CLASSES))


def test_layout_counts_and_real_jpegs(tmp_path):
    logs = []
    train_dir, val_dir = ensure_demo_dataset(tmp_path, log=logs.append, **SMALL)
    root = tmp_path / f"demo-v{DEMO_VERSION}"
    assert root == demo_root(tmp_path)
    assert (train_dir, val_dir) == (root / "train", root / "val")
    assert (root / "COMPLETE").is_file()

    long_side = round(SMALL["size"] * 1.25)
    for split_dir, per_class in ((train_dir, SMALL["train_per_class"]), (val_dir, SMALL["val_per_class"])):
        assert sorted(p.name for p in split_dir.iterdir()) == list(DEMO_CLASSES)
        for name in DEMO_CLASSES:
            files = sorted((split_dir / name).iterdir())
            assert [p.name for p in files] == [f"{name}_{i:04d}.JPEG" for i in range(per_class)]
            for path in files:
                with Image.open(path) as img:
                    assert img.format == "JPEG"
                    assert img.mode == "RGB"
                    assert min(img.size) == SMALL["size"]
                    assert max(img.size) in (SMALL["size"], long_side)

    total = 8 * (SMALL["train_per_class"] + SMALL["val_per_class"])
    assert logs == [f"demo data: generated {total} JPEGs (8 classes) into {root}"]
    # Nothing but the finished tree is left in the cache folder.
    assert [p.name for p in tmp_path.iterdir()] == [root.name]


def test_marker_records_parameters(tmp_path):
    ensure_demo_dataset(tmp_path, log=None, seed=3, **SMALL)
    marker = json.loads((demo_root(tmp_path) / "COMPLETE").read_text())
    assert marker["version"] == DEMO_VERSION
    assert marker["classes"] == list(DEMO_CLASSES)
    assert marker["seed"] == 3
    assert marker["size"] == SMALL["size"]
    assert marker["train_per_class"] == SMALL["train_per_class"]
    assert marker["val_per_class"] == SMALL["val_per_class"]


def test_second_call_reuses_without_rewriting(tmp_path):
    ensure_demo_dataset(tmp_path, log=None, **SMALL)
    root = demo_root(tmp_path)
    before = _mtimes(root)
    logs = []
    dirs = ensure_demo_dataset(tmp_path, log=logs.append, **SMALL)
    assert dirs == (root / "train", root / "val")
    assert _mtimes(root) == before
    assert logs == [f"demo data: using {root}"]


def test_same_seed_gives_identical_bytes(tmp_path):
    a, _ = ensure_demo_dataset(tmp_path / "a", log=None, **SMALL)
    b, _ = ensure_demo_dataset(tmp_path / "b", log=None, **SMALL)
    c, _ = ensure_demo_dataset(tmp_path / "c", log=None, seed=1, **SMALL)
    files_a, files_b = _files(a.parent), _files(b.parent)
    assert [p.relative_to(a.parent) for p in files_a] == [p.relative_to(b.parent) for p in files_b]
    assert all(pa.read_bytes() == pb.read_bytes() for pa, pb in zip(files_a, files_b))
    assert any(pa.read_bytes() != pc.read_bytes() for pa, pc in zip(files_a, _files(c.parent)))


def test_incomplete_root_is_regenerated(tmp_path):
    root = demo_root(tmp_path)
    (root / "train" / "circle").mkdir(parents=True)
    (root / "train" / "circle" / "leftover.JPEG").write_bytes(b"not a jpeg")
    logs = []
    ensure_demo_dataset(tmp_path, log=logs.append, **SMALL)
    assert not (root / "train" / "circle" / "leftover.JPEG").exists()
    assert (root / "COMPLETE").is_file()
    assert len(_files(root)) == 8 * (SMALL["train_per_class"] + SMALL["val_per_class"])
    assert "generated" in logs[-1]


def test_corrupt_marker_is_regenerated(tmp_path):
    ensure_demo_dataset(tmp_path, log=None, **SMALL)
    (demo_root(tmp_path) / "COMPLETE").write_text("{truncated")
    logs = []
    ensure_demo_dataset(tmp_path, log=logs.append, **SMALL)
    assert "generated" in logs[-1]


def test_different_parameters_regenerate(tmp_path):
    ensure_demo_dataset(tmp_path, log=None, **SMALL)
    logs = []
    params = dict(SMALL, train_per_class=3)
    train_dir, _ = ensure_demo_dataset(tmp_path, log=logs.append, **params)
    assert "generated" in logs[-1]
    assert all(len(list((train_dir / name).iterdir())) == 3 for name in DEMO_CLASSES)
    assert json.loads((demo_root(tmp_path) / "COMPLETE").read_text())["train_per_class"] == 3
    logs.clear()
    ensure_demo_dataset(tmp_path, log=logs.append, **params)
    assert logs == [f"demo data: using {demo_root(tmp_path)}"]


def test_cache_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("ALEXNET_TRAIN_CACHE", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "explicit"
    assert demo_root() == tmp_path / "explicit" / f"demo-v{DEMO_VERSION}"
    train_dir, _ = ensure_demo_dataset(log=None, **SMALL)
    assert train_dir == tmp_path / "explicit" / f"demo-v{DEMO_VERSION}" / "train"
    assert train_dir.is_dir()

    monkeypatch.delenv("ALEXNET_TRAIN_CACHE")
    assert default_cache_dir() == tmp_path / "xdg" / "alexnet-train"

    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "alexnet-train"


def test_unwritable_cache_dir_raises_oserror_naming_path(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache folder should be")
    with pytest.raises(OSError, match="not-a-dir"):
        ensure_demo_dataset(blocker / "cache", log=None, **SMALL)


def test_failed_generation_leaves_nothing_behind(tmp_path, monkeypatch):
    def explode(rng, kind, size):
        raise RuntimeError("boom")

    monkeypatch.setattr(demo, "_draw_sample", explode)
    with pytest.raises(RuntimeError, match="boom"):
        ensure_demo_dataset(tmp_path, log=None, **SMALL)
    assert list(tmp_path.iterdir()) == []


def test_uses_tree_finished_by_a_concurrent_process(tmp_path, monkeypatch):
    root = demo_root(tmp_path)
    real_generate = demo._generate_tree

    def generate_while_another_process_finishes(dest, params):
        count = real_generate(dest, params)
        # Stand-in for a second process that completed the same job meanwhile.
        real_generate(root, params)
        demo._write_marker(root, dict(params, images=count))
        (root / "theirs").write_text("")
        return count

    monkeypatch.setattr(demo, "_generate_tree", generate_while_another_process_finishes)
    logs = []
    ensure_demo_dataset(tmp_path, log=logs.append, **SMALL)
    assert logs == [f"demo data: using {root}"]
    assert (root / "theirs").exists()
    assert [p.name for p in tmp_path.iterdir()] == [root.name]


def test_lost_rename_race_uses_the_winner(tmp_path, monkeypatch):
    root = demo_root(tmp_path)

    def other_process_renames_first(path):
        # Stand-in for a second process whose os.replace lands just before ours.
        params = dict(version=DEMO_VERSION, classes=list(DEMO_CLASSES), seed=0, **SMALL)
        count = demo._generate_tree(root, params)
        demo._write_marker(root, dict(params, images=count))

    monkeypatch.setattr(demo, "_move_aside", other_process_renames_first)
    logs = []
    ensure_demo_dataset(tmp_path, log=logs.append, **SMALL)
    assert logs == [f"demo data: using {root}"]
    assert [p.name for p in tmp_path.iterdir()] == [root.name]


@pytest.mark.skipif(os.name != "posix", reason="pid liveness probe is POSIX-only")
def test_stale_tmp_of_dead_process_is_removed(tmp_path):
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True, check=True)
    dead_pid = int(finished.stdout)
    stale = tmp_path / f"demo-v{DEMO_VERSION}.tmp-{dead_pid}"
    (stale / "train").mkdir(parents=True)
    old = stale.stat().st_mtime - 3600
    os.utime(stale, (old, old))
    ensure_demo_dataset(tmp_path, log=None, **SMALL)
    assert not stale.exists()


@pytest.mark.parametrize("bad", [dict(train_per_class=0), dict(val_per_class=0), dict(size=8)])
def test_rejects_bad_parameters(tmp_path, bad):
    with pytest.raises(ValueError):
        ensure_demo_dataset(tmp_path, log=None, **dict(SMALL, **bad))


def test_mean_colour_does_not_reveal_class(tmp_path):
    # The classes must be about shape: a nearest-centroid classifier on the mean
    # RGB of each image should stay near chance (12.5%) on held-out images.
    train_dir, val_dir = ensure_demo_dataset(tmp_path, log=None, train_per_class=30, val_per_class=30)

    def mean_colours(split_dir):
        feats, labels = [], []
        for label, name in enumerate(DEMO_CLASSES):
            for path in sorted((split_dir / name).iterdir()):
                with Image.open(path) as img:
                    feats.append(np.asarray(img, dtype=np.float64).reshape(-1, 3).mean(axis=0))
                labels.append(label)
        return np.array(feats), np.array(labels)

    x_train, y_train = mean_colours(train_dir)
    x_val, y_val = mean_colours(val_dir)
    centroids = np.stack([x_train[y_train == k].mean(axis=0) for k in range(len(DEMO_CLASSES))])
    distances = ((x_val[:, None, :] - centroids[None, :, :]) ** 2).sum(axis=2)
    accuracy = (distances.argmin(axis=1) == y_val).mean()
    assert accuracy < 0.40, f"mean colour predicts the class with accuracy {accuracy:.2f}"
