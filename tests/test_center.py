"""Black-box tests of ``cronfile center``: a real subprocess, real files, real jobs.

Every wait is bounded polling of the ledger (50 ms steps); schedules use 6 fields
(seconds first) so a job fires every second and the suite stays fast.
"""

from __future__ import annotations

import json
import os
import pwd
import random
import secrets
import signal
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
from centerlib import (
    CenterProc,
    check_ledger,
    dispatched,
    finished,
    parse_ts,
    pgrep,
    read_jsonl,
    wait_for,
)

EVERY_SECOND = '"*/1 * * * * *"'
NEVER_SOON = '"0 0 1 1 *"'

RUN_FIELDS = {"v", "ts", "run_id", "job", "agent", "transport", "scheduled_at", "attempt", "revision"}
FINAL_FIELDS = RUN_FIELDS | {"status", "exit_code", "signal", "started_at", "finished_at",
                             "duration_s", "output_tail"}


@pytest.fixture
def center(tmp_path: Path) -> Any:
    procs: list[CenterProc] = []

    def make(**kw: Any) -> CenterProc:
        c = CenterProc(tmp_path, **kw)
        procs.append(c)
        return c

    yield make
    for c in procs:
        c.stop()


def _yaml(jobs: str) -> str:
    return "apiVersion: cronfile/v1\njobs:\n" + jobs


# ---------------------------------------------------------------------- records


def test_job_every_second_records_all_fields(center: Any) -> None:
    c = center()
    c.write("a.yaml", _yaml(f"""\
  tick:
    schedule: {EVERY_SECOND}
    command: "echo tick-$CRONFILE_JOB"
"""))
    c.start()
    done = c.wait_runs(lambda rs: len(finished(rs, "tick", "succeeded")) >= 3 and rs, 10,
                       "three succeeded runs")
    by_id: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in done:
        by_id[r["run_id"]].append(r)
    applied = [e for e in c.events() if e.get("event") == "revision_applied"]
    content_hash = applied[0]["revision"]["content_hash"]
    assert content_hash.startswith("sha256:")
    checked = 0
    for recs in by_id.values():
        kinds = [r["record"] for r in recs]
        if "finished" not in kinds:
            continue
        assert kinds == ["dispatched", "started", "finished"], kinds
        fin = recs[-1]
        assert set(fin) >= FINAL_FIELDS, FINAL_FIELDS - set(fin)
        for r in recs:
            assert set(r) >= RUN_FIELDS
            assert r["v"] == 1 and r["ts"].endswith("Z")
            assert (r["job"], r["agent"], r["transport"], r["attempt"]) == ("tick", "local", "local", 1)
            assert r["revision"]["content_hash"] == content_hash
        assert len({r["scheduled_at"] for r in recs}) == 1
        slot = parse_ts(fin["scheduled_at"])
        assert slot is not None and slot == int(slot)  # whole seconds
        assert fin["status"] == "succeeded" and fin["exit_code"] == 0 and fin["signal"] is None
        assert fin["output_tail"] == "tick-tick\n"
        started, ended = parse_ts(fin["started_at"]), parse_ts(fin["finished_at"])
        assert started is not None and ended is not None and slot <= started <= ended
        assert 0 <= fin["duration_s"] < 5
        assert recs[0]["ts"] <= recs[-1]["ts"]
        checked += 1
    assert checked >= 3
    slots = sorted(parse_ts(r["scheduled_at"]) for r in dispatched(done, "tick"))
    assert len(slots) == len(set(slots))
    assert all(b - a == 1 for a, b in zip(slots, slots[1:], strict=False))  # no slot skipped


