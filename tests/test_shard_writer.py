"""alexnet-prepare --shards: WebDataset shards that the reference reader and GNU tar read, resumable
to byte-identical files."""
from __future__ import annotations

import io
import json
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from alexnet_train.cli import prepare_main
from alexnet_train.data.datasets import DataError
from alexnet_train.data.prepare import FAILURES_FILE, square_jpeg
from alexnet_train.data.shardwriter import INFO_FILE, write_shards

from .conftest import write_image_folder

wds = pytest.importorskip("webdataset")

CLASSES = ["n01440764", "n01443537", "n01484850"]
PER_CLASS = 12
SHARD_SIZE = 40_000  # ~3.5 kB a sample at 64 px: 4 shards of 36 samples


def quiet(_: str) -> None:
    pass


@pytest.fixture
def train(tmp_path: Path) -> Path:
    return write_image_folder(tmp_path / "src" / "train", CLASSES, PER_CLASS, seed=3)


def shards(dst: Path, prefix: str = "imagenet1k-train") -> list[Path]:
    return sorted(dst.glob(f"{prefix}-*.tar"))


def read_back(dst: Path, prefix: str = "imagenet1k-train") -> list[dict]:
    """Every sample as the webdataset package reads it, with the shard it came from."""
    urls = [str(p) for p in shards(dst, prefix)]
    return list(wds.WebDataset(urls, shardshuffle=False))


def snapshot(dst: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(dst.iterdir()) if p.suffix in (".tar", ".json")}


def test_every_sample_reads_back_with_webdataset(train, tmp_path):
    dst = tmp_path / "wds"
    report = write_shards(train, dst, size=64, shard_size=SHARD_SIZE, log=quiet)
    assert report.written == len(CLASSES) * PER_CLASS and report.skipped == 0 and not report.failed
    files = shards(dst)
    assert len(files) >= 3 and [p.name for p in files] == report.shards
    assert all(p.stat().st_size <= SHARD_SIZE for p in files)

    samples = read_back(dst)
    keys = [s["__key__"] for s in samples]
    assert sorted(keys) == sorted(f"{c}_{i:03d}" for c in CLASSES for i in range(PER_CLASS))
    classes_in: dict[str, set[int]] = {}
    for s in samples:
        wnid = s["__key__"].rsplit("_", 1)[0]
        label = int(s["cls"].decode("ascii"))
        assert label == CLASSES.index(wnid)
        meta = json.loads(s["json"])
        assert meta["filename"] == f"{wnid}/{s['__key__']}.JPEG"
        assert meta["label"] == label
        # The same bytes as the 256-px tree's copy would hold (here at 64 px).
        assert s["jpg"] == square_jpeg(str(train / meta["filename"]), 64, 90)
        with Image.open(io.BytesIO(s["jpg"])) as img:
            img.load()
            assert img.format == "JPEG" and (img.height, img.width) == (meta["height"], meta["width"]) == (64, 64)
        classes_in.setdefault(s["__url__"], set()).add(label)
    assert all(len(labels) > 1 for labels in classes_in.values()), "a shard holds a single class"

    info = json.loads((dst / INFO_FILE).read_text())
    split = info["splits"]["train"]
    assert split["name"] == "train" and split["filenames"] == report.shards
    counts = [sum(s["__url__"] == str(dst / name) for s in samples) for name in split["filenames"]]
    assert split["shard_lengths"] == counts and split["num_samples"] == sum(counts) == len(samples)


