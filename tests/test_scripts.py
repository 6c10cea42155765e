"""The benchmark scripts run end to end on a tiny tree and end with their speedup line (no timing asserted)."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch

from .conftest import CLASSES, REPO, read_metrics, tiny_overrides, write_image_folder

pytestmark = pytest.mark.slow


@pytest.fixture
def tree(tmp_path):
    return write_image_folder(tmp_path / "train", CLASSES, 4, size=300)


def run_script(name: str, *args: str) -> str:
    done = subprocess.run([sys.executable, str(REPO / "scripts" / name), *args], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done.stdout


def test_bench_data(tree):
    out = run_script("bench_data.py", "--data", str(tree), "--repeats", "1", "--batch-size", "4")
    assert re.search(r"^speedup: original=\d+\.\d\d prepared=\d+\.\d\d$", out.splitlines()[-1])


def test_bench_data_handoff(tree):
    out = run_script("bench_data.py", "--data", str(tree), "--handoff", "--repeats", "1", "--batch-size", "4")
    rows = [line.split() for line in out.splitlines() if line.startswith(("device ", "worker "))]
    # per mode: one tensor per image, the batch in a fresh segment (before the ring), in a ring slot
    assert [(r[0], r[1], r[-6]) for r in rows] == [
        ("device", "per-image", "fresh"), ("device", "collate_encoded", "fresh"), ("device", "collate_encoded", "ring"),
        ("worker", "per-image", "fresh"), ("worker", "collate_hwc", "fresh"), ("worker", "collate_hwc", "ring")]
    assert [r[-5] for r in rows] == ["5", "1", "1", "5", "1", "1"]  # tensors per batch: one per image, or one
    assert re.search(r"^handoff: device=\d+\.\d\d worker=\d+\.\d\d baseline=\d+\.\d\d ratio=\d+\.\d$",
                     out.splitlines()[-1])


def test_bench_data_rate_at_several_worker_counts(tree):
    out = run_script("bench_data.py", "--data", str(tree), "--rate", "--workers", "0", "1", "--images", "16",
                     "--repeats", "1", "--batch-size", "4")
    rows = [line.split() for line in out.splitlines() if re.match(r"^\s+\d+\s", line)]
    assert [r[0] for r in rows] == ["0", "1"] and all(len(r) == 7 for r in rows)
    assert re.search(r"^rate: workers=0,1 tv_files=\d+,\d+ files=\d+,\d+ shards=\d+,\d+$", out.splitlines()[-1])


def test_bench_eval(tree):
    out = run_script("bench_eval.py", "--data", str(tree), "--repeats", "1", "--batch-size", "4")
    assert re.search(r"^speedup: \d+\.\d\d$", out.splitlines()[-1])


def test_bench_train(tree):
    out = run_script("bench_train.py", "--data", str(tree), "--steps", "2", "--warmup", "1", "--workers", "0",
                     "--batch-size", "4", "--set", "model.arch=custom", "model.conv_widths=[8,16,16,16,16]",
                     "model.fc_widths=[32,32]", "data.resize_size=72", "data.crop_size=64")
    assert re.search(r"^speedup: \d+\.\d\d$", out.splitlines()[-1])


def test_bench_scripts_name_a_missing_folder(tmp_path):
    for name in ("bench_data.py", "bench_eval.py"):
        done = subprocess.run([sys.executable, str(REPO / "scripts" / name), "--data", str(tmp_path / "nope")],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and "nope" in done.stderr


def test_bench_model_prints_every_variant_and_the_epoch_time():
    out = run_script("bench_model.py", "--device", "cpu", "--archs", "torchvision", "--amps", "none", "tf32",
                     "--batch-size", "2", "--steps", "1", "--warmup", "1")
    rows = [line for line in out.splitlines() if "images/s" in line]
    # the baseline, then none/tf32 x NCHW/channels_last
    assert len(rows) == 5 and rows[0].startswith("baseline") and all("min/epoch" in r for r in rows)
    assert re.search(r"^speedup: \d+\.\d\d$", out.splitlines()[-1])


def test_bench_model_breakdown_prints_each_variant_its_table_and_the_costs():
    out = run_script("bench_model.py", "--device", "cpu", "--breakdown", "--memory-formats", "nchw",
                     "--batch-size", "2", "--steps", "1", "--warmup", "1")
    rows = [line for line in out.splitlines() if "images/s" in line]
    assert len(rows) == 1 + 9 and rows[0].startswith("baseline")  # LRN off/fused/legacy x groups 1/grouped/split
    assert any("lrn legacy, groups 2 split, nchw" in r for r in rows)
    table = out[out.index("ms per step"):]
    assert re.search(r"^  groups 2 split\s+[\d.]+\s+[\d.]+\s+[\d.]+$", table, re.M)
    costs = [line for line in out.splitlines() if line.startswith("cost: ")]
    assert len(costs) == 6 + 6  # LRN fused/legacy per towers; grouped/split per LRN
    assert re.search(r"^speedup: \d+\.\d\d$", out.splitlines()[-1])


def test_bench_lrn_prints_the_ratio_to_f_local_response_norm():
    out = run_script("bench_lrn.py", "--device", "cpu", "--batch-size", "2", "--repeats", "1")
    rows = [line for line in out.splitlines() if line.endswith("x")]
    assert len(rows) == 2 * 2 * 2  # conv1/conv2 x NCHW/channels_last x baseline/ours
    assert all(re.search(r" [\d.]+ ms\s+\d+\.\d\dx$", r) for r in rows)
    assert re.search(r"^speedup: \d+\.\d\d$", out.splitlines()[-1])


@pytest.mark.skipif(torch.cuda.is_available(), reason="this box has a GPU")
def test_bench_scripts_refuse_cuda_without_a_gpu(tree):
    for args in (["bench_train.py", "--data", str(tree)], ["bench_model.py"]):
        done = subprocess.run([sys.executable, str(REPO / "scripts" / args[0]), *args[1:], "--device", "cuda"],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and "no CUDA device" in done.stderr, args[0]


def test_init_study_runs_each_variant_and_reports_the_curves(tmp_path):
    train = write_image_folder(tmp_path / "train", CLASSES, 6, seed=1)
    val = write_image_folder(tmp_path / "val", CLASSES, 2, seed=2)
    sets = [s for s in tiny_overrides(train, val, len(CLASSES))
            if not s.startswith(("model.init=", "data.normalize=", "train.epochs="))]
    out = run_script("init_study.py", "--config", str(REPO / "configs" / "tiny-imagenet.yaml"), "--epochs", "2",
                     "--variants", "paper:paper", "kaiming:torchvision", "--out", str(tmp_path / "study"),
                     "--json", str(tmp_path / "study.json"), "--set", *sets)
    curves = json.loads((tmp_path / "study.json").read_text())
    assert set(curves) == {"paper:paper", "kaiming:torchvision"}
    for name, r in curves.items():
        assert r["rc"] == 0 and len(r["val_top1"]) == 2 and len(r["val_top5"]) == 2
        metrics = read_metrics(tmp_path / "study" / name.replace(":", "-"))
        assert [m["val_top1"] for m in metrics] == r["val_top1"]
    # each run really used its variant's init and normalisation
    saved = (tmp_path / "study" / "paper-paper" / "config.yaml").read_text()
    assert "init: paper" in saved and "normalize: paper" in saved
    table = out[out.index("val top-1 (%) per epoch"):]
    assert re.search(r"^\s+2\s+\d+\.\d\s+\d+\.\d$", table, flags=re.M)
    assert "kaiming:torchvision  first epoch >= 2x chance" in out


def test_init_study_rejects_a_bad_variant_before_running(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "init_study.py"), "--variants", "he:paper",
                           "--out", str(tmp_path / "s")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "model.init" in done.stderr and not (tmp_path / "s").exists()


def test_learning_curve_trains_both_and_reuses_a_finished_run(tmp_path):
    """Both runs per epoch side by side, ten-crop at the end, baseline.json and the plot; --skip-ours reuses OUT."""
    train = write_image_folder(tmp_path / "data" / "train", CLASSES, 6, seed=1)
    val = write_image_folder(tmp_path / "data" / "val", CLASSES, 2, seed=2)
    sets = [s for s in tiny_overrides(train, val, len(CLASSES)) if not s.startswith("train.epochs=")]
    sets += ["train.epochs=2", "schedule.kind=cosine"]
    out_dir, png = tmp_path / "run", tmp_path / "curve.png"
    out = run_script("learning_curve.py", "--config", str(REPO / "configs" / "tiny-imagenet.yaml"),
                     "--out", str(out_dir), "--plot", str(png), "--set", *sets)
    table = out[out.index("epoch"):]
    assert re.search(r"^1\s+\d+\.\d\d\s+\d+\.\d\d\s+\d+\.\d\d\s+\d+\.\d\d$", table, flags=re.M)
    assert re.search(r"^2\s+", table, flags=re.M)
    assert re.search(r"^ten-crop\s+ours top1\s+\d+\.\d\d", out, flags=re.M)
    base = json.loads((out_dir / "baseline.json").read_text())
    assert [r["epoch"] for r in base["epochs"]] == [1, 2] and base["final"]["ten_crop"]["images"] == 6
    ours_eval = json.loads((out_dir / "eval.json").read_text())
    assert ours_eval["ten_crop"]["images"] == 6
    assert [r["epoch"] for r in read_metrics(out_dir)] == [1, 2]
    if "matplotlib is not installed" not in out:
        assert png.stat().st_size > 0
    # --skip-ours: no second training of ours; eval.json is remade when missing
    (out_dir / "eval.json").unlink()
    before = (out_dir / "last.pth").stat().st_mtime_ns
    out = run_script("learning_curve.py", "--config", str(REPO / "configs" / "tiny-imagenet.yaml"),
                     "--out", str(out_dir), "--plot", str(png), "--skip-ours", "--set", *sets)
    assert "wall: ours reused" in out and "$ alexnet-train" not in out
    assert (out_dir / "last.pth").stat().st_mtime_ns == before
    assert json.loads((out_dir / "eval.json").read_text())["ten_crop"]["images"] == 6


def test_transfer_study_fine_tunes_and_trains_from_scratch_on_the_same_images(tmp_path):
    """Both variants run from one config (scratch drops the weights), ten-crop evals, summary.json and the table."""
    from alexnet_train.cli import train_main

    src_train = write_image_folder(tmp_path / "src" / "train", CLASSES, 6, seed=1)
    src_val = write_image_folder(tmp_path / "src" / "val", CLASSES, 2, seed=2)
    source = tmp_path / "source"
    train_main(["--config", str(REPO / "configs" / "demo.yaml"), "--out", str(source),
                "--set", *tiny_overrides(src_train, src_val, len(CLASSES), epochs=1)])
    new = ["n09999991", "n09999992"]
    train = write_image_folder(tmp_path / "new" / "train", new, 6, seed=3)
    val = write_image_folder(tmp_path / "new" / "val", new, 2, seed=4)
    sets = [s for s in tiny_overrides(train, val, len(new)) if not s.startswith(("train.epochs=", "model.num_classes="))]
    sets += ["train.epochs=2", f"model.weights={source / 'last.pth'}"]
    out_dir = tmp_path / "study"
    out = run_script("transfer_study.py", "--config", str(REPO / "configs" / "tiny-imagenet-finetune.yaml"),
                     "--out", str(out_dir), "--plot", str(tmp_path / "t.png"), "--set", *sets)
    summary = json.loads((out_dir / "summary.json").read_text())
    assert list(summary) == ["finetune", "scratch"]
    for name, variant in summary.items():
        row = variant["seeds"]["0"]
        assert row["epochs"] == 2 and len(row["val_top1"]) == 2
        assert row["ten_crop"]["images"] == 4 and row["center"]["images"] == 4
    ft = torch.load(out_dir / "finetune" / "last.pth", weights_only=True)
    scratch = torch.load(out_dir / "scratch" / "last.pth", weights_only=True)
    assert ft["transfer"]["weights"] == str(source / "last.pth") and ft["transfer"]["initialised"] == ["classifier.6"]
    assert scratch["transfer"] is None and scratch["config"]["model"]["weights"] is None
    assert ft["config"]["model"]["freeze"] == "features" and scratch["config"]["model"]["freeze"] == "none"
    assert ft["model"]["features.0.weight"].equal(torch.load(source / "last.pth", weights_only=True)["model"]["features.0.weight"])
    assert re.search(r"^finetune\s+2\s+\d+\.\d\s+\d+\.\d\s+\d+\.\d", out, flags=re.M) and "transfer gain" in out


def test_bench_scale_lays_out_an_imagenet_shaped_tree_and_reads_it_from_its_index(tree, tmp_path):
    # 1,000 wnid folders of hard links (2 files each here, 1,281 at full size); the scan and
    # epoch parts only: the others train for minutes.
    args = ["--images", str(tree), "--work", str(tmp_path / "scale"), "--train-files", "2000",
            "--val-per-class", "1", "--skip", "launch", "--skip", "memory", "--skip", "loader_memory",
            "--skip", "stats", "--skip", "eval", "--no-drop-caches"]
    out = run_script("bench_scale.py", *args)
    train = tmp_path / "scale" / "imagenet" / "train"
    assert len(list(train.iterdir())) == 1000 and len(list((train / "n01440764").iterdir())) == 2
    assert (train / "n01440764" / "n01440764_0.JPEG").stat().st_nlink > 1  # a link, not a copy
    assert re.search(r"^scan warm: torchvision ImageFolder [\d.]+ s, alexnet-train walk [\d.]+ s "
                     r"\(2,000 / 2,000 files\)$", out, flags=re.M)
    assert re.search(r"^index read: .*\(2,000 files, .*\.alexnet-index/train-\w+\.npz\)$", out, flags=re.M)
    assert re.search(r"^epoch order, 8 ranks: EpochSampler \d+ ms", out, flags=re.M)
    assert out.splitlines()[-1].startswith("summary: scan warm: index ")
    again = run_script("bench_scale.py", *args, "--skip", "scan", "--skip", "epoch")  # the tree is made once
    assert "(made earlier)" in again.splitlines()[0]
