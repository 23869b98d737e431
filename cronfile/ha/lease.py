"""The lease statements: who leads, under which term, until when (SPEC §9).

One row (``id = 1``) in ``cronfile_lease``. Every decision is one SQL statement evaluated
with the database's ``now()``, the only wall clock the lease uses; no center compares its
own clock with another's.

* **Acquire** is River's upsert: ``INSERT … ON CONFLICT (id) DO UPDATE … WHERE expires_at <
  now()``. The row lock makes concurrent attempts take turns, and the ``WHERE`` is evaluated
  again on the row the winner committed, so exactly one of them gets it; ``term`` grows by
  one at every takeover (the row is never deleted, so the term never goes back).
* **Renew** pushes ``expires_at`` forward only while ``holder`` and ``term`` are still ours. It
  does not require the lease to be unexpired: if it lapsed and nobody took it, the term is
  unchanged, so nobody else can have dispatched under it.
* **Release** (a planned stop) sets ``expires_at = now()`` and ``NOTIFY``s, so a standby
  waiting on ``LISTEN`` takes over at once instead of at its next retry.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import psycopg

__all__ = ["NOTIFY_CHANNEL", "Grant", "LeaseView", "acquire", "read", "release", "renew"]

NOTIFY_CHANNEL = "cronfile_lease"


@dataclass(frozen=True)
class LeaseView:
    """The lease row as the database has it, with the database's ``now()`` of the read."""

    holder: str
    term: int
    expires_at: datetime
    db_now: datetime

    @property
    def expired(self) -> bool:
        return self.expires_at < self.db_now


@dataclass(frozen=True)
class Grant:
    """The result of an acquire attempt: ``won`` with our term, or the lease someone holds."""

    won: bool
    lease: LeaseView
    previous_expires_at: datetime | None = None
    """When won: when the lease taken over had expired (None if there was none). A new
    leader's gap starts about one lease before it: the old leader's last renew."""


_ACQUIRE = """
WITH before AS (SELECT expires_at FROM cronfile_lease WHERE id = 1)
INSERT INTO cronfile_lease AS l (id, holder, term, acquired_at, expires_at)
VALUES (1, %(holder)s, 1, now(), now() + %(ttl)s)
ON CONFLICT (id) DO UPDATE
    SET holder = EXCLUDED.holder, term = l.term + 1,
        acquired_at = now(), expires_at = now() + %(ttl)s
    WHERE l.expires_at < now()
RETURNING holder, term, expires_at, now(), (SELECT expires_at FROM before)
"""

_READ = "SELECT holder, term, expires_at, now() FROM cronfile_lease WHERE id = 1"

_RENEW = """
UPDATE cronfile_lease SET expires_at = now() + %(ttl)s
WHERE id = 1 AND holder = %(holder)s AND term = %(term)s
RETURNING holder, term, expires_at, now()
"""

_RELEASE = """
WITH released AS (
    UPDATE cronfile_lease SET expires_at = now()
    WHERE id = 1 AND holder = %(holder)s AND term = %(term)s
    RETURNING term
)
SELECT pg_notify(%(channel)s, term::text) FROM released
"""


def _view(row: tuple[str, int, datetime, datetime]) -> LeaseView:
    return LeaseView(holder=row[0], term=row[1], expires_at=row[2], db_now=row[3])


async def acquire(conn: psycopg.AsyncConnection[Any], holder: str, ttl: timedelta) -> Grant:
    """Take the lease if it is free or expired; otherwise report who holds it."""
    cur = await conn.execute(_ACQUIRE, {"holder": holder, "ttl": ttl})
    row = await cur.fetchone()
    if row is not None:
        return Grant(won=True, lease=_view(row[:4]), previous_expires_at=row[4])
    current = await read(conn)
    assert current is not None  # the upsert found a row, or it would have inserted one
    return Grant(won=False, lease=current)


async def read(conn: psycopg.AsyncConnection[Any]) -> LeaseView | None:
    """The lease row, or None before any center ever led."""
    cur = await conn.execute(_READ)
    row = await cur.fetchone()
    return None if row is None else _view(row)


async def renew(
    conn: psycopg.AsyncConnection[Any], holder: str, term: int, ttl: timedelta
) -> LeaseView | None:
    """Extend our lease; None means it is no longer ours (someone took over)."""
    cur = await conn.execute(_RENEW, {"holder": holder, "term": term, "ttl": ttl})
    row = await cur.fetchone()
    return None if row is None else _view(row)


async def release(conn: psycopg.AsyncConnection[Any], holder: str, term: int) -> bool:
    """End our lease now and wake the standbys; False if it was not ours any more."""
    cur = await conn.execute(_RELEASE, {"holder": holder, "term": term, "channel": NOTIFY_CHANNEL})
    return await cur.fetchone() is not None
