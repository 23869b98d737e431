"""The read side of the HA ledger (SPEC §9): ``runs``, ``logs`` and ``status`` from PostgreSQL
print the same bytes as from the JSONL ledger for the same records, use indexes, name the
database without its password, and fail in one line (exit 1) when it is down.

One set of records is written to both stores: to a state directory's ``runs.jsonl`` and
``events.jsonl`` as the ledger encodes them, and to PostgreSQL as a center copies them
(``append_records`` with the JSONL lines, dispatched records through the claim statement).
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from click.testing import CliRunner

sys.path.insert(0, str(Path(__file__).resolve().parent))

from pglib import PgServer, free_port, skip_reason  # noqa: E402

from cronfile.cli.app import cli  # noqa: E402
from cronfile.ha.claims import Claim, append_records, claim_slots  # noqa: E402
from cronfile.ha.lease import acquire  # noqa: E402
from cronfile.ha.migrations import MIGRATIONS, applied_versions, migrate  # noqa: E402
from cronfile.ha.queries import PgRunStore, runs_statement  # noqa: E402
from cronfile.schedules.loader import load_schedules  # noqa: E402
from cronfile.state.applied import write_applied  # noqa: E402
from cronfile.state.ledger import encode_record  # noqa: E402
from cronfile.state.queries import RunQuery  # noqa: E402

_reason = skip_reason()
pytestmark = pytest.mark.skipif(_reason is not None, reason=_reason or "")

T0 = datetime(2026, 11, 2, 8, 0, tzinfo=UTC)
REVISION = {"content_hash": "sha256:0123456789abcdef", "git_commit": None}


def at(seconds: float) -> str:
    moment = T0 + timedelta(seconds=seconds)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def slot(seconds: float) -> str:
    return (T0 + timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%SZ")


def base(run_id: str, job: str, scheduled: str | None, agent: str = "local",
         transport: str = "local", attempt: int = 1) -> dict[str, Any]:
    return {"run_id": run_id, "job": job, "agent": agent, "transport": transport,
            "scheduled_at": scheduled, "attempt": attempt, "revision": REVISION}


def history() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Run records and events in the order a center writes them: three jobs on two hosts,
    failures, skipped and missed slots (a bounded range), manual runs without a slot, runs
    still open, a retry, a run id used twice; revisions applied and rejected; a failed
    notification."""
    runs: list[dict[str, Any]] = []
    events: list[dict[str, Any]] = [
        {"v": 1, "ts": at(-60), "event": "revision_applied", "revision": REVISION, "initial": True}]
    for i in range(60):
        t = i * 60.0
        for job, agent, transport in (("alpha", "local", "local"), ("beta", "web-1", "tcp")):
            rid = f"{job}-{i:03d}"
            b = base(rid, job, slot(t), agent, transport)
            if job == "beta" and i % 7 == 3:
                runs.append({"v": 1, "ts": at(t + 0.2), "record": "finished", **b,
                             "run_id": f"{rid}-skipped", "status": "skipped",
                             "reason": "the previous run is still running"})
                continue
            runs.append({"v": 1, "ts": at(t + 0.01), "record": "dispatched", **b, "term": 1})
            runs.append({"v": 1, "ts": at(t + 0.02), "record": "started", **b,
                         "started_at": at(t + 0.015)})
            if i == 59 and job == "alpha":
                continue  # still running
            status = "failed" if (i % 5 == 0 and job == "alpha") else "succeeded"
            runs.append({"v": 1, "ts": at(t + 1.5), "record": "finished", **b, "status": status,
                         "exit_code": 1 if status == "failed" else 0, "signal": None,
                         "started_at": at(t + 0.015), "finished_at": at(t + 1.49),
                         "duration_s": 1.475, "output_tail": f"line {i} of {job}\nälpha ☃\n"})
            if status == "failed" and i < 50:
                retry = base(f"{rid}-r2", job, slot(t), agent, transport, attempt=2)
                runs.append({"v": 1, "ts": at(t + 31), "record": "dispatched", **retry,
                             "trigger": "retry", "term": 1})
                runs.append({"v": 1, "ts": at(t + 33), "record": "finished", **retry,
                             "status": "succeeded", "exit_code": 0, "signal": None,
                             "started_at": at(t + 31.1), "finished_at": at(t + 33),
                             "duration_s": 1.9, "output_tail": ""})
        if i % 10 == 4:
            manual = {**base(f"gamma-m{i}", "gamma", None), "trigger": "manual"}
            runs.append({"v": 1, "ts": at(t + 5), "record": "dispatched", **manual, "term": 1})
            runs.append({"v": 1, "ts": at(t + 6), "record": "finished", **manual,
                         "status": "timeout", "exit_code": None, "signal": 15,
                         "started_at": at(t + 5), "finished_at": at(t + 6), "duration_s": 1.0,
                         "output_tail": "slow\n"})
        if i == 20:
            events.append({"v": 1, "ts": at(t + 2), "event": "notify_failed", "job": "alpha",
                           "kind": "failure", "via": "webhook", "status_code": 500,
                           "error": "HTTP 500"})
        if i == 30:
            events.append({"v": 1, "ts": at(t + 3), "event": "revision_rejected",
                           "errors": ["jobs.yaml:3:5: error: bad"], "kept": REVISION})
    runs.append({"v": 1, "ts": at(3700), "record": "finished",
                 **base("gamma-missed", "gamma", slot(3000)), "run_id": "gamma-3000-missed",
                 "status": "missed", "reason": "the center was down", "count": 4,
                 "last_scheduled_at": slot(3300)})
    again = base("alpha-007", "alpha", slot(3650))  # a run id used again: logs shows the last
    runs.append({"v": 1, "ts": at(3650.1), "record": "dispatched", **again, "term": 1})
    runs.append({"v": 1, "ts": at(3651), "record": "finished", **again, "status": "lost",
                 "exit_code": None, "signal": None, "reason": "the center restarted",
                 "finished_at": at(3651)})
    gamma_open = base("gamma-open", "gamma", slot(3660), "web-2", "ssh")
    runs.append({"v": 1, "ts": at(3660.1), "record": "dispatched", **gamma_open, "term": 1})
    return runs, events


