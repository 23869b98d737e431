"""Run records: the one builder of those without a transport's outcome, and the writer.

Most ``finished`` records carry a :class:`~cronfile.transports.executor.RunOutcome`
(``ledger.outcome_fields``). The others say why a slot produced no outcome: it did not run
(``skipped``, ``missed``, ``no_agent``, a refused start recorded ``failed``) or its end is
unknown (``lost``). :class:`NoOutcomeRecord` is the one builder of those, so their fields,
their SPEC §4 order and ``duration_s`` are the same wherever they are written:

* ``duration_s`` is ``0.0`` for a run that never ran, ``None`` (unknown) for a ``lost`` one;
* times are record time text (``ledger.iso``) taken from the center's injected clock.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from cronfile.center.scheduler import RecordSlot
from cronfile.schedules.loader import LOCAL_AGENT
from cronfile.schedules.model import Job, RunStatus
from cronfile.state.ledger import iso


def run_id_for(job: str, slot: float, agent: str, attempt: int) -> str:
    """Deterministic: the same (slot, target, attempt) always has the same id, which is what
    lets an agent (and the ledger) recognise a run it has already seen."""
    return hashlib.sha256(f"{job}|{slot:.3f}|{agent}|{attempt}".encode()).hexdigest()[:20]


def record_base(job: Job, slot: float, agent: str, transport: str | None, attempt: int,
                run_id: str, revision: dict[str, Any]) -> dict[str, Any]:
    """The identity fields every record of a run starts with, in SPEC §4 order."""
    return {"run_id": run_id, "job": job.name, "agent": agent, "transport": transport,
            "scheduled_at": iso(slot), "attempt": attempt, "revision": revision}


@dataclass(frozen=True)
class NoOutcomeRecord:
    base: Mapping[str, Any]
    """The run's identity fields (``run_id`` ... ``revision``, ``trigger``, ``route``), in order."""
    status: RunStatus
    reason: str | None
    started_at: str | None = None
    finished_at: str | None = None
    extra: tuple[tuple[str, Any], ...] = ()
    """Fields after ``reason``, in order (``count``, ``first_scheduled_at``, ...)."""

    @property
    def duration_s(self) -> float | None:
        return None if self.status is RunStatus.LOST else 0.0

    def to_json(self) -> dict[str, Any]:
        """The record as written, in SPEC §4 field order."""
        return {**self.base, "record": "finished", "status": self.status.value,
                "exit_code": None, "signal": None, "started_at": self.started_at,
                "finished_at": self.finished_at, "duration_s": self.duration_s,
                "output_tail": "", "reason": self.reason, **dict(self.extra)}


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
    return NoOutcomeRecord(
        record_base(job, action.scheduled_at, agent, transport, action.attempt, run_id, revision),
        action.status, action.reason, extra=extra).to_json()