def test_timeout_kills_the_whole_process_tree(center: Any) -> None:
    marker = f"{random.randint(100, 899)}.{secrets.randbelow(10**6):06d}"
    c = center()
    c.write("a.yaml", _yaml(f"""\
  hang:
    schedule: {NEVER_SOON}
    command: "sleep {marker} & sleep {marker}"
    timeout: 1s
"""))
    c.start()
    assert c.cli("run", "hang").returncode == 0
    fin = c.wait_runs(lambda rs: finished(rs, "hang"), 15, "the timeout")[0]
    assert fin["status"] == "timeout"
    assert fin["exit_code"] is None and fin["signal"] in (signal.SIGTERM, signal.SIGKILL)
    assert "timed out" in fin["reason"]
    assert 1.0 <= fin["duration_s"] < 12
    wait_for(lambda: not pgrep(f"sleep {marker}"), 5, "no surviving sleep")


def test_secrets_never_reach_the_ledger(center: Any, tmp_path: Path) -> None:
    file_secret = "fs-" + secrets.token_hex(12)
    env_secret = "es-" + secrets.token_hex(12)
    secret_file = tmp_path / "token"
    secret_file.write_text(file_secret + "\n")
    c = center(env={"CRONFILE_TEST_SECRET": env_secret})
    c.write("a.yaml", _yaml(f"""\
  leaky:
    schedule: {NEVER_SOON}
    command: 'echo "file=$A env=$B"; echo "$A$B" >&2; exit 3'
    env:
      A: {{from_file: {secret_file}}}
      B: {{from_env: CRONFILE_TEST_SECRET}}
"""))
    c.start()
    assert c.cli("run", "leaky").returncode == 0
    fin = c.wait_runs(lambda rs: finished(rs, "leaky"), 10, "the run")[0]
    assert fin["status"] == "failed" and fin["exit_code"] == 3
    assert "file=" in fin["output_tail"] and "env=" in fin["output_tail"]
    c.stop()
    for path in (c.runs_path, c.events_path, *c.state.glob("*.json")):
        text = path.read_text()
        assert file_secret not in text and env_secret not in text, path
    # and the CLI views
    out = c.cli("runs", "--format", "json").stdout
    assert file_secret not in out and env_secret not in out


@pytest.mark.skipif(os.geteuid() != 0, reason="run_as needs root")
def test_run_as_nobody(center: Any) -> None:
    c = center()
    c.write("a.yaml", _yaml(f"""\
  who:
    schedule: {NEVER_SOON}
    command: ["id", "-u"]
    run_as: nobody
"""))
    c.start()
    assert c.cli("run", "who").returncode == 0
    fin = c.wait_runs(lambda rs: finished(rs, "who"), 10, "the run")[0]
    assert fin["status"] == "succeeded", fin
    assert fin["output_tail"].strip() == str(pwd.getpwnam("nobody").pw_uid)


# ---------------------------------------------------------------------- reloads


def _applied(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e.get("event") == "revision_applied"]


@pytest.mark.slow
def test_hot_reload_add_job_and_reject_invalid_edit(center: Any) -> None:
    c = center()
    c.write("a.yaml", _yaml(f"""\
  first:
    schedule: {EVERY_SECOND}
    command: "true"
"""))
    c.start()
    c.wait_runs(lambda rs: finished(rs, "first", "succeeded"), 10, "first runs")
    c.write("b.yaml", _yaml(f"""\
  second:
    schedule: {EVERY_SECOND}
    command: "echo two"
"""))
    ev = c.wait_events(lambda es: len(_applied(es)) >= 2 and _applied(es)[-1], 10, "the reload")
    assert ev["diff"]["jobs"] == {"add": 1, "change": 0, "remove": 0}
    assert ev["initial"] is False
    c.wait_runs(lambda rs: finished(rs, "second", "succeeded"), 10, "the new job to run")

    # an invalid edit: rejected with file:line, the old jobs keep running
    c.write("b.yaml", _yaml(f"""\
  second:
    schedule: {EVERY_SECOND}
    command: "echo two"
    concurrency: sometimes
"""))
    rej = c.wait_events(lambda es: [e for e in es if e.get("event") == "revision_rejected"], 10,
                        "the rejection")[0]
    assert rej["errors"] and any(":6:" in e and "b.yaml" in e for e in rej["errors"]), rej["errors"]
    assert rej["kept"]["content_hash"] == ev["revision"]["content_hash"]
    mark = time.time()
    c.wait_runs(lambda rs: [r for r in finished(rs, "second", "succeeded")
                            if parse_ts(r["scheduled_at"]) > mark + 1], 10,  # type: ignore[operator]
                "the old job to keep running")
    status = c.cli("status")
    assert status.returncode == 1  # the last change is bad (issue 9, item 10)
    assert "REJECTED" in status.stdout and "b.yaml:6" in status.stdout
    assert "(still running the revision above)" in status.stdout
    sj = json.loads(c.cli("status", "--format", "json").stdout)
    assert sj["last_rejection"]["errors"] == rej["errors"]
    assert sj["revision"]["content_hash"] == ev["revision"]["content_hash"]
    assert sj["center"]["running"] is True


