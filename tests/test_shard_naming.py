"""Naming a split the way people do: every spelling of a path (relative, ./x, ../x, absolute,
a symlink, ~) from any working directory, for image files, the 256 px copy and shards; and
webdataset's own conventions (keys at the first dot, brace expansion, '-' or '_' numbering)."""
from __future__ import annotations

import io
import json
import os
import subprocess
import tarfile
from pathlib import Path

import pytest

from alexnet_train.config import DataConfig
from alexnet_train.data.datasets import check_dir, labelled_samples, scan_image_folder
from alexnet_train.data.decode import read_bytes
from alexnet_train.data.loaders import resolve_splits
from alexnet_train.data.prepare import prepare_tree
from alexnet_train.data.shardindex import shard_index
from alexnet_train.data.shards import find_shards, is_shard_source, parse_member
from alexnet_train.data.shardwriter import write_shards
from alexnet_train.errors import DataError

from .conftest import console_script, write_image_folder

CLASSES = ["n01440764", "n01443537", "n01484850"]


def quiet(_m: str) -> None:
    pass


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _shard(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, members in samples:
            for ext, data in members.items():
                _add(tar, f"{key}.{ext}", data)
    return path


JPEG = b"\xff\xd8\xff\xe0" + b"x" * 60


@pytest.fixture(scope="module")
def kinds(tmp_path_factory):
    """base/data/{files,copy256,wds}: one ImageFolder pair of each kind, with a val split each."""
    base = tmp_path_factory.mktemp("spell")
    data = base / "data"
    train = write_image_folder(data / "src" / "train", CLASSES, 4, seed=1)
    val = write_image_folder(data / "src" / "val", CLASSES, 2, seed=2)
    prepare_tree(str(train), str(data / "copy256" / "train"), size=64, workers=0, log=quiet)
    prepare_tree(str(val), str(data / "copy256" / "val"), size=64, workers=0, log=quiet)
    write_shards(train, data / "wds" / "train", size=64, shard_size=8_000, log=quiet)
    write_shards(val, data / "wds" / "val", size=64, shard_size=8_000, log=quiet)
    (base / "elsewhere").mkdir()
    os.symlink(data, base / "link")  # a symlink to the whole data folder
    return base


KINDS = {"files": ("src/train", "src/val"), "copy256": ("copy256/train", "copy256/val"),
         "shards": ("wds/train", "wds/val"), "shard-pattern": ("wds/train/imagenet1k-train-*.tar",
                                                               "wds/val/imagenet1k-validation-*.tar")}
SPELLINGS = {  # (working directory under base, how data/<x> is written)
    "relative": (".", "data/{}"),
    "dot-slash": (".", "./data/{}"),
    "dot-dot": ("elsewhere", "../data/{}"),
    "absolute": ("/", "{base}/data/{}"),
    "symlink": ("elsewhere", "../link/{}"),
    "tilde": ("/", "~/data/{}"),
}


@pytest.mark.parametrize("kind", KINDS)
def test_every_spelling_from_every_working_directory_reads_every_sample(kinds, kind, monkeypatch):
    """One index, built by the first spelling, then used by every other from another directory."""
    base = kinds
    monkeypatch.setenv("HOME", str(base))
    expected = None
    for name, (cwd, form) in SPELLINGS.items():
        monkeypatch.chdir(base / cwd)
        train, val = (form.format(p, base=base) for p in KINDS[kind])
        lines: list[str] = []
        splits = resolve_splits(DataConfig(train_dir=train, val_dir=val), lines.append)
        got = sorted((os.path.basename(p.split("::")[-1]).split(".")[0], label, len(read_bytes(p)))
                     for p, label in [*splits.train, *splits.val])
        assert splits.classes == CLASSES, name
        if expected is None:
            expected = got
            assert len(got) == 18
        assert got == expected, name  # every sample read, with its label, whatever the spelling
        if kind.startswith("shard") and name != "relative":
            assert any("from the index" in line for line in lines), (name, lines)


def test_an_index_built_from_one_directory_serves_a_run_from_root(tmp_path, monkeypatch):
    """Issue 35 item 3: the index kept the first caller's relative prefix."""
    write_shards(write_image_folder(tmp_path / "train", CLASSES, 2), tmp_path / "shards", size=64, log=quiet)
    monkeypatch.chdir(tmp_path)
    first = shard_index(find_shards("./shards", "k"))  # item 2: './' once cut two characters too many
    assert all(read_bytes(p)[:2] == b"\xff\xd8" for p, _ in first.samples)
    monkeypatch.chdir("/")
    lines: list[str] = []
    again = shard_index(find_shards(str(tmp_path / "shards"), "k"), lines.append)
    assert any("from the index" in line for line in lines)
    assert all(read_bytes(p)[:2] == b"\xff\xd8" for p, _ in again.samples)
    assert all(parse_member(p)[0].startswith(str(tmp_path)) for p, _ in again.samples)


def test_splits_numbered_with_underscores_are_told_apart(tmp_path):
    folder = tmp_path / "wds"
    for name in ("train_0000.tar", "train_0001.tar", "val_0000.tar"):
        _shard(folder / name, [(name[:-4], {"jpg": JPEG, "cls": b"0"})])
    with pytest.raises(DataError, match=r"holds the shards of 2 splits; name one: .*train_\*\.tar \(2 shards\), "
                                         r".*val_\*\.tar \(1 shards\)"):
        find_shards(folder, "data.train_dir")
    assert [Path(p).name for p in find_shards(folder / "train_*.tar", "k")] == ["train_0000.tar", "train_0001.tar"]


def test_keys_split_at_the_first_dot_as_webdataset_splits_them(tmp_path):
    shard = _shard(tmp_path / "w" / "x-0000.tar", [
        ("a", {"seg.png": b"\x89PNG", "jpg": JPEG, "cls": b"1"}),
        ("dir.v1/b", {"jpg": JPEG, "cls": b"0", "txt.gz": b"z"}),
    ])
    index = shard_index([str(shard)])
    got = sorted((parse_member(p)[1], label) for p, label in index.samples)
    assert got == [("a.jpg", 1), ("dir.v1/b.jpg", 0)]


def test_brace_patterns_expand_as_webdataset_expands_them(tmp_path):
    import braceexpand

    folder = tmp_path / "w"
    for i in range(11):
        _shard(folder / f"x-{i:03d}.tar", [(f"k{i}", {"jpg": JPEG, "cls": b"0"})])
    spec = str(folder / "x-{0..010}.tar")
    assert find_shards(spec, "k") == list(braceexpand.braceexpand(spec))
    assert [Path(p).name for p in find_shards(str(folder / "x-{001,009}.tar"), "k")] == ["x-001.tar", "x-009.tar"]
    with pytest.raises(DataError, match=r"x-011.tar: shard not found \(1 of 12 missing\)"):
        find_shards(str(folder / "x-{0..011}.tar"), "data.train_dir")


def test_compressed_shards_are_refused_with_one_line_saying_how(tmp_path):
    import gzip

    folder = tmp_path / "gz"
    plain = _shard(tmp_path / "plain" / "x-0000.tar", [("k", {"jpg": JPEG, "cls": b"0"})])
    folder.mkdir()
    (folder / "x-0000.tar.gz").write_bytes(gzip.compress(plain.read_bytes()))
    for spec in (folder, folder / "x-*.tar.gz", folder / "x-0000.tar.gz"):
        assert is_shard_source(spec)
        with pytest.raises(DataError, match=r"compressed shards .* cannot be read by byte offset; decompress"):
            check_dir(str(spec), "data.train_dir")


def test_a_shard_folder_with_a_subfolder_is_still_shards_and_imagenet_with_class_tars_is_a_tree(tmp_path):
    shards = tmp_path / "wds"
    _shard(shards / "x-0000.tar", [("k", {"jpg": JPEG, "cls": b"0"})])
    (shards / "meta").mkdir()
    (shards / "meta" / "README.txt").write_text("downloaded 2026-12-01")
    assert is_shard_source(shards) and len(scan_image_folder(str(shards))[1]) == 1
    tree = write_image_folder(tmp_path / "train", CLASSES, 2)
    (tree / "n01440764.tar").write_bytes(b"")  # ILSVRC's per-class tars left beside their folders
    assert not is_shard_source(tree) and len(scan_image_folder(str(tree))[1]) == 6


def test_an_image_folder_under_a_path_with_double_colons_reads_as_files(tmp_path):
    train = write_image_folder(tmp_path / "ds::v1" / "train", CLASSES, 2)
    _, samples = scan_image_folder(str(train))
    assert all(parse_member(p) is None and read_bytes(p)[:2] == b"\xff\xd8" for p, _ in samples)


def test_a_json_label_that_is_a_wnid_names_the_class(tmp_path):
    shard = _shard(tmp_path / "w" / "x-0000.tar", [
        ("a", {"jpg": JPEG, "cls": b"0", "json": json.dumps({"label": "n01440764"}).encode()}),
        ("b", {"jpg": JPEG, "cls": b"1", "json": json.dumps({"label": "n01443537",
                                                            "filename": "n01443537/b.JPEG"}).encode()}),
    ])
    classes, samples = scan_image_folder(str(shard))
    assert classes == ["n01440764", "n01443537"] and len(samples) == 2
    bad = _shard(tmp_path / "v" / "x-0000.tar", [
        ("c", {"jpg": JPEG, "cls": b"0", "json": json.dumps({"label": "n01440764",
                                                            "filename": "n09999999/c.JPEG"}).encode()})])
    with pytest.raises(DataError, match=r"x-0000.tar: c.json: label 'n01440764' but filename"):
        scan_image_folder(str(bad))


@pytest.mark.slow
def test_alexnet_stats_names_the_shard_of_a_bad_json_label(tmp_path):
    bad = _shard(tmp_path / "w" / "x-0000.tar", [("c", {"jpg": JPEG, "cls": b"0",
                                                        "json": json.dumps({"label": [3]}).encode()})])
    done = subprocess.run([console_script("alexnet-stats"), str(bad.parent), "--workers", "0"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert f"{bad}: c.json: label [3] is neither a class index nor a wnid" in done.stderr


def test_val_shards_lacking_classes_are_matched_to_training_by_wnid(tmp_path):
    """Item 9: a val split written alone numbers its own classes; class folders and a flat
    folder with --labels both match training by wnid."""
    val = write_image_folder(tmp_path / "val", CLASSES[1:], 2, seed=4)  # no n01440764
    write_shards(val, tmp_path / "wds", size=64, log=quiet)
    flat = tmp_path / "flat" / "validation"
    flat.mkdir(parents=True)
    rows = []
    for p in sorted(val.rglob("*.JPEG")):
        (flat / p.name).write_bytes(p.read_bytes())
        rows.append(f"{p.stem},{p.parent.name} 1 2 3 4")
    labels = tmp_path / "LOC_val_solution.csv"
    labels.write_text("ImageId,PredictionString\n" + "\n".join(rows) + "\n")
    write_shards(flat, tmp_path / "wds-flat", size=64, labels_file=str(labels), log=quiet)
    for spec in (tmp_path / "wds", tmp_path / "wds-flat"):
        samples = labelled_samples(str(spec), CLASSES)
        got = sorted((Path(parse_member(p)[1]).stem, label) for p, label in samples)
        assert got == sorted((p.stem, CLASSES.index(p.parent.name)) for p in val.rglob("*.JPEG")), spec
    with pytest.raises(DataError, match=r"class 0 is n01443537 in the shards, which is not one of the 2 training"):
        labelled_samples(str(tmp_path / "wds"), ["n01440764", "n01484850"])


@pytest.mark.slow
def test_the_commands_take_every_spelling_as_typed(kinds, tmp_path):
    """alexnet-stats, alexnet-prepare and alexnet-train given paths as users type them, including
    a '~' the shell leaves alone (--flag=~/x, --set key=~/x, a quoted argument)."""
    from .conftest import DEMO_CONFIG, tiny_overrides

    base = kinds
    env = {**os.environ, "HOME": str(base)}

    def run(cwd: str, *argv: str) -> subprocess.CompletedProcess:
        done = subprocess.run([console_script(argv[0]), *argv[1:]], cwd=base / cwd, env=env, capture_output=True,
                              text=True, timeout=180)
        assert done.returncode == 0, (argv, done.stderr[-2000:])
        return done

    for kind in ("src/train", "wds/train"):
        for cwd, spelled in (("elsewhere", f"../data/{kind}"), (".", f"./data/{kind}"), ("/", f"~/data/{kind}"),
                             ("elsewhere", f"../link/{kind}")):
            assert "mean" in run(cwd, "alexnet-stats", spelled, "--samples", "6", "--workers", "0").stdout
    run("/", "alexnet-prepare", "~/data/src/val", "~/made/wds", "--shards", "--size", "64", "--workers", "0")
    assert len(list((base / "made" / "wds").glob("imagenet1k-validation-*.tar"))) == 1
    overrides = [o for o in tiny_overrides(Path("x"), Path("y"), 3, 1) if not o.startswith("data.")]
    run("elsewhere", "alexnet-train", "--config", DEMO_CONFIG, "--out=~/runs/spelled", "--set", *overrides,
        "data.train_dir=~/data/wds/train/imagenet1k-train-*.tar", "data.val_dir=../link/copy256/val",
        "data.batch_size=4", "data.workers=0", "data.resize_size=72", "data.crop_size=64")
    assert (base / "runs" / "spelled" / "last.pth").is_file()
