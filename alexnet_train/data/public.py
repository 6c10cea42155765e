"""Public datasets, downloaded, verified and laid out as ImageFolder trees (``alexnet-data``).

    alexnet-data tiny-imagenet data/tiny-imagenet-200            # download (248 MB), verify, lay out
    alexnet-data tiny-imagenet data/tiny-imagenet-200 --from ~/Downloads/tiny-imagenet-200.zip
    alexnet-data imagenette data/imagenette-320 --size 320
    alexnet-data imagenet-sample data/imagenet-sample               # 1000 full-size photos, for benchmarks
    alexnet-data ilsvrc /data/imagenet --train-tar ILSVRC2012_img_train.tar \\
        --val-tar ILSVRC2012_img_val.tar --devkit ILSVRC2012_devkit_t12.tar.gz

Every dataset ends as ``DIR/train/<wnid>/*`` and ``DIR/val/<wnid>/*`` (or a flat
``DIR/val`` with ``DIR/val_labels.txt``) plus ``DIR/synset_words.txt``
(``wnid name, name...`` lines, what ``alexnet-predict --synsets`` reads).

Safety: a split is unpacked under ``DIR/.alexnet-data/staging`` and moved into
place by one rename when it is whole, so ``DIR/train`` is either absent or
complete; ``DIR/.alexnet-data/done.json`` lists the finished splits.  A cut
download resumes from its ``.part`` file (HTTP Range); archives are checked
against the published MD5 before anything is unpacked.  ILSVRC's per-class
train tars are unpacked in parallel and a re-run skips the classes already done.

Checksums: Tiny ImageNet's is the one published with the CS231n archive and used
by the libraries that download it (e.g. Avalanche: 248,100,043 bytes, MD5
90528d7c...); Imagenette's and ILSVRC-2012's come from torchvision
(``datasets.Imagenette._ARCHIVES``, ``datasets.imagenet.ARCHIVE_META``), which
took them from fast.ai's and image-net.org's files.  imagenet-sample (one ILSVRC-2012
training photo per class, from a pinned commit of EliSchwartz/imagenet-sample-images)
is checked by its files' git tree id, since GitHub publishes no checksum of its zips.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import http.client
import io
import json
import os
import shutil
import sys
import tarfile
import time
import urllib.error
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Callable, Iterable, Iterator, Sequence

STATE_DIR = ".alexnet-data"
USER_AGENT = "alexnet-train (alexnet-data)"
CHUNK = 1 << 20


class PublicDataError(RuntimeError):
    """A download, archive or layout problem; the message names the file or URL at fault."""


class UsageError(ValueError):
    """Bad arguments (exit 2): a missing file given on the command line, an unknown size."""


@dataclass(frozen=True)
class Archive:
    filename: str
    md5: str
    url: str | None = None
    size: int | None = None  # bytes, where published


TINY_IMAGENET = Archive("tiny-imagenet-200.zip", "90528d7ca1a48142e341f4ef8d21d0de",
                        "http://cs231n.stanford.edu/tiny-imagenet-200.zip", 248_100_043)


def imagenette_archive(size: str) -> Archive:
    """fast.ai's Imagenette at ``size`` (``full``, ``320`` or ``160``), as torchvision publishes it."""
    from torchvision.datasets.imagenette import Imagenette

    key = {"full": "full", "320": "320px", "160": "160px"}.get(str(size))
    if key is None:
        raise UsageError(f"--size {size}: expected full, 320 or 160")
    url, md5 = Imagenette._ARCHIVES[key]
    return Archive(url.rsplit("/", 1)[1], md5, url)


# One real ILSVRC-2012 training photo per class (full resolution), as GitHub serves
# the pinned commit of EliSchwartz/imagenet-sample-images.  GitHub publishes no
# checksum of its generated zip, so the content is checked instead: the git tree
# id of the files (every blob's SHA-1, as git computes it) must be the commit's.
SAMPLE_COMMIT = "bc69043e2862758a1906c6a24a792bb28c6bb2ff"
SAMPLE_TREE = "0a95d9cc62e5337173fc2ec8b26f1f4a1f74eaa2"
IMAGENET_SAMPLE = Archive(f"imagenet-sample-images-{SAMPLE_COMMIT[:7]}.zip", md5="",
                          url=f"https://github.com/EliSchwartz/imagenet-sample-images/archive/{SAMPLE_COMMIT}.zip")


def git_tree_id(files: dict[str, bytes]) -> str:
    """The id git gives a flat tree of regular files (mode 100644): what a commit's tree hash names."""
    entries = b""
    for name in sorted(files):
        blob = hashlib.sha1(b"blob %d\0" % len(files[name]) + files[name], usedforsecurity=False).digest()
        entries += b"100644 " + name.encode() + b"\0" + blob
    return hashlib.sha1(b"tree %d\0" % len(entries) + entries, usedforsecurity=False).hexdigest()


