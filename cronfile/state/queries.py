"""Queries over a segmented ledger that read only what they need (SPEC §8).

Runs are read **newest first**: the current file from its end, then sealed segments newest
to oldest, each decompressed whole and walked backwards. A run's view is built backwards too
(an earlier record only fills fields a later one did not set, which is the same result as the
forward fold), and is complete once its first record is seen: ``dispatched``, or the one
record of a slot that did not run (skipped, missed, no_agent). So ``--limit N`` stops after N
complete, matching runs, and a ``--since/--until`` window skips, from the directory listing
alone, every segment whose time range (in its name) cannot hold a run of the window.

The fold itself (:func:`fold_runs`, :func:`collect_run`) only needs lines newest first, so any
store that keeps the records as their JSONL lines answers with the same bytes: the state
directory here (:class:`JsonlRunStore`), PostgreSQL for an HA center (``cronfile.ha.queries``).
Both are a :class:`RunStore`, the one read interface of ``runs``, ``logs``, ``status`` and the
HTTP API.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from cronfile.state.checkpoint import LedgerSummary, current_summary
from cronfile.state.ledger import parse_iso
from cronfile.state.segments import Segment, list_segments, read_bytes

__all__ = ["JsonlRunStore", "RunQuery", "RunStore", "StoreUnavailable", "collect_run", "find_run",
           "fold_runs", "newest_first_lines", "query_runs"]

SLOT_ONLY = ("skipped", "missed", "no_agent")
"""Outcomes recorded for a slot that never ran: one record is the whole run."""


def _iso_from(epoch: float | None) -> str | None:
    if epoch is None:
        return None
    from cronfile.state.ledger import iso

    return iso(epoch)


@dataclass(frozen=True, slots=True)
class RunQuery:
    """The filters of ``cronfile runs`` (times in epoch seconds)."""

    job: str | None = None
    status: str | None = None
    since: float | None = None
    until: float | None = None
    limit: int | None = None

    def wants(self, view: dict[str, Any]) -> bool:
        if self.job and view.get("job") != self.job:
            return False
        if self.status and view["state"] != self.status:
            return False
        if self.since is None and self.until is None:
            return True
        key = parse_iso(view.get("scheduled_at") or view.get("dispatched_ts"))
        if key is None:
            return False
        return not ((self.since is not None and key < self.since)
                    or (self.until is not None and key > self.until))


def _files_newest_first(state_dir: Path, kind: str, since: str | None,
                        until: str | None) -> Iterator[Path | Segment]:
    """The current file, then the segments that may hold records of [since, until], newest
    first. The segment just after an overlapping one is read too: a run that began in the
    window (a manual one, without a scheduled time) may have ended in it."""
    yield state_dir / f"{kind}.jsonl"
    segments = list_segments(state_dir, kind)
    overlapping = [s.overlaps(since, until) for s in segments]
    for i in range(len(segments) - 1, -1, -1):
        if overlapping[i] or (i > 0 and overlapping[i - 1]):
            yield segments[i]


def newest_first_lines(state_dir: Path, kind: str, since: str | None = None,
                       until: str | None = None) -> Iterator[bytes]:
    """Every line of log ``kind`` that may matter for [since, until], newest first."""
    for source in _files_newest_first(state_dir, kind, since, until):
        if isinstance(source, Segment):
            data = read_bytes(source)
        else:
            try:
                data = source.read_bytes()
            except FileNotFoundError:
                continue
        end = len(data)
        while end > 0:
            start = data.rfind(b"\n", 0, end - 1) + 1
            line = data[start:end]
            end = start
            if line.strip():
                yield line


_SCHEDULED = b'"scheduled_at":"'


def _outside(line: bytes, low: bytes | None, high: bytes | None) -> bool:
    """Whether a run record is certainly outside the window, judged from its scheduled
    time's text without parsing the line (to the second, so the edges are parsed)."""
    start = line.find(_SCHEDULED)
    if start < 0:
        return False  # a manual run: its dispatch time decides, after parsing
    start += len(_SCHEDULED)
    second = line[start:start + 19]
    return (low is not None and second < low) or (high is not None and second > high)


