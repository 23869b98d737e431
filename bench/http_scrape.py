"""Benchmark the HTTP side of a big center: what a scrape costs and whether it holds up dispatch.

    .venv/bin/python bench/http_scrape.py [--jobs 10000] [--ledger 100000] [--burst 1000]

A center runs in this process (so the event loop can be watched) on ``--jobs`` jobs, of which
``--burst`` fire together every 10 seconds, with ``--ledger`` finished runs already in its
ledger. A separate client process (so its work is not on this process's GIL) requests
``/api/v1/status``, ``/metrics`` and ``/`` (the dashboard). Measured:

* each endpoint's time to a complete response, and the longest event-loop stall while it
  is served (a 2 ms ticker's overshoot), starting just after a burst (a request that takes
  longer than the gap overlaps the next burst, whose own stall then counts);
* bursts without scrapes and bursts with the client scraping all three in a loop: the
  dispatch lateness p99 (``started_at - scheduled_at``) and the longest stall, alternated
  so both see the same machine; the ratio of the medians.

Targets (issue 13): no stall > 50 ms from a scrape; lateness p99 with scrapes <= 1.1x without.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchlib import parse_iso, percentile  # noqa: E402

from cronfile.center.daemon import Center, CenterOptions  # noqa: E402
from cronfile.center.options import HttpOptions  # noqa: E402

TOKEN = "bench-token-0123456789abcdef"
PERIOD_S = 10

CLIENT = r"""
import json, sys, time, urllib.request
base, token, until, paths = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4:]
while True:  # at least one request per path, then until the deadline
    for path in paths:
        req = urllib.request.Request(base + path, headers={"Authorization": "Bearer " + token})
        began = time.time()
        with urllib.request.urlopen(req, timeout=120) as r:
            size = len(r.read())
        print(json.dumps([path, began, time.time(), size]), flush=True)
    if time.time() >= until:
        sys.exit(0)
"""


def write_schedules(root: Path, jobs: int, burst: int) -> Path:
    schedules = root / "schedules"
    schedules.mkdir()
    lines = ["apiVersion: cronfile/v1", "jobs:"]
    for i in range(jobs):
        when = f'"*/{PERIOD_S} * * * * *"' if i < burst else f'"{i % 60} {i % 24} * * *"'
        lines += [f"  job-{i:05d}:", f"    schedule: {when}", '    command: ["true"]',
                  f"    owner: team-{i % 20}"]
    (schedules / "jobs.yaml").write_text("\n".join(lines) + "\n")
    return schedules


def write_ledger(state: Path, runs: int, jobs: int) -> None:
    """``runs`` finished runs of the past days, three records each, as a center writes them."""
    state.mkdir()
    now = time.time() - 86400
    with open(state / "runs.jsonl", "w") as f:
        for i in range(runs):
            slot = now - (runs - i) * 3
            iso = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(slot))
            base = {"v": 1, "ts": iso, "run_id": f"old{i:012d}", "job": f"job-{i % jobs:05d}",
                    "agent": "local", "transport": "local", "scheduled_at": iso, "attempt": 1,
                    "revision": {"content_hash": "sha256:old", "git_commit": None}}
            f.write(json.dumps({**base, "record": "dispatched"}) + "\n")
            f.write(json.dumps({**base, "record": "started", "started_at": iso}) + "\n")
            f.write(json.dumps({**base, "record": "finished", "status": "succeeded",
                                "exit_code": 0, "signal": None, "started_at": iso,
                                "finished_at": iso, "duration_s": 0.01,
                                "output_tail": ""}) + "\n")


class Ticker:
    """Samples the loop's lateness every 2 ms: (wall time, overshoot in seconds)."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, float]] = []

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            began = loop.time()
            await asyncio.sleep(0.002)
            self.samples.append((time.time(), loop.time() - began - 0.002))

    def worst(self, start: float, end: float) -> float:
        return max((lag for t, lag in self.samples if start <= t <= end), default=0.0)


def burst_lateness(state: Path, slot: float) -> list[float]:
    out = []
    with open(state / "runs.jsonl", "rb") as f:
        f.seek(max(0, os.path.getsize(state / "runs.jsonl") - 4_000_000))
        for line in f:
            try:
                r = json.loads(line)
            except ValueError:
                continue
            if r.get("record") == "started" and r.get("scheduled_at"):
                at = parse_iso(r["scheduled_at"])
                if at is not None and abs(at - slot) < 0.001:
                    out.append((parse_iso(r["started_at"]) or at) - at)
    return out


