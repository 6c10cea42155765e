"""End-to-end tests of ``alexnet-eval`` and ``alexnet-summary`` on real checkpoints written by ``alexnet-train``."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from alexnet_train.cli import eval_main, summary_main, train_main

from .conftest import CLASSES, REPO, TINY_DATA, console_script as script, tiny_overrides, write_image_folder

pytestmark = pytest.mark.slow

CONFIGS = REPO / "configs"
DEMO = str(CONFIGS / "demo.yaml")





def eval_ok(capsys, *args: str) -> str:
    try:
        eval_main(list(args))
    except SystemExit as exc:  # pragma: no cover - shown on failure only
        pytest.fail(f"alexnet-eval exited {exc.code}: {capsys.readouterr().err}")
    return capsys.readouterr().out


def exits(capsys, main, *args: str) -> tuple[int, str]:
    with pytest.raises(SystemExit) as info:
        main(list(args))
    return info.value.code, capsys.readouterr().err


def one_line(err: str, prog: str, *needles: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected a one-line error, got: {err!r}"
    assert lines[0].startswith(f"{prog}: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run that has learned conftest's colour classes (100% val top-1 for this seed; see
    test_cli_train.py::test_tiny_model_learns_the_colour_classes): (out, val_dir, n_val)."""
    root = tmp_path_factory.mktemp("colours")
    train = write_image_folder(root / "train", CLASSES, 32, seed=10)
    val = write_image_folder(root / "val", CLASSES, 8, seed=20)
    out = root / "OUT"
    train_main(["--config", DEMO, "--set", *tiny_overrides(train, val, len(CLASSES), 5),
                "model.conv_widths=[32,32,32,32,32]", "model.fc_widths=[64,64]", "schedule.kind=cosine",
                "--out", str(out)])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["val_top1"] >= 90.0, "the fixture run did not learn; the class-index checks below need it"
    return out, val, 8 * len(CLASSES)


# --------------------------------------------------------------------------- alexnet-eval


def test_eval_prints_top1_and_top5_of_best_checkpoint(trained, capsys):
    out, val, n_val = trained
    text = eval_ok(capsys, str(out / "best.pth"))
    assert "top-1" in text and "top-5" in text
    assert f"on {val}: {n_val} images" in text


def test_eval_json_matches_the_training_runs_last_validation(trained, capsys, tmp_path):
    out, _val, n_val = trained
    report = tmp_path / "eval.json"
    eval_ok(capsys, str(out / "last.pth"), "--json", str(report))
    payload = read_json(report)
    assert set(payload) == {"center"}
    center = payload["center"]
    assert set(center) == {"top1", "top5", "loss", "images"}
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert center["images"] == n_val == last["val_images"]
    assert center["top1"] == pytest.approx(last["val_top1"], abs=1e-6)
    assert center["top5"] == pytest.approx(last["val_top5"], abs=1e-6)
    assert center["loss"] == pytest.approx(last["val_loss"], rel=1e-5)


def test_eval_script_exits_0_and_writes_json(trained, tmp_path):
    out, _val, n_val = trained
    report = tmp_path / "eval.json"
    proc = subprocess.run([script("alexnet-eval"), str(out / "best.pth"), "--json", str(report)],
                          capture_output=True, text=True, timeout=120, env=os.environ.copy())
    assert proc.returncode == 0, proc.stderr
    assert "top-1" in proc.stdout
    assert read_json(report)["center"]["images"] == n_val


def test_eval_folder_with_some_classes_scores_against_the_checkpoints_classes(trained, capsys, tmp_path):
    out, val, _n_val = trained
    subset = tmp_path / "only-second-class"
    shutil.copytree(val / CLASSES[1], subset / CLASSES[1])
    report = tmp_path / "eval.json"
    eval_ok(capsys, str(out / "last.pth"), "--data", str(subset), "--json", str(report))
    center = read_json(report)["center"]
    assert center["images"] == 8
    # The model recognises the colours, so it predicts index 1 for these images; scored as
    # the subset folder's own index (0) they would all be wrong.
    assert center["top1"] >= 90.0


