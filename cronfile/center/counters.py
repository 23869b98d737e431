"""The center's Prometheus counters and histograms, updated as runs end and start.

prometheus_client guards each value with a lock, so a scrape can read them from a worker
thread while the event loop goes on counting (see :mod:`cronfile.center.metrics`).
"""

from __future__ import annotations

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Histogram

DURATION_BUCKETS = (0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0,
                    7200.0, 21600.0)
LATENESS_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0)
NOT_RUN = frozenset({"skipped", "missed", "no_agent"})
"""Outcomes of slots that never ran: counted, but they have no duration."""

# ``_created`` series double every counter and histogram and nothing in SPEC §6 asks for
# them; the center is the only user of prometheus_client in its process.
prometheus_client.disable_created_metrics()


class RunMetrics:
    """The counters and histograms, fed by the center as things happen."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.runs_total = Counter("cronfile_job_runs", "Finished runs by outcome.",
                                  ["job_name", "status"], registry=self.registry)
        self.run_duration = Histogram("cronfile_job_run_duration_seconds",
                                      "How long runs took.", ["job_name"],
                                      buckets=DURATION_BUCKETS, registry=self.registry)
        self.lateness = Histogram("cronfile_dispatch_lateness_seconds",
                                  "How late a scheduled run was dispatched after its slot.",
                                  buckets=LATENESS_BUCKETS, registry=self.registry)
        self.rejected = Counter("cronfile_revision_rejected",
                                "Schedule revisions rejected as invalid.", registry=self.registry)

    def run_finished(self, job: str, status: str, duration_s: float | None) -> None:
        self.runs_total.labels(job, status).inc()
        if duration_s is not None and status not in NOT_RUN:
            self.run_duration.labels(job).observe(max(float(duration_s), 0.0))

    def dispatched(self, lateness_s: float) -> None:
        self.lateness.observe(max(lateness_s, 0.0))

    def revision_rejected(self) -> None:
        self.rejected.inc()


__all__ = ["RunMetrics"]