async def main_async(args: argparse.Namespace) -> int:
    root = Path(tempfile.mkdtemp(prefix="cronfile-bench-http-"))
    schedules = write_schedules(root, args.jobs, args.burst)
    write_ledger(root / "state", args.ledger, args.jobs)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    center = Center(CenterOptions(schedules, root / "state", watch=False,
                                  http=HttpOptions("127.0.0.1", port, root / "token")))
    (root / "token").write_text(TOKEN)
    ticker = Ticker()
    tick_task = asyncio.create_task(ticker.run())
    center_task = asyncio.create_task(center.run_until_stopped())
    base = f"http://127.0.0.1:{port}"
    while center.http is None or center.http.bound is None:
        await asyncio.sleep(0.05)
    print(f"center up: {args.jobs} jobs ({args.burst} every {PERIOD_S}s), {args.ledger} runs "
          f"in the ledger", flush=True)

    def next_slot(after: float) -> float:
        return (int(after) // PERIOD_S + 1) * PERIOD_S

    async def client(paths: list[str], until: float) -> list[list[object]]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", CLIENT, base, TOKEN, str(until), *paths,
            stdout=asyncio.subprocess.PIPE)
        out, _ = await proc.communicate()
        return [json.loads(line) for line in out.splitlines()]

    # warm-up: the first dashboard computes the heatmap (cached per revision and hour)
    await client(["/"], time.time())

    # 1. each endpoint alone, between bursts
    print(f"\n{'endpoint':<16} {'requests':>8} {'p50 s':>8} {'max s':>8} {'bytes':>10} "
          f"{'worst stall ms':>15}")
    for path in ("/api/v1/status", "/metrics", "/"):
        slot = next_slot(time.time())
        await asyncio.sleep(max(0.0, slot + 1.5 - time.time()))  # just after a burst
        answers = await client([path], time.time() + 1.0)
        times = [end - began for _p, began, end, _s in answers]  # type: ignore[operator]
        stall = max(ticker.worst(a[1], a[2]) for a in answers)  # type: ignore[arg-type]
        print(f"{path:<16} {len(answers):>8} {statistics.median(times):>8.3f} {max(times):>8.3f} "
              f"{answers[-1][3]:>10} {stall * 1000:>15.1f}", flush=True)

    # 2. bursts alternately without and with scrapes
    quiet: list[float] = []
    loud: list[float] = []
    stalls: dict[str, list[float]] = {"without": [], "with": []}
    for round_ in range(args.rounds):
        for mode in ("without", "with"):
            slot = next_slot(time.time() + 1.0)
            if mode == "with":
                scrapes = asyncio.create_task(client(["/api/v1/status", "/metrics", "/"],
                                                     slot + 3.0))
            await asyncio.sleep(max(0.0, slot + 3.0 - time.time()))
            if mode == "with":
                await scrapes
            late = await asyncio.to_thread(burst_lateness, root / "state", slot)
            p99 = percentile(late, 99)
            (loud if mode == "with" else quiet).append(p99)
            stalls[mode].append(ticker.worst(slot - 0.5, slot + 3.0))
            print(f"round {round_ + 1} burst {mode:<7} scrapes: {len(late)} runs, lateness p99 "
                  f"{p99 * 1000:.1f} ms, worst stall {stalls[mode][-1] * 1000:.1f} ms", flush=True)

    q, w = statistics.median(quiet), statistics.median(loud)
    print(f"\nlateness p99, median of {args.rounds}: without scrapes {q * 1000:.1f} ms, with "
          f"{w * 1000:.1f} ms: ratio {w / q:.2f}x (target <= 1.1x)")
    print(f"worst stall during a burst: without scrapes {max(stalls['without']) * 1000:.1f} ms, "
          f"with {max(stalls['with']) * 1000:.1f} ms")

    # 3. cronfile status: through the API vs from the state directory (3 runs each, best)
    async def timed(*argv: str) -> float:
        best = float("inf")
        for _ in range(3):
            began = time.perf_counter()
            proc = await asyncio.create_subprocess_exec(
                str(Path(sys.executable).parent / "cronfile"), "status", *argv,
                stdout=asyncio.subprocess.DEVNULL, env={**os.environ, "CRONFILE_TOKEN": TOKEN})
            await proc.wait()
            best = min(best, time.perf_counter() - began)
        return best

    local = await timed("--state", str(root / "state"))
    remote = await timed("--center", base)
    print(f"cronfile status: --state {local:.2f}s, --center {remote:.2f}s: ratio "
          f"{remote / local:.2f}x (target <= 1.5x)")
    center.request_stop()
    await center_task
    tick_task.cancel()
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=10000)
    parser.add_argument("--ledger", type=int, default=100000)
    parser.add_argument("--burst", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # 1,000 runs in flight at once
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
