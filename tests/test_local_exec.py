"""The local executor against real processes: no mocks, bounded waits, no blind sleeps."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import signal
import stat
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from cronfile.schedules.model import RunStatus, SecretRef
from cronfile.transports.executor import RunOutcome, RunRefused, RunRequest
from cronfile.transports.local import (
    RUN_AS_PATH,
    LocalExecutor,
    LocalRunHandle,
    OutputTail,
    Redactor,
)

BASE_ENV = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "CENTER_ONLY": "center-value"}


def request(command: tuple[str, ...] | str, **kwargs: object) -> RunRequest:
    fields: dict[str, object] = {"run_id": "run-1", "job": "job-a", "command": command}
    fields.update(kwargs)
    return RunRequest(**fields)  # type: ignore[arg-type]


def run(req: RunRequest, executor: LocalExecutor | None = None) -> RunOutcome:
    async def go() -> RunOutcome:
        handle = await (executor or LocalExecutor(base_env=BASE_ENV)).start(req)
        return await asyncio.wait_for(handle.wait(), 8)

    return asyncio.run(go())


def refused(req: RunRequest, executor: LocalExecutor | None = None) -> str:
    with pytest.raises(RunRefused) as info:
        run(req, executor)
    return str(info.value)


def wait_group_gone(pgid: int, within_s: float = 5.0) -> None:
    """Orphans are re-parented to init, which may reap lazily; allow a bounded wait."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        assert time.monotonic() < deadline, f"process group {pgid} survived"
        time.sleep(0.02)


