"""``cronfile plan``: the slot each daylight-saving transition moves, the ``--window``, and
JSON on stdout whatever the outcome (so ``| jq`` never reads text)."""

from __future__ import annotations

import json
import os
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import pytest
from conftest import cronfile_command

from cronfile.cli.plan import run_plan

SPRING = datetime(2026, 3, 25, 12, 0, tzinfo=UTC).timestamp()  # Berlin: 2026-03-29 02:00 → 03:00
AUTUMN = datetime(2026, 10, 20, 12, 0, tzinfo=UTC).timestamp()  # Berlin: 2026-10-25 03:00 → 02:00


def schedules(tmp_path: Path, jobs: dict[str, str], zone: str = "Europe/Berlin") -> Path:
    root = tmp_path / "schedules"
    root.mkdir(exist_ok=True)
    body = "".join(f"  {name}:\n    schedule: \"{expr}\"\n    command: [/bin/true]\n"
                   for name, expr in jobs.items())
    (root / "jobs.yaml").write_text(
        f"apiVersion: cronfile/v1\ndefaults: {{timezone: {zone}}}\njobs:\n{body}")
    return root


def dst_lines(out: str) -> list[str]:
    lines = out.splitlines()
    return [line.strip() for i, line in enumerate(lines)
            if "daylight saving:" in line or "this job:" in line]


def test_spring_forward_names_the_moved_slot(tmp_path: Path) -> None:
    root = schedules(tmp_path, {"fixed": "30 2 * * *", "interval": "*/30 * * * *",
                                "other-hour": "0 5 * * *"})
    out, code = run_plan(root, now=SPRING, fire_count=5)
    assert code == 0, out
    assert dst_lines(out) == [
        "daylight saving: 2026-03-29 02:00 CET → 03:00 CEST (clocks go forward 1h)",
        "this job: 02:30 → 03:00 that day (02:30 does not exist)",
        "daylight saving: 2026-03-29 02:00 CET → 03:00 CEST (clocks go forward 1h)",
        "this job: 02:00 and 02:30 do not exist that day: skipped (interval jobs follow "
        "elapsed time)",
        "daylight saving: 2026-03-29 02:00 CET → 03:00 CEST (clocks go forward 1h)",
        "this job: not affected (no slot from 02:00 to 03:00)",
    ]
    # the plan's slot is the one the center fires
    fire = "Sun 2026-03-29 03:00 CEST = 2026-03-29 01:00 UTC"
    assert fire in out.split("+ fixed")[1].split("+ interval")[0]


def test_fall_back_says_fires_once(tmp_path: Path) -> None:
    root = schedules(tmp_path, {"fixed": "30 2 * * *", "interval": "@hourly"})
    out, code = run_plan(root, now=AUTUMN, fmt="json")
    assert code == 0
    data = json.loads(out)
    effects = {j["name"]: [d["affected_slot"] for d in j["dst_transitions"]] for j in data["jobs"]}
    assert effects == {
        "fixed": ["02:30 fires once (in the first pass, CEST; not again in CET)"],
        "interval": ["02:00 happens twice: fires in both passes (CEST and CET)"],
    }


def test_a_clock_correction_is_not_daylight_saving(tmp_path: Path) -> None:
    root = schedules(tmp_path, {"fixed": "30 2 * * *"}, zone="Pacific/Apia")
    now = datetime(2011, 12, 28, tzinfo=UTC).timestamp()
    out, code = run_plan(root, now=now)
    assert code == 0
    assert dst_lines(out)[1] == (
        "this job: clock correction (forward 1d, not daylight saving): local times from "
        "2011-12-30 00:00 to 2011-12-31 00:00 do not exist; 02:30 skipped")


def test_the_window_is_an_option(tmp_path: Path) -> None:
    root = schedules(tmp_path, {"fixed": "30 2 * * *"})
    short, _ = run_plan(root, now=SPRING, window_s=86400)
    assert "Window:   2026-03-25T12:00:00Z → 2026-03-26T12:00:00Z" in short
    assert dst_lines(short) == []
    long, _ = run_plan(root, now=SPRING, window_s=240 * 86400)
    assert [line for line in dst_lines(long) if line.startswith("daylight")] == [
        "daylight saving: 2026-03-29 02:00 CET → 03:00 CEST (clocks go forward 1h)",
        "daylight saving: 2026-10-25 03:00 CEST → 02:00 CET (clocks go back 1h)",
    ]


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "NO_COLOR": "1"}
    env.pop("CRONFILE_DEBUG", None)
    done = subprocess.run([*cronfile_command(), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=60, env=env)
    assert "Traceback" not in done.stderr + done.stdout, done.stderr
    return done


def test_window_on_the_command_line(tmp_path: Path) -> None:
    schedules(tmp_path, {"fixed": "30 2 * * *"})
    done = run(["plan", "--window", "36h", "--format", "json"], tmp_path)
    assert done.returncode == 0, done.stderr
    window = json.loads(done.stdout)["window"]
    start = datetime.fromisoformat(window["start"])
    end = datetime.fromisoformat(window["end"])
    assert (end - start).total_seconds() == 36 * 3600
    bad = run(["plan", "--window", "soon"], tmp_path)
    assert bad.returncode == 2
    assert "--window" in bad.stderr and "not a duration" in bad.stderr


@pytest.mark.parametrize("fmt", ["json", "markdown", "text"])
def test_invalid_files_in_every_format(tmp_path: Path, fmt: str) -> None:
    root = tmp_path / "schedules"
    root.mkdir()
    (root / "a.yaml").write_text("apiVersion: cronfile/v1\njobs:\n  a:\n    command: x\n"
                                 "    schedule: \"0 25 * * *\"\n")
    done = run(["plan", "--format", fmt], tmp_path)
    assert done.returncode == 1
    problem = "schedules/a.yaml:5:5: error: jobs.a.schedule: 25 is out of range for hour (0-23)"
    if fmt == "json":
        data = json.loads(done.stdout)
        assert data["ok"] is False and data["errors"] == 1
        assert [p["message"] for p in data["problems"]] == ["25 is out of range for hour (0-23)"]
        assert data["problems"][0]["path"] == "jobs.a.schedule"
    elif fmt == "markdown":
        assert done.stdout.startswith("## cronfile plan\n")
        assert problem in done.stdout
    else:
        assert done.stdout.splitlines()[0] == problem


def test_a_bad_baseline_in_json_is_json(tmp_path: Path) -> None:
    schedules(tmp_path, {"fixed": "30 4 * * *"})
    done = run(["plan", "--state", str(tmp_path / "nowhere"), "--format", "json"], tmp_path)
    assert done.returncode == 1
    data = json.loads(done.stdout)
    assert data["ok"] is False
    assert "no such directory" in data["error"]
