"""Export a checkpoint for serving, and predict the classes of images.

Usage::

    paths = export_model("runs/paper/best.pth", "export/")     # model.pt, model.json, ...
    preds = predict("runs/paper/best.pth", ["cat.jpg"], synsets="synset_words.txt")
    print(format_predictions(preds))

``CHECKPOINT`` is ours or a plain torchvision AlexNet state_dict (see
:mod:`alexnet_train.inference`).  ``export_model`` writes into ``OUT``:

``model.pt``
    TorchScript (``torch.jit.load``; no Python class needed) of the network *with its
    input normalisation inside*: it takes RGB pixels on the 0-255 scale, float32 (uint8
    also works), NCHW, ``crop_size`` square, i.e. the image after the resize and centre
    crop that ``model.json`` describes, and returns logits ``(N, num_classes)``.
``model.pt2``
    Only where TorchScript cannot be written (see ``_torchscript``): the same wrapped
    network as a ``torch.export`` program (``torch.export.load(path).module()``).
``model.onnx``
    The same wrapped network (float32 input ``image``, output ``logits``, dynamic batch),
    where the ``onnx`` package is installed; otherwise a log line says how to get it.
``torchvision_state_dict.pth``
    arch ``torchvision`` only: the bare network's weights, which load with
    ``strict=True`` into ``torchvision.models.alexnet(num_classes=N)``.  Like every
    torchvision state_dict it expects *normalised* input; ``model.json`` gives the values.
``model.json``
    arch, classes (wnids, index order of the logits), preprocessing and what each file takes.

Why the normalisation lives in the exported graphs: our checkpoints normalise in two
ways (``normalize: paper`` subtracts the mean pixel only, ``torchvision`` also divides by
the std), so a bare network would leave every consumer to read ``model.json`` and get that
choice right, and a wrong guess still gives plausible-looking logits.  With the
normalisation inside, every exported model takes the same input (0-255 RGB), and it is
exact: the graph computes ``(x - mean) * (1 / std)`` as :class:`BatchPreprocess` does.
The torchvision state_dict is the exception, since its consumers build torchvision's model
and bring torchvision's ``Normalize``.
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import torch
from torch import nn

from . import checkpoint as ckpt
from .config import DataConfig
from .inference import Loaded, load_for_inference
from .errors import ExportError, first_line

EXPORT_FORMAT = 1
PREDICT_BATCH = 32  # images per forward pass in predict(): bounds memory for long image lists
# An export is checked against the eager model on a random batch; float32 differences
# between two runs of the same kernels are 0, this allows for a different op order.
CHECK_ATOL = 1e-4


# --------------------------------------------------------------------------- export


class InputNormalized(nn.Module):
    """``net((x - mean) * inv_std)`` with ``x`` RGB on the 0-255 scale, NCHW; what every export holds."""

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        # The reciprocal, as BatchPreprocess computes it, so exported logits equal the eager ones bit for bit.
        self.register_buffer("inv_std", (1.0 / torch.tensor(std, dtype=torch.float32)).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x.to(torch.float32) - self.mean) * self.inv_std)


def effective_std(data: DataConfig) -> tuple[float, float, float]:
    """The std the model's input is divided by (0-255 scale): 1 for ``normalize: paper``."""
    return tuple(float(s) for s in data.std) if data.normalize == "torchvision" else (1.0, 1.0, 1.0)


def _write(path: Path, write: Callable[[io.BufferedWriter], None]) -> Path:
    try:
        ckpt.atomic_write_bytes(path, write)
    except OSError as exc:
        raise ExportError(f"{path}: cannot write ({exc.strerror or exc})") from None
    return path


def _check_same(path: Path, got: torch.Tensor, want: torch.Tensor) -> None:
    diff = (got - want).abs().max().item()
    if not diff <= CHECK_ATOL:  # also catches NaN
        raise ExportError(f"{path}: the exported model's logits differ from the checkpoint's by {diff:.3g}")


