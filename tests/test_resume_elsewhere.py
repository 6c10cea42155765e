"""A resume on another number of processes or another device type goes on, no longer exactly, and says so.

The checkpoint records one random state per rank (``rng_ranks``), each with the device it was
drawn on (``device``, ``device_name``).  Resumed on another world size, each rank the checkpoint
has goes on with its own streams and each it lacks starts a fresh one of its own (before,
every rank took rank 0's, and so drew rank 0's dropout masks); rank 0 prints one notice naming
what still carries over (the images and crops of each step) and what does not (dropout, the
colour noise).  Checkpoints and runs are real: tiny ImageFolders, a narrow AlexNet, 2-rank gloo
launches as srun starts them (tests/test_ddp_agreement.py's ``Ranks``).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from alexnet_train import checkpoint as ckpt
from alexnet_train.distributed import DistInfo
from alexnet_train.resume import resume_elsewhere
from alexnet_train.rngstate import recorded_run, restore_rng_states

from .conftest import DEMO_CONFIG, read_metrics, run_train, tiny_overrides, write_image_folder

CLASSES = ["n01", "n02", "n03"]


def argv(data: Path, out: Path, epochs: int, *extra: str) -> list[str]:
    return ["--config", DEMO_CONFIG, "--out", str(out), "--set",
            *tiny_overrides(data / "train", data / "val", len(CLASSES), epochs), *extra]


def ddp(data: Path, out: Path, epochs: int) -> list[str]:
    return argv(data, out, epochs, "dist.mode=ddp", "dist.backend=gloo")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("elsewhere")
    write_image_folder(root / "train", CLASSES, 8, seed=1)  # 24 images: 3 steps of the global batch of 8
    write_image_folder(root / "val", CLASSES, 3, seed=2)
    return root


@pytest.fixture(scope="module")
def one_process(data, tmp_path_factory) -> dict:
    """last.pth of a real one-process CPU run of one epoch."""
    out = tmp_path_factory.mktemp("one") / "out"
    assert run_train(argv(data, out, 1)) == 0
    return ckpt.load_checkpoint(out / "last.pth")


def test_the_checkpoint_records_its_world_size_and_device(one_process):
    assert recorded_run(one_process) == (1, "cpu", None)
    assert [(s["device"], s["device_name"]) for s in one_process["rng_ranks"]] == [("cpu", None)]


def test_the_same_world_size_and_device_is_exact_and_says_nothing(one_process):
    assert resume_elsewhere(one_process, 1, "cpu") == []


def test_another_world_size_gets_one_notice(one_process):
    lines = resume_elsewhere(one_process, 2, "cpu")
    assert lines == [
        "notice: the checkpoint was written by 1 process, this run has 2: each step still trains on the same "
        "images (the global batch) with the same crops, but dropout and the colour noise are drawn per process, "
        "so from here on they differ from what 1 would have drawn (ranks the checkpoint has go on with their own "
        "random streams, others start fresh ones); the run goes on, no longer bit for bit "
        '(docs/fault-tolerance.md, "Resuming elsewhere")']


def test_another_device_type_gets_one_notice(one_process):
    """A CPU checkpoint resumed on CUDA (this machine has no GPU: the function of the record alone)."""
    lines = resume_elsewhere(one_process, 1, "cuda", "NVIDIA H100 80GB HBM3")
    assert len(lines) == 1 and lines[0].startswith(
        "notice: the checkpoint was written on cpu, this run is on cuda: the weights, optimizer, lr schedule, "
        "data order and crops carry over, but dropout and the colour noise come from cuda's random generators, "
        "not the checkpoint's cpu ones")


def test_another_gpu_model_gets_one_notice(one_process):
    """The record as a CUDA rank writes it (rng_state on a GPU), set on this CPU run's checkpoint."""
    state = dict(one_process, rng_ranks=[dict(s, device="cuda", device_name="NVIDIA H100 80GB HBM3")
                                         for s in one_process["rng_ranks"]])
    assert resume_elsewhere(state, 1, "cuda", "NVIDIA H100 80GB HBM3") == []
    lines = resume_elsewhere(state, 1, "cuda", "NVIDIA H200")
    assert len(lines) == 1 and lines[0].startswith(
        "notice: the checkpoint was written on NVIDIA H100 80GB HBM3, this run is on NVIDIA H200: the random "
        "states carry over, but kernels (dropout's included) may run and round differently")
    assert resume_elsewhere(state, 1, "cpu")[0].startswith(
        "notice: the checkpoint was written on cuda (NVIDIA H100 80GB HBM3), this run is on cpu: ")


def test_a_checkpoint_from_before_the_record_says_what_it_can(one_process):
    """Checkpoints before this change: no device fields (a CPU state holds no CUDA one); before
    per-rank states, no world size either, and nothing is claimed about it."""
    old = dict(one_process, rng_ranks=[{k: v for k, v in s.items() if k not in ("device", "device_name")}
                                       for s in one_process["rng_ranks"]])
    assert recorded_run(old) == (1, "cpu", None)
    assert len(resume_elsewhere(old, 2, "cpu")) == 1
    older = {k: v for k, v in old.items() if k != "rng_ranks"}
    older["rng"] = old["rng_ranks"][0]
    assert recorded_run(older) == (None, "cpu", None)
    assert resume_elsewhere(older, 2, "cpu") == []


