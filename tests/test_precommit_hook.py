"""The pre-commit hook validates the whole tree, so cross-file breakage fails the commit.

The test reads ``.pre-commit-hooks.yaml`` and runs the hook as pre-commit does, in a real
git repository: the staged files (deleted ones are not passed), filtered by ``files``;
nothing left and no ``always_run`` means "Skipped"; otherwise ``entry`` + ``args`` (+ the
files when ``pass_filenames``) runs from the repository's top.
"""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from centerlib import cronfile_command

REPO = Path(__file__).resolve().parent.parent
HOOK: dict[str, Any] = yaml.safe_load((REPO / ".pre-commit-hooks.yaml").read_text())[0]

INVENTORY = """\
apiVersion: cronfile/v1
agents:
  web-1: {labels: {role: web}}
"""
JOBS = """\
apiVersion: cronfile/v1
jobs:
  build-report:
    schedule: "0 3 * * *"
    command: ["/usr/bin/true"]
    targets: {agents: [web-1]}
"""
CHAIN = """\
apiVersion: cronfile/v1
jobs:
  mail-report:
    after: [build-report]
    command: ["/usr/bin/true"]
"""


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True,
                          text=True).stdout


def _run_hook(repo: Path, hook: dict[str, Any]) -> subprocess.CompletedProcess[str] | None:
    """What pre-commit does for ``hook`` on the staged changes (None = Skipped)."""
    staged = _git(repo, "diff", "--cached", "--name-only", "--diff-filter=d").split()
    files = [f for f in staged if re.search(hook.get("files", ""), f)]
    if not files and not hook.get("always_run", False):
        return None
    entry = shlex.split(hook["entry"])
    assert entry[0] == "cronfile"  # language: python installs the package's console script
    argv = [*cronfile_command(), *entry[1:], *hook.get("args", [])]
    if hook.get("pass_filenames", True):
        argv += files
    return subprocess.run(argv, cwd=repo, capture_output=True, text=True, timeout=60)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    (repo / "schedules").mkdir(parents=True)
    (repo / "schedules" / "inventory.yaml").write_text(INVENTORY)
    (repo / "schedules" / "jobs.yaml").write_text(JOBS)
    (repo / "schedules" / "chain.yaml").write_text(CHAIN)
    (repo / "README.md").write_text("ops\n")
    _git(repo, "init", "-q")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@example.com", "add", "-A")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "-qm", "start")
    return repo


def test_the_hook_validates_the_whole_tree() -> None:
    assert HOOK["id"] == "cronfile-validate"
    assert HOOK["pass_filenames"] is False and HOOK["always_run"] is True


def test_a_valid_tree_passes(repo: Path) -> None:
    (repo / "schedules" / "jobs.yaml").write_text("# nightly reports\n" + JOBS)
    _git(repo, "add", "schedules/jobs.yaml")
    result = _run_hook(repo, HOOK)
    assert result is not None and result.returncode == 0, result and result.stdout


def test_deleting_the_inventory_fails(repo: Path) -> None:
    _git(repo, "rm", "-q", "schedules/inventory.yaml")
    result = _run_hook(repo, HOOK)
    assert result is not None, "the hook was skipped"
    assert result.returncode == 1
    assert "schedules/jobs.yaml:6:" in result.stdout and "web-1" in result.stdout


def test_renaming_a_job_that_another_file_chains_after_fails(repo: Path) -> None:
    (repo / "schedules" / "jobs.yaml").write_text(JOBS.replace("build-report:", "make-report:"))
    _git(repo, "add", "schedules/jobs.yaml")
    result = _run_hook(repo, HOOK)
    assert result is not None and result.returncode == 1
    assert "schedules/chain.yaml:4:" in result.stdout and "build-report" in result.stdout


def test_a_tree_elsewhere_is_given_as_args(repo: Path) -> None:
    _git(repo, "mv", "schedules", "deploy")
    _git(repo, "rm", "-qf", "deploy/inventory.yaml")
    result = _run_hook(repo, {**HOOK, "args": ["deploy"]})
    assert result is not None and result.returncode == 1
    assert "deploy/jobs.yaml:6:" in result.stdout