def _torchscript(wrapped: nn.Module, example: torch.Tensor, out: Path, log: Callable[[str], None]) -> Path:
    """model.pt (TorchScript), or model.pt2 (torch.export) where TorchScript fails.

    ``torch.jit.script`` rather than ``trace``: it needs no example input and bakes no
    shapes or eval-mode branches into the graph from one run; AlexNet scripts as is.
    Under torch 2.15 ``torch.jit.script/save/load`` still work but emit a
    DeprecationWarning ("switch to torch.compile or torch.export"); TorchScript remains
    what C++ (libtorch), Triton and TorchServe load, so we write it and silence the warning.
    Where scripting or saving raises (a torch whose TorchScript is gone or errors), the
    same module goes through ``torch.export`` into ``model.pt2`` with a dynamic batch size.
    Either file is loaded back and must reproduce the eager logits.
    """
    with torch.no_grad():
        want = wrapped(example)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
            scripted = torch.jit.script(wrapped)
            buf = io.BytesIO()
            torch.jit.save(scripted, buf)
            buf.seek(0)
            reloaded = torch.jit.load(buf, map_location="cpu")
            with torch.no_grad():
                got = reloaded(example)
    except Exception as exc:  # noqa: BLE001 - any TorchScript failure sends us to torch.export
        log(f"TorchScript unavailable ({first_line(exc, with_type=True)}); writing a torch.export program (model.pt2) instead")
    else:
        path = out / "model.pt"
        _check_same(path, got, want)
        return _write(path, lambda fh: fh.write(buf.getvalue()))

    path = out / "model.pt2"
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(wrapped, (example,), dynamic_shapes={"x": {0: batch}})
    buf = io.BytesIO()
    torch.export.save(program, buf)
    buf.seek(0)
    with torch.no_grad():
        got = torch.export.load(buf).module()(example)
    _check_same(path, got, want)
    return _write(path, lambda fh: fh.write(buf.getvalue()))


