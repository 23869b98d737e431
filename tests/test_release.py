"""What a user installs: one version everywhere, a CHANGELOG entry for it, a wheel that
carries the real JSON schema, and examples that install and call cronfile as it really is
(not from PyPI, where it is not published; not a bare ``cronfile`` that is not on PATH)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
import yaml

import cronfile

REPO = Path(__file__).resolve().parent.parent
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


def test_one_version_with_a_changelog_entry() -> None:
    assert cronfile.__version__ == VERSION
    headings = re.findall(r"(?m)^## (\S+)", (REPO / "CHANGELOG.md").read_text())
    assert headings[0] == VERSION and "0.1.0" in headings


def test_the_actions_example_installs_from_the_repository_at_the_tag() -> None:
    workflow = yaml.safe_load((REPO / "examples/github-actions/workflow.yml").read_text())
    steps = workflow["jobs"]["validate-and-plan"]["steps"]
    install = next(s for s in steps if s.get("name") == "Install cronfile")
    assert install["env"]["CRONFILE_SOURCE"] == f"git+https://github.com/OWNER/REPO@v{VERSION}"
    assert install["run"] == 'python -m pip install "cronfile @ $CRONFILE_SOURCE"'
    readme = (REPO / "examples/github-actions/README.md").read_text()
    assert "replace `OWNER/REPO`" in readme


def test_example_readmes_call_the_installed_command() -> None:
    for readme in sorted(REPO.glob("examples/*/README.md")):
        blocks = re.findall(r"```sh\n(.*?)```", readme.read_text(), flags=re.S)
        commands = [line for block in blocks for line in block.splitlines()
                    if line and not line.startswith("#")]
        assert commands, readme
        bare = [c for c in commands if c.startswith("cronfile ")]
        assert not bare, f"{readme}: {bare} (cronfile is in .venv/bin/, not on PATH)"


@pytest.mark.slow
def test_the_wheel_holds_the_schema_itself(tmp_path: Path) -> None:
    """In the repository the packaged schema is a symlink to ``schema/``: the wheel must hold
    the file's bytes, not a link (``.ci/check-wheel`` then installs and runs it)."""
    assert (REPO / "cronfile/schedules/cronfile-v1.json").is_symlink()
    scratch = REPO / "build"  # setuptools builds in the tree; leave it as it was
    had_scratch = scratch.exists()
    try:
        subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w",
                        str(tmp_path), str(REPO)], check=True, capture_output=True, timeout=300,
                       cwd=tmp_path)
    finally:
        if not had_scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    wheel = tmp_path / f"cronfile-{VERSION}-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as z:
        info = z.getinfo("cronfile/schedules/cronfile-v1.json")
        assert (info.external_attr >> 16) & 0o170000 == 0o100000  # a regular file
        assert z.read(info) == (REPO / "schema/cronfile-v1.json").read_bytes()
