"""Where a slot runs: agents over TCP, SSH for hosts without one, and the routing strategies.

The center asks :func:`resolve_targets` for a job's targets at dispatch time. A declared
agent is *available* when it can be reached through the job's transport:

* ``tcp``: its agent is connected to the hub;
* ``ssh``: it declares ``ssh:``;
* ``auto``: the TCP channel when connected, else SSH when declared (SPEC §2).

Then the strategy picks among the available ones: ``one`` round-robin, ``all`` every one,
``hash`` a stable one per job (rendezvous hashing, so adding an agent moves only the jobs
it wins), ``failover`` the first in declared order, ``shard`` every one told its index.

Under ``all`` and ``shard`` every matching agent is a target of its own, reachable or not
(SPEC §2): one that cannot be reached comes back as a :class:`Target` without an executor,
its ``why`` saying why, and the center records ``no_agent`` for it. A shard's index and
total count every matching agent, so an unreachable one leaves its own share undone (and
recorded), and the others' shares do not shift under them.
When a job names both ``agents`` and ``labels``, it targets the union (as ``cronfile plan`` shows).
"""

from __future__ import annotations

import hashlib
import itertools
import logging
from collections.abc import Callable, Coroutine, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from cronfile.schedules.loader import LOCAL_AGENT
from cronfile.schedules.model import Agent, Job, SshConfig, Strategy, Transport
from cronfile.transports.executor import Executor

if TYPE_CHECKING:
    from cronfile.transports.ssh import SshExecutor

log = logging.getLogger("cronfile.fleet")


@dataclass
class Target:
    """One place a slot runs: an agent name and the executor that reaches it."""

    agent: str
    executor: Executor | None
    transport: str
    env: tuple[tuple[str, str], ...] = ()
    why: str = ""


class AgentDirectory(Protocol):
    """What routing needs to know of the connected agents (the hub implements it)."""

    def connected(self) -> list[str]: ...

    def labels_of(self, name: str) -> dict[str, str]: ...

    def executor_for(self, name: str) -> Executor | None: ...


def _rendezvous(job: str, names: list[str]) -> str:
    return max(names, key=lambda n: hashlib.sha256(f"{job}\0{n}".encode()).digest())


class Router:
    """Resolves a job's targets at dispatch time. It owns what routing remembers between
    starts (the round-robin counters, one SSH executor per agent); what it reads comes in
    from outside: the declared agents (:attr:`inventory`, set on every applied revision)
    and the connected ones (:attr:`directory`, set when the agent hub starts)."""

    def __init__(self, local: Executor, known_hosts: str | None,
                 close_later: Callable[[Coroutine[Any, Any, None]], object]) -> None:
        self.local = local
        self.known_hosts = known_hosts
        self.close_later = close_later  # runs an old SSH executor's close() in the background
        self.inventory: Mapping[str, Agent] = {}
        self.directory: AgentDirectory | None = None
        self.ssh_executors: dict[str, tuple[SshConfig, SshExecutor]] = {}
        self.round_robin: dict[str, Iterator[int]] = {}  # job -> counter for strategy: one

    def candidates(self, job: Job) -> list[str]:
        """The agents a job targets: the ones it names, in its order, then (union) every agent
        carrying all its labels, in declared order, connected undeclared agents last. The
        planner (plan.matching_agents) reads targets the same way."""
        inventory = self.inventory
        directory = self.directory
        out: list[str] = list(dict.fromkeys(job.targets.agents))
        wanted = set(job.targets.labels)
        if wanted:
            names = list(inventory)
            if directory is not None:
                names += [n for n in directory.connected() if n not in inventory]
            for name in names:
                labels = set(inventory[name].labels) if name in inventory else set(
                    directory.labels_of(name).items() if directory else ())
                if wanted <= labels and name not in out:
                    out.append(name)
        return out

    def _reach(self, job: Job, name: str) -> Target | None:
        if name == LOCAL_AGENT:
            return Target(LOCAL_AGENT, self.local, "local")
        transport = job.targets.transport
        if transport in (Transport.AUTO, Transport.TCP) and self.directory is not None:
            executor = self.directory.executor_for(name)
            if executor is not None:
                return Target(name, executor, "tcp")
        agent = self.inventory.get(name)
        if transport in (Transport.AUTO, Transport.SSH) and agent is not None \
                and agent.ssh is not None:
            why = "transport: ssh" if transport is Transport.SSH else "agent not connected; declared ssh:"
            return Target(name, self.ssh_executor(agent), "ssh", why=why)
        return None

    def _unreachable(self, job: Job, name: str) -> Target:
        agent = self.inventory.get(name)
        if job.targets.transport is Transport.TCP or agent is None or agent.ssh is None:
            why = f"agent {name} is not connected"
        else:
            why = f"agent {name} is not reachable over SSH"
        return Target(name, None, "", why=why)

    def ssh_executor(self, agent: Agent) -> Executor:
        """One SSH executor (one reused connection) per agent, rebuilt when its config changes."""
        from cronfile.transports.ssh import SshExecutor

        cache = self.ssh_executors
        cached = cache.get(agent.name)
        if cached is None or cached[0] != agent.ssh:
            assert agent.ssh is not None
            if cached is not None:  # the config changed: close the old connection
                self.close_later(cached[1].close())
            cache[agent.name] = (agent.ssh, SshExecutor(agent.name, agent.ssh,
                                                         known_hosts=self.known_hosts))
        return cache[agent.name][1]

    async def close(self) -> None:
        """Close every SSH connection (at shutdown)."""
        for _config, ssh in self.ssh_executors.values():
            try:
                await ssh.close()
            except Exception:  # shutting down: one broken connection must not stop the rest
                log.debug("closing the SSH executor of %s failed", ssh, exc_info=True)

    def resolve(self, job: Job) -> list[Target]:
        if job.targets.is_local_only:
            return [t for t in [self._reach(job, LOCAL_AGENT)] if t is not None]
        candidates = self.candidates(job)
        reached = {n: self._reach(job, n) for n in candidates}
        available = [t for t in reached.values() if t is not None]
        strategy = job.targets.strategy
        if strategy is Strategy.ALL:
            return [reached[n] or self._unreachable(job, n) for n in candidates]
        if strategy is Strategy.SHARD:
            ordered = sorted(candidates)
            total = str(len(ordered))
            targets = [reached[n] or self._unreachable(job, n) for n in ordered]
            for index, target in enumerate(targets):
                target.env = (("CRONFILE_SHARD_INDEX", str(index)), ("CRONFILE_SHARD_TOTAL", total))
            return targets
        if not available:
            return []
        if strategy is Strategy.FAILOVER:
            return available[:1]
        if strategy is Strategy.HASH:
            chosen = _rendezvous(job.name, [t.agent for t in available])
            return [t for t in available if t.agent == chosen]
        counter = self.round_robin.setdefault(job.name, itertools.count())
        return [available[next(counter) % len(available)]]

    def resolve_retry(self, job: Job, agent: str) -> list[Target]:
        """A retry goes to the agent whose run failed, with the same shard index; if that
        agent cannot be reached the retry is ``no_agent``, never another agent's."""
        if job.targets.strategy is Strategy.SHARD:
            return [t for t in self.resolve(job) if t.agent == agent]
        target = self._reach(job, agent)
        return [target] if target is not None else []

    def daemon_targets(self, job: Job) -> list[str]:
        """Where a daemon is kept alive: EVERY matching target (SPEC: "on each target")."""
        if job.targets.is_local_only:
            return [LOCAL_AGENT]
        return self.candidates(job)
