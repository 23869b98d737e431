"""Policy (SPEC §11) in ``validate``: each kind of rule refuses exactly the jobs it should,
at the job field's line, naming the rule and where the rule is written.

Most cases load a real directory through the loader (what validate, plan and the center
share); one runs the installed ``cronfile validate`` as CI does.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

from test_validate_cli import run, write

from cronfile.schedules.loader import load_schedules
from cronfile.schedules.model import Policy, PolicyRule
from cronfile.schedules.policy import command_allowed, normalise_path

POLICY = """\
apiVersion: cronfile/v1
agents:
  billing-1: {labels: {team: billing, dc: fra}}
  web-1: {labels: {team: web, dc: fra}}
policy:
  - path: billing/
    owners: ["@acme/billing"]
    targets: {labels: {team: billing}}
    local: false
    run_as: [billing]
    commands: ["/opt/billing/bin/"]
  - path: billing/reports
    run_as: ["", reporter]
  - path: ""
    local: true
"""


def problems(root: Path, files: dict[str, str]) -> list[str]:
    write(root, {name: textwrap.dedent(text) for name, text in files.items()})
    return [p.render() for p in load_schedules(root).problems]


def billing(jobs: str) -> dict[str, str]:
    return {"policy.yaml": POLICY, "billing/jobs.yaml": "apiVersion: cronfile/v1\njobs:\n" + jobs}


GOOD_JOB = """\
  invoice:
    schedule: "0 2 * * *"
    command: ["/opt/billing/bin/invoice", "--nightly"]
    run_as: billing
    targets: {agents: [billing-1]}
"""


def at(line: int, col: int, path: str, message: str) -> str:
    return f"{{root}}/billing/jobs.yaml:{line}:{col}: error: {path}: {message}"


def expect(tmp_path: Path, found: list[str], *wanted: str) -> None:
    assert found == [w.replace("{root}", str(tmp_path)) for w in wanted]


RULE = "(policy at {root}/policy.yaml:6:5)"


def test_a_job_that_keeps_to_its_rule_passes(tmp_path: Path) -> None:
    assert problems(tmp_path, billing(GOOD_JOB)) == []
    state = load_schedules(tmp_path).state
    assert state is not None and state.policy is not None
    assert [r.path for r in state.policy.rules] == ["billing/", "billing/reports/", ""]


def test_a_named_agent_outside_the_rules_labels_is_refused(tmp_path: Path) -> None:
    found = problems(tmp_path, billing(GOOD_JOB.replace("[billing-1]", "[billing-1, web-1]")))
    expect(tmp_path, found, at(7, 35, "jobs.invoice.targets.agents[1]",
                               f"billing/ may only target agents with team=billing, not web-1 "
                               f"(dc=fra, team=web) {RULE}"))


def test_a_selector_that_could_match_another_teams_agent_is_refused(tmp_path: Path) -> None:
    found = problems(tmp_path, billing(GOOD_JOB.replace("{agents: [billing-1]}",
                                                        "{labels: {dc: fra}}")))
    expect(tmp_path, found, at(7, 15, "jobs.invoice.targets.labels",
                               "billing/ may only target agents with team=billing: the selector "
                               f"dc=fra could match agents without it (web-1) {RULE}"))


def test_a_selector_is_judged_by_what_it_implies_not_by_todays_inventory(tmp_path: Path) -> None:
    # No agent has role=batch today; one declared tomorrow in web/ would match the job.
    found = problems(tmp_path, billing(GOOD_JOB.replace("{agents: [billing-1]}",
                                                        "{labels: {role: batch}}")))
    assert len(found) == 2, found  # the policy error, and the loader's own warning
    assert "the selector role=batch could match agents without it (policy at" in found[0]
    assert "warning: jobs.invoice.targets.labels: no declared agent has the labels role=batch" \
        in found[1]
    ok = problems(tmp_path, billing(GOOD_JOB.replace("{agents: [billing-1]}",
                                                     "{labels: {team: billing, dc: fra}}")))
    assert ok == []


def test_falling_back_to_local_where_local_is_false_is_refused(tmp_path: Path) -> None:
    found = problems(tmp_path, billing(GOOD_JOB.replace("    targets: {agents: [billing-1]}\n",
                                                        "")))
    expect(tmp_path, found, at(3, 3, "jobs.invoice.targets",
                               "billing/ may not run jobs on the center's own host, where a job "
                               f"without targets runs (local: false) {RULE}"))
    found = problems(tmp_path, billing(GOOD_JOB.replace("[billing-1]", "[billing-1, local]")))
    expect(tmp_path, found, at(7, 35, "jobs.invoice.targets.agents[1]",
                               f"billing/ may not run jobs on the center's own host (local) {RULE}"))


def test_targets_inherited_from_defaults_are_reported_at_the_defaults(tmp_path: Path) -> None:
    files = billing(GOOD_JOB.replace("    targets: {agents: [billing-1]}\n", ""))
    files["billing/jobs.yaml"] = files["billing/jobs.yaml"].replace(
        "jobs:\n", "defaults:\n  targets: {agents: [web-1]}\njobs:\n")
    found = problems(tmp_path, files)
    expect(tmp_path, found, at(3, 22, "jobs.invoice.targets.agents[0]",
                               f"billing/ may only target agents with team=billing, not web-1 "
                               f"(dc=fra, team=web) {RULE}"))


def test_run_as_must_be_listed_and_absent_only_when_empty_is_listed(tmp_path: Path) -> None:
    found = problems(tmp_path, billing(GOOD_JOB.replace("run_as: billing", "run_as: root")))
    expect(tmp_path, found, at(6, 5, "jobs.invoice.run_as",
                               f"billing/ allows run_as billing only, not root {RULE}"))
    found = problems(tmp_path, billing(GOOD_JOB.replace("    run_as: billing\n", "")))
    expect(tmp_path, found, at(3, 3, "jobs.invoice.run_as",
                               'billing/ requires run_as billing (list "" to allow a job '
                               f"without run_as) {RULE}"))
    # billing/reports/ lists "": no run_as passes there (and its rule has no other limits).
    reports = {"policy.yaml": POLICY, "billing/reports/r.yaml": "apiVersion: cronfile/v1\njobs:\n"
               "  report:\n    schedule: '@daily'\n    command: echo hi\n"}
    assert problems(tmp_path / "r", reports) == []


def test_commands_are_argv_prefixes_and_strings_are_refused(tmp_path: Path) -> None:
    found = problems(tmp_path, billing(GOOD_JOB.replace('["/opt/billing/bin/invoice", ',
                                                        '["/usr/bin/curl", ')))
    expect(tmp_path, found, at(5, 15, "jobs.invoice.command[0]",
                               "billing/ allows programs starting with /opt/billing/bin/ only, "
                               f"not /usr/bin/curl {RULE}"))
    found = problems(tmp_path, billing(GOOD_JOB.replace(
        '["/opt/billing/bin/invoice", "--nightly"]', "/opt/billing/bin/invoice; rm -rf /")))
    expect(tmp_path, found, at(5, 5, "jobs.invoice.command",
                               "billing/ allows only argv commands whose program starts with "
                               "/opt/billing/bin/: a string command runs in a shell, which "
                               f"could run anything {RULE}"))


def test_a_dotdot_component_never_stays_inside_a_prefix() -> None:
    assert command_allowed("/opt/billing/bin/invoice", ["/opt/billing/bin/"])
    assert not command_allowed("/opt/billing/bin/../../../bin/sh", ["/opt/billing/bin/"])
    assert not command_allowed("/usr/bin/sh", ["/opt/billing/bin/"])


def test_daemons_are_checked_like_cron_jobs(tmp_path: Path) -> None:
    found = problems(tmp_path, billing("""\
  worker:
    kind: daemon
    command: ["/usr/bin/python3", "-m", "worker"]
    run_as: billing
    targets: {agents: [billing-1]}
