"""``export_model`` and ``predict`` (alexnet-export / alexnet-predict) on real checkpoints and JPEGs.

Checkpoints come from real one-epoch ``alexnet-train`` runs (in-process) on a tiny
ImageFolder, and from a real torchvision AlexNet state_dict saved with ``torch.save``.
"""
from __future__ import annotations

import importlib.util
import json
import warnings
from pathlib import Path

import pytest
import torch
import torchvision

from alexnet_train.checkpoint import CheckpointError
from alexnet_train.cli import train_main
from alexnet_train.config import IMAGENET_MEAN, IMAGENET_STD
from alexnet_train.data import BadImageError
from alexnet_train.data.transforms import BatchPreprocess
from alexnet_train.export import ExportError, Guess, Prediction, export_model, format_predictions, predict
from alexnet_train.inference import imagenet_wnids, load_for_inference

from .conftest import CLASSES, DEMO_CONFIG, SHARED_DATA, tiny_overrides, write_image_folder

SYNSET_WORDS = SHARED_DATA / "imagenet-meta" / "synset_words.txt"
NAMES = {"n01440764": "tench, Tinca tinca", "n01443537": "goldfish, Carassius auratus",
         "n01484850": "great white shark, white shark"}
HAS_ONNX = importlib.util.find_spec("onnx") is not None


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("tree")
    return write_image_folder(root / "train", CLASSES, 4, seed=1), write_image_folder(root / "val", CLASSES, 2, seed=2)


def _train(tree, out: Path, *extra: str) -> Path:
    train, val = tree
    train_main(["--config", DEMO_CONFIG, "--set", *tiny_overrides(train, val, len(CLASSES), epochs=1), *extra,
                "train.keep_last=0", "--out", str(out)])
    path = out / "last.pth"
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    return path


@pytest.fixture(scope="module")
def custom_ckpt(tree, tmp_path_factory) -> Path:
    """arch custom: LRN, two towers, dropout; normalize torchvision (x - mean) / std."""
    return _train(tree, tmp_path_factory.mktemp("custom"))


@pytest.fixture(scope="module")
def tv_ckpt(tree, tmp_path_factory) -> Path:
    """arch torchvision, 3 classes; normalize paper (mean subtraction only), so both modes are exported."""
    return _train(tree, tmp_path_factory.mktemp("tv"), "model.arch=torchvision", "model.groups=1",
                  "data.normalize=paper", "model.init=torch", "optim.lr=0.00001")


@pytest.fixture(scope="module")
def plain_sd(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("plain") / "alexnet-random.pth"
    torch.manual_seed(0)
    torch.save(torchvision.models.alexnet(num_classes=1000).state_dict(), path)
    return path


def _export(ckpt: Path, out: Path) -> tuple[list[Path], list[str], dict]:
    logs: list[str] = []
    paths = export_model(str(ckpt), str(out), log=logs.append)
    return paths, logs, json.loads((out / "model.json").read_text())


@pytest.fixture(scope="module")
def custom_export(custom_ckpt, tmp_path_factory):
    return _export(custom_ckpt, tmp_path_factory.mktemp("custom-export") / "OUT")


@pytest.fixture(scope="module")
def tv_export(tv_ckpt, tmp_path_factory):
    return _export(tv_ckpt, tmp_path_factory.mktemp("tv-export") / "OUT")


def jit_load(path: Path) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch 2.15 deprecates TorchScript; it still loads
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.load(str(path))


def eager_logits(ckpt: Path, x255: torch.Tensor) -> torch.Tensor:
    """The checkpoint's model on its own preprocessing, as alexnet-eval runs it."""
    loaded = load_for_inference(str(ckpt))
    with torch.no_grad():
        return loaded.model(BatchPreprocess(loaded.data)(x255))


def pixels(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), generator=torch.Generator().manual_seed(seed)).float()


# --------------------------------------------------------------------------- export


def test_export_custom_checkpoint_torchscript_reproduces_the_logits(custom_ckpt, custom_export):
    paths, _logs, _meta = custom_export
    out = paths[0].parent
    names = [p.name for p in paths]
    assert names[0] == "model.pt" and names[-1] == "model.json"
    assert "torchvision_state_dict.pth" not in names and all(p.is_file() for p in paths)
    assert ("model.onnx" in names) == HAS_ONNX

    model = jit_load(out / "model.pt")
    x = pixels(4, 64)
    want = eager_logits(custom_ckpt, x)
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, atol=1e-5, rtol=0)
        torch.testing.assert_close(model(x.to(torch.uint8)), want, atol=1e-5, rtol=0)  # uint8 input too
        torch.testing.assert_close(model(x[:1]), want[:1], atol=1e-5, rtol=0)  # any batch size


