"""The one-pass LRN (alexnet_train.lrn): equal to F.local_response_norm in value and gradient, in
every layout and dtype the model feeds it; its Triton kernels run here under Triton's interpreter;
exports and checkpoints written before it behave as they did."""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from alexnet_train.cli import eval_main
from alexnet_train.lrn import lrn, window_sum
from alexnet_train.model import LocalResponseNorm, paper_lrn

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "fixtures" / "before_fused_lrn"
SIZE, ALPHA, BETA, K = 5, 5e-4, 0.75, 2.0  # paper_lrn()'s, as nn.LocalResponseNorm takes them

# (channels, height, width) after conv1 and conv2 at the paper's widths, spatially cut to keep
# the tests fast (the channel window is what matters), and a layer with fewer channels than the window.
SHAPES = {"conv1": (96, 55, 55), "conv2": (256, 27, 27), "narrow": (3, 6, 6), "one": (1, 4, 4)}


def activations(shape, dtype=torch.float32, batch=2, seed=0, channels_last=False):
    """Post-ReLU-like activations on the 0-255 input's scale (up to a few hundred), some zeros."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(batch, *shape, generator=g, dtype=torch.float64) * 120).clamp_min(-20).to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def reference(x, g, size=SIZE):
    """F.local_response_norm's output and input gradient, computed in x's dtype."""
    xr = x.detach().clone().requires_grad_()
    y = F.local_response_norm(xr, size, ALPHA, BETA, K)
    (dx,) = torch.autograd.grad(y, xr, g)
    return y.detach(), dx


def ours(x, g, size=SIZE, **kw):
    xo = x.detach().clone().requires_grad_()
    y = lrn(xo, size, ALPHA, BETA, K, **kw)
    (dx,) = torch.autograd.grad(y, xo, g)
    return y.detach(), dx


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("layer", list(SHAPES))
@pytest.mark.parametrize("channels_last", [False, True])
def test_equals_f_local_response_norm_in_value_and_input_gradient(dtype, layer, channels_last):
    x = activations(SHAPES[layer], dtype, channels_last=channels_last)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=dtype)
    want_y, want_dx = reference(x, g)
    got_y, got_dx = ours(x, g)
    assert got_y.dtype == dtype and got_dx.dtype == dtype
    torch.testing.assert_close(got_y, want_y, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_dx, want_dx, rtol=1e-5, atol=1e-6 * float(want_dx.abs().max()))
    if channels_last and SHAPES[layer][0] > 1:
        assert got_y.is_contiguous(memory_format=torch.channels_last)  # no transposing copy


@pytest.mark.parametrize("size", [1, 2, 4, 5, 7])
def test_any_window_size_even_ones_whose_window_is_lopsided(size):
    x = activations((9, 3, 3), torch.float64)
    g = torch.randn(x.shape, dtype=torch.float64)
    want_y, want_dx = reference(x, g, size)
    got_y, got_dx = ours(x, g, size)
    torch.testing.assert_close(got_y, want_y, rtol=1e-12, atol=0)
    torch.testing.assert_close(got_dx, want_dx, rtol=1e-10, atol=1e-14)


def bf16_order(t: torch.Tensor) -> torch.Tensor:
    """bf16 values as integers in their order: neighbours differ by 1 (one unit in the last place)."""
    bits = t.view(torch.int16).to(torch.int32)
    return torch.where(bits < 0, -(bits & 0x7FFF), bits)


@pytest.mark.parametrize("channels_last", [False, True])
def test_bf16_output_is_within_one_unit_in_the_last_place_of_the_float32_result(channels_last):
    x = activations(SHAPES["conv2"], torch.bfloat16, channels_last=channels_last)
    want = F.local_response_norm(x.float(), SIZE, ALPHA, BETA, K).to(torch.bfloat16)
    got = lrn(x, SIZE, ALPHA, BETA, K)
    assert got.dtype == torch.bfloat16
    assert int((bf16_order(got) - bf16_order(want)).abs().max()) <= 1


def test_fp16_squares_never_overflow():
    x = activations(SHAPES["conv1"], torch.float16) * 4  # activations above 256: x**2 > fp16's 65504
    assert float(x.float().max()) > 256
    got = lrn(x, SIZE, ALPHA, BETA, K)
    want = F.local_response_norm(x.float(), SIZE, ALPHA, BETA, K)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.float(), want, rtol=1e-3, atol=1e-3)


def test_gradcheck_in_float64():
    x = (torch.randn(2, 7, 3, 3, dtype=torch.float64) * 40).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: lrn(t, SIZE, ALPHA, BETA, K), (x,))


def test_backward_saves_only_the_input():
    x = activations(SHAPES["conv2"]).requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        lrn(x, SIZE, ALPHA, BETA, K).sum().backward()
    assert len(saved) == 1 and saved[0] is x
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        F.local_response_norm(x, SIZE, ALPHA, BETA, K).sum()
    assert len(saved) > 1  # what it replaces kept several


def test_window_sum_is_the_padded_channel_sum():
    sq = torch.arange(2 * 6 * 2 * 2, dtype=torch.float64).view(2, 6, 2, 2)
    padded = F.pad(sq, (0, 0, 0, 0, 2, 1))
    want = sum(padded[:, i:i + 6] for i in range(4))
    assert torch.equal(window_sum(sq, 2, 1), want)


def test_bad_arguments_are_one_clear_error():
    with pytest.raises(ValueError, match="2\\+ dimensions"):
        lrn(torch.ones(3), SIZE)
    with pytest.raises(ValueError, match="size must be >= 1"):
        lrn(torch.ones(1, 3, 2, 2), 0)


# --------------------------------------------------------------------------- the module


def test_the_module_keeps_its_class_and_its_empty_state_dict():
    m = paper_lrn()
    assert isinstance(m, LocalResponseNorm) and isinstance(m, torch.nn.LocalResponseNorm)
    assert m.state_dict() == {}
    assert (m.size, m.alpha, m.beta, m.k) == (SIZE, ALPHA, BETA, K)


def test_torchscript_and_tracing_get_the_standard_lrn():
    m = paper_lrn()
    x = activations(SHAPES["conv2"])
    with torch.no_grad():
        eager = m(x)
        scripted = torch.jit.script(torch.nn.Sequential(m))(x)
        traced = torch.jit.trace(m, x)
    assert "avg_pool3d" in str(traced.graph)  # F.local_response_norm's ops, which every runtime knows
    assert torch.equal(scripted, F.local_response_norm(x, SIZE, ALPHA, BETA, K))
    torch.testing.assert_close(scripted, eager, rtol=1e-5, atol=1e-6)


def test_autocast_gives_a_half_tensor_the_float32_computation():
    m = paper_lrn()
    x = activations(SHAPES["conv1"]) * 3
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    want = F.local_response_norm(x.to(torch.bfloat16).float(), SIZE, ALPHA, BETA, K).to(torch.bfloat16)
    assert int((bf16_order(out) - bf16_order(want)).abs().max()) <= 1


# --------------------------------------------------------------------------- the Triton kernels

TRITON_CHECK = r"""
import sys, torch, torch.nn.functional as F
from alexnet_train.lrn import lrn
SIZE, ALPHA, BETA, K = 5, 5e-4, 0.75, 2.0
worst = {}
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    for shape in ((2, 96, 7, 7), (2, 256, 3, 3), (2, 3, 4, 4), (1, 1, 2, 2)):
        for cl in (False, True):
            for size in (SIZE, 4):
                g0 = torch.Generator().manual_seed(0)
                x = (torch.randn(shape, generator=g0) * 120).clamp_min(-20)
                g = torch.randn(shape, generator=g0)
                xq = x.to(dtype)
                if cl:
                    xq = xq.contiguous(memory_format=torch.channels_last)
                xr = xq.float().requires_grad_()
                want = F.local_response_norm(xr, size, ALPHA, BETA, K)
                (want_dx,) = torch.autograd.grad(want, xr, g)
                xo = xq.detach().requires_grad_()
                got = lrn(xo, size, ALPHA, BETA, K, use_triton=True)
                (got_dx,) = torch.autograd.grad(got, xo, g.to(dtype))
                assert got.dtype == dtype and got_dx.dtype == dtype
                if cl and shape[1] > 1:
                    assert got.is_contiguous(memory_format=torch.channels_last)
                    assert got_dx.is_contiguous(memory_format=torch.channels_last)
                if dtype == torch.float32:
                    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
                    torch.testing.assert_close(got_dx, want_dx, rtol=1e-5, atol=1e-6 * float(want_dx.abs().max()))
                else:  # the float32 result rounded once: within one unit in the last place
                    torch.testing.assert_close(got.float(), want.to(dtype).float(), rtol=2 ** -7, atol=0)
                    torch.testing.assert_close(got_dx.float(), want_dx.to(dtype).float(), rtol=2 ** -7,
                                               atol=2 ** -7 * float(want_dx.abs().max()))
