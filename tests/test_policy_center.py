"""The center refuses a revision that breaks the policy exactly like an invalid one: the last
good revision keeps running, ``revision_rejected`` carries the policy errors, and the refused
job never runs. A real ``cronfile center`` subprocess on real files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from centerlib import CenterProc, dispatched, finished

EVERY_SECOND = '"*/1 * * * * *"'

POLICY = """\
apiVersion: cronfile/v1
policy:
  - path: billing/
    local: false
    commands: ["/opt/billing/bin/"]
  - path: ""
    local: true
"""


def _rejections(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e.get("event") == "revision_rejected"]


def test_a_revision_that_breaks_the_policy_is_rejected_and_the_last_good_one_kept(
        tmp_path: Path) -> None:
    c = CenterProc(tmp_path)
    try:
        c.write("policy.yaml", POLICY)
        c.write("ops/heartbeat.yaml", f"""\
            apiVersion: cronfile/v1
            jobs:
              heartbeat:
                schedule: {EVERY_SECOND}
                command: ["true"]
            """)
        c.start()
        c.wait_runs(lambda rs: finished(rs, "heartbeat", "succeeded"), 10, "heartbeat to run")
        applied = [e for e in c.events() if e.get("event") == "revision_applied"]
        good = applied[-1]["revision"]["content_hash"]

        # A team file that would run a shell on the center's own host.
        c.write("billing/steal.yaml", f"""\
            apiVersion: cronfile/v1
            jobs:
              steal:
                schedule: {EVERY_SECOND}
                command: "cat /etc/shadow"
            """)
        rejection = c.wait_events(_rejections, 10, "the rejection")[0]
        schedules = c.schedules
        assert rejection["errors"] == [
            f"{schedules}/billing/steal.yaml:3:3: error: jobs.steal.targets: billing/ may not "
            "run jobs on the center's own host, where a job without targets runs (local: false) "
            f"(policy at {schedules}/policy.yaml:3:5)",
            f"{schedules}/billing/steal.yaml:5:5: error: jobs.steal.command: billing/ allows "
            "only argv commands whose program starts with /opt/billing/bin/: a string command "
            f"runs in a shell, which could run anything (policy at {schedules}/policy.yaml:3:5)",
        ]
        assert rejection["kept"]["content_hash"] == good
        before = len(finished(c.runs(), "heartbeat", "succeeded"))
        c.wait_runs(lambda rs: len(finished(rs, "heartbeat", "succeeded")) >= before + 2, 10,
                    "the last good revision to keep running")
        assert dispatched(c.runs(), "steal") == []

        # A policy edit that would refuse a job already running is rejected the same way.
        c.write("policy.yaml", POLICY.replace('  - path: ""\n    local: true\n',
                                              '  - path: ops/\n    local: false\n'))
        (c.schedules / "billing/steal.yaml").unlink()
        refusing = (f"{schedules}/ops/heartbeat.yaml:3:3: error: jobs.heartbeat.targets: ops/ "
                    "may not run jobs on the center's own host, where a job without targets "
                    f"runs (local: false) (policy at {schedules}/policy.yaml:6:5)")
        second = c.wait_events(lambda es: [e for e in _rejections(es) if refusing in e["errors"]],
                               10, "the rejection of the policy edit")[0]
        assert second["errors"] == [refusing]
        assert second["kept"]["content_hash"] == good
        status = c.cli("status")
        # exit 1 while the last change is rejected (issue 9, item 10)
        assert status.returncode == 1 and "REJECTED" in status.stdout
    finally:
        c.stop()
