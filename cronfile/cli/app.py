"""The ``cronfile`` command: argument parsing and printing only.

Every command calls a plain function that returns data and an exit code; this layer turns
arguments into calls and results into text. Exit codes (SPEC §3): 0 success, 1 the thing
checked is bad, 2 usage errors. :func:`main` is the one error boundary: no traceback
reaches a user for bad input.
"""

from __future__ import annotations

import ipaddress
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

import click

from cronfile import __version__

FORMATS = click.Choice(["text", "json"])
SCHEDULES = click.option(
    "--schedules", "schedules", type=click.Path(path_type=Path), default=Path("schedules"),
    show_default=True, help="The schedules directory.",
)


def _echo(out: str, err: str = "") -> None:
    if out:
        click.echo(out, nl=False)
    if err:
        click.echo(err, nl=False, err=True)


def _print_problems_and_exit(result: object) -> NoReturn:
    from cronfile.cli.validate import ValidateReport, render

    problems = getattr(result, "problems", [])
    report = ValidateReport(problems, len(getattr(result, "files", [])), 0, 0, False)
    _echo(*render(report, "text"))
    sys.exit(1)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="cronfile")
def cli() -> None:
    """Cron for a fleet, configured as code."""


@cli.command()
@click.argument("paths", nargs=-1, type=click.Path(path_type=Path))
@SCHEDULES
@click.option("--format", "fmt", type=click.Choice(["text", "json", "github"]), default="text",
              show_default=True)
@click.option("--strict", is_flag=True, help="Treat warnings as errors.")
def validate(paths: tuple[Path, ...], schedules: Path, fmt: str, strict: bool) -> None:
    """Check schedule files; print every problem as file:line:col: error|warning: message."""
    from cronfile.cli.validate import render, run_validate

    report = run_validate(list(paths), schedules, strict)
    _echo(*render(report, fmt))
    sys.exit(report.exit_code)


@cli.command("next")
@click.argument("job", required=False)
@click.option("-n", "count", type=click.IntRange(1, 10000), default=5, show_default=True,
              help="How many fire times.")
@click.option("--after", "after", help="ISO-8601 time to start from (default: now; no offset = UTC).")
@SCHEDULES
@click.option("--format", "fmt", type=FORMATS, default="text", show_default=True)
def next_(job: str | None, count: int, after: str | None, schedules: Path, fmt: str) -> None:
    """The next fire times of JOB (or of every job), in its zone and UTC."""
    from cronfile.schedules.loader import load_schedules
    from cronfile.schedules.nexttimes import UsageError, next_fires, parse_time, render

    try:
        start = parse_time(after) if after else time.time()
    except UsageError as exc:
        raise click.UsageError(str(exc)) from None
    if not schedules.is_dir():
        raise click.UsageError(f"--schedules {schedules}: no such directory")
    result = load_schedules(schedules)
    if result.state is None:
        _print_problems_and_exit(result)
    try:
        fires = next_fires(result.state, job, count, start)
    except UsageError as exc:
        raise click.UsageError(str(exc)) from None
    _echo(render(fires, job is not None, fmt))


