"""scripts/bench_shards.py runs end to end on a tiny ImageFolder and prints its ratios (no timing asserted)."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest

from .conftest import CLASSES, REPO, write_image_folder


@pytest.mark.slow
def test_bench_shards_prints_each_ratio(tmp_path):
    tree = write_image_folder(tmp_path / "train", CLASSES, 8)
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_shards.py"), "--data", str(tree),
                           "--workers", "1", "--batch-size", "4", "--shard-size", "20000"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    out = done.stdout
    assert re.search(r"^data: 24 images of 3 classes", out, re.M)
    for figure in ("first epoch", "warm epoch", "index build", "index memory", "launch to first step"):
        assert re.search(rf"^{figure}.*\s\d+\.\d\d$", out, re.M), figure
    # counted, not estimated: every image file once an epoch; a shard once a worker, then kept open
    assert re.search(r"^files opened, first epoch: images\+shards\s+24\+0\s+0\+\d+\s", out, re.M)
    assert re.search(r"^files opened, warm epoch: images\+shards\s+24\+0\s+0\+0\s+0\.00$", out, re.M)
    assert "cold: not measured (--cold not given)" in out
    assert re.search(r"^ratio shards/files: first=\d+\.\d\d warm=\d+\.\d\d cold=- opens_first=\d+\.\d\d "
                     r"opens_warm=0\.00 index_build=\d+\.\d\d index_memory=\d+\.\d\d launch=\d+\.\d\d$",
                     out.splitlines()[-1])
