"""Shared test fixtures: paths and the installed ``cronfile`` command."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

if TYPE_CHECKING:
    from pglib import PgServer


def cronfile_command() -> list[str]:
    """The installed console script (black-box tests run it, as a user would)."""
    exe = shutil.which("cronfile", path=os.path.dirname(sys.executable))
    return [exe] if exe else [sys.executable, "-m", "cronfile"]


@pytest.fixture
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def pg() -> Iterator[PgServer]:
    """One real PostgreSQL server per test process (per xdist worker), not one per module:
    starting one costs seconds. Each test takes a database of its own
    (``pg.new_database()``); a test that stops or restarts the server starts it again."""
    from pglib import running_postgres

    with running_postgres() as server:
        yield server


@pytest.fixture
def dsn(pg: PgServer) -> str:
    """A database of its own on the shared server, with the HA schema migrated."""
    import psycopg

    from cronfile.ha.migrations import migrate

    database = pg.new_database()
    with psycopg.connect(database, autocommit=True) as conn:
        migrate(conn)
    return database
