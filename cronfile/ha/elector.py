"""The loop that keeps the lease, or waits for it, on behalf of one center (SPEC §9).

A leader renews about every ``renew_interval``. It counts its renew deadline on its OWN
monotonic clock from the moment it SENT the last successful renew: the database computed
``expires_at = now() + lease`` after that moment, so as long as ``renew_deadline < lease``
the leader gives up before the database lets anyone else in, whatever the wall clocks say.
:meth:`Elector.is_leading` checks that deadline on every call, so dispatch stops the instant
it passes, even while the loop itself is stuck on a connection that went silent.

A standby retries every ``renew_interval`` (sooner if the lease it saw expires sooner, by the
database's clock) and also wakes on the ``NOTIFY`` a leader sends when it releases the lease
on a planned stop, which is how a handover takes well under a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypeVar

import psycopg

from cronfile.ha import lease as lease_sql
from cronfile.ha.settings import HaSettings

__all__ = ["CenterView", "Elector", "Role"]

log = logging.getLogger(__name__)
T = TypeVar("T")


class Role(enum.Enum):
    """What this replica does now."""

    LEADER = "leader"
    """Holds the lease: schedules and dispatches."""
    STANDBY = "standby"
    """Connected (or trying to be), never dispatches, ready to take over."""


@dataclass(frozen=True)
class CenterView:
    """``status --format json`` → ``center``."""

    name: str
    role: Role
    term: int | None
    lease_holder: str | None
    lease_expires_at: datetime | None

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "role": self.role.value,
            "term": self.term,
            "lease_holder": self.lease_holder,
            "lease_expires_at": None if self.lease_expires_at is None else self.lease_expires_at.isoformat(),
        }


EventSink = Callable[[dict[str, Any]], None]


class Elector:
    """Runs :meth:`run` as a task; the center asks :meth:`is_leading` before each dispatch."""

    def __init__(
        self,
        settings: HaSettings,
        on_event: EventSink | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self._on_event = on_event or (lambda _event: None)
        self._clock = clock
        self._role = Role.STANDBY
        self._term: int | None = None  # our term while leading, else the last term seen
        self._deadline = 0.0
        self._lease: lease_sql.LeaseView | None = None
        self._stopping = asyncio.Event()
        self._wake = asyncio.Event()
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._watchdog: asyncio.TimerHandle | None = None
        self.leading_changed = asyncio.Event()
        """Set (and cleared by whoever waits) at every change of role."""
        self.expired_for_s: float | None = None
        """At the last win: how long the lease taken over had been expired, by the
        database's clock (None when there was no lease yet). The takeover's gap starts
        about that long plus one lease ago."""

    # -- what the center reads ------------------------------------------------------------

    def is_leading(self) -> bool:
        """True only while we hold the lease AND our renew deadline has not passed."""
        return self._role is Role.LEADER and self._clock() < self._deadline

    @property
    def term(self) -> int | None:
        return self._term

    def view(self) -> CenterView:
        lease = self._lease
        return CenterView(
            name=self.settings.name,
            role=Role.LEADER if self.is_leading() else Role.STANDBY,
            term=self._term,
            lease_holder=None if lease is None else lease.holder,
            lease_expires_at=None if lease is None else lease.expires_at,
        )

    # -- the loop -------------------------------------------------------------------------

    async def run(self) -> None:
        """Keep or seek the lease until :meth:`stop`; never raises for database trouble."""
        listener = asyncio.create_task(self._listen(), name="ha-listen")
        backoff = 0.1
        try:
            while not self._stopping.is_set():
                try:
                    await self._step()
                    backoff = 0.1
                except (psycopg.Error, OSError, TimeoutError) as exc:
                    log.warning("ha: database trouble (%s); reconnecting", exc)
                    await self._drop_connection()
                    await self._sleep(backoff)
                    backoff = min(backoff * 2, self.settings.renew_interval_s)
                self._check_deadline()
        finally:
            if self._watchdog is not None:
                self._watchdog.cancel()
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener
            await self._drop_connection()

    async def stop(self, release: bool = True) -> None:
        """Planned stop: release the lease (so a standby takes over at once) and end :meth:`run`."""
        self._stopping.set()
        self._wake.set()
        if release and self._role is Role.LEADER and self._term is not None:
            term = self._term
            self._set_role(Role.STANDBY)
            try:
                # A connection of its own: the loop's may be mid-statement, or hung.
                await self._bounded(self._release(term), self.settings.connect_timeout_s)
                self._emit("leader_released", term=term)
            except (psycopg.Error, OSError, TimeoutError) as exc:
                # The lease then simply expires; the standby takes over after --ha-lease.
                log.warning("ha: could not release the lease (%s)", exc)

    async def _release(self, term: int) -> None:
        async with await psycopg.AsyncConnection.connect(
            self.settings.dsn, autocommit=True, connect_timeout=max(1, round(self.settings.connect_timeout_s))
        ) as conn:
            await lease_sql.release(conn, self.settings.name, term)

    async def _step(self) -> None:
        if self._role is Role.LEADER:
            await self._renew_once()
            await self._sleep(self.settings.renew_interval_s)
        else:
            self._wake.clear()  # before the attempt, so a release NOTIFY during it is not lost
            wait = await self._try_acquire()
            if wait is not None:
                await self._sleep(wait, wakeable=True)

    async def _renew_once(self) -> None:
        assert self._term is not None
        sent = self._clock()
        remaining = self._deadline - sent
        if remaining <= 0:
            self._step_down("renew_deadline")
            return
        try:
            conn = await self._bounded(self._connection(), remaining)
            remaining = self._deadline - self._clock()
            view = await self._bounded(
                lease_sql.renew(conn, self.settings.name, self._term, self._ttl()), remaining
            )
        except TimeoutError:
            self._step_down("renew_deadline")
            raise
        if view is None:
            self._lease = await lease_sql.read(conn)
            self._step_down("taken_over")
            return
        self._lease = view
        self._set_deadline(sent + self.settings.renew_deadline_s)

    async def _try_acquire(self) -> float | None:
        """One attempt; returns how long to wait before the next, or None when we won."""
        conn = await self._bounded(self._connection(), self.settings.connect_timeout_s)
        sent = self._clock()
        grant = await self._bounded(
            lease_sql.acquire(conn, self.settings.name, self._ttl()), self.settings.connect_timeout_s
        )
        previous = self._lease
        self._lease = grant.lease
        if not grant.won:
            self._term = grant.lease.term
            until_expiry = (grant.lease.expires_at - grant.lease.db_now).total_seconds()
            return max(0.05, min(self.settings.renew_interval_s, until_expiry + 0.05))
        self._term = grant.lease.term
        self.expired_for_s = None if grant.previous_expires_at is None else max(
            0.0, (grant.lease.db_now - grant.previous_expires_at).total_seconds())
        self._set_deadline(sent + self.settings.renew_deadline_s)
        self._set_role(Role.LEADER)
        self._emit(
            "leader_acquired",
            term=grant.lease.term,
            previous_holder=None if previous is None else previous.holder,
        )
        return None

    def _set_deadline(self, deadline: float) -> None:
        """A timer steps down (and says so) at the deadline itself, even while the loop is
        stuck: cancelling a statement on a silent connection can take seconds."""
        self._deadline = deadline
        if self._watchdog is not None:
            self._watchdog.cancel()
        delay = max(0.0, deadline - self._clock())
        self._watchdog = asyncio.get_running_loop().call_later(delay, self._check_deadline)

    def _check_deadline(self) -> None:
        if self._role is Role.LEADER and self._clock() >= self._deadline:
            self._step_down("renew_deadline")

    def _step_down(self, reason: str) -> None:
        if self._role is not Role.LEADER:
            return
        self._set_role(Role.STANDBY)
        self._emit("leader_lost", term=self._term, reason=reason)

    def _set_role(self, role: Role) -> None:
        if role is not self._role:
            self._role = role
            self.leading_changed.set()

    def _emit(self, event: str, **fields: Any) -> None:
        self._on_event({"event": event, "center": self.settings.name, **fields})

    def _ttl(self) -> timedelta:
        return timedelta(seconds=self.settings.lease_s)

    # -- connections ----------------------------------------------------------------------

    async def _connection(self) -> psycopg.AsyncConnection[Any]:
        if self._conn is None or self._conn.closed:
            self._conn = await psycopg.AsyncConnection.connect(
                self.settings.dsn,
                autocommit=True,
                connect_timeout=max(1, round(self.settings.connect_timeout_s)),
            )
        return self._conn

    async def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), 1.0)

    async def _listen(self) -> None:
        """Wake the loop when a leader releases the lease (its NOTIFY)."""
        while not self._stopping.is_set():
            try:
                conn = await psycopg.AsyncConnection.connect(
                    self.settings.dsn, autocommit=True,
                    connect_timeout=max(1, round(self.settings.connect_timeout_s)),
                )
                async with conn:
                    await conn.execute(f"LISTEN {lease_sql.NOTIFY_CHANNEL}")
                    async for _note in conn.notifies():
                        self._wake.set()
            except (psycopg.Error, OSError) as exc:
                log.debug("ha: listener reconnecting (%s)", exc)
                await self._sleep(self.settings.renew_interval_s)

    # -- waiting --------------------------------------------------------------------------

    async def _bounded(self, awaitable: Awaitable[T], timeout: float) -> T:
        return await asyncio.wait_for(awaitable, max(timeout, 0.001))

    async def _sleep(self, seconds: float, wakeable: bool = False) -> None:
        """Sleep, cut short by stop() (and by a release NOTIFY when ``wakeable``)."""
        waiters = [asyncio.ensure_future(self._stopping.wait())]
        if wakeable:
            waiters.append(asyncio.ensure_future(self._wake.wait()))
        if self._role is Role.LEADER:
            seconds = min(seconds, max(0.0, self._deadline - self._clock()))
        try:
            await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()
