"""The agent's connections: one per center, each with its own reconnect loop (capped
exponential backoff, full jitter), handshake, heartbeat watch and session keys; and where
outcomes go (the center that leads with the highest term, or the one center without HA).

:class:`CenterLinks` knows nothing of runs: every frame a center sends goes to the
``on_message`` callback it was given (the agent's), and it reads the outbox, the runs in
flight and the daemons' states through the objects and callables it was given.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import random
import ssl
import time
from collections.abc import Awaitable, Callable, Collection, Sequence
from typing import Any

from cronfile import __version__
from cronfile.agent.outbox import AgentState
from cronfile.agent.terms import TermStore
from cronfile.transports.peercred import loopback_peer_uid
from cronfile.transports.protocol import (
    Challenge,
    DaemonState,
    DaemonStatus,
    Hello,
    Message,
    ProtocolError,
    Refused,
    Response,
    Role,
    Running,
    Session,
    Transcript,
    Welcome,
    agent_proof,
    center_proof,
    new_nonce,
    proofs_equal,
    read_frame,
)

log = logging.getLogger("cronfile.agent")

BACKOFF_INITIAL_S = 0.5
BACKOFF_MAX_S = 30.0
CONNECT_TIMEOUT_S = 10.0
STABLE_CONNECTION_S = 10.0
"""A connection that lasted this long resets the reconnect backoff."""
REFUSED_BACKOFF_MAX_S = 300.0
"""A refusal (bad token, undeclared name) is a configuration problem that retrying will
not fix by itself: back off up to five minutes, not hammer the center every few seconds."""


def reconnect_delay(attempt: int, refused: int, initial_s: float, max_s: float,
                    rng: random.Random | None = None) -> float:
    """How long to wait before the next connection attempt.

    ``attempt`` failures in a row: full jitter up to ``initial_s * 2**attempt`` (capped at
    ``max_s``), so a fleet reconnecting to a restarted center spreads out. ``refused``
    refusals in a row: at least half of ``initial_s * 2**refused`` (capped at
    :data:`REFUSED_BACKOFF_MAX_S`), doubling each time; jitter can never bring a refused
    agent back at a fast pace."""
    rng = rng or random.Random()
    if refused:
        cap = min(REFUSED_BACKOFF_MAX_S, max(initial_s, 0.1) * 2 ** min(refused, 30))
        return rng.uniform(cap / 2, cap)
    return rng.uniform(0, min(max_s, initial_s * 2 ** min(attempt, 30)))

class CenterRefused(Exception):
    """The center refused this agent (the reason comes from the center)."""


def _untrusted_token_less_center(writer: asyncio.StreamWriter) -> str | None:
    """Without a secret nothing proves who the center is, so take runs only from a center
    on loopback that runs as this agent's user or root (another local user could listen on
    the port while the real center is down and have us run its commands)."""
    peer = writer.get_extra_info("peername")
    local = writer.get_extra_info("sockname")
    if not peer or not local or not ipaddress.ip_address(peer[0]).is_loopback:
        return "without --token-file the agent only connects to a center on loopback"
    uid = loopback_peer_uid(peer, local)
    if uid is None or uid not in (0, os.geteuid()):
        who = "an unknown user" if uid is None else f"uid {uid}"
        return (f"the center at {peer[0]}:{peer[1]} runs as {who}, not as this agent's "
                "user or root; without --token-file that center cannot be trusted")
    return None


def parse_center(center: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6) to a pair; ValueError when malformed."""
    host, sep, port = center.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"--center must be HOST:PORT, got {center!r}")
    return host.strip("[]"), int(port)


def parse_centers(centers: str | Sequence[str]) -> list[tuple[str, int]]:
    """``A:PORT,B:PORT,...`` (or a list of them) to pairs, in order, each once; ValueError
    naming the bad one."""
    items = centers.split(",") if isinstance(centers, str) else list(centers)
    pairs: list[tuple[str, int]] = []
    for item in items:
        pair = parse_center(item.strip())
        if pair in pairs:
            raise ValueError(f"--center lists {item.strip()} twice")
        pairs.append(pair)
    if not pairs:
        raise ValueError("--center needs at least one HOST:PORT")
    return pairs



