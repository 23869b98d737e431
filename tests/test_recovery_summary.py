"""A start recovers from the ledger's summary exactly what it would from all of history."""

from __future__ import annotations

import time
from typing import Any

from test_recovery import base, finished

from cronfile.center.recovery import pending_starts, recover, recover_summary
from cronfile.state.checkpoint import LedgerSummary
from cronfile.state.ledger import fold_runs, iso, utc_ts


def _stamped(records: list[dict[str, Any]], t: float) -> list[dict[str, Any]]:
    return [{"v": 1, "ts": iso(t + i * 0.001), **r} for i, r in enumerate(records)]


def test_the_summary_recovers_what_the_whole_history_does() -> None:
    now = time.time()
    t0 = now - 3600
    records = []
    for i in range(50):  # an hour of two jobs, one of them failing and retried
        slot = t0 + i * 60
        records.append(finished(base("ok", slot), "succeeded", slot + 1))
        first = finished(base("flaky", slot), "failed", slot + 1)
        records.append(first)
        if i % 3:
            records.append(finished(base("flaky", slot, attempt=2), "succeeded", slot + 40))
    records.append({**base("ok", now - 5), "record": "started", "started_at": iso(now - 4)})
    records.append({**base("remote", now - 5, agent="a1", transport="tcp"), "record": "dispatched"})
    records.append({**base("cu", t0 - 600), "record": "finished", "status": "missed",
                    "last_scheduled_at": iso(t0 - 60), "count": 10, "first_scheduled_at":
                    iso(t0 - 600)})
    stamped = _stamped(records, t0)
    summary = LedgerSummary()
    for record in stamped:
        summary.add_run(record)
    summary.add_event({"v": 1, "ts": utc_ts(), "event": "triggered",
                       "due": {"t": iso(now + 30), "ok": iso(t0 + 60)}})
    summary.prune()
    whole, small = recover(fold_runs(stamped)), recover_summary(summary)
    assert small.done_slots == whole.done_slots
    assert small.missed_until == whole.missed_until
    assert small.last_success == whole.last_success
    assert small.lost == whole.lost and len(small.lost) == 1
    assert small.awaiting_agents == whole.awaiting_agents and len(small.awaiting_agents) == 1
    events = [{"event": "triggered", "due": {"t": iso(now + 30), "ok": iso(t0 + 60)}}]
    horizon = now - 6 * 3600
    assert pending_starts(small, summary.triggered, horizon, lambda job: True) == \
        pending_starts(whole, events, horizon, lambda job: True)
    assert len(pending_starts(small, summary.triggered, horizon, lambda job: True)) > 5
