"""``cronfile runs`` and ``cronfile status``: read a center's state directory.

Both work from the files alone (the ledger, ``applied.json``, ``center.json``), so they
answer whether or not the center is running, and from any process that can read them. The
records may come from another :class:`~cronfile.state.queries.RunStore` (PostgreSQL, the
ledger of record of HA centers); everything else still comes from the state directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cronfile.schedules.firetimes import JobTimer, to_datetime
from cronfile.schedules.model import DesiredState, JobKind
from cronfile.schedules.nexttimes import parse_time
from cronfile.state import queries
from cronfile.state.applied import read_applied
from cronfile.state.gitstate import read_git_state
from cronfile.state.queries import JsonlRunStore, RunStore

Source = Path | RunStore
"""A state directory (its own ledger) or any store of run records."""


def _store(source: Source) -> RunStore:
    return JsonlRunStore(source) if isinstance(source, Path) else source


def query_runs(source: Source, job: str | None = None, status: str | None = None,
               since: str | None = None, limit: int | None = None,
               until: str | None = None) -> list[dict[str, Any]]:
    """``cronfile runs``: the newest ``limit`` matching runs, oldest first; reads the
    newest segments first and stops at the limit (:mod:`cronfile.state.queries`)."""
    return _store(source).runs(queries.RunQuery(
        job=job, status=status, since=parse_time(since) if since else None,
        until=parse_time(until) if until else None, limit=limit))


def run_log(source: Source, run_id: str) -> dict[str, Any] | None:
    """``cronfile logs RUN_ID``: the run's records in order and its whole output tail."""
    records = _store(source).run_records(run_id)
    return log_entry(run_id, records) if records else None


def log_entry(run_id: str, records: list[dict[str, Any]]) -> dict[str, Any]:
    """What ``cronfile logs`` renders, from a run's records (read here or sent by the API)."""
    tail = next((r.get("output_tail") for r in reversed(records)
                 if isinstance(r.get("output_tail"), str)), "")
    return {"run_id": run_id, "job": records[0].get("job"), "records": records,
            "output_tail": tail}


def render_log(entry: dict[str, Any], fmt: str) -> str:
    if fmt == "json":
        return json.dumps(entry, indent=2) + "\n"
    lines = [f"run {entry['run_id']} of {entry['job']}"]
    for r in entry["records"]:
        status = r.get("status") or ""
        extra = "".join(f" {k}={r[k]}" for k in ("agent", "attempt", "exit_code", "signal",
                                                  "duration_s", "reason")
                        if r.get(k) is not None and (k != "agent" or r.get("record") == "dispatched"))
        lines.append(f"{r.get('ts')}  {r.get('record'):<10} {status}{extra}".rstrip())
    out = "\n".join(lines) + "\n"
    tail = entry["output_tail"] or ""
    out += f"--- output tail ({len(tail)} chars) ---\n" + tail
    if tail and not tail.endswith("\n"):
        out += "\n"
    return out


def run_records(source: Source, run_id: str) -> list[dict[str, Any]]:
    """Every record of one run, in order (:func:`cronfile.state.queries.collect_run`)."""
    return _store(source).run_records(run_id)


def fold_run(records: list[dict[str, Any]]) -> dict[str, Any]:
    """One run's records folded as ``cronfile runs`` shows it, with its ``state``."""
    view: dict[str, Any] = {"dispatched_ts": records[0].get("ts")}
    for record in records:
        view.update(record)
    view["state"] = view.get("status") or ("running" if view.get("record") == "started"
                                           else "dispatched")
    return view


def run_view(source: Source, run_id: str) -> dict[str, Any] | None:
    records = run_records(source, run_id)
    return fold_run(records) if records else None


def latest_run_records(store: RunStore, state_dir: Path, run_id: str) -> list[dict[str, Any]]:
    """One run's records from ``store``, or from this center's own ledger when only that
    has its end yet: an HA center copies its records to PostgreSQL in the background, so
    right after ``run --wait`` (or ``?wait=``) saw a run end here, the copy may lag."""
    records = store.run_records(run_id)
    if isinstance(store, JsonlRunStore) or _ended(records) or not state_dir.is_dir():
        return records
    local = queries.find_run(state_dir, run_id)
    return local if _ended(local) else records


def _ended(records: list[dict[str, Any]]) -> bool:
    return any(r.get("record") == "finished" for r in records)


def render_runs(views: list[dict[str, Any]], fmt: str) -> str:
    if fmt == "json":
        return json.dumps(views, indent=2) + "\n"
    if not views:
        return "no runs recorded\n"
    lines = [f"{'SCHEDULED':<24} {'JOB':<24} {'AGENT':<12} {'TRY':>3} {'STATUS':<10} {'EXIT':>4} "
             f"{'SECS':>7}  RUN_ID"]
    for v in views:
        exit_code = v.get("exit_code")
        duration = v.get("duration_s")
        extra = f" x{v['count']}" if v.get("count") else ""
        lines.append(
            f"{str(v.get('scheduled_at') or '-'):<24} {str(v.get('job')):<24} {str(v.get('agent')):<12} "
            f"{v.get('attempt', 1):>3} {str(v.get('state')) + extra:<10} "
            f"{'' if exit_code is None else exit_code:>4} "
            f"{'' if duration is None else f'{duration:.2f}':>7}  {v.get('run_id')}"
        )
    return "\n".join(lines) + "\n"


