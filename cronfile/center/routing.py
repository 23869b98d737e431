"""Where a slot runs: agents over TCP, SSH for hosts without one, and the routing strategies.

The center asks :func:`resolve_targets` for a job's targets at dispatch time. A declared
agent is *available* when it can be reached through the job's transport:

* ``tcp``: its agent is connected to the hub;
* ``ssh``: it declares ``ssh:``;
* ``auto``: the TCP channel when connected, else SSH when declared (SPEC §2).

Then the strategy picks among the available ones: ``one`` round-robin, ``all`` every one,
``hash`` a stable one per job (rendezvous hashing, so adding an agent moves only the jobs
it wins), ``failover`` the first in declared order, ``shard`` every one told its index.
When a job names both ``agents`` and ``labels``, it targets the union (as ``cronfile plan`` shows).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
from typing import TYPE_CHECKING, Any

from cronfile.schedules.loader import LOCAL_AGENT
from cronfile.schedules.model import Agent, Job, Strategy, Transport

if TYPE_CHECKING:
    from cronfile.center.daemon import Center, CenterOptions, Target

log = logging.getLogger("cronfile.fleet")

def _candidates(center: Center, job: Job) -> list[str]:
    """The agents a job targets: the ones it names, in its order, then (union) every agent
    carrying all its labels, in declared order, connected undeclared agents last. The
    planner (plan.matching_agents) reads targets the same way."""
    assert center.desired is not None
    inventory: dict[str, Agent] = center.desired.agents
    out: list[str] = list(dict.fromkeys(job.targets.agents))
    wanted = set(job.targets.labels)
    if wanted:
        names = list(inventory)
        if center.hub is not None:
            names += [n for n in center.hub.connected() if n not in inventory]
        for name in names:
            labels = set(inventory[name].labels) if name in inventory else set(
                center.hub.labels_of(name).items() if center.hub else ())
            if wanted <= labels and name not in out:
                out.append(name)
    return out


def _reach(center: Center, job: Job, name: str) -> Target | None:
    from cronfile.center.daemon import Target

    if name == LOCAL_AGENT:
        return Target(LOCAL_AGENT, center.local, "local")
    transport = job.targets.transport
    if transport in (Transport.AUTO, Transport.TCP) and center.hub is not None:
        executor = center.hub.executor_for(name)
        if executor is not None:
            return Target(name, executor, "tcp")
    agent = center.desired.agents.get(name) if center.desired else None
    if transport in (Transport.AUTO, Transport.SSH) and agent is not None and agent.ssh is not None:
        why = "transport: ssh" if transport is Transport.SSH else "agent not connected; declared ssh:"
        return Target(name, ssh_executor(center, agent), "ssh", why=why)
    return None


def ssh_executor(center: Center, agent: Agent) -> Any:
    """One SSH executor (one reused connection) per agent, rebuilt when its config changes."""
    from cronfile.transports.ssh import SshExecutor

    cache = center.ssh_executors
    cached = cache.get(agent.name)
    if cached is None or cached[0] != agent.ssh:
        assert agent.ssh is not None
        if cached is not None:  # the config changed: close the old connection
            center._spawn(cached[1].close())
        cache[agent.name] = (agent.ssh, SshExecutor(agent.name, agent.ssh,
                                                     known_hosts=center.options.known_hosts))
    return cache[agent.name][1]


def _rendezvous(job: str, names: list[str]) -> str:
    return max(names, key=lambda n: hashlib.sha256(f"{job}\0{n}".encode()).digest())


def resolve_targets(center: Center, job: Job) -> list[Target]:
    if job.targets.is_local_only:
        return [t for t in [_reach(center, job, LOCAL_AGENT)] if t is not None]
    available = [t for t in (_reach(center, job, n) for n in _candidates(center, job)) if t]
    if not available:
        return []
    strategy = job.targets.strategy
    if strategy is Strategy.ALL:
        return available
    if strategy is Strategy.FAILOVER:
        return available[:1]
    if strategy is Strategy.HASH:
        chosen = _rendezvous(job.name, [t.agent for t in available])
        return [t for t in available if t.agent == chosen]
    if strategy is Strategy.SHARD:
        ordered = sorted(available, key=lambda t: t.agent)
        total = str(len(ordered))
        for index, target in enumerate(ordered):
            target.env = (("CRONFILE_SHARD_INDEX", str(index)), ("CRONFILE_SHARD_TOTAL", total))
        return ordered
    counter = center.round_robin.setdefault(job.name, itertools.count())
    return [available[next(counter) % len(available)]]


def resolve_retry_target(center: Center, job: Job, agent: str) -> list[Target]:
    """A retry goes to the agent whose run failed, with the same shard index; if that
    agent cannot be reached the retry is ``no_agent``, never another agent's."""
    if job.targets.strategy is Strategy.SHARD:
        return [t for t in resolve_targets(center, job) if t.agent == agent]
    target = _reach(center, job, agent)
    return [target] if target is not None else []


