"""``cronfile agent`` has ONE parser (click): what it accepts is what the agent runs with.

The agent's own checks answer (exit 2, logged), which shows the options reach it unchanged.
A token-less agent against a real hub is tested in test_agents.py, through this command.
"""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from cronfile.cli.app import cli


def agent(tmp_path: Path, *extra: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["agent", "--center", "127.0.0.1:1", "--name", "a1",
                                      "--state", str(tmp_path / "state"), *extra])
    return result.exit_code, result.output


def test_bad_label_is_a_usage_error_naming_the_option(tmp_path: Path) -> None:
    code, output = agent(tmp_path, "--label", "novalue")
    assert code == 2
    assert "--label" in output and "expected KEY=VALUE, got 'novalue'" in output


def test_a_token_file_without_this_agent_exits_2(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("someone-else: secret\n")
    token.chmod(0o600)
    assert agent(tmp_path, "--token-file", str(token), "--log-level", "error")[0] == 2


def test_without_a_token_file_the_agent_starts_and_checks_its_tls_options(tmp_path: Path) -> None:
    """--token-file is optional: the command reaches the agent, whose TLS check refuses a CA
    file that does not exist (exit 2) before it connects anywhere."""
    code, output = agent(tmp_path, "--tls-ca", str(tmp_path / "missing-ca.pem"))
    assert code == 2, output
    assert "Missing option" not in output


def test_log_level_is_one_of_the_documented_levels(tmp_path: Path) -> None:
    code, output = agent(tmp_path, "--log-level", "chatty")
    assert code == 2
    assert "--log-level" in output and "'chatty' is not one of" in output