def parse_env(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


# -- commands and exit ----------------------------------------------------------------------


def test_argv_runs_without_a_shell() -> None:
    out = run(request(("echo", "$HOME", "a;b", "*")))
    assert out.status is RunStatus.SUCCEEDED
    assert out.exit_code == 0 and out.signal is None
    assert out.output_tail == "$HOME a;b *\n"


def test_string_runs_with_sh_and_captures_stderr() -> None:
    out = run(request("echo $((1 + 2)); echo oops >&2"))
    assert out.status is RunStatus.SUCCEEDED
    assert out.output_tail == "3\noops\n"


def test_non_zero_exit_is_failed_with_the_code() -> None:
    out = run(request("exit 3"))
    assert out.status is RunStatus.FAILED
    assert out.exit_code == 3 and out.signal is None


def test_death_by_signal_is_failed_with_the_signal_number() -> None:
    out = run(request("kill -KILL $$"))
    assert out.status is RunStatus.FAILED
    assert out.signal == 9 and out.exit_code is None
    assert out.reason and "SIGKILL" in out.reason


def test_times_are_aware_utc_and_ordered() -> None:
    out = run(request(("true",)))
    assert out.started_at.utcoffset() == timedelta(0)
    assert out.finished_at.utcoffset() == timedelta(0)
    assert out.started_at <= out.finished_at
    assert out.duration_s >= 0


def test_stdin_is_dev_null() -> None:
    out = run(request(("cat",)))  # would hang forever on an inherited terminal or pipe
    assert out.status is RunStatus.SUCCEEDED and out.output_tail == ""


def test_each_run_has_its_own_process_group_and_session() -> None:
    out = run(request("ps -o pid=,pgid=,sid= -p $$"))
    pid, pgid, sid = out.output_tail.split()
    assert pid == pgid == sid


def test_command_not_found_is_refused() -> None:
    assert refused(request(("/no/such/program", "x"))) == "command not found: /no/such/program"
    assert refused(request(("no-such-program-xyz",))) == "command not found: no-such-program-xyz"


def test_command_not_executable_is_refused(tmp_path: Path) -> None:
    script = tmp_path / "script.sh"
    script.write_text("#!/bin/sh\necho hi\n")
    script.chmod(stat.S_IRUSR | stat.S_IWUSR)
    message = refused(request((str(script),)))
    assert message.startswith(f"command not executable: {script}")


def test_shell_command_not_found_fails_with_127() -> None:
    out = run(request("no-such-program-xyz"))
    assert out.status is RunStatus.FAILED and out.exit_code == 127
    assert "not found" in out.output_tail


def test_empty_command_is_refused() -> None:
    assert refused(request(())) == "empty command"
    assert refused(request("  ")) == "empty command"


# -- environment ----------------------------------------------------------------------------


def test_environment_is_a_minimal_base_job_env_and_cronfile_vars(tmp_path: Path) -> None:
    """Finding 5: a job used to inherit the executor's whole environment (``from_env``
    secrets of other jobs, the center's own credentials)."""
    executor = LocalExecutor(state_dir=tmp_path, base_env={**BASE_ENV, "LANG": "C.UTF-8"})
    req = request(
        ("env",),
        run_id="r-42",
        attempt=2,
        scheduled_at=datetime(2026, 11, 22, 18, 58, tzinfo=UTC),
        env=(("GREETING", "hello world"), ("CRONFILE_RUN_ID", "spoofed")),
    )
    env = parse_env(run(req, executor).output_tail)
    me = pwd.getpwuid(os.geteuid())
    assert set(env) == {"HOME", "USER", "LOGNAME", "SHELL", "PATH", "LANG", "GREETING",
                        "CRONFILE_JOB", "CRONFILE_RUN_ID", "CRONFILE_ATTEMPT",
                        "CRONFILE_SCHEDULED_AT", "CRONFILE_STATE_DIR"}
    assert (env["HOME"], env["USER"], env["LOGNAME"]) == (me.pw_dir, me.pw_name, me.pw_name)
    assert (env["SHELL"], env["PATH"], env["LANG"]) == ("/bin/sh", BASE_ENV["PATH"], "C.UTF-8")
    assert env["GREETING"] == "hello world"
    assert env["CRONFILE_JOB"] == "job-a"
    assert env["CRONFILE_RUN_ID"] == "r-42"  # identity variables win over the job's env
    assert env["CRONFILE_ATTEMPT"] == "2"
    assert env["CRONFILE_SCHEDULED_AT"] == "2026-11-22T18:58:00Z"
    assert env["CRONFILE_STATE_DIR"] == str(tmp_path)


def test_manual_run_has_empty_scheduled_at_and_no_state_dir() -> None:
    env = parse_env(run(request(("env",))).output_tail)
    assert env["CRONFILE_SCHEDULED_AT"] == ""
    assert "CRONFILE_STATE_DIR" not in env


def test_secrets_are_resolved_and_redacted(tmp_path: Path) -> None:
    secret_file = tmp_path / "db-password"
    secret_file.write_text("file-s3cr3t\n")  # one trailing newline is stripped
    executor = LocalExecutor(base_env={**BASE_ENV, "API_TOKEN_SRC": "env-t0ken"})
    req = request(
        'test "$DB_PASSWORD" = file-s3cr3t && test "$TOKEN" = env-t0ken && echo resolved; '
        'echo "pw=$DB_PASSWORD tok=$TOKEN"; echo "$DB_PASSWORD" >&2',
        env=(
            ("DB_PASSWORD", SecretRef(from_file=str(secret_file))),
            ("TOKEN", SecretRef(from_env="API_TOKEN_SRC")),
        ),
    )
    out = run(req, executor)
    assert out.status is RunStatus.SUCCEEDED
    assert out.output_tail == "resolved\npw=*** tok=***\n***\n"


def test_secret_cut_by_the_tail_window_leaves_no_fragment(tmp_path: Path) -> None:
    secret_file = tmp_path / "s"
    secret_file.write_text("ABCDEFGHIJ")
    req = request(
        "printf 'ABCDEFGHIJ12'",
        env=(("S", SecretRef(from_file=str(secret_file))),),
        output_keep=5,
    )
    tail = run(req).output_tail
    assert tail == "***12"


def test_missing_secret_file_is_refused_naming_variable_and_path(tmp_path: Path) -> None:
    present = tmp_path / "present"
    present.write_text("do-not-leak-me")
    missing = tmp_path / "missing"
    message = refused(
        request(
            ("true",),
            env=(
                ("GOOD", SecretRef(from_file=str(present))),
                ("DB_PASSWORD", SecretRef(from_file=str(missing))),
            ),
        )
    )
    assert "DB_PASSWORD" in message and str(missing) in message
    assert "do-not-leak-me" not in message


def test_missing_secret_env_is_refused_naming_variable_and_source() -> None:
    message = refused(request(("true",), env=(("TOKEN", SecretRef(from_env="NOPE_NOT_SET")),)))
    assert "TOKEN" in message and "NOPE_NOT_SET" in message


# -- workdir and users ----------------------------------------------------------------------


def test_workdir_is_the_childs_cwd(tmp_path: Path) -> None:
    out = run(request(("pwd",), workdir=str(tmp_path)))
    assert out.output_tail.strip() == str(tmp_path)


def test_missing_workdir_is_refused() -> None:
    assert refused(request(("pwd",), workdir="/x/no/such")) == "workdir /x/no/such does not exist"


def test_unknown_user_is_refused() -> None:
    assert "no-such-user-xyz" in refused(request(("id",), run_as="no-such-user-xyz"))


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")


@needs_root
def test_run_as_gets_the_users_ids_groups_and_a_clean_env() -> None:
    nobody = pwd.getpwnam("nobody")
    req = request(
        "id -u; id -g; id -G; grep '^Groups:' /proc/self/status; env",
        run_as="nobody",
        env=(("JOB_VAR", "job-value"),),
    )
    out = run(req)
    assert out.status is RunStatus.SUCCEEDED, out.output_tail
    lines = out.output_tail.splitlines()
    assert lines[0] == str(nobody.pw_uid)
    assert lines[1] == str(nobody.pw_gid)
    groups = lines[2].split()
    assert "0" not in groups
    assert set(groups) == {str(g) for g in os.getgrouplist("nobody", nobody.pw_gid)}
    proc_groups = lines[3].split()[1:]
    assert "0" not in proc_groups
    env = parse_env(out.output_tail)
    assert "CENTER_ONLY" not in env
    assert env["JOB_VAR"] == "job-value"
    assert env["USER"] == env["LOGNAME"] == "nobody"
    assert env["HOME"] == nobody.pw_dir
    assert env["PATH"] == RUN_AS_PATH
    assert env["CRONFILE_JOB"] == "job-a"


# -- timeouts, stops and stray processes -----------------------------------------------------


def test_timeout_kills_the_whole_group() -> None:
    async def go() -> tuple[RunOutcome, int]:
        executor = LocalExecutor(base_env=BASE_ENV)
        handle = await executor.start(
            request("sleep 1000 & sleep 1000", timeout_s=0.3, kill_grace_s=2)
        )
        return await asyncio.wait_for(handle.wait(), 8), handle.pgid

    started = time.monotonic()
    out, pgid = asyncio.run(go())
    assert out.status is RunStatus.TIMEOUT
    assert out.signal == 15
    assert time.monotonic() - started < 3
    wait_group_gone(pgid)


def test_timeout_escalates_to_sigkill_after_grace() -> None:
    out = run(request("trap '' TERM; sleep 1000", timeout_s=0.2, kill_grace_s=0.3))
    assert out.status is RunStatus.TIMEOUT
    assert out.signal == 9
    assert out.duration_s < 3


def test_leftover_processes_are_stopped_after_a_normal_exit() -> None:
    async def go() -> tuple[RunOutcome, int]:
        handle = await LocalExecutor(base_env=BASE_ENV).start(
            # the background child keeps the output pipe open, and one of them ignores SIGTERM
            request("sleep 1000 & (trap '' TERM; sleep 1000) & echo main-done", kill_grace_s=0.5)
        )
        return await asyncio.wait_for(handle.wait(), 8), handle.pgid

    started = time.monotonic()
    out, pgid = asyncio.run(go())
    assert out.status is RunStatus.SUCCEEDED and out.exit_code == 0
    assert out.output_tail == "main-done\n"
    assert out.reason and "process group" in out.reason
    assert time.monotonic() - started < 4
    wait_group_gone(pgid)


def test_a_process_that_left_the_group_cannot_hold_the_run_open() -> None:
    # setsid moves the child to a new session, out of reach of the group signals; it still
    # holds the output pipe, and the run must end anyway, after a bounded wait for EOF.
    started = time.monotonic()
    out = run(request("setsid sleep 30 & echo $!", kill_grace_s=0.3))
    escaped = int(out.output_tail.split()[0])
    try:
        assert out.status is RunStatus.SUCCEEDED
        assert time.monotonic() - started < 3
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(escaped, signal.SIGKILL)


def test_stop_reports_killed_with_reason_and_wait_is_shared() -> None:
    async def go() -> list[RunOutcome]:
        handle = await LocalExecutor(base_env=BASE_ENV).start(request("sleep 1000"))
        waiters = [asyncio.create_task(handle.wait()) for _ in range(3)]
        await asyncio.wait_for(handle.stop("replaced by a newer run", grace_s=1), 5)
        return [*await asyncio.gather(*waiters), await handle.wait()]

    outcomes = asyncio.run(go())
    assert all(o is outcomes[0] for o in outcomes)
    assert outcomes[0].status is RunStatus.KILLED
    assert outcomes[0].reason == "replaced by a newer run"


def test_cancelled_waiter_does_not_cancel_the_run() -> None:
    async def go() -> RunOutcome:
        handle = await LocalExecutor(base_env=BASE_ENV).start(request("sleep 0.2; echo ok"))
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(handle.wait(), 0.01)
        return await asyncio.wait_for(handle.wait(), 5)

    out = asyncio.run(go())
    assert out.status is RunStatus.SUCCEEDED and out.output_tail == "ok\n"


def test_stop_after_the_end_changes_nothing() -> None:
    async def go() -> RunOutcome:
        handle = await LocalExecutor(base_env=BASE_ENV).start(request(("true",)))
        await handle.wait()
        await handle.stop("too late")
        return await handle.wait()

    assert asyncio.run(go()).status is RunStatus.SUCCEEDED


# -- output ---------------------------------------------------------------------------------


def test_large_output_keeps_only_the_tail() -> None:
    req = request("yes abcdefgh | head -c 20000007; echo END", output_keep=1000)
    started = time.monotonic()
    out = run(req)
    assert time.monotonic() - started < 6
    assert out.status is RunStatus.SUCCEEDED
    assert len(out.output_tail) <= 1000
    assert out.output_tail.endswith("abcdefgh\nabcdefgh\nEND\n")


def test_output_tail_memory_is_bounded() -> None:
    tail = OutputTail(keep=100, margin=9)
    chunk = b"x" * 65536
    for _ in range(1600):  # 100 MiB
        tail.feed(chunk)
    assert tail.total == 1600 * 65536
    assert len(tail._buf) == 109
    assert tail.text(Redactor()) == "x" * 100


def test_tail_cut_inside_a_utf8_character_is_clean() -> None:
    tail = OutputTail(keep=4)
    tail.feed("aé€".encode())  # 1 + 2 + 3 bytes; the cut falls inside "é"
    assert tail.text(Redactor()) == "€"


def test_invalid_utf8_ansi_and_fake_records_are_harmless() -> None:
    out = run(request(r"""printf '\377\376 \033[31mred\033[0m\n{"status":"x"}\n'; exit 2"""))
    assert out.status is RunStatus.FAILED and out.exit_code == 2
    assert "\ufffd" in out.output_tail
    assert "\x1b[31mred" in out.output_tail
    assert '{"status":"x"}' in out.output_tail


def test_redactor_window_masks_overlapping_secrets() -> None:
    redactor = Redactor([b"abc", b"bcd", b""])
    assert redactor.window(b"xxabcdyy", 100) == b"xx***yy"
    assert redactor.text("got abc") == "got ***"


# -- many at once ----------------------------------------------------------------------------


def test_fifty_concurrent_runs_without_a_thread_each() -> None:
    threads_before = threading.active_count()
    peak_threads = 0

    async def go() -> list[RunOutcome]:
        nonlocal peak_threads
        executor = LocalExecutor(base_env=BASE_ENV)
        handles: list[LocalRunHandle] = [
            await executor.start(request('sleep 0.2; echo "$CRONFILE_RUN_ID"', run_id=f"r{i}"))
            for i in range(50)
        ]
        assert len(executor.info().running) == 50
        peak_threads = threading.active_count()
        outcomes = await asyncio.wait_for(asyncio.gather(*(h.wait() for h in handles)), 8)
        assert executor.info().running == []
        return outcomes

    outcomes = asyncio.run(go())
    assert peak_threads <= threads_before
    assert [o.status for o in outcomes] == [RunStatus.SUCCEEDED] * 50
    assert [o.output_tail for o in outcomes] == [f"r{i}\n" for i in range(50)]


def test_start_many_starts_every_run_and_returns_refusals_in_place() -> None:
    """A batch spawns back to back; a run that cannot start is reported at its index and
    does not keep the others from starting."""

    async def go() -> list[RunOutcome | Exception]:
        executor = LocalExecutor(base_env=BASE_ENV)
        started = await executor.start_many([
            request(("/bin/echo", "one"), run_id="r1"),
            request(("/bin/true",), run_id="r2", workdir="/nonexistent/dir"),
            request(("/bin/echo", "three"), run_id="r3"),
        ])
        return [s if isinstance(s, Exception) else await asyncio.wait_for(s.wait(), 8)
                for s in started]

    first, second, third = asyncio.run(go())
    assert isinstance(first, RunOutcome) and first.output_tail == "one\n"
    assert isinstance(second, RunRefused) and "workdir" in str(second)
    assert isinstance(third, RunOutcome) and third.output_tail == "three\n"


def test_runs_that_end_before_they_are_watched_lose_nothing() -> None:
    """Watching begins on the loop's next pass (a burst spawns without yielding): a run
    that has already ended by then, its output in the pipe, is reaped and recorded as any
    other, and a timeout that fell due meanwhile still ends its run."""

    async def go() -> tuple[RunOutcome, RunOutcome]:
        executor = LocalExecutor(base_env=BASE_ENV)
        quick, slow = await executor.start_many([
            request(("/bin/sh", "-c", "echo done; exit 3"), run_id="quick"),
            request(("/bin/sleep", "30"), run_id="slow", timeout_s=0.3),
        ])
        assert isinstance(quick, LocalRunHandle) and isinstance(slow, LocalRunHandle)
        time.sleep(0.6)  # the loop is busy (a long burst): quick has exited, slow is late
        return (await asyncio.wait_for(quick.wait(), 8), await asyncio.wait_for(slow.wait(), 8))

    quick, slow = asyncio.run(go())
    assert (quick.status, quick.exit_code, quick.output_tail) == (RunStatus.FAILED, 3, "done\n")
    assert slow.status is RunStatus.TIMEOUT


def test_sigpipe_is_default_in_the_child() -> None:
    """The center ignores SIGPIPE (CPython does); a child must not inherit that, or
    ``yes | head`` would complain about a broken pipe instead of ending quietly."""
    outcome = run(request(("/bin/sh", "-c", "yes | head -n 1")))
    assert outcome.status is RunStatus.SUCCEEDED
    assert outcome.output_tail == "y\n"


def test_inherited_descriptors_do_not_reach_the_child(monkeypatch: pytest.MonkeyPatch) -> None:
    """As with Popen(close_fds=True), a child sees stdio only, even a descriptor this
    process inherited without close-on-exec."""
    import cronfile.transports.local as local_exec

    monkeypatch.setattr(local_exec, "_inherited_fds_closed", False)  # as in a fresh process
    read_end, write_end = os.pipe()
    os.set_inheritable(write_end, True)
    try:
        outcome = run(request(("/bin/sh", "-c", f"test -e /proc/self/fd/{write_end} && echo leaked")))
    finally:
        os.close(read_end)
        os.close(write_end)
    assert outcome.output_tail == ""