def ilsvrc_archives() -> dict[str, Archive]:
    from torchvision.datasets.imagenet import ARCHIVE_META

    return {split: Archive(name, md5) for split, (name, md5) in ARCHIVE_META.items()}


# --------------------------------------------------------------------------- progress


class ByteProgress:
    """A tqdm bar on a TTY, else a plain line every ``every_s`` seconds and at the end."""

    def __init__(self, total: int | None, desc: str, initial: int = 0, stream: IO[str] | None = None,
                 every_s: float = 10.0, unit: str = "B") -> None:
        self.total, self.desc, self.count, self.unit = total, desc, initial, unit
        self.stream = stream or sys.stderr
        self.every_s = every_s
        self.started = self.last = time.monotonic()
        self.initial = initial
        self.bar = None
        if self.stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, file=self.stream, unit=unit,
                            unit_scale=unit == "B", unit_divisor=1024 if unit == "B" else 1000, leave=False)

    def _amount(self, n: int) -> str:
        return f"{n / 2**20:,.1f} MiB" if self.unit == "B" else f"{n:,}"

    def line(self) -> str:
        elapsed = time.monotonic() - self.started
        rate = (self.count - self.initial) / elapsed if elapsed > 0 else 0.0
        done = self._amount(self.count)
        if self.total:
            done += f" / {self._amount(self.total)} ({100.0 * self.count / self.total:.0f}%)"
        speed = f"{rate / 2**20:.1f} MiB/s" if self.unit == "B" else f"{rate:,.0f}/s"
        eta = ""
        if self.total and rate > 0 and self.count < self.total:
            eta = f", ETA {_duration((self.total - self.count) / rate)}"
        return f"{self.desc}: {done}, {speed}{eta}"

    def update(self, n: int) -> None:
        self.count += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.monotonic()
        if now - self.last >= self.every_s:
            self.last = now
            print(self.line(), file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        else:
            print(self.line(), file=self.stream, flush=True)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


# --------------------------------------------------------------------------- download and verify


def download(url: str, dest: Path, log: Callable[[str], None], expected_size: int | None = None,
             retries: int = 5, timeout: float = 60.0, stream: IO[str] | None = None) -> Path:
    """Fetch ``url`` to ``dest``, resuming from ``dest.part`` (HTTP Range) after a cut or a re-run.

    A connection that breaks mid-file is retried from where it stopped, up to
    ``retries`` times in a row without progress.  ``dest`` appears only when the
    whole file is there (its length as the server gave it).
    """
    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    failures = 0
    while True:
        have = part.stat().st_size if part.exists() else 0
        headers = {"User-Agent": USER_AGENT}
        if have:
            headers["Range"] = f"bytes={have}-"
        try:
            response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
        except urllib.error.HTTPError as exc:
            if exc.code == 416 and have and (expected_size is None or have == expected_size):
                break  # the .part is already the whole file
            raise PublicDataError(f"{url}: HTTP {exc.code} {exc.reason}") from None
        except (urllib.error.URLError, OSError) as exc:
            failures += 1
            reason = getattr(exc, "reason", exc)
            if failures > retries:
                raise PublicDataError(f"{url}: cannot connect ({reason}); on a machine without internet "
                                      f"download {dest.name} elsewhere and pass --from FILE") from None
            log(f"{url}: {reason}; retrying in {min(30, 2 ** failures)} s ({failures}/{retries})")
            time.sleep(min(30, 2 ** failures))
            continue
        with response:
            if have and response.status == 206:
                mode = "ab"
                total = have + int(response.headers.get("Content-Length", 0) or 0)
                log(f"resuming {dest.name} at {have / 2**20:,.1f} MiB")
            else:
                mode, have = "wb", 0  # a 200 to a Range request: the server sends the whole file again
                length = response.headers.get("Content-Length")
                total = int(length) if length else None
            if total is None:
                total = expected_size
            progress = ByteProgress(total, f"download {dest.name}", initial=have, stream=stream)
            got_any = False
            try:
                with open(part, mode) as fh:
                    while True:
                        chunk = response.read(CHUNK)
                        if not chunk:
                            break
                        fh.write(chunk)
                        progress.update(len(chunk))
                        got_any = True
            except (OSError, ValueError, http.client.HTTPException) as exc:  # reset connection, IncompleteRead
                if isinstance(exc, OSError) and exc.filename:
                    raise PublicDataError(f"{part}: {exc.strerror or exc}") from None
                progress.close()
                failures = 0 if got_any else failures + 1
                if failures > retries:
                    raise PublicDataError(f"{url}: connection keeps failing ({exc})") from None
                log(f"{url}: connection lost ({type(exc).__name__}: {exc}); resuming")
                continue
            progress.close()
        size = part.stat().st_size
        if total is not None and size < total:
            failures += 1
            if failures > retries:
                raise PublicDataError(f"{url}: the server sent {size} of {total} bytes")
            log(f"{url}: connection closed at {size:,} of {total:,} bytes; resuming")
            continue
        break
    os.replace(part, dest)
    return dest


def md5_of(path: Path, stream: IO[str] | None = None) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    progress = ByteProgress(path.stat().st_size, f"verify {path.name}", stream=stream)
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(4 * CHUNK), b""):
            digest.update(chunk)
            progress.update(len(chunk))
    progress.close()
    return digest.hexdigest()


