"""``cronfile validate`` as a user runs it: the installed command against small directories.

Each bad input is a fixture directory written into ``tmp_path``; the test asserts the exit
code and every expected problem's file, exact line and (where it means something) column,
and that no traceback ever reaches the user. The table is in three parts, as the hazards
are: YAML itself, the schema, and the semantics the schema cannot express.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import REPO, cronfile_command

from cronfile.cli import main

GOOD = """\
apiVersion: cronfile/v1
jobs:
  nightly:
    schedule: "0 2 * * *"
    command: ["/bin/true"]
"""


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run the installed command; no traceback may ever reach the user."""
    env = {**os.environ, "NO_COLOR": "1"}
    env.pop("CRONFILE_DEBUG", None)
    done = subprocess.run([*cronfile_command(), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=60, env=env)
    assert "Traceback" not in done.stderr + done.stdout, done.stderr
    assert "internal error" not in done.stderr, done.stderr
    return done


def write(root: Path, files: dict[str, str | bytes]) -> None:
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")


def problems_of(done: subprocess.CompletedProcess[str]) -> list[dict[str, object]]:
    data = json.loads(done.stdout)
    return list(data["problems"])


@dataclass
class Expect:
    """One expected problem: file (relative to the schedules dir), line, column (None:
    not asserted) and a fragment of the message."""

    file: str
    line: int
    column: int | None
    fragment: str
    severity: str = "error"


@dataclass
class Case:
    id: str
    files: dict[str, str | bytes]
    expect: list[Expect]
    code: int = 1
    exact: bool = True  # no problems beyond the expected ones


def job(body: str, name: str = "nightly", head: str = "") -> str:
    """A file with one job whose extra lines are ``body`` (indented for a job)."""
    lines = "".join(f"    {line}\n" for line in body.splitlines())
    return f"apiVersion: cronfile/v1\n{head}jobs:\n  {name}:\n    command: [/bin/true]\n{lines}"


LAUGHS = "apiVersion: cronfile/v1\njobs:\n  a: &l0 [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"  l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]\n" for i in range(1, 10)
)

