"""The ``cronfile`` command: argument parsing and printing only.

Every command calls a plain function that returns data and an exit code; this layer turns
arguments into calls and results into text. Exit codes (SPEC §3): 0 success, 1 the thing
checked is bad, 2 usage errors. :func:`main` is the one error boundary: no traceback
reaches a user for bad input.
"""

from __future__ import annotations

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
    f = click.option("--token-file", type=click.Path(path_type=Path),
                     help="With --center: the center's HTTP token (default: $CRONFILE_TOKEN).")(f)
    f = click.option("--center", "center", help="Compare with a running center (URL).")(f)
    f = click.option("--state", "state_dir", type=click.Path(path_type=Path),
                     help="Compare with what a center applied (its state directory).")(f)
    f = click.option("--against", "against", help="Compare with a git revision, e.g. origin/main.")(f)
    return SCHEDULES(f)


def _run_plan(schedules: Path, against: str | None, state_dir: Path | None, center: str | None,
              token_file: Path | None, fmt: str, detailed_exitcode: bool, window_s: float) -> None:
    from cronfile.cli.access import AccessError, RemoteCenter, read_token
    from cronfile.cli.plan import run_plan

    given = [x for x in (against, state_dir, center) if x]
    if len(given) > 1:
        raise click.UsageError("use only one of --against, --state, --center")
    if token_file and not center:
        raise click.UsageError("--token-file goes with --center URL")
    remote = None
    if center:
        try:
            remote = RemoteCenter(center, read_token(token_file))
        except AccessError as exc:
            raise click.UsageError(str(exc)) from None
    out, code = run_plan(schedules, against=against, state_dir=state_dir, center=remote,
                         fmt=fmt, detailed_exitcode=detailed_exitcode, window_s=window_s)
    _echo(out)
    sys.exit(code)


@cli.command()
@_plan_options
def plan(schedules: Path, against: str | None, state_dir: Path | None, center: str | None,
         token_file: Path | None, fmt: str, detailed_exitcode: bool, window_s: float) -> None:
    """What would change, terraform-style, and what it does in time and place."""
    _run_plan(schedules, against, state_dir, center, token_file, fmt, detailed_exitcode, window_s)


@cli.command()
@_plan_options
@click.option("--dry-run", is_flag=True, help="Only show the plan (same as `cronfile plan`).")
@click.option("--revision", metavar="SHA",
              help="A center following git: sync to this commit of its branch.")
def apply(schedules: Path, against: str | None, state_dir: Path | None, center: str | None,
          token_file: Path | None, fmt: str, detailed_exitcode: bool, window_s: float,
          dry_run: bool, revision: str | None) -> None:
    """Make a running center apply its source now and report it (--dry-run: plan only)."""
    if dry_run and revision:
        raise click.UsageError("--revision does not go with --dry-run")
    if dry_run:
        _run_plan(schedules, against, state_dir, center, token_file, fmt, detailed_exitcode,
                  window_s)
        return
    if against or detailed_exitcode:
        raise click.UsageError("--against and --detailed-exitcode go with --dry-run (or use plan)")
    from cronfile.cli.apply import RevisionUnsupported, apply_to_center

    if state_dir and center:
        raise click.UsageError("use either --state or --center, not both")
    access = _access(state_dir or Path(".state"), center, token_file)
    try:
        out, code = apply_to_center(schedules, access, revision)
    except RevisionUnsupported as exc:
        raise click.UsageError(str(exc)) from None
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
@click.option("--http", "http_addr", metavar="HOST:PORT",
              help="Serve the HTTP API, /metrics and the dashboard here.")
@click.option("--http-token-file", type=click.Path(path_type=Path),
              help="The bearer token of the HTTP API (required off loopback).")
@click.option("--http-tls-cert", type=click.Path(path_type=Path), help="Serve HTTPS with this cert.")
@click.option("--http-tls-key", type=click.Path(path_type=Path), help="The key of --http-tls-cert.")
@click.option("--http-insecure", is_flag=True,
              help="Allow plain HTTP on a non-loopback address (the token travels in clear).")
@click.option("--http-idle-timeout", type=click.FloatRange(0.1, 3600), default=15.0,
              show_default=True,
              help="Seconds an HTTP connection may take to send its headers, or sit idle.")
