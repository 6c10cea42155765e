"""``alexnet-eval`` and ``evaluate_crops`` against independent references on real files and checkpoints.

The ten-crop test must be exactly the paper's: per image, the network's softmax averaged over
torchvision's ``five_crop`` of the shorter-side-resized image and ``five_crop`` of its mirror,
each crop its own forward pass.  The references below are built from torchvision's functions
only (decode, resize, five_crop, hflip; for plain torchvision weights the PIL
``Resize/CenterCrop/TenCrop/ToTensor/Normalize`` preset) and compared with what the project
computes in one batched pass.
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from alexnet_train.cli import eval_main, train_main
from alexnet_train.data.datasets import ImageDataset, labelled_samples
from alexnet_train.data.loaders import EpochSampler, make_loader
from alexnet_train.data.transforms import BatchPreprocess, CenterPreset, TenCropPreset
from alexnet_train.evaluate import evaluate_crops
from alexnet_train.inference import imagenet_wnids, load_for_inference

from .conftest import CLASSES, DEMO_CONFIG, console_script, tiny_overrides, write_image_folder

pytestmark = pytest.mark.slow

# Seven real wnids (sorted), so top-5 is not trivially 100%.
ALL = CLASSES + ["n01491361", "n01494475", "n01496331", "n01498041"]
# The val folder holds only classes 1, 3 and 5 (so a re-indexed label would show), 3 images each:
# 9 images, odd, so two DDP ranks get 5 and 4.  Sizes (h, w) cover a shorter side equal to the
# resize (no-op resize), non-square both ways, smaller than the resize (upsampled), odd margins
# (round-half-even centre offsets).  All stay below 2 x resize so the decoder reads every pixel.
VAL_LAYOUT = {
    1: [(72, 72), (72, 97), (50, 61)],
    3: [(100, 80), (61, 61), (90, 143)],
    5: [(130, 75), (73, 120), (81, 81)],
}
N_VAL = sum(len(v) for v in VAL_LAYOUT.values())
HEADER = ["path", "label", "pred1", "pred2", "pred3", "pred4", "pred5"]
CPU = torch.device("cpu")


# --------------------------------------------------------------------------- helpers


def class_colour(ci: int) -> np.ndarray:
    # conftest.write_image_folder's colour for class index ci, so the model has seen these colours.
    return np.array([(ci * 97) % 256, (ci * 53 + 80) % 256, (ci * 151 + 30) % 256], dtype=np.float64)


def write_val(root: Path, seed: int = 5) -> Path:
    rng = np.random.default_rng(seed)
    for ci, sizes in VAL_LAYOUT.items():
        folder = root / ALL[ci]
        folder.mkdir(parents=True, exist_ok=True)
        for i, (h, w) in enumerate(sizes):
            # A horizontal ramp makes the mirrored crops differ from the unmirrored ones.
            ramp = np.linspace(-60, 60, w)[None, :, None]
            arr = np.clip(class_colour(ci) + ramp + rng.normal(0, 25, size=(h, w, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr, "RGB").save(folder / f"{ALL[ci]}_{i:03d}.JPEG", quality=90)
    return root


def run_cli(main, argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        main([str(a) for a in argv])
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    out = capsys.readouterr()
    return code, out.out, out.err


def one_line_error(err: str, *needles: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected a one-line error, got {err!r}"
    assert lines[0].startswith("alexnet-eval: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"


def read_csv(path: Path) -> list[list[str]]:
    with open(path, newline="") as fh:
        return list(csv.reader(fh))


def normalise(crop: torch.Tensor, data) -> torch.Tensor:
    """A uint8 (3, H, W) crop normalised by hand from the config's mean/std."""
    mean = torch.tensor(data.mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(data.std if data.normalize == "torchvision" else (1.0, 1.0, 1.0)).view(3, 1, 1)
    return (crop.float() - mean) / std


@torch.no_grad()
def reference_logits(model, path: str, data) -> torch.Tensor:
    """(10, K) logits: ten separate batch-of-1 forward passes on torchvision's ten crops."""
    import torchvision.transforms.v2.functional as TF
    from torchvision.io import ImageReadMode, decode_image

    x = decode_image(path, mode=ImageReadMode.RGB)
    x = TF.resize(x, [data.resize_size], antialias=True)
    c = [data.crop_size, data.crop_size]
    crops = list(TF.five_crop(x, c)) + list(TF.five_crop(TF.hflip(x), c))
    assert len(crops) == 10 and all(cr.shape == (3, *c) for cr in crops)
    return torch.stack([model(normalise(cr, data)[None])[0] for cr in crops])


def metrics(scores: torch.Tensor, targets: torch.Tensor, probs: bool) -> dict:
    """top1/top5 (percent) and mean loss of (N, K) scores: probabilities (NLL) or logits (CE)."""
    top = scores.topk(min(5, scores.shape[1]), dim=1).indices
    hits = top.eq(targets[:, None])
    loss = F.nll_loss(scores.clamp_min(1e-12).log(), targets) if probs else F.cross_entropy(scores, targets)
    n = len(targets)
    return {"top1": 100.0 * hits[:, 0].sum().item() / n, "top5": 100.0 * hits.any(1).sum().item() / n,
            "loss": loss.item(), "images": n}


def assert_metrics(got: dict, want: dict) -> None:
    assert got["images"] == want["images"]
    assert got["top1"] == pytest.approx(want["top1"], abs=1e-9)
    assert got["top5"] == pytest.approx(want["top5"], abs=1e-9)
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-5, abs=1e-6)


