"""The data side of the command lines, end to end on real files: unreadable images in a training run,
flat validation folders in ``alexnet-eval``, ``alexnet-stats`` and ``alexnet-prepare``.

Runs that must show what a user's terminal shows (worker processes, exit status) use the installed
console scripts; the rest call the ``*_main`` functions in-process, which is faster.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from PIL import Image

from alexnet_train.cli import eval_main, prepare_main, stats_main, train_main

from .conftest import CLASSES, DEMO_CONFIG as DEMO, console_script as script, read_metrics as metrics, tiny_overrides, write_image_folder
from .test_data_quirks import FLAT_LABELS, write_flat_val, write_labels

pytestmark = pytest.mark.slow



# --------------------------------------------------------------------------- helpers





def run_script(name: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([script(name), *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env=os.environ.copy())


def exits(capsys, main, *args: str) -> tuple[int, str, str]:
    """Run a ``*_main`` in-process expecting sys.exit: (code, stdout, stderr)."""
    with pytest.raises(SystemExit) as info:
        main([str(a) for a in args])
    captured = capsys.readouterr()
    return info.value.code, captured.out, captured.err


def runs_ok(capsys, main, *args: str) -> str:
    try:
        main([str(a) for a in args])
    except SystemExit as exc:  # pragma: no cover - shown on failure only
        pytest.fail(f"{main.__name__} exited {exc.code}: {capsys.readouterr().err}")
    return capsys.readouterr().out


def one_line(err: str, prog: str, *needles: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected a one-line error, got: {err!r}"
    assert lines[0].startswith(f"{prog}: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]





def truncated_jpeg(path: Path) -> Path:
    """A JPEG cut off in the middle of its scan data, as an interrupted download leaves it."""
    write_image_folder(path.parent / "_src", ["x"], 1)
    data = (path.parent / "_src" / "x" / "x_000.JPEG").read_bytes()
    shutil.rmtree(path.parent / "_src")
    path.write_bytes(data[: len(data) // 2])
    return path


def train_args(train: Path, val: Path, out: Path, *extra: str, epochs: int = 2) -> list[str]:
    return ["--config", DEMO, "--set", *tiny_overrides(train, val, len(CLASSES), epochs), *extra, "--out", str(out)]


# --------------------------------------------------------------------------- unreadable images in a training run


@pytest.fixture
def bad_tree(tmp_path: Path) -> tuple[Path, Path, Path, Path]:
    """(train, val, bad train file, bad val file): conftest's tiny tree plus one truncated JPEG in each split."""
    train = write_image_folder(tmp_path / "train", CLASSES, 8, seed=1)
    val = write_image_folder(tmp_path / "val", CLASSES, 3, seed=2)
    bad_train = truncated_jpeg(train / CLASSES[0] / "n01440764_broken.JPEG")
    bad_val = truncated_jpeg(val / CLASSES[1] / "n01443537_broken.JPEG")
    return train, val, bad_train, bad_val


def test_bad_image_with_workers_exits_1_with_one_line_naming_it(bad_tree, tmp_path):
    """The default policy (error), data loaded by 2 worker processes: what the terminal shows is one line."""
    train, val, bad_train, _bad_val = bad_tree
    proc = run_script("alexnet-train", *train_args(train, val, tmp_path / "OUT", "data.workers=2", epochs=1))
    assert proc.returncode == 1, proc.stderr
    line = one_line(proc.stderr, "alexnet-train", str(bad_train), "unreadable image")
    assert "Traceback" not in proc.stderr and "DataLoader worker" not in line


def test_bad_image_policy_error_in_process_names_the_file(bad_tree, capsys, tmp_path):
    train, val, bad_train, _bad_val = bad_tree
    code, _out, err = exits(capsys, train_main, *train_args(train, val, tmp_path / "OUT", epochs=1))
    assert code == 1
    one_line(err, "alexnet-train", f"{bad_train}: unreadable image (")


