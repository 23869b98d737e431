"""The append-only JSONL logs of SPEC §4: ``<state>/runs.jsonl`` and ``<state>/events.jsonl``.

Every line is one JSON object with ``"v": 1`` and ``"ts"`` (UTC, milliseconds, ``Z``, e.g.
``2026-11-22T18:58:16.123Z``), written with ``ensure_ascii`` so a line is pure ASCII: job
output with newlines, ANSI escapes or invalid UTF-8 is escaped inside its string and can never
split or break a record.

Durability (why it is done this way):

* **Group commit.** :meth:`JsonlLog.append` encodes all given records first, then writes them
  with ONE ``os.write`` on an ``O_APPEND`` descriptor and ``fsync`` s once. The "dispatched"
  record must be on disk before a run is sent (SPEC §5), and batching the records of one
  scheduler tick keeps that to one fsync per tick rather than one per run.
* **Torn tails.** A crash can leave a partial last line. :meth:`JsonlLog.repair` (run by
  :meth:`JsonlLog.open`) truncates the file back to just after its last newline, so the next
  append starts on a clean line; readers (:func:`read`) skip any line that is not a JSON
  object and count it, so neither a torn tail nor garbage ever stops a reader.

Run records (``runs.jsonl``), all carrying ``run_id, job, agent, transport`` (``local|tcp|ssh``),
``scheduled_at`` (ISO-8601 UTC or null for manual runs), ``attempt`` and ``revision``
(``{"content_hash": ..., "git_commit": ...}``)::

    {"record": "dispatched", ...}          # durably written BEFORE the run is sent
    {"record": "started", ..., "started_at": ..., "pid": ...}
    {"record": "finished", ..., "status": "succeeded|failed|timeout|killed|lost|skipped|
        missed|no_agent", "exit_code": int|null, "signal": int|null, "started_at": ...,
        "finished_at": ..., "duration_s": float, "output_tail": str, "reason": str (optional)}

A bounded range of missed slots (the center was down) is ONE record, not one per slot::

    {"record": "finished", "status": "missed", "job": ..., "count": N,
     "first_scheduled_at": ..., "last_scheduled_at": ..., "run_id": ...}

Event records (``events.jsonl``) carry ``"event"``: ``center_started``, ``center_stopped``,
``revision_applied`` (with the diff summary), ``revision_rejected`` (with the errors),
``agent_connected``, ``agent_disconnected``, and whatever else the center reports, plus fields
specific to each.
"""

from __future__ import annotations

import enum
import functools
import json
import math
import os
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

from cronfile.transports.executor import RunOutcome

__all__ = [
    "EVENTS_FILE",
    "RUNS_FILE",
    "JsonlLog",
    "Ledger",
    "ReadStats",
    "RunView",
    "encode_record",
    "encode_records",
    "fold_runs",
    "read",
    "iso",
    "outcome_fields",
    "utc_ts",
]

RUNS_FILE = "runs.jsonl"
EVENTS_FILE = "events.jsonl"
FORMAT_VERSION = 1

RunView = dict[str, Any]
"""One run with its records merged: later records override, ``dispatched_ts`` is the first ts."""

_REPAIR_BLOCK = 64 * 1024


@functools.lru_cache(maxsize=1024)  # a burst formats the same scheduled time for every run
def iso(ts: float | None) -> str | None:
    """A record's time field (``scheduled_at``, ``started_at``, ...) from epoch seconds:
    ``2026-11-22T18:58:16.123Z``, or ``2026-11-22T18:58:16Z`` on a whole second."""
    if ts is None:
        return None
    text = datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds")
    return text.replace(".000+00:00", "Z").replace("+00:00", "Z")


def outcome_fields(outcome: RunOutcome) -> dict[str, Any]:
    """The fields a ``finished`` record takes from an outcome, whichever transport ran it
    (a local run, an agent's report, SSH): the same names and the same time format."""
    fields: dict[str, Any] = {
        "status": outcome.status.value, "exit_code": outcome.exit_code,
        "signal": outcome.signal, "started_at": iso(outcome.started_at.timestamp()),
        "finished_at": iso(outcome.finished_at.timestamp()),
        "duration_s": outcome.duration_s, "output_tail": outcome.output_tail,
    }
    if outcome.reason:
        fields["reason"] = outcome.reason
    return fields


