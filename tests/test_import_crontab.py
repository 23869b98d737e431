"""``cronfile import crontab``: real crontabs in, schedule files that validate out, and the
fire times of every imported line equal to cron's own.

The corpus under tests/data/crontabs/ is what Debian ships (``debian/``: /etc/crontab and
the /etc/cron.d files of sysstat, certbot, php, anacron and e2fsprogs, copied from the
installed packages) plus user crontabs with MAILTO, PATH, SHELL, CRON_TZ, TZ, RANDOM_DELAY,
nicknames, named ranges and ``%``.

The reference below is written from cron's rules (cronie's entry.c and cron.c), not from
cronfile's code: fields as sets (``N/S`` = ``N-max/S``, 0 and 7 = Sunday, a field starting
with ``*`` is unrestricted, day-of-month OR day-of-week when both are restricted) and
daylight saving as cronie does it (a job whose minute and hour fields do not start with
``*`` runs once at the end of a spring-forward gap and once in a repeated hour; any other
job runs at every real minute that matches).
"""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from cronfile.schedules.crontab import import_crontabs, parse_crontab
from cronfile.schedules.firetimes import JobTimer
from cronfile.schedules.loader import load_file
from cronfile.schedules.problems import Severity

DATA = Path(__file__).parent / "data" / "crontabs"
DEBIAN = sorted((DATA / "debian").iterdir())
USER = sorted((DATA / "user").iterdir())
CRONFILE = [sys.executable, "-m", "cronfile"]

YEAR_START = datetime(2026, 1, 1, tzinfo=UTC).timestamp()
YEAR_END = datetime(2027, 1, 1, tzinfo=UTC).timestamp()


# --------------------------------------------------------------------------- reference cron

