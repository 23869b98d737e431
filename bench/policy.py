"""Does a policy slow ``cronfile validate``? The same 10,000 jobs with and without 10 rules.

Generates the tree of ``bench/validate.py`` (1,000 files in 40 team directories, the four
that declare the inventory moved to ``platform/``), with the shell-string commands turned
into argv lists (a ``commands`` rule refuses strings, and a
refused job would measure error reporting, not checking), twice: once as is, once with a
``policy.yaml`` of 10 rules (9 team directories and ``""``) that every job passes and whose
every check runs (targets against the inventory, ``local``, ``run_as``, ``commands``).
The target (ratio <= 1.1) is judged on loads alternating in one process; the same is also
measured in fresh processes and for the whole command (interpreter start included), whose
ratios swing with whatever else the machine runs. And the checks alone, over every job.

Run: ``.venv/bin/python bench/policy.py [--files N] [--jobs-per-file M] [--rounds R]``.
"""

from __future__ import annotations

import argparse
import math
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from validate import generate  # noqa: E402  (bench/validate.py: the same generated tree)

RULES = 10
_STRING_COMMAND = re.compile(r'^    command: (/usr/local/bin/task) --n (\d+) .*$', re.M)

_IN_PROCESS = """
import pathlib, sys, time
from cronfile.cli.validate import run_validate
root = pathlib.Path(sys.argv[1])
start = time.perf_counter()
report = run_validate([root], root)
elapsed = time.perf_counter() - start
assert report.exit_code == 0, [p.render() for p in report.problems[:5]]
print(elapsed)
"""


def policy_text() -> str:
    lines = ["apiVersion: cronfile/v1", "policy:"]
    for i in range(RULES - 1):
        lines += [f"  - path: team-{i:02d}/", f'    owners: ["@acme/team-{i:02d}"]',
                  "    targets: {labels: {}}", "    local: true", '    run_as: ["", backup]',
                  '    commands: ["/usr/local/bin/"]']
    lines += ['  - path: ""', '    owners: ["@acme/platform"]', "    local: true",
              '    run_as: [""]']
    return "\n".join(lines) + "\n"


def make_trees(base: Path, files: int, jobs_per_file: int) -> tuple[Path, Path, int]:
    plain = base / "plain" / "schedules"
    plain.mkdir(parents=True)
    jobs = generate(plain, files, jobs_per_file)
    for path in plain.rglob("*.yaml"):
        text = _STRING_COMMAND.sub(r'    command: ["\1", "--n", "\2"]', path.read_text())
        path.write_text(text)
    # The files that declare the inventory move to a platform directory, as in
    # examples/teams: a directory whose rule limits the targets may not declare agents.
    (plain / "platform").mkdir()
    for path in sorted(plain.rglob("*.yaml")):
        if "\nagents:\n" in path.read_text():
            path.rename(plain / "platform" / path.name)
    with_policy = base / "policy" / "schedules"
    shutil.copytree(plain, with_policy)
    (with_policy / "policy.yaml").write_text(policy_text())
    return plain, with_policy, jobs


def alternating(plain: Path, with_policy: Path, rounds: int) -> tuple[float, float]:
    """Best load time of each tree, loads alternating in ONE process (a fresh loader each
    time, so nothing is cached between loads): on a shared machine two processes seconds
    apart see different loads, two loads side by side in one process see the same."""
    from cronfile.cli.validate import run_validate

    best = [math.inf, math.inf]
    run_validate([plain], plain)  # warm the imports and the schema compile, for both alike
    for _ in range(rounds):
        for i, root in enumerate((plain, with_policy)):
            start = time.perf_counter()
            report = run_validate([root], root)
            best[i] = min(best[i], time.perf_counter() - start)
            assert report.exit_code == 0, [p.render() for p in report.problems[:5]]
    return best[0], best[1]


def timed(root: Path) -> float:
    done = subprocess.run([sys.executable, "-c", _IN_PROCESS, str(root)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        raise SystemExit(f"validate failed on {root}:\n{done.stderr[-3000:]}")
    return float(done.stdout)


def command(root: Path) -> float:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "cronfile", "validate", str(root)],
                          capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"cronfile validate failed on {root}:\n{done.stdout[-3000:]}")
    return elapsed


def checks_alone(root: Path, repeat: int = 5) -> float:
    """Seconds of the policy checks over every job of one load, measured in this process:
    what the checks cost, free of the noise between two processes."""
    from cronfile.schedules.loader import load_schedules
    from cronfile.schedules.policy import relative_file, violations

    state = load_schedules(root).state
    assert state is not None and state.policy is not None
    policy, jobs = state.policy, list(state.jobs.values())
    best = math.inf
    for _ in range(repeat):
        start = time.perf_counter()
        found = 0
        for job in jobs:
            rule = policy.rule_for(relative_file(job.source.file, state.root))
            if rule is not None:
                found += len(violations(rule, job, state.agents))
        best = min(best, time.perf_counter() - start)
        assert found == 0
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=1000)
    parser.add_argument("--jobs-per-file", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds (best one counts)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="cronfile-bench-policy-") as tmp:
        plain, with_policy, jobs = make_trees(Path(tmp), args.files, args.jobs_per_file)
        print(f"generated {args.files} files, {jobs} jobs; the policy has {RULES} rules")
        best = {"plain": math.inf, "policy": math.inf, "plain-cmd": math.inf,
                "policy-cmd": math.inf}
        for _ in range(args.rounds):  # interleaved: load on the machine hits both alike
            best["plain"] = min(best["plain"], timed(plain))
            best["policy"] = min(best["policy"], timed(with_policy))
            best["plain-cmd"] = min(best["plain-cmd"], command(plain))
            best["policy-cmd"] = min(best["policy-cmd"], command(with_policy))
        alone = checks_alone(with_policy)
        same_plain, same_policy = alternating(plain, with_policy, args.rounds)
    ratio = best["policy"] / best["plain"]
    ratio_cmd = best["policy-cmd"] / best["plain-cmd"]
    same = same_policy / same_plain
    print(f"run_validate, both trees alternating in one process: {same_policy:.3f} s with the "
          f"policy, {same_plain:.3f} s without; ratio {same:.3f}")
    print(f"run_validate, a fresh process each: {best['policy']:.3f} s with the policy, "
          f"{best['plain']:.3f} s without; ratio {ratio:.3f}")
    print(f"cronfile validate command: {best['policy-cmd']:.3f} s with the policy, "
          f"{best['plain-cmd']:.3f} s without; ratio {ratio_cmd:.3f}")
    print(f"the policy checks alone, every job (a rule lookup per job, where the loader does "
          f"one per file): {alone * 1000:.1f} ms, {alone / same_policy:.1%} of a load")
    print(f"target (ratio <= 1.1, alternating in one process): "
          f"{'met' if same <= 1.1 else 'MISSED'} (best of {args.rounds} rounds; the fresh-process "
          "ratios swing with the machine's load)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
