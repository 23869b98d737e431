"""What a new leader reads from PostgreSQL before it schedules anything (SPEC §9 "Takeover").

A takeover must recover exactly as a restarted center does, and a restarted center folds
its ledger's run records into a :class:`~cronfile.center.recovery.Recovery` (handled slots,
runs left in flight, failed attempts whose retry was pending) and reads the ``triggered``
events still pending. Here the ledger is the records table that every leader writes, so
this module returns the same two inputs, read from there, for the same pure recovery.

What is read is bounded, not the whole history:

* every run record written since ``since`` (the start of the gap the old leader may have
  left: those records say which of the gap's slots are handled, and how);
* since ``horizon`` (the slot memory, hours), only the runs that can still matter: those
  with no final record (still in flight when the old leader died), failed or timed-out
  attempts (a retry may be due), later attempts (which say a retry already happened) and
  triggered runs (which say a ``triggered`` event's start already happened).

Each record comes with ``center``, the center that wrote it (a ``lost`` reason names it).

Records come back oldest first per run, with a run's ``finished`` records after its other
ones: the copy of a ``started`` record must never make a run that ended look open again.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import psycopg

__all__ = ["TakeoverLedger", "read_takeover_ledger"]


@dataclass(frozen=True)
class TakeoverLedger:
    """The run records and ``triggered`` events a takeover recovers from."""

    runs: list[dict[str, Any]]
    """Run records (§4 dicts plus ``center``), in the order to fold them (``ledger.fold_runs``)."""
    triggered: list[dict[str, Any]]
    """``triggered`` events since the horizon, oldest first."""
    last_success: dict[str, float]
    """Per job, the ``ts`` of its last ``succeeded`` record since the horizon (for
    ``expect.success_within``; a restart has it from its summary)."""


_RUNS = """
WITH recent AS (
    SELECT seq, ts, run_id, center, body FROM cronfile_records
    WHERE kind = 'run' AND ts >= %(horizon)s AND run_id IS NOT NULL
),
wanted AS (
    SELECT run_id FROM recent WHERE ts >= %(since)s
    UNION
    SELECT run_id FROM recent GROUP BY run_id HAVING NOT bool_or(body->>'record' = 'finished')
    UNION
    SELECT run_id FROM recent
    WHERE body->>'status' IN ('failed', 'timeout') OR (body->>'attempt')::int > 1
       OR body->>'trigger' = 'trigger'
)
SELECT body || jsonb_build_object('center', center) FROM recent JOIN wanted USING (run_id)
ORDER BY (body->>'record' = 'finished'), seq
"""

_LAST_SUCCESS = """
SELECT job, extract(epoch FROM max(ts))::float8 FROM cronfile_records
WHERE kind = 'run' AND ts >= %(horizon)s AND body->>'status' = 'succeeded' AND job IS NOT NULL
GROUP BY job
"""

_TRIGGERED = """
SELECT body FROM cronfile_records
WHERE kind = 'event' AND ts >= %(horizon)s AND body->>'event' = 'triggered'
ORDER BY seq
"""


async def read_takeover_ledger(conn: psycopg.AsyncConnection[Any], since: float,
                               horizon: float) -> TakeoverLedger:
    """Read what a takeover at the end of a gap starting at ``since`` needs (epoch seconds;
    ``horizon`` <= ``since`` bounds the older part, see the module docstring)."""
    params = {"since": datetime.fromtimestamp(since, UTC),
              "horizon": datetime.fromtimestamp(min(horizon, since), UTC)}
    async with conn.transaction():
        await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")  # one snapshot
        # The planner cannot guess how few runs are wanted and would JIT-compile the
        # query: measured (bench/ha_takeover.py), that was 80% of a takeover's read.
        await conn.execute("SET LOCAL jit = off")
        runs = [row[0] for row in await (await conn.execute(_RUNS, params)).fetchall()]
        triggered = [row[0] for row in await (await conn.execute(_TRIGGERED, params)).fetchall()]
        success = {str(job): float(ts) for job, ts in
                   await (await conn.execute(_LAST_SUCCESS, params)).fetchall()}
    return TakeoverLedger(runs=runs, triggered=triggered, last_success=success)