def lines_of(records: list[dict[str, Any]]) -> list[str]:
    return [encode_record(r).decode().rstrip("\n") for r in records]


def write_both(state: Path, dsn: str, runs: list[dict[str, Any]],
               events: list[dict[str, Any]]) -> None:
    """The JSONL ledger, and PostgreSQL as a leader fills it: each dispatched record of a
    scheduled first attempt through its claim (the lease checked), the rest copied in
    batches of up to 25 with their JSONL lines."""
    state.mkdir(parents=True, exist_ok=True)
    (state / "runs.jsonl").write_text("".join(line + "\n" for line in lines_of(runs)))
    (state / "events.jsonl").write_text("".join(line + "\n" for line in lines_of(events)))

    async def fill() -> None:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            grant = await acquire(conn, "a", timedelta(hours=1))
            assert grant.won
            await append_records(conn, "a", 1, "event", events, lines_of(events))
            batch: list[dict[str, Any]] = []

            async def flush() -> None:
                if batch:
                    await append_records(conn, "a", 1, "run", batch, lines_of(batch))
                    batch.clear()

            for record in runs:
                claimable = (record["record"] == "dispatched" and record["attempt"] == 1
                             and record["scheduled_at"] and record["run_id"] != "alpha-007"
                             or record["run_id"] == "gamma-open")
                if not claimable:
                    batch.append(record)
                    if len(batch) >= 25:
                        await flush()
                    continue
                await flush()
                moment = datetime.fromisoformat(record["scheduled_at"].replace("Z", "+00:00"))
                claim = Claim(job=record["job"], scheduled_at=moment, target="",
                              run_id=record["run_id"], dispatched=record,
                              line=lines_of([record])[0])
                assert await claim_slots(conn, "a", 1, [claim]) == {record["run_id"]}
            await flush()

    asyncio.run(fill())


SCHEDULES = """apiVersion: cronfile/v1
agents:
  web-1: {labels: {role: web}}
  web-2: {labels: {role: web}}
jobs:
  alpha: {schedule: "* * * * *", command: /bin/true, owner: team-a}
  beta: {schedule: "* * * * *", command: /bin/true, targets: {agents: [web-1]}}
  gamma: {schedule: "*/5 * * * *", command: /bin/true}
"""


@pytest.fixture
def both(tmp_path: Path, dsn: str) -> tuple[Path, str]:
    runs, events = history()
    state = tmp_path / "state"
    write_both(state, dsn, runs, events)
    schedules = tmp_path / "schedules"
    schedules.mkdir()
    (schedules / "jobs.yaml").write_text(SCHEDULES)
    loaded = load_schedules(schedules)
    assert loaded.state is not None, loaded.problems
    write_applied(state, loaded.state)
    return state, dsn


def invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args))
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.output


RUN_FORMS = [
    [], ["--limit", "0"], ["--limit", "1"], ["--limit", "7"], ["--job", "alpha"],
    ["--job", "alpha", "--limit", "20"], ["--job", "beta", "--limit", "0"], ["--job", "gamma"],
    ["--job", "nosuch"], ["--status", "failed", "--limit", "0"], ["--status", "skipped"],
    ["--status", "running"], ["--status", "dispatched"], ["--status", "missed"],
    ["--status", "timeout", "--job", "gamma"], ["--since", slot(1800), "--limit", "0"],
    ["--until", slot(600), "--limit", "0"], ["--since", slot(600), "--until", slot(1200)],
    ["--since", slot(3000), "--job", "gamma"], ["--until", slot(-3600)],
    ["--since", "2026-11-02T09:20:00+01:00", "--until", "2026-11-02T08:30:00Z", "--limit", "3"],
]


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_runs_from_postgresql_print_the_jsonl_bytes_for_every_query_form(
        both: tuple[Path, str], fmt: str) -> None:
    state, dsn = both
    for form in RUN_FORMS:
        jsonl = invoke("runs", "--state", str(state), "--format", fmt, *form)
        pg = invoke("runs", "--ha", dsn, "--state", str(state), "--format", fmt, *form)
        assert jsonl[0] == 0, (form, jsonl)
        assert pg == jsonl, form
    every = json.loads(invoke("runs", "--ha", dsn, "--limit", "0", "--format", "json")[1])
    assert len(every) > 130 and {v["state"] for v in every} == {
        "succeeded", "failed", "skipped", "running", "dispatched", "missed", "timeout", "lost"}


def test_logs_from_postgresql_print_the_jsonl_bytes_for_every_run(both: tuple[Path, str]) -> None:
    state, dsn = both
    runs, _events = history()
    run_ids = list(dict.fromkeys(r["run_id"] for r in runs))
    for run_id in run_ids:
        for fmt in ("text", "json"):
            jsonl = invoke("logs", run_id, "--state", str(state), "--format", fmt)
            pg = invoke("logs", run_id, "--ha", dsn, "--format", fmt)
            assert jsonl[0] == 0 and pg == jsonl, run_id
    entry = json.loads(invoke("logs", "alpha-007", "--ha", dsn, "--format", "json")[1])
    assert [r["record"] for r in entry["records"]] == ["dispatched", "finished"]  # the last use
    code, out = invoke("logs", "nosuch", "--ha", dsn)
    assert code == 1 and "no run nosuch in the ledger of" in out and "dbname=" in out


def test_status_from_postgresql_is_the_jsonl_status(both: tuple[Path, str]) -> None:
    state, dsn = both
    for fmt in ("json", "text"):
        jsonl = invoke("status", "--state", str(state), "--format", fmt)
        pg = invoke("status", "--state", str(state), "--ha", dsn, "--format", fmt)
        assert jsonl[0] == 1  # the last change was rejected: exit 1 either way
        assert pg == jsonl
    status = json.loads(invoke("status", "--state", str(state), "--ha", dsn, "--format", "json")[1])
    jobs = {j["job"]: j for j in status["jobs"]}
    assert jobs["alpha"]["running"] == ["alpha-059"] and jobs["alpha"]["last_status"] == "lost"
    assert jobs["alpha"]["last_notify_failure"]["error"] == "HTTP 500"
    assert jobs["gamma"]["running"] == ["gamma-open"] and jobs["gamma"]["last_status"] == "missed"
    assert {a["name"]: a["last_transport"] for a in status["agents"]} == {"web-1": "tcp", "web-2": "ssh"}
    assert status["last_rejection"]["errors"] == ["jobs.yaml:3:5: error: bad"]


