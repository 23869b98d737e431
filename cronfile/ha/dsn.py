"""A PostgreSQL DSN as it may be shown or stored: never with its password.

``center.json`` (world-readable), ``ha.json`` and every error message name the database by
its DSN without the password. A reader that needs one gets it the way libpq always does:
``PGPASSWORD``, or a ``PGPASSFILE`` (``~/.pgpass`` by default), or a DSN given on its own
command line (``--ha DSN``).
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["HA_FILE", "dsn_of_state_dir", "dsn_without_password"]

HA_FILE = "ha.json"
"""``<state>/ha.json``: ``{"dsn", "name"}`` of an HA center (DSN without password). Unlike
``center.json`` it stays after the center stops, so ``--state DIR`` keeps reading the ledger
of record."""


def dsn_without_password(dsn: str) -> str:
    """``dsn`` with any password removed (URL or ``key=value`` form), normalised to the
    ``key=value`` form; ``''`` for a DSN that cannot be parsed (then name none at all)."""
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    try:
        parts = conninfo_to_dict(dsn)
    except Exception:  # psycopg.ProgrammingError for a malformed DSN
        return ""
    parts.pop("password", None)
    return make_conninfo(**{k: str(v) for k, v in parts.items()})


def dsn_of_state_dir(state_dir: Path) -> str | None:
    """The DSN an HA center of ``state_dir`` uses (without password): ``center.json`` while
    it runs, ``ha.json`` after; None for a center without ``--ha``."""
    for name, key in (("center.json", "ha_dsn"), (HA_FILE, "dsn")):
        try:
            value = json.loads((state_dir / name).read_text()).get(key)
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(value, str) and value:
            return value
    return None
