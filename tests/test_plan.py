"""cronfile plan: against a REAL git repository, a state directory, or nothing."""

from __future__ import annotations

import json
import os
import re
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import pytest
from fleetlib import free_port

from cronfile.cli.access import RemoteCenter
from cronfile.cli.plan import build_plan, empty_baseline, fire_text, placement, render_text, run_plan
from cronfile.schedules.loader import load_schedules
from cronfile.schedules.model import Agent, DesiredState, Job, Revision, Strategy, Targets, Transport
from cronfile.state.applied import APPLIED_FILE, write_applied

# A fixed "now" a few days before Europe/Berlin falls back (2026-10-25 03:00 CEST -> 02:00 CET).
NOW = datetime(2026, 10, 20, 12, 0, tzinfo=UTC).timestamp()

AGENTS = """\
agents:
  web-1:
    labels: {role: web}
  web-2:
    labels: {role: web}
"""

BEFORE = f"""\
apiVersion: cronfile/v1
{AGENTS}
jobs:
  changed-job:
    schedule: "0 2 * * *"
    timezone: Europe/Berlin
    command: ["/bin/true"]
    retries: {{max: 1}}
  removed-job:
    schedule: "@hourly"
    command: ["/bin/true"]
  relocated-job:
    schedule: "*/5 * * * *"
    command: "echo hi"
"""

AFTER = f"""\
apiVersion: cronfile/v1
{AGENTS}
jobs:
  changed-job:
    schedule: "0 3 * * *"
    timezone: Europe/Berlin
    command: ["/bin/true"]
    retries: {{max: 3}}
  new-job:
    schedule: "30 4 * * *"
    command: ["/bin/true"]
    targets: {{labels: {{role: web}}, strategy: failover}}
"""

MOVED = """\
apiVersion: cronfile/v1
jobs:
  relocated-job:
    schedule: "*/5 * * * *"
    command: "echo hi"
"""


def git(repo: Path, *args: str) -> str:
    env = {**os.environ, "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": os.devnull}
    proc = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True,
                          env=env, check=True)
    return proc.stdout.strip()


