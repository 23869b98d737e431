"""The center's HTTP server (SPEC §6): API, metrics and dashboard on one aiohttp port.

Security decisions, in one place:

* A non-loopback bind needs a token file, and TLS (``--http-tls-cert/--http-tls-key``) or an
  explicit ``--http-insecure``: :func:`check_options` makes anything else a usage error
  before the center starts. On loopback without a token the server is open (like a local
  Prometheus), and says so in the log.
* ``/api/v1/*`` and ``/metrics`` take ``Authorization: Bearer <token>``, compared with
  :func:`hmac.compare_digest` (constant time); a refusal is 401 and one log line naming the
  peer. ``/healthz`` and ``/login`` are open. The dashboard takes a session cookie
  (HttpOnly, SameSite=Strict) that ``/login`` sets after checking the same token; its writes
  also need the session's CSRF token (see :mod:`cronfile.center.dashboard`).
* Bounded: request bodies (:data:`MAX_BODY`), header lines and counts (aiohttp's parser
  limits), and time: a connection that does not finish its headers, or sits idle, is closed
  after :attr:`HttpOptions.idle_timeout_s`; a body must arrive within
  :attr:`HttpOptions.body_timeout_s`.
"""

from __future__ import annotations

import hmac
import logging
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp import web

from cronfile.center.options import HttpOptions
from cronfile.center.port import CenterPort
from cronfile.transports.admission import is_loopback

log = logging.getLogger("cronfile.http")

MAX_BODY = 64 * 1024
MAX_LINE = 8190
MAX_HEADERS = 64
OPEN_PATHS = frozenset({"/healthz", "/login", "/logout", "/static/dashboard.css", "/static/dashboard.js"})

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class HttpConfigError(ValueError):
    """A bad ``--http*`` combination: a usage error (exit 2)."""


def parse_address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise HttpConfigError(f"--http {text!r}: expected HOST:PORT, e.g. 127.0.0.1:8080")
    return host, int(port)


def check_options(options: HttpOptions) -> None:
    """Refuse what would expose the center: raises :class:`HttpConfigError`."""
    if (options.tls_cert is None) != (options.tls_key is None):
        raise HttpConfigError("--http-tls-cert and --http-tls-key go together")
    if options.token_file is not None:
        read_token(options.token_file)
    if is_loopback(options.host):
        return
    if options.token_file is None:
        raise HttpConfigError(f"--http {options.host}:{options.port} is not a loopback address: "
                              "it needs --http-token-file (anyone could run jobs otherwise)")
    if not options.tls and not options.insecure:
        raise HttpConfigError(f"--http {options.host}:{options.port} is not a loopback address: "
                              "serve it with --http-tls-cert/--http-tls-key, or say "
                              "--http-insecure (the token would cross the network in clear)")


def read_token(path: Path) -> str:
    try:
        token = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise HttpConfigError(f"--http-token-file {path}: cannot read: {exc}") from None
    if len(token) < 16:
        raise HttpConfigError(f"--http-token-file {path}: the token must be at least 16 "
                              "characters")
    return token


def token_matches(expected: str | None, given: str | None) -> bool:
    if expected is None:
        return True
    return given is not None and hmac.compare_digest(given.encode(), expected.encode())


def bearer(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


def peer(request: web.Request) -> str:
    return str(request.remote or "?")


def refuse(request: web.Request, why: str) -> web.Response:
    log.warning("http 401 %s %s from %s: %s", request.method, request.path, peer(request), why)
    return web.json_response({"ok": False, "error": f"unauthorized: {why}"}, status=401,
                             headers={"WWW-Authenticate": 'Bearer realm="cronfile"'})


class HttpServer:
    """Serves one :class:`~cronfile.center.port.CenterPort` on ``options.host:port``."""

    def __init__(self, center: CenterPort, options: HttpOptions) -> None:
        from cronfile.center.api import Api
        from cronfile.center.dashboard import Dashboard

        self.center = center
        self.options = options
        self.token = read_token(options.token_file) if options.token_file else None
        self.api = Api(center, options.body_timeout_s, options.records_dsn)
        self.dashboard = Dashboard(center, self.token, secure_cookie=options.tls,
                                   store=self.api.store)
        self.runner: web.AppRunner | None = None
        self.bound: tuple[str, int] | None = None

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY, middlewares=[self._guard],
                              handler_args={"max_line_size": MAX_LINE,
                                            "max_field_size": MAX_LINE,
                                            "max_headers": MAX_HEADERS})
        self.api.add_routes(app.router)
        self.dashboard.add_routes(app.router)
        return app

    @web.middleware
    async def _guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        path = request.path
        if path in OPEN_PATHS:
            return await handler(request)
        if path.startswith("/api/") or path == "/metrics":
            if not token_matches(self.token, bearer(request)):
                return refuse(request, "missing bearer token" if bearer(request) is None
                              else "wrong bearer token")
            return await handler(request)
        if bearer(request) is not None:  # a script fetching a page: no cookie, no CSRF needed
            if not token_matches(self.token, bearer(request)):
                return refuse(request, "wrong bearer token")
            return await handler(request)
        return await self.dashboard.guard(request, handler)

    async def start(self) -> None:
        context = None
        if self.options.tls:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            context.load_cert_chain(str(self.options.tls_cert), str(self.options.tls_key))
        self.runner = web.AppRunner(self.app(), access_log=None, handle_signals=False,
                                    keepalive_timeout=self.options.idle_timeout_s,
                                    shutdown_timeout=2.0)
        await self.runner.setup()
        site = web.TCPSite(self.runner, self.options.host, self.options.port, ssl_context=context,
                           backlog=128)
        await site.start()
        address = self.runner.addresses[0] if self.runner.addresses else None
        self.bound = (str(address[0]), int(address[1])) if address else (self.options.host,
                                                                          self.options.port)
        scheme = "https" if context else "http"
        log.info("http: serving %s://%s:%d/%s", scheme, self.bound[0], self.bound[1],
                 "" if self.token else " (no --http-token-file: open to local users)")

    async def close(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None


__all__ = ["HttpConfigError", "HttpServer", "check_options", "parse_address"]