class CenterLink:
    """The agent's connection to ONE center (it keeps one per ``--center`` address, each
    with its own reconnect loop, heartbeat watch and session keys)."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.label = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.writer: asyncio.StreamWriter | None = None
        self.channel = Session()
        self.last_rx = time.monotonic()
        self.ha = False
        """The center announced ``--ha``: its orders must carry a term."""
        self.role: Role | None = None
        """Its last sealed ``role`` frame on this connection (HA centers only)."""

    @property
    def up(self) -> bool:
        return self.writer is not None

    def outcome_rank(self, highest_term: int) -> int | None:
        """Where outcomes may go: a center without HA ranks -1, an HA center that says it
        leads ranks by its term; None: not now (down, standing by, role not yet known, or
        leading with a term below the highest seen: a stale leader)."""
        if self.writer is None:
            return None
        if not self.ha:
            return -1
        if self.role is None or not self.role.leading:
            return None
        term = self.role.term or 0
        return term if term >= highest_term else None


class CenterLinks:
    """The agent's connections to its centers, and the one outcomes go to (``target``)."""

    def __init__(
        self,
        centers: str | Sequence[str],
        *,
        name: str,
        secret: bytes | None,
        ssl_context: ssl.SSLContext | None,
        labels: dict[str, str],
        backoff_initial_s: float,
        backoff_max_s: float,
        state: AgentState,
        terms: TermStore,
        inflight: Callable[[], Collection[str]],
        daemon_states: Callable[[], tuple[DaemonState, ...]],
        on_message: Callable[[CenterLink, Message], Awaitable[None]],
        spawn: Callable[[Any], asyncio.Task[Any]],
        stopping: asyncio.Event,
    ) -> None:
        self.links = [CenterLink(host, port) for host, port in parse_centers(centers)]
        self.name = name
        self.secret = secret
        self.ssl_context = ssl_context
        self.labels = labels
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.state = state
        self.terms = terms
        self._inflight = inflight
        self._daemon_states = daemon_states
        self._on_message = on_message
        self._spawn = spawn
        self._stopping = stopping
        self.target: CenterLink | None = None  # where outcomes go now

    async def run(self) -> None:
        """Keep every connection up until the agent stops."""
        await asyncio.gather(*(self._keep_connected(link) for link in self.links))

    async def _keep_connected(self, link: CenterLink) -> None:
        """Connect to one center and reconnect forever, with this link's own backoff."""
        attempt = refused = 0
        while not self._stopping.is_set():
            connected_for = 0.0
            was_refused = False
            try:
                connected_for = await self._connect_once(link)
            except CenterRefused as exc:
                was_refused = True
                log.error("the center at %s refused this agent: %s", link.label, exc)
            except ProtocolError as exc:
                log.warning("protocol error talking to the center at %s: %s", link.label, exc)
            except (OSError, asyncio.IncompleteReadError, TimeoutError) as exc:
                log.info("no connection to the center at %s (%s)", link.label,
                         exc.__class__.__name__ if not str(exc) else exc)
            if connected_for >= STABLE_CONNECTION_S:
                attempt = 0  # a center that welcomes and drops us at once still backs off
            refused = refused + 1 if was_refused else 0
            if self._stopping.is_set():
                break
            delay = reconnect_delay(attempt, refused, self.backoff_initial_s, self.backoff_max_s)
            if refused:
                log.info("trying %s again in %.0fs", link.label, delay)
            attempt = min(attempt + 1, 30)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)

    async def _connect_once(self, link: CenterLink) -> float:
        """One connection from open to close; how long it was up after the welcome."""
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(
                link.host, link.port, ssl=self.ssl_context,
                server_hostname=link.host if self.ssl_context else None,
            ),
            CONNECT_TIMEOUT_S,
        )
        try:
            if self.secret is None:
                refusal = _untrusted_token_less_center(writer)
                if refusal is not None:
                    raise CenterRefused(refusal)
            welcome, session = await asyncio.wait_for(self._handshake(reader, writer),
                                                      CONNECT_TIMEOUT_S)
        except BaseException:
            writer.transport.abort()
            raise
        log.info("connected to the center at %s as %s%s", link.label, self.name,
                 " (HA: orders must carry a term)" if welcome.ha else "")
        # The session ends when the connection does. Stopping and silence both end it by
        # aborting the transport, never by cancelling the reader: Python 3.11's wait_for
        # can swallow a cancellation that races with a frame arriving, and an agent that
        # lost its SIGTERM that way would hang until the next heartbeat timeout.
        silence = 3 * max(welcome.heartbeat_s, 0.1)
        welcomed_at = time.monotonic()
        link.channel, link.ha, link.role = session, welcome.ha, None
        link.writer = writer
        link.last_rx = time.monotonic()
        guards = [
            asyncio.ensure_future(self._abort_on_stop(writer)),
            asyncio.ensure_future(self._abort_on_silence(link, writer, silence)),
        ]
        try:
            await self._session(link, reader)
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            if not self._stopping.is_set():
                log.info("connection to the center at %s lost (%s)", link.label,
                         exc.__class__.__name__)
        finally:
            link.writer, link.role = None, None
            writer.transport.abort()
            for guard in guards:
                guard.cancel()
            self.retarget()
        return time.monotonic() - welcomed_at

    async def _abort_on_stop(self, writer: asyncio.StreamWriter) -> None:
        await self._stopping.wait()
        writer.transport.abort()

    async def _abort_on_silence(self, link: CenterLink, writer: asyncio.StreamWriter,
                                silence: float) -> None:
        # Half-open links: a center that vanished without a FIN never makes read() fail.
        while True:
            await asyncio.sleep(silence / 3)
            if time.monotonic() - link.last_rx > silence:
                log.warning("the center at %s was silent for %.0fs: reconnecting",
                            link.label, silence)
                writer.transport.abort()
                return

    async def _handshake(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> tuple[Welcome, Session]:
        nonce = new_nonce()
        hello = Hello(
            agent=self.name,
            version=__version__,
            nonce=nonce,
            labels=self.labels,
            pending_outcomes=len(self.state.outbox),
            terms=True,
        )
        hello_body = hello.encode()
        writer.write(hello.frame())
        await writer.drain()
        try:
            msg = await read_frame(reader)
        except asyncio.IncompleteReadError:
            raise CenterRefused(
                "the center closed the connection after our hello (an older center that "
                "does not speak this agent's protocol version?)"
            ) from None
        session = Session()
        if isinstance(msg, Challenge):
            if self.secret is None:
                raise CenterRefused("the center requires a token; give the agent --token-file")
            transcript = Transcript(hello, hello_body, msg.nonce)
            writer.write(Response(mac=agent_proof(self.secret, transcript)).frame())
            await writer.drain()
            msg = await read_frame(reader)
            if isinstance(msg, Welcome):
                # Without this an impostor could skip the challenge and send us runs.
                expected = center_proof(self.secret, transcript)
                if not proofs_equal(expected, msg.proof):
                    raise ProtocolError("the center could not prove it knows the token")
                session = Session.of_agent(self.secret, transcript)
        if isinstance(msg, Refused):
            raise CenterRefused(msg.reason)
        if not isinstance(msg, Welcome):
            raise ProtocolError(f"expected welcome, got {msg.TYPE}")
        if self.secret is not None and not session.sealed:
            raise ProtocolError("the center did not authenticate; not accepting runs")
        writer.write(session.frame(Running(run_ids=tuple(sorted(self._inflight())))))
        await writer.drain()
        return msg, session

    async def _session(self, link: CenterLink, reader: asyncio.StreamReader) -> None:
        session = link.channel
        if not link.ha:
            self.retarget()  # an HA center's role frame, next, says whether it leads
        await self.send(DaemonStatus(daemons=self._daemon_states()), link)
        while not self._stopping.is_set():
            msg = await session.read(reader)
            link.last_rx = time.monotonic()
            await self._on_message(link, msg)

    async def send(self, msg: Message, link: CenterLink | None = None) -> None:
        """Send to ``link`` (default: the center outcomes go to) if it is up; an outcome
        not sent now stays in the outbox for later."""
        link = link or self.target
        writer = link.writer if link is not None else None
        if link is None or writer is None:
            return
        try:
            writer.write(link.channel.frame(msg))
            await writer.drain()
        except (ConnectionError, OSError, RuntimeError):
            writer.transport.abort()

    async def send_all(self, msg: Message) -> None:
        """Send to every center that is up (what they all show: the daemons' states)."""
        for link in self.links:
            if link.up:
                await self.send(msg, link)

    def retarget(self) -> None:
        """Outcomes go to the center that leads with the highest term (or the one center
        without HA); when that changes, the new one gets the whole outbox, so a new leader
        receives the outcomes of runs the old one dispatched."""
        ranked = [(rank, i) for i, link in enumerate(self.links)
                  if (rank := link.outcome_rank(self.terms.highest)) is not None]
        target = self.links[max(ranked)[1]] if ranked else None
        if target is self.target:
            return
        self.target = target
        if target is not None:
            if len(self.links) > 1:
                log.info("outcomes go to the center at %s", target.label)
            self._spawn(self._send_outbox(target))

    async def _send_outbox(self, link: CenterLink) -> None:
        for pending in list(self.state.outbox.values()):
            if self.target is not link:
                return  # another center took over meanwhile: it gets the outbox itself
            await self.send(pending, link)
