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

import contextlib
import enum
import functools
import json
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

from cronfile.state.checkpoint import (
    SLOT_REACH_S,
    LedgerSummary,
    fold_rest,
    fresh_summary,
    load_checkpoint,
    position_valid,
    write_checkpoint,
)
from cronfile.state.private import FILE_MODE, private_dir
from cronfile.state.retention import expired_segments
from cronfile.state.segments import (
    LOG_KINDS,
    Segment,
    clean_debris,
    current_generation,
    list_segments,
    read_bytes,
    seal,
)
from cronfile.state.segments import parse_name as parse_segment

ledger_log = logging.getLogger("cronfile.ledger")

PART_BYTES = 4 * 1024 * 1024
"""Sealed segments are split into parts of about this size: a ``--since/--until`` window
then decompresses a few parts (each ~12 times smaller than a whole segment of the upgrade),
and a limited query stops after the newest one or two."""
CHECKPOINT_EVERY_BYTES = 2 * 1024 * 1024
"""The checkpoint is written again after this much of runs.jsonl (and at every rotation)."""
DEFAULT_SEGMENT_BYTES = 16 * 1024 * 1024
"""A current file past this is rotated: big enough that a busy center rotates every few
minutes at most, small enough that a restart after a crash folds it in well under a second
and a query reads the newest one whole."""

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
    "read_log",
    "iso",
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


def parse_iso(text: Any) -> float | None:
    """Epoch seconds of a record's time field (the inverse of :func:`iso`); ``None`` for
    anything that is not an ISO-8601 string."""
    if not isinstance(text, str):
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


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
        self.size = 0
        """Bytes in the file (kept as it is written: the rotation check reads no stat)."""
        self.day: str | None = None
        """UTC date (``2026-11-30``) of the file's first record, None while it is empty."""

    def open(self) -> int:
        """Repair a torn tail and open for appending; returns the bytes dropped by the repair."""
        with self._lock:
            if self._fd is not None:
                return 0
            dropped = self.repair()
            existed = self.path.exists()
            flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
            self._fd = os.open(self.path, flags, FILE_MODE)
            if not existed:
                fsync_dir(self.path.parent)  # the new name must survive a crash too
            self.size = os.fstat(self._fd).st_size
            self.day = _first_day(self.path) if self.size else None
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
            size = os.fstat(self._fd).st_size
            try:
                _write_all(self._fd, data)
                if sync:
                    os.fsync(self._fd)
            except OSError:
                # All or nothing (a full disk): half a batch left behind would glue the
                # next record onto a torn line, and lose both.
                with contextlib.suppress(OSError):
                    os.ftruncate(self._fd, size)
                raise
            self.size += len(data)
            if self.day is None:
                self.day = utc_ts()[:10]

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