@click.option("--git", "git_url", metavar="URL",
              help="Follow this git repository (its --schedules subdirectory) by itself.")
@click.option("--git-ref", default="main", show_default=True, help="The branch (or tag) to follow.")
@click.option("--git-poll", default="30s", show_default=True, metavar="DURATION",
              help="How often to fetch it (also on POST /api/v1/sync and cronfile apply).")
@click.option("--log-runs", is_flag=True,
              help="Log one line per finished run: job, outcome, duration (for a terminal).")
@click.option("--ha", "ha_dsn", metavar="DSN",
              help="PostgreSQL DSN shared by the replicas: lead through a lease, or stand by.")
@click.option("--name", "ha_name", help="This replica's name (with --ha).")
@click.option("--ha-lease", "ha_lease_s", default="15s", show_default=True, callback=_window,
              help="How long a leader's lease lasts without a renew (by the database's clock).")
@click.option("--ha-renew-deadline", "ha_renew_deadline_s", default="10s", show_default=True,
              callback=_window,
              help="A leader that cannot renew for this long (its own clock) stops dispatching.")
def center(schedules: Path, state_dir: Path, listen: str | None, token_file: Path | None,
           accept_undeclared: bool, grace: float, no_watch: bool, heartbeat: float, lease: float,
           known_hosts: Path | None, tls_cert: Path | None, tls_key: Path | None,
           tls_client_ca: Path | None, retention: str, segment_bytes: int | None,
           http_addr: str | None, http_token_file: Path | None, http_tls_cert: Path | None,
           http_tls_key: Path | None, http_insecure: bool, http_idle_timeout: float,
           git_url: str | None, git_ref: str, git_poll: str, log_runs: bool,
           ha_dsn: str | None, ha_name: str | None, ha_lease_s: float,
           ha_renew_deadline_s: float) -> None:
    """Run the center: schedule, dispatch and record; hot-reload the schedules.

    Exit 2 when --retention is shorter than a job needs its history."""
    from cronfile.center.daemon import CenterOptions, run_center
    from cronfile.state.retention import RetentionError, parse_retention

    try:
        parse_retention(retention)
    except RetentionError as exc:
        raise click.UsageError(str(exc)) from None
    git = _git_options(git_url, git_ref, git_poll, schedules)
    if git is not None:
        from cronfile.center.gitsync import schedules_dir

        schedules, no_watch = schedules_dir(state_dir, git), True  # the follower reloads
    elif not schedules.is_dir():
        raise click.UsageError(f"--schedules {schedules}: not a directory")
    if listen is not None:
        _check_listen(listen, token_file)
    if bool(tls_cert) != bool(tls_key):
        raise click.UsageError("--tls-cert and --tls-key go together")
    http = _http_options(http_addr, http_token_file, http_tls_cert, http_tls_key, http_insecure,
                         http_idle_timeout)
    if http is not None and ha_dsn:
        import dataclasses

        http = dataclasses.replace(http, records_dsn=ha_dsn)
    sys.exit(run_center(CenterOptions(
        schedules, state_dir, listen, token_file, grace, not no_watch, accept_undeclared,
        heartbeat_s=heartbeat, lease_s=lease,
        known_hosts=str(known_hosts) if known_hosts else None,
        tls_cert=tls_cert, tls_key=tls_key, tls_client_ca=tls_client_ca, http=http, git=git,
        retention=retention, log_runs=log_runs,
        ha=_ha_settings(ha_dsn, ha_name, ha_lease_s, ha_renew_deadline_s),
        **({"segment_bytes": segment_bytes} if segment_bytes else {}))))


def _ha_settings(dsn: str | None, name: str | None, lease_s: float, renew_deadline_s: float) -> Any:
    """``--ha``/``--name``/``--ha-lease``/``--ha-renew-deadline`` checked together (exit 2)."""
    if dsn is None:
        if name is not None:
            raise click.UsageError("--name goes with --ha")
        return None
    if not name:
        raise click.UsageError("--ha needs --name (this replica's name)")
    from cronfile.ha.settings import HaSettings

    try:
        return HaSettings(dsn=dsn, name=name, lease_s=lease_s, renew_deadline_s=renew_deadline_s,
                          renew_interval_s=min(2.0, renew_deadline_s / 3))
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None


