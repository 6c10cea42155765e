"""AlexNet variants: parameter counts, torchvision compatibility, towers, LRN, inits, summary."""
from __future__ import annotations

import pytest
import torch
import torchvision

from alexnet_train.config import ModelConfig
from alexnet_train.model import (
    AlexNet,
    build_model,
    count_params,
    format_summary,
    layer_summary,
    paper_lrn,
)


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        (dict(arch="paper", groups=2), 60_965_224),
        (dict(arch="paper", groups=1), 62_378_344),
        (dict(arch="torchvision", init="torch"), 61_100_840),
        (dict(arch="custom", conv_widths=(48, 128, 192, 192, 128), groups=1), None),
    ],
)
def test_parameter_counts(kwargs, expected):
    model = build_model(ModelConfig(**kwargs))
    if expected is not None:
        assert count_params(model) == expected
    else:  # the 48-128-192-192-128 variant: count from the layer formulas
        conv = 3 * 48 * 121 + 48 + 48 * 128 * 25 + 128 + 128 * 192 * 9 + 192 + 192 * 192 * 9 + 192 + 192 * 128 * 9 + 128
        fc = 128 * 36 * 4096 + 4096 + 4096 * 4096 + 4096 + 4096 * 1000 + 1000
        assert count_params(model) == conv + fc


def test_torchvision_arch_is_exactly_torchvisions_alexnet():
    ours = build_model(ModelConfig(arch="torchvision", num_classes=10, init="torch"))
    ref = torchvision.models.alexnet(num_classes=10)
    ref.load_state_dict(ours.state_dict(), strict=True)
    ours.eval(), ref.eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x))


def test_two_towers_keep_conv2_halves_apart():
    model = build_model(ModelConfig(arch="paper", groups=2, num_classes=10)).eval()
    conv1, conv2 = model.features[0], model.features[4]
    assert conv2.groups == 2 and model.features[8].groups == 1  # conv3 sees both towers
    assert model.features[10].groups == 2 and model.features[12].groups == 2
    x = torch.randn(1, 96, 27, 27)
    y = conv2(x)
    x2 = x.clone()
    x2[:, 48:] += torch.randn_like(x2[:, 48:])  # change only tower B's input maps
    y2 = conv2(x2)
    torch.testing.assert_close(y[:, :128], y2[:, :128])  # tower A's output is untouched
    assert not torch.allclose(y[:, 128:], y2[:, 128:])
    assert conv1.out_channels == 96


def test_lrn_follows_the_papers_formula():
    a = torch.rand(2, 12, 5, 5) * 30
    b = paper_lrn()(a)
    # b_i = a_i / (k + alpha * sum_{j=max(0,i-n/2)}^{min(N-1,i+n/2)} a_j^2)^beta, k=2, n=5, alpha=1e-4, beta=0.75
    expected = torch.empty_like(a)
    for i in range(12):
        lo, hi = max(0, i - 2), min(11, i + 2)
        s = (a[:, lo : hi + 1] ** 2).sum(dim=1)
        expected[:, i] = a[:, i] / (2.0 + 1e-4 * s) ** 0.75
    torch.testing.assert_close(b, expected)


def test_paper_init_statistics_and_biases():
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="paper", groups=2, init="paper"))
    convs, fcs = model.convs(), model.fcs()
    for layer in convs + fcs:
        assert layer.weight.std().item() == pytest.approx(0.01, rel=0.05)
        assert abs(layer.weight.mean().item()) < 1e-3
    assert [c.bias.unique().tolist() for c in convs] == [[0.0], [1.0], [0.0], [1.0], [1.0]]
    assert [f.bias.unique().tolist() for f in fcs] == [[1.0], [1.0], [0.0]]


def test_caffe_and_kaiming_inits():
    torch.manual_seed(0)
    caffe = build_model(ModelConfig(arch="paper", init="caffe"))
    biases = [c.bias.unique().tolist() for c in caffe.convs()]
    assert [len(b) for b in biases] == [1] * 5
    assert [b[0] for b in biases] == pytest.approx([0.0, 0.1, 0.0, 0.1, 0.1])
    assert caffe.fcs()[0].weight.std().item() == pytest.approx(0.005, rel=0.05)
    assert caffe.fcs()[2].weight.std().item() == pytest.approx(0.01, rel=0.05)
    kaiming = build_model(ModelConfig(arch="paper", init="kaiming"))
    conv3 = kaiming.convs()[2]
    fan_in = conv3.in_channels * 9
    assert conv3.weight.std().item() == pytest.approx((2.0 / fan_in) ** 0.5, rel=0.05)
    torch_default = build_model(ModelConfig(arch="paper", init="torch"))
    assert torch_default.convs()[1].bias.abs().max().item() < 0.1  # PyTorch's uniform, not 1


def test_summary_rows_at_224():
    rows = layer_summary(build_model(ModelConfig(arch="paper", groups=2)))
    by_name = {r.name: r for r in rows}
    assert by_name["features.0"].shape == (96, 55, 55)
    assert by_name["features.0"].macs == 96 * 55 * 55 * 3 * 11 * 11
    assert by_name["features.4"].macs == 256 * 27 * 27 * 48 * 25  # grouped: half the input maps
    assert by_name["features.14"].shape == (256, 6, 6)
    assert by_name["classifier.6"].shape == (1000,)
    assert sum(r.params for r in rows) == 60_965_224
    text = format_summary(rows, "paper")
    assert "60,965,224" in text and "256x6x6" in text


def test_small_inputs_still_reach_the_classifier():
    model = AlexNet(num_classes=5, conv=(8, 16, 16, 16, 16), fc=(32, 32), groups=2).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 5)
