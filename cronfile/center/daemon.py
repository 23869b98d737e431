"""``cronfile center``: the daemon that schedules, dispatches and records.

:class:`Center` wires the parts together and owns the life cycle (:class:`RunState`):

* the desired state comes from :class:`~cronfile.schedules.loader.ScheduleLoader` (hot-reloaded by
  :mod:`watchfiles` and SIGHUP through ONE path, :class:`~cronfile.center.reload.Reloader`);
* timing decisions come from :class:`~cronfile.center.scheduler.Scheduler` (pure, clock-driven);
* :class:`~cronfile.center.dispatch.Dispatcher` turns its actions into runs (routed by
  :class:`~cronfile.center.routing.Router`) and their ends into records;
* :class:`~cronfile.center.outcomes.Outcomes` handles every final outcome (log, metrics,
  alerts, late agent outcomes); :class:`~cronfile.center.journal.Journal` writes every
  record, event and the watermark into :class:`~cronfile.state.ledger.Ledger`;
* :class:`~cronfile.center.startup.Restart` recovers from the previous center;
  :class:`~cronfile.center.operations.CenterOperations` serves the control socket and HTTP.

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
import logging
import os
import signal
from typing import TYPE_CHECKING, Any

from cronfile import gcpause
from cronfile.center.agentreports import AgentReports
from cronfile.center.agents import start_hub, sync_agent_daemons, write_agents_file
from cronfile.center.alerts import Notifier
from cronfile.center.backfill import BackfillQueue
from cronfile.center.burst import Burst
from cronfile.center.control import ControlServer, ControlSocketError
from cronfile.center.counters import RunMetrics
from cronfile.center.dispatch import Dispatcher
from cronfile.center.gitsync import GitError, GitFollower
from cronfile.center.journal import Journal
from cronfile.center.localdaemons import LocalDaemons
from cronfile.center.operations import CenterOperations
from cronfile.center.options import CenterOptions
from cronfile.center.outcomes import Outcomes
from cronfile.center.parking import Parking, reconnect_grace_s
from cronfile.center.pools import PlaceGate
from cronfile.center.records import run_id_for
from cronfile.center.reload import Reloader
from cronfile.center.routing import Router, Target
from cronfile.center.scheduler import Scheduler
from cronfile.center.startup import Restart, retention_refusal
from cronfile.center.statefiles import (
    CENTER_FILE,
    CenterError,
    lock_state_dir,
    read_known_agents,
    read_watermark,
    reserve_space,
    write_center_file,
)
from cronfile.center.ticker import Ticker
from cronfile.clock import Clock, SystemClock
from cronfile.schedules.diff import StateDiff, diff_states
from cronfile.schedules.loader import ScheduleLoader
from cronfile.schedules.model import DesiredState, Job, JobKind, OnChange
from cronfile.state.applied import StateFileError, read_applied
from cronfile.state.ledger import Ledger, utc_ts
from cronfile.state.private import private_dir
from cronfile.state.retention import parse_retention
from cronfile.transports.hub import AgentHub
from cronfile.transports.local import LocalExecutor
from cronfile.transports.protocol import SecretsError

if TYPE_CHECKING:
    from cronfile.center.http import HttpServer
    from cronfile.center.standby import HaCoordinator

log = logging.getLogger("cronfile.center")


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
        self.clock = clock = clock or SystemClock()
        self.state_dir = options.state
        self.ledger = Ledger(options.state, segment_bytes=options.segment_bytes,
                             retention_s=parse_retention(options.retention),
                             retention_text=options.retention)
        self.loader = ScheduleLoader(options.schedules)
        self.scheduler = Scheduler()
        self.local = LocalExecutor(state_dir=options.state.resolve())
        self.desired: DesiredState | None = None
        self.metrics = RunMetrics()
        self.burst = Burst()
        self.journal = journal = Journal(self.ledger, options.state, self.metrics,
                                         self.burst.active)
        self.records = journal.records
        self.ha: HaCoordinator | None = None
        if options.ha is not None:  # only then: importing psycopg costs a center's start ~0.3 s
            from cronfile.center.standby import HaCoordinator
            self.ha = HaCoordinator(options.ha, self._ha_event)
        journal.ha = self.ha
        self.notifier = Notifier(self.local, journal.event)
        self.outcomes = Outcomes(journal, self.notifier, self.metrics, clock, self._job_of,
                                 options.log_runs)
        self._started_iso = utc_ts()
        self.hub: AgentHub | None = None  # the agent hub, when agents are enabled
        self.router = Router(self.local, options.known_hosts, self._spawn)
        self.places = PlaceGate()  # pools and agent caps (see cronfile.center.pools)
        self.pool_caps: dict[str, int] = {}  # the pools the jobs use, for status
        self.backfills = BackfillQueue()  # slots `cronfile backfill` still has to run
        self.parking = Parking()  # starts waiting for an agent to reconnect after a restart
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self.dispatcher = Dispatcher(
            clock=clock, scheduler=self.scheduler, router=self.router, local=self.local,
            journal=journal, outcomes=self.outcomes, notifier=self.notifier,
            metrics=self.metrics, burst=self.burst, places=self.places, parking=self.parking,
            backfills=self.backfills, spawn=self._spawn, revision=self._revision,
            stopping=self._stopping, wake=self._wake)
        self.dispatcher.ha = self.ha
        self.daemons = LocalDaemons(self.local, clock, self._spawn, self._revision,
                                    self.outcomes.record)
        self.restart = Restart(self.ledger, clock, self.scheduler, self.router, self.dispatcher,
                               self.outcomes, journal, options.lease_s)
        self.agent_reports = AgentReports(journal, options.state, lambda: self.hub, self.parking,
                                          self._wake, self.outcomes, self.restart, self.ha,
                                          options.lease_s)
        # A load or a reload frees most of what it allocated: give it back to the system.
        self.reloads = Reloader(self.loader, options.state, lambda: self.desired,
                                lambda state, diff: self._apply(state, diff=diff),
                                journal.event, self._spawn, after_store=return_free_memory)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._signals = 0
        self._crash_cause: str | None = None  # why a core task died, for center_stopped
        self.state = RunState.STARTING
        self._lock: int | None = None
        self.http: HttpServer | None = None
        self.git = None if options.git is None else GitFollower(
            options.git, options.state, self.reloads.reload,
            lambda: self._revision().get("git_commit"), journal.event)
        self.operations = CenterOperations(
            state_dir=options.state, clock=clock, scheduler=self.scheduler,
            dispatcher=self.dispatcher, journal=journal, outcomes=self.outcomes,
            backfills=self.backfills, reloads=self.reloads, git=self.git, ha=self.ha,
            metrics=self.metrics, burst=self.burst, spawn=self._spawn,
            desired=lambda: self.desired, revision=self._revision, hub=lambda: self.hub,
            wake=self._wake)
        self._center_file_view: dict[str, Any] | None = None  # what center.json says of HA
        self.ticker = Ticker(
            clock=clock, scheduler=self.scheduler, dispatcher=self.dispatcher, journal=journal,
            outcomes=self.outcomes, places=self.places, parking=self.parking, ha=self.ha,
            state_dir=options.state, hub=lambda: self.hub, pool_caps=lambda: self.pool_caps,
            ha_view_changed=self._ha_view_changed, write_center_file=self._write_center_file,
            wake=self._wake, stopping=self._stopping)

    def _revision(self) -> dict[str, Any]:
        return self.desired.revision.to_dict() if self.desired else {}

    def _job_of(self, name: str) -> Job | None:
        return self.desired.jobs.get(name) if self.desired else None

    def _ha_event(self, event: dict[str, Any]) -> None:
        """leader_acquired / leader_released / leader_lost: recorded, shown in center.json;
        a takeover recovers the gap as a restart would (SPEC §9)."""
        fields = dict(event)
        self.journal.event(str(fields.pop("event")), **fields)
        self._write_center_file()
        if event["event"] == "leader_acquired" and self.ha is not None:
            # At once, before any tick as the leader (see Restart.handed_over).
            self.restart.handed_over(self.ticker.standby_tick)
            self._spawn(self.restart.take_over(self.ha, self.desired), critical=True)

    def _ha_view_changed(self) -> bool:
        return self.ha is not None and self.ha.view() != self._center_file_view

    def _write_center_file(self) -> None:
        self._center_file_view = self.ha.view() if self.ha is not None else None
        write_center_file(self.state_dir, self.options, self._started_iso, ha=self._center_file_view)

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
        refusal = retention_refusal(self.options, first.state, self.clock.time())
        if refusal:
            log.error("%s", refusal)
            return 2
        reserve_space(self.state_dir)
        dropped = self.ledger.open()
        self.restart.history = self.ledger.recover()  # the checkpoint and what followed it
        # Read how far the previous center got BEFORE this one writes anything: the
        # fallback (no watermark file) is the logs' last timestamp.
        since = read_watermark(self.state_dir, self.restart.history.last_ts)
        self.ticker.last_tick = since
        known_agents = read_known_agents(self.state_dir)
        if any(dropped.values()):
            self.journal.event("ledger_repaired", dropped_bytes=dropped)
        if self.ha is not None:
            await asyncio.to_thread(self.ha.prepare)
        self._write_center_file()
        self.journal.event("center_started", pid=os.getpid(), schedules=str(self.options.schedules),
                           listen=self.options.listen)
        if self.ha is None:  # an HA center recovers when it leads, from PostgreSQL
            self.restart.recover_ledger()
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
                self.journal.event("center_stopped", reason="invalid_schedules", pid=os.getpid())
                self.ledger.close()
                with contextlib.suppress(OSError):
                    (self.state_dir / CENTER_FILE).unlink()
                return 1
            self._apply(previous, initial=True)
        else:
            self._apply(first.state, initial=True)
        if self.ha is None:
            self.restart.requeue_pending(self.desired)
        self._install_signals()
        await self._start_services()
        if self.hub is not None and self.desired is not None:
            self.parking.expect((n for n in known_agents if n in self.desired.agents),
                                self.clock.time() + reconnect_grace_s(self.options))
        if self.ha is not None:
            self._spawn(self.ha.run(), critical=True, name="ha")
        elif since is not None:
            # At once, before the first tick can move the watermark: a center killed
            # before its catch-up is durable must leave the outage to its successor. Starts
            # that need an agent not back yet wait for it (bounded: see Parking).
            await self.restart.catch_up(since)
            self.records.flush()
        self._spawn(self.ticker.run(), critical=True)
        if self.options.watch:
            self._spawn(self.reloads.watch(self.options.schedules, self._stopping), critical=True)
        self._spawn(self.reloads.run(), critical=True)
        if self.git is not None:
            self._spawn(self.git.run(self._stopping), critical=True)
        self._spawn(self.restart.housekeeping(self.options.lease_s), critical=True)
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
        self.control = ControlServer(self.state_dir, self.operations)
        try:
            await self.control.start()
        except ControlSocketError as exc:
            raise CenterError(str(exc)) from None
        if self.options.listen:
            try:
                self.hub = await start_hub(self.options, self.router.inventory, self.agent_reports, self.ha,
                                           self.journal.event)
            except SecretsError as exc:  # names the file and line, never a secret
                raise CenterError(str(exc)) from None
            self.router.directory = self.hub
            write_agents_file(self.state_dir, self.hub)
            if self.desired is not None:
                await sync_agent_daemons(self.hub, self.desired, self.router)
        if self.options.http is not None:
            from cronfile.center.http import HttpServer

            self.http = HttpServer(self.operations, self.options.http)
            await self.http.start()

    # ------------------------------------------------------------------ stopping

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
                for run in self.dispatcher.running.values():
                    with contextlib.suppress(Exception):
                        run.handle.kill_now()
                self.daemons.kill_now()
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
        running = self.dispatcher.running
        # Runs on agents keep going: the agent stores their outcomes and the next center
        # records them. Runs of this process (local, and SSH sessions it holds) get the
        # grace period, then are stopped, all at once.
        ours = [r for r in running.values() if r.base.get("transport") != "tcp"]
        if ours:
            _, pending = await asyncio.wait([asyncio.ensure_future(r.handle.wait()) for r in ours],
                                            timeout=grace)
            left = [r for r in ours if r.run_id in running]
            for run in left:
                run.stop_reason = "center shutting down"
            if left:
                stops = [r.handle.stop("center shutting down", grace_s=min(grace, 5.0)) for r in left]
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.gather(*stops, return_exceptions=True),
                                           timeout=min(grace, 5.0) + 5)
        await self.daemons.stop_all(grace)
        daemon_tasks = [t for t in self._tasks if t.get_name() == "daemon"]
        if daemon_tasks:
            await asyncio.wait(daemon_tasks, timeout=grace + 5)
        await asyncio.sleep(0)  # let run watchers record their outcomes
        for _ in range(50):
            if not any(r.base.get("transport") != "tcp" for r in running.values()):
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
        # Last: the queued records, the watermark (as far as the last tick got, not the
        # clock), center_stopped.
        await self.journal.last_writes(self._stopped_event, self.ticker.watermark_mark)
        if self.ha is not None:
            await self.ha.close()
        await asyncio.to_thread(self.ledger.close)  # drains the writer, leaves a checkpoint
        with contextlib.suppress(OSError):
            (self.state_dir / CENTER_FILE).unlink()

    def _stopped_event(self) -> dict[str, Any]:
        fields: dict[str, Any] = {"reason": "crashed" if self.state is RunState.CRASHED else "signal"}
        if self._crash_cause:
            fields["error"] = self._crash_cause
        return {"event": "center_stopped", **fields, "pid": os.getpid(),
                "agent_runs_left": sum(1 for r in self.dispatcher.running.values()
                                       if r.base.get("transport") == "tcp")}

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
        watch = self.outcomes.success_watch
        for name in diff.jobs.removed:
            self.places.forget_job(name)  # its waiting starts will not run
            self.backfills.forget(name)
            watch.discard(name)
            self.scheduler.remove_job(name)
            self.daemons.stop(name)
            if old is not None and old.jobs[name].on_change is OnChange.RESTART:
                self.dispatcher.stop_runs(name, "job removed (on_change: restart)")
        # Many small objects per job and none freed: the cyclic GC would rescan the growing
        # heap again and again for nothing (seconds for 100,000 jobs).
        with gcpause.paused():
            for name in (*diff.jobs.added, *diff.jobs.changed_names):
                job = state.jobs[name]
                self.scheduler.set_job(job, now)
                if job.expect.success_within_s is not None:
                    watch.add(name)
                else:
                    watch.discard(name)
                if job.kind is JobKind.DAEMON and job.targets.is_local_only and not job.suspend:
                    self.daemons.restart(job)
                else:
                    self.daemons.stop(name)
                restart = name in diff.jobs.changed_names and job.on_change is OnChange.RESTART
                if restart and job.kind is JobKind.CRON \
                        and self.dispatcher.stop_runs(name, "job changed (on_change: restart)"):
                    self._spawn(self.dispatcher.perform(self.scheduler.run_now(name, now, "on_change")))
        if initial and len(state.jobs) >= 1000:
            # A large desired state lives on: moved out of the GC's generations, later
            # collections (e.g. while reloading) do not walk its objects again and again.
            gc.freeze()
        if self.hub is not None:
            with contextlib.suppress(Exception):
                self.hub.update_inventory(state.agents)
            self._spawn(sync_agent_daemons(self.hub, state, self.router))
        self.journal.event("revision_applied", revision=state.revision.to_dict(),
                           initial=initial, diff=diff.summary())
        self.reloads.store_applied(state)
        self._wake.set()


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


__all__ = ["Center", "CenterError", "CenterOptions", "RunState", "Target", "run_center",
           "run_id_for"]
