"""``cronfile runs`` and ``cronfile status``: read a center's state directory.

Both work from the files alone (the ledger, ``applied.json``, ``center.json``), so they
answer whether or not the center is running, and from any process that can read them.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from cronfile.schedules.firetimes import JobTimer, to_datetime
from cronfile.schedules.model import JobKind
from cronfile.schedules.nexttimes import parse_time
from cronfile.state.applied import read_applied
from cronfile.state.ledger import ReadStats, fold_runs, read


def _ts(text: Any) -> float:
    if not isinstance(text, str):
        return 0.0
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0


def load_runs(state_dir: Path) -> tuple[list[dict[str, Any]], int]:
    """Every run folded into one view (records of one run_id merged), and the number of
    unreadable lines skipped (a torn tail never stops a reader)."""
    stats = ReadStats()
    views = fold_runs(read(state_dir / "runs.jsonl", stats))
    return views, stats.skipped


def query_runs(state_dir: Path, job: str | None = None, status: str | None = None,
               since: str | None = None, limit: int | None = None) -> list[dict[str, Any]]:
    views, _ = load_runs(state_dir)
    since_ts = parse_time(since) if since else None
    out = []
    for view in views:
        state = view.get("status") or ("running" if view.get("record") == "started" else "dispatched")
        view["state"] = state
        if job and view.get("job") != job:
            continue
        if status and state != status:
            continue
        if since_ts is not None and _ts(view.get("scheduled_at") or view.get("dispatched_ts")) < since_ts:
            continue
        out.append(view)
    if limit:
        out = out[-limit:]
    return out


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


def build_status(state_dir: Path, now: float | None = None) -> dict[str, Any]:
    now = time.time() if now is None else now
    applied = read_applied(state_dir)
    views, skipped = load_runs(state_dir)
    last: dict[str, dict[str, Any]] = {}
    running: dict[str, list[str]] = {}
    by_host: dict[str, dict[str, Any]] = {}
    for v in views:
        name = v.get("job")
        if not isinstance(name, str):
            continue
        if v.get("transport") in ("local", "tcp", "ssh"):
            by_host[str(v.get("agent"))] = v
        if not v.get("status"):
            running.setdefault(name, []).append(str(v.get("run_id")))
        elif v.get("status"):
            last[name] = v
    rejection = None
    notify_failures: dict[str, dict[str, Any]] = {}
    for event in read(state_dir / "events.jsonl"):
        if event.get("event") == "revision_rejected":
            rejection = event
        elif event.get("event") == "revision_applied":
            rejection = None
        elif event.get("event") == "notify_failed" and isinstance(event.get("job"), str):
            notify_failures[event["job"]] = {k: event.get(k) for k in (
                "ts", "kind", "via", "status_code", "error")}
    jobs = []
    if applied is not None:
        for name, job in sorted(applied.jobs.items()):
            nxt = None
            if job.schedules and job.kind is JobKind.CRON and not job.suspend:
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
            })
    connected: list[dict[str, Any]] = []
    with contextlib.suppress(OSError, ValueError):
        connected = json.loads((state_dir / "agents.json").read_text())
    center = _center_alive(state_dir)
    if center is None:
        connected = []  # a stopped center has no connections, whatever the file says
    agents = _hosts(applied, connected, by_host)
    return {
        "center": {"running": center is not None, **(center or {})},
        "revision": applied.revision.to_dict() if applied else None,
        "last_rejection": rejection and {"ts": rejection.get("ts"), "errors": rejection.get("errors")},
        "jobs": jobs,
        "agents": agents,
        "unreadable_ledger_lines": skipped,
    }


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
    if status["last_rejection"]:
        lines.append(f"LAST CHANGE REJECTED at {status['last_rejection']['ts']} "
                     "(still running the revision above):")
        lines.extend(f"  {e}" for e in status["last_rejection"]["errors"] or [])
    lines.append("")
    lines.append(f"{'JOB':<28} {'NEXT':<27} {'LAST':<10} {'VIA':<10} RUNNING")
    for j in status["jobs"]:
        nxt = j["next"] or ("suspended" if j["suspend"] else j["kind"] if j["kind"] == "daemon" else "-")
        via = f"{j['last_transport'] or '-'}"
        lines.append(f"{j['job']:<28} {nxt:<27} {str(j['last_status'] or '-'):<10} {via:<10} "
                     f"{len(j['running']) or ''}")
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
    return "\n".join(lines) + "\n"


__all__ = ["build_status", "query_runs", "render_runs", "render_status", "to_datetime"]
