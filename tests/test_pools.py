"""Pools (``pools:``, job ``pool:``) and agent caps (inventory ``max_running:``): the center
never has more runs of a pool (or on an agent) in flight than its cap; the others wait,
oldest scheduled first, up to their ``starting_deadline``, then are recorded ``missed``."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from centerlib import CenterProc, finished, wait_for
from conftest import cronfile_command

from cronfile.center.pools import PlaceGate
from cronfile.center.routing import Target
from cronfile.center.scheduler import StartRun
from cronfile.cli.plan import run_plan
from cronfile.schedules.loader import load_schedules
from cronfile.schedules.model import DEFAULT_POOL_WAIT_S, Job, Pool
from cronfile.state.applied import read_applied, write_applied

POOLS = """\
apiVersion: cronfile/v1
pools:
  db: {max_running: 2}
agents:
  web1: {labels: {role: web}, max_running: 3}
"""
JOBS = """\
apiVersion: cronfile/v1
defaults:
  pool: db
jobs:
  dump:
    schedule: "0 3 * * *"
    command: x
  vacuum:
    schedule: "0 4 * * *"
    command: x
    pool: db
"""


def write(root: Path, files: dict[str, str]) -> Path:
    schedules = root / "schedules"
    schedules.mkdir(exist_ok=True)
    for name, text in files.items():
        (schedules / name).write_text(text)
    return schedules


def validate(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*cronfile_command(), "validate"], cwd=root, capture_output=True,
                          text=True, timeout=60)


# ---------------------------------------------------------------------- loader


def test_a_pool_in_one_file_serves_jobs_in_another_and_agents_carry_their_cap(tmp_path: Path) -> None:
    result = load_schedules(write(tmp_path, {"pools.yaml": POOLS, "jobs.yaml": JOBS}))
    assert result.state is not None, [p.render() for p in result.problems]
    assert result.state.jobs["dump"].pool == Pool("db", 2)  # from the file's defaults
    assert result.state.jobs["vacuum"].pool == Pool("db", 2)
    assert result.state.agents["web1"].max_running == 3


def test_a_changed_cap_changes_the_jobs_of_the_pool_in_the_plan(tmp_path: Path) -> None:
    schedules = write(tmp_path, {"pools.yaml": POOLS, "jobs.yaml": JOBS})
    applied = load_schedules(schedules).state
    assert applied is not None
    state_dir = tmp_path / "state"
    write_applied(state_dir, applied)
    # read back from the stored files, the pools are resolved as the loader does
    restored = read_applied(state_dir)
    assert restored is not None and restored.jobs["dump"].pool == Pool("db", 2)
    (schedules / "pools.yaml").write_text(POOLS.replace("max_running: 2", "max_running: 5"))
    out, code = run_plan(schedules, state_dir=state_dir)
    assert code == 0, out
    assert "    pool.max_running: 2 → 5" in out.splitlines(), out
    assert out.splitlines()[-1] == "Plan: 0 to add, 2 to change, 0 to remove.", out


@pytest.mark.parametrize("files, expected", [
    ({"p.yaml": POOLS, "j.yaml": JOBS.replace("    pool: db", "    pool: dbb")},
     "schedules/j.yaml:11:5: error: jobs.vacuum.pool: no pool named 'dbb' in the pools: of "
     "any file (did you mean 'db'?)"),
    ({"p.yaml": POOLS, "q.yaml": POOLS.replace("web1", "web2")},
     "schedules/p.yaml:3:3: error: pools.db: pool 'db' is also defined at schedules/q.yaml:3"),
    ({"p.yaml": POOLS.replace("max_running: 2", "max_running: 0"), "j.yaml": JOBS},
     "schedules/p.yaml:3"),
    ({"p.yaml": POOLS.replace("max_running: 3", "max_running: many"), "j.yaml": JOBS},
     "schedules/p.yaml:5"),
])
def test_pool_mistakes_are_line_exact(tmp_path: Path, files: dict[str, str], expected: str) -> None:
    write(tmp_path, files)
    done = validate(tmp_path)
    assert done.returncode == 1, done.stdout
    assert any(line.startswith(expected) for line in done.stdout.splitlines()), done.stdout
    assert "Traceback" not in done.stdout + done.stderr


# ---------------------------------------------------------------------- the gate, fake clock


def start(job: Job, slot: float, agent: str = "local", reason: str = "schedule") -> tuple[StartRun, Target]:
    return StartRun(job, slot, reason=reason), Target(agent, None, "local")


def test_waiting_starts_get_places_oldest_scheduled_first() -> None:
    pool = Pool("db", 1)
    a, b, c = (Job(name, "x", pool=pool) for name in "abc")
    gate = PlaceGate()
    assert gate.take(start(a, 100.0))
    assert not gate.take(start(b, 110.0))
    # arrival order is c (slot 105) after b (slot 110): the older slot goes first
    gate.wait(start(b, 110.0), 110.0)
    gate.wait(start(c, 105.0), 111.0)
    assert [w.job.name for w in gate.release(a, "local")] == ["c"]
    assert gate.pool_use == {"db": 1}
    assert [w.job.name for w in gate.release(c, "local")] == ["b"]
    assert gate.release(b, "local") == [] and gate.pool_use == {}


def test_a_full_pool_does_not_hold_back_a_start_of_another_pool() -> None:
    db, web = Pool("db", 1), Pool("web", 1)
    d1, d2, w1, w2 = Job("d1", "x", pool=db), Job("d2", "x", pool=db), \
        Job("w1", "x", pool=web), Job("w2", "x", pool=web)
    gate = PlaceGate()
    assert gate.take(start(d1, 1.0)) and gate.take(start(w1, 1.0))
    gate.wait(start(d2, 2.0), 2.0)  # older, but its pool stays full
    gate.wait(start(w2, 3.0), 3.0)
    assert [w.job.name for w in gate.release(w1, "local")] == ["w2"]
    assert gate.waiting_count() == 1


def test_an_agent_cap_counts_runs_of_every_job_on_that_agent() -> None:
    gate = PlaceGate()
    gate.set_agent_caps({"web1": 2})
    one, two, three = (Job(n, "x") for n in ("one", "two", "three"))
    assert not gate.needs_place(one, "web2")  # uncapped agent, no pool: no bookkeeping
    assert gate.needs_place(one, "web1")
    assert gate.take(start(one, 1.0, "web1")) and gate.take(start(two, 1.0, "web1"))
    assert not gate.take(start(three, 1.0, "web1"))
    gate.wait(start(three, 1.0, "web1"), 1.0)
    assert [w.job.name for w in gate.release(two, "web1")] == ["three"]
    assert gate.agent_use == {"web1": 2}


def test_a_waiting_start_expires_at_its_starting_deadline_or_after_an_hour() -> None:
    pool = Pool("db", 1)
    hog = Job("hog", "x", pool=pool)
    quick = Job("quick", "x", pool=pool, starting_deadline_s=30.0)
    patient = Job("patient", "x", pool=pool)
    gate = PlaceGate()
    assert gate.take(start(hog, 0.0))
    gate.wait(start(quick, 100.0), 105.0)  # a scheduled slot: from its scheduled time
    gate.wait(start(patient, 100.0, reason="backfill"), 105.0)  # anything else: from now
    assert gate.expired(130.0) == []
    [late] = gate.expired(130.5)
    assert (late.job.name, late.deadline, late.wait_s) == ("quick", 130.0, 30.0)
    assert gate.expired(105.0 + DEFAULT_POOL_WAIT_S) == []
    [late] = gate.expired(105.0 + DEFAULT_POOL_WAIT_S + 0.1)
    assert late.job.name == "patient"
    assert gate.release(hog, "local") == []  # expired starts never get a place


def test_the_snapshot_shows_use_and_queue_per_pool() -> None:
    pool = Pool("db", 1)
    a, b = Job("a", "x", pool=pool), Job("b", "x", pool=pool)
    gate = PlaceGate()
    gate.take(start(a, 1.0))
    gate.wait(start(b, 2.0), 2.5)
    snap = gate.snapshot({"db": 1, "idle": 4}, 3.0)
    assert snap["pools"] == {
        "db": {"max_running": 1, "running": 1, "waiting": 1, "oldest_waiting_since": 2.5,
               "waiting_jobs": ["b"]},
        "idle": {"max_running": 4, "running": 0, "waiting": 0, "oldest_waiting_since": None,
                 "waiting_jobs": []},
    }


# ---------------------------------------------------------------------- a real center


def max_overlap(marks: Path) -> tuple[int, int]:
    """(the most runs in flight at one instant, runs seen) from the ``s``/``e`` lines the
    jobs append with nanosecond wall times; a start at the same instant as an end counts
    as overlapping (the strict reading)."""
    events = []
    for line in marks.read_text().splitlines():
        kind, ns = line.split()[:2]
        events.append((int(ns), 0 if kind == "s" else 1))
    level = peak = 0
    for _, kind in sorted(events):
        level += 1 if kind == 0 else -1
        peak = max(peak, level)
    return peak, sum(1 for _, kind in events if kind == 0)


def marking(marks: Path, seconds: float) -> str:
    return (f"echo \"s $(date +%s%N)\" >> {marks}; sleep {seconds}; "
            f"echo \"e $(date +%s%N)\" >> {marks}")


def test_a_real_center_never_runs_more_of_a_pool_than_its_cap(tmp_path: Path) -> None:
    marks = tmp_path / "marks"
    jobs = "".join(f"""\
  w{i}:
    schedule: "* * * * * *"
    command: '{marking(marks, 0.6)}'
    pool: db
