"""Slot claims and the records table (SPEC §9).

A claim is the fence for every target, including SSH hosts that cannot check a term: the
leader inserts it, together with the run's ``dispatched`` record, in ONE statement that also
checks that the lease row still names it with its term and has not expired. That statement
locks the lease row ``FOR SHARE``, so it and a takeover (an ``UPDATE`` of that row) are
serialised: either the claim commits under the old term before the takeover, or the takeover
commits first and the claim, re-checked against the new row, inserts nothing.

The key is (job, scheduled_at, target) where ``target`` is ``''`` for one/hash/failover/local
jobs (one claim per slot whoever runs it) and the agent for all/shard jobs. Manual runs have
no ``scheduled_at`` (NULL never collides) but are still fenced by the lease check.

Retries are safe: a claim whose reply was lost (the connection dropped after the commit) is
sent again with the same ``run_id``; the conflict then finds OUR run_id in the existing row
(the same holder AND term: run ids are deterministic, so another leader's claim of the same
slot has the same run_id and must not count) and reports the slot as claimed, so a
reconnect neither loses the claim nor doubles it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg

__all__ = ["SLOT_TARGET", "Claim", "Claimer", "append_records", "claim_slots", "fetch_records"]

log = logging.getLogger(__name__)

SLOT_TARGET = ""
"""The ``target`` of a claim for one/hash/failover/local jobs: one claim per slot."""


@dataclass(frozen=True)
class Claim:
    """One run the leader wants to dispatch, with its ``dispatched`` record (a §4 dict)."""

    job: str
    scheduled_at: datetime | None
    target: str
    run_id: str
    dispatched: dict[str, Any]
    line: str | None = None
    """The record as the center's JSONL ledger has it (``v``, ``ts`` first), kept verbatim
    so reads from PostgreSQL print the same bytes; None: rebuilt from ``dispatched``."""


_CLAIM = """
WITH lease AS (
    SELECT term, holder FROM cronfile_lease
    WHERE id = 1 AND holder = %(holder)s AND term = %(term)s AND expires_at > now()
    FOR SHARE
),
wanted AS (
    SELECT w.job, w.scheduled_at, w.target, w.run_id, coalesce(w.line::jsonb, w.body) AS body, w.line
    FROM jsonb_to_recordset(%(claims)s::jsonb)
        AS w(job text, scheduled_at timestamptz, target text, run_id text, body jsonb, line text)
),
inserted AS (
    INSERT INTO cronfile_claims (job, scheduled_at, target, run_id, term, holder)
    SELECT w.job, w.scheduled_at, w.target, w.run_id, lease.term, lease.holder
    FROM wanted w CROSS JOIN lease
    ON CONFLICT DO NOTHING
    RETURNING run_id
),
recorded AS (
    INSERT INTO cronfile_records (kind, ts, run_id, job, center, term, body, line)
    SELECT 'run', coalesce((w.body->>'ts')::timestamptz, now()), w.run_id, w.job, %(holder)s,
           %(term)s, w.body || jsonb_build_object('term', %(term)s::bigint), w.line
    FROM wanted w JOIN inserted i USING (run_id)
    RETURNING run_id
)
SELECT run_id FROM recorded
UNION
SELECT c.run_id FROM cronfile_claims c JOIN wanted w USING (run_id) CROSS JOIN lease
WHERE c.holder = lease.holder AND c.term = lease.term
"""


async def claim_slots(
    conn: psycopg.AsyncConnection[Any], holder: str, term: int, claims: Sequence[Claim]
) -> set[str]:
    """Claim a batch of runs; return the run_ids that are ours to dispatch (maybe none).

    One statement for the batch, so a scheduler tick costs one round trip and one commit,
    like the one fsync of the JSONL ledger. The batch travels as ONE json document: sent as
    arrays (``unnest(%s::jsonb[])``), every quote of every body went through psycopg's
    pure-Python array escaping, ~0.13 ms of the event loop per run (17 ms for a chunk of
    128), which was most of what a claim cost. Prepared on first use (the warm-up).
    """
    if not claims:
        return set()
    cur = await conn.execute(_CLAIM, _claim_params(holder, term, claims), prepare=True)
    return {row[0] for row in await cur.fetchall()}


def _claim_params(holder: str, term: int, claims: Sequence[Claim]) -> dict[str, Any]:
    """Scheduled times as ISO text (microseconds exact, as ``datetime`` holds them)."""
    rows = [{"job": c.job, "scheduled_at": None if c.scheduled_at is None else c.scheduled_at.isoformat(),
             "target": c.target, "run_id": c.run_id,
             # the JSONL line when there is one (the body is parsed from it there: sent once)
             "body": c.dispatched if c.line is None else None, "line": c.line} for c in claims]
    return {"holder": holder, "term": term, "claims": json.dumps(rows, default=str)}


async def append_records(
    conn: psycopg.AsyncConnection[Any],
    center: str,
    term: int | None,
    kind: str,
    records: Iterable[dict[str, Any]],
    lines: Sequence[str] | None = None,
) -> int:
    """Append §4 records (``kind`` is ``run`` or ``event``); return how many were written.

    ``lines``: the same records as the JSONL ledger encoded them, one per record (kept
    verbatim, with their ``ts``, for reads that must print the JSONL bytes)."""
    rows = [
        {"ts": r.get("ts"), "run_id": r.get("run_id"), "job": r.get("job"), "body": r}
        for r in records
    ]
    if lines is not None:
        if len(lines) != len(rows):
            raise ValueError(f"{len(lines)} lines for {len(rows)} records")
        for row, line in zip(rows, lines, strict=True):
            full = json.loads(line)  # with the ts the JSONL has, for the ts column too
            row.update(ts=full.get("ts"), body=full, line=line)
    if not rows:
        return 0
    # One statement for the batch (not one per record): the copy runs beside dispatch.
    await conn.execute(
        "INSERT INTO cronfile_records (kind, ts, run_id, job, center, term, body, line)"
        " SELECT %(kind)s, coalesce((e->>'ts')::timestamptz, now()), e->>'run_id', e->>'job',"
        " %(center)s, %(term)s, e->'body', e->>'line'"
        " FROM jsonb_array_elements(%(rows)s::jsonb) WITH ORDINALITY AS t(e, n) ORDER BY n",
        {"kind": kind, "center": center, "term": term, "rows": json.dumps(rows, default=str)},
    )
    return len(rows)


async def fetch_records(
    conn: psycopg.AsyncConnection[Any], kind: str, job: str | None = None
) -> list[dict[str, Any]]:
    """Records of one kind in the order they were written, optionally for one job."""
    cur = await conn.execute(
        "SELECT body FROM cronfile_records WHERE kind = %s AND (%s::text IS NULL OR job = %s)"
        " ORDER BY seq",
        (kind, job, job),
    )
    return [row[0] for row in await cur.fetchall()]


class Claimer:
    """Claims on their own connection (a slow claim never delays a lease renew), retried
    with backoff across lost connections for as long as ``still_leading()`` says so.

    Retrying is safe because :func:`claim_slots` is idempotent per ``run_id``; giving up
    (the leader stepped down meanwhile) returns the empty set: nothing is dispatched.
    """

    def __init__(self, dsn: str, holder: str, connect_timeout_s: float = 5.0) -> None:
        self.dsn = dsn
        self.holder = holder
        self.connect_timeout_s = connect_timeout_s
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self.retries = 0
        """How many attempts failed on a lost connection (for tests and logs)."""

    async def claim(
        self, term: int, claims: Sequence[Claim], still_leading: Callable[[], bool]
    ) -> set[str]:
        backoff = 0.05
        while still_leading():
            try:
                conn = await self._connection()
                return await claim_slots(conn, self.holder, term, claims)
            except (psycopg.OperationalError, OSError) as exc:
                self.retries += 1
                log.warning("ha: claim interrupted (%s); retrying", exc)
                await self.close()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 1.0)
        return set()

    async def warm(self) -> None:
        """Connect now and run the claim statement once on nothing (a new leader does it at
        once), so the first real claim pays neither the connection nor a cold catalog."""
        with contextlib.suppress(psycopg.Error, OSError, TimeoutError):
            conn = await self._connection()
            await conn.execute(_CLAIM, _claim_params(self.holder, 0, []), prepare=True)

    async def _connection(self) -> psycopg.AsyncConnection[Any]:
        if self._conn is not None and not self._conn.closed:
            return self._conn
        fresh: psycopg.AsyncConnection[Any] = await asyncio.wait_for(
            psycopg.AsyncConnection.connect(
                self.dsn, autocommit=True, connect_timeout=max(1, round(self.connect_timeout_s))
            ),
            self.connect_timeout_s,
        )
        self._conn = fresh
        return fresh

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), 1.0)
