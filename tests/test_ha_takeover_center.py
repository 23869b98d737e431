"""Takeover with two real ``cronfile center --ha`` processes on a real PostgreSQL (SPEC §9
"Takeover"): SIGKILL the leader while something is in flight or pending, and the standby
recovers exactly as a restarted center would, from PostgreSQL. The checker proves every
run has exactly one final record across both centers' JSONL and the records table."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import psycopg
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from centerlib import CenterProc, cli, cronfile_command, dispatched, parse_ts, wait_for  # noqa: E402
from faultlib import FaultProxy  # noqa: E402
from fleetlib import AgentProc, FleetCenter  # noqa: E402
from pglib import LEASE_S, PgServer, ha_argv, skip_reason  # noqa: E402
from test_ha_center import HaCenter, check_once_per_slot, pair  # noqa: E402

_reason = skip_reason()
pytestmark = [pytest.mark.skipif(_reason is not None, reason=_reason or ""), pytest.mark.slow]


def two_centers(tmp_path: Path, dsn: str, jobs: str) -> tuple[HaCenter, HaCenter]:
    centers = []
    for name in ("a", "b"):
        c = HaCenter(tmp_path / name, dsn, name)
        c.write("jobs.yaml", "apiVersion: cronfile/v1\njobs:\n" + jobs)
        centers.append(c)
    return centers[0], centers[1]


def lead_then_stand_by(a: HaCenter, b: HaCenter) -> None:
    a.start()
    a.wait_events(lambda es: any(e.get("event") == "leader_acquired" for e in es), 10, "a leads")
    b.start()
    wait_for(lambda: b.status()["role"] == "standby", 10, "b standing by")


def kill_and_wait_for_takeover(a: HaCenter, b: HaCenter) -> None:
    a.kill()
    b.wait_events(lambda es: any(e.get("event") == "leader_acquired" for e in es),
                  LEASE_S + 2 + 5, "b to take over")


def pg_runs(dsn: str) -> list[tuple[str, dict[str, Any]]]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT center, body FROM cronfile_records WHERE kind = 'run'"
                            " ORDER BY seq").fetchall()
    return [(str(center), body) for center, body in rows]


def finals(records: list[dict[str, Any]], run_id: str | None = None) -> list[dict[str, Any]]:
    return [r for r in records if r.get("record") == "finished" and "supersedes" not in r
            and (run_id is None or r.get("run_id") == run_id)]


def check_one_final_per_run(dsn: str, *centers: CenterProc) -> None:
    """The checker: every run dispatched by any center has exactly one final record in the
    records table and exactly one across the centers' JSONL, and they say the same (down to
    the record's time)."""
    table = [body for _center, body in pg_runs(dsn)]
    jsonl = [r for c in centers for r in c.runs()]
    ids = {r["run_id"] for r in dispatched(table)} | {r["run_id"] for r in dispatched(jsonl)}
    in_table = Counter(r["run_id"] for r in finals(table))
    in_jsonl = Counter(r["run_id"] for r in finals(jsonl))
    assert {i: in_table[i] for i in ids if in_table[i] != 1} == {}
    assert {i: in_jsonl[i] for i in ids if in_jsonl[i] != 1} == {}
    by_id = {r["run_id"]: (r["status"], r["ts"]) for r in finals(table)}
    assert {r["run_id"]: (r["status"], r["ts"]) for r in finals(jsonl)} == by_id  # the same line


def wait_in_table(dsn: str, what: str, predicate: Any, timeout: float = 10) -> None:
    wait_for(lambda: predicate(pg_runs(dsn)), timeout, what)


