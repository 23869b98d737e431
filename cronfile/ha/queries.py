"""The read side of the HA ledger of record (SPEC §9): ``runs``, ``logs``, ``status`` and
the HTTP API from PostgreSQL, so every replica gives the same answer.

:class:`PgRunStore` is a :class:`~cronfile.state.queries.RunStore`. It hands the JSONL
path's own fold (:func:`~cronfile.state.queries.fold_runs`, ``collect_run``, the
``LedgerSummary`` of ``status``) the records as the JSONL ledger wrote them (the ``line``
column), newest first, so both stores print the same bytes for the same records.

What each query reads (migration 2 made the indexes):

* runs: pages of run records newest first, keyset-paginated on ``seq`` (per job on
  ``(job, seq)``), until the fold has ``--limit`` complete runs; ``--since`` stops the walk at
  records written well before it, ``--until`` starts it at the last record written up to a
  day after it (the JSONL path's "the segment after the window" rule, in time);
* one run: its records by ``(run_id, seq)``;
* status: each named job's last ``finished`` record and each named agent's last run (one
  index probe each), the open runs (a table a trigger keeps), the last revision event and
  each job's last failed notification. Nothing there grows with history.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

import psycopg

from cronfile.ha.dsn import dsn_without_password
from cronfile.state.checkpoint import LedgerSummary
from cronfile.state.ledger import encode_record, utc_ts
from cronfile.state.queries import RunQuery, StoreUnavailable, collect_run, fold_runs

__all__ = ["SINCE_SLACK_S", "UNTIL_SLACK_S", "PgRunStore", "runs_statement"]

SINCE_SLACK_S = 300.0
"""A run scheduled at or after ``--since`` has every record written after it, give or take
the clocks of the replicas that wrote them: the walk newest first stops this much earlier."""
UNTIL_SLACK_S = 86400.0
"""A run scheduled before ``--until`` may end (or be recorded missed) later: records up to
this long after it are read, as the JSONL path reads the segment after its window."""
FIRST_PAGE, MAX_PAGE = 64, 4096
_NO_SEQ = 2**63 - 1

_COLUMNS = "seq, ts, line, body"
_HOST = ("kind = 'run' AND body->>'record' IS DISTINCT FROM 'started'"
         " AND jsonb_typeof(body->'scheduled_at') = 'string'"
         " AND body->>'transport' IN ('local', 'tcp', 'ssh')")
"""A record that says where a run went (``LedgerSummary.add_run``'s rule; the index's)."""


T = TypeVar("T")


def _line(row: tuple[Any, ...]) -> bytes:
    """The record's JSONL line: verbatim, or for a row copied before migration 2 rebuilt
    from ``body`` (then in jsonb's key order)."""
    _seq, ts, line, body = row
    if line is not None:
        return str(line).encode()
    return encode_record(dict(body), utc_ts(ts)).rstrip(b"\n")


def _moment(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, UTC)


class PgRunStore:
    """Run records, events and the status summary from the HA database at ``dsn``."""

    def __init__(self, dsn: str, connect_timeout_s: float = 5.0) -> None:
        self.dsn = dsn
        self.connect_timeout_s = connect_timeout_s
        self.where = dsn_without_password(dsn) or "the --ha database"
        self._conn: psycopg.Connection[Any] | None = None
        self._lock = threading.Lock()

    # -- connections ----------------------------------------------------------------------

    def _read(self, work: Callable[[psycopg.Connection[Any]], T]) -> T:
        """``work`` on the store's one connection (kept: the API asks again and again;
        queries from several threads take turns). A connection that broke since its last
        use (the server restarted) is replaced once; any other failure is StoreUnavailable."""
        with self._lock:
            for fresh in (self._conn is None, True):
                if self._conn is None or self._conn.closed or self._conn.broken:
                    self._conn = self._connect()
                try:
                    return work(self._conn)
                except psycopg.OperationalError as exc:
                    self.close()
                    if fresh:
                        raise self._failed(exc) from None
                except psycopg.Error as exc:
                    raise self._failed(exc) from None
        raise AssertionError("unreachable")  # the second pass returns or raises

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def _connect(self) -> psycopg.Connection[Any]:
        try:
            return psycopg.connect(self.dsn, autocommit=True,
                                   connect_timeout=max(1, round(self.connect_timeout_s)))
        except psycopg.Error as exc:
            raise StoreUnavailable(f"cannot reach PostgreSQL ({self.where}): {_first_line(exc)}") from None

    def _failed(self, exc: psycopg.Error) -> StoreUnavailable:
        if isinstance(exc, psycopg.errors.UndefinedTable | psycopg.errors.UndefinedColumn):
            return StoreUnavailable(
                f"PostgreSQL ({self.where}) has no cronfile ledger of this version yet: start a "
                f"center of this version with --ha on it, which migrates the schema "
                f"({_first_line(exc)})")
        return StoreUnavailable(f"reading PostgreSQL ({self.where}) failed: {_first_line(exc)}")

    # -- RunStore -------------------------------------------------------------------------

    def runs(self, query: RunQuery) -> list[dict[str, Any]]:
        return self._read(lambda conn: fold_runs(self._newest_first(conn, query), query))

    def run_records(self, run_id: str) -> list[dict[str, Any]]:
        rows = self._read(lambda conn: conn.execute(
            f"SELECT {_COLUMNS} FROM cronfile_records WHERE kind = 'run' AND run_id = %s"
            " ORDER BY seq DESC", (run_id,)).fetchall())
        return collect_run((_line(r) for r in rows), run_id)

    def summary(self, jobs: Sequence[str], agents: Sequence[str]) -> LedgerSummary:
        return self._read(lambda conn: self._summary(conn, list(jobs), list(dict.fromkeys(agents))))

    # -- the queries ----------------------------------------------------------------------

    def _newest_first(self, conn: psycopg.Connection[Any], query: RunQuery) -> Iterator[bytes]:
        """Run records, newest first, between the window's bounds turned into ``seq``
        bounds (pages that grow, so a small ``--limit`` reads one or two). Records of runs
        scheduled outside the window are left out here, as the fold would skip them."""
        params: dict[str, Any] = {"job": query.job, "before": _NO_SEQ, "after": 0,
                                  "low": None, "high": None}
        if query.until is not None:
            row = conn.execute(_SEQ_AT_OR_BEFORE, (_moment(query.until + UNTIL_SLACK_S),)).fetchone()
            if row is None:
                return
            params["before"] = int(row[0]) + 1
            params["high"] = _second(query.until)
        if query.since is not None:
            row = conn.execute(_SEQ_BEFORE, (_moment(query.since - SINCE_SLACK_S),)).fetchone()
            params["after"] = 0 if row is None else int(row[0])
            params["low"] = _second(query.since)
        statement = runs_statement(bool(query.job), query.since is not None or query.until is not None)
        page = FIRST_PAGE
        while True:
            rows = conn.execute(statement, {**params, "page": page}).fetchall()
            for row in rows:
                yield _line(row)
            if len(rows) < page:
                return
            params["before"] = int(rows[-1][0])
            page = min(page * 4, MAX_PAGE)

    def _summary(self, conn: psycopg.Connection[Any], jobs: list[str],
                 agents: list[str]) -> LedgerSummary:
        """The pieces of the ledger fold ``status`` uses, each folded by the fold itself
        from only the records that decide it (so the rules are written once)."""
        last = LedgerSummary()
        for row in conn.execute(
                f"SELECT r.* FROM unnest(%s::text[]) AS j(name) CROSS JOIN LATERAL ("
                f" SELECT {_COLUMNS} FROM cronfile_records WHERE kind = 'run'"
                f" AND body->>'record' = 'finished' AND job = j.name ORDER BY seq DESC LIMIT 1) r"
                f" ORDER BY r.seq", (jobs,)):
            last.add_line("runs", _line(row))
        hosts = LedgerSummary()
        for row in conn.execute(
                f"SELECT r.* FROM unnest(%s::text[]) AS a(name) CROSS JOIN LATERAL ("
                f" SELECT {_COLUMNS} FROM cronfile_records WHERE {_HOST}"
                f" AND body->>'agent' = a.name ORDER BY seq DESC LIMIT 1) r ORDER BY r.seq",
                (agents,)):
            hosts.add_line("runs", _line(row))
        opened = LedgerSummary()
        for row in conn.execute(
                "SELECT r.seq, r.ts, r.line, r.body FROM cronfile_open_runs o"
                " JOIN cronfile_records r ON r.kind = 'run' AND r.run_id = o.run_id AND r.seq >= o.seq"
                " ORDER BY r.seq"):
            opened.add_line("runs", _line(row))
        events = LedgerSummary()
        rows = conn.execute(
            f"SELECT {_COLUMNS} FROM cronfile_records WHERE kind = 'event'"
            " AND body->>'event' IN ('revision_rejected', 'revision_applied')"
            " ORDER BY seq DESC LIMIT 1").fetchall()
        rows += conn.execute(
            f"SELECT r.* FROM unnest(%s::text[]) AS j(name) CROSS JOIN LATERAL ("
            f" SELECT {_COLUMNS} FROM cronfile_records WHERE kind = 'event'"
            f" AND body->>'event' = 'notify_failed' AND body->>'job' = j.name"
            f" ORDER BY seq DESC LIMIT 1) r", (jobs,)).fetchall()
        for row in sorted(rows, key=lambda r: int(r[0])):
            events.add_line("events", _line(row))
        return LedgerSummary(jobs=last.jobs, hosts=hosts.hosts, open_runs=opened.open_runs,
                             rejection=events.rejection, notify_failures=events.notify_failures)


_SEQ_AT_OR_BEFORE = ("SELECT seq FROM cronfile_records WHERE kind = 'run' AND ts <= %s"
                     " ORDER BY ts DESC LIMIT 1")
_SEQ_BEFORE = "SELECT seq FROM cronfile_records WHERE kind = 'run' AND ts < %s ORDER BY ts DESC LIMIT 1"
_IN_WINDOW = (" AND (jsonb_typeof(body->'scheduled_at') IS DISTINCT FROM 'string' OR ("
              "(%(low)s::text IS NULL OR left(body->>'scheduled_at', 19) >= %(low)s)"
              " AND (%(high)s::text IS NULL OR left(body->>'scheduled_at', 19) <= %(high)s)))")
"""The fold's own pre-filter (``queries._outside``, to the second) in SQL: a record of a run
scheduled outside the window changes no answer, so it need not travel."""


def _second(epoch: float) -> str:
    """An instant as the first 19 characters of a record's time (``2026-11-02T08:00:00``)."""
    return _moment(epoch).strftime("%Y-%m-%dT%H:%M:%S")


def runs_statement(by_job: bool, window: bool = False) -> str:
    """One page of run records newest first, between ``seq`` ``%(after)s`` and
    ``%(before)s``: on the index of ``(job, seq)`` for one job, of ``seq`` otherwise (never a
    scan of the table)."""
    return (f"SELECT {_COLUMNS} FROM cronfile_records WHERE kind = 'run'"
            f"{' AND job = %(job)s' if by_job else ''}{_IN_WINDOW if window else ''}"
            " AND seq < %(before)s AND seq > %(after)s ORDER BY seq DESC LIMIT %(page)s")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
