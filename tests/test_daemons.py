"""DaemonSupervisor with the real local executor: replicas, restarts, backoff, stop."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable

from cronfile.schedules.model import RestartPolicy, RestartPolicyKind, RunStatus
from cronfile.transports.daemons import DaemonSupervisor, ReplicaState
from cronfile.transports.executor import RunOutcome, RunRequest
from cronfile.transports.local import LocalExecutor


def daemon(command: str, **kwargs: object) -> RunRequest:
    fields: dict[str, object] = {"run_id": "d1", "job": "web", "command": command}
    fields.update(kwargs)
    return RunRequest(**fields)  # type: ignore[arg-type]


class Exits:
    """Collects on_exit calls with the loop time, and lets a test wait for N of them."""

    def __init__(self) -> None:
        self.items: list[tuple[float, int, RunOutcome]] = []
        self._changed = asyncio.Event()

    def __call__(self, index: int, outcome: RunOutcome) -> None:
        self.items.append((asyncio.get_running_loop().time(), index, outcome))
        self._changed.set()

    async def wait_for(self, count: int, within_s: float = 5.0) -> None:
        async def until() -> None:
            while len(self.items) < count:
                self._changed.clear()
                await self._changed.wait()

        await asyncio.wait_for(until(), within_s)


async def eventually(check: Callable[[], bool], within_s: float = 5.0) -> None:
    async def until() -> None:
        while not check():
            await asyncio.sleep(0.01)

    await asyncio.wait_for(until(), within_s)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_replicas_run_and_stop_kills_them() -> None:
    async def go() -> None:
        exits = Exits()
        sup = DaemonSupervisor(
            LocalExecutor(), daemon("exec sleep 1000"), replicas=3, on_exit=exits
        )
        await sup.start()
        await eventually(lambda: all(s.state is ReplicaState.RUNNING for s in sup.status()))
        status = sup.status()
        pids = [s.pid for s in status]
        assert len(set(pids)) == 3 and all(p is not None and alive(p) for p in pids)
        assert [s.run_id for s in status] == ["d1.0.1", "d1.1.1", "d1.2.1"]
        await asyncio.wait_for(sup.stop(grace_s=1), 5)
        assert not sup.running
        assert sorted(i for _, i, _ in exits.items) == [0, 1, 2]
        assert all(o.status is RunStatus.KILLED for _, _, o in exits.items)
        assert all(s.state is ReplicaState.STOPPED and s.pid is None for s in sup.status())
        assert not any(alive(p) for p in pids if p is not None)

    asyncio.run(go())


def test_replica_index_is_in_the_environment() -> None:
    async def go() -> list[str]:
        exits = Exits()
        policy = RestartPolicy(RestartPolicyKind.ON_FAILURE, backoff_s=0.01)
        sup = DaemonSupervisor(
            LocalExecutor(), daemon('echo "$CRONFILE_REPLICA"'), 2, policy, on_exit=exits
        )
        await sup.start()
        await exits.wait_for(2)
        await sup.stop(grace_s=1)
        return sorted(o.output_tail for _, _, o in exits.items)

    assert asyncio.run(go()) == ["0\n", "1\n"]


def test_crash_loop_restarts_with_doubling_capped_backoff() -> None:
    async def go() -> None:
        exits = Exits()
        policy = RestartPolicy(RestartPolicyKind.ALWAYS, backoff_s=0.05, max_backoff_s=0.2)
        sup = DaemonSupervisor(LocalExecutor(), daemon("exit 1"), restart=policy, on_exit=exits)
        await sup.start()
        await exits.wait_for(6)
        await sup.stop(grace_s=1)
        times = [t for t, _, _ in exits.items]
        gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
        # each gap is at least the backoff: 0.05, 0.1, 0.2, 0.2 (capped), 0.2
        for gap, expected in zip(gaps, [0.05, 0.1, 0.2, 0.2, 0.2], strict=False):
            assert gap >= expected * 0.9, (gaps, expected)
        assert all(o.status is RunStatus.FAILED and o.exit_code == 1 for _, _, o in exits.items)
        assert sup.status()[0].restarts >= 5

    asyncio.run(go())


def test_backoff_resets_after_a_stable_run() -> None:
    policy = RestartPolicy(backoff_s=5, max_backoff_s=300)
    sup = DaemonSupervisor(LocalExecutor(), daemon("true"), restart=policy)
    assert [sup._backoff(n) for n in (0, 1, 2, 3, 4, 10, 100)] == [5, 5, 10, 20, 40, 300, 300]

    async def go() -> None:
        exits = Exits()
        quick = RestartPolicy(backoff_s=0.2, max_backoff_s=10)
        stable = DaemonSupervisor(
            LocalExecutor(), daemon("sleep 0.1; exit 1"), restart=quick, on_exit=exits,
            stable_after_s=0.05,
        )
        await stable.start()
        await exits.wait_for(4)
        await stable.stop(grace_s=1)
        times = [t for t, _, _ in exits.items]
        gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
        # runs of 0.1 s count as stable, so the delay never doubles: each gap is ~0.1 s of
        # run + 0.2 s of backoff (doubling would make them 0.3, 0.5, 0.9)
        assert all(0.25 < gap < 0.7 for gap in gaps), gaps

    asyncio.run(go())


def test_on_failure_does_not_restart_after_success() -> None:
    async def go() -> None:
        exits = Exits()
        policy = RestartPolicy(RestartPolicyKind.ON_FAILURE, backoff_s=0.01)
        sup = DaemonSupervisor(LocalExecutor(), daemon("true"), restart=policy, on_exit=exits)
        await sup.start()
        await eventually(lambda: not sup.running)
        assert len(exits.items) == 1
        assert sup.status()[0].state is ReplicaState.EXITED
        assert sup.status()[0].restarts == 0
        await sup.stop(grace_s=1)

    asyncio.run(go())


def test_on_failure_restarts_after_failure() -> None:
    async def go() -> None:
        exits = Exits()
        policy = RestartPolicy(RestartPolicyKind.ON_FAILURE, backoff_s=0.01)
        sup = DaemonSupervisor(LocalExecutor(), daemon("exit 3"), restart=policy, on_exit=exits)
        await sup.start()
        await exits.wait_for(3)
        await sup.stop(grace_s=1)
        assert sup.status()[0].restarts >= 2

    asyncio.run(go())


def test_refused_start_is_reported_and_backs_off() -> None:
    async def go() -> None:
        exits = Exits()
        policy = RestartPolicy(backoff_s=0.1, max_backoff_s=1)
        sup = DaemonSupervisor(
            LocalExecutor(), daemon("true", workdir="/no/such/dir"), restart=policy, on_exit=exits
        )
        await sup.start()
        await exits.wait_for(2)
        await asyncio.sleep(0.25)  # a window in which a fork storm would be thousands of tries
        await sup.stop(grace_s=1)
        assert 2 <= len(exits.items) <= 4
        outcome = exits.items[0][2]
        assert outcome.status is RunStatus.FAILED
        assert outcome.reason == "workdir /no/such/dir does not exist"

    asyncio.run(go())


def test_stop_during_backoff_returns_at_once() -> None:
    async def go() -> None:
        policy = RestartPolicy(backoff_s=100, max_backoff_s=100)
        exits = Exits()
        sup = DaemonSupervisor(LocalExecutor(), daemon("exit 1"), restart=policy, on_exit=exits)
        await sup.start()
        await exits.wait_for(1)
        await eventually(lambda: sup.status()[0].state is ReplicaState.BACKOFF)
        assert sup.status()[0].next_start_in_s == 100
        await asyncio.wait_for(sup.stop(grace_s=1), 2)
        assert sup.status()[0].state is ReplicaState.STOPPED
        assert len(exits.items) == 1

    asyncio.run(go())


def test_failing_callback_does_not_stop_the_daemon() -> None:
    async def go() -> None:
        calls: list[int] = []

        async def on_exit(index: int, outcome: RunOutcome) -> None:
            calls.append(index)
            raise RuntimeError("recording failed")

        policy = RestartPolicy(backoff_s=0.01)
        sup = DaemonSupervisor(LocalExecutor(), daemon("exit 1"), restart=policy, on_exit=on_exit)
        await sup.start()
        await eventually(lambda: len(calls) >= 3)
        await sup.stop(grace_s=1)

    asyncio.run(go())
