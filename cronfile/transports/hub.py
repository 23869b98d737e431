"""The center's side of the agent channel: listen, authenticate, track, dispatch.

An :class:`AgentHub` accepts the one persistent connection each ``cronfile agent`` opens,
authenticates it (:mod:`cronfile.transports.protocol` has the handshake), keeps a registry of who is
connected, pings every connection and hands out a :class:`RemoteExecutor` per connected
agent so that the scheduler can start runs there exactly as it does locally.

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
import collections
import contextlib
import inspect
import ipaddress
import logging
import os
import re
import secrets as _secrets
import ssl
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from cronfile import __version__
from cronfile.schedules.model import Agent, RunStatus
from cronfile.transports.executor import (
    Executor,
    ExecutorInfo,
    HostUnavailable,
    RunHandle,
    RunOutcome,
    RunRefused,
    RunRequest,
)
from cronfile.transports.peercred import loopback_peer_uid
from cronfile.transports.protocol import (
    MAX_FRAME,
    MAX_PREAUTH_FRAME,
    PROTOCOL_VERSION,
    Ack,
    Cancel,
    Challenge,
    Daemons,
    DaemonSpec,
    DaemonState,
    DaemonStatus,
    Finished,
    Hello,
    Message,
    Ping,
    Pong,
    ProtocolError,
    Refused,
    Response,
    Role,
    Run,
    Running,
    Secrets,
    Session,
    StaleTerm,
    Started,
    Transcript,
    UnsupportedVersion,
    Welcome,
    agent_proof,
    center_proof,
    decode_message,
    new_nonce,
    proofs_equal,
    read_body,
    refusal_frame,
)

log = logging.getLogger("cronfile.agents")

Callback = Callable[..., Awaitable[None] | None]

_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
RESERVED_NAMES = frozenset({"local"})
"""``local`` is the center's own host; no agent may register under it."""
ROLE_POLL_S = 0.2
"""How often an HA hub looks at its center's role, to tell agents at once when it changed."""
STALE_TERM_EVENT = "agent_refused_stale_term"


@dataclass(frozen=True)
class CenterRole:
    """What an HA center is now: whether it leads, and its term (while leading, the term of
    its lease; while standing by, the last term it saw)."""

    leading: bool
    term: int | None


def _now() -> datetime:
    return datetime.now(UTC)


async def _call(callback: Callback | None, *args: Any) -> None:
    if callback is None:
        return
    result = callback(*args)
    if inspect.isawaitable(result):
        await result


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _certificate_names(cert: Mapping[str, Any]) -> set[str]:
    """The DNS names and common names a verified client certificate was issued for."""
    names = {value for kind, value in cert.get("subjectAltName", ()) if kind == "DNS"}
    for rdn in cert.get("subject", ()):
        names.update(value for key, value in rdn if key == "commonName")
    return names


def _certificate_refusal(writer: asyncio.StreamWriter, agent: str) -> str | None:
    """Mutual TLS binds a certificate to an agent name: a verified client certificate must
    name the agent (subjectAltName DNS or CN), so one host's certificate cannot register
    as another agent. Without a client certificate (TLS without --tls-client-ca) the
    secret alone decides."""
    if writer.get_extra_info("sslcontext") is None:
        return None
    cert = writer.get_extra_info("peercert")
    if not cert:
        return None
    names = _certificate_names(cert)
    if agent not in names:
        shown = ", ".join(sorted(names)) or "no name"
        return f"the client certificate is for {shown}, not for agent {agent!r}"
    return None


