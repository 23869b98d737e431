"""The built-in ``local`` transport: each run is a child process of the center (or agent).

Design notes, the reasons beside the choices:

* **No thread per child.** ``asyncio.create_subprocess_exec`` in Python 3.11 uses the
  ``ThreadedChildWatcher``, which parks one thread in ``waitpid`` per child; a center running
  hundreds of jobs would run hundreds of threads. We spawn with ``os.posix_spawn`` when it
  can do exactly what :class:`subprocess.Popen` would (no ``workdir``, no user switch, a
  command given by path: see :func:`_can_posix_spawn`), else with Popen (``vfork`` too);
  a batch of runs (:meth:`LocalExecutor.start_many`) is spawned back to back and watched
  after. We learn about the exit from a pidfd registered with ``loop.add_reader`` and then
  reap with ``os.waitpid(pid, WNOHANG)``; the output pipe is read the same way, all with
  callbacks (no task per run). The event loop's one epoll set watches every run.
* **One process group per run** (a new session, so also no controlling terminal). Timeouts and
  stops signal the whole group: SIGTERM, then SIGKILL after the grace period, as supercronic
  and trio do. When the main process exits by itself, anything it left behind in its group
  (``sleep 1000 &``) is stopped the same way, like systemd's ``KillMode=control-group``: a run
  that "finished" must not leave processes running that nobody tracks.
* **One pipe for stdout and stderr.** Both file descriptors of the child point at the same
  pipe, so the tail keeps the interleaving the job produced, and one reader suffices. Only the
  last ``output_keep`` bytes are kept (a rolling window), so a job writing 100 MB costs no
  memory; the tail is decoded as UTF-8 with replacement and never parsed.
* **Secrets, environment, masking** follow :mod:`cronfile.transports.secrets`, the one
  implementation every transport shares: a job gets a minimal base environment (``HOME``,
  ``USER``, ``LOGNAME``, ``SHELL``, ``PATH``, ``LANG``) plus its ``env`` and the ``CRONFILE_*``
  variables, never the executor's whole environment; secrets are resolved here, at run time,
  as the job's user, and masked as ``***`` in the output tail and in every message.
* **Refusals.** A run that cannot start at all (missing workdir, unknown user, unresolvable
  secret, argv command not found or not executable) raises :class:`RunRefused` from
  :meth:`LocalExecutor.start` and nothing is spawned. A *string* command runs under
  ``/bin/sh -c``; if the shell cannot find the program, that is the shell's exit code 127 and
  the run is ``failed`` with ``exit_code`` 127 (the shell's own message is in the tail).
* **Working directory.** ``workdir`` when given; with ``run_as`` and no ``workdir``, the user's
  home (or ``/`` when it does not exist), as cron does; otherwise the executor's own. A run
  that switches users enters its ``workdir`` AFTER dropping privileges (through a fixed
  ``/bin/sh`` prelude, ``cd -- WORKDIR && exec "$@"``): Popen changes directory before it
  changes user, which would let a ``nobody`` job start inside a directory only root can
  enter. A directory the user cannot enter fails the run (the shell's message in the tail).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import signal
import subprocess
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

from cronfile.schedules.model import RunStatus
from cronfile.transports.executor import (
    Executor,
    ExecutorInfo,
    RunHandle,
    RunOutcome,
    RunRefused,
    RunRequest,
)
from cronfile.transports.secrets import (
    NO_SECRETS,
    REDACTED,
    RUN_AS_PATH,
    OutputTail,
    Redactor,
    base_env,
    cronfile_vars,
    resolve_env,
)

__all__ = [
    "REDACTED",
    "RUN_AS_PATH",
    "LocalExecutor",
    "LocalRunHandle",
    "OutputTail",
    "Redactor",
    "process_group_alive",
]


_READ_CHUNK = 64 * 1024
# A job that writes as fast as we read would otherwise keep one reader callback looping
# forever; after this many chunks we yield and let epoll call us again.
_MAX_CHUNKS_PER_WAKEUP = 16
# After SIGKILL processes die at once unless stuck in the kernel; we do not wait long for that.
_AFTER_KILL_WAIT_S = 1.0
# Without pidfds (Linux < 5.3) we poll for the exit this often.
_EXIT_POLL_S = 0.05


def _now() -> datetime:
    return datetime.now(UTC)


# --------------------------------------------------------------------------------------------
# Preparing a run: argv, user, environment, working directory
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Prepared:
    """Everything resolved before spawning, so a refusal happens before any fork."""

    argv: list[str]
    env: dict[bytes, bytes]
    cwd: str | None
    user: pwd.struct_passwd | None
    switch_user: bool
    redactor: Redactor


def _argv(command: tuple[str, ...] | str) -> list[str]:
    if isinstance(command, str):
        if not command.strip():
            raise RunRefused("empty command")
        return ["/bin/sh", "-c", command]
    if not command or not command[0]:
        raise RunRefused("empty command")
    return list(command)


def _lookup_user(name: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        pass
    if name.isdigit():
        with contextlib.suppress(KeyError):
            return pwd.getpwuid(int(name))
    raise RunRefused(f"run_as: unknown user {name}")


def _check_can_switch(user: pwd.struct_passwd) -> bool:
    """Whether the spawn must change uid/gid/groups; refuse when we are not allowed to."""
    euid = os.geteuid()
    if euid == 0:
        return user.pw_uid != 0
    if user.pw_uid == euid:
        return False  # already that user: setgroups would fail with EPERM for nothing
    raise RunRefused(
        f"run_as {user.pw_name}: the executor runs as uid {euid} and cannot switch users"
    )


def _encode_env(env: Mapping[str, str]) -> dict[bytes, bytes]:
    return {os.fsencode(k): os.fsencode(v) for k, v in env.items()}


_CD_THEN_EXEC = 'cd -- "$1" || exit 126; shift; exec "$@"'
"""Entering the workdir as the job's user (fixed text, never formatted): ``$1`` is the
directory, the rest the job's argv."""


