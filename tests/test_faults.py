"""Fault injection: SPEC §2/§5's promise held whatever is killed when.

A center and three agents behind a :class:`~faultlib.FaultProxy`, per-second jobs on the
center's own host and on every agent (``strategy: all``), and a seeded random sequence of
faults: SIGKILL of the center (and crash loops faster than a heartbeat), SIGKILL/SIGSTOP of
agents, cut, blackholed and stalled links, torn ledger tails. Afterwards the checker reads
the ledger and the jobs' marks: every slot of every target in the window has exactly one
final record, no slot ran twice, no ``succeeded`` without an execution.

Bounded by default (``CRONFILE_FAULT_SECONDS``, 20 s of faults); set it to e.g. 180 for a
long run, and ``CRONFILE_FAULT_SEED`` to replay a sequence (a failure prints its seed).
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from centerlib import finished, parse_ts, read_jsonl, wait_for  # noqa: E402
from faultlib import FaultRun, check_ledger, mark_command, read_marks  # noqa: E402
from fleetlib import AgentProc, FleetCenter  # noqa: E402
from test_fleet import Fleet  # noqa: E402

AGENTS = ["a1", "a2", "a3"]


def _seconds() -> float:
    return float(os.environ.get("CRONFILE_FAULT_SECONDS", "20"))


def _seed() -> int:
    given = os.environ.get("CRONFILE_FAULT_SEED")
    return int(given) if given else random.SystemRandom().randrange(1 << 30)


def _schedules(marks: Path) -> tuple[str, str]:
    inventory = "apiVersion: cronfile/v1\nagents:\n" + "".join(
        f"  {name}: {{labels: {{pool: faults}}}}\n" for name in AGENTS)
    command = mark_command(marks).replace("'", "''")
    jobs = f"""\
apiVersion: cronfile/v1
jobs:
  loc:
    schedule: "*/1 * * * * *"
    command: '{command}'
  fan:
    schedule: "*/1 * * * * *"
    command: '{command}'
    targets: {{agents: [{", ".join(AGENTS)}], strategy: all}}
"""
    return inventory, jobs


def test_every_slot_of_every_target_has_exactly_one_final_record(tmp_path: Path) -> None:
    seed = _seed()
    marks = tmp_path / "marks"
    fleet = FaultRun(tmp_path, seed, AGENTS)
    inventory, jobs = _schedules(marks)
    fleet.center.write("inventory.yaml", inventory)
    fleet.center.write("jobs.yaml", jobs)
    targets = {"loc": ["local"], "fan": AGENTS}
    try:
        fleet.start()
        fleet.heal()
        begin = time.time() + 1.0
        end_faults = begin + _seconds()
        while time.time() < end_faults:
            fleet.step()
        fleet.heal()
        end = time.time()
        fleet.window_closed(end + 2.0, targets)
    finally:
        fleet.close()
    runs = fleet.center.runs()  # with what the last center recorded as it stopped
    verdict = check_ledger(runs, read_marks(marks), targets, (begin, end))
    assert not verdict.problems, f"{verdict.summary()}\n{fleet.describe()}"
    assert verdict.statuses["succeeded"] > 0, verdict.summary()


# --------------------------------------------------------------------------- targeted faults


def _acked(agent: AgentProc) -> set[str]:
    return {str(r["acked"]) for r in read_jsonl(agent.state / "outbox.jsonl") if "acked" in r}


def test_an_outcome_is_acked_only_once_its_record_is_durable(tmp_path: Path) -> None:
    """The agent forgets an outcome once acked: whatever it has acked must be in the
    ledger already. A SIGSTOPped agent holds a dispatch; the other agent's outcomes keep
    coming meanwhile (issue 9, item 19: acked at once, recorded only after the stall)."""
    fleet = Fleet(tmp_path)
    try:
        c = fleet.start_center("  a1: {}\n  a2: {}\n", heartbeat=2.0, lease=30.0, jobs="""\
  fast:
    schedule: "*/1 * * * * *"
    command: "true"
    targets: {agents: [a1]}
  stuck:
    schedule: "*/1 * * * * *"
    command: "true"
    targets: {agents: [a2]}
