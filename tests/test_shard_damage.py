"""Cut and damaged shards follow one rule: the samples before the damage are served, the samples
promised but lost count as bad images, nothing is invented and nothing vanishes silently.

Shards from two writers (alexnet-prepare --shards, and webdataset's own TarWriter, which
writes each sample's members in sorted order: .cls, .jpg, .json) are cut at every 512-byte
boundary, with and without an ``_info.json`` that promises their sample counts."""
from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest

from alexnet_train.data.shardindex import shard_index, walk_tar
from alexnet_train.data.shardread import read_member
from alexnet_train.data.shards import find_shards
from alexnet_train.data.shardwriter import write_shards
from alexnet_train.errors import BadImageError, DataError

from .conftest import write_image_folder

wds = pytest.importorskip("webdataset")

CLASSES = ["n01440764", "n01443537"]


def _ours(src: Path, folder: Path) -> None:
    write_shards(src, folder, size=64, shard_size=12_000, log=lambda _m: None)


def _webdataset(src: Path, folder: Path) -> None:
    """The same images through webdataset's TarWriter, 3 samples a shard, and timm's _info.json."""
    files = sorted(src.rglob("*.JPEG"))
    folder.mkdir(parents=True)
    names, lengths = [], []
    for s in range(0, len(files), 3):
        name = f"imagenet1k-train-{s // 3:04d}.tar"
        with wds.TarWriter(str(folder / name)) as sink:
            for f in files[s : s + 3]:
                label = CLASSES.index(f.parent.name)
                sink.write({"__key__": f.stem, "jpg": f.read_bytes(), "cls": label,
                            "json": {"filename": f"{f.parent.name}/{f.name}", "label": label}})
        names.append(name)
        lengths.append(len(files[s : s + 3]))
    info = {"name": "test", "splits": {"train": {"name": "train", "filenames": names, "shard_lengths": lengths,
                                                   "num_samples": sum(lengths)}}}
    (folder / "_info.json").write_text(json.dumps(info))


def _whole_before(members: list[tarfile.TarInfo], cut: int) -> int:
    """Samples whose image and class members lie wholly before byte ``cut`` (what must be served)."""
    ends: dict[str, dict[str, int]] = {}
    for m in members:
        key, _, ext = m.name.partition(".")
        ends.setdefault(key, {})[ext] = m.offset_data + m.size
    return sum(1 for parts in ends.values() if max(v for e, v in parts.items() if e in ("jpg", "cls")) <= cut)


