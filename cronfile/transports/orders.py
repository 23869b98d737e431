"""Orders to agents and their fence (SPEC §9): the term on every order, ``role`` frames,
and each agent's daemon set.

A center with ``--ha`` gives the hub ``role``, a callable answering
:class:`~cronfile.transports.hubconn.CenterRole` (does it lead, with which term). Every
order (run, cancel, daemon set) then carries that term, and a center that does not lead
sends no order at all. Agents that check terms get a sealed ``role`` frame on connect and
at every change, which tells them where to send outcomes. An agent's ``stale_term`` report
becomes an ``agent_refused_stale_term`` event through ``on_agent_event``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from typing import Any

from cronfile.transports.hubconn import CenterRole, Closed, Connection
from cronfile.transports.protocol import Cancel, Daemons, DaemonSpec, Role, StaleTerm

log = logging.getLogger("cronfile.agents")

ROLE_POLL_S = 0.2
"""How often an HA hub looks at its center's role, to tell agents at once when it changed."""
STALE_TERM_EVENT = "agent_refused_stale_term"


class Orders:
    """Sends orders stamped with the center's term, and keeps each agent's desired daemon
    set to send again on every connect and on becoming the leader. ``conns`` is the hub's
    registry (read only); ``role`` None is a center without ``--ha``."""

    def __init__(
        self,
        *,
        conns: Mapping[str, Connection],
        role: Callable[[], CenterRole] | None,
        on_agent_event: Callable[[str, dict[str, Any]], None] | None,
    ) -> None:
        self.conns = conns
        self.role = role
        self.on_agent_event = on_agent_event
        self._desired_daemons: dict[str, Daemons] = {}

    def role_now(self) -> CenterRole | None:
        return None if self.role is None else self.role()

    async def send_order(self, conn: Connection, order: Cancel | Daemons) -> bool:
        """Send an order stamped with this center's term; an HA center that does not lead
        sends none (False). The agent refuses it anyway if the term is stale."""
        role = self.role_now()
        if role is not None:
            if not role.leading:
                log.debug("not sending %s to agent %s: this center does not lead",
                         order.TYPE, conn.name)
                return False
            order = replace(order, term=role.term)
        with contextlib.suppress(Closed):
            await conn.send(order)
            return True
        return False

    async def send_role(self, conn: Connection, role: CenterRole) -> None:
        if conn.terms and conn.role_sent != role:
            conn.role_sent = role
            await conn.send_quietly(Role(leading=role.leading, term=role.term))

    async def greet(self, conn: Connection) -> None:
        """On connect, before anything else: tell a term-checking agent the role (it says
        where outcomes go); warn about an agent that does not check terms."""
        role = self.role_now()
        if role is None:
            return
        if conn.terms:
            await self.send_role(conn, role)
        else:
            log.warning("agent %s (version %s) does not check terms: orders of a "
                        "stale leader are not fenced there; upgrade it",
                        conn.name, conn.version)

    async def set_daemons(
        self, name: str, daemons: Iterable[DaemonSpec], revision: str = ""
    ) -> None:
        msg = Daemons(daemons=tuple(daemons), revision=revision)
        self._desired_daemons[name] = msg
        conn = self.conns.get(name)
        if conn is not None:
            await self.send_order(conn, msg)

    async def send_daemons(self, conn: Connection) -> None:
        """Send an agent its desired daemon set, if it has one."""
        desired = self._desired_daemons.get(conn.name)
        if desired is not None:
            await self.send_order(conn, desired)

    async def watch_role(self) -> None:
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
                     "leader" if role.leading else "standby", role.term, len(self.conns))
            became_leader = role.leading and not last.leading
            last = role
            for conn in list(self.conns.values()):
                await self.send_role(conn, role)
                if became_leader:
                    await self.send_daemons(conn)

    def on_stale_term(self, conn: Connection, msg: StaleTerm) -> None:
        log.warning("agent %s refused a %s order%s from %s: its term %s is below the highest "
                    "it has seen, %d", conn.name, msg.order,
                    f" (run {msg.run_id})" if msg.run_id else "", msg.center or "a center",
                    msg.term, msg.highest_term)
        if self.on_agent_event is not None:
            self.on_agent_event(STALE_TERM_EVENT, {
                "agent": conn.name, "order": msg.order, "run_id": msg.run_id, "job": msg.job,
                "term": msg.term, "highest_term": msg.highest_term, "from_center": msg.center})
