"""What another local user can reach of a center's or agent's state (issue 11, findings 8,
12, 16). Real centers (subprocesses) and a second, unprivileged user made by
:mod:`localuser` when the tests run as root (skipped elsewhere)."""

from __future__ import annotations

import os
import pwd
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from centerlib import CenterProc, finished, wait_for
from fleetlib import AgentProc, FleetCenter
from localuser import ensure_other_user, run_as

from cronfile.agent.daemon import AgentState
from cronfile.center.control import socket_path

TICK = 'apiVersion: cronfile/v1\njobs:\n  tick:\n    schedule: "*/1 * * * * *"\n    command: "echo tick"\n'


@pytest.fixture
def other_user() -> pwd.struct_passwd:
    return ensure_other_user()


@pytest.fixture
def shared_root() -> Iterator[Path]:
    """A directory every user may traverse, with the umask most hosts have (022)."""
    path = Path(tempfile.mkdtemp(prefix="cronfile-privacy-"))
    path.chmod(0o755)
    old = os.umask(0o022)
    yield path
    os.umask(old)
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def center(shared_root: Path) -> Iterator[Any]:
    procs: list[CenterProc] = []

    def make(root: Path = shared_root, **kw: Any) -> CenterProc:
        c = CenterProc(root, **kw)
        procs.append(c)
        return c

    yield make
    for c in procs:
        c.stop()


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_center_state_is_private_to_its_user(center: Any, other_user: pwd.struct_passwd
                                             ) -> None:
    """Finding 8: the state directory was 0755 and every file 0644 (output tails too)."""
    c = center()
    c.write("a.yaml", TICK)
    c.start()
    c.wait_runs(lambda rs: finished(rs, "tick", "succeeded"), 10, "a tick")
    assert mode(c.state) == 0o700
    for name in ("runs.jsonl", "events.jsonl", "applied.json", "center.lock"):
        assert mode(c.state / name) == 0o600, name
    wait_for(lambda: (c.state / "watermark").exists(), 10, "the watermark")
    assert mode(c.state / "watermark") == 0o600
    result = run_as(other_user, ["cat", str(c.state / "runs.jsonl")])
    assert result.returncode != 0 and "Permission denied" in result.stderr
    assert "tick" not in result.stdout


def test_another_user_cannot_hold_the_center_lock(center: Any,
                                                  other_user: pwd.struct_passwd) -> None:
    """Finding 12: flock() works on a read-only descriptor of a 0644 center.lock, so any
    local user could keep the center from restarting."""
    c = center()
    c.write("a.yaml", TICK)
    c.start()
    c.stop()
    script = ("import fcntl, sys\n"
              "fd = open(sys.argv[1], 'rb')\n"
              "fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
              "print('locked')\n")
    result = run_as(other_user, ["/usr/bin/python3", "-c", script, str(c.state / "center.lock")])
    assert "locked" not in result.stdout
    assert "PermissionError" in result.stderr
    c.start()  # and the center restarts


def test_a_squatted_control_socket_directory_is_refused_clearly(
        center: Any, shared_root: Path, other_user: pwd.struct_passwd) -> None:
    """Finding 16: with a long state path the socket went to a fixed name in the shared
    temp dir, which another user could create first (the center then crashed)."""
    long_root = shared_root / ("x" * 90)
    long_root.mkdir()
    tmp = shared_root / "tmp"
    tmp.mkdir(mode=0o1777)
    tmp.chmod(0o1777)
    c = center(long_root, env={"TMPDIR": str(tmp)})
    squat = tmp / f"cronfile-{os.geteuid()}"
    squat.mkdir()
    os.chown(squat, other_user.pw_uid, other_user.pw_gid)
    c.write("a.yaml", TICK)
    c.start(wait=False)
    assert c.proc is not None
    assert c.proc.wait(20) == 1
    log = c.log_text()
    assert (f"{squat} (for the control socket: the state path is too long for a Unix socket) "
            "is not a directory of this user with mode 700; remove it, or use a shorter "
            "--state path") in log
    assert "Traceback" not in log
    # Without the squatter: a private directory, and the control socket works.
    shutil.rmtree(squat)
    c.start(wait=False)
    os.environ["TMPDIR"] = str(tmp)
    try:
        tempfile.tempdir = None
        path = socket_path(c.state)
        wait_for(path.exists, 15, "the control socket")
        assert path.parent == squat and mode(squat) == 0o700
        assert c.cli("run", "tick").returncode == 0
    finally:
        del os.environ["TMPDIR"]
        tempfile.tempdir = None


def test_agent_state_is_private(tmp_path: Path) -> None:
    """Finding 8: the agent's journal and outbox were 0644 in a 0755 directory."""
    old = os.umask(0o022)
    try:
        state = AgentState(tmp_path / "agent")
        state.close()
    finally:
        os.umask(old)
    assert mode(tmp_path / "agent") == 0o700
    assert mode(tmp_path / "agent" / "journal.jsonl") == 0o600
    assert mode(tmp_path / "agent" / "outbox.jsonl") == 0o600


def test_center_and_agent_refuse_a_token_file_others_can_read(shared_root: Path) -> None:
    """Finding 11: the center accepted a world-readable token file silently, the agent with
    a warning. Both now exit with the reason and without a traceback."""
    c = FleetCenter(shared_root)
    c.write("a.yaml", TICK)
    c.token_file.chmod(0o644)
    try:
        c.start(wait=False)
        assert c.proc is not None and c.proc.wait(20) == 1
        expected = f"{c.token_file}: other users may read it (mode 644); run chmod 600"
        assert expected in c.log_text() and "Traceback" not in c.log_text()
        agent = AgentProc(shared_root, c, "a1")
        agent.start(wait=False)
        assert agent.proc is not None and agent.proc.wait(20) == 2
        assert expected in agent.log_text() and "Traceback" not in agent.log_text()
    finally:
        c.stop()