def test_state_dir_of_an_ha_center_reads_postgresql(both: tuple[Path, str], tmp_path: Path) -> None:
    """``center.json`` (a running center) or ``ha.json`` (kept after it stopped) names the
    database: ``--state DIR`` alone then reads PostgreSQL, not the directory's own JSONL."""
    state, dsn = both
    elsewhere = tmp_path / "replica-b"
    elsewhere.mkdir()
    (elsewhere / "runs.jsonl").write_text("")  # a replica that wrote nothing itself
    expected = invoke("runs", "--state", str(state), "--limit", "0")
    assert invoke("runs", "--state", str(elsewhere))[1] == "no runs recorded\n"
    (elsewhere / "ha.json").write_text(json.dumps({"dsn": dsn, "name": "b"}))
    assert invoke("runs", "--state", str(elsewhere), "--limit", "0") == expected
    (elsewhere / "ha.json").unlink()
    (elsewhere / "center.json").write_text(json.dumps({"pid": 1, "ha_dsn": dsn}))
    assert invoke("runs", "--state", str(elsewhere), "--limit", "0") == expected
    assert invoke("logs", "beta-011", "--state", str(elsewhere)) == invoke(
        "logs", "beta-011", "--state", str(state))


def test_a_database_down_is_one_line_exit_1_and_never_shows_the_password(tmp_path: Path) -> None:
    dsn = f"postgresql://cron:s3cret-pw@127.0.0.1:{free_port()}/cron?connect_timeout=2"
    for args in (["runs", "--ha", dsn], ["logs", "x", "--ha", dsn],
                 ["status", "--ha", dsn, "--state", str(tmp_path)]):
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 1, (args, result.output)
        assert "cannot reach PostgreSQL" in result.output and "127.0.0.1" in result.output
        assert "s3cret" not in result.output and "Traceback" not in result.output
    code, out = invoke("status", "--ha", dsn, "--state", str(tmp_path / "nosuch"))
    assert code == 1 and "status --ha needs --state DIR" in out
    code, out = invoke("runs", "--ha", dsn, "--center", "http://127.0.0.1:1")
    assert code == 2 and "either --ha or --center" in out


def test_an_unmigrated_database_says_so(pg: PgServer) -> None:
    bare = pg.new_database()
    code, out = invoke("runs", "--ha", bare)
    assert code == 1 and "no cronfile ledger of this version" in out


def test_rows_copied_before_migration_2_are_still_read(dsn: str) -> None:
    """A row without its JSONL line (copied by an earlier version) is rebuilt from ``body``:
    the same record, in jsonb's key order."""
    record = {"record": "finished", **base("old-1", "alpha", slot(0)), "status": "succeeded"}
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO cronfile_records (kind, ts, run_id, job, center, body)"
                     " VALUES ('run', %s, 'old-1', 'alpha', 'a', %s)",
                     (T0, psycopg.types.json.Jsonb({**record, "run_id": "old-1-skipped",
                                                    "status": "skipped"})))
    views = PgRunStore(dsn).runs(RunQuery(job="alpha"))
    assert len(views) == 1
    assert {k: views[0][k] for k in ("v", "ts", "run_id", "status", "state")} == {
        "v": 1, "ts": "2026-11-02T08:00:00.000Z", "run_id": "old-1-skipped",
        "status": "skipped", "state": "skipped"}


def test_migration_2_is_versioned_and_its_open_runs_match_the_fold(pg: PgServer) -> None:
    """A database at version 1 with records gets version 2 once; the open runs it derives
    from the old rows are the fold's."""
    database = pg.new_database()
    runs, _events = history()
    with psycopg.connect(database, autocommit=True) as conn:
        assert migrate(conn, MIGRATIONS[:1]) == [1]
        for r in runs:
            conn.execute("INSERT INTO cronfile_records (kind, ts, run_id, job, center, body)"
                         " VALUES ('run', %s, %s, %s, 'a', %s)",
                         (r["ts"], r["run_id"], r["job"], psycopg.types.json.Jsonb(r)))
        assert migrate(conn) == [2]
        assert migrate(conn) == []
        assert applied_versions(conn) == [1, 2]
        opened = [row[0] for row in conn.execute("SELECT run_id FROM cronfile_open_runs ORDER BY seq")]
    assert opened == ["alpha-059", "gamma-open"]


def test_runs_of_a_job_with_a_limit_read_an_index_not_the_table(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO cronfile_records (kind, ts, run_id, job, center, body, line)"
            " SELECT 'run', now(), 'r' || i, 'job-' || (i % 100), 'a',"
            " jsonb_build_object('record', 'finished', 'run_id', 'r' || i), '{}'"
            " FROM generate_series(1, 20000) AS i")
        conn.execute("ANALYZE cronfile_records")
        for by_job, index in ((True, "cronfile_records_job_seq"), (False, "cronfile_records_runs")):
            plan = conn.execute("EXPLAIN (FORMAT JSON) " + runs_statement(by_job),
                                {"job": "job-7", "before": 2**63 - 1, "after": 0, "page": 64}).fetchone()
            assert plan is not None
            nodes = list(_nodes(plan[0][0]["Plan"]))
            assert "Seq Scan" not in {n["Node Type"] for n in nodes}, nodes
            assert index in {n.get("Index Name") for n in nodes}, nodes


