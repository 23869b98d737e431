"""Parking and bursts, the small parts the dispatcher leans on: pure, tested without a center."""

from __future__ import annotations

import threading
from dataclasses import fields
from pathlib import Path

from cronfile.center.burst import Burst
from cronfile.center.options import CenterOptions
from cronfile.center.parking import Parking, reconnect_grace_s
from cronfile.center.scheduler import StartRun
from cronfile.schedules.model import Job
from cronfile.state.runrecord import IDENTITY_FIELDS, RunRecord


def start(slot: float, name: str = "j") -> StartRun:
    return StartRun(Job(name=name, command="true", schedules=("* * * * *",)), slot)


def test_a_start_parks_only_for_an_agent_still_expected_and_only_until_the_deadline() -> None:
    parking = Parking()
    assert not parking.park(start(10.0), ["a1"], now=0.0)  # nobody expected: not parked
    parking.expect(["a1"], deadline=5.0)
    assert not parking.park(start(10.0), ["b2"], now=1.0)  # another agent: recorded at once
    assert parking.park(start(10.0), ["a1", "b2"], now=1.0)
    assert parking.floor() == 10.0  # the watermark stays below it
    assert parking.take(now=2.0) == []  # nothing changed, time is not up
    assert not parking.park(start(11.0), ["a1"], now=5.0)  # past the deadline: no more waiting
    assert parking.awaiting == set()
    assert [s.scheduled_at for s in parking.take(now=5.0)] == [10.0]
    assert parking.floor() is None


def test_parked_starts_go_again_as_soon_as_an_agent_comes_back() -> None:
    parking = Parking()
    parking.expect(["a1", "a2"], deadline=30.0)
    assert parking.park(start(10.0), ["a1"], now=1.0)
    parking.agent_back("a1")
    assert [s.scheduled_at for s in parking.take(now=2.0)] == [10.0]
    assert parking.take(now=2.0) == []  # taken once
    assert not parking.park(start(12.0), ["a1"], now=3.0)  # a1 is back: no reason to wait
    assert parking.park(start(12.0), ["a2"], now=3.0)


def test_the_reconnect_grace_is_a_few_heartbeats_within_3_and_30_seconds() -> None:
    def grace(heartbeat: float) -> float:
        return reconnect_grace_s(CenterOptions(Path("schedules"), Path("state"),
                                               heartbeat_s=heartbeat))

    assert (grace(0.2), grace(2.0), grace(60.0)) == (3.0, 6.0, 30.0)


def test_overlapping_bursts_are_idle_only_when_the_last_one_ends() -> None:
    burst = Burst()
    assert not burst.active() and burst.wait_idle(0)
    burst.begin()
    burst.begin()
    assert burst.active() and not burst.wait_idle(0)
    assert burst.end() is False  # one still under way
    idle = threading.Event()
    waiter = threading.Thread(target=lambda: burst.wait_idle(10) and idle.set())
    waiter.start()
    assert burst.end() is True
    waiter.join(10)
    assert idle.is_set() and not burst.active()


def test_the_run_record_declares_its_fields_in_spec_order() -> None:
    names = [f.name for f in fields(RunRecord)]
    assert tuple(names[:7]) == IDENTITY_FIELDS
    outcome = ["status", "exit_code", "signal", "started_at", "finished_at", "duration_s",
               "output_tail", "reason"]
    assert [n for n in names if n in outcome] == outcome