def test_a_local_run_in_flight_on_the_killed_leader_is_recorded_lost_once(pg: PgServer,
                                                                          tmp_path: Path) -> None:
    dsn = pg.new_database()
    pidfile = tmp_path / "slow.pid"
    a, b = two_centers(tmp_path, dsn, (
        "  slow:\n    schedule: \"0 0 1 1 *\"\n"
        f"    command: \"echo $$ > {pidfile}; exec sleep 60\"\n"))
    try:
        lead_then_stand_by(a, b)
        assert cli("run", "slow", state=a.state).returncode == 0
        run_id = a.wait_runs(lambda rs: [r["run_id"] for r in rs if r.get("record") == "started"],
                             10, "the run to start on a")[0]
        wait_in_table(dsn, "its started record in PostgreSQL",
                      lambda rows: any(r.get("record") == "started" for _c, r in rows))
        kill_and_wait_for_takeover(a, b)
        lost = b.wait_runs(lambda rs: finals(rs, run_id), 10, "b to record the run lost")
        assert [(r["status"], r["agent"], r["transport"], r["attempt"]) for r in lost] == [
            ("lost", "local", "local", 1)]
        assert lost[0]["reason"] == "center a (term 1) stopped leading while the run was in flight"
        assert lost[0]["started_at"] is not None and lost[0]["duration_s"] is None
        wait_in_table(dsn, "the lost record in PostgreSQL",
                      lambda rows: [c for c, r in rows if r.get("record") == "finished"] == ["b"])
    finally:
        b.stop()
        a.stop()
        with contextlib.suppress(OSError, ValueError):
            os.kill(int(pidfile.read_text()), signal.SIGKILL)
    assert finals(a.runs()) == []
    check_one_final_per_run(dsn, a, b)


def test_a_retry_waiting_for_its_backoff_is_run_by_the_new_leader_at_its_time_once(
        pg: PgServer, tmp_path: Path) -> None:
    dsn = pg.new_database()
    attempts = tmp_path / "attempts"
    backoff = 8.0
    a, b = two_centers(tmp_path, dsn, (
        "  flaky:\n    schedule: \"0 0 1 1 *\"\n"
        f"    retries: {{max: 2, backoff: {backoff:g}s}}\n"
        f"    command: \"echo $CRONFILE_ATTEMPT >> {attempts}; [ $CRONFILE_ATTEMPT -ge 2 ]\"\n"))
    try:
        lead_then_stand_by(a, b)
        assert cli("run", "flaky", state=a.state).returncode == 0
        wait_in_table(dsn, "the failed first attempt in PostgreSQL",
                      lambda rows: any(r.get("status") == "failed" for _c, r in rows))
        kill_and_wait_for_takeover(a, b)
        [failed] = finals(a.runs())
        assert (failed["status"], failed["attempt"]) == ("failed", 1)
        retried = b.wait_runs(lambda rs: finals(rs), backoff + 10, "b to run the retry")
        assert [(r["status"], r["attempt"], r["scheduled_at"]) for r in retried] == [
            ("succeeded", 2, failed["scheduled_at"])]
        started = parse_ts(retried[0]["started_at"])
        ended = parse_ts(failed["finished_at"])
        assert started is not None and ended is not None
        assert started >= ended + backoff - 0.05  # at its time, not at once
        time.sleep(1.0)  # a second retry would follow at once: give it the chance to show
        assert attempts.read_text().split() == ["1", "2"]
    finally:
        b.stop()
        a.stop()
    assert [r["attempt"] for r in dispatched(b.runs())] == [2]
    check_one_final_per_run(dsn, a, b)


