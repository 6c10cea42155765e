"""AlexNet variants, their initialisations, and a layer-by-layer summary.

Usage::

    model = build_model(cfg.model)               # paper / torchvision / custom
    print(format_summary(layer_summary(model)))  # shapes, params, MACs at 224x224

All variants share torchvision's module layout (``features`` / ``avgpool`` /
``classifier``), so a ``torchvision`` arch state_dict loads with ``strict=True``
into ``torchvision.models.alexnet(num_classes=N)``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .lrn import lrn

# The paper's response normalisation: b = a / (k + alpha * sum_{n neighbours} a^2)^beta.
# torch.nn.LocalResponseNorm divides alpha by the window size, so it gets alpha * n.
LRN_SIZE, LRN_ALPHA, LRN_BETA, LRN_K = 5, 1e-4, 0.75, 2.0


class LocalResponseNorm(nn.LocalResponseNorm):
    """``nn.LocalResponseNorm`` computed in one pass, always squaring and summing in float32.

    Same class, same (empty) state_dict and the same formula as ``F.local_response_norm``;
    :func:`alexnet_train.lrn.lrn` computes it: Triton kernels on CUDA, a plain-torch twin
    elsewhere, each saving only the input for a closed-form backward.

    Why float32 whatever the input: under fp16 autocast the conv outputs reaching it are half
    precision, and the paper's 0-255 inputs (``data.normalize: paper``) give activations above
    256, whose squares overflow fp16: the divisor becomes inf and the output 0, silently (no
    NaN, so no guard fires).  bf16 does not overflow but loses the small ``alpha * sum`` term
    to rounding.  The result goes back in the input's dtype: it is smaller in magnitude than
    the input, so it fits wherever the input did.

    TorchScript, tracing and the exporters (``alexnet-export``) see ``F.local_response_norm``,
    which every runtime knows (ONNX's LRN op); exported models run in float32.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():  # decided when scripting: the rest is not compiled
            return F.local_response_norm(x, self.size, self.alpha, self.beta, self.k)
        if torch.jit.is_tracing() or x.dim() != 4 or _exporting():
            return F.local_response_norm(x, self.size, self.alpha, self.beta, self.k)
        return lrn(x, self.size, self.alpha, self.beta, self.k)


def _exporting() -> bool:
    """Inside ``torch.onnx.export`` or ``torch.export`` (whose graphs need standard ops)."""
    onnx = getattr(torch, "onnx", None)
    if onnx is not None and onnx.is_in_onnx_export():
        return True
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and hasattr(compiler, "is_exporting") and compiler.is_exporting())


