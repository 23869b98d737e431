"""Runs on agents, from the center's side: dispatch, leases, outcomes and their acks.

:class:`RemoteRuns` is the book of runs sent to agents. Each run has a
:class:`RemoteRunHandle`; :class:`RemoteExecutor` is the executor seam for one agent.

Outcomes have two consumers, and both see each outcome once: the handle resolves with it
(the scheduler's view), and ``on_outcome(run_id, agent, outcome_dict)`` is awaited for
every outcome an agent delivers, whether or not a handle is waiting (the record's view).
The outcome is acked only after ``on_outcome`` returned without raising; a bounded window
of delivered run_ids (keyed by sender) keeps a redelivery from being passed on twice.
Outcomes are taken only from the agent a run was sent to.

``lost``: when an agent disconnects, every run it had gets a lease of ``lease_s``. A run
the agent lists as running when it reconnects keeps going; any other run whose outcome has
not arrived when the lease expires resolves ``lost`` (never passed to ``on_outcome``).
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

from cronfile.schedules.model import RunStatus
from cronfile.transports.executor import (
    Executor,
    ExecutorInfo,
    HostUnavailable,
    RunHandle,
    RunOutcome,
    RunRefused,
    RunRequest,
)
from cronfile.transports.hubconn import Callback, CenterRole, Closed, Connection, call_back, utc_now
from cronfile.transports.protocol import Ack, Cancel, Daemons, Finished, ProtocolError, Run, Started

log = logging.getLogger("cronfile.agents")



class OutcomeDeferred(Exception):
    """Raised by ``on_outcome``: the center cannot record this outcome yet (an HA center
    that has not read the old leader's runs in flight). Not acked, so the agent delivers it
    again; an expected wait, logged as such, without a traceback."""

class OrderSender(Protocol):
    """The fence every order goes through (:class:`~cronfile.transports.orders.Orders`)."""

    def role_now(self) -> CenterRole | None: ...

    async def send_order(self, conn: Connection, order: Cancel | Daemons) -> bool: ...


class RemoteRunHandle(RunHandle):
    """A run on an agent; resolves on ``finished``, or ``lost`` when its lease expires."""

    def __init__(self, runs: RemoteRuns, agent: str, run_id: str) -> None:
        self.runs = runs
        self.agent = agent
        self.run_id = run_id
        self.started_at = utc_now()  # the dispatch time until the agent reports its start
        self.confirmed = False  # until the agent's ``started``
        self.pid: int | None = None
        # Set when the agent answered (started or finished) or its link dropped: what
        # start() waits for, so a dead link does not hold start() for start_timeout_s.
        self.replied = asyncio.Event()
        self._outcome: asyncio.Future[RunOutcome] = asyncio.get_running_loop().create_future()
        self._lease: asyncio.TimerHandle | None = None
        self._cancel: Cancel | None = None

    @property
    def done(self) -> bool:
        return self._outcome.done()

    async def wait(self) -> RunOutcome:
        return await asyncio.shield(self._outcome)

    async def stop(self, reason: str = "stopped", grace_s: float | None = None) -> None:
        """Ask the agent to stop the run and wait for its outcome, as the local handle does.

        When the agent is away the request is kept and sent when it is back; if it does not
        come back, the lease ends the wait with ``lost``. An HA center that no longer leads
        sends no order and does not wait: the run's outcome goes to the leader now.
        """
        if self.done:
            return
        self._cancel = Cancel(run_id=self.run_id, reason=reason, grace_s=grace_s)
        if not await self.runs.send_cancel(self, self._cancel):
            return
        await self.wait()

    def kill_now(self) -> None:
        """Nothing: the agent owns the run and keeps it going; it stores the outcome for the
        next center (the process number it reported is on the agent's host)."""

    def _resolve(self, outcome: RunOutcome) -> None:
        self._clear_lease()
        if not self._outcome.done():
            self._outcome.set_result(outcome)
        self.replied.set()

    def _start_lease(self, lease_s: float) -> None:
        if self._lease is None and not self.done:
            loop = asyncio.get_running_loop()
            self._lease = loop.call_later(lease_s, self.runs.lease_expired, self)

    def _clear_lease(self) -> None:
        if self._lease is not None:
            self._lease.cancel()
            self._lease = None


class RemoteExecutor(Executor):
    """Starts runs on one agent through its TCP channel (whichever connection is current)."""

    transport = "tcp"

    def __init__(self, runs: RemoteRuns, agent: str) -> None:
        self.runs = runs
        self.agent = agent

    async def start(self, request: RunRequest) -> RemoteRunHandle:
        """Send the run and wait (bounded) for the agent's first answer.

        Raises :class:`RunRefused` when the agent is not connected. Waiting for ``started``
        makes ``handle.started_at`` the agent's real start time; if the agent does not answer
        within ``start_timeout_s`` (or the link drops), the handle is returned anyway and its
        lease decides.
        """
        return await self.runs.dispatch(self.agent, request)

    def info(self) -> ExecutorInfo:
        return ExecutorInfo(transport=self.transport, running=self.runs.running_on(self.agent))


class RemoteRuns:
    """The runs this hub sent to agents and has no outcome for yet, and the outcomes
    agents deliver. ``conns`` is the hub's registry (read, never written here)."""

    def __init__(
        self,
        *,
        conns: Mapping[str, Connection],
        orders: OrderSender,
        lease_s: float,
        start_timeout_s: float,
        on_outcome: Callback | None,
        spawn: Callable[[Awaitable[Any]], asyncio.Task[Any]],
        dedupe_window: int,
    ) -> None:
        self.conns = conns
        self.orders = orders
        self.lease_s = lease_s
        self.start_timeout_s = start_timeout_s
        self.on_outcome = on_outcome
        self._spawn = spawn
        self._dedupe_window = dedupe_window
        self._delivered: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._recording: set[str] = set()  # outcomes passed to on_outcome, not acked yet
        self.handles: dict[str, RemoteRunHandle] = {}

    def running_on(self, name: str) -> list[str]:
        conn = self.conns.get(name)
        return sorted(conn.running) if conn else []

    async def dispatch(self, name: str, request: RunRequest) -> RemoteRunHandle:
        conn = self.conns.get(name)
        if conn is None:
            raise HostUnavailable(f"agent {name} is not connected")
        existing = self.handles.get(request.run_id)
        if existing is not None:  # the same run dispatched twice: one run, one handle
            return existing
        role = self.orders.role_now()
        if role is not None and not role.leading:
            raise HostUnavailable("this center does not lead (HA standby): it sends no runs")
        try:
            frame = Run.from_request(request, term=None if role is None else role.term)
            frame.frame()
        except (ProtocolError, ValueError) as exc:
            raise RunRefused(f"cannot send the run to agent {name}: {exc}") from None
        handle = RemoteRunHandle(self, name, request.run_id)
        self.handles[request.run_id] = handle
        try:
            await conn.send(frame)
        except Closed:
            # It may or may not have arrived; the agent journals run_ids, so the lease
            # (started on disconnect) settles it either way without running it twice.
            handle._start_lease(self.lease_s)
            return handle
        # asyncio.wait, not wait_for: on 3.11 wait_for can swallow the caller's cancellation.
        replied = asyncio.ensure_future(handle.replied.wait())
        try:
            await asyncio.wait({replied}, timeout=self.start_timeout_s)
        finally:
            replied.cancel()
        return handle

    async def send_cancel(self, handle: RemoteRunHandle, cancel: Cancel) -> bool:
        """Send a stop order now if the agent is here (else on its reconnect); False when
        this center does not lead, so there is no outcome to wait for here."""
        role = self.orders.role_now()
        if role is not None and not role.leading:
            log.warning("not stopping run %s on agent %s: this center does not lead",
                        handle.run_id, handle.agent)
            return False
        conn = self.conns.get(handle.agent)
        if conn is not None:
            await self.orders.send_order(conn, cancel)
        return True

    def lease_expired(self, handle: RemoteRunHandle) -> None:
        handle._lease = None
        if handle.done:
            return
        conn = self.conns.get(handle.agent)
        if conn is not None and handle.run_id in conn.running:
            return  # it is back and still running the run
        self.handles.pop(handle.run_id, None)
        reason = (
            f"agent {handle.agent} was away for more than {self.lease_s:g}s"
            if conn is None
            else f"agent {handle.agent} came back without the run or its outcome"
        )
        log.warning("run %s on %s: lost (%s)", handle.run_id, handle.agent, reason)
        handle._resolve(
            RunOutcome(
                status=RunStatus.LOST,
                started_at=handle.started_at,
                finished_at=utc_now(),
                reason=reason,
            )
        )

    def connected(self, conn: Connection) -> None:
        """An agent (re)connected: its runs still running keep going (and get a pending
        stop order); the others must deliver their outcome before their lease ends."""
        for handle in self.handles.values():
            if handle.agent != conn.name:
                continue
            if handle.run_id in conn.running:
                handle._clear_lease()
                if handle._cancel is not None:
                    self._spawn(self.orders.send_order(conn, handle._cancel))
            else:
                # Not running there: its outcome should come from the agent's outbox right
                # away; if it never does (the run frame died with the old link), the lease
                # resolves it ``lost``. A lease already running keeps its deadline.
                handle._start_lease(self.lease_s)

    def disconnected(self, name: str) -> None:
        """An agent's connection is gone: each of its runs gets its lease, and a start
        waiting for the agent's answer stops waiting."""
        for handle in self.handles.values():
            if handle.agent == name:
                handle._start_lease(self.lease_s)
                handle.replied.set()

    def close(self) -> None:
        for handle in self.handles.values():
            handle._clear_lease()

    def started(self, msg: Started) -> None:
        handle = self.handles.get(msg.run_id)
        if handle is not None:
            handle.started_at = msg.started_at
            handle.pid = msg.pid
            handle.confirmed = True
            handle.replied.set()

    async def finished(self, conn: Connection, msg: Finished) -> None:
        """Resolve the run's handle, then record and ack in a task of its own: the ack waits
        until ``on_outcome`` says the outcome is durable (an outcome acked and then lost
        with the center would be gone for good: the agent drops what is acked), and the
        read loop must not wait meanwhile (the center may be waiting on this very agent's
        next frame to finish a dispatch, which is when it makes records durable)."""
        run_id = msg.run_id
        handle = self.handles.get(run_id)
        if handle is not None and handle.agent != conn.name:
            # Run ids are predictable: without this an agent could forge the outcome of a
            # run another agent is executing. Not acked, not recorded.
            log.warning("agent %s sent an outcome for run %s, which was sent to %s: ignored",
                        conn.name, run_id, handle.agent)
            return
        conn.running.discard(run_id)
        # A handle may wait on a run_id already delivered (the center dispatched it again
        # and the agent answered with the outcome it kept): it gets the outcome, the record
        # callback does not get it twice.
        handle = self.handles.pop(run_id, None)
        if handle is not None:
            handle._resolve(msg.to_outcome())
        # Keyed by sender too: what another agent claimed about this run_id must not make
        # the real outcome look like a duplicate.
        delivered_key = f"{conn.name}\0{run_id}"
        if delivered_key in self._delivered:
            await conn.send(Ack(run_id=run_id))
        elif delivered_key not in self._recording:  # else: the first delivery's ack covers it
            self._recording.add(delivered_key)
            self._spawn(self._record_then_ack(conn, msg, delivered_key))

    async def _record_then_ack(self, conn: Connection, msg: Finished, delivered_key: str) -> None:
        run_id = msg.run_id
        try:
            await call_back(self.on_outcome, run_id, conn.name, msg.outcome_dict())
        except OutcomeDeferred as exc:
            log.info("the outcome of run %s waits: %s", run_id, exc)
            return
        except Exception:
            # Not acked: the agent keeps it and delivers it again on its next
            # connection, when the center may be able to record it.
            log.exception("recording the outcome of run %s failed", run_id)
            return
        finally:
            self._recording.discard(delivered_key)
        self._delivered[delivered_key] = None
        while len(self._delivered) > self._dedupe_window:
            self._delivered.popitem(last=False)
        await conn.send_quietly(Ack(run_id=run_id))
