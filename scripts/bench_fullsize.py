"""The data path at ImageNet's full size: alexnet-prepare and alexnet-data ilsvrc, each killed
once and run again.

Usage::

    python scripts/bench_fullsize.py --images data/tiny-imagenet-200/train --work /tmp/scale

- ``prepare``: ``alexnet-prepare`` over the rehearsal tree of ``bench_scale.py`` (1,281,167
  + 50,000 hard links to the JPEGs under --images, made once under WORK), SIGKILLed with its
  workers after --kill-after seconds, then run again to the end: the images/s of each run,
  and what the re-run spent before it wrote again (finding the finished files).
- ``ilsvrc``: archives shaped like image-net.org's, built from the same JPEGs (a train tar
  of 1,000 class tars of ~1,281 files, a flat val tar of 50,000, a devkit with meta.mat and
  the validation ground truth), then ``alexnet-data ilsvrc`` on them, SIGKILLed mid-way
  through the train classes (--kill-ilsvrc-after) and run again: the time of each run and how many classes the
  re-run found already unpacked.

One line per figure.  Needs scipy (the devkit's meta.mat), which ``[dev]`` installs.
"""
from __future__ import annotations

import argparse
import io
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_scale import REPO, lay_out, line, source_images, wnids  # noqa: E402

TRAIN_FILES = 1_281_167
VAL_FILES = 50_000