""" for i in range(5))
    c = CenterProc(tmp_path)
    c.write("p.yaml", f"""\
apiVersion: cronfile/v1
pools:
  db: {{max_running: 2}}
jobs:
{jobs}""")
    try:
        c.start()
        c.wait_runs(lambda rs: len(finished(rs, status="succeeded")) >= 14, 60,
                    "fourteen runs of the pool")
        status = wait_for(lambda: _status_pools(c), 15, "status to show the pool in use")
    finally:
        assert c.stop() == 0
    peak, runs = max_overlap(marks)
    assert runs >= 14
    assert peak == 2, f"the pool of 2 had {peak} runs at once"
    assert status["db"]["max_running"] == 2 and status["db"]["running"] >= 1
    # demand (5 a second) is above what the pool serves: starts waited, and a job with a
    # start waiting skipped its next slots as for a running run (concurrency: forbid)
    records = c.runs()
    ok = finished(records, status="succeeded")
    assert any(r for r in ok if float(r["duration_s"]) > 0 and _late(r) > 0.5), \
        "no run waited for a place"
    skipped = finished(records, status="skipped")
    assert skipped and all("concurrency: forbid" in r["reason"] for r in skipped)


def _late(record: dict[str, object]) -> float:
    from centerlib import parse_ts
    started, scheduled = parse_ts(str(record["started_at"])), parse_ts(str(record["scheduled_at"]))
    assert started is not None and scheduled is not None
    return started - scheduled


def _status_pools(c: CenterProc) -> dict[str, dict[str, int]] | None:
    done = c.cli("status", "--format", "json")
    assert done.returncode == 0, done.stderr
    pools: dict[str, dict[str, int]] = json.loads(done.stdout)["pools"]
    return pools if pools.get("db", {}).get("running") else None


def test_a_start_that_waits_past_its_starting_deadline_is_recorded_missed(tmp_path: Path) -> None:
    c = CenterProc(tmp_path)
    c.write("p.yaml", """\
