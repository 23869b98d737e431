"""How a client command reaches a center: its state directory (``--state DIR``, the
center's own host) or its HTTP API (``--center URL``), behind one interface.

Both give the same data (the HTTP API computes status and runs with the same functions over
the same files), so the commands render it once and behave the same either way (SPEC §3).
The run records of an HA center come from PostgreSQL, its ledger of record (``--ha DSN``, or
the DSN its state directory names), so every replica answers the same (SPEC §9).
"""

from __future__ import annotations

import getpass
import json
import os
import socket
import ssl
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Protocol

from cronfile.schedules.model import DesiredState
from cronfile.state.applied import StateFileError, read_applied, state_from_json
from cronfile.state.queries import JsonlRunStore, RunStore, StoreUnavailable
from cronfile.state.reports import build_status, fold_run, latest_run_records, log_entry, query_runs, run_log

TOKEN_ENV = "CRONFILE_TOKEN"
HTTP_TIMEOUT_S = 60.0


class AccessError(Exception):
    """The center could not be reached or refused: exit 1 with this message."""


class CenterAccess(Protocol):
    where: str  # how to name the center in messages and hints (``--state DIR``, ``--center URL``)

    def status(self) -> dict[str, Any]: ...
    def runs(self, job: str | None, status: str | None, since: str | None,
             limit: int | None, until: str | None = None) -> list[dict[str, Any]]: ...
    def run(self, run_id: str, wait_s: float = 0.0) -> dict[str, Any] | None: ...
    def log(self, run_id: str) -> dict[str, Any] | None: ...
    def run_job(self, job: str) -> dict[str, Any]: ...
    def trigger(self, event: str) -> dict[str, Any]: ...
    def stop(self, run_id: str) -> dict[str, Any]: ...
    def backfill(self, job: str, start: str, end: str, dry_run: bool,
                 yes: bool) -> dict[str, Any]: ...
    def sync(self, revision: str | None = None) -> dict[str, Any]: ...
    def applied(self) -> DesiredState | None: ...


def who() -> str:
    """``user@host`` of whoever runs the command, for records such as ``stopped_by``."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}"


def store_for(state_dir: Path, ha_dsn: str | None = None) -> RunStore:
    """Where the run records of the center at ``state_dir`` are read: PostgreSQL with
    ``--ha DSN`` or when the directory names an HA center's database, else its ledger."""
    from cronfile.ha.dsn import dsn_of_state_dir

    dsn = ha_dsn or dsn_of_state_dir(state_dir)
    if dsn is None:
        return JsonlRunStore(state_dir)
    from cronfile.ha.queries import PgRunStore

    return PgRunStore(dsn)


