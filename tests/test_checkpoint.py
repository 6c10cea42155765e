"""Atomic checkpoint writes, safe loads, resume discovery and pruning."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from alexnet_train import checkpoint as ckpt


def state(tag: int) -> dict:
    return {"model": {"w": torch.full((4,), float(tag))}, "config": {"train": {}}, "classes": ["a", "b"], "tag": tag}


def test_save_then_load_round_trips_with_weights_only(tmp_path: Path):
    path = tmp_path / "last.pth"
    ckpt.save_checkpoint(state(3), path)
    loaded = torch.load(path, weights_only=True)
    assert loaded["tag"] == 3 and loaded["format"] == ckpt.CHECKPOINT_FORMAT
    assert ckpt.is_training_checkpoint(ckpt.load_checkpoint(path))
    assert not list(tmp_path.glob(".*tmp*"))


def test_a_failing_write_leaves_the_previous_checkpoint_whole(tmp_path: Path):
    path = tmp_path / "last.pth"
    ckpt.save_checkpoint(state(1), path)
    before = path.read_bytes()

    def explode(fh):
        fh.write(b"partial bytes")
        raise KeyboardInterrupt  # a kill in the middle of torch.save

    with pytest.raises(KeyboardInterrupt):
        ckpt.atomic_write_bytes(path, explode)
    assert path.read_bytes() == before
    assert not list(tmp_path.glob(".*tmp*"))


@pytest.mark.parametrize("content", [b"", b"not a zip at all", None])
def test_unreadable_files_raise_naming_the_file(tmp_path: Path, content):
    path = tmp_path / "bad.pth"
    if content is None:  # a truncated real checkpoint
        ckpt.save_checkpoint(state(1), path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    else:
        path.write_bytes(content)
    with pytest.raises(ckpt.CheckpointError, match="bad.pth: unreadable checkpoint"):
        ckpt.load_checkpoint(path)
    with pytest.raises(ckpt.CheckpointError, match="missing.pth: checkpoint not found"):
        ckpt.load_checkpoint(tmp_path / "missing.pth")


def test_pickled_objects_are_refused_not_executed(tmp_path: Path):
    path = tmp_path / "evil.pth"
    torch.save({"model": {}, "config": {}, "classes": [], "obj": Path("/etc")}, path)
    with pytest.raises(ckpt.CheckpointError) as info:
        ckpt.load_checkpoint(path)
    message = str(info.value)
    # Our words on one line, naming the file and the object; none of torch's multi-line text.
    assert "\n" not in message
    assert message.startswith(f"{path}: holds pickled Python objects (the first: pathlib.")
    assert "not only tensors; refusing to load it" in message
    for torch_text in ("Weights only load failed", "PyTorch 2.6", "add_safe_globals", "\x1b["):
        assert torch_text not in message


@pytest.mark.slow
def test_a_refused_checkpoint_is_one_line_from_alexnet_eval(tmp_path: Path):
    import argparse
    import subprocess

    from .conftest import console_script

    path = tmp_path / "pickled.pth"
    torch.save({"model": {"w": torch.zeros(2)}, "args": argparse.Namespace(lr=0.1)}, path)
    proc = subprocess.run([console_script("alexnet-eval"), str(path), "--data", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"alexnet-eval: error: {path}: holds pickled Python objects (the first: argparse.Namespace), not only "
        "tensors; refusing to load it, as unpickling them could run code from the file. If you trust its "
        "source, load it once with torch.load(..., weights_only=False) and torch.save its state_dict"]


def test_find_resume_falls_back_past_a_corrupt_last(tmp_path: Path):
    ckpt.save_checkpoint(state(1), tmp_path / "epoch-001.pth")
    ckpt.save_checkpoint(state(2), tmp_path / "epoch-002.pth")
    (tmp_path / "last.pth").write_bytes(b"\x00" * 100)
    messages: list[str] = []
    path, loaded = ckpt.find_resume(tmp_path, log=messages.append)
    assert path.name == "epoch-002.pth" and loaded["tag"] == 2
    assert any("last.pth" in m for m in messages)


def test_find_resume_uses_best_last_and_refuses_when_nothing_loads(tmp_path: Path):
    ckpt.save_checkpoint(state(1), tmp_path / "best.pth")
    (tmp_path / "last.pth").write_bytes(b"PK\x03\x04garbage")
    path, loaded = ckpt.find_resume(tmp_path, log=lambda m: None)
    assert path.name == "best.pth" and loaded["tag"] == 1
    (tmp_path / "best.pth").write_bytes(b"")
    with pytest.raises(ckpt.CheckpointError, match="last.pth: unreadable checkpoint .*no checkpoint in"):
        ckpt.find_resume(tmp_path, log=lambda m: None)


def test_find_resume_prefers_last_and_handles_empty_dirs(tmp_path: Path):
    assert ckpt.find_resume(tmp_path / "nothing-here") is None
    assert ckpt.find_resume(tmp_path) is None
    ckpt.save_checkpoint(state(1), tmp_path / "epoch-001.pth")
    ckpt.save_checkpoint(state(5), tmp_path / "last.pth")
    path, loaded = ckpt.find_resume(tmp_path)
    assert path.name == "last.pth" and loaded["tag"] == 5


def test_copies_are_independent_and_pruned(tmp_path: Path):
    last = tmp_path / "last.pth"
    for epoch in range(1, 5):
        ckpt.save_checkpoint(state(epoch), last)
        ckpt.copy_file(last, tmp_path / f"epoch-{epoch:03d}.pth")
        ckpt.prune_epoch_checkpoints(tmp_path, keep_last=2)
    assert [p.name for p in ckpt.epoch_checkpoints(tmp_path)] == ["epoch-004.pth", "epoch-003.pth"]
    # Each name keeps its own content although last.pth was replaced since.
    assert ckpt.load_checkpoint(tmp_path / "epoch-003.pth")["tag"] == 3
    assert ckpt.load_checkpoint(last)["tag"] == 4
    assert (tmp_path / "epoch-004.pth").read_bytes() == last.read_bytes()
    with open(last, "r+b") as fh:  # damage in place, as an interrupted `cp` over it would
        fh.truncate(100)
    assert ckpt.load_checkpoint(tmp_path / "epoch-004.pth")["tag"] == 4