def test_members_are_plain_ustar_that_gnu_tar_lists(train, tmp_path):
    dst = tmp_path / "wds"
    write_shards(train, dst, size=64, shard_size=SHARD_SIZE, log=quiet)
    for path in shards(dst):
        raw = path.read_bytes()
        with tarfile.open(path) as tar:
            members = tar.getmembers()
        assert members and all(m.isreg() for m in members)  # no PAX ('x'/'g') or GNU long-name headers
        for m in members:
            header = raw[m.offset:m.offset + 512]
            assert header[257:265] == b"ustar\x0000", m.name
            assert header[156:157] == b"0" and not m.pax_headers
            assert isinstance(m.mtime, int) and m.mtime == 0
            assert m.mode == 0o444 and m.uid == m.gid == 0
        names = [m.name for m in members]
        # A sample's members are consecutive: what WebDataset readers group by key.
        assert [n.rsplit(".", 1)[1] for n in names] == ["jpg", "cls", "json"] * (len(names) // 3)
        if shutil.which("tar"):
            listed = subprocess.run(["tar", "-tf", str(path)], capture_output=True, text=True, check=True)
            assert listed.stdout.split() == names


def test_second_run_is_a_no_op_and_an_interrupted_one_resumes_to_identical_shards(train, tmp_path):
    dst = tmp_path / "wds"
    write_shards(train, dst, size=64, shard_size=SHARD_SIZE, log=quiet)
    first = snapshot(dst)
    times = {p.name: p.stat().st_mtime_ns for p in shards(dst)}

    again = write_shards(train, dst, size=64, shard_size=SHARD_SIZE, log=quiet)
    assert again.written == 0 and again.skipped == len(CLASSES) * PER_CLASS
    assert snapshot(dst) == first and {p.name: p.stat().st_mtime_ns for p in shards(dst)} == times

    # What a kill leaves: the last shards missing or cut short, a half-written temp file.
    files = shards(dst)
    files[-1].unlink()
    files[-2].write_bytes(files[-2].read_bytes()[:5000])
    (dst / (files[-2].name + ".tmp")).write_bytes(b"half a shard")
    resumed = write_shards(train, dst, size=64, shard_size=SHARD_SIZE, log=quiet)
    assert resumed.skipped > 0 and resumed.written > 0
    assert resumed.skipped + resumed.written == len(CLASSES) * PER_CLASS
    assert snapshot(dst) == first
    assert not list(dst.glob("*.tmp"))
    for p in files[:-2]:
        assert p.stat().st_mtime_ns == times[p.name], f"{p.name} was rewritten"

    # And the plan does not depend on the destination: a fresh copy elsewhere is the same.
    write_shards(train, tmp_path / "other", size=64, shard_size=SHARD_SIZE, log=quiet)
    assert snapshot(tmp_path / "other") == first


def test_another_plan_into_the_same_destination_is_refused(train, tmp_path):
    dst = tmp_path / "wds"
    write_shards(train, dst, size=64, shard_size=SHARD_SIZE, log=quiet)
    with pytest.raises(DataError, match="progress.json: these shards were written"):
        write_shards(train, dst, size=48, shard_size=SHARD_SIZE, log=quiet)


def flat_val(tmp_path: Path, per_class: int = 4) -> tuple[Path, Path, dict[str, str]]:
    """SRC/val as ILSVRC ships it: one flat folder, and a labels file; (folder, labels file, wnid of each key)."""
    val = tmp_path / "src" / "val"
    labelled = write_image_folder(tmp_path / "labelled", CLASSES, per_class, seed=4)
    val.mkdir()
    lines, wnids = [], {}
    for i, img in enumerate(sorted(labelled.rglob("*.JPEG")), 1):
        name = f"ILSVRC2012_val_{i:08d}.JPEG"
        img.rename(val / name)
        lines.append(f"{name} {img.parent.name}\n")
        wnids[name[:-5]] = img.parent.name
    labels = tmp_path / "val.txt"
    labels.write_text("".join(lines))
    return val, labels, wnids


def test_flat_val_with_labels_merges_into_the_same_info(train, tmp_path):
    val, labels, wnids = flat_val(tmp_path)
    dst = tmp_path / "wds"
    write_shards(train, dst, size=64, shard_size=SHARD_SIZE, log=quiet)
    report = write_shards(val, dst, size=64, shard_size=SHARD_SIZE, labels_file=str(labels), log=quiet)
    assert report.shards[0] == "imagenet1k-validation-0000.tar"
    samples = read_back(dst, "imagenet1k-validation")
    assert sorted(s["__key__"] for s in samples) == sorted(wnids)
    for s in samples:
        meta = json.loads(s["json"])
        assert int(s["cls"]) == meta["label"] == CLASSES.index(wnids[s["__key__"]])
        # The wnid travels in the filename as for class folders (and timm's val shards): readers match by it.
        assert meta["filename"] == f"{wnids[s['__key__']]}/{s['__key__']}.JPEG"
    info = json.loads((dst / INFO_FILE).read_text())
    assert set(info["splits"]) == {"train", "validation"}
    assert info["splits"]["validation"]["num_samples"] == len(samples) == len(wnids)
    assert info["splits"]["train"]["num_samples"] == len(CLASSES) * PER_CLASS


def files_state(folder: Path) -> dict[str, tuple[bytes, int, int]]:
    """Every file under ``folder``, hidden ones included: (bytes, mtime_ns, inode), to show nothing was touched."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns, p.stat().st_ino)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def timm_download(dst: Path, split: str = "train", prefix: str = "imagenet1k-train", count: int = 6) -> dict:
    """DST as a downloaded timm/imagenet-1k-wds leaves it: real shards written by webdataset's TarWriter,
    and timm's _info.json, which also lists a split this folder does not hold."""
    dst.mkdir(parents=True, exist_ok=True)
    jpeg = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(jpeg, "JPEG")
    names = [f"{prefix}-{i:04d}.tar" for i in range(count)]
    for i, name in enumerate(names):
        with wds.TarWriter(str(dst / name)) as sink:
            for j in range(2):
                key = f"ILSVRC2012_{split}_{i:04d}{j}"
                sink.write({"__key__": key, "jpg": jpeg.getvalue(), "cls": b"7",
                            "json": json.dumps({"filename": f"n01530575/{key}.JPEG", "label": 7}).encode()})
    info = {"name": "imagenet-1k", "version": "timm-wds-test",
            "splits": {split: {"name": split, "filenames": names, "shard_lengths": [2] * count,
                               "num_samples": 2 * count, "alt_label": ""},
                       "test": {"name": "test", "filenames": ["imagenet1k-test-0000.tar"], "shard_lengths": [2],
                                "num_samples": 2}}}
    (dst / INFO_FILE).write_text(json.dumps(info, indent=2))
    return info


@pytest.mark.parametrize("found", ["download", "temp", "underscore", "after-our-run"])
def test_files_like_our_shards_that_we_did_not_write_are_refused_and_left_untouched(train, tmp_path, capsys, found):
    """A download of this split in DST (or a stray temp, or a shard of some other tool): refused in one
    line naming the files, before anything in DST changes; not deleted, not overwritten."""
    dst = tmp_path / "wds"
    if found == "download":
        timm_download(dst)
        expected = ["6 file(s)", "imagenet1k-train-0000.tar, imagenet1k-train-0001.tar, imagenet1k-train-0002.tar and 3 more"]
    elif found == "temp":
        dst.mkdir()
        (dst / "imagenet1k-train-0003.tar.tmp").write_bytes(b"someone else's temp")
        expected = ["1 file(s)", "imagenet1k-train-0003.tar.tmp"]
    elif found == "underscore":
        timm_download(dst, prefix="imagenet1k-train_x", count=0)  # just the _info.json
        (dst / "imagenet1k-train_0000.tar").write_bytes(b"another tool's shard")
        expected = ["1 file(s)", "imagenet1k-train_0000.tar"]
    else:  # our own shards, and then someone adds one with the next number
        write_shards(train, dst, size=64, shard_size=SHARD_SIZE, log=quiet)
        extra = dst / f"imagenet1k-train-{len(shards(dst)):04d}.tar"
        extra.write_bytes(b"not ours")
        expected = ["1 file(s)", "progress.json does not list them", extra.name]
    before = files_state(tmp_path / "wds")

    with pytest.raises(DataError) as refused:
        write_shards(train, dst, size=64, shard_size=SHARD_SIZE, log=quiet)
    message = str(refused.value)
    assert "\n" not in message and message.startswith(f"{dst}: "), message
    for part in expected + ["nothing was changed: write to another destination, or move them away"]:
        assert part in message, message
    assert files_state(dst) == before

    code, out, err = run_prepare(capsys, train, dst, "--shards", "--shard-size", SHARD_SIZE, "--size", 64,
                                 "--workers", 0)
    assert code == 2 and err.count("\n") == 1 and "move them away" in err and "removing" not in out + err
    assert files_state(dst) == before


def test_a_split_written_beside_a_download_keeps_its_files_info_and_failures_list(train, tmp_path):
    """Val written into a folder holding timm's train download: train's shards and its _info.json entry
    stay as they were, the other keys of timm's _info.json too; another tree's prepare-failures.txt is
    not rewritten."""
    val, labels, wnids = flat_val(tmp_path)
    dst = tmp_path / "wds"
    info = timm_download(dst)
    failures = dst / FAILURES_FILE
    failures.write_text("/elsewhere/train/n01530575/x.JPEG\tcannot identify image file\n")
    before = files_state(dst)

    report = write_shards(val, dst, size=64, shard_size=SHARD_SIZE, labels_file=str(labels), log=quiet)
    assert report.written == len(wnids) and report.shards[0] == "imagenet1k-validation-0000.tar"
    after = files_state(dst)
    for name in [n for n in before if n.endswith(".tar")] + [FAILURES_FILE]:
        assert after[name] == before[name], f"{name} was touched"
    merged = json.loads((dst / INFO_FILE).read_text())
    assert {k: v for k, v in merged.items() if k != "splits"} == {"name": "imagenet-1k", "version": "timm-wds-test"}
    assert merged["splits"]["train"] == info["splits"]["train"] and merged["splits"]["test"] == info["splits"]["test"]
    assert merged["splits"]["validation"]["filenames"] == report.shards
    assert len(read_back(dst, "imagenet1k-validation")) == len(wnids)
    assert len(read_back(dst, "imagenet1k-train")) == 12  # the download's, all still there

    # A failures list of only other trees' lines: not deleted when this split has none either.
    again = write_shards(val, dst, size=64, shard_size=SHARD_SIZE, labels_file=str(labels), log=quiet)
    assert again.written == 0 and files_state(dst)[FAILURES_FILE] == before[FAILURES_FILE]


def test_shards_an_earlier_run_wrote_that_the_plan_no_longer_has_are_removed(train, tmp_path):
    """Images that became unreadable since the last run: the rewritten split is a shard shorter, and the
    left-over shard, recorded as ours, is removed (and only it)."""
    dst = tmp_path / "wds"
    first = write_shards(train, dst, size=64, shard_size=SHARD_SIZE, log=quiet)
    for img in (train / CLASSES[2]).iterdir():
        img.write_bytes(b"broken since")
    shards(dst)[0].unlink()  # the first shard missing: the whole split is written again
    (dst / "imagenet1k-validation-0000.tar").write_bytes(b"another split's")
    report = write_shards(train, dst, size=64, shard_size=SHARD_SIZE, log=quiet)
    assert len(report.shards) < len(first.shards) and [p.name for p in shards(dst)] == report.shards
    assert (dst / "imagenet1k-validation-0000.tar").read_bytes() == b"another split's"
    assert len(read_back(dst)) == 2 * PER_CLASS and len(report.failed) == PER_CLASS
    progress = json.loads((dst / ".imagenet1k-train-progress.json").read_text())
    assert progress["owned"] == report.shards


def test_timm_reads_every_sample_with_its_label(train, tmp_path):
    """timm's WebDataset reader (create_dataset('wds/...'), as `train.py --dataset wds/...` uses it) reads
    both splits from the _info.json alone, every image once, each with the class of its source."""
    timm_data = pytest.importorskip("timm.data")
    val, labels, wnids = flat_val(tmp_path)
    dst = tmp_path / "wds"
    write_shards(train, dst, size=64, shard_size=SHARD_SIZE, log=quiet)
    write_shards(val, dst, size=64, shard_size=SHARD_SIZE, labels_file=str(labels), log=quiet)

    def pixels(path: Path) -> bytes:
        with Image.open(io.BytesIO(square_jpeg(str(path), 64, 90))) as img:
            return img.convert("RGB").tobytes()

    expected = {
        "train": sorted((pixels(p), CLASSES.index(p.parent.name)) for p in train.rglob("*.JPEG")),
        "validation": sorted((pixels(p), CLASSES.index(wnids[p.stem])) for p in val.iterdir()),
    }
    for split, want in expected.items():
        ds = timm_data.create_dataset("wds/imagenet", root=str(dst), split=split, is_training=False)
        got = sorted((img.tobytes(), int(target)) for img, target in ds)
        assert len(ds) == len(got) == len(want) and got == want, split


def test_original_bytes_with_size_0(train, tmp_path):
    dst = tmp_path / "wds"
    write_shards(train, dst, size=0, shard_size=SHARD_SIZE, log=quiet)
    samples = read_back(dst)
    assert len(samples) == len(CLASSES) * PER_CLASS
    for s in samples:
        meta = json.loads(s["json"])
        source = train / meta["filename"]
        assert s["jpg"] == source.read_bytes()
        with Image.open(source) as img:
            assert (meta["width"], meta["height"]) == img.size


def test_unreadable_images_are_listed_and_left_out(train, tmp_path):
    broken = train / CLASSES[1] / "broken.JPEG"
    broken.write_bytes(b"not a jpeg at all")
    dst = tmp_path / "wds"
    report = write_shards(train, dst, size=64, shard_size=SHARD_SIZE, log=quiet)
    assert [p for p, _ in report.failed] == [str(broken)]
    assert str(broken) in (dst / FAILURES_FILE).read_text()
    assert "broken" not in {s["__key__"] for s in read_back(dst)}
    assert json.loads((dst / INFO_FILE).read_text())["splits"]["train"]["num_samples"] == len(CLASSES) * PER_CLASS
    again = write_shards(train, dst, size=64, shard_size=SHARD_SIZE, log=quiet)  # still listed after a no-op
    assert again.written == 0 and [p for p, _ in again.failed] == [str(broken)]


def test_two_files_with_one_key_are_named(train, tmp_path):
    shutil.copy(train / CLASSES[0] / f"{CLASSES[0]}_000.JPEG", train / CLASSES[1] / f"{CLASSES[0]}_000.jpg")
    with pytest.raises(DataError, match=f"{CLASSES[1]}/{CLASSES[0]}_000.jpg.*also that of .*{CLASSES[0]}_000.JPEG"):
        write_shards(train, tmp_path / "wds", size=64, log=quiet)


def run_prepare(capsys, *argv) -> tuple[int, str, str]:
    try:
        prepare_main([str(a) for a in argv])
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_writes_shards_and_reports_bad_input_in_one_line(train, tmp_path, capsys):
    dst = tmp_path / "wds"
    code, out, _ = run_prepare(capsys, train, dst, "--shards", "--shard-size", SHARD_SIZE, "--size", 64,
                               "--workers", 0)
    assert code == 0 and "wrote 36 images" in out
    assert len(read_back(dst)) == 36

    flat = tmp_path / "flat"
    flat.mkdir()
    shutil.copy(train / CLASSES[0] / f"{CLASSES[0]}_000.JPEG", flat)
    code, _, err = run_prepare(capsys, flat, tmp_path / "out", "--shards", "--workers", 0)
    assert code == 2 and err.count("\n") == 1 and "needs --labels FILE" in err
    code, _, err = run_prepare(capsys, train, tmp_path / "x", "--shard-size", 1000, "--workers", 0)
    assert code == 2 and "--shards" in err


@pytest.mark.slow
def test_cli_with_workers_gives_the_same_shards(train, tmp_path, capsys):
    one, two = tmp_path / "one", tmp_path / "two"
    assert run_prepare(capsys, train, one, "--shards", "--shard-size", SHARD_SIZE, "--size", 64, "--workers", 0)[0] == 0
    assert run_prepare(capsys, train, two, "--shards", "--shard-size", SHARD_SIZE, "--size", 64, "--workers", 2)[0] == 0
    assert snapshot(one) == snapshot(two)


def test_a_dot_in_a_stem_does_not_split_the_key(train, tmp_path):
    # WebDataset readers take all after a name's first dot for the extension: 'a.b.jpg' would be key 'a'.
    (train / CLASSES[2] / f"{CLASSES[2]}_000.JPEG").rename(train / CLASSES[2] / "crop.v2.JPEG")
    dst = tmp_path / "wds"
    write_shards(train, dst, size=64, shard_size=SHARD_SIZE, log=quiet)
    sample = next(s for s in read_back(dst) if s["__key__"] == "crop_v2")
    assert json.loads(sample["json"])["filename"] == f"{CLASSES[2]}/crop.v2.JPEG" and int(sample["cls"]) == 2


KILLER = """
import os, signal, sys
from alexnet_train.data import shardwriter
finish, replace, finished = shardwriter._ShardFile.finish, os.replace, []

def killing_replace(src, dst):
    if str(dst).endswith(".tar") and len(finished) == 2:
        if sys.argv[3] == "after-rename":
            replace(src, dst)
        os.kill(os.getpid(), signal.SIGKILL)
    replace(src, dst)

def counting_finish(self):
    size = finish(self)
    finished.append(self.path)
    return size

os.replace = killing_replace  # the module object: shardwriter sees it too
shardwriter._ShardFile.finish = counting_finish
shardwriter.write_shards(sys.argv[1], sys.argv[2], size=64, shard_size=%d, log=lambda _: None)
""" % SHARD_SIZE


@pytest.mark.slow
@pytest.mark.parametrize("when", ["before-rename", "after-rename"])
def test_a_killed_prepare_resumes_to_identical_shards(train, tmp_path, when):
    """SIGKILL as the third shard is renamed: its temp file is left, or the shard is whole but not
    yet recorded; the next run finishes the split and the bytes are those of an uninterrupted run."""
    import os
    import sys

    dst = tmp_path / "wds"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, "-c", KILLER, str(train), str(dst), when], env=env, timeout=120)
    assert proc.returncode == -9
    left = sorted(p.name for p in dst.iterdir())
    assert ("imagenet1k-train-0002.tar.tmp" in left) == (when == "before-rename")
    assert ("imagenet1k-train-0002.tar" in left) == (when == "after-rename")
    assert "imagenet1k-train-0003.tar" not in left and INFO_FILE not in left

    resumed = write_shards(train, dst, size=64, shard_size=SHARD_SIZE, log=quiet)
    assert resumed.skipped > 0 and resumed.skipped + resumed.written == len(CLASSES) * PER_CLASS
    write_shards(train, tmp_path / "whole", size=64, shard_size=SHARD_SIZE, log=quiet)
    assert snapshot(dst) == snapshot(tmp_path / "whole")
    assert not list(dst.glob("*.tmp"))


