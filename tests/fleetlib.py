"""Helpers for black-box fleet tests: a ``cronfile center`` listening for agents on a free
127.0.0.1 port, and real ``cronfile agent`` processes connecting to it. Every wait is bounded
polling of the center's ledger (``runs.jsonl`` / ``events.jsonl``)."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path
from typing import Any

from centerlib import CenterProc, ChildProc, cronfile_command

SECRET = "fleet-test-secret-0123456789abcdef"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class FleetCenter(CenterProc):
    """A center with ``--listen``/``--token-file`` and the fleet timing options."""

    def __init__(self, root: Path, *, heartbeat: float = 0.5, lease: float = 3.0,
                 known_hosts: Path | None = None, **kw: Any) -> None:
        super().__init__(root, **kw)
        self.port = free_port()
        self.token_file = root / "token"
        self.token_file.write_text(SECRET + "\n")
        self.token_file.chmod(0o600)
        self.heartbeat = heartbeat
        self.lease = lease
        self.known_hosts = known_hosts

    def argv(self) -> list[str]:
        argv = [*super().argv(), "--listen", f"127.0.0.1:{self.port}",
                "--token-file", str(self.token_file),
                "--heartbeat", str(self.heartbeat), "--lease", str(self.lease)]
        if self.known_hosts is not None:
            argv += ["--known-hosts", str(self.known_hosts)]
        return argv

    def until(self, predicate: Any, timeout: float, what: str) -> list[dict[str, Any]]:
        """Wait until ``predicate(runs)`` holds; return the runs it held for."""
        return self.wait_runs(lambda rs: rs if predicate(rs) else None, timeout, what)

    def connects(self, name: str) -> int:
        return sum(1 for e in self.events()
                   if e.get("event") == "agent_connected" and e.get("agent") == name)

    def disconnects(self, name: str) -> int:
        return sum(1 for e in self.events()
                   if e.get("event") == "agent_disconnected" and e.get("agent") == name)

    def wait_connected(self, name: str, times: int = 1, timeout: float = 10.0,
                       agent: AgentProc | None = None) -> None:
        def check() -> bool:
            if agent is not None and agent.proc is not None and agent.proc.poll() is not None:
                raise AssertionError(f"agent {name} exited {agent.proc.returncode}:\n{agent.log_text()}")
            return self.connects(name) >= times

        self.wait_events(lambda _e: check(), timeout, f"agent {name} to connect ({times}x)")


class AgentProc(ChildProc):
    """One ``cronfile agent`` subprocess (the installed CLI, as a user runs it)."""

    def __init__(self, root: Path, center: FleetCenter, name: str, *extra: str,
                 port: int | None = None) -> None:
        self.root = root
        self.center = center
        self.port = port  # where it connects: the center's port unless a proxy is between
        self.name = name
        self.extra = extra
        self.state = root / f"agent-{name}"
        self.log = root / f"agent-{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, wait: bool = True) -> AgentProc:
        argv = [*cronfile_command(), "agent", "--center", f"127.0.0.1:{self.port or self.center.port}",
                "--name", self.name, "--token-file", str(self.center.token_file),
                "--state", str(self.state), *self.extra]
        before = self.center.connects(self.name)
        # A job tells which agent ran it by its CRONFILE_STATE_DIR (``agent-NAME``): jobs do
        # not inherit the agent's own environment.
        self.launch(argv, dict(os.environ))
        if wait:
            self.center.wait_connected(self.name, before + 1, agent=self)
        return self