def _center_alive(state_dir: Path) -> dict[str, Any] | None:
    try:
        info = json.loads((state_dir / "center.json").read_text())
        os.kill(int(info["pid"]), 0)
        return dict(info)
    except PermissionError:  # alive, but another user's (a root center, an operator's query)
        return dict(info)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def build_status(state_dir: Path, now: float | None = None,
                 applied: DesiredState | None = None,
                 store: RunStore | None = None) -> dict[str, Any]:
    """``applied``: the state the center holds in memory, when it is the center asking
    (its HTTP API): the same as ``applied.json``, without parsing the files again.
    ``store``: where the records are (default: the state directory's ledger)."""
    now = time.time() if now is None else now
    if applied is None:
        applied = read_applied(state_dir)
    connected: list[dict[str, Any]] = []
    with contextlib.suppress(OSError, ValueError):
        connected = json.loads((state_dir / "agents.json").read_text())
    if not isinstance(connected, list):
        connected = []
    job_names = sorted(applied.jobs) if applied is not None else []
    agent_names = [*(applied.agents if applied is not None else ()),
                   *(str(a.get("name")) for a in connected if isinstance(a, dict))]
    summary = (store or JsonlRunStore(state_dir)).summary(job_names, agent_names)
    last = {name: info["last"] for name, info in summary.jobs.items() if info.get("last")}
    running: dict[str, list[str]] = {}
    for run_id, run in summary.open_runs.items():
        running.setdefault(str(run.get("job")), []).append(run_id)
    by_host = summary.hosts
    rejection = summary.rejection
    notify_failures = summary.notify_failures
    jobs = []
    center = _center_alive(state_dir)
    if applied is not None:
        for name, job in sorted(applied.jobs.items()):
            nxt = None
            # A stopped center fires nothing: a NEXT time would be a promise nobody keeps.
            if job.schedules and job.kind is JobKind.CRON and not job.suspend and center:
                t = JobTimer.for_job(job.schedules, job.timezone, name).next_after(now)
                nxt = to_datetime(t, job.timezone).isoformat() if t else None
            lv = last.get(name, {})
            jobs.append({
                "job": name, "kind": job.kind.value, "schedule": list(job.schedules),
                "timezone": job.timezone, "suspend": job.suspend, "next": nxt,
                "last_status": lv.get("status"), "last_scheduled_at": lv.get("scheduled_at"),
                "last_transport": lv.get("transport"), "last_agent": lv.get("agent"),
                "last_reason": lv.get("reason"), "last_route": lv.get("route"),
                "running": running.get(name, []),
                "description": job.description, "owner": job.owner,
                "last_notify_failure": notify_failures.get(name),
                "trigger": job.trigger.event if job.trigger else None,
                "after": list(job.after),
            })
    if center is None:
        connected = []  # a stopped center has no connections, whatever the file says
    agents = _hosts(applied, connected, by_host)
    git = read_git_state(state_dir)
    places = _places(state_dir, applied, center is not None)
    return {
        "center": {"running": center is not None, **(center or {})},
        **({"git": git} if git is not None else {}),
        "revision": applied.revision.to_dict() if applied else None,
        "last_rejection": rejection and {"ts": rejection.get("ts"), "errors": rejection.get("errors")},
        "jobs": jobs,
        "agents": agents,
        "pools": places["pools"],
        "agent_caps": places["agents"],
        "unreadable_ledger_lines": summary.skipped,
    }


def _places(state_dir: Path, applied: Any, live: bool) -> dict[str, dict[str, Any]]:
    """Each pool (and capped agent): its cap from the applied state, its runs in flight
    and waiting starts from the running center's ``places.json`` (none when it is down)."""
    now: dict[str, Any] = {}
    if live:
        with contextlib.suppress(OSError, ValueError):
            now = json.loads((state_dir / "places.json").read_text())
    out: dict[str, dict[str, Any]] = {"pools": {}, "agents": {}}
    if applied is None:
        return out
    caps = {"pools": {j.pool.name: j.pool.max_running for j in applied.jobs.values()
                      if j.pool is not None},
            "agents": {a.name: a.max_running for a in applied.agents.values()
                       if a.max_running is not None}}
    for kind, by_name in caps.items():
        seen = now.get(kind)
        if not isinstance(seen, dict):
            seen = {}
        for name, cap in sorted(by_name.items()):
            use = seen.get(name)
            if not isinstance(use, dict):
                use = {}
            out[kind][name] = {"max_running": cap, "running": use.get("running", 0),
                               "waiting": use.get("waiting", 0),
                               "oldest_waiting_since": use.get("oldest_waiting_since"),
                               "waiting_jobs": use.get("waiting_jobs", [])}
    return out


