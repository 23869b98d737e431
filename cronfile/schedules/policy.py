"""Policy (SPEC §11): who may run what, where, by where a schedule file lives in the tree.

In a GitOps repository shared by teams, anyone who can merge a schedule file could otherwise
make any agent run anything. A ``policy:`` (in one file, protected by CODEOWNERS) gives each
directory of the schedules tree a rule; a job is checked against the rule with the longest
path that contains its file. This module is the ONE implementation: the loader calls it, so
``validate``, ``plan`` and the center refuse the same jobs with the same messages.

Targets are judged against the inventory as declared, and conservatively: a label selector
passes only when it implies the rule's labels, since any agent declared later (in any file)
could otherwise match it. Agents add their own limits on top (``--allow-run-as``,
``--allow-command-prefix``): a policy is a review tool, the agent's flags are the last word.

Pure: no I/O; everything here works on the loaded model and the marks of the YAML.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from cronfile.schedules.model import Agent, DesiredState, Job, Policy, PolicyRule, Source
from cronfile.schedules.problems import Problem, dotted
from cronfile.schedules.yamlsafe import YamlDoc

LOCAL_AGENT = "local"  # the center's own host (the loader's name for it, repeated: no cycle)

SubPath = tuple[str | int, ...]


# --------------------------------------------------------------------------- reading


def normalise_path(path: str) -> str:
    """``billing`` and ``billing/`` are the same directory; ``""`` stays every file."""
    path = path.strip("/")
    return path + "/" if path else ""


def build_policy(doc: YamlDoc) -> Policy:
    """The ``policy:`` of a schema-checked file; a path given twice is an error on ``doc``."""
    rules: list[PolicyRule] = []
    first: dict[str, Source] = {}
    for i, raw in enumerate(doc.data["policy"]):
        where = doc.mark(("policy", i))
        source = Source(doc.file, where.line, where.column)
        path = normalise_path(raw["path"])
        if path in first:
            doc.error(("policy", i, "path"), f"a rule for {_shown(path)} is already at "
                      f"{first[path].file}:{first[path].line}")
            continue
        first[path] = source
        targets = raw.get("targets")
        rules.append(PolicyRule(
            path=path,
            owners=tuple(raw.get("owners", ())),
            labels=(tuple(sorted((str(k), str(v)) for k, v in targets["labels"].items()))
                    if targets is not None else None),
            local=raw.get("local"),
            run_as=tuple(raw["run_as"]) if "run_as" in raw else None,
            commands=tuple(raw["commands"]) if "commands" in raw else None,
            source=source,
        ))
    where = doc.mark(("policy",))
    return Policy(tuple(rules), Source(doc.file, where.line, where.column))


def single_policy(found: Sequence[Policy]) -> tuple[Policy | None, list[Problem]]:
    """The directory's one policy; two or more are an error in each file, naming the others
    (which one would win is exactly what must not be guessed)."""
    if len(found) < 2:
        return (found[0] if found else None), []
    problems = []
    for policy in found:
        others = ", ".join(f"{o.source.file}:{o.source.line}" for o in found if o is not policy)
        problems.append(Problem(policy.source.file, policy.source.line, policy.source.column,
                                f"only one file may hold a policy; another is at {others}",
                                "policy"))
    return None, problems


def relative_file(file: str, root: str) -> str:
    """``file`` (as the loader names it) relative to the schedules directory ``root``."""
    if root in ("", "."):
        return file
    prefix = root.rstrip("/") + "/"
    return file[len(prefix):] if file.startswith(prefix) else file


# --------------------------------------------------------------------------- checking


@dataclass(frozen=True, slots=True)
class Violation:
    """One way a job breaks its rule: the job field (below ``jobs.<job>``) and why."""

    job: str
    field: SubPath
    message: str

    @property
    def path(self) -> str:
        return dotted(("jobs", self.job, *self.field))


def violations(rule: PolicyRule, job: Job, agents: Mapping[str, Agent]) -> list[Violation]:
    """Every way ``job`` breaks ``rule``, judged against the declared ``agents``.

    Called for every job of every load: the passing path only compares tuples, and a
    message is put together only for a job that breaks the rule (10,000 jobs under a
    policy must not slow ``validate`` down noticeably, see ``bench/policy.py``)."""
    out: list[Violation] = []
    if rule.labels is not None or rule.local is False:
        _check_targets(rule, job, agents, out)
    allowed_users = rule.run_as
    if allowed_users is not None and (job.run_as or "") not in allowed_users:
        allowed = " or ".join(u or '""' for u in allowed_users) or "nobody"
        if job.run_as is None:
            out.append(Violation(job.name, ("run_as",),
                                 f"{_shown(rule.path)} requires run_as {allowed} (list \"\" "
                                 f"to allow a job without run_as) {_at(rule)}"))
        else:
            out.append(Violation(job.name, ("run_as",), f"{_shown(rule.path)} allows run_as "
                                 f"{allowed} only, not {job.run_as} {_at(rule)}"))
    if rule.commands is not None:
        _check_command(rule, job.name, job.command, ("command",), out)
    notify = job.notify
    if notify is not None and notify.command:
        # A notify command runs on the center's own host, whatever the job's targets say.
        if not rule.allows_local:
            out.append(Violation(job.name, ("notify", "command"),
                                 f"{_shown(rule.path)} may not run commands on the center's own "
                                 f"host, where notify.command runs (use notify.webhook) "
                                 f"{_at(rule)}"))
        elif rule.commands is not None:
            _check_command(rule, job.name, notify.command, ("notify", "command"), out)
    return out


def _check_command(rule: PolicyRule, job: str, command: tuple[str, ...] | str,
                   field: SubPath, out: list[Violation]) -> None:
    prefixes = rule.commands or ()
    if command.__class__ is str:
        out.append(Violation(job, field,
                             f"{_shown(rule.path)} allows only argv commands whose program "
                             f"starts with {_listed(prefixes)}: a string command runs in a "
                             f"shell, which could run anything {_at(rule)}"))
    elif not command_allowed(command[0], prefixes):
        dots = " (a '..' component leaves the prefix)" if ".." in command[0].split("/") else ""
        out.append(Violation(job, (*field, 0),
                             f"{_shown(rule.path)} allows programs starting with "
                             f"{_listed(prefixes)} only, not {command[0]}{dots} {_at(rule)}"))


def command_allowed(program: str, prefixes: Iterable[str]) -> bool:
    """Whether ``program`` (argv[0]) starts with one of ``prefixes``. A ``..`` component is
    never allowed: ``/opt/billing/bin/../../../bin/sh`` starts with the prefix as text but
    runs a program outside it."""
    if ".." in program and ".." in program.split("/"):
        return False
    return program.startswith(tuple(prefixes))


def _at(rule: PolicyRule) -> str:
    return f"(policy at {rule.source.file}:{rule.source.line}:{rule.source.column})"


def _listed(values: tuple[str, ...]) -> str:
    return ", ".join(values) or "(none)"


def _check_targets(rule: PolicyRule, job: Job, agents: Mapping[str, Agent],
                   out: list[Violation]) -> None:
    wanted = rule.labels or ()
    targets = job.targets
    if targets.is_local_only:
        if not rule.allows_local:
            why = ("(local: false)" if rule.local is False
                   else f"(it has no labels; only agents with {_labels_text(wanted)})")
            hint = "" if targets.agents else ", where a job without targets runs"
            out.append(Violation(job.name, ("targets",),
                                 f"{_shown(rule.path)} may not run jobs on the center's own "
                                 f"host{hint} {why} {_at(rule)}"))
        return
    for i, name in enumerate(targets.agents):
        if name == LOCAL_AGENT:
            if not rule.allows_local:
                out.append(Violation(job.name, ("targets", "agents", i),
                                     f"{_shown(rule.path)} may not run jobs on the center's own "
                                     f"host (local) {_at(rule)}"))
            continue
        agent = agents.get(name)  # an undeclared one is the loader's error already
        if agent is not None and rule.labels is not None and not _has(agent.labels, wanted):
            out.append(Violation(job.name, ("targets", "agents", i),
                                 f"{_shown(rule.path)} may only target agents with "
                                 f"{_labels_text(wanted)}, not {name} "
                                 f"({_labels_text(agent.labels) or 'no labels'}) {_at(rule)}"))
    selector = targets.labels
    if selector and rule.labels is not None and not _has(selector, wanted):
        # Judged on the selector, not only on today's inventory: an agent declared later,
        # in a file this rule does not govern, must not become a target of this job.
        stray = [a.name for a in agents.values()
                 if _has(a.labels, selector) and not _has(a.labels, wanted)]
        example = f" ({', '.join(stray[:3])}{', ...' if len(stray) > 3 else ''})" if stray else ""
        out.append(Violation(job.name, ("targets", "labels"),
                             f"{_shown(rule.path)} may only target agents with "
                             f"{_labels_text(wanted)}: the selector {_labels_text(selector)} "
                             f"could match agents without it{example} {_at(rule)}"))


def _has(labels: tuple[tuple[str, str], ...], wanted: Iterable[tuple[str, str]]) -> bool:
    """Whether ``labels`` (sorted key/value pairs, one per key) include every pair wanted."""
    return all(pair in labels for pair in wanted)


def _labels_text(labels: Iterable[tuple[str, str]]) -> str:
    return ", ".join(f"{k}={v}" for k, v in labels)


def _shown(path: str) -> str:
    return path or '"" (every file)'


def check_jobs(rule: PolicyRule, jobs: Iterable[Job], agents: Mapping[str, Agent],
               doc: YamlDoc | None) -> list[Problem]:
    """Every violation of ``rule`` by the jobs of one file, as line-exact problems."""
    problems = []
    for job in jobs:
        for v in violations(rule, job, agents):
            problems.append(locate(v, job, doc))
    return problems


def check_inventory(rule: PolicyRule, agents: Iterable[Agent], doc: YamlDoc | None) -> list[Problem]:
    """Where a rule limits the targets, its files may not declare agents: an agent declared
    there could carry the rule's labels and point (``ssh.host``) at another team's host."""
    if rule.labels is None:
        return []
    problems = []
    for agent in agents:
        line, column = agent.source.line, agent.source.column
        if doc is not None:
            line, column = doc.mark(("agents", agent.name))
        problems.append(Problem(agent.source.file, line, column,
                                f"{_shown(rule.path)} may only target agents, not declare them: "
                                f"declare {agent.name} in a file the policy does not limit "
                                f"{_at(rule)}", f"agents.{agent.name}"))
    return problems


def locate(v: Violation, job: Job, doc: YamlDoc | None) -> Problem:
    """The problem at the job's field; at the file's ``defaults`` when the job inherited the
    value from there; at the job itself when the field is absent (``run_as`` not given)."""
    if doc is None:
        return Problem(job.source.file, job.source.line, job.source.column, v.message, v.path)
    marks = doc.marks
    own: SubPath = ("jobs", job.name, *v.field)
    candidates: list[SubPath] = [own[:n] for n in range(len(own), 2, -1)]
    if ("jobs", job.name, v.field[0]) not in marks:
        candidates = [("defaults", *v.field)[:n] for n in range(len(v.field) + 1, 1, -1)]
    candidates.append(("jobs", job.name))
    for path in candidates:
        if path in marks:
            m = doc.mark(path)
            return Problem(doc.file, m.line, m.column, v.message, v.path)
    return Problem(job.source.file, job.source.line, job.source.column, v.message, v.path)


# --------------------------------------------------------------------------- plan


@dataclass(frozen=True, slots=True)
class RuleChange:
    """A rule added, removed or changed: ``fields`` holds (name, old, new) as text."""

    path: str
    action: str  # "add" | "change" | "remove"
    fields: tuple[tuple[str, str, str], ...]
    owners: tuple[str, ...]
    source: Source


@dataclass(frozen=True, slots=True)
class PolicyChange:
    """What a change of the policy does: its rules, and the jobs it newly refuses or allows.

    ``forbids`` are the baseline's jobs the new policy refuses (and the old one did not);
    ``allows`` are the new jobs the old policy would have refused: (job, why)."""

    rules: tuple[RuleChange, ...]
    owners: tuple[str, ...]  # who owns the file that holds the policy
    file: str
    forbids: tuple[tuple[str, str], ...]
    allows: tuple[tuple[str, str], ...]

    @property
    def reviewers(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys([*self.owners, *(o for r in self.rules for o in r.owners)]))


_RULE_FIELDS = ("owners", "targets", "local", "run_as", "commands")


def _rule_fields(rule: PolicyRule) -> dict[str, str]:
    def items(values: tuple[str, ...] | None) -> str:
        return "(any)" if values is None else "[" + ", ".join(v or '""' for v in values) + "]"

    return {
        "owners": items(rule.owners) if rule.owners else "(none)",
        "targets": "(any)" if rule.labels is None else f"labels {_labels_text(rule.labels)}",
        "local": {True: "true", False: "false", None: "(default)"}[rule.local],
        "run_as": items(rule.run_as),
        "commands": items(rule.commands),
    }


def diff_policies(old: Policy | None, new: Policy | None) -> tuple[RuleChange, ...]:
    """The rules added, removed and changed, by path (sorted)."""
    before = {r.path: r for r in (old.rules if old else ())}
    after = {r.path: r for r in (new.rules if new else ())}
    changes = []
    for path in sorted(before.keys() | after.keys()):
        a, b = before.get(path), after.get(path)
        if a is None and b is not None:
            changes.append(RuleChange(path, "add", tuple(
                (k, "", v) for k, v in _rule_fields(b).items() if v not in ("(any)", "(none)",
                                                                             "(default)")),
                b.owners, b.source))
        elif b is None and a is not None:
            changes.append(RuleChange(path, "remove", (), a.owners, a.source))
        elif a is not None and b is not None and a != b:
            fa, fb = _rule_fields(a), _rule_fields(b)
            changes.append(RuleChange(path, "change", tuple(
                (k, fa[k], fb[k]) for k in _RULE_FIELDS if fa[k] != fb[k]),
                tuple(dict.fromkeys([*a.owners, *b.owners])), b.source))
    return tuple(changes)


def refused(policy: Policy | None, jobs: Iterable[Job], agents: Mapping[str, Agent],
            root: str) -> dict[str, str]:
    """{job: first reason} for the jobs ``policy`` refuses (``root``: see :func:`relative_file`)."""
    out: dict[str, str] = {}
    if policy is None:
        return out
    for job in jobs:
        rule = policy.rule_for(relative_file(job.source.file, root))
        if rule is None:
            continue
        found = violations(rule, job, agents)
        if found:
            out[job.name] = f"{found[0].path}: {found[0].message}"
    return out


def policy_change(old: DesiredState | None, new: DesiredState) -> PolicyChange | None:
    """What changed in the policy from ``old`` (None: nothing) to ``new``; None
    when the policy is the same. A baseline whose directory is unknown (a center's state)
    is read as if it lived where ``new`` does: the center and CI usually name it alike."""
    old_policy = old.policy if old is not None else None
    new_policy = new.policy
    if old_policy == new_policy:
        return None
    rules = diff_policies(old_policy, new_policy)
    holder = new_policy or old_policy
    assert holder is not None
    root = new.root
    file = holder.source.file
    owner_rule = new_policy.rule_for(relative_file(file, root)) if new_policy else None
    forbids: tuple[tuple[str, str], ...] = ()
    if old is not None:
        old_root = old.root or root
        now = refused(new_policy, old.jobs.values(), new.agents, old_root)
        before = refused(old_policy, old.jobs.values(), old.agents, old_root)
        forbids = tuple(sorted((j, why) for j, why in now.items() if j not in before))
    allows = tuple(sorted(refused(old_policy, new.jobs.values(), new.agents, root).items()))
    return PolicyChange(rules, owner_rule.owners if owner_rule else (), file, forbids, allows)


def owners_of(state: DesiredState | None, job: Job, default_root: str = "") -> tuple[str, ...]:
    """The owners of the rule that governs ``job``'s file in ``state`` (``default_root``:
    where the files are taken to be when ``state`` does not know, see :func:`policy_change`)."""
    policy = state.policy if state is not None else None
    if state is None or policy is None:
        return ()
    rule = policy.rule_for(relative_file(job.source.file, state.root or default_root))
    return rule.owners if rule is not None else ()
