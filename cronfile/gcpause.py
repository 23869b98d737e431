"""Pausing Python's cyclic garbage collector around allocation bursts, safely across threads.

Loading 100,000 jobs, applying them, or dispatching a burst of thousands of runs allocates
many small objects and frees almost none of them until it is over: the cyclic GC would
rescan the growing heap again and again (a third of a load's time) to find nothing, while
reference counting still frees ordinary garbage. So those places pause it.

They may overlap, in different threads (a reload's load in a worker thread while the event
loop dispatches a burst): with plain ``gc.disable()``/``gc.enable()`` pairs, the first to
finish would switch collection back on under the other. Here pauses are counted, and the
collector is switched back on when the last one ends, if it was on when the first began.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_lock = threading.Lock()
_depth = 0
_was_enabled = False


def pause() -> None:
    """Stop cyclic collection until the matching :func:`resume`."""
    global _depth, _was_enabled
    with _lock:
        if _depth == 0:
            _was_enabled = gc.isenabled()
            gc.disable()
        _depth += 1


def resume() -> None:
    """End one :func:`pause`; the last one switches collection back on (if it was on)."""
    global _depth
    with _lock:
        if _depth == 0:
            raise RuntimeError("gcpause.resume() without a pause()")
        _depth -= 1
        if _depth == 0 and _was_enabled:
            gc.enable()


@contextmanager
def paused() -> Iterator[None]:
    """``with paused():`` the block runs with cyclic collection paused."""
    pause()
    try:
        yield
    finally:
        resume()