def test_bad_val_image_stops_validation_naming_it(bad_tree, capsys, tmp_path):
    train, val, bad_train, bad_val = bad_tree
    bad_train.unlink()
    out = tmp_path / "OUT"
    # workers=0: in pytest, an in-process run that dies with loader workers alive stalled a later test by ~20 s
    # while they were shut down (the console script exits at once); the script test above crosses the boundary.
    code, log, err = exits(capsys, train_main, *train_args(train, val, out, epochs=1))
    assert code == 1
    one_line(err, "alexnet-train", f"{bad_val}: unreadable image (")
    assert "epoch 1/1 train" in log and not (out / "last.pth").exists()


def test_skip_logs_each_bad_file_once_and_counts_them_per_epoch(bad_tree, capsys, tmp_path):
    train, val, bad_train, bad_val = bad_tree
    out = tmp_path / "OUT"
    log = runs_ok(capsys, train_main, *train_args(train, val, out, "data.workers=2", "data.on_bad_image=skip",
                                                  "data.max_bad_fraction=0.5", epochs=2))
    warnings = [line for line in log.splitlines() if line.startswith("warning: skipping")]
    # Two epochs see each bad file twice; each is logged once for the whole run.
    assert len(warnings) == 2, warnings
    for path in (bad_train, bad_val):
        assert sum(w.startswith(f"warning: skipping {path}: unreadable image (") for w in warnings) == 1, warnings
    assert log.count(str(bad_train)) == 1 and log.count(str(bad_val)) == 1, log
    rows = metrics(out)
    n_val = len(list(val.rglob("*.JPEG")))
    assert [r["epoch"] for r in rows] == [1, 2]
    for row in rows:
        assert row["bad_images"] == 2, row  # 1 train + 1 val, every epoch
        assert row["val_images"] == n_val - 1 == 9
    assert "2 unreadable images skipped" in log


def test_skip_past_max_bad_fraction_exits_1_naming_the_setting(bad_tree, capsys, tmp_path):
    train, val, _bad_train, _bad_val = bad_tree
    code, _out, err = exits(capsys, train_main, *train_args(
        train, val, tmp_path / "OUT", "data.on_bad_image=skip", "data.max_bad_fraction=0.0", epochs=1))
    assert code == 1
    one_line(err, "alexnet-train", "data.max_bad_fraction", "1 of the 25 train images")


def test_eval_skips_a_bad_val_image_under_the_checkpoints_policy(bad_tree, capsys, tmp_path):
    train, val, _bad_train, bad_val = bad_tree
    out = tmp_path / "OUT"
    runs_ok(capsys, train_main, *train_args(train, val, out, "data.on_bad_image=skip", "data.max_bad_fraction=0.5",
                                            epochs=1))
    report = tmp_path / "eval.json"
    log = runs_ok(capsys, eval_main, out / "last.pth", "--json", report)
    assert log.count(f"warning: skipping {bad_val}") == 1
    assert json.loads(report.read_text())["center"]["images"] == 9
    log = runs_ok(capsys, eval_main, out / "last.pth", "--workers", "2", "--batch-size", "4")
    assert log.count(f"warning: skipping {bad_val}") == 1 and ": 9 images" in log


