"""Carry Tiny ImageNet 200 to a lent GPU in chunks, check it there, and plan the run to fit the window.

A device call carries at most 64 MiB (the checkout plus the carried paths), and Tiny ImageNet's
laid-out tree is ~211 MB in 110,001 files; a warm machine keeps what a call unpacked while the next call follows
within its idle time.  So the tree goes over as a few gzipped tar chunks (gzip takes the 512-byte
headers and padding of 110,001 small files to almost nothing), one per call, each checked on
arrival against a manifest (its SHA-256, its file count), and the whole tree checked before
training (100,000 train and 10,000 val images in 200 classes, or what the manifest says).

Usage (from the repository root)::

    python scripts/tiny_window.py pack data/tiny-imagenet-200 window            # here: window/chunk-NN.tar.gz + manifest.json
    python scripts/tiny_window.py unpack window/chunk-00.tar.gz /tmp/tiny --manifest window/manifest.json   # there, once per chunk
    python scripts/tiny_window.py check /tmp/tiny --manifest window/manifest.json                       # there, before training
    python scripts/tiny_window.py plan --config configs/tiny-imagenet-200-gpu.yaml --rate 9233 --window 900

``plan`` prints the run's expected time from a measured rate (images/s of the training step at
batch 128 in bf16: 9,233 for paper.yaml on one H200, docs/benchmarks/h200-2026-12-04.md) and how
many epochs fit in the device time left after the machine's start, the transfers and the
evaluation.  ``pack`` writes chunks of at most ``--chunk-mib`` MiB (56: room for the checkout).
Exit 0 when all is well, 1 when a chunk or the tree fails its check (one line says what), 2 for
bad usage.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tarfile
from pathlib import Path

MANIFEST_VERSION = 1
TREE_FILES = ("synset_words.txt",)  # laid out by alexnet-data beside train/ and val/


class WindowError(Exception):
    """A chunk or the tree is not what the manifest says."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _tree_files(root: Path) -> list[str]:
    """Every file of the laid-out tree, relative and sorted: train/, val/ and the synset list."""
    files = [name for name in TREE_FILES if (root / name).is_file()]
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise WindowError(f"{root / split}: not found (lay the data out first: alexnet-data tiny-imagenet DIR)")
        for dirpath, dirnames, filenames in os.walk(root / split):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            files += [os.path.relpath(os.path.join(dirpath, f), root) for f in sorted(filenames) if not f.startswith(".")]
    return files


def _counts(root: Path, files: list[str]) -> dict:
    per_split: dict[str, dict[str, int]] = {"train": {}, "val": {}}
    for rel in files:
        parts = rel.split(os.sep)
        if parts[0] in per_split and len(parts) == 3:
            per_split[parts[0]][parts[1]] = per_split[parts[0]].get(parts[1], 0) + 1
    return {split: {"images": sum(c.values()), "classes": len(c), "per_class": sorted(set(c.values()))}
            for split, c in per_split.items()}


def pack(data: Path, out: Path, chunk_mib: float = 56.0) -> dict:
    """Chunks of ``data``'s tree in ``out`` and the manifest describing them (also written)."""
    files = _tree_files(data)
    limit = int(chunk_mib * 2**20)
    out.mkdir(parents=True, exist_ok=True)
    chunks, current, size = [], [], 0
    for rel in files:
        # gzip (level 1) takes a member's 512-byte header and padding to a few dozen bytes, and Tiny
        # ImageNet's small JPEGs to ~70% (measured: 54 MiB of them came to 37 MiB): budget the
        # payload at that, and check each chunk's real size below.
        cost = (data / rel).stat().st_size + 64
        if current and size + cost > limit * 1.3:
            chunks.append(current)
            current, size = [], 0
        current.append(rel)
        size += cost
    if current:
        chunks.append(current)
    described: list[dict] = []
    while chunks:
        members = chunks.pop(0)
        path = out / f"chunk-{len(described):02d}.tar.gz"
        tmp = path.with_name(path.name + ".tmp")
        with tarfile.open(tmp, "w:gz", format=tarfile.USTAR_FORMAT, compresslevel=1) as tar:
            for rel in members:
                info = tar.gettarinfo(str(data / rel), arcname=rel)
                info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
                with open(data / rel, "rb") as fh:
                    tar.addfile(info, fh)
        if tmp.stat().st_size > limit:  # compressed less than budgeted: the same files in two chunks
            tmp.unlink()
            if len(members) == 1:
                raise WindowError(f"{data / members[0]}: larger than a chunk of {chunk_mib} MiB")
            half = len(members) // 2
            chunks[:0] = [members[:half], members[half:]]
            continue
        os.replace(tmp, path)
        described.append({"name": path.name, "sha256": _sha256(path), "files": len(members),
                          "bytes": path.stat().st_size})
    manifest = {"version": MANIFEST_VERSION, "source": str(data), "chunks": described, "files": len(files),
                **_counts(data, files)}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def _manifest(path: Path) -> dict:
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise WindowError(f"{path}: not a readable manifest ({exc})") from None
    if manifest.get("version") != MANIFEST_VERSION:
        raise WindowError(f"{path}: not a manifest of this script's version {MANIFEST_VERSION}")
    return manifest


