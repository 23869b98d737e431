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
import socket
import stat
import tempfile
from pathlib import Path
from typing import Any, Protocol

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


class ControlTarget(Protocol):
    """What the control socket asks of the center: the socket only speaks the protocol."""

    def has_job(self, name: str) -> bool: ...

    async def run_job(self, name: str) -> list[dict[str, Any]]:
        """Start ``name`` now; what became of each start (see ``Center.perform``)."""
        ...

    def trigger(self, event: str) -> list[str]:
        """Queue the jobs that run on ``event``; their names."""
        ...

    async def reload(self) -> dict[str, Any]: ...


class ControlServer:
    def __init__(self, state_dir: Path, center: ControlTarget) -> None:
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
            answer = await self.handle(request if isinstance(request, dict) else {})
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

    async def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        center = self.center
        op = request.get("op")
        if op == "run":
            name = request.get("job")
            if not isinstance(name, str) or not center.has_job(name):
                return {"ok": False, "error": f"no job named {name!r}"}
            results = await center.run_job(name)
            started = [r for r in results if r.get("status") == "started"]
            if not started:
                reasons = "; ".join(str(r.get("reason") or r.get("status")) for r in results)
                return {"ok": False, "job": name, "results": results,
                        "error": f"{name} did not start: {reasons or 'nothing to run'}"}
            return {"ok": True, "job": name, "results": results}
        if op == "trigger":
            event = str(request.get("event"))
            names = center.trigger(event)
            return {"ok": True, "event": event, "jobs": names}
        if op == "reload":
            result = await center.reload()
            return {"ok": result.get("applied", False) or result.get("unchanged", False), **result}
        if op == "ping":
            return {"ok": True, "pid": os.getpid()}
        return {"ok": False, "error": f"unknown op {op!r}"}


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


def apply_to_center(schedules: Path, state_dir: Path | None, center: str | None) -> tuple[str, int]:
    """Validate locally, then have the center on ``state_dir`` load and apply the files."""
    from cronfile.schedules.loader import load_schedules

    if center:
        return ("cronfile apply --center is not supported yet: run it on the center's host "
                "with --state DIR\n", 2)
    result = load_schedules(schedules)
    if result.state is None:
        lines = [p.render() for p in result.problems]
        return "\n".join(lines) + "\nnot applied: fix the errors above\n", 1
    try:
        answer = request(state_dir or Path(".state"), {"op": "reload"})
    except CenterUnavailable as exc:
        return f"{exc}\n", 1
    mine = result.state.revision.content_hash
    theirs = (answer.get("revision") or {}).get("content_hash")
    if theirs and theirs != mine:
        return (f"the center reads other files than {schedules}: it runs {theirs}, these are "
                f"{mine}. Point --schedules at the center's directory (or update it).\n", 1)
    if answer.get("unchanged"):
        return f"No changes: the center already runs revision {answer['revision']['content_hash']}.\n", 0
    if answer.get("applied"):
        d = answer.get("diff", {})
        return f"Applied revision {answer['revision']['content_hash']}: {json.dumps(d)}\n", 0
    return "rejected by the center:\n" + "\n".join(answer.get("errors", [])) + "\n", 1