def _window(ctx: click.Context, param: click.Parameter, value: str) -> float:
    """``--window 7d`` as seconds; a bad duration is a usage error (exit 2)."""
    from cronfile.schedules.durations import parse_duration

    try:
        seconds = parse_duration(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    if seconds <= 0:
        raise click.BadParameter("must be longer than 0s")
    return seconds


def _plan_options(f: Any) -> Any:
    f = click.option("--window", "window_s", default="7d", show_default=True,
                     callback=_window, metavar="DURATION",
                     help="How far ahead daylight-saving transitions are listed (e.g. 7d, 90d).")(f)
    f = click.option("--detailed-exitcode", is_flag=True,
                     help="Exit 0 when nothing changes, 2 when something does.")(f)
    f = click.option("--format", "fmt", type=click.Choice(["text", "json", "markdown"]),
                     default="text", show_default=True)(f)
    f = click.option("--center", "center", help="Compare with a running center (URL).")(f)
    f = click.option("--state", "state_dir", type=click.Path(path_type=Path),
                     help="Compare with what a center applied (its state directory).")(f)
    f = click.option("--against", "against", help="Compare with a git revision, e.g. origin/main.")(f)
    return SCHEDULES(f)


def _run_plan(schedules: Path, against: str | None, state_dir: Path | None, center: str | None,
              fmt: str, detailed_exitcode: bool, window_s: float) -> None:
    from cronfile.cli.plan import run_plan

    given = [x for x in (against, state_dir, center) if x]
    if len(given) > 1:
        raise click.UsageError("use only one of --against, --state, --center")
    out, code = run_plan(schedules, against=against, state_dir=state_dir, center=center,
                         fmt=fmt, detailed_exitcode=detailed_exitcode, window_s=window_s)
    _echo(out)
    sys.exit(code)


@cli.command()
@_plan_options
def plan(schedules: Path, against: str | None, state_dir: Path | None, center: str | None,
         fmt: str, detailed_exitcode: bool, window_s: float) -> None:
    """What would change, terraform-style, and what it does in time and place."""
    _run_plan(schedules, against, state_dir, center, fmt, detailed_exitcode, window_s)


@cli.command()
@_plan_options
@click.option("--dry-run", is_flag=True, help="Only show the plan (same as `cronfile plan`).")
def apply(schedules: Path, against: str | None, state_dir: Path | None, center: str | None,
          fmt: str, detailed_exitcode: bool, window_s: float, dry_run: bool) -> None:
    """Push the validated desired state to a running center (--dry-run: plan only)."""
    if dry_run:
        _run_plan(schedules, against, state_dir, center, fmt, detailed_exitcode, window_s)
        return
    if against or detailed_exitcode:
        raise click.UsageError("--against and --detailed-exitcode go with --dry-run (or use plan)")
    from cronfile.center.control import apply_to_center

    out, code = apply_to_center(schedules, state_dir=state_dir, center=center)
    _echo(out)
    sys.exit(code)


@cli.command()
def schema() -> None:
    """Print the JSON Schema of schedule files."""
    from cronfile.schedules.schema import schema_text

    _echo(schema_text())


STATE = click.option(
    "--state", "state_dir", type=click.Path(path_type=Path), default=Path(".state"),
    show_default=True, envvar="CRONFILE_STATE", help="The center's state directory.",
)


@cli.command()
@SCHEDULES
@click.option("--state", "state_dir", type=click.Path(path_type=Path), required=True,
              help="Where the ledger and applied state live.")
@click.option("--listen", help="HOST:PORT where agents connect (default: no agent listener).")
@click.option("--token-file", type=click.Path(path_type=Path), help="Agent secrets.")
@click.option("--accept-undeclared", is_flag=True, help="Let agents not in the inventory register.")
@click.option("--grace", type=float, default=10.0, show_default=True,
              help="Seconds running jobs get at shutdown before they are killed.")
@click.option("--no-watch", is_flag=True, help="Reload only on SIGHUP or `cronfile apply`.")
@click.option("--heartbeat", type=float, default=10.0, show_default=True,
              help="Seconds between pings to each agent (silent for 3x: disconnected).")
@click.option("--lease", type=float, default=60.0, show_default=True,
              help="Seconds a disconnected agent's runs wait for it before they are recorded lost.")
@click.option("--known-hosts", type=click.Path(path_type=Path),
              help="known_hosts for SSH targets that do not name their own.")
@click.option("--tls-cert", type=click.Path(path_type=Path), help="Serve agents over TLS with this cert.")
@click.option("--tls-key", type=click.Path(path_type=Path), help="The key of --tls-cert.")
@click.option("--tls-client-ca", type=click.Path(path_type=Path),
              help="Require agent certificates signed by this CA (mutual TLS).")
@click.option("--retention", default="90d", show_default=True,
              help="Remove ledger segments older than this (e.g. 30d, 2w); 'forever' keeps all.")
@click.option("--segment-bytes", type=click.IntRange(1024), default=None, hidden=True,
              help="Rotate the ledger's current files past this size (tests, benchmarks).")
def center(schedules: Path, state_dir: Path, listen: str | None, token_file: Path | None,
           accept_undeclared: bool, grace: float, no_watch: bool, heartbeat: float, lease: float,
           known_hosts: Path | None, tls_cert: Path | None, tls_key: Path | None,
           tls_client_ca: Path | None, retention: str, segment_bytes: int | None) -> None:
    """Run the center: schedule, dispatch and record; hot-reload the schedules.

    Exit 2 when --retention is shorter than a job needs its history."""
    from cronfile.center.daemon import CenterOptions, run_center
    from cronfile.state.retention import RetentionError, parse_retention

    try:
        parse_retention(retention)
    except RetentionError as exc:
        raise click.UsageError(str(exc)) from None
    if not schedules.is_dir():
        raise click.UsageError(f"--schedules {schedules}: not a directory")
    if listen is not None:
        _check_listen(listen, token_file)
    if bool(tls_cert) != bool(tls_key):
        raise click.UsageError("--tls-cert and --tls-key go together")
    sys.exit(run_center(CenterOptions(
        schedules, state_dir, listen, token_file, grace, not no_watch, accept_undeclared,
        heartbeat_s=heartbeat, lease_s=lease,
        known_hosts=str(known_hosts) if known_hosts else None,
        tls_cert=tls_cert, tls_key=tls_key, tls_client_ca=tls_client_ca,
        retention=retention, **({"segment_bytes": segment_bytes} if segment_bytes else {}))))


@cli.command()
@click.option("--center", "center_addr", required=True, help="HOST:PORT of the center.")
@click.option("--name", required=True, help="This agent's name, as declared in the inventory.")
@click.option("--token-file", type=click.Path(path_type=Path),
              help="This agent's secret. Without it the agent only takes runs from a center "
                   "on loopback that runs as its own user or root.")
@click.option("--state", "state_dir", type=click.Path(path_type=Path), required=True)
@click.option("--tls-ca", type=click.Path(path_type=Path), help="CA to verify the center with.")
@click.option("--tls-cert", type=click.Path(path_type=Path), help="Client certificate (mutual TLS).")
@click.option("--tls-key", type=click.Path(path_type=Path), help="Client key (mutual TLS).")
@click.option("--allow-run-as", default="", help="Users jobs may run as (comma-separated).")
@click.option("--allow-command-prefix", "allow_command_prefixes", multiple=True, metavar="PREFIX",
              help="A prefix the program (argv[0]) must start with; repeatable. Shell "
                   "strings are then refused. Default: any command.")
@click.option("--label", "labels", multiple=True, help="K=V label (for --accept-undeclared centers).")
@click.option("--backoff-max", type=float, help="Longest wait between reconnects, seconds.")
@click.option("--log-level", default="INFO", show_default=True,
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False))
def agent(center_addr: str, name: str, token_file: Path | None, state_dir: Path,
          tls_ca: Path | None, tls_cert: Path | None, tls_key: Path | None, allow_run_as: str,
          allow_command_prefixes: tuple[str, ...], labels: tuple[str, ...],
          backoff_max: float | None, log_level: str) -> None:
    """Run an agent: one persistent, authenticated connection to the center."""
    import asyncio
    import logging

    from cronfile.agent.daemon import BACKOFF_MAX_S, run_agent

    label_map: dict[str, str] = {}
    for item in labels:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint="--label")
        label_map[key] = value
    allow = [u.strip() for u in allow_run_as.split(",") if u.strip()] or None
    logging.basicConfig(level=log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.exit(asyncio.run(run_agent(
        center_addr, name, token_file, state_dir, tls_ca, allow, label_map,
        tls_cert=tls_cert, tls_key=tls_key,
        backoff_max_s=BACKOFF_MAX_S if backoff_max is None else backoff_max,
        allow_command_prefixes=[p for p in allow_command_prefixes if p] or None)))


def _check_listen(listen: str, token_file: Path | None) -> None:
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise click.UsageError(f"--listen {listen!r}: expected HOST:PORT, e.g. 0.0.0.0:7070")
    # Agents on other hosts could register unauthenticated: refuse to start rather than
    # quietly bind 127.0.0.1, which remote agents would only see as "connection refused".
    if token_file is None and not _is_loopback_host(host):
        raise click.UsageError(
            f"--listen {listen}: a non-loopback address needs --token-file (agents must "
            "authenticate); without one, listen on 127.0.0.1:PORT")


def _is_loopback_host(host: str) -> bool:
    """``localhost`` or a loopback IP; any other name may resolve to a public interface."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _state_dir_must_exist(state_dir: Path) -> None:
    if not state_dir.is_dir():
        raise click.ClickException(f"no state directory at {state_dir} (use --state DIR, the "
                                   "center's --state)")


@cli.command()
@STATE
@click.option("--format", "fmt", type=FORMATS, default="text", show_default=True)
def status(state_dir: Path, fmt: str) -> None:
    """The applied revision, last rejection, each job's next and last run, agents."""
    from cronfile.state.applied import StateFileError
    from cronfile.state.reports import build_status, render_status

    _state_dir_must_exist(state_dir)
    try:
        _echo(render_status(build_status(state_dir), fmt))
    except StateFileError as exc:
        raise click.ClickException(str(exc)) from None


@cli.command()
@STATE
@click.option("--job", help="Only this job.")
@click.option("--status", "status_", help="Only runs with this status.",
              type=click.Choice(["succeeded", "failed", "timeout", "killed", "lost", "skipped",
                                 "missed", "no_agent", "running", "dispatched"]))
@click.option("--since", help="Only runs scheduled at or after this ISO-8601 time.")
@click.option("--until", help="Only runs scheduled at or before this ISO-8601 time.")
@click.option("--limit", type=click.IntRange(0), default=50, show_default=True,
              help="The latest N runs (0: all).")
@click.option("--format", "fmt", type=FORMATS, default="text", show_default=True)
def runs(state_dir: Path, job: str | None, status_: str | None, since: str | None,
         until: str | None, limit: int, fmt: str) -> None:
    """Runs recorded in the ledger, one line per run (newest segments read first)."""
    from cronfile.schedules.nexttimes import UsageError, parse_time
    from cronfile.state.reports import query_runs, render_runs

    _state_dir_must_exist(state_dir)
    for name, value in (("--since", since), ("--until", until)):
        try:
            if value:
                parse_time(value)
        except UsageError as exc:
            raise click.UsageError(str(exc).replace("--after", name)) from None
    _echo(render_runs(query_runs(state_dir, job, status_, since, limit or None, until), fmt))


@cli.command()
@click.argument("run_id")
@STATE
@click.option("--format", "fmt", type=FORMATS, default="text", show_default=True)
def logs(run_id: str, state_dir: Path, fmt: str) -> None:
    """One run's records and its whole output tail (exit 1 if the ledger has no such run)."""
    from cronfile.state.reports import render_log, run_log

    _state_dir_must_exist(state_dir)
    entry = run_log(state_dir, run_id)
    if entry is None:
        raise click.ClickException(f"no run {run_id} in the ledger of {state_dir}")
    _echo(render_log(entry, fmt))


@cli.command("run")
@click.argument("job")
@STATE
def run_(job: str, state_dir: Path) -> None:
    """Run JOB now on the running center."""
    from cronfile.center.control import CenterUnavailable, request

    try:
        answer = request(state_dir, {"op": "run", "job": job})
    except CenterUnavailable as exc:
        raise click.ClickException(str(exc)) from None
    if not answer.get("ok"):
        raise click.ClickException(str(answer.get("error")))
    _echo(f"started {job}; follow it with: cronfile runs --job {job} --state {state_dir}\n")


@cli.command()
@click.argument("event")
@STATE
def trigger(event: str, state_dir: Path) -> None:
    """Fire EVENT: runs every job with trigger: {event: EVENT}."""
    from cronfile.center.control import CenterUnavailable, request

    try:
        answer = request(state_dir, {"op": "trigger", "event": event})
    except CenterUnavailable as exc:
        raise click.ClickException(str(exc)) from None
    jobs = answer.get("jobs") or []
    _echo(f"event {event}: {', '.join(jobs) if jobs else 'no job listens for it'}\n")
    sys.exit(0 if jobs else 1)


@cli.group("import")
def import_() -> None:
    """Turn other schedulers' files into schedule files."""


@import_.command("crontab")
@click.argument("files", nargs=-1, required=True, metavar="FILE...",
                type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--system", is_flag=True,
              help="The files are /etc/crontab or /etc/cron.d/* (a user column before the command).")
@click.option("--out", "out", type=click.Path(file_okay=False, path_type=Path),
              help="Write one schedule file per crontab into DIR (default: one document on stdout).")
def import_crontab(files: tuple[Path, ...], system: bool, out: Path | None) -> None:
    """Import crontab FILEs: one job per entry; every line that cannot be translated
    faithfully is reported (exit 1 when a line was not imported)."""
    from cronfile.cli.importer import run_import_crontab

    code, stdout, stderr = run_import_crontab(list(files), system, out)
    _echo(stdout, stderr)
    sys.exit(code)


def main(argv: list[str] | None = None) -> int:
    """Entry point; maps every failure to an exit code and never shows a traceback for
    bad input (an unexpected crash is reported in one line with a hint)."""
    try:
        cli.main(args=argv, prog_name="cronfile", standalone_mode=False)
    except click.exceptions.Exit as exc:
        return int(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        return 2 if isinstance(exc, click.UsageError) else 1
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 130
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 1
    except Exception as exc:  # the error boundary: one line, no traceback
        click.echo(f"cronfile: internal error: {type(exc).__name__}: {exc} "
                   "(set CRONFILE_DEBUG=1 for a traceback)", err=True)
        import os

        if os.environ.get("CRONFILE_DEBUG"):
            raise
        return 1
    return 0
