"""The center's side of the agent channel: listen, authenticate, track, dispatch.

An :class:`AgentHub` accepts the one persistent connection each ``cronfile agent`` opens,
authenticates it (:mod:`cronfile.transports.protocol` has the handshake), keeps a registry of who is
connected, pings every connection and hands out a :class:`RemoteExecutor` per connected
agent so that the scheduler can start runs there exactly as it does locally.

The hub is four parts, one concern each: :mod:`~cronfile.transports.admission` (throttle,
certificate and peer checks, the handshake), this module (the registry of connections,
heartbeats, the read loop), :mod:`~cronfile.transports.remote` (runs, leases, outcomes and
acks) and :mod:`~cronfile.transports.orders` (the term fence, ``role`` frames, daemon
sets); :mod:`~cronfile.transports.hubconn` has the connection type they share.

Outcomes have two consumers, and both see each outcome once:

* the :class:`RemoteRunHandle` returned by ``start()`` resolves with it (the scheduler's
  view: concurrency, chains, retries), and
* ``on_outcome(run_id, agent, outcome_dict)`` is awaited for every outcome an agent delivers,
  whether or not a handle is waiting (the record's view: this includes outcomes of runs
  dispatched before a center restart, and real outcomes that arrive after their handle
  already resolved ``lost``, which the center records as superseding the ``lost`` one).

The hub acks an outcome only after ``on_outcome`` returned without raising, and the center's
``on_outcome`` returns only once the outcome's record is durable, so an outcome the center
failed to record (or had not yet written when it died) is delivered again on the agent's
next connection. The handle resolves first: the center's record of a run it dispatched is
written by the handle's watcher, and ``on_outcome`` waits for that record. An outcome
of a run_id already delivered is acked and not passed on again; the hub remembers a bounded
window of recent run_ids for this, so the center must still deduplicate by run_id (it has
to anyway: the window does not survive a restart).

Outcomes are taken only from the agent a run was sent to: an agent holding its own secret
cannot forge the outcome of a run on another agent (run ids are predictable). For runs
without a handle (dispatched before a center restart, or already resolved ``lost``) the
``agent`` passed to ``on_outcome`` is the authenticated sender, which the center checks
against its record.

Before authentication a peer costs little and not for long: at most ``max_handshakes``
connections are in their handshake at once (TLS included; the oldest is evicted when a new
one comes), each for at most ``handshake_timeout_s``, reading at most
:data:`~cronfile.transports.protocol.MAX_PREAUTH_FRAME` bytes per frame. Wrong MACs are
throttled per peer address. With no secret configured the hub listens on loopback only and
accepts a connection only from a process of its own user (or root), found through the
kernel's socket table, since TCP has no ``SO_PEERCRED``.

``lost``: when an agent disconnects, every run it had gets a lease of ``lease_s``. A run
the agent lists as running when it reconnects keeps going; any other run whose outcome has
not arrived when the lease expires resolves ``lost``. The hub never calls ``on_outcome``
for ``lost``: that verdict is the center's own, made through the handle.

Fencing (SPEC §9): a center with ``--ha`` gives the hub ``role``, a callable answering
:class:`CenterRole` (does it lead, with which term). Every order (run, cancel, daemon set)
then carries that term, and a center that does not lead sends no order at all (a standby
knows the leader's term from the lease, and must not be able to order with it). Agents
that check terms get a sealed ``role`` frame on connect and at every change, which tells
them where to send outcomes: so after a failover the new leader receives outcomes of runs
the old one dispatched, through ``on_outcome`` like any outcome without a handle here. An
agent's ``stale_term`` report becomes an ``agent_refused_stale_term`` event through
``on_agent_event``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

from cronfile.schedules.model import Agent
from cronfile.transports.admission import RESERVED_NAMES, Admission, is_loopback
from cronfile.transports.hubconn import Callback, CenterRole, Closed, Connection, call_back
from cronfile.transports.orders import STALE_TERM_EVENT, Orders
from cronfile.transports.protocol import (
    MAX_FRAME,
    DaemonSpec,
    DaemonState,
    DaemonStatus,
    Finished,
    Ping,
    Pong,
    ProtocolError,
    Secrets,
    StaleTerm,
    Started,
)
from cronfile.transports.remote import RemoteExecutor, RemoteRunHandle, RemoteRuns

__all__ = ["RESERVED_NAMES", "STALE_TERM_EVENT", "AgentHub", "CenterRole", "RemoteExecutor",
           "RemoteRunHandle"]

log = logging.getLogger("cronfile.agents")


class AgentHub:
    """Listens for agents on ``host:port`` and keeps the registry of connected ones.

    ``inventory`` is the declared agents (``model.Agent`` by name); their labels win over
    the ones an agent announces. ``secrets`` None or empty means no authentication, which
    is only allowed on loopback: the hub then binds to 127.0.0.1 whatever ``host`` says.

    The hub wires its parts: :class:`~cronfile.transports.admission.Admission` (who may
    connect), :class:`~cronfile.transports.remote.RemoteRuns` (runs and outcomes),
    :class:`~cronfile.transports.orders.Orders` (the term fence, daemon sets); it owns the
    registry of connections, their heartbeats and read loops.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        inventory: Mapping[str, Agent] | None = None,
        secrets: Secrets | None = None,
        accept_undeclared: bool = False,
        heartbeat_s: float = 10.0,
        lease_s: float = 60.0,
        start_timeout_s: float = 10.0,
        handshake_timeout_s: float = 10.0,
        ssl_context: ssl.SSLContext | None = None,
        on_connect: Callback | None = None,
        on_disconnect: Callback | None = None,
        on_outcome: Callback | None = None,
        on_daemon_status: Callback | None = None,
        on_agent_event: Callable[[str, dict[str, Any]], None] | None = None,
        role: Callable[[], CenterRole] | None = None,
        max_frame: int = MAX_FRAME,
        dedupe_window: int = 100_000,
        max_handshakes: int = 256,
    ) -> None:
        self.host = host
        self.port = port
        self.heartbeat_s = heartbeat_s
        self.ssl_context = ssl_context
        self.on_connect = on_connect
        self.on_disconnect = on_disconnect
        self.on_daemon_status = on_daemon_status
        self.max_frame = max_frame
        self._conns: dict[str, Connection] = {}
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._executors: dict[str, RemoteExecutor] = {}
        self.orders = Orders(conns=self._conns, role=role, on_agent_event=on_agent_event)
        self.runs = RemoteRuns(
            conns=self._conns, orders=self.orders, lease_s=lease_s,
            start_timeout_s=start_timeout_s, on_outcome=on_outcome, spawn=self._spawn,
            dedupe_window=dedupe_window)
        self.admission = Admission(
            inventory=inventory or {}, secrets=secrets or Secrets(),
            accept_undeclared=accept_undeclared, heartbeat_s=heartbeat_s,
            handshake_timeout_s=handshake_timeout_s, ssl_context=ssl_context,
            ha=role is not None, max_frame=max_frame, max_handshakes=max_handshakes,
            serve=self._serve, spawn=self._spawn)

    @property
    def role(self) -> Callable[[], CenterRole] | None:
        """None: a center without ``--ha`` (orders carry no term, no ``role`` frames)."""
        return self.orders.role

    @role.setter
    def role(self, role: Callable[[], CenterRole] | None) -> None:
        self.orders.role = role
        self.admission.ha = role is not None

    @property
    def inventory(self) -> dict[str, Agent]:
        return self.admission.inventory

    @property
    def secrets(self) -> Secrets:
        return self.admission.secrets

    # --- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        host = self.host
        if self.secrets.empty and not is_loopback(host):
            log.warning(
                "no agent token configured: listening on 127.0.0.1 only (not %s); "
                "agents are NOT authenticated — give the center a --token-file",
                host,
            )
            host = "127.0.0.1"
        elif self.secrets.empty:
            log.warning("no agent token configured: agents on loopback are not authenticated")
        elif len(self.secrets.per_agent) < len(self.inventory) and self.secrets.shared:
            log.warning("agents share one secret: any agent host holding it can "
                        "impersonate the center to the others; give each agent its own")
        self._server = await asyncio.start_server(
            self.admission.accept, host, self.port, limit=self.max_frame + 64
        )
        sock = self._server.sockets[0].getsockname()
        self.host, self.port = sock[0], sock[1]
        log.info("agent hub listening on %s:%s%s", self.host, self.port,
                 " (TLS)" if self.ssl_context else "")
        if self.role is not None:
            self._spawn(self.orders.watch_role())

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    async def close(self) -> None:
        """Stop listening and drop every connection. Runs on agents keep going; their
        outcomes wait in the agents' outboxes for the next hub."""
        if self._server is not None:
            self._server.close()
        for conn in list(self._conns.values()):
            conn.abort()
        self.admission.abort_all()  # handshakes in progress too
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)
        self.runs.close()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)

    async def __aenter__(self) -> AgentHub:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _spawn(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # --- what the center asks ----------------------------------------------------------

    def update_inventory(
        self, inventory: Mapping[str, Agent], secrets: Secrets | None = None
    ) -> None:
        """Take a reloaded inventory (and secrets, when given).

        Connections stay up; an agent that is no longer declared is disconnected (unless
        undeclared agents are accepted), and its labels are refreshed otherwise.
        """
        self.admission.inventory = dict(inventory)
        if secrets is not None:
            self.admission.secrets = secrets
        for name, conn in list(self._conns.items()):
            agent = self.inventory.get(name)
            if agent is not None:
                conn.labels = dict(agent.labels)
            elif not self.admission.accept_undeclared:
                log.warning("agent %s is no longer declared: disconnecting it", name)
                self._spawn(conn.refuse_and_close("no longer declared in the inventory"))

    def connected(self) -> list[str]:
        return sorted(self._conns)

    def is_connected(self, name: str) -> bool:
        return name in self._conns

    def labels_of(self, name: str) -> dict[str, str]:
        conn = self._conns.get(name)
        return dict(conn.labels) if conn else {}

    def running_on(self, name: str) -> list[str]:
        return self.runs.running_on(name)

    def executor_for(self, name: str) -> RemoteExecutor | None:
        """The executor for a connected agent, None when it is not connected."""
        if name not in self._conns:
            return None
        executor = self._executors.get(name)
        if executor is None:
            executor = self._executors[name] = RemoteExecutor(self.runs, name)
        return executor

    def handle(self, run_id: str) -> RemoteRunHandle | None:
        """The unresolved handle of a run, if this hub dispatched it."""
        return self.runs.handles.get(run_id)

    async def set_daemons(
        self, name: str, daemons: Iterable[DaemonSpec], revision: str = ""
    ) -> None:
        """Set the complete daemon set of an agent; sent now if connected, and again on
        every reconnect (the agent converges to it: start new, stop removed, restart
        changed)."""
        await self.orders.set_daemons(name, daemons, revision)

    def daemon_status(self, name: str) -> tuple[DaemonState, ...]:
        conn = self._conns.get(name)
        return conn.daemons if conn else ()

    async def disconnect(self, name: str) -> bool:
        """Drop an agent's connection (it will reconnect by itself). True if it was up."""
        conn = self._conns.get(name)
        if conn is None:
            return False
        log.info("dropping the connection of agent %s", name)
        conn.abort()
        return True

    def snapshot(self) -> list[dict[str, Any]]:
        """The registry as plain data, for ``cronfile status``."""
        return [
            {
                "name": c.name,
                "labels": dict(c.labels),
                "declared": c.name in self.inventory,
                "version": c.version,
                "peer": c.peer,
                "tls": c.tls,
                "connected_since": c.connected_since.isoformat(),
                "last_heartbeat": c.last_heartbeat.isoformat(),
                "running": sorted(c.running),
                "frames_in": c.frames_in,
                "frames_out": c.frames_out,
                "daemons": [d.to_dict() for d in c.daemons],
            }
            for c in sorted(self._conns.values(), key=lambda c: c.name)
        ]

    # --- connections -------------------------------------------------------------------

    def _register(self, conn: Connection) -> None:
        old = self._conns.get(conn.name)
        if old is not None:
            # The newest authenticated connection wins: the old one is almost always a
            # half-open link the agent already gave up on.
            log.info("agent %s reconnected from %s; dropping its old connection from %s",
                     conn.name, conn.peer, old.peer)
            old.superseded = True
            old.abort()
        self._conns[conn.name] = conn
        self.runs.connected(conn)

    async def _serve(self, conn: Connection) -> None:
        self._register(conn)
        log.info("agent %s connected from %s (%d running, labels %s)", conn.name, conn.peer,
                 len(conn.running), conn.labels)
        heartbeat = asyncio.ensure_future(self._heartbeat(conn))
        try:
            await self.orders.greet(conn)  # first: the role says where outcomes go
            await call_back(self.on_connect, conn.name)
            await self.orders.send_daemons(conn)
            await self._read_loop(conn)
        except Closed:
            pass
        except ProtocolError as exc:
            log.warning("agent %s (%s): %s; closing its connection", conn.name, conn.peer, exc)
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        finally:
            heartbeat.cancel()
            conn.abort()
            if not conn.superseded and self._conns.get(conn.name) is conn:
                del self._conns[conn.name]
                self.runs.disconnected(conn.name)
                log.info("agent %s disconnected", conn.name)
                with contextlib.suppress(Exception):
                    await call_back(self.on_disconnect, conn.name)

    async def _heartbeat(self, conn: Connection) -> None:
        # Half-open detection: a peer that vanished without a FIN never makes read()
        # fail, so silence is the only signal. Anything received counts as a heartbeat;
        # three intervals of silence close the connection.
        seq = 0
        while not conn.closed:
            await asyncio.sleep(self.heartbeat_s)
            if time.monotonic() - conn.last_seen > 3 * self.heartbeat_s:
                log.warning("agent %s silent for %.0fs: closing its connection",
                            conn.name, time.monotonic() - conn.last_seen)
                conn.abort()
                return
            seq += 1
            try:
                await asyncio.wait_for(conn.send(Ping(seq=seq)), 3 * self.heartbeat_s)
            except (Closed, TimeoutError):
                conn.abort()
                return

    async def _read_loop(self, conn: Connection) -> None:
        runs = self.runs
        while True:
            msg = await conn.session.read(conn.reader, self.max_frame)
            conn.frames_in += 1
            conn.seen()
            if isinstance(msg, Finished):
                await runs.finished(conn, msg)
            elif isinstance(msg, Started):
                conn.running.add(msg.run_id)
                runs.started(msg)
            elif isinstance(msg, Ping):
                await conn.send(Pong(seq=msg.seq))
            elif isinstance(msg, Pong):
                pass
            elif isinstance(msg, DaemonStatus):
                conn.daemons = msg.daemons
                await call_back(self.on_daemon_status, conn.name, msg.daemons)
            elif isinstance(msg, StaleTerm):
                self.orders.on_stale_term(conn, msg)
            else:
                raise ProtocolError(f"unexpected {msg.TYPE} message from an agent")
