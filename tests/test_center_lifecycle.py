"""A Center built in-process: its life-cycle state and what it records on a planned stop."""

from __future__ import annotations

import asyncio
import json
import textwrap
from pathlib import Path

from cronfile.center.daemon import Center, RunState
from cronfile.center.options import CenterOptions

SCHEDULE = textwrap.dedent("""\
    apiVersion: cronfile/v1
    jobs:
      hourly:
        schedule: "0 * * * *"
        command: ["/bin/true"]
    """)


def test_a_stopped_center_ends_stopped_with_exit_0(tmp_path: Path) -> None:
    schedules, state = tmp_path / "schedules", tmp_path / "state"
    schedules.mkdir()
    (schedules / "jobs.yaml").write_text(SCHEDULE)
    center = Center(CenterOptions(schedules=schedules, state=state, watch=False))
    assert center.state is RunState.STARTING
    seen: list[RunState] = []

    async def life() -> int:
        task = asyncio.create_task(center.run_until_stopped())
        for _ in range(1000):  # bounded: 10 s
            if center.state is RunState.RUNNING or task.done():
                break
            await asyncio.sleep(0.01)
        seen.append(center.state)
        center.request_stop()
        seen.append(center.state)
        return await asyncio.wait_for(task, 30)

    assert asyncio.run(life()) == 0
    assert seen == [RunState.RUNNING, RunState.STOPPING]
    assert center.state is RunState.STOPPED
    events = [json.loads(line) for line in (state / "events.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events][-1] == "center_stopped"
    assert events[-1]["reason"] == "signal"
    assert not (state / "center.json").exists()


def test_a_stopped_center_frees_its_state_directory(tmp_path: Path) -> None:
    """The state lock goes with the center, not with the process: the next center on the
    same directory (in-process restart tests, an embedding program) can start."""
    schedules, state = tmp_path / "schedules", tmp_path / "state"
    schedules.mkdir()
    (schedules / "jobs.yaml").write_text(SCHEDULE)

    async def one_life() -> int:
        center = Center(CenterOptions(schedules=schedules, state=state, watch=False))
        task = asyncio.create_task(center.run_until_stopped())
        for _ in range(1000):  # bounded: 10 s
            if center.state is RunState.RUNNING or task.done():
                break
            await asyncio.sleep(0.01)
        center.request_stop()
        return await asyncio.wait_for(task, 30)

    assert asyncio.run(one_life()) == 0
    assert asyncio.run(one_life()) == 0  # without the lock released: CenterError, "another center"
    starts = [json.loads(line)["event"] for line in (state / "events.jsonl").read_text().splitlines()]
    assert starts.count("center_started") == 2