def run_evaluate_crops(loaded, samples, preset, ten_crop: bool, batch_size: int):
    loader = make_loader(ImageDataset(samples, preset), EpochSampler(len(samples), shuffle=False),
                         batch_size, 0, False)
    seen: list[torch.Tensor] = []
    results = evaluate_crops(loaded.model, loader, BatchPreprocess(loaded.data, CPU), CPU, ten_crop=ten_crop,
                             on_batch=lambda scores, targets, bad: seen.append(scores.clone()))
    return results, torch.cat(seen)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny checkpoint trained in-process on 7 classes, its val folder (classes 1, 3, 5) and the
    per-image reference: dict with ckpt, val, loaded, samples, targets, ref (N, 10, K) logits."""
    root = tmp_path_factory.mktemp("evalrun")
    train = write_image_folder(root / "train", ALL, 6, seed=1)
    val = write_val(root / "val")
    out = root / "OUT"
    try:
        train_main(["--config", DEMO_CONFIG, "--out", str(out), "--set", *tiny_overrides(train, val, len(ALL), 2),
                    "data.batch_size=6"])
    except SystemExit as exc:  # pragma: no cover - shown on failure only
        pytest.fail(f"training the fixture checkpoint exited {exc.code}")
    ckpt = out / "last.pth"
    loaded = load_for_inference(str(ckpt))
    assert loaded.classes == ALL and loaded.data.resize_size == 72 and loaded.data.crop_size == 64
    samples = labelled_samples(str(val), loaded.classes)
    assert len(samples) == N_VAL
    ref = torch.stack([reference_logits(loaded.model, path, loaded.data) for path, _ in samples])
    probs = ref.softmax(-1).mean(1)
    # The argmax / top-5 comparisons below need no near-ties in the reference.
    for scores in (probs, ref[:, 4]):
        top = scores.sort(dim=1, descending=True).values[:, :6]
        assert (top[:, :-1] - top[:, 1:]).min() > 1e-6, "near-tie in the fixture's scores; change a seed"
    return {"ckpt": ckpt, "val": val, "loaded": loaded, "samples": samples,
            "targets": torch.tensor([t for _, t in samples]), "ref": ref, "probs": probs}


def reference_by_name(run, scores: torch.Tensor) -> dict[str, tuple[str, torch.Tensor]]:
    """{file name: (label wnid, reference scores)} of the fixture's val images (names are unique)."""
    classes = run["loaded"].classes
    return {Path(p).name: (classes[t], s) for (p, t), s in zip(run["samples"], scores)}