def _first_day(path: Path) -> str | None:
    """The UTC date of a log's first record (its ``ts`` is the second key of the line)."""
    with open(path, "rb") as f:
        head = f.read(64)
    start = head.find(b'"ts":"')
    return head[start + 6:start + 16].decode("ascii", "replace") if start >= 0 else None


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
    """The two logs of one state directory, with their segments and checkpoint.

    :meth:`open` repairs torn tails (in the current files and in rotated plain segments),
    finishes a seal a crash interrupted, takes over an oversized log of an earlier version
    (rotated and split at once, with progress logged), and brings the checkpoint up to the
    end of the logs; :meth:`recover` then hands the summary to the center without reading
    history again. While it runs, :meth:`write_runs` and :meth:`event` rotate a log past
    ``segment_bytes`` (or once it holds an earlier UTC day); sealing, the checkpoint and
    retention happen on a maintenance thread, so no append waits for compression.
    """

    def __init__(self, state_dir: Path | str, segment_bytes: int = DEFAULT_SEGMENT_BYTES,
                 retention_s: float | None = None, reach_s: float = SLOT_REACH_S,
                 retention_text: str | None = None) -> None:
        self.state_dir = Path(state_dir)
        private_dir(self.state_dir)
        self.runs = JsonlLog(self.state_dir / RUNS_FILE)
        self.events = JsonlLog(self.state_dir / EVENTS_FILE)
        self.segment_bytes = segment_bytes
        self.retention_s = retention_s
        self.retention_text = retention_text
        self.reach_s = reach_s
        self._logs = {"runs": self.runs, "events": self.events}
        self._summary: LedgerSummary | None = None
        self._writer: ThreadPoolExecutor | None = None
        self._maintenance: ThreadPoolExecutor | None = None
        self._maintenance_lock = threading.Lock()  # the summary: maintenance thread vs close
        self._rotation_lock = threading.Lock()  # a fold of the current file vs its rename
        self._checkpoint_queued = False
        self._checkpointed_at = 0  # bytes of runs.jsonl the checkpoint covers

    # ------------------------------------------------------------------ opening

    def open(self) -> dict[str, int]:
        """Repair and open both logs, seal what a crash left, bring the checkpoint up to
        date; returns the bytes dropped from each torn tail of the current files."""
        dropped = {"runs": self.runs.open(), "events": self.events.open()}
        summary = self._usable_checkpoint()
        for kind in LOG_KINDS:
            log = self._logs[kind]
            if log.size > self.segment_bytes:  # e.g. the one runs.jsonl of an earlier version
                ledger_log.warning("%s is %.0f MB: rotating it into segments before starting "
                                   "(once; later starts read only the checkpoint)",
                                   log.path.name, log.size / 1e6)
                self._rotate(kind)
            for plain in clean_debris(self.state_dir, kind):
                JsonlLog(plain.path).repair()
                self._seal(kind, plain, summary, log_progress=True)
            fold_rest(self.state_dir, kind, summary)
        summary.prune(self.reach_s)
        self._summary = summary
        self._checkpointed_at = summary.position["runs"][1]
        write_checkpoint(self.state_dir, summary, crash_hook)
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="ledger-writer")
        self._maintenance = ThreadPoolExecutor(1, thread_name_prefix="ledger-maintenance")
        self._retention()
        return dropped

    def _usable_checkpoint(self) -> LedgerSummary:
        """The checkpoint if it matches the files; else an empty summary positioned at the
        oldest segment (everything is folded again: slow once, nothing lost)."""
        summary = load_checkpoint(self.state_dir)
        if summary is not None and all(position_valid(self.state_dir, k, summary)
                                       for k in LOG_KINDS):
            return summary
        if summary is not None or any(list_segments(self.state_dir, k) for k in LOG_KINDS):
            ledger_log.warning("no usable checkpoint: rebuilding it from the segments")
        return fresh_summary(self.state_dir)

    def recover(self) -> LedgerSummary:
        """What start-up needs from history (a copy: the center may keep it)."""
        assert self._summary is not None, "open() first"
        with self._maintenance_lock:
            return self._summary.copy()

    # ------------------------------------------------------------------ writing

    def write_runs(self, data: bytes, sync: bool = True) -> None:
        """Append encoded run records (one write, one fsync), then rotate if due."""
        slow_disk_hook()
        self.runs.write(data, sync)
        self._maybe_rotate("runs")
        if (self._maintenance is not None and not self._checkpoint_queued
                and self.runs.size - self._checkpointed_at >= CHECKPOINT_EVERY_BYTES):
            self._checkpoint_queued = True
            self._maintenance.submit(self._refresh_checkpoint)

    def write_events(self, data: bytes, sync: bool = True) -> None:
        """Append encoded event records (one write, one fsync), then rotate if due."""
        self.events.write(data, sync)
        self._maybe_rotate("events")

    def append_runs(self, records: Iterable[dict[str, Any]], sync: bool = True) -> None:
        self.write_runs(encode_records(records), sync)

    def event(self, name: str, sync: bool = True, **fields: Any) -> None:
        """Append one event record (``{"event": name, ...}``)."""
        self.events.append([{"event": name, **fields}], sync=sync)
        self._maybe_rotate("events")

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Future[Any]:
        """Run ``fn`` on the writer thread, after everything submitted before it: the
        center's appends and fsyncs happen there, off its event loop, in order."""
        if self._writer is None:
            done: Future[Any] = Future()
            try:
                done.set_result(fn(*args, **kwargs))
            except BaseException as exc:  # noqa: BLE001 - handed to the caller's future
                done.set_exception(exc)
            return done
        return self._writer.submit(fn, *args, **kwargs)

    def _maybe_rotate(self, kind: str) -> None:
        log = self._logs[kind]
        if log.size >= self.segment_bytes or (log.day is not None and log.day < utc_ts()[:10]):
            self._rotate(kind)

    def _rotate(self, kind: str) -> None:
        """Rename the current file to the next segment and start a new one. The rename is
        atomic: after a crash there is either the old file or the segment (and a missing
        current file is simply created again)."""
        log = self._logs[kind]
        with self._rotation_lock:
            gen = current_generation(self.state_dir, kind)
            segment_path = self.state_dir / f"{kind}.{gen:06d}.jsonl"
            log.close()
            os.rename(log.path, segment_path)
            fsync_dir(self.state_dir)
            crash_hook("rotate")
            log.open()
            if kind == "runs":
                self._checkpointed_at = 0
        plain = parse_segment(segment_path)
        assert plain is not None
        if self._maintenance is not None:
            self._maintenance.submit(self._seal_and_tidy, kind, plain)

    def _refresh_checkpoint(self) -> None:
        """Fold what was appended since the checkpoint and write it again (every few MB of
        runs): a restart after a crash, and ``status``, then fold at most that much."""
        try:
            with self._maintenance_lock, self._rotation_lock:
                assert self._summary is not None
                for kind in LOG_KINDS:
                    fold_rest(self.state_dir, kind, self._summary)
                self._summary.prune(self.reach_s)
                write_checkpoint(self.state_dir, self._summary, crash_hook)
                self._checkpointed_at = self._summary.position["runs"][1]
        except Exception:
            ledger_log.exception("writing the checkpoint failed (the next one will cover it)")
        finally:
            self._checkpoint_queued = False

    def _seal_and_tidy(self, kind: str, plain: Segment) -> None:
        try:
            with self._maintenance_lock:
                assert self._summary is not None
                self._seal(kind, plain, self._summary, log_progress=False)
                self._summary.prune(self.reach_s)
                write_checkpoint(self.state_dir, self._summary, crash_hook)
            self._retention()
        except Exception:  # the segment stays plain and is sealed at the next start
            ledger_log.exception("sealing %s failed", plain.path.name)

    def _seal(self, kind: str, plain: Segment, summary: LedgerSummary,
              log_progress: bool) -> None:
        """Seal ``plain``, folding into ``summary`` the lines it has not seen yet."""
        seq, offset = summary.position.get(kind, [plain.seq, 0])
        fold = seq <= plain.seq
        skip = [offset if seq == plain.seq else 0]
        summary.seq_hint = plain.seq
        began = time.monotonic()

        def on_lines(lines: Iterator[bytes]) -> None:
            if not fold:
                return
            for line in lines:
                if skip[0] > 0:
                    skip[0] -= len(line) + 1
                    continue
                summary.add_line(kind, line)
            summary.prune(self.reach_s)  # per part: taking over years keeps memory flat

        def progress(done: int, total: int) -> None:
            if log_progress and total > 4 * self.segment_bytes:
                ledger_log.warning("taking over %s: %d%% (%.0f of %.0f MB, %.0fs)",
                                   plain.path.name, 100 * done // max(total, 1), done / 1e6,
                                   total / 1e6, time.monotonic() - began)
            crash_hook("seal")

        seal(plain, min(self.segment_bytes, PART_BYTES), progress, on_lines)
        if fold:
            summary.position[kind] = [plain.seq + 1, 0]

    # ------------------------------------------------------------------ retention

    def _retention(self) -> None:
        """Remove whole sealed segments older than the retention, oldest first (SPEC §8)."""
        if self.retention_s is None or self._summary is None:
            return
        cutoff = iso(time.time() - self.retention_s)
        assert cutoff is not None
        with self._maintenance_lock:
            summary = self._summary
            open_seqs = {int(r.get("seq") or 0) for r in summary.open_runs.values()}
            for kind in LOG_KINDS:
                removable = expired_segments(
                    list_segments(self.state_dir, kind), cutoff,
                    open_seqs if kind == "runs" else set(), summary.position[kind][0])
                if not removable:
                    continue
                for segment in removable:
                    segment.path.unlink(missing_ok=True)
                fsync_dir(self.state_dir)
                ledger_log.info("retention %s: removed %d %s segment(s) from %s to %s",
                                self.retention_text, len(removable), kind, removable[0].lo,
                                removable[-1].hi)
                # through the writer thread: it alone appends to (and rotates) the logs
                self.submit(self.event, "retention", log=kind, retention=self.retention_text,
                            **{"from": removable[0].lo, "to": removable[-1].hi},
                            records=sum(s.count or 0 for s in removable),
                            segments=[s.path.name for s in removable])

    # ------------------------------------------------------------------ reading

    def read_runs(self, stats: ReadStats | None = None) -> Iterator[dict[str, Any]]:
        """Every run record of every segment and the current file, oldest first."""
        return read_log(self.state_dir, "runs", stats)

    def read_events(self, stats: ReadStats | None = None) -> Iterator[dict[str, Any]]:
        return read_log(self.state_dir, "events", stats)

    def run_views(self) -> list[RunView]:
        return fold_runs(self.read_runs())

    # ------------------------------------------------------------------ closing

    def drain(self, seals: bool = True) -> None:
        """Wait for everything submitted to the writer thread, then (``seals``) for the
        seals and checkpoints it queued."""
        if self._writer is not None:
            self._writer.submit(lambda: None).result()
        if seals and self._maintenance is not None:
            self._maintenance.submit(lambda: None).result()

    def close(self) -> None:
        """Finish queued writes and seals, leave a checkpoint covering everything (so the
        next start folds nothing), close the files."""
        if self._writer is not None:
            self._writer.shutdown(wait=True)
            self._writer = None
        if self._maintenance is not None:
            self._maintenance.shutdown(wait=True)
            self._maintenance = None
        if self._summary is not None:
            with self._maintenance_lock:
                for kind in LOG_KINDS:
                    fold_rest(self.state_dir, kind, self._summary)
                self._summary.prune(self.reach_s)
                write_checkpoint(self.state_dir, self._summary, crash_hook)
            self._summary = None
        self.runs.close()
        self.events.close()

    def __enter__(self) -> Ledger:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_log(state_dir: Path, kind: str, stats: ReadStats | None = None) -> Iterator[dict[str, Any]]:
    """Every record of log ``kind``: its segments oldest first, then the current file."""
    stats = stats if stats is not None else ReadStats()
    for segment in list_segments(state_dir, kind):
        yield from parse_lines(read_bytes(segment).split(b"\n"), stats)
    yield from read(state_dir / f"{kind}.jsonl", stats)