apiVersion: cronfile/v1
pools:
  one: {max_running: 1}
jobs:
  hog:
    schedule: "* * * * * *"
    command: "sleep 3"
    pool: one
  late:
    schedule: "* * * * * *"
    command: "true"
    pool: one
    starting_deadline: 1s
""")
    try:
        c.start()
        missed = c.wait_runs(lambda rs: [r for r in rs if r.get("job") == "late"
                                         and r.get("status") == "missed"], 30,
                             "a missed slot of the job that waited")
        text = c.cli("status").stdout
    finally:
        assert c.stop() == 0
    assert missed[0]["reason"].startswith(
        "no place in pool one (max_running 1) within starting_deadline (1s); waited since ")
    assert "pool one" in text
    # the hog never overlapped with the late job: one place, one run
    runs = sorted(finished(c.runs()), key=lambda r: r.get("started_at") or "")
    started = [r for r in runs if r.get("started_at")]
    for before, after in zip(started, started[1:], strict=False):
        assert after["started_at"] >= before["finished_at"], (before, after)


def test_a_real_agent_never_runs_more_than_its_max_running(tmp_path: Path) -> None:
    from fleetlib import AgentProc, FleetCenter

    marks = tmp_path / "marks"
    jobs = "".join(f"""\
  on-a1-{i}:
    schedule: "* * * * * *"
    command: '{marking(marks, 0.6)}'
    targets: {{agents: [a1]}}
""" for i in range(4))
    c = FleetCenter(tmp_path)
    c.write("fleet.yaml", f"""\
apiVersion: cronfile/v1
agents:
  a1: {{labels: {{team: t}}, max_running: 2}}
jobs:
{jobs}""")
    agent = AgentProc(tmp_path, c, "a1")
    try:
        c.start()
        agent.start()
        c.wait_runs(lambda rs: len([r for r in finished(rs, status="succeeded")
                                    if r.get("agent") == "a1"]) >= 10, 60, "ten runs on a1")
        caps = wait_for(lambda: _status_caps(c), 15, "status to show the agent's cap")
    finally:
        agent.stop()
        assert c.stop() == 0
    peak, runs = max_overlap(marks)
    assert runs >= 10
    assert peak == 2, f"agent a1 (max_running 2) had {peak} runs at once"
    assert caps["a1"]["max_running"] == 2


def _status_caps(c: CenterProc) -> dict[str, dict[str, int]] | None:
    done = c.cli("status", "--format", "json")
    assert done.returncode == 0, done.stderr
    caps: dict[str, dict[str, int]] = json.loads(done.stdout)["agent_caps"]
    return caps if caps.get("a1", {}).get("running") else None


def test_a_long_queue_drains_one_start_per_release_in_slot_order() -> None:
    pool = Pool("db", 1)
    jobs = [Job(f"j{i}", "x", pool=pool) for i in range(5001)]
    gate = PlaceGate()
    assert gate.take(start(jobs[0], 0.0))
    for i in range(5000, 0, -1):  # arriving newest first
        gate.wait(start(jobs[i], float(i)), 0.0)
    order = []
    running = jobs[0]
    for _ in range(5000):
        [got] = gate.release(running, "local")
        order.append(got.scheduled_at)
        running = got.job
    assert order == [float(i) for i in range(1, 5001)]
    assert gate.waiting_count() == 0 and gate.pool_use == {"db": 1}
