"""``cronfile center`` at scale: 100,000 jobs in 10,000 files (and 10,000 jobs in 1,000).

Figures (2 shared cores, noisy: medians of repeats), each beside a baseline of the same run:

(a) start-up: center process start -> ``revision_applied`` in events.jsonl (and the log line
    "center running"), vs a bare ``yaml.load(..., CSafeLoader)`` of the same files; target <= 2x;
(b) hot reload: one file written -> its ``revision_applied`` event; target <= 1 s (debounce
    included), at 10,000 and 100,000 jobs;
(c) event-loop stall during that reload, seen from OUTSIDE: a job firing every second, its
    dispatch lateness (started_at - scheduled_at in runs.jsonl) around the reload; target <= 50 ms;
(d) center RSS (VmRSS, and VmHWM) with all jobs loaded; target <= 250 MB.

Usage: python bench/center_scale.py [--quick] [--jobs 100000] [--reloads 3] [--keep DIR] [--only-big]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from benchlib import parse_iso, stop_center

PY = sys.executable
JOBS_PER_FILE = 10
ZONES = ["UTC", "UTC", "UTC", "Europe/Berlin", "America/New_York", "Asia/Tokyo",
         "Australia/Sydney", "America/Los_Angeles", "Europe/London", "Asia/Kolkata"]


def schedule_for(rng: random.Random) -> str:
    """A realistic mix, chosen so that few jobs fire during a few minutes of benchmark."""
    m, h = rng.randrange(60), rng.randrange(24)
    return rng.choice([
        f"{m} {h} * * *", f"{m} {h} * * *", f"{m} {h} * * 1-5", f"{m} {h} * * 0",
        f"{m} {h} 1 * *", f"{m} */6 * * *", "@daily", "@weekly", "H H * * *", "H 3 * * *",
        f"{rng.randrange(60)} {m} {h} * * *", f"{m} {h},{(h + 12) % 24} * * *",
    ])


def job_yaml(rng: random.Random, name: str) -> list[str]:
    lines = [f"  {name}:", f"    description: Generated job {name} for the scale benchmark.",
             f'    schedule: "{schedule_for(rng)}"']
    zone = rng.choice(ZONES)
    if zone != "UTC":
        lines.append(f"    timezone: {zone}")
    if rng.random() < 0.5:
        lines.append(f'    command: ["/bin/true", "--job", "{name}"]')
    else:
        lines.append(f"    command: echo {name} && /bin/true")
    lines.append(f"    timeout: {rng.choice(['30s', '5m', '1h'])}")
    if rng.random() < 0.3:
        lines += ["    env:", f"      JOB_NAME: {name}", "      LEVEL: info"]
    if rng.random() < 0.2:
        lines += ["    retries: {max: 2, backoff: 30s}"]
    if rng.random() < 0.2:
        lines.append("    concurrency: forbid")
    return lines


def generate(root: Path, n_jobs: int, seed: int = 1) -> list[Path]:
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    files = []
    n_files = n_jobs // JOBS_PER_FILE
    for f in range(n_files):
        sub = root / f"team{f // 100:03d}"
        sub.mkdir(exist_ok=True)
        lines = ["apiVersion: cronfile/v1", "defaults:", f"  owner: team-{f // 100}", "jobs:"]
        for k in range(JOBS_PER_FILE):
            lines += job_yaml(rng, f"t{f:05d}-j{k}")
        if f == 0:  # the ticker: one job every second, its lateness shows loop stalls
            lines += ["  ticker:", '    schedule: "* * * * * *"', '    command: ["/bin/true"]',
                      "    timeout: 10s"]
        path = sub / f"f{f:05d}.yaml"
        path.write_text("\n".join(lines) + "\n")
        files.append(path)
    return files


def bare_yaml(files: list[Path]) -> float:
    t0 = time.perf_counter()
    for p in files:
        yaml.load(p.read_bytes(), Loader=yaml.CSafeLoader)
    return time.perf_counter() - t0


def count_events(events: Path, name: str) -> int:
    try:
        return events.read_bytes().count(f'"event": "{name}"'.encode()) + \
            events.read_bytes().count(f'"event":"{name}"'.encode())
    except FileNotFoundError:
        return 0


def wait_count(events: Path, name: str, above: int, timeout: float, poll: float = 0.005) -> float | None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if count_events(events, name) > above:
            return time.time()
        time.sleep(poll)
    return None


def rss_kb(pid: int) -> tuple[int, int]:
    vals = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            k, v = line.split(":")
            vals[k] = int(v.split()[0])
    return vals.get("VmRSS", 0), vals.get("VmHWM", 0)


def ticker_lateness(runs: Path) -> list[tuple[float, float]]:
    """(scheduled_at, lateness) of every ticker run."""
    out = []
    try:
        with runs.open() as fh:
            for line in fh:
                if '"ticker"' not in line or '"started"' not in line:
                    continue
                r = json.loads(line)
                if r.get("record") == "started" and r.get("job") == "ticker":
                    s, st = parse_iso(r.get("scheduled_at")), parse_iso(r.get("started_at"))
                    if s is not None and st is not None:
                        out.append((s, st - s))
    except FileNotFoundError:
        pass
    return out


def run_center(sched: Path, work: Path, n_jobs: int, files: list[Path], reloads: int) -> dict:
    state = work / "state"
    shutil.rmtree(state, ignore_errors=True)
    events = state / "events.jsonl"
    log_path = work / "center.log"
    log = log_path.open("wb")
    t0 = time.time()
    proc = subprocess.Popen([PY, "-m", "cronfile", "center", "--schedules", str(sched),
                             "--state", str(state)], stdout=log, stderr=subprocess.STDOUT,
                            cwd=str(work))
    res: dict = {"n": n_jobs}
    try:
        applied = wait_count(events, "revision_applied", 0, timeout=300, poll=0.01)
        res["startup_s"] = None if applied is None else applied - t0
        # "center running" is logged after services start
        deadline = time.time() + 60
        while time.time() < deadline and b"center running" not in log_path.read_bytes():
            time.sleep(0.01)
        res["running_s"] = time.time() - t0
        time.sleep(3.0)  # settle: write_applied thread, first ticks
        res["rss_kb"], res["hwm_kb"] = rss_kb(proc.pid)
        reload_s = []
        windows = []
        rng = random.Random(7)
        for i in range(reloads):
            before = count_events(events, "revision_applied")
            target = files[rng.randrange(1, len(files))]
            text = target.read_text()
            text = text.replace("description: Generated", f"description: Edited{i}", 1)
            time.sleep(1.3 - (time.time() % 1.0) if time.time() % 1.0 > 0.3 else 0.0)
            tw = time.time()
            target.write_text(text)
            done = wait_count(events, "revision_applied", before, timeout=120)
            reload_s.append(None if done is None else done - tw)
            windows.append((tw, done or tw + 120))
            time.sleep(2.5)
        res["reload_s"] = reload_s
        res["rss_after_reload_kb"], res["hwm_after_kb"] = rss_kb(proc.pid)
        time.sleep(1.5)
    finally:
        stop_center(proc, 60)
        log.close()
    ticks = ticker_lateness(state / "runs.jsonl")
    in_reload, idle = [], []
    for s, late in ticks:
        if any(a - 1.0 <= s <= b + 1.0 for a, b in windows):
            in_reload.append(late)
        elif s > t0 + res["running_s"] + 3:
            idle.append(late)
    res["stall_in_reload"] = in_reload
    res["stall_idle"] = idle
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="10,000 jobs only, 2 reloads")
    ap.add_argument("--jobs", type=int, default=100_000)
    ap.add_argument("--reloads", type=int)
    ap.add_argument("--keep", help="generate into / reuse this directory")
    ap.add_argument("--only-big", action="store_true", help="skip the 10,000-job comparison run")
    args = ap.parse_args()
    big = 10_000 if args.quick else args.jobs
    reloads = args.reloads or (2 if args.quick else 3)
    base = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="cf-scale-"))
    try:
        sizes = [big] if args.only_big else sorted({10_000, big})
        results = []
        for n in sizes:
            sched = base / f"s{n}"
            t = time.perf_counter()
            if not sched.exists():
                generate(sched, n)
            files = sorted(sched.rglob("*.yaml"))
            gen_s = time.perf_counter() - t
            bare = statistics.median(bare_yaml(files) for _ in range(2 if n >= 100_000 else 3))
            work = base / f"w{n}"
            work.mkdir(exist_ok=True)
            r = run_center(sched, work, n, files, reloads)
            r["bare_s"] = bare
            results.append(r)
            print(f"--- {n} jobs in {len(files)} files (generated/found in {gen_s:.1f}s)", flush=True)
            st = r["startup_s"]
            print(f"(a) startup to revision_applied {st:.2f}s, to 'center running' {r['running_s']:.2f}s"
                  f" | bare yaml CSafeLoader {bare:.2f}s | ratio {st / bare:.2f} "
                  f"({'MET' if st / bare <= 2 else 'MISSED'} <= 2)", flush=True)
            rl = [x for x in r["reload_s"] if x is not None]
            med = statistics.median(rl) if rl else float("nan")
            print(f"(b) file write -> revision_applied: median {med:.2f}s, all "
                  f"{[round(x, 2) if x is not None else None for x in r['reload_s']]} "
                  f"({'MET' if med <= 1 else 'MISSED'} <= 1s)", flush=True)
            sr = max(r["stall_in_reload"], default=float("nan"))
            si = max(r["stall_idle"], default=float("nan"))
            print(f"(c) ticker lateness around reloads: max {sr * 1000:.0f}ms over "
                  f"{len(r['stall_in_reload'])} ticks | idle max {si * 1000:.0f}ms "
                  f"p50 {statistics.median(r['stall_idle'] or [float('nan')]) * 1000:.0f}ms "
                  f"({'MET' if sr <= 0.05 else 'MISSED'} <= 50ms)", flush=True)
            rss = r["rss_kb"] / 1024
            print(f"(d) RSS {rss:.0f} MB (peak {r['hwm_kb'] / 1024:.0f} MB; after reloads "
                  f"{r['rss_after_reload_kb'] / 1024:.0f} MB, peak {r['hwm_after_kb'] / 1024:.0f} MB)"
                  f" ({'MET' if rss <= 250 else 'MISSED'} <= 250 MB)", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
