"""alexnet-stats on a folder with an unreadable image, with loader workers: one line naming the
file and exit 1, as with ``--workers 0``, within seconds (issue 35, item 10: a worker traceback,
"killed by signal: Alarm clock" and exit 1 after 36 s)."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import write_image_folder

pytestmark = pytest.mark.slow


def truncated_copy_of_one(root: Path) -> Path:
    """Cut one of the folder's JPEGs in half (a download that stopped): PIL's "image file is truncated"."""
    victim = sorted(root.rglob("*.JPEG"))[3]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    return victim


def stats(*args: str, cwd: Path) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "alexnet_train", "stats", *args], capture_output=True, text=True,
                          timeout=120, cwd=cwd, env=os.environ.copy())
    return proc, time.monotonic() - start


@pytest.mark.parametrize("workers", ["2", None])  # None: the default, one worker per core
def test_stats_with_workers_names_the_unreadable_file_on_one_line_at_once(tmp_path, workers):
    data = write_image_folder(tmp_path / "train", ["n01", "n02"], 6)
    bad = truncated_copy_of_one(data)
    proc, seconds = stats(str(data), *(["--workers", workers] if workers else []), cwd=tmp_path)
    without, _ = stats(str(data), "--workers", "0", cwd=tmp_path)

    assert proc.returncode == without.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr and "Alarm clock" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("alexnet-stats: error: ") and str(bad) in lines[0], lines[0]
    assert lines == without.stderr.strip().splitlines()  # the same line, workers or not
    assert proc.stdout == ""
    # The workers used to wait out their 30 s SIGTERM grace before SIGALRM ended them.
    assert seconds < 15, f"took {seconds:.1f} s"


def test_stats_with_workers_still_reads_a_good_folder(tmp_path):
    data = write_image_folder(tmp_path / "train", ["n01", "n02"], 4)
    proc, seconds = stats(str(data), "--workers", "2", "--resize-size", "32", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "mean:" in proc.stdout and "eigvec:" in proc.stdout
    assert seconds < 30
