"""Once per slot across rotations: a real center with tiny segments is SIGKILLed during a
rotation, during a seal and during a checkpoint write (it kills itself at exactly that point,
``CRONFILE_CRASH_AT``), and at random moments; after a restart no slot ran twice and every
slot has exactly one final record, across every file of the ledger."""

from __future__ import annotations

import gzip
import json
import os
import random
import secrets
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from centerlib import CenterProc, cli, parse_ts, wait_for
from test_center import check_ledger

SEGMENT_BYTES = 2048
JOBS = """\
apiVersion: cronfile/v1
jobs:
  tick:
    schedule: "*/1 * * * * *"
    command: "echo $CRONFILE_RUN_ID"
  slow:
    schedule: "*/1 * * * * *"
    command: "sleep 1.5"
    concurrency: forbid
"""


class SegmentedCenter(CenterProc):
    """A center whose ledger rotates every couple of seconds."""

    crash_at: str | None = None

    def argv(self) -> list[str]:
        return [*super().argv(), "--segment-bytes", str(SEGMENT_BYTES)]

    def runs(self) -> list[dict[str, Any]]:
        return ledger_records(self.state, "runs")

    def events(self) -> list[dict[str, Any]]:
        return ledger_records(self.state, "events")

    def start(self, wait: bool = True) -> CenterProc:
        env = dict(self.env)
        env.pop("CRONFILE_CRASH_AT", None)
        if self.crash_at:
            env["CRONFILE_CRASH_AT"] = self.crash_at
        self.launch(self.argv(), env)
        if wait:
            self.wait_ready()
        return self


def ledger_records(state: Path, kind: str = "runs") -> list[dict[str, Any]]:
    """Every record of every file of one log, read without cronfile's reader: its rotated
    files in name order (generation, then part), then the current file."""
    if not state.is_dir():
        return []
    files = sorted(p for p in state.iterdir() if p.name.startswith(kind + ".")
                   and p.name != f"{kind}.jsonl" and not p.name.endswith(".tmp"))
    files.append(state / f"{kind}.jsonl")
    out = []
    for path in files:
        if not path.exists():
            continue
        data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        for line in data.split(b"\n"):
            try:
                value = json.loads(line)
            except ValueError:
                continue
            if isinstance(value, dict):
                out.append(value)
    return out


@pytest.fixture
def center(tmp_path: Path) -> Any:
    procs: list[SegmentedCenter] = []

    def make() -> SegmentedCenter:
        c = SegmentedCenter(tmp_path, grace=1.0)
        c.write("a.yaml", JOBS)
        procs.append(c)
        return c

    yield make
    for c in procs:
        c.stop()


def _died_by_sigkill(c: CenterProc, timeout: float = 30.0) -> None:
    assert c.proc is not None
    wait_for(lambda: c.proc is not None and c.proc.poll() is not None, timeout,
             "the center to reach its crash point")
    assert c.proc.returncode == -signal.SIGKILL, c.log_text()


def _run_on_and_check(c: SegmentedCenter) -> list[dict[str, Any]]:
    """Restart without a crash point, let it run a few slots, stop it, check the ledger."""
    c.crash_at = None
    c.start()
    mark = time.time()
    wait_for(lambda: len([r for r in c.runs() if r.get("job") == "tick"
                          and r.get("status") == "succeeded"
                          and (parse_ts(r.get("scheduled_at")) or 0) > mark + 1]) >= 3,
             30, "runs after the restart")
    assert c.stop() == 0
    records = ledger_records(c.state)
    check_ledger(records, {"tick", "slow"})
    names = os.listdir(c.state)
    assert not [n for n in names if n.endswith(".tmp") or n.endswith(".sealing")], names
    assert all(".jsonl" not in n or n.endswith(("runs.jsonl", "events.jsonl")) or ".n" in n
               for n in names), f"unsealed segments left: {names}"
    return records


@pytest.mark.slow
def test_sigkill_during_a_rotation(center: Any) -> None:
    c = center()
    c.crash_at = "rotate"
    c.start(wait=False)
    _died_by_sigkill(c)
    # killed between the rename and the new file: the segment is there, runs.jsonl is not
    names = os.listdir(c.state)
    assert any(n.endswith(".000001.jsonl") for n in names), names
    assert not {"runs.jsonl", "events.jsonl"} <= set(names)
    _run_on_and_check(c)


@pytest.mark.slow
def test_sigkill_during_a_seal(center: Any) -> None:
    c = center()
    c.crash_at = "seal"
    c.start(wait=False)
    _died_by_sigkill(c)
    assert any(n.endswith(".sealing") for n in os.listdir(c.state))
    _run_on_and_check(c)


@pytest.mark.slow
def test_sigkill_during_a_checkpoint_write(center: Any) -> None:
    c = center()
    c.crash_at = "checkpoint:2"  # the first is at start; the second after the first seal
    c.start(wait=False)
    _died_by_sigkill(c)
    half = c.state / "checkpoint.json.tmp"
    assert half.exists()
    with pytest.raises(ValueError):
        json.loads(half.read_bytes())
    json.loads((c.state / "checkpoint.json").read_bytes())  # the old one, whole
    _run_on_and_check(c)
    status = cli("status", "--format", "json", state=c.state)
    assert status.returncode == 0
    jobs = {j["job"]: j for j in json.loads(status.stdout)["jobs"]}
    assert jobs["tick"]["last_status"] == "succeeded"


@pytest.mark.slow
def test_random_sigkills_with_rotation_in_play(center: Any) -> None:
    rng = random.Random(os.environ.get("CRONFILE_TEST_SEED", secrets.randbits(32)))
    c = center()
    kills = 0
    deadline = time.monotonic() + 30
    while kills < 6 and time.monotonic() < deadline:
        c.start()
        time.sleep(rng.uniform(0.5, 2.5))
        c.kill()
        kills += 1
    records = _run_on_and_check(c)
    segments = [n for n in os.listdir(c.state) if n.startswith("runs.0")]
    assert len(segments) >= 3, "the ledger did not rotate"
    starts = [e for e in ledger_records(c.state, "events") if e.get("event") == "center_started"]
    assert len(starts) == kills + 1
    assert len([r for r in records if r.get("record") == "dispatched"]) >= 5