def _git_options(url: str | None, ref: str, poll: str, schedules: Path) -> Any:
    """With ``--git``, ``--schedules`` names the directory inside the repository."""
    if url is None:
        return None
    from cronfile.center.options import GitOptions
    from cronfile.schedules.durations import parse_duration

    try:
        poll_s = parse_duration(poll)
    except ValueError as exc:
        raise click.UsageError(f"--git-poll {poll!r}: {exc}") from None
    if poll_s < 1:
        raise click.UsageError(f"--git-poll {poll!r}: at least 1s")
    if schedules.is_absolute() or ".." in schedules.parts:
        raise click.UsageError(f"--schedules {schedules}: with --git, a directory inside the "
                               "repository (e.g. schedules)")
    if not ref or ref.startswith("-"):
        raise click.UsageError(f"--git-ref {ref!r}: expected a branch or tag name")
    return GitOptions(url, ref, poll_s, str(schedules))


def _http_options(addr: str | None, token_file: Path | None, cert: Path | None,
                  key: Path | None, insecure: bool, idle_timeout: float) -> Any:
    """The ``--http*`` options checked before anything starts: exposing the center by
    mistake is a usage error (exit 2), never a warning (SPEC §6)."""
    if addr is None:
        if token_file or cert or key or insecure:
            raise click.UsageError("--http-token-file, --http-tls-* and --http-insecure go "
                                   "with --http HOST:PORT")
        return None
    from cronfile.center.http import HttpConfigError, check_options, parse_address
    from cronfile.center.options import HttpOptions

    try:
        host, port = parse_address(addr)
        options = HttpOptions(host, port, token_file, cert, key, insecure, idle_timeout)
        check_options(options)
    except HttpConfigError as exc:
        raise click.UsageError(str(exc)) from None
    return options


@cli.command()
@click.option("--center", "center_addr", required=True,
              help="HOST:PORT of the center; HA replicas as HOST:PORT,HOST:PORT,... (one "
                   "connection to each; orders of a stale leader are refused by term).")
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
    """Run an agent: one persistent, authenticated connection to each center."""
    import asyncio
    import logging

    from cronfile.agent.daemon import BACKOFF_MAX_S, parse_centers, run_agent

    try:
        parse_centers(center_addr)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--center") from None

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
    from cronfile.transports.admission import is_loopback

    # Agents on other hosts could register unauthenticated: refuse to start rather than
    # quietly bind 127.0.0.1, which remote agents would only see as "connection refused".
    if token_file is None and not is_loopback(host):
        raise click.UsageError(
            f"--listen {listen}: a non-loopback address needs --token-file (agents must "
            "authenticate); without one, listen on 127.0.0.1:PORT")


def _state_dir_must_exist(state_dir: Path) -> None:
    if not state_dir.is_dir():
        raise click.ClickException(f"no state directory at {state_dir} (use --state DIR, the "
                                   "center's --state)")


CENTER = click.option("--center", "center_url", metavar="URL",
                      help="Talk to a center's HTTP API instead (e.g. https://cron.example:8443).")
TOKEN_FILE = click.option("--token-file", type=click.Path(path_type=Path),
                          help="The center's HTTP token (default: $CRONFILE_TOKEN).")


def _remote(f: Any) -> Any:
    """``--state DIR`` (this host) or ``--center URL`` + ``--token-file F``: either way."""
    return STATE(CENTER(TOKEN_FILE(f)))


HA_READ = click.option(
    "--ha", "ha_dsn", metavar="DSN",
    help="Read the run records from the HA centers' PostgreSQL (the ledger of record). "
         "Default: when the --state directory is an HA center's, its database.")


def _access(state_dir: Path, center_url: str | None, token_file: Path | None,
            ha_dsn: str | None = None) -> Any:
    from cronfile.cli.access import AccessError, connect

    ctx = click.get_current_context()
    if center_url and ctx.get_parameter_source("state_dir") is click.core.ParameterSource.COMMANDLINE:
        raise click.UsageError("use either --state or --center, not both")
    if center_url and ha_dsn:
        raise click.UsageError("use either --ha or --center, not both (a center reads its own)")
    if token_file and not center_url:
        raise click.UsageError("--token-file goes with --center URL")
    try:
        return connect(state_dir, center_url, token_file, ha_dsn)
    except AccessError as exc:
        raise click.UsageError(str(exc)) from None


