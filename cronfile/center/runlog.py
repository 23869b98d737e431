"""``cronfile center --log-runs``: one INFO line per finished run in the center's log.

For a person watching the center's terminal (``make demo``, a first try) rather than for
machines, which read ``runs.jsonl``: every final outcome (succeeded, failed, timeout,
killed, lost, skipped, missed, no_agent) gives one line with the job, the run, where it ran,
how it ended and how long it took. Plain text, no colour, so it reads the same in journald.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

log = logging.getLogger("cronfile.runs")


def run_line(record: Mapping[str, Any], status: Any = None) -> str:
    """``JOB run RUN_ID on AGENT: STATUS exit N in 0.12s (reason)``, the parts it has.

    ``status`` overrides the record's own (a run view's ``state`` for ``cronfile run --wait``
    and ``cronfile stop``, which print the same line)."""
    parts = [f"{record.get('job')} run {record.get('run_id')} on {record.get('agent')}: "
             f"{record.get('status') if status is None else status}"]
    if record.get("exit_code") is not None:
        parts.append(f"exit {record['exit_code']}")
    if record.get("signal"):
        parts.append(f"signal {record['signal']}")
    if record.get("duration_s") is not None:
        parts.append(f"in {float(record['duration_s']):.2f}s")
    if record.get("reason"):
        parts.append(f"({record['reason']})")
    return " ".join(parts)


def log_run(record: Mapping[str, Any]) -> None:
    log.info("%s", run_line(record))


__all__ = ["log_run", "run_line"]
