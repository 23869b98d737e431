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

The agent is three parts wired here: :mod:`cronfile.agent.links` (one connection per
center: reconnect, backoff, handshake, heartbeat watch, where outcomes go),
:mod:`cronfile.agent.execution` (the term fence, runs, cancels, allowlists) and
:mod:`cronfile.agent.outbox` (the journal and the outbox); daemons are in this module.

The center going away does not touch running processes; the agent reconnects forever with
capped exponential backoff and full jitter (so a fleet does not reconnect in lockstep after
a center restart).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import getpass
import logging
import signal
import ssl
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cronfile.agent.execution import OrderExecution
from cronfile.agent.links import (
    BACKOFF_INITIAL_S,
    BACKOFF_MAX_S,
    REFUSED_BACKOFF_MAX_S,
    CenterLink,
    CenterLinks,
    CenterRefused,
    parse_center,
    parse_centers,
    reconnect_delay,
)
from cronfile.agent.outbox import AgentState
from cronfile.agent.terms import TermFileError, TermStore
from cronfile.schedules.model import RestartPolicy, RestartPolicyKind
from cronfile.transports.daemons import DaemonSupervisor
from cronfile.transports.executor import RunOutcome, RunRequest
from cronfile.transports.local import LocalExecutor
from cronfile.transports.protocol import (
    Ack,
    Cancel,
    Daemons,
    DaemonSpec,
    DaemonState,
    DaemonStatus,
    Message,
    Ping,
    Pong,
    ProtocolError,
    Role,
    Run,
    Secrets,
    SecretsError,
    load_secrets,
)

__all__ = ["BACKOFF_MAX_S", "REFUSED_BACKOFF_MAX_S", "Agent", "AgentState", "CenterRefused",
           "parse_center", "parse_centers", "reconnect_delay", "run_agent"]

log = logging.getLogger("cronfile.agent")

SHUTDOWN_GRACE_S = 10.0


def _now() -> datetime:
    return datetime.now(UTC)


def _secret_for(secrets: Secrets, name: str) -> bytes | None:
    """The agent's own secret from a token file in any of the formats the center reads."""
    return secrets.for_agent(name)


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
        self.name = name
        self.terms = TermStore(state_dir)  # before the state: a bad term file stops us first
        self.state = AgentState(state_dir)
        self.executor = LocalExecutor(state_dir=state_dir)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stopping = asyncio.Event()
        self.connections = CenterLinks(
            center, name=name, secret=secret, ssl_context=ssl_context,
            labels=dict(labels or {}), backoff_initial_s=backoff_initial_s,
            backoff_max_s=backoff_max_s, state=self.state, terms=self.terms,
            inflight=lambda: self.orders.inflight, daemon_states=lambda: self.daemons.states(),
            on_message=self._handle, spawn=self._spawn, stopping=self._stopping)
        self.orders = OrderExecution(
            name=name, links=self.connections, state=self.state, terms=self.terms,
            executor=self.executor, own_user=getpass.getuser(), allow_run_as=allow_run_as,
            allow_command_prefixes=allow_command_prefixes, spawn=self._spawn)
        self.daemons = _Daemons(self)

    async def run_until_stopped(self) -> int:
        await self.connections.run()
        await self._shutdown()
        return 0

    def stop(self) -> None:
        self._stopping.set()

    def refusal(self, command: tuple[str, ...] | str, run_as: str | None) -> str | None:
        """Why this agent's own limits refuse a run or a daemon (None: allowed)."""
        return self.orders.refusal(command, run_as)

    async def _handle(self, link: CenterLink, msg: Message) -> None:
        orders = self.orders
        if isinstance(msg, Run):
            if await orders.fenced(link, msg):
                orders.on_run(link, msg)
        elif isinstance(msg, Ack):
            self.state.ack(msg.run_id)
        elif isinstance(msg, Ping):
            await self.connections.send(Pong(seq=msg.seq), link)
        elif isinstance(msg, Pong):
            pass
        elif isinstance(msg, Cancel):
            if await orders.fenced(link, msg):
                orders.on_cancel(link, msg)
        elif isinstance(msg, Daemons):
            if await orders.fenced(link, msg):
                self._spawn(self.daemons.apply(msg))
        elif isinstance(msg, Role):
            await orders.on_role(link, msg)
        else:
            raise ProtocolError(f"unexpected {msg.TYPE} message from the center")

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # --- shutdown ----------------------------------------------------------------------

    async def _shutdown(self) -> None:
        """Stop runs and daemons (bounded), store their outcomes, close the logs."""
        log.info("agent stopping: %d run(s) to stop", len(self.orders.running))
        stops = [h.stop("agent shutting down", None) for h in self.orders.running.values()]
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
            await self.agent.connections.send_all(DaemonStatus(daemons=states))

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

