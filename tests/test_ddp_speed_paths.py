"""Issue 33's paths under 2 real gloo ranks (srun-style tasks, every wait with a timeout):
device decoding one batch ahead where one rank alone meets an undecodable JPEG, and the
loader's ring of reused shared-memory slots on one rank alone."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from .conftest import assert_bit_identical, checkpoint_weights, read_metrics
from .test_ddp_agreement import TRACEBACK, Ranks, _file_read_by, args

pytestmark = pytest.mark.slow


def _break_scan_data(path: Path, seed: int = 1) -> None:
    """A real JPEG header (the worker ships it to the device decoder) over scan data that is noise."""
    good = path.read_bytes()
    path.write_bytes(good[:600] + bytes(np.random.default_rng(seed).integers(0, 256, 3000, dtype=np.uint8)))


def _codes(results) -> list[int]:
    return [code for code, _, _ in results]


def _no_tracebacks(results) -> None:
    for rank, (_, out, err) in enumerate(results):
        assert TRACEBACK not in out + err, f"rank {rank}:\n{err[-3000:]}"


def test_an_undecodable_jpeg_one_rank_decodes_ahead_stops_both_ranks_with_one_line(tree, tmp_path):
    """data.decode: device decodes batch k+1 before step k runs; the failure of rank 1's batch
    still reaches both ranks at that batch's step, through the loader's ring slots."""
    train, val = tree
    broken = _file_read_by(1, train, step=2)
    _break_scan_data(broken)
    out = tmp_path / "out"
    started = time.monotonic()
    extra = ("data.decode=device", "data.workers=2")
    results = Ranks([args(train, val, out, *extra, epochs=1)] * 2).wait(timeout=120)
    assert _codes(results) == [1, 1], results[0][2][-2000:] + results[1][2][-2000:]
    assert time.monotonic() - started < 110
    _no_tracebacks(results)
    lines = results[0][2].strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("alexnet-train: error: rank 1: ") and str(broken) in lines[0]
    # Rank 0 speaks for the run; rank 1's stderr holds only what libjpeg itself prints about the
    # file's scan data ("Corrupt JPEG data: ..."), written by the C library, not by us.
    assert [ln for ln in results[1][2].splitlines() if not ln.startswith("Corrupt JPEG data")] == []
    assert not (out / "last.pth").exists()


def test_an_undecodable_jpeg_one_rank_skips_is_counted_once_and_both_ranks_finish(tree, tmp_path):
    train, val = tree
    broken = _file_read_by(1, train, step=2)
    _break_scan_data(broken)
    out = tmp_path / "out"
    extra = ("data.decode=device", "data.workers=2", "data.on_bad_image=skip", "data.max_bad_fraction=0.05")
    results = Ranks([args(train, val, out, *extra)] * 2).wait(timeout=150)
    assert _codes(results) == [0, 0], results[0][2][-2000:] + results[1][2][-2000:]
    _no_tracebacks(results)
    assert f"warning: skipping {broken}" in results[0][1]
    assert "warning" not in results[1][1]
    assert [row["bad_images"] for row in read_metrics(out)] == [1, 1]  # once per epoch, by rank 1


def test_loader_workers_with_ring_slots_on_one_rank_alone_train_what_no_workers_train(tree, tmp_path):
    """Rank 1 receives its batches through 2 workers' reused slots, rank 0 loads in-process: the
    run is bit-identical to one where neither rank has workers."""
    train, val = tree
    plain, mixed = tmp_path / "plain", tmp_path / "mixed"
    results = Ranks([args(train, val, plain, "data.workers=0", epochs=1)] * 2).wait(timeout=120)
    assert _codes(results) == [0, 0], results[0][2][-2000:] + results[1][2][-2000:]
    results = Ranks([args(train, val, mixed, "data.workers=0", epochs=1),
                     args(train, val, mixed, "data.workers=2", epochs=1)]).wait(timeout=120)
    assert _codes(results) == [0, 0], results[0][2][-2000:] + results[1][2][-2000:]
    _no_tracebacks(results)
    assert_bit_identical(checkpoint_weights(plain / "last.pth"), checkpoint_weights(mixed / "last.pth"))
