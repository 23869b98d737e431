"""What the HTTP server may ask of a running center: one small typed interface.

The HTTP API, the metrics and the dashboard talk to the center only through
:class:`CenterPort` (the same operations the control socket offers, plus a read-only
:class:`CenterSnapshot`), so they never reach into the daemon's internals and can be tested
against any object that provides it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from cronfile.center.counters import RunMetrics
from cronfile.schedules.model import DesiredState, Job


@dataclass(frozen=True)
class AgentView:
    """One declared or connected agent, as the center sees it now."""

    name: str
    connected: bool
    last_heartbeat: str | None = None
    connected_since: str | None = None
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class RecentRun:
    """One finished run, kept in memory for the dashboard's strip of outcomes."""

    run_id: str
    status: str
    duration_s: float | None
    scheduled_at: str | None


@dataclass(frozen=True)
class CenterSnapshot:
    """The center's state at one instant, copied on the event loop so that it can be
    read (rendered as metrics or HTML) in a worker thread while the loop goes on.

    The jobs are the model's frozen objects, shared, not copied; the mappings are copies.
    """

    now: float
    revision: Mapping[str, Any]
    last_rejection: Mapping[str, Any] | None
    jobs: tuple[Job, ...]
    next_fire: Mapping[str, float]
    last_slot: Mapping[str, float]
    last_success: Mapping[str, float]
    running: Mapping[str, int]
    agents: tuple[AgentView, ...]
    recent: Mapping[str, tuple[RecentRun, ...]]
    git: Mapping[str, Any] | None = None  # following a branch: url, ref, seen, running, why
    ha: Mapping[str, Any] | None = None  # with --ha: name, role, term, lease_holder, ...


class Operations(Protocol):
    """What an operator may ask of a running center, whichever way the request came (the
    control socket or HTTP)."""

    def has_job(self, name: str) -> bool: ...

    async def run_job(self, name: str) -> list[dict[str, Any]]:
        """Start ``name`` now; what became of each start."""
        ...

    def trigger(self, event: str) -> list[str]:
        """Queue the jobs that run on ``event``; their names."""
        ...

    async def reload(self, revision: str | None = None) -> dict[str, Any]:
        """Re-read the source now (``cronfile apply``); the reload's answer. ``revision``
        (``apply --revision``): that commit of the followed branch; a center that follows
        no branch answers ``refused: "no_git"``."""
        ...

    def stop_run(self, run_id: str, requested_by: str) -> dict[str, Any]:
        """Stop a running run; it is recorded ``killed`` with who asked."""
        ...

    async def wait_run(self, run_id: str, timeout: float) -> bool:
        """Wait until ``run_id`` is no longer running and its final record is written;
        False on timeout."""
        ...

    async def backfill(self, name: str, start: float, end: float, dry_run: bool,
                       confirmed: bool) -> dict[str, Any]:
        """Queue (or with ``dry_run`` list) the slots of ``name`` to backfill; raises
        ``BackfillRefused``."""
        ...


class CenterPort(Operations, Protocol):
    """Everything the HTTP side uses: the operations, plus what it reads."""

    @property
    def state_dir(self) -> Path: ...

    @property
    def metrics(self) -> RunMetrics:
        """The live counters and histograms (read from a thread at scrape time)."""
        ...

    def applied_state(self) -> DesiredState | None:
        """The desired state in force (what ``applied.json`` holds), None before any."""
        ...

    def current_revision(self) -> dict[str, Any]:
        """The applied revision (``content_hash``, ``git_commit``); empty when none."""
        ...

    def wait_dispatch_idle(self, timeout: float) -> bool:
        """Block (in a worker thread) until no burst of runs is being dispatched, at most
        ``timeout`` seconds; whether it is idle. Expensive reads wait for it at their
        checkpoints: Python threads share one interpreter lock, and a scrape rendering while
        1,000 runs are spawned would slow the spawns down."""
        ...

    def snapshot(self) -> CenterSnapshot:
        """A consistent copy of what metrics and the dashboard show."""
        ...


# ---------------------------------------------------------------------- the answers
# One shape per operation, the same over the control socket and HTTP.


async def run_now(center: Operations, name: str) -> dict[str, Any]:
    """``{"ok", "job", "results"}``, or ``{"ok": False, "error"}`` (with ``results`` when
    the job exists but nothing started)."""
    if not center.has_job(name):
        return {"ok": False, "error": f"no job named {name!r}"}
    results = await center.run_job(name)
    # a start waiting for a place in its pool (or on its agent) is accepted too
    started = [r for r in results if r.get("status") in ("started", "waiting")]
    if not started:
        reasons = "; ".join(str(r.get("reason") or r.get("status")) for r in results)
        return {"ok": False, "job": name, "results": results,
                "error": f"{name} did not start: {reasons or 'nothing to run'}"}
    return {"ok": True, "job": name, "results": results}


def fire(center: Operations, event: str) -> dict[str, Any]:
    return {"ok": True, "event": event, "jobs": center.trigger(event)}


async def sync(center: Operations, revision: str | None = None) -> dict[str, Any]:
    result = await center.reload(revision)
    return {"ok": result.get("applied", False) or result.get("unchanged", False), **result}


async def backfill(center: Operations, request: Mapping[str, Any]) -> dict[str, Any]:
    """``{"ok", "job", "slots", "count", ...}`` (see ``cronfile backfill``), or
    ``{"ok": False, "error"}``."""
    from cronfile.center.backfill import BackfillRefused

    name, start, end = request.get("job"), request.get("from"), request.get("to")
    if not isinstance(name, str) or not center.has_job(name):
        return {"ok": False, "error": f"no job named {name!r}"}
    if not isinstance(start, int | float) or not isinstance(end, int | float):
        return {"ok": False, "error": "backfill needs from and to (epoch seconds)"}
    try:
        answer = await center.backfill(name, float(start), float(end),
                                       bool(request.get("dry_run")), bool(request.get("yes")))
    except BackfillRefused as exc:
        return {"ok": False, "error": str(exc)}
    return {"ok": True, **answer}