class MatrixAdaptivePool(nn.Module):
    """AdaptiveAvgPool2d((out, out)) on a fixed ``size`` x ``size`` input, as ``P @ x @ P.T``.

    torch.onnx's TorchScript-based exporter refuses adaptive pooling unless the input
    size is a multiple of the output size: at 224-227 px crops conv5 gives 6x6 (an
    identity, exported), but a 64 px crop gives 1x1 and 128 px 3x3.  The ONNX model takes a
    fixed crop anyway, so the pool becomes two matrix products with the same windows
    (rows of ``P`` average ``floor(i*s/out) .. ceil((i+1)*s/out)``): exact for 1x1 and
    identity, equal to float rounding otherwise.
    """

    def __init__(self, size: int, out: int) -> None:
        super().__init__()
        p = torch.zeros(out, size)
        for i in range(out):
            lo, hi = (i * size) // out, -(-((i + 1) * size) // out)
            p[i, lo:hi] = 1.0 / (hi - lo)
        self.register_buffer("p", p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.matmul(torch.matmul(self.p, x), self.p.t())


@contextlib.contextmanager
def _quiet_stderr():
    """Silence file descriptor 2: torch.onnx's C++ side prints the whole graph on a failed export."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _onnx(wrapped: InputNormalized, example: torch.Tensor, out: Path, log: Callable[[str], None]) -> Path | None:
    """model.onnx where the ``onnx`` package is installed; None (and a log line why) otherwise.

    torch.onnx needs the ``onnx`` package for either exporter: the TorchScript-based one
    (``dynamo=False``, which warns that it will be removed) needs only ``onnx``; the
    default torch.export-based one also needs ``onnxscript``.  Neither is a dependency of
    alexnet-train.  We try ``dynamo=False`` first (fewest requirements, LRN maps to ONNX's
    LRN op, opset 20 under torch 2.15), then the dynamo exporter where ``onnxscript`` is
    present.  A failure here never fails the export: model.pt is the primary artefact.
    """
    if importlib.util.find_spec("onnx") is None:
        log("model.onnx skipped: torch.onnx needs the onnx package (pip install onnx)")
        return None
    path = out / "model.onnx"
    net = wrapped.net
    with torch.no_grad():
        want = wrapped(example)
        size = net.features(wrapped.mean.new_zeros(example.shape)).shape[-1]
    pool = net.avgpool
    target = pool.output_size[0] if isinstance(pool.output_size, tuple) else pool.output_size
    kwargs = dict(input_names=["image"], output_names=["logits"],
                  dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}})
    attempts = [False] + ([True] if importlib.util.find_spec("onnxscript") is not None else [])
    errors = []
    try:
        if size % target:
            net.avgpool = MatrixAdaptivePool(size, target)
            with torch.no_grad():
                diff = (wrapped(example) - want).abs().max().item()
            if not diff <= CHECK_ATOL:
                attempts, errors = [], [f"the ONNX-friendly pooling differs by {diff:.3g}"]
        for dynamo in attempts:
            buf = io.BytesIO()
            try:
                with warnings.catch_warnings(), _quiet_stderr():
                    # "legacy TorchScript-based ONNX export" / "will be removed": known, and it still works.
                    warnings.simplefilter("ignore")
                    torch.onnx.export(wrapped, (example,), buf, dynamo=dynamo, **kwargs)
            except Exception as exc:  # noqa: BLE001 - report why and go on without ONNX
                errors.append(first_line(exc, with_type=True))
                continue
            return _write(path, lambda fh: fh.write(buf.getvalue()))
    finally:
        net.avgpool = pool
    log(f"model.onnx skipped: torch.onnx.export failed ({'; '.join(errors)})")
    return None


def _torchvision_state_dict(model: nn.Module, num_classes: int, out: Path) -> Path:
    """torchvision_state_dict.pth, after checking keys and shapes against torchvision's AlexNet."""
    import torchvision

    with torch.device("meta"):  # no weights allocated or initialised
        reference = torchvision.models.alexnet(weights=None, num_classes=num_classes).state_dict()
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    wrong = sorted(set(reference) ^ set(state)) or [k for k in reference if reference[k].shape != state[k].shape]
    path = out / "torchvision_state_dict.pth"
    if wrong:
        raise ExportError(f"{path}: the model does not match torchvision's AlexNet ({wrong[0]})")
    try:
        ckpt.save_state_dict(state, path)
    except OSError as exc:
        raise ExportError(f"{path}: cannot write ({exc.strerror or exc})") from None
    return path


def _output_dir(out_dir: str) -> Path:
    """OUT as a Path, created with its parents if needed; ExportError if it cannot be."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ExportError(f"{out}: cannot create the output directory ({exc.strerror or exc})") from None
    return out


def _file_notes(written: list[Path], arch: str, input_text: str) -> dict:
    """model.json's ``files``: format, input and normalisation of each written model file."""
    files = {p.name: {"format": {".pt": "TorchScript (torch.jit.load)",
                                 ".pt2": "torch.export (torch.export.load(path).module())",
                                 ".onnx": "ONNX"}.get(p.suffix, ""),
                      "input": input_text + (", uint8 also accepted" if p.suffix == ".pt" else ""),
                      "normalization": "inside the model"}
             for p in written if p.suffix in (".pt", ".pt2", ".onnx")}
    if arch == "torchvision":
        files["torchvision_state_dict.pth"] = {
            "format": "state_dict for torchvision.models.alexnet(num_classes=N), strict=True",
            "input": "normalised: (x - mean) / std with x RGB 0-255, NCHW; equivalently "
                     "transforms.Normalize(mean_0_1, std_0_1) after ToTensor()",
            "normalization": "not included",
        }
    return files


def _model_json(checkpoint: str, loaded: Loaded, arch: str, num_classes: int, mean: tuple[float, ...],
                std: tuple[float, ...], written: list[Path]) -> dict:
    """model.json's content for the model files in ``written``."""
    data = loaded.data
    input_text = f"RGB, 0-255 float32, NCHW (N, 3, {data.crop_size}, {data.crop_size})"
    files = _file_notes(written, arch, input_text)
    return {
        "format": EXPORT_FORMAT,
        "arch": arch,
        "num_classes": num_classes,
        "classes": list(loaded.classes),
        "preprocessing": {
            "decode": "RGB, EXIF orientation applied",
            "resize_size": data.resize_size,
            "resize": "shorter side to resize_size, bilinear, antialiased, aspect kept",
            "crop_size": data.crop_size,
            "crop": "centre crop_size x crop_size",
            "normalize": data.normalize,
            "mean": list(mean),
            "std": list(std),
            "mean_0_1": [m / 255.0 for m in mean],
            "std_0_1": [s / 255.0 for s in std],
            "normalization": "(x - mean) / std on the 0-255 scale: inside model.pt / model.pt2 / model.onnx, "
                             "not in torchvision_state_dict.pth",
            "input": input_text,
        },
        "output": "logits (N, num_classes); column i is classes[i]; softmax gives probabilities",
        "files": files,
        "source": os.path.abspath(checkpoint),
        "kind": loaded.kind,
        "versions": {"torch": torch.__version__},
    }


def export_model(checkpoint: str, out_dir: str, log: Callable[[str], None] = print) -> list[Path]:
    """Write OUT (created if needed): model.pt, model.onnx if possible, torchvision_state_dict.pth
    (arch torchvision), model.json; return the written paths, model.json last.

    Raises CheckpointError (the checkpoint) or ExportError (OUT), each naming the file.
    """
    loaded = load_for_inference(checkpoint, "cpu")
    data = loaded.data
    arch = loaded.config.model.arch if loaded.config is not None else "torchvision"
    num_classes = loaded.model.classifier[-1].out_features
    if len(loaded.classes) != num_classes:
        raise ckpt.CheckpointError(f"{checkpoint}: {len(loaded.classes)} class names for {num_classes} outputs")
    out = _output_dir(out_dir)

    mean, std = tuple(float(v) for v in data.mean), effective_std(data)
    wrapped = InputNormalized(loaded.model, mean, std).eval()
    gen = torch.Generator().manual_seed(0)
    example = torch.rand(2, 3, data.crop_size, data.crop_size, generator=gen) * 255.0

    written = [_torchscript(wrapped, example, out, log)]
    onnx_path = _onnx(wrapped, example, out, log)
    if onnx_path is not None:
        written.append(onnx_path)
    if arch == "torchvision":
        written.append(_torchvision_state_dict(loaded.model, num_classes, out))

    meta = _model_json(checkpoint, loaded, arch, num_classes, mean, std, written)
    payload = (json.dumps(meta, indent=2) + "\n").encode()
    written.append(_write(out / "model.json", lambda fh: fh.write(payload)))
    for p in written:
        log(f"wrote {p} ({p.stat().st_size / 1e6:.1f} MB)")
    return written


# --------------------------------------------------------------------------- predict


class Guess(NamedTuple):
    wnid: str
    name: str
    probability: float  # softmax, 0-1


@dataclass(frozen=True)
class Prediction:
    path: str
    top: list[Guess]  # most probable first

    def as_dict(self) -> dict:
        return {"path": self.path, "top": [g._asdict() for g in self.top]}


def read_synsets(path: str) -> dict[str, str]:
    """``{wnid: name}`` from synset_words.txt-format lines (``n01440764 tench, Tinca tinca``)."""
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except FileNotFoundError:
        raise ValueError(f"{path}: synsets file not found") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: synsets file is not UTF-8 text") from None
    except OSError as exc:
        raise ValueError(f"{path}: cannot read the synsets file ({exc.strerror or exc})") from None
    names = {}
    for line in text.splitlines():
        parts = line.strip().split(None, 1)
        if parts:
            names[parts[0]] = parts[1].strip() if len(parts) > 1 else parts[0]
    if not names:
        raise ValueError(f"{path}: synsets file has no 'wnid name' lines")
    return names


def predict(
    checkpoint: str,
    images: Sequence[str],
    synsets: str | None = None,
    topk: int = 5,
    device: torch.device | str = "cpu",
) -> list[Prediction]:
    """Top-``topk`` classes (capped at the number of classes) of each image, most probable first.

    Each image gets the checkpoint's own evaluation preprocessing (resize shorter side,
    centre crop, normalisation: ``Loaded.data``).  Names come from ``synsets`` where given
    (a class it lacks is named by its wnid), else each name is the wnid.  Raises
    ValueError (topk, synsets file), CheckpointError, or BadImageError naming the image.
    """
    from .data.decode import decode_rgb
    from .data.transforms import BatchPreprocess, CenterPreset

    if topk < 1:
        raise ValueError(f"topk: must be >= 1, got {topk}")
    names = read_synsets(synsets) if synsets is not None else None
    loaded: Loaded = load_for_inference(checkpoint, device)
    if names is not None and not any(c in names for c in loaded.classes):
        raise ValueError(f"{synsets}: names none of the checkpoint's {len(loaded.classes)} classes "
                         f"(e.g. {loaded.classes[0]})")
    label = [names.get(c, c) if names is not None else c for c in loaded.classes]
    preset = CenterPreset(loaded.data)
    prep = BatchPreprocess(loaded.data, device)
    k = min(topk, len(loaded.classes))

    results = []
    for start in range(0, len(images), PREDICT_BATCH):
        chunk = list(images[start : start + PREDICT_BATCH])
        batch = torch.stack([preset(decode_rgb(p, preset.min_side)) for p in chunk])
        with torch.no_grad():
            probs = torch.softmax(loaded.model(prep(batch.to(device))).float(), dim=1)
        values, indices = probs.topk(k, dim=1)
        for path, vals, idxs in zip(chunk, values.tolist(), indices.tolist()):
            top = [Guess(loaded.classes[i], label[i], v) for v, i in zip(vals, idxs)]
            results.append(Prediction(path, top))
    return results


def format_predictions(preds: Sequence[Prediction]) -> str:
    """Per image its path, then one line per class: ``  52.31%  n01440764  tench, Tinca tinca``."""
    lines = []
    for pred in preds:
        lines.append(pred.path)
        for g in pred.top:
            name = f"  {g.name}" if g.name != g.wnid else ""
            lines.append(f"{100.0 * g.probability:7.2f}%  {g.wnid}{name}")
    return "\n".join(lines)
