"""``cronfile agent``: one host's end of the agent channel.

The agent opens ONE connection to each center it is given (it never listens),
authenticates (:mod:`cronfile.transports.protocol`), and runs what it is sent with the local
executor, so a run on an agent behaves exactly like a run on the center's own host: same
process groups, timeouts, output tail and secret handling.

Several centers (``--center A:PORT,B:PORT``) are HA replicas (SPEC §9): each connection
has its own reconnect loop, heartbeat watch and session. Orders are fenced by term
(:mod:`cronfile.agent.terms` keeps the highest one seen): an order below it is refused,
logged, answered ``failed`` to its sender and reported as a ``stale_term`` frame to the
center that leads. Outcomes go to the center that says it leads with the highest term, and
the whole outbox is sent again whenever that center changes, so the outcome of a run the old
leader dispatched reaches the new one.

Durability, and why in this order:

* ``<state>/journal.jsonl``: every accepted run_id is appended and fsynced BEFORE its
  process starts. A run frame that arrives twice (the center re-sent it after a reconnect,
  or after its own restart) finds its run_id here and is not run again: the agent re-sends
  the outcome if it has it, or ``started`` if the run is still going.
* ``<state>/outbox.jsonl``: every outcome is appended and fsynced before it is sent; an
  ``ack`` from the center appends an ``acked`` line. Unacked outcomes are sent again after
  every reconnect, so nothing is lost while the center is away and the center
  deduplicates. At start the file is compacted to the unacked outcomes.
* Both logs use group commit: all lines waiting when a write begins share one fsync, so a
  burst of 500 runs costs a handful of fsyncs, not 500.
* A run that was accepted but has no outcome when the agent starts was cut short by the
  agent's own death; it is reported ``lost`` (its process, if it survived, is no longer
  watched), never silently forgotten.

The center going away does not touch running processes; the agent reconnects forever with
capped exponential backoff and full jitter (so a fleet does not reconnect in lockstep after
a center restart).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import getpass
import ipaddress
import json
import logging
import os
import random
import signal
import ssl
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cronfile import __version__
from cronfile.agent.terms import TermFileError, TermStore
from cronfile.schedules.model import RestartPolicy, RestartPolicyKind, RunStatus
from cronfile.schedules.policy import command_allowed
from cronfile.state.private import FILE_MODE, private_dir
from cronfile.transports.daemons import DaemonSupervisor
from cronfile.transports.executor import RunHandle, RunOutcome, RunRefused, RunRequest
from cronfile.transports.local import LocalExecutor
from cronfile.transports.peercred import loopback_peer_uid
from cronfile.transports.protocol import (
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
    SecretsError,
    Session,
    StaleTerm,
    Started,
    Transcript,
    Welcome,
    agent_proof,
    center_proof,
    load_secrets,
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
JOURNAL_KEEP = 100_000
"""Run ids kept in the journal across compactions (the dedupe memory of the agent): the
center only re-sends recent runs (after a reconnect or its own restart), never old ones."""
ACKED_KEEP = 10_000
"""Acked outcomes kept in memory, to answer a re-sent run with its outcome."""
COMPACT_OUTBOX_AFTER = 50_000
"""Outbox lines written before the outbox is rewritten to its unacked outcomes."""
SHUTDOWN_GRACE_S = 10.0


def _now() -> datetime:
    return datetime.now(UTC)


class CenterRefused(Exception):
    """The center refused this agent (the reason comes from the center)."""


class _GroupLog:
    """An append-only JSONL file where concurrent appends share one write and one fsync."""

    def __init__(self, path: Path) -> None:
        self.path = path
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
        # Unbuffered: a failed write (a full disk) must not leave bytes in a buffer that a
        # later write would flush after all (a journal line for a run that never ran).
        self._fh = os.fdopen(fd, "ab", buffering=0)
        self._pending: list[tuple[bytes, asyncio.Future[None]]] = []
        self._flusher: asyncio.Task[None] | None = None

    async def append(self, record: dict[str, Any]) -> None:
        """Append one record; returns once it is on disk."""
        await asyncio.shield(self.submit(record))

    def submit(self, record: dict[str, Any]) -> asyncio.Future[None]:
        """Queue one record for the next group commit; the future resolves when it is on
        disk. Callers that do not need to wait use this directly."""
        line = json.dumps(record, separators=(",", ":")).encode() + b"\n"
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        future.add_done_callback(_log_write_error)
        self._pending.append((line, future))
        if self._flusher is None:
            self._flusher = asyncio.ensure_future(self._flush())
        return future

    async def _flush(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                try:
                    await asyncio.to_thread(self._write, b"".join(line for line, _ in batch))
                except (OSError, ValueError) as exc:  # ValueError: the file was closed
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                for _, future in batch:
                    if not future.done():
                        future.set_result(None)
        finally:
            self._flusher = None

    def _write(self, data: bytes) -> None:
        fd = self._fh.fileno()
        size = os.fstat(fd).st_size
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        except OSError:
            # All or nothing: half a batch would be a torn line in the middle of the file.
            with contextlib.suppress(OSError):
                os.ftruncate(fd, size)
            raise

    @property
    def idle(self) -> bool:
        return self._flusher is None and not self._pending

    async def flush(self) -> None:
        """Wait until everything queued is on disk."""
        while self._flusher is not None:
            await asyncio.shield(self._flusher)

    def close(self) -> None:
        self._fh.close()


def _log_write_error(future: asyncio.Future[None]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.error("cannot write the agent's state: %s", future.exception())


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Every well-formed object of a JSONL file; a torn line (power loss) is skipped."""
    records = []
    try:
        with open(path, "rb") as fh:
            for raw in fh:
                try:
                    record = json.loads(raw)
                except ValueError:
                    continue
                if isinstance(record, dict):
                    records.append(record)
    except FileNotFoundError:
        pass
    return records