class _FailureThrottle:
    """Failed authentications per peer address: after ``burst`` failures within
    ``window_s`` the address is refused before any MAC is computed for ``block_s``."""

    def __init__(self, burst: int = 10, window_s: float = 10.0, block_s: float = 10.0,
                 max_peers: int = 4096) -> None:
        self.burst = burst
        self.window_s = window_s
        self.block_s = block_s
        self.max_peers = max_peers
        self._failures: collections.OrderedDict[str, list[float]] = collections.OrderedDict()
        self._blocked_until: dict[str, float] = {}

    def blocked(self, address: str) -> bool:
        until = self._blocked_until.get(address)
        if until is None:
            return False
        if time.monotonic() < until:
            return True
        del self._blocked_until[address]
        return False

    def failed(self, address: str) -> bool:
        """Count one failure; True when the address just became blocked."""
        now = time.monotonic()
        recent = [t for t in self._failures.pop(address, []) if now - t < self.window_s]
        recent.append(now)
        self._failures[address] = recent
        while len(self._failures) > self.max_peers:
            self._failures.popitem(last=False)
        if len(recent) >= self.burst:
            self._failures.pop(address, None)
            if len(self._blocked_until) >= self.max_peers:  # bounded: drop expired blocks
                self._blocked_until = {a: t for a, t in self._blocked_until.items() if t > now}
            self._blocked_until[address] = now + self.block_s
            return True
        return False


class _Closed(Exception):
    """The connection went away while we were using it."""


@dataclass(eq=False)
class _Connection:
    """One authenticated agent connection."""

    name: str
    labels: dict[str, str]
    version: str
    peer: str
    tls: bool
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    session: Session
    connected_since: datetime = field(default_factory=_now)
    last_heartbeat: datetime = field(default_factory=_now)
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
            raise _Closed(self.name)
        try:
            self.writer.write(self.session.frame(msg))
            self.frames_out += 1
            await self.writer.drain()
        except (ConnectionError, OSError, RuntimeError) as exc:
            # RuntimeError: drain() on a transport being closed by another task.
            self.abort()
            raise _Closed(self.name) from exc

    def abort(self) -> None:
        """Close at once; the reader loop notices and cleans up."""
        self.closed = True
        self.writer.transport.abort()

    def seen(self) -> None:
        self.last_seen = time.monotonic()
        self.last_heartbeat = _now()


class RemoteRunHandle(RunHandle):
    """A run on an agent; resolves on ``finished``, or ``lost`` when its lease expires."""

    def __init__(self, hub: AgentHub, agent: str, run_id: str) -> None:
        self.hub = hub
        self.agent = agent
        self.run_id = run_id
        self.started_at = _now()  # the dispatch time until the agent reports its start
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
        role = self.hub._role_now()
        if role is not None and not role.leading:
            log.warning("not stopping run %s on agent %s: this center does not lead",
                        self.run_id, self.agent)
            return
        conn = self.hub._conns.get(self.agent)
        if conn is not None:
            await self.hub._send_order(conn, self._cancel)
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
            self._lease = loop.call_later(lease_s, self.hub._lease_expired, self)

    def _clear_lease(self) -> None:
        if self._lease is not None:
            self._lease.cancel()
            self._lease = None


class RemoteExecutor(Executor):
    """Starts runs on one agent through its TCP channel (whichever connection is current)."""

    transport = "tcp"

    def __init__(self, hub: AgentHub, agent: str) -> None:
        self.hub = hub
        self.agent = agent

    async def start(self, request: RunRequest) -> RemoteRunHandle:
        """Send the run and wait (bounded) for the agent's first answer.

        Raises :class:`RunRefused` when the agent is not connected. Waiting for ``started``
        makes ``handle.started_at`` the agent's real start time; if the agent does not answer
        within ``start_timeout_s`` (or the link drops), the handle is returned anyway and its
        lease decides.
        """
        return await self.hub._dispatch(self.agent, request)

    def info(self) -> ExecutorInfo:
        return ExecutorInfo(transport=self.transport, running=self.hub.running_on(self.agent))