@pytest.mark.slow
def test_export_of_split_towers_reproduces_the_logits_in_every_format(tree, tmp_path):
    """model.towers: split (TowerConv2d) through alexnet-export: TorchScript, and ONNX where installed."""
    ckpt = _train(tree, tmp_path / "split", "model.towers=split")
    paths, _logs, _meta = _export(ckpt, tmp_path / "OUT")
    x = pixels(3, 64)
    want = eager_logits(ckpt, x)
    with torch.no_grad():
        torch.testing.assert_close(jit_load(tmp_path / "OUT" / "model.pt")(x), want, atol=1e-5, rtol=0)
    if importlib.util.find_spec("onnxruntime") is not None and HAS_ONNX:
        import onnxruntime as ort

        session = ort.InferenceSession(str(tmp_path / "OUT" / "model.onnx"), providers=["CPUExecutionProvider"])
        (got,) = session.run(["logits"], {"image": x.numpy()})
        torch.testing.assert_close(torch.from_numpy(got), want, atol=1e-4, rtol=1e-4)


def test_export_custom_checkpoint_model_json(custom_ckpt, custom_export):
    _paths, _logs, meta = custom_export
    assert meta["arch"] == "custom" and meta["num_classes"] == 3 and meta["classes"] == CLASSES
    assert meta["kind"] == "alexnet-train" and Path(meta["source"]) == custom_ckpt.resolve()
    pre = meta["preprocessing"]
    assert (pre["resize_size"], pre["crop_size"], pre["normalize"]) == (72, 64, "torchvision")
    assert pre["mean"] == pytest.approx(IMAGENET_MEAN) and pre["std"] == pytest.approx(IMAGENET_STD)
    assert pre["input"].startswith("RGB, 0-255 float32, NCHW (N, 3, 64, 64)")
    assert meta["files"]["model.pt"]["normalization"] == "inside the model"


@pytest.mark.skipif(HAS_ONNX, reason="onnx is installed: model.onnx is written")
def test_export_without_onnx_says_how_to_get_it(custom_export):
    paths, logs, _meta = custom_export
    assert not (paths[0].parent / "model.onnx").exists()
    assert [ln for ln in logs if "model.onnx skipped" in ln and "pip install onnx" in ln]