YAML_CASES = [
    Case("syntax-unclosed-flow", {"a.yaml": job('schedule: "0 2 * * *"\nenv: {A: "1"')},
         [Expect("a.yaml", 7, 1, "YAML syntax")]),
    Case("syntax-bad-indentation",
         {"a.yaml": "apiVersion: cronfile/v1\njobs:\n  a:\n    command: x\n   schedule: '@daily'\n"},
         [Expect("a.yaml", 5, 4, "YAML syntax")]),
    Case("tab-in-indentation",
         {"a.yaml": "apiVersion: cronfile/v1\njobs:\n  a:\n\tcommand: x\n"},
         [Expect("a.yaml", 4, 1, "tab in indentation")]),
    Case("not-utf8",
         {"a.yaml": b"apiVersion: cronfile/v1\n# caf\xe9 au lait\njobs: {}\n"},
         [Expect("a.yaml", 2, 6, "not UTF-8 (byte 0xe9)")]),
    Case("control-character",
         {"a.yaml": "apiVersion: cronfile/v1\njobs:\n  a:\n    command: 'a\x07b'\n"},
         [Expect("a.yaml", 4, 16, "U+0007 is not allowed")]),
    Case("duplicate-key-both-lines",
         {"a.yaml": job('schedule: "0 2 * * *"\ntimeout: 5m\ntimeout: 10m')},
         [Expect("a.yaml", 7, 5, "duplicate key 'timeout' (first at line 6")]),
    Case("duplicate-job-in-one-file",
         {"a.yaml": job('schedule: "@daily"') + "  nightly:\n    command: x\n    schedule: '@daily'\n"},
         [Expect("a.yaml", 6, 3, "duplicate key 'nightly' (first at line 3")]),
    Case("on-key-is-a-boolean",
         {"a.yaml": job('schedule: "@daily"\non: push')},
         [Expect("a.yaml", 6, 5, "key 'on' is read by YAML as a boolean")]),
    Case("no-key-is-a-boolean",
         {"a.yaml": job('schedule: "@daily"\nenv:\n  no: "1"')},
         [Expect("a.yaml", 7, 7, "key 'no' is read by YAML as a boolean")]),
    Case("yes-key-is-a-boolean",
         {"a.yaml": "apiVersion: cronfile/v1\nagents:\n  web-1:\n    labels: {yes: x}\n"},
         [Expect("a.yaml", 4, 14, "key 'yes' is read by YAML as a boolean")]),
    Case("number-key",
         {"a.yaml": job('schedule: "@daily"\nenv: {1: x}')},
         [Expect("a.yaml", 6, 11, "key '1' is read by YAML as a number")]),
    Case("python-tag-never-constructs",
         {"a.yaml": job('schedule: "@daily"\ndescription: !!python/object/apply:os.system '
                        '["touch PWNED"]')},
         [Expect("a.yaml", 6, 18, "tag !!python/object/apply:os.system is not allowed")]),
    Case("python-tag-on-a-mapping",
         {"a.yaml": job('schedule: "@daily"\nenv: !!python/object/new:os.system {A: b}')},
         [Expect("a.yaml", 6, 10, "tag !!python/object/new:os.system is not allowed")]),
    Case("local-tag",
         {"a.yaml": job('schedule: !cron "@daily"')},
         [Expect("a.yaml", 5, 15, "tag !cron is not allowed")]),
    Case("billion-laughs", {"a.yaml": LAUGHS},
         [Expect("a.yaml", 6, 47, "aliases expand to more than 10000 nodes")]),
    Case("recursive-alias",
         {"a.yaml": "apiVersion: cronfile/v1\njobs: &j\n  a: *j\n"},
         [Expect("a.yaml", 3, 6, "alias *j is inside its own anchor")]),
    Case("undefined-alias",
         {"a.yaml": job('schedule: *daily')},
         [Expect("a.yaml", 5, 15, "alias *daily names no anchor")]),
    Case("empty-file", {"a.yaml": ""}, [Expect("a.yaml", 1, 1, "file is empty")]),
    Case("only-comments", {"a.yaml": "# nothing here yet\n"},
         [Expect("a.yaml", 1, 1, "file is empty")]),
    Case("top-level-list", {"a.yaml": "# jobs\n- nightly\n- hourly\n"},
         [Expect("a.yaml", 2, 1, "top level must be a mapping")]),
    Case("top-level-scalar", {"a.yaml": "cronfile/v1\n"},
         [Expect("a.yaml", 1, 1, "top level must be a mapping")]),
    Case("file-over-1-mib",
         {"a.yaml": GOOD + "# " + "x" * (1024 * 1024) + "\n"},
         [Expect("a.yaml", 1, 1, "the limit is 1048576 (1 MiB)")]),
    Case("two-documents", {"a.yaml": GOOD + "---\n" + GOOD.replace("nightly", "hourly")},
         [Expect("a.yaml", 6, 1, "more than one YAML document")]),
    Case("nested-too-deep", {"a.yaml": "apiVersion: cronfile/v1\nx: " + "[" * 100_000 + "\n"},
         [Expect("a.yaml", 2, 67, "nested deeper than 64 levels")]),
]