"""))
    expect(tmp_path, found, at(5, 15, "jobs.worker.command[0]",
                               "billing/ allows programs starting with /opt/billing/bin/ only, "
                               f"not /usr/bin/python3 {RULE}"))


def test_a_notify_command_runs_on_the_center_and_is_checked_as_such(tmp_path: Path) -> None:
    found = problems(tmp_path, billing(GOOD_JOB + '    notify: {command: "curl x | sh"}\n'))
    expect(tmp_path, found, at(8, 14, "jobs.invoice.notify.command",
                               "billing/ may not run commands on the center's own host, where "
                               f"notify.command runs (use notify.webhook) {RULE}"))
    # Where local is allowed, a notify command still follows `commands`.
    reports = {"policy.yaml": POLICY.replace('run_as: ["", reporter]',
                                             'run_as: [""]\n    commands: [/usr/bin/]'),
               "billing/reports/r.yaml": "apiVersion: cronfile/v1\njobs:\n  report:\n"
               "    schedule: '@daily'\n    command: [/usr/bin/true]\n"
               "    notify: {command: [/bin/mail, ops]}\n"}
    found = problems(tmp_path / "r", reports)
    assert len(found) == 1 and found[0].endswith(
        "jobs.report.notify.command[0]: billing/reports/ allows programs starting with "
        f"/usr/bin/ only, not /bin/mail (policy at {tmp_path}/r/policy.yaml:12:5)"), found


def test_a_directory_limited_to_some_agents_may_not_declare_agents(tmp_path: Path) -> None:
    files = billing(GOOD_JOB)
    files["billing/jobs.yaml"] = files["billing/jobs.yaml"].replace(
        "jobs:\n", "agents:\n  sneaky: {labels: {team: billing}, ssh: {host: web-1.internal}}\n"
        "jobs:\n")
    found = problems(tmp_path, files)
    expect(tmp_path, found, at(3, 3, "agents.sneaky",
                               "billing/ may only target agents, not declare them: declare "
                               f"sneaky in a file the policy does not limit {RULE}"))


def test_the_longest_matching_path_wins_and_rules_do_not_inherit(tmp_path: Path) -> None:
    policy = Policy((PolicyRule(""), PolicyRule("billing/"), PolicyRule("billing/reports/")))
    assert policy.rule_for("billing/reports/x.yaml").path == "billing/reports/"
    assert policy.rule_for("billing/x.yaml").path == "billing/"
    assert policy.rule_for("billingx/x.yaml").path == ""  # a directory, not a text prefix
    assert Policy((PolicyRule("billing/"),)).rule_for("web/x.yaml") is None
    assert normalise_path("billing") == normalise_path("/billing/") == "billing/"
    # billing/reports/ says nothing about targets: a job there may run on local.
    files = {"policy.yaml": POLICY, "billing/reports/r.yaml": "apiVersion: cronfile/v1\njobs:\n"
             "  report:\n    schedule: '@daily'\n    command: [/usr/bin/true]\n"
             "    run_as: root\n"}
    found = problems(tmp_path, files)
    assert len(found) == 1 and 'billing/reports/ allows run_as "" or reporter only' in found[0]


def test_two_policies_are_an_error_naming_both(tmp_path: Path) -> None:
    found = problems(tmp_path, {"a.yaml": "apiVersion: cronfile/v1\npolicy:\n  - path: ''\n",
                                "b/c.yaml": "apiVersion: cronfile/v1\n\npolicy: []\n"})
    assert found == [
        f"{tmp_path}/a.yaml:2:1: error: policy: only one file may hold a policy; another is "
        f"at {tmp_path}/b/c.yaml:3",
        f"{tmp_path}/b/c.yaml:3:1: error: policy: only one file may hold a policy; another is "
        f"at {tmp_path}/a.yaml:2",
    ]


def test_bad_rules_are_schema_errors_at_their_line(tmp_path: Path) -> None:
    found = problems(tmp_path, {"p.yaml": """\
        apiVersion: cronfile/v1
        policy:
          - path: ../etc
          - path: web/
            locale: false
          - path: ops/
          - path: ops
        """})
    assert found == [
        f"{tmp_path}/p.yaml:3:5: error: policy[0].path: '../etc' is not a directory of the "
        "schedules tree: write it relative to the tree (billing/), without '.' or '..' "
        "components, or \"\" for every file",
        f"{tmp_path}/p.yaml:5:5: error: policy[1].locale: unknown key 'locale' (did you mean "
        "'local'?)",
    ]
    found = problems(tmp_path / "d", {"p.yaml": "apiVersion: cronfile/v1\npolicy:\n"
                                      "  - path: ops/\n  - path: ops\n"})
    assert found == [f"{tmp_path}/d/p.yaml:4:5: error: policy[1].path: a rule for ops/ is "
                     f"already at {tmp_path}/d/p.yaml:3"]


def test_validate_reports_policy_errors_in_every_format(tmp_path: Path) -> None:
    schedules = tmp_path / "schedules"
    write(schedules, billing(GOOD_JOB.replace("run_as: billing", "run_as: root")))
    done = run(["validate", "--format", "json"], tmp_path)
    assert done.returncode == 1
    [problem] = json.loads(done.stdout)["problems"]
    assert problem == {
        "file": "schedules/billing/jobs.yaml", "line": 6, "column": 5, "severity": "error",
        "path": "jobs.invoice.run_as",
        "message": "billing/ allows run_as billing only, not root "
                   "(policy at schedules/policy.yaml:6:5)"}
    done = run(["validate"], tmp_path)
    assert done.stdout == ("schedules/billing/jobs.yaml:6:5: error: jobs.invoice.run_as: "
                           "billing/ allows run_as billing only, not root (policy at "
                           "schedules/policy.yaml:6:5)\n")
    done = run(["validate", "schedules/billing/jobs.yaml"], tmp_path)
    assert done.returncode == 1 and "not root (policy at schedules/policy.yaml:6:5)" in done.stdout


def test_the_teams_example_passes_and_keeps_teams_apart(tmp_path: Path) -> None:
    import shutil

    from conftest import REPO

    example = REPO / "examples/teams/schedules"
    done = run(["validate", "--strict", str(example)], tmp_path)
    assert done.returncode == 0, done.stdout
    result = load_schedules(example)
    assert result.state is not None and result.state.policy is not None
    assert [r.path for r in result.state.policy.rules] == ["billing/", "web/", ""]
    copy = tmp_path / "schedules"
    shutil.copytree(example, copy)
    invoices = copy / "billing/invoices.yaml"
    invoices.write_text(invoices.read_text().replace("[billing-1]", "[web-1]"))
    done = run(["validate", "schedules"], tmp_path)
    assert done.returncode == 1
    assert done.stdout == (
        "schedules/billing/invoices.yaml:21:24: error: jobs.ledger-export.targets.agents[0]: "
        "billing/ may only target agents with team=billing, not web-1 (role=frontend, "
        "team=web) (policy at schedules/platform/policy.yaml:17:5)\n")
