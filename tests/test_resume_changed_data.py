"""A resume on changed data says so (issue 35, item 11).

A checkpoint records each split's sample count and a fingerprint of its sample list (paths
relative to the split's root, and labels).  Resuming between epochs on changed data goes on with
a one-line notice; resuming mid-epoch on a changed training list restarts that epoch's order from
its first step, with a notice (its step k belongs to another shuffle order).  The same data
spelled through a symlink or from another working directory is no change.  A checkpoint written
before the record resumes as it did, with a note that it cannot be checked.

The runs are real: tiny ImageFolders of JPEGs, a narrow AlexNet, alexnet-train's own code in this
process, checkpoints on disk.  A mid-epoch checkpoint at a known step comes from a real SIGTERM
sent when the run logs its first ``train.checkpoint_steps`` checkpoint: the run saves after the
next step and exits 143.
"""
from __future__ import annotations

import io
import os
import shutil
import signal
import sys
from pathlib import Path

import numpy as np
import pytest

from alexnet_train import checkpoint as ckpt
from alexnet_train.config import Config, replace
from alexnet_train.data.samples import SampleList, fingerprint
from alexnet_train.errors import ConfigError
from alexnet_train.resume import resume_on_data, same_sample_lists

from .conftest import DEMO_CONFIG, read_metrics, run_train, tiny_overrides, write_image_folder

CLASSES = ["n01", "n02", "n03"]
PER_CLASS = 6  # 18 training images in batches of 2: 9 steps an epoch
CHECKPOINT_STEP = 3  # the first mid-epoch checkpoint; the SIGTERM's save is one step later
STOPPED_AT = CHECKPOINT_STEP + 1


# --------------------------------------------------------------------------- helpers


def make_data(root: Path) -> tuple[Path, Path]:
    return (write_image_folder(root / "train", CLASSES, PER_CLASS, seed=1),
            write_image_folder(root / "val", CLASSES, 2, seed=2))


def add_images(train: Path, n: int = 3) -> None:
    """New files in existing class folders (files added to a split; the classes stay)."""
    for i in range(n):
        cls = CLASSES[i % len(CLASSES)]
        shutil.copy(train / cls / f"{cls}_000.JPEG", train / cls / f"{cls}_added_{i}.JPEG")


def argv(train: Path | str, val: Path | str, out: Path, epochs: int) -> list[str]:
    return ["--config", DEMO_CONFIG, "--out", str(out), "--set", *tiny_overrides(train, val, len(CLASSES), epochs),
            "data.batch_size=2", "train.log_interval=1", f"train.checkpoint_steps={CHECKPOINT_STEP}"]


class _SigtermAtFirstCheckpoint(io.TextIOBase):
    """stdout that sends this process SIGTERM as the run logs its first mid-epoch checkpoint."""

    def __init__(self, stream) -> None:
        self.stream, self.sent = stream, False

    def write(self, text: str) -> int:
        if not self.sent and text.startswith("checkpoint: "):
            self.sent = True
            os.kill(os.getpid(), signal.SIGTERM)
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return False


def stopped_mid_epoch(train, val, out: Path, monkeypatch, capsys) -> dict:
    """A run of 1 epoch stopped by SIGTERM at step STOPPED_AT: its last.pth."""
    with monkeypatch.context() as m:
        m.setattr(sys, "stdout", _SigtermAtFirstCheckpoint(sys.stdout))
        code = run_train(argv(train, val, out, epochs=1))
    text = capsys.readouterr()
    assert code == 128 + signal.SIGTERM, text.out[-2000:] + text.err[-2000:]
    state = ckpt.load_checkpoint(out / "last.pth")
    assert (state["epoch"], state["step_in_epoch"]) == (0, STOPPED_AT)
    return state


def resumed(capsys, *args: str) -> tuple[int, str]:
    code = run_train(list(args))
    text = capsys.readouterr()
    return code, text.out + text.err


def data_lines(output: str) -> list[str]:
    """What the run says about its data against the checkpoint's."""
    return [ln for ln in output.splitlines() if "data.train_dir" in ln or "data.val_dir" in ln or "sample list" in ln]


# --------------------------------------------------------------------------- the fingerprint


