"""Fault injection for black-box fleet tests, and the checker of SPEC §2/§5's promise.

* :class:`FaultProxy` sits between agents and the center (real TCP on 127.0.0.1) and can
  *cut* every connection (RST), *blackhole* them (accept and hold, forward nothing, as a
  dead route does) or *stall* them (hold the bytes, deliver them later, as a congested
  link does).
* :class:`FaultRun` drives a center and agents through a seeded random sequence of faults:
  SIGKILL of the center (also in crash loops faster than a heartbeat), SIGKILL and SIGSTOP
  of agents, proxy faults, torn ledger tails.
* :func:`check_ledger` reads ``runs.jsonl`` and the marks the jobs write, and lists every
  broken promise: a slot of a target with no final record or with two; a slot that ran
  twice; a ``succeeded`` with no execution behind it.

Every wait is bounded polling of something observable; randomness comes from one seed,
printed with every failure so that a failing sequence can be replayed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import Enum
from pathlib import Path
from typing import Any

from centerlib import finished, parse_ts, read_jsonl, wait_for
from fleetlib import AgentProc, FleetCenter, free_port

# --------------------------------------------------------------------------- the proxy


class LinkMode(Enum):
    """What the proxy does with the bytes of its connections."""

    PASS = "pass"
    """Forward both ways."""
    BLACKHOLE = "blackhole"
    """Accept connections, forward nothing, drop what arrives: a dead route (no FIN, no
    RST), which only heartbeats can detect."""
    STALL = "stall"
    """Hold what arrives and deliver it when the mode goes back to PASS."""


class FaultProxy:
    """A TCP proxy on 127.0.0.1 to ``target_port``, with its own event loop in a thread."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.mode = LinkMode.PASS
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name="fault-proxy")
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._resumed: asyncio.Event | None = None

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        self._call(self._start())
        return self

    def __exit__(self, *exc: object) -> None:
        self._call(self._stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._loop.close()

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=10)

    async def _start(self) -> None:
        self._resumed = asyncio.Event()
        self._resumed.set()
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)

    async def _stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()

    # ---- the faults (called from the test's thread)

    def cut(self) -> None:
        """Reset every connection now (both sides see the connection drop)."""
        def abort_all() -> None:
            for writer in list(self._writers):
                writer.transport.abort()
        self._loop.call_soon_threadsafe(abort_all)

    def set_mode(self, mode: LinkMode) -> None:
        def apply() -> None:
            self.mode = mode
            assert self._resumed is not None
            if mode is LinkMode.STALL:
                self._resumed.clear()
            else:
                self._resumed.set()
        self._loop.call_soon_threadsafe(apply)

    # ---- forwarding

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            self._writers.discard(writer)
            writer.transport.abort()
            return
        self._writers.add(up_writer)
        pumps = [asyncio.ensure_future(self._pump(reader, up_writer)),
                 asyncio.ensure_future(self._pump(up_reader, writer))]
        await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        for pump in pumps:
            pump.cancel()
        for w in (writer, up_writer):
            self._writers.discard(w)
            w.transport.abort()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert self._resumed is not None
        with contextlib.suppress(ConnectionError, OSError):
            while True:
                data = await reader.read(65536)
                if not data:
                    return
                if self.mode is LinkMode.BLACKHOLE:
                    continue  # dropped on the floor, the sender never knows
                await self._resumed.wait()
                if self.mode is LinkMode.BLACKHOLE:
                    continue
                writer.write(data)
                await writer.drain()


# --------------------------------------------------------------------------- the checker

MARK_LINE = '"$CRONFILE_JOB" "$CRONFILE_SCHEDULED_AT" "$CRONFILE_STATE_DIR" "$CRONFILE_RUN_ID"'
"""Where a run ran comes from its state directory: ``agent-NAME`` for agent NAME (see
:class:`~fleetlib.AgentProc`), the center's own for ``local`` (jobs get a minimal
environment: nothing of the agent's own is inherited)."""


def _target_of(state_dir: str) -> str:
    name = Path(state_dir).name
    return name.removeprefix("agent-") if name.startswith("agent-") else "local"


def mark_command(marks: Path) -> str:
    """A job command that appends one mark per real execution: job, slot, target, run id
    (one short O_APPEND write: lines from concurrent runs never interleave)."""
    return f"printf '%s %s %s %s\\n' {MARK_LINE} >> {marks}"


@dataclass(frozen=True)
class Mark:
    job: str
    slot: float
    agent: str
    run_id: str


def read_marks(path: Path) -> list[Mark]:
    out: list[Mark] = []
    with contextlib.suppress(FileNotFoundError):
        for line in path.read_text().splitlines():
            parts = line.split()
            if len(parts) == 4 and (slot := parse_ts(parts[1])) is not None:
                out.append(Mark(parts[0], round(slot), _target_of(parts[2]), parts[3]))
    return out


