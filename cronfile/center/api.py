"""``/healthz``, ``/api/v1/...`` and ``/metrics``: the JSON API of a center (SPEC §6).

Reads (status, runs, one run, applied files) are computed from the state directory by the
same functions ``cronfile status/runs --state DIR`` use, in a worker thread, so the answers
are identical either way and a large ledger never blocks the event loop. With ``--ha`` the
run records come from PostgreSQL (:class:`~cronfile.ha.queries.PgRunStore`), the ledger of
record, so the leader and every standby answer the same. Writes go through
:class:`~cronfile.center.port.CenterPort` and are POST only: a GET never changes anything.

Versioned: a breaking change gets ``/api/v2``; fields are only ever added to v1.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from aiohttp import web

from cronfile import gcpause
from cronfile.center import metrics
from cronfile.center.port import CenterPort, backfill, fire, run_now, sync
from cronfile.schedules.nexttimes import UsageError, parse_time
from cronfile.state.applied import APPLIED_FILE, StateFileError
from cronfile.state.queries import JsonlRunStore, RunStore, StoreUnavailable
from cronfile.state.reports import build_status, fold_run, latest_run_records, query_runs

log = logging.getLogger("cronfile.http")

RUN_STATES = ("succeeded", "failed", "timeout", "killed", "lost", "skipped", "missed",
              "no_agent", "running", "dispatched")
MAX_WAIT_S = 300.0
IDLE_WAIT_S = 2.0
"""How long an expensive read waits for a burst's dispatch to end before it goes ahead."""
REQUESTED_BY_HEADER = "X-Cronfile-User"

ROUTES = (
    # method, path, what it does — the README's table is generated from the same words
    ("GET", "/healthz", "liveness: `{\"ok\": true, \"revision\": ...}` (no token)"),
    ("GET", "/api/v1/status", "what `cronfile status --format json` prints"),
    ("GET", "/api/v1/runs", "runs; query `job`, `status`, `since`, `until`, `limit` as `cronfile runs`"),
    ("GET", "/api/v1/runs/{run_id}", "one run: its folded view and every record, with "
                                     "`output_tail`; `?wait=SECONDS` waits for it to end"),
    ("GET", "/api/v1/applied", "the applied schedule files (`applied.json`), for `plan --center`"),
    ("POST", "/api/v1/jobs/{job}/run", "run a job now (`cronfile run`)"),
    ("POST", "/api/v1/jobs/{job}/backfill", "run the job's past slots without a record "
                                            "(`cronfile backfill`); query `from`, `to` "
                                            "(ISO-8601), `dry_run=1`, `yes=1`"),
    ("POST", "/api/v1/runs/{run_id}/stop", "stop a running run; recorded `killed` with who asked"),
    ("POST", "/api/v1/events/{event}", "fire a trigger event (`cronfile trigger`)"),
    ("POST", "/api/v1/sync", "re-read the source and apply it (`cronfile apply`); "
                             "`?revision=SHA`: that commit of the followed branch"),
    ("GET", "/metrics", "Prometheus text format (same bearer token)"),
)


def _encode(data: Any) -> bytes:
    """Compact JSON (indenting forces json's pure-Python encoder: seconds for a 10,000-job
    status), encoded item by item: one C-level ``dumps`` of a 3 MB answer holds the
    interpreter lock for 100-200 ms, a stall of the event loop when done in a thread."""
    return "".join(_chunks(data, 2)).encode() + b"\n"


def _chunks(data: Any, depth: int) -> Iterator[str]:
    if depth and isinstance(data, list):
        yield "["
        for i, item in enumerate(data):
            if i:
                yield ","
            yield from _chunks(item, depth - 1)
        yield "]"
    elif depth and isinstance(data, dict):
        yield "{"
        for i, (key, value) in enumerate(data.items()):
            yield ("," if i else "") + json.dumps(str(key)) + ":"
            yield from _chunks(value, depth - 1)
        yield "}"
    else:
        yield json.dumps(data, separators=(",", ":"))


