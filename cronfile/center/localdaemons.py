"""Daemon jobs on the center's own host: one supervisor per job, one record per exit.

(Daemons on agents are sent to them as a set, see :func:`~cronfile.center.agents.sync_agent_daemons`.)
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

from cronfile.center.dispatch import Spawn, run_request
from cronfile.center.records import record_base, run_id_for
from cronfile.clock import Clock
from cronfile.schedules.loader import LOCAL_AGENT
from cronfile.schedules.model import Job
from cronfile.state.runrecord import RunRecord
from cronfile.transports.daemons import DaemonSupervisor
from cronfile.transports.executor import RunOutcome
from cronfile.transports.local import LocalExecutor


class LocalDaemons:
    """``record(job, record)``: queue a final record and handle its outcome."""

    def __init__(self, local: LocalExecutor, clock: Clock, spawn: Spawn,
                 revision: Callable[[], dict[str, Any]],
                 record: Callable[[str, dict[str, Any]], None]) -> None:
        self.local = local
        self.clock = clock
        self.spawn = spawn
        self.revision = revision
        self.record = record
        self.supervisors: dict[str, DaemonSupervisor] = {}

    def restart(self, job: Job) -> None:
        """(Re)start a local daemon; the old replicas are stopped BEFORE the new ones start
        (two generations at once would fight over ports and files)."""
        old = self.supervisors.pop(job.name, None)
        request = run_request(job, run_id_for(job.name, self.clock.time(), LOCAL_AGENT, 0),
                              None, 1, ())
        base = record_base(job, 0, LOCAL_AGENT, "local", 1, request.run_id, self.revision())
        base["scheduled_at"] = None
        supervisor: DaemonSupervisor

        async def on_exit(replica: int, outcome: RunOutcome) -> None:
            # each incarnation has its own run_id (<id>.<replica>.<n>): one record per exit
            status = supervisor.status()
            run_id = status[replica].run_id if replica < len(status) else None
            restarts = status[replica].restarts if replica < len(status) else 0
            self.record(job.name, RunRecord.ended(
                base, outcome, run_id=run_id or f"{base['run_id']}.{replica}",
                attempt=restarts + 1, replica=replica).to_json())

        supervisor = DaemonSupervisor(self.local, request, job.replicas, job.restart, on_exit)
        self.supervisors[job.name] = supervisor

        async def swap() -> None:
            if old is not None:
                await old.stop()
            await supervisor.start()

        self.spawn(swap(), name="daemon")

    def stop(self, name: str) -> None:
        supervisor = self.supervisors.pop(name, None)
        if supervisor is not None:
            self.spawn(supervisor.stop(), name="daemon")

    def kill_now(self) -> None:
        """A second signal: every replica gets SIGKILL at once."""
        for supervisor in self.supervisors.values():
            with contextlib.suppress(Exception):
                supervisor.kill_now()

    async def stop_all(self, grace_s: float) -> None:
        """The center stops: every daemon is stopped (``grace_s`` each, bounded)."""
        supervisors = list(self.supervisors.values())
        if supervisors:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*(d.stop(min(grace_s, 5.0)) for d in supervisors),
                                                      return_exceptions=True), timeout=grace_s + 5)
