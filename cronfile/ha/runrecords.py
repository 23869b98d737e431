"""An HA center's run records go to PostgreSQL first, then to its JSONL (SPEC §9 "Records").

Why first, and not copied in the background as events are: a new leader decides from
PostgreSQL alone which runs the old leader left in flight, and records those ``lost``. A
final record that reached the old leader's JSONL but not PostgreSQL (the copy was queued
when it was SIGKILLed) would give its run two final records, one on each host. So the
center hands each batch of run records (``started`` and every ``finished``: succeeded,
failed, killed, lost, missed, skipped, no_agent) to :class:`RunRecordStore`, which commits
it in one statement on a thread of its own (off the event loop, and off the ledger's writer
thread, so ``dispatched`` fsyncs never wait for it), and only the records it kept are then
written and fsynced to the JSONL. The other choice, recovery tolerating a missing final,
cannot work for local runs: the new leader cannot see the old host's JSONL at all.

Exactly one final record per run across every center: a ``finished`` record is inserted
only if the table holds none for its ``run_id`` yet (a ``supersedes`` record, a late agent
outcome after ``lost``, is the one allowed second). The check and the insert run under one
transaction-scoped advisory lock, so two centers finishing the same run (a leader that was
frozen past its lease, and the one that recorded its runs ``lost`` meanwhile) take turns
and the second sees the first's record. A refused record is reported back and the center
leaves it out of its JSONL too: the other center's record is the run's outcome.

The order of a center's run records in the table is the order of its batches (one thread,
one connection), so a run's ``started`` never lands after its ``finished``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import psycopg

__all__ = ["FINALS_LOCK_KEY", "RunRecordStore", "insert_run_records"]

log = logging.getLogger(__name__)

FINALS_LOCK_KEY = 0x63726F6E66696E  # "cronfin": serialises the once-per-run check

_INSERT = """
INSERT INTO cronfile_records (kind, ts, run_id, job, center, term, body)
SELECT 'run', coalesce((e->>'ts')::timestamptz, now()), e->>'run_id', e->>'job',
       %(center)s, %(term)s, e->'body'
FROM jsonb_array_elements(%(rows)s::jsonb) WITH ORDINALITY AS x(e, n)
WHERE e->'body'->>'record' IS DISTINCT FROM 'finished'
   OR e->'body' ? 'supersedes'
   OR NOT EXISTS (
        SELECT 1 FROM cronfile_records r
        WHERE r.run_id = e->>'run_id' AND r.kind = 'run'
          AND r.body->>'record' = 'finished' AND NOT r.body ? 'supersedes')
ORDER BY n
RETURNING run_id, body->>'record'
"""


def insert_run_records(conn: psycopg.Connection[Any], center: str, term: int | None,
                       records: Sequence[dict[str, Any]]) -> list[bool]:
    """Insert a batch in one transaction; per record, whether it was kept (False: a final
    record of a run that already has one, written by whichever center came first)."""
    if not records:
        return []
    rows = [{"ts": r.get("ts"), "run_id": r.get("run_id"), "job": r.get("job"), "body": r}
            for r in records]
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (FINALS_LOCK_KEY,))
        cur = conn.execute(_INSERT, {"center": center, "term": term,
                                     "rows": json.dumps(rows, default=str)})
        inserted = [(str(run_id), str(kind)) for run_id, kind in cur.fetchall()]
    # Only finals can be refused, and a batch never holds two plain finals of one run.
    kept_finals = {run_id for run_id, kind in inserted if kind == "finished"}
    return [r.get("record") != "finished" or "supersedes" in r or str(r.get("run_id")) in kept_finals
            for r in records]


class RunRecordStore:
    """Commits batches of run records on one thread, retrying a lost connection with backoff
    until :meth:`close`; :meth:`submit` returns a future of the records kept."""

    def __init__(self, dsn: str, center: str, term: Callable[[], int | None],
                 connect_timeout_s: float = 5.0) -> None:
        self.dsn = dsn
        self.center = center
        self._term = term
        self.connect_timeout_s = connect_timeout_s
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ha-runs")
        self._conn: psycopg.Connection[Any] | None = None
        self._closing = threading.Event()
        self.refused = 0
        """Final records refused because another center had recorded the run (for tests)."""

    def submit(self, records: Sequence[dict[str, Any]]) -> Future[list[dict[str, Any]]]:
        batch = list(records)
        return self._pool.submit(self._write, batch, self._term())

    def _write(self, batch: list[dict[str, Any]], term: int | None) -> list[dict[str, Any]]:
        backoff = 0.05
        while True:
            try:
                kept = insert_run_records(self._connection(), self.center, term, batch)
                break
            except (psycopg.OperationalError, OSError) as exc:
                self._drop()
                if self._closing.is_set():
                    raise
                log.warning("ha: writing %d run records to PostgreSQL failed (%s); retrying",
                            len(batch), exc)
                time.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
        out = []
        for record, ok in zip(batch, kept, strict=True):
            if ok:
                out.append(record)
            else:
                self.refused += 1
                log.warning("ha: run %s of %s already has its final record (written by another "
                            "center); this one (%s) is not recorded", record.get("run_id"),
                            record.get("job"), record.get("status"))
        return out

    def _connection(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(self.dsn, autocommit=True,
                                         connect_timeout=max(1, round(self.connect_timeout_s)))
        return self._conn

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()

    def close(self, timeout: float = 5.0) -> None:
        """Let the batches queued so far commit for up to ``timeout`` seconds, then stop
        retrying: what could not reach PostgreSQL is left out (the next leader records
        those runs ``lost``, their only final record)."""
        done = threading.Event()
        self._pool.submit(done.set)
        if not done.wait(timeout):
            log.error("ha: PostgreSQL did not take the last run records within %gs", timeout)
        self._closing.set()
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._drop()