def verify(path: Path, archive: Archive, state: Path, stream: IO[str] | None = None) -> None:
    """Check ``path`` against the published MD5, once: a stamp (size, mtime) skips it on re-runs."""
    stamp = state / f"{archive.filename}.verified"
    st = path.stat()
    key = {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "md5": archive.md5}
    try:
        if json.loads(stamp.read_text()) == key:
            return
    except (OSError, ValueError):
        pass
    got = md5_of(path, stream)
    if got != archive.md5:
        raise PublicDataError(
            f"{path}: MD5 {got} is not the published {archive.md5} of {archive.filename} (a different, "
            f"damaged or repacked file; --no-verify accepts a repacked archive of the same layout)")
    state.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps(key))


# --------------------------------------------------------------------------- staged layout


class Layout:
    """Splits built under ``DIR/.alexnet-data/staging`` and renamed into ``DIR`` when whole."""

    def __init__(self, root: str | os.PathLike, dataset: str) -> None:
        self.root = Path(root)
        self.dataset = dataset
        self.state = self.root / STATE_DIR
        self.staging = self.state / "staging"
        self.marker = self.state / "done.json"

    def done(self) -> dict:
        try:
            info = json.loads(self.marker.read_text())
        except FileNotFoundError:
            return {"dataset": self.dataset, "splits": {}}
        except (OSError, ValueError) as exc:
            raise PublicDataError(f"{self.marker}: unreadable ({exc}); remove it to redo the layout") from None
        if info.get("dataset") != self.dataset:
            raise PublicDataError(f"{self.root}: holds {info.get('dataset')!r}, not {self.dataset!r}; "
                                  f"choose another DIR")
        return info

    def is_done(self, name: str) -> bool:
        return name in self.done()["splits"] and (self.root / name).exists()

    def check_free(self, names: Iterable[str]) -> None:
        """Refuse to write over anything in DIR that this tool did not finish."""
        done = self.done()["splits"]
        for name in names:
            if (self.root / name).exists() and name not in done:
                raise PublicDataError(f"{self.root / name}: already exists and was not made by alexnet-data "
                                      f"{self.dataset}; move it away or choose another DIR")

    def begin(self, name: str, fresh: bool = True) -> Path:
        """An empty (``fresh``) or kept staging folder for ``name``."""
        path = self.staging / name
        if fresh and path.exists():
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
        path.parent.mkdir(parents=True, exist_ok=True)
        if name.endswith(".txt"):
            return path
        path.mkdir(parents=True, exist_ok=True)
        return path

    def commit(self, name: str, info: dict) -> None:
        """Move the staged ``name`` into DIR (one rename) and record it as done."""
        os.sync()  # the files' data on disk before the marker says they are whole
        os.replace(self.staging / name, self.root / name)
        done = self.done()
        done["splits"][name] = info
        tmp = self.marker.with_name(self.marker.name + ".tmp")
        tmp.write_text(json.dumps(done, indent=1, sort_keys=True))
        os.replace(tmp, self.marker)

    def finish(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)


def _safe_parts(name: str, archive: Path) -> list[str]:
    parts = [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts) or name.startswith("/"):
        raise PublicDataError(f"{archive}: member {name!r} points outside the archive; refusing to unpack it")
    return parts


def _copy(src: IO[bytes], dst: Path) -> None:
    with open(dst, "wb") as out:
        shutil.copyfileobj(src, out, CHUNK)


def write_synsets(path: Path, names: dict[str, str], wnids: Sequence[str]) -> None:
    path.write_text("".join(f"{w} {names.get(w, w)}\n" for w in sorted(wnids)))


def _count_tree(root: Path) -> tuple[int, int]:
    classes = [d for d in root.iterdir() if d.is_dir()]
    return len(classes), sum(len(os.listdir(d)) for d in classes)


# --------------------------------------------------------------------------- Tiny ImageNet


def _tiny_prefix(names: Sequence[str], archive: Path) -> str:
    for name in names:
        if name.endswith("wnids.txt") and name.count("/") <= 1:
            return name[: -len("wnids.txt")]
    raise PublicDataError(f"{archive}: no wnids.txt at the top; not Tiny ImageNet's tiny-imagenet-200.zip layout")


def tiny_dataset_name(classes: Sequence[str] | None, train_per_class: int | None = None) -> str:
    name = "tiny-imagenet" if not classes else "tiny-imagenet:" + ",".join(sorted(classes))
    return name if train_per_class is None else f"{name}:train_per_class={train_per_class}"


