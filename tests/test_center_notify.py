"""When a Center notifies, in-process: the decision (which attempt, which channels, which
event) is the center's logic, tested on a real Center with a real webhook receiver and a
real notify command, the slot made due at once by a shifted clock instead of waited for.
A ``cronfile center`` subprocess posting each format is tested in test_notify_formats.py.
"""

from __future__ import annotations

import http.server
import json
import threading
import time
from pathlib import Path
from typing import Any

from centerlib import finished
from inprocess import Phase, ShiftedClock

from cronfile.center.daemon import Center


def test_failure_is_notified_once_after_the_last_attempt(tmp_path: Path) -> None:
    """notify: a webhook POST and a command, for the failure of the LAST attempt only (the
    first one is retried), each recorded as a ``notified`` event."""
    posts: list[dict[str, Any]] = []

    class Hook(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - the handler's name
            posts.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *_: Any) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    notes = tmp_path / "notes"
    phase = Phase(tmp_path)
    now = time.time()
    slot = float(int(now) + 10)
    phase.write(f"""\
  always-fails:
    schedule: "{int(slot) % 60} * * * * *"
    command: "exit 2"
    retries: {{max: 1, backoff: 1s}}
    notify:
      webhook: http://127.0.0.1:{server.server_port}/hook
      command: "echo $CRONFILE_NOTIFY_KIND $CRONFILE_NOTIFY_STATUS >> {notes}"
""")

    def both_notified(_c: Center, _rs: list[dict[str, Any]]) -> bool:
        return len([e for e in phase.events() if e.get("event") == "notified"]) >= 2

    try:
        # the slot is due 1 s after the start (after the center applied its schedules, even
        # under load); the stop at the end drains its notifications: after it, all are in
        phase.run(both_notified, ShiftedClock(slot - 1.0 - now), "both notifications", 20)
    finally:
        server.shutdown()
    runs = finished(phase.runs(), "always-fails")
    assert [(r["attempt"], r["status"]) for r in runs] == [(1, "failed"), (2, "failed")]
    assert notes.read_text() == "failure failed\n"
    assert len(posts) == 1
    assert {k: posts[0][k] for k in ("kind", "job", "status", "exit_code", "run_id")} == {
        "kind": "failure", "job": "always-fails", "status": "failed", "exit_code": 2,
        "run_id": runs[1]["run_id"]}
    notified = [e for e in phase.events() if e.get("event") == "notified"]
    assert sorted(e["via"] for e in notified) == ["command", "webhook"]
