"""What a restart (and ``cronfile status``) needs from all of history, folded small.

:class:`LedgerSummary` is a left fold over the records of both logs, in order: the runs still
open (dispatched or started, not finished), each job's last outcome, last success and the end
of its last missed range, each host's last run, the slots recent enough for once-per-slot and
retries, the last rejected revision and recent ``triggered`` events. Its size depends on the
number of jobs, hosts and runs in flight, never on the length of history.

``<state>/checkpoint.json`` is that summary written out together with the position it covers
(per log: generation and byte offset). Start-up loads it and folds only what was appended
after that position. It is an optimisation only: a missing, torn or stale checkpoint is
rebuilt by folding the segments from the start (slow, but nothing is lost), which is also how
a state directory of an earlier version is taken over.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cronfile.state.private import FILE_MODE
from cronfile.state.segments import LOG_KINDS, current_generation, list_segments, read_bytes

__all__ = ["CHECKPOINT_FILE", "SLOT_REACH_S", "LedgerSummary", "Position", "current_summary",
           "fold_rest", "load_checkpoint", "position_valid", "write_checkpoint"]

CHECKPOINT_FILE = "checkpoint.json"
CHECKPOINT_VERSION = 1
SLOT_REACH_S = 6 * 3600.0
"""Slots (and triggered starts) are kept while their last record is this recent compared with
the newest record: the center's own slot memory, past which it neither retries nor requeues."""

BASE_KEYS = ("run_id", "job", "agent", "transport", "scheduled_at", "attempt", "revision")
LAST_KEYS = ("run_id", "status", "scheduled_at", "transport", "agent", "reason", "route",
             "finished_at", "exit_code", "attempt", "started_at")
FAILED = ("failed", "timeout")

_DECODER = json.JSONDecoder()
"""Decoding text with one decoder skips ``json.loads``' per-call set-up (a take-over folds
millions of lines)."""

Position = dict[str, list[int]]
"""Per log kind: ``[generation, byte offset]`` the summary covers up to (exclusive)."""


def _iso_minus(text: str, seconds: float) -> str:
    """``text`` (ISO UTC) minus ``seconds``, as sortable ISO text."""
    from datetime import datetime, timedelta

    moment = datetime.fromisoformat(text[:19] + "+00:00") - timedelta(seconds=seconds)
    return moment.strftime("%Y-%m-%dT%H:%M:%S")


