"""``cronfile center``: the daemon that schedules, dispatches and records.

:mod:`.daemon` wires the parts; :mod:`.scheduler` makes the timing decisions; :mod:`.routing`
picks targets; :mod:`.control` serves the control socket; :mod:`.alerts` sends notifications.

``Center``, ``CenterOptions`` and ``run_center`` are exported here but imported on first
use, so that a client command that only needs :mod:`.control` does not load the daemon.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cronfile.center.daemon import Center, CenterOptions, run_center

__all__ = ["Center", "CenterOptions", "run_center"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from cronfile.center import daemon

        return getattr(daemon, name)
    raise AttributeError(f"module 'cronfile.center' has no attribute {name!r}")
