"""Client commands with ``--center URL``: the same output and exit codes as ``--state DIR``
(SPEC §3), against a real center serving HTTP."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from centerlib import cronfile_command, finished
from fleetlib import free_port
from httplib import HTTP_TOKEN, HttpCenter

JOBS = """\
apiVersion: cronfile/v1
jobs:
  greet:
    trigger: {event: hello}
    command: ["sh", "-c", "echo hello; echo from greet"]
  boom:
    trigger: {event: never}
    command: "echo going down; exit 3"
  sleeper:
    trigger: {event: nap}
    command: ["sleep", "60"]
  nightly:
    schedule: "0 3 * * *"
    command: ["true"]
"""


@pytest.fixture
def center(tmp_path: Path) -> Iterator[HttpCenter]:
    c = HttpCenter(tmp_path, watch=False)
    c.write("jobs.yaml", JOBS)
    c.start()
    yield c
    c.stop()


def run(*args: str, env: dict[str, str] | None = None,
        cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*cronfile_command(), *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})}, cwd=cwd)


def remote(center: HttpCenter, *args: str) -> subprocess.CompletedProcess[str]:
    return run(*args, "--center", center.url, "--token-file", str(center.token_path))


def local(center: HttpCenter, *args: str) -> subprocess.CompletedProcess[str]:
    return run(*args, "--state", str(center.state))


def test_status_and_runs_print_the_same_either_way(center: HttpCenter) -> None:
    assert local(center, "trigger", "hello").returncode == 0
    a, b = remote(center, "trigger", "unheard"), local(center, "trigger", "unheard")
    unheard = (1, "event unheard: no job listens for it\n")
    assert (a.returncode, a.stdout) == (b.returncode, b.stdout) == unheard
    center.wait_runs(lambda rs: finished(rs, "greet"), 10)
    for args in (["status"], ["status", "--format", "json"], ["runs"], ["runs", "--job", "greet"],
                 ["runs", "--status", "succeeded", "--format", "json"]):
        a, b = remote(center, *args), local(center, *args)
        assert (a.returncode, a.stdout) == (b.returncode, b.stdout), args
        assert a.returncode == 0
    bad = remote(center, "runs", "--since", "yesterday-ish")
    assert bad.returncode == 2 and "--since" in bad.stderr


def test_logs_print_the_same_either_way(center: HttpCenter) -> None:
    assert local(center, "trigger", "hello").returncode == 0
    runs = center.wait_runs(lambda rs: finished(rs, "greet"), 10)
    run_id = next(r["run_id"] for r in runs if r.get("job") == "greet" and r.get("status"))
    for args in (["logs", run_id], ["logs", run_id, "--format", "json"]):
        a, b = remote(center, *args), local(center, *args)
        assert (a.returncode, a.stdout, a.stderr) == (b.returncode, b.stdout, b.stderr), args
        assert a.returncode == 0
    text = remote(center, "logs", run_id).stdout
    assert text.startswith(f"run {run_id} of greet\n")
    assert text.endswith("--- output tail (17 chars) ---\nhello\nfrom greet\n")
    a, b = remote(center, "logs", "no-such-run"), local(center, "logs", "no-such-run")
    assert (a.returncode, a.stdout, b.returncode, b.stdout) == (1, "", 1, "")
    assert a.stderr == f"Error: no run no-such-run in the ledger of {center.url}\n"
    assert b.stderr == f"Error: no run no-such-run in the ledger of {center.state}\n"


@pytest.mark.parametrize("via", ["remote", "local"])
def test_run_wait_prints_the_tail_and_exits_with_the_outcome(center: HttpCenter, via: str) -> None:
    call = remote if via == "remote" else local
    ok = call(center, "run", "greet", "--wait")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout == "hello\nfrom greet\n"
    assert ok.stderr.startswith("greet run ") and ": succeeded exit 0 in " in ok.stderr
    bad = call(center, "run", "boom", "--wait")
    assert bad.returncode == 1
    assert bad.stdout == "going down\n"
    assert ": failed exit 3 in " in bad.stderr
    missing = call(center, "run", "nope")
    assert missing.returncode == 1 and "no job named 'nope'" in missing.stderr


@pytest.mark.parametrize("via", ["remote", "local"])
def test_stop_records_killed_with_who_asked(center: HttpCenter, via: str) -> None:
    call = remote if via == "remote" else local
    assert call(center, "trigger", "nap").returncode == 0
    started = center.wait_runs(lambda rs: [r for r in rs if r.get("job") == "sleeper"
                                           and r.get("record") == "started"], 10)
    run_id = started[0]["run_id"]
    out = call(center, "stop", run_id)
    assert out.returncode == 0, out.stderr
    assert f"sleeper run {run_id} on local: killed" in out.stdout
    final = finished(center.runs(), "sleeper")[0]
    assert final["status"] == "killed"
    if via == "remote":
        assert final["stopped_by"].endswith("(http 127.0.0.1)")
        assert "@" in final["stopped_by"]  # user@host as the client said
    else:
        assert final["stopped_by"].endswith("(control socket)")
    again = call(center, "stop", run_id)
    assert again.returncode == 1 and "is not running" in again.stderr


def test_apply_and_plan_against_a_remote_center(center: HttpCenter) -> None:
    schedules = center.schedules
    same = remote(center, "plan", "--schedules", str(schedules), "--detailed-exitcode")
    assert same.returncode == 0, same.stdout + same.stderr
    center.write("jobs.yaml", JOBS + "  added:\n    schedule: '@hourly'\n    command: ['true']\n")
    plan_remote = remote(center, "plan", "--schedules", str(schedules), "--detailed-exitcode")
    plan_local = local(center, "plan", "--schedules", str(schedules), "--detailed-exitcode")
    assert plan_remote.returncode == plan_local.returncode == 2
    assert "+ added" in plan_remote.stdout
    label = f"state {center.state / 'applied.json'}"

    def timeless(text: str) -> list[str]:  # the window starts "now", a second apart
        return [line for line in text.splitlines() if not re.search(r"\dZ → \d{4}-", line)]

    assert timeless(plan_remote.stdout) == timeless(plan_local.stdout.replace(
        label, f"center {center.url}"))
    applied = remote(center, "apply", "--schedules", str(schedules))
    assert applied.returncode == 0, applied.stdout + applied.stderr
    assert applied.stdout.startswith("Applied revision sha256:")
    assert remote(center, "apply", "--schedules", str(schedules)).stdout.startswith("No changes")
    assert remote(center, "plan", "--schedules", str(schedules),
                  "--detailed-exitcode").returncode == 0


def test_token_from_the_environment_and_refusals(center: HttpCenter, tmp_path: Path) -> None:
    env_ok = run("status", "--center", center.url, env={"CRONFILE_TOKEN": HTTP_TOKEN})
    assert env_ok.returncode == 0, env_ok.stderr
    none = run("status", "--center", center.url, env={"CRONFILE_TOKEN": ""})
    assert none.returncode == 1
    assert "401 unauthorized (give --token-file F or set CRONFILE_TOKEN)" in none.stderr
    wrong = run("status", "--center", center.url, env={"CRONFILE_TOKEN": "x" * 20})
    assert wrong.returncode == 1 and "the token was refused" in wrong.stderr
    gone = run("status", "--center", f"http://127.0.0.1:{free_port()}",
               env={"CRONFILE_TOKEN": HTTP_TOKEN})
    assert gone.returncode == 1 and "cannot reach the center at http://127.0.0.1:" in gone.stderr
    assert "Traceback" not in gone.stderr + none.stderr + wrong.stderr
    both = run("status", "--center", center.url, "--state", str(center.state))
    assert both.returncode == 2 and "not both" in both.stderr
    bad_url = run("status", "--center", "cron.example:8080")
    assert bad_url.returncode == 2 and "expected a URL" in bad_url.stderr
    as_json = run("status", "--center", center.url, "--format", "json",
                  env={"CRONFILE_TOKEN": HTTP_TOKEN})
    assert json.loads(as_json.stdout)["center"]["running"] is True


BACKFILL_JOBS = """\
apiVersion: cronfile/v1
jobs:
  hourly:
    schedule: "0 * * * *"
    command: ["true"]
  tick:
    schedule: "* * * * * *"
    command: ["true"]
    suspend: true
  greet:
    trigger: {event: hello}
    command: ["true"]
