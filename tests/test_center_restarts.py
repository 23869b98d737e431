"""Restarts of a Center built in-process: what the next center does with the ledger, the
watermark and the queue the previous one left.

These cases test the center's recovery and catch-up logic, not the process: each phase is
a real :class:`Center` on real files and real jobs, in this process, with a clock shifted
by a few seconds where the test needs time to pass (an outage, a backoff) instead of
sleeping through it. A real SIGKILLed subprocess is tested in test_center.py
(``test_sigkill_restarts_never_run_a_slot_twice_nor_lose_one``,
``test_a_triggered_start_pending_at_a_crash_runs_after_the_restart``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from centerlib import check_ledger, dispatched, finished, parse_ts
from inprocess import Phase, ShiftedClock

from cronfile.center.daemon import Center

EVERY_SECOND = '"*/1 * * * * *"'


def test_a_retry_pending_at_a_stop_runs_after_the_restart(tmp_path: Path) -> None:
    """The first attempt fails and the center stops while the retry waits for its backoff;
    the next center runs that retry (attempt 2, same slot) once, and nothing else."""
    phase = Phase(tmp_path)
    marker = tmp_path / "second-time"
    now = time.time()
    slot = float(int(now) + 10)
    phase.write(f"""\
  flaky:
    schedule: "{int(slot) % 60} * * * * *"
    command: "test -e {marker} || {{ touch {marker}; exit 3; }}"
    retries: {{max: 2, backoff: 4s}}
""")
    # due 1 s after the start: after the center applied its schedules, even on a loaded machine
    first = ShiftedClock(slot - 1.0 - now)
    runs = phase.run(lambda _c, rs: finished(rs, "flaky", "failed"), first, "the first attempt")
    failed = finished(runs, "flaky", "failed")[0]
    assert (failed["attempt"], failed["exit_code"]) == (1, 3)
    assert parse_ts(failed["scheduled_at"]) == slot
    assert len(dispatched(runs, "flaky")) == 1  # the retry was still waiting for its backoff

    def retried_and_nothing_queued(center: Center, rs: list[dict[str, Any]]) -> Any:
        # nothing delayed is left in the queue: a second copy of the retry would be there
        return finished(rs, "flaky", "succeeded") and center.scheduler.pending_start_floor() is None

    later = ShiftedClock(first.shift + 5.0)  # past the 4 s backoff
    runs = phase.run(retried_and_nothing_queued, later, "the retry")
    retry = finished(runs, "flaky", "succeeded")[0]
    assert (retry["attempt"], retry["scheduled_at"]) == (2, failed["scheduled_at"])
    assert [(r["attempt"], r["status"]) for r in finished(runs, "flaky")] == \
        [(1, "failed"), (2, "succeeded")]
    assert len(dispatched(runs, "flaky")) == 2


def test_restart_catch_up_latest_runs_once_and_records_missed_range(tmp_path: Path) -> None:
    phase = Phase(tmp_path)
    phase.write(f"""\
  cu:
    schedule: {EVERY_SECOND}
    command: "true"
    catch_up: latest
  plain:
    schedule: {EVERY_SECOND}
    command: "true"
""")
    phase.run(lambda _c, rs: finished(rs, "cu") and finished(rs, "plain"), ShiftedClock(0.0),
              "runs")
    stopped = time.time()

    def caught_up(_c: Center, rs: list[dict[str, Any]]) -> Any:
        return ([r for r in finished(rs, "cu") if r.get("trigger") == "catch_up"]
                and finished(rs, "plain", "missed"))

    # the next center starts 4 s later: a few slots of both jobs fell into the outage
    rs = phase.run(caught_up, ShiftedClock(4.0), "the catch-up")
    catch = [r for r in finished(rs, "cu") if r.get("trigger") == "catch_up"]
    assert len(catch) == 1 and catch[0]["status"] == "succeeded"
    for job in ("cu", "plain"):
        missed = finished(rs, job, "missed")
        assert len(missed) == 1, missed  # one bounded record, not one per second
        m = missed[0]
        first = parse_ts(m.get("first_scheduled_at") or m["scheduled_at"])
        last = parse_ts(m.get("last_scheduled_at") or m["scheduled_at"])
        assert first is not None and last is not None
        assert m.get("count", 1) == last - first + 1
        assert first >= stopped - 1.5 and m.get("count", 1) >= 2
    # plain (catch_up: none) never runs a slot from the outage
    plain_missed = finished(rs, "plain", "missed")[0]
    plain_last = parse_ts(plain_missed.get("last_scheduled_at") or plain_missed["scheduled_at"])
    cu_last = parse_ts(catch[0]["scheduled_at"])
    assert cu_last is not None and plain_last is not None and cu_last == plain_last
    check_ledger(phase.runs(), {"cu", "plain"})
