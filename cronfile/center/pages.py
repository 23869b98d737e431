"""The dashboard's HTML, rendered on the server from a snapshot (no build step, no CDN).

Pure functions: a :class:`~cronfile.center.port.CenterSnapshot` (and, for a run's page, its
records) in, a page out. They run in a worker thread: the heatmap walks every job's fire
times for 24 hours, which is real work at 10,000 jobs.
"""

from __future__ import annotations

import html
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from cronfile.center.port import CenterSnapshot, RecentRun
from cronfile.schedules.jobtimes import job_timer
from cronfile.schedules.model import Job, JobKind

HEATMAP_HOURS = 24
FIRES_PER_JOB_CAP = 1440
"""A job that fires more often than once a minute (6-field seconds) counts once per minute
in the heatmap beyond this many fires: what matters is where load piles up."""
FAILED = frozenset({"failed", "timeout", "killed", "lost", "no_agent", "missed"})

e = html.escape

_DOW = ["Sunday", "Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
_SPECIAL = {"@hourly": "every hour", "@daily": "every day at 00:00",
            "@midnight": "every day at 00:00", "@weekly": "every Sunday at 00:00",
            "@monthly": "on the 1st of every month at 00:00",
            "@yearly": "every year on Jan 1 at 00:00", "@annually": "every year on Jan 1 at 00:00"}


def schedule_words(expr: str) -> str:
    """A schedule in words for the common shapes; the expression itself otherwise."""
    text = expr.strip()
    if text in _SPECIAL:
        return _SPECIAL[text]
    if text.startswith("@every"):
        return "every " + text[len("@every"):].strip()
    fields = text.split()
    if len(fields) != 5:
        return text
    minute, hour, dom, month, dow = fields
    step = re.fullmatch(r"\*/(\d+)", minute)
    if step and hour == dom == month == dow == "*":
        return "every minute" if step.group(1) == "1" else f"every {step.group(1)} minutes"
    if minute == hour == dom == month == dow == "*":
        return "every minute"
    if not (minute.isdigit() and dom == "*" and month == "*"):
        return text
    if hour == "*":
        return f"every hour at :{int(minute):02d}" if dow == "*" else text
    if not hour.isdigit():
        return text
    at = f"{int(hour):02d}:{int(minute):02d}"
    if dow == "*":
        return f"every day at {at}"
    if dow.isdigit() and int(dow) <= 7:
        return f"every {_DOW[int(dow)]} at {at}"
    if dow in ("1-5", "MON-FRI", "mon-fri"):
        return f"weekdays at {at}"
    return text


@dataclass(frozen=True)
class Heatmap:
    """Runs starting in each minute of a 24-hour window (UTC), from ``start``."""

    start: float
    counts: tuple[int, ...]  # HEATMAP_HOURS * 60

    @property
    def peak(self) -> int:
        return max(self.counts, default=0)


def heatmap(jobs: Iterable[Job], start: float) -> Heatmap:
    counts = [0] * (HEATMAP_HOURS * 60)
    end = start + HEATMAP_HOURS * 3600
    for job in jobs:
        timer = job_timer(job) if not job.suspend else None
        if timer is None:
            continue
        t: float | None = start - 0.001
        seen = 0
        last_minute = -1
        while seen < FIRES_PER_JOB_CAP:
            t = timer.next_after(t) if t is not None else None
            if t is None or t >= end:
                break
            minute = int((t - start) // 60)
            if minute != last_minute:  # several fires in one minute (seconds): one start load
                counts[minute] += 1
                last_minute = minute
            seen += 1
    return Heatmap(start, tuple(counts))


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _clock(iso_ts: str | None) -> str:
    """``HH:MM:SS`` of an ISO time today, the date too otherwise."""
    if not iso_ts:
        return "-"
    text = iso_ts.replace("T", " ")[:19]
    today = datetime.now(UTC).strftime("%Y-%m-%d")
    return text[11:] if text.startswith(today) else text


def _badge(status: str | None) -> str:
    if not status:
        return '<span class="badge none">never ran</span>'
    return f'<span class="badge s-{e(status)}">{e(status)}</span>'


def _strip(runs: tuple[RecentRun, ...]) -> str:
    if not runs:
        return '<span class="muted">no runs yet</span>'
    longest = max((r.duration_s or 0.0) for r in runs) or 1.0
    cells = []
    for run in runs:
        height = 30 + int(70 * ((run.duration_s or 0.0) / longest))
        secs = "-" if run.duration_s is None else f"{run.duration_s:.2f}s"
        cells.append(f'<a class="tick s-{e(run.status)}" href="/runs/{e(run.run_id)}" '
                     f'style="height:{height}%" data-status="{e(run.status)}" '
                     f'title="{e(str(run.scheduled_at))}: {e(run.status)}, {secs}"></a>')
    return f'<span class="strip">{"".join(cells)}</span>'


def page(title: str, body: str, revision: Mapping[str, Any] | None = None) -> str:
    rev = ""
    if revision:
        commit = revision.get("git_commit")
        rev = (f'<span class="rev">revision <code>{e(str(revision.get("content_hash"))[:12])}</code>'
               + (f' @ <code>{e(str(commit)[:12])}</code>' if commit else "") + "</span>")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{e(title)} · cronfile</title>
<link rel="stylesheet" href="/static/dashboard.css">
<script src="/static/dashboard.js" defer></script>
</head><body>
<header><a class="brand" href="/">cronfile</a>{rev}<span class="spacer"></span>
<form method="post" action="/logout" class="inline"><button class="link">log out</button></form>
</header>
<main>{body}</main>
</body></html>
"""


def login_page(error: str | None = None) -> str:
    message = f'<p class="error">{e(error)}</p>' if error else ""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Log in · cronfile</title>
<link rel="stylesheet" href="/static/dashboard.css">
</head><body class="login">
<form method="post" action="/login" class="card login-card" id="login">
<h1>cronfile</h1>
<p class="muted">Paste the center's HTTP token (the content of its --http-token-file).</p>
{message}
<label for="token">Token</label>
<input type="password" id="token" name="token" autocomplete="current-password" required autofocus>
<button type="submit" class="primary">Log in</button>
</form>
</body></html>
"""


def _rejection(snap: CenterSnapshot) -> str:
    rejection = snap.last_rejection
    if not rejection:
        return ""
    errors = "".join(f"<li><code>{e(str(x))}</code></li>" for x in rejection.get("errors") or [])
    return (f'<section class="card alert" id="rejection"><h2>Last change rejected</h2>'
            f'<p>at {e(str(rejection.get("ts")))}; still running the revision above.</p>'
            f"<ul>{errors}</ul></section>")


def _git(snap: CenterSnapshot) -> str:
    git = snap.git
    if not git:
        return ""
    behind = bool(git.get("why"))
    cls = "card alert" if behind else "card"
    why = f'<p id="git-why">{e(str(git["why"]))}</p>' if behind else ""
    return (f'<section class="{cls}" id="git"><h2>Following {e(str(git.get("url")))} '
            f'<code>{e(str(git.get("ref")))}</code></h2>'
            f'<p>running <code id="git-running">{e(str(git.get("running") or "-")[:12])}</code>, '
            f'newest seen <code id="git-seen">{e(str(git.get("seen") or "-")[:12])}</code></p>'
            f"{why}</section>")


def _summary(snap: CenterSnapshot) -> str:
    jobs = len(snap.jobs)
    running = sum(snap.running.values())
    failing = sum(1 for j in snap.jobs if (snap.recent.get(j.name) or ())
                  and snap.recent[j.name][-1].status in FAILED)
    connected = sum(1 for a in snap.agents if a.connected)
    rev = snap.revision or {}
    commit = rev.get("git_commit")
    tiles = [("jobs", str(jobs)), ("running", str(running)), ("failing", str(failing)),
             ("agents connected", f"{connected}/{len(snap.agents)}"),
             ("revision", str(rev.get("content_hash") or "none")[:12]
              + (f" @ {str(commit)[:8]}" if commit else ""))]
    cells = "".join(f'<div class="tile" id="tile-{e(k.split()[0])}"><div class="v">{e(v)}</div>'
                    f'<div class="k">{e(k)}</div></div>' for k, v in tiles)
    return f'<section class="tiles">{cells}</section>'


def _agents(snap: CenterSnapshot) -> str:
    if not snap.agents:
        return ('<section class="card"><h2>Agents</h2><p class="muted">No agents: jobs run on '
                "the center's own host.</p></section>")
    rows = []
    for a in snap.agents:
        state = "connected" if a.connected else "disconnected"
        labels = " ".join(f'<span class="label">{e(k)}={e(v)}</span>' for k, v in a.labels.items())
        rows.append(f'<tr class="agent {state}" data-agent="{e(a.name)}"><td>{e(a.name)}</td>'
                    f'<td><span class="dot {state}"></span>{state}</td>'
                    f'<td>{e(_clock(a.connected_since))}</td>'
                    f'<td>{e(_clock(a.last_heartbeat))}</td><td>{labels}</td></tr>')
    return ('<section class="card"><h2>Agents</h2><table id="agents"><thead><tr><th>agent</th>'
            "<th>state</th><th>since</th><th>last heartbeat</th><th>labels</th></tr>"
            f'</thead><tbody>{"".join(rows)}</tbody></table></section>')


def _heatmap(hm: Heatmap) -> str:
    peak = hm.peak or 1
    rows = []
    for hour in range(HEATMAP_HOURS):
        label = datetime.fromtimestamp(hm.start + hour * 3600, UTC).strftime("%H:00")
        cells = []
        for minute in range(60):
            n = hm.counts[hour * 60 + minute]
            level = 0 if n == 0 else 1 + min(4, int(4 * n / peak))
            at = datetime.fromtimestamp(hm.start + (hour * 60 + minute) * 60, UTC).strftime("%H:%M")
            cells.append(f'<i class="l{level}" data-minute="{at}" data-count="{n}" '
                         f'title="{at} UTC: {n} run{"s" if n != 1 else ""}"></i>')
        rows.append(f'<div class="hrow"><span class="hl">{label}</span>{"".join(cells)}</div>')
    total = sum(hm.counts)
    busiest = max(range(len(hm.counts)), key=lambda i: hm.counts[i]) if total else None
    note = ""
    if busiest is not None:
        at = datetime.fromtimestamp(hm.start + busiest * 60, UTC).strftime("%H:%M")
        note = f" · busiest minute {at} UTC with {hm.counts[busiest]} runs"
    return (f'<section class="card"><h2>Fire load, next 24 hours <span class="muted">'
            f"(runs starting per minute, UTC; {total} in all{note})</span></h2>"
            f'<div class="heatmap" id="heatmap">{"".join(rows)}</div>'
            '<div class="legend">less <i class="l0"></i><i class="l1"></i><i class="l2"></i>'
            '<i class="l3"></i><i class="l4"></i><i class="l5"></i> more</div></section>')


def _jobs(snap: CenterSnapshot, csrf: str) -> str:
    def failing_first(job: Job) -> tuple[bool, str]:
        recent = snap.recent.get(job.name)
        return (not (recent and recent[-1].status in FAILED), job.name)

    rows = []
    for job in sorted(snap.jobs, key=failing_first):
        recent = snap.recent.get(job.name) or ()
        last = recent[-1] if recent else None
        status = last.status if last else None
        classes = ["job"]
        if status in FAILED:
            classes.append("failed")
        if job.suspend:
            classes.append("suspended")
        if job.kind is JobKind.DAEMON:
            when = "daemon"
        elif job.trigger is not None:
            when = f"on event {job.trigger.event}"
        elif job.after:
            when = "after " + ", ".join(job.after)
        else:
            when = "; ".join(schedule_words(s) for s in job.schedules)
            if job.timezone != "UTC":
                when += f" ({job.timezone})"
        running = snap.running.get(job.name, 0)
        nxt = "suspended" if job.suspend else _when(snap.next_fire.get(job.name))
        last_at = last.scheduled_at[:19].replace("T", " ") if last and last.scheduled_at else "-"
        rows.append(
            f'<tr class="{" ".join(classes)}" data-job="{e(job.name)}" '
            f'data-status="{e(status or "")}">'
            f'<td class="name"><b>{e(job.name)}</b><div class="muted">{e(job.description)}</div></td>'
            f"<td>{e(job.owner or '-')}</td>"
            f'<td title="{e(" | ".join(job.schedules))}">{e(when)}</td>'
            f"<td>{e(nxt)}</td><td>{e(last_at)}</td>"
            f'<td class="outcome">{_badge(status)}'
            f'{f" <span class=badge-run>{running} running</span>" if running else ""}</td>'
            f"<td>{_strip(recent)}</td>"
            f'<td><form method="post" action="/ui/jobs/{e(job.name)}/run" class="inline">'
            f'<input type="hidden" name="csrf" value="{e(csrf)}">'
            f'<button class="run-now" data-job="{e(job.name)}">run now</button></form></td></tr>')
    return ('<section class="card"><h2>Jobs <input id="filter" placeholder="filter" '
            'aria-label="filter jobs"></h2><table id="jobs"><thead><tr><th>job</th><th>owner</th>'
            "<th>schedule</th><th>next (UTC)</th><th>last</th><th>outcome</th>"
            "<th>recent runs</th><th></th></tr></thead>"
            f'<tbody>{"".join(rows)}</tbody></table></section>')


def dashboard_page(snap: CenterSnapshot, hm: Heatmap, csrf: str) -> str:
    body = (_summary(snap) + _git(snap) + _rejection(snap)
            + f'<div class="grid2">{_heatmap(hm)}{_agents(snap)}</div>' + _jobs(snap, csrf))
    return page("dashboard", body, snap.revision)


RECORD_FIELDS = ("ts", "record", "agent", "transport", "attempt", "status", "exit_code",
                 "signal", "duration_s", "reason", "stopped_by")


def run_page(run: Mapping[str, Any], records: Sequence[Mapping[str, Any]], csrf: str,
             running: bool, revision: Mapping[str, Any] | None) -> str:
    run_id = str(run.get("run_id"))
    state = str(run.get("state"))
    header = "".join(f"<th>{f}</th>" for f in RECORD_FIELDS)
    rows = "".join(
        "<tr>" + "".join(f"<td>{e('' if r.get(f) is None else str(r.get(f)))}</td>"
                         for f in RECORD_FIELDS) + "</tr>" for r in records)
    stop = ""
    if running:
        stop = (f'<form method="post" action="/ui/runs/{e(run_id)}/stop" class="inline" '
                f'data-confirm="Stop this run?"><input type="hidden" name="csrf" value="{e(csrf)}">'
                '<button class="danger" id="stop">stop</button></form>')
    tail = str(run.get("output_tail") or "")
    body = (f'<section class="card"><h2>Run <code>{e(run_id)}</code> of '
            f'<a href="/#job-{e(str(run.get("job")))}">{e(str(run.get("job")))}</a> '
            f'<span id="run-state">{_badge(state)}</span> {stop}</h2>'
            f'<dl class="facts"><dt>scheduled</dt><dd>{e(str(run.get("scheduled_at") or "-"))}</dd>'
            f'<dt>agent</dt><dd>{e(str(run.get("agent")))} via {e(str(run.get("transport")))}</dd>'
            f'<dt>trigger</dt><dd>{e(str(run.get("trigger") or "schedule"))}</dd>'
            f'<dt>revision</dt><dd><code>{e(str((run.get("revision") or {}).get("content_hash")))}'
            "</code></dd></dl>"
            f'<table id="records"><thead><tr>{header}</tr></thead><tbody>{rows}</tbody></table>'
            f'<h3>Output tail</h3><pre id="output">{e(tail) or "<span class=muted>(none yet)</span>"}'
            "</pre></section>")
    return page(f"run {run_id}", body, revision)


__all__ = ["Heatmap", "dashboard_page", "heatmap", "login_page", "run_page", "schedule_words"]
