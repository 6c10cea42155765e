"""The speed settings: train.amp auto, train.compile_mode (CUDA graphs), and what the shipped
configs choose on CUDA."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from alexnet_train.configload import load_config
from alexnet_train.data.datasets import scan_image_folder
from alexnet_train.data.loaders import Splits
from alexnet_train.precision import amp_dtype
from alexnet_train.wrapping import uses_cuda_graphs
from alexnet_train.tracking import Tracker
from alexnet_train.train import Trainer

from .conftest import DEMO_CONFIG as DEMO, assert_bit_identical, checkpoint_weights, read_metrics, run_train, tiny_overrides

REPO = Path(__file__).resolve().parents[1]


def test_amp_auto_is_float32_on_the_cpu_without_a_notice():
    said = []
    assert amp_dtype("auto", torch.device("cpu"), said.append) is None
    assert said == []
    assert amp_dtype("bf16", torch.device("cpu"), said.append) is None
    assert said == ["notice: train.amp=bf16 needs a CUDA device; training in float32"]


@pytest.mark.cuda
def test_amp_auto_is_bf16_on_a_gpu_that_has_it():
    want = torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    assert amp_dtype("auto", torch.device("cuda", 0), print) is want


@pytest.mark.parametrize("enabled, mode, device, graphs", [
    (True, "reduce-overhead", "cuda", True),
    (True, "max-autotune", "cuda", True),
    (True, "max-autotune-no-cudagraphs", "cuda", False),
    (True, "default", "cuda", False),
    (False, "reduce-overhead", "cuda", False),   # compile_mode without compile: nothing compiled
    (True, "reduce-overhead", "cpu", False),     # CUDA graphs are CUDA's
])
def test_which_compiled_steps_replay_as_cuda_graphs(enabled, mode, device, graphs):
    assert uses_cuda_graphs(enabled, mode, torch.device(device)) is graphs


@pytest.mark.parametrize("config, channels_last", [("paper.yaml", False), ("paper-literal.yaml", False),
                                                   ("torchvision.yaml", True)])
def test_shipped_imagenet_configs_run_in_their_measured_fastest_precision_and_format(config, channels_last):
    cfg = load_config(REPO / "configs" / config)
    assert cfg.train.amp == "auto"  # bf16 on a GPU that has it; float32 on the CPU
    assert cfg.train.channels_last is channels_last
    # A user's word wins.
    assert load_config(REPO / "configs" / config, ["train.amp=none"]).train.amp == "none"


@pytest.mark.parametrize("mode", ["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"])
def test_every_compile_mode_builds_a_trainer(tree, tmp_path, mode):
    train, val = tree
    cfg = load_config(DEMO, [*tiny_overrides(train, val, 3, 1), "train.compile=true", f"train.compile_mode={mode}"])
    classes, samples = scan_image_folder(str(train))
    _, val_samples = scan_image_folder(str(val))
    trainer = Trainer(cfg, Splits(classes, samples, val_samples), tmp_path, Tracker(None, enabled=False))
    assert isinstance(trainer.net, torch._dynamo.eval_frame.OptimizedModule)  # torch.compile took the mode
    assert trainer.graphs is False  # on the CPU


@pytest.mark.slow
def test_a_compiled_run_with_the_fused_lrn_resumes_bit_identical_on_the_cpu(tree, tmp_path):
    """train.compile with the LRN's autograd.Function inside: Inductor compiles it, and a run
    resumed between epochs ends with the uninterrupted run's weights, bit for bit (dropout's
    stream replayed from the checkpoint's RNG state)."""
    train, val = tree

    def argv(out: Path, epochs: int) -> list[str]:
        return ["--config", DEMO, "--out", str(out), "--set", *tiny_overrides(train, val, 3, epochs),
                "train.compile=true", "train.compile_mode=reduce-overhead"]

    assert run_train(argv(tmp_path / "straight", 2)) == 0
    assert run_train(argv(tmp_path / "split", 1)) == 0
    assert run_train(argv(tmp_path / "split", 2)) == 0
    rows = read_metrics(tmp_path / "split")
    assert [r["epoch"] for r in rows] == [1, 2]
    assert all(torch.isfinite(torch.tensor(r["train_loss"])) for r in rows)
    assert_bit_identical(checkpoint_weights(tmp_path / "straight" / "last.pth"),
                         checkpoint_weights(tmp_path / "split" / "last.pth"))
