"""The highest HA term an agent has seen, kept on disk (SPEC §9, fencing).

A center that lost its lease may not know it yet (a frozen process, a partition) and keep
sending orders. Its term is lower than the new leader's, so an agent that remembers the
highest term it has seen can refuse it. "Remembers" must survive a restart of the agent,
or a stale leader could slip an order in right after one: the term is written to
``<state>/term.json`` (write a temporary file, fsync, rename, fsync the directory) BEFORE
the agent acts on a higher term, so no order is ever carried out under a term the disk
does not know.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from cronfile.state.private import FILE_MODE

TERM_FILE = "term.json"


class TermFileError(Exception):
    """``term.json`` exists but cannot be read as a term: the agent does not start (it
    would forget the fence). The message names the file."""


class TermStore:
    """The highest term seen; :meth:`raise_to` makes a higher one durable first."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / TERM_FILE
        self.highest = self._load()

    def _load(self) -> int:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return 0
        except (OSError, UnicodeDecodeError) as exc:
            raise TermFileError(f"{self.path}: cannot read the highest term ({exc})") from None
        try:
            data = json.loads(text)
        except ValueError:
            data = None
        term = data.get("term") if isinstance(data, dict) else None
        if isinstance(term, bool) or not isinstance(term, int) or term < 0:
            raise TermFileError(
                f"{self.path}: expected {{\"v\": 1, \"term\": N}} with N >= 0; the file is "
                "written by the agent alone (remove it only if no HA center ever led)")
        return term

    def raise_to(self, term: int) -> None:
        """Make ``term`` the highest, durably; blocking (call it off the event loop). A
        term not above the current one changes nothing."""
        if term <= self.highest:
            return
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, FILE_MODE)
        with os.fdopen(fd, "wb") as fh:
            fh.write(json.dumps({"v": 1, "term": term}).encode() + b"\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        self.highest = term