print("triton kernels ok")
"""


def test_triton_kernels_equal_f_local_response_norm_under_the_interpreter():
    """The CUDA kernels' code, run on the CPU by Triton's interpreter (TRITON_INTERPRET=1, which
    must be set before Triton is imported: a process of its own)."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", TRITON_CHECK], env=env, capture_output=True, text=True,
                          timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "triton kernels ok" in done.stdout


@pytest.mark.cuda
@pytest.mark.guard
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layer", ["conv1", "conv2", "narrow"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_cuda_lrn_equals_f_local_response_norm(dtype, layer, channels_last):
    """On a GPU the module runs the Triton kernels: the same equalities as on the CPU, at batch 8."""
    from alexnet_train.lrn import triton_usable

    x = activations(SHAPES[layer], dtype, batch=8, channels_last=channels_last).cuda()
    assert triton_usable(x)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(dtype).cuda()
    xr = x.float().requires_grad_()
    want = F.local_response_norm(xr, SIZE, ALPHA, BETA, K)
    (want_dx,) = torch.autograd.grad(want, xr, g.float())
    got, got_dx = ours(x, g)
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got_dx, want_dx, rtol=1e-5, atol=1e-6 * float(want_dx.abs().max()))
    else:
        torch.testing.assert_close(got.float(), want.to(dtype).float(), rtol=2 ** -7, atol=0)
        torch.testing.assert_close(got_dx.float(), want_dx.to(dtype).float(), rtol=2 ** -7,
                                   atol=2 ** -7 * float(want_dx.abs().max()))
    if channels_last and SHAPES[layer][0] > 1:
        assert got.is_contiguous(memory_format=torch.channels_last)


