"""Nothing a user reads (README, docs/, configs, scripts, the package) names this project's own
../shared folder: users get data with alexnet-data."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest

from .conftest import REPO

USER_FACING = sorted([REPO / "README.md", *(REPO / "docs").rglob("*.md"), *(REPO / "configs").glob("*.yaml"),
                      *(REPO / "scripts").glob("*.py"),
                      *(REPO / "alexnet_train").rglob("*.py")])


@pytest.mark.parametrize("path", USER_FACING, ids=lambda p: str(p.relative_to(REPO)))
def test_no_user_facing_file_names_the_shared_folder(path):
    text = path.read_text()
    assert not re.search(r"\.\./shared|shared/data", text), f"{path.relative_to(REPO)} names ../shared"


@pytest.mark.slow  # a Python process per script
@pytest.mark.parametrize("script", sorted(p.name for p in (REPO / "scripts").glob("*.py")))
def test_script_help_names_no_shared_folder(script):
    done = subprocess.run([sys.executable, str(REPO / "scripts" / script), "--help"], capture_output=True,
                          text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert "shared" not in done.stdout


def test_every_config_data_path_is_one_alexnet_data_makes():
    """Each shipped config that names a data folder says, in its header, the alexnet-data command making it."""
    import yaml

    for path in sorted((REPO / "configs").glob("*.yaml")):
        raw = yaml.safe_load(path.read_text()) or {}
        train_dir = (raw.get("data") or {}).get("train_dir")
        if not train_dir:
            continue
        root = train_dir.rsplit("/train", 1)[0]
        assert root.startswith("data/"), f"{path.name}: {train_dir}"
        assert re.search(rf"alexnet-data [a-z-]+ {re.escape(root)}\b", path.read_text()), path.name
