"""Crontab files -> schedule files, for ``cronfile import crontab`` (SPEC §10).

Pure: text in, schedule-file text and a list of notes out; the CLI reads and writes files.

What cron does, and what the import makes of it (the README has the full table):

* An entry is five fields (or an ``@`` nickname) and a command; in the system crontab and
  ``/etc/cron.d`` (``system=True``) a user column comes between them, which becomes
  ``run_as``. The five fields are copied as they are: cronfile reads 5-field cron with
  cron's own rules (names, ``7`` = Sunday, day-of-month OR day-of-week when both are
  restricted, a field starting with ``*`` is unrestricted, cronie's daylight-saving rule
  for jobs whose minute and hour do not start with ``*``). Syntax that cron does not have
  (``H``, ``?``, ``L``) is not cron, so it is an error here, not a translation; a sixth
  field is, for cron, the start of the command, and stays so.
* Variable lines apply to the entries after them: ``env``, except ``CRON_TZ`` (the job's
  ``timezone``), ``RANDOM_DELAY`` (cronie: minutes, the job's ``jitter``), ``MAILTO`` (a
  ``notify`` command through mail(1), which is close but not the same: cron mails any
  output, cronfile notifies on failure) and ``MAILFROM``. ``SHELL`` other than ``/bin/sh``
  makes the command ``[SHELL, -c, line]``. ``TZ`` only goes into ``env``, as in cronie.
* The command is run by the shell, as cron runs it. ``\\%`` is cron's way to write ``%`` and
  becomes ``%``; an unescaped ``%`` ends the command and feeds the rest to its stdin, which
  cronfile has no field for: such a line is not imported, and says so.

Nothing is changed silently: every line that is not imported (``@reboot``, ``%``, bad
syntax, a date that never comes) and every translation that is only close (``MAILTO``,
``$VAR`` in a variable line, which cron does not expand) is an :class:`ImportNote` naming
the file, the line and the original text.
"""

from __future__ import annotations

import enum
import json
import os
import re
import shlex
from collections.abc import Iterable
from dataclasses import dataclass, field
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronfile.schedules.cronexpr import NICKNAMES, ScheduleError, parse_schedule


class Severity(enum.Enum):
    """How much of a crontab line survived the import."""

    NOT_IMPORTED = "error"
    """The line has no faithful translation (or is not valid cron); no job was written."""
    APPROXIMATED = "warning"
    """Imported, but cronfile will not do exactly what cron did; the message says how."""


@dataclass(frozen=True, slots=True)
class ImportNote:
    """Something the user must know about one line of a crontab."""

    file: str
    line: int
    severity: Severity
    message: str
    text: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.severity.value}: {self.message}: {self.text.strip()}"


@dataclass(frozen=True, slots=True)
class ImportedJob:
    """One crontab entry as a cronfile job (the name is given later, across all files)."""

    file: str
    line: int
    text: str
    schedule: str
    command: tuple[str, ...] | str
    run_as: str | None = None
    timezone: str | None = None
    env: tuple[tuple[str, str], ...] = ()
    jitter_minutes: int = 0
    mailto: tuple[str, ...] = ()
    name_hint: str = "job"


@dataclass(frozen=True, slots=True)
class CrontabImport:
    """The jobs and notes of one crontab file."""

    file: str
    jobs: tuple[ImportedJob, ...]
    notes: tuple[ImportNote, ...]


