"""scripts/fetch_torchcodec.py: reading TorchCodec's compatibility table and choosing the wheel
for a torch / Python, on the table the installed TorchCodec ships and on edge cases; the whole
script end to end against a local wheelhouse of real (tiny) wheels, with no network."""
from __future__ import annotations

import importlib.metadata
import importlib.util
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from .conftest import REPO

SCRIPT = REPO / "scripts" / "fetch_torchcodec.py"
_spec = importlib.util.spec_from_file_location("fetch_torchcodec", SCRIPT)
fetch = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fetch)

TABLE = """\
Some README text | with a pipe.

| `torchcodec`       | `torch`            | Python              |
| ------------------ | ------------------ | ------------------- |
| `main` / `nightly` | `main` / `nightly` | `>=3.10`, `<=3.14`   |
| `0.16`             | `>=2.11`             | `>=3.10`, `<=3.14`   |

<details>

| `torchcodec`       | `torch`            | Python              |
| ------------------ | ------------------ | ------------------- |
| `0.11`             | `2.11`             | `>=3.10`, `<=3.14`   |
| `0.10`             | `2.10`             | `>=3.10`, `<=3.14`   |
| `0.1`              | `2.5`              | `>=3.9`, `<=3.12`   |
| `0.0.3`            | `2.4`              | `>=3.8`, `<=3.12`   |

</details>
"""


@pytest.fixture(scope="module")
def real_rows() -> list:
    try:
        readme = importlib.metadata.metadata("torchcodec").get_payload()
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("TorchCodec is not installed")
    return fetch.parse_table(readme)


def test_the_installed_torchcodecs_table_is_read_row_by_row(real_rows):
    by_version = {r.torchcodec: r for r in real_rows}
    assert by_version["0.11"] == fetch.Row("0.11", "2.11", ">=3.10, <=3.14")
    assert by_version["0.1"] == fetch.Row("0.1", "2.5", ">=3.9, <=3.12")
    assert by_version["0.0.3"].torch == "2.4"
    assert len(by_version) == len(real_rows) >= 16  # 0.0.3 .. 0.15 in 0.16.0's (.. 0.16 in 0.17.0's), two tables
    assert not any(r.torchcodec in ("main", "nightly", "torchcodec") or "-" in r.torch for r in real_rows)


@pytest.mark.parametrize("torch_version, python, expected", [
    ("2.11.0", "3.12", "newest"),  # 0.12 .. the newest listed are all ">=2.11": the newest wins
    ("2.11.0+cu130", "3.12", "newest"),
    ("2.13.2", "3.14", "newest"),
    ("2.10.0", "3.12", "0.10"),  # an exact minor
    ("2.9.1", "3.13", "0.9"),  # 0.9 and 0.8 both say 2.9
    ("2.9.0", "3.9", None),  # 0.8 and 0.9 start at Python 3.10
    ("2.5.1", "3.12", "0.1"),
    ("2.5.1", "3.13", None),  # 0.1 stops at Python 3.12
    ("2.4.0", "3.8", "0.0.3"),
    ("2.3.1", "3.11", None),  # older than the table
])
def test_the_real_table_chooses_the_newest_row_that_fits(real_rows, torch_version, python, expected):
    if expected == "newest":  # which release that is depends on the installed TorchCodec's table
        newest = max(real_rows, key=lambda r: fetch.version_tuple(r.torchcodec))
        assert newest.torch == ">=2.11"
        expected = newest.torchcodec
    row = fetch.choose(real_rows, torch_version, python)
    assert (row.torchcodec if row else None) == expected


@pytest.mark.parametrize("cell, version, admits", [
    ("2.11", "2.11.0", True),
    ("2.11", "2.11.3+cu130", True),
    ("2.11", "2.12.0", False),  # an exact minor is that minor only
    ("2.1", "2.11.0", False),  # versions compare as numbers, not as text prefixes
    (">=2.11", "2.12.0", True),
    (">=2.11", "2.10.2", False),
    (">=2.11", "3.0", True),
    (">=3.10, <=3.14", "3.14", True),
    (">=3.10, <=3.14", "3.14.2", True),  # "<=3.14" is the whole 3.14 series
    (">=3.10, <=3.14", "3.15", False),
    (">=3.10, <=3.14", "3.9", False),
    ("main / nightly", "2.11.0", False),
    ("", "2.11.0", False),
])
def test_cell_admits(cell, version, admits):
    assert fetch.cell_admits(cell, version) is admits


def test_the_table_is_read_from_both_parts_and_junk_rows_are_left_out():
    rows = fetch.parse_table(TABLE)
    assert [r.torchcodec for r in rows] == ["0.16", "0.11", "0.10", "0.1", "0.0.3"]
    assert fetch.choose(rows, "2.12.0", "3.12").torchcodec == "0.16"
    assert fetch.choose(rows, "2.10.0", "3.10").torchcodec == "0.10"
    assert fetch.choose(rows, "2.11.0", "3.15") is None  # Python out of every range
    assert fetch.choose(fetch.parse_table("no table here"), "2.11.0", "3.12") is None


