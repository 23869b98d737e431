"""gcpause: overlapping pauses, from several threads, switch collection back on once."""

from __future__ import annotations

import gc
import threading

import pytest

from cronfile import gcpause


@pytest.fixture(autouse=True)
def _gc_on() -> None:
    gc.enable()


def test_the_last_overlapping_pause_switches_collection_back_on() -> None:
    gcpause.pause()  # e.g. a burst of dispatches on the event loop
    entered, leave = threading.Event(), threading.Event()

    def load() -> None:  # e.g. a reload's load in a worker thread
        with gcpause.paused():
            entered.set()
            leave.wait(5)

    worker = threading.Thread(target=load)
    worker.start()
    assert entered.wait(5)
    gcpause.resume()  # the burst ends first: the load is still running
    assert not gc.isenabled()
    leave.set()
    worker.join(5)
    assert gc.isenabled()


def test_a_collector_that_was_off_stays_off() -> None:
    gc.disable()
    with gcpause.paused():
        assert not gc.isenabled()
    assert not gc.isenabled()
    gc.enable()


def test_resume_without_pause_is_an_error() -> None:
    with pytest.raises(RuntimeError):
        gcpause.resume()
