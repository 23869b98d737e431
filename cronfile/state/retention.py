"""Retention (SPEC §8): how long the ledger keeps history, and which segments go.

Only whole sealed segments are removed, oldest first, and the pass stops at the first one
that must stay: one holding a record newer than the cutoff, one where a run still open began
(its outcome is yet to come and its ``dispatched`` record must stay with it), one the
checkpoint has not folded yet, or the newest segment of the log (its number is where the
next rotation continues).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from cronfile.state.segments import Segment

__all__ = ["DEFAULT_RETENTION", "RetentionError", "expired_segments", "parse_retention",
           "RetentionNeed"]

DEFAULT_RETENTION = "90d"
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")


class RetentionError(ValueError):
    """A ``--retention`` value that cannot be used; the message says why."""


def parse_retention(text: str) -> float | None:
    """``90d``, ``12h``, ``2w``... in seconds; ``forever`` is None (keep everything)."""
    if text.strip().lower() == "forever":
        return None
    match = _DURATION.match(text)
    if match is None:
        raise RetentionError(f"--retention {text!r}: expected a duration like 90d, 12h, 2w, "
                             "or 'forever'")
    seconds = float(match[1]) * _UNITS[match[2]]
    if seconds <= 0:
        raise RetentionError(f"--retention {text!r}: must be more than zero")
    return seconds


@dataclass(frozen=True, slots=True)
class RetentionNeed:
    """How far back one job needs the ledger, and why (for the refusal message)."""

    job: str
    seconds: float
    why: str


def expired_segments(segments: list[Segment], cutoff: str, open_seqs: set[int],
                     unfolded_from: int) -> list[Segment]:
    """The segments to remove now (oldest first) of one log's ``segments`` (oldest first)."""
    if not segments:
        return []
    newest = segments[-1].seq
    out = []
    for segment in segments:
        if (not segment.sealed or segment.hi is None or segment.hi >= cutoff[:19] + "Z"
                or segment.seq in open_seqs or segment.seq >= unfolded_from
                or segment.seq == newest):
            break
        out.append(segment)
    return out