def _workdir(workdir: str | None, user: pwd.struct_passwd | None) -> str | None:
    if workdir:
        if not os.path.exists(workdir):
            raise RunRefused(f"workdir {workdir} does not exist")
        if not os.path.isdir(workdir):
            raise RunRefused(f"workdir {workdir} is not a directory")
        return workdir
    if user is not None:
        return user.pw_dir if os.path.isdir(user.pw_dir) else "/"
    return None


# --------------------------------------------------------------------------------------------
# Process groups
# --------------------------------------------------------------------------------------------


def process_group_alive(pgid: int) -> bool:
    """Whether a live (non-zombie) process is still in the group.

    ``killpg(pgid, 0)`` alone also counts zombies: orphans that init has not reaped yet (some
    container inits reap lazily) would look alive until the grace period runs out. Only when
    the signal probe says "something is there" do we look at ``/proc`` to tell zombies apart,
    so the common case (the group is empty) costs one syscall.
    """
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return _live_member_in_proc(pgid)


def _live_member_in_proc(pgid: int) -> bool:
    try:
        entries = os.listdir("/proc")
    except OSError:
        return True  # cannot tell: assume alive and let the escalation deadlines decide
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # "pid (comm) state ppid pgrp ...": comm may contain spaces and parentheses.
        fields = stat[stat.rfind(b")") + 2 :].split()
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] not in (b"Z", b"X"):
            return True
    return False


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _decode_wait_status(status: int | None) -> tuple[int | None, int | None]:
    """``(exit_code, signal)`` from a raw wait status."""
    if status is None:
        return None, None
    if os.WIFSIGNALED(status):
        return None, os.WTERMSIG(status)
    return os.WEXITSTATUS(status), None


def _signal_name(num: int) -> str:
    try:
        return signal.Signals(num).name
    except ValueError:
        return f"signal {num}"


# --------------------------------------------------------------------------------------------
# The run handle
# --------------------------------------------------------------------------------------------