@pytest.fixture(scope="module")
def sorted_val(tmp_path_factory) -> tuple[Path, Path, list[str]]:
    """README step 1's val as ``alexnet-data ilsvrc`` leaves it (sorted into class folders by the
    devkit), and Kaggle's LOC_val_solution.csv for the same images: (val, csv, wnid of val image i+1)."""
    pytest.importorskip("scipy.io")
    from alexnet_train.cli import data_main

    from .test_readme_walkthrough import VAL_LABELS, write_ilsvrc_tars

    tmp = tmp_path_factory.mktemp("sorted-val")
    write_ilsvrc_tars(tmp / "tars")
    try:
        data_main(["ilsvrc", "--no-verify", str(tmp / "imagenet"), "--train-tar", str(tmp / "tars/ILSVRC2012_img_train.tar"),
                   "--val-tar", str(tmp / "tars/ILSVRC2012_img_val.tar"),
                   "--devkit", str(tmp / "tars/ILSVRC2012_devkit_t12.tar.gz")])
    except SystemExit as exc:
        assert not exc.code
    csv = tmp / "LOC_val_solution.csv"
    csv.write_text("ImageId,PredictionString\n" + "".join(
        f"ILSVRC2012_val_{i:08d},{w} 10 20 200 180 {w} 5 5 50 50\n" for i, w in enumerate(VAL_LABELS, 1)))
    val = tmp / "imagenet" / "val"
    assert sorted(p.name for p in val.iterdir()) == sorted(set(VAL_LABELS))  # step 1 sorted it
    return val, csv, VAL_LABELS


