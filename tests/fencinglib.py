"""A hub standing for one HA center in a test: its role and term are whatever the test
sets, so a stale leader (one that believes it leads with an old term) can be forced."""

from __future__ import annotations

import asyncio
from typing import Any

from cronfile.schedules.model import Agent
from cronfile.transports.executor import RunOutcome, RunRequest
from cronfile.transports.hub import AgentHub, CenterRole, RemoteRunHandle
from cronfile.transports.protocol import Secrets

AGENT = "web-1"


class Replica:
    """An agent hub standing for one HA center: its role is whatever the test sets."""

    def __init__(self, name: str, leading: bool, term: int | None, secret: str) -> None:
        self.name = name
        self.role: CenterRole | None = CenterRole(leading, term)
        self.outcomes: list[tuple[str, str, dict[str, Any]]] = []
        self.events: list[dict[str, Any]] = []
        self.connects: list[str] = []
        self.hub = AgentHub(
            "127.0.0.1", 0, inventory={AGENT: Agent(AGENT)},
            secrets=Secrets(shared=secret.encode()), heartbeat_s=1.0, lease_s=5.0,
            handshake_timeout_s=2.0, on_connect=self.connects.append,
            on_outcome=lambda run_id, agent, outcome: self.outcomes.append(
                (run_id, agent, outcome)),
            on_agent_event=lambda name, fields: self.events.append({"event": name, **fields}),
            role=self.current_role,
        )

    def current_role(self) -> CenterRole:
        assert self.role is not None
        return self.role

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.hub.port}"

    def outcome_ids(self) -> list[str]:
        return [run_id for run_id, _agent, _outcome in self.outcomes]

    async def start(self, run_id: str, command: str) -> RemoteRunHandle:
        executor = self.hub.executor_for(AGENT)
        assert executor is not None, f"{AGENT} is not connected to {self.name}"
        return await executor.start(RunRequest(run_id=run_id, job="fenced", command=command))

    async def run(self, run_id: str, command: str) -> RunOutcome:
        handle = await self.start(run_id, command)
        return await asyncio.wait_for(handle.wait(), 10)


