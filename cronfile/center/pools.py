"""Places: the fleet-wide caps of pools (``pools:``, job ``pool:``) and of agents (inventory
``max_running:``), with the runs that wait for a place. No I/O, no clock of its own.

Only the center can enforce these caps: it is the one that knows every run in flight on
every host. A run takes one place in its job's pool and one on its agent before it is
dispatched and gives them back when its outcome is known. A run that finds either full
waits; waiting runs get their places in scheduled-time order (oldest first), and one that
waits past its ``starting_deadline`` (default :data:`DEFAULT_POOL_WAIT_S`) comes back as
expired, for the center to record ``missed``.

Jobs without a pool on agents without a cap never reach the gate's bookkeeping: a center
without caps pays one attribute test per start (see ``bench/center_dispatch.py --pool``).
"""

from __future__ import annotations

import bisect
import heapq
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cronfile.center.routing import Target
from cronfile.center.scheduler import StartRun
from cronfile.schedules.model import DEFAULT_POOL_WAIT_S, Job, Pool

Start = tuple[StartRun, Target]


@dataclass(frozen=True, slots=True)
class Waiting:
    """A start that found its pool or its agent full."""

    scheduled_at: float
    seq: int
    deadline: float  # epoch seconds: recorded missed when still waiting after this
    start: Start
    since: float  # when it began to wait
    wait_s: float  # its starting_deadline, or the default

    @property
    def job(self) -> Job:
        return self.start[0].job

    @property
    def agent(self) -> str:
        return self.start[1].agent

    def missed_reason(self, agent_cap: int | None, iso: Callable[[float], str | None]) -> str:
        """The ``reason`` of its ``missed`` record: which places it waited for, how long."""
        job = self.job
        full = []
        if job.pool is not None:
            full.append(f"pool {job.pool.name} (max_running {job.pool.max_running})")
        if agent_cap is not None:
            full.append(f"agent {self.agent} (max_running {agent_cap})")
        return (f"no place in {' or '.join(full)} within starting_deadline ({self.wait_s:g}s); "
                f"waited since {iso(self.since)}")

    @property
    def token(self) -> str:
        """Counts as a run of its job while it waits (for ``concurrency``)."""
        return f"waiting-for-place-{self.seq}"


