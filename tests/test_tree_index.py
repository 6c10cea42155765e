"""The tree index: one walk of a data tree per job, and a changed tree never read from a stale
index (a file added, a class removed, a folder touched, a file renamed)."""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from alexnet_train.data.datasets import images_under, labelled_samples, scan_image_folder
from alexnet_train.data.prepare import prepare_tree
from alexnet_train.data.samples import SampleList
from alexnet_train.data.treeindex import INDEX_DIR, index_paths, is_image, list_tree, read_index, walk_tree

from .conftest import run_train, tiny_overrides, write_image_folder


def age(root: Path, seconds: float = 60.0) -> None:
    """Set every directory's time ``seconds`` back, as a tree made a while ago has them."""
    past = time.time() - seconds
    for dirpath, _dirs, _files in os.walk(root):
        os.utime(dirpath, (past, past))


def os_walk_listing(root: Path) -> list[str]:
    """What the trainer listed before the index: os.walk with sorted folders and files."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        found.extend(os.path.join(dirpath, f) for f in sorted(filenames) if is_image(f))
    return found


@pytest.fixture
def data(tmp_path: Path) -> Path:
    root = write_image_folder(tmp_path / "data" / "train", ["n02", "n01", "n03"], 3, size=16)
    (root / "n01" / "nested" / "deeper").mkdir(parents=True)
    (root / "n01" / "nested" / "deeper" / "z.JPEG").write_bytes((root / "n01" / "n01_000.JPEG").read_bytes())
    (root / "n01" / "notes.txt").write_text("not an image")
    (root / "n02" / ".hidden.JPEG").write_bytes(b"")
    (root / ".cache").mkdir()  # a hidden folder: not a class
    (root / "loose.png").write_bytes((root / "n01" / "n01_000.JPEG").read_bytes())  # at the root
    age(root)
    return root


def test_the_walk_lists_what_os_walk_lists_in_the_same_order(data):
    listing = walk_tree(str(data))
    assert [path for path, _ in listing.files] == os_walk_listing(data)
    assert listing.folders == (".cache", "n01", "n02", "n03")
    labels = dict(listing.files)
    assert labels[str(data / "loose.png")] == -1 and labels[str(data / "n01" / "nested" / "deeper" / "z.JPEG")] == 1
    assert listing.racy is None  # every folder was aged


def test_the_first_start_writes_the_index_beside_the_tree_and_the_next_reads_it(data):
    lines = []
    first = list_tree(str(data), lines.append)
    beside = data.parent / INDEX_DIR
    assert "walked" in lines[0] and f"index written to {beside}" in lines[0], lines
    assert [p.name for p in beside.iterdir()] == [index_paths(str(data))[0].name]
    second = list_tree(str(data), lines.append)
    assert "from the index" in lines[1], lines
    assert second.files == first.files and second.folders == first.folders
    assert isinstance(second.files, SampleList) and second.files.labels.tolist() == first.files.labels.tolist()
    # The same samples the scan made, from the index.
    classes, samples = scan_image_folder(str(data))
    assert classes == ["n01", "n02", "n03"]
    assert list(samples) == [(p, classes.index(Path(p).relative_to(data).parts[0]))
                             for p in os_walk_listing(data) if Path(p).parent != data]


@pytest.mark.parametrize("change", ["add a file", "remove a class", "touch a folder", "rename a file",
                                    "add a nested folder", "add a class"])
def test_a_changed_tree_is_walked_again_never_read_from_the_stale_index(data, change):
    list_tree(str(data))
    assert read_index(index_paths(str(data))[0], str(data)) is not None
    time.sleep(0.05)
    if change == "add a file":
        (data / "n03" / "new.JPEG").write_bytes(b"x")
    elif change == "remove a class":
        for f in (data / "n03").iterdir():
            f.unlink()
        (data / "n03").rmdir()
    elif change == "touch a folder":
        os.utime(data / "n02")
    elif change == "rename a file":
        (data / "n02" / "n02_001.JPEG").rename(data / "n02" / "n02_101.JPEG")
    elif change == "add a nested folder":
        (data / "n01" / "nested" / "deeper" / "more").mkdir()
        (data / "n01" / "nested" / "deeper" / "more" / "m.JPEG").write_bytes(b"x")
    else:
        (data / "n04").mkdir()
        (data / "n04" / "a.JPEG").write_bytes(b"x")
    lines = []
    listing = list_tree(str(data), lines.append)
    assert "walked" in lines[0], lines
    assert [p for p, _ in listing.files] == os_walk_listing(data)  # the tree as it is now


def test_a_folder_changed_just_before_the_walk_writes_no_index(data):
    (data / "n02" / "fresh.JPEG").write_bytes(b"x")  # n02's time is now: it could change again unseen
    lines = []
    list_tree(str(data), lines.append)
    assert "no index written" in lines[0] and str(data / "n02") in lines[0], lines
    assert not index_paths(str(data))[0].exists() and not index_paths(str(data))[1].exists()


def test_where_beside_the_tree_cannot_be_written_the_index_goes_to_the_cache(data):
    (data.parent / INDEX_DIR).write_text("a file where the index folder would go")  # mkdir fails
    lines = []
    first = list_tree(str(data), lines.append)
    cache = index_paths(str(data))[1]
    assert cache.exists() and Path(os.environ["ALEXNET_TRAIN_CACHE"]) in cache.parents
    assert f"index written to {cache}" in lines[0]
    assert list_tree(str(data), lines.append).files == first.files and "from the index" in lines[1]


def test_a_dataset_its_owner_made_read_only_gets_its_index_in_the_cache(data):
    holder = data.parent
    holder.chmod(0o555)  # r-x: even root (which may write anyway) leaves it alone
    try:
        lines = []
        list_tree(str(data), lines.append)
        assert not (holder / INDEX_DIR).exists()
        assert f"index written to {index_paths(str(data))[1]}" in lines[0], lines
        assert "from the index" in list_tree(str(data)).how
    finally:
        holder.chmod(0o755)


def test_a_damaged_or_foreign_index_is_ignored(data, tmp_path):
    list_tree(str(data))
    path = index_paths(str(data))[0]
    other = write_image_folder(tmp_path / "other" / "train", ["a"], 2, size=16)
    age(other)
    foreign = index_paths(str(other))[0]
    foreign.parent.mkdir(parents=True, exist_ok=True)
    foreign.write_bytes(path.read_bytes())  # data's index where other's belongs
    assert read_index(foreign, str(other)) is None
    assert [p for p, _ in list_tree(str(other)).files] == os_walk_listing(other)
    path.write_bytes(path.read_bytes()[:100])  # cut short
    lines = []
    assert [p for p, _ in list_tree(str(data), lines.append).files] == os_walk_listing(data)
    assert "walked" in lines[0]


def test_flat_and_foldered_validation_sets_come_from_the_index_too(tmp_path):
    val = write_image_folder(tmp_path / "val", ["n01", "n03"], 2, size=16)  # no n02: scored against train's
    flat = tmp_path / "flat"
    flat.mkdir()
    labels = []
    for i, (cls, f) in enumerate((c.name, f) for c in sorted(val.iterdir()) for f in sorted(c.iterdir())):
        (flat / f"v{i}.JPEG").write_bytes(f.read_bytes())
        labels.append(f"v{i}.JPEG {cls}")
    (tmp_path / "val.txt").write_text("\n".join(labels) + "\n")
    age(val)
    age(flat)
    classes = ["n01", "n02", "n03"]
    for _ in range(2):  # walked, then from the index
        foldered = labelled_samples(str(val), classes)
        assert [(Path(p).name, t) for p, t in foldered] == [("n01_000.JPEG", 0), ("n01_001.JPEG", 0),
                                                              ("n03_000.JPEG", 2), ("n03_001.JPEG", 2)]
        from_flat = labelled_samples(str(flat), classes, str(tmp_path / "val.txt"))
        assert [t for _, t in from_flat] == [0, 0, 2, 2]
    assert index_paths(str(val))[0].exists() and index_paths(str(flat))[0].exists()
    assert len(images_under(str(flat))) == 4


def test_alexnet_prepare_writes_the_index_of_the_tree_it_makes(data, tmp_path):
    dst = tmp_path / "prepared" / "train"
    lines = []
    prepare_tree(data, dst, size=24, log=lines.append)
    assert any(f"index of {dst} written to" in line for line in lines), lines
    listing = read_index(index_paths(str(dst))[0], str(dst))
    assert listing is not None  # current although every folder was written just now
    assert [p for p, _ in SampleList(*listing.files.buffers, prefix=str(dst) + os.sep)] == os_walk_listing(dst)
    assert not (dst / INDEX_DIR).exists()  # nothing inside a training tree


def test_alexnet_prepare_of_a_dataset_root_writes_the_index_of_each_split(data, tmp_path):
    # prepare /data/imagenet /data/imagenet256, then train on .../train and .../val
    src = tmp_path / "imagenet"
    src.mkdir()
    data.rename(src / "train")
    (src / "train" / "loose.png").unlink()  # a file beside the classes: train would not be a split
    write_image_folder(src / "val", ["n01", "n02"], 2, size=16)
    dst = tmp_path / "imagenet256"
    lines = []
    prepare_tree(src, dst, size=24, log=lines.append)
    for split in ("train", "val"):
        assert any(f"index of {dst / split} written to {dst / INDEX_DIR}" in line for line in lines), lines
        listing = read_index(index_paths(str(dst / split))[0], str(dst / split))
        assert listing is not None and [p for p, _ in listing.files] == os_walk_listing(dst / split)
        assert listing.dirs == walk_tree(str(dst / split)).dirs
        walked = walk_tree(str(dst / split))
        assert listing.folders == walked.folders and listing.files.labels.tolist() == walked.files.labels.tolist()
    classes, samples = scan_image_folder(str(dst / "train"))  # from the index
    assert classes == ["n01", "n02", "n03"] and len(samples) == 10


def test_training_starts_after_the_first_read_the_index(tmp_path, capsys):
    train = write_image_folder(tmp_path / "d" / "train", ["n01", "n02"], 4, size=40)
    val = write_image_folder(tmp_path / "d" / "val", ["n01", "n02"], 2, size=40)
    age(train)
    age(val)
    repo = Path(__file__).resolve().parents[1]

    def argv(out: str) -> list[str]:
        return ["--config", str(repo / "configs" / "demo.yaml"), "--out", str(tmp_path / out), "--set",
                *tiny_overrides(train, val, 2, epochs=1), "data.batch_size=4"]

    assert run_train(argv("out")) == 0
    first = capsys.readouterr().out
    assert f"data: {train}: 8 files walked" in first and "index written to" in first
    assert run_train(argv("out2")) == 0  # another run on the same data: another job, the same index
    second = capsys.readouterr().out
    assert f"data: {train}: 8 files from the index" in second and f"data: {val}: 4 files from the index" in second
    assert "done: 1 epochs" in second


@pytest.mark.slow
def test_under_ddp_rank_0_walks_and_the_other_rank_reads_its_index(tmp_path):
    from .test_ddp_agreement import Ranks, args

    train = write_image_folder(tmp_path / "d" / "train", ["n01", "n02", "n03"], 4, size=40)
    val = write_image_folder(tmp_path / "d" / "val", ["n01", "n02", "n03"], 1, size=40)
    age(train)
    age(val)
    results = Ranks([args(train, val, tmp_path / "out", epochs=1)] * 2).wait(timeout=120)
    assert [code for code, _, _ in results] == [0, 0], results[0][2][-2000:] + results[1][2][-2000:]
    out = results[0][1]
    assert f"data: {train}: 12 files walked" in out and "index written to" in out
    assert "data: the other 1 rank read the index" in out  # rank 1 came after rank 0's walk
    assert "data:" not in results[1][1]  # rank 0 speaks for the run

    # The tree changed (a file added): rank 0 walks it again, rank 1 reads the new index.
    (train / "n01" / "new.JPEG").write_bytes((train / "n01" / "n01_000.JPEG").read_bytes())
    # Changed a while ago, as the first tree was: a change less than 2 s before the walk writes
    # no index (the racy rule), and how long two ranks take to start is no test's business.
    age(train)
    results = Ranks([args(train, val, tmp_path / "out2", epochs=1)] * 2).wait(timeout=120)
    assert [code for code, _, _ in results] == [0, 0], results[0][2][-2000:]
    assert f"data: {train}: 13 files walked" in results[0][1]
    assert "data: the other 1 rank read the index" in results[0][1]


def test_rank_0_names_the_ranks_that_could_not_read_its_index():
    from alexnet_train.lifecycle import how_ranks_read_the_data

    read = "data: /d/train: 12 files from the index /d/.alexnet-index/train-x.npz (0.0 s)"
    walked = "data: /d/train: 12 files walked in 0.0 s; index written to /d/.alexnet-index/train-x.npz"
    assert how_ranks_read_the_data([[], [read], [read]]) == "data: the other 2 ranks read the index"
    assert how_ranks_read_the_data([[], [read], [walked], [walked]]) == (
        "data: 2 of the other 3 ranks walked the data themselves (rank 2: /d/train): they found no current "
        "index (not written, or not on storage they see)")