def test_a_triggered_start_with_a_delay_pending_on_the_killed_leader_runs_once(
        pg: PgServer, tmp_path: Path) -> None:
    dsn = pg.new_database()
    marks = tmp_path / "marks"
    a, b = two_centers(tmp_path, dsn, (
        "  later:\n    trigger: {event: go, delay: 8s}\n"
        f"    command: \"echo $CRONFILE_SCHEDULED_AT >> {marks}\"\n"))
    try:
        lead_then_stand_by(a, b)
        assert cli("trigger", "go", state=a.state).returncode == 0
        [triggered] = [e for e in a.events() if e.get("event") == "triggered"]
        due = parse_ts(triggered["due"]["later"])
        assert due is not None

        def in_table() -> bool:
            with psycopg.connect(dsn) as conn:
                return bool(conn.execute("SELECT 1 FROM cronfile_records WHERE kind = 'event'"
                                         " AND body->>'event' = 'triggered'").fetchall())

        wait_for(in_table, 10, "the triggered event in PostgreSQL")
        kill_and_wait_for_takeover(a, b)
        assert dispatched(a.runs()) == []
        ran = b.wait_runs(lambda rs: finals(rs), 20, "b to run the triggered start")
        assert [(r["status"], r["trigger"]) for r in ran] == [("succeeded", "trigger")]
        assert parse_ts(ran[0]["scheduled_at"]) == pytest.approx(due, abs=0.001)
        assert parse_ts(ran[0]["started_at"]) >= due - 0.05  # type: ignore[operator]
        time.sleep(1.0)
        assert len(marks.read_text().splitlines()) == 1
    finally:
        b.stop()
        a.stop()
    check_one_final_per_run(dsn, a, b)


def test_every_slot_of_the_gap_is_run_or_recorded_missed_once(pg: PgServer, tmp_path: Path) -> None:
    """catch_up: none (the default): the slots nobody ran while the lease lapsed get one
    bounded ``missed`` record from the new leader, none is dropped and none run twice."""
    dsn = pg.new_database()
    a, b, marks = pair(tmp_path, dsn)
    try:
        lead_then_stand_by(a, b)
        a.wait_runs(lambda rs: len(dispatched(rs, "tick")) >= 2, 10, "a dispatching")
        kill_and_wait_for_takeover(a, b)
        b.wait_runs(lambda rs: len(dispatched(rs, "tick")) >= 2, 10, "b dispatching")
    finally:
        b.stop()
        a.stop()
    ran = Counter(int(parse_ts(r["scheduled_at"]) or 0) for c in (a, b) for r in dispatched(c.runs(), "tick"))
    assert [s for s, n in ran.items() if n > 1] == []
    missed = [r for r in b.runs() if r.get("status") == "missed"]
    assert len(missed) == 1  # one bounded record for the whole gap
    first = int(parse_ts(missed[0].get("first_scheduled_at") or missed[0]["scheduled_at"]) or 0)
    last = int(parse_ts(missed[0].get("last_scheduled_at") or missed[0]["scheduled_at"]) or 0)
    gap = set(range(first, last + 1))
    assert missed[0].get("count", 1) == len(gap)
    assert gap.isdisjoint(ran)
    covered = gap | set(ran)
    assert set(range(min(covered), max(covered) + 1)) - covered == set()
    assert [r for r in a.runs() if r.get("status") == "missed"] == []
    check_once_per_slot(marks, dsn, a, b)
    check_one_final_per_run(dsn, a, b)


class HaFleetCenter(FleetCenter):
    """An HA center that also listens for agents (same token on both replicas)."""

    def __init__(self, root: Path, dsn: str, name: str) -> None:
        super().__init__(root)
        self.dsn, self.name = dsn, name

    def argv(self) -> list[str]:
        return [*super().argv(), *ha_argv(self.dsn, self.name)]


