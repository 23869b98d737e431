"""The ssh executor against a real OpenSSH server (tests/sshd.py) on 127.0.0.1.

Every wait is bounded; no test sleeps blindly (process checks poll with a deadline).
"""

from __future__ import annotations

import asyncio
import random
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from sshd import KEY_PASSPHRASE, SSHD, SshServer, running_sshd, sshd_available  # noqa: E402

from cronfile.schedules.model import RunStatus, SecretRef, SshConfig  # noqa: E402
from cronfile.transports.executor import RunOutcome, RunRefused, RunRequest  # noqa: E402
from cronfile.transports.ssh import SshExecutor  # noqa: E402

BOUND_S = 12.0  # no single run in this file may take longer


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SshServer]:
    if not sshd_available():
        pytest.skip(
            f"!!! {SSHD} is not installed: the SSH executor tests are SKIPPED. "
            "Install openssh-server to run them. !!!"
        )
    with running_sshd(tmp_path_factory.mktemp("sshd")) as server:
        yield server


def config(server: SshServer, **changes: Any) -> SshConfig:
    base = SshConfig(
        host=server.host, port=server.port, user=server.user, key=server.key,
        known_hosts=server.known_hosts, sudo=False,
    )
    return replace(base, **changes)


def request(command: tuple[str, ...] | str, **fields: Any) -> RunRequest:
    return RunRequest(run_id=uuid.uuid4().hex, job="test-job", command=command, **fields)


def run(executor: SshExecutor, req: RunRequest) -> RunOutcome:
    """Start and wait for one run, bounded, then close the executor."""

    async def go() -> RunOutcome:
        try:
            handle = await executor.start(req)
            return await asyncio.wait_for(handle.wait(), BOUND_S)
        finally:
            await executor.close()

    return asyncio.run(go())


def refusal(executor: SshExecutor, req: RunRequest) -> str:
    with pytest.raises(RunRefused) as info:
        run(executor, req)
    return str(info.value)


def survivors(pattern: str, within_s: float = 5.0) -> list[str]:
    """Processes whose command line contains ``pattern``, polled until none or the deadline."""
    deadline = time.monotonic() + within_s
    while True:
        found = subprocess.run(["pgrep", "-af", pattern], capture_output=True, text=True)
        lines = [ln for ln in found.stdout.splitlines() if "pgrep" not in ln]
        if not lines or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


def test_success_with_output(sshd: SshServer) -> None:
    out = run(SshExecutor("web-1", config(sshd)), request(("echo", "hello", "world")))
    assert out.status is RunStatus.SUCCEEDED
    assert out.exit_code == 0 and out.signal is None
    assert out.output_tail == "hello world\n"
    assert out.finished_at >= out.started_at


def test_stderr_is_merged_into_the_output(sshd: SshServer) -> None:
    out = run(SshExecutor("web-1", config(sshd)), request("echo out; echo err >&2; echo out2"))
    assert out.output_tail == "out\nerr\nout2\n"


def test_nonzero_exit_fails(sshd: SshServer) -> None:
    out = run(SshExecutor("web-1", config(sshd)), request("echo bad; exit 3"))
    assert out.status is RunStatus.FAILED
    assert (out.exit_code, out.signal) == (3, None)
    assert out.output_tail == "bad\n"


def test_killed_by_signal_reports_the_signal(sshd: SshServer) -> None:
    out = run(SshExecutor("web-1", config(sshd)), request(("sh", "-c", "kill -9 $$")))
    assert out.status is RunStatus.FAILED
    assert (out.exit_code, out.signal) == (None, 9)  # exact, not guessed from 128+N


def test_exit_code_above_128_is_not_mistaken_for_a_signal(sshd: SshServer) -> None:
    out = run(SshExecutor("web-1", config(sshd)), request("exit 130"))
    assert (out.status, out.exit_code, out.signal) == (RunStatus.FAILED, 130, None)