"""
HOUR = 3600.0


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@pytest.fixture
def backfill_center(tmp_path: Path) -> Iterator[HttpCenter]:
    c = HttpCenter(tmp_path, watch=False)
    c.write("jobs.yaml", BACKFILL_JOBS)
    c.start()
    yield c
    c.stop()


def test_backfill_prints_the_same_either_way(backfill_center: HttpCenter) -> None:
    c = backfill_center
    top = (time.time() // HOUR) * HOUR
    older = ("hourly", "--from", iso(top - 6 * HOUR), "--to", iso(top - 5 * HOUR))
    newer = ("hourly", "--from", iso(top - 3 * HOUR), "--to", iso(top - 2 * HOUR))
    for args in (["backfill", *older, "--dry-run"], ["backfill", *newer, "--dry-run"],
                 ["backfill", *older, "--dry-run", "--format", "json"]):
        a, b = remote(c, *args), local(c, *args)
        assert (a.returncode, a.stdout, a.stderr) == (b.returncode, b.stdout, b.stderr), args
        assert a.returncode == 0
    assert remote(c, "backfill", *older, "--dry-run").stdout.splitlines() == [
        "backfill hourly: 2 slots would run", f"  {iso(top - 6 * HOUR)}", f"  {iso(top - 5 * HOUR)}"]
    assert not finished(c.runs())  # dry runs run nothing
    # a real backfill of two slots each way: the same words, each naming how it was asked
    a, b = remote(c, "backfill", *older), local(c, "backfill", *newer)
    assert (a.returncode, b.returncode) == (0, 0), a.stderr + b.stderr
    assert a.stdout == ("backfill hourly: 2 slots queued\n"
                        f"follow them with: cronfile runs --job hourly --center {c.url}\n")
    assert b.stdout == a.stdout.replace(f"--center {c.url}", f"--state {c.state}")
    runs = c.wait_runs(lambda rs: len(finished(rs, "hourly")) >= 4 and rs, 30, "4 backfilled runs")
    done = finished(runs, "hourly")
    assert sorted(r["scheduled_at"] for r in done) == [
        iso(top - h * HOUR) for h in (6, 5, 3, 2)]
    assert {(r["trigger"], r["status"]) for r in done} == {("backfill", "succeeded")}
    # each side sees what the other ran: the same operation behind both
    for args in (["backfill", *newer], ["backfill", *older, "--format", "json"]):
        a, b = remote(c, *args), local(c, *args)
        assert (a.returncode, a.stdout, a.stderr) == (b.returncode, b.stdout, b.stderr), args
    assert remote(c, "backfill", *newer).stdout == \
        "backfill hourly: 0 slots queued (2 already recorded)\n"
    again = json.loads(local(c, "backfill", *older, "--format", "json").stdout)
    assert (again["count"], again["already_recorded"], again["slots"]) == (0, 2, [])
    assert len(finished(c.runs(), "hourly")) == 4


def test_backfill_refusals_are_the_same_either_way(backfill_center: HttpCenter) -> None:
    c = backfill_center
    day = ("--from", "2030-01-01T00:00:00Z", "--to", "2030-01-01T03:00:00Z")
    cases = {
        ("tick", *day): "Error: the range has more than 10,000 slots: check --from/--to, or "
                        "pass --yes to run them all\n",
        ("nope", *day): "Error: no job named 'nope'\n",
        ("greet", *day): "Error: job 'greet' has no schedule or run_at: nothing to backfill\n",
    }
    for args, error in cases.items():
        a, b = remote(c, "backfill", *args), local(c, "backfill", *args)
        assert (a.returncode, a.stdout, a.stderr) == (b.returncode, b.stdout, b.stderr), args
        assert (a.returncode, a.stdout) == (1, ""), args
        assert a.stderr == error, args
    for via in (remote, local):
        yes = via(c, "backfill", "tick", *day, "--yes", "--dry-run", "--format", "json")
        assert yes.returncode == 0, yes.stderr
        assert json.loads(yes.stdout)["count"] == 10_801
    a = remote(c, "backfill", "hourly", "--from", "yesterday", "--to", "2030-01-02")
    b = local(c, "backfill", "hourly", "--from", "yesterday", "--to", "2030-01-02")
    assert (a.returncode, a.stderr) == (b.returncode, b.stderr)
    assert a.returncode == 2 and "'yesterday' is not an ISO-8601 time" in a.stderr
    assert not finished(c.runs())


def test_the_backfill_route_answers_clients_other_than_the_cli(
        backfill_center: HttpCenter) -> None:
    c = backfill_center
    query = "from=2030-01-01T00:00:00Z&to=2030-01-01T02:00:00Z&dry_run=1"
    ok = c.post(f"/api/v1/jobs/hourly/backfill?{query}")
    assert ok.status == 200
    assert ok.json()["slots"] == ["2030-01-01T00:00:00Z", "2030-01-01T01:00:00Z",
                                  "2030-01-01T02:00:00Z"]
    assert c.post(f"/api/v1/jobs/hourly/backfill?{query}", token=None).status == 401
    assert c.get(f"/api/v1/jobs/hourly/backfill?{query}").status == 405  # a GET changes nothing
    assert c.post(f"/api/v1/jobs/nope/backfill?{query}").status == 404
    assert c.post("/api/v1/jobs/tick/backfill?from=2030-01-01&to=2030-01-02").status == 422
    bad = c.post("/api/v1/jobs/hourly/backfill?from=soon&to=2030-01-02")
    assert (bad.status, bad.json()["error"]) == (400, "from: 'soon' is not an ISO-8601 time")
    missing = c.post("/api/v1/jobs/hourly/backfill?from=2030-01-01")
    assert (missing.status, missing.json()["error"]) == (400, "to: required, an ISO-8601 time")
    assert not finished(c.runs())
