"""The segmented ledger under a real ``cronfile center``: an earlier version's state
directory taken over at the first start, retention at start, a too-short retention refused."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from centerlib import CenterProc
from test_ledger_segments import DAY, _aged_ledger, history

from cronfile.state.ledger import fold_runs
from cronfile.state.segments import list_segments

QUIET = """\
apiVersion: cronfile/v1
jobs:
  quiet:
    schedule: "0 0 1 1 *"
    command: "true"
"""


class Center(CenterProc):
    extra: tuple[str, ...] = ()

    def argv(self) -> list[str]:
        return [*super().argv(), *self.extra]


@pytest.fixture
def center(tmp_path: Path) -> Any:
    procs: list[Center] = []

    def make(*extra: str, schedule: str = QUIET, env: dict[str, str] | None = None) -> Center:
        c = Center(tmp_path, grace=1.0, env=env)
        c.extra = extra
        c.write("a.yaml", schedule)
        procs.append(c)
        return c

    yield make
    for c in procs:
        c.stop()


def test_an_earlier_versions_state_directory_is_taken_over_at_the_first_start(
        center: Any) -> None:
    c = center("--segment-bytes", "65536")
    c.state.mkdir(parents=True)
    data = history(time.time() - 20 * DAY, 3000, step=500)
    (c.state / "runs.jsonl").write_bytes(data)
    before = fold_runs(json.loads(line) for line in data.splitlines())
    c.start()
    log = c.log_text()
    assert "runs.jsonl is 3 MB: rotating it into segments" in log
    assert "taking over runs.000001.jsonl: 100%" in log
    assert c.stop() == 0
    assert len(list_segments(c.state, "runs")) > 20
    out = c.cli("runs", "--limit", "0", "--format", "json")
    assert out.returncode == 0, out.stderr
    after = json.loads(out.stdout)
    assert len(after) == len(before) == 3000
    assert [v["run_id"] for v in after] == [v["run_id"] for v in before]
    for old, new in zip(before[::150], after[::150], strict=True):
        assert {k: new[k] for k in old} == old  # every field as it was, in the §4 shape
    # the second start folds nothing old: it reads the checkpoint only
    c.start()
    assert "rotating it into segments" not in c.log_text()[len(log):]


def test_retention_at_start_removes_old_segments_and_records_it(center: Any) -> None:
    c = center("--retention", "4d")
    _aged_ledger(c.state)
    c.start()
    event = c.wait_events(lambda es: [e for e in es if e.get("event") == "retention"],
                          what="the retention event")[0]
    assert event["retention"] == "4d" and event["records"] == 6 * 60
    assert len(event["segments"]) == 6
    assert [s.seq for s in list_segments(c.state, "runs")] == [7, 8, 9, 10]


def test_a_retention_shorter_than_a_job_needs_is_refused_at_start(center: Any) -> None:
    c = center("--retention", "5d", schedule="""\
apiVersion: cronfile/v1
jobs:
  watched:
    schedule: "0 3 * * *"
    command: "true"
    expect: {success_within: 10d}
""")
    _aged_ledger(c.state)
    c.start(wait=False)
    assert c.proc is not None
    assert c.proc.wait(timeout=30) == 2
    log = c.log_text()
    assert "--retention 5d is shorter than some jobs need the ledger:" in log
    assert "job watched: expect.success_within reaches 10d back" in log
    assert "Traceback" not in log
    assert len(list_segments(c.state, "runs")) == 10  # nothing removed
    assert not any(e.get("event") == "center_started" for e in c.events())


def test_a_bad_retention_value_is_a_usage_error(center: Any) -> None:
    c = center("--retention", "soon")
    c.start(wait=False)
    assert c.proc is not None and c.proc.wait(timeout=30) == 2
    assert "--retention 'soon': expected a duration like 90d" in c.log_text()


@pytest.mark.slow
def test_a_runs_dispatched_record_is_on_disk_before_it_starts(center: Any, tmp_path: Path) -> None:
    """Writes go through the writer thread now, here on a slow disk (each append of run
    records takes 0.3 s more); a run still starts only after its ``dispatched`` record is
    written: the job itself looks for it in the ledger."""
    runs = tmp_path / "state" / "runs.jsonl"
    c = center(env={"CRONFILE_SLOW_DISK": "0.3"}, schedule=f"""\
apiVersion: cronfile/v1
jobs:
  looks:
    schedule: "*/1 * * * * *"
    command: grep -q "\\"run_id\\":\\"$CRONFILE_RUN_ID\\".*\\"record\\":\\"dispatched\\"" {runs}
""")
    c.start()
    def three(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        ended = [r for r in records if r.get("record") == "finished"]
        return ended[:3] if len(ended) >= 3 else []

    done = c.wait_runs(three, 15, "three finished runs")
    assert [r["status"] for r in done] == ["succeeded"] * 3, done