class LocalCenter:
    """The center on this host: files in its state directory, requests on its socket; its
    run records from :func:`store_for`."""

    def __init__(self, state_dir: Path, ha_dsn: str | None = None) -> None:
        self.state_dir = state_dir
        self.where = f"--state {state_dir}"
        self.ha_dsn = ha_dsn
        self.store = store_for(state_dir, ha_dsn)

    def _records(self) -> None:
        """Run records need the state directory unless they come from ``--ha DSN``."""
        if self.ha_dsn is None:
            self._files()

    def _request(self, payload: dict[str, Any], timeout: float = 60.0) -> dict[str, Any]:
        from cronfile.center.control import CenterUnavailable, request

        try:
            return request(self.state_dir, payload, timeout=timeout)
        except CenterUnavailable as exc:
            raise AccessError(str(exc)) from None

    def _files(self) -> None:
        if not self.state_dir.is_dir():
            raise AccessError(f"no state directory at {self.state_dir} (use --state DIR, the "
                              "center's --state)")

    def status(self) -> dict[str, Any]:
        if self.ha_dsn is not None and not self.state_dir.is_dir():
            raise AccessError(f"status --ha needs --state DIR too: the state directory of one of "
                              f"the replicas (its applied schedules); no directory at {self.state_dir}")
        self._files()
        try:
            return build_status(self.state_dir, store=self.store)
        except (StateFileError, StoreUnavailable) as exc:
            raise AccessError(str(exc)) from None

    def runs(self, job: str | None, status: str | None, since: str | None,
             limit: int | None, until: str | None = None) -> list[dict[str, Any]]:
        self._records()
        try:
            return query_runs(self.store, job, status, since, limit, until)
        except StoreUnavailable as exc:
            raise AccessError(str(exc)) from None

    def run(self, run_id: str, wait_s: float = 0.0) -> dict[str, Any] | None:
        if wait_s > 0:
            self._request({"op": "wait", "run_id": run_id, "timeout": wait_s}, timeout=wait_s + 10)
        self._records()
        try:
            records = latest_run_records(self.store, self.state_dir, run_id)
        except StoreUnavailable as exc:
            raise AccessError(str(exc)) from None
        return fold_run(records) if records else None

    def log(self, run_id: str) -> dict[str, Any] | None:
        self._records()
        try:
            return run_log(self.store, run_id)
        except StoreUnavailable as exc:
            raise AccessError(str(exc)) from None

    def run_job(self, job: str) -> dict[str, Any]:
        return self._request({"op": "run", "job": job})

    def trigger(self, event: str) -> dict[str, Any]:
        return self._request({"op": "trigger", "event": event})

    def stop(self, run_id: str) -> dict[str, Any]:
        return self._request({"op": "stop", "run_id": run_id})

    def backfill(self, job: str, start: str, end: str, dry_run: bool,
                 yes: bool) -> dict[str, Any]:
        """``start``/``end`` are ISO-8601 (already checked by the command); the socket
        takes epoch seconds."""
        from cronfile.schedules.nexttimes import parse_time

        return self._request({"op": "backfill", "job": job, "from": parse_time(start),
                              "to": parse_time(end), "dry_run": dry_run, "yes": yes})

    def sync(self, revision: str | None = None) -> dict[str, Any]:
        if revision is None:
            return self._request({"op": "reload"})
        return self._request({"op": "reload", "revision": revision})

    def applied(self) -> DesiredState | None:
        self._files()
        try:
            return read_applied(self.state_dir)
        except StateFileError as exc:
            raise AccessError(str(exc)) from None