def _nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", []):
        yield from _nodes(child)


def test_the_store_keeps_its_connection_and_replaces_it_after_a_server_restart(
        pg: PgServer, both: tuple[Path, str]) -> None:
    """The API keeps one store for the center's life: a restarted PostgreSQL costs it one
    reconnect, not an error; a server that is down is StoreUnavailable, never a traceback."""
    from cronfile.state.queries import StoreUnavailable

    _state, dsn = both
    store = PgRunStore(dsn)
    first = store.runs(RunQuery(job="beta", limit=5))
    assert len(first) == 5
    kept = store._conn  # noqa: SLF001 - the test looks at the one connection it keeps
    assert store.runs(RunQuery(job="beta", limit=5)) == first and store._conn is kept  # noqa: SLF001
    pg.restart()
    assert store.runs(RunQuery(job="beta", limit=5)) == first
    pg.stop()
    try:
        with pytest.raises(StoreUnavailable, match="cannot reach PostgreSQL"):
            store.run_records("beta-011")
    finally:
        pg.start()
    assert [r["record"] for r in store.run_records("beta-011")] == ["dispatched", "started", "finished"]


def test_a_run_that_ended_here_is_read_from_this_ledger_until_its_copy_arrives(
        tmp_path: Path, dsn: str) -> None:
    """``run --wait`` and ``?wait=`` ask right after the run ended on this center: while
    PostgreSQL has only its start (the copy runs in the background), this ledger's records
    answer; once the copy is there, PostgreSQL's."""
    from cronfile.state.queries import JsonlRunStore
    from cronfile.state.reports import latest_run_records

    b = base("x1", "alpha", slot(0))
    began = {"v": 1, "ts": at(0.1), "record": "dispatched", **b}
    ended = {"v": 1, "ts": at(2), "record": "finished", **b, "status": "succeeded", "exit_code": 0}
    state = tmp_path / "state"
    state.mkdir()
    (state / "runs.jsonl").write_text("".join(line + "\n" for line in lines_of([began, ended])))
    store = PgRunStore(dsn)

    async def copy(records: list[dict[str, Any]]) -> None:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            await append_records(conn, "a", 1, "run", records, lines_of(records))

    asyncio.run(copy([began]))
    assert [r["record"] for r in store.run_records("x1")] == ["dispatched"]
    assert latest_run_records(store, state, "x1") == [began, ended]
    assert latest_run_records(store, tmp_path / "nosuch", "x1") == [began]
    asyncio.run(copy([{**ended, "output_tail": "from the database"}]))
    assert latest_run_records(store, state, "x1")[-1]["output_tail"] == "from the database"
    assert latest_run_records(JsonlRunStore(state), state, "x1") == [began, ended]


def test_records_the_watermark_writes_reach_postgresql_too(tmp_path: Path, dsn: str) -> None:
    """Run records still queued when the watermark moves are written with it: those go to
    the ledger of record too, as the same lines (else a replica would miss them)."""
    from cronfile.center.counters import RunMetrics
    from cronfile.center.journal import Journal
    from cronfile.center.standby import HaCoordinator
    from cronfile.ha.settings import HaSettings
    from cronfile.state.ledger import Ledger

    state = tmp_path / "state"
    record = {"record": "finished", **base("w1", "alpha", slot(0)), "status": "succeeded",
              "exit_code": 0}

    async def scenario() -> None:
        with Ledger(state) as ledger:
            journal = Journal(ledger, state, RunMetrics(), busy=lambda: True)  # no flush of its own
            journal.ha = HaCoordinator(HaSettings(dsn=dsn, name="a"), lambda _event: None)
            journal.records.add(dict(record))
            journal.write_watermark(now=1e9, mark=1e9 - 1)
            await journal.written()
            await journal.ha.close()

    asyncio.run(scenario())
    jsonl = (state / "runs.jsonl").read_text().splitlines()
    assert len(jsonl) == 1 and json.loads(jsonl[0])["run_id"] == "w1"
    with psycopg.connect(dsn) as conn:
        assert [row[0] for row in conn.execute("SELECT line FROM cronfile_records")] == jsonl