def utc_ts(moment: datetime | None = None) -> str:
    """``2026-11-22T18:58:16.123Z``: UTC, milliseconds, sortable as text."""
    moment = (moment or datetime.now(UTC)).astimezone(UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def _json_default(value: Any) -> Any:
    """Types the center naturally hands us; anything else is a bug and raises."""
    if isinstance(value, datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value.astimezone(UTC).isoformat().replace("+00:00", "Z")
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, set | frozenset):
        return sorted(value)
    raise TypeError(f"cannot record a value of type {type(value).__name__}")


def _finite(value: Any) -> Any:
    """NaN/Infinity are not JSON (jq and most readers reject them): write null instead."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


_ENCODER = json.JSONEncoder(
    ensure_ascii=True, separators=(",", ":"), sort_keys=False, default=_json_default,
    allow_nan=False,
)
"""One encoder for every record: ``json.dumps`` with options builds a new one per call."""


def encode_record(record: dict[str, Any], ts: str | None = None) -> bytes:
    """One line of the log: ``v`` and ``ts`` (``ts`` or now) first when absent, pure ASCII,
    ending in ``\\n``."""
    full = record if "v" in record and "ts" in record else {
        "v": FORMAT_VERSION, "ts": ts or utc_ts(), **record
    }
    try:
        text = _ENCODER.encode(full)
    except ValueError:
        text = _ENCODER.encode(_finite(full))
    return text.encode("ascii") + b"\n"


def encode_records(records: Iterable[dict[str, Any]]) -> bytes:
    """Lines for records written together: they share one timestamp (formatting it is a
    good part of encoding a small record, and a batch of thousands has many)."""
    ts = utc_ts()
    return b"".join(encode_record(r, ts) for r in records)


class JsonlLog:
    """One append-only JSONL file, written with group commit.

    One writer per file (the center owns its state directory); any number of readers.
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._fd: int | None = None
        self._lock = threading.Lock()  # the center may append from a worker thread

    def open(self) -> int:
        """Repair a torn tail and open for appending; returns the bytes dropped by the repair."""
        with self._lock:
            if self._fd is not None:
                return 0
            dropped = self.repair()
            existed = self.path.exists()
            flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
            self._fd = os.open(self.path, flags, 0o644)
            if not existed:
                fsync_dir(self.path.parent)  # the new name must survive a crash too
            return dropped

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def append(self, records: Iterable[dict[str, Any]], sync: bool = True) -> None:
        """Write all ``records`` with one write and (if ``sync``) one fsync.

        Everything is encoded before anything is written, so a record that cannot be encoded
        fails the call without leaving half a batch in the file.
        """
        self.write(encode_records(records), sync)

    def write(self, data: bytes, sync: bool = True) -> None:
        """Append lines already encoded with :func:`encode_record` (one write, then one
        fsync unless ``sync`` is false): the center encodes a chunk's records once."""
        if not data:
            return
        if self._fd is None:
            self.open()
        with self._lock:
            assert self._fd is not None
            _write_all(self._fd, data)
            if sync:
                os.fsync(self._fd)

    def repair(self) -> int:
        """Truncate a partial last line (the torn tail of a crash); returns bytes dropped."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            return 0
        try:
            size = os.fstat(fd).st_size
            if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
                return 0
            keep = _end_of_last_line(fd, size)
            os.ftruncate(fd, keep)
            os.fsync(fd)
            return size - keep
        finally:
            os.close(fd)

    def read(self, stats: ReadStats | None = None) -> Iterator[dict[str, Any]]:
        return read(self.path, stats)

    def __enter__(self) -> JsonlLog:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _write_all(fd: int, data: bytes) -> None:
    """One ``write`` in practice; loops only on a short write (a full disk, a signal)."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _end_of_last_line(fd: int, size: int) -> int:
    """Offset just after the last ``\\n`` (0 if none), scanning backwards in blocks."""
    end = size
    while end > 0:
        start = max(0, end - _REPAIR_BLOCK)
        block = os.pread(fd, end - start, start)
        newline = block.rfind(b"\n")
        if newline >= 0:
            return start + newline + 1
        end = start
    return 0


def fsync_dir(path: Path) -> None:
    """Make a new or renamed directory entry durable (best effort where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@dataclass
class ReadStats:
    """What a tolerant read saw: records yielded and lines skipped as unreadable."""

    records: int = 0
    skipped: int = 0


def read(path: Path | str, stats: ReadStats | None = None) -> Iterator[dict[str, Any]]:
    """Every JSON-object line of ``path``; torn, garbage or non-object lines are skipped and
    counted in ``stats``. A missing file reads as empty."""
    stats = stats if stats is not None else ReadStats()
    try:
        f = open(path, "rb")  # noqa: SIM115 - a generator owns the file until exhausted
    except FileNotFoundError:
        return
    with f:
        for line in f:
            record = _parse_line(line)
            if record is None:
                if line.strip():
                    stats.skipped += 1
                continue
            stats.records += 1
            yield record


def _parse_line(line: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(line.decode("utf-8", errors="replace"))
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def fold_runs(records: Iterable[dict[str, Any]]) -> list[RunView]:
    """One view per ``run_id``, in order of first appearance: later records override fields;
    the first record's ``ts`` is kept as ``dispatched_ts``. Records without a run id are
    ignored (they are not run records)."""
    views: dict[str, RunView] = {}
    for record in records:
        run_id = record.get("run_id")
        if not isinstance(run_id, str):
            continue
        view = views.get(run_id)
        if view is None:
            view = views[run_id] = {"dispatched_ts": record.get("ts")}
        view.update(record)
    return list(views.values())


class Ledger:
    """The two logs of one state directory."""

    def __init__(self, state_dir: Path | str) -> None:
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.runs = JsonlLog(self.state_dir / RUNS_FILE)
        self.events = JsonlLog(self.state_dir / EVENTS_FILE)

    def open(self) -> dict[str, int]:
        """Repair and open both logs; returns the bytes dropped from each torn tail."""
        return {"runs": self.runs.open(), "events": self.events.open()}

    def close(self) -> None:
        self.runs.close()
        self.events.close()

    def event(self, name: str, sync: bool = True, **fields: Any) -> None:
        """Append one event record (``{"event": name, ...}``)."""
        self.events.append([{"event": name, **fields}], sync=sync)

    def read_runs(self, stats: ReadStats | None = None) -> Iterator[dict[str, Any]]:
        return read(self.runs.path, stats)

    def read_events(self, stats: ReadStats | None = None) -> Iterator[dict[str, Any]]:
        return read(self.events.path, stats)

    def run_views(self) -> list[RunView]:
        return fold_runs(self.read_runs())

    def __enter__(self) -> Ledger:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