def _rewrite(path: Path, records: Sequence[dict[str, Any]]) -> None:
    """Replace a JSONL file atomically (write, fsync, rename, fsync the directory)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE), "wb") as fh:
        for record in records:
            fh.write(json.dumps(record, separators=(",", ":")).encode() + b"\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class AgentState:
    """The agent's journal of accepted runs and its outbox of unacked outcomes.

    ``journal.jsonl`` has a line when a run is accepted (``{"run_id", "ts", "job", ...}``)
    and another when its outcome is stored (``{"run_id", "done": true}``), so whether a run
    finished never depends on the outbox, which forgets acked outcomes when compacted.
    ``outbox.jsonl`` has ``{"finished": {...}}`` and ``{"acked": run_id}`` lines.
    """

    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir
        private_dir(state_dir)
        self.journal_path = self.dir / "journal.jsonl"
        self.outbox_path = self.dir / "outbox.jsonl"
        self.accepted: dict[str, bool] = {}  # run_id -> done, oldest first
        self.outbox: dict[str, Finished] = {}  # unacked, in the order they ended
        self.acked: dict[str, Finished] = {}  # recently acked, to answer a re-sent run
        self._load()
        self.journal = _GroupLog(self.journal_path)
        self.outbox_log = _GroupLog(self.outbox_path)
        self._outbox_lines = len(self.outbox)

    def _load(self) -> None:
        started: dict[str, datetime | None] = {}
        for record in _read_jsonl(self.journal_path):
            run_id = record.get("run_id")
            if not isinstance(run_id, str):
                continue
            if record.get("done") is True:
                self.accepted[run_id] = True
            else:
                self.accepted.setdefault(run_id, False)
                started[run_id] = _parse_time(record.get("ts"))
        finished: dict[str, Finished] = {}
        acked: set[str] = set()
        for record in _read_jsonl(self.outbox_path):
            if isinstance(record.get("acked"), str):
                acked.add(record["acked"])
            elif isinstance(record.get("finished"), dict):
                try:
                    msg = Finished.decode(json.dumps(record["finished"]).encode())
                except ProtocolError:
                    continue
                finished[msg.run_id] = msg
        for run_id in finished:
            self.accepted[run_id] = True
        # Accepted, never finished: the agent died during the run. Say so, never forget it.
        for run_id, done in self.accepted.items():
            if not done:
                now = _now()
                finished[run_id] = Finished(
                    run_id=run_id,
                    status=RunStatus.LOST.value,
                    started_at=started.get(run_id) or now,
                    finished_at=now,
                    reason="the agent stopped during the run; its process was not watched "
                    "to the end",
                )
                self.accepted[run_id] = True
                log.warning("run %s was cut short by an agent restart: reporting it lost",
                            run_id)
        self.outbox = {k: v for k, v in finished.items() if k not in acked}
        self.acked = {k: v for k, v in finished.items() if k in acked}
        while len(self.acked) > ACKED_KEEP:
            self.acked.pop(next(iter(self.acked)))
        self._compact_outbox()
        self._compact_journal(force=True)

    def _compact_outbox(self) -> None:
        _rewrite(self.outbox_path,
                 [{"v": 1, "finished": m.to_dict()} for m in self.outbox.values()])

    def _compact_journal(self, force: bool = False) -> None:
        if len(self.accepted) > JOURNAL_KEEP:
            for run_id in list(self.accepted)[: len(self.accepted) - JOURNAL_KEEP]:
                if self.accepted[run_id] and run_id not in self.outbox:
                    del self.accepted[run_id]
        elif not force:
            return
        _rewrite(self.journal_path,
                 [{"v": 1, "run_id": k, "done": True} if done else {"v": 1, "run_id": k}
                  for k, done in self.accepted.items()])

    def _idle(self) -> bool:
        return self.journal.idle and self.outbox_log.idle

    def maybe_compact(self) -> None:
        """Keep both files bounded while the agent runs (done between group commits)."""
        if not self._idle():
            return
        if len(self.accepted) > 2 * JOURNAL_KEEP:
            self.journal.close()
            self._compact_journal()
            self.journal = _GroupLog(self.journal_path)
        if self._outbox_lines > COMPACT_OUTBOX_AFTER:
            self.outbox_log.close()
            self._compact_outbox()
            self.outbox_log = _GroupLog(self.outbox_path)
            self._outbox_lines = len(self.outbox)

    def knows(self, run_id: str) -> bool:
        return run_id in self.accepted

    def reserve(self, run_id: str) -> None:
        """Mark a run accepted in memory, before any await, so a duplicate right behind it
        is recognised."""
        self.accepted[run_id] = False

    def forget(self, run_id: str) -> None:
        self.accepted.pop(run_id, None)

    async def accept(self, run: Run) -> None:
        """Journal a run as accepted (durably) before it starts."""
        self.accepted[run.run_id] = False
        await self.journal.append(
            {
                "v": 1,
                "ts": _now().isoformat(),
                "run_id": run.run_id,
                "job": run.job,
                "scheduled_at": run.scheduled_at.isoformat() if run.scheduled_at else None,
                "attempt": run.attempt,
            }
        )

    async def store(self, msg: Finished) -> None:
        """Keep an outcome until it is acked: outbox first, then the journal's done mark."""
        self.outbox[msg.run_id] = msg
        self._outbox_lines += 1
        await self.outbox_log.append({"v": 1, "ts": _now().isoformat(), "finished": msg.to_dict()})
        self.accepted[msg.run_id] = True
        await self.journal.append({"v": 1, "run_id": msg.run_id, "done": True})

    def ack(self, run_id: str) -> None:
        msg = self.outbox.pop(run_id, None)
        if msg is None:
            return
        self.acked[run_id] = msg
        while len(self.acked) > ACKED_KEEP:
            self.acked.pop(next(iter(self.acked)))
        # Nobody waits for an ack to be durable: a lost ack means one more delivery, which
        # the center deduplicates. Waiting would put one fsync per ack in the read loop.
        self._outbox_lines += 1
        self.outbox_log.submit({"v": 1, "ts": _now().isoformat(), "acked": run_id})
        self.maybe_compact()

    def outcome_of(self, run_id: str) -> Finished | None:
        return self.outbox.get(run_id) or self.acked.get(run_id)

    async def aclose(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(
                asyncio.gather(self.journal.flush(), self.outbox_log.flush()), 5)
        self.close()

    def close(self) -> None:
        self.journal.close()
        self.outbox_log.close()


def _parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        return None


def _secret_for(secrets: Secrets, name: str) -> bytes | None:
    """The agent's own secret from a token file in any of the formats the center reads."""
    return secrets.for_agent(name)


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


Order = Run | Cancel | Daemons


class _CenterLink:
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


class Agent:
    """The running agent: its connections (one per center), its runs and its daemons."""

    def __init__(
        self,
        center: str | Sequence[str],
        name: str,
        secret: bytes | None,
        state_dir: Path,
        *,
        ssl_context: ssl.SSLContext | None = None,
        allow_run_as: Sequence[str] | None = None,
        allow_command_prefixes: Sequence[str] | None = None,
        labels: dict[str, str] | None = None,
        backoff_initial_s: float = BACKOFF_INITIAL_S,
        backoff_max_s: float = BACKOFF_MAX_S,
    ) -> None:
        self.links = [_CenterLink(host, port) for host, port in parse_centers(center)]
        self.name = name
        self.secret = secret
        self.ssl_context = ssl_context
        self.own_user = getpass.getuser()
        self.allow_run_as = set(allow_run_as) if allow_run_as else {self.own_user}
        # None: any program; else argv[0] must start with one of these (no shell strings).
        self.allow_command_prefixes = tuple(allow_command_prefixes or ()) or None
        self.labels = dict(labels or {})
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.terms = TermStore(state_dir)  # before the state: a bad term file stops us first
        self.state = AgentState(state_dir)
        self.executor = LocalExecutor(state_dir=state_dir)
        self.running: dict[str, RunHandle] = {}
        self.inflight: set[str] = set()  # accepted, outcome not stored yet
        self._cancels: dict[str, Cancel] = {}
        self._target: _CenterLink | None = None  # where outcomes go now
        self._term_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stopping = asyncio.Event()
        self.daemons = _Daemons(self)

    # --- the connections ---------------------------------------------------------------

    async def run_until_stopped(self) -> int:
        await asyncio.gather(*(self._keep_connected(link) for link in self.links))
        await self._shutdown()
        return 0

    async def _keep_connected(self, link: _CenterLink) -> None:
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

    def stop(self) -> None:
        self._stopping.set()

    async def _connect_once(self, link: _CenterLink) -> float:
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
            self._retarget()
        return time.monotonic() - welcomed_at

    async def _abort_on_stop(self, writer: asyncio.StreamWriter) -> None:
        await self._stopping.wait()
        writer.transport.abort()

    async def _abort_on_silence(self, link: _CenterLink, writer: asyncio.StreamWriter,
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
        writer.write(session.frame(Running(run_ids=tuple(sorted(self.inflight)))))
        await writer.drain()
        return msg, session

    async def _session(self, link: _CenterLink, reader: asyncio.StreamReader) -> None:
        session = link.channel
        if not link.ha:
            self._retarget()  # an HA center's role frame, next, says whether it leads
        await self._send(DaemonStatus(daemons=self.daemons.states()), link)
        while not self._stopping.is_set():
            msg = await session.read(reader)
            link.last_rx = time.monotonic()
            await self._handle(link, msg)

    async def _send(self, msg: Message, link: _CenterLink | None = None) -> None:
        """Send to ``link`` (default: the center outcomes go to) if it is up; an outcome
        not sent now stays in the outbox for later."""
        link = link or self._target
        writer = link.writer if link is not None else None
        if link is None or writer is None:
            return
        try:
            writer.write(link.channel.frame(msg))
            await writer.drain()
        except (ConnectionError, OSError, RuntimeError):
            writer.transport.abort()

    async def _send_all(self, msg: Message) -> None:
        """Send to every center that is up (what they all show: the daemons' states)."""
        for link in self.links:
            if link.up:
                await self._send(msg, link)

    def _retarget(self) -> None:
        """Outcomes go to the center that leads with the highest term (or the one center
        without HA); when that changes, the new one gets the whole outbox, so a new leader
        receives the outcomes of runs the old one dispatched."""
        ranked = [(rank, i) for i, link in enumerate(self.links)
                  if (rank := link.outcome_rank(self.terms.highest)) is not None]
        target = self.links[max(ranked)[1]] if ranked else None
        if target is self._target:
            return
        self._target = target
        if target is not None:
            if len(self.links) > 1:
                log.info("outcomes go to the center at %s", target.label)
            self._spawn(self._send_outbox(target))

    async def _send_outbox(self, link: _CenterLink) -> None:
        for pending in list(self.state.outbox.values()):
            if self._target is not link:
                return  # another center took over meanwhile: it gets the outbox itself
            await self._send(pending, link)

    async def _handle(self, link: _CenterLink, msg: Message) -> None:
        if isinstance(msg, Run):
            if await self._fenced(link, msg):
                self._on_run(link, msg)
        elif isinstance(msg, Ack):
            self.state.ack(msg.run_id)
        elif isinstance(msg, Ping):
            await self._send(Pong(seq=msg.seq), link)
        elif isinstance(msg, Pong):
            pass
        elif isinstance(msg, Cancel):
            if await self._fenced(link, msg):
                self._on_cancel(link, msg)
        elif isinstance(msg, Daemons):
            if await self._fenced(link, msg):
                self._spawn(self.daemons.apply(msg))
        elif isinstance(msg, Role):
            await self._on_role(link, msg)
        else:
            raise ProtocolError(f"unexpected {msg.TYPE} message from the center")

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # --- fencing -----------------------------------------------------------------------

    async def _raise_term(self, term: int) -> None:
        """Persist a higher term before anything acts on it (caller holds the lock)."""
        if term > self.terms.highest:
            await asyncio.to_thread(self.terms.raise_to, term)
            log.info("highest term seen is now %d", term)
            self._retarget()  # a center leading with a lower term is stale now

    async def _on_role(self, link: _CenterLink, msg: Role) -> None:
        if msg.term is not None:
            async with self._term_lock:
                try:
                    await self._raise_term(msg.term)
                except OSError as exc:
                    log.error("cannot persist term %d (%s)", msg.term, exc)
        link.role = msg
        log.info("the center at %s %s (term %s)", link.label,
                 "leads" if msg.leading else "stands by", msg.term)
        self._retarget()

    async def _fenced(self, link: _CenterLink, order: Order) -> bool:
        """True when ``order`` may be carried out: its term is at least the highest seen
        (a higher one is made durable first), or it comes without a term from a center
        that never announced HA. Otherwise it is refused: nothing happens, the agent logs
        it and reports it (the center that leads records the event), and a refused run
        gets a ``failed`` outcome from its sender, as any run this agent refuses."""
        if order.term is None and not link.ha:
            return True
        async with self._term_lock:
            highest = self.terms.highest
            if order.term is not None and order.term >= highest:
                try:
                    await self._raise_term(order.term)
                except OSError as exc:
                    log.error("cannot persist term %d (%s): refusing the %s order",
                              order.term, exc, order.TYPE)
                    await self._answer_refused_run(
                        link, order, f"agent {self.name} cannot persist the term "
                        f"({exc.strerror or exc}): not run")
                    return False
                return True
        await self._refuse_stale(link, order, highest)
        return False

    async def _refuse_stale(self, link: _CenterLink, order: Order, highest: int) -> None:
        run_id = order.run_id if isinstance(order, Run | Cancel) else None
        job = order.job if isinstance(order, Run) else None
        offered = "no term" if order.term is None else f"term {order.term}"
        log.warning("refused a %s order%s from the center at %s: it carries %s, below the "
                    "highest term seen (%d); a stale leader, nothing done", order.TYPE,
                    f" (run {run_id})" if run_id else "", link.label, offered, highest)
        await self._answer_refused_run(
            link, order, f"stale term: the order carries {offered}; agent {self.name} has "
            f"seen term {highest}: not run")
        report = StaleTerm(order=order.TYPE, highest_term=highest, term=order.term,
                           center=link.label, run_id=run_id, job=job)
        target = self._target
        await self._send(report, target if target is not None and target.ha else link)

    async def _answer_refused_run(self, link: _CenterLink, order: Order, reason: str) -> None:
        """A refused run's sender gets its final outcome, ``failed`` with the reason (not
        kept in the outbox: it belongs to that center alone, and if the same run_id comes
        from the real leader it must still run). A run_id this agent already accepted is
        left alone: its real outcome exists or will."""
        if isinstance(order, Run) and not self.state.knows(order.run_id):
            now = _now()
            await self._send(Finished.from_outcome(
                order.run_id, RunOutcome(RunStatus.FAILED, now, now, reason=reason)), link)

    # --- runs --------------------------------------------------------------------------

    def _on_run(self, link: _CenterLink, msg: Run) -> None:
        run_id = msg.run_id
        if self.state.knows(run_id):
            known = self.state.outcome_of(run_id)
            handle = self.running.get(run_id)
            if known is not None:
                self._spawn(self._send(known, link))
            elif handle is not None:
                self._spawn(self._send(Started(run_id=run_id, started_at=handle.started_at,
                                               pid=handle.pid), link))
            else:
                log.info("run %s was already accepted: not running it again", run_id)
            return
        self.inflight.add(run_id)
        self.state.reserve(run_id)
        self._spawn(self._execute(link, msg))

    def refusal_for_user(self, run_as: str | None) -> str | None:
        """Why a run (or daemon) as ``run_as`` may not start here, or None.

        A run without ``run_as`` runs as the agent's own user, so the allowlist covers it
        too: an agent started as root with ``--allow-run-as nobody`` runs nothing as root.
        """
        if run_as is None:
            if self.own_user not in self.allow_run_as:
                return (f"no run_as: the run would run as {self.own_user}, which is not "
                        "allowed on this agent (--allow-run-as)")
            return None
        if run_as not in self.allow_run_as:
            return f"run_as {run_as} not allowed on this agent"
        return None

    def refusal(self, command: tuple[str, ...] | str, run_as: str | None) -> str | None:
        """Why this agent's own limits refuse a run or a daemon (None: allowed): the user
        (:meth:`refusal_for_user`) and the program (``--allow-command-prefix``). Checked
        whatever the revision says: a policy is reviewed in git, these flags are set on
        the host, and no revision can lift them."""
        refusal = self.refusal_for_user(run_as)
        if refusal is not None:
            return refusal
        prefixes = self.allow_command_prefixes
        if prefixes is not None:
            if isinstance(command, str):
                return ("a shell command is not allowed on this agent "
                        "(--allow-command-prefix is set)")
            if not command_allowed(command[0], prefixes):
                return f"command {command[0]} not allowed on this agent"
        return None

    def _refusal(self, msg: Run) -> str | None:
        return self.refusal(msg.command, msg.run_as)


    async def _execute(self, link: _CenterLink, msg: Run) -> None:
        run_id = msg.run_id
        try:
            await self.state.accept(msg)
        except OSError as exc:
            # Not journaled means we could not guarantee "once": do not run it, and say so
            # (not stored: there is no room; if this is lost, the center's lease decides).
            self.inflight.discard(run_id)
            self.state.forget(run_id)
            log.error("cannot journal run %s (%s): not running it", run_id, exc)
            now = _now()
            await self._send(Finished.from_outcome(run_id, RunOutcome(
                RunStatus.FAILED, now, now,
                reason=f"agent {self.name} cannot journal the run ({exc.strerror or exc}): not run")),
                link)
            return
        try:
            outcome = await self._run(link, msg)
        except Exception as exc:  # an executor bug must still end in an outcome
            log.exception("run %s failed inside the agent", run_id)
            now = _now()
            outcome = RunOutcome(RunStatus.FAILED, now, now, reason=f"agent error: {exc!r}")
        finished = Finished.from_outcome(run_id, outcome)
        try:
            await self.state.store(finished)
        except OSError as exc:
            log.error("cannot store the outcome of run %s (%s); sending it anyway", run_id, exc)
        self.inflight.discard(run_id)
        await self._send(finished)

    async def _run(self, link: _CenterLink, msg: Run) -> RunOutcome:
        refusal = self._refusal(msg)
        cancel = self._cancels.pop(msg.run_id, None)
        if refusal is not None or cancel is not None:
            now = _now()
            if refusal is not None:
                return RunOutcome(RunStatus.FAILED, now, now, reason=refusal)
            return RunOutcome(RunStatus.KILLED, now, now, reason=cancel.reason if cancel else None)
        try:
            handle = await self.executor.start(msg.to_request())
        except RunRefused as exc:
            now = _now()
            return RunOutcome(RunStatus.FAILED, now, now, reason=str(exc))
        self.running[msg.run_id] = handle
        try:
            await self._send(Started(run_id=msg.run_id, started_at=handle.started_at,
                                     pid=handle.pid), link)
            late_cancel = self._cancels.pop(msg.run_id, None)
            if late_cancel is not None:
                self._spawn(handle.stop(late_cancel.reason, late_cancel.grace_s))
            return await handle.wait()
        finally:
            self.running.pop(msg.run_id, None)

    def _on_cancel(self, link: _CenterLink, msg: Cancel) -> None:
        handle = self.running.get(msg.run_id)
        if handle is not None:
            self._spawn(handle.stop(msg.reason, msg.grace_s))
        elif msg.run_id in self.inflight:
            self._cancels[msg.run_id] = msg  # still starting: applied right after the start
        else:
            known = self.state.outcome_of(msg.run_id)
            if known is not None:
                self._spawn(self._send(known, link))

    # --- shutdown ----------------------------------------------------------------------

    async def _shutdown(self) -> None:
        """Stop runs and daemons (bounded), store their outcomes, close the logs."""
        log.info("agent stopping: %d run(s) to stop", len(self.running))
        stops = [h.stop("agent shutting down", None) for h in self.running.values()]
        stops.append(self.daemons.stop_all())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*stops, return_exceptions=True),
                                   SHUTDOWN_GRACE_S + 5)
        # Let the run tasks store their outcomes in the outbox.
        pending = [t for t in self._tasks if not t.done()]
        if pending:
            await asyncio.wait(pending, timeout=5)
        for task in self._tasks:
            task.cancel()
        await self.state.aclose()