def test_export_onnx_reproduces_the_logits(custom_ckpt, custom_export):
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    paths, _logs, meta = custom_export
    assert meta["files"]["model.onnx"]["normalization"] == "inside the model"
    session = ort.InferenceSession(str(paths[0].parent / "model.onnx"), providers=["CPUExecutionProvider"])
    x = pixels(3, 64)
    (got,) = session.run(["logits"], {"image": x.numpy()})
    torch.testing.assert_close(torch.from_numpy(got), eager_logits(custom_ckpt, x), atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_export_torchvision_arch_writes_a_strict_loading_state_dict(tv_ckpt, tv_export):
    paths, _logs, meta = tv_export
    out = paths[0].parent
    assert "torchvision_state_dict.pth" in [p.name for p in paths]
    state = torch.load(out / "torchvision_state_dict.pth", map_location="cpu", weights_only=True)
    tv = torchvision.models.alexnet(num_classes=3)
    tv.load_state_dict(state, strict=True)
    tv.eval()

    # normalize: paper -> the bare network takes the mean-subtracted 0-255 pixels; model.json says so.
    pre = meta["preprocessing"]
    assert meta["arch"] == "torchvision" and pre["normalize"] == "paper" and pre["std"] == [1.0, 1.0, 1.0]
    mean = torch.tensor(pre["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(pre["std"]).view(1, 3, 1, 1)
    x = pixels(2, 64)
    want = eager_logits(tv_ckpt, x)
    with torch.no_grad():
        torch.testing.assert_close(tv((x - mean) / std), want, atol=1e-5, rtol=0)
        torch.testing.assert_close(jit_load(out / "model.pt")(x), want, atol=1e-5, rtol=0)
    assert "not included" == meta["files"]["torchvision_state_dict.pth"]["normalization"]


@pytest.mark.slow
def test_export_plain_torchvision_state_dict(plain_sd, tmp_path):
    paths, _logs, meta = _export(plain_sd, tmp_path / "OUT")
    assert {p.name for p in paths} >= {"model.pt", "torchvision_state_dict.pth", "model.json"}
    assert meta["kind"] == "torchvision state_dict" and meta["arch"] == "torchvision"
    assert meta["classes"] == imagenet_wnids() and meta["num_classes"] == 1000
    pre = meta["preprocessing"]
    assert (pre["resize_size"], pre["crop_size"], pre["normalize"]) == (256, 224, "torchvision")
    assert pre["mean_0_1"] == pytest.approx([0.485, 0.456, 0.406], abs=1e-6)
    assert pre["std_0_1"] == pytest.approx([0.229, 0.224, 0.225], abs=1e-6)

    original = torch.load(plain_sd, weights_only=True)
    written = torch.load(tmp_path / "OUT" / "torchvision_state_dict.pth", weights_only=True)
    assert written.keys() == original.keys() and all(torch.equal(written[k], original[k]) for k in original)
    x = pixels(2, 224)
    with torch.no_grad():
        torch.testing.assert_close(jit_load(tmp_path / "OUT" / "model.pt")(x), eager_logits(plain_sd, x),
                                   atol=1e-5, rtol=0)


def test_export_falls_back_to_torch_export_where_torchscript_fails(custom_ckpt, tmp_path, monkeypatch):
    def gone(*_a, **_k):
        raise RuntimeError("TorchScript is not supported in this build")

    monkeypatch.setattr(torch.jit, "script", gone)
    paths, logs, meta = _export(custom_ckpt, tmp_path / "OUT")
    assert paths[0].name == "model.pt2" and not (tmp_path / "OUT" / "model.pt").exists()
    assert any("TorchScript unavailable" in ln and "not supported" in ln for ln in logs)
    assert "model.pt2" in meta["files"]
    program = torch.export.load(str(paths[0])).module()
    x = pixels(3, 64)
    torch.testing.assert_close(program(x), eager_logits(custom_ckpt, x), atol=1e-5, rtol=0)


def test_export_errors_name_the_file(tmp_path, custom_ckpt):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"this is not a checkpoint")
    for bad in (garbage, tmp_path / "missing.pth"):
        with pytest.raises(CheckpointError, match=str(bad)) as info:
            export_model(str(bad), str(tmp_path / "OUT"), log=lambda _m: None)
        assert "\n" not in str(info.value)
    assert not (tmp_path / "OUT").exists()

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(ExportError, match="a-file"):
        export_model(str(custom_ckpt), str(blocker / "OUT"), log=lambda _m: None)


# --------------------------------------------------------------------------- predict


@pytest.fixture(scope="module")
def synsets_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("syn") / "synset_words.txt"
    path.write_text("".join(f"{w} {n}\n" for w, n in NAMES.items()) + "n99999999 not a class here\n")
    return path


def jpegs(tree) -> list[str]:
    return sorted(str(p) for p in tree[1].rglob("*.JPEG"))


def test_predict_returns_sorted_probabilities_with_names(custom_ckpt, tree, synsets_file):
    images = jpegs(tree)
    preds = predict(str(custom_ckpt), images, synsets=str(synsets_file))
    assert [p.path for p in preds] == images
    # The same softmax as the eager model on the checkpoint's centre-crop preprocessing, top-1 included.
    for pred in preds:
        assert len(pred.top) == 3  # k capped at the number of classes
        probs = [g.probability for g in pred.top]
        assert probs == sorted(probs, reverse=True) and all(0 <= p <= 1 for p in probs)
        assert sum(probs) <= 1 + 1e-5
        assert {g.wnid for g in pred.top} == set(CLASSES)
        assert all(g.name == NAMES[g.wnid] for g in pred.top)

    two = predict(str(custom_ckpt), images[:1], topk=2)
    assert len(two[0].top) == 2 and all(g.name == g.wnid for g in two[0].top)
    assert [g.wnid for g in two[0].top] == [g.wnid for g in preds[0].top[:2]]
    assert [g.probability for g in two[0].top] == pytest.approx([g.probability for g in preds[0].top[:2]])


def test_predict_plain_state_dict_top5(plain_sd, tree):
    preds = predict(str(plain_sd), jpegs(tree)[:2])
    for pred in preds:
        probs = [g.probability for g in pred.top]
        assert len(pred.top) == 5 and probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-6
        assert all(g.wnid in imagenet_wnids() for g in pred.top)


@pytest.mark.skipif(not SYNSET_WORDS.is_file(), reason="../shared/data/imagenet-meta/synset_words.txt is absent")
def test_predict_with_imagenet_synset_words(plain_sd, tree):
    words = dict(line.split(" ", 1) for line in SYNSET_WORDS.read_text().splitlines() if line.strip())
    real = sorted((SHARED_DATA / "imagenet-sample-1k").glob("*/*.JPEG"))[:1]
    images = [str(p) for p in real] or jpegs(tree)[:1]
    (pred,) = predict(str(plain_sd), images, synsets=str(SYNSET_WORDS))
    assert len(pred.top) == 5 and all(g.name == words[g.wnid].strip() for g in pred.top)
    text = format_predictions([pred])
    assert text.splitlines()[0] == images[0] and words[pred.top[0].wnid].strip() in text.splitlines()[1]


def test_predict_bad_image_raises_naming_it(custom_ckpt, tree, tmp_path):
    broken = tmp_path / "broken.JPEG"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    for bad in (broken, tmp_path / "missing.jpg"):
        with pytest.raises(BadImageError, match=str(bad)):
            predict(str(custom_ckpt), [jpegs(tree)[0], str(bad)])


def test_predict_bad_checkpoint_or_synsets_raise_naming_the_file(custom_ckpt, tree, tmp_path):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(CheckpointError, match=str(garbage)):
        predict(str(garbage), jpegs(tree)[:1])
    with pytest.raises(ValueError, match="nope.txt"):
        predict(str(custom_ckpt), jpegs(tree)[:1], synsets=str(tmp_path / "nope.txt"))
    unrelated = tmp_path / "other.txt"
    unrelated.write_text("n09999999 something else\n")
    with pytest.raises(ValueError, match="other.txt: names none"):
        predict(str(custom_ckpt), jpegs(tree)[:1], synsets=str(unrelated))
    with pytest.raises(ValueError, match="topk"):
        predict(str(custom_ckpt), jpegs(tree)[:1], topk=0)


def test_format_predictions():
    preds = [
        Prediction("a.jpg", [Guess("n01440764", "tench, Tinca tinca", 0.5231), Guess("n01443537", "n01443537", 0.052)]),
        Prediction("b.jpg", [Guess("n01484850", "shark", 1.0)]),
    ]
    assert format_predictions(preds).splitlines() == [
        "a.jpg",
        "  52.31%  n01440764  tench, Tinca tinca",
        "   5.20%  n01443537",
        "b.jpg",
        " 100.00%  n01484850  shark",
    ]


# --------------------------------------------------------------------------- the console scripts


@pytest.mark.slow
def test_alexnet_export_and_predict_scripts(custom_ckpt, tree, tmp_path):
    import subprocess

    from .conftest import console_script

    out = tmp_path / "exported"
    done = subprocess.run([console_script("alexnet-export"), str(custom_ckpt), str(out)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert (out / "model.pt").is_file() and (out / "model.json").is_file()
    assert f"wrote {out / 'model.pt'}" in done.stdout
    images = sorted(str(p) for p in Path(tree[1]).rglob("*.JPEG"))[:2]
    done = subprocess.run([console_script("alexnet-predict"), str(custom_ckpt), *images],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == images[0] and len(lines) == 2 * (1 + 3)  # 3 classes: top-3 per image
    probability, wnid = lines[1].split()[:2]
    assert probability.endswith("%") and wnid in CLASSES


def test_export_and_predict_errors_exit_codes(custom_ckpt, tmp_path, capsys):
    from alexnet_train.cli import export_main, predict_main

    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    for main, argv in ((export_main, [str(garbage), str(tmp_path / "o")]), (predict_main, [str(garbage), "x.JPEG"])):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 1 and "garbage.pth" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        predict_main([str(custom_ckpt), str(tmp_path / "missing.JPEG")])
    assert info.value.code == 1 and "missing.JPEG" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        predict_main([str(custom_ckpt), str(tmp_path / "missing.JPEG"), "--top", "0"])
    assert info.value.code == 2
