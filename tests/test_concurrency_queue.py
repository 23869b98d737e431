"""``concurrency: queue`` on a real center: a slot that comes while the job runs waits and
starts when the run ends; at most one waits, a further slot meanwhile is ``skipped``."""

from __future__ import annotations

from pathlib import Path

from centerlib import CenterProc, finished, parse_ts


def test_queued_slot_starts_when_the_run_ends_and_one_waits_at_most(tmp_path: Path) -> None:
    c = CenterProc(tmp_path)
    c.write("q.yaml", """\
apiVersion: cronfile/v1
jobs:
  slow:
    schedule: "*/1 * * * * *"
    command: "sleep 2.2"
    concurrency: queue
""")
    try:
        c.start()
        c.wait_runs(lambda rs: len(finished(rs, "slow", "succeeded")) >= 3, 30,
                    "three runs of the queued job")
    finally:
        assert c.stop() == 0
    records = finished(c.runs(), "slow")
    ran = sorted((r for r in records if r["status"] == "succeeded"),
                 key=lambda r: parse_ts(r["started_at"]) or 0.0)
    # never two at once: each run starts after the one before it finished
    for before, after in zip(ran, ran[1:], strict=False):
        assert parse_ts(after["started_at"]) >= parse_ts(before["finished_at"])  # type: ignore[operator]
    # the slots after the first run waited: started well after their scheduled time
    waited = [r for r in ran[1:]
              if parse_ts(r["started_at"]) - parse_ts(r["scheduled_at"]) > 0.5]  # type: ignore[operator]
    assert len(waited) >= 2
    skipped = [r for r in records if r["status"] == "skipped"]
    assert skipped, "a slot that came while another already waited must be skipped"
    assert all(r["reason"].startswith("previous run still running and the slot of ")
               and r["reason"].endswith(" already waits (concurrency: queue)") for r in skipped)
    # every slot has exactly one outcome
    slots = [r["scheduled_at"] for r in records]
    assert len(slots) == len(set(slots))