@pytest.mark.parametrize("writer", [_ours, _webdataset], ids=["alexnet-prepare", "webdataset-TarWriter"])
@pytest.mark.parametrize("promise", [True, False], ids=["_info.json", "no-promise"])
def test_every_512_byte_cut_serves_what_precedes_it_and_counts_the_rest(tmp_path, writer, promise):
    src = write_image_folder(tmp_path / "src" / "train", CLASSES, 3, seed=5)
    folder = tmp_path / "wds"
    writer(src, folder)
    if not promise:
        (folder / "_info.json").unlink()
    shards = find_shards(folder, "data.train_dir")
    assert len(shards) >= 2
    victim = Path(shards[-1])
    original = victim.read_bytes()
    with tarfile.open(victim) as tar:
        members = tar.getmembers()
    total = len({m.name.partition(".")[0] for m in members})
    before = sum(len(tarfile.open(s).getnames()) // 3 for s in shards[:-1])
    checked = 0
    for cut in range(0, len(original), 512):
        victim.write_bytes(original[:cut])
        notes: list[str] = []
        index = shard_index(shards, notes.append)  # never a DataError (exit 2): a cut is damage, not bad usage
        mine = [(p, label) for p, label in index.samples if p.startswith(str(victim))]
        served = [p for p, label in mine if label >= 0]
        lost = [p for p, label in mine if label < 0]
        whole = _whole_before(members, cut)
        assert len(served) == whole, (cut, len(served), whole)
        assert len(index.samples) == before + len(mine)
        if promise:
            assert len(served) + len(lost) == total, (cut, len(served), len(lost))
        else:
            assert len(served) + len(lost) <= total, (cut, len(served), len(lost))
            if len(served) + len(lost) < total:  # what cannot be counted is said, not dropped in silence
                assert any("cannot be counted without _info.json" in n for n in notes), (cut, notes)
        if lost:
            assert any(f"{len(lost)} samples of damaged shards are lost" in n for n in notes), notes
            with pytest.raises(BadImageError, match="lost: the shard is damaged before this sample"):
                read_member(lost[0])
        for path in served:
            assert read_member(path)[:2] == b"\xff\xd8"
        checked += 1
    assert checked == -(-len(original) // 512) >= 20


def test_a_whole_shard_and_a_stale_info_json_invent_nothing(tmp_path):
    """A shard that ends properly but holds fewer samples than _info.json says: nothing lost is
    invented (the promise is out of date), and the log says so."""
    src = write_image_folder(tmp_path / "src" / "train", CLASSES, 3, seed=5)
    folder = tmp_path / "wds"
    _ours(src, folder)
    info = json.loads((folder / "_info.json").read_text())
    info["splits"]["train"]["shard_lengths"][0] += 2
    (folder / "_info.json").write_text(json.dumps(info))
    notes: list[str] = []
    index = shard_index(find_shards(folder, "k"), notes.append)
    assert index.lost == 0 and len(index.samples) == 6
    assert any("is _info.json out of date?" in n for n in notes)


def _tar(path: Path, fmt: int, names: list[str]) -> None:
    with tarfile.open(path, "w", format=fmt) as tar:
        for i, name in enumerate(names):
            data = bytes([i]) * (100 + 700 * i)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            if fmt == tarfile.PAX_FORMAT and i % 2:
                info.pax_headers = {"comment": "é" * 300}
            tar.addfile(info, io.BytesIO(data))
            if i == 1:
                link = tarfile.TarInfo("a-link.jpg")
                link.type, link.linkname = tarfile.SYMTYPE, "a.jpg"
                tar.addfile(link)
        folder = tarfile.TarInfo("a-folder")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)  # not a member with data: skipped


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT],
                         ids=["ustar", "gnu", "pax"])
def test_the_header_walk_finds_what_tarfile_finds(tmp_path, fmt):
    long = "d" * 90 + "/" + "k" * 90 + ".jpg"  # USTAR holds it in prefix + name; GNU and PAX otherwise
    names = ["a.jpg", "a.cls", "dir.v1/b.seg.png", long, "ünï.jpg"]
    path = tmp_path / "x.tar"
    _tar(path, fmt, names)
    with tarfile.open(path) as tar:
        expected = [(m.name, m.offset_data, m.size) for m in tar.getmembers() if m.isfile()]
    walk = walk_tar(str(path))
    assert walk.members == expected and walk.end == "end"


def test_a_file_that_is_no_tar_is_still_one_line(tmp_path):
    (tmp_path / "x-0000.tar").write_bytes(b"<html>not found</html>" * 40)
    with pytest.raises(DataError, match=r"x-0000.tar: not a readable tar shard"):
        shard_index(find_shards(tmp_path, "k"))


def test_a_damaged_header_mid_shard_serves_what_precedes_it(tmp_path):
    src = write_image_folder(tmp_path / "src" / "train", CLASSES, 3, seed=5)
    folder = tmp_path / "wds"
    _ours(src, folder)
    shards = find_shards(folder, "k")
    victim = Path(shards[0])
    with tarfile.open(victim) as tar:
        members = tar.getmembers()
    data = bytearray(victim.read_bytes())
    third = members[3].offset  # the second sample's first header
    data[third + 100 : third + 108] = b"garbage!"
    victim.write_bytes(bytes(data))
    notes: list[str] = []
    index = shard_index(shards, notes.append)
    promised = json.loads((folder / "_info.json").read_text())["splits"]["train"]["shard_lengths"][0]
    mine = [label for p, label in index.samples if p.startswith(str(victim))]
    assert mine.count(-1) == promised - 1 and len(mine) == promised
    assert any("has a damaged tar header at byte" in n for n in notes), notes
    shutil.rmtree(folder / ".alexnet-index")
