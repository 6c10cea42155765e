"""alexnet-data: small archives in the real layouts, served from a real HTTP server on 127.0.0.1.

Tiny ImageNet's zip (train/<wnid>/images + _boxes.txt, val/images + val_annotations.txt,
test/, wnids.txt, words.txt), Imagenette's tgz and ILSVRC-2012's tar of tars + devkit
are built here; downloads go through urllib against a server that honours Range,
can cut a response short, and counts what it was asked for.
"""
from __future__ import annotations

import hashlib
import io
import subprocess
import sys
import tarfile
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from alexnet_train import cli
from alexnet_train.data import integrity, public, transport
from alexnet_train.data.public_sets import imagenet_sample as imagenet_sample_set
from alexnet_train.data.public_sets import imagenette as imagenette_set
from alexnet_train.data.public_sets import tiny_imagenet as tiny_imagenet_set
from alexnet_train.data.datasets import read_labels_file, scan_image_folder
from alexnet_train.export import read_synsets

from .conftest import CLASSES, REPO
from .test_readme_walkthrough import TRAIN_PER_CLASS, VAL_LABELS, jpeg_bytes, write_ilsvrc_tars

TINY_WNIDS = ["n02124075", "n04067472", "n01443537"]  # wnids.txt order is not sorted in the real file
TINY_TRAIN, TINY_VAL = 5, 2


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def tiny_zip_bytes(wnids: list[str] = TINY_WNIDS, top: str = "tiny-imagenet-200") -> bytes:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    val_lines = []
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(f"{top}/wnids.txt", "".join(f"{w}\n" for w in wnids))
        words = [f"n00001740\tentity"] + [f"{w}\tname of {w}, other {w}" for w in wnids]
        zf.writestr(f"{top}/words.txt", "\n".join(words) + "\n")
        for ci, w in enumerate(wnids):
            boxes = []
            for i in range(TINY_TRAIN):
                zf.writestr(f"{top}/train/{w}/images/{w}_{i}.JPEG", jpeg_bytes(rng, ci, 64, 64))
                boxes.append(f"{w}_{i}.JPEG\t0\t0\t63\t63")
            zf.writestr(f"{top}/train/{w}/{w}_boxes.txt", "\n".join(boxes) + "\n")
        k = 0
        for i in range(TINY_VAL):
            for ci, w in enumerate(wnids):
                zf.writestr(f"{top}/val/images/val_{k}.JPEG", jpeg_bytes(rng, ci, 64, 64))
                val_lines.append(f"val_{k}.JPEG\t{w}\t1\t2\t60\t61")
                k += 1
        zf.writestr(f"{top}/val/val_annotations.txt", "\n".join(val_lines) + "\n")
        for i in range(3):
            zf.writestr(f"{top}/test/images/test_{i}.JPEG", jpeg_bytes(rng, 0, 64, 64))
    return buf.getvalue()


def imagenette_tgz_bytes() -> bytes:
    rng = np.random.default_rng(1)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for split, n in (("train", 3), ("val", 2)):
            for ci, w in enumerate(["n01440764", "n02102040"]):
                for i in range(n):
                    data = jpeg_bytes(rng, ci, 213, 160)
                    info = tarfile.TarInfo(f"imagenette2-160/{split}/{w}/{w}_{split}{i}.JPEG")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        csv = b"path,noisy_labels_0\n"
        info = tarfile.TarInfo("imagenette2-160/noisy_imagenette.csv")
        info.size = len(csv)
        tar.addfile(info, io.BytesIO(csv))
    return buf.getvalue()