class _Daemons:
    """The agent's daemons: converges to each ``daemons`` message, reports their state.

    The center sends the COMPLETE desired set (on every change and every reconnect), so
    applying it is idempotent: a spec equal to the running one is left alone, a changed one
    is stopped and started again, a missing one is stopped. A daemon whose ``run_as`` is
    not allowed here is not started and is reported ``refused``.
    """

    POLL_S = 1.0

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.specs: dict[str, DaemonSpec] = {}
        self.supervisors: dict[str, DaemonSupervisor] = {}
        self.refused: dict[str, str] = {}
        self.since: dict[str, datetime] = {}
        self._lock = asyncio.Lock()
        self._last_sent: tuple[DaemonState, ...] | None = None
        self._watcher: asyncio.Task[None] | None = None

    async def apply(self, msg: Daemons) -> None:
        async with self._lock:
            desired = {spec.name: spec for spec in msg.daemons if spec.replicas > 0}
            for name in list(self.specs):
                if name not in desired or desired[name] != self.specs[name]:
                    await self._stop(name, "daemon removed" if name not in desired
                                     else "daemon changed")
            for name, spec in desired.items():
                if name not in self.specs:
                    self._start(spec)
        if self._watcher is None:
            self._watcher = asyncio.ensure_future(self._watch())
        await self.report(force=True)

    def _start(self, spec: DaemonSpec) -> None:
        self.specs[spec.name] = spec
        self.since[spec.name] = _now()
        refusal = self.agent.refusal(spec.command, spec.run_as)
        if refusal is not None:
            self.refused[spec.name] = refusal
            log.warning("daemon %s: %s", spec.name, refusal)
            return
        request = RunRequest(
            run_id=f"daemon-{spec.name}",
            job=spec.name,
            command=spec.command,
            env=tuple((e.name, e.to_env_value()) for e in spec.env),
            workdir=spec.workdir,
            run_as=spec.run_as,
            kill_grace_s=spec.kill_grace_s,
            output_keep=spec.output_keep,
        )
        restart = RestartPolicy(
            policy=RestartPolicyKind(spec.restart_policy),
            backoff_s=spec.backoff_s,
            max_backoff_s=spec.max_backoff_s,
        )
        supervisor = DaemonSupervisor(
            self.agent.executor, request, replicas=spec.replicas, restart=restart,
            on_exit=functools.partial(self._on_exit, spec.name),
        )
        self.supervisors[spec.name] = supervisor
        log.info("daemon %s: starting %d replica(s)", spec.name, spec.replicas)
        self.agent._spawn(supervisor.start())

    def _on_exit(self, name: str, index: int, outcome: RunOutcome) -> None:
        log.info("daemon %s[%d] exited: %s%s", name, index, outcome.status.value,
                 f" ({outcome.reason})" if outcome.reason else "")

    async def _stop(self, name: str, reason: str) -> None:
        spec = self.specs.pop(name)
        self.refused.pop(name, None)
        self.since.pop(name, None)
        supervisor = self.supervisors.pop(name, None)
        if supervisor is not None:
            log.info("daemon %s: stopping (%s)", name, reason)
            await supervisor.stop(spec.kill_grace_s, reason)

    def states(self) -> tuple[DaemonState, ...]:
        result: list[DaemonState] = []
        for name in sorted(self.specs):
            if name in self.refused:
                result.append(DaemonState(name=name, replica=0, state="refused",
                                          since=self.since.get(name),
                                          reason=self.refused[name]))
                continue
            for replica in self.supervisors[name].status():
                last = replica.last_outcome
                result.append(DaemonState(
                    name=name,
                    replica=replica.index,
                    state=replica.state.value,
                    pid=replica.pid,
                    restarts=replica.restarts,
                    last_exit_code=last.exit_code if last else None,
                    last_signal=last.signal if last else None,
                    since=self.since.get(name),
                    reason=last.reason if last else None,
                ))
        return tuple(result)

    async def report(self, force: bool = False) -> None:
        states = self.states()
        if force or states != self._last_sent:
            self._last_sent = states
            await self.agent._send_all(DaemonStatus(daemons=states))

    async def _watch(self) -> None:
        # Replica state changes (crash, backoff, restart) have no single callback that
        # sees the new state, so a cheap poll sends the status whenever it changed.
        while True:
            await asyncio.sleep(self.POLL_S)
            with contextlib.suppress(Exception):
                await self.report()

    async def stop_all(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
        async with self._lock:
            await asyncio.gather(*(self._stop(name, "agent shutting down")
                                   for name in list(self.specs)), return_exceptions=True)


def _ssl_context(tls_ca: Path | None, tls_cert: Path | None, tls_key: Path | None
                 ) -> ssl.SSLContext | None:
    if tls_ca is None and tls_cert is None:
        return None
    context = ssl.create_default_context(cafile=str(tls_ca) if tls_ca else None)
    if tls_cert is not None:
        context.load_cert_chain(str(tls_cert), str(tls_key) if tls_key else None)
    return context


async def run_agent(
    center: str | Sequence[str],
    name: str,
    token_file: Path | None,
    state_dir: Path,
    tls_ca: Path | None = None,
    allow_run_as: list[str] | None = None,
    labels: dict[str, str] | None = None,
    *,
    allow_command_prefixes: list[str] | None = None,
    tls_cert: Path | None = None,
    tls_key: Path | None = None,
    backoff_max_s: float = BACKOFF_MAX_S,
) -> int:
    """Run the agent until SIGTERM/SIGINT; the exit code (0 stopped, 2 bad configuration)."""
    secret: bytes | None = None
    if token_file is not None:
        try:
            secret = _secret_for(load_secrets(token_file), name)
        except SecretsError as exc:
            log.error("%s", exc)
            return 2
        if secret is None:
            log.error("%s holds no secret for agent %s", token_file, name)
            return 2
    try:
        context = _ssl_context(tls_ca, tls_cert, tls_key)
        agent = Agent(center, name, secret, state_dir, ssl_context=context,
                      allow_run_as=allow_run_as, allow_command_prefixes=allow_command_prefixes,
                      labels=labels, backoff_max_s=backoff_max_s)
    except (ValueError, OSError, ssl.SSLError, TermFileError) as exc:
        log.error("%s", exc)
        return 2
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, agent.stop)
    try:
        return await agent.run_until_stopped()
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)