def unpack(chunk: Path, dest: Path, manifest_path: Path) -> int:
    """Check ``chunk`` against the manifest, then extract it under ``dest``; the files it held."""
    manifest = _manifest(manifest_path)
    entry = next((c for c in manifest["chunks"] if c["name"] == chunk.name), None)
    if entry is None:
        raise WindowError(f"{chunk}: not a chunk of {manifest_path}")
    if not chunk.is_file() or chunk.stat().st_size != entry["bytes"] or _sha256(chunk) != entry["sha256"]:
        raise WindowError(f"{chunk}: does not match its SHA-256 / size in {manifest_path} (damaged in transfer?)")
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(chunk) as tar:
        members = tar.getmembers()
        bad = [m.name for m in members if not m.isfile() or m.name.startswith(("/", "..")) or "/../" in m.name]
        if bad:
            raise WindowError(f"{chunk}: member {bad[0]!r} is not a plain file under the tree")
        tar.extractall(dest, filter="data")
    if len(members) != entry["files"]:
        raise WindowError(f"{chunk}: {len(members)} files, the manifest says {entry['files']}")
    return len(members)


def check(dest: Path, manifest_path: Path) -> dict:
    """The tree under ``dest`` against the manifest's counts; WindowError naming the first difference."""
    manifest = _manifest(manifest_path)
    files = _tree_files(dest)
    counts = _counts(dest, files)
    for split in ("train", "val"):
        if counts[split] != manifest[split]:
            raise WindowError(f"{dest / split}: {counts[split]}, the manifest says {manifest[split]} "
                              "(a chunk not unpacked yet?)")
    if len(files) != manifest["files"]:
        raise WindowError(f"{dest}: {len(files)} files, the manifest says {manifest['files']}")
    return counts


def plan(config: str, rate: float, window: float, start: float, per_chunk: float, chunks: int, eval_s: float,
         margin: float) -> dict:
    """The run's expected seconds per epoch at ``rate`` images/s, and the epochs that fit."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from alexnet_train.configload import load_config

    cfg = load_config(config)
    train_images, val_images = 100_000, 10_000  # Tiny ImageNet 200
    epoch = train_images / rate + val_images / (3 * rate)  # validation: forward only, ~3x a training step's rate
    left = window - start - per_chunk * chunks - eval_s - margin
    return {"config": config, "epochs": cfg.train.epochs, "seconds_per_epoch": round(epoch, 1),
            "training_seconds": round(epoch * cfg.train.epochs), "seconds_for_training": round(left),
            "epochs_that_fit": int(left // epoch), "fits": epoch * cfg.train.epochs <= left}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("pack", help="write the tree as checked chunks and their manifest")
    a.add_argument("data", type=Path)
    a.add_argument("out", type=Path)
    a.add_argument("--chunk-mib", type=float, default=56.0)
    a = sub.add_parser("unpack", help="check one chunk against the manifest and extract it")
    a.add_argument("chunk", type=Path)
    a.add_argument("dest", type=Path)
    a.add_argument("--manifest", type=Path, required=True)
    a = sub.add_parser("check", help="check the whole unpacked tree against the manifest")
    a.add_argument("dest", type=Path)
    a.add_argument("--manifest", type=Path, required=True)
    a = sub.add_parser("plan", help="expected run time from a measured rate, and the epochs that fit")
    a.add_argument("--config", default="configs/tiny-imagenet-200-gpu.yaml")
    a.add_argument("--rate", type=float, default=9233.0, help="training images/s (default: paper.yaml on one H200)")
    a.add_argument("--window", type=float, default=900.0, help="device seconds in all")
    a.add_argument("--start", type=float, default=120.0, help="the machine's start")
    a.add_argument("--per-chunk", type=float, default=25.0, help="one call carrying one chunk, unpacked")
    a.add_argument("--chunks", type=int, default=3)
    a.add_argument("--eval", type=float, default=60.0, dest="eval_s", help="install, start, ten-crop evaluation")
    a.add_argument("--margin", type=float, default=90.0)
    args = p.parse_args(argv)
    try:
        if args.command == "pack":
            m = pack(args.data, args.out, args.chunk_mib)
            print(f"packed {m['files']} files in {len(m['chunks'])} chunks to {args.out} "
                  f"(train {m['train']['images']} images / {m['train']['classes']} classes, "
                  f"val {m['val']['images']} / {m['val']['classes']}); largest "
                  f"{max(c['bytes'] for c in m['chunks']) / 2**20:.1f} MiB")
        elif args.command == "unpack":
            n = unpack(args.chunk, args.dest, args.manifest)
            print(f"{args.chunk.name}: {n} files checked and unpacked to {args.dest}")
        elif args.command == "check":
            c = check(args.dest, args.manifest)
            print(f"{args.dest}: train {c['train']['images']} images / {c['train']['classes']} classes, "
                  f"val {c['val']['images']} / {c['val']['classes']}: as the manifest says")
        else:
            r = plan(args.config, args.rate, args.window, args.start, args.per_chunk, args.chunks, args.eval_s,
                     args.margin)
            print(f"{r['config']}: {r['epochs']} epochs x {r['seconds_per_epoch']} s = {r['training_seconds']} s "
                  f"of training at {args.rate:.0f} images/s (an estimate from that measured rate); "
                  f"{r['seconds_for_training']} s of the {args.window:.0f} s window are left for it "
                  f"({r['epochs_that_fit']} epochs fit): {'fits' if r['fits'] else 'DOES NOT FIT'}")
            return 0 if r["fits"] else 1
    except WindowError as exc:
        print(f"tiny_window: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
