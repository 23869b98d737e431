"""What one job can learn about another, or about the host, through the executor (issue 11).

Real processes through the real :class:`LocalExecutor`; the tests about another user run as
root with a second, unprivileged user created by :mod:`localuser` (skipped elsewhere)."""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from localuser import ensure_other_user

from cronfile.schedules.model import RunStatus, SecretRef
from cronfile.transports.executor import RunOutcome, RunRefused, RunRequest
from cronfile.transports.local import LocalExecutor
from cronfile.transports.secrets import Redactor

SOURCE_ENV = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "BILLING_TOKEN": "b1ll1ng-t0k3n"}


@pytest.fixture
def other_user() -> pwd.struct_passwd:
    return ensure_other_user()


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory every user may traverse (pytest's own tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="cronfile-isolation-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def request(command: tuple[str, ...] | str, **kwargs: object) -> RunRequest:
    fields: dict[str, object] = {"run_id": "run-1", "job": "job-a", "command": command}
    fields.update(kwargs)
    return RunRequest(**fields)  # type: ignore[arg-type]


def run(req: RunRequest) -> RunOutcome:
    async def go() -> RunOutcome:
        handle = await LocalExecutor(base_env=SOURCE_ENV).start(req)
        return await asyncio.wait_for(handle.wait(), 8)

    return asyncio.run(go())


def refused(req: RunRequest) -> str:
    with pytest.raises(RunRefused) as info:
        run(req)
    return str(info.value)


def test_a_job_without_secrets_cannot_read_another_jobs_from_env_secret() -> None:
    """Finding 5: the billing job's ``from_env`` source was in every job's environment."""
    billing = run(request('test "$TOKEN" = b1ll1ng-t0k3n && echo "token $TOKEN"',
                          env=(("TOKEN", SecretRef(from_env="BILLING_TOKEN")),)))
    assert (billing.status, billing.output_tail) == (RunStatus.SUCCEEDED, "token ***\n")
    snoop = run(request("env; echo \"[$BILLING_TOKEN]\"", run_id="run-2"))
    assert snoop.status is RunStatus.SUCCEEDED
    assert "b1ll1ng-t0k3n" not in snoop.output_tail
    assert snoop.output_tail.endswith("[]\n")


def test_env_names_follow_one_rule_on_every_transport() -> None:
    """Issue 10: local accepted ``MY-VAR``, SSH refused it."""
    assert refused(request(("true",), env=(("MY-VAR", "x"),))) == (
        "invalid environment variable name 'MY-VAR'")


def test_each_line_of_a_multi_line_secret_is_masked(tmp_path: Path) -> None:
    """Finding 17: printing one line of a two-line secret recorded it in clear."""
    key = tmp_path / "key"
    key.write_text("first-line-of-key\nsecond-line-of-key\n")
    out = run(request('echo "$KEY"; echo "$KEY" | tail -n 1; echo "$KEY" | head -n 1; echo ab',
                      env=(("KEY", SecretRef(from_file=str(key))),)))
    assert out.output_tail == "***\n***\n***\nab\n"
    assert Redactor([b"x\nsecret-two\n"]).text("see secret-two and x") == "see *** and x"


def test_from_file_is_read_as_the_runs_user(open_dir: Path, other_user: pwd.struct_passwd
                                            ) -> None:
    """Finding 6: a job as another user received a file only root may read."""
    private = open_dir / "root-only"
    private.write_text("root-s3cret\n")
    private.chmod(0o600)
    message = refused(request(("true",), run_as=other_user.pw_name,
                              env=(("S", SecretRef(from_file=str(private))),)))
    assert message == f"secret for env S: file {private} is not readable by {other_user.pw_name}"
    assert "root-s3cret" not in message
    # A file the user may read is resolved and masked as usual.
    shared = open_dir / "shared"
    shared.write_text("sh4red-s3cret\n")
    shared.chmod(0o644)
    out = run(request('echo "$S"', run_as=other_user.pw_name,
                      env=(("S", SecretRef(from_file=str(shared))),)))
    assert (out.status, out.output_tail) == (RunStatus.SUCCEEDED, "***\n")


def test_from_env_is_refused_for_a_job_as_another_user(other_user: pwd.struct_passwd) -> None:
    """Finding 6: the executor's environment is not the other user's to read."""
    message = refused(request(("true",), run_as=other_user.pw_name,
                              env=(("T", SecretRef(from_env="BILLING_TOKEN")),)))
    assert message == ("secret for env T: from_env reads the executor's own environment, "
                       f"which a job running as {other_user.pw_name} may not use")


def test_workdir_is_entered_after_dropping_privileges(open_dir: Path,
                                                      other_user: pwd.struct_passwd) -> None:
    """Finding 7: a job as another user started inside a 0700 root directory."""
    locked = open_dir / "locked"
    locked.mkdir(mode=0o700)
    (locked / "secret.txt").write_text("only-root\n")
    out = run(request("cat secret.txt", run_as=other_user.pw_name, workdir=str(locked)))
    assert out.status is RunStatus.FAILED
    assert out.exit_code == 126
    assert "only-root" not in out.output_tail
    # A directory the user may enter works, and is the job's cwd.
    (open_dir / "open").mkdir(mode=0o755)
    out = run(request(("pwd",), run_as=other_user.pw_name, workdir=str(open_dir / "open")))
    assert (out.status, out.output_tail) == (RunStatus.SUCCEEDED, f"{open_dir / 'open'}\n")