def test_applied_state_is_what_plan_compares_against(center: Any) -> None:
    """The center stores the files it applied in applied.json; ``plan --state`` diffs the
    directory against that (and not against what is on disk now)."""
    c = center()
    c.write("a.yaml", _yaml(f"""\
  keep:
    schedule: {NEVER_SOON}
    command: "true"
"""))
    c.start()
    applied = c.state / "applied.json"
    wait_for(applied.exists, 10, "applied.json")
    plan = c.cli("plan", "--schedules", str(c.schedules), "--detailed-exitcode")
    assert plan.returncode == 0, plan.stdout + plan.stderr  # nothing to change
    assert json.loads(applied.read_text())["v"] == 2

    c.write("b.yaml", _yaml(f"""\
  added:
    schedule: {NEVER_SOON}
    command: "true"
"""))
    c.wait_events(lambda es: len(_applied(es)) >= 2, 10, "the reload")
    wait_for(lambda: "b.yaml" in applied.read_text(), 10, "applied.json rewritten")
    c.stop()
    c.write("a.yaml", _yaml(f"""\
  keep:
    schedule: {NEVER_SOON}
    command: "false"
"""))
    plan = c.cli("plan", "--schedules", str(c.schedules), "--detailed-exitcode")
    assert plan.returncode == 2, plan.stdout + plan.stderr
    assert "~ keep" in plan.stdout.splitlines() and "+ added" not in plan.stdout
    assert plan.stdout.splitlines()[-1] == "Plan: 0 to add, 1 to change, 0 to remove."


def test_restart_with_broken_schedules_runs_the_last_applied_state(center: Any) -> None:
    c = center()
    c.write("a.yaml", _yaml(f"""\
  steady:
    schedule: {EVERY_SECOND}
    command: "true"
"""))
    c.start()
    wait_for((c.state / "applied.json").exists, 10, "applied.json")
    c.stop()
    c.write("a.yaml", "apiVersion: cronfile/v1\njobs:\n  steady: {schedule: nope}\n")
    restarted = time.time()
    c.start()
    c.wait_runs(lambda rs: [r for r in finished(rs, "steady", "succeeded")
                            if parse_ts(r["scheduled_at"]) > restarted], 10,  # type: ignore[operator]
                "the job of the last applied state to run")
    events = c.events()
    rejected = [e for e in events if e.get("event") == "revision_rejected"]
    assert rejected and any("a.yaml:3" in e for e in rejected[-1]["errors"]), rejected
    assert _applied(events)[-1]["initial"] is True
    assert _applied(events)[-1]["revision"] == _applied(events)[0]["revision"]


@pytest.mark.slow
def test_a_triggered_start_pending_at_a_crash_runs_after_the_restart(center: Any) -> None:
    c = center()
    c.write("a.yaml", _yaml("""\
  hook:
    trigger: {event: deployed, delay: 3s}
    command: "echo hooked"
"""))
    c.start()
    assert c.cli("trigger", "deployed").returncode == 0
    triggered = [e for e in c.events() if e.get("event") == "triggered"][0]
    c.kill()  # before the 3 s delay ends
    assert finished(c.runs(), "hook") == []
    c.start()
    run = c.wait_runs(lambda rs: finished(rs, "hook"), 15, "the triggered run")[0]
    assert (run["status"], run["scheduled_at"]) == ("succeeded", triggered["due"]["hook"])
    c.stop()
    restarted = time.time()
    c.start()  # once started, it is in the ledger: not queued a second time
    # a start queued again would be due at once, and would hold the watermark below its due
    c.wait_ticked_past(max(restarted, parse_ts(run["scheduled_at"]) or 0.0))
    assert len(dispatched(c.runs(), "hook")) == 1