MONTHS = {m: i for i, m in enumerate(
    ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"], start=1)}
DAYS = {d: i for i, d in enumerate(["sun", "mon", "tue", "wed", "thu", "fri", "sat"])}
NICKNAMES = {"@yearly": "0 0 1 1 *", "@annually": "0 0 1 1 *", "@monthly": "0 0 1 * *",
             "@weekly": "0 0 * * 0", "@daily": "0 0 * * *", "@midnight": "0 0 * * *",
             "@hourly": "0 * * * *"}
LIMITS = [(0, 59, {}), (0, 23, {}), (1, 31, {}), (1, 12, MONTHS), (0, 7, DAYS)]


def ref_field(text: str, low: int, high: int, names: dict[str, int]) -> set[int]:
    def value(token: str) -> int:
        return names[token.lower()] if token.lower() in names else int(token)

    out: set[int] = set()
    for item in text.split(","):
        base, slash, step_text = item.partition("/")
        step = int(step_text) if slash else 1
        if base == "*":
            first, last = low, high
        elif "-" in base:
            a, b = base.split("-")
            first, last = value(a), value(b)
        else:
            first = value(base)
            last = high if slash else first  # cronie: N/S is N-max/S
        out.update(range(first, last + 1, step))
    return out


class RefLine:
    """One crontab entry under cron's rules."""

    def __init__(self, schedule: str, zone: str) -> None:
        fields = NICKNAMES.get(schedule.split()[0], schedule).split()
        sets = [ref_field(f, *limits) for f, limits in zip(fields, LIMITS, strict=True)]
        self.minutes, self.hours, self.days, self.months = (sorted(s) for s in sets[:4])
        self.weekdays = {0 if d == 7 else d for d in sets[4]}
        self.dom_star, self.dow_star = fields[2].startswith("*"), fields[4].startswith("*")
        self.fixed = not (fields[0].startswith("*") or fields[1].startswith("*"))
        self.zone = ZoneInfo(zone)

    def day_matches(self, d: date) -> bool:
        if d.month not in self.months:
            return False
        dom, dow = d.day in self.days, d.isoweekday() % 7 in self.weekdays
        if not self.dom_star and not self.dow_star:
            return dom or dow
        return dom and dow

    def fire_times(self, start: float, end: float) -> set[float]:
        out: set[float] = set()
        first = datetime.fromtimestamp(start, UTC).date() - timedelta(days=2)
        for offset in range((datetime.fromtimestamp(end, UTC).date() - first).days + 3):
            d = first + timedelta(days=offset)
            if not self.day_matches(d):
                continue
            for hour in self.hours:
                out.update(self._hour(d, hour))
        return {t for t in out if start <= t < end}

    def _hour(self, d: date, hour: int) -> set[float]:
        top = datetime(d.year, d.month, d.day, hour)
        ends = [top.replace(minute=m, tzinfo=self.zone, fold=f).utcoffset()
                for m in (0, 59) for f in (0, 1)]
        if len(set(ends)) == 1:  # no transition in this hour: wall time = real time
            base = top.replace(tzinfo=self.zone).timestamp()
            return {base + 60 * m for m in self.minutes}
        return {t for m in self.minutes for t in self._resolve(top.replace(minute=m))}

    def _resolve(self, naive: datetime) -> set[float]:
        """The real instants of a wall-clock time, by cronie's rule."""
        real = sorted({t for t in (naive.replace(tzinfo=self.zone, fold=f).timestamp()
                                   for f in (0, 1))
                       if datetime.fromtimestamp(t, self.zone).replace(tzinfo=None) == naive})
        if real:
            return set(real[:1]) if self.fixed else set(real)
        if not self.fixed:
            return set()  # the gap: an interval job's minutes there never come
        # in the gap: a fixed-time job runs at the first instant after it, the transition
        low = int(naive.replace(tzinfo=self.zone, fold=1).timestamp())
        high = int(naive.replace(tzinfo=self.zone, fold=0).timestamp())
        after = naive.replace(tzinfo=self.zone, fold=1).utcoffset()  # PEP 495: after the gap
        while low < high:  # first instant whose offset is the one after the gap
            mid = (low + high) // 2
            if datetime.fromtimestamp(mid, self.zone).utcoffset() == after:
                high = mid
            else:
                low = mid + 1
        return {float(low)}


def cronfile_times(yaml_text: str, start: float, end: float) -> dict[str, set[float]]:
    """Fire times of every job of a schedule file, as the center computes them."""
    result = load_file("imported.yaml", yaml_text.encode())
    errors = [p.render() for p in result.problems if p.severity is Severity.ERROR]
    assert not errors, errors  # warnings (a 02:30 job in a DST zone) are validate's advice
    out = {}
    for job in result.jobs:
        times: set[float] = set()
        for t in JobTimer.for_job(job.schedules, job.timezone, job.name).iter_after(start - 1):
            if t >= end:
                break
            times.add(t)
        out[job.name] = times
    return out


def reference_lines(text: str, system: bool) -> dict[int, RefLine]:
    """The entries of a crontab by line number, read by the reference's own rules."""
    zone = "UTC"
    lines = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        s = raw.strip()
        if not s or s.startswith("#"):
            continue
        if s.startswith("CRON_TZ"):
            zone = s.split("=", 1)[1].strip()
            continue
        if s[0] not in "*@0123456789":
            continue
        words = s.split()
        if words[0] == "@reboot":
            continue
        schedule = words[0] if words[0].startswith("@") else " ".join(words[:5])
        lines[number] = RefLine(schedule, zone)
    return lines


def assert_same_fire_times(files: list[Path], system: bool) -> int:
    texts = [(str(p), p.read_text()) for p in files]
    result = import_crontabs(texts, system=system, one_file="all.yaml")
    got = cronfile_times(result.outputs["all.yaml"], YEAR_START, YEAR_END)
    checked = 0
    for shown, text in texts:
        imported = parse_crontab(text, shown, system=system)
        names = {(j.file, j.line) for j in imported.jobs}
        refs = reference_lines(text, system)
        for job in imported.jobs:
            name = _name_in(result.outputs["all.yaml"], shown, job.line)
            want = refs[job.line].fire_times(YEAR_START, YEAR_END)
            assert got[name] == want, (shown, job.line, sorted(got[name] ^ want)[:5])
            checked += 1
        assert len(names) == len(imported.jobs)
    return checked


def _name_in(yaml_text: str, file: str, line: int) -> str:
    """The job written under the comment giving ``file:line``."""
    lines = yaml_text.splitlines()
    for i, text in enumerate(lines):
        if text.startswith(f"  # {file}:{line}: "):
            return lines[i + 1].strip().rstrip(":")
    raise AssertionError(f"no job for {file}:{line}")


# --------------------------------------------------------------------------- the corpus


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CRONFILE, *args], capture_output=True, text=True, cwd=cwd, timeout=60)


