"""``cronfile center``: the daemon that schedules, dispatches and records.

One object, :class:`Center`, wires the parts together and owns the I/O:

* the desired state comes from :class:`~cronfile.schedules.loader.ScheduleLoader` (hot-reloaded by
  :mod:`watchfiles` and SIGHUP through ONE path, :meth:`Center.reload`);
* timing decisions come from :class:`~cronfile.center.scheduler.Scheduler` (pure, clock-driven);
* runs go through :class:`~cronfile.transports.executor.Executor` implementations: the built-in
  ``local`` one here, agents and SSH through :class:`Targets` resolution;
* every outcome lands in :class:`~cronfile.state.ledger.Ledger`.

Once per slot (SPEC §5). Before a run is sent, its ``dispatched`` record is written and
fsynced (one write and one fsync per chunk of runs due together: group commit). At
start, runs dispatched but never finished are recorded ``lost`` and every slot already in
the ledger is excluded from catch-up, so a restart never runs a slot twice. The center also
keeps a *watermark* file (``<state>/watermark``): all slots up to it were handled, which
tells the next start how long it was down.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import gc
import hashlib
import logging
import os
import signal
import threading
from collections import deque
from collections.abc import Iterable
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from cronfile import gcpause
from cronfile.center.agents import start_hub, sync_agent_daemons, write_agents_file
from cronfile.center.alerts import Notifier, runtime_alerts
from cronfile.center.backfill import (
    MAX_SLOTS,
    MAX_UNCONFIRMED_SLOTS,
    BackfillQueue,
    BackfillRefused,
    slots_in_range,
)
from cronfile.center.control import ControlServer, ControlSocketError
from cronfile.center.counters import RunMetrics
from cronfile.center.gitsync import GitError, GitFollower
from cronfile.center.options import CenterOptions
from cronfile.center.pools import PlaceGate, Waiting
from cronfile.center.port import AgentView, CenterSnapshot, RecentRun
from cronfile.center.records import NoOutcomeRecord, RecordWriter
from cronfile.center.recovery import Recovery, RequeueTrigger, pending_starts, recover_summary
from cronfile.center.reload import Reloader
from cronfile.center.routing import Router, Target
from cronfile.center.runlog import log_run
from cronfile.center.scheduler import Action, RecordSlot, Scheduler, StartRun, StopRuns, jitter_for
from cronfile.center.standby import HaCoordinator
from cronfile.center.statefiles import (
    CENTER_FILE,
    CenterError,
    lock_state_dir,
    read_known_agents,
    read_watermark,
    release_reserve,
    reserve_space,
    write_center_file,
    write_places_file,
    write_watermark,
)
from cronfile.clock import Clock, SystemClock
from cronfile.schedules.diff import StateDiff, diff_states
from cronfile.schedules.loader import LOCAL_AGENT, ScheduleLoader
from cronfile.schedules.model import DesiredState, Job, JobKind, OnChange, RunStatus, Strategy
from cronfile.state.applied import StateFileError, read_applied
from cronfile.state.checkpoint import LedgerSummary
from cronfile.state.ledger import Ledger, encode_records, iso, outcome_fields, utc_ts
from cronfile.state.private import private_dir
from cronfile.state.queries import recorded_slots
from cronfile.state.retention import check_retention, parse_retention
from cronfile.transports.daemons import DaemonSupervisor
from cronfile.transports.executor import (
    Executor,
    HostUnavailable,
    RunHandle,
    RunOutcome,
    RunRefused,
    RunRequest,
)
from cronfile.transports.hub import AgentHub
from cronfile.transports.local import LocalExecutor
from cronfile.transports.protocol import SecretsError

if TYPE_CHECKING:
    from cronfile.center.http import HttpServer

log = logging.getLogger("cronfile.center")

RECENT_RUNS = 12
"""Finished runs kept in memory per job for the dashboard's strip of outcomes."""

SLOT_MEMORY_S = 6 * 3600.0
"""Handled slots are remembered this long for once-per-slot checks in memory (jitter and
deadlines are far shorter); the ledger keeps them for good."""
DISPATCH_CHUNK = 128
DISPATCH_FIRST_CHUNK = 32
DISPATCH_REAP_FIRST = 1024
DISPATCH_REAP_EVERY = 512
"""A burst lets the loop reap finished runs after its first DISPATCH_REAP_FIRST spawns, then
after every DISPATCH_REAP_EVERY. Reaping costs the same in total wherever it happens, but
inside a burst it delays every spawn behind it, so a burst of up to 1,024 runs reaps after
its last spawn; a longer one reaps as it goes, since every run in flight holds descriptors
(its pipe, its pidfd) and each fork copies the descriptor table: measured here, spawns get
slower past ~2,000 descriptors (a 10,000-run burst: p99 1.35x the bare burst when reaping
every 1,024, 1.11x every 512)."""


LOGGED_OUTCOMES = frozenset({RunStatus.FAILED, RunStatus.TIMEOUT, RunStatus.LOST,
                             RunStatus.MISSED, RunStatus.NO_AGENT})
"""Outcomes an operator tailing the center's log must see: one line each."""


def describe_outcome(record: dict[str, Any]) -> str:
    """One log line for a final record: what ran where, how it ended and why."""
    what = f"job {record.get('job')} slot {record.get('scheduled_at')}"
    if record.get("count"):
        what += f" ({record['count']} slots to {record.get('last_scheduled_at')})"
    how = str(record.get("status"))
    if record.get("exit_code") is not None:
        how += f" (exit {record['exit_code']})"
    elif record.get("signal") is not None:
        how += f" (signal {record['signal']})"
    why = f": {record['reason']}" if record.get("reason") else ""
    return f"{what} on {record.get('agent')} attempt {record.get('attempt')}: {how}{why} " \
           f"[run {record.get('run_id')}]"


def run_id_for(job: str, slot: float, agent: str, attempt: int) -> str:
    """Deterministic: the same (slot, target, attempt) always has the same id, which is what
    lets an agent (and the ledger) recognise a run it has already seen."""
    return hashlib.sha256(f"{job}|{slot:.3f}|{agent}|{attempt}".encode()).hexdigest()[:20]


@dataclass
class _Running:
    run_id: str
    job: str
    agent: str
    slot: float
    attempt: int
    handle: RunHandle
    base: dict[str, Any]
    stop_reason: str | None = None
    timer: asyncio.TimerHandle | None = None


@dataclass
class _Chunk:
    """Runs dispatched together: one write and one fsync (see :meth:`Center._dispatch`)."""

    runs: list[tuple[StartRun, Target, RunRequest, dict[str, Any]]] = field(default_factory=list)
    data: bytes = b""  # its ``dispatched`` records, encoded for one write


class RunState(enum.Enum):
    """A center's life: it ends either ``stopped`` (a signal, exit 0) or ``crashed`` (a core
    task died, exit 1: a center that looks alive but schedules nothing is worse)."""

    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"
    CRASHED = "crashed"