class RemoteCenter:
    """A center's HTTP API (SPEC §6), with a bearer token."""

    def __init__(self, url: str, token: str | None) -> None:
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise AccessError(f"--center {url!r}: expected a URL such as https://cron.example:8443")
        self.base = url.rstrip("/")
        self.token = token
        self.where = f"--center {self.base}"

    def _call(self, method: str, path: str, query: dict[str, Any] | None = None,
              timeout: float = HTTP_TIMEOUT_S, ok: tuple[int, ...] = (200,)) -> tuple[int, bytes]:
        if query:
            path += "?" + urllib.parse.urlencode({k: v for k, v in query.items() if v is not None})
        request = urllib.request.Request(self.base + path, method=method,
                                         data=b"" if method == "POST" else None)
        request.add_header("X-Cronfile-User", who())
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(request, timeout=timeout,
                                        context=ssl.create_default_context()) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            body = exc.read()
            if exc.code in ok:
                return exc.code, body
            if exc.code == 401:
                hint = "give --token-file F or set CRONFILE_TOKEN" if not self.token \
                    else "the token was refused"
                raise AccessError(f"{self.base}: 401 unauthorized ({hint})") from None
            raise AccessError(f"{self.base}{path.split('?')[0]}: HTTP {exc.code}: "
                              f"{_error_text(body)}") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise AccessError(f"cannot reach the center at {self.base}: {reason}") from None

    def _json(self, method: str, path: str, query: dict[str, Any] | None = None,
              timeout: float = HTTP_TIMEOUT_S, ok: tuple[int, ...] = (200,)) -> Any:
        _status, body = self._call(method, path, query, timeout, ok)
        try:
            return json.loads(body)
        except ValueError:
            raise AccessError(f"{self.base}{path}: the answer is not JSON") from None

    def status(self) -> dict[str, Any]:
        return dict(self._json("GET", "/api/v1/status"))

    def runs(self, job: str | None, status: str | None, since: str | None,
             limit: int | None, until: str | None = None) -> list[dict[str, Any]]:
        answer = self._json("GET", "/api/v1/runs", {"job": job, "status": status, "since": since,
                                                    "until": until, "limit": limit or 0})
        return list(answer)

    def run(self, run_id: str, wait_s: float = 0.0) -> dict[str, Any] | None:
        quoted = urllib.parse.quote(run_id, safe="")
        answer = self._json("GET", f"/api/v1/runs/{quoted}",
                            {"wait": wait_s} if wait_s > 0 else None,
                            timeout=HTTP_TIMEOUT_S + wait_s, ok=(200, 404))
        return answer.get("run") if isinstance(answer, dict) else None

    def log(self, run_id: str) -> dict[str, Any] | None:
        quoted = urllib.parse.quote(run_id, safe="")
        answer = self._json("GET", f"/api/v1/runs/{quoted}", ok=(200, 404))
        records = answer.get("records") if isinstance(answer, dict) else None
        return log_entry(run_id, list(records)) if records else None

    def run_job(self, job: str) -> dict[str, Any]:
        return dict(self._json("POST", f"/api/v1/jobs/{urllib.parse.quote(job, safe='')}/run",
                               ok=(200, 404, 409)))

    def trigger(self, event: str) -> dict[str, Any]:
        return dict(self._json("POST", f"/api/v1/events/{urllib.parse.quote(event, safe='')}"))

    def stop(self, run_id: str) -> dict[str, Any]:
        return dict(self._json("POST", f"/api/v1/runs/{urllib.parse.quote(run_id, safe='')}/stop",
                               ok=(200, 404)))

    def backfill(self, job: str, start: str, end: str, dry_run: bool,
                 yes: bool) -> dict[str, Any]:
        """A refusal (404 no such job, 422 refused) comes back as ``{"ok": False, "error"}``,
        as from the socket, so the command reports it the same way."""
        query = {"from": start, "to": end, "dry_run": "1" if dry_run else None,
                 "yes": "1" if yes else None}
        return dict(self._json("POST", f"/api/v1/jobs/{urllib.parse.quote(job, safe='')}/backfill",
                               query, ok=(200, 404, 422)))

    def sync(self, revision: str | None = None) -> dict[str, Any]:
        return dict(self._json("POST", "/api/v1/sync", {"revision": revision}, ok=(200, 422)))

    def applied(self) -> DesiredState | None:
        status, body = self._call("GET", "/api/v1/applied", ok=(200, 404))
        if status == 404:
            return None
        try:
            return state_from_json(json.loads(body))
        except (ValueError, StateFileError) as exc:
            raise AccessError(f"{self.base}/api/v1/applied: cannot read it: {exc}") from None


def _error_text(body: bytes) -> str:
    try:
        data = json.loads(body)
    except ValueError:
        return body.decode(errors="replace").strip()[:200]
    return str(data.get("error") if isinstance(data, dict) else data)


def read_token(token_file: Path | None) -> str | None:
    """``--token-file F``, else ``$CRONFILE_TOKEN``, else none."""
    if token_file is not None:
        try:
            return token_file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise AccessError(f"--token-file {token_file}: cannot read: {exc}") from None
    return os.environ.get(TOKEN_ENV) or None


def connect(state_dir: Path, center: str | None, token_file: Path | None,
            ha_dsn: str | None = None) -> CenterAccess:
    if center:
        return RemoteCenter(center, read_token(token_file))
    return LocalCenter(state_dir, ha_dsn)


__all__ = ["AccessError", "CenterAccess", "LocalCenter", "RemoteCenter", "connect", "store_for",
           "who"]