@pytest.mark.slow
def test_moving_a_job_is_no_change_and_keeps_timing(center: Any) -> None:
    c = center()
    job = f"""\
  mover:
    schedule: {EVERY_SECOND}
    command: "true"
"""
    c.write("a.yaml", _yaml(job + f"""\
  stay:
    schedule: {NEVER_SOON}
    command: "true"
"""))
    c.start()
    c.wait_runs(lambda rs: len(finished(rs, "mover")) >= 2, 10, "runs")
    c.write("sub/b.yaml", _yaml(job))
    c.write("a.yaml", _yaml(f"""\
  stay:
    schedule: {NEVER_SOON}
    command: "true"
"""))
    ev = c.wait_events(lambda es: len(_applied(es)) >= 2 and _applied(es)[-1], 10, "the reload")
    assert ev["diff"]["jobs"] == {"add": 0, "change": 0, "remove": 0}
    moved_at = time.time()
    c.wait_runs(lambda rs: [r for r in finished(rs, "mover")
                            if parse_ts(r["scheduled_at"]) > moved_at + 2], 10,  # type: ignore[operator]
                "runs after the move")
    c.stop()
    rs = c.runs()
    slots = [parse_ts(r["scheduled_at"]) for r in dispatched(rs, "mover")]
    assert len(slots) == len(set(slots))  # no slot twice
    # A loaded machine may stall the loop past a slot: that slot is then recorded missed
    # (never dropped), so it counts as accounted for; timing must still be continuous.
    for r in finished(rs, "mover"):
        if r.get("status") == "missed":
            first = parse_ts(r.get("first_scheduled_at") or r["scheduled_at"])
            last = parse_ts(r.get("last_scheduled_at") or r["scheduled_at"])
            slots.extend(first + i for i in range(int(round(last - first)) + 1))  # type: ignore[operator]
    slots.sort()  # type: ignore[call-arg]
    assert len(slots) == len(set(slots))  # no slot both run and missed
    gaps = [b - a for a, b in zip(slots, slots[1:], strict=False)]  # type: ignore[operator]
    assert set(gaps) == {1.0}, gaps  # no slot skipped: timing continued across the move
    assert not [r for r in rs if r.get("status") in ("skipped", "lost")]


def test_removed_job_stops_and_sighup_reloads(center: Any) -> None:
    c = center(watch=False)
    c.write("a.yaml", _yaml(f"""\
  gone:
    schedule: {EVERY_SECOND}
    command: "true"
"""))
    c.write("b.yaml", _yaml(f"""\
  keep:
    schedule: {EVERY_SECOND}
    command: "true"
"""))
    c.start()
    c.wait_runs(lambda rs: finished(rs, "gone") and finished(rs, "keep"), 10, "runs")
    (c.schedules / "a.yaml").unlink()
    time.sleep(1.5)  # --no-watch: nothing happens until SIGHUP
    assert len(_applied(c.events())) == 1
    c.signal(signal.SIGHUP)
    ev = c.wait_events(lambda es: len(_applied(es)) >= 2 and _applied(es)[-1], 10, "the SIGHUP reload")
    assert ev["diff"]["jobs"] == {"add": 0, "change": 0, "remove": 1}
    removed_at = parse_ts(ev["ts"])
    assert removed_at is not None
    mark = time.time()
    c.wait_runs(lambda rs: [r for r in finished(rs, "keep")
                            if parse_ts(r["scheduled_at"]) > mark + 1], 10,  # type: ignore[operator]
                "keep to go on")
    late = [r for r in c.runs() if r.get("job") == "gone"
            and parse_ts(r["scheduled_at"]) > removed_at + 0.5]  # type: ignore[operator]
    assert late == []


