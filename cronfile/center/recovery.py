"""What a starting center learns from the ledger: pure functions over records, no I/O.

:func:`recover` folds the previous centers' run records (``fold_runs`` views) into what
the new center must know before it schedules anything: every slot already handled (once
per slot), the end of each job's recorded ``missed`` range, the last success per job, the
runs left in flight (``lost`` records to write, or, for runs on agents, a wait for the
agent's report), and each slot's last attempt.

:func:`recover_summary` gives the same from the ledger's summary (what a start reads
instead of the whole history). :func:`pending_starts` then says what was queued but never
started, to queue again: retries whose failed attempt has no later one, and triggered
starts whose (job, due) is not in the ledger; nothing older than ``horizon``.

The center applies the result (writes the records, tells the scheduler); tests call these
with records and a fake clock's time, in-process.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from cronfile.schedules.model import RunStatus
from cronfile.state.checkpoint import LedgerSummary
from cronfile.state.ledger import parse_iso
from cronfile.state.runrecord import IDENTITY_FIELDS, RunRecord

BASE_FIELDS = IDENTITY_FIELDS
"""A run record's identity, in the §4 order: what a later record of the same run repeats."""

SlotKey = tuple[str, float, str]  # (job, slot rounded to ms, agent)


@dataclass
class Recovery:
    done_slots: set[SlotKey] = field(default_factory=set)
    missed_until: dict[str, float] = field(default_factory=dict)
    last_success: dict[str, float] = field(default_factory=dict)
    awaiting_agents: dict[str, dict[str, Any]] = field(default_factory=dict)
    """tcp runs in flight: run_id -> record base, until the agent reports or the lease ends."""
    lost: list[dict[str, Any]] = field(default_factory=list)
    """``finished``/``lost`` records for runs of this process kind left in flight."""
    last_attempts: dict[SlotKey, tuple[int, dict[str, Any] | None]] = field(default_factory=dict)
    """per slot and target: its last attempt, and that attempt's view if it failed."""


@dataclass(frozen=True)
class RequeueTrigger:
    job: str
    due: float


@dataclass(frozen=True)
class RequeueRetry:
    """A failed attempt to report to the scheduler again, so it queues the next one."""

    job: str
    run_id: str
    status: RunStatus
    exit_code: int | None
    slot: float
    attempt: int
    agent: str
    ended: float


STOPPED_IN_FLIGHT = "the center stopped while the run was in flight"
"""The ``reason`` of a run a restarted center records ``lost``."""


def stopped_in_flight(_view: dict[str, Any]) -> str:
    return STOPPED_IN_FLIGHT


def recover(views: Iterable[dict[str, Any]],
            lost_reason: Callable[[dict[str, Any]], str] = stopped_in_flight) -> Recovery:
    """Fold the ledger's run views (one per run, its latest record) into a :class:`Recovery`.

    A restart folds its own JSONL; an HA takeover folds the records table
    (:func:`cronfile.ha.takeover.read_takeover_ledger`) with a ``lost_reason`` naming each
    run's old leader: the same decisions either way (SPEC §9 "Takeover")."""
    out = Recovery()
    for view in views:
        job = view.get("job")
        slot = parse_iso(view.get("scheduled_at"))
        if slot is not None and isinstance(job, str):
            key = (job, round(slot, 3), str(view.get("agent")))
            out.done_slots.add(key)
            if view.get("status") == "missed":  # a range: its slots are all handled
                end = parse_iso(view.get("last_scheduled_at")) or slot
                out.missed_until[job] = max(out.missed_until.get(job, end), end)
            attempt = view.get("attempt")
            if isinstance(attempt, int):
                last = out.last_attempts.get(key)
                if last is None or attempt >= last[0]:
                    failed = view.get("status") in (RunStatus.FAILED.value, RunStatus.TIMEOUT.value)
                    out.last_attempts[key] = (attempt, view if failed else None)
        if view.get("status") == "succeeded" and isinstance(job, str):
            ended = parse_iso(view.get("finished_at")) or 0.0
            out.last_success[job] = max(out.last_success.get(job, 0.0), ended)
        if view.get("record") in ("dispatched", "started") and view.get("transport") == "tcp":
            # Its agent kept running it and will deliver the outcome when it reconnects;
            # it is recorded lost only if the agent stays away past the lease.
            out.awaiting_agents[str(view.get("run_id"))] = {k: view.get(k) for k in BASE_FIELDS}
        elif view.get("record") in ("dispatched", "started"):
            out.lost.append(RunRecord.without_outcome(
                {k: view.get(k) for k in BASE_FIELDS}, RunStatus.LOST, lost_reason(view),
                started_at=view.get("started_at")).to_json())
    return out


def recover_summary(summary: LedgerSummary) -> Recovery:
    """The same :class:`Recovery` from the ledger's summary (its checkpoint and what
    followed), which holds only what is still in reach: the slots of the last hours, the
    runs still open, per job its last success and missed range."""
    out = Recovery()
    for key, (attempt, failed, _ts) in summary.slots.items():
        job, scheduled, agent = key.split("\x00")
        slot = parse_iso(scheduled)
        if slot is None:
            continue
        out.done_slots.add((job, round(slot, 3), agent))
        out.last_attempts[(job, round(slot, 3), agent)] = (attempt, failed)
    for job, info in summary.jobs.items():
        missed_end = parse_iso(info.get("missed_until"))
        if missed_end is not None:
            out.missed_until[job] = missed_end
        success = parse_iso(info.get("last_success"))
        if success is not None:
            out.last_success[job] = success
    for run_id, run in summary.open_runs.items():
        base = {k: run.get(k) for k in BASE_FIELDS}
        if run.get("transport") == "tcp":  # its agent reports it when it reconnects
            out.awaiting_agents[run_id] = base
        else:
            out.lost.append(RunRecord.without_outcome(
                base, RunStatus.LOST, STOPPED_IN_FLIGHT,
                started_at=run.get("started_at")).to_json())
    return out


def pending_starts(recovery: Recovery, events: Iterable[dict[str, Any]], horizon: float,
                   has_job: Callable[[str], bool]) -> list[RequeueTrigger | RequeueRetry]:
    """What the previous center had queued but not started, oldest decisions first:
    triggered starts (from ``triggered`` events) not in the ledger, then retries. Pass
    no ``events`` when no job runs on a trigger (``events.jsonl`` is then not read)."""
    out: list[RequeueTrigger | RequeueRetry] = []
    started: set[tuple[str, float]] | None = None  # built on the first trigger event only
    for event in events:
        if event.get("event") != "triggered" or not isinstance(event.get("due"), dict):
            continue
        if started is None:
            started = {(job, slot) for job, slot, _agent in recovery.done_slots}
        for job, when in event["due"].items():
            due = parse_iso(when)
            if due is not None and due >= horizon and (job, round(due, 3)) not in started:
                out.append(RequeueTrigger(job, due))
                started.add((job, round(due, 3)))
    for (job, slot, agent), (attempt, view) in recovery.last_attempts.items():
        ended = parse_iso(view.get("finished_at")) if view is not None else None
        if view is None or ended is None or ended < horizon or not has_job(job):
            continue
        exit_code = view.get("exit_code")
        out.append(RequeueRetry(job, str(view.get("run_id")), RunStatus(view["status"]),
                                exit_code if isinstance(exit_code, int) else None, slot,
                                attempt, agent, ended))
    return out
