"""An HA center's run records go to PostgreSQL first, then to its JSONL (SPEC §9 "Records").

Why first, and not copied in the background as events are: a new leader decides from
PostgreSQL alone which runs the old leader left in flight, and records those ``lost``. A
final record that reached the old leader's JSONL but not PostgreSQL (the copy was queued
when it was SIGKILLed) would give its run two final records, one on each host. So the
center hands each batch of run records (``started`` and every ``finished``: succeeded,
failed, killed, lost, missed, skipped, no_agent) to :class:`RunRecordStore`, which commits
it in one statement on a thread of its own (off the center's event loop, and off the
ledger's writer thread, so ``dispatched`` fsyncs never wait for it; every try is bounded in
time, so a connection gone silent is given up and made again), and only the records it kept are then
written and fsynced to the JSONL. The other choice, recovery tolerating a missing final,
cannot work for local runs: the new leader cannot see the old host's JSONL at all.

Exactly one final record per run across every center: a ``finished`` record is inserted
only if the table holds none for its ``run_id`` yet (a ``supersedes`` record, a late agent
outcome after ``lost``, is the one allowed second; and a batch sent again after its reply
was lost adds nothing). The check and the insert run under one transaction-scoped advisory
lock, so two centers finishing the same run (a leader that was
frozen past its lease, and the one that recorded its runs ``lost`` meanwhile) take turns
and the second sees the first's record. A refused record is reported back and the center
leaves it out of its JSONL too: the other center's record is the run's outcome.

The order of a center's run records in the table is the order of its batches (one at a
time, in order), so a run's ``started`` never lands after its ``finished``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
from collections.abc import Callable, Coroutine, Sequence
from concurrent.futures import Future
from typing import Any, TypeVar

import psycopg

from cronfile.state.ledger import FORMAT_VERSION

__all__ = ["FINALS_LOCK_KEY", "RunRecordStore", "insert_run_records"]

log = logging.getLogger(__name__)
T = TypeVar("T")

FINALS_LOCK_KEY = 0x63726F6E66696E  # "cronfin": serialises the once-per-run check

# A record is inserted unless the run already has one of its kind (``started``, or a final;
# a ``supersedes`` final is a kind of its own): a final another center wrote first is
# refused, and a batch sent again after a lost reply adds nothing.
_INSERT = """
INSERT INTO cronfile_records (kind, ts, run_id, job, center, term, body, line)
SELECT 'run', coalesce((e->>'ts')::timestamptz, now()), e->>'run_id', e->>'job',
       %(center)s, %(term)s, e->'body', e->>'line'
FROM jsonb_array_elements(%(rows)s::jsonb) WITH ORDINALITY AS x(e, n)
WHERE NOT EXISTS (
    SELECT 1 FROM cronfile_records r
    WHERE r.run_id = e->>'run_id' AND r.kind = 'run'
      AND r.body->>'record' = e->'body'->>'record'
      AND (r.body ? 'supersedes') = (e->'body' ? 'supersedes'))
