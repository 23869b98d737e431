"""The fleet end to end: a real ``cronfile center`` listening on 127.0.0.1, real
``cronfile agent`` processes, a real sshd for the SSH fallback. Black-box: every assertion
reads the center's ``runs.jsonl`` / ``events.jsonl`` (bounded polling, never blind sleeps);
6-field schedules fire every second to keep it fast."""

from __future__ import annotations

import json
import random
import signal
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from centerlib import (  # noqa: E402
    dispatched,
    finished,
    kill_marked,
    parse_ts,
    pgrep,
    read_jsonl,
    wait_for,
)
from fleetlib import AgentProc, FleetCenter  # noqa: E402
from sshd import SSHD, running_sshd, sshd_available  # noqa: E402

EVERY_SECOND = '"*/1 * * * * *"'
WHO = '$(basename "$CRONFILE_STATE_DIR" | cut -d- -f2-)'
"""The agent that ran a job: its state directory is ``agent-NAME``."""


class Fleet:
    """One center and its agents, torn down however the test ends."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.center: FleetCenter | None = None
        self.agents: dict[str, AgentProc] = {}
        self.markers: list[str] = []

    def start_center(self, agents: str, jobs: str | None = None, **kw: Any) -> FleetCenter:
        """``agents``: the inventory YAML (the body under ``agents:``), in its own file;
        ``jobs``: the body under ``jobs:`` of the jobs file, when the center starts with it."""
        self.center = FleetCenter(self.root, **kw)
        self.center.write("inventory.yaml", "apiVersion: cronfile/v1\nagents:\n" + agents)
        if jobs is not None:
            self.center.write("jobs.yaml", "apiVersion: cronfile/v1\njobs:\n" + jobs)
        return self.center.start()

    def agent(self, name: str, *extra: str, wait: bool = True) -> AgentProc:
        assert self.center is not None
        agent = AgentProc(self.root, self.center, name, *extra)
        self.agents[name] = agent
        return agent.start(wait=wait)

    def start_agents(self, *names: str) -> None:
        """Start every agent at once, then wait for each to connect (their start-ups overlap)."""
        assert self.center is not None
        started = [self.agent(name, wait=False) for name in names]
        for agent in started:
            self.center.wait_connected(agent.name, 1, agent=agent)

    def jobs(self, body: str, name: str = "jobs.yaml") -> None:
        """Write (or replace) a jobs file and wait until the center applied it."""
        assert self.center is not None
        c = self.center
        before = sum(1 for e in c.events() if e.get("event") == "revision_applied")
        c.write(name, "apiVersion: cronfile/v1\njobs:\n" + body)
        c.wait_events(lambda ev: sum(1 for e in ev if e.get("event") == "revision_applied") > before,
                      10, "the center to apply the new jobs")

    def marker(self) -> str:
        """A unique ``sleep`` duration: pgrep finds exactly this test's processes."""
        m = f"{random.randint(100, 999)}.{random.randint(1000, 9999)}"
        self.markers.append(f"sleep {m}")
        return m

    def close(self) -> None:
        if self.center is not None:
            self.center.stop()
        for m in self.markers:  # first, so that agents do not wait for them
            kill_marked(m)
        for agent in self.agents.values():
            agent.stop()
        for m in self.markers:
            kill_marked(m)


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    f = Fleet(tmp_path)
    try:
        yield f
    finally:
        f.close()


def labelled(*names: str, team: str = "t") -> str:
    return "".join(f"  {n}: {{labels: {{team: {team}}}}}\n" for n in names)