SCHEMA_CASES = [
    Case("unknown-job-key",
         {"a.yaml": job('schedule: "@daily"\ntimout: 10m')},
         [Expect("a.yaml", 6, 5, "unknown key 'timout' (did you mean 'timeout'?)")]),
    Case("unknown-top-level-key",
         {"a.yaml": GOOD.replace("jobs:", "job:")},
         [Expect("a.yaml", 2, 1, "unknown key 'job' (did you mean 'jobs'?)")]),
    Case("unknown-nested-key",
         {"a.yaml": job('schedule: "@daily"\nretries:\n  max: 3\n  backof: 30s')},
         [Expect("a.yaml", 8, 7, "unknown key 'backof' (did you mean 'backoff'?)")]),
    Case("mapping-expected",
         {"a.yaml": job('schedule: "@daily"\nretries: 3')},
         [Expect("a.yaml", 6, 5, "must be a mapping, not an integer")]),
    Case("command-wrong-type",
         {"a.yaml": "apiVersion: cronfile/v1\njobs:\n  a:\n    schedule: '@daily'\n    command: 5\n"},
         [Expect("a.yaml", 5, 5, "must be a list or a string, not an integer")]),
    Case("env-value-not-a-string",
         {"a.yaml": job('schedule: "@daily"\nenv:\n  PORT: 8080')},
         [Expect("a.yaml", 7, 7, "must be a string or a mapping, not an integer")]),
    Case("missing-command",
         {"a.yaml": "apiVersion: cronfile/v1\njobs:\n  a:\n    schedule: '@daily'\n"},
         [Expect("a.yaml", 3, 3, "missing the required key 'command'")]),
    Case("empty-first-argv-word",
         {"a.yaml": "apiVersion: cronfile/v1\njobs:\n  a:\n    schedule: '@daily'\n"
                    "    command: ['', x]\n"},
         [Expect("a.yaml", 5, 15, "must not be empty")]),
    Case("bad-job-name",
         {"a.yaml": GOOD.replace("nightly", "Nightly_Backup")},
         [Expect("a.yaml", 3, 3, "'Nightly_Backup' is not a valid job name")]),
    Case("bad-agent-name",
         {"a.yaml": "apiVersion: cronfile/v1\nagents:\n  -web-1: {}\n"},
         [Expect("a.yaml", 3, 3, "'-web-1' is not a valid agent name")]),
    Case("name-too-long",
         {"a.yaml": GOOD.replace("nightly", "n" * 64)},
         [Expect("a.yaml", 3, 3, "is not a valid job name")]),
    Case("bad-duration",
         {"a.yaml": job('schedule: "@daily"\ntimeout: 10 minutes')},
         [Expect("a.yaml", 6, 5, "'10 minutes' is not a duration")]),
    Case("duration-over-100-years",
         {"a.yaml": job('schedule: "@daily"\ntimeout: 5300w')},
         [Expect("a.yaml", 6, 5, "'5300w' is longer than 100 years")]),
    Case("bad-duration-in-defaults-reported-once",
         {"a.yaml": "apiVersion: cronfile/v1\ndefaults:\n  timeout: 9999999w\njobs:\n"
                    "  a: {command: x, schedule: '@daily'}\n  b: {command: x, schedule: '@daily'}\n"},
         [Expect("a.yaml", 3, 3, "is longer than 100 years")]),
    Case("bad-enum",
         {"a.yaml": job('schedule: "@daily"\nconcurrency: forbit')},
         [Expect("a.yaml", 6, 5, "'forbit' is not one of allow, forbid, replace, queue (did you mean "
                                 "'forbid'?)")]),
    Case("bad-strategy",
         {"a.yaml": job('schedule: "@daily"\ntargets: {strategy: random}')},
         [Expect("a.yaml", 6, 15, "'random' is not one of one, all, hash, failover, shard")]),
    Case("retry-factor-nan",
         {"a.yaml": job('schedule: "@daily"\nretries: {factor: .nan}')},
         [Expect("a.yaml", 6, 15, "must be a number from 1 to 1000, not nan")]),
    Case("missing-apiversion", {"a.yaml": GOOD.replace("apiVersion: cronfile/v1\n", "")},
         [Expect("a.yaml", 1, 1, "missing apiVersion (supported: cronfile/v1)")]),
    Case("unsupported-apiversion", {"a.yaml": GOOD.replace("cronfile/v1", "cronfile/v2")},
         [Expect("a.yaml", 1, 1, "'cronfile/v2' is not supported (supported: cronfile/v1)")]),
]