ORDER BY n
RETURNING run_id, body->>'record', body ? 'supersedes'
"""

_OURS = """
SELECT run_id, body->>'record', body ? 'supersedes' FROM cronfile_records
WHERE kind = 'run' AND run_id = ANY(%(run_ids)s) AND center = %(center)s
"""


def _kind(record: dict[str, Any]) -> tuple[str, str, bool]:
    return str(record.get("run_id")), str(record.get("record")), "supersedes" in record


async def insert_run_records(conn: psycopg.AsyncConnection[Any], center: str, term: int | None,
                             records: Sequence[dict[str, Any]], ts: str | None = None,
                             lines: Sequence[bytes] | None = None) -> list[bool]:
    """Insert a batch in one transaction; per record, whether it is this center's (False:
    a final record of a run that another center recorded first). ``ts``: the time the
    center's JSONL gives the batch (its ``ts`` column and the records' own); ``lines``: the
    records as the JSONL has them, kept verbatim (reads print those bytes)."""
    if not records:
        return []
    rows = [{"ts": r.get("ts", ts), "run_id": r.get("run_id"), "job": r.get("job"),
             "body": r if ts is None or "ts" in r else {"v": FORMAT_VERSION, "ts": ts, **r}}
            for r in records]
    if lines is not None:
        for row, line in zip(rows, lines, strict=True):
            row["line"] = line.decode("ascii").rstrip("\n")
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (FINALS_LOCK_KEY,))
        cur = await conn.execute(_INSERT, {"center": center, "term": term,
                                           "rows": json.dumps(rows, default=str)})
        ours = {(str(a), str(b), bool(c)) for a, b, c in await cur.fetchall()}
        refused = [r for r in records if _kind(r) not in ours]
        if refused:  # written by an earlier try of this very batch, or by another center
            cur = await conn.execute(_OURS, {"center": center,
                                             "run_ids": [str(r.get("run_id")) for r in refused]})
            ours |= {(str(a), str(b), bool(c)) for a, b, c in await cur.fetchall()}
    return [_kind(r) in ours for r in records]


class RunRecordStore:
    """Commits batches of run records in order, on an event loop of its own in a thread of
    its own; a try that fails or takes longer than ``timeout_s`` (a connection gone silent)
    is made again on a fresh connection, until :meth:`close`. :meth:`submit` returns a
    future of the records to write to the JSONL."""

    def __init__(self, dsn: str, center: str, term: Callable[[], int | None],
                 timeout_s: float = 5.0) -> None:
        self.dsn = dsn
        self.center = center
        self._term = term
        self.timeout_s = timeout_s
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name="ha-runs")
        self._thread.start()
        self._order = asyncio.Lock()  # batches commit in the order they were submitted
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._closing = False
        self.refused = 0
        """Final records refused because another center had recorded the run (for tests)."""

    def submit(self, records: Sequence[dict[str, Any]], ts: str | None = None,
               lines: Sequence[bytes] | None = None) -> Future[list[bool]]:
        """Commit ``records`` (stamped ``ts``, encoded as the JSONL ``lines``); the future
        gives, per record, whether to write it to the JSONL."""
        return asyncio.run_coroutine_threadsafe(
            self._write(list(records), self._term(), ts, None if lines is None else list(lines)),
            self._loop)

    def barrier(self) -> Future[None]:
        """Done once every batch submitted before it is committed (or given up on)."""
        return asyncio.run_coroutine_threadsafe(self._after_all(), self._loop)

    async def _after_all(self) -> None:
        async with self._order:
            return

    async def _write(self, batch: list[dict[str, Any]], term: int | None, ts: str | None,
                     lines: list[bytes] | None) -> list[bool]:
        async with self._order:
            backoff = 0.05
            while True:
                try:
                    conn = await self._bounded(self._connection())
                    kept = await self._bounded(insert_run_records(conn, self.center, term, batch, ts,
                                                                  lines))
                    break
                except (psycopg.OperationalError, OSError, TimeoutError) as exc:
                    self._drop_now()
                    if self._closing:
                        raise
                    log.warning("ha: writing %d run records to PostgreSQL failed (%s); "
                                "retrying", len(batch), exc or type(exc).__name__)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 2.0)
        for record, ok in zip(batch, kept, strict=True):
            if not ok:
                self.refused += 1
                log.warning("ha: run %s of %s already has its final record (written by another "
                            "center); this one (%s) is not recorded", record.get("run_id"),
                            record.get("job"), record.get("status"))
        return kept

    async def _bounded(self, coro: Coroutine[Any, Any, T]) -> T:
        """``coro``'s result within ``timeout_s``, or TimeoutError. Unlike ``wait_for`` it
        does not wait for the cancelled statement: psycopg then sends a cancel request,
        which on a silent link hangs as the statement did."""
        task = asyncio.ensure_future(coro)
        done, _ = await asyncio.wait({task}, timeout=self.timeout_s)
        if task not in done:
            task.cancel()
            raise TimeoutError(f"no answer from PostgreSQL within {self.timeout_s:g}s")
        return task.result()

    async def _connection(self) -> psycopg.AsyncConnection[Any]:
        if self._conn is None or self._conn.closed:
            self._conn = await psycopg.AsyncConnection.connect(
                self.dsn, autocommit=True, connect_timeout=max(1, round(self.timeout_s)))
        return self._conn

    def _drop_now(self) -> None:
        """Forget the connection, closing its socket at once (a polite close could wait
        on a silent link)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.pgconn.finish()

    def close(self, timeout: float = 5.0) -> None:
        """Let the batches queued so far commit for up to ``timeout`` seconds, then stop
        retrying: what could not reach PostgreSQL is left out (the next leader records
        those runs ``lost``, their only final record)."""
        with contextlib.suppress(Exception):
            self.barrier().result(timeout)
        self._closing = True
        with contextlib.suppress(Exception):
            self.barrier().result(self.timeout_s + 2.0)
        self._loop.call_soon_threadsafe(self._stop_loop)
        self._thread.join(5.0)
        if not self._thread.is_alive():
            self._loop.close()

    def _stop_loop(self) -> None:
        self._drop_now()
        for task in asyncio.all_tasks(self._loop):
            task.cancel()
        self._loop.stop()
