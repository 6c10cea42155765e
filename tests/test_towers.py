"""model.towers: split runs the towers as dense convolutions on views of the one weight; the same
state_dict, the same outputs and gradients as groups=G, in TorchScript too."""
from __future__ import annotations

import pytest
import torch

from alexnet_train.config import ModelConfig
from alexnet_train.configload import load_config
from alexnet_train.model import TowerConv2d, build_model

from .conftest import DEMO_CONFIG

WIDTHS = dict(arch="custom", num_classes=5, conv_widths=(8, 16, 16, 16, 16), fc_widths=(32, 32), groups=2)


def pair(dtype=torch.float64):
    torch.manual_seed(0)
    grouped = build_model(ModelConfig(**WIDTHS)).to(dtype)
    split = build_model(ModelConfig(**WIDTHS, towers="split")).to(dtype)
    split.load_state_dict(grouped.state_dict(), strict=True)
    return grouped.eval(), split.eval()


def test_split_towers_have_the_grouped_models_state_dict():
    grouped, split = pair()
    a, b = grouped.state_dict(), split.state_dict()
    assert list(a) == list(b) and all(a[k].shape == b[k].shape for k in a)
    towers = [m for m in split.modules() if isinstance(m, TowerConv2d)]
    assert len(towers) == 3 and all(m.groups == 2 for m in towers)  # conv2, conv4, conv5
    assert not any(isinstance(m, TowerConv2d) for m in grouped.modules())


@pytest.mark.parametrize("channels_last", [False, True])
def test_split_towers_compute_what_grouped_convolutions_do(channels_last):
    grouped, split = pair()
    x = torch.randn(3, 3, 67, 67, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        grouped, split = (m.to(memory_format=torch.channels_last) for m in (grouped, split))
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = grouped(xa), split(xb)
    torch.testing.assert_close(yb, ya, rtol=1e-10, atol=1e-12)
    ya.sum().backward()
    yb.sum().backward()
    torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-10, atol=1e-12)
    for (name, pa), (_, pb) in zip(grouped.named_parameters(), split.named_parameters()):
        torch.testing.assert_close(pb.grad, pa.grad, rtol=1e-10, atol=1e-12, msg=name)


def test_split_towers_script_and_match():
    _, split = pair(torch.float32)
    scripted = torch.jit.script(split)
    x = torch.randn(2, 3, 67, 67)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), split(x), rtol=1e-5, atol=1e-5)


def test_towers_is_a_config_key_that_torchvision_ignores_with_a_notice():
    cfg = load_config(DEMO_CONFIG, ["model.arch=paper", "model.towers=split", "model.groups=2"])
    assert cfg.model.towers == "split"
    tv = load_config(DEMO_CONFIG, ["model.arch=torchvision", "model.towers=split"])
    assert "model.towers" in tv.model.ignored_keys()
