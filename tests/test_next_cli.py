"""``cronfile next [JOB] [-n N] [--after TIME] [--format json]``, run as a user runs it, with
exact expected times (SPEC §3)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from conftest import cronfile_command

SCHEDULE = """\
apiVersion: cronfile/v1
defaults:
  timezone: Europe/Berlin
jobs:
  nightly:
    schedule: "30 2 * * *"
    command: [/usr/local/bin/nightly]
  half-hourly:
    schedule: ["*/30 * * * *"]
    command: x
  weekdays:
    schedule: ["0 9 * * 1-5", "0 12 * * 0,6"]
    timezone: America/New_York
    command: x
  seconds:
    schedule: "*/20 * * * * *"
    timezone: UTC
    command: x
  chained: {command: x, after: nightly}
  on-deploy: {command: x, trigger: {event: deploy}}
  worker: {command: x, kind: daemon}
  paused: {command: x, schedule: "@daily", suspend: true}
  spread: {command: x, schedule: "H H * * *", timezone: UTC}
"""


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "schedules").mkdir()
    (tmp_path / "schedules" / "jobs.yaml").write_text(SCHEDULE, encoding="utf-8")
    return tmp_path


def run(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([*cronfile_command(), "next", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=60, env={**os.environ, **env})
    assert "Traceback" not in done.stderr + done.stdout
    return done


def test_one_job_across_the_fall_back_night(project: Path) -> None:
    done = run(["nightly", "-n", "3", "--after", "2026-10-24T12:00:00Z"], project)
    assert done.returncode == 0, done.stderr
    assert done.stdout == (
        "nightly  30 2 * * *  (Europe/Berlin)\n"
        "  2026-10-25 02:30:00 CEST   (+0200)   2026-10-25T00:30:00Z\n"
        "  2026-10-26 02:30:00 CET    (+0100)   2026-10-26T01:30:00Z\n"
        "  2026-10-27 02:30:00 CET    (+0100)   2026-10-27T01:30:00Z\n"
    )


def test_json_is_a_list_of_times_with_offsets(project: Path) -> None:
    done = run(["nightly", "-n", "3", "--after", "2026-03-28T12:00:00+01:00", "--format", "json"],
               project)
    assert done.returncode == 0
    assert json.loads(done.stdout) == [
        "2026-03-29T03:00:00+02:00",  # 02:30 does not exist that night: the first instant after
        "2026-03-30T02:30:00+02:00",
        "2026-03-31T02:30:00+02:00",
    ]


def test_an_interval_job_follows_real_time(project: Path) -> None:
    done = run(["half-hourly", "-n", "5", "--after", "2026-10-25T00:10:00Z", "--format", "json"],
               project)
    assert json.loads(done.stdout) == [
        "2026-10-25T02:30:00+02:00", "2026-10-25T02:00:00+01:00", "2026-10-25T02:30:00+01:00",
        "2026-10-25T03:00:00+01:00", "2026-10-25T03:30:00+01:00"]


def test_a_union_of_schedules_in_new_york(project: Path) -> None:
    done = run(["weekdays", "-n", "4", "--after", "2026-03-06T12:00:00-05:00", "--format", "json"],
               project)
    assert json.loads(done.stdout) == [  # Fri 6 Mar (EST) ... Mon 9 Mar (EDT)
        "2026-03-07T12:00:00-05:00", "2026-03-08T12:00:00-04:00", "2026-03-09T09:00:00-04:00",
        "2026-03-10T09:00:00-04:00"]


def test_six_fields_are_seconds_first(project: Path) -> None:
    done = run(["seconds", "-n", "3", "--after", "2026-01-01T00:00:30Z", "--format", "json"], project)
    assert json.loads(done.stdout) == [
        "2026-01-01T00:00:40+00:00", "2026-01-01T00:01:00+00:00", "2026-01-01T00:01:20+00:00"]


def test_a_time_without_offset_is_utc(project: Path) -> None:
    """Never the host's zone: the same answer whatever TZ says."""
    outputs = {run(["nightly", "-n", "1", "--after", "2026-06-01T00:31:00", "--format", "json"],
                   project, TZ=tz).stdout for tz in ("UTC", "America/Los_Angeles", "Asia/Tokyo")}
    assert outputs == {'["2026-06-02T02:30:00+02:00"]\n'}  # 00:31Z is 02:31 in Berlin


def test_every_job_with_notes(project: Path) -> None:
    done = run(["-n", "1", "--after", "2026-03-29T00:00:00Z", "--format", "json"], project)
    assert done.returncode == 0
    data = {entry["job"]: entry for entry in json.loads(done.stdout)}
    assert sorted(data) == ["chained", "half-hourly", "nightly", "on-deploy", "paused", "seconds",
                            "spread", "weekdays", "worker"]
    assert data["nightly"] == {"job": "nightly", "timezone": "Europe/Berlin", "note": None,
                               "times": ["2026-03-29T03:00:00+02:00"],
                               "utc": ["2026-03-29T01:00:00Z"]}
    assert data["half-hourly"]["times"] == ["2026-03-29T01:30:00+01:00"]
    assert data["chained"]["note"] == "runs after nightly succeed"
    assert data["on-deploy"]["note"] == "runs on `cronfile trigger deploy`"
    assert data["worker"]["note"] == "daemon: runs all the time"
    assert data["paused"]["note"] == "suspended: never fires"
    assert all(not data[j]["times"] for j in ("chained", "on-deploy", "worker", "paused"))


def test_h_is_the_same_in_every_process(project: Path) -> None:
    outputs = {run(["spread", "-n", "3", "--after", "2026-01-01T00:00:00Z"], project,
                   PYTHONHASHSEED=seed).stdout for seed in ("0", "1", "12345")}
    assert len(outputs) == 1
    times = json.loads(run(["spread", "-n", "3", "--after", "2026-01-01T00:00:00Z", "--format",
                            "json"], project).stdout)
    assert len({t[11:] for t in times}) == 1  # the same time every day


def test_default_is_now(project: Path) -> None:
    done = run(["half-hourly", "-n", "2", "--format", "json"], project)
    assert done.returncode == 0
    assert len(json.loads(done.stdout)) == 2


@pytest.mark.parametrize(("args", "message"), [
    (["nightli"], "no job named 'nightli' (did you mean 'nightly'?)"),
    (["--after", "yesterday"], "--after 'yesterday' is not an ISO-8601 time"),
    (["--after", "0001-01-01T00:00:00+05:00"], "is not an ISO-8601 time between the years"),
    (["-n", "0"], "0 is not in the range"),
    (["--format", "yaml"], "'yaml' is not one of"),
])
def test_usage_errors_exit_2(project: Path, args: list[str], message: str) -> None:
    done = run(args, project)
    assert done.returncode == 2
    assert message in done.stderr


def test_invalid_schedules_exit_1_with_the_problems(project: Path) -> None:
    (project / "schedules" / "bad.yaml").write_text("apiVersion: cronfile/v1\njobs:\n  x:\n"
                                                     "    command: x\n    schedule: '0 0 30 2 *'\n")
    done = run(["nightly"], project)
    assert done.returncode == 1
    assert "bad.yaml:5:5: error: jobs.x.schedule: '0 0 30 2 *' never fires" in done.stdout
