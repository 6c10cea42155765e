#!/usr/bin/env python3
"""Download the TorchCodec wheel that fits a torch release and a Python, to carry to a machine
without network (``data.decode: device`` decodes with TorchCodec where it loads).

    python scripts/fetch_torchcodec.py --torch 2.11.0 --python 3.12 --dest .whl
                                       [--platform manylinux_2_28_x86_64 ...]
                                       [--index-url URL | --find-links DIR]
    # then, on that machine:  pip install --no-deps .whl/torchcodec-*.whl

A TorchCodec wheel loads only against the torch releases it was built for, and the one place
that says which is the compatibility table in TorchCodec's README, which every wheel carries
as its METADATA.  So: download the newest wheel for that Python and platform, read its table,
take the newest TorchCodec row whose torch and Python cells admit the versions asked for,
download that minor's latest patch (unless it is the wheel already fetched), and delete the
wheels this run fetched that are not the one chosen.  Prints a line per decision, then the
wheel's path.  Exit 1 when no row fits: ``data.decode: device`` then falls back to
``torchvision.io.decode_jpeg``.

``--find-links DIR`` takes wheels from DIR only (a local wheelhouse), not from an index.
Needs only the standard library and pip.
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import NamedTuple

DEFAULT_PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
                     "manylinux2014_x86_64"]
_CLAUSE = re.compile(r"^(>=|<=|==|>|<)?\s*v?(\d+(?:\.\d+)*)$")
_VERSION = re.compile(r"^\d+(?:\.\d+)*$")


class Row(NamedTuple):
    """One row of the compatibility table, cells as written without backticks."""

    torchcodec: str  # a minor ("0.16") or, for the oldest, a release ("0.0.3")
    torch: str  # "2.11" (that minor) or ">=2.11"
    python: str  # ">=3.10, <=3.14"


def version_tuple(version: str) -> tuple[int, ...]:
    """(2, 11, 0) from "2.11.0+cu130"; the leading numeric release only (no pre / local part)."""
    match = re.match(r"v?(\d+(?:\.\d+)*)", version.strip())
    if not match:
        raise ValueError(f"not a version: {version!r}")
    return tuple(int(p) for p in match.group(1).split("."))


def parse_table(readme: str) -> list[Row]:
    """Every versioned row of the README's ``torchcodec | torch | Python`` table(s), in file order.

    Header, separator and ``main`` / ``nightly`` rows are left out; the table may be split
    (recent releases, then an "older versions" block): both parts are read.
    """
    rows = []
    for line in readme.splitlines():
        cells = [c.strip().replace("`", "").strip() for c in line.strip().strip("|").split("|")]
        if line.lstrip().startswith("|") and len(cells) == 3 and _VERSION.match(cells[0]):
            rows.append(Row(*cells))
    return rows


def cell_admits(cell: str, version: str) -> bool:
    """Whether a table cell ("2.11", ">=2.11", ">=3.10, <=3.14") admits ``version``.

    Each clause compares at its own precision: "2.11" is all of 2.11.x, "<=3.14" takes
    3.14.2.  A clause that is not a comparison with a version admits nothing.
    """
    wanted = version_tuple(version)
    clauses = [c.strip() for c in cell.split(",") if c.strip()]
    if not clauses:
        return False
    for clause in clauses:
        match = _CLAUSE.match(clause)
        if not match:
            return False
        op, bound = match.group(1) or "==", version_tuple(match.group(2))
        have = (wanted + (0,) * len(bound))[: len(bound)]
        ok = {"==": have == bound, ">=": have >= bound, "<=": have <= bound, ">": have > bound,
              "<": have < bound}[op]
        if not ok:
            return False
    return True


def choose(rows: list[Row], torch_version: str, python_version: str) -> Row | None:
    """The newest TorchCodec row whose torch and Python cells admit both versions; None if none does."""
    fits = [r for r in rows if cell_admits(r.torch, torch_version) and cell_admits(r.python, python_version)]
    return max(fits, key=lambda r: version_tuple(r.torchcodec), default=None)


def wheel_version(path: Path | str) -> str:
    """"0.17.0" from ``torchcodec-0.17.0-cp312-cp312-manylinux_2_28_x86_64.whl``."""
    return Path(path).name.split("-")[1]


def in_series(version: str, series: str) -> bool:
    """Whether release ``version`` ("0.16.1") belongs to the table's ``series`` ("0.16")."""
    bound = version_tuple(series)
    return version_tuple(version)[: len(bound)] == bound