@dataclass
class Verdict:
    """What :func:`check_ledger` found; ``problems`` empty means every promise held."""

    slots: int = 0
    problems: list[str] = field(default_factory=list)
    statuses: Counter[str] = field(default_factory=Counter)

    def summary(self, limit: int = 25) -> str:
        head = f"{self.slots} slot/targets checked, outcomes {dict(self.statuses)}"
        if not self.problems:
            return head + ": all promises held"
        return "\n  ".join([f"{head}: {len(self.problems)} problems", *self.problems[:limit]])


def _covered_slots(record: dict[str, Any], slots: list[float]) -> list[float]:
    """The slots one final record speaks for: one, or a bounded range (``missed``)."""
    first = parse_ts(record.get("first_scheduled_at")) or parse_ts(record.get("scheduled_at"))
    last = parse_ts(record.get("last_scheduled_at")) or first
    if first is None or last is None:
        return []
    return [s for s in slots if first - 0.001 <= s <= last + 0.001]


def check_ledger(runs: list[dict[str, Any]], marks: list[Mark] | None,
                 targets: dict[str, list[str]], window: tuple[float, float]) -> Verdict:
    """Every slot (whole seconds: the jobs fire every second) of every target of every job in
    ``targets`` inside ``window`` has exactly one final record; no slot ran twice; every
    ``succeeded`` has a mark with its run id. A record that supersedes a ``lost`` one
    replaces it (SPEC §5: the real outcome delivered late). ``marks`` None: the jobs write
    none, only the records are checked."""
    lo, hi = window
    slots = [float(s) for s in range(int(lo) + 1, int(hi))]
    verdict = Verdict()
    finals: dict[tuple[str, float, str], list[str]] = defaultdict(list)
    for record in finished(runs):
        job = record.get("job")
        if job not in targets or int(record.get("attempt") or 1) != 1:
            continue
        agent = str(record.get("agent") or "")
        named = [a for a in agent.split(",") if a in targets[job]]
        if not named and ("," in agent or "=" in agent):
            named = list(targets[job])  # it names what the job asked for: every target
        status = str(record.get("status"))
        for slot in _covered_slots(record, slots):
            for agent in named:
                key = (job, slot, agent)
                if record.get("supersedes") == "lost" and "lost" in finals[key]:
                    finals[key].remove("lost")
                finals[key].append(status)
    ran = Counter((m.job, float(m.slot), m.agent) for m in marks or [])
    marked_ids = {m.run_id for m in marks or []}
    for job, agents in targets.items():
        for slot in slots:
            for agent in agents:
                verdict.slots += 1
                got = finals.get((job, slot, agent), [])
                when = datetime.fromtimestamp(slot, UTC).strftime("%H:%M:%S")
                if len(got) != 1:
                    verdict.problems.append(f"{job} {when} on {agent}: {len(got)} final "
                                            f"records {got}")
                for status in got:
                    verdict.statuses[status] += 1
                if ran[(job, slot, agent)] > 1:
                    verdict.problems.append(f"{job} {when} on {agent}: ran "
                                            f"{ran[(job, slot, agent)]} times")
    for record in finished(runs, status="succeeded") if marks is not None else []:
        if record.get("job") in targets and record.get("run_id") not in marked_ids:
            verdict.problems.append(f"{record.get('job')} {record.get('scheduled_at')} on "
                                    f"{record.get('agent')}: succeeded without an execution")
    return verdict


# --------------------------------------------------------------------------- the faults


def tear_tail(path: Path, rng: random.Random) -> None:
    """Append half a record, as a power cut in the middle of a write leaves it."""
    if path.exists():
        with open(path, "ab") as f:
            f.write(b'{"v": 1, "ts": "2026-01-01T00:00:00Z", "record": "fini'[: rng.randint(3, 40)])


def sigstop_for(pid: int, seconds: float) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGSTOP)
    time.sleep(seconds)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGCONT)


