"""alexnet_train.report: the summary and the figure from real metrics.jsonl files."""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from alexnet_train import report
from alexnet_train.report import (PlotUnavailable, ReportError, draw, load_run, lr_changes,
                                  summary_lines)
from alexnet_train.tracking import format_duration

from .conftest import DEMO_CONFIG, console_script, run_train, tiny_overrides, write_image_folder


def demo_rows(epochs: int = 12, step_at: int | None = 11, seconds: float | None = 3.9) -> list[dict]:
    """Rows as the trainer writes them: a learning curve, lr 0.01 then 0.001 from ``step_at``."""
    rows = []
    for e in range(1, epochs + 1):
        row = {
            "epoch": e, "lr": 0.001 if step_at and e >= step_at else 0.01,
            "train_loss": 0.25 + 2.0 * math.exp(-e / 3), "val_loss": 0.15 + 1.9 * math.exp(-e / 3.5),
            "val_top1": 94.75 - 60.0 * math.exp(-e / 2.5), "val_top5": min(100.0, 99.0 - 30 * math.exp(-e)),
            "val_images": 400, "bad_images": 0, "images_per_s": 1250.0 + 2 * e, "data_wait": 0.09,
        }
        if seconds is not None:
            row["epoch_seconds"] = seconds
        rows.append(row)
    return rows


