"""Helpers for black-box center tests: a real ``cronfile center`` subprocess on a temp
schedules dir and state dir, and bounded polling of its JSONL ledger (never blind sleeps)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

POLL_S = 0.05


def cronfile_command() -> list[str]:
    """The installed console script next to this interpreter (as a user would run it)."""
    exe = shutil.which("cronfile", path=os.path.dirname(sys.executable))
    return [exe] if exe else [sys.executable, "-m", "cronfile"]


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Every JSON-object line of ``path`` (garbage and torn lines skipped)."""
    out: list[dict[str, Any]] = []
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return out
    for line in data.split(b"\n"):
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            out.append(value)
    return out


def parse_ts(text: str | None) -> float | None:
    if not text:
        return None
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    """Poll ``predicate`` every 50 ms until it returns something truthy, or fail."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(POLL_S)


def write_schedule(schedules: Path, name: str, text: str) -> Path:
    """Write a schedule file atomically (the watcher never sees half a file)."""
    path = schedules / name
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp"
    tmp.write_text(textwrap.dedent(text))
    os.replace(tmp, path)
    return path


def cli(*args: str, state: Path | None = None, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    argv = [*cronfile_command(), *args]
    if state is not None:
        argv += ["--state", str(state)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)


class ChildProc:
    """A long-running ``cronfile`` subprocess with its output in a log file (the center or
    an agent): what every test needs to look at it, signal it and stop it."""

    proc: subprocess.Popen[bytes] | None
    log: Path

    def launch(self, argv: list[str], env: dict[str, str]) -> None:
        """Start it in its own session, its output appended to the log."""
        with open(self.log, "ab") as logf:
            self.proc = subprocess.Popen(argv, stdout=logf, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def kill(self) -> None:
        """SIGKILL, like a power loss for this process; its jobs (own process groups) may
        survive, as after a real crash."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(timeout=10)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        """Stop it with ``sig`` (SIGKILL after ``timeout``); its exit code."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGCONT)  # in case a test left it stopped
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        return self.proc.returncode

    # After stop(): in the class body this name hides the signal module from then on.
    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)


class CenterProc(ChildProc):
    """One ``cronfile center`` subprocess; restartable on the same state dir."""

    def __init__(self, root: Path, *, grace: float = 1.0, watch: bool = True,
                 env: dict[str, str] | None = None) -> None:
        self.root = root
        self.schedules = root / "schedules"
        self.state = root / "state"
        self.schedules.mkdir(parents=True, exist_ok=True)
        self.grace = grace
        self.watch = watch
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = root / "center.log"

    # ---------------------------------------------------------------- files
    @property
    def runs_path(self) -> Path:
        return self.state / "runs.jsonl"

    @property
    def events_path(self) -> Path:
        return self.state / "events.jsonl"

    def runs(self) -> list[dict[str, Any]]:
        return read_jsonl(self.runs_path)

    def events(self) -> list[dict[str, Any]]:
        return read_jsonl(self.events_path)

    def write(self, name: str, text: str) -> Path:
        return write_schedule(self.schedules, name, text)

    # ---------------------------------------------------------------- life cycle
    def argv(self) -> list[str]:
        argv = [*cronfile_command(), "center", "--schedules", str(self.schedules),
                "--state", str(self.state), "--grace", str(self.grace)]
        if not self.watch:
            argv.append("--no-watch")
        return argv

    def start(self, wait: bool = True) -> CenterProc:
        self.launch(self.argv(), self.env)
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 15.0) -> None:
        pid = self.pid

        def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"center exited {self.proc.returncode}:\n{self.log_text()}")
            started = any(e.get("event") == "center_started" and e.get("pid") == pid
                          for e in self.events())
            return started and (self.state / "control.sock").exists()

        wait_for(ready, timeout, "the center to start")

    def wait_runs(self, predicate: Callable[[list[dict[str, Any]]], Any], timeout: float = 10.0,
                  what: str = "run records") -> Any:
        def check() -> Any:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"center exited {self.proc.returncode}:\n{self.log_text()}")
            return predicate(self.runs())

        try:
            return wait_for(check, timeout, what)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- center log ---\n{self.log_text()}") from None

    def wait_events(self, predicate: Callable[[list[dict[str, Any]]], Any], timeout: float = 10.0,
                    what: str = "events") -> Any:
        try:
            return wait_for(lambda: predicate(self.events()), timeout, what)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- center log ---\n{self.log_text()}") from None

    def watermark(self) -> float | None:
        """How far the center got: it writes the mark after each tick, never past a start
        still queued (a retry, a triggered start), so a mark at T means nothing due before T
        is still waiting to be dispatched."""
        try:
            return float((self.state / "watermark").read_text().strip())
        except (OSError, ValueError):
            return None

    def wait_ticked_past(self, when: float, timeout: float = 10.0) -> None:
        """Until this process has ticked past ``when`` with nothing due before it queued."""
        pid = self.pid

        def past() -> bool:
            assert self.proc is not None and self.proc.pid == pid
            if self.proc.poll() is not None:
                raise AssertionError(f"center exited {self.proc.returncode}:\n{self.log_text()}")
            mark = self.watermark()
            return mark is not None and mark > when

        wait_for(past, timeout, f"the watermark to pass {when:.3f}")

    def cli(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return cli(*args, state=self.state, timeout=timeout)


def finished(records: list[dict[str, Any]], job: str | None = None,
             status: str | None = None) -> list[dict[str, Any]]:
    return [r for r in records if r.get("record") == "finished"
            and (job is None or r.get("job") == job)
            and (status is None or r.get("status") == status)]


def dispatched(records: list[dict[str, Any]], job: str | None = None) -> list[dict[str, Any]]:
    return [r for r in records if r.get("record") == "dispatched"
            and (job is None or r.get("job") == job)]


def pgrep(marker: str) -> list[int]:
    """Pids of the processes whose command line carries ``marker`` (not this one)."""
    out = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split() if int(p) != os.getpid()]


