"""Two real ``cronfile center --ha --listen`` processes on a real PostgreSQL and one real
``cronfile agent --center A,B`` (SPEC §9, fencing): the agent holds a connection to each,
a standby accepts it and shows it, the leader's runs carry its term, and after the leader is
frozen past its lease (SIGSTOP) the new leader's higher term is persisted by the agent, which
then delivers outcomes to the new leader; the old one, resumed (SIGCONT), dispatches nothing;
the persisted term survives an agent restart. A leader that still believes it leads with the
old term cannot be made of a real center (its renew deadline stops it at SIGCONT), so a third
"center" in the agent's list is a hub in this process whose role the test sets: its order of
term 1 is refused, and the real leader records the event, in PostgreSQL too."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import psycopg
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from centerlib import ChildProc, cli, cronfile_command, dispatched, finished, wait_for  # noqa: E402
from fencinglib import Replica  # noqa: E402
from fleetlib import SECRET, FleetCenter  # noqa: E402
from pglib import LEASE_S, PgServer, ha_argv, skip_reason  # noqa: E402

from cronfile.transports.hub import CenterRole  # noqa: E402

_reason = skip_reason()
pytestmark = [pytest.mark.skipif(_reason is not None, reason=_reason or ""), pytest.mark.slow]

AGENT = "web-1"


class HaFleetCenter(FleetCenter):
    """An HA replica that also listens for agents."""

    def __init__(self, root: Path, dsn: str, name: str) -> None:
        super().__init__(root)
        self.dsn, self.name = dsn, name

    def argv(self) -> list[str]:
        return [*super().argv(), *ha_argv(self.dsn, self.name)]

    def status(self) -> dict[str, Any]:
        out = cli("status", "--format", "json", state=self.state)
        assert out.returncode == 0, out.stderr
        return dict(json.loads(out.stdout))

    def leads(self) -> bool:
        return any(e.get("event") == "leader_acquired" for e in self.events())


class ThreadedReplica:
    """A :class:`Replica` hub on an event loop of its own thread, for a test that is not
    async (the centers are processes)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.replica = self.call(self._make())
        self.call(self.replica.hub.start())

    async def _make(self) -> Replica:
        return Replica("stale", leading=False, term=None, secret=SECRET)

    def call(self, coro: Any, timeout: float = 15.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.call(self.replica.hub.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


class MultiCenterAgent(ChildProc):
    def __init__(self, root: Path, token_file: Path, *ports: int) -> None:
        self.token_file = token_file
        self.ports = ports
        self.state = root / "agent-state"
        self.log = root / "agent.log"
        self.proc = None

    def start(self) -> None:
        addresses = ",".join(f"127.0.0.1:{port}" for port in self.ports)
        self.launch([*cronfile_command(), "agent", "--center", addresses, "--name", AGENT,
                     "--token-file", str(self.token_file), "--state", str(self.state),
                     "--backoff-max", "0.5"], dict(os.environ))

    def term(self) -> int | None:
        try:
            return int(json.loads((self.state / "term.json").read_text())["term"])
        except FileNotFoundError:
            return None


def test_agent_on_two_ha_centers_follows_the_new_leaders_term_and_keeps_it(
        pg: PgServer, tmp_path: Path) -> None:
    dsn = pg.new_database()
    marks = tmp_path / "marks"
    schedule = (
        "apiVersion: cronfile/v1\n"
        f"agents:\n  {AGENT}: {{labels: {{role: web}}}}\n"
        "jobs:\n  tick:\n    schedule: \"*/1 * * * * *\"\n"
        f"    targets: {{agents: [{AGENT}]}}\n"
        f"    command: \"echo $CRONFILE_SCHEDULED_AT $CRONFILE_RUN_ID >> {marks}\"\n"
    )
    a, b = (HaFleetCenter(tmp_path / n, dsn, n) for n in ("a", "b"))
    for c in (a, b):
        c.write("jobs.yaml", schedule)
    stale = ThreadedReplica()
    agent = MultiCenterAgent(tmp_path, a.token_file, a.port, b.port, stale.replica.hub.port)
    try:
        a.start()
        a.wait_events(lambda _es: a.leads(), 10, "a leads")
        b.start()
        agent.start()
        a.wait_connected(AGENT, agent=None)
        b.wait_connected(AGENT, agent=None)  # a standby accepts agents
        standby = b.status()
        assert standby["center"]["role"] == "standby"
        assert [x["name"] for x in standby["agents"] if x.get("connected")] == [AGENT]
        a.wait_runs(lambda rs: len(finished(rs, "tick", "succeeded")) >= 2, 15, "a's runs on the agent")
        assert {r["agent"] for r in dispatched(a.runs(), "tick")} == {AGENT}
        assert {r["term"] for r in dispatched(a.runs(), "tick")} == {1}
        assert dispatched(b.runs()) == []
        assert agent.term() == 1

        a.signal(signal.SIGSTOP)
        b.wait_events(lambda _es: b.leads(), LEASE_S + 2 + 3, "b to take over")
        wait_for(lambda: agent.term() == 2, 10, "the agent to persist b's term")
        # the new leader's runs reach the agent and their outcomes come back to it
        b.wait_runs(lambda rs: len(finished(rs, "tick", "succeeded")) >= 3, 15, "b's runs on the agent")
        assert {r["term"] for r in dispatched(b.runs(), "tick")} == {2}

        # a leader that missed the takeover and still orders with term 1
        stale.replica.role = CenterRole(leading=True, term=1)
        outcome = stale.call(stale.replica.run("stale-1", f"echo stale >> {marks}"))
        assert outcome.status.value == "failed" and "stale term" in (outcome.reason or "")
        refusal = b.wait_events(lambda es: [e for e in es
                                            if e.get("event") == "agent_refused_stale_term"],
                                5, "the leader to record the refusal")
        assert {k: refusal[0][k] for k in ("agent", "order", "run_id", "term", "highest_term")} == {
            "agent": AGENT, "order": "run", "run_id": "stale-1", "term": 1, "highest_term": 2}
        with psycopg.connect(dsn) as conn:
            in_pg = wait_for(lambda: conn.execute(
                "SELECT center, body FROM cronfile_records WHERE kind = 'event'"
                " AND body->>'event' = 'agent_refused_stale_term'").fetchall(), 5,
                "the event in PostgreSQL")
        assert [(center, body["run_id"]) for center, body in in_pg] == [("b", "stale-1")]

        a.signal(signal.SIGCONT)
        a.wait_events(lambda es: any(e.get("event") == "leader_lost" for e in es), 5,
                      "a to step down")
        a_dispatched = len(dispatched(a.runs()))
        seen = len(finished(b.runs(), "tick", "succeeded"))
        b.wait_runs(lambda rs: len(finished(rs, "tick", "succeeded")) >= seen + 3, 15, "b keeps running")
        assert len(dispatched(a.runs())) == a_dispatched  # the old leader dispatched nothing

        # the agent restarts: its term is on disk, and it goes on with b
        assert agent.stop() == 0
        assert agent.term() == 2
        agent.start()
        b.wait_connected(AGENT, times=2, agent=None)
        seen = len(finished(b.runs(), "tick", "succeeded"))
        b.wait_runs(lambda rs: len(finished(rs, "tick", "succeeded")) >= seen + 2, 15, "b after the restart")
        assert agent.term() == 2
        assert "highest term seen is now 2" in agent.log.read_text()
    finally:
        agent.stop()
        b.stop()
        a.stop()
        stale.close()
    lines = [line.split() for line in marks.read_text().splitlines() if line.strip()]
    slots = Counter(slot for slot, _run_id in lines)
    assert [s for s, n in slots.items() if n > 1] == []  # no slot ran twice
    sent = {r["run_id"] for c in (a, b) for r in dispatched(c.runs())}
    assert {run_id for _slot, run_id in lines} <= sent  # nothing of the stale one ran