def test_an_agent_run_in_flight_on_the_killed_leader_gets_the_agents_outcome_once(
        pg: PgServer, tmp_path: Path) -> None:
    """The agent's connection goes through a proxy that points at the new leader once the
    old one is killed (an agent that knows one address, as the network sees a failover).
    The run ends before the standby leads: its outcome must wait for the takeover's
    recovery, not be taken for one already recorded."""
    dsn = pg.new_database()
    marks = tmp_path / "marks"
    schedule = ("apiVersion: cronfile/v1\nagents:\n  web1: {labels: {team: t}}\njobs:\n"
                "  remote:\n    schedule: \"0 0 1 1 *\"\n    targets: {agents: [web1]}\n"
                f"    command: \"sleep 1; echo $CRONFILE_RUN_ID >> {marks}\"\n")
    a, b = (HaFleetCenter(tmp_path / n, dsn, n) for n in ("a", "b"))
    for c in (a, b):
        c.write("jobs.yaml", schedule)
    b.token_file.write_text(a.token_file.read_text())
    agent: AgentProc | None = None
    with FaultProxy(a.port) as proxy:
        try:
            a.start()
            a.wait_events(lambda es: any(e.get("event") == "leader_acquired" for e in es), 10,
                          "a leads")
            b.start()
            agent = AgentProc(tmp_path, a, "web1", port=proxy.port).start()
            assert cli("run", "remote", state=a.state).returncode == 0
            run_id = a.wait_runs(lambda rs: [r["run_id"] for r in rs if r.get("record") == "started"],
                                 10, "the run to start on the agent")[0]
            wait_in_table(dsn, "its started record in PostgreSQL",
                          lambda rows: any(r.get("record") == "started" for _c, r in rows))
            proxy.target_port = b.port  # the agent's next connection reaches b
            a.kill()
            proxy.cut()
            done = b.wait_runs(lambda rs: finals(rs, run_id), LEASE_S + 15,
                               "b to record the agent's outcome")
            assert [(r["status"], r["exit_code"], r["agent"], r["transport"]) for r in done] == [
                ("succeeded", 0, "web1", "tcp")]
            assert marks.read_text().split() == [run_id]
        finally:
            if agent is not None:
                agent.stop()
            b.stop()
            a.stop()
    assert finals(a.runs()) == []
    assert len(finals(b.runs(), run_id)) == 1
    check_one_final_per_run(dsn, a, b)


def test_an_agent_on_both_centers_delivers_the_killed_leaders_run_to_the_new_one_once(
        pg: PgServer, tmp_path: Path) -> None:
    """The same with ``cronfile agent --center A,B`` (a connection to each replica): the
    run ends while nobody leads, its outcome goes to the new leader, which has read the
    run from PostgreSQL by then, and becomes its one final record."""
    dsn = pg.new_database()
    marks = tmp_path / "marks"
    schedule = ("apiVersion: cronfile/v1\nagents:\n  web1: {labels: {team: t}}\njobs:\n"
                "  remote:\n    schedule: \"0 0 1 1 *\"\n    targets: {agents: [web1]}\n"
                f"    command: \"sleep 1; echo $CRONFILE_RUN_ID >> {marks}\"\n")
    a, b = (HaFleetCenter(tmp_path / n, dsn, n) for n in ("a", "b"))
    for c in (a, b):
        c.write("jobs.yaml", schedule)
    agent = AgentProc(tmp_path, a, "web1")
    try:
        a.start()
        a.wait_events(lambda es: any(e.get("event") == "leader_acquired" for e in es), 10, "a leads")
        b.start()
        agent.launch([*cronfile_command(), "agent", "--center",
                      f"127.0.0.1:{a.port},127.0.0.1:{b.port}", "--name", "web1",
                      "--token-file", str(a.token_file), "--state", str(agent.state),
                      "--backoff-max", "0.5"], dict(os.environ))
        a.wait_connected("web1")
        b.wait_connected("web1")
        assert cli("run", "remote", state=a.state).returncode == 0
        run_id = a.wait_runs(lambda rs: [r["run_id"] for r in rs if r.get("record") == "started"],
                             10, "the run to start on the agent")[0]
        wait_in_table(dsn, "its started record in PostgreSQL",
                      lambda rows: any(r.get("record") == "started" for _c, r in rows))
        a.kill()
        done = b.wait_runs(lambda rs: finals(rs, run_id), LEASE_S + 15,
                           "b to record the agent's outcome")
        assert [(r["status"], r["exit_code"], r["agent"], r["transport"]) for r in done] == [
            ("succeeded", 0, "web1", "tcp")]
        assert marks.read_text().split() == [run_id]
    finally:
        agent.stop()
        b.stop()
        a.stop()
    assert finals(a.runs()) == []
    check_one_final_per_run(dsn, a, b)
