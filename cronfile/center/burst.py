"""A burst of starts under way: the one counter that dispatch, records and HTTP reads share.

While a burst is dispatched (a tick and its dispatch, or any dispatch) its spawns go first:
no cyclic GC pass (a collection in the middle of 10,000 spawns delays every run behind it),
records and outcomes wait (:class:`~cronfile.center.records.RecordWriter` asks
:meth:`Burst.active`), and expensive HTTP reads wait for :meth:`Burst.wait_idle`. Bursts
can overlap (a manual run during a scheduled one): they are counted.
"""

from __future__ import annotations

import threading

from cronfile import gcpause


class Burst:
    def __init__(self) -> None:
        self.depth = 0  # bursts being dispatched now
        self._idle = threading.Event()  # clear while a burst is being dispatched
        self._idle.set()

    def active(self) -> bool:
        return self.depth > 0

    def begin(self) -> None:
        if not self.depth:
            gcpause.pause()
            self._idle.clear()
        self.depth += 1

    def end(self) -> bool:
        """True when this was the last overlapping burst (GC is back on): the caller then
        ends the deferred runs and flushes the queued records."""
        self.depth -= 1
        if self.depth:
            return False
        self._idle.set()
        gcpause.resume()
        return True

    def wait_idle(self, timeout: float) -> bool:
        """Block (in a worker thread) until no burst is under way, at most ``timeout``."""
        self._idle.wait(timeout)
        return self._idle.is_set()
