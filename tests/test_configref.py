"""docs/configuration.md: every config key documented in the code, the page current, its keys and limits true."""
from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from alexnet_train.config import SECTIONS, ConfigError
from alexnet_train.configload import load_config
from alexnet_train.configref import field_docs, main, missing_docs, render, section_keys, undocumented

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "configuration.md"
ROW = re.compile(r"^\| `(\w+\.\w+)` \| [^|]* \| `((?:[^`\\]|\\.)*)` \|", re.M)
ALL_KEYS = [f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)]


@dataclass(frozen=True)
class Sample:
    documented: int = 1
    """A documented field."""
    bare: int = 2
    commented: int = 3  # a comment is not documentation
    blank: int = 4
    """ """
    last: str = "x"
    """The last field's doc."""


def test_the_checker_names_undocumented_fields():
    assert field_docs(Sample) == {"documented": "A documented field.", "last": "The last field's doc."}
    assert undocumented(Sample) == ["bare", "commented", "blank"]


def test_every_config_key_is_documented():
    assert missing_docs() == []
    assert all(key.doc for section in SECTIONS for key in section_keys(section))


def test_the_page_is_current():
    assert PAGE.read_text() == render(), "docs/configuration.md is stale: run python -m alexnet_train.configref"


def test_every_key_is_on_the_page_and_set_takes_its_default():
    rows = ROW.findall(PAGE.read_text())
    assert [key for key, _ in rows] == ALL_KEYS
    defaults = load_config()
    for key, default in rows:
        value = default.replace("\\|", "|")  # a table cell's escaped pipe
        assert load_config(None, [f"{key}={value}"]) == defaults, key


def _probes(allowed: str) -> tuple[list[float], list[float]]:
    """(values just outside, values at or just inside) the limit an Allowed cell states
    ("> 0", ">= 63", "[0, 1)")."""
    if m := re.fullmatch(r"(>=?) (\d+)", allowed):
        bound = int(m[2])
        return ([bound], [bound + 1]) if m[1] == ">" else ([bound - 1], [bound])
    m = re.fullmatch(r"([\[(])([\d.]+), ([\d.]+)([\])])", allowed)
    lo, hi = float(m[2]), float(m[3])
    outside = [lo - 1 if m[1] == "[" else lo, hi + 1 if m[4] == "]" else hi]
    inside = [(lo + hi) / 2] + ([lo] if m[1] == "[" else []) + ([hi] if m[4] == "]" else [])
    return outside, inside


def test_the_stated_limits_are_the_validated_ones():
    checked = 0
    for section, cls in SECTIONS.items():
        for key in section_keys(section):
            if not key.allowed or key.allowed.startswith("`"):
                continue
            name = key.name.split(".")[1]
            outside, inside = _probes(key.allowed)
            for value in outside:
                with pytest.raises(ConfigError, match=re.escape(key.name)):
                    cls(**{name: value})
            for value in inside:
                try:
                    cls(**{name: value})
                except ConfigError as exc:  # another key's limit, as resize_size 1 < crop_size 224, is fine
                    assert not str(exc).startswith(f"{key.name}:"), exc
            checked += 1
    assert checked >= 20


def test_check_mode_and_out(tmp_path: Path, capsys):
    out = tmp_path / "configuration.md"
    assert main(["--check", "--out", str(out)]) == 1  # missing
    assert main(["--out", str(out)]) == 0 and out.read_text() == render()
    assert main(["--check", "--out", str(out)]) == 0
    out.write_text(render().replace("Images per step", "Images per batch"))
    assert main(["--check", "--out", str(out)]) == 1
    assert "stale" in capsys.readouterr().out


def test_config_holds_the_sections_and_configload_alone_reads_them():
    # One arrow, configload -> config: importing config loads no reader and re-exports none of its
    # names, so the two cannot import each other again (tests/test_imports.py walks the whole package).
    code = ("import sys, alexnet_train.config as c\n"
            "assert 'alexnet_train.configload' not in sys.modules, sorted(sys.modules)\n"
            "names = ('build_config', 'config_from_dict', 'config_to_dict', 'dump_yaml', 'load_config', "
            "'parse_override')\n"
            "assert not [n for n in names if hasattr(c, n)], [n for n in names if hasattr(c, n)]\n"
            "import alexnet_train.configload as l\n"
            "assert l.Config is c.Config and l.SECTIONS is c.SECTIONS\n"
            "assert isinstance(l.load_config('configs/demo.yaml'), c.Config)")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