class TowerConv2d(nn.Conv2d):
    """A grouped ``nn.Conv2d`` (same parameters, same state_dict) that runs one dense
    convolution per group on views of its one weight and concatenates the outputs.

    cuDNN's grouped kernels can run well below their dense equivalents, worst in bf16/fp16
    channels_last (pytorch/pytorch#73764, #70954); two dense convolutions of half the width
    may not.  ``model.towers: split`` builds these; ``scripts/bench_model.py --breakdown``
    says which is faster on a given GPU.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inputs = x.chunk(self.groups, dim=1)
        weights = self.weight.chunk(self.groups, dim=0)
        bias = self.bias  # a local, so TorchScript can refine its Optional
        outs: list[torch.Tensor] = []
        for i in range(self.groups):
            b = bias.chunk(self.groups, dim=0)[i] if bias is not None else None
            outs.append(F.conv2d(inputs[i], weights[i], b, self.stride, self.padding, self.dilation, 1))
        return torch.cat(outs, dim=1)


def paper_lrn() -> LocalResponseNorm:
    return LocalResponseNorm(LRN_SIZE, alpha=LRN_ALPHA * LRN_SIZE, beta=LRN_BETA, k=LRN_K)


class AlexNet(nn.Module):
    """AlexNet with configurable widths, LRN and two-tower grouping.

    ``features`` holds the five conv layers (conv1 11x11/4, conv2 5x5, conv3-5 3x3),
    ReLUs, optional LRN after conv1/conv2, and the three overlapping 3/2 max-pools;
    ``avgpool`` is an adaptive 6x6 average pool (the identity at 224 px input);
    ``classifier`` is dropout-FC6-ReLU-dropout-FC7-ReLU-FC8.
    """

    def __init__(
        self,
        num_classes: int = 1000,
        conv: tuple[int, ...] = (96, 256, 384, 384, 256),
        fc: tuple[int, ...] = (4096, 4096),
        lrn: bool = True,
        groups: int = 1,
        dropout: float = 0.5,
        towers: str = "grouped",
    ) -> None:
        super().__init__()
        c1, c2, c3, c4, c5 = conv
        # The towers' convolutions (conv2, conv4, conv5): see ModelConfig.towers.
        grouped = TowerConv2d if towers == "split" and groups > 1 else nn.Conv2d
        layers: list[nn.Module] = [nn.Conv2d(3, c1, 11, stride=4, padding=2), nn.ReLU(inplace=True)]
        if lrn:
            layers.append(paper_lrn())
        layers += [nn.MaxPool2d(3, 2), grouped(c1, c2, 5, padding=2, groups=groups), nn.ReLU(inplace=True)]
        if lrn:
            layers.append(paper_lrn())
        layers += [
            nn.MaxPool2d(3, 2),
            # conv3 is the one layer whose kernels see both towers' maps.
            nn.Conv2d(c2, c3, 3, padding=1),
            nn.ReLU(inplace=True),
            grouped(c3, c4, 3, padding=1, groups=groups),
            nn.ReLU(inplace=True),
            grouped(c4, c5, 3, padding=1, groups=groups),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2),
        ]
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        self.classifier = nn.Sequential(
            nn.Dropout(dropout),
            nn.Linear(c5 * 6 * 6, fc[0]),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(fc[0], fc[1]),
            nn.ReLU(inplace=True),
            nn.Linear(fc[1], num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        return self.classifier(torch.flatten(x, 1))

    def convs(self) -> list[nn.Conv2d]:
        return [m for m in self.features if isinstance(m, nn.Conv2d)]

    def fcs(self) -> list[nn.Linear]:
        return [m for m in self.classifier if isinstance(m, nn.Linear)]


def init_weights(model: AlexNet, scheme: str) -> None:
    """Initialise in place.

    paper: every weight N(0, 0.01); biases 1 in conv2, conv4, conv5, FC6, FC7
    (to feed the ReLUs positive inputs early, section 5 of the paper), else 0.
    caffe: bvlc_alexnet's scheme, which replaced the paper's bias 1 by 0.1
    because 1 often stalls learning: convs N(0, 0.01), FC6/FC7 N(0, 0.005),
    FC8 N(0, 0.01); biases 0.1 in conv2/4/5 and FC6/7, else 0.
    kaiming: He et al. (2015) normal init for ReLU nets, N(0, sqrt(2 / fan_in)),
    biases 0, FC8 N(0, 0.01): keeps activations at unit scale through all
    eight layers, so narrow or unnormalised-LRN variants do not stall.
    torch: leave PyTorch's default (Kaiming-uniform, a=sqrt(5)) initialisation.
    """
    if scheme == "torch":
        return
    if scheme == "kaiming":
        with torch.no_grad():
            layers = model.convs() + model.fcs()
            for layer in layers[:-1]:
                nn.init.kaiming_normal_(layer.weight, mode="fan_in", nonlinearity="relu")
                layer.bias.zero_()
            layers[-1].weight.normal_(0.0, 0.01)
            layers[-1].bias.zero_()
        return
    if scheme not in ("paper", "caffe"):
        raise ValueError(f"unknown init scheme {scheme!r}")
    one = 1.0 if scheme == "paper" else 0.1
    convs, fcs = model.convs(), model.fcs()
    conv_bias = [0.0, one, 0.0, one, one]
    fc_std = [0.01, 0.01, 0.01] if scheme == "paper" else [0.005, 0.005, 0.01]
    fc_bias = [one, one, 0.0]
    with torch.no_grad():
        for layer, bias in zip(convs, conv_bias):
            layer.weight.normal_(0.0, 0.01)
            layer.bias.fill_(bias)
        for layer, std, bias in zip(fcs, fc_std, fc_bias):
            layer.weight.normal_(0.0, std)
            layer.bias.fill_(bias)


def build_model(cfg: ModelConfig) -> AlexNet:
    conv, fc, lrn = cfg.widths()
    model = AlexNet(cfg.num_classes, conv, fc, lrn, cfg.effective_groups, cfg.dropout, cfg.towers)
    init_weights(model, cfg.init)
    return model


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@dataclass(frozen=True)
class LayerRow:
    name: str
    kind: str
    shape: tuple[int, ...]
    params: int
    macs: int


def _macs(module: nn.Module, out: torch.Tensor) -> int:
    if isinstance(module, nn.Conv2d):
        per_output = (module.in_channels // module.groups) * module.kernel_size[0] * module.kernel_size[1]
        return out.numel() * per_output
    if isinstance(module, nn.Linear):
        return module.in_features * module.out_features
    return 0


def layer_summary(model: nn.Module, input_size: int = 224) -> list[LayerRow]:
    """One row per leaf module: output shape (no batch dim), params, MACs for one image."""
    rows: list[LayerRow] = []
    hooks = []
    for name, module in model.named_modules():
        if list(module.children()):
            continue

        def hook(mod: nn.Module, _inp, out: torch.Tensor, name: str = name) -> None:
            params = sum(p.numel() for p in mod.parameters(recurse=False))
            rows.append(LayerRow(name, type(mod).__name__, tuple(out.shape[1:]), params, _macs(mod, out)))

        hooks.append(module.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, input_size, input_size))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return rows


def format_summary(rows: list[LayerRow], title: str = "") -> str:
    lines = [title] if title else []
    header = f"{'layer':<16}{'type':<20}{'output':>16}{'params':>14}{'MACs':>16}"
    lines += [header, "-" * len(header)]
    for r in rows:
        shape = "x".join(str(d) for d in r.shape)
        lines.append(f"{r.name:<16}{r.kind:<20}{shape:>16}{r.params:>14,}{r.macs:>16,}")
    lines.append("-" * len(header))
    total_p = sum(r.params for r in rows)
    total_m = sum(r.macs for r in rows)
    lines.append(f"{'total':<36}{'':>16}{total_p:>14,}{total_m:>16,}")
    lines.append(f"parameters: {total_p:,} ({total_p / 1e6:.2f} M); multiply-accumulates: {total_m / 1e9:.3f} G per image")
    return "\n".join(lines)