# --------------------------------------------------------------------------- flat validation folders


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A 1-epoch tiny model on CLASSES (trained in-process)."""
    root = tmp_path_factory.mktemp("flat-ckpt")
    train = write_image_folder(root / "train", CLASSES, 6, seed=1)
    val = write_image_folder(root / "val", CLASSES, 2, seed=2)
    out = root / "OUT"
    train_main(train_args(train, val, out, epochs=1))
    return out / "last.pth"


@pytest.fixture(scope="module")
def flat(tmp_path_factory) -> tuple[Path, Path]:
    """(flat val folder of 7 images, the same images in wnid subfolders)."""
    root = tmp_path_factory.mktemp("flat-val")
    flat_dir = write_flat_val(root / "flat")
    nested = root / "nested"
    for i, wnid in enumerate(FLAT_LABELS, 1):
        (nested / wnid).mkdir(parents=True, exist_ok=True)
        name = f"ILSVRC2012_val_{i:08d}.JPEG"
        shutil.copyfile(flat_dir / name, nested / wnid / name)
    return flat_dir, nested


def test_eval_on_a_flat_folder_gives_the_same_result_with_every_labels_format(checkpoint, flat, capsys, tmp_path):
    flat_dir, nested = flat
    results = {}
    for fmt in ("lines", "kaggle", "devkit"):
        labels = write_labels(tmp_path / fmt, fmt)
        report = tmp_path / f"{fmt}.json"
        text = runs_ok(capsys, eval_main, checkpoint, "--data", flat_dir, "--labels", labels, "--json", report)
        assert f"on {flat_dir}: 7 images" in text
        results[fmt] = json.loads(report.read_text())["center"]
    # The same images scored in class subfolders: labels (and so the loss) agree with every format.
    report = tmp_path / "nested.json"
    runs_ok(capsys, eval_main, checkpoint, "--data", nested, "--json", report)
    results["subfolders"] = json.loads(report.read_text())["center"]
    reference = results["subfolders"]
    assert reference["images"] == 7
    for fmt, got in results.items():
        assert got["images"] == 7, fmt
        assert got["top1"] == pytest.approx(reference["top1"], abs=1e-9), fmt
        assert got["top5"] == pytest.approx(reference["top5"], abs=1e-9), fmt
        assert got["loss"] == pytest.approx(reference["loss"], rel=1e-6), fmt


def test_eval_flat_folder_label_errors_exit_2(checkpoint, flat, capsys, tmp_path):
    flat_dir, _nested = flat
    code, _out, err = exits(capsys, eval_main, checkpoint, "--data", flat_dir)
    assert code == 2
    one_line(err, "alexnet-eval", str(flat_dir), "--labels")
    labels = write_labels(tmp_path / "devkit", "devkit")
    (tmp_path / "devkit" / "meta.mat").unlink()
    code, _out, err = exits(capsys, eval_main, checkpoint, "--data", flat_dir, "--labels", labels)
    assert code == 2
    one_line(err, "alexnet-eval", "meta.mat")
    other = write_labels(tmp_path / "other", "lines", [w.replace(CLASSES[1], "n09999999") for w in FLAT_LABELS])
    code, _out, err = exits(capsys, eval_main, checkpoint, "--data", flat_dir, "--labels", other)
    assert code == 2
    one_line(err, "alexnet-eval", "n09999999", "not a training class")
    code, _out, err = exits(capsys, eval_main, checkpoint, "--data", flat_dir, "--labels", tmp_path / "none.txt")
    assert code == 2
    one_line(err, "alexnet-eval", "--labels", "none.txt")


def test_training_validates_on_a_flat_folder_with_devkit_labels(flat, capsys, tmp_path):
    flat_dir, _nested = flat
    train = write_image_folder(tmp_path / "train", CLASSES, 4, seed=1)
    labels = write_labels(tmp_path / "devkit", "devkit")
    out = tmp_path / "OUT"
    runs_ok(capsys, train_main, *train_args(train, flat_dir, out, f"data.val_labels={labels}", epochs=1))
    assert metrics(out)[0]["val_images"] == 7
    # alexnet-eval without --data takes the val folder and its labels from the checkpoint's config.
    report = tmp_path / "eval.json"
    text = runs_ok(capsys, eval_main, out / "last.pth", "--json", report)
    assert f"on {flat_dir}: 7 images" in text
    assert json.loads(report.read_text())["center"]["loss"] == pytest.approx(metrics(out)[0]["val_loss"], rel=1e-5)


def test_prepared_flat_val_keeps_its_names_so_the_labels_still_apply(checkpoint, flat, capsys, tmp_path):
    flat_dir, _nested = flat
    dst = tmp_path / "val-64"
    runs_ok(capsys, prepare_main, flat_dir, dst, "--size", "64", "--workers", "0")
    assert sorted(p.name for p in dst.glob("*.JPEG")) == sorted(p.name for p in flat_dir.glob("*.JPEG"))
    for fmt in ("kaggle", "devkit"):
        labels = write_labels(tmp_path / fmt, fmt)
        text = runs_ok(capsys, eval_main, checkpoint, "--data", dst, "--labels", labels)
        assert f"on {dst}: 7 images" in text


# --------------------------------------------------------------------------- alexnet-stats


def solid_tree(root: Path) -> Path:
    for ci, colour in enumerate([(200, 0, 0), (0, 0, 200)]):
        (root / f"c{ci}").mkdir(parents=True, exist_ok=True)
        for side in (24, 40, 64):
            Image.new("RGB", (side, side), colour).save(root / f"c{ci}" / f"{side}.png")
    return root


def test_stats_script_writes_the_include_file(tmp_path):
    data = solid_tree(tmp_path / "data")
    out = tmp_path / "stats.yaml"
    proc = run_script("alexnet-stats", data, "--samples", "5", "--out", out, "--resize-size", "32")
    assert proc.returncode == 0, proc.stderr
    assert out.is_file() and proc.stdout == ""
    assert f"wrote {out} (5 images)" in proc.stderr
    fragment = yaml.safe_load(out.read_text())["data"]
    assert set(fragment) == {"mean", "std", "eigval", "eigvec"}
    assert len(fragment["eigvec"]) == 3 and all(len(row) == 3 for row in fragment["eigvec"])


def test_stats_prints_yaml_without_out(tmp_path, capsys):
    data = solid_tree(tmp_path / "data")
    text = runs_ok(capsys, stats_main, data, "--workers", "0", "--resize-size", "32")
    fragment = yaml.safe_load(text)["data"]
    assert fragment["mean"] == [100, 0, 100] and fragment["std"] == [100, 0, 100]


def test_stats_missing_dir_exits_2(tmp_path, capsys):
    code, out, err = exits(capsys, stats_main, tmp_path / "nope", "--workers", "0")
    assert code == 2 and out == ""
    one_line(err, "alexnet-stats", str(tmp_path / "nope"))
    code, _out, err = exits(capsys, stats_main, solid_tree(tmp_path / "d"), "--samples", "0", "--workers", "0")
    assert code == 2
    one_line(err, "alexnet-stats", "--samples")


def test_stats_unreadable_image_exits_1_naming_it(tmp_path, capsys):
    data = solid_tree(tmp_path / "data")
    bad = truncated_jpeg(data / "c0" / "broken.JPEG")
    code, _out, err = exits(capsys, stats_main, data, "--workers", "0")
    assert code == 1
    one_line(err, "alexnet-stats", str(bad))


# --------------------------------------------------------------------------- alexnet-prepare


def test_prepare_script_writes_a_tree_that_trains(tmp_path, capsys):
    src = tmp_path / "src"
    write_image_folder(src / "train", CLASSES, 5, size=90, seed=1)
    write_image_folder(src / "val", CLASSES, 2, size=90, seed=2)
    # Two of ImageNet's quirks ride along: a CMYK JPEG and a PNG under a .JPEG name.
    with Image.open(src / "train" / CLASSES[0] / f"{CLASSES[0]}_000.JPEG") as img:
        img.convert("CMYK").save(src / "train" / CLASSES[0] / "cmyk.JPEG", quality=90)
        img.save(src / "train" / CLASSES[1] / "n02105855_2933.JPEG", "PNG")
    truncated_jpeg(src / "train" / CLASSES[2] / "broken.JPEG")
    dst = tmp_path / "dst"
    proc = run_script("alexnet-prepare", src, dst, "--size", "64", "--workers", "2")
    assert proc.returncode == 0, proc.stderr
    assert "1 unreadable source file(s) were not copied" in proc.stdout + proc.stderr
    assert str(src / "train" / CLASSES[2] / "broken.JPEG") in (dst / "prepare-failures.txt").read_text()
    written = sorted(p.relative_to(dst) for p in dst.rglob("*.JPEG"))
    expected = sorted(p.relative_to(src) for p in src.rglob("*.JPEG") if p.name != "broken.JPEG")
    assert written == expected and len(written) == 3 * 5 + 2 + 3 * 2
    for rel in written:
        with Image.open(dst / rel) as img:
            assert (img.format, img.mode, img.size) == ("JPEG", "RGB", (64, 64)), rel

    out = tmp_path / "OUT"
    runs_ok(capsys, train_main, *train_args(dst / "train", dst / "val", out, "data.resize_size=64", epochs=1))
    row = metrics(out)[0]
    assert row["val_images"] == 6 and row["bad_images"] == 0


def test_prepare_missing_src_exits_2(tmp_path, capsys):
    code, _out, err = exits(capsys, prepare_main, tmp_path / "missing", tmp_path / "dst", "--workers", "0")
    assert code == 2
    one_line(err, "alexnet-prepare", "missing")
    assert not (tmp_path / "dst").exists()