def _parse(line: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(line)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _state(view: dict[str, Any]) -> str:
    return str(view.get("status") or ("running" if view.get("record") == "started" else "dispatched"))


def query_runs(state_dir: Path, query: RunQuery) -> list[dict[str, Any]]:
    """The runs matching ``query``, oldest first (the newest ``limit`` of them)."""
    since_text, until_text = _iso_from(query.since), _iso_from(query.until)
    return fold_runs(newest_first_lines(state_dir, "runs", since_text, until_text), query)


def fold_runs(lines: Iterable[bytes], query: RunQuery) -> list[dict[str, Any]]:
    """The runs matching ``query`` among run records given newest first (every line of the
    window, and any before it: they are judged here), oldest first. A store that cannot say
    where the window ends simply gives more lines; the answer is the same."""
    needle = None
    if query.job:  # a cheap test before parsing: the encoder writes exactly this
        needle = b'"job":' + json.dumps(query.job).encode()
    views: dict[str, dict[str, Any]] = {}
    first_at: dict[str, int] = {}
    complete: list[dict[str, Any]] = []
    position = 0
    since_text, until_text = _iso_from(query.since), _iso_from(query.until)
    low = since_text[:19].encode() if since_text else None
    high = until_text[:19].encode() if until_text else None
    for line in lines:
        if needle is not None and needle not in line:
            continue
        if (low or high) and _outside(line, low, high):
            continue
        record = _parse(line)
        if record is None:
            continue
        run_id = record.get("run_id")
        if not isinstance(run_id, str):
            continue
        position -= 1
        view = views.get(run_id)
        if view is None:
            view = views[run_id] = dict(record)
        else:
            for key, value in record.items():
                view.setdefault(key, value)
        view["dispatched_ts"] = record.get("ts")
        first_at[run_id] = position
        kind = record.get("record")
        if kind == "dispatched" or (kind == "finished" and record.get("status") in SLOT_ONLY
                                    and run_id.endswith("-" + str(record.get("status")))):
            del views[run_id]
            view["state"] = _state(view)
            if query.wants(view):
                complete.append(view)
                if query.limit and len(complete) >= query.limit:
                    break
    else:  # history ran out: runs whose first record is gone (retention) count as they are
        rest = sorted(views, key=lambda rid: first_at[rid], reverse=True)
        for run_id in rest:
            view = views[run_id]
            view["state"] = _state(view)
            if query.wants(view):
                complete.append(view)
        complete.sort(key=lambda v: first_at[str(v["run_id"])], reverse=True)
        if query.limit:
            complete = complete[: query.limit]
    complete.reverse()
    # In slot order, not write order: the missed slots of an outage are recorded when the
    # next center starts, after runs that came later. (Stable: ties keep write order.)
    complete.sort(key=_when_scheduled)
    return complete


def _when_scheduled(view: dict[str, Any]) -> float:
    """A run's place in time: its slot (a bounded ``missed`` range: its first slot), or
    when it was first recorded for runs without one (daemons)."""
    return parse_iso(view.get("scheduled_at") or view.get("dispatched_ts") or view.get("ts")) or 0.0


def recorded_slots(state_dir: Path, job: str) -> set[float]:
    """The scheduled times (epoch, to the millisecond) of every slot of ``job`` the ledger
    has a record of, in any state: what a backfill must not run again."""
    slots = set()
    for view in query_runs(state_dir, RunQuery(job=job)):
        at = parse_iso(view.get("scheduled_at"))
        if at is not None:
            slots.add(round(at, 3))
    return slots


def find_run(state_dir: Path, run_id: str) -> list[dict[str, Any]]:
    """Every record of one run, in the order written (newest segments first, stopping at
    its first record)."""
    return collect_run(newest_first_lines(state_dir, "runs"), run_id)


def collect_run(lines: Iterable[bytes], run_id: str) -> list[dict[str, Any]]:
    """The records of ``run_id`` among run records given newest first, in the order
    written: back to its first record, so a run id used again later shows its last run."""
    needle = b'"run_id":' + json.dumps(run_id).encode()
    records: list[dict[str, Any]] = []
    for line in lines:
        if needle not in line:
            continue
        record = _parse(line)
        if record is None or record.get("run_id") != run_id:
            continue
        records.append(record)
        if record.get("record") == "dispatched" or (
                record.get("record") == "finished" and record.get("status") in SLOT_ONLY
                and run_id.endswith("-" + str(record.get("status")))):
            break
    records.reverse()
    return records


class StoreUnavailable(Exception):
    """The store cannot be read (its database is down): the message says which and why,
    without a password."""


class RunStore(Protocol):
    """Where ``runs``, ``logs``, ``status`` and the HTTP API read run records and the
    summary: a state directory's ledger, or the PostgreSQL ledger of record of HA centers.
    Every implementation answers the same bytes for the same records."""

    where: str
    """How to name the store in messages (a directory, a DSN without its password)."""

    def runs(self, query: RunQuery) -> list[dict[str, Any]]:
        """The runs matching ``query``, oldest first (:func:`fold_runs`)."""
        ...

    def run_records(self, run_id: str) -> list[dict[str, Any]]:
        """Every record of one run, in order (:func:`collect_run`); empty if unknown."""
        ...

    def summary(self, jobs: Sequence[str], agents: Sequence[str]) -> LedgerSummary:
        """What ``status`` shows from the records: each of ``jobs``' last outcome, each of
        ``agents``' last run, the open runs, the last rejection and notification failures.
        A store may leave out jobs and agents not named."""
        ...


class JsonlRunStore:
    """The ledger of a state directory (``runs.jsonl``, its segments, ``checkpoint.json``)."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.where = str(state_dir)

    def runs(self, query: RunQuery) -> list[dict[str, Any]]:
        return query_runs(self.state_dir, query)

    def run_records(self, run_id: str) -> list[dict[str, Any]]:
        return find_run(self.state_dir, run_id)

    def summary(self, jobs: Sequence[str], agents: Sequence[str]) -> LedgerSummary:
        return current_summary(self.state_dir)