class Center:
    """The center daemon; :meth:`run_until_stopped` is its whole life."""

    def __init__(self, options: CenterOptions, clock: Clock | None = None) -> None:
        self.options = options
        self.clock = clock or SystemClock()
        self.state_dir = options.state
        self.ledger = Ledger(options.state, segment_bytes=options.segment_bytes,
                             retention_s=parse_retention(options.retention),
                             retention_text=options.retention)
        self.ha = HaCoordinator(options.ha, self._ha_event) if options.ha else None
        self._history = LedgerSummary()  # what start-up needs from the ledger's history
        self.loader = ScheduleLoader(options.schedules)
        self.scheduler = Scheduler()
        self.local = LocalExecutor(state_dir=options.state.resolve())
        self.desired: DesiredState | None = None
        self.running: dict[str, _Running] = {}
        self.daemons: dict[str, DaemonSupervisor] = {}
        self.done_slots: set[tuple[str, float, str]] = set()
        self.missed_until: dict[str, float] = {}  # per job: end of the last recorded missed range
        self.lost_bases: dict[str, dict[str, Any]] = {}  # run_id -> record base, for late outcomes
        self._recovered = Recovery()  # what the ledger said at start, until requeued
        self.notifier = Notifier(self.local, self._event)
        self.last_success: dict[str, float] = {}
        self._success_alerted: set[str] = set()
        self._started_at = self.clock.time()
        self._started_iso = utc_ts()
        self._success_watch: set[str] = set()
        self.hub: AgentHub | None = None  # the agent hub, when agents are enabled
        self.router = Router(self.local, options.known_hosts, self._spawn)
        self.places = PlaceGate()  # pools and agent caps (see cronfile.center.pools)
        self.pool_caps: dict[str, int] = {}  # the pools the jobs use, for status
        self.backfills = BackfillQueue()  # slots `cronfile backfill` still has to run
        self._places_written, self._places_written_at = -1, 0.0
        # A load or a reload frees most of what it allocated: give it back to the system.
        self.reloads = Reloader(self.loader, options.state, lambda: self.desired,
                                lambda state, diff: self._apply(state, diff=diff),
                                self._event, self._spawn, after_store=return_free_memory)
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._dispatching = 0  # bursts being dispatched now (see _burst_begins)
        self.records = RecordWriter(self._append_runs, lambda: self._dispatching > 0)
        self._deferred_ends: list[tuple[_Running, StartRun, RunOutcome]] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._signals = 0
        self._crash_cause: str | None = None  # why a core task died, for center_stopped
        self._failed_batches = 0  # run-record writes failed and not queued again yet
        self.state = RunState.STARTING
        self._lock: int | None = None
        self._awaiting_agents: dict[str, dict[str, Any]] = {}  # tcp runs in flight at restart
        # tcp runs of this center whose final record is not queued yet (see _outcome_recorded)
        self._agent_runs_ending: dict[str, asyncio.Future[None]] = {}
        self._starting: dict[str, tuple[str, str]] = {}  # remote starts under way: (job, agent)
        self._last_watermark = 0.0
        self._last_tick: float | None = None  # every slot up to it was handed to perform()
        # After a restart, agents that were connected before get a bounded time to come
        # back before a start that needs them is recorded no_agent (see _park).
        self._awaiting_reconnect: set[str] = set()
        self._reconnect_deadline = 0.0
        self._parked: list[StartRun] = []
        self._agents_changed = False
        self._last_expect_check = 0.0
        self.metrics = RunMetrics()
        self.recent: dict[str, deque[RecentRun]] = {}
        self._run_waiters: dict[str, asyncio.Event] = {}
        self._dispatch_idle = threading.Event()  # clear while a burst is being dispatched
        self._dispatch_idle.set()
        self.http: HttpServer | None = None
        self.git = None if options.git is None else GitFollower(
            options.git, options.state, self.reloads.reload,
            lambda: self._revision().get("git_commit"), self._event)
        self._center_file_view: dict[str, Any] | None = None  # what center.json says of HA

    # ------------------------------------------------------------------ records

    def _revision(self) -> dict[str, Any]:
        return self.desired.revision.to_dict() if self.desired else {}

    def _base(self, job: Job, slot: float, agent: str, transport: str | None, attempt: int,
              run_id: str) -> dict[str, Any]:
        return {"run_id": run_id, "job": job.name, "agent": agent, "transport": transport,
                "scheduled_at": iso(slot), "attempt": attempt, "revision": self._revision()}

    def _append_runs(self, batch: list[dict[str, Any]]) -> None:
        """Hand a batch to the ledger's writer thread: encoded here (a record that cannot be
        encoded fails its caller), written and fsynced there, off the loop and in order
        with every other write. A failed write (disk full) is queued again."""
        loop = asyncio.get_running_loop()

        def written(done: Future[Any]) -> None:  # on the writer thread
            if done.exception() is not None:
                self._failed_batches += 1  # before anything queued after it runs
                loop.call_soon_threadsafe(self._append_failed, batch, done.exception())
            else:
                loop.call_soon_threadsafe(self._finals_written, batch)

        self.ledger.submit(self.ledger.write_runs, encode_records(batch)).add_done_callback(written)
        if self.ha is not None:
            self.ha.mirror("run", batch)

    def _append_failed(self, batch: list[dict[str, Any]], exc: BaseException | None) -> None:
        log.error("writing %d run records failed, kept for the next write: %s", len(batch), exc)
        self._failed_batches -= 1  # queued again: the next watermark writes them first
        for record in batch:
            self.records.add(record)

    def _finals_written(self, batch: list[dict[str, Any]]) -> None:
        """A batch is on disk: the agent runs whose final record it holds may be acked."""
        for record in batch:
            if record.get("record") == "finished":
                ending = self._agent_runs_ending.pop(str(record.get("run_id")), None)
                if ending is not None and not ending.done():
                    ending.set_result(None)

    async def _outcome_recorded(self, run_id: str) -> bool:
        """Wait until the final record of a run this center sent to an agent is durable;
        False when no such run is in flight here (the caller records the outcome itself).

        The hub acks an agent's outcome only when :meth:`agent_outcome` returns: the agent
        forgets what is acked, so an ack ahead of the record would lose the outcome with a
        center killed in between. The record is queued by the run's watcher (possibly
        deferred past a burst) and written on the ledger's writer thread: this waits until
        the batch that holds it is on disk."""
        ending = self._agent_runs_ending.get(run_id)
        if ending is None:
            return False
        self.records.flush()  # no need to wait for the batching timer
        await asyncio.shield(ending)
        return True

    def _event(self, name: str, **fields: Any) -> None:
        """Append an event on the writer thread (encoded here: its fields may change later)."""
        if name == "revision_rejected":
            self.metrics.revision_rejected()
        self.ledger.submit(self.ledger.write_events, encode_records([{"event": name, **fields}]))
        if self.ha is not None:
            self.ha.mirror("event", [{"event": name, **fields}])

    def _ha_event(self, event: dict[str, Any]) -> None:
        """leader_acquired / leader_released / leader_lost: recorded, shown in center.json;
        a takeover recovers the gap as a restart would (SPEC §9)."""
        fields = dict(event)
        self._event(str(fields.pop("event")), **fields)
        self._write_center_file()
        if event["event"] == "leader_acquired":
            self._spawn(self._take_over(), critical=True)

    def _write_center_file(self) -> None:
        self._center_file_view = self.ha.view() if self.ha is not None else None
        write_center_file(self.state_dir, self.options, self._started_iso, ha=self._center_file_view)

    async def _take_over(self) -> None:
        """Slots of the last lease's span may be the old leader's: what it claimed is done,
        the rest follows each job's catch_up, exactly as after a restart."""
        assert self.ha is not None
        await self.ha.claimer.warm()
        since = self.clock.time() - self.ha.settings.lease_s - 2 * self.ha.settings.renew_interval_s
        for job, slot, target in await self.ha.claimed_since(since):
            self.done_slots.add((job, round(slot, 3), target))
        await self._catch_up(since)

    def _outcome(self, job_name: str, record: dict[str, Any]) -> None:
        """Every final outcome passes here once: the log line, metrics, notifications and
        expectations."""
        status = RunStatus(record["status"])
        if self.options.log_runs:  # a line for every run, bad ones included
            log_run(record)
        elif status in LOGGED_OUTCOMES:
            log.warning("%s", describe_outcome(record))
        self.metrics.run_finished(job_name, str(record["status"]), record.get("duration_s"))
        strip = self.recent.get(job_name)
        if strip is None:
            strip = self.recent[job_name] = deque(maxlen=RECENT_RUNS)
        strip.append(RecentRun(str(record.get("run_id")), str(record["status"]),
                               record.get("duration_s"), record.get("scheduled_at")))
        job = self.desired.jobs.get(job_name) if self.desired else None
        if job is None:
            return
        if status is RunStatus.SUCCEEDED:
            self.last_success[job_name] = self.clock.time()
            self._success_alerted.discard(job_name)
        attempt = int(record.get("attempt") or 1)
        # notify once the last attempt has failed, not per attempt
        if not job.retries.wanted_after(status, attempt, record.get("exit_code")):
            self.notifier.outcome(job, status, record)
        for what, detail in runtime_alerts(job, record.get("duration_s"), status):
            self.notifier.alert(job, what, detail, record)

    def _check_success_within(self) -> None:
        """``expect.success_within``: alert once when a job has not succeeded for too long."""
        now = self.clock.time()
        for name in self._success_watch:
            job = self.scheduler.job(name)
            if job is None:
                continue
            limit = job.expect.success_within_s
            if limit is None or name in self._success_alerted or job.suspend:
                continue
            since = self.last_success.get(name, self._started_at)
            if now - since > limit:
                self._success_alerted.add(name)
                self.notifier.alert(job, "success_within",
                                    f"no success for {now - since:.0f}s (expected within {limit:g}s)",
                                    {"job": name})

    def _watch_max_runtime(self, run: _Running, job: Job) -> asyncio.TimerHandle | None:
        limit = job.expect.max_runtime_s
        if limit is None:
            return None

        def check() -> None:
            if run.run_id in self.running:
                self.notifier.alert(job, "max_runtime", f"still running after {limit:g}s",
                                    run.base)

        return asyncio.get_running_loop().call_later(limit, check)

    # ------------------------------------------------------------------ life cycle

    async def run_until_stopped(self) -> int:
        """Start, run until a signal (or a crash of a core task), shut down; 0 = stopped,
        1 = crashed."""
        private_dir(self.state_dir)
        self._lock = lock_state_dir(self.state_dir)
        if self.git is not None:  # the checkout the schedules are read from
            try:
                await asyncio.to_thread(self.git.prepare)
            except GitError as exc:
                raise CenterError(f"--git {self.git.options.url}: {exc}") from None
        # The schedules are loaded before the ledger is touched: a --retention too short
        # for them is refused (exit 2) before retention could remove anything.
        first = await asyncio.to_thread(self.loader.load, with_git=True)
        refusal = self._retention_refusal(first.state)
        if refusal:
            log.error("%s", refusal)
            return 2
        reserve_space(self.state_dir)
        dropped = self.ledger.open()
        self._history = self.ledger.recover()  # the checkpoint and what followed it
        # Read how far the previous center got BEFORE this one writes anything: the
        # fallback (no watermark file) is the logs' last timestamp.
        since = self._read_watermark()
        self._last_tick = since
        known_agents = read_known_agents(self.state_dir)
        if any(dropped.values()):
            self._event("ledger_repaired", dropped_bytes=dropped)
        if self.ha is not None:
            await asyncio.to_thread(self.ha.prepare)
        self._write_center_file()
        self._event("center_started", pid=os.getpid(), schedules=str(self.options.schedules),
                    listen=self.options.listen)
        self._recover_ledger()
        if first.state is None:
            try:
                previous = read_applied(self.state_dir)
            except StateFileError as exc:
                log.error("cannot use the last applied revision: %s", exc)
                previous = None
            self.reloads.reject(first.problems, kept=previous)
            if previous is None:
                # Nothing good to fall back on: a center running 0 jobs with exit 0 would
                # look healthy while it runs nothing at all.
                log.error("no valid revision to run (none was ever applied here): not starting")
                self._event("center_stopped", reason="invalid_schedules", pid=os.getpid())
                self.ledger.close()
                with contextlib.suppress(OSError):
                    (self.state_dir / CENTER_FILE).unlink()
                return 1
            self._apply(previous, initial=True)
        else:
            self._apply(first.state, initial=True)
        self._requeue_pending()
        self._install_signals()
        await self._start_services()
        if self.hub is not None and self.desired is not None:
            self._awaiting_reconnect = {n for n in known_agents if n in self.desired.agents}
            self._reconnect_deadline = self.clock.time() + reconnect_grace_s(self.options)
        if self.ha is not None:
            self._spawn(self.ha.run(), critical=True, name="ha")
        elif since is not None:
            # At once, before the first tick can move the watermark: a center killed
            # before its catch-up is durable must leave the outage to its successor. Starts
            # that need an agent not back yet wait for it (bounded: _park).
            await self._catch_up(since)
            self.records.flush()
        self._spawn(self._scheduler_loop(), critical=True)
        if self.options.watch:
            self._spawn(self.reloads.watch(self.options.schedules, self._stopping), critical=True)
        self._spawn(self.reloads.run(), critical=True)
        if self.git is not None:
            self._spawn(self.git.run(self._stopping), critical=True)
        self._spawn(self._housekeeping(), critical=True)
        log.info("center running: %d jobs; state in %s", len(self.scheduler.job_names()),
                 self.state_dir)
        if not self._stopping.is_set():
            self.state = RunState.RUNNING
        await self._stopping.wait()
        await self._shutdown()
        if self._lock is not None:  # free for the next center (in this process, too)
            os.close(self._lock)
            self._lock = None
        if self.state is not RunState.CRASHED:
            self.state = RunState.STOPPED
        return 1 if self.state is RunState.CRASHED else 0

    def _spawn(self, coro: Any, critical: bool = False, name: str | None = None) -> asyncio.Task[Any]:
        """Run ``coro`` as a child task. A *critical* task (the scheduler loop, reloads, the
        watcher) that dies takes the center down with exit 1: a center that looks alive
        but schedules nothing would be the worst failure of all."""
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(lambda t: self._task_done(t, critical))
        return task

    def _task_done(self, task: asyncio.Task[Any], critical: bool = False) -> None:
        self._tasks.discard(task)
        if task.cancelled() or task.exception() is None:
            return
        exc = task.exception()
        if isinstance(exc, OSError):  # the state directory (a full disk): no traceback to show
            log.error("cannot write to the state directory %s: %s", self.state_dir, exc)
            self._crash_cause = self._crash_cause or str(exc)
        else:
            log.error("center task failed: %r", exc, exc_info=exc)
        if critical and not self._stopping.is_set():
            log.critical("a core task of the center crashed: stopping")
            self.state = RunState.CRASHED
            self.request_stop()

    async def _start_services(self) -> None:
        self.control = ControlServer(self.state_dir, self)
        try:
            await self.control.start()
        except ControlSocketError as exc:
            raise CenterError(str(exc)) from None
        if self.options.listen:
            try:
                self.hub = await start_hub(self.options, self.router.inventory, self)
            except SecretsError as exc:  # names the file and line, never a secret
                raise CenterError(str(exc)) from None
            self.router.directory = self.hub
            write_agents_file(self.state_dir, self.hub)
            if self.desired is not None:
                await sync_agent_daemons(self.hub, self.desired, self.router)
        if self.options.http is not None:
            from cronfile.center.http import HttpServer

            self.http = HttpServer(self, self.options.http)
            await self.http.start()

    # ------------------------------------------------------------------ what agents report

    def agent_connected(self, name: str) -> None:
        self._event("agent_connected", agent=name)
        if self.hub is not None:
            write_agents_file(self.state_dir, self.hub)
        self._awaiting_reconnect.discard(name)
        self._agents_changed = True
        self._wake.set()

    def agent_disconnected(self, name: str) -> None:
        self._event("agent_disconnected", agent=name)
        if self.hub is not None:
            write_agents_file(self.state_dir, self.hub)

    async def agent_outcome(self, run_id: str, agent: str, outcome: dict[str, Any]) -> None:
        """Every outcome an agent delivers; returns once it is durable (the hub acks it
        then). A run of this center: its handle resolved, its watcher writes the record.
        Otherwise a run in flight when the center restarted (its one outcome), or one
        recorded ``lost`` (superseded, once)."""
        if await self._outcome_recorded(run_id):
            return
        # Only the agent a run was sent to may report its outcome: run ids are
        # predictable, and a forged "succeeded" would fire chains and hide failures.
        expected = (self._awaiting_agents.get(run_id) or self.lost_bases.get(run_id)
                    or {}).get("agent")
        if expected is not None and expected != agent:
            log.warning("agent %s sent an outcome for run %s, which ran on %s: ignored",
                        agent, run_id, expected)
            return
        waiting = self._awaiting_agents.pop(run_id, None)
        if waiting is not None:  # in flight when the center restarted: its one outcome
            record = {**waiting, "record": "finished", **outcome}
            self.records.add(record)
            self._outcome(str(waiting.get("job")), record)
            self.records.flush()
            return
        # Only a run the center recorded ``lost`` may get a second, superseding record, and
        # only once. Any other run_id was already recorded (a re-delivery whose ack was lost,
        # e.g. across a center restart, when the hub's dedupe window is empty): ignore it.
        base = self.lost_bases.pop(run_id, None)
        if base is None:
            log.info("outcome of run %s from %s was already recorded: ignored", run_id, agent)
            return
        if outcome.get("status") == "lost":
            return  # the agent lost it too (it restarted): nothing new to record
        self.records.add({**base, "record": "finished", **outcome, "supersedes": "lost",
                      "reason": "outcome delivered after the run was recorded lost"})
        self.records.flush()

    # ------------------------------------------------------------------ what the operator asks

    def has_job(self, name: str) -> bool:
        return self.scheduler.has_job(name)

    async def run_job(self, name: str) -> list[dict[str, Any]]:
        return await self.perform(self.scheduler.run_now(name, self.clock.time()))

    async def backfill(self, name: str, start: float, end: float, dry_run: bool,
                       confirmed: bool) -> dict[str, Any]:
        """Queue the slots of ``name`` in ``[start, end]`` that have no record yet (see
        :mod:`cronfile.center.backfill`); with ``dry_run`` only say which."""
        job = self.scheduler.job(name)
        if job is None:
            raise BackfillRefused(f"no job named {name!r}")
        found = slots_in_range(job, start, end, MAX_SLOTS if confirmed else MAX_UNCONFIRMED_SLOTS)
        recorded = await asyncio.to_thread(recorded_slots, self.state_dir, name)
        recorded |= {slot for job_name, slot, _agent in self.done_slots if job_name == name}
        waiting = self.backfills.pending(name)
        todo = tuple(t for t in found.slots if round(t, 3) not in recorded and t not in waiting)
        answer = {"job": name, "slots": [iso(t) for t in todo], "count": len(todo),
                  "already_recorded": sum(1 for t in found.slots if round(t, 3) in recorded),
                  "already_queued": sum(1 for t in found.slots if t in waiting),
                  "skipped_by_calendar": found.skipped_by_calendar, "dry_run": dry_run}
        if not dry_run and todo:
            self.backfills.add(name, todo)
            self._event("backfill_queued", job=name, count=len(todo), first=iso(todo[0]),
                        last=iso(todo[-1]))
            self._pump_backfill(name)
        return answer

    def _pump_backfill(self, name: str) -> None:
        """Start what the job's backfill may start now (its concurrency decides)."""
        job = self.scheduler.job(name)
        if job is None or self._stopping.is_set():
            return
        starts = self.backfills.next_starts(job, self.scheduler.is_running(name))
        if starts:
            self._spawn(self.perform(list(starts)))

    def trigger(self, event: str) -> list[str]:
        now = self.clock.time()
        names = self.scheduler.trigger(event, now)
        self._wake.set()
        # When each start is due, exactly as queued: a restarted center re-queues the
        # ones that never started (see Center._requeue_pending).
        due = {}
        for name in names:
            job = self.scheduler.job(name)
            if job is not None and job.trigger is not None:
                due[name] = iso(now + job.trigger.delay_s)
        self._event("triggered", trigger_event=event, jobs=names, due=due)
        return names

    def stop_run(self, run_id: str, requested_by: str) -> dict[str, Any]:
        """Stop one running run; its final record says ``killed``, with ``stopped_by`` and
        a ``reason`` naming who asked."""
        run = self.running.get(run_id)
        if run is None:
            return {"ok": False, "run_id": run_id, "error": f"run {run_id} is not running"}
        run.stop_reason = f"stopped by {requested_by}"
        run.base["stopped_by"] = requested_by
        self._event("run_stop_requested", run_id=run_id, job=run.job, by=requested_by)
        self._spawn(run.handle.stop(run.stop_reason))
        return {"ok": True, "run_id": run_id, "job": run.job}

    async def wait_run(self, run_id: str, timeout: float) -> bool:
        if run_id in self.running:
            waiter = self._run_waiters.setdefault(run_id, asyncio.Event())
            try:
                await asyncio.wait_for(waiter.wait(), timeout=timeout)
            except TimeoutError:
                return False
        # a final record is queued for a few milliseconds, then written by the ledger's
        # writer thread: on disk before we answer (the writer runs submissions in order)
        with contextlib.suppress(OSError):
            self.records.flush()
        with contextlib.suppress(Exception):
            await asyncio.wrap_future(self.ledger.submit(lambda: None))
        return True

    # ------------------------------------------------------------------ what HTTP reads (port.py)

    def current_revision(self) -> dict[str, Any]:
        return self._revision()

    def applied_state(self) -> DesiredState | None:
        return self.desired

    def wait_dispatch_idle(self, timeout: float) -> bool:
        self._dispatch_idle.wait(timeout)
        return self._dispatch_idle.is_set()

    def snapshot(self) -> CenterSnapshot:
        """O(jobs) copies on the loop (a few milliseconds at 10,000 jobs); the rendering
        that reads it runs in a thread."""
        running: dict[str, int] = {}
        for run in self.running.values():
            running[run.job] = running.get(run.job, 0) + 1
        live = {a["name"]: a for a in self.hub.snapshot()} if self.hub is not None else {}
        declared = dict(self.desired.agents) if self.desired is not None else {}
        agents = []
        for name in list(declared) + [n for n in live if n not in declared]:
            conn = live.get(name)
            if conn is not None:
                agents.append(AgentView(name, True, conn["last_heartbeat"],
                                        conn["connected_since"], conn["labels"]))
            else:
                agents.append(AgentView(name, False, labels=dict(declared[name].labels)))
        rejection = self.reloads.last_rejection
        return CenterSnapshot(
            now=self.clock.time(), revision=self._revision(),
            last_rejection=dict(rejection) if rejection else None,
            jobs=tuple(self.desired.jobs.values()) if self.desired is not None else (),
            next_fire=self.scheduler.next_fires(), last_slot=self.scheduler.last_slots(),
            last_success=dict(self.last_success), running=running, agents=tuple(agents),
            recent={name: tuple(strip) for name, strip in self.recent.items()},
            git=self.git.state() if self.git is not None else None,
            ha=self.ha.view() if self.ha is not None else None)

    def request_stop(self) -> None:
        if self.state is not RunState.CRASHED:
            self.state = RunState.STOPPING
        self._stopping.set()
        self._wake.set()

    def _install_signals(self) -> None:
        loop = asyncio.get_running_loop()

        def on_stop() -> None:
            self._signals += 1
            if self._signals > 1:  # a second signal: exit at once, children get SIGKILL
                log.warning("second signal: exiting now")
                for run in self.running.values():
                    with contextlib.suppress(Exception):
                        run.handle.kill_now()
                for supervisor in self.daemons.values():
                    with contextlib.suppress(Exception):
                        supervisor.kill_now()
                self.records.flush()
                self.ledger.drain(seals=False)
                os._exit(1)
            log.info("stopping: no new runs; waiting up to %gs for running ones",
                     self.options.shutdown_grace_s)
            self.request_stop()

        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, on_stop)
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signal.SIGHUP, self.reloads.requested.set)

    async def _shutdown(self) -> None:
        if self.ha is not None:
            # First of all: release the lease, so a standby leads within a second while
            # this center drains its runs (and it dispatches nothing more from here on).
            await self.ha.stop()
        for task in list(self._tasks):
            if task.get_name() not in ("run", "daemon"):
                task.cancel()
        grace = self.options.shutdown_grace_s
        # Runs on agents keep going: the agent stores their outcomes and the next center
        # records them. Runs of this process (local, and SSH sessions it holds) get the
        # grace period, then are stopped, all at once.
        ours = [r for r in self.running.values() if r.base.get("transport") != "tcp"]
        if ours:
            _, pending = await asyncio.wait([asyncio.ensure_future(r.handle.wait()) for r in ours],
                                            timeout=grace)
            left = [r for r in ours if r.run_id in self.running]
            for run in left:
                run.stop_reason = "center shutting down"
            if left:
                stops = [r.handle.stop("center shutting down", grace_s=min(grace, 5.0)) for r in left]
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.gather(*stops, return_exceptions=True),
                                           timeout=min(grace, 5.0) + 5)
        supervisors = list(self.daemons.values())
        if supervisors:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*(d.stop(min(grace, 5.0)) for d in supervisors),
                                                      return_exceptions=True), timeout=grace + 5)
        daemon_tasks = [t for t in self._tasks if t.get_name() == "daemon"]
        if daemon_tasks:
            await asyncio.wait(daemon_tasks, timeout=grace + 5)
        await asyncio.sleep(0)  # let run watchers record their outcomes
        for _ in range(50):
            if not any(r.base.get("transport") != "tcp" for r in self.running.values()):
                break
            await asyncio.sleep(0.02)
        await self.notifier.drain(5.0)
        if self.hub is not None:
            with contextlib.suppress(Exception):
                await self.hub.close()
        await self.router.close()
        with contextlib.suppress(Exception):
            await self.control.close()
        if self.http is not None:
            with contextlib.suppress(Exception):
                await self.http.close()
        await self._last_writes()
        if self.ha is not None:
            await self.ha.close()
        await asyncio.to_thread(self.ledger.close)  # drains the writer, leaves a checkpoint
        with contextlib.suppress(OSError):
            (self.state_dir / CENTER_FILE).unlink()

    async def _last_writes(self) -> None:
        """What a stopping center writes last: its queued records, the watermark (as far
        as the last tick got, not the clock), ``center_stopped``. Written here, once the
        writer thread is idle, so that a full disk is seen: the reserved room is then
        given back and the writes tried once more (a failed write leaves nothing behind,
        so nothing is written twice)."""
        await asyncio.to_thread(self.ledger.drain, False)
        await asyncio.sleep(0)  # failed batches come back to the queue through the loop
        fields: dict[str, Any] = {"reason": "crashed" if self.state is RunState.CRASHED else "signal"}
        if self._crash_cause:
            fields["error"] = self._crash_cause
        event = {"event": "center_stopped", **fields, "pid": os.getpid(),
                 "agent_runs_left": sum(1 for r in self.running.values()
                                        if r.base.get("transport") == "tcp")}
        records = self.records.take()
        if self.ha is not None:  # the ledger of record gets them too, as every write
            if records:
                self.ha.mirror("run", records)
            self.ha.mirror("event", [event])
        stopped = encode_records([event])
        batch = encode_records(records)
        mark = self._watermark_mark()
        for last_try in (False, True):
            try:
                if batch:
                    self.ledger.write_runs(batch)
                    batch = b""
                if mark is not None:
                    write_watermark(self.state_dir, mark)
                    mark = None
                self.ledger.write_events(stopped)
                return
            except OSError as exc:
                if last_try or not release_reserve(self.state_dir):
                    log.error("cannot record the center's stop: %s", exc)
                    return

    # ------------------------------------------------------------------ desired state

    def _apply(self, state: DesiredState, initial: bool = False, diff: StateDiff | None = None) -> None:
        """Apply ONLY the difference: unchanged jobs keep their timing and processes."""
        now = self.clock.time()
        diff = diff or diff_states(self.desired, state)
        old = self.desired
        self.desired = state
        self.router.inventory = state.agents
        self.places.set_agent_caps({a.name: a.max_running for a in state.agents.values()
                                    if a.max_running is not None})
        self.pool_caps = {j.pool.name: j.pool.max_running for j in state.jobs.values()
                          if j.pool is not None}
        for name in diff.jobs.removed:
            self.places.forget_job(name)  # its waiting starts will not run
            self.backfills.forget(name)
            self._success_watch.discard(name)
            self.scheduler.remove_job(name)
            self._stop_daemon(name)
            if old is not None and old.jobs[name].on_change is OnChange.RESTART:
                self._stop_runs(name, "job removed (on_change: restart)")
        # Many small objects per job and none freed: the cyclic GC would rescan the growing
        # heap again and again for nothing (seconds for 100,000 jobs).
        with gcpause.paused():
            for name in (*diff.jobs.added, *diff.jobs.changed_names):
                job = state.jobs[name]
                self.scheduler.set_job(job, now)
                if job.expect.success_within_s is not None:
                    self._success_watch.add(name)
                else:
                    self._success_watch.discard(name)
                if job.kind is JobKind.DAEMON and job.targets.is_local_only and not job.suspend:
                    self._restart_daemon(job)
                else:
                    self._stop_daemon(name)
                restart = name in diff.jobs.changed_names and job.on_change is OnChange.RESTART
                if restart and job.kind is JobKind.CRON \
                        and self._stop_runs(name, "job changed (on_change: restart)"):
                    self._spawn(self.perform(self.scheduler.run_now(name, now, "on_change")))
        if initial and len(state.jobs) >= 1000:
            # A large desired state lives on: moved out of the GC's generations, later
            # collections (e.g. while reloading) do not walk its objects again and again.
            gc.freeze()
        if self.hub is not None:
            with contextlib.suppress(Exception):
                self.hub.update_inventory(state.agents)
            self._spawn(sync_agent_daemons(self.hub, state, self.router))
        self._event("revision_applied", revision=state.revision.to_dict(),
                    initial=initial, diff=diff.summary())
        self.reloads.store_applied(state)
        self._wake.set()

    async def reload(self, revision: str | None = None) -> dict[str, Any]:
        """Re-read the source (fetching the branch first when following git): apply the
        difference, or keep the last good revision. ``revision``: a commit of the branch."""
        if self.git is not None:
            return await self.git.sync(revision)
        if revision is not None:
            return {"applied": False, "refused": "no_git", "errors": [
                "--revision: this center follows no git branch (it was started without --git "
                "URL); it applies its --schedules directory, so run `cronfile apply` without "
                "--revision"]}
        return await self.reloads.reload()

    # ------------------------------------------------------------------ daemons

    def _restart_daemon(self, job: Job) -> None:
        """(Re)start a local daemon; the old replicas are stopped BEFORE the new ones start
        (two generations at once would fight over ports and files)."""
        old = self.daemons.pop(job.name, None)
        request = self._request(job, run_id_for(job.name, self.clock.time(), LOCAL_AGENT, 0),
                                None, 1, ())
        base = self._base(job, 0, LOCAL_AGENT, "local", 1, request.run_id)
        base["scheduled_at"] = None
        supervisor: DaemonSupervisor

        async def on_exit(replica: int, outcome: RunOutcome) -> None:
            # each incarnation has its own run_id (<id>.<replica>.<n>): one record per exit
            status = supervisor.status()
            run_id = status[replica].run_id if replica < len(status) else None
            restarts = status[replica].restarts if replica < len(status) else 0
            record = {**base, "run_id": run_id or f"{base['run_id']}.{replica}",
                      "attempt": restarts + 1, "record": "finished", "replica": replica,
                      **outcome_fields(outcome)}
            self.records.add(record)
            self._outcome(job.name, record)

        supervisor = DaemonSupervisor(self.local, request, job.replicas, job.restart, on_exit)
        self.daemons[job.name] = supervisor

        async def swap() -> None:
            if old is not None:
                await old.stop()
            await supervisor.start()

        self._spawn(swap(), name="daemon")

    def _stop_daemon(self, name: str) -> None:
        supervisor = self.daemons.pop(name, None)
        if supervisor is not None:
            self._spawn(supervisor.stop(), name="daemon")

    # ------------------------------------------------------------------ the loop

    async def _scheduler_loop(self) -> None:
        mono0, wall0 = self.clock.monotonic(), self.clock.time()
        while not self._stopping.is_set():
            now = self.clock.time()
            drift = now - (wall0 + self.clock.monotonic() - mono0)
            if abs(drift) > 2.0:
                self._event("clock_step", seconds=round(drift, 3))
                log.warning("wall clock stepped by %+.1fs", drift)
                mono0, wall0 = self.clock.monotonic(), now
            self._end_deferred_runs()
            await self._unpark(now)
            self._burst_begins()  # from the tick on: it makes the objects of every due run
            try:
                actions = self.scheduler.tick(now)
                if self.ha is not None and not self.ha.leading():
                    actions = []  # a standby keeps its timers current and does nothing
                await self.perform(actions, wait=False)
            finally:
                self._burst_ends()
            # Stamped with the tick's own time: a tick that stalled handled nothing after it.
            self._last_tick = now
            self._write_watermark()
            if self.places.waiting_count():
                self._expire_waiting(now)
            self._write_places(now)
            if now - self._last_expect_check >= 5.0:
                self._last_expect_check = now
                self._check_success_within()
                if self.hub is not None:
                    write_agents_file(self.state_dir, self.hub)
            if self.ha is not None and self.ha.view() != self._center_file_view:
                self._write_center_file()  # role, term, lease: at most once a tick
            due = self.scheduler.next_due()
            delay = 1.0 if due is None else min(max(due - self.clock.time(), 0.0), 1.0)
            if delay > 0:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=delay)

    async def perform(self, actions: list[Action], wait: bool = True) -> list[dict[str, Any]]:
        """Carry out the scheduler's actions; starts are batched (one fsync per chunk).
        Returns what became of each start: ``{"run_id", "agent", "status"}`` with status
        ``started``, or the record of a slot that did not run (for ``cronfile run``).
        ``wait=False``: starts on remote hosts go on in the background (the scheduler loop
        must not wait for a dark agent) and their results are not returned."""
        results: list[dict[str, Any]] = []
        starts: list[tuple[StartRun, Target]] = []
        for action in actions:
            if isinstance(action, RecordSlot):
                results.append(self._record_slot(action))
            elif isinstance(action, StopRuns):
                self._stop_runs(action.job, action.reason)
            elif isinstance(action, StartRun):
                targets = self.targets_for(action.job, action.target)
                if not targets and self._park(action, self.router.candidates(action.job)
                                              if action.target is None else [action.target]):
                    continue
                if not targets:
                    results.append(self._record_slot(RecordSlot(
                        action.job, action.scheduled_at, RunStatus.NO_AGENT,
                        self._no_agent_reason(action.job, action.target, action.attempt),
                        attempt=action.attempt), agent=action.target))
                    continue
                for target in targets:
                    key = (action.job.name, round(action.scheduled_at, 3), target.agent)
                    if action.attempt == 1 and action.reason == "schedule" and key in self.done_slots:
                        continue  # already in the ledger: once per slot
                    self.done_slots.add(key)
                    if target.executor is None and self._park(
                            replace(action, target=target.agent), [target.agent]):
                        self.done_slots.discard(key)  # not handled yet: parked
                        continue
                    if target.executor is None:  # a target of all/shard that is not reachable
                        results.append(self._record_slot(RecordSlot(
                            action.job, action.scheduled_at, RunStatus.NO_AGENT, target.why,
                            attempt=action.attempt), agent=target.agent))
                        continue
                    if action.forbid_busy_targets and self._busy(action.job.name, target.agent):
                        results.append(self._record_slot(RecordSlot(
                            action.job, action.scheduled_at, RunStatus.SKIPPED,
                            "previous run still running on this target (concurrency: forbid)",
                            attempt=action.attempt), agent=target.agent))
                        continue
                    if self.places.needs_place(action.job, target.agent) \
                            and not self.places.take((action, target)):
                        results.append(self._wait_for_place(action, target))
                        continue
                    starts.append((action, target))
        if starts:
            results.extend(await self._dispatch(starts, wait))
        return results

    def _busy(self, job: str, agent: str) -> bool:
        """A run of ``job`` on ``agent`` is in flight (being started, or running)."""
        return (job, agent) in self._starting.values() or any(
            r.job == job and r.agent == agent for r in self.running.values())

    def _park(self, action: StartRun, agents: Iterable[str]) -> bool:
        """Right after a restart, a start that needs an agent which was connected to the
        previous center and is not back yet waits for it (SPEC §2: no_agent only for an
        agent that is not reachable; one reconnecting in a second is). True if parked."""
        if not self._awaiting_reconnect:
            return False
        if self.clock.time() >= self._reconnect_deadline:
            self._awaiting_reconnect.clear()
            return False
        if not self._awaiting_reconnect.intersection(agents):
            return False
        self._parked.append(action)
        return True

    async def _unpark(self, now: float) -> None:
        """Start the parked starts once their agent is back, or record them when it did
        not come back in time."""
        if not self._parked or not (self._agents_changed or now >= self._reconnect_deadline):
            return
        self._agents_changed = False
        parked: list[Action] = list(self._parked)
        self._parked = []
        await self.perform(parked, wait=False)

    def targets_for(self, job: Job, only: str | None = None) -> list[Target]:
        """Where a start goes; a retry (``only``) goes back to the target that failed and
        nowhere else: re-running another shard or another agent would be wrong. (fleet is
        imported with this module: a lazy import cost the first due slot ~3 ms.)"""
        if only is not None:
            return self.router.resolve_retry(job, only)
        return self.router.resolve(job)

    def _no_agent_reason(self, job: Job, only: str | None = None, attempt: int = 1) -> str:
        if only is not None:
            return f"{'retry: ' if attempt > 1 else ''}agent {only} is not reachable"
        wanted = list(job.targets.agents) + [f"{k}={v}" for k, v in job.targets.labels]
        return f"no connected agent matches targets ({', '.join(wanted) or 'local'})"

    def _request(self, job: Job, run_id: str, slot: float | None, attempt: int,
                 extra_env: tuple[tuple[str, str], ...]) -> RunRequest:
        return RunRequest(
            run_id=run_id, job=job.name, command=job.command,
            scheduled_at=datetime.fromtimestamp(slot, UTC) if slot else None,
            attempt=attempt, env=job.env + extra_env, workdir=job.workdir, run_as=job.run_as,
            timeout_s=job.timeout_s, output_keep=job.output_keep,
        )

    async def _dispatch(self, starts: list[tuple[StartRun, Target]],
                        wait: bool = True) -> list[dict[str, Any]]:
        """Dispatch in chunks. A chunk's ``dispatched`` records are written and fsynced
        (one write, one fsync) before any of its runs starts. A long burst lets the loop
        reap finished children as it goes (see :data:`DISPATCH_REAP_EVERY`). The first chunk
        is small, so the first runs start sooner."""
        chunks = [starts[:DISPATCH_FIRST_CHUNK]] + [
            starts[i:i + DISPATCH_CHUNK] for i in range(DISPATCH_FIRST_CHUNK, len(starts),
                                                        DISPATCH_CHUNK)]
        results: list[dict[str, Any]] = []
        self._burst_begins()
        try:
            unreaped, reap_after = 0, DISPATCH_REAP_FIRST
            # HA: the claim of the next chunk is in flight while this one spawns (one at a
            # time, on the claimer's one connection), so the round trips overlap the spawns.
            claiming = self._claim_ahead(chunks, 0)
            for index, part in enumerate(chunks):
                if claiming is None:
                    chunk = self._prepare_chunk(part)
                else:
                    chunk = await claiming
                    claiming = self._claim_ahead(chunks, index + 1)
                # durable BEFORE any of its runs starts (written on the writer thread)
                await asyncio.wrap_future(self.ledger.submit(self.ledger.write_runs, chunk.data))
                results.extend(await self._start_chunk(chunk, wait))
                unreaped += len(chunk.runs)
                if unreaped >= reap_after and part is not chunks[-1]:
                    # two loop passes: the first starts watching the runs just spawned
                    # (LocalExecutor defers that), the second reaps those that ended
                    await asyncio.sleep(0)
                    await asyncio.sleep(0)
                    unreaped, reap_after = 0, DISPATCH_REAP_EVERY
        finally:
            self._burst_ends()
        return results

    def _claim_ahead(self, chunks: list[list[tuple[StartRun, Target]]],
                     index: int) -> asyncio.Future[_Chunk] | None:
        if self.ha is None or index >= len(chunks):
            return None
        return asyncio.ensure_future(self._claim_chunk(self._prepare_chunk(chunks[index])))

    async def _claim_chunk(self, chunk: _Chunk) -> _Chunk:
        """HA: keep only the runs PostgreSQL let this leader claim, with its term in their
        ``dispatched`` records (the claim and those records are one statement there)."""
        assert self.ha is not None
        term = self.ha.elector.term
        wanted = [(action, target, request.run_id, {**base, "record": "dispatched", "term": term})
                  for action, target, request, base in chunk.runs]
        won = await self.ha.claim(wanted)
        kept = _Chunk()
        records = []
        for run, (_, _, run_id, record) in zip(chunk.runs, wanted, strict=True):
            if run_id in won:
                kept.runs.append(run)
                records.append(record)
            else:
                self.scheduler.not_started(run[0].job.name, run_id)
                self._give_place_back(run[0], run[1].agent)  # its pool place is not used
        kept.data = encode_records(records)
        return kept

    def _burst_begins(self) -> None:
        """A burst of starts is under way (a tick and its dispatch, or any dispatch): no
        cyclic GC pass until it ends, since it allocates many small objects per run and a
        collection in the middle of it (up to tens of milliseconds at 10,000 runs) delays
        every run behind it; and records and outcomes wait (:class:`RecordWriter`,
        :meth:`_run_ended_soon`). Bursts can overlap (a manual run during a scheduled
        one): counted."""
        if not self._dispatching:
            gcpause.pause()
            self._dispatch_idle.clear()
        self._dispatching += 1

    def _burst_ends(self) -> None:
        """The last overlapping burst is over: GC back on, deferred outcomes and records."""
        self._dispatching -= 1
        if not self._dispatching:
            self._dispatch_idle.set()
            gcpause.resume()
            self._end_deferred_runs()
            self.records.flush()

    def _prepare_chunk(self, starts: list[tuple[StartRun, Target]]) -> _Chunk:
        """Everything a chunk needs before its runs can start: ids, record bases, requests,
        and its ``dispatched`` records encoded for one write. Its runs count as running from
        here on: a tick while a remote start is in flight must see them (concurrency:
        forbid)."""
        chunk = _Chunk()
        records = []
        for action, target in starts:
            job = action.job
            run_id = run_id_for(job.name, action.scheduled_at, target.agent, action.attempt)
            if action.reason in ("manual", "trigger", "after", "on_change"):
                run_id = run_id_for(job.name, self.clock.time(), target.agent, action.attempt)
            base = self._base(job, action.scheduled_at, target.agent, target.transport,
                              action.attempt, run_id)
            if action.reason != "schedule":
                base["trigger"] = action.reason  # what caused this run besides the schedule
            if target.why:
                base["route"] = target.why
            request = self._request(job, run_id, action.scheduled_at, action.attempt, target.env)
            if action.reason == "schedule" and action.attempt == 1:
                due = action.scheduled_at + jitter_for(job, action.scheduled_at)
                self.metrics.dispatched(self.clock.time() - due)
            chunk.runs.append((action, target, request, base))
            records.append({**base, "record": "dispatched"})
            if target.transport == "tcp":
                self._agent_runs_ending[run_id] = asyncio.get_running_loop().create_future()
            if target.executor is not self.local:
                self._starting[run_id] = (job.name, target.agent)
            self.scheduler.started(job.name, run_id)
        chunk.data = encode_records(records)
        return chunk

    async def _start_chunk(self, chunk: _Chunk, wait: bool = True) -> list[dict[str, Any]]:
        """Start a chunk's runs. Each executor's group starts on its own: local runs here,
        back to back; remote ones (agents, SSH) in a task each, so that one dark host,
        whose start can take its executor's whole start timeout, holds nobody else's
        (with ``wait=False`` not even this call's)."""
        groups: dict[Executor, list[tuple[StartRun, Target, RunRequest, dict[str, Any]]]] = {}
        for run in chunk.runs:
            assert run[1].executor is not None
            groups.setdefault(run[1].executor, []).append(run)
        remote = [self._spawn(self._start_group(executor, runs), name="start")
                  for executor, runs in groups.items() if executor is not self.local]
        results = await self._start_group(self.local, groups[self.local]) \
            if self.local in groups else []
        if wait and remote:
            for done in await asyncio.gather(*remote, return_exceptions=True):
                if isinstance(done, list):
                    results.extend(done)
        return results

    async def _start_group(self, executor: Executor,
                           runs: list[tuple[StartRun, Target, RunRequest, dict[str, Any]]]
                           ) -> list[dict[str, Any]]:
        """Start one executor's runs back to back; the bookkeeping of those that started
        (records, watchers) comes after the last spawn, so no run waits for another's."""
        results: list[dict[str, Any]] = []
        started: list[tuple[StartRun, _Running]] = []
        try:
            handles = await executor.start_many([request for _, _, request, _ in runs])
        finally:
            for _, _, request, _ in runs:
                self._starting.pop(request.run_id, None)
        for (action, target, request, base), handle in zip(runs, handles, strict=True):
            if isinstance(handle, Exception):  # RunRefused, or anything else: recorded
                results.append(self._refused(action, target, request, base, handle))
                continue
            run = _Running(request.run_id, action.job.name, target.agent,
                           action.scheduled_at, action.attempt, handle, base)
            self.running[run.run_id] = run
            started.append((action, run))
        for action, run in started:
            run.timer = self._watch_max_runtime(run, action.job)
            if run.handle.confirmed:  # never a ``started`` the host did not confirm
                self.records.add({**run.base, "record": "started",
                                  "started_at": iso(run.handle.started_at.timestamp())})
            results.append({"run_id": run.run_id, "agent": run.agent, "status": "started"})
            self._watch_run(run, action)
        return results

    def _refused(self, action: StartRun, target: Target, request: RunRequest,
                 base: dict[str, Any], exc: Exception) -> dict[str, Any]:
        """A run that could not start: recorded failed (no ``started`` record), or
        ``no_agent`` when its host was not there to take it (an agent that disconnected
        between routing and sending: nothing failed, nothing to retry)."""
        if not isinstance(exc, RunRefused):
            log.exception("starting run %s of %s failed", request.run_id, request.job)
        reason = str(exc) if isinstance(exc, RunRefused) else f"{type(exc).__name__}: {exc}"
        status = RunStatus.NO_AGENT if isinstance(exc, HostUnavailable) else RunStatus.FAILED
        refused = NoOutcomeRecord(base, status, reason,
                                  finished_at=iso(self.clock.time())).to_json()
        self.records.add(refused)
        self._outcome(action.job.name, refused)
        self._give_place_back(action, target.agent)
        follow = self.scheduler.finished(action.job.name, request.run_id, status,
                                         None, action.scheduled_at, action.attempt,
                                         target.agent, self.clock.time())
        if follow:
            self._spawn(self.perform(follow))
        else:
            self._pump_backfill(action.job.name)
        return refused

    def _watch_run(self, run: _Running, action: StartRun) -> None:
        """Have :meth:`_run_ended` called with the run's outcome (deferred past a burst)."""
        run.handle.on_done(lambda outcome: self._run_ended_soon(run, action, outcome))

    def _run_ended_soon(self, run: _Running, action: StartRun, outcome: RunOutcome) -> None:
        """While a burst is dispatched, its spawns go first: outcomes that arrive meanwhile
        wait for the end of the burst (:meth:`_end_deferred_runs`; also before every tick,
        so the scheduler never decides on a run that has in fact ended)."""
        if self._dispatching:
            self._deferred_ends.append((run, action, outcome))
        else:
            self._run_ended(run, action, outcome)

    def _end_deferred_runs(self) -> None:
        ended, self._deferred_ends = self._deferred_ends, []
        for run, action, outcome in ended:
            self._run_ended(run, action, outcome)

    def _run_ended(self, run: _Running, action: StartRun, outcome: RunOutcome) -> None:
        self.running.pop(run.run_id, None)
        if run.timer is not None:
            run.timer.cancel()
        if run.stop_reason and outcome.status is RunStatus.KILLED and not outcome.reason:
            outcome = replace(outcome, reason=run.stop_reason)
        final = {**run.base, "record": "finished", **outcome_fields(outcome)}
        self.records.add(final)
        self._outcome(run.job, final)
        self._give_place_back(action, run.agent)
        if outcome.status is RunStatus.LOST:
            self.lost_bases[run.run_id] = run.base
        follow = self.scheduler.finished(run.job, run.run_id, outcome.status, outcome.exit_code,
                                         run.slot, run.attempt, run.agent, self.clock.time())
        if follow and not self._stopping.is_set():
            self._spawn(self.perform(follow))
        elif not follow:
            self._pump_backfill(run.job)
        waiter = self._run_waiters.pop(run.run_id, None)
        if waiter is not None:
            waiter.set()
        self._wake.set()

    def _wait_for_place(self, action: StartRun, target: Target) -> dict[str, Any]:
        """The start's pool or agent is full: it waits, and counts as a run of its job
        meanwhile (``concurrency: forbid`` skips the job's next slot as for a running one)."""
        waiting = self.places.wait((action, target), self.clock.time())
        self.scheduler.started(action.job.name, waiting.token)
        return {"job": action.job.name, "agent": target.agent, "status": "waiting",
                "reason": "waiting for a place (its pool or agent is full)"}

    def _give_place_back(self, action: StartRun, agent: str) -> None:
        """A run's outcome is known: its pool and agent places go to the oldest waiting
        starts that fit (dispatched at once)."""
        if not self.places.needs_place(action.job, agent):
            return
        admitted = self.places.release(action.job, agent)
        if admitted and not self._stopping.is_set():
            self._spawn(self._dispatch_admitted(admitted))

    async def _dispatch_admitted(self, admitted: list[Waiting]) -> None:
        """Dispatch starts that got their places; each stops counting as waiting once its
        real run counts (from ``_prepare_chunk`` on)."""
        try:
            await self._dispatch([waiting.start for waiting in admitted])
        finally:
            follow: list[Action] = []
            for waiting in admitted:
                follow.extend(self.scheduler.forget_run(waiting.job.name, waiting.token,
                                                        self.clock.time()))
            if follow and not self._stopping.is_set():
                await self.perform(follow)

    def _write_places(self, now: float) -> None:
        """``places.json`` for ``status``: when pools or caps exist and their use moved, at
        most once a second."""
        if (self.pool_caps or self.places.agent_caps) and self.places.version != self._places_written \
                and now - self._places_written_at >= 1.0:
            self._places_written, self._places_written_at = self.places.version, now
            with contextlib.suppress(OSError):
                write_places_file(self.state_dir, self.places.snapshot(self.pool_caps, now))

    def _expire_waiting(self, now: float) -> None:
        """Starts that waited for a place past their deadline: recorded ``missed``."""
        follow: list[Action] = []
        for waiting in self.places.expired(now):
            job = waiting.job
            reason = waiting.missed_reason(self.places.agent_caps.get(waiting.agent), iso)
            self._record_slot(RecordSlot(job, waiting.scheduled_at, RunStatus.MISSED, reason,
                                         attempt=waiting.start[0].attempt))
            follow.extend(self.scheduler.finished(
                job.name, waiting.token, RunStatus.MISSED, None, waiting.scheduled_at,
                waiting.start[0].attempt, waiting.agent, now))
        if follow:
            self._spawn(self.perform(follow))
        for name in self.backfills.jobs():
            self._pump_backfill(name)

    def _stop_runs(self, job: str, reason: str) -> int:
        """Stop every run of ``job`` (recorded ``killed`` with ``reason``); how many."""
        runs = [r for r in self.running.values() if r.job == job]
        for run in runs:
            run.stop_reason = reason
            self._spawn(run.handle.stop(reason))
        return len(runs)

    def _record_slot(self, action: RecordSlot, agent: str | None = None) -> dict[str, Any]:
        """The record of a slot that does not run: for ``agent`` when given, else for
        what the job targets (its one target, or the names and labels it asked for)."""
        job = action.job
        if agent is not None:
            transport = None
        elif job.targets.is_local_only:
            agent, transport = LOCAL_AGENT, "local"
        else:  # no single target: name what the job asked for; no transport was used
            wanted = list(job.targets.agents) + [f"{k}={v}" for k, v in job.targets.labels]
            agent, transport = ",".join(wanted), None
        run_id = run_id_for(job.name, action.scheduled_at, agent, 0) + "-" + action.status.value
        extra: tuple[tuple[str, Any], ...] = ()
        if action.count > 1 or action.last_scheduled_at not in (None, action.scheduled_at):
            extra = (("count", action.count), ("first_scheduled_at", iso(action.scheduled_at)),
                     ("last_scheduled_at", iso(action.last_scheduled_at)))
        record = NoOutcomeRecord(
            self._base(job, action.scheduled_at, agent, transport, action.attempt, run_id),
            action.status, action.reason, extra=extra).to_json()
        self.records.add(record)
        self._outcome(job.name, record)
        return record

    # ------------------------------------------------------------------ restarts

    def _retention_refusal(self, state: DesiredState | None) -> str | None:
        """Why ``--retention`` is too short for the jobs this center will run, if it is."""
        if state is None:
            with contextlib.suppress(StateFileError):
                state = read_applied(self.state_dir)
        if state is None:
            return None
        return check_retention(parse_retention(self.options.retention), self.options.retention,
                               state.jobs.values(), self.clock.time())

    def _recover_ledger(self) -> None:
        """Runs the previous center left in flight are ``lost``; remember handled slots.
        From the ledger's summary: nothing here reads old history."""
        found = recover_summary(self._history)
        self.done_slots |= found.done_slots
        self.missed_until.update(found.missed_until)
        for job, ended in found.last_success.items():
            self.last_success[job] = max(self.last_success.get(job, 0.0), ended)
        self._awaiting_agents.update(found.awaiting_agents)
        self._recovered = found
        if found.lost:
            self.ledger.append_runs(found.lost)

    def _requeue_pending(self) -> None:
        """What the previous center had queued but not started when it stopped is queued
        again, at the time it was due (at once when that has passed): see
        :func:`~cronfile.center.recovery.pending_starts`. Anything older than the slot
        memory (6 h) is dropped: a retry or a triggered run days late would surprise more
        than help."""
        found, self._recovered = self._recovered, Recovery()
        triggered_jobs = self.desired is not None and any(
            job.trigger is not None for job in self.desired.jobs.values())
        # the triggered events of the last hours, from the ledger's summary
        events = self._history.triggered if triggered_jobs else ()
        for start in pending_starts(found, events, self.clock.time() - SLOT_MEMORY_S,
                                    self.scheduler.has_job):
            if isinstance(start, RequeueTrigger):
                self.scheduler.requeue_trigger(start.job, start.due)
            else:
                self.scheduler.finished(start.job, start.run_id, start.status, start.exit_code,
                                        start.slot, start.attempt, start.agent, start.ended)

    async def _housekeeping(self) -> None:
        """Once a minute: forget handled slots older than any start can be (the ledger
        keeps them; memory need not), and give up on agents that never came back."""
        lease = self.options.lease_s
        began = self.clock.time()
        while True:
            await asyncio.sleep(min(60.0, lease))
            now = self.clock.time()
            horizon = now - SLOT_MEMORY_S
            self.done_slots = {k for k in self.done_slots if k[1] >= horizon}
            if self._awaiting_agents and now - began >= lease:
                expired, self._awaiting_agents = self._awaiting_agents, {}
                for base in expired.values():
                    self.lost_bases[str(base["run_id"])] = base
                    record = NoOutcomeRecord(
                        base, RunStatus.LOST,
                        f"agent {base.get('agent')} did not report this run within "
                        f"{lease:g}s of the center's restart").to_json()
                    self.records.add(record)
                    self._outcome(str(base.get("job")), record)

    async def _catch_up(self, since: float) -> None:
        """Record (or run, ``catch_up: latest``) the slots the previous center did not
        handle. Under ``all``/``shard`` a slot is handled only when every target has it: a
        center killed between the targets of one slot leaves the rest of it missing, and
        those targets get their own ``missed``."""
        now = self.clock.time()
        actions: list[Action] = []
        done_by_job: dict[str, dict[float, set[str]]] = {}
        for job_name, slot, agent in self.done_slots:
            done_by_job.setdefault(job_name, {}).setdefault(slot, set()).add(agent)
        for name in self.scheduler.job_names():
            job = self.scheduler.job(name)
            handled = done_by_job.get(name, {})
            # a center killed before its first watermark already recorded part of the outage
            job_since = max(since, self.missed_until.get(name, since))
            done = set(handled)
            if job is not None and job.targets.strategy in (Strategy.ALL, Strategy.SHARD) \
                    and not job.targets.is_local_only:
                expected = set(self.router.candidates(job))
                for slot, agents in sorted(handled.items()):
                    if job_since < slot <= now and not expected <= agents:
                        for agent in sorted(expected - agents):
                            self._record_slot(RecordSlot(
                                job, slot, RunStatus.MISSED,
                                "the center stopped before it recorded this target's start"),
                                agent=agent)
            actions.extend(self.scheduler.catch_up(name, job_since, now, done))
        if actions:
            await self.perform(actions, wait=False)

    def _read_watermark(self) -> float | None:
        """How far the previous center got (see :func:`~cronfile.center.statefiles.read_watermark`)."""
        return read_watermark(self.state_dir, self._history.last_ts)

    def _watermark_mark(self) -> float | None:
        """Every slot up to the mark was handed to perform(): the last tick's time (not the
        clock's: a tick that stalled handled nothing after it), held below starts that
        wait (delayed, parked)."""
        if self._last_tick is None:
            return None
        floors = [f - 0.001 for f in (self.scheduler.pending_start_floor(),
                                      min((a.scheduled_at for a in self._parked), default=None))
                  if f is not None]
        return min([self._last_tick, *floors])

    def _write_watermark(self) -> None:
        """Move the watermark, at most once a second. The records queued so far go in the
        same step on the writer thread, first: the mark is written only if they are
        durable and no earlier batch failed (a full disk), so it never passes a slot
        whose record is not on disk."""
        now = self.clock.time()
        mark = self._watermark_mark()
        if mark is None or now - self._last_watermark < 1.0:
            return
        self._last_watermark = now
        batch = self.records.take()
        data = encode_records(batch) if batch else b""
        loop = asyncio.get_running_loop()

        def records_then_mark() -> None:
            if data:
                self.ledger.write_runs(data)
            if not self._failed_batches:
                try:
                    write_watermark(self.state_dir, mark)
                except OSError as exc:  # the records are written: only the mark waits
                    log.error("cannot write the watermark: %s", exc)

        def written(done: Future[Any]) -> None:
            if done.exception() is not None and batch:
                self._failed_batches += 1
                loop.call_soon_threadsafe(self._append_failed, batch, done.exception())
            elif batch:
                loop.call_soon_threadsafe(self._finals_written, batch)

        self.ledger.submit(records_then_mark).add_done_callback(written)