def _hosts(applied: Any, connected: list[dict[str, Any]],
           by_host: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Every declared or connected host: connection, and which transport served its last
    run and why (SSH fallback says so in ``route``)."""
    live = {a.get("name"): a for a in connected}
    names = list(applied.agents) if applied is not None else []
    names += [n for n in live if n not in names]
    out = []
    for name in names:
        declared = applied.agents.get(name) if applied is not None else None
        conn = live.get(name, {})
        last = by_host.get(name, {})
        labels = conn.get("labels") or (dict(declared.labels) if declared else {})
        out.append({
            "name": name, "connected": name in live, "labels": labels,
            "ssh": bool(declared and declared.ssh),
            "connected_since": conn.get("connected_since"), "last_heartbeat": conn.get("last_heartbeat"),
            "running": conn.get("running", []), "daemons": conn.get("daemons", []),
            "last_run_at": last.get("scheduled_at"), "last_transport": last.get("transport"),
            "last_route": last.get("route") or (f"agent {name} connected" if last.get("transport") == "tcp"
                                                else None),
        })
    return out


def _when(job: dict[str, Any], center_running: bool) -> str:
    """The NEXT column: a time, or what starts the job instead."""
    if job["suspend"]:
        return "suspended"
    if job["kind"] == "daemon":
        return "daemon"
    if job.get("trigger"):
        return f"on event {job['trigger']}"
    if job.get("after"):
        return f"after {', '.join(job['after'])}"
    if not center_running:
        return "- (center not running)"
    return str(job["next"] or "-")


def render_status(status: dict[str, Any], fmt: str) -> str:
    if fmt == "json":
        return json.dumps(status, indent=2) + "\n"
    c = status["center"]
    lines = [f"center: {'running (pid ' + str(c.get('pid')) + ')' if c['running'] else 'not running'}"]
    rev = status["revision"]
    if rev:
        commit = f" @ {rev['git_commit'][:12]}" if rev.get("git_commit") else ""
        lines.append(f"revision: {rev['content_hash']}{commit}")
    else:
        lines.append("revision: none applied")
    git = status.get("git")
    if git:
        lines.append(f"git: {git.get('url')} {git.get('ref')}: newest seen "
                     f"{str(git.get('seen') or '-')[:12]}, running "
                     f"{str(git.get('running') or '-')[:12]}"
                     + (f" ({git['why']})" if git.get("why") else ""))
    if status["last_rejection"]:
        kept = "still running the revision above" if rev else "no revision is running"
        lines.append(f"LAST CHANGE REJECTED at {status['last_rejection']['ts']} ({kept}):")
        lines.extend(f"  {e}" for e in status["last_rejection"]["errors"] or [])
    lines.append("")
    lines.append(f"{'JOB':<28} {'NEXT':<27} {'LAST':<10} {'VIA':<10} RUNNING")
    for j in status["jobs"]:
        via = f"{j['last_transport'] or '-'}"
        lines.append(f"{j['job']:<28} {_when(j, c['running']):<27} "
                     f"{str(j['last_status'] or '-'):<10} {via:<10} {len(j['running']) or ''}")
        about = "; ".join(x for x in (j.get("owner") and f"owner: {j['owner']}",
                                      j.get("description")) if x)
        if about:
            lines.append(f"  {about}")
    failed = [j for j in status["jobs"] if j.get("last_notify_failure")]
    if failed:
        lines.append("")
        for j in failed:
            nf = j["last_notify_failure"]
            lines.append(f"NOTIFICATION FAILED for {j['job']} at {nf['ts']}: {nf['kind']} via "
                         f"{nf['via']}: {nf['error']}")
    if status["agents"]:
        lines.append("")
        lines.append(f"{'AGENT':<20} {'CONNECTED SINCE':<27} {'LAST HEARTBEAT':<27} {'LAST VIA':<9} "
                     "LABELS / WHY")
        for a in status["agents"]:
            labels = ",".join(f"{k}={v}" for k, v in (a.get("labels") or {}).items())
            since = str(a.get("connected_since") or ("-" if a.get("connected") else "not connected"))[:26]
            beat = str(a.get("last_heartbeat") or "-")[:26]
            why = f"  ({a['last_route']})" if a.get("last_route") else ""
            lines.append(f"{a.get('name', ''):<20} {since:<27} {beat:<27} "
                         f"{str(a.get('last_transport') or '-'):<9} {labels}{why}")
    places = [("pool", n, p) for n, p in status.get("pools", {}).items()]
    places += [("agent", n, p) for n, p in status.get("agent_caps", {}).items()]
    if places:
        lines.append("")
        lines.append(f"{'POOL / AGENT CAP':<28} {'RUNNING':>7} {'MAX':>7} {'WAITING':>7}  OLDEST WAITING")
        for kind, name, p in places:
            since = p.get("oldest_waiting_since")
            oldest = datetime.fromtimestamp(since, UTC).isoformat() if since else "-"
            lines.append(f"{kind + ' ' + name:<28} {p['running']:>7} {p['max_running']:>7} "
                         f"{p['waiting']:>7}  {oldest}")
    return "\n".join(lines) + "\n"


__all__ = ["build_status", "fold_run", "latest_run_records", "query_runs", "render_log",
           "render_runs", "render_status", "run_log", "run_records", "run_view", "to_datetime"]