# ---------------------------------------------------------------------- run, trigger, stop


def test_run_and_trigger_commands(center: Any) -> None:
    c = center()
    c.write("a.yaml", _yaml(f"""\
  manual:
    schedule: {NEVER_SOON}
    command: "echo by-hand"
  hook:
    trigger: {{event: deployed}}
    command: "echo hooked"
  chained:
    after: [hook]
    command: "echo chained"
"""))
    c.start()
    r = c.cli("run", "manual")
    assert r.returncode == 0, r.stderr
    assert "started manual" in r.stdout
    fin = c.wait_runs(lambda rs: finished(rs, "manual"), 10, "the manual run")[0]
    assert (fin["status"], fin["output_tail"], fin.get("trigger")) == ("succeeded", "by-hand\n", "manual")

    t = c.cli("trigger", "deployed")
    assert t.returncode == 0, t.stderr
    assert "hook" in t.stdout
    hooked = c.wait_runs(lambda rs: finished(rs, "hook"), 10, "the triggered run")[0]
    assert (hooked["status"], hooked["output_tail"]) == ("succeeded", "hooked\n")
    chained = c.wait_runs(lambda rs: finished(rs, "chained"), 10, "the chained run")[0]
    assert (chained["status"], chained["output_tail"]) == ("succeeded", "chained\n")

    assert c.cli("trigger", "nobody-listens").returncode == 1
    bad = c.cli("run", "no-such-job")
    assert bad.returncode == 1 and "no job named" in bad.stderr
    assert any(e.get("event") == "triggered" and e.get("jobs") == ["hook"] for e in c.events())


def test_sigterm_records_killed_after_grace(center: Any) -> None:
    c = center(grace=1.0)
    c.write("a.yaml", _yaml(f"""\
  long:
    schedule: {NEVER_SOON}
    command: "sleep 30"
"""))
    c.start()
    assert c.cli("run", "long").returncode == 0
    c.wait_runs(lambda rs: [r for r in rs if r.get("record") == "started"], 10, "the run to start")
    t0 = time.monotonic()
    term_at = time.time()
    c.signal(signal.SIGTERM)
    assert c.proc is not None
    assert c.proc.wait(timeout=15) == 0
    assert time.monotonic() - t0 < 10
    fin = finished(c.runs(), "long")
    assert len(fin) == 1
    assert fin[0]["status"] == "killed"
    assert (fin[0]["exit_code"], fin[0]["signal"]) == (None, signal.SIGTERM)
    assert fin[0]["reason"] == "center shutting down"
    assert parse_ts(fin[0]["finished_at"]) >= term_at + 0.9  # type: ignore[operator]  # the grace
    assert c.events()[-1]["event"] == "center_stopped"
    assert not (c.state / "center.json").exists()
    sj = json.loads(c.cli("status", "--format", "json").stdout)
    assert sj["center"]["running"] is False
    assert [j["last_status"] for j in sj["jobs"]] == ["killed"]


def test_torn_last_line_is_repaired_and_readers_skip_garbage(center: Any) -> None:
    c = center()
    c.write("a.yaml", _yaml(f"""\
  tick:
    schedule: {EVERY_SECOND}
    command: "true"
"""))
    c.state.mkdir(parents=True)
    torn = b'{"v":1,"ts":"2026-01-01T00:00:00Z","run_id":"torn","job":"tick","record":"dispa'
    c.runs_path.write_bytes(b"not json at all\n" + torn)
    # readers cope with it before the center ever ran
    r = c.cli("runs")
    assert r.returncode == 0 and "torn" not in r.stdout
    c.start()
    c.wait_runs(lambda rs: finished(rs, "tick"), 10, "a run after the repair")
    data = c.runs_path.read_bytes()
    assert torn not in data
    assert data.startswith(b"not json at all\n{")
    repaired = [e for e in c.events() if e.get("event") == "ledger_repaired"]
    assert repaired and repaired[0]["dropped_bytes"]["runs"] == len(torn)
    sj = json.loads(c.cli("status", "--format", "json").stdout)
    assert sj["unreadable_ledger_lines"] == 1
    assert sj["jobs"][0]["last_status"] == "succeeded"