SEMANTIC_CASES = [
    Case("four-fields", {"a.yaml": job('schedule: "0 2 * *"')},
         [Expect("a.yaml", 5, 5, "4 fields in '0 2 * *': use 5")]),
    Case("seven-fields", {"a.yaml": job('schedule: "0 0 2 * * * 2026"')},
         [Expect("a.yaml", 5, 5, "7 fields")]),
    Case("minute-out-of-range", {"a.yaml": job('schedule: "60 2 * * *"')},
         [Expect("a.yaml", 5, 5, "60 is out of range for minute (0-59)")]),
    Case("seconds-out-of-range", {"a.yaml": job('schedule: "61 0 2 * * *"')},
         [Expect("a.yaml", 5, 5, "61 is out of range for second (0-59)")]),
    Case("random-R-refused", {"a.yaml": job('schedule: "R 2 * * *"')},
         [Expect("a.yaml", 5, 5, "R (random) in the minute field is not supported")]),
    Case("quartz-L-refused", {"a.yaml": job('schedule: "0 2 L * *"')},
         [Expect("a.yaml", 5, 5, "L, W and # are not supported in the day-of-month field")]),
    Case("never-fires", {"a.yaml": job('schedule: "0 0 30 2 *"')},
         [Expect("a.yaml", 5, 5, "'0 0 30 2 *' never fires")]),
    Case("unknown-nickname", {"a.yaml": job('schedule: "@fortnightly"')},
         [Expect("a.yaml", 5, 5, "unknown nickname '@fortnightly'")]),
    Case("every-too-short", {"a.yaml": job('schedule: "@every 500ms"')},
         [Expect("a.yaml", 5, 5, "@every needs an interval of at least 1s")]),
    Case("bad-item-in-schedule-list",
         {"a.yaml": job('schedule:\n  - "0 2 * * *"\n  - "0 25 * * *"')},
         [Expect("a.yaml", 7, 9, "25 is out of range for hour")]),
    Case("unknown-time-zone", {"a.yaml": job('schedule: "@daily"\ntimezone: Europe/Berln')},
         [Expect("a.yaml", 6, 5, "unknown time zone 'Europe/Berln'")]),
    Case("unknown-time-zone-in-defaults-once",
         {"a.yaml": "apiVersion: cronfile/v1\ndefaults:\n  timezone: Mars/Olympus\njobs:\n"
                    "  a: {command: x, schedule: '@daily'}\n  b: {command: x, schedule: '@daily'}\n"},
         [Expect("a.yaml", 3, 3, "unknown time zone 'Mars/Olympus'")]),
    Case("job-name-in-two-files",
         {"a.yaml": GOOD, "team/b.yaml": GOOD},
         [Expect("a.yaml", 3, 3, "job 'nightly' is also defined at {root}/team/b.yaml:3"),
          Expect("team/b.yaml", 3, 3, "job 'nightly' is also defined at {root}/a.yaml:3")]),
    Case("agent-in-two-files",
         {"a.yaml": "apiVersion: cronfile/v1\nagents:\n  web-1: {}\n",
          "b.yaml": "apiVersion: cronfile/v1\n\nagents:\n  web-1: {labels: {role: web}}\n"},
         [Expect("a.yaml", 3, 3, "agent 'web-1' is also defined at {root}/b.yaml:4"),
          Expect("b.yaml", 4, 3, "agent 'web-1' is also defined at {root}/a.yaml:3")]),
    Case("after-unknown-job",
         {"a.yaml": GOOD + "  report:\n    command: x\n    after: [nightly, nightley-2]\n"},
         [Expect("a.yaml", 8, 22, "no job named 'nightley-2' (did you mean 'nightly'?)")]),
    Case("ssh-transport-to-agent-without-ssh",
         {"a.yaml": job('schedule: "@daily"\ntargets: {agents: [web-1], transport: ssh}',
                        head="agents:\n  web-1: {labels: {role: web}}\n")},
         [Expect("a.yaml", 8, 32, "transport: ssh, but agent 'web-1' declares no ssh:")]),
    Case("ssh-transport-to-labelled-agent-without-ssh",
         {"a.yaml": job('schedule: "@daily"\ntargets: {labels: {role: web}, transport: ssh}',
                        head="agents:\n  web-1: {labels: {role: web}}\n"
                             "  web-2: {labels: {role: web}, ssh: {host: web-2}}\n")},
         [Expect("a.yaml", 9, 36, "transport: ssh, but agent 'web-1' declares no ssh:")],
         exact=True),
    Case("after-cycle",
         {"a.yaml": "apiVersion: cronfile/v1\njobs:\n"
                    "  a: {command: x, after: c}\n  b: {command: x, after: a}\n"
                    "  c: {command: x, after: b}\n"},
         [Expect("a.yaml", 4, 19, "cycle: a -> c -> b -> a")]),
    Case("after-itself",
         {"a.yaml": "apiVersion: cronfile/v1\njobs:\n  a:\n    command: x\n    after: [a]\n"},
         [Expect("a.yaml", 5, 5, "cycle: a -> a")]),
    Case("target-undeclared-agent",
         {"a.yaml": job('schedule: "@daily"\ntargets: {agents: [web-1, web-9]}'),
          "inventory.yaml": "apiVersion: cronfile/v1\nagents:\n  web-1: {}\n"},
         [Expect("a.yaml", 6, 31, "agent 'web-9' is not declared")]),
    Case("local-cannot-be-declared",
         {"a.yaml": "apiVersion: cronfile/v1\nagents:\n  local: {}\n"},
         [Expect("a.yaml", 3, 3, "'local' is the center's own host")]),
    Case("schedule-and-trigger",
         {"a.yaml": job('schedule: "@daily"\ntrigger: {event: deploy}')},
         [Expect("a.yaml", 6, 5, "exactly one of schedule, trigger, after, run_at (this one has "
                                 "schedule and trigger)")]),
    Case("none-of-schedule-trigger-after",
         {"a.yaml": job("description: forgot the schedule")},
         [Expect("a.yaml", 3, 3, "needs one of schedule, trigger, after or run_at")]),
    Case("daemon-with-schedule",
         {"a.yaml": job('kind: daemon\nschedule: "@daily"')},
         [Expect("a.yaml", 6, 5, "a daemon runs all the time: remove 'schedule'")]),
    Case("problems-of-one-job-all-at-once",
         {"a.yaml": job('schedule: "0 2 * * 8"\ntimout: 1m')},
         [Expect("a.yaml", 5, 5, "8 is out of range for day-of-week"),
          Expect("a.yaml", 6, 5, "unknown key 'timout'")]),
]


