"""What ``cronfile validate`` says about the mistakes people actually make.

Each case is one small file checked by the installed command; the test asserts the exact
line printed (file, line, column, severity, ``path: message``), so a hint that is lost, or
a message that leaks raw schema text, fails here.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from conftest import cronfile_command


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "NO_COLOR": "1"}
    env.pop("CRONFILE_DEBUG", None)
    done = subprocess.run([*cronfile_command(), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=60, env=env)
    assert "Traceback" not in done.stderr + done.stdout, done.stderr
    assert "internal error" not in done.stderr, done.stderr
    return done


def validate(tmp_path: Path, text: str) -> tuple[int, list[str]]:
    root = tmp_path / "schedules"
    root.mkdir(exist_ok=True)
    (root / "a.yaml").write_text(text, encoding="utf-8")
    done = run(["validate"], tmp_path)
    return done.returncode, done.stdout.splitlines()


def one_job(body: str) -> str:
    lines = "".join(f"    {line}\n" for line in body.splitlines())
    return f"apiVersion: cronfile/v1\njobs:\n  a:\n    command: [/bin/true]\n{lines}"


# --------------------------------------------------------------------------- item 8


@pytest.mark.parametrize(("value", "column", "fixed"), [
    ("*/5 * * * *", 15, "schedule: \"*/5 * * * *\""),
    ("@daily", 15, "schedule: \"@daily\""),
])
def test_an_unquoted_expression_gets_the_exact_fix(tmp_path: Path, value: str, column: int,
                                                   fixed: str) -> None:
    code, lines = validate(tmp_path, one_job(f"schedule: {value}"))
    assert code == 1
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"schedules/a.yaml:5:{column}: error: YAML syntax: ")
    assert lines[0].endswith(f"; a schedule starting with {value[0]!r} must be quoted: "
                             f"write {fixed}")


def test_an_unquoted_expression_in_a_list_gets_the_fix(tmp_path: Path) -> None:
    code, lines = validate(tmp_path, one_job("schedule:\n  - \"@hourly\"\n  - */10 * * * *"))
    assert code == 1
    assert lines[0].endswith("must be quoted: write - \"*/10 * * * *\""), lines


# --------------------------------------------------------------------------- item 14


def test_a_misspelled_api_version_key_still_checks_the_rest(tmp_path: Path) -> None:
    text = ("apiVersoin: cronfile/v1\njobs:\n  a:\n    command: [/bin/true]\n"
            "    schedule: \"0 25 * * *\"\n    timeout: soon\n")
    code, lines = validate(tmp_path, text)
    assert code == 1
    assert lines == [
        "schedules/a.yaml:1:1: error: apiVersoin: unknown key 'apiVersoin' (did you mean "
        "'apiVersion'?)",
        "schedules/a.yaml:5:5: error: jobs.a.schedule: 25 is out of range for hour (0-23)",
        "schedules/a.yaml:6:5: error: jobs.a.timeout: 'soon' is not a duration "
        "(write e.g. 90s, 10m, 1h30m, 500ms)",
    ]


def test_a_missing_api_version_still_checks_the_rest(tmp_path: Path) -> None:
    code, lines = validate(tmp_path, "jobs:\n  a:\n    command: [/bin/true]\n    schedule: x\n")
    assert code == 1
    assert lines[0] == "schedules/a.yaml:1:1: error: missing apiVersion (supported: cronfile/v1)"
    assert lines[1].startswith("schedules/a.yaml:4:5: error: jobs.a.schedule: 1 fields in 'x'")


# --------------------------------------------------------------------------- item 15


@pytest.mark.parametrize(("schedule", "message"), [
    ("*/90 * * * *", "warning: jobs.a.schedule: a step of 90 is larger than the minute field "
     "(0-59): '*/90' means only minute 0, so this fires once an hour"),
    ("0 */30 * * *", "warning: jobs.a.schedule: a step of 30 is larger than the hour field "
     "(0-23): '*/30' means only hour 0, so this fires once a day"),
    ("*/75 * * * * *", "warning: jobs.a.schedule: a step of 75 is larger than the second field "
     "(0-59): '*/75' means only second 0, so this fires once a minute"),
])
def test_a_step_larger_than_its_field_warns(tmp_path: Path, schedule: str, message: str) -> None:
    code, lines = validate(tmp_path, one_job(f"schedule: \"{schedule}\""))
    assert code == 0
    assert lines == [f"schedules/a.yaml:5:5: {message}"]


def test_six_fields_that_look_like_five_plus_a_year_warn(tmp_path: Path) -> None:
    code, lines = validate(tmp_path, one_job("schedule: \"0 12 * * 1 *\""))
    assert code == 0
    assert lines == [
        "schedules/a.yaml:5:5: warning: jobs.a.schedule: 6 fields are read seconds first "
        "(second minute hour day month weekday): '0 12 * * 1 *' fires at minute 12 of every "
        "hour in January; for 5 fields drop the last one: \"0 12 * * 1\""]


def test_six_fields_with_a_year_get_the_hint_on_the_error(tmp_path: Path) -> None:
    code, lines = validate(tmp_path, one_job("schedule: \"30 2 * * * 2026\""))
    assert code == 1
    assert lines == [
        "schedules/a.yaml:5:5: error: jobs.a.schedule: 2026 is out of range for day-of-week "
        "(0-7); 6 fields are read seconds first (second minute hour day month weekday), and "
        "years are not supported: for 5 fields drop the last one: \"30 2 * * *\""]


def test_aws_cron_gets_the_cronfile_spelling(tmp_path: Path) -> None:
    code, lines = validate(tmp_path, one_job("schedule: \"0 12 * * ? *\""))
    assert code == 1
    assert lines == [
        "schedules/a.yaml:5:5: error: jobs.a.schedule: '?' is only allowed in day-of-month "
        "and day-of-week, not month; this looks like an AWS cron expression (minute hour day "
        "month weekday year): in cronfile write \"0 12 * * *\""]


def test_a_fixed_offset_zone_warns_and_names_an_iana_zone(tmp_path: Path) -> None:
    code, lines = validate(tmp_path, one_job("schedule: \"0 12 * * *\"\ntimezone: EST"))
    assert code == 0
    assert lines == [
        "schedules/a.yaml:6:5: warning: jobs.a.timezone: 'EST' is a fixed offset "
        "(UTC-05:00) with no daylight saving; for the local time of that region write an "
        "IANA zone such as America/New_York"]


@pytest.mark.parametrize(("zone", "hint"), [
    ("Europe/Berln", "(did you mean 'Europe/Berlin'?)"),
    ("PST", "(PST is an abbreviation, not a zone: write e.g. America/Los_Angeles)"),
])
def test_an_unknown_zone_gets_a_suggestion(tmp_path: Path, zone: str, hint: str) -> None:
    code, lines = validate(tmp_path, one_job(f"schedule: \"0 12 * * *\"\ntimezone: {zone}"))
    assert code == 1
    assert lines == [f"schedules/a.yaml:6:5: error: jobs.a.timezone: unknown time zone "
                     f"{zone!r} {hint}"]


@pytest.mark.parametrize(("body", "line"), [
    ("schedule: \"@daily\"\nnotify: {webhook: \"ftp://hooks.example\"}",
     "schedules/a.yaml:6:14: error: jobs.a.notify.webhook: 'ftp://hooks.example' is not an "
     "http:// or https:// URL"),
    ("schedule: \"@daily\"\nrun_as: \"ops team\"",
     "schedules/a.yaml:6:5: error: jobs.a.run_as: 'ops team' is not a user name (no spaces "
     "or ':')"),
])
def test_no_raw_schema_text_in_messages(tmp_path: Path, body: str, line: str) -> None:
    code, lines = validate(tmp_path, one_job(body))
    assert code == 1
    assert lines == [line]
    assert "^" not in line and "\\" not in line


def test_a_blank_command_says_so_in_words(tmp_path: Path) -> None:
    text = "apiVersion: cronfile/v1\njobs:\n  a:\n    command: \"  \"\n    schedule: \"@daily\"\n"
    code, lines = validate(tmp_path, text)
    assert code == 1
    assert lines == ["schedules/a.yaml:4:5: error: jobs.a.command: must not be blank"]


def test_retries_as_a_number_suggests_the_mapping(tmp_path: Path) -> None:
    code, lines = validate(tmp_path, one_job("schedule: \"@daily\"\nretries: 3"))
    assert code == 1
    assert lines == ["schedules/a.yaml:6:5: error: jobs.a.retries: must be a mapping, not an "
                     "integer (write retries: {max: 3})"]


def test_one_error_format_in_validate_plan_and_next(tmp_path: Path) -> None:
    """The same problem reads the same (``file:line:col: severity: path: message``) whichever
    command reports it."""
    validate(tmp_path, one_job("schedule: \"0 25 * * *\""))
    expected = ("schedules/a.yaml:5:5: error: jobs.a.schedule: 25 is out of range for hour "
                "(0-23)")
    assert run(["validate"], tmp_path).stdout.splitlines() == [expected]
    assert run(["plan"], tmp_path).stdout.splitlines()[0] == expected
    assert run(["next"], tmp_path).stdout.splitlines()[0] == expected


def test_every_pattern_in_the_schema_has_a_message_in_words() -> None:
    """A pattern added to the schema without a message would print the regular expression."""
    import json

    from cronfile.schedules.schema import KNOWN_PATTERN_MARKERS, schema_text

    patterns: list[str] = []

    def walk(node: object) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "pattern" and isinstance(value, str):
                    patterns.append(value)
                else:
                    walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(json.loads(schema_text()))
    assert patterns
    unknown = [p for p in patterns if not any(m in p for m in KNOWN_PATTERN_MARKERS)]
    assert unknown == []


# --------------------------------------------------------------------------- item 12


def test_a_fixed_local_time_in_a_gap_or_overlap_warns(tmp_path: Path) -> None:
    import re

    code, lines = validate(tmp_path, one_job("schedule: \"30 2 * * *\"\ntimezone: Europe/Berlin"))
    assert code == 0
    assert len(lines) == 1, lines
    day = r"\d{4}-\d{2}-\d{2}"
    assert re.fullmatch(
        "schedules/a.yaml:5:5: warning: jobs.a.schedule: daylight saving in Europe/Berlin: "
        f"on {day} 02:30 does not exist \\(clocks go forward 1h at 02:00\\): it fires once, "
        f"at 03:00; on {day} 02:30 happens twice \\(clocks go back 1h at 03:00\\): it fires "
        "once, in the first pass \\(CEST\\)", lines[0]), lines[0]


@pytest.mark.parametrize("body", [
    "schedule: \"*/15 * * * *\"\ntimezone: Europe/Berlin",  # interval: follows elapsed time
    "schedule: \"30 4 * * *\"\ntimezone: Europe/Berlin",  # outside the changed hours
    "schedule: \"30 2 * * *\"",  # UTC
    "schedule: \"@every 1h\"\ntimezone: Europe/Berlin",
])
def test_no_daylight_saving_warning_when_no_fixed_time_is_touched(tmp_path: Path,
                                                                   body: str) -> None:
    assert validate(tmp_path, one_job(body)) == (0, [])


def test_the_warnings_of_a_list_of_schedules_name_the_item(tmp_path: Path) -> None:
    code, lines = validate(tmp_path, one_job(
        "timezone: America/New_York\nschedule:\n  - \"0 12 * * *\"\n  - \"30 1 * * *\""))
    assert code == 0
    assert len(lines) == 1 and lines[0].startswith(
        "schedules/a.yaml:8:9: warning: jobs.a.schedule[1]: daylight saving in "
        "America/New_York: on "), lines


def test_another_unquoted_value_gets_the_fix_in_general_words(tmp_path: Path) -> None:
    code, lines = validate(tmp_path, one_job("schedule: \"@daily\"\ndescription: @team-ops  # who"))
    assert code == 1
    assert lines[0].startswith("schedules/a.yaml:6:18: error: YAML syntax: "), lines
    assert lines[0].endswith("; a value starting with '@' must be quoted: write "
                             "description: \"@team-ops\"")


@pytest.mark.parametrize(("text", "hint"), [
    ("0 12 ? * 2-6 *", "; this looks like an AWS cron expression (minute hour day month weekday "
     "year): in cronfile write \"0 12 * * 1-5\""),  # AWS numbers weekdays from 1 = Sunday
    ("0 12 ? * MON-FRI 2027", "; this looks like an AWS cron expression (minute hour day "
     "month weekday year): in cronfile write \"0 12 * * MON-FRI\""),
    ("0 0 12 * * 2026", "; 6 fields are read seconds first (second minute hour day month "
     "weekday), and years are not supported: for 5 fields drop the last one: \"0 0 12 * *\""),
    ("0 0 12 31 2 *", ""),  # never fires, and not another system's syntax
    ("0 0 25 * * * *", ""),  # 7 fields: the field count error says it all
])
def test_error_hints_for_other_systems(text: str, hint: str) -> None:
    from cronfile.schedules.lint import error_hint

    assert error_hint(text) == hint


@pytest.mark.parametrize(("text", "warnings"), [
    ("30/30 * * * *", ("a step of 30 is larger than the minute field (0-59): '30/30' means "
                       "only minute 30, so this fires once an hour",)),
    ("10-20/15 9 * * *", ("a step of 15 is larger than the range 10-20: '10-20/15' means "
                          "only minute 10",)),
    ("0 0 * * */7", ("a step of 7 is larger than the day-of-week field (0-6): '*/7' means "
                     "only day-of-week 0",)),
    ("*/30 * * * *", ()),
    ("0 0 12 * * ?", ()),  # Quartz, seconds first, as meant
    ("H/15 * * * *", ()),
])
def test_expression_warnings(text: str, warnings: tuple[str, ...]) -> None:
    from cronfile.schedules.lint import expression_warnings

    assert expression_warnings(text) == warnings