""")
        a1, a2 = fleet.agent("a1"), fleet.agent("a2")
        c.until(lambda rs: finished(rs, "fast", "succeeded") and finished(rs, "stuck", "succeeded"),
                10, "both jobs to run")
        os.kill(a2.pid, signal.SIGSTOP)
        stopped = time.monotonic()
        seen: set[str] = set()
        while time.monotonic() - stopped < 4.0:  # inside the hub's 3 heartbeats of patience
            acked = _acked(a1)
            recorded = {r["run_id"] for r in finished(c.runs())}
            assert acked <= recorded, f"acked, not recorded: {sorted(acked - recorded)}"
            seen |= acked
            time.sleep(0.02)
        os.kill(a2.pid, signal.SIGCONT)
        before = len(seen)
        wait_for(lambda: len(_acked(a1)) > before + 2, 15, "acks after the stall")
    finally:
        fleet.close()


@contextlib.contextmanager
def small_disk(path: Path, size: str = "512k") -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``path`` (root only; skipped elsewhere)."""
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs (needs root): {done.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill(disk: Path) -> Path:
    """Fill ``disk`` to the last byte; the filler file, to delete to make room again.

    tmpfs allocates whole pages: an append into a file's last, partly used page would still
    succeed, so the files already there are first padded to a page boundary with newlines
    (blank lines, which every JSONL reader here skips)."""
    for path in disk.iterdir():
        if path.is_file():
            with open(path, "ab") as f:
                f.write(b"\n" * (-path.stat().st_size % 4096))
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as f:
        with contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 4096)
        with contextlib.suppress(OSError):
            while True:
                f.write(b"\0")
    return filler


def test_an_agent_with_a_full_disk_tells_the_center_and_the_job_goes_on(tmp_path: Path) -> None:
    """The agent refuses a run it cannot journal (once per slot needs the journal) and says
    so: the center records ``failed`` with the reason, no ``started``; when there is room
    again the job runs again (issue 9, item 21: no word to the center, a false
    ``started``, and under ``forbid`` the job skipped until the lease)."""
    marks = tmp_path / "marks"
    fleet = Fleet(tmp_path)
    with small_disk(tmp_path / "agent-a1") as disk:
        try:
            c = fleet.start_center("  a1: {}\n", lease=60.0, jobs=f"""\
  journal:
    schedule: "*/1 * * * * *"
    command: '{mark_command(marks).replace("'", "''")}'
    targets: {{agents: [a1]}}
""")
            fleet.agent("a1")
            c.until(lambda rs: finished(rs, "journal", "succeeded"), 10, "a first run")
            filler = fill(disk)
            runs = c.until(lambda rs: any("cannot journal" in str(r.get("reason"))
                                          for r in finished(rs, "journal", "failed")),
                           10, "the agent to report that it cannot journal")
            refused = [r for r in finished(runs, "journal", "failed")
                       if "cannot journal" in str(r.get("reason"))]
            assert refused[0]["reason"].startswith("agent a1 cannot journal the run (")
            ids = {r["run_id"] for r in refused}
            assert not [r for r in runs if r["run_id"] in ids and r.get("record") == "started"]
            assert not ids & {m.run_id for m in read_marks(marks)}
            filler.unlink()
            count = len(finished(runs, "journal", "succeeded"))
            c.until(lambda rs: len(finished(rs, "journal", "succeeded")) > count + 1, 10,
                    "the job to run again once there is room")
        finally:
            fleet.close()