CASES = [*YAML_CASES, *SCHEMA_CASES, *SEMANTIC_CASES]


def run_in_process(args: list[str]) -> subprocess.CompletedProcess[str]:
    """The command's own entry point (:func:`cronfile.cli.main`, the error boundary the
    installed script calls) in this process: the same parsing, checks and printing, without
    a process start per case. The tests below this table run the installed command."""
    with CliRunner().isolation(env={"NO_COLOR": "1", "CRONFILE_DEBUG": None}) as (out, err, _):
        code = main(args)
        stdout, stderr = out.getvalue().decode(), err.getvalue().decode()
    assert "Traceback" not in stderr + stdout, stderr
    assert "internal error" not in stderr, stderr
    return subprocess.CompletedProcess(["cronfile", *args], code, stdout, stderr)


@pytest.fixture(scope="module")
def table(tmp_path_factory: pytest.TempPathFactory
          ) -> dict[str, tuple[Path, subprocess.CompletedProcess[str]]]:
    """Every case of the table, each validated by the command's entry point in-process (a
    process start per case cost more than all the validating)."""
    def one(case: Case) -> tuple[Path, subprocess.CompletedProcess[str]]:
        tmp = tmp_path_factory.mktemp(case.id)
        root = tmp / "schedules"
        write(root, case.files)
        return root, run_in_process(["validate", "--format", "json", str(root)])

    return {case.id: one(case) for case in CASES}


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_input(case: Case, table: dict[str, tuple[Path, subprocess.CompletedProcess[str]]]
                   ) -> None:
    root, done = table[case.id]
    assert done.returncode == case.code, done.stdout + done.stderr
    found = problems_of(done)
    for want in case.expect:
        file = str(root / want.file)
        fragment = want.fragment.format(root=root)
        match = [p for p in found if p["file"] == file and p["line"] == want.line
                 and fragment in str(p["message"]) and p["severity"] == want.severity
                 and (want.column is None or p["column"] == want.column)]
        assert match, f"no {want} in\n{json.dumps(found, indent=2)}"
    if case.exact:
        assert len(found) == len(case.expect), json.dumps(found, indent=2)


