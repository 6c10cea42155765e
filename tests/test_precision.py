"""Half precision and the device: LRN safe in fp16, validation under the training's autocast,
colour noise drawn on the device from the step alone, and device errors as one line.

(The GPU halves of these, a sync-free training step and dp replicas in the autocast dtype,
are in tests/test_cuda.py.)
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from alexnet_train.config import DataConfig, ModelConfig
from alexnet_train.configload import load_config
from alexnet_train.data.datasets import ImageDataset, scan_image_folder
from alexnet_train.data.loaders import Splits
from alexnet_train.data.batching import collate_hwc
from alexnet_train.data.transforms import BatchPreprocess, CenterPreset
from alexnet_train.distributed import DistInfo
from alexnet_train.evaluate import evaluate
from alexnet_train.inference import load_for_inference
from alexnet_train.model import LocalResponseNorm, build_model, paper_lrn
from alexnet_train.tracking import Tracker
from alexnet_train.train import Trainer, step_seed

from .conftest import DEMO_CONFIG as DEMO, loader_batches, run_train, tiny_overrides, write_image_folder

# Activations a conv layer gives 0-255 inputs (data.normalize: paper) reach a few hundred:
# above 256, x^2 overflows fp16's 65504.
LARGE = 600.0
# How far validation under autocast may be from float32's on the same 90 images (see below).
AMP_TOP1_POINTS = 2 * 100.0 / 90
AMP_LOSS_REL = 0.01


def large_activations(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(2, 16, 9, 9, generator=g) * LARGE - 50.0


def test_lrn_under_fp16_autocast_equals_float32_for_large_activations():
    lrn = paper_lrn()
    x = large_activations()
    ref = lrn(x)
    with torch.autocast("cpu", dtype=torch.float16):
        out = lrn(x.half())  # what a conv under autocast hands it
    assert out.dtype == torch.float16
    assert torch.isfinite(out).all()
    # nn.LocalResponseNorm squared in fp16 here: inf divisors and about a third of the outputs 0.
    assert (out[ref != 0] != 0).all()
    torch.testing.assert_close(out.float(), ref, rtol=2e-3, atol=1e-3)


def test_lrn_on_half_and_bfloat16_tensors_computes_in_float32():
    lrn = paper_lrn()
    x = large_activations(1)
    ref = lrn(x)
    for dtype, rtol in ((torch.float16, 2e-3), (torch.bfloat16, 1e-2)):
        out = lrn(x.to(dtype))  # no autocast: nn.LocalResponseNorm has no CPU half kernel at all
        assert out.dtype == dtype and torch.isfinite(out).all()
        torch.testing.assert_close(out.float(), ref, rtol=rtol, atol=1e-2)


@pytest.mark.parametrize("arch", ["paper", "custom"])
def test_every_arch_with_lrn_uses_the_float32_lrn(arch):
    cfg = ModelConfig(arch=arch, num_classes=10, conv_widths=(8, 16, 16, 16, 16), fc_widths=(32, 32))
    model = build_model(cfg)
    lrns = [m for m in model.modules() if isinstance(m, torch.nn.LocalResponseNorm)]
    assert len(lrns) == 2 and all(isinstance(m, LocalResponseNorm) for m in lrns)
    # conv1 -> ReLU -> LRN of the real model on 0-255 pixels, under fp16 autocast.
    x = torch.rand(2, 3, 96, 96, generator=torch.Generator().manual_seed(3)) * 255
    head = model.features[:3]
    with torch.no_grad():
        ref = head(x)
        with torch.autocast("cpu", dtype=torch.float16):
            out = head(x)
    assert torch.isfinite(out).all()
    assert ((out != 0) == (ref != 0)).float().mean() > 0.999  # ReLU's zeros, and no others
    torch.testing.assert_close(out.float(), ref, rtol=1e-2, atol=5e-2)


def test_torchscript_export_keeps_working_with_the_float32_lrn():
    lrn = paper_lrn()
    scripted = torch.jit.script(torch.nn.Sequential(lrn))
    x = large_activations(2)
    # TorchScript runs F.local_response_norm, eager the one-pass LRN: equal to float32 rounding.
    torch.testing.assert_close(scripted(x), lrn(x), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- colour noise


def small_trainer(tree, tmp_path: Path, seed: int = 0) -> Trainer:
    train, val = tree
    cfg = load_config(DEMO, [*tiny_overrides(train, val, 3, 1), "data.pca_std=0.1", f"train.seed={seed}"])
    classes, samples = scan_image_folder(str(train))
    _, val_samples = scan_image_folder(str(val))
    return Trainer(cfg, Splits(classes, samples, val_samples), tmp_path, Tracker(None, enabled=False), DistInfo())


def test_the_colour_noise_of_a_step_is_a_function_of_seed_epoch_and_step_alone(tree, tmp_path):
    a = small_trainer(tree, tmp_path / "a")
    torch.manual_seed(12345)  # the global RNG (dropout's) must not reach the noise
    torch.randn(1000)
    b = small_trainer(tree, tmp_path / "b")
    noise = lambda t, e, s: t.preprocess.colour_noise(8, t.step_noise_generator(e, s))  # noqa: E731
    first = noise(a, 2, 7)
    assert first.device == a.device and first.shape == (8, 3) and first.abs().sum() > 0
    assert torch.equal(first, noise(b, 2, 7))
    noise(a, 0, 0)  # drawing other steps in between changes nothing
    assert torch.equal(first, noise(a, 2, 7))
    assert not torch.equal(first, noise(a, 2, 8)) and not torch.equal(first, noise(a, 3, 7))
    assert not torch.equal(first, noise(small_trainer(tree, tmp_path / "c", seed=1), 2, 7))
    # On the CPU, bit for bit what earlier versions drew (resuming their checkpoints stays exact).
    legacy = BatchPreprocess(a.cfg.data, "cpu").colour_noise(8, torch.Generator().manual_seed(step_seed(0, 2, 7)))
    assert torch.equal(first, legacy)


def test_colour_noise_is_drawn_on_the_generators_device():
    prep = BatchPreprocess(DataConfig(pca_std=0.1), "cpu")
    g = torch.Generator(device="cpu").manual_seed(1)
    assert prep.colour_noise(4, g).device.type == "cpu"


# --------------------------------------------------------------------------- validation precision


@pytest.fixture
def trained(tmp_path):
    """A tiny model trained 2 epochs on the 0-255 scale (data.normalize: paper: LRN inputs are
    large), and its 90-image val folder."""
    classes = ["n01", "n02", "n03"]
    train = write_image_folder(tmp_path / "train", classes, 16, seed=1)
    val = write_image_folder(tmp_path / "val", classes, 30, seed=2)
    out = tmp_path / "run"
    overrides = [o for o in tiny_overrides(train, val, 3, 2) if o != "data.normalize=torchvision"]
    assert run_train(["--config", DEMO, "--out", str(out), "--set", *overrides, "data.normalize=paper",
                      "optim.lr=0.0003", "data.batch_size=4"]) == 0
    return out / "last.pth", val


@pytest.mark.slow
def test_evaluation_under_autocast_matches_float32(trained):
    path, val = trained
    loaded = load_for_inference(str(path), torch.device("cpu"))
    _, samples = scan_image_folder(str(val))
    batches = loader_batches(ImageDataset(samples, CenterPreset(loaded.data)), collate_hwc, batch_size=8)
    prep = BatchPreprocess(loaded.data, "cpu")
    results = {dtype: evaluate(loaded.model, batches, prep, torch.device("cpu"), amp_dtype=dtype)
               for dtype in (None, torch.bfloat16, torch.float16)}
    ref = results[None]
    assert ref.top1 > 40  # it learnt something (chance is 33%), so flips would show
    # Measured on this 2-core CPU (torch 2.14.1): float32 52.22%, bf16 52.22% (loss +0.26%),
    # fp16 53.33% (one image of 90 flipped, loss -0.03%).  The bounds: two images, 1% of the loss.
    # (CUDA's autocast casts other ops: tests/test_cuda.py bounds the GPU by each format's rounding.)
    for dtype in (torch.bfloat16, torch.float16):
        got = results[dtype]
        assert got.images == ref.images == 90
        assert abs(got.top1 - ref.top1) <= AMP_TOP1_POINTS + 1e-9, (dtype, got, ref)
        assert got.loss == pytest.approx(ref.loss, rel=AMP_LOSS_REL), (dtype, got, ref)


# --------------------------------------------------------------------------- the device


no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a usable CUDA GPU")


@no_cuda
def test_train_device_cuda_without_a_gpu_exits_2_in_one_line_before_writing(tree, tmp_path, capsys):
    train, val = tree
    out = tmp_path / "out"
    overrides = [o for o in tiny_overrides(train, val, 3, 1) if o != "train.device=cpu"]
    code = run_train(["--config", DEMO, "--out", str(out), "--set", *overrides, "train.device=cuda"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("alexnet-train: error: train.device: cuda") and "no usable CUDA device" in err
    assert "Traceback" not in err and not out.exists()
    from alexnet_train.device import cuda_problem

    assert cuda_problem() in err  # what torch itself reported


@no_cuda
def test_train_device_auto_says_it_chose_the_cpu_and_why(tree, tmp_path, capsys):
    train, val = tree
    overrides = [o for o in tiny_overrides(train, val, 3, 1) if o != "train.device=cpu"]
    assert run_train(["--config", DEMO, "--out", str(tmp_path / "out"), "--set", *overrides,
                      "train.device=auto"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("device: ")]
    assert len(lines) == 1 and lines[0].startswith("device: cpu: no CUDA device (") and lines[0].endswith(")")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.cuda
def test_train_device_auto_names_the_gpu_it_chose(tree, tmp_path, capsys):
    train, val = tree
    overrides = [o for o in tiny_overrides(train, val, 3, 1) if o != "train.device=cpu"]
    assert run_train(["--config", DEMO, "--out", str(tmp_path / "out"), "--set", *overrides,
                      "train.device=auto"]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("device: "))
    assert line.startswith("device: cuda:0 ") and torch.cuda.get_device_name(0) in line


@no_cuda
def test_eval_device_cuda_without_a_gpu_exits_2_with_torchs_reason(trained, capsys):
    from alexnet_train.cli import eval_main
    from alexnet_train.device import cuda_problem

    path, val = trained
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        eval_main([str(path), "--data", str(val), "--device", "cuda"])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and len(err.splitlines()) == 1
    assert err.startswith("alexnet-eval: error: --device: cuda, but there is no usable CUDA device") and cuda_problem() in err


def _poison_the_allocator(shapes: list[torch.Size]) -> None:
    """Leave freed NaN-filled blocks of ``shapes`` behind, as a training step's temporaries do,
    so that memory a kernel reads without writing holds garbage here, not fresh zero pages."""
    for _ in range(4):
        junk = [torch.full(shape, float("nan")) for shape in shapes]
        del junk


def test_fused_sgd_after_an_fp16_overflow_at_step_1_takes_stock_sgds_step_2():
    """GradScaler skips a step whose gradients overflowed (likely at the first steps of fp16).
    The fused SGD kernel (alexnet-train's on CUDA) then once kept uninitialised momentum
    buffers, and step 2 moved the weights by that garbage."""
    import copy

    import torch.nn.functional as F

    from alexnet_train.optim import build_sgd

    cfg = load_config(DEMO, ["model.arch=custom", "model.conv_widths=[8,16,16,16,16]", "model.fc_widths=[32,32]",
                             "model.num_classes=3", "model.init=kaiming"])
    torch.manual_seed(0)
    fused_model = build_model(cfg.model)
    stock_model = copy.deepcopy(fused_model)
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2, 0])
    for model, fused in ((fused_model, True), (stock_model, False)):
        model.eval()  # no dropout: both models see the same function
        opt = build_sgd(model, cfg.optim, fused=fused)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
        for step in (1, 2):
            opt.zero_grad(set_to_none=True)
            scaler.scale(F.cross_entropy(model(x), y)).backward()
            if step == 1:
                for p in model.parameters():
                    p.grad.fill_(float("inf"))  # what an fp16 overflow hands the scaler
                _poison_the_allocator([p.shape for p in model.parameters()])
            scaler.step(opt)
            scaler.update()
            if step == 1:
                assert scaler.get_scale() == 2.0 ** 15  # the step was skipped, the scale halved
                for p in model.parameters():
                    assert torch.equal(opt.state[p]["momentum_buffer"], torch.zeros_like(p))
    for a, b in zip(fused_model.parameters(), stock_model.parameters()):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_amp_auto_takes_bf16_only_where_the_gpu_has_it_natively(monkeypatch):
    """torch's is_bf16_supported() says yes on a V100 or T4 by default (emulated bf16, slower than
    float32); auto asks for native support, an explicit bf16 still runs where it is emulated."""
    from alexnet_train.precision import amp_dtype

    asked = []

    def emulated_only(including_emulation: bool = True) -> bool:
        asked.append(including_emulation)
        return including_emulation

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", emulated_only)
    cuda = torch.device("cuda")
    assert amp_dtype("auto", cuda, print) is None and asked == [False]
    assert amp_dtype("bf16", cuda, print) is torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert amp_dtype("auto", cuda, print) is torch.bfloat16
    assert amp_dtype("auto", torch.device("cpu"), print) is None
