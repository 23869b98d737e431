"""Telling people: ``notify`` (failure, missed, recovered) and ``expect`` alerts.

A notification is best effort and never blocks scheduling: webhooks are POSTed from a
thread with a short timeout (in the body ``notify.format`` asks for, see :mod:`.webhooks`),
commands run through the local executor like any job, and every attempt is recorded in
``events.jsonl`` (``notified`` / ``notify_failed``, which ``status`` shows) and a failure is
logged, so a silent notifier is itself visible.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cronfile.center.webhooks import WebhookRejected, post_webhook, webhook_body
from cronfile.schedules.model import Job, RunStatus
from cronfile.transports.executor import Executor, RunRefused, RunRequest

log = logging.getLogger("cronfile.notify")

FAILURE_STATUSES = {RunStatus.FAILED, RunStatus.TIMEOUT, RunStatus.LOST, RunStatus.NO_AGENT}


def kind_of(status: RunStatus, previous: RunStatus | None) -> str | None:
    """Which ``notify.when`` an outcome belongs to, if any."""
    if status in FAILURE_STATUSES:
        return "failure"
    if status is RunStatus.MISSED:
        return "missed"
    if status is RunStatus.SUCCEEDED and previous in FAILURE_STATUSES:
        return "recovered"
    return None


@dataclass
class Notifier:
    """Sends notifications for one center; ``record_event`` writes to the event log."""

    executor: Executor
    record_event: Callable[..., None]
    last_status: dict[str, RunStatus] = field(default_factory=dict)
    _tasks: set[asyncio.Task[Any]] = field(default_factory=set)

    def outcome(self, job: Job, status: RunStatus, record: dict[str, Any]) -> None:
        previous = self.last_status.get(job.name)
        # only real results move "previous": a missed or skipped slot between a failure and
        # a success must not hide the recovery
        if status is RunStatus.SUCCEEDED or status in FAILURE_STATUSES:
            self.last_status[job.name] = status
        kind = kind_of(status, previous)
        if kind is not None:
            self.send(job, kind, record)

    def alert(self, job: Job, what: str, detail: str, record: dict[str, Any]) -> None:
        """An ``expect`` rule was broken: always an event, and a failure notification."""
        self.record_event("expectation_failed", job=job.name, expectation=what, detail=detail)
        self.send(job, "failure", {**record, "expectation": what, "detail": detail})

    def send(self, job: Job, kind: str, record: dict[str, Any]) -> None:
        if job.notify is None or kind not in job.notify.when:
            return
        payload = {"kind": kind, "job": job.name, "owner": job.owner or None,
                   "description": job.description or None,
                   **{k: record.get(k) for k in ("run_id", "agent", "status", "exit_code",
                                                 "scheduled_at", "reason", "expectation", "detail")}}
        task = asyncio.get_running_loop().create_task(self._deliver(job, kind, payload))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _deliver(self, job: Job, kind: str, payload: dict[str, Any]) -> None:
        assert job.notify is not None
        if job.notify.webhook:
            body = webhook_body(job.notify.format, payload)
            try:
                await asyncio.to_thread(post_webhook, job.notify.webhook, body)
                self.record_event("notified", job=job.name, kind=kind, via="webhook")
            except WebhookRejected as exc:
                # the URL itself is left out: chat webhook URLs are secrets
                log.warning("notify %s for job %s: the webhook answered %s", kind, job.name, exc)
                self.record_event("notify_failed", job=job.name, kind=kind, via="webhook",
                                  status_code=exc.status_code, error=str(exc))
            except Exception as exc:  # best effort, but never silent
                error = f"{type(exc).__name__}: {exc}"
                log.warning("notify %s for job %s: the webhook failed: %s", kind, job.name, error)
                self.record_event("notify_failed", job=job.name, kind=kind, via="webhook",
                                  error=error)
        if job.notify.command:
            env = tuple((f"CRONFILE_NOTIFY_{k.upper()}", "" if v is None else str(v))
                        for k, v in payload.items())
            request = RunRequest(run_id=f"notify-{payload.get('run_id') or job.name}-{kind}",
                                 job=job.name, command=job.notify.command, env=env,
                                 timeout_s=60.0, output_keep=4096)
            try:
                handle = await self.executor.start(request)
                outcome = await handle.wait()
                self.record_event("notified", job=job.name, kind=kind, via="command",
                                  status=outcome.status.value, exit_code=outcome.exit_code)
            except Exception as exc:  # best effort, but never silent
                error = str(exc) if isinstance(exc, RunRefused) else f"{type(exc).__name__}: {exc}"
                log.warning("notify %s for job %s: the command failed: %s", kind, job.name, error)
                self.record_event("notify_failed", job=job.name, kind=kind, via="command",
                                  error=error)

    async def drain(self, timeout: float) -> None:
        """Let notifications in flight finish (bounded) before the center closes its logs."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout)


def runtime_alerts(job: Job, duration_s: float | None, status: RunStatus) -> list[tuple[str, str]]:
    """``expect.min_runtime`` broken by a finished run (``max_runtime`` is watched live)."""
    alerts = []
    minimum = job.expect.min_runtime_s
    if minimum is not None and duration_s is not None and status is RunStatus.SUCCEEDED \
            and duration_s < minimum:
        alerts.append(("min_runtime", f"succeeded after {duration_s:.1f}s, expected at least "
                                      f"{minimum:g}s"))
    return alerts