class LocalRunHandle(RunHandle):
    """One child process (and its process group) being watched by the event loop."""

    pid: int

    def __init__(
        self,
        request: RunRequest,
        pid: int,
        proc: subprocess.Popen[bytes] | None,
        out_fd: int,
        redactor: Redactor,
        started_at: datetime,
    ) -> None:
        self.run_id = request.run_id
        self.started_at = started_at
        self.pid = pid
        self.pgid = pid  # it is the leader of its own session and group
        self._request = request
        self._proc = proc
        self._loop = asyncio.get_running_loop()
        self._redactor = redactor
        self._tail = OutputTail(request.output_keep, redactor.margin)
        self._out_fd: int | None = out_fd
        self._pidfd: int | None = None
        self._eof: asyncio.Future[None] = self._loop.create_future()
        self._exited: asyncio.Future[int | None] = self._loop.create_future()
        self._done: asyncio.Future[RunOutcome] = self._loop.create_future()
        self._ended_by: tuple[RunStatus, str] | None = None
        self._term_deadline: float | None = None
        self._finished_at: datetime | None = None
        self._strays = False
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._spawned_at = self._loop.time()  # the timeout counts from here, not from _begin

    # -- public API ------------------------------------------------------------------------

    async def wait(self) -> RunOutcome:
        # shield: a waiter being cancelled must not cancel the outcome other waiters share.
        return await asyncio.shield(self._done)

    def kill_now(self) -> None:
        if not self._done.done():
            _signal_group(self.pgid, signal.SIGKILL)

    async def stop(self, reason: str = "stopped", grace_s: float | None = None) -> None:
        grace = self._request.kill_grace_s if grace_s is None else grace_s
        self._end(RunStatus.KILLED, reason, grace)
        await self.wait()

    def done(self) -> bool:
        return self._done.done()

    def add_done_callback(self, callback: Callable[[LocalRunHandle], None]) -> None:
        self._done.add_done_callback(lambda _fut: callback(self))

    def on_done(self, callback: Callable[[RunOutcome], None]) -> None:
        self._done.add_done_callback(lambda done: callback(done.result()))

    # -- start -----------------------------------------------------------------------------

    def _begin(self) -> None:
        """Watch the pipe and the exit with callbacks only: no task per run (a burst of
        thousands of runs would otherwise create and switch thousands of tasks while it is
        still spawning). A task is made only on the slow path of :meth:`_conclude`."""
        self._watch_output()
        self._watch_exit()
        if self._request.timeout_s is not None:
            self._timer = self._loop.call_at(self._spawned_at + self._request.timeout_s,
                                             self._on_timeout)

    def _spawn_task(self, coro: Coroutine[Any, Any, None]) -> None:
        task = self._loop.create_task(coro)
        self._tasks.add(task)  # the loop keeps only weak references to tasks
        task.add_done_callback(self._tasks.discard)

    # -- exit ------------------------------------------------------------------------------

    def _watch_exit(self) -> None:
        try:
            self._pidfd = os.pidfd_open(self.pid)
        except OSError:  # Linux < 5.3: poll instead
            self._poll_exit()
            return
        self._loop.add_reader(self._pidfd, self._on_pidfd)

    def _on_pidfd(self) -> None:
        if self._try_reap():
            self._close_pidfd()

    def _close_pidfd(self) -> None:
        if self._pidfd is not None:
            self._loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None

    def _poll_exit(self) -> None:
        if not self._try_reap():
            self._loop.call_later(_EXIT_POLL_S, self._poll_exit)

    def _try_reap(self) -> bool:
        """Reap the main process if it has exited; True once it has."""
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            # Someone else reaped it (a waitpid(-1) elsewhere in the process): status unknown.
            self._record_exit(None)
            return True
        if pid == 0:
            return False
        self._record_exit(status)
        return True

    def _record_exit(self, status: int | None) -> None:
        self._finished_at = _now()
        if self._proc is not None:  # tell Popen, or its __del__ would think it still runs
            self._proc.returncode = os.waitstatus_to_exitcode(status) if status is not None else -1
        if not self._exited.done():
            self._exited.set_result(status)
            self._conclude(status)

    def _conclude(self, status: int | None) -> None:
        """The main process has exited. Common case, settled right here: nothing is left in
        its group and the pipe drains to EOF now. Otherwise (strays to stop, or something
        still holds the pipe) a task takes the slow path, :meth:`_supervise`."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        try:
            if not process_group_alive(self.pgid):
                self._read_output(max_chunks=64)  # EOF closes the pipe
                if self._out_fd is None:
                    self._settle(self._outcome(status))
                    return
        except Exception as exc:  # never leave waiters hanging on an executor bug
            self._fail(exc)
            return
        self._spawn_task(self._supervise(status))

    # -- output ----------------------------------------------------------------------------

    def _watch_output(self) -> None:
        assert self._out_fd is not None
        os.set_blocking(self._out_fd, False)
        self._loop.add_reader(self._out_fd, self._read_output)

    def _read_output(self, max_chunks: int = _MAX_CHUNKS_PER_WAKEUP) -> None:
        for _ in range(max_chunks):
            if self._out_fd is None:
                return
            try:
                chunk = os.read(self._out_fd, _READ_CHUNK)
            except BlockingIOError:
                return
            except OSError:
                chunk = b""
            if not chunk:
                self._close_output()
                return
            self._tail.feed(chunk)

    def _close_output(self) -> None:
        if self._out_fd is None:
            return
        self._loop.remove_reader(self._out_fd)
        os.close(self._out_fd)
        self._out_fd = None
        if not self._eof.done():
            self._eof.set_result(None)

    async def _await_eof(self) -> None:
        """Wait for the pipe's EOF, bounded: a process that escaped the group may hold it."""
        if self._out_fd is None:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._eof), self._request.kill_grace_s)
        self._read_output(max_chunks=64)  # whatever is already buffered in the pipe
        self._close_output()

    # -- ending ----------------------------------------------------------------------------

    def _on_timeout(self) -> None:
        self._timer = None
        timeout = self._request.timeout_s
        self._end(RunStatus.TIMEOUT, f"timed out after {timeout:g}s", self._request.kill_grace_s)

    def _end(self, status: RunStatus, reason: str, grace_s: float) -> None:
        """Start the SIGTERM → grace → SIGKILL escalation once; the first reason wins."""
        if self._ended_by is not None or self._exited.done():
            return
        self._ended_by = (status, reason)
        self._spawn_task(self._escalate(grace_s))

    async def _escalate(self, grace_s: float) -> None:
        # The leader is not reaped yet (we checked), so its pid still pins the group id.
        _signal_group(self.pgid, signal.SIGTERM)
        self._term_deadline = self._loop.time() + grace_s
        try:
            await asyncio.wait_for(asyncio.shield(self._exited), grace_s)
        except TimeoutError:
            if not self._exited.done():
                _signal_group(self.pgid, signal.SIGKILL)

    async def _stop_strays(self) -> None:
        """Stop what the main process left in its group (KillMode=control-group).

        The leader is reaped by now; the group id stays reserved while any member lives, and a
        reuse of the pid as a *new group* between our reap and this check would need the pid
        space to wrap within microseconds, a risk we accept.
        """
        if not process_group_alive(self.pgid):
            return
        self._strays = True
        if self._term_deadline is None:
            _signal_group(self.pgid, signal.SIGTERM)
            self._term_deadline = self._loop.time() + self._request.kill_grace_s
        if await self._group_gone_by(self._term_deadline):
            return
        _signal_group(self.pgid, signal.SIGKILL)
        await self._group_gone_by(self._loop.time() + _AFTER_KILL_WAIT_S)

    async def _group_gone_by(self, deadline: float) -> bool:
        """Poll the group until it is empty or the deadline passes (members are not our
        children, so there is nothing to wait on but the group itself)."""
        delay = 0.005
        while process_group_alive(self.pgid):
            remaining = deadline - self._loop.time()
            if remaining <= 0:
                return False
            await asyncio.sleep(min(delay, remaining))
            delay = min(delay * 2, 0.1)
        return True

    async def _supervise(self, status: int | None) -> None:
        """The slow path of :meth:`_conclude`: stop strays, wait (bounded) for EOF."""
        try:
            await self._stop_strays()
            await self._await_eof()
            outcome = self._outcome(status)
        except asyncio.CancelledError:  # the loop is shutting down; the process is left alone
            self._close_pidfd()
            self._close_output()
            raise
        except Exception as exc:  # never leave waiters hanging on an executor bug
            self._fail(exc)
            return
        self._settle(outcome)

    def _fail(self, exc: Exception) -> None:
        self._close_output()
        self._settle(RunOutcome(
            status=RunStatus.FAILED,
            started_at=self.started_at,
            finished_at=self._finished_at or _now(),
            reason=self._redactor.text(f"executor error: {exc!r}"),
        ))

    def _settle(self, outcome: RunOutcome) -> None:
        if not self._done.done():
            self._done.set_result(outcome)

    def _outcome(self, status: int | None) -> RunOutcome:
        exit_code, sig = _decode_wait_status(status)
        reason: str | None = None
        if self._ended_by is not None:
            run_status, reason = self._ended_by
        elif status is None:
            run_status, reason = RunStatus.FAILED, "exit status unavailable (reaped elsewhere)"
        elif sig is not None:
            run_status, reason = RunStatus.FAILED, f"killed by {_signal_name(sig)}"
        elif exit_code == 0:
            run_status = RunStatus.SUCCEEDED
        else:
            run_status = RunStatus.FAILED
        if self._strays and reason is None:
            reason = "processes left in the run's process group were stopped"
        return RunOutcome(
            status=run_status,
            started_at=self.started_at,
            finished_at=self._finished_at or _now(),
            exit_code=exit_code,
            signal=sig,
            output_tail=self._tail.text(self._redactor),
            reason=self._redactor.text(reason) if reason else None,
        )