def run_until(argv: list[str], kill_after: float | None, log: Path) -> tuple[float, int | None]:
    """Run ``argv`` (its output to ``log``); SIGKILL its whole group after ``kill_after`` s.
    (seconds, exit code; None when killed)."""
    started = time.perf_counter()
    with open(log, "a") as out:
        proc = subprocess.Popen(argv, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(timeout=kill_after)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            code = None
    return time.perf_counter() - started, code


def part_prepare(root: Path, work: Path, kill_after: float) -> None:
    dst = work / "prepared"
    shutil.rmtree(dst, ignore_errors=True)
    log = work / "prepare.log"
    log.write_text("")
    argv = [sys.executable, "-m", "alexnet_train", "prepare", str(root), str(dst), "--workers", "2"]
    took, code = run_until(argv, kill_after, log)
    written = sum(len(files) for _, _, files in os.walk(dst))
    line("prepare, killed", f"SIGKILL after {took:.0f} s: {written:,} files on disk")
    took, code = run_until(argv, None, log)
    text = log.read_text()
    m = re.findall(r"prepare: (\d+) images in .*: (\d+) to write, (\d+) already done", text)
    w = re.findall(r"prepare: wrote (\d+), skipped (\d+), failed (\d+) in ([\d.]+)s \((\d+) images/s\)", text)
    line("prepare, re-run to the end",
         f"{took:.0f} s wall, exit {code}; " + (f"found {int(m[-1][0]):,}, {int(m[-1][2]):,} already done; " if m else "")
         + (f"wrote {int(w[-1][0]):,} at {w[-1][4]} images/s" if w else "no summary line"))
    index = [ln for ln in text.splitlines() if "index of" in ln]
    line("prepare, index", index[-1].split("prepare: ", 1)[1] if index else "no index line")


def write_devkit(path: Path, classes: list[str], labels: list[str]) -> None:
    import numpy as np
    from scipy.io import savemat

    src = path.parent / "devkit-src" / "ILSVRC2012_devkit_t12" / "data"
    src.mkdir(parents=True, exist_ok=True)
    ids = {wnid: i for i, wnid in enumerate(classes, 1)}
    (src / "ILSVRC2012_validation_ground_truth.txt").write_text("".join(f"{ids[w]}\n" for w in labels))
    dtype = [("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("num_children", "O")]
    synsets = np.zeros((len(classes), 1), dtype=dtype)
    for k, wnid in enumerate(classes):
        synsets[k, 0] = (np.array([[ids[wnid]]], dtype=np.float64), wnid, f"words of {wnid}",
                         np.array([[0]], dtype=np.float64))
    savemat(str(src / "meta.mat"), {"synsets": synsets})
    with tarfile.open(path, "w:gz") as tar:
        tar.add(src.parent, arcname="ILSVRC2012_devkit_t12")
    shutil.rmtree(path.parent / "devkit-src")


def add_file(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 1_300_000_000
    tar.addfile(info, io.BytesIO(data))


def build_archives(images: Path, folder: Path) -> float:
    """image-net.org's three files, from the JPEGs under ``images`` (made once)."""
    done = folder / "COMPLETE"
    if done.exists():
        return 0.0
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    started = time.perf_counter()
    sources = [Path(p).read_bytes() for p in source_images(images)]
    classes = wnids()
    per_class, extra = divmod(TRAIN_FILES, len(classes))
    k = 0
    with tarfile.open(folder / "ILSVRC2012_img_train.tar", "w") as outer:
        for ci, wnid in enumerate(classes):
            inner = io.BytesIO()
            with tarfile.open(fileobj=inner, mode="w") as tar:
                for i in range(per_class + (ci < extra)):
                    add_file(tar, f"{wnid}_{i}.JPEG", sources[k % len(sources)])
                    k += 1
            add_file(outer, f"{wnid}.tar", inner.getvalue())
    labels = [classes[i % len(classes)] for i in range(VAL_FILES)]
    with tarfile.open(folder / "ILSVRC2012_img_val.tar", "w") as tar:
        for i, _ in enumerate(labels, 1):
            add_file(tar, f"ILSVRC2012_val_{i:08d}.JPEG", sources[(k + i) % len(sources)])
    write_devkit(folder / "ILSVRC2012_devkit_t12.tar.gz", classes, labels)
    done.write_text("train, val, devkit\n")
    return time.perf_counter() - started


def part_ilsvrc(images: Path, work: Path, kill_after: float) -> None:
    tars = work / "ilsvrc-archives"
    took = build_archives(images, tars)
    sizes = ", ".join(f"{p.name} {p.stat().st_size / 2**30:.2f} GiB" for p in sorted(tars.glob("ILSVRC*")))
    line("ilsvrc archives", (f"built in {took:.0f} s: " if took else "(built earlier): ") + sizes)
    root = work / "ilsvrc"
    shutil.rmtree(root, ignore_errors=True)
    log = work / "ilsvrc.log"
    log.write_text("")
    argv = [sys.executable, "-m", "alexnet_train", "data", "ilsvrc", str(root), "--no-verify", "--workers", "2",
            "--train-tar", str(tars / "ILSVRC2012_img_train.tar"), "--val-tar", str(tars / "ILSVRC2012_img_val.tar"),
            "--devkit", str(tars / "ILSVRC2012_devkit_t12.tar.gz")]
    took, code = run_until(argv, kill_after, log)
    line("alexnet-data ilsvrc, killed", f"SIGKILL after {took:.0f} s" if code is None else
         f"finished before the kill, {took:.0f} s, exit {code}")
    took, code = run_until(argv, None, log)
    text = log.read_text()
    already = re.findall(r"(\d+) of (\d+) classes already unpacked", text)
    line("alexnet-data ilsvrc, re-run to the end",
         f"{took:.0f} s wall, exit {code}" + (f"; {already[-1][0]} of {already[-1][1]} classes were already unpacked"
                                               if already else ""))
    train = re.findall(r"/train: ([\d,]+) images in (\d+) class folders", text)
    val = re.findall(r"/val: ([\d,]+) images in (\d+) class folders", text)
    if train and val:
        line("alexnet-data ilsvrc, laid out", f"train {train[-1][0]} images in {train[-1][1]} class folders, "
                                              f"val {val[-1][0]} images in {val[-1][1]} class folders")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=Path, required=True, help="a folder of JPEGs (searched recursively)")
    p.add_argument("--work", type=Path, required=True, help="bench_scale's work folder (the tree is made there once)")
    p.add_argument("--kill-after", type=float, default=120, help="seconds before prepare's first run is killed (120)")
    p.add_argument("--kill-ilsvrc-after", type=float, default=40,
                   help="seconds before alexnet-data ilsvrc's first run is killed (40: mid-way through the train classes)")
    p.add_argument("--skip", action="append", default=[], choices=("prepare", "ilsvrc"))
    args = p.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    if "prepare" not in args.skip:
        train, _val, _ = lay_out(args.images, args.work, TRAIN_FILES, VAL_FILES // 1000)
        part_prepare(train.parent, args.work, args.kill_after)
    if "ilsvrc" not in args.skip:
        part_ilsvrc(args.images, args.work, args.kill_ilsvrc_after)
    return 0


if __name__ == "__main__":
    sys.exit(main())
