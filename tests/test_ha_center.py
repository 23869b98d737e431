"""Two real ``cronfile center --ha`` processes on one PostgreSQL (SPEC §9): one leads, the
other stands by; SIGKILL the leader and the standby takes over with no slot run twice;
SIGTERM hands over at once; ``status --format json`` shows the replica's role and term."""

from __future__ import annotations

import json
import signal
import sys
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from centerlib import CenterProc, cli, dispatched, wait_for  # noqa: E402
from pglib import LEASE_S, PgServer, ha_argv, skip_reason  # noqa: E402

_reason = skip_reason()
pytestmark = [pytest.mark.skipif(_reason is not None, reason=_reason or ""), pytest.mark.slow]



class HaCenter(CenterProc):
    def __init__(self, root: Path, dsn: str, name: str) -> None:
        super().__init__(root)
        self.dsn, self.name = dsn, name

    def argv(self) -> list[str]:
        return [*super().argv(), *ha_argv(self.dsn, self.name)]

    def status(self) -> dict[str, Any]:
        out = cli("status", "--format", "json", state=self.state)
        assert out.returncode == 0, out.stderr
        return dict(json.loads(out.stdout)["center"])


def pair(tmp_path: Path, dsn: str) -> tuple[HaCenter, HaCenter, Path]:
    marks = tmp_path / "marks"
    job = (
        "apiVersion: cronfile/v1\njobs:\n  tick:\n    schedule: \"*/1 * * * * *\"\n"
        f"    command: \"echo $CRONFILE_SCHEDULED_AT $CRONFILE_RUN_ID >> {marks}\"\n"
    )
    centers = []
    for name in ("a", "b"):
        c = HaCenter(tmp_path / name, dsn, name)
        c.write("jobs.yaml", job)
        centers.append(c)
    return centers[0], centers[1], marks


def events_named(center: CenterProc, name: str) -> list[dict[str, Any]]:
    return [e for e in center.events() if e.get("event") == name]


def check_once_per_slot(marks: Path, dsn: str, *centers: CenterProc) -> Counter[str]:
    """The checker: every slot's mark was written at most once (by whichever center ran it),
    PostgreSQL holds exactly one claim per slot, every run a center dispatched (its JSONL)
    was claimed by it, and every run that left a mark had been dispatched."""
    lines = [line.split() for line in marks.read_text().splitlines() if line.strip()]
    slots = Counter(slot for slot, _run_id in lines)
    assert [s for s, n in slots.items() if n > 1] == []
    with psycopg.connect(dsn) as conn:
        assert conn.execute(
            "SELECT count(*) FROM (SELECT 1 FROM cronfile_claims GROUP BY job, scheduled_at, target"
            " HAVING count(*) > 1) d").fetchone() == (0,)
        claims = dict(conn.execute("SELECT run_id, holder FROM cronfile_claims").fetchall())
    sent: set[str] = set()
    for c in centers:
        assert isinstance(c, HaCenter)
        ids = {r["run_id"] for r in dispatched(c.runs())}
        assert {claims.get(i) for i in ids} <= {c.name}, f"{c.name} dispatched a run it had not claimed"
        sent |= ids
    if centers:
        assert {run_id for _slot, run_id in lines} <= sent
    return slots