# --------------------------------------------------------------------------- checkpoints from before


def test_a_checkpoint_written_before_the_fused_lrn_evaluates_as_it_did(tmp_path, monkeypatch):
    """The fixture's checkpoint, written and evaluated by the code that used F.local_response_norm
    (tests/fixtures/before_fused_lrn/README.md), evaluated by today's alexnet-eval."""
    # A copy: evaluating writes the folder's index beside it, and the repository is no place for it.
    here = tmp_path / "fixture"
    shutil.copytree(FIXTURE, here)
    monkeypatch.chdir(here)  # the old run's prediction paths are relative to this folder
    out, preds = tmp_path / "eval.json", tmp_path / "pred.csv"
    assert eval_main(["checkpoint.pth", "--data", "val", "--ten-crop", "--json", str(out), "--device", "cpu",
                      "--workers", "0", "--predictions", str(preds)]) in (0, None)
    got, want = json.loads(out.read_text()), json.loads((FIXTURE / "eval.json").read_text())
    for mode in ("center", "ten_crop"):
        assert got[mode]["images"] == want[mode]["images"] == 6
        assert got[mode]["top1"] == want[mode]["top1"] and got[mode]["top5"] == want[mode]["top5"]
        assert got[mode]["loss"] == pytest.approx(want[mode]["loss"], rel=1e-5)
    # Each image's top-1 as before (the lower ranks of this barely trained model hold near-ties
    # that float32's order of summation may swap).
    with open(preds) as a, open(FIXTURE / "predictions.csv") as b:
        assert [row[:3] for row in csv.reader(a)] == [row[:3] for row in csv.reader(b)]


@pytest.mark.slow
def test_under_torch_compile_the_lrn_is_the_same_function():
    """train.compile: Inductor compiles the torch formulation (the Triton launch is skipped while
    tracing); value and gradient as eager."""
    x = activations(SHAPES["narrow"], batch=2).requires_grad_()
    compiled = torch.compile(lambda t: lrn(t, SIZE, ALPHA, BETA, K))
    y = compiled(x)
    (dx,) = torch.autograd.grad(y.sum(), x)
    want_y, want_dx = reference(x, torch.ones_like(x))
    torch.testing.assert_close(y.detach(), want_y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx, want_dx, rtol=1e-5, atol=1e-6)