# A variable line, as cron's load_env reads it: NAME = VALUE, either side optionally quoted.
_ENV_LINE = re.compile(r"""^\s*(?P<q>['"]?)(?P<name>[^=\s'"]+)(?P=q)\s*=\s*(?P<value>.*?)\s*$""")
# One item of a cron field: *, a number or a three-letter name, a range, and a step.
_CRON_ITEM = re.compile(r"^(?:\*|(?:[0-9]+|[A-Za-z]{3})(?:-(?:[0-9]+|[A-Za-z]{3}))?)(?:/[0-9]+)?$")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_VAR_REFERENCE = re.compile(r"\$(?:[A-Za-z_][A-Za-z0-9_]*|\{)")
_LETTER = re.compile(r"[A-Za-z]")
_STEP_WITHOUT_RANGE = re.compile(r"^([0-9]+|[A-Za-z]{3})/([0-9]+)$")
_QUOTING = re.compile(r"""['"\\]""")
_NOT_SLUG = re.compile(r"[^a-z0-9]+")
_NAMED_FIELDS = (3, 4)  # month and day-of-week take names; the others take numbers only
_SPECIAL_VARIABLES = {"MAILTO", "MAILFROM", "CRON_TZ", "RANDOM_DELAY"}


def parse_crontab(text: str, file: str, *, system: bool = False) -> CrontabImport:
    """Read one crontab; ``system`` = the ``/etc/crontab`` format with a user column."""
    env: dict[str, str] = {}
    timezone: str | None = None
    bad_zone: tuple[int, str] | None = None  # a CRON_TZ line naming no zone
    jobs: list[ImportedJob] = []
    notes: list[ImportNote] = []

    def note(line: int, severity: Severity, message: str, raw: str) -> None:
        notes.append(ImportNote(file, line, severity, message, raw))

    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        variable = None if stripped[0] in "*@0123456789" else _ENV_LINE.match(stripped)
        if variable:
            name, value = variable.group("name"), _unquote(variable.group("value"))
            if name == "CRON_TZ":
                timezone, bad_zone = (value or None), None
                if value and not _zone_exists(value):
                    bad_zone = (number, value)
                    note(number, Severity.NOT_IMPORTED, f"CRON_TZ={value} is not a known "
                         "time zone: the entries after it are not imported", raw)
            elif name == "MAILTO" and value.strip(" ,"):
                env[name] = value
                note(number, Severity.APPROXIMATED, "cron mails any output of a job to "
                     f"{value}; the jobs after this line get a notify command that mails "
                     "it (mail(1)) when a run fails", raw)
            elif not _ENV_NAME.fullmatch(name):
                note(number, Severity.NOT_IMPORTED, f"{name!r} is not a name cronfile's env "
                     "takes (letters, digits and _): the variable is left out of the jobs "
                     "after this line", raw)
            elif name == "RANDOM_DELAY" and not value.isdigit():
                note(number, Severity.APPROXIMATED, "RANDOM_DELAY is not a number of minutes "
                     "(cronie ignores it): no jitter", raw)
                env.pop(name, None)
            else:
                env[name] = value
                if _VAR_REFERENCE.search(value):
                    note(number, Severity.APPROXIMATED, f"cron does not expand variables in "
                         f"{name}=: the value is kept as written, $ and all", raw)
            continue
        entry = _entry(stripped, system)
        if isinstance(entry, str):
            note(number, Severity.NOT_IMPORTED, entry, raw)
            continue
        schedule, user, command = entry
        if bad_zone is not None:
            note(number, Severity.NOT_IMPORTED,
                 f"CRON_TZ={bad_zone[1]} (line {bad_zone[0]}) is not a known time zone", raw)
            continue
        job = _job(file, number, raw, schedule, user, command, env, timezone)
        if isinstance(job, str):
            note(number, Severity.NOT_IMPORTED, job, raw)
            continue
        jobs.append(job)
    return CrontabImport(file, tuple(jobs), tuple(notes))


def _entry(stripped: str, system: bool) -> tuple[str, str | None, str] | str:
    """(schedule, user, command) of an entry line, or why it cannot be imported."""
    if stripped.startswith("@"):
        word, rest = _split_words(stripped, 1)
        nickname = word[0].lower()
        if nickname == "@reboot":
            return ("@reboot runs once when cron starts: cronfile has no such slot (a "
                    "long-running process is kind: daemon); not imported")
        if nickname not in NICKNAMES:
            return f"unknown nickname {word[0]!r} (cron knows @reboot, {', '.join(NICKNAMES)})"
        fields = [nickname]
    else:
        fields, rest = _split_words(stripped, 5)
        if len(fields) < 5:
            return "an entry needs five time fields and a command"
        problem = _cron_syntax(fields)
        if problem:
            return problem
        fields[4] = _cron_weekday_steps(fields[4])
    user: str | None = None
    if system:
        words, rest = _split_words(rest, 1)
        if not words:
            return "no user column (system crontabs give one before the command)"
        user = words[0]
    if not rest.strip():
        return "no command"
    schedule = " ".join(fields)
    try:
        parse_schedule(schedule)
    except ScheduleError as exc:
        return str(exc)
    return schedule, user, rest.strip()


