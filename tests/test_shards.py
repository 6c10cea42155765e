"""WebDataset shards read by index: the timm/imagenet-1k-wds layout made here from real JPEGs,
training, evaluation, resume and 2-rank DDP on shards, and files against shards."""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import tarfile
from pathlib import Path

import pytest
import torch

from alexnet_train.data.datasets import check_dir, labelled_samples, scan_image_folder
from alexnet_train.data.decode import read_bytes
from alexnet_train.data.shardindex import shard_index
from alexnet_train.data.shards import find_shards
from alexnet_train.errors import BadImageError, DataError

from .conftest import DEMO_CONFIG as DEMO, assert_bit_identical, checkpoint_weights, console_script, read_metrics
from .conftest import run_train, tiny_overrides, write_image_folder

CLASSES = ["n01440764", "n01443537", "n01484850"]


def _add(tar: tarfile.TarFile, name: str, data: bytes, pax: bool) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 1700000000, 0o444
    if pax:  # a PAX extended header before the member, as GNU tar and webdataset writers make
        info.pax_headers = {"comment": "x" * 600}
    tar.addfile(info, io.BytesIO(data))


def write_wds(folder: Path, prefix: str, tree: Path, per_shard: int, digits: int, split: str) -> list[Path]:
    """``tree``'s images as timm/imagenet-1k-wds shards: KEY.jpg, KEY.cls, KEY.json; PAX
    headers on every other sample; ``_info.json`` updated with this split."""
    files = sorted(p for p in tree.rglob("*.JPEG"))
    shards = []
    for s in range(0, len(files), per_shard):
        path = folder / f"{prefix}-{s // per_shard:0{digits}d}.tar"
        with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
            for i, f in enumerate(files[s : s + per_shard]):
                wnid, key = f.parent.name, f.stem
                label = CLASSES.index(wnid)
                meta = {"filename": f"{wnid}/{f.name}", "label": label, "height": 0, "width": 0}
                _add(tar, f"{key}.jpg", f.read_bytes(), pax=i % 2 == 0)
                _add(tar, f"{key}.cls", str(label).encode(), pax=False)
                _add(tar, f"{key}.json", json.dumps(meta).encode(), pax=False)
        shards.append(path)
    info_path = folder / "_info.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else {"name": "test", "splits": {}}
    info["splits"][split] = {"name": split, "filenames": [p.name for p in shards],
                             "shard_lengths": [min(per_shard, len(files) - i * per_shard) for i in range(len(shards))],
                             "num_samples": len(files)}
    info_path.write_text(json.dumps(info))
    return shards


@pytest.fixture
def wds(tmp_path):
    """(train tree, val tree, the shard folder): one folder holding both splits, as timm's."""
    train = write_image_folder(tmp_path / "train", CLASSES, 8, seed=1)
    val = write_image_folder(tmp_path / "val", CLASSES, 3, seed=2)
    folder = tmp_path / "imagenet-1k-wds"
    folder.mkdir()
    write_wds(folder, "imagenet1k-train", train, 10, 4, "train")
    write_wds(folder, "imagenet1k-validation", val, 4, 2, "validation")  # two-digit, as timm's files are
    return train, val, folder


def test_a_folder_of_two_splits_names_the_choices(wds):
    _, _, folder = wds
    with pytest.raises(DataError, match=r"data.val_dir: .* holds the shards of 2 splits; name one: .*"
                                        r"imagenet1k-train-\*\.tar \(3 shards\), .*imagenet1k-validation-\*\.tar"):
        check_dir(str(folder), "data.val_dir")


def test_every_sample_reads_as_its_file_by_pattern_and_by_brace(wds):
    train, _, folder = wds
    classes, samples = scan_image_folder(str(folder / "imagenet1k-train-*.tar"))
    assert classes == CLASSES and len(samples) == 24
    braced = find_shards(str(folder / "imagenet1k-train-{0000..0002}.tar"), "k")
    assert braced == find_shards(str(folder / "imagenet1k-train-*.tar"), "k")
    originals = {p.stem: p for p in train.rglob("*.JPEG")}
    for path, label in samples:
        key = path.split("::")[1].split(".jpg@")[0]
        assert read_bytes(path) == originals[key].read_bytes()
        assert CLASSES[label] == originals[key].parent.name


def test_the_index_is_read_back_and_rebuilt_when_a_shard_changes(wds):
    _, _, folder = wds
    shards = find_shards(str(folder / "imagenet1k-validation-*.tar"), "k")
    first = shard_index(shards)
    assert "index written" in first.how
    again = shard_index(shards)
    assert "from the index" in again.how and again.samples == first.samples
    os.utime(shards[0], ns=(1, 1))
    assert "read in" in shard_index(shards).how