def _json(data: Any, status: int = 200) -> web.Response:
    return _body(_encode(data), status)


def _body(body: bytes, status: int = 200) -> web.Response:
    return web.Response(body=body, status=status, content_type="application/json")


T = TypeVar("T")


async def off_loop(center: CenterPort, compute: Callable[[], T]) -> T:
    """Run an expensive read in a worker thread, so that the event loop keeps dispatching:
    after any burst being dispatched now (threads share the interpreter lock, and would
    slow its spawns), and with the cyclic GC paused (a read allocates a lot and frees it
    all at the end; a full collection in the middle would hold the lock for its whole
    length, stalling the loop)."""
    def work() -> T:
        center.wait_dispatch_idle(IDLE_WAIT_S)
        with gcpause.paused():
            return compute()

    return await asyncio.to_thread(work)


async def _json_off_loop(center: CenterPort, compute: Callable[[], Any]) -> web.Response:
    """Compute AND encode off the loop: encoding a 10,000-job status is expensive too."""
    return _body(await off_loop(center, lambda: _encode(compute())))


def _error(message: str, status: int) -> web.Response:
    return _json({"ok": False, "error": message}, status)


def requested_by(request: web.Request) -> str:
    """Who asked, for records: the client's own words (``user@host``, sent by the CLI), and
    always the peer address, which the client cannot choose."""
    claimed = request.headers.get(REQUESTED_BY_HEADER, "").strip()[:100]
    where = f"http {request.remote or '?'}"
    return f"{claimed} ({where})" if claimed else where


def _flag(value: str | None) -> bool:
    return (value or "").lower() in ("1", "true", "yes")


