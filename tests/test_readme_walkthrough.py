"""The README's "Reproduce AlexNet in five steps", run as written on small ILSVRC-2012-shaped tar files.

The shell blocks are read from README.md itself (so the README cannot drift
from the code): step 1's ``alexnet-data ilsvrc`` on the train tar of per-class
tars, the flat val tar and the devkit with its ground truth and meta.mat, step
2's alexnet-prepare, step 3's one-GPU training command (on the CPU here) and
step 4's ``alexnet-eval --ten-crop``; then docs/data.md's ``alexnet-stats``
block, which the README points to.  Only the paths change (``/path/to/``
becomes the folder of the fake tars, ``/data/`` a temporary folder), ``pip
install`` lines are skipped (the dev install already has scipy),
``alexnet-data`` gets ``--no-verify`` (these tars are not image-net.org's, so
their MD5s differ), and the training command gets a one-epoch, three-class,
tiny-batch tail.  Step 3's torchrun block is not run here (it needs several
processes); tests/test_docs.py parses it with the training command's parser.
"""
from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from .conftest import CLASSES, REPO, read_metrics
from .test_data_quirks import write_meta_mat

pytestmark = pytest.mark.slow

DEVKIT_IDS = {CLASSES[1]: 1, CLASSES[2]: 2, CLASSES[0]: 3}  # the devkit's own synset order
VAL_LABELS = [CLASSES[i] for i in (0, 1, 2, 2, 1, 0)]  # ILSVRC2012_val_00000001 .. 6
TRAIN_PER_CLASS = 4