def test_unknown_host_key_is_refused(sshd: SshServer, tmp_path: Path) -> None:
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    reason = refusal(SshExecutor("web-1", config(sshd, known_hosts=str(empty))), request("true"))
    assert f"host key for 127.0.0.1:{sshd.port} is not in {empty}" in reason
    assert "SHA256:" in reason  # the offered fingerprint, to check before adding it


def test_missing_known_hosts_file_is_refused(sshd: SshServer, tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    reason = refusal(SshExecutor("web-1", config(sshd, known_hosts=str(missing))), request("true"))
    assert f"is not in {missing}: the file does not exist" in reason


def test_changed_host_key_is_refused(sshd: SshServer, tmp_path: Path) -> None:
    other = tmp_path / "known_hosts"
    other.write_text(sshd.other_host_key_line())
    reason = refusal(SshExecutor("web-1", config(sshd, known_hosts=str(other))), request("true"))
    assert f"host key for 127.0.0.1:{sshd.port} CHANGED" in reason
    assert str(other) in reason


def test_known_hosts_from_constructor_when_config_has_none(sshd: SshServer) -> None:
    executor = SshExecutor("web-1", config(sshd, known_hosts=None), known_hosts=sshd.known_hosts)
    assert run(executor, request("true")).status is RunStatus.SUCCEEDED


def test_rsa_key_works(sshd: SshServer) -> None:
    out = run(SshExecutor("web-1", config(sshd, key=sshd.rsa_key)), request(("echo", "rsa")))
    assert (out.status, out.output_tail) == (RunStatus.SUCCEEDED, "rsa\n")


def test_encrypted_key_with_passphrase(
    sshd: SshServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    passphrase = tmp_path / "passphrase"
    passphrase.write_text(KEY_PASSPHRASE + "\n")
    by_file = config(sshd, key=sshd.encrypted_key, passphrase_file=str(passphrase))
    assert run(SshExecutor("web-1", by_file), request("true")).status is RunStatus.SUCCEEDED

    monkeypatch.setenv("CRONFILE_TEST_PASSPHRASE", KEY_PASSPHRASE)
    by_env = config(sshd, key=sshd.encrypted_key, passphrase_env="CRONFILE_TEST_PASSPHRASE")
    assert run(SshExecutor("web-1", by_env), request("true")).status is RunStatus.SUCCEEDED

    reason = refusal(SshExecutor("web-1", config(sshd, key=sshd.encrypted_key)), request("true"))
    assert "set passphrase_file or passphrase_env" in reason


def test_unauthorized_key_is_refused(sshd: SshServer, tmp_path: Path) -> None:
    stranger = tmp_path / "stranger"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(stranger)],
                   check=True, capture_output=True)
    reason = refusal(SshExecutor("web-1", config(sshd, key=str(stranger))), request("true"))
    assert f"ssh authentication as {sshd.user}@127.0.0.1:{sshd.port}" in reason


def test_10mb_of_output_keeps_only_the_tail(sshd: SshServer) -> None:
    script = "head -c 10000000 /dev/zero | tr '\\0' x; echo; echo END"
    started = time.monotonic()
    out = run(SshExecutor("web-1", config(sshd)), request(script, output_keep=1000))
    assert time.monotonic() - started < BOUND_S
    assert out.status is RunStatus.SUCCEEDED
    assert len(out.output_tail) == 1000
    assert out.output_tail.endswith("x\nEND\n")


def test_invalid_utf8_is_replaced(sshd: SshServer) -> None:
    out = run(SshExecutor("web-1", config(sshd)), request("printf 'a\\377b\\n'"))
    assert out.output_tail == "a\ufffdb\n"


def test_timeout_kills_the_remote_process_group(sshd: SshServer) -> None:
    n = random.randint(100000, 999999)
    marker = f"cronfile-timeout-{uuid.uuid4().hex}"
    req = request(("sh", "-c", f"sleep {n} & sleep {n}", marker), timeout_s=1, kill_grace_s=3)
    started = time.monotonic()
    out = run(SshExecutor("web-1", config(sshd)), req)
    assert out.status is RunStatus.TIMEOUT
    assert (out.exit_code, out.signal) == (None, 15)
    assert out.output_tail == ""
    assert out.reason and "timed out after 1s" in out.reason and "SIGTERM" in out.reason
    assert time.monotonic() - started < 5
    assert survivors(marker) == []
    assert survivors(f"sleep {n}") == []


