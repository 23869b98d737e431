"""The center's one writer of run records, events and the watermark.

Everything the center records goes through :class:`Journal`: run records queue in a
:class:`~cronfile.center.records.RecordWriter` and are written and fsynced on the ledger's
writer thread (in order with every other write); events are encoded on the loop and written
there too. With HA, run records are committed to the ledger of record (PostgreSQL) first and
only what it kept is written to the JSONL (see :mod:`cronfile.ha.runrecords`: one final
record per run across centers); events are mirrored there in the background. It also
knows which agent runs wait for their final record to be durable (the hub acks an agent's
outcome only then), and writes the watermark only behind the records queued before it (a full disk never lets
the mark pass a slot whose record is not on disk).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cronfile.center.counters import RunMetrics
from cronfile.center.records import RecordWriter
from cronfile.center.statefiles import release_reserve, write_watermark
from cronfile.state.ledger import Ledger, encode_record, encode_records, utc_ts

if TYPE_CHECKING:  # psycopg is imported only by a center started with --ha
    from cronfile.center.standby import HaCoordinator

log = logging.getLogger("cronfile.center")


class Journal:
    def __init__(self, ledger: Ledger, state_dir: Path, metrics: RunMetrics,
                 busy: Callable[[], bool]) -> None:
        self.ledger = ledger
        self.state_dir = state_dir
        self.metrics = metrics
        self.ha: HaCoordinator | None = None  # set by the center with --ha: writes are mirrored
        self.records = RecordWriter(self.append_runs, busy)
        self.failed_batches = 0  # run-record writes failed and not queued again yet
        # tcp runs of this center whose final record is not durable yet (see outcome_recorded)
        self._ending: dict[str, asyncio.Future[None]] = {}
        self._last_watermark = 0.0

    # ------------------------------------------------------------------ run records

    def append_runs(self, batch: list[dict[str, Any]]) -> None:
        """Hand a batch to the ledger's writer thread: encoded here (a record that cannot be
        encoded fails its caller), written and fsynced there, off the loop and in order
        with every other write. A failed write (disk full) is queued again."""
        if self.ha is not None:
            self._store_then_write(self.ha, batch)
            return
        self._submit(self.ledger.write_runs, batch, encode_records(batch))

    def _store_then_write(self, ha: HaCoordinator, batch: list[dict[str, Any]]) -> None:
        """HA: encode the batch once (one ts for both ledgers), commit it to PostgreSQL,
        then write the lines it kept to the JSONL."""
        loop = asyncio.get_running_loop()
        ts = utc_ts()
        lines = [encode_record(r, ts) for r in batch]
        ha.store_runs(batch, ts, lines).add_done_callback(
            lambda stored: loop.call_soon_threadsafe(self._stored, stored, batch, lines))

    def _stored(self, stored: Future[list[bool]], batch: list[dict[str, Any]],
                lines: list[bytes]) -> None:
        """HA: a batch is committed to PostgreSQL; what it kept goes to the JSONL (a final
        another center wrote first is left out: that one is the run's outcome). A batch
        that never got there (the center stops with the database away) is not recorded,
        and an agent's outcome in it is not acked (its agent delivers it again)."""
        if stored.exception() is not None:
            log.error("%d run records could not reach PostgreSQL: not recorded (%s)",
                      len(batch), stored.exception())
            return
        self._write_kept(b"".join(line for line, ok in zip(lines, stored.result(), strict=True)
                                  if ok), batch)

    def _write_kept(self, kept: bytes, batch: list[dict[str, Any]]) -> None:
        """HA: write records PostgreSQL already holds to the JSONL; a failed write (disk
        full) is tried again a second later, never through PostgreSQL a second time."""
        if not kept:
            self._finals_written(batch)
            return
        loop = asyncio.get_running_loop()

        def written(done: Future[Any]) -> None:  # on the writer thread
            if done.exception() is not None:
                log.error("writing %d run records failed, trying again: %s", len(batch),
                          done.exception())
                loop.call_soon_threadsafe(loop.call_later, 1.0, self._write_kept, kept, batch)
            else:
                loop.call_soon_threadsafe(self._finals_written, batch)

        self.ledger.submit(self.ledger.write_runs, kept).add_done_callback(written)

    def _submit(self, write: Callable[..., Any], batch: list[dict[str, Any]], *args: Any) -> None:
        """Run ``write(*args)`` on the writer thread; ``batch``: the records it holds."""
        loop = asyncio.get_running_loop()

        def written(done: Future[Any]) -> None:  # on the writer thread
            if done.exception() is not None:
                if batch:
                    self.failed_batches += 1  # before anything queued after it runs
                    loop.call_soon_threadsafe(self._append_failed, batch, done.exception())
            elif batch:
                loop.call_soon_threadsafe(self._finals_written, batch)

        self.ledger.submit(write, *args).add_done_callback(written)

    def write_dispatched(self, data: bytes) -> asyncio.Future[Any]:
        """A chunk's ``dispatched`` records, durable when the future is done."""
        return asyncio.wrap_future(self.ledger.submit(self.ledger.write_runs, data))

    def _append_failed(self, batch: list[dict[str, Any]], exc: BaseException | None) -> None:
        log.error("writing %d run records failed, kept for the next write: %s", len(batch), exc)
        self.failed_batches -= 1  # queued again: the next watermark writes them first
        for record in batch:
            self.records.add(record)

    def ending_ids(self) -> set[str]:
        """Runs sent to agents by this center whose final record is not durable yet."""
        return set(self._ending)

    def expect_final(self, run_id: str) -> None:
        """A run sent to an agent: its outcome is acked once its final record is durable."""
        self._ending[run_id] = asyncio.get_running_loop().create_future()

    def _finals_written(self, batch: list[dict[str, Any]]) -> None:
        """A batch is on disk: the agent runs whose final record it holds may be acked."""
        for record in batch:
            if record.get("record") == "finished":
                ending = self._ending.pop(str(record.get("run_id")), None)
                if ending is not None and not ending.done():
                    ending.set_result(None)

    async def outcome_recorded(self, run_id: str) -> bool:
        """Wait until the final record of a run this center sent to an agent is durable;
        False when no such run is in flight here (the caller records the outcome itself).

        The hub acks an agent's outcome only when the center's ``agent_outcome`` returns:
        the agent forgets what is acked, so an ack ahead of the record would lose the
        outcome with a center killed in between. The record is queued by the run's watcher
        (possibly deferred past a burst) and written on the ledger's writer thread: this
        waits until the batch that holds it is on disk."""
        ending = self._ending.get(run_id)
        if ending is None:
            return False
        self.records.flush()  # no need to wait for the batching timer
        await asyncio.shield(ending)
        return True

    async def written(self) -> None:
        """Every record queued so far is on disk (the writer runs submissions in order)."""
        self.records.flush()
        await asyncio.wrap_future(self.ledger.submit(lambda: None))

    # ------------------------------------------------------------------ events

    def event(self, name: str, **fields: Any) -> None:
        """Append an event on the writer thread (encoded here: its fields may change later)."""
        if name == "revision_rejected":
            self.metrics.revision_rejected()
        data = encode_records([{"event": name, **fields}])
        self.ledger.submit(self.ledger.write_events, data)
        if self.ha is not None:
            self.ha.mirror("event", [{"event": name, **fields}], data)

    # ------------------------------------------------------------------ the watermark

    def write_watermark(self, now: float, mark: float | None) -> None:
        """Move the watermark, at most once a second. The records queued so far go in the
        same step on the writer thread, first: the mark is written only if they are
        durable and no earlier batch failed (a full disk), so it never passes a slot
        whose record is not on disk."""
        if mark is None or now - self._last_watermark < 1.0:
            return
        self._last_watermark = now
        if self.ha is not None:
            # Records go to PostgreSQL first, so not in the mark's step: an HA center's
            # catch-up reads PostgreSQL, never this mark.
            self.records.flush()
        batch = self.records.take()
        data = encode_records(batch) if batch else b""

        def records_then_mark() -> None:
            if data:
                self.ledger.write_runs(data)
            if not self.failed_batches:
                try:
                    write_watermark(self.state_dir, mark)
                except OSError as exc:  # the records are written: only the mark waits
                    log.error("cannot write the watermark: %s", exc)

        self._submit(records_then_mark, batch)

    async def last_writes(self, stopped_event: Callable[[], dict[str, Any]],
                          watermark: Callable[[], float | None]) -> None:
        """What a stopping center writes last: its queued records, the watermark, the
        ``center_stopped`` event (both asked for once the writer is idle). Written here, once
        the writer thread is idle, so that a full disk is seen: the reserved room is then
        given back and the writes tried once more (a failed write leaves nothing behind, so
        nothing is written twice)."""
        if self.ha is not None:  # run records on their way through PostgreSQL come first
            self.records.flush()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.wrap_future(self.ha.runs.barrier()), 5.0)
            await asyncio.sleep(0)
        await asyncio.to_thread(self.ledger.drain, False)
        await asyncio.sleep(0)  # failed batches come back to the queue through the loop
        stopped = stopped_event()
        records = self.records.take()
        event = encode_records([stopped])
        batch = encode_records(records)
        if self.ha is not None:  # the ledger of record gets them first, as every run record
            if records:
                ts = utc_ts()
                lines = [encode_record(r, ts) for r in records]
                try:
                    kept = await asyncio.wait_for(
                        asyncio.wrap_future(self.ha.store_runs(records, ts, lines)), 5.0)
                except TimeoutError:
                    log.error("%d run records could not reach PostgreSQL: not recorded",
                              len(records))
                    kept = [False] * len(records)
                batch = b"".join(line for line, ok in zip(lines, kept, strict=True) if ok)
            self.ha.mirror("event", [stopped], event)
        mark = watermark()
        for last_try in (False, True):
            try:
                if batch:
                    self.ledger.write_runs(batch)
                    batch = b""
                if mark is not None:
                    write_watermark(self.state_dir, mark)
                    mark = None
                self.ledger.write_events(event)
                return
            except OSError as exc:
                if last_try or not release_reserve(self.state_dir):
                    log.error("cannot record the center's stop: %s", exc)
                    return