def test_a_release_belongs_to_its_series_only():
    assert fetch.in_series("0.16.1", "0.16") and fetch.in_series("0.0.3", "0.0.3")
    assert not fetch.in_series("0.17.0", "0.16") and not fetch.in_series("0.1.0", "0.16")
    assert fetch.wheel_version("torchcodec-0.17.0-cp312-cp312-manylinux_2_28_x86_64.whl") == "0.17.0"


def write_wheel(folder: Path, version: str, readme: str, python: str = "cp312") -> Path:
    """A real, minimal wheel of TorchCodec ``version`` whose METADATA carries ``readme``."""
    path = folder / f"torchcodec-{version}-{python}-{python}-manylinux_2_28_x86_64.whl"
    info = f"torchcodec-{version}.dist-info"
    with zipfile.ZipFile(path, "w") as whl:
        whl.writestr("torchcodec/__init__.py", "")
        whl.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: torchcodec\nVersion: {version}\n"
                                         "Description-Content-Type: text/markdown\n\n" + readme)
        whl.writestr(f"{info}/WHEEL", f"Wheel-Version: 1.0\nRoot-Is-Purelib: false\nTag: {python}-{python}-"
                                      "manylinux_2_28_x86_64\n")
        whl.writestr(f"{info}/RECORD", "")
    return path


def make_wheelhouse(folder: Path, versions: tuple[str, ...], readme: str = TABLE) -> Path:
    folder.mkdir()
    for version in versions:
        write_wheel(folder, version, readme)
    return folder


@pytest.fixture
def wheelhouse(tmp_path: Path) -> Path:
    return make_wheelhouse(tmp_path / "house", ("0.17.0", "0.16.0", "0.16.2", "0.11.1", "0.10.0"))


def run_script(dest: Path, house: Path, torch_version: str, python: str = "3.12") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), "--torch", torch_version, "--python", python,
                           "--dest", str(dest), "--find-links", str(house)], capture_output=True, text=True,
                          timeout=120)


@pytest.mark.slow
def test_the_script_keeps_only_the_latest_patch_of_the_chosen_release(wheelhouse, tmp_path):
    dest = tmp_path / "dest"
    done = run_script(dest, wheelhouse, "2.11.0")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    chosen = dest / "torchcodec-0.16.2-cp312-cp312-manylinux_2_28_x86_64.whl"
    assert lines[-1] == str(chosen.resolve())
    assert [p.name for p in dest.iterdir()] == [chosen.name]  # the newest (0.17.0) was fetched to be read, then removed
    assert len(lines) == 5 and "torchcodec 0.16 fits torch 2.11.0" in lines[1] and "removed" in lines[3]

    # A wheel this run did not fetch (the 0.16.2 above) is never removed.
    again = run_script(dest, wheelhouse, "2.10.1")
    assert again.returncode == 0, again.stderr
    assert sorted(p.name for p in dest.iterdir()) == ["torchcodec-0.10.0-cp312-cp312-manylinux_2_28_x86_64.whl",
                                                       chosen.name]


@pytest.mark.slow
def test_the_newest_wheel_is_kept_when_its_own_row_fits(tmp_path):
    table = TABLE.replace("| `0.16` ", "| `0.17` | `>=2.11` | `>=3.10`, `<=3.14` |\n| `0.16` ")
    house = make_wheelhouse(tmp_path / "house", ("0.17.0", "0.16.2"), table)
    done = run_script(tmp_path / "dest", house, "2.12.0")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1].endswith("torchcodec-0.17.0-cp312-cp312-manylinux_2_28_x86_64.whl")
    assert "keeping" in done.stdout and len(list((tmp_path / "dest").iterdir())) == 1


@pytest.mark.slow
def test_no_fitting_release_exits_1_with_one_line_and_leaves_nothing(wheelhouse, tmp_path):
    dest = tmp_path / "dest"
    done = run_script(dest, wheelhouse, "2.3.0")
    assert done.returncode == 1
    err = done.stderr.strip()
    assert len(err.splitlines()) == 1 and "torch 2.3.0" in err and "torchvision's decode_jpeg" in err
    assert list(dest.iterdir()) == []


@pytest.mark.slow
def test_a_chosen_release_without_a_wheel_for_that_python_exits_1_naming_it(wheelhouse, tmp_path):
    done = run_script(tmp_path / "dest", wheelhouse, "2.11.0", python="3.11")  # the house has cp312 wheels only
    assert done.returncode == 1
    err = done.stderr.strip()
    assert len(err.splitlines()) == 1 and "Python 3.11" in err and "torchcodec" in err