def _split_words(text: str, count: int) -> tuple[list[str], str]:
    """The first ``count`` blank-separated words of ``text`` and what follows them (without
    its leading blanks, as cron reads the command)."""
    parts = text.split(None, count)
    if len(parts) <= count:
        return parts, ""
    return parts[:count], parts[count]


def _cron_syntax(fields: list[str]) -> str | None:
    """What in the five fields is not cron's syntax (cronfile's own extensions included:
    they would change the meaning of a line cron reads differently, or not at all)."""
    names = ("minute", "hour", "day-of-month", "month", "day-of-week")
    for index, (text, name) in enumerate(zip(fields, names, strict=True)):
        for item in text.split(","):
            if not _CRON_ITEM.match(item):
                return f"{item!r} in the {name} field is not cron syntax"
            if index not in _NAMED_FIELDS and _LETTER.search(item):
                return f"{item!r}: names are only allowed in the month and day-of-week fields"
    return None


def _cron_weekday_steps(text: str) -> str:
    """cronie reads ``N/S`` in day-of-week as ``N-7/S`` (7 is Sunday again), cronfile as
    ``N-6/S``: ``1/2`` is Mon, Wed, Fri AND Sunday for cron. Writing the range out keeps
    cron's meaning (the fire-time property test checks it)."""
    if "/" not in text:
        return text
    return ",".join(_STEP_WITHOUT_RANGE.sub(r"\1-7/\2", item) for item in text.split(","))


def _job(file: str, number: int, raw: str, schedule: str, user: str | None, line: str,
         env: dict[str, str], timezone: str | None) -> ImportedJob | str:
    command = cron_command(line)
    if command is None:
        return ("% in the command: cron ends the command there and sends the rest to its "
                "stdin, which cronfile cannot express; not imported (write \\% for a "
                "literal %)")
    shell = env.get("SHELL", "/bin/sh")
    delay = env.get("RANDOM_DELAY", "0")
    mailto = env.get("MAILTO")
    return ImportedJob(
        file=file, line=number, text=raw, schedule=schedule,
        command=command if shell == "/bin/sh" else (shell, "-c", command),
        run_as=user, timezone=timezone,
        env=tuple(sorted((k, v) for k, v in env.items() if k not in _SPECIAL_VARIABLES)),
        jitter_minutes=int(delay) if delay.isdigit() else 0,
        mailto=tuple(a.strip() for a in (mailto or "").split(",") if a.strip()),
        name_hint=name_from_command(command),
    )


def cron_command(line: str) -> str | None:
    """The shell command cron runs for ``line``, or None when an unescaped ``%`` sends part
    of it to stdin. ``\\%`` is a literal ``%``; every other backslash is left to the shell
    (cron's do_command loop)."""
    if "%" not in line:
        return line
    out: list[str] = []
    escaped = False
    for ch in line:
        if escaped:
            if ch != "%":
                out.append("\\")
            out.append(ch)
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == "%":
            return None
        else:
            out.append(ch)
    if escaped:
        out.append("\\")
    return "".join(out)


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return value[1:-1]
    return value


def _zone_exists(name: str) -> bool:
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return False
    return True


# --------------------------------------------------------------------------- job names

# Words that guard or prepare a command rather than name it (Debian writes
# `test -x /usr/bin/certbot && ... && certbot renew`): the name comes from what follows.
_GUARDS = {"test", "[", "[[", "cd", "command", "type", "which", "sleep", "true", ":", "echo",
           "fi", "done", "}", "for", "case", "esac", "perl", "python", "python3"}
