"""Benchmark the agent channel against the local executor, on loopback.

    .venv/bin/python bench/agents.py [--agents 20] [--runs 10000] [--pings 20000]

What it measures, in one process holding the center's side (an :class:`AgentHub`) with
``--agents`` agent processes connected to it:

* lateness: for each run, the time from its dispatch (the moment the scheduler hands it
  to an executor) to the child's start as reported by the host (``started_at``), for the
  same ``--runs`` runs of ``true`` (argv) dispatched at once, first on the
  :class:`LocalExecutor`, then spread round-robin over the agents; p50/p99 and the ratio;
* frames per second through one connection: pipelined ping -> pong round trips;
* the center's CPU seconds (``time.process_time``) per 1,000 dispatches, for both.

Everything is bounded: the whole benchmark aborts after ``--budget`` seconds (120).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchlib import percentile  # noqa: E402

from cronfile.schedules.model import Agent, RunStatus  # noqa: E402
from cronfile.transports.executor import Executor, RunHandle, RunOutcome, RunRequest  # noqa: E402
from cronfile.transports.hub import AgentHub  # noqa: E402
from cronfile.transports.local import LocalExecutor  # noqa: E402
from cronfile.transports.protocol import Ping, Secrets  # noqa: E402

SECRET = "bench-secret-5f0c2a9e7d41b3c8a6e2f9d0"


def raise_fd_limit() -> None:
    # 10,000 runs at once each hold a pipe and a pidfd until reaped.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def dispatch_all(
    executors: Sequence[Executor], n_runs: int, prefix: str
) -> tuple[list[float], list[RunOutcome], float, float, float]:
    """Dispatch ``n_runs`` runs of ``true`` at once, round-robin over ``executors``.

    Every run is due at the same instant ``t0`` (one busy minute of a big schedule), so a
    run's lateness is ``started_at - t0``: the queueing in front of it counts, whichever
    side of the wire it happens on. Returns the latenesses (seconds), the outcomes, how
    long the dispatch loop held the center, the wall time to the last outcome, and the CPU
    seconds this process spent.
    """
    cpu0 = time.process_time()
    wall0 = time.monotonic()
    t0 = datetime.now(UTC)
    tasks: list[asyncio.Task[RunHandle]] = []
    for i in range(n_runs):
        request = RunRequest(run_id=f"{prefix}-{i}", job="bench", command=("true",))
        tasks.append(asyncio.ensure_future(executors[i % len(executors)].start(request)))
        if i % 50 == 49:
            # A scheduler's loop yields between dispatches too; without it no exit could be
            # reaped until all 10,000 children exist.
            await asyncio.sleep(0)
    handles = await asyncio.gather(*tasks)
    dispatch_s = time.monotonic() - wall0
    outcomes = await asyncio.gather(*(h.wait() for h in handles))
    wall = time.monotonic() - wall0
    cpu = time.process_time() - cpu0
    lateness = [(o.started_at - t0).total_seconds() for o in outcomes]
    return lateness, outcomes, dispatch_s, wall, cpu


def describe(name: str, lateness: list[float], outcomes: list[RunOutcome], dispatch_s: float,
             wall: float, cpu: float, n_runs: int) -> dict[str, float]:
    bad = sum(o.status is not RunStatus.SUCCEEDED for o in outcomes)
    stats = {
        "p50": percentile(lateness, 50),
        "p99": percentile(lateness, 99),
        "wall": wall,
        "cpu_per_1000": cpu / n_runs * 1000,
    }
    print(f"{name:>7}: lateness p50 {stats['p50']:7.3f} s  p99 {stats['p99']:7.3f} s | "
          f"all started {dispatch_s:6.2f} s, last outcome {wall:6.2f} s | "
          f"center CPU {stats['cpu_per_1000']:.3f} s / 1000 dispatches"
          + (f" | {bad} NOT succeeded" if bad else ""))
    return stats


async def wait_connected(hub: AgentHub, names: list[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not all(hub.is_connected(n) for n in names):
        if time.monotonic() > deadline:
            missing = [n for n in names if not hub.is_connected(n)]
            raise RuntimeError(f"agents did not connect in time: {missing}")
        await asyncio.sleep(0.05)


async def frames_per_second(hub: AgentHub, name: str, count: int) -> float:
    """Pipelined pings through one connection; returns frames per second (both ways)."""
    conn = hub._conns[name]  # the benchmark looks inside on purpose
    base = conn.frames_in
    start = time.monotonic()
    for seq in range(count):
        conn.writer.write(conn.session.frame(Ping(seq=seq)))
        if seq % 500 == 499:
            await conn.writer.drain()
    await conn.writer.drain()
    while conn.frames_in - base < count:
        await asyncio.sleep(0.001)
    elapsed = time.monotonic() - start
    return 2 * count / elapsed


async def bench(args: argparse.Namespace, tmp: Path) -> None:
    names = [f"bench-{i:02d}" for i in range(args.agents)]
    token = tmp / "token"
    token.write_text(SECRET + "\n")
    token.chmod(0o600)

    # 1. The local executor, alone in this process.
    local = LocalExecutor()
    local_stats = describe("local", *await dispatch_all([local], args.runs, "local"),
                           n_runs=args.runs)

    # 2. The same runs through agents.
    hub = AgentHub(
        "127.0.0.1", 0,
        inventory={n: Agent(n) for n in names},
        secrets=Secrets(shared=SECRET.encode()),
        heartbeat_s=10.0, lease_s=120.0, start_timeout_s=120.0,
    )
    await hub.start()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for name in names:
            log = open(tmp / f"{name}.log", "wb")  # noqa: SIM115 - the child owns it
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "cronfile", "agent", "--center", f"127.0.0.1:{hub.port}",
                 "--name", name, "--token-file", str(token), "--state", str(tmp / name),
                 "--log-level", "WARNING"],
                stdout=log, stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONPATH": str(REPO)},
            ))
            log.close()
        await wait_connected(hub, names, 30)
        fps = await frames_per_second(hub, names[0], args.pings)
        executors = [hub.executor_for(n) for n in names]
        assert all(executors)
        remote_stats = describe(
            "agents",
            *await dispatch_all([e for e in executors if e is not None], args.runs, "remote"),
            n_runs=args.runs,
        )
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                await asyncio.to_thread(proc.wait, 15)
            except subprocess.TimeoutExpired:
                proc.kill()
        await hub.close()

    print(f"  ratio: agents / local lateness  p50 x{remote_stats['p50'] / local_stats['p50']:.2f}"
          f"   p99 x{remote_stats['p99'] / local_stats['p99']:.2f}"
          f"   center CPU x{remote_stats['cpu_per_1000'] / local_stats['cpu_per_1000']:.2f}")
    print(f" frames: {fps:,.0f} frames/s through one connection "
          f"({fps / 2:,.0f} ping/pong round trips/s, pipelined)")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--agents", type=int, default=20)
    parser.add_argument("--runs", type=int, default=10_000)
    parser.add_argument("--pings", type=int, default=20_000)
    parser.add_argument("--budget", type=float, default=120.0, help="abort after this long")
    args = parser.parse_args(argv)
    raise_fd_limit()
    print(f"cronfile agents bench: {args.agents} agents, {args.runs} runs of `true`, "
          f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}")
    with tempfile.TemporaryDirectory(prefix="cronfile-bench-") as tmp:
        try:
            asyncio.run(asyncio.wait_for(bench(args, Path(tmp)), args.budget))
        except TimeoutError:
            print(f"aborted: the benchmark took longer than {args.budget:g} s", file=sys.stderr)
            return 1
    return 0



if __name__ == "__main__":
    sys.exit(main())