def test_fingerprint_is_of_paths_relative_to_the_root_and_labels():
    rel = [b"n01/a.JPEG", b"n01/b.JPEG", b"n02/c.JPEG"]
    base = SampleList.from_encoded(rel, [0, 0, 1], prefix="/data/train/")
    same = [SampleList.from_encoded(rel, [0, 0, 1], prefix=p) for p in ("train/", "./train/", "/mnt/link/train/")]
    assert all(fingerprint(s) == fingerprint(base) for s in same)
    assert fingerprint(base[:3]) == fingerprint(base)  # a copy of the buffers
    others = [
        SampleList.from_encoded(rel + [b"n02/d.JPEG"], [0, 0, 1, 1], prefix="/data/train/"),  # added
        SampleList.from_encoded(rel[:2], [0, 0], prefix="/data/train/"),  # removed
        SampleList.from_encoded([b"n01/a.JPEG", b"n01/b.JPEG", b"n02/e.JPEG"], [0, 0, 1], prefix="/data/train/"),
        SampleList.from_encoded(rel, [0, 1, 1], prefix="/data/train/"),  # relabelled
        SampleList.from_encoded([b"n01/a.JPEGn01/b.JPEG", b"", b"n02/c.JPEG"], [0, 0, 1], prefix="/data/train/"),
    ]
    prints = {fingerprint(s) for s in others}
    assert len(prints) == len(others) and fingerprint(base) not in prints


def test_fingerprint_of_a_subset_taken_from_a_larger_list():
    big = SampleList.from_encoded([f"c/{i}.JPEG".encode() for i in range(10)], list(range(10)), prefix="/r/")
    part = big.take(np.arange(3, 7))
    assert fingerprint(part) == fingerprint(SampleList.from_encoded(
        [f"c/{i}.JPEG".encode() for i in range(3, 7)], list(range(3, 7)), prefix="/elsewhere/"))


# --------------------------------------------------------------------------- the decision, as a function


def lists(train: int, val: int = 9, train_print: str = "a", val_print: str = "v") -> dict:
    return {"train": {"samples": train, "fingerprint": train_print}, "val": {"samples": val, "fingerprint": val_print}}


def state_at(epoch: int, step: int, recorded: dict | None) -> dict:
    state = {"epoch": epoch, "step_in_epoch": step, "config": {"data": {"batch_size": 2}},
             "accum": {"loss_sum": 3.5, "images": 8, "seconds": 1.5, "data_seconds": 0.25, "bad_images": 1}}
    if recorded is not None:
        state["sample_lists"] = recorded
    return state


CFG = replace(Config(), "data", batch_size=2)


def test_unchanged_lists_resume_as_saved_without_a_word():
    lines: list[str] = []
    state = state_at(0, 4, lists(18))
    assert resume_on_data(state, lists(18), CFG, lines.append) is state and lines == []


def test_mid_epoch_on_a_changed_train_list_restarts_the_epoch_with_a_fresh_row():
    lines: list[str] = []
    got = resume_on_data(state_at(2, 4, lists(18)), lists(21, train_print="b"), CFG, lines.append)
    assert got["step_in_epoch"] == 0 and got["epoch"] == 2
    assert got["accum"] == {"loss_sum": 0.0, "images": 0, "seconds": 0.0, "data_seconds": 0.0, "bad_images": 0}
    assert lines == ["notice: data.train_dir changed since the checkpoint (18 -> 21 samples, sample list differs): "
                     "epoch 3 restarts from its first step in the new list's order (the checkpoint is at step 4 of "
                     "the old list's order; going on there would see some images twice and skip others)"]


def test_a_changed_val_list_or_one_between_epochs_goes_on_with_a_notice():
    lines: list[str] = []
    state = state_at(1, 0, lists(18))
    assert resume_on_data(state, lists(18, train_print="b"), CFG, lines.append) is state
    state = state_at(1, 4, lists(18))
    assert resume_on_data(state, lists(18, 10, val_print="w"), CFG, lines.append) is state
    assert lines == [
        "notice: data.train_dir changed since the checkpoint (18 samples, sample list differs): the run goes on "
        "with the new list from epoch 2",
        "notice: data.val_dir changed since the checkpoint (9 -> 10 samples, sample list differs): validation "
        "from epoch 2 on is of the new list",
    ]


def test_a_checkpoint_whose_epoch_was_trained_goes_on_to_its_validation():
    """Saved at the epoch's last step (a stop during validation): nothing is retrained, and the new
    list leaves nothing of that epoch to train either."""
    lines: list[str] = []
    got = resume_on_data(state_at(0, 9, lists(18)), lists(21, train_print="b"), CFG, lines.append)
    assert got["step_in_epoch"] == 21 // 2 and "its validation runs" in lines[0]