# --------------------------------------------------------------------------------------------
# The executor
# --------------------------------------------------------------------------------------------


class LocalExecutor(Executor):
    """Runs requests as children of this process; see the module docstring for the rules."""

    transport = "local"

    def __init__(
        self, state_dir: Path | None = None, base_env: Mapping[str, str] | None = None
    ) -> None:
        self.state_dir = state_dir
        self._base_env = base_env
        self._running: dict[str, LocalRunHandle] = {}
        self._unwatched: list[LocalRunHandle] = []  # spawned; watchers begin next loop pass
        self._encoded: dict[bytes, bytes] = {}
        self._encoded_for: Mapping[str, str] | None = None

    def _encoded_base_env(self) -> dict[bytes, bytes]:
        """The base environment of a run as this executor's user, as bytes, built once:
        Popen would otherwise encode every variable again for every run (a third of the
        spawn overhead in a burst)."""
        source = self.base_env
        if self._encoded_for is not source:
            own = pwd.getpwuid(os.geteuid())
            self._encoded = _encode_env(base_env(own, source, own_user=True))
            self._encoded_for = source
        return self._encoded

    @property
    def base_env(self) -> Mapping[str, str]:
        """The executor's own environment: the source of ``from_env`` secrets and of the
        base's ``PATH`` and ``LANG``; never handed to jobs as a whole."""
        return self._base_env if self._base_env is not None else os.environ

    async def start(self, request: RunRequest) -> LocalRunHandle:
        started = self._start_all([request])[0]
        if isinstance(started, Exception):
            raise started
        return started

    async def start_many(self, requests: Sequence[RunRequest]) -> list[RunHandle | Exception]:
        return list(self._start_all(requests))

    def _start_all(self, requests: Sequence[RunRequest]) -> list[LocalRunHandle | Exception]:
        """Prepare every run, then spawn them back to back; watching them begins on the
        loop's next pass (:meth:`_watch_spawned`).

        The parent comes back from every fork/exec with cold caches, so Python run between
        two spawns is several times slower than it looks; and each run's bookkeeping would
        delay every run behind it. A burst's runs thus start after a tight loop of spawns."""
        prepared: list[_Prepared | Exception] = []
        for request in requests:
            try:
                prepared.append(self._prepare(request))
            except Exception as exc:
                prepared.append(exc)
        children = [item if isinstance(item, Exception) else _spawn_child(item)
                    for item in prepared]
        started: list[LocalRunHandle | Exception] = []
        for request, ready, child in zip(requests, prepared, children, strict=True):
            if isinstance(child, Exception):  # refused when prepared, or when spawned
                started.append(child)
                continue
            assert not isinstance(ready, Exception)
            handle = LocalRunHandle(request, child.pid, child.proc, child.out_fd,
                                    ready.redactor, child.started_at)
            self._running[request.run_id] = handle
            handle.add_done_callback(self._forget)
            started.append(handle)
            if not self._unwatched:
                asyncio.get_running_loop().call_soon(self._watch_spawned)
            self._unwatched.append(handle)
        return started

    def _watch_spawned(self) -> None:
        """Begin watching the runs spawned since the last loop pass (their pidfds, pipes and
        timeouts). Not done right after each spawn: a caller spawning a burst without
        yielding to the loop (the center) gets every spawn back to back, and the watchers,
        ~70 µs a run, do not delay the runs behind them. Nothing is missed meanwhile: an
        exited child stays a zombie and its output waits in the pipe."""
        handles, self._unwatched = self._unwatched, []
        for handle in handles:
            try:
                handle._begin()
            except Exception as exc:  # e.g. out of descriptors: unwatched, it must not run
                with contextlib.suppress(OSError):
                    os.killpg(handle.pgid, signal.SIGKILL)
                handle._fail(exc)
                handle._poll_exit()  # reap it

    def _forget(self, handle: LocalRunHandle) -> None:
        self._running.pop(handle.run_id, None)

    def info(self) -> ExecutorInfo:
        return ExecutorInfo(transport=self.transport, running=sorted(self._running))

    def _prepare(self, request: RunRequest) -> _Prepared:
        argv = _argv(request.command)
        user = _lookup_user(request.run_as) if request.run_as else None
        switch_user = user is not None and _check_can_switch(user)
        job_env, secrets = resolve_env(request.env, self.base_env,
                                       switch_to=user if switch_user else None)
        env = (_encode_env(base_env(user, self.base_env, own_user=not switch_user))
               if user is not None else dict(self._encoded_base_env()))
        env.update(_encode_env(job_env))
        env.update(_encode_env(cronfile_vars(request, self.state_dir)))
        cwd = _workdir(request.workdir, user)
        if switch_user and cwd is not None:
            argv = ["/bin/sh", "-c", _CD_THEN_EXEC, "cronfile-workdir", cwd, *argv]
            cwd = "/"
        return _Prepared(
            argv=argv,
            env=env,
            cwd=cwd,
            user=user,
            switch_user=switch_user,
            redactor=Redactor(secrets) if secrets else NO_SECRETS,
        )


