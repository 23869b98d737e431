"""``cronfile plan`` and the policy: a policy change comes first, marked, with the jobs it
newly refuses or lets by; every changed job names the owners of its path; a revision that
breaks the policy makes no plan."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from test_validate_cli import run, write

from cronfile.cli.plan import build_plan, render_text
from cronfile.schedules.loader import load_schedules
from cronfile.schedules.model import DesiredState

NOW = 1_780_000_000.0

POLICY = """\
apiVersion: cronfile/v1
agents:
  billing-1: {labels: {team: billing}}
policy:
  - path: billing/
    owners: ["@acme/billing"]
    targets: {labels: {team: billing}}
    run_as: [billing, root]
  - path: ""
    owners: ["@acme/platform"]
"""

JOBS = """\
apiVersion: cronfile/v1
jobs:
  invoice:
    schedule: "0 2 * * *"
    command: ["/opt/billing/bin/invoice"]
    run_as: billing
    targets: {agents: [billing-1]}
  cleanup:
    schedule: "0 3 * * *"
    command: ["/opt/billing/bin/cleanup"]
    run_as: root
    targets: {agents: [billing-1]}
"""


def state(root: Path, policy: str, jobs: str) -> DesiredState:
    write(root, {"policy.yaml": policy, "billing/jobs.yaml": jobs})
    result = load_schedules(root)
    assert result.state is not None, [p.render() for p in result.problems]
    return result.state


def test_a_policy_change_is_listed_first_with_what_it_forbids(tmp_path: Path) -> None:
    old = state(tmp_path / "old", POLICY, JOBS)
    stricter = POLICY.replace("run_as: [billing, root]", "run_as: [billing]")
    new = state(tmp_path / "new", stricter, JOBS.replace("run_as: root", "run_as: billing"))
    plan = build_plan(old, new, NOW)
    assert plan.policy is not None
    [rule] = plan.policy.rules
    assert (rule.path, rule.action, rule.fields) == (
        "billing/", "change", (("run_as", "[billing, root]", "[billing]"),))
    assert plan.policy.forbids == (("cleanup", "jobs.cleanup.run_as: billing/ allows run_as "
                                    "billing only, not root (policy at "
                                    f"{tmp_path}/new/policy.yaml:5:5)"),)
    assert plan.policy.allows == ()
    assert plan.policy.reviewers == ("@acme/platform", "@acme/billing")
    [cleanup] = plan.jobs
    assert cleanup.owners == ("@acme/billing",)
    text = render_text(plan, _baseline(), [])
    body = text.split("\n\n", 1)[1]
    assert body.startswith(f"! policy changed in {tmp_path}/new/policy.yaml (review: "
                           "@acme/platform, @acme/billing)\n"
                           f"  ~ rule billing/ ({tmp_path}/new/policy.yaml:5)\n"
                           "      run_as: [billing, root] → [billing]\n"
                           "  newly forbids (jobs of the baseline this policy refuses):\n"
                           "    cleanup: jobs.cleanup.run_as:"), body
    assert "~ cleanup\n  owners: @acme/billing\n" in text
    assert text.rstrip().endswith("Policy changed. Plan: 0 to add, 1 to change, 0 to remove.")


def test_a_looser_policy_says_what_it_newly_allows(tmp_path: Path) -> None:
    strict = POLICY.replace("run_as: [billing, root]", "run_as: [billing]")
    old = state(tmp_path / "old", strict, JOBS.replace("run_as: root", "run_as: billing"))
    new = state(tmp_path / "new", POLICY, JOBS)
    plan = build_plan(old, new, NOW)
    assert plan.policy is not None
    assert plan.policy.forbids == ()
    assert [job for job, _ in plan.policy.allows] == ["cleanup"]


def test_only_a_policy_change_is_still_a_change(tmp_path: Path) -> None:
    old = state(tmp_path / "old", POLICY, JOBS)
    new = state(tmp_path / "new", POLICY.replace('"@acme/billing"', '"@acme/billing-leads"'),
                JOBS)
    plan = build_plan(old, new, NOW)
    assert plan.diff.is_empty and not plan.is_empty
    assert plan.policy is not None and plan.policy.rules[0].fields == (
        ("owners", "[@acme/billing]", "[@acme/billing-leads]"),)
    assert build_plan(old, state(tmp_path / "same", POLICY, JOBS), NOW).is_empty


def _baseline() -> object:
    from cronfile.cli.plan import empty_baseline

    return empty_baseline()


def _git(cwd: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.email=t@example.com", "-c", "user.name=t", *args],
                   cwd=cwd, check=True, capture_output=True)


def test_plan_markdown_says_who_must_review(tmp_path: Path) -> None:
    schedules = tmp_path / "schedules"
    write(schedules, {"policy.yaml": POLICY, "billing/jobs.yaml": JOBS})
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", "-A")
    _git(tmp_path, "commit", "-qm", "base")
    (schedules / "billing/jobs.yaml").write_text(JOBS.replace("0 2 * * *", "0 4 * * *"))
    done = run(["plan", "--against", "HEAD", "--format", "markdown"], tmp_path)
    assert done.returncode == 0, done.stderr
    assert "Policy change" not in done.stdout  # the policy did not change
    assert "**Review required from:** @acme/billing (`invoice`)\n" in done.stdout
    done = run(["plan", "--against", "HEAD", "--format", "json"], tmp_path)
    data = json.loads(done.stdout)
    assert data["policy"] is None
    assert data["reviewers"] == {"@acme/billing": ["invoice"]}
    assert [j["owners"] for j in data["jobs"]] == [["@acme/billing"]]

    (schedules / "policy.yaml").write_text(POLICY.replace("[billing, root]", "[billing]"))
    done = run(["plan", "--against", "HEAD", "--detailed-exitcode"], tmp_path)
    assert done.returncode == 1  # cleanup now breaks the policy: no plan
    assert done.stdout.splitlines()[0] == (
        "schedules/billing/jobs.yaml:11:5: error: jobs.cleanup.run_as: billing/ allows run_as "
        "billing only, not root (policy at schedules/policy.yaml:5:5)")

    (schedules / "billing/jobs.yaml").write_text(JOBS.replace("run_as: root", "run_as: billing"))
    done = run(["plan", "--against", "HEAD", "--format", "markdown", "--detailed-exitcode"],
               tmp_path)
    assert done.returncode == 2
    policy_at = done.stdout.index("### ⚠️ Policy change")
    assert policy_at < done.stdout.index("| | Job |")
    assert ("    cleanup: jobs.cleanup.run_as: billing/ allows run_as billing only, not root "
            "(policy at schedules/policy.yaml:5:5)\n") in done.stdout
    assert ("**Review required from:** @acme/platform (`policy`); @acme/billing (`policy`, "
            "`cleanup`)\n") in done.stdout


def test_a_centers_applied_state_keeps_its_policy_for_plan_state(tmp_path: Path) -> None:
    from cronfile.state.applied import read_applied, write_applied

    applied = state(tmp_path / "schedules", POLICY, JOBS)
    (tmp_path / "state").mkdir()
    write_applied(tmp_path / "state", applied)
    back = read_applied(tmp_path / "state")
    assert back is not None and back.policy == applied.policy and back.policy is not None
    # The applied state does not know its directory: plan reads it where the new one is.
    new = state(tmp_path / "schedules", POLICY.replace("[billing, root]", "[billing]"),
                JOBS.replace("run_as: root", "run_as: billing"))
    plan = build_plan(back, new, NOW)
    assert plan.policy is not None and [j for j, _ in plan.policy.forbids] == ["cleanup"]