def layout_tiny_imagenet(archive: Path, root: Path, log: Callable[[str], None],
                         stream: IO[str] | None = None, classes: Sequence[str] | None = None,
                         train_per_class: int | None = None) -> dict:
    """Unpack the CS231n zip into ``root/train/<wnid>/``, ``root/val/<wnid>/`` and ``root/synset_words.txt``.

    The zip has ``train/<wnid>/images/*.JPEG`` (+ ``<wnid>_boxes.txt``),
    ``val/images/*.JPEG`` with ``val/val_annotations.txt`` (``file wnid x y w h``),
    an unlabelled ``test/`` (left out), ``wnids.txt`` and ``words.txt``.
    ``classes`` (wnids) keeps only those classes, e.g. the ten of tiny-imagenet-10;
    ``train_per_class`` keeps the first N training images of each class (by file name),
    for few-shot runs such as the README's fine-tuning proof.  Val is always whole.
    """
    layout = Layout(root, tiny_dataset_name(classes, train_per_class))
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as exc:
        raise PublicDataError(f"{archive}: not a readable zip archive ({exc})") from None
    summary = {}
    with zf:
        names = zf.namelist()
        prefix = _tiny_prefix(names, archive)

        def read_text(member: str) -> str:
            try:
                return zf.read(prefix + member).decode("utf-8")
            except KeyError:
                raise PublicDataError(f"{archive}: {prefix + member} is missing; not Tiny ImageNet's layout") from None

        wnids = [w.strip() for w in read_text("wnids.txt").split() if w.strip()]
        if classes:
            unknown = sorted(set(classes) - set(wnids))
            if unknown:
                raise UsageError(f"--classes: {unknown[0]} is not one of the {len(wnids)} classes in "
                                 f"{archive}'s wnids.txt")
            wanted = set(classes)
        words = {}
        for line in read_text("words.txt").splitlines():
            wnid, _, name = line.partition("\t")
            words[wnid.strip()] = name.strip()
        val_labels = {}
        for lineno, line in enumerate(read_text("val/val_annotations.txt").splitlines(), 1):
            if not line.strip():
                continue
            fields = line.split("\t") if "\t" in line else line.split()
            if len(fields) < 2 or fields[1] not in wnids:
                raise PublicDataError(f"{archive}: val/val_annotations.txt:{lineno}: expected 'file wnid ...' "
                                      f"with a wnid from wnids.txt, got {line!r}")
            val_labels[fields[0]] = fields[1]
        all_wnids = wnids
        if classes:
            wnids = [w for w in wnids if w in wanted]

        members: dict[str, list[tuple[zipfile.ZipInfo, Path]]] = {"train": [], "val": []}
        for info in zf.infolist():
            if info.is_dir() or not info.filename.startswith(prefix):
                continue
            parts = _safe_parts(info.filename[len(prefix):], archive)
            if len(parts) == 4 and parts[0] == "train" and parts[2] == "images":
                if parts[1] not in all_wnids:
                    raise PublicDataError(f"{archive}: {info.filename}: class {parts[1]} is not in wnids.txt")
                if parts[1] in wnids:
                    members["train"].append((info, Path(parts[1]) / parts[3]))
            elif len(parts) == 3 and parts[:2] == ["val", "images"]:
                wnid = val_labels.get(parts[2])
                if wnid is None:
                    raise PublicDataError(f"{archive}: {info.filename} has no line in val/val_annotations.txt")
                if wnid in wnids:
                    members["val"].append((info, Path(wnid) / parts[2]))
        missing = sorted(set(wnids) - {p.parts[0] for _, p in members["train"]})
        if missing:
            raise PublicDataError(f"{archive}: no train/{missing[0]}/images/ for {len(missing)} class(es) "
                                  f"of wnids.txt; an incomplete archive")
        if train_per_class is not None:
            by_class: dict[str, list] = {}
            for info, rel in sorted(members["train"], key=lambda m: m[1].as_posix()):
                by_class.setdefault(rel.parts[0], []).append((info, rel))
            short = sorted(w for w, files in by_class.items() if len(files) < train_per_class)
            if short:
                raise UsageError(f"--train-per-class {train_per_class}: class {short[0]} has only "
                                 f"{len(by_class[short[0]])} training images in {archive}")
            members["train"] = [m for files in by_class.values() for m in files[:train_per_class]]
        layout.check_free(["train", "val", "synset_words.txt"])
        for split in ("train", "val"):
            if layout.is_done(split):
                log(f"{root / split}: already laid out")
                summary[split] = layout.done()["splits"][split]
                continue
            stage = layout.begin(split)
            for wnid in wnids:
                (stage / wnid).mkdir()
            progress = ByteProgress(len(members[split]), f"unpack {split}", stream=stream, unit="files")
            try:
                for info, rel in members[split]:
                    with zf.open(info) as src:
                        _copy(src, stage / rel)
                    progress.update(1)
            except (zipfile.BadZipFile, zlib.error) as exc:
                raise PublicDataError(f"{archive}: damaged member ({exc}); download it again") from None
            finally:
                progress.close()
            classes, images = _count_tree(stage)
            summary[split] = {"classes": classes, "images": images}
            layout.commit(split, summary[split])
            log(f"{root / split}: {images:,} images in {classes} class folders")
        if not layout.is_done("synset_words.txt"):
            path = layout.begin("synset_words.txt")
            write_synsets(path, words, wnids)
            layout.commit("synset_words.txt", {"classes": len(wnids)})
    layout.finish()
    return summary


