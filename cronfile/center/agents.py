"""The center's side of the agent hub: start it, keep ``agents.json``, send daemon sets.

The hub reports connections and outcomes to an :class:`AgentListener` (the center): this
module only wires the hub to it and knows nothing of run records or the ledger.
"""

from __future__ import annotations

import json
import os
import ssl
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

from cronfile.center.options import CenterOptions
from cronfile.center.routing import Router
from cronfile.schedules.loader import LOCAL_AGENT
from cronfile.schedules.model import Agent, DesiredState, JobKind
from cronfile.transports.hub import AgentHub, CenterRole
from cronfile.transports.protocol import DaemonSpec, EnvVar, Secrets, load_secrets


class AgentListener(Protocol):
    """What the hub tells the center."""

    def agent_connected(self, name: str) -> None: ...

    def agent_disconnected(self, name: str) -> None: ...

    async def agent_outcome(self, run_id: str, agent: str, outcome: dict[str, Any]) -> None:
        """Returns once the outcome is durable: the hub acks it to the agent then."""


def write_agents_file(state_dir: Path, hub: AgentHub) -> None:
    """``<state>/agents.json``: the registry for ``cronfile status`` (atomic replace)."""
    path = state_dir / "agents.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(hub.snapshot(), indent=1))
    os.replace(tmp, path)


def server_tls(options: CenterOptions) -> ssl.SSLContext | None:
    """TLS for the agent listener when --tls-cert/--tls-key are given; with --tls-client-ca
    agents must present a certificate signed by it (mutual TLS)."""
    if not options.tls_cert:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(options.tls_cert), str(options.tls_key))
    if options.tls_client_ca:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(str(options.tls_client_ca))
    return context


class Leadership(Protocol):
    """An HA center's view of its own role (:class:`cronfile.center.standby.HaCoordinator`)."""

    def hub_role(self) -> CenterRole: ...


async def start_hub(options: CenterOptions, inventory: Mapping[str, Agent],
                    listener: AgentListener, ha: Leadership | None = None,
                    on_event: Callable[..., None] | None = None) -> AgentHub:
    """Listen for agents on ``--listen`` with the secrets of ``--token-file``.

    ``ha`` (HA centers only) says whether this center leads and with which term: the hub
    stamps it on every order and tells agents (fencing, SPEC §9). ``on_event(name,
    **fields)`` writes what agents report as events (``agent_refused_stale_term``)."""
    listen = options.listen or "127.0.0.1:0"
    host, _, port = listen.rpartition(":")
    secrets = load_secrets(options.token_file) if options.token_file else Secrets()

    def on_connect(name: str, *_: Any) -> None:
        listener.agent_connected(name)

    def on_disconnect(name: str, *_: Any) -> None:
        listener.agent_disconnected(name)

    def on_agent_event(name: str, fields: dict[str, Any]) -> None:
        if on_event is not None:
            on_event(name, **fields)

    hub = AgentHub(host or "127.0.0.1", int(port or 0), inventory=dict(inventory),
                   secrets=secrets, accept_undeclared=options.accept_undeclared,
                   on_connect=on_connect, on_disconnect=on_disconnect,
                   on_outcome=listener.agent_outcome, heartbeat_s=options.heartbeat_s,
                   ssl_context=server_tls(options), lease_s=options.lease_s,
                   role=None if ha is None else ha.hub_role, on_agent_event=on_agent_event)
    await hub.start()
    return hub


async def sync_agent_daemons(hub: AgentHub, desired: DesiredState, router: Router) -> None:
    """Send each agent its complete desired daemon set (the hub re-sends it on reconnect;
    the agent converges: start new, stop removed, restart changed)."""
    wanted: dict[str, list[DaemonSpec]] = {name: [] for name in desired.agents}
    for job in desired.jobs.values():
        if job.kind is not JobKind.DAEMON or job.suspend:
            continue
        for agent in router.daemon_targets(job):
            if agent == LOCAL_AGENT:
                continue
            wanted.setdefault(agent, []).append(DaemonSpec(
                name=job.name, command=job.command,
                env=tuple(EnvVar.of(k, v) for k, v in job.env), workdir=job.workdir,
                run_as=job.run_as, replicas=job.replicas,
                restart_policy=job.restart.policy.value, backoff_s=job.restart.backoff_s,
                max_backoff_s=job.restart.max_backoff_s, output_keep=job.output_keep))
    revision = desired.revision.content_hash
    for agent, specs in wanted.items():
        await hub.set_daemons(agent, specs, revision)
