"""The local control channel of a running center: ``run``, ``trigger``, ``apply``.

A Unix socket in the state directory, mode 0600: whoever may read the state directory's
socket is the center's operator, so no token is needed and nothing listens on the network.
One JSON request line, one JSON answer line.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import pwd
import socket
import stat
import struct
import tempfile
from pathlib import Path
from typing import Any

from cronfile.center.port import Operations, backfill, fire, run_now, sync

log = logging.getLogger("cronfile.control")
SOCKET_NAME = "control.sock"
MAX_REQUEST = 64 * 1024


class ControlSocketError(Exception):
    """The control socket cannot be placed safely (the message says why and what to do)."""


def socket_path(state_dir: Path) -> Path:
    """``<state>/control.sock``, or, when that is too long for a Unix socket (108 bytes on
    Linux), a short path in a directory private to this user (``cronfile-UID`` in the temp
    dir, 0700). Never a name directly in the shared temp dir: another user could create it
    first and keep the center from starting, or listen in its place."""
    path = state_dir.resolve() / SOCKET_NAME
    if len(str(path)) < 100:
        return path
    digest = hashlib.sha256(str(path).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"cronfile-{os.geteuid()}" / f"{digest}.sock"


def _private_socket_dir(path: Path) -> None:
    """Make sure the fallback directory is ours and 0700; refuse otherwise."""
    directory = path.parent
    with contextlib.suppress(FileExistsError):
        directory.mkdir(mode=0o700)
    st = os.lstat(directory)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise ControlSocketError(
            f"{directory} (for the control socket: the state path is too long for a Unix "
            f"socket) is not a directory of this user with mode 700; remove it, or use a "
            f"shorter --state path"
        )


class ControlServer:
    def __init__(self, state_dir: Path, center: Operations) -> None:
        self.center = center
        self.state_dir = state_dir
        self.path = socket_path(state_dir)
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        if self.path.parent != self.state_dir.resolve():
            _private_socket_dir(self.path)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        old = os.umask(0o177)
        try:
            self.server = await asyncio.start_unix_server(self._serve, path=str(self.path),
                                                          limit=MAX_REQUEST)
        finally:
            os.umask(old)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), timeout=10)
            request = json.loads(line)
            answer = await self.handle(request if isinstance(request, dict) else {},
                                       _peer_user(writer))
        except (ValueError, TimeoutError, asyncio.LimitOverrunError) as exc:
            answer = {"ok": False, "error": f"bad request: {exc}"}
        except Exception as exc:  # the client gets an answer whatever happens
            log.exception("control request failed")
            answer = {"ok": False, "error": f"center error: {type(exc).__name__}: {exc}"}
        try:
            writer.write(json.dumps(answer).encode() + b"\n")
            with contextlib.suppress(ConnectionError):
                await writer.drain()
        finally:
            writer.close()

    async def handle(self, request: dict[str, Any], peer: str = "control socket") -> dict[str, Any]:
        center = self.center
        op = request.get("op")
        if op == "run":
            name = request.get("job")
            if not isinstance(name, str):
                return {"ok": False, "error": f"no job named {name!r}"}
            return await run_now(center, name)
        if op == "trigger":
            return fire(center, str(request.get("event")))
        if op == "reload":
            revision = request.get("revision")
            return await sync(center, None if revision is None else str(revision))
        if op == "stop":
            return center.stop_run(str(request.get("run_id")), peer)
        if op == "wait":
            try:
                timeout = min(float(request.get("timeout") or 60.0), 3600.0)
            except (TypeError, ValueError):
                return {"ok": False, "error": "timeout: expected seconds"}
            return {"ok": True, "ended": await center.wait_run(str(request.get("run_id")), timeout)}
        if op == "backfill":
            return await backfill(center, request)
        if op == "ping":
            return {"ok": True, "pid": os.getpid()}
        return {"ok": False, "error": f"unknown op {op!r}"}


def _peer_user(writer: asyncio.StreamWriter) -> str:
    """Who is on the other end of the socket (SO_PEERCRED), for records like ``stopped_by``."""
    sock = writer.get_extra_info("socket")
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        _pid, uid, _gid = struct.unpack("3i", creds)
        return f"{pwd.getpwuid(uid).pw_name} (control socket)"
    except (OSError, KeyError, AttributeError):
        return "control socket"


class CenterUnavailable(Exception):
    pass


def request(state_dir: Path, payload: dict[str, Any], timeout: float = 60.0) -> dict[str, Any]:
    """Send one request to the center running on ``state_dir``."""
    path = socket_path(state_dir)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
        except OSError as exc:
            raise CenterUnavailable(f"no center is running on {state_dir} ({exc.strerror})") from None
        try:
            sock.sendall(json.dumps(payload).encode() + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
            answer = json.loads(data or b"{}")
        except (OSError, ValueError) as exc:
            raise CenterUnavailable(f"the center on {state_dir} did not answer ({exc})") from None
    if not isinstance(answer, dict) or not answer:
        raise CenterUnavailable(f"the center on {state_dir} gave no answer")
    return answer
