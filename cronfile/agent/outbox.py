"""The agent's durable state: the journal of accepted run_ids and the outbox of outcomes.

* ``<state>/journal.jsonl``: every accepted run_id is appended and fsynced BEFORE its
  process starts, so a run frame that arrives twice is not run again.
* ``<state>/outbox.jsonl``: every outcome is appended and fsynced before it is sent; an
  ``ack`` appends an ``acked`` line; unacked outcomes are sent again after every reconnect.
* Both logs use group commit: all lines waiting when a write begins share one fsync.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cronfile.schedules.model import RunStatus
from cronfile.state.private import FILE_MODE, private_dir
from cronfile.transports.protocol import Finished, ProtocolError, Run

log = logging.getLogger("cronfile.agent")


def _now() -> datetime:
    return datetime.now(UTC)

JOURNAL_KEEP = 100_000
"""Run ids kept in the journal across compactions (the dedupe memory of the agent): the
center only re-sends recent runs (after a reconnect or its own restart), never old ones."""
ACKED_KEEP = 10_000
"""Acked outcomes kept in memory, to answer a re-sent run with its outcome."""
COMPACT_OUTBOX_AFTER = 50_000
"""Outbox lines written before the outbox is rewritten to its unacked outcomes."""
class _GroupLog:
    """An append-only JSONL file where concurrent appends share one write and one fsync."""

    def __init__(self, path: Path) -> None:
        self.path = path
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
        # Unbuffered: a failed write (a full disk) must not leave bytes in a buffer that a
        # later write would flush after all (a journal line for a run that never ran).
        self._fh = os.fdopen(fd, "ab", buffering=0)
        self._pending: list[tuple[bytes, asyncio.Future[None]]] = []
        self._flusher: asyncio.Task[None] | None = None

    async def append(self, record: dict[str, Any]) -> None:
        """Append one record; returns once it is on disk."""
        await asyncio.shield(self.submit(record))

    def submit(self, record: dict[str, Any]) -> asyncio.Future[None]:
        """Queue one record for the next group commit; the future resolves when it is on
        disk. Callers that do not need to wait use this directly."""
        line = json.dumps(record, separators=(",", ":")).encode() + b"\n"
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        future.add_done_callback(_log_write_error)
        self._pending.append((line, future))
        if self._flusher is None:
            self._flusher = asyncio.ensure_future(self._flush())
        return future

    async def _flush(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                try:
                    await asyncio.to_thread(self._write, b"".join(line for line, _ in batch))
                except (OSError, ValueError) as exc:  # ValueError: the file was closed
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                for _, future in batch:
                    if not future.done():
                        future.set_result(None)
        finally:
            self._flusher = None

    def _write(self, data: bytes) -> None:
        fd = self._fh.fileno()
        size = os.fstat(fd).st_size
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        except OSError:
            # All or nothing: half a batch would be a torn line in the middle of the file.
            with contextlib.suppress(OSError):
                os.ftruncate(fd, size)
            raise

    @property
    def idle(self) -> bool:
        return self._flusher is None and not self._pending

    async def flush(self) -> None:
        """Wait until everything queued is on disk."""
        while self._flusher is not None:
            await asyncio.shield(self._flusher)

    def close(self) -> None:
        self._fh.close()


def _log_write_error(future: asyncio.Future[None]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.error("cannot write the agent's state: %s", future.exception())


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Every well-formed object of a JSONL file; a torn line (power loss) is skipped."""
    records = []
    try:
        with open(path, "rb") as fh:
            for raw in fh:
                try:
                    record = json.loads(raw)
                except ValueError:
                    continue
                if isinstance(record, dict):
                    records.append(record)
    except FileNotFoundError:
        pass
    return records


