"""``<state>/git.json``: what a center following a git branch runs, saw last, and why
they differ (written by :mod:`cronfile.center.gitsync`, read by ``cronfile status``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

GIT_STATE_FILE = "git.json"


def read_git_state(state_dir: Path) -> dict[str, Any] | None:
    """The file's content; None when the center does not follow git (or it is unreadable)."""
    try:
        data = json.loads((state_dir / GIT_STATE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
