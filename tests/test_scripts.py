"""The benchmark scripts run end to end on a tiny tree and end with their speedup line (no timing asserted)."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest

from .conftest import CLASSES, REPO, write_image_folder

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
