"""Admission to the agent hub: who may become a connection, and at what cost.

Before authentication a peer costs little and not for long: at most ``max_handshakes``
connections are in their handshake at once (TLS included; the oldest is evicted when a new
one comes), each for at most ``handshake_timeout_s``, reading at most
:data:`~cronfile.transports.protocol.MAX_PREAUTH_FRAME` bytes per frame. Wrong MACs are
throttled per peer address. With no secret configured only a process of the center's own
user (or root) is admitted, found through the kernel's socket table, since TCP has no
``SO_PEERCRED``. A verified client certificate must name the agent.

An :class:`Admission` hands each admitted :class:`~cronfile.transports.hubconn.Connection`
to the ``serve`` callback it was given (the hub's); it knows nothing of runs or orders.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ipaddress
import logging
import os
import re
import secrets as _secrets
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from cronfile import __version__
from cronfile.schedules.model import Agent
from cronfile.transports.hubconn import Connection
from cronfile.transports.peercred import loopback_peer_uid
from cronfile.transports.protocol import (
    MAX_PREAUTH_FRAME,
    PROTOCOL_VERSION,
    Challenge,
    Hello,
    ProtocolError,
    Refused,
    Response,
    Running,
    Secrets,
    Session,
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

_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
RESERVED_NAMES = frozenset({"local"})
"""``local`` is the center's own host; no agent may register under it."""


def is_loopback(host: str) -> bool:
    """``localhost`` or a loopback IP (``[::1]`` too); any other name may resolve to a public
    interface. The one test of "does this address stay on the host", for the agent port,
    ``--http`` and the CLI's listen checks."""
    host = host.strip("[]")
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


class FailureThrottle:
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


class Admission:
    """Accepts sockets, runs the handshake under a cap and a timeout, and passes each
    authenticated connection to ``serve``. ``inventory`` and ``secrets`` are replaced by
    the hub on a reload; ``ha`` says whether the center fences (told in ``welcome``)."""

    def __init__(
        self,
        *,
        inventory: Mapping[str, Agent],
        secrets: Secrets,
        accept_undeclared: bool,
        heartbeat_s: float,
        handshake_timeout_s: float,
        ssl_context: ssl.SSLContext | None,
        ha: bool,
        max_frame: int,
        max_handshakes: int,
        serve: Callable[[Connection], Awaitable[None]],
        spawn: Callable[[Awaitable[Any]], asyncio.Task[Any]],
    ) -> None:
        self.inventory: dict[str, Agent] = dict(inventory)
        self.secrets = secrets
        self.accept_undeclared = accept_undeclared
        self.heartbeat_s = heartbeat_s
        self.handshake_timeout_s = handshake_timeout_s
        self.ssl_context = ssl_context
        self.ha = ha
        self.max_frame = max_frame
        self.max_handshakes = max_handshakes
        self._serve = serve
        self._spawn = spawn
        self._writers: set[asyncio.StreamWriter] = set()
        self._handshaking: dict[asyncio.StreamWriter, None] = {}  # oldest first
        self._throttle = FailureThrottle()
        self._own_uid = os.geteuid()

    def abort_all(self) -> None:
        """Drop every socket still open here (handshakes in progress too)."""
        for writer in list(self._writers):
            writer.transport.abort()

    def accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """The listening server's callback."""
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
    ) -> Connection | None:
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
                proof=proof, labels=labels, ha=self.ha,
            ).frame()
        )
        await writer.drain()
        running = await session.read(reader, self.max_frame)
        if not isinstance(running, Running):
            raise ProtocolError(f"expected running, got {running.TYPE}")
        return Connection(
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