def jpeg_bytes(rng: np.random.Generator, colour: int, w: int, h: int) -> bytes:
    base = np.array([(colour * 97) % 256, (colour * 53 + 80) % 256, (colour * 151 + 30) % 256], dtype=np.float64)
    arr = np.clip(base + rng.normal(0, 20, size=(h, w, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr, "RGB").save(buf, "JPEG", quality=90)
    return buf.getvalue()


def add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_ilsvrc_tars(folder: Path) -> None:
    """ILSVRC2012_img_train.tar (one tar per wnid), ILSVRC2012_img_val.tar (flat), the devkit .tar.gz."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    with tarfile.open(folder / "ILSVRC2012_img_train.tar", "w") as outer:
        for ci, wnid in enumerate(CLASSES):
            inner = io.BytesIO()
            with tarfile.open(fileobj=inner, mode="w") as tar:
                for i in range(TRAIN_PER_CLASS):
                    add_bytes(tar, f"{wnid}_{1000 + i}.JPEG", jpeg_bytes(rng, ci, 300 + 17 * i, 280))
            add_bytes(outer, f"{wnid}.tar", inner.getvalue())
    with tarfile.open(folder / "ILSVRC2012_img_val.tar", "w") as tar:
        for i, wnid in enumerate(VAL_LABELS, 1):
            add_bytes(tar, f"ILSVRC2012_val_{i:08d}.JPEG", jpeg_bytes(rng, CLASSES.index(wnid), 320, 290))
    devkit = folder / "devkit-src" / "ILSVRC2012_devkit_t12" / "data"
    devkit.mkdir(parents=True)
    (devkit / "ILSVRC2012_validation_ground_truth.txt").write_text("".join(f"{DEVKIT_IDS[w]}\n" for w in VAL_LABELS))
    write_meta_mat(devkit / "meta.mat", DEVKIT_IDS)
    with tarfile.open(folder / "ILSVRC2012_devkit_t12.tar.gz", "w:gz") as tar:
        tar.add(folder / "devkit-src" / "ILSVRC2012_devkit_t12", arcname="ILSVRC2012_devkit_t12")
    shutil.rmtree(folder / "devkit-src")


def readme_blocks(start: str, end: str, doc: str = "README.md") -> list[str]:
    """The ```bash blocks of ``doc`` (README.md) between the headings ``start`` and ``end``."""
    text = (REPO / doc).read_text()
    section = text[text.index(start): text.index(end)]
    return re.findall(r"```bash\n(.*?)```", section, flags=re.S)


def localise(block: str, tars: Path, root: Path) -> str:
    lines = [line for line in block.splitlines() if not line.strip().startswith("pip install")]
    text = "\n".join(lines).replace("/path/to/", f"{tars}/")
    return re.sub(r"(?<![\w.-])/data/", f"{root}/data/", text) + "\n"  # absolute /data/ only, not .../t12/data/


@pytest.fixture(scope="module")
def walkthrough(tmp_path_factory):
    pytest.importorskip("scipy.io")
    tmp = tmp_path_factory.mktemp("readme")
    tars, work = tmp / "tars", tmp / "work"
    write_ilsvrc_tars(tars)
    shutil.copytree(REPO / "configs", work / "configs")
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    steps = readme_blocks("## Reproduce AlexNet in five steps", "## Running unattended")
    stats = readme_blocks("## Mean pixel and colour PCA", "## Bad images", doc="docs/data.md")
    kinds = [next((k for k in ("torchrun", "alexnet-data ilsvrc", "alexnet-prepare", "alexnet-train", "alexnet-eval")
                   if k in block), None) for block in steps]
    assert kinds == ["alexnet-data ilsvrc", "alexnet-prepare", "alexnet-train", "torchrun", "alexnet-eval"], (
        f"the README's five steps changed shape ({kinds}): update this test")
    assert len(stats) == 1 and "alexnet-stats" in stats[0], "docs/data.md's stats block changed shape"
    results = []

    def run(script: str, timeout: int) -> None:
        results.append(subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=work, env=env,
                                      capture_output=True, text=True, timeout=timeout))

    for kind, block in zip(kinds, steps):
        script = localise(block, tars, tmp)
        if kind == "torchrun":
            continue
        if kind == "alexnet-data ilsvrc":
            script = script.replace("alexnet-data ilsvrc ", "alexnet-data ilsvrc --no-verify ")
        if kind == "alexnet-prepare":
            script = script.replace("--workers 16", "--workers 2")
        if kind == "alexnet-train":
            script = script.rstrip("\n") + (
                " \\\n    train.epochs=1 model.num_classes=3 data.batch_size=6 data.workers=0\n")
        run(script, 600 if kind == "alexnet-train" else 300)
    run(localise(stats[0], tars, tmp).replace("--workers 16", "--workers 2"), 300)
    return tmp, work, results


def test_every_walkthrough_command_succeeds(walkthrough):
    _, _, results = walkthrough
    for r in results:
        assert r.returncode == 0, f"{r.args[-1]}\nstdout:\n{r.stdout[-2000:]}\nstderr:\n{r.stderr[-2000:]}"


def test_train_tar_becomes_an_image_folder(walkthrough):
    tmp, _, _ = walkthrough
    train = tmp / "data" / "imagenet" / "train"
    assert sorted(p.name for p in train.iterdir()) == sorted(CLASSES)  # the per-class tars are gone
    for wnid in CLASSES:
        assert len(list((train / wnid).glob("*.JPEG"))) == TRAIN_PER_CLASS


def test_prepared_copy_is_the_256_square(walkthrough):
    tmp, _, _ = walkthrough
    prepared = tmp / "data" / "imagenet256"
    files = sorted(prepared.glob("train/*/*.JPEG")) + sorted(prepared.glob("val/*/*.JPEG"))
    assert len(files) == len(CLASSES) * TRAIN_PER_CLASS + len(VAL_LABELS)
    for f in files:
        with Image.open(f) as im:
            assert im.size == (256, 256)


def test_stats_file_is_an_includable_config(walkthrough):
    _, work, _ = walkthrough
    stats = yaml.safe_load((work / "configs" / "imagenet-stats.yaml").read_text())
    mean = stats["data"]["mean"]
    assert len(mean) == 3 and all(0 < m < 255 for m in mean)
    assert len(stats["data"]["eigval"]) == 3


def test_training_used_the_devkit_labels(walkthrough):
    """Val was sorted into wnid folders by the devkit's labels; training scored all of it."""
    _, work, _ = walkthrough
    out = work / "runs" / "paper"
    rows = read_metrics(out)
    assert [r["epoch"] for r in rows] == [1]
    assert rows[0]["val_images"] == len(VAL_LABELS)
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["data"]["val_labels"] is None
    assert saved["model"]["arch"] == "paper"


def test_val_is_sorted_by_the_devkit(walkthrough):
    tmp, _, _ = walkthrough
    val = tmp / "data" / "imagenet" / "val"
    got = {p.name: p.parent.name for p in val.glob("*/*.JPEG")}
    assert got == {f"ILSVRC2012_val_{i:08d}.JPEG": w for i, w in enumerate(VAL_LABELS, 1)}


def test_ten_crop_eval_scored_every_val_image(walkthrough):
    """Step 4 evaluated step 3's best.pth on the config's val folder, centre and ten-crop."""
    import json

    _, work, _ = walkthrough
    scores = json.loads((work / "runs" / "paper" / "eval.json").read_text())
    assert set(scores) == {"center", "ten_crop"}
    assert scores["ten_crop"]["images"] == scores["center"]["images"] == len(VAL_LABELS)