def commit_all(repo: Path, message: str) -> str:
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", message)
    return git(repo, "rev-parse", "HEAD")


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A repository whose first commit has no schedules and whose HEAD has BEFORE."""
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q")
    git(repo, "config", "user.email", "test@example.com")
    git(repo, "config", "user.name", "Test")
    git(repo, "config", "commit.gpgsign", "false")
    (repo / "README.md").write_text("hello\n")
    commit_all(repo, "no schedules yet")
    (repo / "schedules").mkdir()
    (repo / "schedules" / "jobs.yaml").write_text(BEFORE)
    commit_all(repo, "schedules")
    return repo


def change_work_tree(repo: Path) -> Path:
    schedules = repo / "schedules"
    (schedules / "jobs.yaml").write_text(AFTER)
    (schedules / "more").mkdir()
    (schedules / "more" / "other.yaml").write_text(MOVED)
    return schedules


def lines(out: str) -> list[str]:
    return out.splitlines()


def test_plan_against_head(repo: Path) -> None:
    schedules = change_work_tree(repo)
    out, code = run_plan(schedules, against="HEAD", now=NOW)
    assert code == 0, out
    got = lines(out)
    head = git(repo, "rev-parse", "HEAD")
    assert got[0].startswith(f"Baseline: git HEAD (commit {head[:12]}), content sha256:")
    assert got[1].startswith("Revision: content sha256:")
    assert got[1].endswith("not a clean git commit")
    for expected in [
        "+ new-job",
        "~ changed-job",
        '    schedule: "0 2 * * *" → "0 3 * * *"',
        "    retries.max: 1 → 3",
        "- removed-job",
        # time: before and after in the job's zone and UTC, and the fall-back in the window
        "  when (Europe/Berlin):",
        "    before: Wed 2026-10-21 02:00 CEST = 2026-10-21 00:00 UTC",
        "            Thu 2026-10-22 02:00 CEST = 2026-10-22 00:00 UTC",
        "            Fri 2026-10-23 02:00 CEST = 2026-10-23 00:00 UTC",
        "    after:  Wed 2026-10-21 03:00 CEST = 2026-10-21 01:00 UTC",
        "    daylight saving: 2026-10-25 03:00 CEST → 02:00 CET (clocks go back 1h)",
        # the new job: no "before", and the agents its targets pick from
        "    before: — (not in the baseline)",
        "    after:  Wed 2026-10-21 04:30 UTC",
        "    web-1 else web-2 (the first connected, in this order)",
        "Plan: 1 to add, 1 to change, 1 to remove.",
    ]:
        assert expected in got, f"{expected!r} not in:\n{out}"
    assert got[-1] == "Plan: 1 to add, 1 to change, 1 to remove."
    # moving a job to another file is no change; it is not even mentioned
    assert "relocated-job" not in out
    # the changed job lists exactly its two changed fields
    i = got.index("~ changed-job")
    assert got[i + 1:i + 4] == ['    schedule: "0 2 * * *" → "0 3 * * *"',
                                "    retries.max: 1 → 3", "  when (Europe/Berlin):"]
    # a UTC job has no transitions; Berlin's is listed once per changed/added Berlin job
    assert out.count("daylight saving:") == 1


def test_detailed_exitcode(repo: Path) -> None:
    schedules = repo / "schedules"
    out, code = run_plan(schedules, against="HEAD", now=NOW, detailed_exitcode=True)
    assert code == 0, out
    assert lines(out)[-1] == "No changes. The schedules match the baseline."
    head = git(repo, "rev-parse", "HEAD")
    revision = next(line for line in lines(out) if line.startswith("Revision:"))
    assert f"git commit {head[:12]}" in revision  # a clean tree names its commit
    change_work_tree(repo)
    out, code = run_plan(schedules, against="HEAD", now=NOW, detailed_exitcode=True)
    assert code == 2, out
    out, code = run_plan(schedules, against="HEAD", now=NOW)
    assert code == 0


def test_only_moving_a_job_is_no_change(repo: Path) -> None:
    schedules = repo / "schedules"
    text = BEFORE.replace('  relocated-job:\n    schedule: "*/5 * * * *"\n    command: "echo hi"\n', "")
    (schedules / "jobs.yaml").write_text(text)
    (schedules / "other.yaml").write_text(MOVED)
    out, code = run_plan(schedules, against="HEAD", now=NOW, detailed_exitcode=True)
    assert (code, lines(out)[-1]) == (0, "No changes. The schedules match the baseline.")


def test_ref_without_the_directory_means_everything_added(repo: Path) -> None:
    first = git(repo, "rev-list", "--max-parents=0", "HEAD")
    schedules = change_work_tree(repo)
    out, code = run_plan(schedules, against=first, now=NOW, detailed_exitcode=True)
    assert code == 2
    got = lines(out)
    assert "Note: schedules/ does not exist at " + first + ": every job is shown as added" in got
    assert {"+ changed-job", "+ new-job", "+ relocated-job"} <= set(got)
    assert got[-1] == "Plan: 3 to add, 0 to change, 0 to remove. Agents: 2 to add, 0 to change, 0 to remove."


def test_bad_ref_is_an_error(repo: Path) -> None:
    out, code = run_plan(repo / "schedules", against="no-such-branch", now=NOW)
    assert code == 1
    assert out.startswith("error: --against no-such-branch: unknown git revision")
    out, code = run_plan(repo / "schedules", against="--output=/tmp/x", now=NOW)
    assert code == 1 and "not a git revision" in out


def test_not_a_git_repository(tmp_path: Path) -> None:
    schedules = tmp_path / "schedules"
    schedules.mkdir()
    (schedules / "jobs.yaml").write_text(MOVED)
    out, code = run_plan(schedules, against="HEAD", now=NOW)
    assert code == 1 and "inside a git repository" in out


def test_invalid_work_tree_is_an_error_with_file_and_line(repo: Path) -> None:
    schedules = repo / "schedules"
    (schedules / "jobs.yaml").write_text(AFTER.replace('"30 4 * * *"', '"61 4 * * *"'))
    out, code = run_plan(schedules, against="HEAD", now=NOW, detailed_exitcode=True)
    assert code == 1
    assert re.search(r"^\S*schedules/jobs\.yaml:\d+:\d+: error: .*61", out, re.M), out
    assert "no plan was made" in out


def test_invalid_baseline_compares_against_nothing(repo: Path) -> None:
    schedules = repo / "schedules"
    (schedules / "jobs.yaml").write_text(BEFORE.replace("@hourly", "@sometimes"))
    commit_all(repo, "broken")
    (schedules / "jobs.yaml").write_text(BEFORE)
    out, code = run_plan(schedules, against="HEAD", now=NOW)
    assert code == 0
    note = next(line for line in lines(out) if line.startswith("Note: "))
    assert "the schedules at HEAD have 1 error(s): schedules/jobs.yaml:" in note
    assert "+ removed-job" in lines(out)


def test_schedules_at_the_repository_root(tmp_path: Path) -> None:
    repo = tmp_path / "flat"
    repo.mkdir()
    git(repo, "init", "-q")
    git(repo, "config", "user.email", "t@example.com")
    git(repo, "config", "user.name", "T")
    (repo / "jobs.yaml").write_text(BEFORE)
    commit_all(repo, "flat")
    (repo / "jobs.yaml").write_text(AFTER)
    out, code = run_plan(repo, against="HEAD", now=NOW)
    assert code == 0, out
    assert {"+ new-job", "~ changed-job", "- removed-job", "- relocated-job"} <= set(lines(out))


def test_markdown(repo: Path) -> None:
    schedules = change_work_tree(repo)
    out, code = run_plan(schedules, against="HEAD", now=NOW, fmt="markdown",
                         detailed_exitcode=True)
    assert code == 2
    got = lines(out)
    assert got[0] == "## cronfile plan"
    assert "**Plan: 1 to add, 1 to change, 1 to remove.**" in got
    assert "| | Job | Action | Next fire (after) | Runs on |" in got
    assert ("| `~` | `changed-job` | change | Wed 2026-10-21 03:00 CEST = 2026-10-21 01:00 UTC"
            " | local (the center's own host) |") in got
    assert "| `-` | `removed-job` | remove | — | — |" in got
    assert "```diff" in got
    assert '~     schedule: "0 2 * * *" → "0 3 * * *"' in got
    assert "- removed-job" in got
    assert "<details><summary><code>~ changed-job</code> (change)</summary>" in got
    assert "    daylight saving: 2026-10-25 03:00 CEST → 02:00 CET (clocks go back 1h)" in got


def test_json(repo: Path) -> None:
    schedules = change_work_tree(repo)
    out, code = run_plan(schedules, against="HEAD", now=NOW, fmt="json")
    assert code == 0
    data = json.loads(out)
    assert data["summary"] == {"add": 1, "change": 1, "remove": 1}
    assert data["changed"] is True
    assert data["baseline"]["kind"] == "git" and data["baseline"]["ref"] == "HEAD"
    assert data["baseline"]["revision"]["git_commit"] == git(repo, "rev-parse", "HEAD")
    assert data["revision"]["git_commit"] is None
    jobs = {j["name"]: j for j in data["jobs"]}
    assert [j["name"] for j in data["jobs"]] == ["changed-job", "new-job", "removed-job"]
    changed = jobs["changed-job"]
    assert changed["action"] == "change"
    assert [(c["field"], c["old"], c["new"]) for c in changed["changes"]] == [
        ("schedules", ["0 2 * * *"], ["0 3 * * *"]), ("retries.max", 1, 3)]
    assert changed["fire_times"]["before"][0] == "2026-10-21T02:00:00+02:00"
    assert changed["fire_times"]["after"][0] == "2026-10-21T03:00:00+02:00"
    assert changed["dst_transitions"] == [{
        "at": "2026-10-25T01:00:00Z", "zone": "Europe/Berlin", "offset_before": 7200,
        "offset_after": 3600,
        "text": "2026-10-25 03:00 CEST → 02:00 CET (clocks go back 1h)",
        "affected_slot": None}]  # 03:00 is after the repeated hour
    assert changed["agents"] == ["local"]
    assert jobs["new-job"]["fire_times"]["before"] == []
    assert jobs["new-job"]["agents"] == ["web-1", "web-2"]
    assert jobs["removed-job"]["changes"] == []
    assert data["agents"] == []


def test_against_a_state_directory(repo: Path, tmp_path: Path) -> None:
    schedules = repo / "schedules"
    applied = load_schedules(schedules).state
    assert applied is not None
    state_dir = tmp_path / "state"
    write_applied(state_dir, applied)
    change_work_tree(repo)
    out, code = run_plan(schedules, state_dir=state_dir, now=NOW, detailed_exitcode=True)
    assert code == 2
    assert lines(out)[0].startswith(f"Baseline: state {state_dir / APPLIED_FILE}, content sha256:")
    assert {"+ new-job", "~ changed-job", "- removed-job"} <= set(lines(out))
    assert lines(out)[-1] == "Plan: 1 to add, 1 to change, 1 to remove."


def test_state_directory_without_applied_file(tmp_path: Path, repo: Path) -> None:
    out, code = run_plan(repo / "schedules", state_dir=tmp_path, now=NOW)
    assert code == 0
    assert any(line.startswith("Note: ") and "does not exist" in line for line in lines(out))
    assert "+ changed-job" in lines(out)
    out, code = run_plan(repo / "schedules", state_dir=tmp_path / "typo", now=NOW)
    assert code == 1 and "no such directory" in out
    (tmp_path / APPLIED_FILE).write_text("{torn")
    out, code = run_plan(repo / "schedules", state_dir=tmp_path, now=NOW)
    assert code == 1 and "not valid JSON" in out


def test_no_baseline_and_center_and_usage(repo: Path) -> None:
    out, code = run_plan(repo / "schedules", now=NOW, detailed_exitcode=True)
    assert code == 2
    assert any("comparing against nothing" in line for line in lines(out))
    assert lines(out)[-1].startswith("Plan: 3 to add, 0 to change, 0 to remove.")
    unreachable = RemoteCenter(f"http://127.0.0.1:{free_port()}", None)
    out, code = run_plan(repo / "schedules", center=unreachable, now=NOW)
    assert code == 1 and "error: cannot reach the center at http://127.0.0.1:" in out
    assert run_plan(repo / "schedules", fmt="yaml")[1] == 2
    assert run_plan(repo / "schedules", against="HEAD", state_dir=repo)[1] == 2


# --------------------------------------------------------------------------- pure parts


def test_agent_changes_name_the_jobs_they_move() -> None:
    job = Job("sitemap", ("true",), ("0 * * * *",), targets=Targets(labels=(("role", "web"),)))
    old = DesiredState({"sitemap": job}, {"web-1": Agent("web-1", (("role", "web"),))},
                       Revision("a"))
    new = DesiredState({"sitemap": job}, {"web-1": Agent("web-1", (("role", "web"),)),
                                          "web-2": Agent("web-2", (("role", "web"),))},
                       Revision("b"))
    plan = build_plan(old, new, NOW)
    assert plan.jobs == ()
    (agent,) = plan.agents
    assert (agent.name, agent.action, agent.jobs) == ("web-2", "add", ("sitemap",))


@pytest.mark.parametrize(("targets", "text"), [
    (Targets(), "local (the center's own host)"),
    (Targets(agents=("local",)), "local (the center's own host)"),
    (Targets(labels=(("role", "web"),), strategy=Strategy.ALL),
     "every one of a, b (one run each)"),
    (Targets(labels=(("role", "web"),), strategy=Strategy.SHARD),
     "every one of a, b as shards 0..1 of 2"),
    (Targets(agents=("b", "a"), strategy=Strategy.FAILOVER, transport=Transport.SSH),
     "b else a (the first connected, in this order) via SSH only"),
    (Targets(labels=(("role", "db"),)),
     "no declared agent has labels role=db: every slot would be recorded no_agent"),
])
def test_placement(targets: Targets, text: str) -> None:
    agents = {n: Agent(n, (("role", "web"),)) for n in ("a", "b")}
    assert placement(Job("j", "true", ("@daily",), targets=targets), agents).text == text


def test_spring_forward_and_zone_change() -> None:
    old = Job("j", "true", ("30 2 * * *",), timezone="UTC")
    new = Job("j", "true", ("30 2 * * *",), timezone="Europe/Berlin")
    now = datetime(2026, 3, 27, 12, 0, tzinfo=UTC).timestamp()
    plan = build_plan(DesiredState({"j": old}, {}, Revision("a")),
                      DesiredState({"j": new}, {}, Revision("b")), now)
    (job,) = plan.jobs
    assert [d.text() for d in job.dst] == [
        "2026-03-29 02:00 CET → 03:00 CEST (clocks go forward 1h)"]
    # on the spring-forward day the 02:30 slot fires once, at the first instant after the gap
    assert job.after is not None
    assert [fire_text(t, job.after.zone) for t in job.after.times] == [
        "Sat 2026-03-28 02:30 CET = 2026-03-28 01:30 UTC",
        "Sun 2026-03-29 03:00 CEST = 2026-03-29 01:00 UTC",
        "Mon 2026-03-30 02:30 CEST = 2026-03-30 00:30 UTC",
    ]
    text = render_text(plan, empty_baseline(), [])
    assert "  when (UTC → Europe/Berlin):" in text.splitlines()
    assert "    timezone: \"UTC\" → \"Europe/Berlin\"" in text.splitlines()


def test_markdown_of_an_agent_only_change_and_of_a_huge_plan() -> None:
    from cronfile.cli.plan import MARKDOWN_LIMIT, render_markdown

    old = DesiredState({}, {"web-1": Agent("web-1")}, Revision("a"))
    new = DesiredState({}, {"web-1": Agent("web-1", (("role", "web"),))}, Revision("b"))
    md = render_markdown(build_plan(old, new, NOW), empty_baseline(), [])
    assert "~ agent web-1" in md.splitlines()
    assert '~     labels.role: (none) → "web"' in md.splitlines()

    many = {f"job-{i}": Job(f"job-{i}", ("true",), ("@daily",), description="x" * 80)
            for i in range(3000)}
    md = render_markdown(build_plan(None, DesiredState(many, {}, Revision("c")), NOW),
                         empty_baseline(), [])
    assert len(md) <= MARKDOWN_LIMIT
    assert "_… and 2800 more jobs: run `cronfile plan` for all of them._" in md
    assert md.endswith("run `cronfile plan` for all of it._\n")
    assert md.count("```") % 2 == 0  # every code block is closed