# --------------------------------------------------------------------------- Imagenette


def layout_imagenette(archive: Path, root: Path, log: Callable[[str], None],
                      stream: IO[str] | None = None) -> dict:
    """Unpack fast.ai's ``imagenette2*.tgz`` (``imagenette2*/{train,val}/<wnid>/*.JPEG``) into ``root``."""
    from torchvision.datasets.imagenette import Imagenette

    layout = Layout(root, "imagenette")
    layout.check_free(["train", "val", "synset_words.txt"])
    todo = [s for s in ("train", "val") if not layout.is_done(s)]
    for split in ("train", "val"):
        if split not in todo:
            log(f"{root / split}: already laid out")
    stages = {split: layout.begin(split) for split in todo}
    seen: set[str] = set()
    progress = ByteProgress(None, f"unpack {archive.name}", stream=stream, unit="files")
    try:
        with tarfile.open(archive, "r:*") as tf:
            for member in tf:
                parts = _safe_parts(member.name, archive)
                if len(parts) == 4 and parts[1] in ("train", "val"):
                    seen.add(parts[1])
                    if not member.isfile() or parts[1] not in stages:
                        continue
                    folder = stages[parts[1]] / parts[2]
                    folder.mkdir(exist_ok=True)
                    src = tf.extractfile(member)
                    if src is not None:
                        _copy(src, folder / parts[3])
                    progress.update(1)
    except (tarfile.TarError, EOFError, zlib.error) as exc:
        raise PublicDataError(f"{archive}: not a readable tar.gz archive, or damaged ({exc})") from None
    finally:
        progress.close()
    if seen != {"train", "val"}:
        raise PublicDataError(f"{archive}: no {'/'.join(sorted({'train', 'val'} - seen))}/<wnid>/ folders; "
                              f"not Imagenette's layout")
    summary = {}
    for split, stage in stages.items():
        classes, images = _count_tree(stage)
        summary[split] = {"classes": classes, "images": images}
        layout.commit(split, summary[split])
        log(f"{root / split}: {images:,} images in {classes} class folders")
    if not layout.is_done("synset_words.txt"):
        names = {w: ", ".join(n) for w, n in Imagenette._WNID_TO_CLASS.items()}
        path = layout.begin("synset_words.txt")
        write_synsets(path, names, sorted(d.name for d in (root / "train").iterdir() if d.is_dir()))
        layout.commit("synset_words.txt", {"classes": len(names)})
    layout.finish()
    return summary


# --------------------------------------------------------------------------- imagenet-sample


def layout_imagenet_sample(archive: Path, root: Path, log: Callable[[str], None], no_verify: bool) -> dict:
    """``root/train/<wnid>/<wnid>_<name>.JPEG`` (one photo per class) and ``root/synset_words.txt``."""
    layout = Layout(root, "imagenet-sample")
    layout.check_free(["train", "synset_words.txt"])
    try:
        with zipfile.ZipFile(archive) as zf:
            files = {}
            for info in zf.infolist():
                if info.is_dir():
                    continue
                parts = _safe_parts(info.filename, archive)
                if len(parts) != 2:
                    raise PublicDataError(f"{archive}: unexpected member {info.filename}; not "
                                          f"imagenet-sample-images' layout")
                files[parts[1]] = zf.read(info)
    except (zipfile.BadZipFile, OSError, zlib.error) as exc:
        raise PublicDataError(f"{archive}: not a readable zip archive, or damaged ({exc})") from None
    if no_verify:
        log(f"{archive}: not verified (--no-verify)")
    else:
        got = git_tree_id(files)
        if got != SAMPLE_TREE:
            raise PublicDataError(f"{archive}: its files' git tree id {got} is not {SAMPLE_TREE} of commit "
                                  f"{SAMPLE_COMMIT[:7]} (a different or damaged archive; --no-verify accepts it)")
        log(f"{archive}: content verified (git tree {SAMPLE_TREE[:12]} of commit {SAMPLE_COMMIT[:7]})")
    images = {n: d for n, d in files.items() if n.endswith(".JPEG") and n.startswith("n") and "_" in n}
    if not images:
        raise PublicDataError(f"{archive}: holds no <wnid>_<name>.JPEG files")
    stage = layout.begin("train")
    names = {}
    for name, data in images.items():
        wnid, _, label = name[: -len(".JPEG")].partition("_")
        (stage / wnid).mkdir(exist_ok=True)
        (stage / wnid / name).write_bytes(data)
        names[wnid] = label.replace("_", " ")
    classes, count = _count_tree(stage)
    layout.commit("train", {"classes": classes, "images": count})
    log(f"{root / 'train'}: {count:,} images in {classes} class folders")
    path = layout.begin("synset_words.txt")
    write_synsets(path, names, names)
    layout.commit("synset_words.txt", {"classes": len(names)})
    layout.finish()
    return {"train": {"classes": classes, "images": count}}


