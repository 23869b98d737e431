"""Run records the center writes without an outcome from a transport.

Most ``finished`` records carry a :class:`~cronfile.transports.executor.RunOutcome`
(``ledger.outcome_fields``). The others say why a slot produced no outcome: it did not run
(``skipped``, ``missed``, ``no_agent``, a refused start recorded ``failed``) or its end is
unknown (``lost``). :class:`NoOutcomeRecord` is the one builder of those, so their fields,
their SPEC §4 order and ``duration_s`` are the same wherever they are written:

* ``duration_s`` is ``0.0`` for a run that never ran, ``None`` (unknown) for a ``lost`` one;
* times are record time text (``ledger.iso``) taken from the center's injected clock.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cronfile.schedules.model import RunStatus


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