@dataclass
class PlaceGate:
    """Counts the places in use and holds the starts that wait for one."""

    agent_caps: dict[str, int] = field(default_factory=dict)
    pool_use: dict[str, int] = field(default_factory=dict)
    agent_use: dict[str, int] = field(default_factory=dict)
    # waiting starts by (scheduled time, arrival): the order places are given in
    _order: list[tuple[float, int]] = field(default_factory=list)
    _waiting: dict[int, Waiting] = field(default_factory=dict)
    _deadlines: list[tuple[float, int]] = field(default_factory=list)  # lazy-deleted heap
    _seq: itertools.count[int] = field(default_factory=itertools.count)
    version: int = 0  # bumped on every change: the center rewrites places.json when it moved

    def set_agent_caps(self, caps: dict[str, int]) -> None:
        """The inventory's ``max_running`` per agent (a reload may change them)."""
        self.agent_caps = caps

    def needs_place(self, job: Job, agent: str) -> bool:
        """Whether a run of ``job`` on ``agent`` counts against any cap."""
        return job.pool is not None or (bool(self.agent_caps) and agent in self.agent_caps)

    def _fits(self, job: Job, agent: str) -> bool:
        pool = job.pool
        if pool is not None and self.pool_use.get(pool.name, 0) >= pool.max_running:
            return False
        cap = self.agent_caps.get(agent)
        return cap is None or self.agent_use.get(agent, 0) < cap

    def _take(self, job: Job, agent: str) -> None:
        if job.pool is not None:
            self.pool_use[job.pool.name] = self.pool_use.get(job.pool.name, 0) + 1
        if agent in self.agent_caps:
            self.agent_use[agent] = self.agent_use.get(agent, 0) + 1

    def take(self, start: Start) -> bool:
        """Take the places of ``start`` when both are free (then dispatch it now)."""
        job, agent = start[0].job, start[1].agent
        if not self._fits(job, agent):
            return False
        self.version += 1
        self._take(job, agent)
        return True

    def wait(self, start: Start, now: float) -> Waiting:
        """Queue ``start`` until its places are free or its deadline passes.

        A scheduled slot's wait counts from its scheduled time, as ``starting_deadline``
        always does; any other start (manual, backfill, retry, trigger) from now: a
        backfilled slot of last month has not been waiting for a month."""
        action = start[0]
        job = action.job
        wait = job.starting_deadline_s if job.starting_deadline_s is not None else DEFAULT_POOL_WAIT_S
        begins = action.scheduled_at if action.reason == "schedule" else now
        seq = next(self._seq)
        waiting = Waiting(action.scheduled_at, seq, begins + wait, start, now, wait)
        self.version += 1
        self._waiting[seq] = waiting
        bisect.insort(self._order, (action.scheduled_at, seq))
        heapq.heappush(self._deadlines, (waiting.deadline, seq))
        return waiting

    def release(self, job: Job, agent: str) -> list[Waiting]:
        """A run of ``job`` on ``agent`` ended (or never started): give its places back, and
        return the waiting starts that now get theirs, oldest scheduled first."""
        if job.pool is not None:
            left = self.pool_use.get(job.pool.name, 0) - 1
            if left > 0:
                self.pool_use[job.pool.name] = left
            else:
                self.pool_use.pop(job.pool.name, None)
        if agent in self.agent_use:
            left = self.agent_use[agent] - 1
            if left > 0:
                self.agent_use[agent] = left
            else:
                del self.agent_use[agent]
        return self._admit(job.pool, agent) if self._waiting else []

    def _admit(self, pool: Pool | None, agent: str) -> list[Waiting]:
        """The waiting starts that fit now, in scheduled-time order, among those that need
        the pool or the agent whose place was just given back: no other start's chances
        changed. A start that does not fit does not hold back a later one that needs other
        places; the scan ends once the freed places are taken again (so a long queue costs
        a release little while its oldest start is the one that gets the place)."""
        admitted: list[Waiting] = []
        taken: list[tuple[float, int]] = []
        for key in self._order:
            waiting = self._waiting[key[1]]
            job = waiting.job
            in_pool = pool is not None and job.pool is not None and job.pool.name == pool.name
            if not in_pool and waiting.agent != agent:
                continue
            if self._fits(job, waiting.agent):
                self._take(job, waiting.agent)
                taken.append(key)
                admitted.append(waiting)
            if not self._room(pool, agent):
                break
        for key in taken:  # near the front as a rule: a bisect and a short memmove each
            del self._waiting[key[1]]
            del self._order[bisect.bisect_left(self._order, key)]
        return admitted

    def _room(self, pool: Pool | None, agent: str) -> bool:
        """Whether the pool or the agent of a release still has a free place."""
        if pool is not None and self.pool_use.get(pool.name, 0) < pool.max_running:
            return True
        cap = self.agent_caps.get(agent)
        return cap is not None and self.agent_use.get(agent, 0) < cap

    def expired(self, now: float) -> list[Waiting]:
        """The starts that waited past their deadline, no longer waiting (record them
        ``missed``)."""
        out: list[Waiting] = []
        while self._deadlines and self._deadlines[0][0] < now:
            _, seq = heapq.heappop(self._deadlines)
            waiting = self._waiting.pop(seq, None)
            if waiting is not None:
                out.append(waiting)
        if out:
            self.version += 1
            gone = {w.seq for w in out}
            self._order = [key for key in self._order if key[1] not in gone]
        return out

    def forget_job(self, name: str) -> list[Waiting]:
        """The waiting starts of a job that was removed: they will not run."""
        gone = [w for w in self._waiting.values() if w.job.name == name]
        for waiting in gone:
            del self._waiting[waiting.seq]
        if gone:
            seqs = {w.seq for w in gone}
            self._order = [key for key in self._order if key[1] not in seqs]
        return gone

    def waiting_count(self) -> int:
        return len(self._waiting)

    def snapshot(self, pools: dict[str, int], now: float) -> dict[str, Any]:
        """What ``status`` shows: each pool's cap, runs in flight and waiting starts (with
        the oldest waiting slot), and the same for each capped agent."""
        queued_pool: dict[str, list[Waiting]] = {}
        queued_agent: dict[str, list[Waiting]] = {}
        for key in self._order:
            waiting = self._waiting.get(key[1])
            if waiting is None:
                continue
            if waiting.job.pool is not None:
                queued_pool.setdefault(waiting.job.pool.name, []).append(waiting)
            if waiting.agent in self.agent_caps:
                queued_agent.setdefault(waiting.agent, []).append(waiting)

        def entry(cap: int, running: int, queue: list[Waiting]) -> dict[str, Any]:
            return {"max_running": cap, "running": running, "waiting": len(queue),
                    "oldest_waiting_since": min((w.since for w in queue), default=None),
                    "waiting_jobs": sorted({w.job.name for w in queue})[:20]}

        return {
            "pools": {name: entry(cap, self.pool_use.get(name, 0), queued_pool.get(name, []))
                      for name, cap in sorted(pools.items())},
            "agents": {name: entry(cap, self.agent_use.get(name, 0), queued_agent.get(name, []))
                       for name, cap in sorted(self.agent_caps.items())},
        }