# --------------------------------------------------------------------------- ILSVRC-2012


class _Window(io.RawIOBase):
    """``size`` bytes of a file from ``offset``: one member of an uncompressed tar, read in place."""

    def __init__(self, path: Path, offset: int, size: int) -> None:
        self.fh = open(path, "rb")
        self.fh.seek(offset)
        self.left = size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = min(len(buffer), self.left)
        if n <= 0:
            return 0
        got = self.fh.readinto(memoryview(buffer)[:n])
        self.left -= got
        return got

    def close(self) -> None:
        self.fh.close()
        super().close()


def _unpack_class_tar(outer: str, offset: int, size: int, dest: str) -> int:
    """Unpack one per-class tar (at ``offset`` in the train tar) into ``dest``; returns the file count."""
    final = Path(dest)
    tmp = final.with_name(final.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    count = 0
    with _Window(Path(outer), offset, size) as raw, tarfile.open(fileobj=io.BufferedReader(raw, CHUNK),
                                                                  mode="r|") as tf:
        for member in tf:
            if not member.isfile():
                continue
            parts = _safe_parts(member.name, Path(outer))
            src = tf.extractfile(member)
            if src is not None:
                _copy(src, tmp / parts[-1])
                count += 1
    os.replace(tmp, final)
    return count


def _devkit_files(devkit: Path, stage: Path) -> tuple[Path, dict[str, str]]:
    """Extract the val ground truth and meta.mat; returns (ground-truth path, wnid -> names)."""
    wanted = {"ILSVRC2012_validation_ground_truth.txt", "meta.mat"}
    try:
        with tarfile.open(devkit, "r:*") as tf:
            for member in tf:
                base = member.name.rsplit("/", 1)[-1]
                if member.isfile() and base in wanted and member.name.split("/")[-2:-1] == ["data"]:
                    with tf.extractfile(member) as src:
                        _copy(src, stage / base)
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        raise PublicDataError(f"{devkit}: not a readable devkit tar.gz ({exc})") from None
    for name in wanted:
        if not (stage / name).is_file():
            raise PublicDataError(f"{devkit}: no data/{name}; not ILSVRC2012_devkit_t12.tar.gz")
    try:
        from scipy.io import loadmat
    except ImportError:
        raise PublicDataError(f"{devkit}: reading its meta.mat needs scipy (pip install scipy, "
                              f"or alexnet-train[devkit])") from None
    synsets = loadmat(str(stage / "meta.mat"), squeeze_me=True)["synsets"]
    names = {str(s["WNID"]): str(s["words"]) for s in synsets if int(s["num_children"]) == 0}
    return stage / "ILSVRC2012_validation_ground_truth.txt", names


def layout_ilsvrc(root: Path, log: Callable[[str], None], train_tar: Path | None = None,
                  val_tar: Path | None = None, devkit: Path | None = None, labels: Path | None = None,
                  val_layout: str = "folders", workers: int = 0, stream: IO[str] | None = None) -> dict:
    """ILSVRC-2012 from image-net.org's tars: ``train/<wnid>/``, val sorted (or flat + labels), synsets."""
    from .datasets import DataError, read_labels_file

    layout = Layout(root, "ilsvrc")
    names_to_check = ["synset_words.txt"] + (["train"] if train_tar else []) + (["val"] if val_tar else [])
    if val_tar and val_layout == "flat":
        names_to_check.append("val_labels.txt")
    layout.check_free(names_to_check)
    summary: dict = {}
    names: dict[str, str] = {}
    if devkit is not None:
        gt, names = _devkit_files(devkit, layout.begin("devkit"))
    if train_tar is not None and not layout.is_done("train"):
        stage = layout.begin("train", fresh=False)
        try:
            with tarfile.open(train_tar, "r:") as tf:
                inner = [m for m in tf.getmembers() if m.isfile() and m.name.endswith(".tar")]
        except (tarfile.TarError, OSError) as exc:
            raise PublicDataError(f"{train_tar}: not a readable uncompressed tar ({exc})") from None
        if not inner:
            raise PublicDataError(f"{train_tar}: holds no <wnid>.tar members; not ILSVRC2012_img_train.tar")
        todo = [m for m in inner if not (stage / Path(m.name).stem).is_dir()]
        if len(todo) < len(inner):
            log(f"{train_tar.name}: {len(inner) - len(todo)} of {len(inner)} classes already unpacked")
        progress = ByteProgress(len(inner), "unpack train classes", initial=len(inner) - len(todo),
                                stream=stream, unit="classes")
        n_workers = workers or os.cpu_count() or 1
        try:
            if n_workers <= 1:
                for m in todo:
                    _unpack_class_tar(str(train_tar), m.offset_data, m.size, str(stage / Path(m.name).stem))
                    progress.update(1)
            else:
                from .prepare import _pool_context

                with concurrent.futures.ProcessPoolExecutor(n_workers, mp_context=_pool_context()) as pool:
                    futures = [pool.submit(_unpack_class_tar, str(train_tar), m.offset_data, m.size,
                                           str(stage / Path(m.name).stem)) for m in todo]
                    for fut in concurrent.futures.as_completed(futures):
                        fut.result()
                        progress.update(1)
        except (tarfile.TarError, EOFError) as exc:
            raise PublicDataError(f"{train_tar}: a damaged per-class tar ({exc})") from None
        finally:
            progress.close()
        classes, images = _count_tree(stage)
        summary["train"] = {"classes": classes, "images": images}
        layout.commit("train", summary["train"])
        log(f"{root / 'train'}: {images:,} images in {classes} class folders")
    if val_tar is not None and not layout.is_done("val"):
        if devkit is not None:
            label_file = gt
        elif labels is not None:
            label_file = labels
        else:
            raise UsageError("--val-tar needs --devkit (or --labels FILE) to know each image's class")
        try:
            val_labels = read_labels_file(str(label_file))
        except DataError as exc:
            raise PublicDataError(str(exc)) from None
        stage = layout.begin("val")
        flat_labels: list[str] = []
        progress = ByteProgress(len(val_labels), "unpack val", stream=stream, unit="files")
        try:
            with tarfile.open(val_tar, "r:*") as tf:
                for member in tf:
                    if not member.isfile():
                        continue
                    base = _safe_parts(member.name, val_tar)[-1]
                    wnid = val_labels.get(os.path.splitext(base)[0])
                    if wnid is None:
                        raise PublicDataError(f"{val_tar}: {member.name} has no label in {label_file}")
                    if val_layout == "flat":
                        dest = stage / base
                        flat_labels.append(f"{base} {wnid}\n")
                    else:
                        (stage / wnid).mkdir(exist_ok=True)
                        dest = stage / wnid / base
                    with tf.extractfile(member) as src:
                        _copy(src, dest)
                    progress.update(1)
        except (tarfile.TarError, EOFError, zlib.error) as exc:
            raise PublicDataError(f"{val_tar}: not a readable tar, or damaged ({exc})") from None
        finally:
            progress.close()
        if val_layout == "flat":
            path = layout.begin("val_labels.txt")
            path.write_text("".join(sorted(flat_labels)))
            layout.commit("val_labels.txt", {"images": len(flat_labels)})
            summary["val"] = {"images": len(flat_labels), "layout": "flat"}
        else:
            classes, images = _count_tree(stage)
            summary["val"] = {"classes": classes, "images": images}
        layout.commit("val", summary["val"])
        log(f"{root / 'val'}: {summary['val']['images']:,} images" +
            (f" in {summary['val']['classes']} class folders" if val_layout != "flat"
             else f", labels in {root / 'val_labels.txt'}"))
    if names and not layout.is_done("synset_words.txt"):
        path = layout.begin("synset_words.txt")
        write_synsets(path, names, names)
        layout.commit("synset_words.txt", {"classes": len(names)})
    layout.finish()
    return summary


# --------------------------------------------------------------------------- the commands' bodies


def obtain(archive: Archive, root: Path, source: Path | None, no_verify: bool, log: Callable[[str], None],
           stream: IO[str] | None = None) -> tuple[Path, bool]:
    """The archive on disk: ``source`` (``--from``) or downloaded into ``DIR/.alexnet-data``.

    Returns (path, downloaded).  Checked against the published MD5 unless ``no_verify``.
    """
    state = root / STATE_DIR
    if source is not None:
        if not source.is_file():
            raise UsageError(f"--from {source}: no such file")
        path, downloaded = source, False
    else:
        if archive.url is None:
            raise UsageError(f"{archive.filename} cannot be downloaded without a login; pass the file you have")
        path = state / "downloads" / archive.filename
        if not path.exists():
            log(f"downloading {archive.url}")
            download(archive.url, path, log, expected_size=archive.size, stream=stream)
        downloaded = True
    if no_verify:
        log(f"{path}: not verified (--no-verify)")
    elif archive.md5:  # (no MD5: the archive's content is checked while it is laid out)
        try:
            verify(path, archive, state, stream)
        except PublicDataError:
            if downloaded:  # ours, and wrong: the next run must fetch it again, not trust it
                path.unlink(missing_ok=True)
            raise
        log(f"{path}: MD5 {archive.md5} verified")
    return path, downloaded


def parse_classes(spec: str | None) -> list[str] | None:
    """``--classes``: comma-separated wnids, or a file of them (one per line or space-separated)."""
    if not spec:
        return None
    if os.path.isfile(spec):
        try:
            wnids = Path(spec).read_text().split()
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"--classes {spec}: cannot read it ({exc})") from None
    else:
        wnids = [w.strip() for w in spec.split(",") if w.strip()]
    if not wnids:
        raise UsageError(f"--classes {spec}: no wnids")
    return sorted(set(wnids))


