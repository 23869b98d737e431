"""What the center does with a run's final outcome, and with outcomes agents deliver late.

Every final record passes :meth:`Outcomes.finished` once: the operator's log line, the
metrics, the dashboard's strip of recent runs, ``expect`` alerts and notifications. Agent
outcomes that are not for a run in flight here come to :meth:`Outcomes.from_agent`: a run
in flight when the center restarted gets its one outcome, a run recorded ``lost`` gets one
superseding record (SPEC §4), anything else is a re-delivery and is ignored.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from typing import Any

from cronfile.center.alerts import Notifier, runtime_alerts
from cronfile.center.counters import RunMetrics
from cronfile.center.journal import Journal
from cronfile.center.port import RecentRun
from cronfile.center.runlog import log_run
from cronfile.clock import Clock
from cronfile.schedules.model import Job, RunStatus
from cronfile.state.runrecord import RunRecord

log = logging.getLogger("cronfile.center")

RECENT_RUNS = 12
"""Finished runs kept in memory per job for the dashboard's strip of outcomes."""

LOGGED_OUTCOMES = frozenset({RunStatus.FAILED, RunStatus.TIMEOUT, RunStatus.LOST,
                             RunStatus.MISSED, RunStatus.NO_AGENT})
"""Outcomes an operator tailing the center's log must see: one line each."""


def describe_outcome(record: dict[str, Any]) -> str:
    """One log line for a final record: what ran where, how it ended and why."""
    what = f"job {record.get('job')} slot {record.get('scheduled_at')}"
    if record.get("count"):
        what += f" ({record['count']} slots to {record.get('last_scheduled_at')})"
    how = str(record.get("status"))
    if record.get("exit_code") is not None:
        how += f" (exit {record['exit_code']})"
    elif record.get("signal") is not None:
        how += f" (signal {record['signal']})"
    why = f": {record['reason']}" if record.get("reason") else ""
    return f"{what} on {record.get('agent')} attempt {record.get('attempt')}: {how}{why} " \
           f"[run {record.get('run_id')}]"


class Outcomes:
    """``job_of`` finds a job of the applied state (None once it is removed)."""

    def __init__(self, journal: Journal, notifier: Notifier, metrics: RunMetrics, clock: Clock,
                 job_of: Callable[[str], Job | None], log_runs: bool) -> None:
        self.journal = journal
        self.notifier = notifier
        self.metrics = metrics
        self.clock = clock
        self.job_of = job_of
        self.log_runs = log_runs
        self.recent: dict[str, deque[RecentRun]] = {}
        self.last_success: dict[str, float] = {}
        self.started_at = clock.time()  # "no success since" counts from here at first
        self.success_watch: set[str] = set()  # jobs with expect.success_within
        self._success_alerted: set[str] = set()
        self.lost_bases: dict[str, dict[str, Any]] = {}  # run_id -> record base, for late outcomes
        self.awaiting_agents: dict[str, dict[str, Any]] = {}  # tcp runs in flight at restart

    def finished(self, job_name: str, record: dict[str, Any]) -> None:
        """Every final outcome passes here once: the log line, metrics, notifications and
        expectations."""
        status = RunStatus(record["status"])
        if self.log_runs:  # a line for every run, bad ones included
            log_run(record)
        elif status in LOGGED_OUTCOMES:
            log.warning("%s", describe_outcome(record))
        self.metrics.run_finished(job_name, str(record["status"]), record.get("duration_s"))
        strip = self.recent.get(job_name)
        if strip is None:
            strip = self.recent[job_name] = deque(maxlen=RECENT_RUNS)
        strip.append(RecentRun(str(record.get("run_id")), str(record["status"]),
                               record.get("duration_s"), record.get("scheduled_at")))
        job = self.job_of(job_name)
        if job is None:
            return
        if status is RunStatus.SUCCEEDED:
            self.last_success[job_name] = self.clock.time()
            self._success_alerted.discard(job_name)
        attempt = int(record.get("attempt") or 1)
        # notify once the last attempt has failed, not per attempt
        if not job.retries.wanted_after(status, attempt, record.get("exit_code")):
            self.notifier.outcome(job, status, record)
        for what, detail in runtime_alerts(job, record.get("duration_s"), status):
            self.notifier.alert(job, what, detail, record)

    def record(self, job_name: str, record: dict[str, Any]) -> None:
        """Queue a final record and handle its outcome."""
        self.journal.records.add(record)
        self.finished(job_name, record)

    def check_success_within(self, job_of: Callable[[str], Job | None]) -> None:
        """``expect.success_within``: alert once when a job has not succeeded for too long."""
        now = self.clock.time()
        for name in self.success_watch:
            job = job_of(name)
            if job is None:
                continue
            limit = job.expect.success_within_s
            if limit is None or name in self._success_alerted or job.suspend:
                continue
            since = self.last_success.get(name, self.started_at)
            if now - since > limit:
                self._success_alerted.add(name)
                self.notifier.alert(job, "success_within",
                                    f"no success for {now - since:.0f}s (expected within {limit:g}s)",
                                    {"job": name})

    def from_agent(self, run_id: str, agent: str, outcome: dict[str, Any]) -> None:
        """An agent's outcome for a run not in flight here: in flight when the center
        restarted (its one outcome), or one recorded ``lost`` (superseded, once)."""
        # Only the agent a run was sent to may report its outcome: run ids are
        # predictable, and a forged "succeeded" would fire chains and hide failures.
        expected = (self.awaiting_agents.get(run_id) or self.lost_bases.get(run_id)
                    or {}).get("agent")
        if expected is not None and expected != agent:
            log.warning("agent %s sent an outcome for run %s, which ran on %s: ignored",
                        agent, run_id, expected)
            return
        records = self.journal.records
        waiting = self.awaiting_agents.pop(run_id, None)
        if waiting is not None:  # in flight when the center restarted: its one outcome
            self.record(str(waiting.get("job")), RunRecord.reported(waiting, outcome).to_json())
            records.flush()
            return
        # Only a run the center recorded ``lost`` may get a second, superseding record, and
        # only once. Any other run_id was already recorded (a re-delivery whose ack was lost,
        # e.g. across a center restart, when the hub's dedupe window is empty): ignore it.
        base = self.lost_bases.pop(run_id, None)
        if base is None:
            log.info("outcome of run %s from %s was already recorded: ignored", run_id, agent)
            return
        if outcome.get("status") == "lost":
            return  # the agent lost it too (it restarted): nothing new to record
        records.add(RunRecord.reported(
            base, outcome, supersedes="lost",
            reason="outcome delivered after the run was recorded lost").to_json())
        records.flush()

    def expire_awaiting(self, lease_s: float, cause: str = "restart") -> None:
        """Agents that did not report their runs within a lease of the restart (or the HA
        takeover: ``cause``): those runs are ``lost`` (a late outcome still supersedes
        that, once)."""
        expired, self.awaiting_agents = self.awaiting_agents, {}
        for base in expired.values():
            self.lost_bases[str(base["run_id"])] = base
            self.record(str(base.get("job")), RunRecord.without_outcome(
                base, RunStatus.LOST,
                f"agent {base.get('agent')} did not report this run within "
                f"{lease_s:g}s of the center's {cause}").to_json())