# Shell words that may open a simple command without being its program (`then certbot`).
_KEYWORDS = {"if", "then", "else", "elif", "do", "while", "until", "!", "{", "time"}
_WRAPPERS = {"nice", "ionice", "nohup", "exec", "sudo", "env", "flock", "chronic", "timeout"}
_OPERATORS = {"&&", "||", ";", "|", "&", "(", ")", ";;", "|&"}
_REDIRECT = re.compile(r"[0-9]*[<>][<>&]*")
_ASSIGNMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=.*")


def name_from_command(command: str) -> str:
    """A DNS-label job name from what the command runs (``certbot -q renew`` ->
    ``certbot-renew``); ``job`` when nothing in it reads as a program."""
    for words in _simple_commands(_shell_tokens(command)):
        program = os.path.basename(words[0])
        if program in _GUARDS:
            continue
        argument = next((w for w in words[1:] if not w.startswith("-")
                         and not w.isdigit()), None)
        parts = [program] + ([os.path.basename(argument.rstrip("/"))] if argument else [])
        slug = slugify("-".join(parts))
        if slug:
            return slug
    return "job"


# Enough of the shell's lexer to find program names (shlex is five times slower, and an
# import of 10,000 lines spent most of its time there): operators, redirections, words
# with their quotes.
_TOKEN = re.compile(r"""(&&|\|\||;;|\|&|[;|&()])|([0-9]*[<>][<>&]*)"""
                    r"""|((?:'[^']*'|"(?:\\.|[^"\\])*"|\\.|[^\s;|&()<>'"\\])+)""")


def _shell_tokens(command: str) -> list[str]:
    return [operator or redirect or (_QUOTING.sub("", word) if _QUOTING.search(word) else word)
            for operator, redirect, word in _TOKEN.findall(command)]


def _simple_commands(tokens: list[str]) -> Iterable[list[str]]:
    """The simple commands of a shell line, without assignments, wrappers (with their
    options: ``nice -n 10``) and redirections (the lexer splits ``>/dev/null`` into ``>``
    and ``/dev/null``)."""
    current: list[str] = []
    skip_next = False
    for token in [*tokens, ";"]:
        if token in _OPERATORS:
            if current:
                yield current
            current = []
        elif skip_next:
            skip_next = False
        elif _REDIRECT.fullmatch(token):
            skip_next = True
        elif current or not (token in _WRAPPERS or token in _KEYWORDS or token.isdigit()
                             or token.startswith("-") or _ASSIGNMENT.fullmatch(token)):
            current.append(token)


def slugify(text: str, limit: int = 56) -> str:
    """Lower case, runs of anything else than [a-z0-9] as one '-', at most ``limit`` long
    (a job name is at most 63: room is left for a ``-N`` suffix)."""
    slug = _NOT_SLUG.sub("-", text.lower()).strip("-")
    return slug[:limit].rstrip("-")


def assign_names(imports: Iterable[CrontabImport], taken: Iterable[str] = ()) -> dict[tuple[str, int], str]:
    """A unique name for every job, keyed by (file, line): the hint, then ``-2``, ``-3``..."""
    used = set(taken)
    names: dict[tuple[str, int], str] = {}
    for result in imports:
        for job in result.jobs:
            name, n = job.name_hint, 1
            while name in used:
                n += 1
                name = f"{job.name_hint}-{n}"
            used.add(name)
            names[(job.file, job.line)] = name
    return names


# --------------------------------------------------------------------------- rendering


def _q(value: str) -> str:
    """A YAML double-quoted scalar (JSON's string syntax is a subset of it)."""
    if _PLAIN.fullmatch(value):
        return f'"{value}"'
    return json.dumps(value, ensure_ascii=False)


_PLAIN = re.compile(r'[ !#-\[\]-~]*')  # printable ASCII without " and \