def test_timeout_escalates_to_sigkill(sshd: SshServer) -> None:
    n = random.randint(100000, 999999)
    script = f"trap '' TERM; sleep {n} & sleep {n}"  # ignores TERM, and so do its children
    out = run(SshExecutor("web-1", config(sshd)), request(script, timeout_s=0.5, kill_grace_s=1))
    assert out.status is RunStatus.TIMEOUT
    assert (out.exit_code, out.signal) == (None, 9)
    assert out.reason and "SIGKILL" in out.reason
    assert survivors(f"sleep {n}") == []


def test_stop_kills_the_group_and_reports_killed(sshd: SshServer) -> None:
    n = random.randint(100000, 999999)

    async def go() -> RunOutcome:
        executor = SshExecutor("web-1", config(sshd))
        handle = await executor.start(request(("sh", "-c", f"sleep {n} & sleep {n}")))
        assert survivors(f"sleep {n}", within_s=0)  # it is running
        await asyncio.wait_for(handle.stop("replaced by a newer run", grace_s=2), BOUND_S)
        outcome = await handle.wait()
        assert await handle.wait() == outcome  # awaitable more than once
        await executor.close()
        return outcome

    out = asyncio.run(go())
    assert out.status is RunStatus.KILLED
    assert out.reason and out.reason.startswith("replaced by a newer run")
    assert survivors(f"sleep {n}") == []


def test_arguments_run_literally(sshd: SshServer, tmp_path: Path) -> None:
    victim = tmp_path / "x"
    argv = ("echo", f"; touch {victim}", "$(id)", "`id`", "'", '"', "a\nb", "*")
    out = run(SshExecutor("web-1", config(sshd)), request(argv))
    assert out.output_tail == f"; touch {victim} $(id) `id` ' \" a\nb *\n"
    assert not victim.exists()


def test_env_and_workdir_are_applied_literally(sshd: SshServer, tmp_path: Path) -> None:
    victim = tmp_path / "y"
    workdir = tmp_path / "work dir $(id)"
    workdir.mkdir()
    env = (("GREETING", "hello 'world'"), ("TRAP", f"$(touch {victim})\n;`id`"))
    script = 'printf "%s|%s|%s\\n" "$GREETING" "$TRAP" "$(pwd)"'
    out = run(SshExecutor("web-1", config(sshd)), request(script, env=env, workdir=str(workdir)))
    assert out.status is RunStatus.SUCCEEDED
    assert out.output_tail == f"hello 'world'|$(touch {victim})\n;`id`|{workdir}\n"
    assert not victim.exists()