def by_slot(records: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        out[r["scheduled_at"]].append(r)
    return dict(sorted(out.items()))


def complete_slots(records: list[dict[str, Any]], job: str, per_slot: int) -> dict[str, list[dict[str, Any]]]:
    """Slots of ``job`` whose ``per_slot`` finished records are all in."""
    return {s: rs for s, rs in by_slot(finished(records, job)).items() if len(rs) >= per_slot}


def _overlap_skip(record: dict[str, Any]) -> bool:
    """A slot skipped because the job's previous run was still going (a loaded machine)."""
    return record["status"] == "skipped" and "previous run still running" in record["reason"]


def assert_once_per_slot(records: list[dict[str, Any]], job: str) -> None:
    """No (job, slot, agent) was dispatched twice, and each run_id finished at most once
    (a late outcome may supersede a ``lost`` verdict, and only that)."""
    keys = Counter((r["scheduled_at"], r["agent"]) for r in dispatched(records, job))
    assert all(n == 1 for n in keys.values()), keys
    ends = Counter(r["run_id"] for r in finished(records, job) if r.get("supersedes") is None)
    assert all(n == 1 for n in ends.values()), ends


# ---------------------------------------------------------------------- 1. labels -> agent


def test_job_targeting_labels_runs_on_the_connected_agent(fleet: Fleet) -> None:
    c = fleet.start_center(labelled("a1"))
    fleet.agent("a1")
    fleet.jobs(f"""  hello:
    schedule: {EVERY_SECOND}
    command: 'echo "from $(basename "$CRONFILE_STATE_DIR" | cut -d- -f2-)"'
    targets: {{labels: {{team: t}}}}
""")
    def ran(rs: list[dict]) -> list[dict]:  # a stalled loop records a slot missed: not a run
        return [r for r in finished(rs, "hello") if r["status"] != "missed"]

    runs = c.until(lambda rs: len(ran(rs)) >= 2, 8, "two runs on a1")
    for r in ran(runs)[:2]:
        assert r["status"] == "succeeded", r
        assert r["agent"] == "a1"
        assert r["transport"] == "tcp"
        assert r["output_tail"] == "from a1\n"
        assert r["exit_code"] == 0
        assert "route" not in r
    first = ran(runs)[0]
    assert [r["record"] for r in runs if r["run_id"] == first["run_id"]] == \
        ["dispatched", "started", "finished"]
    assert_once_per_slot(runs, "hello")
    assert not finished(runs, status="no_agent")


# ---------------------------------------------------------------------- 2. strategies


@pytest.mark.slow
def test_strategies_all_one_hash_shard(fleet: Fleet) -> None:
    c = fleet.start_center(labelled("a1", "a2", "a3"))
    fleet.start_agents("a1", "a2", "a3")
    target = "{labels: {team: t}, strategy: %s}"
    fleet.jobs(f"""  bcast:
    schedule: {EVERY_SECOND}
    command: 'echo "$(basename "$CRONFILE_STATE_DIR" | cut -d- -f2-)"'
    targets: {target % "all"}
  rr:
    schedule: {EVERY_SECOND}
    command: 'echo "$(basename "$CRONFILE_STATE_DIR" | cut -d- -f2-)"'
    targets: {target % "one"}
  sticky:
    schedule: {EVERY_SECOND}
    command: 'echo "$(basename "$CRONFILE_STATE_DIR" | cut -d- -f2-)"'
    targets: {target % "hash"}
  split:
    schedule: {EVERY_SECOND}
    command: 'echo "{WHO} $CRONFILE_SHARD_INDEX/$CRONFILE_SHARD_TOTAL"'
    targets: {target % "shard"}
""")

    def enough(rs: list[dict[str, Any]]) -> bool:
        return (len(complete_slots(rs, "bcast", 3)) >= 3 and len(complete_slots(rs, "split", 3)) >= 3
                and len(finished(rs, "rr")) >= 6 and len(finished(rs, "sticky")) >= 3)

    runs = c.until(enough, 15, "4 strategy jobs to run 3+ slots")
    everyone = {"a1", "a2", "a3"}

    # all: one run per agent per slot
    for slot, rs in complete_slots(runs, "bcast", 3).items():
        assert len(rs) == 3, (slot, rs)
        assert {r["agent"] for r in rs} == everyone
        assert all(r["status"] == "succeeded" and r["transport"] == "tcp" for r in rs)
        assert {r["output_tail"] for r in rs} == {"a1\n", "a2\n", "a3\n"}
        assert all(r["output_tail"] == f"{r['agent']}\n" for r in rs)

    # one: exactly one run per slot, round-robin over the connected agents
    rr = by_slot(finished(runs, "rr"))
    assert all(len(rs) == 1 for rs in rr.values()), rr
    order = [rs[0]["agent"] for rs in rr.values()]
    assert set(order) == everyone, order
    for i in range(len(order) - 2):
        assert set(order[i:i + 3]) == everyone, f"not round-robin: {order}"
    assert all(rs[0]["output_tail"] == f"{rs[0]['agent']}\n" for rs in rr.values())

    # hash: always the same agent
    sticky = finished(runs, "sticky")
    assert len({r["agent"] for r in sticky}) == 1, [r["agent"] for r in sticky]
    assert all(len(rs) == 1 for rs in by_slot(sticky).values())

    # shard: every agent of one slot gets its index and the total
    for slot, rs in complete_slots(runs, "split", 3).items():
        assert len(rs) == 3, (slot, rs)
        assert sorted(r["output_tail"] for r in rs) == ["a1 0/3\n", "a2 1/3\n", "a3 2/3\n"], rs

    for job in ("bcast", "rr", "sticky", "split"):
        assert_once_per_slot(runs, job)
        assert not finished(runs, job, "no_agent")


@pytest.mark.slow
def test_failover_moves_to_the_next_agent_when_the_first_stops(fleet: Fleet) -> None:
    c = fleet.start_center(labelled("a1", "a2", "a3"))
    fleet.start_agents("a1", "a2", "a3")
    fleet.jobs(f"""  primary:
    schedule: {EVERY_SECOND}
    command: 'echo "$(basename "$CRONFILE_STATE_DIR" | cut -d- -f2-)"'
    targets: {{agents: [a1, a2, a3], strategy: failover}}
""")
    runs = c.until(lambda rs: len(finished(rs, "primary")) >= 3, 8, "3 runs on a1")
    assert {r["agent"] for r in finished(runs, "primary")} == {"a1"}

    fleet.agents["a1"].stop(signal.SIGTERM)
    c.wait_events(lambda ev: c.disconnects("a1") >= 1, 5, "a1 to disconnect")
    gone = parse_ts(next(e["ts"] for e in c.events()
                         if e.get("event") == "agent_disconnected" and e.get("agent") == "a1"))
    assert gone is not None

    def after(rs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [r for r in finished(rs, "primary")
                if (parse_ts(r["scheduled_at"]) or 0) > gone + 0.5]

    runs = c.until(lambda rs: len(after(rs)) >= 3, 8, "3 runs after a1 stopped")
    for r in after(runs):
        assert (r["agent"], r["status"], r["output_tail"]) == ("a2", "succeeded", "a2\n"), r
    assert all(len(rs) == 1 for rs in by_slot(dispatched(runs, "primary")).values())
    assert_once_per_slot(runs, "primary")
    assert {r["status"] for r in finished(runs, "primary")} == {"succeeded"}


# ---------------------------------------------------------------------- 3. no agent


@pytest.mark.slow
def test_no_matching_agent_is_recorded_then_runs_when_it_connects(fleet: Fleet) -> None:
    c = fleet.start_center(labelled("a1"), jobs=f"""  lonely:
    schedule: {EVERY_SECOND}
    command: 'echo "$(basename "$CRONFILE_STATE_DIR" | cut -d- -f2-)"'
    targets: {{labels: {{team: t}}}}
""")
    runs = c.until(lambda rs: len(finished(rs, "lonely", "no_agent")) >= 2, 6, "no_agent records")
    for r in finished(runs, "lonely", "no_agent")[:2]:
        assert r["reason"] == "no connected agent matches targets (team=t)", r
        assert r["exit_code"] is None and r["started_at"] is None
    assert not dispatched(runs, "lonely")

    fleet.agent("a1")
    runs = c.until(lambda rs: len(finished(rs, "lonely", "succeeded")) >= 2, 6, "runs on a1")
    for r in finished(runs, "lonely", "succeeded"):
        assert (r["agent"], r["transport"], r["output_tail"]) == ("a1", "tcp", "a1\n")
    # a slot is either no_agent or dispatched, never both
    skipped = {r["scheduled_at"] for r in finished(runs, "lonely", "no_agent")}
    ran = {r["scheduled_at"] for r in dispatched(runs, "lonely")}
    assert not skipped & ran
    assert_once_per_slot(runs, "lonely")


# ---------------------------------------------------------------------- 4. lost


@pytest.mark.slow
def test_sigkilled_agent_mid_run_is_lost_after_the_lease(fleet: Fleet) -> None:
    c = fleet.start_center(labelled("a1", "a2"), lease=2.0)
    fleet.start_agents("a1", "a2")
    m = fleet.marker()
    fleet.jobs(f"""  long:
    schedule: '*/2 * * * * *'
    command: ['sleep', '{m}']
    concurrency: allow
    targets: {{agents: [a1, a2], strategy: failover}}
  quick:
    schedule: {EVERY_SECOND}
    command: 'echo "$(basename "$CRONFILE_STATE_DIR" | cut -d- -f2-)"'
    targets: {{agents: [a1, a2], strategy: failover}}
""")
    runs = c.until(lambda rs: [r for r in rs if r.get("record") == "started" and r["job"] == "long"],
                   6, "the long job to start on a1")
    victim = next(r for r in runs if r.get("record") == "started" and r["job"] == "long")
    assert victim["agent"] == "a1"
    wait_for(lambda: pgrep(f"sleep {m}"), 5, "the long job's process")
    fleet.agents["a1"].kill()
    killed_at = time.time()

    def lost(rs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [r for r in finished(rs, "long", "lost") if r["run_id"] == victim["run_id"]]

    runs = c.until(lost, 8, "the run to be recorded lost")
    record = lost(runs)[0]
    assert parse_ts(record["ts"]) >= killed_at + 2.0 - 0.3, "recorded lost before the lease"
    assert record["agent"] == "a1" and record["transport"] == "tcp"
    assert record["exit_code"] is None
    assert record["reason"] == "agent a1 was away for more than 2s", record

    # later slots proceed on a2 while a1 is away
    runs = c.until(lambda rs: any(r["agent"] == "a2" for r in finished(rs, "quick", "succeeded")),
                   6, "quick to run on a2")
    assert any(r["agent"] == "a2" for r in dispatched(runs, "long"))

    # and on a1 again once it is back (failover prefers the first declared)
    back = time.time()
    fleet.agent("a1")
    runs = c.until(lambda rs: any(r["agent"] == "a1" and (parse_ts(r["scheduled_at"]) or 0) > back
                                  for r in finished(rs, "quick", "succeeded")), 8, "quick back on a1")
    for job in ("long", "quick"):
        assert_once_per_slot(runs, job)
    # the restarted agent reports the run it lost track of as lost: nothing new, so the
    # center records nothing more for it (one final record per run_id)
    wait_for(lambda: victim["run_id"] in fleet.agents["a1"].log_text(), 5,
             "a1 to report the run it lost on restart")
    assert [(r["record"], r.get("status")) for r in c.runs() if r["run_id"] == victim["run_id"]] == \
        [("dispatched", None), ("started", None), ("finished", "lost")]
    assert len([r for r in finished(runs) if r["run_id"] == victim["run_id"]
                and r.get("supersedes") is None]) == 1


# ---------------------------------------------------------------------- 5. once per slot


def _cut_mid_run(fleet: Fleet, lease: float, wait_lost: bool) -> tuple[str, list[dict[str, Any]]]:
    """Start a 3 s run on a1, SIGSTOP the agent until the hub drops it (3 x 0.5 s heartbeat)
    -- and, with ``wait_lost``, until the lease expired -- then SIGCONT it and wait for the
    run's real outcome. Returns the run_id and all its records."""
    c = fleet.start_center(labelled("a1"), heartbeat=0.5, lease=lease)
    agent = fleet.agent("a1")
    m = f"3.{random.randint(1000, 9999)}"
    fleet.markers.append(f"sleep {m}")
    fleet.jobs(f"""  cut:
    schedule: {EVERY_SECOND}
    command: 'sleep {m}; echo "done on $(basename "$CRONFILE_STATE_DIR" | cut -d- -f2-)"'
    targets: {{agents: [a1]}}
""")
    runs = c.until(lambda rs: [r for r in rs if r.get("record") == "started" and r["job"] == "cut"],
                   6, "the run to start")
    run_id = next(r for r in runs if r.get("record") == "started" and r["job"] == "cut")["run_id"]

    def mine(rs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [r for r in rs if r.get("run_id") == run_id]

    agent.signal(signal.SIGSTOP)
    try:
        c.wait_events(lambda ev: c.disconnects("a1") >= 1, 6, "the hub to drop the stopped agent")
        if wait_lost:
            c.until(lambda rs: finished(mine(rs), status="lost"), 6, "the run to be recorded lost")
    finally:
        agent.signal(signal.SIGCONT)
    c.wait_connected("a1", 2)
    want = 2 if wait_lost else 1
    runs = c.until(lambda rs: len(finished(mine(rs))) >= want, 12, "the outcome of the cut run")
    records = mine(runs)
    slot = records[0]["scheduled_at"]
    assert len([r for r in dispatched(runs, "cut") if r["scheduled_at"] == slot]) == 1
    assert_once_per_slot(runs, "cut")
    # The agent re-sends an outcome until the center acks it; once the ack is in its outbox
    # (and it did not reconnect again) no further copy can come.
    outbox = fleet.agents["a1"].state / "outbox.jsonl"
    wait_for(lambda: any(r.get("acked") == run_id for r in read_jsonl(outbox)), 10,
             "the agent to record the center's ack")
    assert c.connects("a1") == 2
    return run_id, mine(c.runs())


@pytest.mark.slow
def test_connection_cut_mid_run_delivers_the_outcome_once(fleet: Fleet) -> None:
    _, records = _cut_mid_run(fleet, lease=10.0, wait_lost=False)
    assert [r["record"] for r in records] == ["dispatched", "started", "finished"], records
    end = records[-1]
    assert (end["status"], end["exit_code"], end["agent"], end["transport"]) == \
        ("succeeded", 0, "a1", "tcp"), end
    assert end["output_tail"] == "done on a1\n"
    assert "supersedes" not in end


@pytest.mark.slow
def test_outcome_after_the_lease_supersedes_lost_once(fleet: Fleet) -> None:
    _, records = _cut_mid_run(fleet, lease=0.5, wait_lost=True)
    assert [(r["record"], r.get("status")) for r in records] == \
        [("dispatched", None), ("started", None), ("finished", "lost"), ("finished", "succeeded")], records
    late = records[-1]
    assert late["supersedes"] == "lost"
    assert (late["exit_code"], late["agent"], late["transport"]) == (0, "a1", "tcp"), late
    assert late["output_tail"] == "done on a1\n"
    assert late["job"] == "cut" and late["scheduled_at"] == records[0]["scheduled_at"]


# ---------------------------------------------------------------------- 6. run_as


def test_run_as_not_allowed_on_the_agent_fails(fleet: Fleet) -> None:
    c = fleet.start_center(labelled("a1"))
    fleet.agent("a1")
    fleet.jobs(f"""  as-nobody:
    schedule: {EVERY_SECOND}
    command: ['id', '-un']
    run_as: nobody
    targets: {{agents: [a1]}}
""")
    runs = c.until(lambda rs: finished(rs, "as-nobody"), 6, "the refused run")
    r = finished(runs, "as-nobody")[0]
    assert (r["status"], r["agent"], r["transport"]) == ("failed", "a1", "tcp"), r
    assert "not allowed" in r["reason"] and "nobody" in r["reason"], r
    assert r["exit_code"] is None
    assert r["output_tail"] == ""


# ---------------------------------------------------------------------- 7. daemons on agents


def test_daemon_replicas_on_an_agent_restart_and_stop_on_removal(fleet: Fleet) -> None:
    fleet.start_center(labelled("a1"))
    fleet.agent("a1")
    m = fleet.marker()
    marker = f"sleep {m}"
    fleet.jobs(f"""  keeper:
    kind: daemon
    command: ['sleep', '{m}']
    replicas: 2
    restart: {{policy: always, backoff: 0.2s}}
    targets: {{labels: {{team: t}}}}
""")
    pids = wait_for(lambda: (p := pgrep(marker)) and len(p) == 2 and p, 8, "two replicas on a1")
    agent_pid = fleet.agents["a1"].pid
    for pid in pids:  # the agent runs them, not the center
        parent = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        assert parent == agent_pid or _ancestor(pid, agent_pid), (pid, parent)

    crashed = pids[0]
    import os
    os.kill(crashed, signal.SIGKILL)
    new = wait_for(lambda: (p := pgrep(marker)) and len(p) == 2 and crashed not in p and p,
                   8, "the crashed replica to be restarted")
    assert pids[1] in new

    fleet.jobs("  {}\n".replace("  {}", "  placeholder:\n    schedule: '0 0 1 1 *'\n    command: 'true'\n"))
    wait_for(lambda: not pgrep(marker), 8, "the removed daemon's replicas to stop")


def _ancestor(pid: int, ancestor: int) -> bool:
    for _ in range(10):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return False
        pid = int(stat.rsplit(")", 1)[1].split()[1])
        if pid == ancestor:
            return True
        if pid <= 1:
            return False
    return False


# ---------------------------------------------------------------------- 8. SSH fallback


@pytest.mark.slow
def test_ssh_fallback_host_keys_transport_and_status(fleet: Fleet, tmp_path: Path) -> None:
    if not sshd_available():
        pytest.skip(f"!!! {SSHD} is not installed: the SSH fallback fleet test is SKIPPED. "
                    "Install openssh-server to run it. !!!")
    with running_sshd(tmp_path / "sshd") as sshd:
        wrong = tmp_path / "wrong_known_hosts"
        wrong.write_text(sshd.other_host_key_line())
        ssh = f"{{host: 127.0.0.1, port: {sshd.port}, user: {sshd.user}, key: {sshd.key}, known_hosts: %s}}"
        c = fleet.start_center(
            f"  s1: {{labels: {{team: s}}, ssh: {ssh % sshd.known_hosts}}}\n"
            f"  s2: {{labels: {{team: s}}, ssh: {ssh % wrong}}}\n", jobs=f"""  via-auto:
    schedule: {EVERY_SECOND}
    command: 'echo "hello from $(hostname)"; echo "agent=$(basename "$CRONFILE_STATE_DIR" | cut -d- -f2-)"'
    targets: {{agents: [s1], transport: auto}}
  bad-key:
    schedule: {EVERY_SECOND}
    command: 'true'
    targets: {{agents: [s2], transport: auto}}
  tcp-only:
    schedule: {EVERY_SECOND}
    command: 'true'
    targets: {{agents: [s1], transport: tcp}}
""")
        def ran(rs: list[dict[str, Any]]) -> list[dict[str, Any]]:
            # A loaded machine can make an SSH run outlast its 1 s slot: the next slot is then
            # skipped (concurrency: forbid), which says nothing about the transport.
            return [r for r in finished(rs, "via-auto") if not _overlap_skip(r)]

        runs = c.until(lambda rs: len(ran(rs)) >= 2 and finished(rs, "bad-key")
                       and finished(rs, "tcp-only"), 15, "ssh, bad-key and tcp-only records")
        import socket
        for r in ran(runs)[:2]:
            assert (r["status"], r["agent"], r["transport"]) == ("succeeded", "s1", "ssh"), r
            assert r["output_tail"] == f"hello from {socket.gethostname()}\nagent=\n", r
            assert r["route"] == "agent not connected; declared ssh:", r
        bad = finished(runs, "bad-key")[0]
        assert (bad["status"], bad["agent"], bad["transport"]) == ("failed", "s2", "ssh"), bad
        assert f"host key for 127.0.0.1:{sshd.port} CHANGED" in bad["reason"], bad
        assert str(wrong) in bad["reason"]
        tcp = finished(runs, "tcp-only")[0]
        assert tcp["status"] == "no_agent", tcp
        assert tcp["reason"] == "no connected agent matches targets (s1)", tcp
        assert not dispatched(runs, "tcp-only")

        fleet.agent("s1")
        joined = time.time()

        def after(rs: list[dict[str, Any]], job: str) -> list[dict[str, Any]]:
            return [r for r in finished(rs, job) if (parse_ts(r["scheduled_at"]) or 0) > joined
                    and not _overlap_skip(r)]

        runs = c.until(lambda rs: len(after(rs, "via-auto")) >= 2 and after(rs, "tcp-only"),
                       8, "runs over tcp once the agent is connected")
        for r in after(runs, "via-auto"):
            assert (r["status"], r["transport"], r["output_tail"]) == \
                ("succeeded", "tcp", f"hello from {socket.gethostname()}\nagent=s1\n"), r
            assert "route" not in r
        assert {(r["status"], r["transport"]) for r in after(runs, "tcp-only")} == {("succeeded", "tcp")}
        for job in ("via-auto", "bad-key", "tcp-only"):
            assert_once_per_slot(runs, job)

        status = c.cli("status", "--format", "json")
        assert status.returncode == 0, status.stderr
        jobs = {j["job"]: j for j in json.loads(status.stdout)["jobs"]}
        assert jobs["via-auto"]["last_transport"] == "tcp"
        assert jobs["via-auto"]["last_agent"] == "s1"
        assert jobs["via-auto"]["last_route"] is None
        assert jobs["tcp-only"]["last_transport"] == "tcp"
        assert (jobs["bad-key"]["last_transport"], jobs["bad-key"]["last_status"]) == ("ssh", "failed")
        assert jobs["bad-key"]["last_route"] == "agent not connected; declared ssh:"
        fleet.close()  # stop the center before sshd goes away
