"""A real PostgreSQL server for the HA tests, started by the test itself.

``initdb`` into a temporary directory and ``pg_ctl start`` on a free port of 127.0.0.1, as the
``postgres`` OS user when we are root (PostgreSQL refuses to run as root), as ourselves
otherwise. Tests skip, saying why, when Debian's ``postgresql`` package is not installed.
Also: a TCP proxy that can blackhole its connections, to cut a center off from the database.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg


def postgres_bin() -> Path | None:
    """The newest installed server's bin directory (Debian: /usr/lib/postgresql/N/bin)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def skip_reason() -> str | None:
    if postgres_bin() is None:
        return "PostgreSQL is not installed (apt-get install postgresql; .ci/run does it)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root but there is no postgres OS user to run the server as"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class PgServer:
    """One running server; :meth:`restart` keeps its data and port."""

    bindir: Path
    datadir: Path
    port: int
    log: Path

    @property
    def admin_dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def dsn(self, database: str, port: int | None = None) -> str:
        return f"postgresql://postgres@127.0.0.1:{port or self.port}/{database}"

    def _run(self, *args: str) -> None:
        cmd = [str(self.bindir / args[0]), *args[1:]]
        if os.geteuid() == 0:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stdout}{done.stderr}")

    def start(self) -> None:
        self._run("pg_ctl", "-D", str(self.datadir), "-l", str(self.log), "-w", "-t", "30", "start")

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.datadir), "-m", mode, "-w", "-t", "30", "stop")

    def restart(self) -> None:
        self._run("pg_ctl", "-D", str(self.datadir), "-l", str(self.log), "-m", "fast", "-w", "-t", "30",
                  "restart")

    def new_database(self) -> str:
        """A fresh, empty database; returns its DSN."""
        name = "t_" + uuid.uuid4().hex[:12]
        with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.dsn(name)


@contextlib.contextmanager
def running_postgres() -> Iterator[PgServer]:
    """A server in a directory of its own under the system temp dir: pytest's tmp_path is
    private to root, where the postgres user could not reach its data directory."""
    bindir = postgres_bin()
    assert bindir is not None
    directory = Path(tempfile.mkdtemp(prefix="cronfile-pg-"))
    datadir = directory / "data"
    sockdir = directory / "sock"
    sockdir.mkdir()
    if os.geteuid() == 0:
        user = pwd.getpwnam("postgres")
        for path in (directory, sockdir):
            os.chown(path, user.pw_uid, user.pw_gid)
        os.chmod(directory, 0o755)
    server = PgServer(bindir=bindir, datadir=datadir, port=free_port(), log=directory / "server.log")
    server._run("initdb", "-D", str(datadir), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")
    with open(datadir / "postgresql.conf", "a") as conf:
        conf.write(
            f"port = {server.port}\nlisten_addresses = '127.0.0.1'\n"
            f"unix_socket_directories = '{sockdir}'\nfsync = on\nmax_connections = 100\n"
        )
    server.start()
    try:
        yield server
    finally:
        with contextlib.suppress(subprocess.SubprocessError):
            server.stop("immediate")
        shutil.rmtree(directory, ignore_errors=True)


class BlackholeProxy:
    """Forwards 127.0.0.1:port to the server until :meth:`blackhole`, which silently drops
    every byte both ways while keeping the sockets open, as a partition does (no RST, no
    FIN: the client's statements just never answer)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self._holed = threading.Event()
        self._closed = threading.Event()
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def blackhole(self) -> None:
        self._holed.set()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self._holed.is_set():
                self._sockets.append(client)  # accept, then never answer
                continue
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            self._sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                if not self._holed.is_set():
                    dst.sendall(data)
        except OSError:
            pass

    def close(self) -> None:
        self._closed.set()
        self._listener.close()
        for s in self._sockets:
            with contextlib.suppress(OSError):
                s.close()


LEASE_S, DEADLINE_S = 3.0, 2.0
"""The HA tests' lease and renew deadline: short, so a failover fits in a test."""


def ha_argv(dsn: str, name: str, lease_s: float = LEASE_S,
            deadline_s: float = DEADLINE_S) -> list[str]:
    """The ``cronfile center`` options of one HA replica."""
    return ["--ha", dsn, "--name", name,
            "--ha-lease", f"{lease_s:g}s", "--ha-renew-deadline", f"{deadline_s:g}s"]