def test_eval_folder_with_an_unknown_class_exits_2_naming_it(trained, capsys, tmp_path):
    out, val, _n_val = trained
    data = tmp_path / "val"
    shutil.copytree(val / CLASSES[0], data / CLASSES[0])
    shutil.copytree(val / CLASSES[1], data / "n99999999")
    code, err = exits(capsys, eval_main, str(out / "last.pth"), "--data", str(data))
    assert code == 2
    one_line(err, "alexnet-eval", "n99999999")


def test_eval_flat_folder_with_labels_file(trained, capsys, tmp_path):
    out, val, n_val = trained
    flat = tmp_path / "flat"
    flat.mkdir()
    lines = []
    for image in sorted(val.rglob("*.JPEG")):
        shutil.copy(image, flat / image.name)
        lines.append(f"{image.name} {image.parent.name}\n")
    labels = tmp_path / "val_labels.txt"
    labels.write_text("".join(lines))

    flat_json, tree_json = tmp_path / "flat.json", tmp_path / "tree.json"
    eval_ok(capsys, str(out / "last.pth"), "--data", str(flat), "--labels", str(labels), "--json", str(flat_json))
    eval_ok(capsys, str(out / "last.pth"), "--data", str(val), "--json", str(tree_json))
    flat_c, tree_c = read_json(flat_json)["center"], read_json(tree_json)["center"]
    assert flat_c["images"] == n_val
    assert flat_c["top1"] == pytest.approx(tree_c["top1"], abs=1e-6)
    assert flat_c["top1"] >= 90.0


def test_eval_missing_checkpoint_exits_1_naming_it(tmp_path):
    missing = tmp_path / "nope.pth"
    proc = subprocess.run([script("alexnet-eval"), str(missing)], capture_output=True, text=True, timeout=120,
                          env=os.environ.copy())
    assert proc.returncode == 1
    one_line(proc.stderr, "alexnet-eval", str(missing))


@pytest.mark.parametrize("content", [b"this is not a checkpoint\n", os.urandom(4096)], ids=["text", "random-bytes"])
def test_eval_garbage_checkpoint_exits_1_naming_it(content, capsys, tmp_path):
    bad = tmp_path / "garbage.pth"
    bad.write_bytes(content)
    code, err = exits(capsys, eval_main, str(bad))
    assert code == 1
    one_line(err, "alexnet-eval", str(bad))


def test_eval_batch_size_0_exits_2(trained, capsys):
    out, *_ = trained
    code, err = exits(capsys, eval_main, str(out / "last.pth"), "--batch-size", "0")
    assert code == 2
    one_line(err, "alexnet-eval", "--batch-size")


# --------------------------------------------------------------------------- torchvision compatibility


def test_torchvision_arch_checkpoint_loads_strictly_into_torchvision_alexnet(capsys, tmp_path):
    import torchvision

    # A real 1-epoch CLI run of the ~57 M-parameter torchvision arch (3 classes) at crop 64;
    # one training step (6 images, batch 6) keeps it at a few seconds on a CPU.
    train = write_image_folder(tmp_path / "train", CLASSES, 2, seed=1)
    val = write_image_folder(tmp_path / "val", CLASSES, 1, seed=2)
    out = tmp_path / "OUT"
    train_main(["--config", DEMO, "--set", *TINY_DATA, "data.batch_size=6",
                f"data.train_dir={train}", f"data.val_dir={val}", "model.num_classes=3",
                "model.arch=torchvision", "model.groups=1", "model.init=torch",
                "train.epochs=1", "train.device=cpu", "train.keep_last=0", "--out", str(out)])
    capsys.readouterr()
    state = torch.load(out / "last.pth", map_location="cpu", weights_only=True)
    reference = torchvision.models.alexnet(num_classes=3)
    reference.load_state_dict(state["model"], strict=True)
    assert sum(p.numel() for p in reference.parameters()) == 61_100_840 - 997 * (4096 + 1)  # 1000 -> 3 classes
    # and the loaded weights are the trained ones, not torchvision's fresh init
    key = "classifier.6.weight"
    assert torch.equal(reference.state_dict()[key], state["model"][key])