def test_cls_and_json_disagreeing_is_one_line_naming_shard_and_key(tmp_path):
    folder = tmp_path / "wds"
    folder.mkdir()
    with tarfile.open(folder / "x-0000.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
        _add(tar, "k1.jpg", b"\xff\xd8\xff", pax=False)
        _add(tar, "k1.cls", b"2", pax=False)
        _add(tar, "k1.json", json.dumps({"filename": "n01/k1.JPEG", "label": 1}).encode(), pax=False)
    with pytest.raises(DataError, match=r"x-0000.tar: k1: .cls says 2 but .json's label is 1"):
        scan_image_folder(str(folder))


def test_a_cut_shard_serves_what_precedes_the_cut_and_counts_the_rest_as_unreadable(wds):
    _, _, folder = wds
    last = folder / "imagenet1k-train-0002.tar"
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 2])  # 4 samples promised by _info.json
    lines: list[str] = []
    _, samples = scan_image_folder(str(folder / "imagenet1k-train-*.tar"), lines.append)
    assert len(samples) == 24
    lost = [p for p, _ in samples if "lost-" in p]
    assert 1 <= len(lost) <= 4 and any("samples of damaged shards are lost" in line for line in lines)
    with pytest.raises(BadImageError, match="lost: the shard is damaged before this sample"):
        read_bytes(lost[0])
    readable = [p for p, _ in samples if "lost-" not in p]
    assert all(read_bytes(p)[:2] == b"\xff\xd8" for p in readable)


def _args(train: str, val: str, out: Path, *extra: str, epochs: int = 2) -> list[str]:
    return ["--config", DEMO, "--out", str(out), "--set", *tiny_overrides(Path(train), Path(val), 3, epochs),
            "data.batch_size=4", *extra]