def test_runs_filters_and_json(center: Any) -> None:
    c = center()
    c.write("a.yaml", _yaml(f"""\
  ok:
    schedule: {EVERY_SECOND}
    command: "true"
  bad:
    schedule: {EVERY_SECOND}
    command: "exit 7"
"""))
    c.start()
    c.wait_runs(lambda rs: len(finished(rs, "ok")) >= 2 and len(finished(rs, "bad")) >= 2, 10, "runs")
    c.stop()
    out = c.cli("runs", "--job", "bad", "--format", "json", "--limit", "0")
    assert out.returncode == 0
    views = json.loads(out.stdout)
    assert views and {v["job"] for v in views} == {"bad"}
    assert {(v["status"], v["exit_code"]) for v in views} == {("failed", 7)}
    ok = json.loads(c.cli("runs", "--status", "succeeded", "--format", "json", "--limit", "0").stdout)
    assert ok and {v["job"] for v in ok} == {"ok"}
    assert len(ok) == len(finished(c.runs(), "ok", "succeeded"))
    text = c.cli("runs", "--job", "ok")
    assert text.returncode == 0 and "succeeded" in text.stdout
    job_column = {line.split()[1] for line in text.stdout.splitlines()[1:] if line.strip()}
    assert job_column == {"ok"}  # (not a substring test: a hex run_id can contain "bad")
    assert c.cli("runs", "--since", "not-a-time").returncode == 2
    sj = json.loads(c.cli("status", "--format", "json").stdout)
    assert {j["job"]: j["last_status"] for j in sj["jobs"]} == {"bad": "failed", "ok": "succeeded"}
    # stopped: no NEXT time that nobody will keep (issue 9, item 17)
    assert [j["next"] for j in sj["jobs"]] == [None, None]
    text = c.cli("status").stdout
    assert text.count("- (center not running)") == 2, text


@pytest.mark.slow
def test_sigkill_restarts_never_run_a_slot_twice_nor_lose_one(center: Any) -> None:
    rng = random.Random(os.environ.get("CRONFILE_TEST_SEED", secrets.randbits(32)))
    c = center(grace=1.0)
    c.write("a.yaml", _yaml(f"""\
  tick:
    schedule: {EVERY_SECOND}
    command: "echo $CRONFILE_RUN_ID"
  slow:
    schedule: {EVERY_SECOND}
    command: "sleep 1.5"
    concurrency: forbid
"""))
    deadline = time.monotonic() + 30
    kills = 0
    for _ in range(8):
        if time.monotonic() > deadline:
            break
        c.start()
        time.sleep(rng.uniform(0.3, 2.0))
        c.kill()
        kills += 1
    c.start()
    mark = time.time()
    c.wait_runs(lambda rs: [r for r in finished(rs, "tick", "succeeded")
                            if parse_ts(r["scheduled_at"]) > mark + 1], 20,  # type: ignore[operator]
                "runs after the last restart")
    assert c.stop() == 0
    assert kills >= 3  # fewer only when a loaded machine starts centers slowly
    records = read_jsonl(c.runs_path)
    counts = check_ledger(records, {"tick", "slow"})
    assert counts.get("run", 0) >= 5
    # the SIGKILLed centers left runs in flight: they are lost, never re-run
    lost = finished(records, status="lost")
    assert lost and all(r["job"] in ("tick", "slow") for r in lost)
    starts = [e for e in c.events() if e.get("event") == "center_started"]
    assert len(starts) == kills + 1


