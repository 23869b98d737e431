"""The dashboard in a real headless Chromium: 50 jobs, 3 agents, the login gate, the
heatmap's counts, a failing job marked failed, "run now" making a run appear.

Set CRONFILE_SCREENSHOT=docs/dashboard.png to also save a screenshot of the page.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from browserlib import Browser, available
from centerlib import finished, wait_for
from fleetlib import AgentProc
from httplib import HTTP_TOKEN, HttpCenter

pytestmark = pytest.mark.skipif(not available() and not os.environ.get("CRONFILE_REQUIRE_BROWSER"),
                                reason="needs chromium and chromium-driver (apt-get install "
                                       "chromium chromium-driver; .ci/run does)")

TEAMS = ["billing", "search", "platform", "data", "growth"]
WORDS = ["invoices", "sitemap", "reindex", "backup", "reports", "cleanup", "digest", "sync",
         "export", "warmup"]


def schedules() -> str:
    """50 jobs: 30 at 04:30 UTC every day, 5 every 15 minutes, 15 on events (one of which
    fails), spread over the center and 3 agents."""
    lines = ["apiVersion: cronfile/v1", "agents:"]
    lines += [f"  web-{i}: {{labels: {{role: web}}}}" for i in (1, 2, 3)]
    lines.append("jobs:")
    for i in range(30):
        team = TEAMS[i % 5]
        lines += [f"  {team}-{WORDS[i % 10]}-{i:02d}:", '    schedule: "30 4 * * *"',
                  '    command: ["true"]', f"    owner: {team}",
                  f"    description: nightly {WORDS[i % 10]} for {team}"]
        if i % 3 == 0:
            lines.append("    targets: {labels: {role: web}}")
    for i in range(5):
        lines += [f"  poll-{i}:", '    schedule: "*/15 * * * *"', '    command: ["true"]',
                  "    owner: platform", "    description: health poll"]
    for i in range(13):
        lines += [f"  on-demand-{i:02d}:", f"    trigger: {{event: e{i}}}", '    command: ["true"]']
    lines += ["  greet:", "    trigger: {event: hello}",
              '    command: ["sh", "-c", "echo hello from the dashboard"]', "    owner: growth",
              "    description: says hello"]
    lines += ["  broken:", "    trigger: {event: breakit}", '    command: "echo oops >&2; exit 2"',
              "    owner: billing", "    description: always fails"]
    return "\n".join(lines) + "\n"


def test_dashboard_in_a_real_browser(tmp_path: Path) -> None:
    center = HttpCenter(tmp_path, watch=False)
    center.write("jobs.yaml", schedules())
    center.start()
    agents = [AgentProc(tmp_path, center, f"web-{i}") for i in (1, 2, 3)]
    browser = None
    try:
        for agent in agents:
            agent.start()
        # history: greet succeeded once, broken failed
        for event in ("hello", "breakit"):
            assert center.post(f"/api/v1/events/{event}").status == 200
        center.wait_runs(lambda rs: finished(rs, "greet") and finished(rs, "broken"), 15)

        browser = Browser(tmp_path)
        # the login gate
        browser.get(center.url + "/")
        assert browser.url == center.url + "/login"
        browser.type("#token", "not-the-token-at-all")
        browser.click("#login button")
        wait_for(lambda: browser.js("return !!document.querySelector('.error')"), 10, "the error")
        assert "not right" in browser.js("return document.querySelector('.error').textContent")
        browser.get(center.url + "/")
        assert browser.url == center.url + "/login"
        browser.type("#token", HTTP_TOKEN)
        browser.click("#login button")
        wait_for(lambda: browser.url == center.url + "/", 10, "the dashboard after login")
        (cookie,) = [c for c in browser.cookies() if c["name"] == "cronfile_session"]
        assert cookie["httpOnly"] is True and cookie["sameSite"] == "Strict"

        # job rows
        rows = browser.js("return [...document.querySelectorAll('#jobs tbody tr')]"
                          ".map(r => [r.dataset.job, r.className, r.dataset.status])")
        assert len(rows) == 50
        by_name = {name: (cls, status) for name, cls, status in rows}
        assert by_name["broken"] == ("job failed", "failed")
        assert by_name["greet"] == ("job", "succeeded")
        assert browser.js("return document.querySelector('tr[data-job=broken] .badge')"
                          ".textContent") == "failed"
        assert browser.js("return document.querySelector('tr[data-job=\"billing-invoices-00\"] "
                          "td:nth-child(3)').textContent") == "every day at 04:30"

        # the heatmap: 30 jobs at 04:30 plus the 5 quarter-hourly ones; 5 at 04:15
        def cell(minute: str) -> int:
            return int(browser.js(f"return document.querySelector('#heatmap "
                                  f"[data-minute=\"{minute}\"]').dataset.count"))

        assert (cell("04:30"), cell("04:15"), cell("04:31"), cell("00:00")) == (35, 5, 0, 5)
        assert browser.js("return document.querySelectorAll('#heatmap i').length") == 1440
        assert browser.js("return document.querySelector('#heatmap [data-minute=\"04:30\"]')"
                          ".className") == "l5"

        # agents
        agent_rows = browser.js("return [...document.querySelectorAll('#agents tbody tr')]"
                                ".map(r => [r.dataset.agent, r.classList.contains('connected')])")
        assert agent_rows == [["web-1", True], ["web-2", True], ["web-3", True]]

        # run now -> the run's page, then the run appears in the job's strip
        before = len(finished(center.runs(), "greet"))
        browser.click('button.run-now[data-job="greet"]')
        wait_for(lambda: "/runs/" in browser.url, 10, "the run's page")
        run_id = browser.url.rsplit("/", 1)[1]
        center.wait_runs(lambda rs: len(finished(rs, "greet")) > before, 10)
        browser.get(browser.url)
        assert browser.js("return document.querySelector('#run-state').textContent") == "succeeded"
        assert browser.js("return document.querySelector('#output').textContent") == \
            "hello from the dashboard\n"
        records = browser.js("return [...document.querySelectorAll('#records tbody tr')]"
                             ".map(r => r.children[1].textContent)")
        assert records == ["dispatched", "started", "finished"]
        browser.get(center.url + "/")
        ticks = browser.js("return [...document.querySelectorAll('tr[data-job=greet] .tick')]"
                           ".map(t => t.getAttribute('href'))")
        assert ticks[-1] == f"/runs/{run_id}" and len(ticks) == 2
        if os.environ.get("CRONFILE_SCREENSHOT"):
            screenshot(center, browser, Path(os.environ["CRONFILE_SCREENSHOT"]))
    finally:
        if browser is not None:
            browser.close()
        for agent in agents:
            agent.stop()
        center.stop()


def screenshot(center: HttpCenter, browser: Browser, path: Path) -> None:
    """Some history first, so that the strips show outcomes and durations."""
    for event in ("e0", "e1", "e2", "e3", "breakit", "hello", "e0", "e1", "breakit", "hello"):
        center.post(f"/api/v1/events/{event}")
    center.post("/api/v1/jobs/billing-invoices-00/run")
    center.post("/api/v1/jobs/poll-1/run")
    center.wait_runs(lambda rs: len(finished(rs)) >= 14, 15)
    browser.resize(1440, 1500)
    browser.get(center.url + "/")
    browser.screenshot(path)


def test_writes_need_the_session_and_its_csrf_token(tmp_path: Path) -> None:
    center = HttpCenter(tmp_path, watch=False)
    center.write("jobs.yaml", schedules())
    center.start()
    try:
        opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor())

        def post(path: str, **form: str) -> int:
            data = urllib.parse.urlencode(form).encode()
            try:
                with opener.open(center.url + path, data=data, timeout=30) as r:
                    return int(r.status)
            except urllib.error.HTTPError as exc:
                return exc.code

        assert post("/ui/jobs/greet/run") == 401  # no session
        assert post("/login", token=HTTP_TOKEN) == 200  # redirected to the dashboard
        assert post("/ui/jobs/greet/run") == 403  # no CSRF token
        assert post("/ui/jobs/greet/run", csrf="forged") == 403
        assert not finished(center.runs(), "greet")
        with opener.open(center.url + "/", timeout=30) as r:
            page = r.read().decode()
        csrf = page.split('name="csrf" value="', 1)[1].split('"', 1)[0]
        assert post("/ui/jobs/greet/run", csrf=csrf) == 200  # the run's page
        center.wait_runs(lambda rs: finished(rs, "greet", "succeeded"), 10)
    finally:
        center.stop()
