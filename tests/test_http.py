"""The center's HTTP API (SPEC §6) against a real ``cronfile center --http`` process."""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from centerlib import cli, finished, wait_for
from httplib import HTTP_TOKEN, HttpCenter

JOBS = """\
apiVersion: cronfile/v1
jobs:
  greet:
    trigger: {event: hello}
    command: ["sh", "-c", "echo hello from greet"]
  boom:
    trigger: {event: never}
    command: "echo going down; exit 3"
    owner: ops
  sleeper:
    trigger: {event: nap}
    command: ["sleep", "60"]
"""


@pytest.fixture
def center(tmp_path: Path) -> Iterator[HttpCenter]:
    c = HttpCenter(tmp_path, watch=False)
    c.write("jobs.yaml", JOBS)
    c.start()
    yield c
    c.stop()


def test_healthz_needs_no_token_and_names_the_revision(center: HttpCenter) -> None:
    answer = center.get("/healthz", token=None)
    assert answer.status == 200
    data = answer.json()
    assert data["ok"] is True
    local = json.loads(center.cli("status", "--format", "json").stdout)
    assert data["revision"] == local["revision"]


@pytest.mark.parametrize("path", ["/api/v1/status", "/api/v1/runs", "/metrics",
                                  "/api/v1/applied"])
def test_api_refuses_a_missing_or_wrong_token_and_logs_the_peer(center: HttpCenter,
                                                                path: str) -> None:
    missing = center.get(path, token=None)
    wrong = center.get(path, token=HTTP_TOKEN[:-1] + "x")
    assert (missing.status, wrong.status) == (401, 401)
    assert missing.headers["WWW-Authenticate"].startswith("Bearer")
    assert center.get(path).status == 200
    wait_for(lambda: f"http 401 GET {path} from 127.0.0.1: wrong bearer token" in center.log_text(),
             5, "the 401 in the log")
    assert f"http 401 GET {path} from 127.0.0.1: missing bearer token" in center.log_text()


def test_a_write_never_happens_on_get(center: HttpCenter) -> None:
    assert center.get("/api/v1/jobs/greet/run").status == 405
    assert center.get("/api/v1/events/hello").status == 405
    assert center.get("/api/v1/sync").status == 405
    assert not finished(center.runs())


def test_run_now_waits_and_shows_the_output_tail(center: HttpCenter) -> None:
    answer = center.post("/api/v1/jobs/greet/run")
    assert answer.status == 200, answer.body
    run_id = answer.json()["results"][0]["run_id"]
    run = center.get(f"/api/v1/runs/{run_id}?wait=20").json()
    assert run["run"]["status"] == "succeeded"
    assert run["run"]["output_tail"] == "hello from greet\n"
    assert [r["record"] for r in run["records"]] == ["dispatched", "started", "finished"]


def test_run_of_an_unknown_job_is_404(center: HttpCenter) -> None:
    answer = center.post("/api/v1/jobs/nope/run")
    assert answer.status == 404
    assert answer.json()["error"] == "no job named 'nope'"
    assert center.get("/api/v1/runs/0123456789").status == 404


def test_runs_filters_match_the_cli(center: HttpCenter) -> None:
    for job in ("greet", "boom", "greet"):
        run_id = center.post(f"/api/v1/jobs/{job}/run").json()["results"][0]["run_id"]
        center.get(f"/api/v1/runs/{run_id}?wait=20")
    center.wait_runs(lambda rs: len(finished(rs)) == 3, 10)
    for query, args in [("job=greet", ["--job", "greet"]), ("status=failed", ["--status", "failed"]),
                        ("limit=1", ["--limit", "1"])]:
        api = center.get(f"/api/v1/runs?{query}").json()
        local = json.loads(center.cli("runs", *args, "--format", "json").stdout)
        assert api == local
    assert [v["job"] for v in center.get("/api/v1/runs?status=failed").json()] == ["boom"]
    bad = center.get("/api/v1/runs?status=weird")
    assert bad.status == 400 and "status: expected one of" in bad.json()["error"]


def test_stop_records_killed_with_who_asked(center: HttpCenter) -> None:
    assert center.post("/api/v1/events/nap").json()["jobs"] == ["sleeper"]
    running = center.wait_runs(lambda rs: [r for r in rs if r.get("job") == "sleeper"
                                           and r.get("record") == "started"], 10)
    run_id = running[0]["run_id"]
    answer = center.post(f"/api/v1/runs/{run_id}/stop", headers={"X-Cronfile-User": "alice@ops"})
    assert answer.status == 200 and answer.json()["job"] == "sleeper"
    run = center.get(f"/api/v1/runs/{run_id}?wait=20").json()["run"]
    assert run["status"] == "killed"
    assert run["stopped_by"] == "alice@ops (http 127.0.0.1)"
    assert run["reason"] == "stopped by alice@ops (http 127.0.0.1)"
    again = center.post(f"/api/v1/runs/{run_id}/stop")
    assert again.status == 404 and "is not running" in again.json()["error"]


