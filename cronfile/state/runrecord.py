"""The one typed run record, and the one place every run record is built.

SPEC §4 fixes a run record's fields and their order: the run's identity (``run_id`` ...
``revision``, then ``trigger``, ``route``, ``stopped_by`` when set), ``record`` (which
phase: ``dispatched``, ``started``, ``finished``), then for a final record its outcome
(``status`` ... ``output_tail``, ``reason``) and what only some records carry. A field is
added at the END of its group, never renamed or moved.

:class:`RunRecord` is that record; :meth:`RunRecord.to_json` gives the dict written to the
ledger (``v`` and ``ts`` are the ledger's). The center builds every record through it, and
the outcome half (:func:`outcome_fields`) is what agents report and the hub hands over, so
a local run, an agent's run and an SSH run read the same.

Hot path: ``dispatched`` and ``started`` records are written for every run of a burst, so
:meth:`RunRecord.dispatched` and :meth:`RunRecord.started` build their dicts directly
(the same fields as the object's ``to_json``: a test holds them equal) instead of creating
an object per run.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cronfile.schedules.model import RunStatus
from cronfile.state.ledger import iso
from cronfile.transports.executor import RunOutcome

IDENTITY_FIELDS = ("run_id", "job", "agent", "transport", "scheduled_at", "attempt", "revision")
"""A run's identity, in the §4 order: what every record of the run starts with."""


class RecordKind(enum.Enum):
    DISPATCHED = "dispatched"  # durably written BEFORE the run is sent
    STARTED = "started"  # the host confirmed the start
    FINISHED = "finished"  # the final record: its outcome, or why it has none


_UNSET: Any = object()  # ``reason`` absent (an outcome without one) vs. ``None`` written


@dataclass(frozen=True, slots=True)
class RunRecord:
    run_id: str
    job: str
    agent: str | None
    transport: str | None
    scheduled_at: str | None
    attempt: int
    revision: Mapping[str, Any]
    trigger: str | None = None  # what caused the run besides the schedule
    route: str | None = None  # why this target (all/shard/failover)
    stopped_by: str | None = None  # who asked to stop it
    record: RecordKind = RecordKind.FINISHED
    term: int | None = None  # HA: the leader's term that dispatched it
    replica: int | None = None  # a daemon's replica
    status: RunStatus | None = None
    exit_code: int | None = None
    signal: int | None = None
    started_at: str | None = None
    finished_at: str | None = None
    duration_s: float | None = None
    output_tail: str = ""
    reason: str | None = _UNSET
    supersedes: str | None = None  # a late outcome replacing a ``lost`` record
    extra: tuple[tuple[str, Any], ...] = ()
    """Fields after ``reason``, in order (``count``, ``first_scheduled_at``, ...)."""

    def to_json(self) -> dict[str, Any]:
        """The record as written, in SPEC §4 field order."""
        out: dict[str, Any] = {
            "run_id": self.run_id, "job": self.job, "agent": self.agent,
            "transport": self.transport, "scheduled_at": self.scheduled_at,
            "attempt": self.attempt, "revision": self.revision}
        if self.trigger is not None:
            out["trigger"] = self.trigger
        if self.route is not None:
            out["route"] = self.route
        if self.stopped_by is not None:
            out["stopped_by"] = self.stopped_by
        out["record"] = self.record.value
        if self.term is not None:
            out["term"] = self.term
        if self.replica is not None:
            out["replica"] = self.replica
        if self.record is RecordKind.STARTED:
            out["started_at"] = self.started_at
        elif self.record is RecordKind.FINISHED:
            out["status"] = None if self.status is None else self.status.value
            out["exit_code"] = self.exit_code
            out["signal"] = self.signal
            out["started_at"] = self.started_at
            out["finished_at"] = self.finished_at
            out["duration_s"] = self.duration_s
            out["output_tail"] = self.output_tail
            if self.supersedes is not None:
                out["supersedes"] = self.supersedes
            if self.reason is not _UNSET:
                out["reason"] = self.reason
        for name, value in self.extra:
            out[name] = value
        return out

    # ------------------------------------------------------------------ builders

    @staticmethod
    def dispatched(base: Mapping[str, Any], term: int | None = None) -> dict[str, Any]:
        """``RunRecord(**base, record=DISPATCHED, term=term).to_json()``, without the object."""
        if term is None:
            return {**base, "record": "dispatched"}
        return {**base, "record": "dispatched", "term": term}

    @staticmethod
    def started(base: Mapping[str, Any], started_at: float) -> dict[str, Any]:
        """``RunRecord(**base, record=STARTED, started_at=...).to_json()``, without the object."""
        return {**base, "record": "started", "started_at": iso(started_at)}

    @classmethod
    def ended(cls, base: Mapping[str, Any], outcome: RunOutcome, **more: Any) -> RunRecord:
        """The final record of a run that ran (any transport): its outcome. ``more``: a
        daemon's ``replica``, or identity fields it overrides (``run_id``, ``attempt``)."""
        return cls(**{**base, **more}, **outcome_values(outcome))

    @classmethod
    def reported(cls, base: Mapping[str, Any], outcome: Mapping[str, Any],
                 **more: Any) -> RunRecord:
        """The final record of an agent's run from the outcome it reported (the fields of
        :func:`outcome_fields`); ``more``: ``supersedes`` and ``reason`` of a late one."""
        values = dict(outcome)
        values["status"] = RunStatus(values["status"])
        return cls(**base, **{**values, **more})

    @classmethod
    def without_outcome(cls, base: Mapping[str, Any], status: RunStatus, reason: str | None,
                        started_at: str | None = None, finished_at: str | None = None,
                        extra: tuple[tuple[str, Any], ...] = ()) -> RunRecord:
        """A slot that produced no outcome: it did not run (``skipped``, ``missed``,
        ``no_agent``, a refused start recorded ``failed``: ``duration_s`` 0.0) or its end is
        unknown (``lost``: ``duration_s`` None)."""
        return cls(**base, status=status, started_at=started_at, finished_at=finished_at,
                   duration_s=None if status is RunStatus.LOST else 0.0, reason=reason,
                   extra=extra)


def outcome_values(outcome: RunOutcome) -> dict[str, Any]:
    """The :class:`RunRecord` fields an outcome gives (``reason`` only when it has one)."""
    values: dict[str, Any] = {
        "status": outcome.status, "exit_code": outcome.exit_code, "signal": outcome.signal,
        "started_at": iso(outcome.started_at.timestamp()),
        "finished_at": iso(outcome.finished_at.timestamp()),
        "duration_s": outcome.duration_s, "output_tail": outcome.output_tail}
    if outcome.reason:
        values["reason"] = outcome.reason
    return values


def outcome_fields(outcome: RunOutcome) -> dict[str, Any]:
    """The fields a ``finished`` record takes from an outcome, whichever transport ran it
    (a local run, an agent's report, SSH): the same names and the same time format."""
    fields = outcome_values(outcome)
    fields["status"] = outcome.status.value
    return fields