def check_predictions(rows: list[list[str]], want: dict[str, tuple[str, torch.Tensor]], classes: list[str],
                      atol: float = 1e-5) -> None:
    """CSV body rows: sorted by path, one per expected image, the right label wnid, and pred1..pred5 the
    reference's top 5 in order (compared by score, within float tolerance, so a near-tie cannot flake)."""
    paths = [r[0] for r in rows]
    assert paths == sorted(paths)
    assert sorted(Path(p).name for p in paths) == sorted(want)
    for row in rows:
        label, scores = want[Path(row[0]).name]
        assert row[1] == label, row
        assert len(row) == 7 and len(set(row[2:])) == 5 and set(row[2:]) <= set(classes), row
        got = scores[[classes.index(w) for w in row[2:]]]
        torch.testing.assert_close(got, scores.topk(5).values, atol=atol, rtol=0, msg=lambda m: f"{row}: {m}")


# --------------------------------------------------------------------------- 1. exactness


def test_ten_crop_scores_are_the_mean_softmax_of_ten_separate_passes_on_torchvisions_crops(run):
    loaded, samples, ref, targets = run["loaded"], run["samples"], run["ref"], run["targets"]
    # batch 4 over 9 images: the last batch holds one image, whose 10 crops go through in chunks of 1
    results, scores = run_evaluate_crops(loaded, samples, TenCropPreset(loaded.data), True, batch_size=4)
    want_probs = ref.softmax(-1).mean(1)
    assert scores.shape == want_probs.shape == (N_VAL, len(ALL))
    torch.testing.assert_close(scores, want_probs, atol=1e-5, rtol=0)
    # they are probabilities, not logits
    torch.testing.assert_close(scores.sum(1), torch.ones(N_VAL), atol=1e-5, rtol=0)
    # the averaged softmax differs from the centre one: the crops really are different views
    assert (want_probs - ref[:, 4].softmax(-1)).abs().max() > 1e-3
    assert_metrics(results["ten_crop"].as_dict(), metrics(want_probs, targets, probs=True))
    assert_metrics(results["center"].as_dict(), metrics(ref[:, 4], targets, probs=False))