def test_debian_system_crontabs_import_and_validate(tmp_path: Path) -> None:
    out = tmp_path / "schedules"
    done = run("import", "crontab", "--system", *map(str, DEBIAN), "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in out.iterdir()) == [
        "anacron.yaml", "certbot.yaml", "crontab.yaml", "e2scrub-all.yaml", "php.yaml",
        "sysstat.yaml"]
    assert done.stderr.endswith("11 job(s) imported, 0 line(s) not imported, "
                                "0 translation(s) to check\n")
    checked = run("validate", str(out))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "6 files, 11 jobs, 0 agents: 0 errors, 0 warnings" in checked.stdout + checked.stderr


def test_debian_crontab_translates_field_by_field(tmp_path: Path) -> None:
    texts = [(str(p), p.read_text()) for p in DEBIAN]
    result = import_crontabs(texts, system=True)
    jobs = {j.name: j for j in load_file("crontab.yaml", result.outputs["crontab.yaml"].encode()).jobs}
    assert sorted(jobs) == ["run-parts-cron-daily", "run-parts-cron-hourly",
                            "run-parts-cron-monthly", "run-parts-cron-weekly"]
    weekly = jobs["run-parts-cron-weekly"]
    assert weekly.schedules == ("47 6 * * 7",)
    assert weekly.command == ("test -x /usr/sbin/anacron || "
                              "{ cd / && run-parts --report /etc/cron.weekly; }")
    assert weekly.run_as == "root"
    assert weekly.timezone == "UTC"
    assert dict(weekly.env) == {"SHELL": "/bin/sh",
                                "PATH": "/usr/local/sbin:/usr/local/bin:/sbin:/bin:/usr/sbin:/usr/bin"}
    # the original line is the comment above each job
    assert ("  # " + str(DATA / "debian" / "crontab") + ":20: 47 6\t* * 7\troot\ttest -x "
            "/usr/sbin/anacron || { cd / && run-parts --report /etc/cron.weekly; }"
            ) in result.outputs["crontab.yaml"]
    sysstat = load_file("s.yaml", result.outputs["sysstat.yaml"].encode()).jobs
    assert [(j.name, j.schedules) for j in sysstat] == [
        ("debian-sa1", ("5-55/10 * * * *",)), ("debian-sa1-2", ("59 23 * * *",))]
    names = {j.name for f in result.outputs.values() for j in load_file("x.yaml", f.encode()).jobs}
    assert {"certbot-renew", "sessionclean", "invoke-rc-d-anacron", "e2scrub-all-cron",
            "e2scrub-all"} <= names