def test_the_bad_input_table_is_large_enough() -> None:
    assert len(YAML_CASES) + len(SCHEMA_CASES) + len(SEMANTIC_CASES) >= 30


def test_python_tag_constructs_nothing(tmp_path: Path) -> None:
    root = tmp_path / "schedules"
    write(root, {"a.yaml": job('schedule: "@daily"\ndescription: !!python/object/apply:os.system '
                               '["touch PWNED"]')})
    run(["validate", str(root)], tmp_path)
    run(["validate", str(root)], root)
    assert not (tmp_path / "PWNED").exists() and not (root / "PWNED").exists()


def test_symlink_outside_the_directory_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "schedules"
    write(root, {"a.yaml": GOOD})
    write(tmp_path / "elsewhere", {"b.yaml": GOOD.replace("nightly", "other"),
                                   "c/d.yaml": GOOD.replace("nightly", "third")})
    (root / "b.yaml").symlink_to(tmp_path / "elsewhere" / "b.yaml")
    (root / "linked").symlink_to(tmp_path / "elsewhere" / "c")
    (root / "inside.yaml").symlink_to(root / "a.yaml")  # inside: read (and a duplicate)
    done = run(["validate", "--format", "json", str(root)], tmp_path)
    assert done.returncode == 1
    found = problems_of(done)
    refused = sorted(p["file"] for p in found if "points outside" in str(p["message"]))
    assert refused == [str(root / "b.yaml"), str(root / "linked")]
    assert all(p["line"] == 1 for p in found if p["file"] in refused)
    assert any("job 'nightly' is also defined" in str(p["message"]) for p in found)


