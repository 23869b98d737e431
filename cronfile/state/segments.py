"""Rotated segments of a ledger log: ``runs.jsonl`` and ``events.jsonl`` stay the files
appended to (``tail -f`` keeps working); when one grows past the segment size, or holds
records of an earlier UTC day, it is renamed to a numbered segment beside it and sealed.

Names say what a reader needs without opening a file (so a query or a retention pass
picks segments from a directory listing alone)::

    runs.000007.jsonl                                      rotated, not sealed yet
    runs.000007.000.20261130T000000Z.20261130T235959Z.n41234.jsonl.gz     sealed

``000007`` is the generation (``runs.jsonl`` is always generation max+1), ``000`` the part
(an upgraded legacy file is split into many parts of one generation), then the earliest and
latest time any record of the part mentions (``ts``, ``scheduled_at``, the bounds of a missed
range; truncated to the second) and its record count.

Sealing writes each part to ``<name>.tmp``, fsyncs it and renames it, and only then unlinks
the plain segment; a crash at any point leaves either the plain segment (sealed again at the
next start, its partial parts discarded) or complete parts (the plain one is then dropped).
Gzip is used only when it pays (JSONL of runs compresses ~8x; a part that would not shrink by
a quarter stays plain, with the same name minus ``.gz``).
"""

from __future__ import annotations

import gzip
import os
import re
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from cronfile.state.private import FILE_MODE

__all__ = [
    "LOG_KINDS",
    "Segment",
    "clean_debris",
    "current_generation",
    "iso_second",
    "list_segments",
    "read_bytes",
    "record_bounds",
    "seal",
]

LOG_KINDS = ("runs", "events")
GZIP_LEVEL = 1
"""Level 1 compresses ledger JSONL almost as well as 6 at a fraction of the time."""
MIN_SAVING = 0.25

_NAME = re.compile(
    r"^(?P<kind>runs|events)\.(?P<seq>\d{6,})"
    r"(?:\.(?P<part>\d{3,})\.(?P<lo>\d{8}T\d{6}Z)\.(?P<hi>\d{8}T\d{6}Z)\.n(?P<count>\d+))?"
    r"\.jsonl(?P<gz>\.gz)?$"
)


@dataclass(frozen=True, slots=True)
class Segment:
    """One rotated file of a log. ``lo``/``hi`` are ISO-8601 seconds (``2026-11-30T00:00:00Z``),
    None for a plain segment not sealed yet (a reader then assumes it overlaps anything)."""

    path: Path
    kind: str
    seq: int
    part: int
    lo: str | None
    hi: str | None
    count: int | None
    compressed: bool

    @property
    def sealed(self) -> bool:
        return self.lo is not None

    def overlaps(self, since: str | None, until: str | None) -> bool:
        """Whether any record may fall in [since, until] (ISO texts; None = open end)."""
        if self.lo is None or self.hi is None:
            return True
        if since is not None and self.hi < since[:19]:
            return False
        return not (until is not None and self.lo[:19] > until[:19])


def _name_time(text: str) -> str:
    """``20261130T000000Z`` -> ``2026-11-30T00:00:00Z``."""
    return f"{text[0:4]}-{text[4:6]}-{text[6:8]}T{text[9:11]}:{text[11:13]}:{text[13:15]}Z"


def _compact(iso: str) -> str:
    """``2026-11-30T00:00:00...`` -> ``20261130T000000Z``."""
    return iso[0:4] + iso[5:7] + iso[8:10] + "T" + iso[11:13] + iso[14:16] + iso[17:19] + "Z"


def iso_second(text: str) -> str:
    """An ISO time truncated to the second, as segment bounds keep it."""
    return text[:19] + "Z"


def parse_name(path: Path) -> Segment | None:
    match = _NAME.match(path.name)
    if match is None:
        return None
    lo, hi = match["lo"], match["hi"]
    return Segment(path=path, kind=match["kind"], seq=int(match["seq"]),
                   part=int(match["part"] or 0), lo=_name_time(lo) if lo else None,
                   hi=_name_time(hi) if hi else None,
                   count=int(match["count"]) if match["count"] else None,
                   compressed=bool(match["gz"]))


def list_segments(state_dir: Path, kind: str) -> list[Segment]:
    """The segments of ``kind``, oldest first (generation, then part)."""
    out = []
    try:
        names = os.listdir(state_dir)
    except FileNotFoundError:
        return []
    for name in names:
        if name.startswith(kind + ".") and not name.endswith(".tmp"):
            segment = parse_name(state_dir / name)
            if segment is not None and segment.kind == kind:
                out.append(segment)
    out.sort(key=lambda s: (s.seq, s.part, s.sealed))
    return out


def current_generation(state_dir: Path, kind: str) -> int:
    """The generation of ``<kind>.jsonl``: one more than the newest segment's."""
    segments = list_segments(state_dir, kind)
    return segments[-1].seq + 1 if segments else 1


