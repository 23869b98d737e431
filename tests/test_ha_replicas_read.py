"""Two real ``cronfile center --ha --http`` replicas answer run queries from PostgreSQL (SPEC
§9): the leader and the standby give the same bytes for ``runs``/``logs``/``status`` (CLI with
``--state``, HTTP API, remote CLI with ``--center`` of the standby), though only the leader
dispatched; the DSN's password never reaches ``center.json`` or ``ha.json``."""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from centerlib import cli, dispatched, wait_for  # noqa: E402
from httplib import HttpCenter  # noqa: E402
from pglib import PgServer, ha_argv, skip_reason  # noqa: E402

_reason = skip_reason()
pytestmark = [pytest.mark.skipif(_reason is not None, reason=_reason or ""), pytest.mark.slow]

PASSWORD = "pw-never-written-7f3a"


class HaHttpCenter(HttpCenter):
    def __init__(self, root: Path, dsn: str, name: str) -> None:
        super().__init__(root)
        self.dsn, self.name = dsn, name

    def argv(self) -> list[str]:
        return [*super().argv(), *ha_argv(self.dsn, self.name)]

    def role(self) -> str:
        return str(json.loads((self.state / "center.json").read_text()).get("role"))


def records_part(jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What status says of each job from the records (``next`` is computed at each call)."""
    return [{k: v for k, v in j.items() if k != "next"} for j in jobs]


def ok(out: Any) -> str:
    assert out.returncode == 0, out.stderr
    return str(out.stdout)


def test_leader_and_standby_answer_run_queries_the_same_from_postgresql(
        pg: PgServer, tmp_path: Path) -> None:
    database = pg.new_database()
    # trust authentication: the password is not needed, only carried (and never written)
    dsn = database.replace("postgresql://postgres@", f"postgresql://postgres:{PASSWORD}@")
    until = (datetime.now(UTC) + timedelta(seconds=10)).isoformat(timespec="seconds")
    active = f"active: {{until: \"{until}\"}}"
    schedule = (
        "apiVersion: cronfile/v1\njobs:\n"
        f"  tick: {{schedule: \"*/1 * * * * *\", command: \"echo tick\", {active}}}\n"
        f"  flaky: {{schedule: \"*/2 * * * * *\", command: \"echo no; exit 3\", {active}}}\n"
        "  hello: {trigger: {event: hello}, command: \"echo hello from a\"}\n"
    )
    a, b = HaHttpCenter(tmp_path / "a", dsn, "a"), HaHttpCenter(tmp_path / "b", dsn, "b")
    for c in (a, b):
        c.write("jobs.yaml", schedule)
    try:
        a.start()
        a.wait_events(lambda es: any(e.get("event") == "leader_acquired" for e in es), 10, "a leads")
        b.start()
        wait_for(lambda: b.role() == "standby", 10, "b standing by")
        end = datetime.fromisoformat(until).timestamp()
        # every run of the active window ended and was copied to PostgreSQL
        a.wait_runs(lambda rs: datetime.now(UTC).timestamp() > end + 1 and all(
            any(f.get("run_id") == d["run_id"] and f.get("record") == "finished" for f in rs)
            for d in dispatched(rs)), 20, "the window's runs to end")

        def copied() -> bool:
            views = json.loads(ok(cli("runs", "--limit", "0", "--format", "json", state=b.state)))
            return len(views) == len({r["run_id"] for r in a.runs()}) and all(v.get("status") for v in views)

        wait_for(copied, 10, "PostgreSQL to hold every run")
        assert dispatched(b.runs()) == []  # b dispatched nothing; its answers are PostgreSQL's

        for form in ([], ["--job", "flaky"], ["--status", "failed", "--limit", "3"]):
            for fmt in ("text", "json"):
                from_a = ok(cli("runs", *form, "--format", fmt, state=a.state))
                assert ok(cli("runs", *form, "--format", fmt, state=b.state)) == from_a
                remote_b = cli("runs", *form, "--format", fmt, "--center", b.url,
                               "--token-file", str(b.token_path))
                assert ok(remote_b) == from_a
        views = json.loads(ok(cli("runs", "--limit", "0", "--format", "json", state=a.state)))
        assert {v["job"] for v in views} == {"tick", "flaky"} and len(dispatched(a.runs())) >= 4
        assert "failed" in {v["state"] for v in views if v["job"] == "flaky"}
        run_id = next(v["run_id"] for v in views if v["state"] == "failed")
        for fmt in ("text", "json"):
            logs_a = ok(cli("logs", run_id, "--format", fmt, state=a.state))
            assert ok(cli("logs", run_id, "--format", fmt, state=b.state)) == logs_a
            assert ok(cli("logs", run_id, "--format", fmt, "--center", b.url,
                          "--token-file", str(b.token_path))) == logs_a

        for path in ("/api/v1/runs?limit=0", "/api/v1/runs?job=tick&limit=4",
                     f"/api/v1/runs/{run_id}"):
            answers = [c.get(path) for c in (a, b)]
            assert [x.status for x in answers] == [200, 200]
            assert answers[0].body == answers[1].body, path
        statuses = [c.get("/api/v1/status").json() for c in (a, b)]
        assert records_part(statuses[0]["jobs"]) == records_part(statuses[1]["jobs"])
        assert {j["job"]: j["last_status"] for j in statuses[1]["jobs"]} == {
            "flaky": "failed", "tick": "succeeded", "hello": None}
        assert [s["center"]["role"] for s in statuses] == ["leader", "standby"]
        for c in (a, b):
            status = json.loads(cli("status", "--format", "json", state=c.state).stdout)
            assert records_part(status["jobs"]) == records_part(statuses[0]["jobs"])
            remote = cli("status", "--format", "json", "--center", c.url,
                         "--token-file", str(c.token_path))
            assert records_part(json.loads(remote.stdout)["jobs"]) == records_part(statuses[0]["jobs"])
            for name in ("center.json", "ha.json"):
                text = (c.state / name).read_text()
                assert PASSWORD not in text and "dbname=" in text
        # run --wait on the leader: its outcome is read back (from PostgreSQL, or from the
        # leader's own ledger while the copy is on its way)
        out = cli("run", "hello", "--wait", state=a.state)
        assert out.returncode == 0 and out.stdout == "hello from a\n", out
        # the database down: the API says so (503, one message), the CLI exits 1 in one line
        pg.stop()
        try:
            answer = b.get("/api/v1/runs")
            assert answer.status == 503 and "cannot reach PostgreSQL" in answer.json()["error"]
            out = cli("runs", state=b.state)
            assert out.returncode == 1 and out.stderr.startswith("Error: cannot reach PostgreSQL")
            assert "Traceback" not in out.stderr and PASSWORD not in answer.body.decode() + out.stderr
        finally:
            pg.start()
    finally:
        b.stop()
        a.stop()
    # stopped: center.json is gone, ha.json still names the database
    assert not (b.state / "center.json").exists()
    assert json.loads((b.state / "ha.json").read_text())["name"] == "b"
    from_pg = ok(cli("runs", "--limit", "0", "--format", "json", state=b.state))
    assert from_pg == ok(cli("runs", "--limit", "0", "--format", "json", state=a.state))
    # the leader's own JSONL, read as a plain state directory: PostgreSQL holds the very
    # records it wrote there (same ts, same fields in the same order)
    plain = tmp_path / "a-jsonl"
    plain.mkdir()
    for name in ("runs.jsonl", "events.jsonl"):
        (plain / name).write_bytes((a.state / name).read_bytes())
    from_jsonl = ok(cli("runs", "--limit", "0", "--format", "json", state=plain))
    by_run = [sorted(json.loads(text), key=lambda v: v["run_id"]) for text in (from_pg, from_jsonl)]
    assert by_run[0] == by_run[1]
    assert [list(v) for v in by_run[0]] == [list(v) for v in by_run[1]]  # key order too