def test_ten_crop_is_exact_also_for_images_twice_the_resize(run, tmp_path):
    loaded = run["loaded"]
    folder = tmp_path / "big" / ALL[3]
    folder.mkdir(parents=True)
    rng = np.random.default_rng(7)
    for i, (h, w) in enumerate([(144, 180), (160, 240), (300, 200)]):
        ramp = np.linspace(-60, 60, w)[None, :, None]
        arr = np.clip(class_colour(3) + ramp + rng.normal(0, 25, size=(h, w, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(arr, "RGB").save(folder / f"big_{i}.JPEG", quality=90)
    samples = labelled_samples(str(folder.parent), loaded.classes)
    want = torch.stack([reference_logits(loaded.model, p, loaded.data) for p, _ in samples]).softmax(-1).mean(1)
    _res, got = run_evaluate_crops(loaded, samples, TenCropPreset(loaded.data), True, batch_size=4)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_ten_crop_preset_crops_equal_torchvisions_five_crop_and_hflip(run):
    import torchvision.transforms.v2.functional as TF
    from torchvision.io import ImageReadMode, decode_image

    from alexnet_train.data.decode import decode_rgb

    data = run["loaded"].data
    preset = TenCropPreset(data)
    for path, _ in run["samples"]:
        x = decode_image(path, mode=ImageReadMode.RGB)
        resized = TF.resize(x, [data.resize_size], antialias=True)
        c = [data.crop_size] * 2
        want = torch.stack(list(TF.five_crop(resized, c)) + list(TF.five_crop(TF.hflip(resized), c)))
        got = preset(decode_rgb(path, preset.min_side))
        assert got.dtype == torch.uint8 and got.shape == want.shape
        assert torch.equal(got, want), path
        assert torch.equal(got[4], CenterPreset(data)(decode_rgb(path, data.resize_size))), path


def test_center_of_the_ten_crop_pass_equals_a_center_preset_evaluation(run):
    loaded, samples, ref, targets = run["loaded"], run["samples"], run["ref"], run["targets"]
    ten, _ = run_evaluate_crops(loaded, samples, TenCropPreset(loaded.data), True, batch_size=4)
    center, logits = run_evaluate_crops(loaded, samples, CenterPreset(loaded.data), False, batch_size=4)
    assert set(center) == {"center"}
    torch.testing.assert_close(logits, ref[:, 4], atol=1e-5, rtol=1e-5)
    assert_metrics(center["center"].as_dict(), ten["center"].as_dict())
    assert_metrics(center["center"].as_dict(), metrics(ref[:, 4], targets, probs=False))


# --------------------------------------------------------------------------- 2. the CLI


def test_eval_cli_ten_crop_json_and_predictions(run, capsys, tmp_path):
    report, preds = tmp_path / "eval.json", tmp_path / "preds.csv"
    code, out, err = run_cli(eval_main, [run["ckpt"], "--data", run["val"], "--ten-crop", "--json", report,
                                         "--predictions", preds, "--device", "cpu"], capsys)
    assert code == 0, err
    lines = out.splitlines()
    assert any(ln.split()[:1] == ["center"] for ln in lines), out
    assert any(ln.split()[:1] == ["ten-crop"] for ln in lines), out
    assert f"{N_VAL} images" in out
    payload = json.loads(report.read_text())
    assert set(payload) == {"center", "ten_crop"}
    for key in payload:
        assert set(payload[key]) == {"top1", "top5", "loss", "images"}
        assert payload[key]["images"] == N_VAL
    assert_metrics(payload["ten_crop"], metrics(run["probs"], run["targets"], probs=True))
    assert_metrics(payload["center"], metrics(run["ref"][:, 4], run["targets"], probs=False))

    rows = read_csv(preds)
    assert rows[0] == HEADER
    body = rows[1:]
    assert len(body) == N_VAL
    assert [r[0] for r in body] == sorted(p for p, _ in run["samples"])
    for r in body:
        assert r[1] == Path(r[0]).parent.name  # label: the wnid of its folder
    check_predictions(body, reference_by_name(run, run["probs"]), ALL)


def test_eval_cli_without_ten_crop_predicts_center_crop_argmaxes(run, capsys, tmp_path):
    report, preds = tmp_path / "eval.json", tmp_path / "preds.csv"
    # no --data: the checkpoint config's data.val_dir
    code, out, err = run_cli(eval_main, [run["ckpt"], "--device", "cpu", "--json", report, "--predictions", preds],
                             capsys)
    assert code == 0, err
    assert not any(ln.split()[:1] == ["ten-crop"] for ln in out.splitlines()), out
    payload = json.loads(report.read_text())
    assert set(payload) == {"center"}
    assert_metrics(payload["center"], metrics(run["ref"][:, 4], run["targets"], probs=False))
    rows = read_csv(preds)
    assert rows[0] == HEADER
    check_predictions(rows[1:], reference_by_name(run, run["ref"][:, 4]), ALL)


def test_eval_console_script_ten_crop_with_workers(run, tmp_path):
    report, preds = tmp_path / "eval.json", tmp_path / "preds.csv"
    proc = subprocess.run([console_script("alexnet-eval"), str(run["ckpt"]), "--data", str(run["val"]),
                           "--ten-crop", "--json", str(report), "--predictions", str(preds), "--device", "cpu",
                           "--workers", "2", "--batch-size", "2"],
                          capture_output=True, text=True, timeout=120, env=os.environ.copy())
    assert proc.returncode == 0, proc.stderr
    assert "ten-crop" in proc.stdout and "center" in proc.stdout
    payload = json.loads(report.read_text())
    assert payload["center"]["images"] == payload["ten_crop"]["images"] == N_VAL
    assert_metrics(payload["ten_crop"], metrics(run["probs"], run["targets"], probs=True))
    rows = read_csv(preds)
    assert rows[0] == HEADER
    check_predictions(rows[1:], reference_by_name(run, run["probs"]), ALL)


# --------------------------------------------------------------------------- 3. the checkpoint's class list


def test_predictions_use_the_checkpoints_classes_for_a_one_class_folder(run, capsys, tmp_path):
    only = tmp_path / "only"
    wnid = ALL[5]
    shutil.copytree(run["val"] / wnid, only / wnid)
    preds, report = tmp_path / "preds.csv", tmp_path / "eval.json"
    code, _out, err = run_cli(eval_main, [run["ckpt"], "--data", only, "--ten-crop", "--predictions", preds,
                                          "--json", report, "--device", "cpu"], capsys)
    assert code == 0, err
    rows = read_csv(preds)[1:]
    assert len(rows) == 3 and all(r[1] == wnid for r in rows)  # not ALL[0], the folder's own index 0
    keep = [i for i, (p, _) in enumerate(run["samples"]) if Path(p).parent.name == wnid]
    want = {name: v for name, v in reference_by_name(run, run["probs"]).items() if v[0] == wnid}
    check_predictions(rows, want, ALL)
    assert_metrics(json.loads(report.read_text())["ten_crop"],
                   metrics(run["probs"][keep], run["targets"][keep], probs=True))


def test_flat_folder_with_labels_predicts_like_the_class_tree(run, capsys, tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    lines = []
    for path, _ in run["samples"]:
        shutil.copy(path, flat / Path(path).name)
        lines.append(f"{Path(path).name} {Path(path).parent.name}\n")
    labels = tmp_path / "labels.txt"
    labels.write_text("".join(reversed(lines)))
    preds, report = tmp_path / "preds.csv", tmp_path / "eval.json"
    code, _out, err = run_cli(eval_main, [run["ckpt"], "--data", flat, "--labels", labels, "--ten-crop",
                                          "--predictions", preds, "--json", report, "--device", "cpu"], capsys)
    assert code == 0, err
    rows = read_csv(preds)
    assert rows[0] == HEADER and len(rows) == N_VAL + 1
    check_predictions(rows[1:], reference_by_name(run, run["probs"]), ALL)
    assert all(Path(r[0]).parent == flat for r in rows[1:])
    payload = json.loads(report.read_text())
    assert_metrics(payload["ten_crop"], metrics(run["probs"], run["targets"], probs=True))


# --------------------------------------------------------------------------- 4. torchvision weights

TV_WNIDS = ["n01440764", "n01443537", "n15075141"]


@pytest.fixture(scope="module")
def tv(tmp_path_factory):
    """A plain torchvision AlexNet state_dict, 256x256 JPEGs in real-wnid folders, and torchvision's own
    PIL-preset reference (centre logits and ten-crop probabilities) for each image."""
    import torchvision
    import torchvision.transforms as T

    root = tmp_path_factory.mktemp("tv")
    torch.manual_seed(0)
    model = torchvision.models.alexnet().eval()
    weights = root / "alexnet-random.pth"
    torch.save(model.state_dict(), weights)
    wnids = imagenet_wnids()
    assert len(wnids) == 1000 and wnids == sorted(wnids) and wnids[-1] == "n15075141"

    rng = np.random.default_rng(3)
    staged = []
    for i in range(6):
        yy, xx = np.mgrid[0:256, 0:256]
        base = np.stack([128 + 100 * np.sin(xx / (7 + 5 * i)), 128 + 100 * np.cos(yy / (9 + 3 * i)),
                         np.full_like(xx, 40 * i, dtype=np.float64)], -1)
        arr = np.clip(base + rng.normal(0, 20, size=(256, 256, 3)), 0, 255).astype(np.uint8)
        path = root / f"img_{i}.JPEG"
        Image.fromarray(arr, "RGB").save(path, quality=92)
        staged.append(path)

    norm = T.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
    center_tf = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), norm])
    ten_tf = T.Compose([T.Resize(256), T.TenCrop(224)])
    center, probs = [], []
    with torch.no_grad():
        for path in staged:
            img = Image.open(path).convert("RGB")
            center.append(model(center_tf(img)[None])[0])
            crops = [norm(T.functional.to_tensor(c)) for c in ten_tf(img)]
            probs.append(torch.stack([model(c[None])[0] for c in crops]).softmax(-1).mean(0))
    center, probs = torch.stack(center), torch.stack(probs)

    # Two images go to the folder of their reference centre prediction, the others to real wnids
    # they are not predicted as, so top-1 is neither 0 nor 100 and indices into the 1000 wnids matter.
    data = root / "val"
    samples = []
    for i, path in enumerate(staged):
        pred = wnids[center[i].argmax().item()]
        wnid = pred if i < 2 else next(w for w in TV_WNIDS[i % 2 :: 2] + TV_WNIDS if w != pred)
        (data / wnid).mkdir(parents=True, exist_ok=True)
        dst = data / wnid / path.name
        shutil.copy(path, dst)
        samples.append((str(dst), wnids.index(wnid)))
    order = sorted(range(len(samples)), key=lambda i: samples[i][0])
    # Random weights give logits ~0.01 apart by ~1e-5: compare in log space, where float noise is ~1e-8.
    for scores in (center, probs.log()):
        top = scores.sort(dim=1, descending=True).values[:, :6]
        assert (top[:, :-1] - top[:, 1:]).min() > 1e-6, "near-tie in the torchvision reference; change a seed"
    return {"weights": weights, "data": data, "wnids": wnids, "center": center[order], "probs": probs[order],
            "samples": [samples[i] for i in order]}


def test_torchvision_state_dict_matches_torchvisions_own_preprocessing(tv, capsys, tmp_path):
    report, preds = tmp_path / "eval.json", tmp_path / "preds.csv"
    code, out, err = run_cli(eval_main, [tv["weights"], "--data", tv["data"], "--ten-crop", "--json", report,
                                         "--predictions", preds, "--workers", "0", "--batch-size", "4",
                                         "--device", "cpu"], capsys)
    assert code == 0, err
    assert "torchvision state_dict" in out
    targets = torch.tensor([t for _, t in tv["samples"]])
    payload = json.loads(report.read_text())
    assert payload["center"]["images"] == payload["ten_crop"]["images"] == 6
    want_center = metrics(tv["center"], targets, probs=False)
    assert want_center["top1"] == pytest.approx(100 * 2 / 6)
    assert_metrics(payload["center"], want_center)
    assert_metrics(payload["ten_crop"], metrics(tv["probs"], targets, probs=True))
    rows = read_csv(preds)
    assert rows[0] == HEADER and len(rows) == 7
    wnids = tv["wnids"]
    assert [r[0] for r in rows[1:]] == [p for p, _ in tv["samples"]]
    want = {Path(p).name: (wnids[t], s) for (p, t), s in zip(tv["samples"], tv["probs"])}
    check_predictions(rows[1:], {k: (w, s.log()) for k, (w, s) in want.items()}, wnids, atol=1e-6)
    assert all(r[1] == Path(r[0]).parent.name for r in rows[1:])


def test_torchvision_state_dict_logits_match_torchvisions_preprocessing_tightly(tv):
    loaded = load_for_inference(str(tv["weights"]))
    assert loaded.kind == "torchvision state_dict" and loaded.classes == tv["wnids"]
    samples = tv["samples"]
    _res, logits = run_evaluate_crops(loaded, samples, CenterPreset(loaded.data), False, batch_size=6)
    torch.testing.assert_close(logits, tv["center"], atol=1e-4, rtol=1e-4)
    _res, probs = run_evaluate_crops(loaded, samples, TenCropPreset(loaded.data), True, batch_size=6)
    torch.testing.assert_close(probs, tv["probs"], atol=1e-6, rtol=1e-4)


def test_torchvision_state_dict_with_10_classes_exits_1_naming_it(tv, capsys, tmp_path):
    import torchvision

    weights = tmp_path / "ten-classes.pth"
    torch.save(torchvision.models.alexnet(num_classes=10).state_dict(), weights)
    code, _out, err = run_cli(eval_main, [weights, "--data", tv["data"], "--device", "cpu"], capsys)
    assert code == 1
    one_line_error(err, str(weights), "class")


def test_torchvision_state_dict_without_data_exits_2(tv, capsys):
    code, _out, err = run_cli(eval_main, [tv["weights"], "--ten-crop", "--device", "cpu"], capsys)
    assert code == 2
    one_line_error(err, "--data")


# --------------------------------------------------------------------------- 5. DDP


def test_ddp_ten_crop_eval_counts_every_image_once_and_matches_one_process(run, capsys, tmp_path):
    single_json, single_csv = tmp_path / "single.json", tmp_path / "single.csv"
    code, _out, err = run_cli(eval_main, [run["ckpt"], "--data", run["val"], "--ten-crop", "--json", single_json,
                                          "--predictions", single_csv, "--device", "cpu", "--batch-size", "2"],
                              capsys)
    assert code == 0, err
    ddp_json, ddp_csv = tmp_path / "ddp.json", tmp_path / "ddp.csv"
    # the README's form: torchrun -m alexnet_train eval (works where console scripts are pyenv shims)
    cmd = [console_script("torchrun"), "--standalone", "--nproc_per_node", "2", "-m", "alexnet_train", "eval",
           str(run["ckpt"]), "--data", str(run["val"]), "--ten-crop", "--json", str(ddp_json),
           "--predictions", str(ddp_csv), "--device", "cpu", "--batch-size", "2"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    # one table, from rank 0 only
    assert sum(ln.split()[:1] == ["ten-crop"] for ln in done.stdout.splitlines()) == 1, done.stdout
    single, ddp = json.loads(single_json.read_text()), json.loads(ddp_json.read_text())
    assert set(ddp) == {"center", "ten_crop"}
    for key in ("center", "ten_crop"):
        assert ddp[key]["images"] == single[key]["images"] == N_VAL
        assert ddp[key]["top1"] == pytest.approx(single[key]["top1"], abs=1e-9)
        assert ddp[key]["top5"] == pytest.approx(single[key]["top5"], abs=1e-9)
        assert ddp[key]["loss"] == pytest.approx(single[key]["loss"], rel=1e-6)
    assert ddp_csv.read_text() == single_csv.read_text()
    assert len(read_csv(ddp_csv)) == N_VAL + 1


# --------------------------------------------------------------------------- 6. bad usage and bad files


def test_batch_size_0_exits_2(run, capsys):
    code, _out, err = run_cli(eval_main, [run["ckpt"], "--ten-crop", "--batch-size", "0"], capsys)
    assert code == 2
    one_line_error(err, "--batch-size")


def test_missing_checkpoint_exits_1_naming_it(capsys, tmp_path):
    missing = tmp_path / "missing.pth"
    code, _out, err = run_cli(eval_main, [missing, "--ten-crop", "--data", tmp_path], capsys)
    assert code == 1
    one_line_error(err, str(missing))


@pytest.mark.parametrize("workers", ["0", "1"])
def test_ten_crop_bad_image_under_the_error_policy_exits_1_naming_it(run, capsys, tmp_path, workers):
    data = tmp_path / "val"
    shutil.copytree(run["val"], data)
    bad = data / ALL[3] / f"{ALL[3]}_000x.JPEG"  # sorts inside the folder, mid-batch
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    report, preds = tmp_path / "eval.json", tmp_path / "preds.csv"
    code, _out, err = run_cli(eval_main, [run["ckpt"], "--data", data, "--ten-crop", "--json", report,
                                          "--predictions", preds, "--workers", workers, "--batch-size", "4",
                                          "--device", "cpu"], capsys)
    assert code == 1
    one_line_error(err, str(bad))
    assert not report.exists() and not preds.exists()


@pytest.mark.parametrize("batch_size", ["4", "1"])  # 1: a batch holding only the unreadable image
def test_ten_crop_predictions_skip_a_bad_image_under_the_skip_policy(run, capsys, tmp_path, batch_size):
    state = torch.load(run["ckpt"], map_location="cpu", weights_only=True)
    state["config"]["data"]["on_bad_image"] = "skip"
    state["config"]["data"]["max_bad_fraction"] = 0.5
    ckpt = tmp_path / "skip.pth"
    torch.save(state, ckpt)
    data = tmp_path / "val"
    shutil.copytree(run["val"], data)
    bad = data / ALL[3] / f"{ALL[3]}_000x.JPEG"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    report, preds = tmp_path / "eval.json", tmp_path / "preds.csv"
    code, out, err = run_cli(eval_main, [ckpt, "--data", data, "--ten-crop", "--json", report,
                                         "--predictions", preds, "--batch-size", batch_size, "--workers", "0",
                                         "--device", "cpu"], capsys)
    assert code == 0, err
    assert str(bad) in out + err
    payload = json.loads(report.read_text())
    assert payload["ten_crop"]["images"] == payload["center"]["images"] == N_VAL
    assert_metrics(payload["ten_crop"], metrics(run["probs"], run["targets"], probs=True))
    rows = read_csv(preds)[1:]
    check_predictions(rows, reference_by_name(run, run["probs"]), ALL)
    assert all(Path(r[0]).parent.parent == data for r in rows)
