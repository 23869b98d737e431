"""``cronfile agent --allow-command-prefix``: the agent's own limit, which no revision can
lift. A real center (with no policy at all, so only the agent stands in the way) and a real
agent; each refusal is recorded in ``runs.jsonl`` (a daemon's in ``agents.json``) with its
reason, and the refused command never runs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from centerlib import finished, wait_for
from fleetlib import AgentProc, FleetCenter

EVERY_SECOND = '"*/1 * * * * *"'


def _daemons(c: FleetCenter) -> list[dict[str, Any]]:
    try:
        data = json.loads((c.state / "agents.json").read_text())
    except (OSError, ValueError):
        return []
    rows = data.get("agents", data) if isinstance(data, dict) else data
    return [d for a in (rows.values() if isinstance(rows, dict) else rows)
            if isinstance(a, dict) for d in a.get("daemons", [])]


def _reached(runs: list[dict[str, Any]], job: str) -> list[dict[str, Any]]:
    """The job's outcomes from the agent (slots before it connected are ``no_agent``)."""
    return [r for r in finished(runs, job) if r.get("status") != "no_agent"]


def test_the_agent_refuses_commands_outside_its_prefixes(tmp_path: Path) -> None:
    witness = tmp_path / "ran"
    c = FleetCenter(tmp_path)
    agent = AgentProc(tmp_path, c, "a1", "--allow-command-prefix", "/bin/",
                      "--allow-command-prefix", "/usr/bin/tr")
    try:
        c.write("inventory.yaml", "apiVersion: cronfile/v1\nagents:\n  a1: {}\n")
        c.write("jobs.yaml", f"""\
            apiVersion: cronfile/v1
            defaults:
              targets: {{agents: [a1], transport: tcp}}
            jobs:
              allowed:
                schedule: {EVERY_SECOND}
                command: ["/bin/sh", "-c", "echo allowed"]
              other-program:
                schedule: {EVERY_SECOND}
                command: ["/usr/sbin/nologin"]
              shell-string:
                schedule: {EVERY_SECOND}
                command: "touch {witness}"
              dotdot:
                schedule: {EVERY_SECOND}
                command: ["/bin/../usr/bin/touch", "{witness}"]
              worker:
                kind: daemon
                command: ["/usr/sbin/nologin"]
            """)
        c.start()
        agent.start()
        runs = c.until(lambda rs: all(_reached(rs, j) for j in (
            "allowed", "other-program", "shell-string", "dotdot")), 15,
            "every job to reach the agent")
        ok = _reached(runs, "allowed")[0]
        assert ok["status"] == "succeeded" and ok["output_tail"] == "allowed\n"
        reasons = {j: (_reached(runs, j)[0]["status"], _reached(runs, j)[0].get("reason"))
                   for j in ("other-program", "shell-string", "dotdot")}
        assert reasons == {
            "other-program": ("failed", "command /usr/sbin/nologin not allowed on this agent"),
            "shell-string": ("failed", "a shell command is not allowed on this agent "
                                       "(--allow-command-prefix is set)"),
            "dotdot": ("failed", "command /bin/../usr/bin/touch not allowed on this agent"),
        }
        assert not witness.exists()
        daemon = wait_for(lambda: [d for d in _daemons(c) if d.get("name") == "worker"], 10,
                          "the daemon's state in agents.json")[0]
        assert daemon["state"] == "refused"
        assert daemon["reason"] == "command /usr/sbin/nologin not allowed on this agent"
    finally:
        c.stop()
        agent.stop()