def write_agents_file(center: Center) -> None:
    """``<state>/agents.json``: the registry for ``cronfile status`` (atomic replace)."""
    if center.hub is None:
        return
    path = center.state_dir / "agents.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(center.hub.snapshot(), indent=1))
    os.replace(tmp, path)


def _server_tls(options: CenterOptions) -> Any:
    """TLS for the agent listener when --tls-cert/--tls-key are given; with --tls-client-ca
    agents must present a certificate signed by it (mutual TLS)."""
    import ssl

    if not options.tls_cert:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(options.tls_cert), str(options.tls_key))
    if options.tls_client_ca:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(str(options.tls_client_ca))
    return context


async def start_hub(center: Center) -> Any:
    """Listen for agents on ``--listen`` with the secrets of ``--token-file``."""
    from cronfile.transports.hub import AgentHub
    from cronfile.transports.protocol import Secrets, load_secrets

    listen = center.options.listen or "127.0.0.1:0"
    host, _, port = listen.rpartition(":")
    secrets = load_secrets(center.options.token_file) if center.options.token_file else Secrets()

    def write_agents() -> None:
        write_agents_file(center)

    def on_connect(name: str, *_: Any) -> None:
        center._event("agent_connected", agent=name)
        write_agents()
        center._wake.set()

    def on_disconnect(name: str, *_: Any) -> None:
        center._event("agent_disconnected", agent=name)
        write_agents()

    def on_outcome(run_id: str, agent: str, outcome: dict[str, Any]) -> None:
        if run_id in center.running:
            return  # the run's handle resolves and the center records it there
        waiting = center._awaiting_agents.pop(run_id, None)
        if waiting is not None:  # in flight when the center restarted: its one outcome
            record = {**waiting, "record": "finished", **outcome}
            center._record(record)
            center._outcome(str(waiting.get("job")), record)
            center._flush()
            return
        # Only a run the center recorded ``lost`` may get a second, superseding record, and
        # only once. Any other run_id was already recorded (a re-delivery whose ack was lost,
        # e.g. across a center restart, when the hub's dedupe window is empty): ignore it.
        base = center.lost_bases.pop(run_id, None)
        if base is None:
            log.info("outcome of run %s from %s was already recorded: ignored", run_id, agent)
            return
        if outcome.get("status") == "lost":
            return  # the agent lost it too (it restarted): nothing new to record
        center._record({**base, "record": "finished", **outcome, "supersedes": "lost",
                        "reason": "outcome delivered after the run was recorded lost"})
        center._flush()

    hub = AgentHub(host or "127.0.0.1", int(port or 0),
                   inventory=center.desired.agents if center.desired else {},
                   secrets=secrets, accept_undeclared=center.options.accept_undeclared,
                   on_connect=on_connect, on_disconnect=on_disconnect, on_outcome=on_outcome,
                   heartbeat_s=center.options.heartbeat_s,
                   ssl_context=_server_tls(center.options),
                   lease_s=center.options.lease_s)
    await hub.start()
    center.hub = hub
    write_agents()
    return hub


def daemon_targets(center: Center, job: Job) -> list[str]:
    """Where a daemon is kept alive: EVERY matching target (SPEC: "on each target")."""
    if job.targets.is_local_only:
        return [LOCAL_AGENT]
    return _candidates(center, job)


async def sync_agent_daemons(center: Center) -> None:
    """Send each agent its complete desired daemon set (the hub re-sends it on reconnect;
    the agent converges: start new, stop removed, restart changed)."""
    from cronfile.schedules.model import JobKind
    from cronfile.transports.protocol import DaemonSpec, EnvVar

    if center.hub is None or center.desired is None:
        return
    wanted: dict[str, list[DaemonSpec]] = {name: [] for name in center.desired.agents}
    for job in center.desired.jobs.values():
        if job.kind is not JobKind.DAEMON or job.suspend:
            continue
        for agent in daemon_targets(center, job):
            if agent == LOCAL_AGENT:
                continue
            wanted.setdefault(agent, []).append(DaemonSpec(
                name=job.name, command=job.command,
                env=tuple(EnvVar.of(k, v) for k, v in job.env), workdir=job.workdir,
                run_as=job.run_as, replicas=job.replicas,
                restart_policy=job.restart.policy.value, backoff_s=job.restart.backoff_s,
                max_backoff_s=job.restart.max_backoff_s, output_keep=job.output_keep))
    revision = center.desired.revision.content_hash
    for agent, specs in wanted.items():
        await center.hub.set_daemons(agent, specs, revision)
