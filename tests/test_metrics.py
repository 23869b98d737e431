"""``GET /metrics``: parsed with prometheus_client's own parser; names and labels exactly as
SPEC §6 (label ``job_name``, never ``job``)."""

from __future__ import annotations

from pathlib import Path

from centerlib import finished
from fleetlib import AgentProc
from httplib import HttpCenter
from prometheus_client.parser import text_string_to_metric_families

SCHEDULES = """\
apiVersion: cronfile/v1
agents:
  web-1: {labels: {role: web}}
  web-2: {labels: {role: web}}
jobs:
  tick:
    schedule: "* * * * * *"
    command: ["true"]
    owner: platform
    timezone: Europe/Berlin
  broken:
    trigger: {event: go}
    command: "exit 4"
  parked:
    schedule: "0 3 * * *"
    command: ["true"]
    suspend: true
"""

SPEC_FAMILIES = {
    # family name (as the parser reports it) -> (type, labels of its samples)
    "cronfile_job_info": ("gauge", {"job_name", "schedule", "timezone", "concurrency", "owner"}),
    "cronfile_job_next_schedule_timestamp_seconds": ("gauge", {"job_name"}),
    "cronfile_job_last_schedule_timestamp_seconds": ("gauge", {"job_name"}),
    "cronfile_job_last_success_timestamp_seconds": ("gauge", {"job_name"}),
    "cronfile_job_running": ("gauge", {"job_name"}),
    "cronfile_job_suspended": ("gauge", {"job_name"}),
    "cronfile_job_runs": ("counter", {"job_name", "status"}),
    "cronfile_job_run_duration_seconds": ("histogram", {"job_name"}),
    "cronfile_dispatch_lateness_seconds": ("histogram", set()),
    "cronfile_agent_connected": ("gauge", {"agent"}),
    "cronfile_revision_info": ("gauge", {"content_hash", "git_commit"}),
    "cronfile_revision_rejected": ("counter", set()),
}


def scrape(center: HttpCenter) -> dict[str, object]:
    answer = center.get("/metrics")
    assert answer.status == 200
    assert answer.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    return {f.name: f for f in text_string_to_metric_families(answer.body.decode())}


def value(families: dict[str, object], sample_name: str, **labels: str) -> float:
    for family in families.values():
        for sample in family.samples:  # type: ignore[attr-defined]
            if sample.name == sample_name and all(sample.labels.get(k) == v
                                                  for k, v in labels.items()):
                return float(sample.value)
    raise AssertionError(f"no sample {sample_name} {labels}")


def test_metrics_names_labels_and_values(tmp_path: Path) -> None:
    center = HttpCenter(tmp_path, watch=False)
    center.write("jobs.yaml", SCHEDULES)
    center.start()
    agent = AgentProc(tmp_path, center, "web-1", "--label", "role=web")
    try:
        agent.start()
        center.post("/api/v1/events/go")
        center.wait_runs(lambda rs: finished(rs, "broken") and finished(rs, "tick", "succeeded"), 10)
        center.write("jobs.yaml", SCHEDULES + "  bad:\n    command: ['true']\n    timeout: soon\n")
        assert center.post("/api/v1/sync").status == 422
        families = scrape(center)
        for name, (kind, labels) in SPEC_FAMILIES.items():
            assert name in families, name
            family = families[name]
            assert family.type == kind, name  # type: ignore[attr-defined]
            for sample in family.samples:  # type: ignore[attr-defined]
                assert set(sample.labels) - {"le"} == labels, (name, sample)
                assert "job" not in sample.labels
        assert not any(s.name.endswith("_created") for f in families.values()
                       for s in f.samples)  # type: ignore[attr-defined]

        assert value(families, "cronfile_job_info", job_name="tick", schedule="* * * * * *",
                     timezone="Europe/Berlin", concurrency="forbid", owner="platform") == 1
        assert value(families, "cronfile_job_suspended", job_name="parked") == 1
        assert value(families, "cronfile_job_suspended", job_name="tick") == 0
        assert value(families, "cronfile_job_runs_total", job_name="broken", status="failed") == 1
        assert value(families, "cronfile_job_runs_total", job_name="tick", status="succeeded") >= 1
        assert value(families, "cronfile_job_run_duration_seconds_count", job_name="broken") == 1
        assert value(families, "cronfile_job_run_duration_seconds_bucket", job_name="broken",
                     le="+Inf") == 1
        assert value(families, "cronfile_dispatch_lateness_seconds_count") >= 1
        assert value(families, "cronfile_revision_rejected_total") == 1
        assert value(families, "cronfile_agent_connected", agent="web-1") == 1
        assert value(families, "cronfile_agent_connected", agent="web-2") == 0
        revision = center.get("/healthz", token=None).json()["revision"]
        assert value(families, "cronfile_revision_info", content_hash=revision["content_hash"],
                     git_commit="") == 1
        next_tick = value(families, "cronfile_job_next_schedule_timestamp_seconds", job_name="tick")
        last_tick = value(families, "cronfile_job_last_schedule_timestamp_seconds", job_name="tick")
        success = value(families, "cronfile_job_last_success_timestamp_seconds", job_name="tick")
        assert next_tick > last_tick and next_tick - last_tick <= 2  # every second
        assert abs(success - last_tick) < 5
    finally:
        agent.stop()
        center.stop()