class FaultRun:
    """A center and agents behind one :class:`FaultProxy`, and a seeded sequence of faults.

    ``step()`` performs one random fault and heals it before returning (a stopped process is
    continued, a dead one restarted, the link set back to PASS), so at any moment between
    steps the fleet is whole again.
    """

    def __init__(self, root: Path, seed: int, agents: list[str], heartbeat: float = 0.5,
                 lease: float = 3.0) -> None:
        self.root = root
        self.seed = seed
        self.rng = random.Random(seed)
        self.center = FleetCenter(root, heartbeat=heartbeat, lease=lease)
        self.heartbeat = heartbeat
        self.agent_names = agents
        self.proxy = FaultProxy(self.center.port)
        self.agents: dict[str, AgentProc] = {}
        self.log: list[str] = []

    def start(self) -> None:
        self.proxy.__enter__()
        self.center.start()
        for name in self.agent_names:
            # a center in a crash loop must not push agents' reconnect backoff to minutes
            agent = AgentProc(self.root, self.center, name, "--backoff-max", "2",
                              port=self.proxy.port)
            self.agents[name] = agent
            agent.start()

    def close(self) -> None:
        for proc in [self.center, *self.agents.values()]:
            with contextlib.suppress(Exception):
                proc.stop()
        self.proxy.__exit__()

    def note(self, what: str) -> None:
        self.log.append(f"{time.strftime('%H:%M:%S')} {what}")

    # ---- individual faults

    def kill_center(self) -> None:
        pause = self.rng.uniform(0.0, 1.5)
        self.note(f"SIGKILL center, restart after {pause:.2f}s")
        self.center.kill()
        if self.rng.random() < 0.3:
            tear_tail(self.center.runs_path, self.rng)
            self.note("torn runs.jsonl tail")
        time.sleep(pause)
        self.center.start()

    def crash_loop(self) -> None:
        """Kill the center again and again, each life shorter than a heartbeat."""
        lives = self.rng.randint(2, 4)
        self.note(f"crash loop: {lives} lives")
        for _ in range(lives):
            self.center.kill()
            self.center.start(wait=False)
            time.sleep(self.rng.uniform(0.05, self.heartbeat))
        self.center.kill()
        self.center.start()

    def kill_agent(self) -> None:
        agent = self.agents[self.rng.choice(self.agent_names)]
        pause = self.rng.uniform(0.0, 1.5)
        self.note(f"SIGKILL agent {agent.name}, restart after {pause:.2f}s")
        agent.kill()
        time.sleep(pause)
        agent.start(wait=False)

    def stop_agent(self) -> None:
        agent = self.agents[self.rng.choice(self.agent_names)]
        seconds = self.rng.uniform(0.3, 4 * self.heartbeat)
        self.note(f"SIGSTOP agent {agent.name} for {seconds:.2f}s")
        sigstop_for(agent.pid, seconds)

    def cut_links(self) -> None:
        self.note("cut every agent connection")
        self.proxy.cut()

    def dark_link(self) -> None:
        mode = self.rng.choice([LinkMode.BLACKHOLE, LinkMode.STALL])
        seconds = self.rng.uniform(0.3, 5 * self.heartbeat)
        self.note(f"{mode.value} the links for {seconds:.2f}s")
        self.proxy.set_mode(mode)
        time.sleep(seconds)
        self.proxy.set_mode(LinkMode.PASS)
        if mode is LinkMode.BLACKHOLE:
            self.proxy.cut()  # what was dropped is gone: both ends must notice

    def step(self) -> None:
        faults: list[tuple[float, Callable[[], None]]] = [
            (3, self.kill_center), (1, self.crash_loop), (2, self.kill_agent),
            (2, self.stop_agent), (1, self.cut_links), (2, self.dark_link)]
        fault = self.rng.choices([f for _, f in faults], weights=[w for w, _ in faults])[0]
        fault()
        time.sleep(self.rng.uniform(0.2, 1.5))

    def heal(self, timeout: float = 20.0) -> None:
        """Everything up and every agent connected again."""
        self.proxy.set_mode(LinkMode.PASS)
        for agent in self.agents.values():
            assert agent.proc is not None
            with contextlib.suppress(ProcessLookupError):
                os.kill(agent.pid, signal.SIGCONT)
            if agent.proc.poll() is not None:
                agent.start(wait=False)

        def all_connected() -> bool:
            names = {a.get("name") for a in _read_json_list(self.center.state / "agents.json")}
            return set(self.agent_names) <= names

        wait_for(all_connected, timeout, "every agent to be connected again")

    def window_closed(self, until: float, targets: dict[str, list[str]],
                      timeout: float = 30.0) -> list[dict[str, Any]]:
        """Wait until every slot before ``until`` has a final record (or ``timeout``): the
        fleet is whole, so anything still missing then is missing for good."""
        wanted = {(job, agent) for job, agents in targets.items() for agent in agents}

        def settled() -> list[dict[str, Any]] | None:
            runs = self.center.runs()
            done = {(r.get("job"), a) for r in finished(runs)
                    if (parse_ts(r.get("last_scheduled_at") or r.get("scheduled_at")) or 0) >= until
                    for a in str(r.get("agent")).split(",")}
            return runs if wanted <= done else None

        with contextlib.suppress(AssertionError):
            return wait_for(settled, timeout, "the last slots of the window to be recorded")
        return self.center.runs()

    def describe(self) -> str:
        return f"seed {self.seed} (replay: CRONFILE_FAULT_SEED={self.seed})\n  " + \
            "\n  ".join(self.log)


def _read_json_list(path: Path) -> list[dict[str, Any]]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


__all__ = ["FaultProxy", "FaultRun", "LinkMode", "Mark", "Verdict", "check_ledger",
           "mark_command", "read_jsonl", "read_marks", "sigstop_for", "tear_tail"]