def test_all_and_shard_record_no_agent_for_each_unreachable_declared_agent(tmp_path: Path) -> None:
    """SPEC §2: under ``all`` and ``shard`` an unreachable declared agent gets its own
    ``no_agent`` record for every slot (issue 9, item 5: the slots ran on a subset and
    nothing recorded the other agent); shard indices stay those of the whole set."""
    fleet = Fleet(tmp_path)
    try:
        c = fleet.start_center("  a1: {labels: {pool: p}}\n  a2: {labels: {pool: p}}\n", jobs="""\
  fan:
    schedule: "*/1 * * * * *"
    command: "true"
    targets: {labels: {pool: p}, strategy: all}
  split:
    schedule: "*/1 * * * * *"
    command: 'echo "$CRONFILE_SHARD_INDEX/$CRONFILE_SHARD_TOTAL"'
    targets: {labels: {pool: p}, strategy: shard}
""")
        fleet.agent("a1")
        connected = time.time()

        def slots(rs: list[dict[str, Any]], job: str) -> dict[str, dict[str, str]]:
            out: dict[str, dict[str, str]] = {}
            for r in finished(rs, job):
                if (parse_ts(r["scheduled_at"]) or 0) > connected + 1:
                    out.setdefault(r["scheduled_at"], {})[r["agent"]] = r["status"]
            return out

        runs = c.until(lambda rs: len(slots(rs, "fan")) >= 3 and len(slots(rs, "split")) >= 3,
                       15, "three slots of each job")
        for job in ("fan", "split"):
            for slot, outcomes in slots(runs, job).items():
                assert outcomes in ({"a1": "succeeded", "a2": "no_agent"},
                                    {"a2": "no_agent"}, {"a1": "succeeded"}), (job, slot, outcomes)
        complete = [o for o in slots(runs, "fan").values() if len(o) == 2]
        assert len(complete) >= 2, slots(runs, "fan")
        no_agent = [r for r in finished(runs, "fan", "no_agent") if r["agent"] == "a2"]
        assert no_agent[0]["reason"] == "agent a2 is not connected"
        assert {r["output_tail"] for r in finished(runs, "split", "succeeded")} == {"0/2\n"}
    finally:
        fleet.close()


LOCAL_EVERY_SECOND = """\
  tick:
    schedule: "*/1 * * * * *"
    command: "true"
"""


def test_a_center_killed_right_after_its_start_leaves_the_outage_to_its_successor(
        tmp_path: Path) -> None:
    """Down for a while, up for less than a heartbeat, killed: the next center still
    records every slot of the outage (issue 9, item 18a: the catch-up waited a heartbeat
    while the loop already moved the watermark past the outage)."""
    c = FleetCenter(tmp_path, heartbeat=2.0)
    c.write("jobs.yaml", "apiVersion: cronfile/v1\njobs:\n" + LOCAL_EVERY_SECOND)
    try:
        c.start()
        c.until(lambda rs: finished(rs, "tick", "succeeded"), 10, "a first run")
        begin = time.time()
        c.kill()
        outage_end = wait_for(lambda: time.time() > begin + 2.5 and time.time(), 5, "an outage")
        c.start()
        c.kill()  # ready: its loop ran, a heartbeat has not passed
        c.start()
        end = time.time()
        c.until(lambda rs: any((parse_ts(r["scheduled_at"]) or 0) > end + 1
                               for r in finished(rs, "tick")), 10, "the last center to run")
    finally:
        c.stop()
    verdict = check_ledger(c.runs(), None, {"tick": ["local"]}, (begin, end))
    assert not verdict.problems, verdict.summary()
    assert verdict.statuses["missed"] >= int(outage_end - begin) - 1, verdict.summary()


def test_after_a_restart_starts_wait_for_agents_that_were_connected(tmp_path: Path) -> None:
    """An agent that was connected to the previous center gets a bounded time to come back:
    its slots run when it does, not ``no_agent`` (issue 9, item 13); one that stays away is
    ``no_agent`` after that time."""
    fleet = Fleet(tmp_path)
    try:
        c = fleet.start_center("  a1: {}\n  a2: {}\n", jobs="""\
  on-a1:
    schedule: "*/1 * * * * *"
    command: "true"
    targets: {agents: [a1]}
""")
        a1 = fleet.agent("a1")
        c.until(lambda rs: finished(rs, "on-a1", "succeeded"), 10, "a first run")
        os.kill(a1.pid, signal.SIGSTOP)  # it will notice the restart late
        try:
            c.kill()
            c.start()
            restarted = time.time()
            wait_for(lambda: time.time() > restarted + 1.5, 5, "slots while a1 is away")
        finally:
            os.kill(a1.pid, signal.SIGCONT)
        runs = c.until(lambda rs: any((parse_ts(r["scheduled_at"]) or 0) > restarted + 2
                                      for r in finished(rs, "on-a1", "succeeded")),
                       15, "a1 to run again")
        after = [r for r in finished(runs, "on-a1")
                 if (parse_ts(r["scheduled_at"]) or 0) > restarted]
        # every slot after the restart ran on a1, none is no_agent; a loaded machine can make
        # the run that waited for a1 outlast the next slot, which is then skipped (forbid)
        assert after and all(r["status"] == "succeeded" or (
            r["status"] == "skipped" and "previous run still running" in r["reason"])
            for r in after), [(r["scheduled_at"], r["status"]) for r in after]
        verdict = check_ledger(runs, None, {"on-a1": ["a1"]}, (restarted, restarted + 3))
        assert not verdict.problems, verdict.summary()
    finally:
        fleet.close()


