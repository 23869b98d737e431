"""Keep ``kind: daemon`` jobs alive: N replicas of one request, restarted with backoff.

The supervisor only needs an :class:`~cronfile.transports.executor.Executor`, so the center uses it with
the local executor and an agent can use it with its own. Why it looks like this:

* **No fork storm.** Every restart waits ``backoff_s * 2**k`` (capped at ``max_backoff_s``),
  where ``k`` counts the replica's consecutive *short* runs. A run counts as short when it
  lasted less than ``stable_after_s`` (60 s, as a process that survived a minute is "up"),
  whatever its exit code, so even ``restart: always`` on a command that exits at once backs
  off. A start the executor refuses (bad workdir, unknown user) counts as a crash too.
* **Every exit is reported.** ``on_exit(replica_index, outcome)`` is called for each exit,
  including refusals (``failed`` with the refusal as ``reason``) and the ``killed`` exits
  caused by :meth:`DaemonSupervisor.stop`, so the center can record each one.
* **Distinct run ids.** Each incarnation runs as ``<run_id>.<replica>.<incarnation>`` so the
  records of restarts never collide, and sees ``CRONFILE_REPLICA`` (its index) in its env.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import inspect
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime

from cronfile.schedules.model import RestartPolicy, RestartPolicyKind, RunStatus
from cronfile.transports.executor import Executor, RunHandle, RunOutcome, RunRefused, RunRequest

__all__ = ["DaemonSupervisor", "ExitCallback", "ReplicaState", "ReplicaStatus"]

log = logging.getLogger(__name__)

ExitCallback = Callable[[int, RunOutcome], Awaitable[None] | None]

STABLE_AFTER_S = 60.0


class ReplicaState(enum.Enum):
    """Where one replica is in its life."""

    STARTING = "starting"
    """Asking the executor to start it."""
    RUNNING = "running"
    """Its process is running."""
    BACKOFF = "backoff"
    """It exited and waits for its restart delay."""
    EXITED = "exited"
    """It exited and the restart policy says not to start it again."""
    STOPPED = "stopped"
    """Stopped by :meth:`DaemonSupervisor.stop`."""


@dataclass
class ReplicaStatus:
    """What ``status()`` reports for one replica."""

    index: int
    state: ReplicaState = ReplicaState.STARTING
    pid: int | None = None
    run_id: str | None = None
    restarts: int = 0
    last_outcome: RunOutcome | None = None
    next_start_in_s: float | None = None


class DaemonSupervisor:
    """Keeps ``replicas`` copies of ``request`` running through ``executor``."""

    def __init__(
        self,
        executor: Executor,
        request: RunRequest,
        replicas: int = 1,
        restart: RestartPolicy | None = None,
        on_exit: ExitCallback | None = None,
        stable_after_s: float = STABLE_AFTER_S,
    ) -> None:
        self.executor = executor
        self.request = request
        self.replicas = max(1, replicas)
        self.restart = restart or RestartPolicy()
        self.on_exit = on_exit
        self.stable_after_s = stable_after_s
        self._status = [ReplicaStatus(i) for i in range(self.replicas)]
        self._handles: dict[int, RunHandle] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = asyncio.Event()
        self._stop_reason = "daemon stopped"
        self._stop_grace: float | None = None

    # -- public API ------------------------------------------------------------------------

    async def start(self) -> None:
        """Start every replica (each in its own task); idempotent."""
        if self._tasks:
            return
        self._tasks = [
            asyncio.create_task(self._keep_alive(i), name=f"daemon {self.request.job}[{i}]")
            for i in range(self.replicas)
        ]
        await asyncio.sleep(0)  # let each replica reach its first start

    async def stop(self, grace_s: float | None = None, reason: str = "daemon stopped") -> None:
        """Stop every replica (SIGTERM, SIGKILL after ``grace_s``) and wait until they are gone."""
        self._stop_reason = reason
        self._stop_grace = grace_s
        self._stopping.set()
        handles = list(self._handles.values())
        await asyncio.gather(
            *(h.stop(reason, grace_s) for h in handles), return_exceptions=True
        )
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def kill_now(self) -> None:
        """SIGKILL every replica at once (the process is about to exit)."""
        for handle in list(self._handles.values()):
            handle.kill_now()

    def status(self) -> list[ReplicaStatus]:
        """A snapshot per replica: state, pid, restarts, last outcome."""
        return [replace(s) for s in self._status]

    @property
    def running(self) -> bool:
        return any(not t.done() for t in self._tasks)

    # -- one replica -----------------------------------------------------------------------

    async def _keep_alive(self, index: int) -> None:
        status = self._status[index]
        short_runs = 0
        incarnation = 0
        while not self._stopping.is_set():
            incarnation += 1
            outcome = await self._run_once(index, incarnation)
            status.last_outcome = outcome
            await self._report(index, outcome)
            if self._stopping.is_set():
                break
            if not self._should_restart(outcome):
                status.state = ReplicaState.EXITED
                status.pid = None
                return
            short_runs = 0 if outcome.duration_s >= self.stable_after_s else short_runs + 1
            delay = self._backoff(short_runs)
            status.state, status.pid, status.next_start_in_s = ReplicaState.BACKOFF, None, delay
            status.restarts += 1
            if await self._stopped_within(delay):
                break
        status.state, status.pid, status.next_start_in_s = ReplicaState.STOPPED, None, None

    async def _run_once(self, index: int, incarnation: int) -> RunOutcome:
        status = self._status[index]
        request = self._request_for(index, incarnation)
        status.state, status.run_id, status.next_start_in_s = ReplicaState.STARTING, None, None
        started_at = datetime.now(UTC)
        try:
            handle = await self.executor.start(request)
        except RunRefused as exc:
            return RunOutcome(
                status=RunStatus.FAILED,
                started_at=started_at,
                finished_at=datetime.now(UTC),
                reason=str(exc),
            )
        self._handles[index] = handle
        status.state, status.run_id = ReplicaState.RUNNING, request.run_id
        status.pid = handle.pid
        try:
            if self._stopping.is_set():  # stop() came while we were starting
                await handle.stop(self._stop_reason, self._stop_grace)
            return await handle.wait()
        finally:
            self._handles.pop(index, None)

    def _request_for(self, index: int, incarnation: int) -> RunRequest:
        return replace(
            self.request,
            run_id=f"{self.request.run_id}.{index}.{incarnation}",
            env=(*self.request.env, ("CRONFILE_REPLICA", str(index))),
        )

    def _should_restart(self, outcome: RunOutcome) -> bool:
        if self.restart.policy is RestartPolicyKind.ALWAYS:
            return True
        return outcome.status is not RunStatus.SUCCEEDED

    def _backoff(self, short_runs: int) -> float:
        """``backoff_s`` doubled per consecutive short run, capped; the first restart of a
        replica that ran long enough waits ``backoff_s`` too (systemd's ``RestartSec``)."""
        exponent = max(0, short_runs - 1)
        delay = self.restart.backoff_s * (2 ** min(exponent, 32))
        return min(delay, max(self.restart.max_backoff_s, self.restart.backoff_s))

    async def _stopped_within(self, delay: float) -> bool:
        """Sleep ``delay`` seconds, waking at once when :meth:`stop` is called."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), delay)
        return self._stopping.is_set()

    async def _report(self, index: int, outcome: RunOutcome) -> None:
        """Call ``on_exit``; a failing callback is logged, never allowed to stop the daemon."""
        if self.on_exit is None:
            return
        try:
            result = self.on_exit(index, outcome)
            if inspect.isawaitable(result):
                await result
        except Exception:
            log.exception("on_exit callback failed for %s[%d]", self.request.job, index)