def write_out(out: Path, rows: list[dict], planned: int | None = 12, extra: str = "") -> Path:
    """OUT with metrics.jsonl (one json.dumps line per epoch, as Tracker.epoch_metrics) and config.yaml."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + extra)
    if planned is not None:
        (out / "config.yaml").write_text(
            "# alexnet-train 0.1.0, torch 2.x, git abc123\n"
            f"model:\n  arch: custom\nschedule:\n  kind: step\ntrain:\n  epochs: {planned}\n")
    return out


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB"), dtype=np.int16)


def assert_report_png(path: Path) -> np.ndarray:
    img = pixels(path)
    h, w, _ = img.shape
    assert abs(w - report.FIGSIZE[0] * report.DPI) <= 2 and abs(h - report.FIGSIZE[1] * report.DPI) <= 2
    assert img.std() > 20, "the figure is blank"
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 20  # curves in colour, not just text
    return img


# --------------------------------------------------------------------------- summary


def test_summary_of_a_finished_run(tmp_path):
    rows = demo_rows()
    rows[4]["bad_images"], rows[7]["bad_images"] = 2, 3
    rows[5]["val_top1"] = 95.5  # the best epoch is not the last one
    run = load_run(write_out(tmp_path / "demo", rows))
    lines = summary_lines(run)
    assert lines[0] == f"{tmp_path / 'demo'}: 12 of 12 epochs (custom, schedule step)"
    assert lines[1].startswith("best   epoch 6: val top-1 95.50%  top-5 ")
    assert lines[1].endswith(f"val loss {rows[5]['val_loss']:.4f}")
    last = rows[-1]
    assert lines[2] == (f"final  epoch 12: val top-1 {last['val_top1']:.2f}%  top-5 {last['val_top5']:.2f}%  "
                        f"train loss {last['train_loss']:.4f}  lr 0.001")
    assert lines[3] == "lr     0.01 (epochs 1-10), 0.001 (epochs 11-12)"
    assert lines[4] == "speed  1263 img/s training on average, data wait 9%"
    assert lines[5] == "time   47s training and validating 12 epochs (4s per epoch)"
    assert lines[6] == "bad    5 unreadable images skipped in total (in 2 of 12 epochs)"
    assert len(lines) == 7


def test_summary_of_an_unfinished_long_run(tmp_path):
    rows = demo_rows(7, step_at=7, seconds=600.0)
    lines = summary_lines(load_run(write_out(tmp_path / "paper", rows, planned=90)))
    assert ": 7 of 90 epochs" in lines[0]
    assert "lr     0.01 (epochs 1-6), 0.001 (epoch 7)" in lines
    assert "time   1h10m training and validating 7 epochs (10m00s per epoch)" in lines
    assert not any(line.startswith("bad") for line in lines)


def test_summary_without_epoch_seconds_or_config(tmp_path):
    rows = demo_rows(3, step_at=None, seconds=None)
    for row in rows:
        del row["data_wait"]
    run = load_run(write_out(tmp_path / "old", rows, planned=None))
    assert run.planned_epochs is None and run.arch is None
    lines = summary_lines(run)
    assert lines[0] == f"{tmp_path / 'old'}: 3 epochs"
    assert "lr     0.01 (epochs 1-3)" in lines
    assert "speed  1254 img/s training on average" in lines  # no data wait: not invented
    assert "time   unknown (metrics.jsonl from before epoch_seconds was recorded)" in lines


def test_summary_when_only_some_epochs_recorded_their_time(tmp_path):
    rows = demo_rows(4, seconds=None)
    rows[2]["epoch_seconds"], rows[3]["epoch_seconds"] = 100.0, 85.0  # resumed with a newer alexnet-train
    lines = summary_lines(load_run(write_out(tmp_path / "mixed", rows)))
    assert "time   at least 3m05s: 2 of 4 epochs recorded their time" in lines


def test_an_annealed_lr_is_summarised_by_its_ends(tmp_path):
    rows = demo_rows(30, step_at=None)
    for row in rows:
        row["lr"] = 0.01 * 0.5 * (1 + math.cos(math.pi * (row["epoch"] - 1) / 30))
    lines = summary_lines(load_run(write_out(tmp_path / "cos", rows, planned=30)))
    assert f"lr     0.01 (epoch 1) to {rows[-1]['lr']:.4g} (epoch 30), changed at 29 epochs" in lines


# --------------------------------------------------------------------------- loading


def test_half_written_last_line_is_skipped_and_later_duplicate_wins(tmp_path):
    rows = demo_rows(5)
    resumed = dict(rows[2], val_top1=88.0, train_loss=0.5)  # epoch 3 again, after a resume
    out = write_out(tmp_path / "crashed", rows[:4] + [resumed, rows[4]], extra='{"epoch": 6, "lr": 0.0')
    run = load_run(out)
    assert [r["epoch"] for r in run.rows] == [1, 2, 3, 4, 5]
    assert run.rows[2]["val_top1"] == 88.0 and run.skipped_lines == 1
    assert summary_lines(run)[-1] == f"note   1 unreadable line(s) of {out / 'metrics.jsonl'} skipped"


def test_missing_or_empty_metrics_raise_report_error_naming_the_file(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReportError, match=f"^{tmp_path / 'empty' / 'metrics.jsonl'}: not found"):
        load_run(tmp_path / "empty")
    with pytest.raises(ReportError, match="nowhere/metrics.jsonl: no such directory"):
        load_run(tmp_path / "nowhere")
    (tmp_path / "empty" / "metrics.jsonl").write_text('{"epoch": 1, "lr"\n\n')
    with pytest.raises(ReportError) as err:
        load_run(tmp_path / "empty")
    assert str(err.value) == f"{tmp_path / 'empty' / 'metrics.jsonl'}: no readable epoch row"
    assert "\n" not in str(err.value)


def test_a_damaged_config_is_ignored(tmp_path):
    out = write_out(tmp_path / "x", demo_rows(2), planned=None)
    (out / "config.yaml").write_text("train: [epochs: : {\n")
    run = load_run(out)
    assert run.planned_epochs is None and len(run.rows) == 2


# --------------------------------------------------------------------------- figure


def test_lr_changes():
    rows = demo_rows(12)
    assert lr_changes(rows) == [(11, 0.01, 0.001)]
    rows[4]["lr"] = None  # a row without an lr: compared across, not a change
    rows[7]["lr"] = 0.005
    assert lr_changes(rows) == [(8, 0.01, 0.005), (9, 0.005, 0.01), (11, 0.01, 0.001)]
    assert lr_changes(demo_rows(3, step_at=None)) == []


def test_draw_writes_a_readable_png(tmp_path):
    run = load_run(write_out(tmp_path / "demo", demo_rows()))
    path = draw(run, tmp_path / "demo" / "report.png")
    assert path == tmp_path / "demo" / "report.png"
    assert_report_png(path)
    assert [p.name for p in path.parent.iterdir() if p.name.startswith(".")] == []  # no temporary left


def test_lr_steps_are_marked_on_both_panels(tmp_path, monkeypatch):
    # The same OUT name in both: the title must not differ.
    stepped = draw(load_run(write_out(tmp_path / "a" / "demo", demo_rows())), tmp_path / "a.png")
    flat = draw(load_run(write_out(tmp_path / "b" / "demo", demo_rows(step_at=None))), tmp_path / "b.png")
    a, b = assert_report_png(stepped), assert_report_png(flat)
    # Same curves, only the lr differs: what differs is the marks, in the left and the right panel.
    cols = np.flatnonzero((a != b).any(axis=(0, 2)))
    half = a.shape[1] // 2
    assert (cols < half).any() and (cols > half).any()
    # draw takes its marks from lr_changes: without them the stepped run draws as the flat one.
    monkeypatch.setattr(report, "lr_changes", lambda rows: [])
    unmarked = draw(load_run(tmp_path / "a" / "demo"), tmp_path / "c.png")
    assert np.array_equal(pixels(unmarked), b)


def test_draw_with_one_epoch_and_missing_values(tmp_path):
    rows = demo_rows(1)
    assert_report_png(draw(load_run(write_out(tmp_path / "one", rows, planned=90)), tmp_path / "one.png"))
    rows = demo_rows(4)
    rows[1]["val_loss"] = float("nan")  # json.dumps writes NaN, json.loads reads it back
    rows[2]["val_top1"] = None
    del rows[3]["train_loss"]
    assert_report_png(draw(load_run(write_out(tmp_path / "holes", rows)), tmp_path / "holes.png"))


def test_many_lr_changes_are_drawn_as_a_curve(tmp_path):
    rows = demo_rows(30, step_at=None)
    for row in rows:
        row["lr"] = 0.01 * 0.5 * (1 + math.cos(math.pi * (row["epoch"] - 1) / 30))
    cosine = pixels(draw(load_run(write_out(tmp_path / "a" / "run", rows, planned=30)), tmp_path / "a.png"))
    flat = pixels(draw(load_run(write_out(tmp_path / "b" / "run", demo_rows(30, step_at=None), planned=30)),
                       tmp_path / "b.png"))
    cols = np.flatnonzero((cosine != flat).any(axis=(0, 2)))
    assert (cols < cosine.shape[1] // 2).any()  # the lr curve on the loss panel


def test_plot_unavailable_without_matplotlib(tmp_path, monkeypatch):
    run = load_run(write_out(tmp_path / "demo", demo_rows()))
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    with pytest.raises(PlotUnavailable) as err:
        draw(run, tmp_path / "demo" / "report.png")
    assert "pip install 'alexnet-train[plot]'" in str(err.value) and "pip install matplotlib" in str(err.value)
    assert isinstance(err.value, ReportError)
    assert sorted(p.name for p in (tmp_path / "demo").iterdir()) == ["config.yaml", "metrics.jsonl"]


@pytest.mark.parametrize("seconds, text", [
    (0, "0s"), (-5, "0s"), (0.4, "0s"), (46, "46s"), (59.6, "1m00s"), (185, "3m05s"), (3599.6, "1h00m"),
    (3725, "1h02m"), (86399, "23h59m"), (93784, "1d02h"), (float("inf"), "?"), (float("nan"), "?"), (None, "?"),
])
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


# --------------------------------------------------------------------------- a real run


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    """A real 3-epoch run of the installed alexnet-train, and its stdout."""
    root = tmp_path_factory.mktemp("real")
    classes = ["n01", "n02", "n03"]
    train = write_image_folder(root / "train", classes, 8, seed=1)
    val = write_image_folder(root / "val", classes, 3, seed=2)
    out = root / "run"
    proc = subprocess.run([console_script("alexnet-train"), "--config", DEMO_CONFIG, "--out", str(out), "--set",
                           *tiny_overrides(train, val, len(classes), epochs=3)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return out, proc.stdout


@pytest.mark.slow
def test_a_finished_run_prints_the_summary_and_writes_report_png(real_run):
    out, stdout = real_run
    run = load_run(out)
    assert [r["epoch"] for r in run.rows] == [1, 2, 3]
    assert (run.planned_epochs, run.arch, run.schedule) == (3, "custom", "step")
    lines = summary_lines(run)
    assert lines[0] == f"{out}: 3 of 3 epochs (custom, schedule step)"
    assert any(line.startswith("best   epoch ") for line in lines)
    assert any(line.startswith("speed  ") and " img/s" in line for line in lines)
    assert any(line.startswith("time   ") and "training and validating 3 epochs" in line for line in lines)
    # The run itself ended with the same summary and the figure.
    tail = stdout.splitlines()[-len(lines) - 1:]
    assert tail == lines + [f"report: {out / 'report.png'}"]
    assert_report_png(out / "report.png")


def _report(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([console_script("alexnet-report"), *map(str, args)], capture_output=True, text=True,
                          timeout=300)


@pytest.mark.slow
def test_alexnet_report_redraws_any_out_on_demand(real_run, tmp_path):
    out, _ = real_run
    png = tmp_path / "again.png"
    proc = _report(out, "--png", png)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == summary_lines(load_run(out)) + [f"report: {png}"]
    assert_report_png(png)
    summary_only = _report(out, "--no-plot", "--png", tmp_path / "none.png")
    assert summary_only.returncode == 0 and "report:" not in summary_only.stdout
    assert not (tmp_path / "none.png").exists()


@pytest.mark.slow
def test_alexnet_report_on_a_directory_without_metrics_is_one_line_exit_1(tmp_path):
    proc = _report(tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [
        f"alexnet-report: error: {tmp_path / 'metrics.jsonl'}: not found: no epoch has finished in this OUT"]


@pytest.mark.slow
def test_without_matplotlib_the_report_says_how_to_get_it(real_run, tmp_path):
    out, _ = real_run
    copy = tmp_path / "run"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("*.pth", "tb", "report.png"))
    # Python as a user without matplotlib has it: the import fails.
    code = ("import sys; sys.modules['matplotlib'] = None; from alexnet_train.cli import report_main; "
            f"report_main([{str(copy)!r}])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert proc.stdout.splitlines()[0].startswith(f"{copy}: 3 of 3 epochs")  # the summary still comes
    assert proc.stderr.splitlines() == ["alexnet-report: error: matplotlib is not installed; "
                                        "pip install 'alexnet-train[plot]' (or pip install matplotlib)"]
    assert not (copy / "report.png").exists()


def test_a_run_without_matplotlib_ends_normally_and_says_how_to_get_the_plot(image_tree, tmp_path, capsys,
                                                                              monkeypatch):
    train, val, classes = image_tree
    out = tmp_path / "run"
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert run_train(["--config", DEMO_CONFIG, "--out", str(out), "--set",
                      *tiny_overrides(train, val, len(classes), epochs=1)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == (f"report: {out / 'report.png'} not drawn: matplotlib is not installed; "
                         "pip install 'alexnet-train[plot]' (or pip install matplotlib)")
    assert not (out / "report.png").exists() and (out / "best.pth").is_file()