def _eval(ckpt: Path, data: str, tmp_path: Path, name: str) -> tuple[dict, dict]:
    js, preds = tmp_path / f"{name}.json", tmp_path / f"{name}.csv"
    done = subprocess.run([console_script("alexnet-eval"), str(ckpt), "--data", data, "--device", "cpu", "--ten-crop",
                           "--json", str(js), "--predictions", str(preds)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    rows = {}
    for line in preds.read_text().splitlines()[1:]:
        path, *rest = line.split(",")
        key = path.split("::")[1].split(".jpg@")[0] if "::" in path else Path(path).stem
        rows[key] = rest
    return json.loads(js.read_text()), rows


@pytest.mark.slow
def test_train_on_shards_and_files_vs_shards_evaluate_identically(wds, tmp_path):
    train, val, folder = wds
    out = tmp_path / "run"
    shards_train, shards_val = str(folder / "imagenet1k-train-*.tar"), str(folder / "imagenet1k-validation-*.tar")
    assert run_train(_args(shards_train, shards_val, out)) == 0
    rows = read_metrics(out)
    assert [r["epoch"] for r in rows] == [1, 2] and all(r["val_images"] == 9 for r in rows)
    assert torch.load(out / "last.pth", weights_only=True)["classes"] == CLASSES
    on_files, files_rows = _eval(out / "best.pth", str(val), tmp_path, "files")
    on_shards, shard_rows = _eval(out / "best.pth", shards_val, tmp_path, "shards")
    assert on_files == on_shards and files_rows == shard_rows and len(shard_rows) == 9


@pytest.mark.slow
def test_sigterm_mid_epoch_on_shards_resumes_bit_identically(wds, tmp_path):
    _, _, folder = wds
    t, v = str(folder / "imagenet1k-train-*.tar"), str(folder / "imagenet1k-validation-*.tar")
    extra = ("data.batch_size=2", "train.log_interval=1", "data.workers=2")
    assert run_train(_args(t, v, tmp_path / "straight", *extra)) == 0
    out = tmp_path / "stopped"
    proc = subprocess.Popen([console_script("alexnet-train"), *_args(t, v, out, *extra)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1)
    for line in proc.stdout:
        if line.startswith("epoch 1/2 train 5/"):
            proc.send_signal(signal.SIGTERM)
            break
    rest = proc.communicate(timeout=60)[0]
    assert proc.returncode == 128 + signal.SIGTERM, rest
    assert run_train(_args(t, v, out, *extra)) == 0
    assert_bit_identical(checkpoint_weights(tmp_path / "straight" / "last.pth"), checkpoint_weights(out / "last.pth"))


@pytest.mark.slow
def test_two_rank_ddp_on_shards_counts_every_val_image_once(wds, tmp_path):
    _, _, folder = wds
    out = tmp_path / "ddp"
    cmd = [console_script("torchrun"), "--standalone", "--nproc_per_node", "2", console_script("alexnet-train"),
           *_args(str(folder / "imagenet1k-train-*.tar"), str(folder / "imagenet1k-validation-*.tar"), out,
                  "dist.mode=ddp", "train.device=cpu")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert [r["val_images"] for r in read_metrics(out)] == [9, 9]
    assert "read the index" in done.stdout  # rank 1 read the index rank 0 wrote


def test_val_shards_must_agree_with_the_training_classes(wds):
    _, _, folder = wds
    with pytest.raises(DataError, match="class 0 is n01440764 in the shards, which is not one of the 3 training classes"):
        labelled_samples(str(folder / "imagenet1k-validation-*.tar"), ["nXXX", "n01443537", "n01484850"])


@pytest.mark.slow
def test_device_decoding_and_stats_read_shards(wds, tmp_path):
    _, _, folder = wds
    t, v = str(folder / "imagenet1k-train-*.tar"), str(folder / "imagenet1k-validation-*.tar")
    out = tmp_path / "device"
    assert run_train(_args(t, v, out, "data.decode=device", "data.workers=2", epochs=1)) == 0
    assert read_metrics(out)[0]["val_images"] == 9
    done = subprocess.run([console_script("alexnet-stats"), t, "--samples", "24", "--workers", "0"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "mean" in done.stdout


def test_more_shards_than_open_files_allowed_still_read(tmp_path):
    """ImageNet's 1,024 train shards against a soft limit of 1,024 open files: here 60 shards
    against a limit of 40 that cannot be raised (hard = soft), in a process of its own."""
    import sys

    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(60):
        with tarfile.open(folder / f"s-{i:04d}.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
            _add(tar, f"k{i:02d}.jpg", b"\xff\xd8" + bytes([i]), pax=False)
            _add(tar, f"k{i:02d}.cls", b"0", pax=False)
    script = (
        "import resource, sys\n"
        "from alexnet_train.data.shards import find_shards\n"
        "from alexnet_train.data.shardindex import shard_index\n"
        "from alexnet_train.data.shardread import read_member\n"
        f"index = shard_index(find_shards({str(folder)!r}, 'k'))\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (40, 40))\n"
        "got = [read_member(index.samples.path(j))[2] for j in range(60)]\n"
        "sys.exit(0 if got == list(range(60)) else 1)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]


def test_what_prepare_shards_writes_is_what_training_reads(tmp_path):
    from alexnet_train.data.shardwriter import write_shards

    train = write_image_folder(tmp_path / "train", CLASSES, 6, seed=3)
    val = write_image_folder(tmp_path / "val", CLASSES, 2, seed=4)
    out = tmp_path / "wds"
    write_shards(train, out, size=64, shard_size=60_000, log=lambda _m: None)
    write_shards(val, out, size=64, shard_size=60_000, log=lambda _m: None)
    with pytest.raises(DataError, match="holds the shards of 2 splits"):
        check_dir(str(out), "data.train_dir")
    classes, samples = scan_image_folder(str(out / "imagenet1k-train-*.tar"))
    assert classes == CLASSES and len(samples) == 18
    assert sorted(CLASSES[label] for _, label in samples) == sorted(p.parent.name for p in train.rglob("*.JPEG"))
    val_samples = labelled_samples(str(out / "imagenet1k-validation-*.tar"), classes)
    assert len(val_samples) == 6
    from alexnet_train.data.decode import decode_rgb

    assert all(decode_rgb(path).shape == (3, 64, 64) for path, _ in samples)


def test_a_file_that_is_no_tar_is_one_line_naming_it(tmp_path):
    folder = tmp_path / "wds"
    folder.mkdir()
    (folder / "x-0000.tar").write_bytes(b"not a tar at all" * 100)
    with pytest.raises(DataError, match=r"x-0000.tar: not a readable tar shard"):
        scan_image_folder(str(folder))


def test_alexnet_summary_counts_the_classes_of_shards(wds, capsys):
    from alexnet_train.cli import summary_main

    _, _, folder = wds
    summary_main(["--config", DEMO, "--set", "model.num_classes=null",
                  f"data.train_dir={folder / 'imagenet1k-train-*.tar'}"])
    assert "num_classes=3" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize("policy, code", [("skip", 0), ("error", 1)])
def test_a_lost_sample_one_rank_meets_alone_ends_both_ranks_alike(wds, tmp_path, policy, code):
    """A cut shard without _info.json: one lost sample, read by one of the two ranks alone."""
    _, _, folder = wds
    (folder / "_info.json").unlink()
    last = folder / "imagenet1k-train-0002.tar"
    with tarfile.open(last) as tar:  # cut inside the last image: that sample, and only it, is lost
        inside = [m for m in tar.getmembers() if m.name.endswith(".jpg")][-1].offset_data + 100
    last.write_bytes(last.read_bytes()[:inside])
    out = tmp_path / "ddp"
    cmd = [console_script("torchrun"), "--standalone", "--nproc_per_node", "2", console_script("alexnet-train"),
           *_args(str(folder / "imagenet1k-train-*.tar"), str(folder / "imagenet1k-validation-*.tar"), out,
                  "dist.mode=ddp", "train.device=cpu", f"data.on_bad_image={policy}", "data.max_bad_fraction=0.5",
                  "dist.timeout_minutes=1", epochs=1)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert done.returncode == code, done.stdout[-2000:] + done.stderr[-2000:]
    assert "terminate called" not in done.stderr
    if policy == "skip":
        assert [r["bad_images"] for r in read_metrics(out)] == [1]
    else:
        errors = [line for line in done.stderr.splitlines() if "alexnet-train: error:" in line]
        assert len(errors) == 1 and "lost: the shard is damaged before this sample" in errors[0], done.stderr[-2000:]