def clean_debris(state_dir: Path, kind: str) -> list[Segment]:
    """After a crash: drop ``.tmp`` parts, and a plain segment whose sealed parts all exist
    (its unlink was the step not done). Returns the plain segments still to seal."""
    for name in os.listdir(state_dir):
        if name.startswith(kind + ".") and name.endswith(".tmp"):
            (state_dir / name).unlink(missing_ok=True)
    segments = list_segments(state_dir, kind)
    unsealed = [s for s in segments if not s.sealed]
    todo = []
    for plain in unsealed:
        parts = [s for s in segments if s.seq == plain.seq and s.sealed]
        if parts and _parts_complete(parts):
            plain.path.unlink(missing_ok=True)
        else:
            for part in parts:  # a partial split: redo it whole
                part.path.unlink(missing_ok=True)
            todo.append(plain)
    return todo


def _parts_complete(parts: list[Segment]) -> bool:
    """A seal creates ``.<kind>.<seq>.sealing`` before its first part and removes it after
    its last: the parts are complete when that marker is gone and parts run 0..n-1."""
    marker = parts[0].path.parent / f".{parts[0].kind}.{parts[0].seq:06d}.sealing"
    return not marker.exists() and [p.part for p in parts] == list(range(len(parts)))


def read_bytes(segment: Segment | Path) -> bytes:
    """The whole uncompressed content (a torn or truncated gzip member yields what it
    holds up to the damage: the torn-tail rule of SPEC §4 for compressed parts too)."""
    path = segment.path if isinstance(segment, Segment) else segment
    compressed = segment.compressed if isinstance(segment, Segment) else path.suffix == ".gz"
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return b""
    if not compressed:
        return data
    try:
        return gzip.decompress(data)
    except (OSError, EOFError, zlib.error):
        inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
        try:
            out = inflater.decompress(data)
        except zlib.error:
            out = b""
        return out[: out.rfind(b"\n") + 1]


_TS_KEYS = (b'"ts":"', b'"scheduled_at":"')


def record_bounds(line: bytes) -> tuple[str | None, str | None]:
    """The earliest and latest time a line mentions, found without parsing JSON (a seal
    looks at every line of a segment): its ``ts`` and ``scheduled_at``. (A missed range's
    ``first_scheduled_at`` is its ``scheduled_at`` and its ``last_scheduled_at`` is before
    its ``ts``, so they never widen the bounds.)"""
    lo = hi = None
    for key in _TS_KEYS:
        start = line.find(key)
        if start < 0:
            continue
        start += len(key)
        value = line[start:start + 19].decode("ascii", "replace")
        if len(value) == 19 and value[4] == "-" and value[10] == "T":
            if lo is None or value < lo:
                lo = value
            if hi is None or value > hi:
                hi = value
    return lo, hi


def seal(plain: Segment, part_bytes: int,
         progress: Callable[[int, int], None] | None = None,
         on_records: Callable[[Iterator[bytes]], None] | None = None) -> list[Segment]:
    """Split a plain rotated segment into parts of about ``part_bytes`` (whole lines),
    compress each where it pays, name each with its bounds and count, then drop the plain
    file. ``on_records`` sees every line once, in order (the checkpoint folds them in the
    same pass); ``progress(done, total)`` after each part."""
    state_dir = plain.path.parent
    marker = state_dir / f".{plain.kind}.{plain.seq:06d}.sealing"
    marker.write_bytes(b"")
    _fsync_dir(state_dir)
    total = plain.path.stat().st_size
    done = 0
    parts: list[Segment] = []
    with open(plain.path, "rb") as f:
        while True:
            chunk = f.read(part_bytes)
            if not chunk:
                break
            if not chunk.endswith(b"\n"):
                rest = f.readline()
                chunk += rest
            if not chunk.endswith(b"\n"):  # a torn tail in a rotated file: drop it
                chunk = chunk[: chunk.rfind(b"\n") + 1]
                if not chunk:
                    break
            lines = chunk[:-1].split(b"\n")
            if on_records is not None:
                on_records(iter(lines))
            parts.append(_write_part(plain, len(parts), chunk, lines))
            done += len(chunk)
            if progress is not None:
                progress(done, total)
    _fsync_dir(state_dir)
    marker.unlink()
    plain.path.unlink()
    _fsync_dir(state_dir)
    return parts


def _write_part(plain: Segment, part: int, data: bytes, lines: list[bytes]) -> Segment:
    lo = hi = None
    count = 0
    for line in lines:
        if not line.strip():
            continue
        count += 1
        a, b = record_bounds(line)
        if a is not None and (lo is None or a < lo):
            lo = a
        if b is not None and (hi is None or b > hi):
            hi = b
    lo = lo or "1970-01-01T00:00:00"
    hi = hi or lo
    packed = gzip.compress(data, GZIP_LEVEL, mtime=0)
    compressed = len(packed) <= len(data) * (1 - MIN_SAVING)
    name = (f"{plain.kind}.{plain.seq:06d}.{part:03d}.{_compact(lo)}.{_compact(hi)}.n{count}"
            f".jsonl{'.gz' if compressed else ''}")
    path = plain.path.parent / name
    tmp = path.with_name(name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, FILE_MODE)
    try:
        view = memoryview(packed if compressed else data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    segment = parse_name(path)
    assert segment is not None
    return segment


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