def test_a_checkpoint_without_the_record_resumes_as_it_is_with_a_note():
    lines: list[str] = []
    state = state_at(0, 4, None)
    assert resume_on_data(state, lists(21), CFG, lines.append) is state
    assert len(lines) == 1 and lines[0].startswith("note: the checkpoint records no fingerprint")


def test_ranks_reading_other_sample_lists_are_refused_on_every_rank_alike():
    same_sample_lists([lists(18), lists(18)])
    with pytest.raises(ConfigError, match=r"^data.train_dir: rank 1 reads another sample list than rank 0 "
                                          r"\(21 samples, rank 0 18\)"):
        same_sample_lists([lists(18), lists(21, train_print="b")])


def test_a_moved_data_folder_is_named_old_and_new_and_another_spelling_is_not(tmp_path, monkeypatch):
    from alexnet_train.configload import config_to_dict
    from alexnet_train.resume import check_resume_config

    (tmp_path / "data" / "train").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "data", target_is_directory=True)
    saved = config_to_dict(replace(Config(), "data", train_dir=str(tmp_path / "data" / "train")))
    monkeypatch.chdir(tmp_path)
    for spelling in ("link/train", "./data/train", str(tmp_path / "link" / "train") + "/"):
        lines: list[str] = []
        check_resume_config(saved, replace(Config(), "data", train_dir=spelling), lines.append)
        assert lines == [], spelling
    lines = []
    check_resume_config(saved, replace(Config(), "data", train_dir="/scratch/train"), lines.append)
    assert lines == [f"notice: data.train_dir changed since the checkpoint: {str(tmp_path / 'data' / 'train')!r} "
                     "-> '/scratch/train'"]


# --------------------------------------------------------------------------- real runs


@pytest.mark.slow
def test_resume_between_epochs_after_images_were_added_goes_on_with_a_notice(tmp_path, capsys):
    train, val = make_data(tmp_path / "data")
    out = tmp_path / "out"
    assert run_train(argv(train, val, out, epochs=1)) == 0
    before = ckpt.load_checkpoint(out / "last.pth")["sample_lists"]
    assert before["train"]["samples"] == 18 and before["val"]["samples"] == 6
    capsys.readouterr()

    add_images(train)
    code, output = resumed(capsys, *argv(train, val, out, epochs=2))
    assert code == 0, output[-3000:]
    assert data_lines(output) == [
        "notice: data.train_dir changed since the checkpoint (18 -> 21 samples, sample list differs): the run goes "
        "on with the new list from epoch 2"]
    assert "(epoch 2, step 0 of that epoch)" in output
    assert [row["epoch"] for row in read_metrics(out)] == [1, 2]
    after = ckpt.load_checkpoint(out / "last.pth")["sample_lists"]
    assert after["train"]["samples"] == 21 and after["train"]["fingerprint"] != before["train"]["fingerprint"]
    assert after["val"] == before["val"]


@pytest.mark.slow
def test_resume_mid_epoch_after_images_were_added_restarts_the_epoch_with_a_notice(tmp_path, monkeypatch, capsys):
    train, val = make_data(tmp_path / "data")
    out = tmp_path / "out"
    stopped = stopped_mid_epoch(train, val, out, monkeypatch, capsys)

    add_images(train)
    code, output = resumed(capsys, *argv(train, val, out, epochs=1))
    assert code == 0, output[-3000:]
    assert data_lines(output) == [
        "notice: data.train_dir changed since the checkpoint (18 -> 21 samples, sample list differs): epoch 1 "
        f"restarts from its first step in the new list's order (the checkpoint is at step {STOPPED_AT} of the old "
        "list's order; going on there would see some images twice and skip others)"]
    assert "(epoch 1, step 0 of that epoch)" in output
    # The whole new order, from its first step: 21 // 2 = 10 steps, each logged.
    steps = [ln.split(" train ")[1].split()[0] for ln in output.splitlines() if ln.startswith("epoch 1/1 train ")]
    assert steps[0] == "1/10" and steps[-1] == "10/10", steps
    state = ckpt.load_checkpoint(out / "last.pth")
    assert (state["epoch"], state["step_in_epoch"]) == (1, 0)
    assert state["global_step"] == stopped["global_step"] + 10  # the steps taken before count as taken
    assert state["sample_lists"]["train"]["samples"] == 21
    assert [row["epoch"] for row in read_metrics(out)] == [1]


