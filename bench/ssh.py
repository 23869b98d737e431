#!/usr/bin/env python3
"""Benchmark the ssh executor against a real local sshd (tests/sshd.py).

Measures, in one run and against the same server:

* runs/s of ``true`` over ONE reused connection (the executor's normal mode),
* runs/s of ``true`` with a NEW connection per run (what reuse saves),
* a bare paramiko exec of ``true`` on a reused connection, without cronfile's wrapper
  (so the wrapper's own cost is visible),
* ``subprocess.run(["true"])`` locally, and the latency an SSH run adds over it,
* the remote login shell's own start-up (sshd runs every command through it; bash sources
  ``~/.bashrc`` when started by sshd, which on some hosts dominates everything else).

Usage: ``.venv/bin/python bench/ssh.py [-n RUNS]``. Needs /usr/sbin/sshd; runs as any user.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import pwd
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

import paramiko  # noqa: E402
from sshd import SshServer, running_sshd, sshd_available  # noqa: E402

from cronfile.schedules.model import RunStatus, SshConfig  # noqa: E402
from cronfile.transports.executor import RunRequest  # noqa: E402
from cronfile.transports.ssh import SshExecutor  # noqa: E402


def _request() -> RunRequest:
    return RunRequest(run_id=uuid.uuid4().hex, job="bench", command=("true",))


def _config(server: SshServer) -> SshConfig:
    return SshConfig(host=server.host, port=server.port, user=server.user, key=server.key,
                     known_hosts=server.known_hosts, sudo=False)


async def _timed(n: int, one: Callable[[], Awaitable[None]]) -> list[float]:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        await one()
        times.append(time.perf_counter() - t0)
    return times


async def reused(server: SshServer, n: int) -> list[float]:
    executor = SshExecutor("bench", _config(server))

    async def one() -> None:
        outcome = await (await executor.start(_request())).wait()
        assert outcome.status is RunStatus.SUCCEEDED, outcome

    await one()  # connect outside the measurement
    try:
        return await _timed(n, one)
    finally:
        assert executor.status_info()["connections_opened"] == 1
        await executor.close()


async def new_connection_each(server: SshServer, n: int) -> list[float]:
    async def one() -> None:
        executor = SshExecutor("bench", _config(server))
        try:
            outcome = await (await executor.start(_request())).wait()
            assert outcome.status is RunStatus.SUCCEEDED, outcome
        finally:
            await executor.close()

    return await _timed(n, one)


def bare_paramiko(server: SshServer, n: int) -> list[float]:
    transport = paramiko.Transport(socket.create_connection((server.host, server.port)))
    transport.start_client(timeout=10)
    transport.auth_publickey(server.user, paramiko.PKey.from_path(server.key))
    times = []
    try:
        for _ in range(n):
            t0 = time.perf_counter()
            chan = transport.open_session(timeout=10)
            chan.exec_command("true")
            chan.shutdown_write()
            assert chan.recv_exit_status() == 0
            chan.close()
            times.append(time.perf_counter() - t0)
    finally:
        transport.close()
    return times


def local(n: int) -> list[float]:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        subprocess.run(["true"], check=True)
        times.append(time.perf_counter() - t0)
    return times


def login_shell(n: int) -> tuple[str, list[float]]:
    """The remote user's shell started the way sshd starts it for a command."""
    shell = pwd.getpwuid(os.getuid()).pw_shell or "/bin/sh"
    env = dict(os.environ, SSH_CLIENT="127.0.0.1 50000 22", SHLVL="0")
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        subprocess.run([shell, "-c", "true"], check=True, env=env, cwd=Path.home())
        times.append(time.perf_counter() - t0)
    return shell, times


def _ms(times: list[float]) -> str:
    return f"median {statistics.median(times) * 1000:.1f} ms"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--runs", type=int, default=50, help="runs per mode (default 50)")
    n = parser.parse_args().runs
    if not sshd_available():
        print("bench/ssh.py: /usr/sbin/sshd is not installed", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp, running_sshd(tmp) as server:
        t_reused = asyncio.run(reused(server, n))
        t_new = asyncio.run(new_connection_each(server, n))
        t_bare = bare_paramiko(server, n)
    t_local = local(n)
    shell, t_shell = login_shell(min(n, 10))

    rate_reused, rate_new = n / sum(t_reused), n / sum(t_new)
    med = statistics.median
    added = med(t_reused) - med(t_local)
    print(f"ssh executor, `true`, {n} runs per mode, sshd on 127.0.0.1 "
          f"({os.cpu_count()} CPUs)")
    print(f"  reused connection:        {rate_reused:7.1f} runs/s  ({_ms(t_reused)})")
    print(f"  new connection per run:   {rate_new:7.1f} runs/s  ({_ms(t_new)})")
    print(f"  reuse speed-up:           {rate_reused / rate_new:7.1f}x")
    overhead = (med(t_reused) - med(t_bare)) * 1000
    print(f"  bare paramiko exec:       {n / sum(t_bare):7.1f} runs/s  ({_ms(t_bare)}; "
          f"executor overhead (wrapper, threads, asyncio): {overhead:.1f} ms)")
    print(f"  local subprocess.run:     {n / sum(t_local):7.1f} runs/s  ({_ms(t_local)})")
    print(f"  added latency of an SSH run over a local one: {added * 1000:.1f} ms "
          f"({med(t_reused) / med(t_local):.0f}x)")
    print(f"  of which the login shell ({shell} -c true, as sshd starts it): "
          f"{_ms(t_shell)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