def mail_command(addresses: tuple[str, ...]) -> str:
    """A notify command that mails what went wrong, as MAILTO asked cron to."""
    subject = "cronfile: $CRONFILE_NOTIFY_JOB $CRONFILE_NOTIFY_KIND"
    body = ("job $CRONFILE_NOTIFY_JOB: $CRONFILE_NOTIFY_STATUS (exit $CRONFILE_NOTIFY_EXIT_CODE)"
            " at $CRONFILE_NOTIFY_SCHEDULED_AT on $CRONFILE_NOTIFY_AGENT")
    return (f'echo "{body}" | mail -s "{subject}" '
            + " ".join(shlex.quote(a) for a in addresses))


def render_schedule_file(imports: Iterable[CrontabImport], names: dict[tuple[str, int], str],
                         header: str) -> str:
    """One schedule file holding the jobs of ``imports``, each under a comment that gives
    its original line."""
    out = [f"# {line}".rstrip() for line in header.splitlines()]
    out += ["apiVersion: cronfile/v1", "jobs:"]
    count = 0
    for result in imports:
        for job in result.jobs:
            count += 1
            out.append(f"  # {job.file}:{job.line}: {job.text.strip()}")
            out.append(f"  {names[(job.file, job.line)]}:")
            out.append(f"    schedule: {_q(job.schedule)}")
            if isinstance(job.command, str):
                out.append(f"    command: {_q(job.command)}")
            else:
                out.append("    command: [" + ", ".join(_q(w) for w in job.command) + "]")
            if job.run_as:
                out.append(f"    run_as: {_q(job.run_as)}")
            if job.timezone:
                out.append(f"    timezone: {_q(job.timezone)}")
            if job.jitter_minutes:
                out.append(f"    jitter: {job.jitter_minutes}m")
            if job.env:
                out.append("    env:")
                out += [f"      {_q(k)}: {_q(v)}" for k, v in job.env]
            if job.mailto:
                out.append("    notify:")
                out.append(f"      command: {_q(mail_command(job.mailto))}")
                out.append("      when: [failure]")
    if not count:
        out[-1] = "jobs: {}"
    return "\n".join(out) + "\n"


@dataclass(frozen=True, slots=True)
class ImportResult:
    """Everything one ``cronfile import crontab`` produced: file text by output name."""

    outputs: dict[str, str] = field(default_factory=dict)
    notes: tuple[ImportNote, ...] = ()
    jobs: int = 0

    @property
    def exit_code(self) -> int:
        """1 when some line was not imported, so a script notices."""
        return 1 if any(n.severity is Severity.NOT_IMPORTED for n in self.notes) else 0


def import_crontabs(files: list[tuple[str, str]], *, system: bool = False,
                    one_file: str | None = None, taken: Iterable[str] = ()) -> ImportResult:
    """Import (shown name, text) crontabs: one schedule file per crontab, named after it
    (``sysstat`` -> ``sysstat.yaml``), or all in ``one_file`` when given. ``taken``: job
    names already in use where the files go."""
    imports = [parse_crontab(text, shown, system=system) for shown, text in files]
    names = assign_names(imports, taken)
    outputs: dict[str, str] = {}
    if one_file is not None:
        shown = ", ".join(i.file for i in imports)
        outputs[one_file] = render_schedule_file(imports, names, _header(shown))
    else:
        for result in imports:
            outputs[_output_name(result.file, outputs)] = render_schedule_file(
                [result], names, _header(result.file))
    notes = tuple(n for i in imports for n in i.notes)
    return ImportResult(outputs, notes, sum(len(i.jobs) for i in imports))


def _header(shown: str) -> str:
    return (f"Imported from {shown} by `cronfile import crontab`.\n"
            "Each job's comment gives the crontab line it came from.")


def _output_name(file: str, taken: dict[str, str]) -> str:
    base = slugify(os.path.basename(file.rstrip("/"))) or "crontab"
    name, n = f"{base}.yaml", 1
    while name in taken:
        n += 1
        name = f"{base}-{n}.yaml"
    return name