def _rewrite(path: Path, records: Sequence[dict[str, Any]]) -> None:
    """Replace a JSONL file atomically (write, fsync, rename, fsync the directory)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE), "wb") as fh:
        for record in records:
            fh.write(json.dumps(record, separators=(",", ":")).encode() + b"\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class AgentState:
    """The agent's journal of accepted runs and its outbox of unacked outcomes.

    ``journal.jsonl`` has a line when a run is accepted (``{"run_id", "ts", "job", ...}``)
    and another when its outcome is stored (``{"run_id", "done": true}``), so whether a run
    finished never depends on the outbox, which forgets acked outcomes when compacted.
    ``outbox.jsonl`` has ``{"finished": {...}}`` and ``{"acked": run_id}`` lines.
    """

    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir
        private_dir(state_dir)
        self.journal_path = self.dir / "journal.jsonl"
        self.outbox_path = self.dir / "outbox.jsonl"
        self.accepted: dict[str, bool] = {}  # run_id -> done, oldest first
        self.outbox: dict[str, Finished] = {}  # unacked, in the order they ended
        self.acked: dict[str, Finished] = {}  # recently acked, to answer a re-sent run
        self._load()
        self.journal = _GroupLog(self.journal_path)
        self.outbox_log = _GroupLog(self.outbox_path)
        self._outbox_lines = len(self.outbox)

    def _load(self) -> None:
        started: dict[str, datetime | None] = {}
        for record in _read_jsonl(self.journal_path):
            run_id = record.get("run_id")
            if not isinstance(run_id, str):
                continue
            if record.get("done") is True:
                self.accepted[run_id] = True
            else:
                self.accepted.setdefault(run_id, False)
                started[run_id] = _parse_time(record.get("ts"))
        finished: dict[str, Finished] = {}
        acked: set[str] = set()
        for record in _read_jsonl(self.outbox_path):
            if isinstance(record.get("acked"), str):
                acked.add(record["acked"])
            elif isinstance(record.get("finished"), dict):
                try:
                    msg = Finished.decode(json.dumps(record["finished"]).encode())
                except ProtocolError:
                    continue
                finished[msg.run_id] = msg
        for run_id in finished:
            self.accepted[run_id] = True
        # Accepted, never finished: the agent died during the run. Say so, never forget it.
        for run_id, done in self.accepted.items():
            if not done:
                now = _now()
                finished[run_id] = Finished(
                    run_id=run_id,
                    status=RunStatus.LOST.value,
                    started_at=started.get(run_id) or now,
                    finished_at=now,
                    reason="the agent stopped during the run; its process was not watched "
                    "to the end",
                )
                self.accepted[run_id] = True
                log.warning("run %s was cut short by an agent restart: reporting it lost",
                            run_id)
        self.outbox = {k: v for k, v in finished.items() if k not in acked}
        self.acked = {k: v for k, v in finished.items() if k in acked}
        while len(self.acked) > ACKED_KEEP:
            self.acked.pop(next(iter(self.acked)))
        self._compact_outbox()
        self._compact_journal(force=True)

    def _compact_outbox(self) -> None:
        _rewrite(self.outbox_path,
                 [{"v": 1, "finished": m.to_dict()} for m in self.outbox.values()])

    def _compact_journal(self, force: bool = False) -> None:
        if len(self.accepted) > JOURNAL_KEEP:
            for run_id in list(self.accepted)[: len(self.accepted) - JOURNAL_KEEP]:
                if self.accepted[run_id] and run_id not in self.outbox:
                    del self.accepted[run_id]
        elif not force:
            return
        _rewrite(self.journal_path,
                 [{"v": 1, "run_id": k, "done": True} if done else {"v": 1, "run_id": k}
                  for k, done in self.accepted.items()])

    def _idle(self) -> bool:
        return self.journal.idle and self.outbox_log.idle

    def maybe_compact(self) -> None:
        """Keep both files bounded while the agent runs (done between group commits)."""
        if not self._idle():
            return
        if len(self.accepted) > 2 * JOURNAL_KEEP:
            self.journal.close()
            self._compact_journal()
            self.journal = _GroupLog(self.journal_path)
        if self._outbox_lines > COMPACT_OUTBOX_AFTER:
            self.outbox_log.close()
            self._compact_outbox()
            self.outbox_log = _GroupLog(self.outbox_path)
            self._outbox_lines = len(self.outbox)

    def knows(self, run_id: str) -> bool:
        return run_id in self.accepted

    def reserve(self, run_id: str) -> None:
        """Mark a run accepted in memory, before any await, so a duplicate right behind it
        is recognised."""
        self.accepted[run_id] = False

    def forget(self, run_id: str) -> None:
        self.accepted.pop(run_id, None)

    async def accept(self, run: Run) -> None:
        """Journal a run as accepted (durably) before it starts."""
        self.accepted[run.run_id] = False
        await self.journal.append(
            {
                "v": 1,
                "ts": _now().isoformat(),
                "run_id": run.run_id,
                "job": run.job,
                "scheduled_at": run.scheduled_at.isoformat() if run.scheduled_at else None,
                "attempt": run.attempt,
            }
        )

    async def store(self, msg: Finished) -> None:
        """Keep an outcome until it is acked: outbox first, then the journal's done mark."""
        self.outbox[msg.run_id] = msg
        self._outbox_lines += 1
        await self.outbox_log.append({"v": 1, "ts": _now().isoformat(), "finished": msg.to_dict()})
        self.accepted[msg.run_id] = True
        await self.journal.append({"v": 1, "run_id": msg.run_id, "done": True})

    def ack(self, run_id: str) -> None:
        msg = self.outbox.pop(run_id, None)
        if msg is None:
            return
        self.acked[run_id] = msg
        while len(self.acked) > ACKED_KEEP:
            self.acked.pop(next(iter(self.acked)))
        # Nobody waits for an ack to be durable: a lost ack means one more delivery, which
        # the center deduplicates. Waiting would put one fsync per ack in the read loop.
        self._outbox_lines += 1
        self.outbox_log.submit({"v": 1, "ts": _now().isoformat(), "acked": run_id})
        self.maybe_compact()

    def outcome_of(self, run_id: str) -> Finished | None:
        return self.outbox.get(run_id) or self.acked.get(run_id)

    async def aclose(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(
                asyncio.gather(self.journal.flush(), self.outbox_log.flush()), 5)
        self.close()

    def close(self) -> None:
        self.journal.close()
        self.outbox_log.close()


def _parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        return None
