"""State directories are private to the user that runs the center or agent.

``runs.jsonl`` holds every output tail, ``events.jsonl`` every revision's errors,
``agents.json`` the fleet, an agent's journal and outbox the outcomes it still owes: none
of it is for other local users. Directories are made (and, when ours, tightened to)
:data:`DIR_MODE`; files are created :data:`FILE_MODE`, whatever the umask. ``cronfile
status`` and ``cronfile runs`` are then for the same user (or root), like the daemon.
"""

from __future__ import annotations

import os
from pathlib import Path

DIR_MODE = 0o700
FILE_MODE = 0o600


def private_dir(path: Path) -> None:
    """Create ``path`` (and parents) if needed, and make it ours alone when it is ours."""
    path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    st = path.stat()
    if st.st_uid == os.geteuid() and st.st_mode & 0o077:
        os.chmod(path, DIR_MODE)