def test_good_inputs_pass(tmp_path: Path) -> None:
    root = tmp_path / "schedules"
    write(root, {
        "inventory.yaml": "apiVersion: cronfile/v1\nagents:\n"
                          "  web-1: {labels: {role: web}, ssh: {host: web-1.internal}}\n"
                          "  web-2: {labels: {role: web}}\n",
        "team/all.yml": """\
# yaml-language-server: $schema=../../schema/cronfile-v1.json
apiVersion: cronfile/v1
defaults: &defaults
  timezone: Europe/Berlin
  timeout: 10m
  retries: {max: 3, backoff: 30s, factor: 2}
  env: {"on": "quoted keys are strings", TOKEN: {from_env: TOKEN}}
jobs:
  five-fields: {command: [/bin/true], schedule: "30 4 * * *"}
  six-fields: {command: /bin/true, schedule: "*/10 * * * * *"}
  nicknames: {command: x, schedule: ["@hourly", "@daily", "@midnight", "@weekly", "@monthly",
                                     "@yearly", "@annually"]}
  every: {command: x, schedule: "@every 1h30m"}
  hashed: {command: x, schedule: "H H(0-5) * * 1-5", timezone: America/New_York}
  named: {command: x, schedule: "0 9 * JAN-MAR MON,WED,fri"}
  leap-day: {command: x, schedule: "0 0 29 2 *"}
  chained: {command: x, after: [five-fields, every]}
  chained-2: {command: x, after: chained}
  on-deploy: {command: x, trigger: {event: deploy, delay: 30s}}
  worker: {command: x, kind: daemon, replicas: 2, restart: {policy: on-failure}}
  fleet: {command: x, schedule: "@daily", targets: {labels: {role: web}, strategy: all}}
  pinned: {command: x, schedule: "@daily", targets: {agents: [web-1, local]}}
  paused: {command: x, schedule: "@daily", suspend: true}
""",
    })
    done = run(["validate", str(root)], tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout == ""
    assert done.stderr == "2 files, 14 jobs, 2 agents: 0 errors, 0 warnings\n"


@pytest.mark.parametrize("directory", ["schedules", *sorted(
    str(p.relative_to(REPO)) for p in (REPO / "examples").glob("*/schedules"))])
def test_shipped_schedules_pass(directory: str) -> None:
    """No errors, and no warnings but the daylight-saving ones of the nightly jobs the
    examples schedule in Europe/Berlin on purpose (the user sees what that day does)."""
    done = run(["validate", directory], REPO)
    assert done.returncode == 0, done.stdout + done.stderr
    assert " 0 errors, " in done.stderr
    for line in done.stdout.splitlines():
        assert ": warning: " in line and "daylight saving in Europe/Berlin: " in line, line


def test_default_directory_is_schedules_in_the_current_directory(tmp_path: Path) -> None:
    write(tmp_path / "schedules", {"a.yaml": GOOD})
    done = run(["validate"], tmp_path)
    assert done.returncode == 0
    assert done.stderr.startswith("1 files, 1 jobs")


def test_all_problems_in_one_run(tmp_path: Path) -> None:
    """Two bad files are both reported, and a good file beside them is still checked (its
    warning shows it was)."""
    root = tmp_path / "schedules"
    write(root, {
        "a-broken.yaml": "apiVersion: cronfile/v1\njobs: [\n",
        "b-typo.yaml": job('schedule: "@daily"\ntimout: 1m', name="typo"),
        "c-good.yaml": job('schedule: "@daily"\nreplicas: 2', name="good"),
    })
    done = run(["validate", str(root)], tmp_path)
    assert done.returncode == 1
    lines = done.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == [
        str(root / "a-broken.yaml"), str(root / "b-typo.yaml"), str(root / "c-good.yaml")]
    assert lines[0].startswith(f"{root}/a-broken.yaml:3:1: error: YAML syntax")
    assert lines[1] == (f"{root}/b-typo.yaml:6:5: error: jobs.typo.timout: unknown key 'timout' "
                        "(did you mean 'timeout'?)")
    assert lines[2] == (f"{root}/c-good.yaml:6:5: warning: jobs.good.replicas: 'replicas' only "
                        "applies to kind: daemon; ignored")
    assert done.stderr == "3 files, 1 jobs, 0 agents: 2 errors, 1 warnings\n"


def test_format_json_shape(tmp_path: Path) -> None:
    root = tmp_path / "schedules"
    write(root, {"a.yaml": job('schedule: "@daily"\ntimout: 1m')})
    done = run(["validate", "--format", "json", str(root)], tmp_path)
    assert done.returncode == 1
    assert done.stderr == ""
    assert json.loads(done.stdout) == {
        "ok": False, "files": 1, "jobs": 0, "agents": 0, "errors": 1, "warnings": 0,
        "problems": [{"file": str(root / "a.yaml"), "line": 6, "column": 5,
                      "severity": "error", "path": "jobs.nightly.timout",
                      "message": "unknown key 'timout' (did you mean 'timeout'?)"}],
    }
    write(root, {"a.yaml": GOOD})
    done = run(["validate", "--format", "json", str(root)], tmp_path)
    assert done.returncode == 0
    assert json.loads(done.stdout) == {"ok": True, "files": 1, "jobs": 1, "agents": 0,
                                       "errors": 0, "warnings": 0, "problems": []}


def test_format_github_shape(tmp_path: Path) -> None:
    root = tmp_path / "sched,ules"  # a comma must be escaped in the file= property
    write(root, {"a.yaml": job('schedule: "@daily"\nreplicas: 2\ntimout: 1m')})
    done = run(["validate", "--format", "github", str(root)], tmp_path)
    assert done.returncode == 1
    escaped = str(root / "a.yaml").replace(",", "%2C")
    assert done.stdout.splitlines() == [
        f"::warning file={escaped},line=6,col=5,title=cronfile::jobs.nightly.replicas: "
        "'replicas' only applies to kind: daemon; ignored",
        f"::error file={escaped},line=7,col=5,title=cronfile::jobs.nightly.timout: unknown key "
        "'timout' (did you mean 'timeout'?)",
    ]


def test_strict_turns_a_warning_into_an_error(tmp_path: Path) -> None:
    root = tmp_path / "schedules"
    write(root, {"a.yaml": job('schedule: "@daily"\nreplicas: 2')})
    relaxed = run(["validate", str(root)], tmp_path)
    assert relaxed.returncode == 0
    assert ": warning: jobs.nightly.replicas:" in relaxed.stdout
    strict = run(["validate", "--strict", str(root)], tmp_path)
    assert strict.returncode == 1
    assert f"{root}/a.yaml:6:5: error: jobs.nightly.replicas:" in strict.stdout
    assert strict.stderr == "1 files, 1 jobs, 0 agents: 1 errors, 0 warnings\n"


@pytest.mark.parametrize("args", [["validate", "--no-such-option"], ["validate", "--format", "xml"],
                                  ["validate", "does-not-exist"], ["valdate"]])
def test_usage_errors_exit_2(args: list[str], tmp_path: Path) -> None:
    done = run(args, tmp_path)
    assert done.returncode == 2, done.stdout + done.stderr


def test_validate_one_file_resolves_references_in_its_directory(tmp_path: Path) -> None:
    """A FILE is checked with the rest of its schedules directory: its ``after`` and
    targets resolve against the other files, and only its own problems are shown."""
    root = tmp_path / "repo" / "schedules"
    write(root, {
        "inventory.yaml": "apiVersion: cronfile/v1\nagents:\n  db-1: {}\n",
        "etl/extract.yaml": GOOD.replace("nightly", "extract"),
        "etl/load.yaml": "apiVersion: cronfile/v1\njobs:\n  load:\n    command: x\n"
                         "    after: extract\n    targets: {agents: [db-1]}\n",
        "other/broken.yaml": "apiVersion: [\n",
    })
    load = root / "etl" / "load.yaml"
    for cwd, arg in ((tmp_path, str(load)), (tmp_path / "repo", "schedules/etl/load.yaml"),
                     (root / "etl", "load.yaml")):
        done = run(["validate", arg], cwd)
        assert done.returncode == 0, (cwd, done.stdout, done.stderr)
        assert done.stdout == ""
        assert done.stderr == "1 files, 1 jobs, 0 agents: 0 errors, 0 warnings\n"
    (root / "etl" / "extract.yaml").unlink()
    done = run(["validate", str(load)], tmp_path)
    assert done.returncode == 1
    assert done.stdout == f"{load}:5:5: error: jobs.load.after: no job named 'extract'\n"
    done = run(["validate", str(root / "other" / "broken.yaml")], tmp_path)
    assert done.returncode == 1
    assert done.stdout.startswith(f"{root}/other/broken.yaml:2:1: error: YAML syntax")


def test_a_file_that_is_not_a_schedule_file(tmp_path: Path) -> None:
    root = tmp_path / "schedules"
    write(root, {"a.yaml": GOOD, "notes.txt": "hello"})
    done = run(["validate", str(root / "notes.txt")], tmp_path)
    assert done.returncode == 1
    assert "not a schedule file" in done.stdout


def test_an_empty_directory_is_a_warning(tmp_path: Path) -> None:
    (tmp_path / "schedules").mkdir()
    done = run(["validate"], tmp_path)
    assert done.returncode == 0
    assert "warning: no schedule files" in done.stdout
    assert run(["validate", "--strict"], tmp_path).returncode == 1