def test_a_rank_the_checkpoint_lacks_draws_its_own_stream_not_rank_0s(one_process):
    """Before: every rank took rank 0's streams, so rank 1 drew rank 0's dropout masks."""
    def draws(rank: int) -> torch.Tensor:
        restore_rng_states(one_process, DistInfo(rank=rank, world_size=2, launcher="torchrun"))
        return torch.rand(8)

    rank0, rank1 = draws(0), draws(1)
    assert not torch.equal(rank0, rank1)
    assert torch.equal(draws(1), rank1)  # the same checkpoint on the same ranks draws the same
    restore_rng_states(one_process, DistInfo())
    assert torch.equal(torch.rand(8), rank0)  # rank 0 goes on with its own stream, as on one process


# --------------------------------------------------------------------------- real resumes across world sizes


def _notice(output: str) -> list[str]:
    return [ln for ln in output.splitlines() if ln.startswith("notice: the checkpoint was written by")]


@pytest.mark.slow
def test_two_ranks_resumed_by_one_process(data, tmp_path):
    from .test_ddp_agreement import Ranks

    out = tmp_path / "out"
    results = Ranks([ddp(data, out, 1)] * 2).wait(timeout=240)
    assert [code for code, _, _ in results] == [0, 0], results[0][2][-2000:] + results[1][2][-2000:]
    assert recorded_run(ckpt.load_checkpoint(out / "last.pth"))[0] == 2
    assert not _notice(results[0][1] + results[0][2])  # a fresh run says nothing of the kind

    import subprocess

    from .conftest import console_script

    proc = subprocess.run([console_script("alexnet-train"), *argv(data, out, 2)], capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = _notice(proc.stdout)
    assert len(lines) == 1 and lines[0].startswith("notice: the checkpoint was written by 2 processes, this run has 1:")
    assert [row["epoch"] for row in read_metrics(out)] == [1, 2]
    assert recorded_run(ckpt.load_checkpoint(out / "last.pth"))[0] == 1


@pytest.mark.slow
def test_one_process_resumed_by_two_ranks(data, tmp_path):
    from .test_ddp_agreement import Ranks

    out = tmp_path / "out"
    assert run_train(argv(data, out, 1)) == 0
    results = Ranks([ddp(data, out, 2)] * 2).wait(timeout=240)
    assert [code for code, _, _ in results] == [0, 0], results[0][2][-2000:] + results[1][2][-2000:]
    lines = _notice(results[0][1])
    assert len(lines) == 1 and lines[0].startswith("notice: the checkpoint was written by 1 process, this run has 2:")
    assert not _notice(results[1][1] + results[1][2])  # rank 0 alone says it
    assert [row["epoch"] for row in read_metrics(out)] == [1, 2]
    state = ckpt.load_checkpoint(out / "last.pth")
    assert recorded_run(state)[0] == 2
    # Rank 1 drew a stream of its own, not rank 0's.
    assert not torch.equal(state["rng_ranks"][0]["torch"], state["rng_ranks"][1]["torch"])


@pytest.mark.cuda
def test_a_cuda_checkpoint_resumed_on_the_cpu(data, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_train(argv(data, out, 1, "train.device=cuda")) == 0
    state = ckpt.load_checkpoint(out / "last.pth")
    assert recorded_run(state)[1:] == ("cuda", torch.cuda.get_device_name())
    capsys.readouterr()
    assert run_train(argv(data, out, 2, "train.device=cpu")) == 0
    said = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("notice: the checkpoint was written on")]
    assert len(said) == 1 and said[0].startswith("notice: the checkpoint was written on cuda (")


def test_the_lines_docs_quote_are_the_runs():
    """docs/fault-tolerance.md "Resuming elsewhere" quotes the notices as the code words them."""
    import re

    from alexnet_train.config import Config
    from alexnet_train.resume import resume_on_data

    from .conftest import REPO

    text = (REPO / "docs" / "fault-tolerance.md").read_text()
    section = text[text.index("## Resuming elsewhere"):]
    quoted = re.search(r"```text\n(.*?)```", section, flags=re.S).group(1).splitlines()

    def record(world: int, device: str, name: str | None) -> dict:
        return {"rng_ranks": [{"device": device, "device_name": name}] * world}

    h100, h200 = "NVIDIA H100 80GB HBM3", "NVIDIA H200"
    said = (resume_elsewhere(record(2, "cpu", None), 1, "cpu")
            + resume_elsewhere(record(1, "cuda", h100), 1, "cuda", h200)
            + resume_elsewhere(record(1, "cuda", h100), 1, "cpu"))
    lists = {"train": {"samples": 18, "fingerprint": "old"}, "val": {"samples": 6, "fingerprint": "same"}}
    state = {"sample_lists": lists, "epoch": 0, "step_in_epoch": 4, "accum": {},
             "config": {"data": {"batch_size": 2}}}
    now = dict(lists, train={"samples": 21, "fingerprint": "new"})
    resume_on_data(state, now, Config(), said.append)
    assert quoted == said