def test_a_dark_agent_holds_up_no_one_else(tmp_path: Path) -> None:
    """A SIGSTOPped agent: local runs and the other agent's runs go on, slot by slot, and
    under ``strategy: all`` with ``forbid`` the job is skipped only where its run is stuck
    (issue 9, item 20: starts waited on each executor in turn, up to the dark agent's start
    timeout, and forbid skipped the job on every agent)."""
    fleet = Fleet(tmp_path)
    try:
        c = fleet.start_center("  a1: {}\n  a2: {}\n", heartbeat=2.0, lease=30.0, jobs="""\
  loc:
    schedule: "*/1 * * * * *"
    command: "true"
  fan:
    schedule: "*/1 * * * * *"
    command: "true"
    targets: {agents: [a1, a2], strategy: all}
""")
        fleet.agent("a1")
        a2 = fleet.agent("a2")
        c.until(lambda rs: len(finished(rs, "fan", "succeeded")) >= 2, 10, "fan on both agents")
        os.kill(a2.pid, signal.SIGSTOP)
        stopped = time.time()
        try:
            c.until(lambda rs: any((parse_ts(r["scheduled_at"]) or 0) > stopped + 4
                                   for r in finished(rs, "fan") if r["agent"] == "a1"),
                    15, "four slots on a1 while a2 is dark")
        finally:
            os.kill(a2.pid, signal.SIGCONT)
        runs = c.runs()
        window = (stopped, stopped + 4)
        verdict = check_ledger(runs, None, {"loc": ["local"], "fan": ["a1"]}, window)
        assert not verdict.problems, verdict.summary()
        assert verdict.statuses == {"succeeded": verdict.slots}, verdict.summary()
    finally:
        fleet.close()


def test_a_center_on_a_full_disk_stops_cleanly_and_says_so(tmp_path: Path) -> None:
    """Records it cannot write stop the center (a center that schedules what it cannot
    record breaks once per slot); its shutdown then must not crash on the same full disk,
    and says why it stopped (issue 9, item 21: an internal error, no center_stopped)."""
    c = FleetCenter(tmp_path)
    c.write("jobs.yaml", "apiVersion: cronfile/v1\njobs:\n" + LOCAL_EVERY_SECOND)
    with small_disk(c.state, "1m") as disk:
        try:
            c.start()
            c.until(lambda rs: finished(rs, "tick", "succeeded"), 10, "a first run")
            fill(disk)
            assert c.proc is not None
            code = c.proc.wait(timeout=20)
            log = c.log_text()
            assert code == 1, log
            assert "Traceback" not in log, log
            stopped = [e for e in c.events() if e.get("event") == "center_stopped"]
            assert stopped and stopped[-1]["reason"] == "crashed", stopped
        finally:
            c.stop()


def test_catch_up_covers_only_jobs_that_existed_during_the_outage(tmp_path: Path) -> None:
    """A job added right after a restart gets no ``missed`` for the outage before it
    existed (issue 9, item 22: the catch-up, delayed by a heartbeat, ran for it too)."""
    c = FleetCenter(tmp_path, heartbeat=2.0)
    c.write("jobs.yaml", "apiVersion: cronfile/v1\njobs:\n" + LOCAL_EVERY_SECOND)
    try:
        c.start()
        c.until(lambda rs: finished(rs, "tick", "succeeded"), 10, "a first run")
        c.kill()
        down = time.time()
        wait_for(lambda: time.time() > down + 2.5, 5, "an outage")
        c.start()
        c.write("later.yaml", "apiVersion: cronfile/v1\njobs:\n"
                "  later: {command: 'true', schedule: '*/1 * * * * *'}\n")
        runs = c.until(lambda rs: finished(rs, "later", "succeeded") and
                       finished(rs, "tick", "missed"), 10, "the new job to run, the outage recorded")
        wait_for(lambda: time.time() > down + 6, 5, "past the old catch-up delay")
        assert not finished(c.runs(), "later", "missed"), finished(c.runs(), "later")
        assert finished(runs, "tick", "missed")
    finally:
        c.stop()