@pytest.mark.slow
def test_resume_on_the_same_data_through_a_symlink_from_another_directory_says_nothing(
        tmp_path, monkeypatch, capsys):
    train, val = make_data(tmp_path / "data")
    out = tmp_path / "out"
    stopped = stopped_mid_epoch(train, val, out, monkeypatch, capsys)  # spelled absolute

    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "link").symlink_to(tmp_path / "data", target_is_directory=True)
    monkeypatch.chdir(tmp_path / "elsewhere")
    code, output = resumed(capsys, *argv("link/train", "./link/val", out, epochs=1))
    assert code == 0, output[-3000:]
    assert data_lines(output) == [] and "notice: data." not in output
    assert f"(epoch 1, step {STOPPED_AT} of that epoch)" in output  # no restart: the same order goes on
    assert ckpt.load_checkpoint(out / "last.pth")["sample_lists"] == stopped["sample_lists"]


@pytest.mark.slow
def test_a_checkpoint_without_sample_lists_resumes_mid_epoch_as_before_with_a_note(tmp_path, monkeypatch, capsys):
    train, val = make_data(tmp_path / "data")
    out = tmp_path / "out"
    stopped = stopped_mid_epoch(train, val, out, monkeypatch, capsys)
    del stopped["sample_lists"]  # as written before the record existed
    ckpt.save_checkpoint(stopped, out / "last.pth")

    code, output = resumed(capsys, *argv(train, val, out, epochs=1))
    assert code == 0, output[-3000:]
    assert data_lines(output) == [
        "note: the checkpoint records no fingerprint of its sample lists (written by an older alexnet-train): "
        "whether data.train_dir or data.val_dir changed since cannot be checked"]
    assert f"(epoch 1, step {STOPPED_AT} of that epoch)" in output
    assert ckpt.load_checkpoint(out / "last.pth")["sample_lists"]["train"]["samples"] == 18  # recorded from now on


# --------------------------------------------------------------------------- DDP: every rank takes the same path


def ddp_argv(train: Path, val: Path, out: Path) -> list[str]:
    # The same global batch (2) as the one-process run that wrote the checkpoint: 1 per rank.
    return [*argv(train, val, out, epochs=1), "dist.mode=ddp", "dist.backend=gloo"]


@pytest.mark.slow
def test_two_ranks_resuming_mid_epoch_on_changed_data_both_restart_the_epoch(tmp_path, monkeypatch, capsys):
    """A rank that went on at step k while the other restarted would take fewer steps and leave
    the other waiting in a collective: both finish, at the same step, and rank 0 alone says why."""
    from .test_ddp_agreement import Ranks

    train, val = make_data(tmp_path / "data")
    out = tmp_path / "out"
    stopped_mid_epoch(train, val, out, monkeypatch, capsys)
    add_images(train)

    results = Ranks([ddp_argv(train, val, out)] * 2).wait(timeout=180)
    assert [code for code, _, _ in results] == [0, 0], results[0][2][-2000:] + results[1][2][-2000:]
    assert len(data_lines(results[0][1])) == 1 and "epoch 1 restarts from its first step" in results[0][1]
    assert data_lines(results[1][1] + results[1][2]) == []
    assert "(epoch 1, step 0 of that epoch)" in results[0][1]
    state = ckpt.load_checkpoint(out / "last.pth")
    assert (state["epoch"], state["step_in_epoch"]) == (1, 0) and state["sample_lists"]["train"]["samples"] == 21


@pytest.mark.slow
def test_two_ranks_reading_other_sample_lists_both_exit_2_before_training(tmp_path):
    from .test_ddp_agreement import Ranks

    train, val = make_data(tmp_path / "data")
    other = tmp_path / "copy" / "train"
    shutil.copytree(train, other)
    add_images(other, 1)  # rank 1's node-local copy holds one file more
    out = tmp_path / "out"
    results = Ranks([ddp_argv(train, val, out), ddp_argv(other, val, out)]).wait(timeout=180)
    assert [code for code, _, _ in results] == [2, 2], results[0][2][-2000:] + results[1][2][-2000:]
    err = results[0][2].strip().splitlines()
    assert len(err) == 1 and "data.train_dir: rank 1 reads another sample list than rank 0 (19 samples, rank 0 18)" \
        in err[0], results[0][2]
    assert not (out / "last.pth").exists()
