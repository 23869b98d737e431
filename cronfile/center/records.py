"""Run records in the center: their identity, slots that do not run, and the writer.

Every record is a :class:`~cronfile.state.runrecord.RunRecord` (the one typed record and
its builders); here are the center's parts of it: :func:`run_id_for`, :func:`record_base`
(the identity fields every record of a run starts with), :func:`slot_record` (a slot that
does not run) and :class:`RecordWriter` (group commit of run records).
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable
from typing import Any

from cronfile.center.scheduler import RecordSlot
from cronfile.schedules.loader import LOCAL_AGENT
from cronfile.schedules.model import Job
from cronfile.state.ledger import iso
from cronfile.state.runrecord import RunRecord


def run_id_for(job: str, slot: float, agent: str, attempt: int) -> str:
    """Deterministic: the same (slot, target, attempt) always has the same id, which is what
    lets an agent (and the ledger) recognise a run it has already seen."""
    return hashlib.sha256(f"{job}|{slot:.3f}|{agent}|{attempt}".encode()).hexdigest()[:20]


def record_base(job: Job, slot: float, agent: str, transport: str | None, attempt: int,
                run_id: str, revision: dict[str, Any]) -> dict[str, Any]:
    """The identity fields every record of a run starts with, in SPEC §4 order."""
    return {"run_id": run_id, "job": job.name, "agent": agent, "transport": transport,
            "scheduled_at": iso(slot), "attempt": attempt, "revision": revision}


RECORD_BATCH_S = 0.005


class RecordWriter:
    """Queues run records: those queued within a few milliseconds share one write and one
    fsync (a burst of 1,000 finishing runs is a handful of fsyncs, not 1,000). While
    ``busy()`` (a burst being dispatched) the timer writes nothing: ``started`` and finished
    records wait for the burst's end (the center calls :meth:`flush` then), since their
    encoding, write and fsync would delay its spawns. ``dispatched`` records never queue
    here: the dispatcher writes them itself, durable before their runs start."""

    def __init__(self, append: Callable[[list[dict[str, Any]]], None],
                 busy: Callable[[], bool]) -> None:
        self._append = append
        self._busy = busy
        self._pending: list[dict[str, Any]] = []
        self._flush_scheduled = False

    def add(self, record: dict[str, Any]) -> None:
        self._pending.append(record)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_later(RECORD_BATCH_S, self._flush_soon)

    def _flush_soon(self) -> None:
        if not self._busy():
            self.flush()

    def take(self) -> list[dict[str, Any]]:
        """Hand the queued records to the caller, who writes them itself (the watermark
        writes them in the same step as the mark; the shutdown, synchronously)."""
        batch, self._pending = self._pending, []
        return batch

    def flush(self) -> None:
        self._flush_scheduled = False
        if self._pending:
            batch, self._pending = self._pending, []
            try:
                self._append(batch)
            except Exception:
                self._pending[:0] = batch  # keep them for the next flush (disk full, ...)
                raise


def slot_record(action: RecordSlot, revision: dict[str, Any], agent: str | None = None
                ) -> dict[str, Any]:
    """The record of a slot that does not run: for ``agent`` when given, else for what the
    job targets (its one target, or the names and labels it asked for)."""
    job = action.job
    if agent is not None:
        transport = None
    elif job.targets.is_local_only:
        agent, transport = LOCAL_AGENT, "local"
    else:  # no single target: name what the job asked for; no transport was used
        wanted = list(job.targets.agents) + [f"{k}={v}" for k, v in job.targets.labels]
        agent, transport = ",".join(wanted), None
    run_id = run_id_for(job.name, action.scheduled_at, agent, 0) + "-" + action.status.value
    extra: tuple[tuple[str, Any], ...] = ()
    if action.count > 1 or action.last_scheduled_at not in (None, action.scheduled_at):
        extra = (("count", action.count), ("first_scheduled_at", iso(action.scheduled_at)),
                 ("last_scheduled_at", iso(action.last_scheduled_at)))
    return RunRecord.without_outcome(
        record_base(job, action.scheduled_at, agent, transport, action.attempt, run_id, revision),
        action.status, action.reason, extra=extra).to_json()
