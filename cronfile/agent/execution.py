"""What the agent does with a center's orders: the term fence, runs, cancels, and the
host's own limits (``--allow-run-as``, ``--allow-command-prefix``).

Orders are fenced by term (:mod:`cronfile.agent.terms` keeps the highest one seen, made
durable before anything acts on it): an order below it is refused, logged, answered
``failed`` to its sender and reported as a ``stale_term`` frame to the center that leads.
A run's id is journaled before its process starts (:class:`~cronfile.agent.outbox.AgentState`),
and its outcome is stored before it is sent.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from cronfile.agent.links import CenterLink, CenterLinks
from cronfile.agent.outbox import AgentState
from cronfile.agent.terms import TermStore
from cronfile.schedules.model import RunStatus
from cronfile.schedules.policy import command_allowed
from cronfile.transports.executor import RunHandle, RunOutcome, RunRefused
from cronfile.transports.local import LocalExecutor
from cronfile.transports.protocol import (
    Cancel,
    Daemons,
    Finished,
    Role,
    Run,
    StaleTerm,
    Started,
)

log = logging.getLogger("cronfile.agent")

Order = Run | Cancel | Daemons


def _now() -> datetime:
    return datetime.now(UTC)


class OrderExecution:
    """Carries out the orders that pass the fence: runs through the local executor (each
    once, whatever is re-sent), cancels, and the answers to refused orders."""

    def __init__(
        self,
        *,
        name: str,
        links: CenterLinks,
        state: AgentState,
        terms: TermStore,
        executor: LocalExecutor,
        own_user: str,
        allow_run_as: Sequence[str] | None,
        allow_command_prefixes: Sequence[str] | None,
        spawn: Callable[[Any], asyncio.Task[Any]],
    ) -> None:
        self.name = name
        self.links = links
        self.state = state
        self.terms = terms
        self.executor = executor
        self.own_user = own_user
        self.allow_run_as = set(allow_run_as) if allow_run_as else {own_user}
        # None: any program; else argv[0] must start with one of these (no shell strings).
        self.allow_command_prefixes = tuple(allow_command_prefixes or ()) or None
        self.running: dict[str, RunHandle] = {}
        self.inflight: set[str] = set()  # accepted, outcome not stored yet
        self._cancels: dict[str, Cancel] = {}
        self._term_lock = asyncio.Lock()
        self._spawn = spawn

    # --- fencing -----------------------------------------------------------------------

    async def _raise_term(self, term: int) -> None:
        """Persist a higher term before anything acts on it (caller holds the lock)."""
        if term > self.terms.highest:
            await asyncio.to_thread(self.terms.raise_to, term)
            log.info("highest term seen is now %d", term)
            self.links.retarget()  # a center leading with a lower term is stale now

    async def on_role(self, link: CenterLink, msg: Role) -> None:
        if msg.term is not None:
            async with self._term_lock:
                try:
                    await self._raise_term(msg.term)
                except OSError as exc:
                    log.error("cannot persist term %d (%s)", msg.term, exc)
        link.role = msg
        log.info("the center at %s %s (term %s)", link.label,
                 "leads" if msg.leading else "stands by", msg.term)
        self.links.retarget()

    async def fenced(self, link: CenterLink, order: Order) -> bool:
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

    async def _refuse_stale(self, link: CenterLink, order: Order, highest: int) -> None:
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
        target = self.links.target
        await self.links.send(report, target if target is not None and target.ha else link)

    async def _answer_refused_run(self, link: CenterLink, order: Order, reason: str) -> None:
        """A refused run's sender gets its final outcome, ``failed`` with the reason (not
        kept in the outbox: it belongs to that center alone, and if the same run_id comes
        from the real leader it must still run). A run_id this agent already accepted is
        left alone: its real outcome exists or will."""
        if isinstance(order, Run) and not self.state.knows(order.run_id):
            now = _now()
            await self.links.send(Finished.from_outcome(
                order.run_id, RunOutcome(RunStatus.FAILED, now, now, reason=reason)), link)

    # --- runs --------------------------------------------------------------------------

    def on_run(self, link: CenterLink, msg: Run) -> None:
        run_id = msg.run_id
        if self.state.knows(run_id):
            known = self.state.outcome_of(run_id)
            handle = self.running.get(run_id)
            if known is not None:
                self._spawn(self.links.send(known, link))
            elif handle is not None:
                self._spawn(self.links.send(Started(run_id=run_id, started_at=handle.started_at,
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


    async def _execute(self, link: CenterLink, msg: Run) -> None:
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
            await self.links.send(Finished.from_outcome(run_id, RunOutcome(
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
        await self.links.send(finished)

    async def _run(self, link: CenterLink, msg: Run) -> RunOutcome:
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
            await self.links.send(Started(run_id=msg.run_id, started_at=handle.started_at,
                                     pid=handle.pid), link)
            late_cancel = self._cancels.pop(msg.run_id, None)
            if late_cancel is not None:
                self._spawn(handle.stop(late_cancel.reason, late_cancel.grace_s))
            return await handle.wait()
        finally:
            self.running.pop(msg.run_id, None)

    def on_cancel(self, link: CenterLink, msg: Cancel) -> None:
        handle = self.running.get(msg.run_id)
        if handle is not None:
            self._spawn(handle.stop(msg.reason, msg.grace_s))
        elif msg.run_id in self.inflight:
            self._cancels[msg.run_id] = msg  # still starting: applied right after the start
        else:
            known = self.state.outcome_of(msg.run_id)
            if known is not None:
                self._spawn(self.links.send(known, link))
