"""One authenticated agent connection as the hub sees it, and the center's HA role.

The parts of the hub (:mod:`~cronfile.transports.admission` makes connections,
:mod:`~cronfile.transports.hub` keeps and serves them, :mod:`~cronfile.transports.remote`
sends runs over them, :mod:`~cronfile.transports.orders` fences orders) share these
types, so none of them has to import another's internals.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from cronfile.transports.protocol import DaemonState, Message, Refused, Session

Callback = Callable[..., Awaitable[None] | None]


@dataclass(frozen=True)
class CenterRole:
    """What an HA center is now: whether it leads, and its term (while leading, the term of
    its lease; while standing by, the last term it saw)."""

    leading: bool
    term: int | None


def utc_now() -> datetime:
    return datetime.now(UTC)


async def call_back(callback: Callback | None, *args: Any) -> None:
    """Call a hub callback, awaiting it when it is a coroutine function."""
    if callback is None:
        return
    result = callback(*args)
    if inspect.isawaitable(result):
        await result


class Closed(Exception):
    """The connection went away while we were using it."""


@dataclass(eq=False)
class Connection:
    """One authenticated agent connection."""

    name: str
    labels: dict[str, str]
    version: str
    peer: str
    tls: bool
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    session: Session
    connected_since: datetime = field(default_factory=utc_now)
    last_heartbeat: datetime = field(default_factory=utc_now)
    last_seen: float = field(default_factory=time.monotonic)
    running: set[str] = field(default_factory=set)
    daemons: tuple[DaemonState, ...] = ()
    superseded: bool = False
    closed: bool = False
    terms: bool = False
    """The agent checks terms: it gets ``role`` frames."""
    role_sent: CenterRole | None = None
    frames_in: int = 0
    frames_out: int = 0

    async def send(self, msg: Message) -> None:
        if self.closed:
            raise Closed(self.name)
        try:
            self.writer.write(self.session.frame(msg))
            self.frames_out += 1
            await self.writer.drain()
        except (ConnectionError, OSError, RuntimeError) as exc:
            # RuntimeError: drain() on a transport being closed by another task.
            self.abort()
            raise Closed(self.name) from exc

    async def send_quietly(self, msg: Message) -> None:
        """Send, ignoring a connection that is gone (its reader loop cleans up)."""
        with contextlib.suppress(Closed):
            await self.send(msg)

    async def refuse_and_close(self, reason: str) -> None:
        """Tell the agent why (bounded), then close."""
        with contextlib.suppress(Closed, TimeoutError):
            await asyncio.wait_for(self.send(Refused(reason=reason)), 2)
        self.abort()

    def abort(self) -> None:
        """Close at once; the reader loop notices and cleans up."""
        self.closed = True
        self.writer.transport.abort()

    def seen(self) -> None:
        self.last_seen = time.monotonic()
        self.last_heartbeat = utc_now()
