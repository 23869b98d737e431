"""Shared test fixtures: paths and the installed ``cronfile`` command."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def cronfile_command() -> list[str]:
    """The installed console script (black-box tests run it, as a user would)."""
    exe = shutil.which("cronfile", path=os.path.dirname(sys.executable))
    return [exe] if exe else [sys.executable, "-m", "cronfile"]


@pytest.fixture
def repo_root() -> Path:
    return REPO