def test_sigkill_the_leader_the_standby_leads_and_no_slot_runs_twice(pg: PgServer, tmp_path: Path) -> None:
    dsn = pg.new_database()
    a, b, marks = pair(tmp_path, dsn)
    try:
        a.start()
        a.wait_events(lambda es: any(e.get("event") == "leader_acquired" for e in es), 10, "a leads")
        b.start()
        a.wait_runs(lambda rs: len(dispatched(rs, "tick")) >= 3, 10, "a dispatching")
        assert b.status()["role"] == "standby" and b.status()["lease_holder"] == "a"
        assert dispatched(b.runs()) == []  # a standby never dispatches
        a.kill()
        killed_at = datetime.now().astimezone().timestamp()
        b.wait_events(lambda es: any(e.get("event") == "leader_acquired" for e in es),
                      LEASE_S + 2 + 3, "b to take over")
        # every slot due from lease + 2 s after the kill on is run by b
        first_due = killed_at + LEASE_S + 2.0
        b.wait_runs(lambda rs: len([r for r in dispatched(rs, "tick")
                                    if parse(r["scheduled_at"]) >= first_due + 2]) >= 1, 10,
                    "b dispatching after the takeover")
        wait_for(lambda: len(marks.read_text().splitlines()) >= len(a.runs()) // 3, 5, "marks")
        took = events_named(b, "leader_acquired")[0]
        assert took["term"] == 2 and took["center"] == "b"
        b_slots = sorted(parse(r["scheduled_at"]) for r in dispatched(b.runs(), "tick"))
        expected = [s for s in range(int(first_due) + 1, int(b_slots[-1]) + 1)]
        assert [s for s in expected if s not in {int(x) for x in b_slots}] == []
        assert all(r.get("term") == 2 for r in dispatched(b.runs(), "tick"))
        assert all(r.get("term") == 1 for r in dispatched(a.runs(), "tick"))
        a_ids = {r["run_id"] for r in dispatched(a.runs(), "tick")}
        b_ids = {r["run_id"] for r in dispatched(b.runs(), "tick")}
        assert a_ids.isdisjoint(b_ids)
        view = b.status()
        assert {k: view[k] for k in ("name", "role", "term", "lease_holder")} == {
            "name": "b", "role": "leader", "term": 2, "lease_holder": "b"}
        assert view["lease_expires_at"]
    finally:
        b.stop()
        a.stop()
    check_once_per_slot(marks, dsn, a, b)


def test_sigterm_hands_over_to_the_standby(pg: PgServer, tmp_path: Path) -> None:
    dsn = pg.new_database()
    a, b, marks = pair(tmp_path, dsn)
    try:
        a.start()
        a.wait_events(lambda es: any(e.get("event") == "leader_acquired" for e in es), 10, "a leads")
        b.start()
        wait_for(lambda: b.status()["role"] == "standby", 10, "b standing by")
        assert a.stop(signal.SIGTERM) == 0
        released = events_named(a, "leader_released")
        assert [(e["center"], e["term"]) for e in released] == [("a", 1)]
        # well within the lease: only the release NOTIFY can make b lead this soon
        b.wait_events(lambda es: any(e.get("event") == "leader_acquired" for e in es), 1.5,
                      "b to take over at once")
        b.wait_runs(lambda rs: len(dispatched(rs, "tick")) >= 2, 10, "b dispatching")
    finally:
        b.stop()
        a.stop()
    check_once_per_slot(marks, dsn, a, b)
    # PostgreSQL holds the ledger of record: every run record and event either center wrote
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT center, kind, body FROM cronfile_records ORDER BY seq").fetchall()
    for c in (a, b):
        mine = [(kind, body) for center, kind, body in rows if center == c.name]
        jsonl_runs = sorted((r["run_id"], r["record"]) for r in c.runs())
        assert sorted((body["run_id"], body["record"]) for kind, body in mine if kind == "run") == jsonl_runs
        events = [body["event"] for kind, body in mine if kind == "event"]
        assert events == [e["event"] for e in c.events()]


def test_center_ha_usage_errors(tmp_path: Path) -> None:
    (tmp_path / "s").mkdir()
    base = ["center", "--schedules", str(tmp_path / "s"), "--state", str(tmp_path / "st")]
    out = cli(*base, "--ha", "postgresql://127.0.0.1/x")
    assert out.returncode == 2 and "--ha needs --name" in out.stderr
    out = cli(*base, "--ha", "postgresql://127.0.0.1/x", "--name", "a", "--ha-lease", "5s",
              "--ha-renew-deadline", "5s")
    assert out.returncode == 2
    assert "--ha-renew-deadline (5s) must be shorter than --ha-lease (5s)" in out.stderr


def parse(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def test_sigstopped_leader_resumed_after_a_takeover_dispatches_nothing(pg: PgServer, tmp_path: Path) -> None:
    """Split brain: a leader frozen past its lease (SIGSTOP) wakes up (SIGCONT) believing
    nothing happened; its renew deadline has passed and its claims carry a stale term."""
    dsn = pg.new_database()
    a, b, marks = pair(tmp_path, dsn)
    try:
        a.start()
        a.wait_events(lambda es: any(e.get("event") == "leader_acquired" for e in es), 10, "a leads")
        b.start()
        a.wait_runs(lambda rs: len(dispatched(rs, "tick")) >= 2, 10, "a dispatching")
        a.signal(signal.SIGSTOP)
        frozen_dispatches = len(dispatched(a.runs()))
        b.wait_events(lambda es: any(e.get("event") == "leader_acquired" for e in es),
                      LEASE_S + 2 + 3, "b to take over")
        b.wait_runs(lambda rs: len(dispatched(rs, "tick")) >= 2, 10, "b dispatching")
        a.signal(signal.SIGCONT)
        a.wait_events(lambda es: any(e.get("event") == "leader_lost" for e in es), 5, "a to step down")
        lost = events_named(a, "leader_lost")
        assert [(e["term"], e["reason"]) for e in lost] == [(1, "renew_deadline")]
        b.wait_runs(lambda rs: len(dispatched(rs, "tick")) >= 5, 10, "b keeps dispatching")
        assert len(dispatched(a.runs())) == frozen_dispatches
        assert wait_for(lambda: a.status()["role"] == "standby", 5, "a standby in status")
    finally:
        b.stop()
        a.stop()
    check_once_per_slot(marks, dsn, a, b)