def _ask(call: Any, *args: Any) -> Any:
    """One call to the center; an unreachable or refusing center is exit 1, one line."""
    from cronfile.cli.access import AccessError

    try:
        return call(*args)
    except AccessError as exc:
        raise click.ClickException(str(exc)) from None


@cli.command()
@_remote
@HA_READ
@click.option("--format", "fmt", type=FORMATS, default="text", show_default=True)
def status(state_dir: Path, center_url: str | None, token_file: Path | None, ha_dsn: str | None,
           fmt: str) -> None:
    """The applied revision, last rejection, each job's next and last run, agents."""
    from cronfile.state.reports import render_status

    center = _access(state_dir, center_url, token_file, ha_dsn)
    report = _ask(center.status)
    _echo(render_status(report, fmt))
    if report.get("last_rejection"):  # the thing checked is bad (SPEC §3): a change was rejected
        sys.exit(1)


@cli.command()
@_remote
@HA_READ
@click.option("--job", help="Only this job.")
@click.option("--status", "status_", help="Only runs with this status.",
              type=click.Choice(["succeeded", "failed", "timeout", "killed", "lost", "skipped",
                                 "missed", "no_agent", "running", "dispatched"]))
@click.option("--since", help="Only runs scheduled at or after this ISO-8601 time.")
@click.option("--until", help="Only runs scheduled at or before this ISO-8601 time.")
@click.option("--limit", type=click.IntRange(0), default=50, show_default=True,
              help="The latest N runs (0: all).")
@click.option("--format", "fmt", type=FORMATS, default="text", show_default=True)
def runs(state_dir: Path, center_url: str | None, token_file: Path | None, ha_dsn: str | None,
         job: str | None, status_: str | None, since: str | None, until: str | None, limit: int,
         fmt: str) -> None:
    """Runs recorded in the ledger, one line per run (newest segments read first)."""
    from cronfile.schedules.nexttimes import UsageError, parse_time
    from cronfile.state.reports import render_runs

    center = _access(state_dir, center_url, token_file, ha_dsn)
    for name, value in (("--since", since), ("--until", until)):
        try:
            if value:
                parse_time(value)
        except UsageError as exc:
            raise click.UsageError(str(exc).replace("--after", name)) from None
    _echo(render_runs(_ask(center.runs, job, status_, since, limit or None, until), fmt))


@cli.command()
@click.argument("run_id")
@_remote
@HA_READ
@click.option("--format", "fmt", type=FORMATS, default="text", show_default=True)
def logs(run_id: str, state_dir: Path, center_url: str | None, token_file: Path | None,
         ha_dsn: str | None, fmt: str) -> None:
    """One run's records and its whole output tail (exit 1 if the ledger has no such run)."""
    from cronfile.state.reports import render_log

    center = _access(state_dir, center_url, token_file, ha_dsn)
    if not center_url and not ha_dsn:
        _state_dir_must_exist(state_dir)
    entry = _ask(center.log, run_id)
    if entry is None:
        where = center.where.removeprefix("--center ") if center_url else center.store.where
        raise click.ClickException(f"no run {run_id} in the ledger of {where}")
    _echo(render_log(entry, fmt))


def _outcome_line(view: dict[str, Any]) -> str:
    """The line the center's ``--log-runs`` writes, for the run's current view."""
    from cronfile.center.runlog import run_line

    return run_line(view, status=view.get("state")) + "\n"


@cli.command("run")
@click.argument("job")
@_remote
@click.option("--wait", "wait", is_flag=True,
              help="Wait for the outcome; print the output tail; exit 0 only if it succeeded.")
@click.option("--timeout", "wait_timeout", type=click.FloatRange(1), default=3600.0,
              show_default=True, help="With --wait: give up waiting after this many seconds.")