class Server:
    """A real HTTP server on 127.0.0.1 that honours Range and can cut responses short."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.requests: list[tuple[str, str | None]] = []  # (path, Range header)
        self.cut_after: list[int] = []  # per response, in order: send only this many bytes, then drop
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                rng = self.headers.get("Range")
                outer.requests.append((self.path, rng))
                data = outer.files.get(self.path)
                if data is None:
                    self.send_error(404, "Not Found")
                    return
                start = 0
                if rng:
                    start = int(rng.split("=")[1].split("-")[0])
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if outer.cut_after:
                    n = outer.cut_after.pop(0)
                    self.wfile.write(body[:n])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        # serve_forever polls for shutdown every poll_interval (0.5 s by default), which close() waits out
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02},
                                       daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = Server()
    yield s
    s.close()


@pytest.fixture
def tiny_served(server, monkeypatch):
    """The tiny zip served at /tiny-imagenet-200.zip, with TINY_IMAGENET pointing at it."""
    data = tiny_zip_bytes()
    server.files["/tiny-imagenet-200.zip"] = data
    monkeypatch.setattr(tiny_imagenet_set, "TINY_IMAGENET", public.Archive(
        "tiny-imagenet-200.zip", md5(data), server.url("/tiny-imagenet-200.zip"), len(data)))
    return data


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    code = 0
    try:
        cli.data_main(argv)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def check_tiny_tree(root: Path, wnids: list[str] = TINY_WNIDS) -> None:
    classes, samples = scan_image_folder(str(root / "train"))
    assert classes == sorted(wnids)
    assert len(samples) == TINY_TRAIN * len(wnids)
    val_classes, val_samples = scan_image_folder(str(root / "val"))
    assert val_classes == sorted(wnids) and len(val_samples) == TINY_VAL * len(wnids)
    # val sorted by val_annotations.txt: val_k belongs to wnids[k % len(wnids)] in the fixture
    for path, label in val_samples:
        k = int(Path(path).stem.split("_")[1])
        assert val_classes[label] == TINY_WNIDS[k % len(TINY_WNIDS)]
    assert not (root / "test").exists()
    assert not list(root.rglob("*_boxes.txt")) and not list(root.rglob("images"))
    names = read_synsets(str(root / "synset_words.txt"))
    assert sorted(names) == sorted(wnids)
    assert names[wnids[0]] == f"name of {wnids[0]}, other {wnids[0]}"


def test_tiny_imagenet_download_and_layout(tmp_path, server, tiny_served, capsys):
    root = tmp_path / "tiny"
    code, out, err = run_cli(["tiny-imagenet", str(root)], capsys)
    assert code == 0, err
    check_tiny_tree(root)
    assert server.requests == [("/tiny-imagenet-200.zip", None)]
    assert "verified" in out and "ready" in out
    assert "download tiny-imagenet-200.zip" in err  # the plain progress line (no TTY here)
    assert not (root / public.STATE_DIR / "downloads" / "tiny-imagenet-200.zip").exists()  # removed once laid out
    assert not (root / public.STATE_DIR / "staging").exists()
    # A re-run finds it done: no request, nothing rewritten.
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*.JPEG")}
    code, out, _ = run_cli(["tiny-imagenet", str(root)], capsys)
    assert code == 0 and "already laid out" in out
    assert len(server.requests) == 1
    assert before == {p: p.stat().st_mtime_ns for p in root.rglob("*.JPEG")}


def test_download_resumes_after_a_cut_connection(tmp_path, server, tiny_served, capsys):
    cut = len(tiny_served) // 3
    server.cut_after = [cut, cut // 2]  # two cuts in a row, then the rest
    root = tmp_path / "tiny"
    code, out, err = run_cli(["tiny-imagenet", str(root), "--keep-archive"], capsys)
    assert code == 0, err
    assert server.requests == [("/tiny-imagenet-200.zip", None),
                               ("/tiny-imagenet-200.zip", f"bytes={cut}-"),
                               ("/tiny-imagenet-200.zip", f"bytes={cut + cut // 2}-")]
    assert "resuming" in out
    kept = root / public.STATE_DIR / "downloads" / "tiny-imagenet-200.zip"
    assert kept.read_bytes() == tiny_served
    check_tiny_tree(root)


def test_download_resumes_a_part_file_left_by_a_killed_run(tmp_path, server, tiny_served, capsys):
    root = tmp_path / "tiny"
    part = root / public.STATE_DIR / "downloads" / "tiny-imagenet-200.zip.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(tiny_served[:1000])
    code, _, err = run_cli(["tiny-imagenet", str(root)], capsys)
    assert code == 0, err
    assert server.requests == [("/tiny-imagenet-200.zip", "bytes=1000-")]
    check_tiny_tree(root)


def test_checksum_mismatch_is_refused_before_unpacking(tmp_path, server, tiny_served, monkeypatch, capsys):
    monkeypatch.setattr(tiny_imagenet_set, "TINY_IMAGENET", public.Archive(
        "tiny-imagenet-200.zip", "0" * 32, server.url("/tiny-imagenet-200.zip"), len(tiny_served)))
    root = tmp_path / "tiny"
    code, _, err = run_cli(["tiny-imagenet", str(root)], capsys)
    assert code == 1
    lines = [line for line in err.splitlines() if "error" in line]
    assert len(lines) == 1 and "tiny-imagenet-200.zip" in lines[0] and "MD5" in lines[0]
    assert not (root / "train").exists() and not (root / "val").exists()
    # a wrong download is not kept: the next run fetches it again
    assert not (root / public.STATE_DIR / "downloads" / "tiny-imagenet-200.zip").exists()


def test_from_archive_is_verified_and_kept(tmp_path, tiny_served, server, capsys):
    archive = tmp_path / "tiny-imagenet-200.zip"
    archive.write_bytes(tiny_served)
    root = tmp_path / "tiny"
    code, _, err = run_cli(["tiny-imagenet", str(root), "--from", str(archive)], capsys)
    assert code == 0, err
    assert server.requests == []  # --from never touches the network
    assert archive.read_bytes() == tiny_served  # the user's file is left alone
    check_tiny_tree(root)


def test_repacked_archive_needs_no_verify(tmp_path, tiny_served, capsys):
    archive = tmp_path / "repacked.zip"
    archive.write_bytes(tiny_served)
    with zipfile.ZipFile(archive, "a") as zf:  # a repack of the same layout: other bytes, other checksum
        zf.writestr("tiny-imagenet-200/README.txt", "repacked\n")
    code, _, err = run_cli(["tiny-imagenet", str(tmp_path / "a"), "--from", str(archive)], capsys)
    assert code == 1 and "--no-verify" in err and str(archive) in err
    assert archive.exists()  # a refused --from file is never deleted
    code, out, err = run_cli(["tiny-imagenet", str(tmp_path / "b"), "--from", str(archive), "--no-verify"], capsys)
    assert code == 0, err
    assert "not verified" in out
    check_tiny_tree(tmp_path / "b")


def test_class_subset(tmp_path, tiny_served, capsys):
    archive = tmp_path / "t.zip"
    archive.write_bytes(tiny_served)
    root = tmp_path / "sub"
    keep = [TINY_WNIDS[0], TINY_WNIDS[2]]
    code, _, err = run_cli(["tiny-imagenet", str(root), "--from", str(archive), "--classes", ",".join(keep)], capsys)
    assert code == 0, err
    classes, samples = scan_image_folder(str(root / "train"))
    assert classes == sorted(keep) and len(samples) == TINY_TRAIN * 2
    assert sorted(read_synsets(str(root / "synset_words.txt"))) == sorted(keep)
    code, _, err = run_cli(["tiny-imagenet", str(tmp_path / "x"), "--from", str(archive), "--classes", "n99999999"],
                           capsys)
    assert code == 2 and "n99999999" in err
    # the same DIR with another subset is refused, not mixed
    code, _, err = run_cli(["tiny-imagenet", str(root), "--from", str(archive)], capsys)
    assert code == 1 and "choose another DIR" in err


def test_train_per_class_keeps_the_first_n_training_images_and_all_of_val(tmp_path, tiny_served, capsys):
    archive = tmp_path / "t.zip"
    archive.write_bytes(tiny_served)
    root = tmp_path / "few"
    keep = [TINY_WNIDS[1], TINY_WNIDS[2]]
    code, _, err = run_cli(["tiny-imagenet", str(root), "--from", str(archive), "--classes", ",".join(keep),
                            "--train-per-class", "3"], capsys)
    assert code == 0, err
    for wnid in keep:  # the first three by file name, the same on every run
        assert sorted(p.name for p in (root / "train" / wnid).iterdir()) == [f"{wnid}_{i}.JPEG" for i in range(3)]
    val_classes, val_samples = scan_image_folder(str(root / "val"))
    assert val_classes == sorted(keep) and len(val_samples) == TINY_VAL * 2
    # more than a class has, or fewer than one: one line, nothing laid out
    code, _, err = run_cli(["tiny-imagenet", str(tmp_path / "y"), "--from", str(archive),
                            "--train-per-class", str(TINY_TRAIN + 1)], capsys)
    assert code == 2 and f"has only {TINY_TRAIN} training images" in err and not (tmp_path / "y" / "train").exists()
    code, _, err = run_cli(["tiny-imagenet", str(tmp_path / "z"), "--from", str(archive), "--train-per-class", "0"],
                           capsys)
    assert code == 2 and "--train-per-class" in err
    # the full tree is another dataset: DIR made with a subset is not reused for it
    code, _, err = run_cli(["tiny-imagenet", str(root), "--from", str(archive), "--classes", ",".join(keep)], capsys)
    assert code == 1 and "choose another DIR" in err


@pytest.mark.parametrize("damage", ["truncated", "not_a_zip", "bad_member"])
def test_damaged_archive_is_one_line_naming_the_file(tmp_path, tiny_served, damage, capsys):
    archive = tmp_path / "tiny-imagenet-200.zip"
    if damage == "truncated":
        archive.write_bytes(tiny_served[: len(tiny_served) // 2])
    elif damage == "not_a_zip":
        archive.write_bytes(b"<html>404</html>")
    else:  # a flipped byte inside one image's compressed data: zlib or the CRC check fails while unpacking
        with zipfile.ZipFile(io.BytesIO(tiny_served)) as zf:
            info = next(i for i in zf.infolist() if i.filename.endswith("_3.JPEG"))
        data = bytearray(tiny_served)
        name_len, extra_len = int.from_bytes(data[info.header_offset + 26: info.header_offset + 28], "little"), \
            int.from_bytes(data[info.header_offset + 28: info.header_offset + 30], "little")
        start = info.header_offset + 30 + name_len + extra_len
        data[start + info.compress_size // 2] ^= 0xFF
        archive.write_bytes(bytes(data))
    root = tmp_path / "tiny"
    code, _, err = run_cli(["tiny-imagenet", str(root), "--from", str(archive), "--no-verify"], capsys)
    assert code == 1
    errors = [line for line in err.splitlines() if line.startswith("alexnet-data: error:")]
    assert len(errors) == 1 and str(archive) in errors[0] and err.strip().endswith(errors[0])
    assert not (root / "train").exists() and not (root / "val").exists()


def test_interrupted_unpack_leaves_no_half_tree_and_resumes(tmp_path, tiny_served, monkeypatch, capsys):
    archive = tmp_path / "t.zip"
    archive.write_bytes(tiny_served)
    root = tmp_path / "tiny"
    real_copy, calls = tiny_imagenet_set._copy, []

    def dying_copy(src, dst):
        calls.append(dst)
        if len(calls) == TINY_TRAIN * len(TINY_WNIDS) + 2:  # train done and committed, two val files in
            raise KeyboardInterrupt
        real_copy(src, dst)

    monkeypatch.setattr(tiny_imagenet_set, "_copy", dying_copy)
    code, _, err = run_cli(["tiny-imagenet", str(root), "--from", str(archive)], capsys)
    assert code == 130 and "run the same command again" in err
    assert (root / "train").is_dir() and not (root / "val").exists()  # whole splits only
    monkeypatch.setattr(tiny_imagenet_set, "_copy", real_copy)
    calls.clear()
    code, out, err = run_cli(["tiny-imagenet", str(root), "--from", str(archive)], capsys)
    assert code == 0, err
    assert f"{root / 'train'}: already laid out" in out
    check_tiny_tree(root)


def test_refuses_to_write_over_a_tree_it_did_not_make(tmp_path, tiny_served, capsys):
    archive = tmp_path / "t.zip"
    archive.write_bytes(tiny_served)
    root = tmp_path / "tiny"
    (root / "train" / "mine").mkdir(parents=True)
    code, _, err = run_cli(["tiny-imagenet", str(root), "--from", str(archive)], capsys)
    assert code == 1 and str(root / "train") in err
    assert (root / "train" / "mine").is_dir()


def test_unreachable_server_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(tiny_imagenet_set, "TINY_IMAGENET", public.Archive(
        "tiny-imagenet-200.zip", "0" * 32, "http://127.0.0.1:9/tiny-imagenet-200.zip"))
    monkeypatch.setattr(transport.time, "sleep", lambda s: None)
    code, _, err = run_cli(["tiny-imagenet", str(tmp_path / "t")], capsys)
    assert code == 1
    last = err.strip().splitlines()[-1]
    assert "127.0.0.1:9" in last and "--from" in last


def test_http_error_is_one_line(tmp_path, server, monkeypatch, capsys):
    monkeypatch.setattr(tiny_imagenet_set, "TINY_IMAGENET", public.Archive(
        "tiny-imagenet-200.zip", "0" * 32, server.url("/missing.zip")))
    code, _, err = run_cli(["tiny-imagenet", str(tmp_path / "t")], capsys)
    assert code == 1 and "HTTP 404" in err and "/missing.zip" in err


def test_imagenette_download_and_layout(tmp_path, server, monkeypatch, capsys):
    data = imagenette_tgz_bytes()
    server.files["/imagenette2-160.tgz"] = data
    archive = public.Archive("imagenette2-160.tgz", md5(data), server.url("/imagenette2-160.tgz"))
    sizes = []
    monkeypatch.setattr(imagenette_set, "imagenette_archive", lambda size: sizes.append(size) or archive)
    root = tmp_path / "nette"
    code, _, err = run_cli(["imagenette", str(root), "--size", "160"], capsys)
    assert code == 0, err
    assert sizes == ["160"]
    classes, samples = scan_image_folder(str(root / "train"))
    assert classes == ["n01440764", "n02102040"] and len(samples) == 6
    val_classes, val_samples = scan_image_folder(str(root / "val"))
    assert val_classes == classes and len(val_samples) == 4
    assert read_synsets(str(root / "synset_words.txt"))["n01440764"].startswith("tench")
    assert not (root / "noisy_imagenette.csv").exists()


def test_imagenette_published_checksums_come_from_torchvision():
    from torchvision.datasets.imagenette import Imagenette

    for size, key in (("full", "full"), ("320", "320px"), ("160", "160px")):
        a = imagenette_set.imagenette_archive(size)
        assert (a.url, a.md5) == Imagenette._ARCHIVES[key]
    with pytest.raises(public.UsageError):
        imagenette_set.imagenette_archive("999")


def test_ilsvrc_train_val_devkit(tmp_path, capsys):
    pytest.importorskip("scipy")
    tars = tmp_path / "tars"
    write_ilsvrc_tars(tars)
    root = tmp_path / "imagenet"
    code, out, err = run_cli(["ilsvrc", str(root), "--no-verify", "--workers", "2",
                              "--train-tar", str(tars / "ILSVRC2012_img_train.tar"),
                              "--val-tar", str(tars / "ILSVRC2012_img_val.tar"),
                              "--devkit", str(tars / "ILSVRC2012_devkit_t12.tar.gz")], capsys)
    assert code == 0, err
    classes, samples = scan_image_folder(str(root / "train"))
    assert classes == sorted(CLASSES) and len(samples) == TRAIN_PER_CLASS * len(CLASSES)
    _, val_samples = scan_image_folder(str(root / "val"))
    got = {Path(p).name: classes[label] for p, label in val_samples}
    assert got == {f"ILSVRC2012_val_{i:08d}.JPEG": w for i, w in enumerate(VAL_LABELS, 1)}
    assert read_synsets(str(root / "synset_words.txt"))[CLASSES[0]] == f"words of {CLASSES[0]}"
    assert not list(root.glob("**/*.partial"))


def test_ilsvrc_flat_val_and_resume_of_train_classes(tmp_path, capsys):
    pytest.importorskip("scipy")
    tars = tmp_path / "tars"
    write_ilsvrc_tars(tars)
    root = tmp_path / "imagenet"
    # a killed earlier run: one class unpacked whole, one cut mid-way (.partial)
    stage = root / public.STATE_DIR / "staging" / "train"
    (stage / CLASSES[0]).mkdir(parents=True)
    for i in range(TRAIN_PER_CLASS):
        (stage / CLASSES[0] / f"{CLASSES[0]}_{1000 + i}.JPEG").write_bytes(b"kept")
    (stage / f"{CLASSES[1]}.partial").mkdir()
    (stage / f"{CLASSES[1]}.partial" / "half.JPEG").write_bytes(b"x")
    code, out, err = run_cli(["ilsvrc", str(root), "--no-verify", "--workers", "1", "--val-layout", "flat",
                              "--train-tar", str(tars / "ILSVRC2012_img_train.tar"),
                              "--val-tar", str(tars / "ILSVRC2012_img_val.tar"),
                              "--devkit", str(tars / "ILSVRC2012_devkit_t12.tar.gz")], capsys)
    assert code == 0, err
    assert "1 of 3 classes already unpacked" in out
    assert (root / "train" / CLASSES[0] / f"{CLASSES[0]}_1000.JPEG").read_bytes() == b"kept"  # not redone
    assert sorted(p.name for p in (root / "train" / CLASSES[1]).iterdir()) == \
        [f"{CLASSES[1]}_{1000 + i}.JPEG" for i in range(TRAIN_PER_CLASS)]
    labels = read_labels_file(str(root / "val_labels.txt"))
    assert labels == {f"ILSVRC2012_val_{i:08d}": w for i, w in enumerate(VAL_LABELS, 1)}
    assert sorted(p.name for p in (root / "val").iterdir()) == [f"ILSVRC2012_val_{i:08d}.JPEG"
                                                               for i in range(1, len(VAL_LABELS) + 1)]


def test_ilsvrc_checks_the_published_checksums(tmp_path, capsys):
    tars = tmp_path / "tars"
    write_ilsvrc_tars(tars)
    code, _, err = run_cli(["ilsvrc", str(tmp_path / "i"), "--train-tar", str(tars / "ILSVRC2012_img_train.tar")],
                           capsys)
    assert code == 1 and "ILSVRC2012_img_train.tar" in err and "1d675b47d978889d74fa0da5fadfb00e" in err
    code, _, err = run_cli(["ilsvrc", str(tmp_path / "i"), "--val-tar", str(tars / "ILSVRC2012_img_val.tar"),
                            "--no-verify"], capsys)
    assert code == 2 and "--devkit" in err
    code, _, err = run_cli(["ilsvrc", str(tmp_path / "i"), "--train-tar", str(tmp_path / "nope.tar")], capsys)
    assert code == 2 and "nope.tar" in err


@pytest.mark.slow
def test_python_m_alexnet_train_data(tmp_path, tiny_served):
    archive = tmp_path / "t.zip"
    archive.write_bytes(tiny_served)
    proc = subprocess.run([sys.executable, "-m", "alexnet_train", "data", "tiny-imagenet", str(tmp_path / "t"),
                           "--from", str(archive), "--no-verify"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    check_tiny_tree(tmp_path / "t")


def sample_zip(tmp_path: Path, files: dict[str, bytes]) -> tuple[bytes, str]:
    """A GitHub-style archive zip of a flat repo, and the tree id git itself gives those files."""
    repo = tmp_path / "git-repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    lines = []
    for name, data in files.items():
        (repo / name).write_bytes(data)
        blob = subprocess.run(["git", "-C", str(repo), "hash-object", "-w", name], check=True,
                              capture_output=True, text=True).stdout.strip()
        lines.append(f"100644 blob {blob}\t{name}\n")
    tree = subprocess.run(["git", "-C", str(repo), "mktree"], input="".join(lines), check=True,
                          capture_output=True, text=True).stdout.strip()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("imagenet-sample-images-abc/", "")
        for name, data in files.items():
            zf.writestr(f"imagenet-sample-images-abc/{name}", data)
    return buf.getvalue(), tree


def test_imagenet_sample_checked_by_git_tree_id(tmp_path, server, monkeypatch, capsys):
    rng = np.random.default_rng(3)
    files = {"README.md": b"# samples\n", "n01440764_tench.JPEG": jpeg_bytes(rng, 0, 250, 187),
             "n01443537_goldfish.JPEG": jpeg_bytes(rng, 1, 300, 200),
             "n01484850_great_white_shark.JPEG": jpeg_bytes(rng, 2, 200, 300)}
    data, tree = sample_zip(tmp_path, files)
    assert integrity.git_tree_id(files) == tree  # our hash is git's own
    server.files["/sample.zip"] = data
    monkeypatch.setattr(imagenet_sample_set, "SAMPLE_TREE", tree)
    monkeypatch.setattr(imagenet_sample_set, "IMAGENET_SAMPLE",
                        public.Archive("sample.zip", "", server.url("/sample.zip")))
    root = tmp_path / "sample"
    code, out, err = run_cli(["imagenet-sample", str(root)], capsys)
    assert code == 0, err
    classes, samples = scan_image_folder(str(root / "train"))
    assert classes == ["n01440764", "n01443537", "n01484850"] and len(samples) == 3
    assert (root / "train" / "n01440764" / "n01440764_tench.JPEG").read_bytes() == files["n01440764_tench.JPEG"]
    assert read_synsets(str(root / "synset_words.txt"))["n01484850"] == "great white shark"
    assert "content verified" in out
    # one changed photo: refused, nothing laid out
    files["n01443537_goldfish.JPEG"] = jpeg_bytes(rng, 1, 301, 200)
    other = tmp_path / "other.zip"
    (tmp_path / "o").mkdir()
    other.write_bytes(sample_zip(tmp_path / "o", files)[0])
    code, _, err = run_cli(["imagenet-sample", str(tmp_path / "s2"), "--from", str(other)], capsys)
    assert code == 1 and "git tree id" in err and str(other) in err
    assert not (tmp_path / "s2" / "train").exists()


def test_a_downloaded_archive_that_cannot_be_unpacked_is_not_kept(tmp_path, server, monkeypatch, capsys):
    junk = b"<html>a captive portal, not a zip</html>"
    server.files["/tiny-imagenet-200.zip"] = junk
    monkeypatch.setattr(tiny_imagenet_set, "TINY_IMAGENET", public.Archive(
        "tiny-imagenet-200.zip", md5(junk), server.url("/tiny-imagenet-200.zip")))
    root = tmp_path / "tiny"
    code, _, err = run_cli(["tiny-imagenet", str(root), "--keep-archive"], capsys)
    assert code == 1 and "not a readable zip" in err
    assert not (root / public.STATE_DIR / "downloads" / "tiny-imagenet-200.zip").exists()
    server.files["/tiny-imagenet-200.zip"] = data = tiny_zip_bytes()
    monkeypatch.setattr(tiny_imagenet_set, "TINY_IMAGENET", public.Archive(
        "tiny-imagenet-200.zip", md5(data), server.url("/tiny-imagenet-200.zip")))
    code, _, err = run_cli(["tiny-imagenet", str(root)], capsys)
    assert code == 0, err
    check_tiny_tree(root)