def _fetch_and_lay_out(archive: Archive, layout: Layout, names: Sequence[str], title: str, source: str | None,
                       no_verify: bool, keep_archive: bool, log: Callable[[str], None], stream: IO[str] | None,
                       lay_out: Callable[[Path], dict]) -> dict:
    """The downloadable datasets' one flow: done already? else obtain, ``lay_out(path)``, drop the download."""
    if all(layout.is_done(n) for n in names):
        log(f"{layout.root}: {title} is already laid out ({', '.join(n + '/' if '.' not in n else n for n in names)})")
        return layout.done()["splits"]
    path, downloaded = obtain(archive, layout.root, Path(source) if source else None, no_verify, log, stream)
    t0 = time.monotonic()
    try:
        summary = lay_out(path)
    except PublicDataError:
        if downloaded:  # a damaged download must be fetched again, not reused
            path.unlink(missing_ok=True)
        raise
    log(f"laid out in {time.monotonic() - t0:.0f} s")
    if downloaded and not keep_archive:
        path.unlink(missing_ok=True)
    return summary


def tiny_imagenet(root: str | os.PathLike, source: str | None = None, no_verify: bool = False,
                  keep_archive: bool = False, log: Callable[[str], None] = print,
                  stream: IO[str] | None = None, classes: Sequence[str] | None = None,
                  train_per_class: int | None = None) -> dict:
    root = Path(root)
    if train_per_class is not None and train_per_class < 1:
        raise UsageError(f"--train-per-class: must be >= 1, got {train_per_class}")
    return _fetch_and_lay_out(TINY_IMAGENET, Layout(root, tiny_dataset_name(classes, train_per_class)),
                              ("train", "val", "synset_words.txt"), "Tiny ImageNet", source, no_verify,
                              keep_archive, log, stream,
                              lambda path: layout_tiny_imagenet(path, root, log, stream, classes, train_per_class))


