"""The one seam between the scheduler and the hosts that run jobs.

The center decides *when* and *where*; an :class:`Executor` decides *how* a run reaches its
host: ``local`` (a child process of the center), ``tcp`` (an agent's channel) or ``ssh``.
All three take the same :class:`RunRequest` and end with the same :class:`RunOutcome`, so
the records, timeouts and output rules are identical whatever the transport.
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from cronfile.schedules.model import EnvValue, RunStatus


@dataclass(frozen=True)
class RunRequest:
    """Everything a host needs to run one attempt of one slot.

    ``env`` may hold :class:`~cronfile.schedules.model.SecretRef` values: they are resolved by the
    executor on the host that runs the command, at run time, and never written anywhere.
    """

    run_id: str
    job: str
    command: tuple[str, ...] | str
    scheduled_at: datetime | None = None
    attempt: int = 1
    env: tuple[tuple[str, EnvValue], ...] = ()
    workdir: str | None = None
    run_as: str | None = None
    timeout_s: float | None = None
    kill_grace_s: float = 10.0
    output_keep: int = 64 * 1024


@dataclass(frozen=True)
class RunOutcome:
    """How one run ended. ``signal`` is the signal number that ended the process, if any."""

    status: RunStatus
    started_at: datetime
    finished_at: datetime
    exit_code: int | None = None
    signal: int | None = None
    output_tail: str = ""
    reason: str | None = None

    @property
    def duration_s(self) -> float:
        return round((self.finished_at - self.started_at).total_seconds(), 6)


class RunRefused(Exception):
    """The run could not start at all (bad workdir, unknown user, command not found, ...).

    The message is safe to record: it never contains a secret value.
    """


class HostUnavailable(RunRefused):
    """The host was not there to take the run (an agent that disconnected between routing
    and sending): the slot is ``no_agent``, not a failed run to retry or alert on."""


class RunHandle(abc.ABC):
    """A run in progress."""

    run_id: str
    started_at: datetime
    pid: int | None = None
    """The run's process id on the host where it runs, when known: for reports (``status``,
    an agent's ``started`` message). Not necessarily a process of THIS host, so never a
    thing to signal: :meth:`stop` and :meth:`kill_now` do that."""
    confirmed: bool = True
    """Whether the host confirmed that the run started. A remote start can return before
    the agent answers (a dark agent, a start timeout) or end without ever starting (the
    agent refused it): the center records ``started`` only for a confirmed start."""

    @abc.abstractmethod
    async def wait(self) -> RunOutcome:
        """Wait for the run to end and return its outcome (may be awaited more than once)."""

    @abc.abstractmethod
    async def stop(self, reason: str = "stopped", grace_s: float | None = None) -> None:
        """SIGTERM the run's process group, SIGKILL after the grace period.

        The outcome then reports ``killed`` (unless the run ended by itself first).
        """

    @abc.abstractmethod
    def kill_now(self) -> None:
        """SIGKILL the run at once, without waiting: the caller is about to exit (a second
        SIGTERM). Synchronous and bounded; best effort. Each handle kills what IT runs, where
        it runs: a local process group, a remote one over its own connection, nothing for a
        run an agent owns. Callers never reach for a handle's pid or pgid themselves."""

    def on_done(self, callback: Callable[[RunOutcome], None]) -> None:
        """Call ``callback(outcome)`` when the run ends. This default awaits :meth:`wait` in
        a task; a handle that learns of the end by a callback of its own overrides it (a
        task per run costs a burst of thousands of runs dearly)."""
        async def call_when_done() -> None:
            callback(await self.wait())

        task = asyncio.get_running_loop().create_task(call_when_done())
        _WAITING.add(task)  # the loop keeps only weak references to tasks
        task.add_done_callback(_WAITING.discard)


_WAITING: set[asyncio.Task[None]] = set()


@dataclass
class ExecutorInfo:
    """What ``cronfile status`` shows about an executor."""

    transport: str
    running: list[str] = field(default_factory=list)


class Executor(abc.ABC):
    """Starts runs on one host through one transport."""

    transport: str

    @abc.abstractmethod
    async def start(self, request: RunRequest) -> RunHandle:
        """Start the run; raise :class:`RunRefused` when it cannot start."""

    async def start_many(self, requests: Sequence[RunRequest]) -> list[RunHandle | Exception]:
        """Start several runs, in order: for each, its handle or the exception that kept it
        from starting. One by one here; an executor that can do better with a batch (the
        local one: every spawn back to back, the bookkeeping after) overrides this."""
        started: list[RunHandle | Exception] = []
        for request in requests:
            try:
                started.append(await self.start(request))
            except Exception as exc:
                started.append(exc)
        return started

    async def close(self) -> None:  # noqa: B027 - optional hook, a no-op by default
        """Release connections; running runs are not touched."""
