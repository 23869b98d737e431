"""A center's side of HA (SPEC §9): lead or stand by, claim before dispatch, recover.

The center asks :meth:`HaCoordinator.leading` before it acts on a tick (a standby ticks to
keep its timers current but throws every action away), and :meth:`HaCoordinator.claim`
before it writes a chunk's ``dispatched`` records: only the runs PostgreSQL granted are
written and sent. Run records are committed there before they reach the JSONL
(:meth:`HaCoordinator.store_runs`). A takeover is then a restart in place: the center reads
the old leader's records (:meth:`HaCoordinator.takeover_ledger`) and recovers from them with
the same pure recovery as a restart (``center/recovery.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from datetime import UTC, datetime
from typing import Any

import psycopg

from cronfile.center.routing import Target
from cronfile.center.scheduler import StartRun
from cronfile.ha.claims import SLOT_TARGET, Claim, Claimer, append_records
from cronfile.ha.elector import Elector
from cronfile.ha.migrations import migrate
from cronfile.ha.runrecords import RunRecordStore
from cronfile.ha.settings import HaSettings
from cronfile.ha.takeover import TakeoverLedger, read_takeover_ledger
from cronfile.schedules.model import Strategy
from cronfile.state.ledger import encode_record
from cronfile.transports.hub import CenterRole

__all__ = ["HaCoordinator", "claim_target"]

FAN_OUT = (Strategy.ALL, Strategy.SHARD)
log = logging.getLogger(__name__)


def claim_target(action: StartRun, target: Target) -> str:
    """The third part of the claim key: the agent for all/shard jobs (one run per agent and
    slot), ``''`` for one/hash/failover/local (one run per slot, wherever it runs)."""
    return target.agent if action.job.targets.strategy in FAN_OUT else SLOT_TARGET


class HaCoordinator:
    """The elector and the claimer of one center; events go to the center's ledger."""

    def __init__(self, settings: HaSettings, on_event: Callable[[dict[str, Any]], None]) -> None:
        self.settings = settings
        self.elector = Elector(settings, on_event)
        self.claimer = Claimer(settings.dsn, settings.name, settings.connect_timeout_s)
        self.runs = RunRecordStore(settings.dsn, settings.name, lambda: self.elector.term,
                                   settings.connect_timeout_s)
        self._outbox: asyncio.Queue[tuple[str, list[dict[str, Any]], list[str] | None]] = \
            asyncio.Queue()

    def prepare(self) -> None:
        """Create or migrate the schema (blocking; called once, before the loop runs)."""
        with psycopg.connect(self.settings.dsn, autocommit=True,
                             connect_timeout=max(1, round(self.settings.connect_timeout_s))) as conn:
            migrate(conn)

    def leading(self) -> bool:
        return self.elector.is_leading()

    def view(self) -> dict[str, Any]:
        return self.elector.view().as_json()

    def hub_role(self) -> CenterRole:
        """For the agent hub: lead or not, and the term (fencing; see the hub)."""
        return CenterRole(leading=self.leading(), term=self.elector.term)

    async def claim(self, starts: Sequence[tuple[StartRun, Target, str, dict[str, Any]]],
                    ts: str | None = None) -> set[str]:
        """Claim (action, target, run_id, dispatched record) tuples; returns the run_ids won.

        Scheduled (and caught-up) first attempts are keyed on their slot; retries and manual/triggered runs
        have no slot of their own (NULL) and are fenced by the lease and their run_id alone.
        ``ts``: the time the center's JSONL gives these records, so both ledgers hold the
        same line.
        """
        term = self.elector.term
        if term is None or not self.leading():
            return set()
        claims = []
        for action, target, run_id, record in starts:
            keyed = action.reason in ("schedule", "catch_up") and action.attempt == 1
            slot = datetime.fromtimestamp(action.scheduled_at, UTC) if keyed else None
            line = encode_record(record, ts).decode().rstrip("\n") if ts is not None else None
            claims.append(Claim(job=action.job.name, scheduled_at=slot,
                                target=claim_target(action, target), run_id=run_id,
                                dispatched=record, line=line))
        return await self.claimer.claim(term, claims, self.leading)

    def gap_start(self, now: float) -> float:
        """Where a takeover's gap begins: slots from here on may have been left unhandled.

        The old leader renewed last about one lease before its lease expired (and could
        have been stuck for a renew interval before that); the lease may have stood
        expired for a while too (every center was down): the gap covers all of it. Starting
        early costs nothing but a longer read: handled slots are in the records. The first
        leader a database ever had has no gap: no slot was ever anyone's."""
        expired_for = self.elector.expired_for_s
        if expired_for is None:
            return now
        return now - expired_for - self.settings.lease_s - 2 * self.settings.renew_interval_s

    async def takeover_ledger(self, since: float, horizon: float) -> TakeoverLedger | None:
        """The records a takeover recovers from (:func:`read_takeover_ledger`), retried
        while this center leads; None if it stopped leading first (nothing to recover)."""
        backoff = 0.1
        while self.leading():
            try:
                async with await psycopg.AsyncConnection.connect(
                        self.settings.dsn, autocommit=True,
                        connect_timeout=max(1, round(self.settings.connect_timeout_s))) as conn:
                    return await read_takeover_ledger(conn, since, horizon)
            except (psycopg.OperationalError, OSError) as exc:
                log.warning("ha: cannot read the old leader's records yet (%s); retrying", exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 1.0)
        return None

    def store_runs(self, records: Sequence[dict[str, Any]], ts: str,
                   lines: Sequence[bytes]) -> Future[list[bool]]:
        """Commit run records to PostgreSQL before they go to the JSONL (see
        :mod:`cronfile.ha.runrecords`), stamped ``ts`` and kept as the ``lines`` the JSONL
        will have; the future says, per record, whether to write it there. Never
        ``dispatched`` records: their claim inserted them."""
        assert all(r.get("record") != "dispatched" for r in records)
        return self.runs.submit(records, ts, lines)

    def mirror(self, kind: str, records: Sequence[dict[str, Any]], data: bytes | None = None) -> None:
        """Copy records this center writes to its JSONL into PostgreSQL too, in the
        background: the JSONL write stays the one on the hot path, and a database outage
        delays the copy instead of the center. For events; run records go through
        :meth:`store_runs`, before the JSONL. ``dispatched`` records are skipped: their
        claim already inserted them. ``data``: the records as encoded for the
        JSONL (one line each), kept verbatim so reads from PostgreSQL print the same bytes."""
        lines = data.decode().split("\n")[:-1] if data is not None else None  # each ends in \n
        if lines is not None and len(lines) != len(records):
            lines = None  # not one line per record: a caller's mistake; keep the records
        keep = [i for i, r in enumerate(records) if r.get("record") != "dispatched"]
        if keep:
            self._outbox.put_nowait((kind, [records[i] for i in keep],
                                     None if lines is None else [lines[i] for i in keep]))

    async def _ship(self) -> None:
        conn: psycopg.AsyncConnection[Any] | None = None
        backoff = 0.1
        while True:
            kind, records, lines = await self._outbox.get()
            while True:
                try:
                    if conn is None or conn.closed:
                        conn = await psycopg.AsyncConnection.connect(self.settings.dsn, autocommit=True)
                    await append_records(conn, self.settings.name, self.elector.term, kind, records,
                                         lines)
                    backoff = 0.1
                    break
                except (psycopg.OperationalError, OSError) as exc:
                    log.warning("ha: copying records to PostgreSQL failed (%s); retrying", exc)
                    if conn is not None:
                        with contextlib.suppress(Exception):
                            await conn.close()
                    conn = None
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 5.0)
                except psycopg.Error as exc:  # the batch itself is bad: say so, do not loop on it
                    log.error("ha: PostgreSQL refused %d %s records (%s); they stay in the JSONL only",
                              len(records), kind, exc)
                    break
            self._outbox.task_done()

    async def run(self) -> None:
        """The elector and the record shipper, until cancelled or stopped."""
        shipper = asyncio.create_task(self._ship(), name="ha-records")
        try:
            await self.elector.run()
        finally:
            shipper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await shipper

    async def stop(self) -> None:
        """Release the lease (first thing at shutdown: a standby leads at once)."""
        await self.elector.stop(release=True)
        await self.claimer.close()

    async def close(self, timeout: float = 3.0) -> None:
        """Last thing at shutdown: copy the records still queued (center_stopped too)."""
        shipper = asyncio.create_task(self._ship(), name="ha-records-drain")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._outbox.join(), timeout)
        shipper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await shipper
        await asyncio.to_thread(self.runs.close, timeout)