@dataclass
class LedgerSummary:
    """The fold (mutable on purpose: it is an accumulator, fed one record at a time)."""

    position: Position = field(default_factory=dict)
    last_ts: str | None = None
    open_runs: dict[str, dict[str, Any]] = field(default_factory=dict)
    jobs: dict[str, dict[str, Any]] = field(default_factory=dict)
    hosts: dict[str, dict[str, Any]] = field(default_factory=dict)
    slots: dict[str, list[Any]] = field(default_factory=dict)
    """``"job\\x00scheduled_at\\x00agent"`` -> ``[last attempt, its finished record if it
    failed (else None), ts of its last record]``."""
    rejection: dict[str, Any] | None = None
    notify_failures: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per job, its last failed notification (shown by ``status``)."""
    triggered: list[dict[str, Any]] = field(default_factory=list)
    records: dict[str, int] = field(default_factory=dict)
    skipped: int = 0
    seq_hint: int = 0
    """The generation being folded (not saved): an open run remembers where it began, so
    retention never removes the segment holding it."""

    # ------------------------------------------------------------------ folding

    def add_run(self, record: dict[str, Any]) -> None:
        ts = record.get("ts")
        if isinstance(ts, str) and (self.last_ts is None or ts > self.last_ts):
            self.last_ts = ts
        self.records["runs"] = self.records.get("runs", 0) + 1
        run_id, job = record.get("run_id"), record.get("job")
        if not isinstance(run_id, str) or not isinstance(job, str):
            return
        kind = record.get("record")
        if kind in ("dispatched", "started"):
            run = self.open_runs.get(run_id)
            if run is None:
                run = self.open_runs[run_id] = {k: record.get(k) for k in BASE_KEYS}
                run["dispatched_ts"] = ts
                run["seq"] = self.seq_hint
            run["record"] = kind
            if "started_at" in record:
                run["started_at"] = record["started_at"]
        elif kind == "finished":
            self.open_runs.pop(run_id, None)
            status = record.get("status")
            info = self.jobs.setdefault(job, {})
            info["last"] = {k: record.get(k) for k in LAST_KEYS}
            finished_at = record.get("finished_at")
            if status == "succeeded" and isinstance(finished_at, str) \
                    and finished_at > (info.get("last_success") or ""):
                info["last_success"] = finished_at
            if status == "missed":
                end = record.get("last_scheduled_at") or record.get("scheduled_at")
                if isinstance(end, str) and end > (info.get("missed_until") or ""):
                    info["missed_until"] = end
        scheduled = record.get("scheduled_at")
        if isinstance(scheduled, str):
            info = self.jobs.setdefault(job, {})
            if scheduled > (info.get("last_scheduled_at") or ""):
                info["last_scheduled_at"] = scheduled
            if kind != "started" and record.get("transport") in ("local", "tcp", "ssh"):
                # a run's first record says where it went (started repeats it)
                self.hosts[str(record.get("agent"))] = {
                    "scheduled_at": scheduled, "transport": record.get("transport"),
                    "route": record.get("route")}
            attempt = record.get("attempt")
            if isinstance(attempt, int):
                key = f"{job}\x00{scheduled}\x00{record.get('agent')}"
                slot = self.slots.get(key)
                if slot is None or attempt >= slot[0]:
                    failed = kind == "finished" and record.get("status") in FAILED
                    keep = {k: record.get(k) for k in (*BASE_KEYS, *LAST_KEYS)} if failed else None
                    if slot is None or attempt > slot[0] or kind == "finished":
                        self.slots[key] = [attempt, keep, ts]
                    else:
                        slot[2] = ts

    def add_event(self, record: dict[str, Any]) -> None:
        ts = record.get("ts")
        if isinstance(ts, str) and (self.last_ts is None or ts > self.last_ts):
            self.last_ts = ts
        self.records["events"] = self.records.get("events", 0) + 1
        name = record.get("event")
        if name == "revision_rejected":
            self.rejection = {"ts": ts, "errors": record.get("errors")}
        elif name == "revision_applied":
            self.rejection = None
        elif name == "notify_failed" and isinstance(record.get("job"), str):
            self.notify_failures[record["job"]] = {k: record.get(k) for k in (
                "ts", "kind", "via", "status_code", "error")}
        elif name == "triggered" and isinstance(record.get("due"), dict):
            self.triggered.append({"event": "triggered", "ts": ts, "due": record["due"]})

    def add_line(self, kind: str, line: bytes) -> None:
        """One raw line of log ``kind``; unreadable lines are counted, never fatal."""
        try:
            value = _DECODER.decode(line.decode("utf-8", "replace"))
        except ValueError:
            if line.strip():
                self.skipped += 1
            return
        if not isinstance(value, dict):
            self.skipped += 1
        elif kind == "runs":
            self.add_run(value)
        else:
            self.add_event(value)

    def prune(self, reach_s: float = SLOT_REACH_S) -> None:
        """Forget slots and triggered starts older than ``reach_s`` before the newest record."""
        if self.last_ts is None:
            return
        horizon = _iso_minus(self.last_ts, reach_s)
        self.slots = {k: v for k, v in self.slots.items() if (v[2] or "") >= horizon}
        self.triggered = [t for t in self.triggered if (t.get("ts") or "") >= horizon]

    # ------------------------------------------------------------------ (de)serialising

    def to_json(self) -> dict[str, Any]:
        return {"v": CHECKPOINT_VERSION, "position": self.position, "last_ts": self.last_ts,
                "open_runs": self.open_runs, "jobs": self.jobs, "hosts": self.hosts,
                "slots": self.slots, "rejection": self.rejection, "triggered": self.triggered,
                "notify_failures": self.notify_failures,
                "records": self.records, "skipped": self.skipped}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LedgerSummary:
        if data.get("v") != CHECKPOINT_VERSION:
            raise ValueError(f"checkpoint version {data.get('v')!r}")
        position = data["position"]
        if not isinstance(position, dict) or not all(
                isinstance(v, list) and len(v) == 2 and all(isinstance(n, int) for n in v)
                for v in position.values()):
            raise ValueError("bad position")
        return cls(position=position, last_ts=data.get("last_ts"),
                   open_runs=dict(data["open_runs"]), jobs=dict(data["jobs"]),
                   hosts=dict(data["hosts"]), slots=dict(data["slots"]),
                   rejection=data.get("rejection"), triggered=list(data["triggered"]),
                   notify_failures=dict(data.get("notify_failures") or {}),
                   records=dict(data.get("records") or {}), skipped=int(data.get("skipped") or 0))

    def copy(self) -> LedgerSummary:
        return LedgerSummary.from_json(json.loads(json.dumps(self.to_json())))


def load_checkpoint(state_dir: Path) -> LedgerSummary | None:
    """The checkpoint, or None when there is none or it cannot be used (then rebuild)."""
    try:
        data = json.loads((state_dir / CHECKPOINT_FILE).read_bytes())
        return LedgerSummary.from_json(data)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def write_checkpoint(state_dir: Path, summary: LedgerSummary,
                     crash_hook: Any = None) -> None:
    """Atomically replace the checkpoint: write a temp file, fsync, rename. A crash leaves
    the old checkpoint (or none): never half of one."""
    data = json.dumps(summary.to_json(), separators=(",", ":")).encode()
    path = state_dir / CHECKPOINT_FILE
    tmp = path.with_name(CHECKPOINT_FILE + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, FILE_MODE)
    try:
        half = len(data) // 2
        os.write(fd, data[:half])
        if crash_hook is not None:
            crash_hook("checkpoint")
        view = memoryview(data)[half:]
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def position_valid(state_dir: Path, kind: str, summary: LedgerSummary) -> bool:
    """Whether the summary's position names records that exist (a checkpoint from another
    state directory, or one left behind by a restored backup, does not)."""
    position = summary.position.get(kind)
    if position is None:
        return False
    seq, offset = position
    current = current_generation(state_dir, kind)
    if seq > current:
        return False
    if seq == current:
        return offset <= _file_size(state_dir / f"{kind}.jsonl")
    return offset == 0 or any(s.seq == seq for s in list_segments(state_dir, kind))


def fresh_summary(state_dir: Path) -> LedgerSummary:
    """An empty summary positioned at the oldest record still kept."""
    fresh = LedgerSummary()
    for kind in LOG_KINDS:
        segments = list_segments(state_dir, kind)
        first = segments[0].seq if segments else current_generation(state_dir, kind)
        fresh.position[kind] = [first, 0]
    return fresh


def fold_rest(state_dir: Path, kind: str, summary: LedgerSummary) -> None:
    """Fold every record of log ``kind`` after the summary's position into it: the
    segments a checkpoint has not covered yet (after a crash), then the current file up to
    its last whole line; the position then points there."""
    seq, offset = summary.position[kind]
    current = current_generation(state_dir, kind)
    by_seq: dict[int, list[Any]] = {}
    for segment in list_segments(state_dir, kind):
        if segment.seq >= seq:
            by_seq.setdefault(segment.seq, []).append(segment)
    for gen in sorted(by_seq):
        data = b"".join(read_bytes(s) for s in by_seq[gen])
        summary.seq_hint = gen
        _fold_bytes(summary, kind, data[offset if gen == seq else 0:])
    try:
        with open(state_dir / f"{kind}.jsonl", "rb") as f:
            if seq == current:
                f.seek(offset)
            start = f.tell()
            data = f.read()
    except FileNotFoundError:
        start, data = 0, b""
    data = data[: data.rfind(b"\n") + 1]
    summary.seq_hint = current
    _fold_bytes(summary, kind, data)
    summary.position[kind] = [current, start + len(data)]


def _fold_bytes(summary: LedgerSummary, kind: str, data: bytes) -> None:
    for line in data.split(b"\n"):
        summary.add_line(kind, line)


def current_summary(state_dir: Path) -> LedgerSummary:
    """The summary as of now, for readers (``cronfile status``): the checkpoint plus what
    was appended since. Never writes (a reader may not own the state directory)."""
    summary = load_checkpoint(state_dir)
    if summary is None or not all(position_valid(state_dir, k, summary) for k in LOG_KINDS):
        summary = fresh_summary(state_dir)
    for kind in LOG_KINDS:
        fold_rest(state_dir, kind, summary)
    summary.prune()
    return summary