class Api:
    def __init__(self, center: CenterPort, body_timeout_s: float,
                 records_dsn: str | None = None) -> None:
        self.center = center
        self.body_timeout_s = body_timeout_s
        self.store: RunStore
        if records_dsn is not None:
            from cronfile.ha.queries import PgRunStore

            self.store = PgRunStore(records_dsn)
        else:
            self.store = JsonlRunStore(center.state_dir)

    def add_routes(self, router: web.UrlDispatcher) -> None:
        router.add_get("/healthz", self.healthz)
        router.add_get("/api/v1/status", self.status)
        router.add_get("/api/v1/runs", self.runs)
        router.add_get("/api/v1/runs/{run_id}", self.run)
        router.add_get("/api/v1/applied", self.applied)
        router.add_post("/api/v1/jobs/{job}/run", self.run_job)
        router.add_post("/api/v1/jobs/{job}/backfill", self.backfill_job)
        router.add_post("/api/v1/runs/{run_id}/stop", self.stop_run)
        router.add_post("/api/v1/events/{event}", self.fire_event)
        router.add_post("/api/v1/sync", self.sync)
        router.add_get("/metrics", self.metrics)

    async def _drain_body(self, request: web.Request) -> None:
        """Writes take their arguments from the path; a body, if any, must still arrive in
        time (and within the size limit aiohttp enforces)."""
        if request.can_read_body:
            await asyncio.wait_for(request.read(), timeout=self.body_timeout_s)

    async def healthz(self, request: web.Request) -> web.Response:
        return _json({"ok": True, "revision": self.center.current_revision() or None})

    async def status(self, request: web.Request) -> web.Response:
        state_dir, store = self.center.state_dir, self.store
        try:
            applied = self.center.applied_state()
            return await _json_off_loop(self.center, lambda: build_status(
                state_dir, applied=applied, store=store))
        except StateFileError as exc:
            return _error(str(exc), 500)
        except StoreUnavailable as exc:
            return _error(str(exc), 503)

    async def runs(self, request: web.Request) -> web.Response:
        q = request.query
        status = q.get("status")
        if status is not None and status not in RUN_STATES:
            return _error(f"status: expected one of {', '.join(RUN_STATES)}", 400)
        try:
            limit = int(q.get("limit", "50"))
            if limit < 0:
                raise ValueError
        except ValueError:
            return _error("limit: expected a whole number >= 0", 400)
        store = self.store
        for name in ("since", "until"):
            try:
                if q.get(name):
                    parse_time(q[name])
            except UsageError as exc:
                return _error(f"{name}: {exc}".replace("--after ", ""), 400)
        try:
            return await _json_off_loop(self.center, lambda: query_runs(
                store, q.get("job"), status, q.get("since"), limit or None, q.get("until")))
        except StoreUnavailable as exc:
            return _error(str(exc), 503)

    async def run(self, request: web.Request) -> web.Response:
        run_id = request.match_info["run_id"]
        wait = request.query.get("wait")
        if wait is not None:
            try:
                seconds = min(max(float(wait), 0.0), MAX_WAIT_S)
            except ValueError:
                return _error("wait: expected seconds", 400)
            await self.center.wait_run(run_id, seconds)
        state_dir, store = self.center.state_dir, self.store
        try:
            records = await off_loop(self.center,
                                     lambda: latest_run_records(store, state_dir, run_id))
        except StoreUnavailable as exc:
            return _error(str(exc), 503)
        if not records:
            return _error(f"no run {run_id} in the ledger", 404)
        return _json({"run": fold_run(records), "records": records})

    async def applied(self, request: web.Request) -> web.StreamResponse:
        path = self.center.state_dir / APPLIED_FILE
        if not path.exists():
            return _error("the center has applied nothing yet", 404)
        return web.FileResponse(path, headers={"Content-Type": "application/json"})

    async def run_job(self, request: web.Request) -> web.Response:
        await self._drain_body(request)
        name = request.match_info["job"]
        answer = await run_now(self.center, name)
        if answer.get("ok"):
            return _json(answer)
        return _json(answer, 404 if "results" not in answer else 409)

    async def backfill_job(self, request: web.Request) -> web.Response:
        """The control socket's backfill operation; times come as ISO-8601 in the query (what
        a user types), flags as ``1``/``true``. 404: no such job; 422: the center refused
        (no schedule, too many slots without ``yes``)."""
        await self._drain_body(request)
        name, q = request.match_info["job"], request.query
        if not self.center.has_job(name):
            return _error(f"no job named {name!r}", 404)
        bounds: dict[str, float] = {}
        for key in ("from", "to"):
            if not q.get(key):
                return _error(f"{key}: required, an ISO-8601 time", 400)
            try:
                bounds[key] = parse_time(q[key])
            except UsageError:
                return _error(f"{key}: {q[key]!r} is not an ISO-8601 time", 400)
        answer = await backfill(self.center, {"job": name, **bounds,
                                              "dry_run": _flag(q.get("dry_run")),
                                              "yes": _flag(q.get("yes"))})
        return _json(answer, 200 if answer.get("ok") else 422)

    async def stop_run(self, request: web.Request) -> web.Response:
        await self._drain_body(request)
        answer = self.center.stop_run(request.match_info["run_id"], requested_by(request))
        return _json(answer, 200 if answer.get("ok") else 404)

    async def fire_event(self, request: web.Request) -> web.Response:
        await self._drain_body(request)
        return _json(fire(self.center, request.match_info["event"]))

    async def sync(self, request: web.Request) -> web.Response:
        await self._drain_body(request)
        answer = await sync(self.center, request.query.get("revision"))
        return _json(answer, 200 if answer.get("ok") else 422)

    async def metrics(self, request: web.Request) -> web.Response:
        await asyncio.to_thread(self.center.wait_dispatch_idle, IDLE_WAIT_S)
        snapshot = self.center.snapshot()
        live = self.center.metrics
        checkpoint = functools.partial(self.center.wait_dispatch_idle, IDLE_WAIT_S)
        body = await off_loop(self.center, lambda: metrics.render(snapshot, live, checkpoint))
        return web.Response(body=body, headers={"Content-Type": metrics.CONTENT_TYPE})


__all__ = ["ROUTES", "Api", "off_loop", "requested_by"]