def run_(job: str, state_dir: Path, center_url: str | None, token_file: Path | None,
         wait: bool, wait_timeout: float) -> None:
    """Run JOB now on the running center."""
    center = _access(state_dir, center_url, token_file)
    answer = _ask(center.run_job, job)
    if not answer.get("ok"):
        raise click.ClickException(str(answer.get("error")))
    started = [r for r in answer.get("results") or [] if r.get("status") == "started"]
    if not wait:
        _echo(f"started {job}; follow it with: cronfile runs --job {job} {center.where}\n")
        return
    deadline = time.monotonic() + wait_timeout
    code = 0
    for result in started:
        view = None
        while time.monotonic() < deadline:
            view = _ask(center.run, result["run_id"], min(60.0, deadline - time.monotonic()))
            if view is not None and view.get("status"):
                break
        if view is None or not view.get("status"):
            _echo("", f"{job} run {result['run_id']}: still running after {wait_timeout:g}s\n")
            code = 1
            continue
        tail = str(view.get("output_tail") or "")
        _echo(tail + ("" if not tail or tail.endswith("\n") else "\n"))
        _echo("", _outcome_line(view))
        if view.get("status") != "succeeded":
            code = 1
    sys.exit(code)


@cli.command()
@click.argument("run_id")
@_remote
def stop(run_id: str, state_dir: Path, center_url: str | None, token_file: Path | None) -> None:
    """Stop a running run (recorded killed, with who asked)."""
    center = _access(state_dir, center_url, token_file)
    answer = _ask(center.stop, run_id)
    if not answer.get("ok"):
        raise click.ClickException(str(answer.get("error")))
    view = _ask(center.run, run_id, 30.0)
    if view is None or not view.get("status"):
        _echo(f"asked {answer.get('job')} run {run_id} to stop; it has not ended yet\n")
        return
    _echo(_outcome_line(view))


@cli.command()
@click.argument("event")
@_remote
def trigger(event: str, state_dir: Path, center_url: str | None, token_file: Path | None) -> None:
    """Fire EVENT: runs every job with trigger: {event: EVENT}."""
    center = _access(state_dir, center_url, token_file)
    answer = _ask(center.trigger, event)
    jobs = answer.get("jobs") or []
    _echo(f"event {event}: {', '.join(jobs) if jobs else 'no job listens for it'}\n")
    sys.exit(0 if jobs else 1)


@cli.command()
@click.argument("job")
@click.option("--from", "start", required=True, metavar="T",
              help="First slot time to backfill, ISO-8601 (no offset = UTC); included.")
@click.option("--to", "end", required=True, metavar="T",
              help="Last slot time to backfill, ISO-8601 (no offset = UTC); included.")
@click.option("--dry-run", is_flag=True, help="Only list the slots that would run.")
@click.option("--yes", is_flag=True, help="Run a range of more than 10,000 slots.")
@click.option("--format", "fmt", type=FORMATS, default="text", show_default=True)
@_remote
def backfill(job: str, start: str, end: str, dry_run: bool, yes: bool, fmt: str,
             state_dir: Path, center_url: str | None, token_file: Path | None) -> None:
    """Run the slots of JOB from --from to --to that have no record yet, oldest first."""
    import json

    _instant(start, "--from")  # a bad time is a usage error here, before asking anyone
    _instant(end, "--to")
    center = _access(state_dir, center_url, token_file)
    answer = _ask(center.backfill, job, start, end, dry_run, yes)
    if not answer.get("ok"):
        raise click.ClickException(str(answer.get("error")))
    if fmt == "json":
        _echo(json.dumps({k: v for k, v in answer.items() if k != "ok"}, indent=2) + "\n")
        return
    others = ", ".join(f"{answer[key]} {what}" for key, what in (
        ("already_recorded", "already recorded"), ("already_queued", "already queued"),
        ("skipped_by_calendar", "skipped by a calendar")) if answer.get(key))
    verb = "would run" if dry_run else "queued"
    lines = [f"backfill {job}: {answer['count']} slots {verb}" + (f" ({others})" if others else "")]
    if dry_run:
        lines += [f"  {slot}" for slot in answer["slots"]]
    elif answer["count"]:
        lines.append(f"follow them with: cronfile runs --job {job} {center.where}")
    _echo("\n".join(lines) + "\n")


def _instant(text: str, option: str) -> float:
    from cronfile.schedules.nexttimes import UsageError, parse_time

    try:
        return parse_time(text)
    except UsageError:
        raise click.BadParameter(f"{text!r} is not an ISO-8601 time (e.g. 2026-10-25T00:00:00Z)",
                                 param_hint=option) from None


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
