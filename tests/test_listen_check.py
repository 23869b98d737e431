"""``cronfile center --listen`` on a non-loopback address needs ``--token-file``: a usage
error (exit 2) up front, never a silent bind to 127.0.0.1 that remote agents would only
see as "connection refused" (SPEC §6)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from centerlib import CenterProc, cronfile_command


@pytest.mark.parametrize("listen", ["0.0.0.0:7070", "[::]:7070", "10.1.2.3:7070",
                                    "center.example.internal:7070"])
def test_non_loopback_listen_without_token_is_a_usage_error(tmp_path: Path, listen: str) -> None:
    (tmp_path / "schedules").mkdir()
    result = subprocess.run(
        [*cronfile_command(), "center", "--schedules", str(tmp_path / "schedules"),
         "--state", str(tmp_path / "state"), "--listen", listen],
        capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert f"--listen {listen}: a non-loopback address needs --token-file" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "state").exists()  # refused before anything was started


class _LoopbackCenter(CenterProc):
    def argv(self) -> list[str]:
        return [*super().argv(), "--listen", "127.0.0.1:0"]


def test_loopback_listen_without_token_still_starts(tmp_path: Path) -> None:
    center = _LoopbackCenter(tmp_path)
    center.write("a.yaml", "apiVersion: cronfile/v1\njobs: {}\n")
    try:
        center.start()
    finally:
        assert center.stop() == 0
