"""The dashboard's routes: login, sessions, CSRF, and the pages of :mod:`.pages`.

A person logs in with the center's HTTP token once; the center answers with a random
session id in a cookie that scripts cannot read (HttpOnly), that no other site's page can
send (SameSite=Strict), and over TLS only travels encrypted (Secure). Each session has its
own CSRF token, which every form carries and every write checks, so even a same-site
page cannot make a logged-in browser run a job. Sessions live in memory: a restarted
center asks people to log in again, which is the safe default.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web

from cronfile.center import assets, pages
from cronfile.center.api import IDLE_WAIT_S, off_loop, requested_by
from cronfile.center.port import CenterPort, CenterSnapshot, run_now
from cronfile.state.queries import JsonlRunStore, RunStore, StoreUnavailable
from cronfile.state.reports import fold_run, latest_run_records

log = logging.getLogger("cronfile.http")

COOKIE = "cronfile_session"
SESSION_S = 12 * 3600.0
MAX_SESSIONS = 1000
CSP = ("default-src 'none'; style-src 'self'; script-src 'self'; img-src 'self'; "
       "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class Session:
    csrf: str
    expires: float


class Dashboard:
    def __init__(self, center: CenterPort, token: str | None, secure_cookie: bool,
                 store: RunStore | None = None) -> None:
        self.center = center
        self.store: RunStore = store or JsonlRunStore(center.state_dir)
        """Where a run's page reads its records (PostgreSQL for an HA center, as the API)."""
        self.token = token
        self.secure_cookie = secure_cookie
        self.sessions: dict[str, Session] = {}
        self._heatmap: tuple[tuple[str, float], pages.Heatmap] | None = None

    def add_routes(self, router: web.UrlDispatcher) -> None:
        router.add_get("/", self.index)
        router.add_get("/runs/{run_id}", self.run)
        router.add_get("/login", self.login_form)
        router.add_post("/login", self.login)
        router.add_post("/logout", self.logout)
        router.add_post("/ui/jobs/{job}/run", self.run_now)
        router.add_post("/ui/runs/{run_id}/stop", self.stop)
        router.add_get("/static/dashboard.css", self.css)
        router.add_get("/static/dashboard.js", self.js)

    # ------------------------------------------------------------------ sessions

    def _session(self, request: web.Request) -> Session | None:
        sid = request.cookies.get(COOKIE)
        session = self.sessions.get(sid) if sid else None
        if session is None or session.expires < time.time():
            return None
        return session

    def _new_session(self, response: web.StreamResponse) -> Session:
        now = time.time()
        if len(self.sessions) >= MAX_SESSIONS:
            self.sessions = {k: s for k, s in self.sessions.items() if s.expires >= now}
            while len(self.sessions) >= MAX_SESSIONS:
                self.sessions.pop(next(iter(self.sessions)))
        sid = secrets.token_urlsafe(32)
        session = self.sessions[sid] = Session(secrets.token_urlsafe(32), now + SESSION_S)
        response.set_cookie(COOKIE, sid, httponly=True, samesite="Strict", path="/",
                            secure=self.secure_cookie, max_age=int(SESSION_S))
        return session

    async def guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Every dashboard route but /login needs a session; every write its CSRF token.
        Without a configured token (loopback only) a session is handed out on first visit."""
        session = self._session(request)
        if session is None and self.token is None and request.method == "GET":
            return await handler(request)
        if session is None:
            if request.method == "GET":
                raise web.HTTPSeeOther("/login")
            log.warning("http 401 %s %s from %s: no session", request.method, request.path,
                        request.remote)
            raise web.HTTPUnauthorized(text="log in first\n")
        if request.method == "POST":
            form = await asyncio.wait_for(request.post(), timeout=10)
            given = str(form.get("csrf") or "")
            if not hmac.compare_digest(given.encode(), session.csrf.encode()):
                log.warning("http 403 %s %s from %s: bad CSRF token", request.method,
                            request.path, request.remote)
                raise web.HTTPForbidden(text="bad or missing CSRF token: reload the page\n")
        request["session"] = session
        return await handler(request)

    def _csrf_for(self, request: web.Request, response: web.StreamResponse) -> str:
        session = request.get("session") or self._new_session(response)
        return str(session.csrf)

    # ------------------------------------------------------------------ pages

    def _html(self, text: str, status: int = 200) -> web.Response:
        return web.Response(text=text, status=status, content_type="text/html",
                            headers={"Content-Security-Policy": CSP,
                                     "X-Content-Type-Options": "nosniff",
                                     "Referrer-Policy": "same-origin",
                                     "Cache-Control": "no-store"})

    async def _heatmap_for(self, snap: CenterSnapshot) -> pages.Heatmap:
        """Recomputed once per revision and hour (walking 24 hours of every job's fires)."""
        start = snap.now - snap.now % 3600
        key = (str(snap.revision.get("content_hash")), start)
        if self._heatmap is not None and self._heatmap[0] == key:
            return self._heatmap[1]
        hm = await off_loop(self.center, lambda: pages.heatmap(snap.jobs, start))
        self._heatmap = (key, hm)
        return hm

    async def index(self, request: web.Request) -> web.Response:
        await asyncio.to_thread(self.center.wait_dispatch_idle, IDLE_WAIT_S)
        snap = self.center.snapshot()
        hm = await self._heatmap_for(snap)
        response = self._html("")
        csrf = self._csrf_for(request, response)
        response.text = await off_loop(self.center, lambda: pages.dashboard_page(snap, hm, csrf))
        return response

    async def run(self, request: web.Request) -> web.Response:
        run_id = request.match_info["run_id"]
        state_dir, store = self.center.state_dir, self.store
        try:
            records = await off_loop(self.center,
                                     lambda: latest_run_records(store, state_dir, run_id))
        except StoreUnavailable as exc:
            return self._html(pages.page("ledger unavailable", f"<p>{pages.e(str(exc))}</p>"), 503)
        if not records:
            return self._html(pages.page("no such run", f"<p>No run {pages.e(run_id)} in the "
                                         "ledger.</p>"), 404)
        view = fold_run(records)
        response = self._html("")
        csrf = self._csrf_for(request, response)
        response.text = pages.run_page(view, records, csrf,
                                       view["state"] in ("running", "dispatched"),
                                       self.center.current_revision())
        return response

    async def login_form(self, request: web.Request) -> web.Response:
        return self._html(pages.login_page())

    async def login(self, request: web.Request) -> web.StreamResponse:
        form = await asyncio.wait_for(request.post(), timeout=10)
        given = str(form.get("token") or "")
        if self.token is not None and not hmac.compare_digest(given.encode(), self.token.encode()):
            log.warning("http 401 POST /login from %s: wrong token", request.remote)
            return self._html(pages.login_page("That token is not right."), 401)
        response = web.HTTPSeeOther("/")
        self._new_session(response)
        return response

    async def logout(self, request: web.Request) -> web.StreamResponse:
        sid = request.cookies.get(COOKIE)
        if sid:
            self.sessions.pop(sid, None)
        response = web.HTTPSeeOther("/login")
        response.del_cookie(COOKIE, path="/")
        return response

    async def run_now(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["job"]
        answer = await run_now(self.center, name)
        started = [r for r in answer.get("results") or [] if r.get("status") == "started"]
        if not answer.get("ok") or not started:
            return self._html(pages.page("not started", f'<section class="card alert"><h2>'
                                         f"{pages.e(str(answer.get('error')))}</h2>"
                                         '<p><a href="/">back</a></p></section>'), 409)
        # the dispatched record is on disk before the run starts: its page exists now
        return web.HTTPSeeOther(f"/runs/{started[0]['run_id']}")

    async def stop(self, request: web.Request) -> web.StreamResponse:
        run_id = request.match_info["run_id"]
        self.center.stop_run(run_id, "dashboard, " + requested_by(request))
        return web.HTTPSeeOther(f"/runs/{run_id}")

    async def css(self, request: web.Request) -> web.Response:
        return web.Response(text=assets.CSS, content_type="text/css",
                            headers={"Cache-Control": "max-age=300"})

    async def js(self, request: web.Request) -> web.Response:
        return web.Response(text=assets.JS, content_type="application/javascript",
                            headers={"Cache-Control": "max-age=300"})


__all__ = ["COOKIE", "Dashboard"]