def imagenette(root: str | os.PathLike, size: str = "320", source: str | None = None, no_verify: bool = False,
               keep_archive: bool = False, log: Callable[[str], None] = print,
               stream: IO[str] | None = None) -> dict:
    root = Path(root)
    return _fetch_and_lay_out(imagenette_archive(size), Layout(root, "imagenette"),
                              ("train", "val", "synset_words.txt"), "Imagenette", source, no_verify,
                              keep_archive, log, stream, lambda path: layout_imagenette(path, root, log, stream))


def imagenet_sample(root: str | os.PathLike, source: str | None = None, no_verify: bool = False,
                    keep_archive: bool = False, log: Callable[[str], None] = print,
                    stream: IO[str] | None = None) -> dict:
    root = Path(root)
    # no MD5 for GitHub's zip: obtain() skips it and layout_imagenet_sample checks the content
    return _fetch_and_lay_out(IMAGENET_SAMPLE, Layout(root, "imagenet-sample"), ("train", "synset_words.txt"),
                              "imagenet-sample", source, False, keep_archive, log, stream,
                              lambda path: layout_imagenet_sample(path, root, log, no_verify))


def ilsvrc(root: str | os.PathLike, train_tar: str | None = None, val_tar: str | None = None,
           devkit: str | None = None, labels: str | None = None, val_layout: str = "folders",
           no_verify: bool = False, workers: int = 0, log: Callable[[str], None] = print,
           stream: IO[str] | None = None) -> dict:
    root = Path(root)
    if not train_tar and not val_tar:
        raise UsageError("give --train-tar and/or --val-tar (ILSVRC-2012 needs an image-net.org login; "
                         "download the tars there first)")
    if val_layout not in ("folders", "flat"):
        raise UsageError(f"--val-layout {val_layout}: expected folders or flat")
    archives = ilsvrc_archives()
    paths: dict[str, Path | None] = {}
    for split, given in (("train", train_tar), ("val", val_tar), ("devkit", devkit)):
        if given is None:
            paths[split] = None
            continue
        p = Path(given)
        if not p.is_file():
            raise UsageError(f"--{'devkit' if split == 'devkit' else split + '-tar'} {given}: no such file")
        paths[split] = p
    if labels is not None and not Path(labels).is_file():
        raise UsageError(f"--labels {labels}: no such file")
    layout = Layout(root, "ilsvrc")
    for split, p in paths.items():
        if p is None or (split in ("train", "val") and layout.is_done(split)):
            continue
        if no_verify:
            log(f"{p}: not verified (--no-verify)")
        else:
            verify(p, archives[split], root / STATE_DIR, stream)
            log(f"{p}: MD5 {archives[split].md5} verified")
    return layout_ilsvrc(root, log, paths["train"], paths["val"], paths["devkit"],
                         Path(labels) if labels else None, val_layout, workers, stream)

