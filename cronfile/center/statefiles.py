"""The center's own files in the state directory, besides the ledger and ``applied.json``.

* ``center.lock``: held for the life of the process (one center per state directory);
* ``center.json``: who runs (pid, start, listen address), removed on a clean stop;
* ``ha.json``: with ``--ha``, the database (DSN without password) and the replica's name,
  kept after a stop so ``cronfile runs --state DIR`` still reads the ledger of record;
* ``places.json``: each pool's and capped agent's runs in flight and waiting starts, for
  ``cronfile status`` (rewritten at most once a second while they change);
* ``watermark``: all slots up to it were handled, which tells the next start how long it
  was down (fsynced: an empty watermark after a power cut would hide the outage).
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

from cronfile.center.options import CenterOptions
from cronfile.ha.dsn import HA_FILE, dsn_without_password
from cronfile.state.ledger import parse_iso
from cronfile.state.private import FILE_MODE

WATERMARK_FILE = "watermark"
CENTER_FILE = "center.json"
PLACES_FILE = "places.json"


def read_watermark(state_dir: Path, last_ts: str | None) -> float | None:
    """How far the previous center got. Without a usable watermark file (first start,
    or lost in a crash) the ledger's last timestamp (``last_ts``, from its summary) is the
    best lower bound."""
    try:
        return float((state_dir / WATERMARK_FILE).read_text().strip())
    except (OSError, ValueError):
        pass
    return parse_iso(last_ts)


def write_watermark(state_dir: Path, mark: float) -> None:
    path = state_dir / WATERMARK_FILE
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    try:
        os.write(fd, f"{mark:.3f}\n".encode())
        os.fsync(fd)  # an empty watermark after a power cut would hide the outage
    finally:
        os.close(fd)
    os.replace(tmp, path)


def write_places_file(state_dir: Path, snapshot: dict[str, Any]) -> None:
    """``places.json`` (atomic replace; not fsynced: status only, rebuilt by the center)."""
    path = state_dir / PLACES_FILE
    tmp = path.with_suffix(".tmp-places")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    try:
        os.write(fd, json.dumps(snapshot, indent=1).encode() + b"\n")
    finally:
        os.close(fd)
    os.replace(tmp, path)


def write_center_file(state_dir: Path, options: CenterOptions, started_at: str,
                      ha: dict[str, Any] | None = None) -> None:
    """With ``--ha`` it also names the replica, its role, term and the lease it last saw
    (``status --format json`` shows them under ``center``) and the database it uses (the
    DSN without its password), rewritten whenever one of them changes."""
    info: dict[str, Any] = {"pid": os.getpid(), "started_at": started_at, "listen": options.listen,
                            "schedules": str(options.schedules)}
    if ha is not None and options.ha is not None:
        info.update(ha, ha_dsn=dsn_without_password(options.ha.dsn))
        _replace(state_dir / HA_FILE, {"dsn": info["ha_dsn"], "name": options.ha.name})
    _replace(state_dir / CENTER_FILE, info)


def _replace(path: Path, info: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(info) + "\n")
    os.replace(tmp, path)  # readers never see half a file


RESERVE_FILE = "reserve"
RESERVE_BYTES = 256 * 1024
"""Room kept in ``<state>/reserve`` for the last records of a center that stops on a full
disk (its pending records, the watermark, ``center_stopped``): deleted then, rewritten at
the next start."""


def reserve_space(state_dir: Path) -> None:
    """Hold :data:`RESERVE_BYTES` of the state directory's disk (best effort)."""
    path = state_dir / RESERVE_FILE
    try:
        if path.exists() and path.stat().st_size >= RESERVE_BYTES:
            return
        with open(path, "wb") as f:
            f.write(b"\0" * RESERVE_BYTES)
            f.flush()
            os.fsync(f.fileno())
    except OSError:
        with contextlib.suppress(OSError):
            path.unlink()


def release_reserve(state_dir: Path) -> bool:
    """Give the reserved room back to the disk; False if there was none."""
    try:
        (state_dir / RESERVE_FILE).unlink()
    except OSError:
        return False
    return True


def read_known_agents(state_dir: Path) -> set[str]:
    """The agents connected to the previous center (its last ``agents.json``)."""
    try:
        value = json.loads((state_dir / "agents.json").read_text())
    except (OSError, ValueError):
        return set()
    if not isinstance(value, list):
        return set()
    return {str(a["name"]) for a in value if isinstance(a, dict) and "name" in a}


class CenterError(Exception):
    """The center cannot start (the message says why)."""


def lock_state_dir(state_dir: Path) -> int:
    """Hold ``<state>/center.lock`` for the life of the process: two centers on one state
    directory would each dispatch every slot."""
    import fcntl

    # 0600 and ours: flock() works on a read-only descriptor, so a lock file other users
    # can open would let any of them hold it and keep the center from starting.
    fd = os.open(state_dir / "center.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, FILE_MODE)
    owner = os.fstat(fd).st_uid
    if owner != os.geteuid():
        os.close(fd)
        raise CenterError(f"{state_dir / 'center.lock'} belongs to uid {owner}, not to the "
                          "center's user: remove it")
    os.fchmod(fd, FILE_MODE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        other = os.read(fd, 64).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise CenterError(f"another center (pid {other}) is using the state directory "
                          f"{state_dir}") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd
