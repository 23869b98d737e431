"""The ``ssh`` executor: runs a job on a host that has no connected agent, over OpenSSH.

Contract (SPEC §2 ``agents.*.ssh``, §5): host keys are verified against known_hosts and an
unknown or changed key refuses the run (never auto-accepted); the same timeout and output
rules as the other transports apply. How that is achieved over a protocol that only knows
"run this string with the user's shell":

Connection
    One paramiko :class:`~paramiko.Transport` per host, opened on first use, kept alive
    (keepalive every 15 s) and reused by every run; each run is one session channel on it.
    A transport that is no longer active is replaced on the next run. Blocking paramiko calls
    run in threads (``asyncio.to_thread``; one reader thread per run), never on the loop.
    Host keys are checked by us, right after key exchange and BEFORE authenticating, so no
    credential is offered to an impostor and the refusal names the exact problem.

Remote command (``_remote_command``)
    ``exec [sudo -n -u USER --] setsid -f -w /bin/sh -c WRAPPER cronfile-run MARK WORKDIR ARGV..``
    joined with :func:`shlex.join`, so every argument reaches the remote ``argv`` literally
    whatever it contains (``; rm -rf ~`` and ``$(id)`` included). A string command is
    ``ARGV = /bin/sh -c STRING``. The wrapper (``_WRAPPER``, fixed text, never formatted):

    1. reads the job's environment from the channel's stdin (``export K='v'`` lines quoted
       with :func:`shlex.quote`, then EOF) -- values, secrets included, therefore never
       appear in any remote process's command line (``ps``), only in the job's environment;
    2. ``cd -- WORKDIR`` and checks that ARGV[0] exists, reporting either failure as a marker
       line so that :meth:`SshExecutor.start` raises :class:`RunRefused`, as a local run would;
    3. prints ``MARK:pgid:$$`` on stderr: ``setsid -f`` forked it as the leader of a new
       session, so ``$$`` is the process group of everything the job starts;
    4. ``exec``s ARGV (same pid) with stderr merged into stdout: one ordered stream, as for
       local runs. The channel's stderr then carries only sudo/setsid diagnostics, which
       are not job output and are dropped after the marker. (Exec, not wait: a waiting
       dash would print "Terminated" into the job's output when the job is killed.)

    ``MARK`` is random per run, so no job output can forge it.

Timeout and stop
    ``kill -TERM -PGID`` over a second exec channel (through the same ``sudo`` when the run
    uses one: the group belongs to that user), then ``kill -KILL -PGID`` after the grace
    period. ``setsid`` itself is outside the group, so it survives both and reports.

Exit status
    ``setsid -w`` exits with the job's exit code; when the job died by a signal it prints
    ``setsid: child N did not exit normally`` on stderr and exits with the raw wait status,
    whose low 7 bits are the signal: we report that ``signal`` and no exit code. So signals
    are exact, not guessed from the shell's ``128+N`` convention (a job that is itself a
    shell script still returns 128+N for a killed child, exactly as it would locally).
    Only the ``setsid:`` prefix is matched, never the (translatable) message.

Remote requirements: a POSIX ``/bin/sh``, util-linux ``setsid`` (``-f -w``: 2.31+), ``sudo`` only
for ``run_as`` another user, and a login shell that understands POSIX quoting (sh, bash, zsh).
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import os
import re
import secrets
import select
import shlex
import socket
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import paramiko

from cronfile.schedules.model import EnvValue, RunStatus, SshConfig
from cronfile.transports.executor import Executor, RunHandle, RunOutcome, RunRefused, RunRequest
from cronfile.transports.secrets import NO_SECRETS, OutputTail, Redactor, resolve_env

KEEPALIVE_S = 15
"""Transport keepalive interval: keeps NATs/firewalls from dropping an idle reused connection."""

EXIT_LINGER_S = 2.0
"""After the exit status arrived, how long to wait for EOF. A job that leaves a background
process holding its stdout would otherwise keep the run open for as long as that lives."""

KILL_WAIT_S = 5.0
"""After SIGKILL, how long to wait for the channel to end before closing it ourselves."""

CHUNK = 65536
_SELECT_S = 0.5
_DIAG_KEEP = 4096

# The fixed remote wrapper; see the module docstring. Positional parameters:
# $1 = per-run marker, $2 = workdir ("" = the login directory), $3... = the job's argv.
_WRAPPER = (
    'm=$1; w=$2; shift 2; '
    'eval "$(cat)" || { printf "%s:env\\n" "$m" >&2; exit 125; }; '
    'if [ -n "$w" ]; then cd -- "$w" 2>/dev/null '
    '|| { printf "%s:workdir\\n" "$m" >&2; exit 125; }; fi; '
    'command -v "$1" >/dev/null 2>&1 || { printf "%s:notfound\\n" "$m" >&2; exit 127; }; '
    'printf "%s:pgid:%s\\n" "$m" "$$" >&2; '
    'exec "$@" 2>&1'
)

_SETSID_SIGNALED = re.compile(rb"(?m)^setsid: ")

T = TypeVar("T")


def _now() -> datetime:
    return datetime.now(UTC)


def _set_future(loop: asyncio.AbstractEventLoop, fut: asyncio.Future[T], value: T) -> None:
    """Resolve ``fut`` from a worker thread; harmless if the loop has gone away meanwhile."""

    def _set() -> None:
        if not fut.done():
            fut.set_result(value)

    with contextlib.suppress(RuntimeError):  # loop closed: nobody is waiting any more
        loop.call_soon_threadsafe(_set)


class _Tail:
    """The output tail of an SSH run: the same window and masking rules as every transport
    (:mod:`cronfile.transports.secrets`), fed by the reader thread."""

    def __init__(self, keep: int, redactor: Redactor) -> None:
        self.redactor = redactor
        self._tail = OutputTail(keep, redactor.margin)

    def add(self, data: bytes) -> None:
        self._tail.feed(data)

    def text(self) -> str:
        return self._tail.text(self.redactor)


@dataclass
class _Started:
    """What the wrapper said before the job started: its process group, or why it could not."""

    pgid: int | None = None
    refused: str | None = None  # "workdir" | "notfound" | "env" | "eof" | "error"
    diag: str = ""


@dataclass
class _Finished:
    exit_code: int | None
    wrapper_signaled: bool
    error: str | None


class _Reader(threading.Thread):
    """Reads one run's channel until it ends: stdout and stderr together, never blocking.

    Both streams are drained as data arrives (``select`` on the channel wakes on either),
    so a job writing 10 MB never stalls on a full SSH window, and only the tail is kept.
    """

    def __init__(
        self,
        chan: paramiko.Channel,
        marker: bytes,
        tail: _Tail,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        super().__init__(name=f"cronfile-ssh-{marker.decode()}", daemon=True)
        self.chan = chan
        self.marker = marker + b":"
        self.tail = tail
        self.loop = loop
        self.started: asyncio.Future[_Started] = loop.create_future()
        self.finished: asyncio.Future[_Finished] = loop.create_future()
        self.pgid: int | None = None
        self._pre = bytearray()  # channel stderr before the marker line
        self._diag = bytearray()  # non-marker stderr lines before it (sudo, login shell)
        self._post = bytearray()  # channel stderr after it (wrapper diagnostics only)
        self._start_reported = False

    # -- the thread ------------------------------------------------------------------------

    def run(self) -> None:
        error: str | None = None
        try:
            self._pump()
        except Exception as exc:  # paramiko and socket errors: the run's channel is gone
            error = f"{type(exc).__name__}: {exc}"
        if not self._start_reported:
            self._report_start(_Started(refused="error" if error else "eof"))
        # exit-status follows EOF closely; a channel closed without one keeps -1.
        self.chan.status_event.wait(timeout=1.0)
        code: int | None = self.chan.exit_status if self.chan.exit_status != -1 else None
        with contextlib.suppress(Exception):
            self.chan.close()
        signaled = bool(_SETSID_SIGNALED.search(bytes(self._post)))
        _set_future(self.loop, self.finished, _Finished(code, signaled, error))

    def _pump(self) -> None:
        chan = self.chan
        exit_seen: float | None = None
        while True:
            select.select([chan], [], [], _SELECT_S)
            self._drain_stderr()
            if chan.recv_ready():
                self.tail.add(chan.recv(CHUNK))
                continue
            if chan.eof_received or chan.closed:
                # Nothing can arrive after EOF: whatever is buffered is the rest.
                while chan.recv_ready():
                    self.tail.add(chan.recv(CHUNK))
                self._drain_stderr()
                return
            if chan.exit_status_ready():
                exit_seen = exit_seen or time.monotonic()
                if time.monotonic() - exit_seen > EXIT_LINGER_S:
                    return

    def _drain_stderr(self) -> None:
        while self.chan.recv_stderr_ready():
            data = self.chan.recv_stderr(CHUNK)
            if not data:
                return
            if self._start_reported:
                self._post += data
                del self._post[:-_DIAG_KEEP]
            else:
                self._pre += data
                self._parse_pre()

    def _parse_pre(self) -> None:
        while not self._start_reported and b"\n" in self._pre:
            line, _, rest = bytes(self._pre).partition(b"\n")
            self._pre = bytearray(rest)
            if not line.startswith(self.marker):
                self._diag += line + b"\n"
                del self._diag[:-_DIAG_KEEP]
                continue
            word = line[len(self.marker) :]
            if word.startswith(b"pgid:") and word[5:].isdigit():
                self.pgid = int(word[5:])
                self._report_start(_Started(pgid=self.pgid))
                self._post += self._pre  # anything after the marker is wrapper noise
                self._pre.clear()
            else:
                self._report_start(_Started(refused=word.decode("ascii", "replace")))
        if not self._start_reported and len(self._pre) > _DIAG_KEEP:
            self._diag += self._pre
            del self._diag[:-_DIAG_KEEP]
            self._pre.clear()

    def _report_start(self, started: _Started) -> None:
        self._start_reported = True
        started.diag = (bytes(self._diag) + bytes(self._pre)).decode("utf-8", "replace").strip()
        _set_future(self.loop, self.started, started)


def _resolve_env(env: tuple[tuple[str, EnvValue], ...], agent: str
                 ) -> tuple[dict[str, str], Redactor]:
    """Resolve secrets on the CENTER (the host that runs an ssh job's connection).

    ``from_file`` is read here and ``from_env`` taken from the center's environment: the
    remote host runs no cronfile, so only values the center resolved can be masked in the
    output tail; they reach the remote job through the encrypted channel's stdin, never a
    command line. The rules (names, newline, masking) are the shared ones.
    """
    pairs, values = resolve_env(
        env, os.environ,
        where=f"the center (ssh runs for agent {agent} resolve secrets there)")
    return pairs, Redactor(values) if values else NO_SECRETS


class SshRunHandle(RunHandle):
    """One run over SSH; :meth:`wait` may be awaited many times, :meth:`stop` is idempotent."""

    def __init__(
        self,
        executor: SshExecutor,
        request: RunRequest,
        reader: _Reader,
        started_at: datetime,
        started_mono: float,
        sudo_user: str | None,
    ) -> None:
        self.run_id = request.run_id
        self.started_at = started_at
        self._executor = executor
        self._request = request
        self._reader = reader
        self._t0 = started_mono
        self._sudo_user = sudo_user
        self._stop_event = asyncio.Event()
        self._stop_reason = "stopped"
        self._stop_grace: float | None = None
        self._notes: list[str] = []
        self._task = asyncio.get_running_loop().create_task(self._supervise())

    @property
    def pgid(self) -> int | None:
        """The remote process group of the job (for tests and ``status``)."""
        return self._reader.pgid

    async def wait(self) -> RunOutcome:
        return await asyncio.shield(self._task)

    def kill_now(self) -> None:
        """SIGKILL the REMOTE process group over the executor's open connection (blocking,
        bounded by the connect timeout). The pgid is a number on the remote host: it is
        never signalled here. Without a live connection the run is left to the remote host
        (the next center records it ``lost``)."""
        pgid = self._reader.pgid
        if self._task.done() or pgid is None:
            return
        self._executor.kill_group_now(pgid, self._sudo_user)

    async def stop(self, reason: str = "stopped", grace_s: float | None = None) -> None:
        if not self._task.done() and not self._stop_event.is_set():
            self._stop_reason = reason
            self._stop_grace = grace_s
            self._stop_event.set()
        await asyncio.shield(self._task)

    async def _supervise(self) -> RunOutcome:
        req = self._request
        finished = self._reader.finished
        stopper = asyncio.ensure_future(self._stop_event.wait())
        try:
            timeout = None
            if req.timeout_s is not None and req.timeout_s > 0:
                timeout = max(0.0, self._t0 + req.timeout_s - time.monotonic())
            waiters: set[asyncio.Future[Any]] = {finished, stopper}
            await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopper.cancel()
        status: RunStatus | None = None
        if not finished.done():
            if self._stop_event.is_set():
                status = RunStatus.KILLED
                grace = self._stop_grace if self._stop_grace is not None else req.kill_grace_s
                self._notes.append(self._stop_reason)
            else:
                status = RunStatus.TIMEOUT
                grace = req.kill_grace_s
                self._notes.append(f"timed out after {req.timeout_s:g}s")
            await self._terminate(grace)
        result = await finished
        return self._outcome(status, result)

    async def _terminate(self, grace_s: float) -> None:
        """SIGTERM the remote group, SIGKILL after ``grace_s``; bounded whatever happens."""
        finished = self._reader.finished
        pgid = self._reader.pgid
        if pgid is None:  # cannot happen after a successful start; belt and braces
            self._notes.append("no remote process group known: closed the channel")
            await asyncio.to_thread(self._reader.chan.close)
        else:
            note = await self._executor._signal_group(pgid, "TERM", self._sudo_user)
            self._notes.append(note)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(finished), max(0.0, grace_s))
                return
            note = await self._executor._signal_group(pgid, "KILL", self._sudo_user)
            self._notes.append(f"{note} after {grace_s:g}s grace")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(finished), KILL_WAIT_S)
            return
        self._notes.append(f"channel still open {KILL_WAIT_S:g}s after SIGKILL: closed it")
        await asyncio.to_thread(self._reader.chan.close)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(finished), KILL_WAIT_S)

    def _outcome(self, forced: RunStatus | None, result: _Finished) -> RunOutcome:
        code, signal = result.exit_code, None
        if result.wrapper_signaled and code is not None:
            # setsid -w exits with the raw wait status of a job killed by a signal.
            signal, code = code & 0x7F, None
        reason: str | None = None
        if forced is not None:
            status = forced
        elif code is None and signal is None:
            if result.error or not self._executor._connected():
                status = RunStatus.LOST
                reason = (
                    f"ssh connection to {self._executor.address} dropped during the run "
                    f"({result.error or 'connection closed'}); the remote process group "
                    f"{self._reader.pgid} may still be running"
                )
            else:
                status = RunStatus.FAILED
                reason = "the remote side ended the session without an exit status"
        elif code == 0:
            status = RunStatus.SUCCEEDED
        else:
            status = RunStatus.FAILED
        if self._notes:
            reason = "; ".join(self._notes)
        return RunOutcome(
            status=status,
            started_at=self.started_at,
            finished_at=_now(),
            exit_code=code,
            signal=signal,
            output_tail=self._reader.tail.text(),
            reason=self._reader.tail.redactor.text(reason) if reason else None,
        )


class SshExecutor(Executor):
    """Runs jobs on one agent's host over SSH (see the module docstring for the scheme)."""

    transport = "ssh"

    def __init__(
        self,
        agent_name: str,
        config: SshConfig,
        known_hosts: str | None = None,
        connect_timeout_s: float = 10.0,
    ) -> None:
        self.agent_name = agent_name
        self.config = config
        self.known_hosts = os.path.expanduser(
            config.known_hosts or known_hosts or "~/.ssh/known_hosts"
        )
        self.connect_timeout_s = connect_timeout_s
        self.user = config.user or getpass.getuser()
        self.address = f"{config.host}:{config.port}"
        self._transport: paramiko.Transport | None = None
        self._lock = asyncio.Lock()
        self._connected_since: datetime | None = None
        self._connections_opened = 0
        self._last_error: str | None = None
        self._last_error_at: datetime | None = None
        self._running: dict[str, SshRunHandle] = {}

    # -- public API ------------------------------------------------------------------------

    @property
    def connection(self) -> paramiko.Transport | None:
        """The current paramiko transport (one per host, shared by all runs), if any."""
        return self._transport

    async def start(self, request: RunRequest) -> RunHandle:
        command = request.command
        argv = ["/bin/sh", "-c", command] if isinstance(command, str) else list(command)
        if not argv or any("\0" in a for a in argv):
            raise RunRefused("command is empty or contains a NUL byte")
        if request.workdir is not None and "\0" in request.workdir:
            raise RunRefused("workdir contains a NUL byte")
        pairs, redactor = _resolve_env(request.env, self.agent_name)
        sudo_user = self._sudo_user(request.run_as)
        marker = "cronfile-" + secrets.token_hex(8)
        remote = self._remote_command(marker, request.workdir, argv, sudo_user)
        stdin = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in pairs.items()).encode(
            "utf-8", "surrogateescape")

        loop = asyncio.get_running_loop()
        chan = await self._open_run_channel(remote, stdin)
        started_at, started_mono = _now(), time.monotonic()
        reader = _Reader(chan, marker.encode(), _Tail(request.output_keep, redactor), loop)
        reader.start()
        try:
            started = await asyncio.wait_for(
                asyncio.shield(reader.started), self.connect_timeout_s
            )
        except TimeoutError:
            await asyncio.to_thread(chan.close)
            raise self._fail(
                f"{self.address}: the remote command did not start within "
                f"{self.connect_timeout_s:g}s"
            ) from None
        except asyncio.CancelledError:
            chan.close()  # non-blocking enough: queues a close message; no orphaned reader
            raise
        if started.pgid is None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(reader.finished), KILL_WAIT_S)
            raise RunRefused(redactor.text(self._refusal(started, request, argv)))

        handle = SshRunHandle(self, request, reader, started_at, started_mono, sudo_user)
        self._running[request.run_id] = handle
        handle._task.add_done_callback(lambda _t: self._running.pop(request.run_id, None))
        return handle

    async def close(self) -> None:
        """Close the connection. Runs still in flight end as ``lost`` (their remote
        processes keep running: a non-pty SSH session sends no SIGHUP)."""
        async with self._lock:
            transport, self._transport = self._transport, None
            self._connected_since = None
        if transport is not None:
            await asyncio.to_thread(transport.close)

    def status_info(self) -> dict[str, Any]:
        """The connection's state, for ``cronfile status``."""
        connected = self._connected()
        since = self._connected_since if connected else None
        return {
            "transport": self.transport,
            "agent": self.agent_name,
            "host": self.config.host,
            "port": self.config.port,
            "user": self.user,
            "known_hosts": self.known_hosts,
            "connected": connected,
            "connected_since": since.isoformat() if since else None,
            "connections_opened": self._connections_opened,
            "last_error": self._last_error,
            "last_error_at": self._last_error_at.isoformat() if self._last_error_at else None,
            "running": sorted(self._running),
        }

    # -- the remote command ----------------------------------------------------------------

    def _sudo_user(self, run_as: str | None) -> str | None:
        if not run_as or run_as == self.user:
            return None
        if not self.config.sudo:
            raise RunRefused(
                f"run_as {run_as!r} needs sudo on {self.address}, but "
                f"agents.{self.agent_name}.ssh.sudo is false (ssh user is {self.user!r})"
            )
        return run_as

    @staticmethod
    def _sudo_prefix(sudo_user: str | None) -> list[str]:
        return ["sudo", "-n", "-u", sudo_user, "--"] if sudo_user else []

    def _remote_command(
        self, marker: str, workdir: str | None, argv: list[str], sudo_user: str | None
    ) -> str:
        parts = self._sudo_prefix(sudo_user) + [
            "setsid", "-f", "-w", "/bin/sh", "-c", _WRAPPER, "cronfile-run", marker, workdir or "",
        ]
        return "exec " + shlex.join(parts + argv)

    def _refusal(self, started: _Started, request: RunRequest, argv: list[str]) -> str:
        diag = f" ({started.diag})" if started.diag else ""
        where = f"{self.agent_name} ({self.address})"
        if started.refused == "workdir":
            return f"workdir {request.workdir} does not exist or is not accessible on {where}"
        if started.refused == "notfound":
            return f"command not found on {where}: {argv[0]}"
        if started.refused == "env":
            return f"could not set the environment on {where}{diag}"
        return f"could not start the command on {where}{diag or ' (no output)'}"

    # -- connection ------------------------------------------------------------------------

    def _connected(self) -> bool:
        return self._transport is not None and self._transport.is_active()

    def _fail(self, message: str) -> RunRefused:
        self._last_error, self._last_error_at = message, _now()
        return RunRefused(message)

    async def _get_transport(self, *, fresh: bool = False) -> paramiko.Transport:
        async with self._lock:
            old = self._transport
            if old is not None and old.is_active() and not fresh:
                return old
            self._transport = None
            if old is not None:
                await asyncio.to_thread(old.close)
            try:
                transport = await asyncio.to_thread(self._open_transport)
            except RunRefused as exc:
                raise self._fail(str(exc)) from None
            self._transport = transport
            self._connected_since = _now()
            self._connections_opened += 1
            return transport

    async def _open_run_channel(self, remote: str, stdin: bytes) -> paramiko.Channel:
        transport = await self._get_transport()
        try:
            return await asyncio.to_thread(self._exec, transport, remote, stdin)
        except paramiko.ChannelException as exc:
            raise self._fail(
                f"{self.address} refused a new session ({exc}): too many runs in flight "
                f"over one connection (sshd MaxSessions, default 10)"
            ) from None
        except (paramiko.SSHException, OSError, EOFError):
            # The connection looked alive but was not (peer rebooted, NAT dropped it):
            # reconnect once and retry; a second failure is the host's answer.
            transport = await self._get_transport(fresh=True)
            try:
                return await asyncio.to_thread(self._exec, transport, remote, stdin)
            except (paramiko.SSHException, OSError, EOFError) as exc:
                raise self._fail(f"{self.address}: cannot open a session: {exc}") from None

    def _exec(self, transport: paramiko.Transport, remote: str, stdin: bytes) -> paramiko.Channel:
        chan = transport.open_session(timeout=self.connect_timeout_s)
        try:
            chan.exec_command(remote)
            chan.sendall(stdin)
            chan.shutdown_write()
        except BaseException:
            chan.close()
            raise
        return chan

    async def _signal_group(self, pgid: int, sig: str, sudo_user: str | None) -> str:
        """Send ``sig`` to the remote process group; returns a note for the run's reason."""
        # `kill -SIG -PGID` is the form both dash's and bash's builtin accept.
        script = f'kill -{sig} -"$1"'
        argv = ["/bin/sh", "-c", script, "kill", str(pgid)]
        command = shlex.join(self._sudo_prefix(sudo_user) + argv)
        try:
            transport = await self._get_transport()
            try:
                code = await asyncio.to_thread(self._run_quick, transport, command)
            except paramiko.ChannelException:
                # Every session slot is taken by runs: signal over a separate connection.
                extra = await asyncio.to_thread(self._open_transport)
                try:
                    code = await asyncio.to_thread(self._run_quick, extra, command)
                finally:
                    await asyncio.to_thread(extra.close)
        except (RunRefused, paramiko.SSHException, OSError, EOFError) as exc:
            self._last_error, self._last_error_at = f"kill -{sig}: {exc}", _now()
            return f"could not send SIG{sig} to remote process group {pgid}: {exc}"
        if code not in (0, 1):  # 1 = the group was already gone
            return f"SIG{sig} to remote process group {pgid} failed (exit {code})"
        return f"sent SIG{sig} to remote process group {pgid}"

    def kill_group_now(self, pgid: int, sudo_user: str | None) -> None:
        """``kill -KILL -PGID`` on the remote host, from the calling thread, over the
        connection already open (none is opened: this runs while the process exits)."""
        transport = self._transport
        if transport is None or not transport.is_active():
            return
        argv = ["/bin/sh", "-c", 'kill -KILL -"$1"', "kill", str(pgid)]
        with contextlib.suppress(paramiko.SSHException, OSError, EOFError):
            self._run_quick(transport, shlex.join(self._sudo_prefix(sudo_user) + argv))

    def _run_quick(self, transport: paramiko.Transport, command: str) -> int | None:
        chan = transport.open_session(timeout=self.connect_timeout_s)
        try:
            chan.exec_command(command)
            chan.shutdown_write()
            if not chan.status_event.wait(self.connect_timeout_s):
                return None
            return chan.recv_exit_status()
        finally:
            chan.close()

    def _open_transport(self) -> paramiko.Transport:
        """Connect, verify the host key, authenticate. Blocking: call in a thread."""
        cfg, timeout = self.config, self.connect_timeout_s
        host_keys = self._load_known_hosts()
        pkey = self._load_key()
        name = cfg.host if cfg.port == 22 else f"[{cfg.host}]:{cfg.port}"
        known: dict[str, paramiko.PKey] = dict(host_keys.lookup(name) or {})
        try:
            sock = socket.create_connection((cfg.host, cfg.port), timeout=timeout)
        except OSError as exc:
            raise RunRefused(f"cannot connect to {self.address}: {exc}") from None
        transport = paramiko.Transport(sock)
        try:
            transport.banner_timeout = timeout
            transport.handshake_timeout = timeout
            transport.auth_timeout = timeout
            if known:
                self._prefer_key_types(transport, list(known.keys()))
            try:
                transport.start_client(timeout=timeout)
            except (paramiko.SSHException, OSError, EOFError) as exc:
                raise RunRefused(f"ssh handshake with {self.address} failed: {exc}") from None
            self._check_host_key(transport.get_remote_server_key(), known)
            try:
                transport.auth_publickey(self.user, pkey)
            except (paramiko.SSHException, OSError, EOFError) as exc:
                raise RunRefused(
                    f"ssh authentication as {self.user}@{self.address} with key "
                    f"{cfg.key} failed: {exc}"
                ) from None
            if not transport.is_authenticated():
                raise RunRefused(f"ssh authentication as {self.user}@{self.address} failed")
            transport.set_keepalive(KEEPALIVE_S)
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            return transport
        except BaseException:
            transport.close()
            raise

    @staticmethod
    def _prefer_key_types(transport: paramiko.Transport, known_types: list[str]) -> None:
        """Negotiate a host key type that known_hosts has, as OpenSSH does; otherwise a
        host known by its RSA key would be reported unknown just because it also has an
        ed25519 key that the client prefers."""
        options = transport.get_security_options()
        supported = list(options.key_types)
        wanted: list[str] = []
        for key_type in known_types:
            aliases = ["rsa-sha2-512", "rsa-sha2-256"] if key_type == "ssh-rsa" else [key_type]
            wanted += [a for a in aliases if a in supported and a not in wanted]
        if wanted:
            options.key_types = wanted + [k for k in supported if k not in wanted]

    def _check_host_key(self, key: paramiko.PKey, known: dict[str, paramiko.PKey]) -> None:
        where = f"host key for {self.address}"
        offered = f"{key.get_name()} {key.fingerprint}"
        expected = known.get(key.get_name())
        if expected is None:
            others = ", ".join(sorted(known))
            also = f" (it lists only {others} for this host)" if others else ""
            raise RunRefused(
                f"{where} is not in {self.known_hosts}{also}; the server offered {offered}. "
                f"Add it after checking that fingerprint: "
                f"ssh-keyscan -p {self.config.port} {self.config.host} >> {self.known_hosts}"
            )
        if expected != key:
            raise RunRefused(
                f"{where} CHANGED: {self.known_hosts} has {expected.get_name()} "
                f"{expected.fingerprint}, the server offered {offered}. Refusing to connect "
                f"(possible man-in-the-middle; if the host was reinstalled, replace its line "
                f"in {self.known_hosts})"
            )

    def _load_known_hosts(self) -> paramiko.HostKeys:
        path = self.known_hosts
        if not os.path.exists(path):
            raise RunRefused(
                f"host key for {self.address} is not in {path}: the file does not exist"
            )
        try:
            return paramiko.HostKeys(path)
        except (OSError, paramiko.SSHException, ValueError) as exc:
            raise RunRefused(f"cannot read known_hosts {path}: {exc}") from None

    def _load_key(self) -> paramiko.PKey:
        cfg, field = self.config, f"agents.{self.agent_name}.ssh"
        if not cfg.key:
            raise RunRefused(f"{field}.key is not set: ssh runs authenticate with a key only")
        password: str | None = None
        if cfg.passphrase_file:
            try:
                password = Path(cfg.passphrase_file).read_text(encoding="utf-8").rstrip("\r\n")
            except (OSError, UnicodeDecodeError) as exc:
                raise RunRefused(
                    f"cannot read {field}.passphrase_file {cfg.passphrase_file}: {exc}"
                ) from None
        elif cfg.passphrase_env:
            if cfg.passphrase_env not in os.environ:
                raise RunRefused(
                    f"environment variable {cfg.passphrase_env} ({field}.passphrase_env) "
                    f"is not set on the center"
                )
            password = os.environ[cfg.passphrase_env]
        path = os.path.expanduser(cfg.key)
        # paramiko 5 passes ``password`` straight to cryptography, which wants bytes
        # (its annotation says str).
        secret: Any = password.encode() if password is not None else None
        try:
            return paramiko.PKey.from_path(path, password=secret)
        except FileNotFoundError:
            raise RunRefused(f"ssh key {path} ({field}.key) does not exist") from None
        except TypeError:  # cryptography: encrypted key without a password, or the reverse
            hint = "it is encrypted: set passphrase_file or passphrase_env" if password is None \
                else "it is not encrypted: remove the passphrase setting"
            raise RunRefused(f"cannot load ssh key {path}: {hint}") from None
        except ValueError:
            why = "wrong passphrase, or" if password is not None else "it is"
            raise RunRefused(
                f"cannot load ssh key {path}: {why} not an OpenSSH/PEM private key"
            ) from None
        except Exception as exc:  # unreadable file, unsupported key type
            raise RunRefused(
                f"cannot load ssh key {path}: {type(exc).__name__}: {exc}"
            ) from None


__all__ = ["SshExecutor", "SshRunHandle"]