def reconnect_grace_s(options: CenterOptions) -> float:
    """How long after a restart a start waits for an agent that was connected before:
    agents notice the restart at once and reconnect after a short random backoff; a few
    heartbeats bound it, and never more than 30 s."""
    return min(max(3 * options.heartbeat_s, 3.0), 30.0)


def return_free_memory() -> None:
    """Ask glibc to return freed heap pages to the system (``malloc_trim``).

    Loading 100,000 jobs allocates and frees hundreds of megabytes of small objects, in a
    worker thread's malloc arena; without this the freed pages stay in the center's RSS.
    ctypes releases the GIL for the call, so the event loop keeps running. Elsewhere than
    glibc this does nothing."""
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return
    trim(0)


def _raise_fd_limit() -> None:
    """Each run in flight holds a pipe and a pidfd: 10,000 runs due at once need more than
    the usual soft limit of 1,024 descriptors, so take what the hard limit allows."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY
                                                        else 1 << 20, hard))


def run_center(options: CenterOptions) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    _raise_fd_limit()
    center = Center(options)
    try:
        return asyncio.run(center.run_until_stopped())
    except CenterError as exc:
        log.error("%s", exc)
        return 1
    except KeyboardInterrupt:
        return 130


__all__ = ["Center", "CenterError", "CenterOptions", "RunState", "Target", "run_center"]