# --------------------------------------------------------------------------- alexnet-summary


@pytest.mark.parametrize(
    "args, total",
    [
        (["--config", str(CONFIGS / "paper.yaml")], "60,965,224"),
        (["--config", str(CONFIGS / "paper.yaml"), "--set", "model.groups=1"], "62,378,344"),
        (["--config", str(CONFIGS / "torchvision.yaml")], "61,100,840"),
    ],
    ids=["paper", "paper-groups1", "torchvision"],
)
def test_summary_prints_parameter_totals(args, total, capsys):
    summary_main(args)
    text = capsys.readouterr().out
    assert f"parameters: {total} " in text
    total_row = next(ln for ln in text.splitlines() if ln.startswith("total"))
    assert total in total_row
    assert any("256x6x6" in ln.split() for ln in text.splitlines()), text


def test_summary_of_paper_yaml_as_torchvision_ignores_its_groups_with_a_notice(capsys):
    # paper.yaml sets groups: 2, which torchvision's AlexNet has no use for (this exited 2).
    summary_main(["--config", str(CONFIGS / "paper.yaml"), "--set", "model.arch=torchvision"])
    captured = capsys.readouterr()
    assert captured.err.splitlines() == ["notice: model.groups is ignored: model.arch=torchvision does not use it "
                                         "(only paper and custom do)"]
    assert "arch=torchvision groups=1 " in captured.out and "parameters: 61,100,840 " in captured.out


def test_summary_of_finetune_yaml_counts_the_class_folders_for_num_classes_null(capsys, tmp_path):
    for name in ("a", "b", "c", "d", "e"):
        (tmp_path / "train" / name).mkdir(parents=True)
    (tmp_path / "train" / "notes.txt").write_text("not a class")
    (tmp_path / "train" / ".ipynb_checkpoints").mkdir()  # hidden: not a class for training either
    summary_main(["--config", str(CONFIGS / "finetune.yaml"), "--set", f"data.train_dir={tmp_path / 'train'}"])
    text = capsys.readouterr().out
    assert "arch=torchvision groups=1 num_classes=5 " in text
    # torchvision's AlexNet with a 5-way fc8: 61,100,840 - 995 * (4096 + 1)
    assert "parameters: 57,024,325 " in text
    code, err = exits(capsys, summary_main, "--config", str(CONFIGS / "finetune.yaml"))
    assert code == 2
    one_line(err, "alexnet-summary", "model.num_classes", "data.train_dir", "not set")


def test_summary_bad_key_exits_2(capsys):
    code, err = exits(capsys, summary_main, "--config", str(CONFIGS / "paper.yaml"), "--set", "model.foo=1")
    assert code == 2
    one_line(err, "alexnet-summary", "model.foo")


def test_python_dash_m_runs_every_command_by_name():
    """``python -m alexnet_train [COMMAND]``: the torchrun-friendly form of the console scripts."""
    done = subprocess.run([sys.executable, "-m", "alexnet_train", "summary", "--config", str(CONFIGS / "paper.yaml")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "60,965,224" in done.stdout, done.stderr
    done = subprocess.run([sys.executable, "-m", "alexnet_train", "--config", str(CONFIGS / "paper.yaml"),
                           "--print-config"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "init: caffe" in done.stdout, done.stderr  # no command name: train
    done = subprocess.run([sys.executable, "-m", "alexnet_train", "eval"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.startswith("usage: alexnet-eval")
