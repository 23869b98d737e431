"""Helpers for HTTP tests: a real ``cronfile center --http`` on a free 127.0.0.1 port, and a
small urllib client (what any HTTP client of the API would send)."""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from centerlib import wait_for
from fleetlib import FleetCenter, free_port

HTTP_TOKEN = "http-test-token-0123456789abcdef"


@dataclass(frozen=True)
class Answer:
    status: int
    body: bytes
    headers: dict[str, str]

    def json(self) -> Any:
        return json.loads(self.body)


class HttpCenter(FleetCenter):
    """A center with ``--http 127.0.0.1:PORT --http-token-file F`` (and more options), which
    also listens for agents (:class:`fleetlib.AgentProc`)."""

    def __init__(self, root: Path, *, http_args: tuple[str, ...] = (), token: bool = True,
                 **kw: Any) -> None:
        super().__init__(root, **kw)
        self.http_port = free_port()
        self.token_path = root / "http-token"
        self.token_path.write_text(HTTP_TOKEN + "\n")
        self.token_path.chmod(0o600)
        self.with_token = token
        self.http_args = http_args
        self.scheme = "https" if "--http-tls-cert" in http_args else "http"
        self.ssl_context: ssl.SSLContext | None = None

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.http_port}"

    def argv(self) -> list[str]:
        argv = [*super().argv(), "--http", f"127.0.0.1:{self.http_port}", *self.http_args]
        if self.with_token:
            argv += ["--http-token-file", str(self.token_path)]
        return argv

    def wait_ready(self, timeout: float = 15.0) -> None:
        super().wait_ready(timeout)
        wait_for(lambda: self.request("GET", "/healthz", token=None).status == 200, timeout,
                 "the HTTP server")

    def request(self, method: str, path: str, *, token: str | None = HTTP_TOKEN,
                body: bytes | None = None, headers: dict[str, str] | None = None,
                timeout: float = 30.0) -> Answer:
        req = urllib.request.Request(self.url + path, data=body, method=method,
                                     headers=dict(headers or {}))
        if token is not None:
            req.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(req, timeout=timeout, context=self.ssl_context) as resp:
                return Answer(resp.status, resp.read(), dict(resp.headers))
        except urllib.error.HTTPError as exc:
            return Answer(exc.code, exc.read(), dict(exc.headers))
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, ConnectionRefusedError):
                return Answer(0, b"", {})
            raise

    def get(self, path: str, **kw: Any) -> Answer:
        return self.request("GET", path, **kw)

    def post(self, path: str, **kw: Any) -> Answer:
        return self.request("POST", path, **kw)