class _Child(NamedTuple):
    pid: int
    proc: subprocess.Popen[bytes] | None  # None when started with posix_spawn
    out_fd: int  # our end of its output pipe
    started_at: datetime


def _spawn_child(prepared: _Prepared) -> _Child | Exception:
    """Fork/exec the child with both output streams on one pipe; or why it cannot start."""
    out_r, out_w = os.pipe2(os.O_CLOEXEC)
    started_at = _now()
    try:
        if _can_posix_spawn(prepared, out_w):
            pid, proc = _posix_spawn(prepared, out_w), None
        else:
            proc = _popen(prepared, out_w)
            pid = proc.pid
    except Exception as exc:
        os.close(out_r)
        return exc
    except BaseException:
        os.close(out_r)
        raise
    finally:
        os.close(out_w)  # the child has its copies; ours would keep EOF from ever coming
    return _Child(pid, proc, out_r, started_at)


# Popen(restore_signals=True) puts these back to SIG_DFL in the child (CPython ignores
# SIGPIPE itself, and an ignored signal stays ignored across exec).
_RESTORED_SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGPIPE", "SIGXFZ", "SIGXFSZ") if hasattr(signal, name)
)
_inherited_fds_closed = False


def _can_posix_spawn(prepared: _Prepared, out_w: int) -> bool:
    """Whether :func:`_posix_spawn` can start this child exactly as :func:`_popen` would.

    It is the fast path for bursts: Popen spends ~0.1 ms of Python per child (it encodes the
    environment again, opens /dev/null, makes and reads an error pipe) on top of a ~0.5 ms
    fork/exec. posix_spawn cannot change the working directory or the user, and it would
    look a bare program name up in the center's PATH instead of the child's (Popen uses the
    child's): those children go through Popen. A pipe end among fds 0-2 (the center's own
    stdio closed) is left to Popen too, which handles those cases."""
    return (
        hasattr(os, "posix_spawn")
        and prepared.cwd is None
        and not prepared.switch_user
        and "/" in prepared.argv[0]
        and out_w > 2
        and _close_inherited_on_exec()
    )