def parse_lines(lines: Iterable[bytes], stats: ReadStats) -> Iterator[dict[str, Any]]:
    for line in lines:
        record = _parse_line(line)
        if record is None:
            if line.strip():
                stats.skipped += 1
            continue
        stats.records += 1
        yield record


def slow_disk_hook() -> None:
    """Fault injection for the tests: ``CRONFILE_SLOW_DISK=SECONDS`` makes every append of
    run records take that much longer, as on a slow disk (which the center must never
    wait for on its event loop, except for ``dispatched`` before a start)."""
    delay = os.environ.get("CRONFILE_SLOW_DISK")
    if delay:
        time.sleep(float(delay))


_crash_counts: dict[str, int] = {}


def crash_hook(point: str) -> None:
    """Fault injection for the crash tests: ``CRONFILE_CRASH_AT=rotate|seal|checkpoint``
    (``checkpoint:3``: the third time there) makes this process SIGKILL itself at that
    point: a power cut there, as far as the files can tell. Unset, it costs one lookup."""
    wanted = os.environ.get("CRONFILE_CRASH_AT")
    if not wanted:
        return
    name, _, nth = wanted.partition(":")
    if name != point:
        return
    _crash_counts[point] = _crash_counts.get(point, 0) + 1
    if _crash_counts[point] >= int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