def test_user_crontab_variables_become_fields() -> None:
    text = (DATA / "user" / "deploy").read_text()
    result = import_crontabs([("deploy", text)], one_file="deploy.yaml")
    jobs = {j.name: j for j in load_file("deploy.yaml", result.outputs["deploy.yaml"].encode()).jobs}
    dump = jobs["pg-dump-nightly-app"]
    assert dump.timezone == "Europe/Berlin"  # CRON_TZ
    assert dump.command == ("/bin/bash", "-c", "/home/deploy/bin/pg-dump-nightly --db app")  # SHELL
    assert dict(dump.env)["PATH"] == "/home/deploy/bin:/usr/local/bin:/usr/bin:/bin"
    assert dump.notify is not None and dump.notify.when == ("failure",)
    assert isinstance(dump.notify.command, str)
    assert dump.notify.command.endswith("| mail -s \"cronfile: $CRONFILE_NOTIFY_JOB "
                                        "$CRONFILE_NOTIFY_KIND\" ops@example.com oncall@example.com")
    weekday = jobs["date-y-m-d"]  # after MAILTO="" and CRON_TZ=America/New_York
    assert weekday.notify is None
    assert weekday.timezone == "America/New_York"
    assert weekday.command == ("/bin/bash", "-c", "date +%Y-%m-%d >> /home/deploy/logs/weekday.log")
    assert jobs["sync-orders"].schedules == ("*/15 8-18 * * mon-fri",)
    assert jobs["prune-cache"].schedules == ("@daily",)
    assert [str(n) for n in result.notes] == [
        'deploy:4: warning: cron mails any output of a job to ops@example.com,oncall@example.com;'
        ' the jobs after this line get a notify command that mails it (mail(1)) when a run fails:'
        ' MAILTO="ops@example.com,oncall@example.com"']
    assert result.exit_code == 0


def test_untranslatable_lines_are_reported_with_their_line(tmp_path: Path) -> None:
    alice = DATA / "user" / "alice"
    done = run("import", "crontab", str(alice), "--out", str(tmp_path / "out"))
    assert done.returncode == 1
    report = done.stderr.splitlines()
    assert f"{alice}:4: warning: cron does not expand variables in PATH=: the value is kept " \
           "as written, $ and all: PATH=$HOME/bin:$PATH" in report
    assert f"{alice}:6: error: @reboot runs once when cron starts: cronfile has no such slot " \
           "(a long-running process is kind: daemon); not imported: " \
           "@reboot /home/alice/bin/start-tunnel" in report
    assert any(line.startswith(f"{alice}:9: error: % in the command: ") and
               line.endswith('mail -s "lunch" alice@example.com%Time for lunch%')
               for line in report)
    assert report[-1] == "4 job(s) imported, 2 line(s) not imported, 2 translation(s) to check"
    jobs = {j.name: j for j in load_file("a.yaml", (tmp_path / "out" / "alice.yaml").read_bytes()).jobs}
    assert set(jobs) == {"morning-digest", "fetchmail", "leap-day", "sunday-seven"}
    digest = jobs["morning-digest"]
    assert digest.jitter_s == 20 * 60  # RANDOM_DELAY=20 (minutes)
    assert digest.timezone == "UTC"  # TZ= goes into env only, as in cronie
    assert dict(digest.env) == {"PATH": "$HOME/bin:$PATH", "TZ": "Asia/Tokyo"}
    assert run("validate", str(tmp_path / "out")).returncode == 0


def test_stdout_without_out_is_one_valid_file(tmp_path: Path) -> None:
    done = run("import", "crontab", *map(str, USER))
    assert done.returncode == 1  # alice has lines that are not imported
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "imported.yaml").write_text(done.stdout)
    checked = run("validate", str(tmp_path / "s"))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "1 files, 12 jobs" in checked.stdout + checked.stderr


def test_import_never_overwrites_and_avoids_taken_names(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.yaml").write_text("apiVersion: cronfile/v1\njobs:\n  debian-sa1:\n"
                                   "    schedule: '@daily'\n    command: 'true'\n")
    sysstat = str(DATA / "debian" / "sysstat")
    first = run("import", "crontab", "--system", sysstat, "--out", str(out))
    assert first.returncode == 0, first.stderr
    assert "  debian-sa1-2:\n" in (out / "sysstat.yaml").read_text()
    assert run("validate", str(out)).returncode == 0
    before = (out / "sysstat.yaml").read_text()
    again = run("import", "crontab", "--system", sysstat, "--out", str(out))
    assert again.returncode == 1
    assert f"{out / 'sysstat.yaml'}: error: exists already; nothing written" in again.stderr
    assert (out / "sysstat.yaml").read_text() == before


