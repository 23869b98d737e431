"""A second, unprivileged local user for the tests of what local users can and cannot do.

Created with ``useradd`` when the tests run as root (as in CI); skipped, with the reason,
elsewhere. The user is a system account without a home or a login shell, kept between runs
(creating it is idempotent, also when several test runs race to create it).
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess

import pytest

NAME = "cronfile-test"


def ensure_other_user() -> pwd.struct_passwd:
    """The unprivileged test user (created if needed); skips the test when impossible."""
    if os.geteuid() != 0:
        pytest.skip("needs root to create a second, unprivileged user (useradd)")
    try:
        return pwd.getpwnam(NAME)
    except KeyError:
        pass
    if shutil.which("useradd") is None:
        pytest.skip("useradd is not available to create a second user")
    subprocess.run(["useradd", "--system", "--no-create-home", "--home-dir", "/nonexistent",
                    "--shell", "/usr/sbin/nologin", NAME], capture_output=True, check=False)
    try:
        return pwd.getpwnam(NAME)
    except KeyError:
        pytest.skip(f"could not create the user {NAME}")
        raise


def run_as(user: pwd.struct_passwd, argv: list[str], timeout: float = 20.0
           ) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` as ``user`` (uid, gid, no supplementary groups), from ``/``."""
    return subprocess.run(argv, user=user.pw_uid, group=user.pw_gid, extra_groups=[],
                          cwd="/", capture_output=True, text=True, timeout=timeout,
                          env={"PATH": "/usr/bin:/bin", "HOME": "/"}, check=False)
