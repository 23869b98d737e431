"""The ledger lasts (SPEC §8): a center's start-up, memory and queries on a long history,
against the same on an empty state directory, measured in the same run.

It generates (without running a center) a state directory holding N past runs (default
1,000,000: three records each, in the one-``runs.jsonl`` format of earlier versions, spread
over the 30 days before the last hour), then starts ``cronfile center`` on it twice: the
upgrade start (which takes the big file over) and a normal start. For the empty directory
and each start it prints (empty and normal starts: the median of three):

* start: process start -> the first ``revision_applied`` this center writes
  (target, normal start: <= 1.3x the empty start);
* RSS of the center once running (target: <= empty + 30 MB);
* ``cronfile runs --job j --limit 20`` and ``cronfile status`` (target: each <= 2x the same
  command on the empty directory);
* ``cronfile runs --since/--until`` over one hour three days back (same target);
* the upgrade start's time per million records.

Usage: ``python bench/ledger.py [--runs N] [--keep DIR]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from benchlib import stop_center

PY = sys.executable
JOB = "j"
JOBS = [JOB] + [f"job-{i:02d}" for i in range(19)]
SCHEDULE = """\
apiVersion: cronfile/v1
jobs:
  j:
    schedule: "*/5 * * * *"
    command: "true"
"""
REVISION = '{"content_hash":"3f1c0a9e2b7d4c65","git_commit":null}'
TAIL = json.dumps("processed batch; " * 20 + "done\n")


def iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")


def generate(state: Path, runs: int, end: float) -> int:
    """Write ``runs`` past runs (dispatched, started, finished) ending at ``end``; returns
    the number of records. Lines are formatted directly (as the center's encoder writes
    them) so a million runs take seconds, not minutes."""
    state.mkdir(parents=True)
    span = 30 * 86400.0
    step = span / runs
    start = end - span
    records = 0
    with open(state / "runs.jsonl", "w") as f:
        buf = []
        for i in range(runs):
            slot = start + i * step
            job = JOBS[i % len(JOBS)]
            run_id = f"{i:020x}"
            sched, began, ended = iso(slot), iso(slot + 0.02), iso(slot + 1.52)
            status, code = ("failed", 1) if i % 50 == 0 else ("succeeded", 0)
            base = (f'"run_id":"{run_id}","job":"{job}","agent":"local","transport":"local",'
                    f'"scheduled_at":"{sched}","attempt":1,"revision":{REVISION}')
            buf.append(f'{{"v":1,"ts":"{sched}",{base},"record":"dispatched"}}\n'
                       f'{{"v":1,"ts":"{began}",{base},"record":"started","started_at":"{began}",'
                       f'"pid":{1000 + i % 30000}}}\n'
                       f'{{"v":1,"ts":"{ended}",{base},"record":"finished","status":"{status}",'
                       f'"exit_code":{code},"signal":null,"started_at":"{began}",'
                       f'"finished_at":"{ended}","duration_s":1.5,"output_tail":{TAIL}}}\n')
            records += 3
            if len(buf) >= 10000:
                f.write("".join(buf))
                buf = []
        f.write("".join(buf))
    with open(state / "events.jsonl", "w") as f:
        for day in range(30):
            ts = iso(start + day * 86400.0)
            f.write(f'{{"v":1,"ts":"{ts}","event":"center_started","pid":1}}\n'
                    f'{{"v":1,"ts":"{ts}","event":"revision_applied","revision":{REVISION},'
                    f'"added":1,"changed":0,"removed":0}}\n')
            records += 2
    (state / "watermark").write_text(f"{end:.3f}\n")
    return records


def first_applied_after(events: Path, t0: float) -> bool:
    try:
        data = events.read_bytes()
    except FileNotFoundError:
        return False
    for line in data.splitlines():
        if b'"revision_applied"' in line:
            ts = json.loads(line).get("ts", "")
            if datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp() >= t0 - 0.002:
                return True
    return False


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def timed(argv: list[str], repeat: int = 3) -> float:
    """The best of ``repeat`` runs of a command (seconds)."""
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        subprocess.run(argv, check=True, capture_output=True)
        best = min(best, time.perf_counter() - t)
    return best


def measure(schedules: Path, state: Path, log: Path, window: tuple[str, str]) -> dict[str, float]:
    """Start a center on ``state``; time to its first revision_applied, RSS, the queries."""
    out: dict[str, float] = {}
    with open(log, "ab") as logf:
        t0 = time.time()
        proc = subprocess.Popen([PY, "-m", "cronfile", "center", "--schedules", str(schedules),
                                 "--state", str(state), "--no-watch"],
                                stdout=logf, stderr=subprocess.STDOUT)
        try:
            deadline = time.time() + 1800
            while not first_applied_after(state / "events.jsonl", t0):
                if proc.poll() is not None or time.time() > deadline \
                        or b"schedules rejected" in log.read_bytes():
                    raise SystemExit(f"center did not apply its revision; see {log}")
                time.sleep(0.005)
            out["start_s"] = time.time() - t0
            time.sleep(2.0)  # settle: the first ticks, the applied-state writer
            out["rss_mb"] = rss_mb(proc.pid)
            cli = [PY, "-m", "cronfile"]
            out["runs_s"] = timed([*cli, "runs", "--job", JOB, "--limit", "20", "--state", str(state)])
            out["status_s"] = timed([*cli, "status", "--state", str(state)])
            out["window_s"] = timed([*cli, "runs", "--since", window[0], "--until", window[1],
                                     "--state", str(state)])
        finally:
            stop_center(proc, 120)
    return out


STARTS = 3
"""Empty and normal starts are measured this many times (median): the machine is shared."""


def median_of(results: list[dict[str, float]]) -> dict[str, float]:
    return {key: statistics.median(r[key] for r in results) for key in results[0]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=1_000_000)
    parser.add_argument("--keep", type=Path, help="work here and keep it (default: a temp dir)")
    args = parser.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="cronfile-bench-ledger-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        schedules = work / "schedules"
        schedules.mkdir(exist_ok=True)
        (schedules / "bench.yaml").write_text(SCHEDULE)
        now = time.time()
        window = (iso(now - 3 * 86400), iso(now - 3 * 86400 + 3600))
        empty, big = work / "empty", work / "big"
        for d in (empty, big):
            shutil.rmtree(d, ignore_errors=True)
        t = time.perf_counter()
        records = generate(big, args.runs, now - 3600)
        size = (big / "runs.jsonl").stat().st_size
        print(f"generated {args.runs:,} runs ({records:,} records, {size / 1e6:.0f} MB runs.jsonl) "
              f"in {time.perf_counter() - t:.1f}s", flush=True)
        os.sync()  # the generated file is on disk before anything is timed
        bases = []
        for _ in range(STARTS):
            shutil.rmtree(empty, ignore_errors=True)
            bases.append(measure(schedules, empty, work / "empty.log", window))
        base = median_of(bases)
        upgrade = measure(schedules, big, work / "upgrade.log", window)
        os.sync()  # the upgrade's writes settle: the normal start is timed on a quiet disk
        normal = median_of([measure(schedules, big, work / "normal.log", window)
                            for _ in range(STARTS)])
        print(f"(empty and normal: the median of {STARTS} starts each)")
        print(f"{'':<30} {'empty':>8} {'upgrade':>9} {'normal':>8} {'ratio':>7}  target")
        rows = [("start -> revision_applied (s)", "start_s", "<= 1.3x", 1.3, None),
                ("RSS (MB)", "rss_mb", "<= empty + 30 MB", None, 30.0),
                ("runs --job j --limit 20 (s)", "runs_s", "<= 2x", 2.0, None),
                ("status (s)", "status_s", "<= 2x", 2.0, None),
                ("runs --since/--until 1h, 3d ago", "window_s", "<= 2x", 2.0, None)]
        for label, key, target, ratio_max, plus_max in rows:
            ratio = normal[key] / base[key]
            met = ratio <= ratio_max if ratio_max else normal[key] <= base[key] + (plus_max or 0)
            extra = f"{normal[key] - base[key]:+.0f} MB" if plus_max else f"{ratio:.2f}x"
            print(f"{label:<30} {base[key]:>8.3f} {upgrade[key]:>9.3f} {normal[key]:>8.3f} "
                  f"{extra:>7}  {target} {'MET' if met else 'MISSED'}")
        print(f"upgrade start: {upgrade['start_s'] / (records / 1e6):.1f}s per million records "
              f"({upgrade['start_s'] / (args.runs / 1e6):.1f}s per million runs)")
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
