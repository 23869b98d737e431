"""``notify.format``: Slack and Teams incoming webhooks get the ``text`` they require,
``json`` stays cronfile's own object; a rejected POST is logged (job and status code) and
shown by ``cronfile status``. The receiver is a real HTTP server on 127.0.0.1 that behaves
like Slack's: 400 for a body without ``text``."""

from __future__ import annotations

import http.server
import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from centerlib import CenterProc, cli

from cronfile.center.webhooks import WebhookRejected, post_webhook, webhook_body
from cronfile.schedules.model import NotifyFormat


class StrictReceiver:
    """Accepts (200) a JSON object with a string ``text``; anything else is 400."""

    def __init__(self) -> None:
        self.accepted: dict[str, list[dict[str, Any]]] = {}
        self.rejected: list[str] = []
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the handler's name
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                ok = isinstance(body, dict) and isinstance(body.get("text"), str) and body["text"]
                if ok:
                    receiver.accepted.setdefault(self.path, []).append(body)
                else:
                    receiver.rejected.append(self.path)
                self.send_response(200 if ok else 400)
                self.end_headers()
                self.wfile.write(b"ok" if ok else b"missing_text_or_fallback_or_attachments")

            def log_message(self, *_: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[StrictReceiver]:
    r = StrictReceiver()
    yield r
    r.close()


PAYLOAD = {"kind": "failure", "job": "nightly", "owner": "billing", "description": None,
           "run_id": "r1", "agent": "local", "status": "failed", "exit_code": 3,
           "scheduled_at": "2026-12-01T02:00:00+00:00", "reason": None, "expectation": None,
           "detail": None}


def test_bodies_per_format() -> None:
    assert webhook_body(NotifyFormat.JSON, PAYLOAD) == PAYLOAD
    assert webhook_body(NotifyFormat.SLACK, PAYLOAD) == {"text": (
        "cronfile: job nightly failed (exit 3)\nslot: 2026-12-01T02:00:00+00:00\n"
        "agent: local\nrun: r1\nowner: billing")}
    teams = webhook_body(NotifyFormat.TEAMS, PAYLOAD)
    assert {k: teams[k] for k in ("@type", "summary", "title", "themeColor")} == {
        "@type": "MessageCard", "summary": "cronfile: job nightly failed (exit 3)",
        "title": "cronfile: job nightly failed (exit 3)", "themeColor": "D70000"}
    assert teams["text"].startswith("cronfile: job nightly failed (exit 3)\n\nslot: ")


def test_a_rejected_post_raises_with_the_status_code(receiver: StrictReceiver) -> None:
    with pytest.raises(WebhookRejected) as caught:
        post_webhook(receiver.url + "/generic", webhook_body(NotifyFormat.JSON, PAYLOAD))
    assert caught.value.status_code == 400
    post_webhook(receiver.url + "/slack", webhook_body(NotifyFormat.SLACK, PAYLOAD))
    assert receiver.rejected == ["/generic"] and len(receiver.accepted["/slack"]) == 1


def _closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_center_posts_each_format_and_reports_a_rejection(tmp_path: Path,
                                                          receiver: StrictReceiver) -> None:
    jobs = "".join(f"""\
  to-{fmt}:
    trigger: {{event: boom}}
    command: "exit 3"
    owner: billing
    notify: {{webhook: "{receiver.url}/{fmt}", {"format: " + fmt if fmt != "json" else ""}}}
""" for fmt in ("slack", "teams", "json"))
    jobs += f"""\
  to-nowhere:
    trigger: {{event: boom}}
    command: "exit 3"
    notify: {{webhook: "http://127.0.0.1:{_closed_port()}/hook", format: slack}}
"""
    center = CenterProc(tmp_path)
    center.write("a.yaml", "apiVersion: cronfile/v1\njobs:\n" + jobs)
    try:
        center.start()
        assert center.cli("trigger", "boom").returncode == 0
        center.wait_events(lambda es: len([e for e in es if e.get("event") in
                                           ("notified", "notify_failed")]) == 4,
                           20, "four notification attempts")
        status_text = cli("status", state=center.state)
        status_json = cli("status", "--format", "json", state=center.state)
    finally:
        assert center.stop() == 0

    # Slack: plain text; Teams: a MessageCard; both carry text and were accepted
    slack = receiver.accepted["/slack"]
    assert [b["text"].splitlines()[0] for b in slack] == ["cronfile: job to-slack failed (exit 3)"]
    assert "owner: billing" in slack[0]["text"]
    teams = receiver.accepted["/teams"]
    assert [(b["@type"], b["title"]) for b in teams] == [
        ("MessageCard", "cronfile: job to-teams failed (exit 3)")]
    # json (the default) has no text: this receiver refuses it
    assert receiver.rejected == ["/json"]

    events = {e["job"]: e for e in center.events()
              if e.get("event") in ("notified", "notify_failed")}
    assert {job: e["event"] for job, e in events.items()} == {
        "to-slack": "notified", "to-teams": "notified", "to-json": "notify_failed",
        "to-nowhere": "notify_failed"}
    assert (events["to-json"]["status_code"], events["to-json"]["error"]) == (400, "HTTP 400 Bad Request")
    assert "status_code" not in events["to-nowhere"]
    assert events["to-nowhere"]["error"].startswith("URLError: ")

    # the center's log says which job and which status code, and not the (secret) URL
    log_lines = {line.split(" for job ", 1)[1].split(":", 1)[0]: line
                 for line in center.log.read_text().splitlines() if "notify failure" in line}
    assert sorted(log_lines) == ["to-json", "to-nowhere"]
    assert log_lines["to-json"].endswith(
        "WARNING notify failure for job to-json: the webhook answered HTTP 400 Bad Request")
    assert "notify failure for job to-nowhere: the webhook failed: URLError: " in log_lines["to-nowhere"]
    assert receiver.url not in log_lines["to-json"]

    assert status_text.returncode == 0, status_text.stderr
    failed = sorted(line for line in status_text.stdout.splitlines()
                    if line.startswith("NOTIFICATION FAILED"))
    assert len(failed) == 2
    assert failed[0].startswith("NOTIFICATION FAILED for to-json at ")
    assert failed[0].endswith(": failure via webhook: HTTP 400 Bad Request")
    assert failed[1].startswith("NOTIFICATION FAILED for to-nowhere at ")
    by_job = {j["job"]: j for j in json.loads(status_json.stdout)["jobs"]}
    assert by_job["to-slack"]["last_notify_failure"] is None
    nf = by_job["to-json"]["last_notify_failure"]
    assert {k: nf[k] for k in ("kind", "via", "status_code", "error")} == {
        "kind": "failure", "via": "webhook", "status_code": 400, "error": "HTTP 400 Bad Request"}