def wheel_readme(path: Path) -> str:
    """The METADATA (headers and the README as its description) of a wheel."""
    with zipfile.ZipFile(path) as whl:
        names = [n for n in whl.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", n)]
        if not names:
            raise ValueError(f"{path}: no .dist-info/METADATA in the wheel")
        return whl.read(names[0]).decode("utf-8", "replace")


class Fetched(NamedTuple):
    path: Path
    new: bool  # False: pip found it already in DEST


def pip_download(requirement: str, args: argparse.Namespace) -> Fetched:
    """``pip download`` of one wheel for the target Python / platforms into ``args.dest``."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "--python-version", args.python, "--implementation", "cp", "-d", str(args.dest)]
    for platform in args.platform:
        cmd += ["--platform", platform]
    if args.find_links:
        cmd += ["--no-index", "--find-links", str(args.find_links)]
    elif args.index_url:
        cmd += ["--index-url", args.index_url]
    done = subprocess.run([*cmd, requirement], capture_output=True, text=True)
    lines = (done.stdout + "\n" + done.stderr).splitlines()
    if done.returncode != 0:
        last = next((ln.strip() for ln in reversed(lines) if ln.strip()), f"pip exited {done.returncode}")
        raise RuntimeError(f"pip download {requirement} for Python {args.python} on {', '.join(args.platform)}: {last}")
    for line in lines:
        match = re.search(r"^\s*(Saved|File was already downloaded)\s+(\S+\.whl)\s*$", line)
        if match:
            return Fetched(Path(match.group(2)), match.group(1) == "Saved")
    raise RuntimeError(f"pip download {requirement}: no wheel named in pip's output")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--torch", required=True, help="the target's torch version, e.g. 2.11.0 (+cu130 is fine)")
    parser.add_argument("--python", required=True, help="the target's Python, e.g. 3.12")
    parser.add_argument("--dest", type=Path, required=True, help="directory for the wheel")
    parser.add_argument("--platform", action="append", help=f"wheel platform tag, repeatable (default: "
                        f"{' '.join(DEFAULT_PLATFORMS)})")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--index-url", help="package index instead of PyPI")
    source.add_argument("--find-links", type=Path, help="take wheels from this directory only")
    args = parser.parse_args(argv)
    args.platform = args.platform or DEFAULT_PLATFORMS
    for flag, value in (("--torch", args.torch), ("--python", args.python)):
        try:
            version_tuple(value)
        except ValueError:
            parser.error(f"{flag}: {value!r} is not a version")
    args.dest.mkdir(parents=True, exist_ok=True)

    try:
        newest = pip_download("torchcodec", args)
        print(f"newest torchcodec for Python {args.python}: {newest.path.name}")
        rows = parse_table(wheel_readme(newest.path))
        if not rows:
            raise RuntimeError(f"{newest.path.name}: no torch compatibility table in its METADATA")
        row = choose(rows, args.torch, args.python)
        if row is None:
            if newest.new:
                newest.path.unlink()
            print(f"fetch_torchcodec: no torchcodec in {newest.path.name}'s compatibility table fits torch "
                  f"{args.torch} with Python {args.python}; data.decode: device will use torchvision's "
                  f"decode_jpeg instead", file=sys.stderr)
            return 1
        print(f"table: torchcodec {row.torchcodec} fits torch {args.torch} (torch {row.torch}) and Python "
              f"{args.python} (Python {row.python})")
        chosen = newest
        if in_series(wheel_version(newest.path), row.torchcodec):
            print(f"keeping {newest.path.name}: it is the newest {row.torchcodec} release")
        else:
            chosen = pip_download(f"torchcodec=={row.torchcodec}.*", args)
            verb = "downloaded" if chosen.new else "already in the destination:"
            print(f"{verb} {chosen.path.name}, the newest {row.torchcodec} release")
            if newest.new and newest.path.resolve() != chosen.path.resolve():
                newest.path.unlink()
                print(f"removed {newest.path.name}: not the release chosen for torch {args.torch}")
    except (RuntimeError, ValueError, OSError, zipfile.BadZipFile) as exc:
        print(f"fetch_torchcodec: {exc}", file=sys.stderr)
        return 1
    print(chosen.path.resolve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