def test_sync_applies_or_rejects_with_every_error(center: HttpCenter) -> None:
    center.write("jobs.yaml", JOBS + "  added:\n    schedule: '@daily'\n    command: ['true']\n")
    answer = center.post("/api/v1/sync")
    assert answer.status == 200, answer.body
    assert answer.json()["applied"] is True
    assert answer.json()["diff"]["jobs"] == {"add": 1, "change": 0, "remove": 0}
    center.write("jobs.yaml", JOBS + "  bad:\n    schedule: '0 0 30 2 *'\n    command: ['true']\n"
                 "  worse:\n    command: ['true']\n    timeout: soon\n")
    rejected = center.post("/api/v1/sync")
    assert rejected.status == 422
    errors = rejected.json()["errors"]
    assert len(errors) >= 2 and all("jobs.yaml:" in e for e in errors)
    # the last good revision runs on (applied.json, which status reads, is written after)
    status = wait_for(lambda: (lambda st: st if "added" in [j["job"] for j in st["jobs"]]
                               else None)(center.get("/api/v1/status").json()), 10, "added")
    assert status["last_rejection"]["errors"] == errors


def test_status_is_what_status_state_prints(center: HttpCenter) -> None:
    api = center.get("/api/v1/status").json()
    local = json.loads(center.cli("status", "--format", "json").stdout)
    for field in ("revision", "last_rejection", "jobs", "agents"):
        assert api[field] == local[field]
    assert api["center"]["running"] is True


def test_applied_is_the_applied_file(center: HttpCenter) -> None:
    answer = center.get("/api/v1/applied")
    assert answer.status == 200
    assert answer.body == (center.state / "applied.json").read_bytes()


def test_request_body_is_bounded(center: HttpCenter) -> None:
    answer = center.post("/api/v1/events/hello", body=b"x" * (65 * 1024),
                         headers={"Content-Type": "application/octet-stream"})
    assert answer.status == 413


def test_a_connection_that_never_finishes_its_headers_is_closed(tmp_path: Path) -> None:
    c = HttpCenter(tmp_path, watch=False, http_args=("--http-idle-timeout", "1"))
    c.write("jobs.yaml", JOBS)
    c.start()
    try:
        with socket.create_connection(("127.0.0.1", c.http_port), timeout=10) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
            began = time.monotonic()
            assert sock.recv(100) == b""  # closed by the server, not by our timeout
            assert time.monotonic() - began < 9
    finally:
        c.stop()


def _center_argv(tmp_path: Path, *extra: str) -> list[str]:
    from centerlib import cronfile_command

    (tmp_path / "s").mkdir(exist_ok=True)
    return [*cronfile_command(), "center", "--schedules", str(tmp_path / "s"),
            "--state", str(tmp_path / "st"), *extra]


@pytest.mark.parametrize("extra, message", [
    (("--http", "0.0.0.0:0"), "it needs --http-token-file"),
    (("--http", "0.0.0.0:0", "--http-token-file", "TOKEN"), "--http-insecure"),
    (("--http", "127.0.0.1:0", "--http-tls-cert", "TOKEN"), "go together"),
    (("--http", "nonsense"), "expected HOST:PORT"),
    (("--http-token-file", "TOKEN"), "go with --http HOST:PORT"),
])
def test_exposing_the_center_by_mistake_is_a_usage_error(tmp_path: Path, extra: tuple[str, ...],
                                                         message: str) -> None:
    token = tmp_path / "token"
    token.write_text(HTTP_TOKEN)
    argv = _center_argv(tmp_path, *[str(token) if x == "TOKEN" else x for x in extra])
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_short_token_is_refused(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("short")
    proc = subprocess.run(_center_argv(tmp_path, "--http", "127.0.0.1:0", "--http-token-file",
                                       str(token)), capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert "at least 16 characters" in proc.stderr


def test_tls(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    c = HttpCenter(tmp_path, watch=False,
                   http_args=("--http-tls-cert", str(cert), "--http-tls-key", str(key)))
    c.ssl_context = ssl.create_default_context(cafile=str(cert))
    c.write("jobs.yaml", JOBS)
    c.start()
    try:
        assert c.get("/api/v1/status").status == 200
        assert c.get("/api/v1/status", token=None).status == 401
        c.scheme = "http"  # the same port, in clear: no answer
        with pytest.raises(OSError):
            c.get("/healthz", token=None, timeout=5)
    finally:
        c.stop()


def test_plain_cli_still_reaches_the_center(center: HttpCenter) -> None:
    proc = cli("trigger", "hello", state=center.state)
    assert proc.returncode == 0, proc.stderr
    center.wait_runs(lambda rs: finished(rs, "greet", "succeeded"), 10)


def test_the_readme_documents_every_route() -> None:
    from cronfile.center.api import ROUTES

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    for method, path, what in ROUTES:
        assert f"| {method} | `{path}` | {what} |" in readme, path