class AgentHub:
    """Listens for agents on ``host:port`` and keeps the registry of connected ones.

    ``inventory`` is the declared agents (``model.Agent`` by name); their labels win over
    the ones an agent announces. ``secrets`` None or empty means no authentication, which
    is only allowed on loopback: the hub then binds to 127.0.0.1 whatever ``host`` says.
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
        self.inventory: dict[str, Agent] = dict(inventory or {})
        self.secrets = secrets or Secrets()
        self.accept_undeclared = accept_undeclared
        self.heartbeat_s = heartbeat_s
        self.lease_s = lease_s
        self.start_timeout_s = start_timeout_s
        self.handshake_timeout_s = handshake_timeout_s
        self.ssl_context = ssl_context
        self.on_connect = on_connect
        self.on_disconnect = on_disconnect
        self.on_outcome = on_outcome
        self.on_daemon_status = on_daemon_status
        self.on_agent_event = on_agent_event
        self.role = role
        """None: a center without ``--ha`` (orders carry no term, no ``role`` frames)."""
        self.max_frame = max_frame
        self.max_handshakes = max_handshakes
        self._dedupe_window = dedupe_window
        self._delivered: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._recording: set[str] = set()  # outcomes passed to on_outcome, not acked yet
        self._conns: dict[str, _Connection] = {}
        self._handles: dict[str, RemoteRunHandle] = {}
        self._desired_daemons: dict[str, Daemons] = {}
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._executors: dict[str, RemoteExecutor] = {}
        self._writers: set[asyncio.StreamWriter] = set()
        self._handshaking: dict[asyncio.StreamWriter, None] = {}  # oldest first
        self._throttle = _FailureThrottle()
        self._own_uid = os.geteuid()

    # --- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        host = self.host
        if self.secrets.empty and not _is_loopback(host):
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
            self._accept, host, self.port, limit=self.max_frame + 64
        )
        sock = self._server.sockets[0].getsockname()
        self.host, self.port = sock[0], sock[1]
        log.info("agent hub listening on %s:%s%s", self.host, self.port,
                 " (TLS)" if self.ssl_context else "")
        if self.role is not None:
            self._spawn(self._watch_role())

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
        for writer in list(self._writers):  # handshakes in progress too
            writer.transport.abort()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)
        for handle in self._handles.values():
            handle._clear_lease()
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
        self.inventory = dict(inventory)
        if secrets is not None:
            self.secrets = secrets
        for name, conn in list(self._conns.items()):
            agent = self.inventory.get(name)
            if agent is not None:
                conn.labels = dict(agent.labels)
            elif not self.accept_undeclared:
                log.warning("agent %s is no longer declared: disconnecting it", name)
                self._spawn(self._refuse_and_close(conn, "no longer declared in the inventory"))

    def connected(self) -> list[str]:
        return sorted(self._conns)

    def is_connected(self, name: str) -> bool:
        return name in self._conns

    def labels_of(self, name: str) -> dict[str, str]:
        conn = self._conns.get(name)
        return dict(conn.labels) if conn else {}

    def running_on(self, name: str) -> list[str]:
        conn = self._conns.get(name)
        return sorted(conn.running) if conn else []

    def executor_for(self, name: str) -> RemoteExecutor | None:
        """The executor for a connected agent, None when it is not connected."""
        if name not in self._conns:
            return None
        executor = self._executors.get(name)
        if executor is None:
            executor = self._executors[name] = RemoteExecutor(self, name)
        return executor

    def handle(self, run_id: str) -> RemoteRunHandle | None:
        """The unresolved handle of a run, if this hub dispatched it."""
        return self._handles.get(run_id)

    async def set_daemons(
        self, name: str, daemons: Iterable[DaemonSpec], revision: str = ""
    ) -> None:
        """Set the complete daemon set of an agent; sent now if connected, and again on
        every reconnect (the agent converges to it: start new, stop removed, restart
        changed)."""
        msg = Daemons(daemons=tuple(daemons), revision=revision)
        self._desired_daemons[name] = msg
        conn = self._conns.get(name)
        if conn is not None:
            await self._send_order(conn, msg)

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

    # --- dispatch ----------------------------------------------------------------------

    async def _dispatch(self, name: str, request: RunRequest) -> RemoteRunHandle:
        conn = self._conns.get(name)
        if conn is None:
            raise HostUnavailable(f"agent {name} is not connected")
        existing = self._handles.get(request.run_id)
        if existing is not None:  # the same run dispatched twice: one run, one handle
            return existing
        role = self._role_now()
        if role is not None and not role.leading:
            raise HostUnavailable("this center does not lead (HA standby): it sends no runs")
        try:
            frame = Run.from_request(request, term=None if role is None else role.term)
            frame.frame()
        except (ProtocolError, ValueError) as exc:
            raise RunRefused(f"cannot send the run to agent {name}: {exc}") from None
        handle = RemoteRunHandle(self, name, request.run_id)
        self._handles[request.run_id] = handle
        try:
            await conn.send(frame)
        except _Closed:
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

    def _lease_expired(self, handle: RemoteRunHandle) -> None:
        handle._lease = None
        if handle.done:
            return
        conn = self._conns.get(handle.agent)
        if conn is not None and handle.run_id in conn.running:
            return  # it is back and still running the run
        self._handles.pop(handle.run_id, None)
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
                finished_at=_now(),
                reason=reason,
            )
        )

    # --- connections -------------------------------------------------------------------

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Unauthenticated connections cost memory and a timer each: cap them. When the cap
        # is reached the OLDEST handshake is evicted, not the newest: a real agent finishes
        # its handshake in milliseconds, so a flood of idle sockets evicts itself and can
        # no longer lock the agents out.
        while len(self._handshaking) >= self.max_handshakes:
            oldest = next(iter(self._handshaking))
            del self._handshaking[oldest]
            log.warning("too many agent handshakes in progress: dropping the oldest")
            oldest.transport.abort()
        self._handshaking[writer] = None
        if self.ssl_context is not None:
            # Not a byte may be read in plain before start_tls takes over the socket: a
            # ClientHello buffered in the StreamReader would never reach the TLS layer and
            # the handshake would hang. start_tls resumes reading itself.
            transport = writer.transport
            assert isinstance(transport, asyncio.ReadTransport)  # a socket transport is both
            transport.pause_reading()
        # A task of our own rather than the one asyncio makes for a coroutine callback: we
        # cancel ours at close(), and asyncio logs a cancelled callback task as an error.
        self._writers.add(writer)
        self._spawn(self._connection(reader, writer))

    async def _connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            await self._connection_inner(reader, writer)
        finally:
            self._writers.discard(writer)
            self._handshaking.pop(writer, None)
            writer.transport.abort()

    async def _connection_inner(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        peername = writer.get_extra_info("peername")
        peer = f"{peername[0]}:{peername[1]}" if peername else "?"
        try:
            conn = await asyncio.wait_for(
                self._handshake(reader, writer, peer), self.handshake_timeout_s
            )
        except TimeoutError:
            log.warning("agent connection from %s: no complete handshake in time", peer)
            writer.transport.abort()
            return
        except ProtocolError as exc:
            log.warning("agent connection from %s: %s", peer, exc)
            writer.transport.abort()
            return
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            writer.transport.abort()
            return
        except Exception as exc:  # noqa: BLE001 - the peer is not authenticated
            # Nothing an unauthenticated peer sends may cost a traceback per connection.
            log.warning("agent connection from %s: handshake failed (%s: %s)", peer,
                        type(exc).__name__, exc)
            writer.transport.abort()
            return
        finally:
            self._handshaking.pop(writer, None)
        if conn is None:
            return
        await self._serve(conn)

    async def _refuse(self, writer: asyncio.StreamWriter, peer: str, reason: str) -> None:
        log.warning("agent connection from %s refused: %s", peer, reason)
        with contextlib.suppress(Exception):
            writer.write(Refused(reason=reason).frame())
            await asyncio.wait_for(writer.drain(), 2)
        writer.close()
        # Over TLS the refusal may still sit in the TLS layer: let it out (bounded) before
        # the caller aborts the transport, or the agent never learns why.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(writer.wait_closed(), 2)

    async def _refuse_and_close(self, conn: _Connection, reason: str) -> None:
        with contextlib.suppress(_Closed, TimeoutError):
            await asyncio.wait_for(conn.send(Refused(reason=reason)), 2)
        conn.abort()

    async def _read_hello(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: str
    ) -> tuple[Hello, bytes] | None:
        body = await read_body(reader, MAX_PREAUTH_FRAME)
        try:
            first = decode_message(body)
        except UnsupportedVersion as exc:
            # Answer in the peer's own version, which it can read: an old agent then logs
            # why it is refused instead of reconnecting blind.
            reason = (f"protocol version {exc.version} is not supported; this center "
                      f"speaks version {PROTOCOL_VERSION}: upgrade the agent")
            log.warning("agent connection from %s refused: %s", peer, reason)
            with contextlib.suppress(Exception):
                writer.write(refusal_frame(reason, exc.version))
                await asyncio.wait_for(writer.drain(), 2)
            return None
        if not isinstance(first, Hello):
            raise ProtocolError(f"expected hello, got {first.TYPE}")
        return first, body

    def _check_local_peer(self, writer: asyncio.StreamWriter) -> str | None:
        """Without secrets: refuse a loopback peer that is not our own user (or root)."""
        peername = writer.get_extra_info("peername")
        sockname = writer.get_extra_info("sockname")
        if not peername or not sockname:
            return "cannot tell which user the connection comes from"
        uid = loopback_peer_uid(peername, sockname)
        if uid is None:
            return ("cannot tell which user the connection comes from; "
                    "give the center a --token-file")
        if uid not in (0, self._own_uid):
            return (f"the connection comes from uid {uid}, not the center's user; "
                    "without a --token-file only its own user's agents may connect")
        return None

    async def _handshake(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: str
    ) -> _Connection | None:
        if self.ssl_context is not None:
            # TLS here, not in start_server: the handshake cap and timeout then cover the
            # TLS handshake too (a socket that never sends a ClientHello is evicted).
            await writer.start_tls(self.ssl_context)
        hello = await self._read_hello(reader, writer, peer)
        if hello is None:
            return None
        first, hello_body = hello
        name = first.agent
        if not _NAME.fullmatch(name) or len(name) > 63:
            await self._refuse(writer, peer, f"{name!r} is not a valid agent name")
            return None
        if name in RESERVED_NAMES:
            await self._refuse(writer, peer, f"{name!r} is reserved for the center's own host")
            return None
        refusal = _certificate_refusal(writer, name)
        if refusal is not None:
            await self._refuse(writer, peer, refusal)
            return None
        proof = ""
        session = Session()
        if not self.secrets.empty:
            address = peer.rpartition(":")[0]
            if self._throttle.blocked(address):
                await self._refuse(writer, peer, "too many failed authentications from "
                                   f"{address}: wait and try again")
                return None
            nonce = new_nonce()
            transcript = Transcript(first, hello_body, nonce)
            writer.write(Challenge(nonce=nonce).frame())
            await writer.drain()
            answer = decode_message(await read_body(reader, MAX_PREAUTH_FRAME))
            if not isinstance(answer, Response):
                raise ProtocolError(f"expected response, got {answer.TYPE}")
            secret = self.secrets.for_agent(name)
            # Compute a MAC even for names without a secret, so the time taken does not
            # tell a prober which names have one.
            expected = agent_proof(secret or _secrets.token_bytes(32), transcript)
            if secret is None or not proofs_equal(expected, answer.mac):
                if self._throttle.failed(address):
                    log.warning("agent connections from %s: too many failed "
                                "authentications; refusing them for %gs", address,
                                self._throttle.block_s)
                await self._refuse(writer, peer, f"authentication failed for agent {name!r}")
                return None
            proof = center_proof(secret, transcript)
            session = Session.of_center(secret, transcript)
        else:
            refusal = self._check_local_peer(writer)
            if refusal is not None:
                await self._refuse(writer, peer, refusal)
                return None
        declared = self.inventory.get(name)
        if declared is None and not self.accept_undeclared:
            await self._refuse(writer, peer, f"agent {name!r} is not declared in the inventory")
            return None
        labels = dict(declared.labels) if declared is not None else dict(first.labels)
        writer.write(
            Welcome(
                agent=name, center=__version__, heartbeat_s=self.heartbeat_s,
                proof=proof, labels=labels, ha=self.role is not None,
            ).frame()
        )
        await writer.drain()
        running = await session.read(reader, self.max_frame)
        if not isinstance(running, Running):
            raise ProtocolError(f"expected running, got {running.TYPE}")
        return _Connection(
            name=name,
            labels=labels,
            version=first.version,
            peer=peer,
            tls=writer.get_extra_info("sslcontext") is not None,
            reader=reader,
            writer=writer,
            session=session,
            running=set(running.run_ids),
            terms=first.terms,
        )

    def _register(self, conn: _Connection) -> None:
        old = self._conns.get(conn.name)
        if old is not None:
            # The newest authenticated connection wins: the old one is almost always a
            # half-open link the agent already gave up on.
            log.info("agent %s reconnected from %s; dropping its old connection from %s",
                     conn.name, conn.peer, old.peer)
            old.superseded = True
            old.abort()
        self._conns[conn.name] = conn
        for handle in self._handles.values():
            if handle.agent != conn.name:
                continue
            if handle.run_id in conn.running:
                handle._clear_lease()
                if handle._cancel is not None:
                    self._spawn(self._send_order(conn, handle._cancel))
            else:
                # Not running there: its outcome should come from the agent's outbox right
                # away; if it never does (the run frame died with the old link), the lease
                # resolves it ``lost``. A lease already running keeps its deadline.
                handle._start_lease(self.lease_s)

    async def _send_quietly(self, conn: _Connection, msg: Message) -> None:
        with contextlib.suppress(_Closed):
            await conn.send(msg)

    # --- fencing -----------------------------------------------------------------------

    def _role_now(self) -> CenterRole | None:
        return None if self.role is None else self.role()

    async def _send_order(self, conn: _Connection, order: Cancel | Daemons) -> bool:
        """Send an order stamped with this center's term; an HA center that does not lead
        sends none (False). The agent refuses it anyway if the term is stale."""
        role = self._role_now()
        if role is not None:
            if not role.leading:
                log.debug("not sending %s to agent %s: this center does not lead",
                         order.TYPE, conn.name)
                return False
            order = replace(order, term=role.term)
        with contextlib.suppress(_Closed):
            await conn.send(order)
            return True
        return False

    async def _send_role(self, conn: _Connection, role: CenterRole) -> None:
        if conn.terms and conn.role_sent != role:
            conn.role_sent = role
            await self._send_quietly(conn, Role(leading=role.leading, term=role.term))

    async def _watch_role(self) -> None:
        """Tell connected agents when this center's role or term changes; on becoming the
        leader, send each its daemon set (a standby withholds them)."""
        assert self.role is not None
        last = self.role()
        while True:
            await asyncio.sleep(ROLE_POLL_S)
            role = self.role()
            if role == last:
                continue
            log.info("center role now %s (term %s): telling %d agent(s)",
                     "leader" if role.leading else "standby", role.term, len(self._conns))
            became_leader = role.leading and not last.leading
            last = role
            for conn in list(self._conns.values()):
                await self._send_role(conn, role)
                desired = self._desired_daemons.get(conn.name)
                if became_leader and desired is not None:
                    await self._send_order(conn, desired)

    def _on_stale_term(self, conn: _Connection, msg: StaleTerm) -> None:
        log.warning("agent %s refused a %s order%s from %s: its term %s is below the highest "
                    "it has seen, %d", conn.name, msg.order,
                    f" (run {msg.run_id})" if msg.run_id else "", msg.center or "a center",
                    msg.term, msg.highest_term)
        if self.on_agent_event is not None:
            self.on_agent_event(STALE_TERM_EVENT, {
                "agent": conn.name, "order": msg.order, "run_id": msg.run_id, "job": msg.job,
                "term": msg.term, "highest_term": msg.highest_term, "from_center": msg.center})

    async def _serve(self, conn: _Connection) -> None:
        self._register(conn)
        log.info("agent %s connected from %s (%d running, labels %s)", conn.name, conn.peer,
                 len(conn.running), conn.labels)
        heartbeat = asyncio.ensure_future(self._heartbeat(conn))
        try:
            role = self._role_now()
            if role is not None:
                if conn.terms:
                    await self._send_role(conn, role)  # first: it says where outcomes go
                else:
                    log.warning("agent %s (version %s) does not check terms: orders of a "
                                "stale leader are not fenced there; upgrade it",
                                conn.name, conn.version)
            await _call(self.on_connect, conn.name)
            desired = self._desired_daemons.get(conn.name)
            if desired is not None:
                await self._send_order(conn, desired)
            await self._read_loop(conn)
        except _Closed:
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
                for handle in self._handles.values():
                    if handle.agent == conn.name:
                        handle._start_lease(self.lease_s)
                        handle.replied.set()
                log.info("agent %s disconnected", conn.name)
                with contextlib.suppress(Exception):
                    await _call(self.on_disconnect, conn.name)

    async def _heartbeat(self, conn: _Connection) -> None:
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
            except (_Closed, TimeoutError):
                conn.abort()
                return

    async def _read_loop(self, conn: _Connection) -> None:
        while True:
            msg = await conn.session.read(conn.reader, self.max_frame)
            conn.frames_in += 1
            conn.seen()
            if isinstance(msg, Finished):
                await self._on_finished(conn, msg)
            elif isinstance(msg, Started):
                conn.running.add(msg.run_id)
                handle = self._handles.get(msg.run_id)
                if handle is not None:
                    handle.started_at = msg.started_at
                    handle.pid = msg.pid
                    handle.confirmed = True
                    handle.replied.set()
            elif isinstance(msg, Ping):
                await conn.send(Pong(seq=msg.seq))
            elif isinstance(msg, Pong):
                pass
            elif isinstance(msg, DaemonStatus):
                conn.daemons = msg.daemons
                await _call(self.on_daemon_status, conn.name, msg.daemons)
            elif isinstance(msg, StaleTerm):
                self._on_stale_term(conn, msg)
            else:
                raise ProtocolError(f"unexpected {msg.TYPE} message from an agent")

    async def _on_finished(self, conn: _Connection, msg: Finished) -> None:
        """Resolve the run's handle, then record and ack in a task of its own: the ack waits
        until ``on_outcome`` says the outcome is durable (an outcome acked and then lost
        with the center would be gone for good: the agent drops what is acked), and the
        read loop must not wait meanwhile (the center may be waiting on this very agent's
        next frame to finish a dispatch, which is when it makes records durable)."""
        run_id = msg.run_id
        handle = self._handles.get(run_id)
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
        handle = self._handles.pop(run_id, None)
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

    async def _record_then_ack(self, conn: _Connection, msg: Finished, delivered_key: str) -> None:
        run_id = msg.run_id
        try:
            await _call(self.on_outcome, run_id, conn.name, msg.outcome_dict())
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
        await self._send_quietly(conn, Ack(run_id=run_id))