@pytest.mark.parametrize("line, message", [
    ("0 0 30 2 * /bin/true", "never fires"),
    ("H 0 * * * /bin/true", "'H' in the minute field is not cron syntax"),
    ("0 0 ? * * /bin/true", "'?' in the day-of-month field is not cron syntax"),
    ("0 0 L * * /bin/true", "'L' in the day-of-month field is not cron syntax"),
    ("0 jan * * * /bin/true", "names are only allowed in the month and day-of-week fields"),
    ("61 0 * * * /bin/true", "61 is out of range for minute"),
    ("0 0 * *", "an entry needs five time fields and a command"),
    ("@every 5m /bin/true", "unknown nickname '@every'"),
])
def test_bad_lines_are_errors_naming_file_and_line(line: str, message: str) -> None:
    result = parse_crontab(f"# header\n{line}\n", "tab")
    assert not result.jobs
    [note] = result.notes
    assert (note.file, note.line, note.severity.value) == ("tab", 2, "error")
    assert message in note.message


def test_system_line_without_user_column_is_an_error() -> None:
    [note] = parse_crontab("17 * * * *\n", "/etc/crontab", system=True).notes
    assert str(note).startswith("/etc/crontab:1: error: no ")


def test_unknown_cron_tz_is_reported_and_blocks_the_lines_after_it() -> None:
    result = parse_crontab("CRON_TZ=Mars/Olympus\n0 1 * * * a\nCRON_TZ=UTC\n0 2 * * * b\n", "t")
    assert [j.line for j in result.jobs] == [4]
    assert [(n.line, n.severity.value) for n in result.notes] == [(1, "error"), (2, "error")]


def test_variable_names_env_cannot_hold_are_reported() -> None:
    result = parse_crontab("MY-VAR=1\nOK_2=x\n0 1 * * * echo\n", "t")
    assert [(n.line, n.severity.value) for n in result.notes] == [(1, "error")]
    assert "'MY-VAR' is not a name cronfile's env takes" in result.notes[0].message
    assert [j.env for j in result.jobs] == [(("OK_2", "x"),)]


def test_a_sixth_field_is_the_start_of_the_command_as_for_cron() -> None:
    [job] = parse_crontab("0 0 * * * * /bin/true\n", "t").jobs
    assert (job.schedule, job.command) == ("0 0 * * *", "* /bin/true")


def test_escaped_percent_is_a_literal_percent() -> None:
    [job] = parse_crontab(r"0 0 * * * printf '\%s\n' a\\b" + "\n", "t").jobs
    assert job.command == r"printf '%s\n' a\\b"


# --------------------------------------------------------------------------- fire times


def test_corpus_fire_times_equal_cron_over_a_year() -> None:
    assert assert_same_fire_times(DEBIAN, system=True) == 11
    assert assert_same_fire_times(USER, system=False) == 12


def test_reference_agrees_with_cronie_on_known_dst_days() -> None:
    """The reference itself, against cronie's documented behaviour in Europe/Berlin."""
    spring = datetime(2026, 3, 29, tzinfo=UTC).timestamp()
    fall = datetime(2026, 10, 25, tzinfo=UTC).timestamp()
    day = 86400
    fixed = RefLine("30 2 * * *", "Europe/Berlin")
    def iso(times: set[float]) -> list[str]:
        return [datetime.fromtimestamp(t, UTC).isoformat() for t in sorted(times)]

    assert iso(fixed.fire_times(spring - day, spring + day)) == [
        "2026-03-28T01:30:00+00:00", "2026-03-29T01:00:00+00:00"]
    assert iso(fixed.fire_times(fall, fall + day)) == ["2026-10-25T00:30:00+00:00"]
    interval = RefLine("*/30 2 * * *", "Europe/Berlin")
    assert iso(interval.fire_times(fall, fall + day)) == [
        "2026-10-25T00:00:00+00:00", "2026-10-25T00:30:00+00:00",
        "2026-10-25T01:00:00+00:00", "2026-10-25T01:30:00+00:00"]
    assert RefLine("*/30 2 * * *", "Europe/Berlin").fire_times(spring, spring + day) == set()
    # 1/2 in day-of-week is Monday, Wednesday, Friday and Sunday (7) for cronie
    assert RefLine("0 0 * * 1/2", "UTC").weekdays == {0, 1, 3, 5}


