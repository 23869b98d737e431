"""``cronfile agent`` has ONE parser (click): what it accepts is what the agent runs with."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from cronfile.cli.app import cli


def test_token_file_is_required(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["agent", "--center", "127.0.0.1:1", "--name", "a1",
                                      "--state", str(tmp_path)])
    assert result.exit_code == 2
    assert "Missing option '--token-file'" in result.output


def test_bad_label_is_a_usage_error_naming_the_option(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("a1: secret\n")
    result = CliRunner().invoke(cli, ["agent", "--center", "127.0.0.1:1", "--name", "a1",
                                      "--token-file", str(token), "--state", str(tmp_path),
                                      "--label", "novalue"])
    assert result.exit_code == 2
    assert "--label" in result.output and "expected KEY=VALUE, got 'novalue'" in result.output


def test_a_token_file_without_this_agent_exits_2(tmp_path: Path) -> None:
    """The options reach the agent itself: its own check of the token file answers."""
    token = tmp_path / "token"
    token.write_text("someone-else: secret\n")
    token.chmod(0o600)
    result = CliRunner().invoke(cli, ["agent", "--center", "127.0.0.1:1", "--name", "a1",
                                      "--token-file", str(token), "--state", str(tmp_path / "s"),
                                      "--log-level", "error"])
    assert result.exit_code == 2
