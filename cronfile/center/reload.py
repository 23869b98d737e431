"""Hot reload: ONE path for the file watcher, SIGHUP and ``cronfile apply``.

:class:`Reloader` loads the schedule files (in a thread), keeps the last good revision when
they are invalid (``revision_rejected``, remembered for ``status``), serialises reloads (a
slow load of older content never lands after a newer one), debounces bursts of changes, and
stores the applied files in ``applied.json`` in the background. What a valid revision
changes is the center's business: it comes in as the ``apply`` callback.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable, Coroutine, Iterable
from pathlib import Path
from typing import Any

from cronfile.schedules.diff import StateDiff, diff_states
from cronfile.schedules.loader import ScheduleLoader
from cronfile.schedules.model import DesiredState
from cronfile.state.applied import StateFileError, write_applied
from cronfile.state.ledger import utc_ts

log = logging.getLogger("cronfile.center")

RELOAD_DEBOUNCE_S = 0.2


class Reloader:
    def __init__(self, loader: ScheduleLoader, state_dir: Path,
                 current: Callable[[], DesiredState | None],
                 apply: Callable[[DesiredState, StateDiff], None],
                 event: Callable[..., None],
                 spawn: Callable[[Coroutine[Any, Any, None]], asyncio.Task[Any]],
                 after_store: Callable[[], None] = lambda: None) -> None:
        self.loader = loader
        self.state_dir = state_dir
        self._current = current
        self._apply = apply
        self._event = event
        self._spawn = spawn
        self._after_store = after_store  # in a thread, after each applied.json write
        self.last_rejection: dict[str, Any] | None = None
        self.requested = asyncio.Event()
        self._lock = asyncio.Lock()
        self._store_wanted: DesiredState | None = None
        self._store_task: asyncio.Task[Any] | None = None

    def reject(self, problems: Iterable[Any], kept: DesiredState | None = None) -> None:
        """Record and log a rejected revision, once: the same errors again (the watcher's
        second look, a touch of an unchanged file) are not news. ``kept``: what runs
        instead, when that is not the current revision (at start: applied.json's)."""
        errors = [p.render() for p in problems if p.severity.value == "error"]
        if self.last_rejection is not None and self.last_rejection["errors"] == errors:
            return
        kept = kept or self._current()
        self.last_rejection = {"ts": utc_ts(), "errors": errors}
        self._event("revision_rejected", errors=errors,
                    kept=kept.revision.to_dict() if kept else None)
        log.error("schedules rejected (%d errors); %s:\n  %s", len(errors),
                  "keeping the last good revision" if kept else "no good revision to keep",
                  "\n  ".join(errors[:20]))

    async def reload(self) -> dict[str, Any]:
        """Re-read the schedules: apply the difference, or keep the last good revision."""
        async with self._lock:
            return await self._reload()

    async def _reload(self) -> dict[str, Any]:
        result = await asyncio.to_thread(self.loader.load, with_git=True)
        if result.state is None:
            self.reject(result.problems)
            return {"applied": False, "errors": self.last_rejection["errors"] if self.last_rejection else []}
        current = self._current()
        if current is not None and result.state.revision == current.revision:
            if self.last_rejection is not None:  # the bad change was reverted
                self.last_rejection = None
                self._event("revision_restored", revision=result.state.revision.to_dict())
            return {"applied": False, "unchanged": True, "revision": result.state.revision.to_dict()}
        self.last_rejection = None
        # O(jobs) (0.3 s for 100,000): not on the event loop. Reloads are serialised, so
        # the desired state cannot change meanwhile.
        diff = await asyncio.to_thread(diff_states, current, result.state)
        self._apply(result.state, diff)
        return {"applied": True, "revision": result.state.revision.to_dict(), "diff": diff.summary()}

    async def run(self) -> None:
        """Reload whenever asked; a checkout touching 50 files is one reload."""
        while True:
            await self.requested.wait()
            await asyncio.sleep(RELOAD_DEBOUNCE_S)
            self.requested.clear()
            try:
                await self.reload()
            except Exception:
                log.exception("reload failed; keeping the current revision")

    async def watch(self, schedules: Path, stop: asyncio.Event) -> None:
        import watchfiles

        def relevant(change: Any, path: str) -> bool:
            return path.endswith((".yaml", ".yml")) or os.path.isdir(path)

        # awatch has no "ready" signal: a file written between the first load and the
        # watcher's start would wait for the next change, so look once more shortly after.
        asyncio.get_running_loop().call_later(1.0, self.requested.set)
        async for _ in watchfiles.awatch(schedules, watch_filter=relevant,
                                          debounce=int(RELOAD_DEBOUNCE_S * 1000), step=50,
                                          stop_event=stop, recursive=True):
            self.requested.set()

    def store_applied(self, state: DesiredState) -> None:
        """Write applied.json in the background; bursts of revisions coalesce (the latest
        wins) so a writer never queues behind another."""
        self._store_wanted = state
        if self._store_task is None or self._store_task.done():
            with contextlib.suppress(RuntimeError):
                self._store_task = self._spawn(self._store_loop())

    async def _store_loop(self) -> None:
        """Store the applied schedule files (see :mod:`cronfile.state.applied`) in a thread: at
        100,000 jobs that is one small JSON string per file, so the GIL is never held long,
        and nothing per job is kept in memory for it."""
        while self._store_wanted is not None:
            state, self._store_wanted = self._store_wanted, None
            try:
                await asyncio.to_thread(write_applied, self.state_dir, state)
            except (OSError, StateFileError) as exc:  # the next revision tries again
                log.error("cannot write %s: %s", self.state_dir / "applied.json", exc)
            await asyncio.to_thread(self._after_store)