def test_sorted_val_with_labels_is_checked_and_written_as_without_them(sorted_val, tmp_path, capsys):
    """README step 1's val with --labels LOC_val_solution.csv (issue 36: it exited 2, "no image files
    found"): accepted, the file checked against the folders, and the shards byte for byte those
    written without --labels."""
    val, csv, wnids = sorted_val
    code, out, err = run_prepare(capsys, val, tmp_path / "with", "--shards", "--labels", csv, "--size", 64,
                                 "--workers", 0)
    assert code == 0, err
    assert f"{csv} agrees with them on all {len(wnids)} images" in out
    assert run_prepare(capsys, val, tmp_path / "without", "--shards", "--size", 64, "--workers", 0)[0] == 0
    assert snapshot(tmp_path / "with") == snapshot(tmp_path / "without")
    samples = read_back(tmp_path / "with", "imagenet1k-validation")
    got = {s["__key__"]: json.loads(s["json"])["filename"].split("/")[0] for s in samples}
    assert got == {f"ILSVRC2012_val_{i:08d}": w for i, w in enumerate(wnids, 1)}


def test_sorted_val_whose_labels_disagree_is_refused_in_one_line(sorted_val, tmp_path, capsys):
    val, csv, wnids = sorted_val
    wrong = tmp_path / "wrong.csv"
    lines = csv.read_text().splitlines()
    other = next(w for w in sorted(set(wnids)) if w != wnids[1])
    lines[2] = f"ILSVRC2012_val_00000002,{other} 1 2 3 4"
    wrong.write_text("\n".join(lines) + "\n")
    dst = tmp_path / "wds"
    code, _, err = run_prepare(capsys, val, dst, "--shards", "--labels", wrong, "--workers", 0)
    assert code == 2 and err.count("\n") == 1
    assert f"ILSVRC2012_val_00000002.JPEG: sorted into class folder {wnids[1]} but {wrong} labels it {other}" in err
    assert not dst.exists()
    missing = tmp_path / "short.csv"
    missing.write_text("\n".join(lines[:-1]) + "\n")  # no line for the last image
    code, _, err = run_prepare(capsys, val, dst, "--shards", "--labels", missing, "--workers", 0)
    assert code == 2 and f"ILSVRC2012_val_{len(wnids):08d}.JPEG: no label for this file in {missing}" in err


def test_training_checks_val_labels_against_a_sorted_val_too(sorted_val, tmp_path):
    """data.val_labels on the same sorted val: the same check where training and alexnet-eval read it."""
    from alexnet_train.data.datasets import labelled_samples

    val, csv, wnids = sorted_val
    classes = sorted(set(wnids))
    samples = labelled_samples(str(val), classes, str(csv))
    got = {Path(samples.path(i)).stem: classes[int(samples.labels[i])] for i in range(len(samples))}
    assert got == {f"ILSVRC2012_val_{i:08d}": w for i, w in enumerate(wnids, 1)}
    wrong = tmp_path / "wrong.txt"
    wrong.write_text("".join(f"ILSVRC2012_val_{i:08d}.JPEG {classes[0]}\n" for i in range(1, len(wnids) + 1)))
    with pytest.raises(DataError, match=f"labels it {classes[0]} \\(3 more images disagree\\)"):
        labelled_samples(str(val), classes, str(wrong))