def test_secrets_resolved_on_the_center_and_redacted(
    sshd: SshServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from_env_value = f"env-secret-{uuid.uuid4().hex}"
    from_file_value = f"file-secret-{uuid.uuid4().hex}"
    monkeypatch.setenv("CRONFILE_TEST_SECRET", from_env_value)
    secret_file = tmp_path / "secret"
    secret_file.write_text(from_file_value + "\n")
    env = (
        ("A", SecretRef(from_env="CRONFILE_TEST_SECRET")),
        ("B", SecretRef(from_file=str(secret_file))),
    )

    async def go() -> tuple[RunOutcome, list[str]]:
        executor = SshExecutor("web-1", config(sshd))
        handle = await executor.start(request('echo "a=$A b=$B"; exec sleep 30', env=env))
        # While it runs, no process on the (local) remote host carries a secret in argv.
        leaks = []
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                data = cmdline.read_bytes()
            except OSError:
                continue
            if from_env_value.encode() in data or from_file_value.encode() in data:
                leaks.append(str(cmdline))
        await handle.stop(grace_s=2)
        outcome = await handle.wait()
        await executor.close()
        return outcome, leaks

    out, leaks = asyncio.run(go())
    assert leaks == []
    assert out.output_tail == "a=*** b=***\n"


def test_each_line_of_a_multi_line_secret_is_masked_over_ssh(
    sshd: SshServer, tmp_path: Path
) -> None:
    """Finding 17 (issue 11): one line of a two-line secret was recorded in clear."""
    key = tmp_path / "key"
    key.write_text("first-line-of-key\nsecond-line-of-key\n")
    env = (("KEY", SecretRef(from_file=str(key))),)
    out = run(SshExecutor("web-1", config(sshd)),
              request('echo "$KEY" | tail -n 1; echo "$KEY" | head -n 1; echo done', env=env))
    assert out.output_tail == "***\n***\ndone\n"


def test_unset_secret_env_is_refused_without_running(sshd: SshServer) -> None:
    env = (("A", SecretRef(from_env="CRONFILE_TEST_SURELY_UNSET")),)
    reason = refusal(SshExecutor("web-1", config(sshd)), request("true", env=env))
    assert "CRONFILE_TEST_SURELY_UNSET is not set on the center" in reason


def test_missing_workdir_and_command_are_refused(sshd: SshServer, tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    reason = refusal(SshExecutor("web-1", config(sshd)), request("true", workdir=str(missing)))
    assert f"workdir {missing} does not exist" in reason
    reason = refusal(SshExecutor("web-1", config(sshd)), request(("no-such-command-xyz",)))
    assert "command not found" in reason and "no-such-command-xyz" in reason


def test_run_as_another_user_needs_sudo(sshd: SshServer) -> None:
    reason = refusal(SshExecutor("web-1", config(sshd)), request("true", run_as="nobody"))
    assert "needs sudo" in reason
    # run_as the ssh user itself needs nothing
    out = run(SshExecutor("web-1", config(sshd)), request(("id", "-un"), run_as=sshd.user))
    assert out.output_tail == f"{sshd.user}\n"


def test_connection_is_reused_across_runs(sshd: SshServer) -> None:
    async def go() -> None:
        executor = SshExecutor("web-1", config(sshd))
        transports = set()
        for i in range(5):
            handle = await executor.start(request(("echo", str(i))))
            out = await asyncio.wait_for(handle.wait(), BOUND_S)
            assert out.output_tail == f"{i}\n"
            transports.add(id(executor.connection))
        assert len(transports) == 1
        assert executor.status_info()["connections_opened"] == 1
        await executor.close()
        assert executor.status_info()["connected"] is False

    asyncio.run(go())


def test_concurrent_runs_share_the_connection(sshd: SshServer) -> None:
    async def go() -> None:
        executor = SshExecutor("web-1", config(sshd))
        handles = [await executor.start(request(("echo", str(i)))) for i in range(4)]
        outs = await asyncio.wait_for(asyncio.gather(*(h.wait() for h in handles)), BOUND_S)
        assert [o.output_tail for o in outs] == [f"{i}\n" for i in range(4)]
        assert executor.status_info()["connections_opened"] == 1
        await executor.close()

    asyncio.run(go())


def test_reconnects_after_the_connection_dropped(sshd: SshServer) -> None:
    async def go() -> None:
        executor = SshExecutor("web-1", config(sshd))
        first = await (await executor.start(request(("echo", "one")))).wait()
        dropped = executor.connection
        assert dropped is not None
        dropped.close()  # pull the connection out from under the executor
        assert executor.status_info()["connected"] is False
        second = await (await executor.start(request(("echo", "two")))).wait()
        assert (first.output_tail, second.output_tail) == ("one\n", "two\n")
        assert executor.connection is not dropped
        assert executor.status_info()["connections_opened"] == 2
        await executor.close()

    asyncio.run(go())


def test_drop_during_a_run_reports_lost(sshd: SshServer) -> None:
    async def go() -> RunOutcome:
        executor = SshExecutor("web-1", config(sshd))
        handle = await executor.start(request(("sleep", "5")))
        assert executor.connection is not None
        executor.connection.close()
        outcome = await asyncio.wait_for(handle.wait(), BOUND_S)
        await executor.close()
        return outcome

    out = asyncio.run(go())
    assert out.status is RunStatus.LOST
    assert out.reason and "dropped during the run" in out.reason


def test_status_info_describes_the_connection(sshd: SshServer, tmp_path: Path) -> None:
    async def go() -> None:
        executor = SshExecutor("web-1", config(sshd))
        info = executor.status_info()
        assert info["connected"] is False and info["last_error"] is None
        await (await executor.start(request("true"))).wait()
        info = executor.status_info()
        assert info["connected"] is True and info["connected_since"]
        assert (info["transport"], info["agent"], info["host"], info["port"]) == (
            "ssh", "web-1", "127.0.0.1", sshd.port)
        await executor.close()

        bad = tmp_path / "empty"
        bad.write_text("")
        refused = SshExecutor("web-1", config(sshd, known_hosts=str(bad)))
        with pytest.raises(RunRefused):
            await refused.start(request("true"))
        assert "is not in" in (refused.status_info()["last_error"] or "")

    asyncio.run(go())


def test_connection_refused_is_a_clear_refusal(sshd: SshServer) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    reason = refusal(SshExecutor("web-1", config(sshd, port=port)), request("true"))
    assert f"cannot connect to 127.0.0.1:{port}" in reason



@pytest.fixture(scope="module")
def sshd_elsewhere(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SshServer]:
    """An sshd whose sessions live in a PID namespace of their own: its process group
    numbers are not this host's, as on a real remote host."""
    import os

    if not sshd_available() or os.geteuid() != 0:
        pytest.skip("needs root and /usr/sbin/sshd (a PID namespace for sshd)")
    with running_sshd(tmp_path_factory.mktemp("sshd-ns"), pid_namespace=True) as server:
        yield server


def _host_pgid(pid: int) -> int:
    return int(subprocess.run(["ps", "-o", "pgid=", "-p", str(pid)], capture_output=True,
                              text=True, check=True).stdout)


def test_kill_now_kills_the_remote_group_and_signals_nothing_here(
        sshd_elsewhere: SshServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """The second SIGTERM's path: ``kill_now`` SIGKILLs the REMOTE process group over SSH.
    The remote pgid is a number on the remote host; signalling it here (what the center did
    with ``os.killpg(handle.pgid)``) would kill an unrelated local group and leave the run."""
    import os
    import signal

    n = random.randint(100000, 999999)
    local_signals: list[tuple[str, int, int]] = []
    real_killpg, real_kill = os.killpg, os.kill

    def killpg(pgid: int, sig: int) -> None:
        local_signals.append(("killpg", pgid, sig))
        real_killpg(pgid, sig)

    def kill(pid: int, sig: int) -> None:
        local_signals.append(("kill", pid, sig))
        real_kill(pid, sig)

    host_pgids: set[int] = set()

    async def go() -> tuple[int | None, list[str], RunOutcome]:
        executor = SshExecutor("web-1", config(sshd_elsewhere))
        handle = await executor.start(request(("sh", "-c", f"sleep {n} & sleep {n}")))
        # Both sleeps exist a moment after the wrapper reported the start: wait for them.
        deadline = time.monotonic() + BOUND_S
        while True:
            running = [line for line in survivors(f"sleep {n}", within_s=0)
                       if line.split()[1] == "sleep"]
            if len(running) >= 2 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        host_pgids.update(_host_pgid(int(line.split()[0])) for line in running)
        monkeypatch.setattr(os, "killpg", killpg)
        monkeypatch.setattr(os, "kill", kill)
        handle.kill_now()
        monkeypatch.undo()
        outcome = await asyncio.wait_for(handle.wait(), BOUND_S)
        await executor.close()
        return getattr(handle, "pgid", None), running, outcome

    remote_pgid, running, outcome = asyncio.run(go())
    assert len(running) == 2
    assert remote_pgid is not None and remote_pgid not in host_pgids  # a number from elsewhere
    assert local_signals == []
    assert survivors(f"sleep {n}") == []  # killed where it runs
    assert outcome.signal == signal.SIGKILL or outcome.status is not RunStatus.SUCCEEDED