def test_a_first_start_on_invalid_files_exits_1_with_the_errors_once(center: Any) -> None:
    """No applied.json to fall back on: the center says so and exits 1, instead of running
    0 jobs with exit 0 and "keeping the last good revision" it never had (issue 9, item 10)."""
    c = center()
    c.write("a.yaml", _yaml('  a: {command: x, schedule: "bad"}\n'))
    c.start(wait=False)
    assert c.proc is not None
    assert c.proc.wait(timeout=20) == 1, c.log_text()
    log = c.log_text()
    assert log.count("a.yaml:3:") == 1, log
    assert "no valid revision to run" in log and "keeping the last good revision" not in log
    events = c.events()
    [rejected] = [e for e in events if e.get("event") == "revision_rejected"]
    assert rejected["kept"] is None
    assert [e["reason"] for e in events if e.get("event") == "center_stopped"] == ["invalid_schedules"]
    assert not (c.state / "center.json").exists()


def test_a_start_on_invalid_files_names_the_revision_it_keeps(center: Any) -> None:
    """Invalid files at start, a good applied.json: that revision runs, and the rejection
    says so (issue 9, item 22: ``kept: null``)."""
    c = center()
    c.write("a.yaml", _yaml(f'  tick: {{command: "true", schedule: {EVERY_SECOND}}}\n'))
    c.start()
    good = c.wait_events(lambda es: [e for e in es if e.get("event") == "revision_applied"], 10,
                         "the first revision")[0]["revision"]
    c.stop()
    c.write("a.yaml", _yaml('  tick: {command: "true", schedule: "bad"}\n'))
    c.start()
    rejected = c.wait_events(lambda es: [e for e in es if e.get("event") == "revision_rejected"],
                             10, "the rejection")
    assert [e["kept"] for e in rejected] == [good]


def test_status_shows_owner_description_and_what_starts_each_job(center: Any) -> None:
    """Issue 9, item 17: owner and description, ``on event X`` and ``after Y`` instead of "-"."""
    c = center()
    c.write("a.yaml", _yaml(f"""\
  nightly:
    schedule: {EVERY_SECOND}
    command: "true"
    owner: team-billing
    description: Sends the invoices
  hooked:
    trigger: {{event: deployed}}
    command: "true"
  chained:
    after: [nightly]
    command: "true"
"""))
    c.start()
    c.wait_runs(lambda rs: finished(rs, "nightly", "succeeded"), 10, "a run")
    out = c.cli("status")
    assert out.returncode == 0, out.stdout + out.stderr
    rows = {line.split()[0]: line for line in out.stdout.splitlines() if line and line[0] != " "}
    assert "on event deployed" in rows["hooked"]
    assert "after nightly" in rows["chained"]
    assert "  owner: team-billing; Sends the invoices" in out.stdout.splitlines()


def test_the_log_names_every_bad_outcome_and_runs_lists_slots_in_order(center: Any) -> None:
    """Issue 9, item 17: one log line per failed/missed run, and ``runs`` in slot order so
    that the missed slots of an outage (recorded at the next start) sit where they belong."""
    c = center()
    c.write("a.yaml", _yaml(f'  bad: {{command: "exit 7", schedule: {EVERY_SECOND}}}\n'))
    c.start()
    c.wait_runs(lambda rs: finished(rs, "bad", "failed"), 10, "a failed run")
    c.stop()
    down = time.time()
    wait_for(lambda: time.time() > down + 2.5, 5, "an outage")
    c.start()
    c.wait_runs(lambda rs: finished(rs, "bad", "missed") and
                [r for r in finished(rs, "bad", "failed") if parse_ts(r["scheduled_at"]) > down + 3],
                10, "the outage recorded and a run after it")
    c.stop()
    log = c.log_text()
    failed = finished(c.runs(), "bad", "failed")[0]
    assert (f"job bad slot {failed['scheduled_at']} on local attempt 1: failed (exit 7) "
            f"[run {failed['run_id']}]") in log, log
    assert "job bad slot" in log and ": missed" in log and "the center was not running" in log
    views = json.loads(c.cli("runs", "--format", "json", "--limit", "0").stdout)
    slots = [v["scheduled_at"] for v in views]
    assert slots == sorted(slots), slots
    assert "missed" in {v["status"] for v in views}
