"""``cronfile validate FILE``: which files a single file is checked with, and symlinks that
lead nowhere or in circles (a clear problem, never an internal error)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from conftest import cronfile_command

GOOD = "apiVersion: cronfile/v1\njobs:\n  nightly:\n    schedule: \"0 4 * * *\"\n" \
       "    command: [/bin/true]\n"


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "NO_COLOR": "1"}
    env.pop("CRONFILE_DEBUG", None)
    done = subprocess.run([*cronfile_command(), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=60, env=env)
    assert "Traceback" not in done.stderr + done.stdout, done.stderr
    assert "internal error" not in done.stderr, done.stderr
    return done


def test_a_file_outside_a_schedules_tree_is_checked_alone(tmp_path: Path) -> None:
    """Like one file in the system temp directory: its neighbours are not schedule files
    of the same tree, so they are neither read nor held against it."""
    loose = tmp_path / "tmp"
    loose.mkdir()
    (loose / "mine.yaml").write_text(GOOD)
    (loose / "someone-else.yaml").write_text(GOOD)  # the same job name: no conflict
    (loose / "broken.yaml").write_text("apiVersion: [\n")
    (loose / "deep").mkdir()
    (loose / "deep" / "circle").symlink_to("circle")
    done = run(["validate", str(loose / "mine.yaml")], tmp_path)
    assert (done.returncode, done.stdout) == (0, "")
    assert done.stderr == "1 files, 1 jobs, 0 agents: 0 errors, 0 warnings\n"


def test_a_symlink_loop_beside_a_loose_file_is_no_internal_error(tmp_path: Path) -> None:
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "a.yaml").write_text(GOOD)
    (tmp_path / "other" / "l2.yaml").symlink_to("l2.yaml")
    done = run(["validate", "other/a.yaml"], tmp_path)
    assert (done.returncode, done.stdout) == (0, "")


def test_a_looped_sibling_in_a_tree_is_reported_only_where_it_is(tmp_path: Path) -> None:
    root = tmp_path / "schedules"
    root.mkdir()
    (root / "a.yaml").write_text(GOOD)
    (root / "loop.yaml").symlink_to("loop.yaml")
    (root / "sub").symlink_to(".")
    done = run(["validate", "schedules/a.yaml"], tmp_path)
    assert (done.returncode, done.stdout) == (0, "")
    assert done.stderr == "1 files, 1 jobs, 0 agents: 0 errors, 0 warnings\n"
    done = run(["validate"], tmp_path)
    assert done.returncode == 1
    assert done.stdout == "schedules/loop.yaml:1:1: error: symlink loop\n"


def test_validating_a_looped_or_broken_link_names_it(tmp_path: Path) -> None:
    root = tmp_path / "schedules"
    root.mkdir()
    (root / "loop.yaml").symlink_to("loop.yaml")
    (root / "gone.yaml").symlink_to("nowhere.yaml")
    done = run(["validate", "schedules/loop.yaml", "schedules/gone.yaml"], tmp_path)
    assert done.returncode == 1
    assert done.stdout == ("schedules/loop.yaml:1:1: error: symlink loop\n"
                           "schedules/gone.yaml:1:1: error: broken symlink (to nowhere.yaml)\n")


def test_a_loose_file_that_is_not_yaml_is_not_a_schedule_file(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text(GOOD)
    done = run(["validate", "notes.txt"], tmp_path)
    assert done.returncode == 1
    assert done.stdout == ("notes.txt:1:1: error: not a schedule file: only *.yaml and *.yml "
                           "files are read\n")