def kill_marked(marker: str) -> None:
    """SIGKILL every process whose command line carries ``marker`` (test leftovers)."""
    for pid in pgrep(marker):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def check_ledger(records: list[dict[str, Any]], jobs: set[str]) -> dict[str, int]:
    """Once per slot, one outcome per run, nothing lost silently. Returns some counts."""
    runs = [r for r in records if r.get("job") in jobs]
    # (1) at most ONE dispatched record per (job, scheduled_at, agent) for scheduled runs
    keys = Counter((r["job"], r["scheduled_at"], r["agent"]) for r in runs
                   if r.get("record") == "dispatched" and r.get("attempt") == 1)
    dup = {k: n for k, n in keys.items() if n > 1}
    assert not dup, f"slots dispatched twice: {dup}"
    # (2) no run_id has two finished records
    fin = Counter(r["run_id"] for r in runs if r.get("record") == "finished")
    twice = {k: n for k, n in fin.items() if n > 1}
    assert not twice, f"run_ids finished twice: {twice}"
    # (3) every dispatched run has exactly one final outcome
    disp_ids = {r["run_id"] for r in runs if r.get("record") == "dispatched"}
    open_ids = disp_ids - set(fin)
    assert not open_ids, f"dispatched runs without an outcome: {sorted(open_ids)[:5]}"
    # dispatched precedes finished for each run_id
    first_line: dict[str, str] = {}
    for r in runs:
        first_line.setdefault(r["run_id"], r["record"])
    assert all(first_line[i] == "dispatched" for i in disp_ids)
    # (4) every slot second is accounted for: a run, a skip, or inside a missed range,
    # and no slot has two outcomes (run AND missed/skipped)
    outcome: dict[tuple[str, float], list[str]] = defaultdict(list)
    for r in runs:
        slot = parse_ts(r.get("scheduled_at"))
        if slot is None:
            continue
        if r.get("record") == "dispatched":
            outcome[(r["job"], slot)].append("run")
        elif r.get("record") == "finished" and r.get("status") in ("missed", "skipped", "no_agent"):
            first = parse_ts(r.get("first_scheduled_at")) or slot
            last = parse_ts(r.get("last_scheduled_at")) or slot
            count = int(r.get("count", 1))
            assert count >= 1 and last >= first
            assert count <= last - first + 1
            s = first
            while s <= last:
                outcome[(r["job"], s)].append(r["status"])
                s += 1
    counts = Counter()
    for job in jobs:
        slots = sorted(s for (j, s) in outcome if j == job)
        assert slots, f"{job}: no slots at all"
        s = slots[0]
        while s <= slots[-1]:
            got = outcome.get((job, s), [])
            assert got, f"{job}: slot {s} has no record (lost silently)"
            assert len(got) == 1, f"{job}: slot {s} has several outcomes: {got}"
            counts[got[0]] += 1
            s += 1
    return dict(counts)
