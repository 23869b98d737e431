"""Two real ``cronfile center --ha --listen`` processes on a real PostgreSQL and one real
``cronfile agent --center A,B`` (SPEC §9, fencing): the agent holds a connection to each,
a standby accepts it and shows it, the leader's runs carry its term, and after the leader is
frozen past its lease (SIGSTOP) the new leader's higher term is persisted by the agent, which
then delivers outcomes to the new leader; the old one, resumed (SIGCONT), dispatches nothing;
the persisted term survives an agent restart. (A stale leader that still sends orders is
forced in tests/test_fencing.py, where the test decides what each center believes.)"""

from __future__ import annotations

import json
import os
import signal
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from centerlib import ChildProc, cli, cronfile_command, dispatched, finished, wait_for  # noqa: E402
from fleetlib import FleetCenter  # noqa: E402
from pglib import PgServer, running_postgres, skip_reason  # noqa: E402

_reason = skip_reason()
pytestmark = [pytest.mark.skipif(_reason is not None, reason=_reason or ""), pytest.mark.slow]

LEASE_S, DEADLINE_S = 3.0, 2.0
AGENT = "web-1"


@pytest.fixture(scope="module")
def pg() -> Iterator[PgServer]:
    with running_postgres() as server:
        yield server


class HaFleetCenter(FleetCenter):
    """An HA replica that also listens for agents."""

    def __init__(self, root: Path, dsn: str, name: str) -> None:
        super().__init__(root)
        self.dsn, self.name = dsn, name

    def argv(self) -> list[str]:
        return [*super().argv(), "--ha", self.dsn, "--name", self.name,
                "--ha-lease", f"{LEASE_S:g}s", "--ha-renew-deadline", f"{DEADLINE_S:g}s"]

    def status(self) -> dict[str, Any]:
        out = cli("status", "--format", "json", state=self.state)
        assert out.returncode == 0, out.stderr
        return dict(json.loads(out.stdout))

    def leads(self) -> bool:
        return any(e.get("event") == "leader_acquired" for e in self.events())


class MultiCenterAgent(ChildProc):
    def __init__(self, root: Path, *centers: HaFleetCenter) -> None:
        self.centers = centers
        self.state = root / "agent-state"
        self.log = root / "agent.log"
        self.proc = None

    def start(self) -> None:
        addresses = ",".join(f"127.0.0.1:{c.port}" for c in self.centers)
        self.launch([*cronfile_command(), "agent", "--center", addresses, "--name", AGENT,
                     "--token-file", str(self.centers[0].token_file), "--state", str(self.state),
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
    agent = MultiCenterAgent(tmp_path, a, b)
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
    lines = [line.split() for line in marks.read_text().splitlines() if line.strip()]
    slots = Counter(slot for slot, _run_id in lines)
    assert [s for s, n in slots.items() if n > 1] == []  # no slot ran twice
    sent = {r["run_id"] for c in (a, b) for r in dispatched(c.runs())}
    assert {run_id for _slot, run_id in lines} <= sent