ZONES = ["UTC", "Europe/Berlin", "America/New_York", "Australia/Lord_Howe", "America/Havana",
         "Pacific/Chatham", "America/Santiago", "Europe/London"]


def _field(draw: st.DrawFn, low: int, high: int, names: list[str] | None, dense: bool) -> str:
    def one() -> str:
        v = draw(st.integers(low, high))
        return names[v - low] if names and draw(st.booleans()) else str(v)

    def item() -> str:
        kind = draw(st.sampled_from(["value", "range", "range-step", "start-step", "star-step"]))
        if kind == "value":
            return one()
        if kind == "star-step":
            return f"*/{draw(st.integers(2 if dense else 5, high - low + 1))}"
        a, b = sorted((draw(st.integers(low, high)), draw(st.integers(low, high))))
        step = draw(st.integers(1 if dense else min(5, b - a + 1), max(1, b - a + 1)))
        if kind == "start-step":
            return f"{a}/{step}"
        first = names[a - low] if names and draw(st.booleans()) else str(a)
        last = names[b - low] if names and draw(st.booleans()) else str(b)
        return f"{first}-{last}" + (f"/{step}" if kind == "range-step" else "")

    if dense and draw(st.integers(0, 4)) == 0:
        return "*"
    return ",".join(item() for _ in range(draw(st.integers(1, 3))))


@st.composite
def crontab_lines(draw: st.DrawFn) -> str:
    if draw(st.integers(0, 9)) == 0:
        return draw(st.sampled_from(sorted(NICKNAMES)))
    month_names = list(MONTHS)
    day_names = [*DAYS, "7"]  # "sun" is 0 to cron: 1-sun is backwards
    return " ".join([
        _field(draw, 0, 59, None, dense=False),
        _field(draw, 0, 23, None, dense=True),
        _field(draw, 1, 31, None, dense=True),
        _field(draw, 1, 12, month_names, dense=True),
        _field(draw, 0, 7, day_names, dense=True),
    ])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(line=crontab_lines(), zone=st.sampled_from(ZONES))
@example(line="0 12 * * 1/2", zone="UTC")  # cronie: N/S in day-of-week runs up to 7 = Sunday
@example(line="30 2 * * *", zone="Europe/Berlin")  # the gap in March, the repeat in October
@example(line="*/10 2 * * *", zone="Europe/Berlin")
@example(line="15 2 * * *", zone="Australia/Lord_Howe")  # a 30-minute shift
@example(line="0,30 0 * * *", zone="America/Havana")  # transitions at midnight
@example(line="0 0 13 * fri", zone="UTC")  # either day field
def test_imported_fire_times_equal_crons_over_a_year(line: str, zone: str) -> None:
    text = f"CRON_TZ={zone}\n{line} /usr/bin/true\n"
    result = import_crontabs([("tab", text)], one_file="tab.yaml")
    if result.jobs == 0:  # a line cron accepts but that never fires (30 feb)
        [note] = result.notes
        assert "never fires" in note.message
        assert not RefLine(line, zone).fire_times(YEAR_START - 86400 * 366 * 4, YEAR_END)
        return
    [times] = cronfile_times(result.outputs["tab.yaml"], YEAR_START, YEAR_END).values()
    want = RefLine(line, zone).fire_times(YEAR_START, YEAR_END)
    assert times == want, sorted(times ^ want)[:5]
