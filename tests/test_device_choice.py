"""One device per rank, chosen once: the rule (a pure function), each launch layout it must
serve, and alexnet-eval under a launch of several processes.

The GPU half (a 2-rank run whose rank 1 sees one GPU) is in tests/test_cuda.py.
"""
from __future__ import annotations

import subprocess

import pytest
import torch

from alexnet_train import device as device_module, train as train_module
from alexnet_train.config import ConfigError
from alexnet_train.distributed import DistInfo, rank_gpu
from alexnet_train.device import resolve_device

from .conftest import console_script


# (local ranks, GPUs each process sees) -> the GPU index each local rank must take
LAYOUTS = {
    "torchrun, 8 processes, all 8 GPUs visible": (range(8), 8, list(range(8))),
    "srun --gpus-per-task=1: one visible GPU per task": (range(8), 1, [0] * 8),
    "CUDA_VISIBLE_DEVICES set per rank": (range(4), 1, [0] * 4),
    "dist.mode dp / no launcher: one process over 4 GPUs": (range(1), 4, [0]),
    "srun, 2 tasks per node each seeing 2 GPUs": (range(2), 2, [0, 1]),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_each_launch_layout_gives_each_local_rank_a_gpu_it_can_see(layout):
    ranks, visible, expected = LAYOUTS[layout]
    chosen = [rank_gpu(r, visible) for r in ranks]
    assert chosen == expected
    assert all(0 <= i < visible for i in chosen)
    if visible > 1:
        assert len(set(chosen)) == len(chosen)  # NCCL refuses two ranks on one GPU


def test_more_local_ranks_than_visible_gpus_is_refused_not_wrapped_around():
    # local_rank % count would put ranks 4 and 0 on one GPU: NCCL's "Duplicate GPU detected".
    with pytest.raises(ValueError, match=r"local rank 4 but this process sees only 4 GPUs"):
        rank_gpu(4, 4)
    with pytest.raises(ValueError, match="no CUDA device"):
        rank_gpu(0, 0)


@pytest.fixture
def gpus(monkeypatch):
    """This process sees ``n`` working GPUs (only the queries resolve_device makes)."""

    def see(n: int) -> None:
        monkeypatch.setattr(device_module, "cuda_problem", lambda: None)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=None: f"GPU{i}")

    return see


def test_resolve_device_names_the_index_of_local_ranks_gpu_for_every_layout(gpus):
    gpus(8)
    device, line = resolve_device("cuda", local_rank=3, world_size=8)
    assert device == torch.device("cuda", 3) and line.startswith("cuda:3 GPU3")
    gpus(1)  # Slurm --gpus-per-task=1: rank 3's one GPU is its cuda:0
    device, _ = resolve_device("auto", local_rank=3, world_size=8)
    assert device == torch.device("cuda", 0)
    assert device.index == 0  # never a bare "cuda": DDP's device_ids and the inputs take this index


def test_resolve_device_refuses_ranks_beyond_the_visible_gpus_naming_the_setting(gpus):
    gpus(2)
    with pytest.raises(ConfigError, match=r"^train.device: cuda: local rank 2 but this process sees only 2"):
        resolve_device("cuda", local_rank=2, world_size=4)


def test_an_explicit_gpu_index_is_refused_under_a_launch_of_several_processes(gpus):
    gpus(8)
    with pytest.raises(ConfigError, match=r"^--device: cuda:0 under a launch of 2 processes would put every rank"):
        resolve_device("cuda:0", local_rank=1, world_size=2, setting="--device")
    assert resolve_device("cuda:5", world_size=1, setting="--device")[0] == torch.device("cuda", 5)
    with pytest.raises(ConfigError, match="sees 8 GPU"):
        resolve_device("cuda:9", setting="--device")


def test_a_device_string_that_is_not_one_is_a_config_error():
    with pytest.raises(ConfigError, match=r"^--device: 'gpu0'"):
        resolve_device("gpu0", setting="--device")
    with pytest.raises(ConfigError, match=r"expected auto, cpu, cuda or cuda:N"):
        resolve_device("meta", setting="--device")


@pytest.mark.slow
def test_alexnet_eval_under_torchrun_refuses_cuda_n_before_joining_any_group(tmp_path):
    """`--device cuda:0` on every rank of torchrun would put them all on GPU 0 (NCCL refuses)."""
    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
    import os

    done = subprocess.run([console_script("alexnet-eval"), str(tmp_path / "none.pth"), "--device", "cuda:0"],
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        "alexnet-eval: error: --device: cuda:0 under a launch of 2 processes would put every rank on that one "
        "GPU; pass cuda (each rank takes the GPU of its local rank)"]


def test_the_trainer_takes_the_device_it_is_given_and_chooses_none_of_its_own(tree, tmp_path, monkeypatch):
    """The lifecycle chooses once (and makes it current); a trainer choosing again could differ."""
    from alexnet_train.configload import load_config
    from alexnet_train.data.datasets import scan_image_folder
    from alexnet_train.data.loaders import Splits
    from alexnet_train.tracking import Tracker

    from .conftest import DEMO_CONFIG, tiny_overrides

    def second_choice(*_a, **_k):
        raise AssertionError("the trainer chose a device of its own")

    monkeypatch.setattr(train_module, "resolve_device", second_choice)
    train, val = tree
    cfg = load_config(DEMO_CONFIG, tiny_overrides(train, val, 3, epochs=1))
    classes, samples = scan_image_folder(str(train))
    _, val_samples = scan_image_folder(str(val))
    trainer = train_module.Trainer(cfg, Splits(classes, samples, val_samples), tmp_path, Tracker(None, enabled=False),
                                   DistInfo(), device=torch.device("cpu"))
    try:
        assert trainer.device == torch.device("cpu")
        assert all(p.device == trainer.device for p in trainer.model.parameters())
    finally:
        trainer.loaders.close()