def _close_inherited_on_exec() -> bool:
    """Give posix_spawn's children the descriptors Popen(close_fds=True)'s get: stdio only.

    CPython opens every descriptor close-on-exec (PEP 446), so the only inheritable ones
    are those this process itself inherited (and its stdio): mark them close-on-exec once.
    False where the descriptors cannot be listed: then Popen is used."""
    global _inherited_fds_closed
    if not _inherited_fds_closed:
        try:
            fds = [int(name) for name in os.listdir("/proc/self/fd")]
        except OSError:
            return False
        for fd in fds:
            if fd > 2:
                with contextlib.suppress(OSError):
                    if os.get_inheritable(fd):
                        os.set_inheritable(fd, False)
        _inherited_fds_closed = True
    return True


def _posix_spawn(prepared: _Prepared, out_w: int) -> int:
    """The child, as :func:`_popen` would start it: new session, stdin from /dev/null,
    stdout and stderr on ``out_w``, default dispositions for the signals Popen restores."""
    try:
        return os.posix_spawn(
            prepared.argv[0],
            prepared.argv,
            prepared.env,
            file_actions=[
                (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                (os.POSIX_SPAWN_DUP2, out_w, 1),
                (os.POSIX_SPAWN_DUP2, out_w, 2),
            ],
            setsid=True,
            setsigdef=_RESTORED_SIGNALS,
        )
    except OSError as exc:
        raise RunRefused(prepared.redactor.text(_spawn_error(exc, prepared))) from None
    except (ValueError, TypeError) as exc:
        message = f"cannot start {prepared.argv[0]}: {exc}"
        raise RunRefused(prepared.redactor.text(message)) from None


def _popen(prepared: _Prepared, out_w: int) -> subprocess.Popen[bytes]:
    user = prepared.user if prepared.switch_user else None
    try:
        return subprocess.Popen(
            prepared.argv,
            stdin=subprocess.DEVNULL,
            stdout=out_w,
            stderr=out_w,
            cwd=prepared.cwd,
            env=prepared.env,
            start_new_session=True,
            close_fds=True,
            user=user.pw_uid if user else None,
            group=user.pw_gid if user else None,
            # The user's OWN supplementary groups: without this the child keeps root's.
            extra_groups=os.getgrouplist(user.pw_name, user.pw_gid) if user else None,
        )
    except OSError as exc:
        raise RunRefused(prepared.redactor.text(_spawn_error(exc, prepared))) from None
    except (ValueError, TypeError) as exc:
        message = f"cannot start {prepared.argv[0]}: {exc}"
        raise RunRefused(prepared.redactor.text(message)) from None


def _spawn_error(exc: OSError, prepared: _Prepared) -> str:
    """A message an operator can act on, from what Popen's child reported."""
    program = prepared.argv[0]
    who = f" for user {prepared.user.pw_name}" if prepared.user else ""
    if prepared.cwd is not None and exc.filename == prepared.cwd:
        if isinstance(exc, FileNotFoundError):
            return f"workdir {prepared.cwd} does not exist"
        return f"workdir {prepared.cwd} is not accessible{who}: {exc.strerror}"
    if isinstance(exc, FileNotFoundError):
        return f"command not found: {program}"
    if isinstance(exc, PermissionError) and exc.filename is not None:
        return f"command not executable{who}: {program} ({exc.strerror})"
    return f"cannot start {program}: {exc.strerror or exc}"
