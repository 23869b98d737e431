"""``cronfile plan`` / ``cronfile apply --dry-run``: what a change does, before it is merged.

Three layers, each small:

1. *Baselines* (:func:`git_baseline`, :func:`state_baseline`): the desired state to compare
   against, from a git revision, a center's ``applied.json``, or nothing.
2. :func:`build_plan`, a pure function of (old state, new state, now): the diff plus what it
   means in TIME (next fire times before and after, daylight-saving transitions in the
   window) and PLACE (the declared agents a job will run on).
3. One renderer per format (:func:`render_text`, :func:`render_json`,
   :func:`render_markdown`).

:func:`run_plan` ties them together and maps failures to exit codes: 0 success (or, with
``detailed_exitcode``, no change), 2 changes with ``detailed_exitcode`` (and usage errors),
1 when something is bad (invalid schedules, a bad git revision, an unreadable state file).
"""

from __future__ import annotations

import functools
import json
import subprocess
import tempfile
import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any
from zoneinfo import ZoneInfoNotFoundError

from cronfile.cli.access import AccessError, CenterAccess
from cronfile.schedules import jobtimes
from cronfile.schedules.diff import FieldChange, StateDiff, diff_states, field_changes
from cronfile.schedules.dst import effect_on, transitions
from cronfile.schedules.durations import format_duration
from cronfile.schedules.firetimes import spec_for, to_datetime
from cronfile.schedules.jobtimes import job_timer
from cronfile.schedules.loader import LOCAL_AGENT, load_schedules
from cronfile.schedules.model import (
    Agent,
    DesiredState,
    Job,
    JobKind,
    Notify,
    Revision,
    SshConfig,
    Strategy,
    Transport,
    Trigger,
)
from cronfile.schedules.policy import PolicyChange, owners_of, policy_change
from cronfile.schedules.problems import Problem, Severity
from cronfile.state.applied import APPLIED_FILE, StateFileError, read_applied

FORMATS = ("text", "json", "markdown")
ARROW = "→"
DASH = "—"


class PlanError(Exception):
    """Something the user must fix before a plan can be made (exit 1)."""


# --------------------------------------------------------------------------- baselines


@dataclass(frozen=True)
class Baseline:
    """What the schedules are compared against."""

    kind: str  # "none" | "git" | "state" | "center"
    label: str  # for people: "git HEAD (commit 1a2b3c4d5e6f)"
    state: DesiredState | None = None
    ref: str | None = None
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        revision = self.state.revision.to_dict() if self.state is not None else None
        return {"kind": self.kind, "label": self.label, "ref": self.ref,
                "revision": revision, "notes": list(self.notes)}


def empty_baseline() -> Baseline:
    return Baseline("none", "nothing", notes=(
        "no --against, --state or --center given: comparing against nothing, so every job "
        "is shown as added",))


def state_baseline(state_dir: Path) -> Baseline:
    """What a center last applied, from ``<state_dir>/applied.json``."""
    if not state_dir.is_dir():
        raise PlanError(f"--state {state_dir}: no such directory")
    try:
        state = read_applied(state_dir)
    except StateFileError as exc:
        raise PlanError(str(exc)) from None
    label = f"state {state_dir / APPLIED_FILE}"
    if state is None:
        return Baseline("state", label, notes=(
            f"{state_dir / APPLIED_FILE} does not exist (the center has applied nothing yet): "
            "comparing against nothing, so every job is shown as added",))
    return Baseline("state", label, state)


def center_baseline(center: CenterAccess) -> Baseline:
    """What a running center applied, fetched from its API (``/api/v1/applied``)."""
    try:
        state = center.applied()
    except AccessError as exc:
        raise PlanError(str(exc)) from None
    label = f"center {center.where.removeprefix('--center ')}"
    if state is None:
        return Baseline("center", label, notes=(
            "the center has applied nothing yet: comparing against nothing, so every job is "
            "shown as added",))
    return Baseline("center", label, state)


def _git(args: list[str], cwd: Path, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    try:
        return subprocess.run(["git", "-C", str(cwd), *args], input=stdin, capture_output=True,
                              timeout=120, check=False)
    except FileNotFoundError:
        raise PlanError("--against needs git, which is not installed") from None
    except subprocess.TimeoutExpired:
        raise PlanError(f"git {args[0]} took longer than 120s") from None


def _git_error(proc: subprocess.CompletedProcess[bytes]) -> str:
    text = proc.stderr.decode("utf-8", "replace").strip()
    return text.splitlines()[-1] if text else f"exit status {proc.returncode}"


def git_baseline(schedules: Path, ref: str) -> Baseline:
    """The same schedules directory as it was at git revision ``ref``.

    The files are read straight from git's object store (``ls-tree`` + ``cat-file``), not
    with ``git archive``, so ``export-ignore``/``export-subst`` attributes cannot alter them,
    and then loaded by the same loader as the working tree, from a temporary copy. A
    revision where the directory does not exist yet is an empty baseline (everything is
    added): that is the first PR that introduces cronfile.
    """
    if not ref or ref.startswith("-"):
        raise PlanError(f"--against {ref!r}: not a git revision")
    directory = schedules.resolve()
    top_proc = _git(["rev-parse", "--show-toplevel"], directory)
    if top_proc.returncode != 0:
        raise PlanError(f"--against needs {schedules} to be inside a git repository "
                        f"({_git_error(top_proc)})")
    top = Path(top_proc.stdout.decode().strip()).resolve()
    try:
        rel = directory.relative_to(top).as_posix()
    except ValueError:
        raise PlanError(f"{schedules} is not inside the git work tree {top}") from None
    commit_proc = _git(["rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}"], top)
    if commit_proc.returncode != 0:
        raise PlanError(f"--against {ref}: unknown git revision (try `git fetch`, or a branch, "
                        "tag or commit that exists in this repository)")
    commit = commit_proc.stdout.decode().strip()
    label = f"git {ref} (commit {commit[:12]})"
    where = "the repository root" if rel == "." else f"{rel}/"

    pathspec = [] if rel == "." else ["--", rel]
    listing = _git(["--literal-pathspecs", "ls-tree", "-r", "-z", "--full-tree", commit,
                    *pathspec], top)
    if listing.returncode != 0:
        raise PlanError(f"git ls-tree {ref}: {_git_error(listing)}")
    prefix = "" if rel == "." else rel + "/"
    entries: list[tuple[str, str, str]] = []  # (mode, object id, path inside the directory)
    for record in listing.stdout.split(b"\0"):
        if not record:
            continue
        meta, _, raw_path = record.partition(b"\t")
        mode, kind, oid = meta.decode().split()
        path = raw_path.decode("utf-8", "surrogateescape")
        if kind != "blob" or not path.startswith(prefix):
            continue
        inner = path[len(prefix):]
        if PurePosixPath(inner).suffix in (".yaml", ".yml"):
            entries.append((mode, oid, inner))
    if not entries:
        exists = _git(["cat-file", "-e", f"{commit}:{rel}" if rel != "." else commit], top)
        if exists.returncode != 0:
            return Baseline("git", label, None, ref, (
                f"{where} does not exist at {ref}: every job is shown as added",))

    blobs = _cat_blobs(top, [oid for _, oid, _ in entries])
    with tempfile.TemporaryDirectory(prefix="cronfile-plan-") as tmp:
        root = Path(tmp) / "schedules"
        root.mkdir()
        for mode, oid, inner in entries:
            target = root / inner
            target.parent.mkdir(parents=True, exist_ok=True)
            if mode == "120000":  # a symlink: recreate it; the loader refuses ones that leave
                target.symlink_to(blobs[oid].decode("utf-8", "surrogateescape"))
            else:
                target.write_bytes(blobs[oid])
        result = load_schedules(root)
        if result.state is None:
            errors = [p for p in result.problems if p.severity is Severity.ERROR]
            shown = "; ".join(_relocated(p, str(root), where).render() for p in errors[:3])
            more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
            return Baseline("git", label, None, ref, (
                f"the schedules at {ref} have {len(errors)} error(s): {shown}{more}; comparing "
                "against nothing, so every job is shown as added",))
        state = replace(result.state, revision=Revision(result.state.revision.content_hash,
                                                        commit))
    return Baseline("git", label, state, ref)


def _relocated(p: Problem, root: str, where: str) -> Problem:
    """A baseline problem with the temporary directory replaced by the repository path."""
    file = p.file
    if file.startswith(root):
        file = ("" if where == "the repository root" else where) + file[len(root):].lstrip("/")
    return Problem(file, p.line, p.column, p.message, p.path, p.severity)


def _cat_blobs(top: Path, oids: list[str]) -> dict[str, bytes]:
    """The contents of many blobs with one ``git cat-file --batch``."""
    if not oids:
        return {}
    proc = _git(["cat-file", "--batch"], top, stdin="".join(o + "\n" for o in oids).encode())
    if proc.returncode != 0:
        raise PlanError(f"git cat-file: {_git_error(proc)}")
    out, pos, blobs = proc.stdout, 0, {}
    for oid in oids:
        end = out.index(b"\n", pos)
        header = out[pos:end].decode().split()
        if len(header) != 3:
            raise PlanError(f"git cat-file: cannot read object {oid}")
        size = int(header[2])
        blobs[oid] = out[end + 1:end + 1 + size]
        pos = end + 1 + size + 1
    return blobs


# --------------------------------------------------------------------------- plan data


@dataclass(frozen=True)
class Timing:
    """When one definition of a job fires: its next times, or why it has none."""

    zone: str
    times: tuple[float, ...] = ()
    note: str = ""
    skipped: tuple[tuple[float, str], ...] = ()  # (time, why): slots a calendar skips


@dataclass(frozen=True)
class DstTransition:
    """A change of UTC offset in a job's zone inside the plan's window, and what it does
    to the job's slots (``affected_slot``: "02:30 → 03:00 that day", "" when none is)."""

    zone: str
    instant: float
    offset_before: int
    offset_after: int
    affected_slot: str = ""

    def text(self) -> str:
        before = to_datetime(self.instant - 1, self.zone)
        after = to_datetime(self.instant, self.zone)
        wall_before = datetime.fromtimestamp(self.instant + self.offset_before, UTC)
        wall_after = datetime.fromtimestamp(self.instant + self.offset_after, UTC)
        delta = self.offset_after - self.offset_before
        direction = "forward" if delta > 0 else "back"
        return (f"{wall_before:%Y-%m-%d %H:%M} {before.tzname()} {ARROW} "
                f"{wall_after:%H:%M} {after.tzname()} "
                f"(clocks go {direction} {format_duration(abs(delta))})")

    def slot_text(self) -> str:
        """What the job does at this transition, for a reviewer."""
        if self.affected_slot:
            return self.affected_slot
        low, high = sorted((self.offset_before, self.offset_after))
        start = datetime.fromtimestamp(self.instant + low, UTC)
        end = datetime.fromtimestamp(self.instant + high, UTC)
        return f"not affected (no slot from {start:%H:%M} to {end:%H:%M})"

    def to_dict(self) -> dict[str, Any]:
        return {"at": _iso_utc(self.instant), "zone": self.zone,
                "offset_before": self.offset_before, "offset_after": self.offset_after,
                "text": self.text(), "affected_slot": self.affected_slot or None}


@dataclass(frozen=True)
class Placement:
    """The declared agents a job can run on, and how its strategy picks among them."""

    agents: tuple[str, ...]
    text: str


@dataclass(frozen=True)
class JobPlan:
    name: str
    action: str  # "add" | "change" | "remove"
    changes: tuple[FieldChange, ...]
    before: Timing | None
    after: Timing | None
    dst: tuple[DstTransition, ...]
    placement: Placement | None
    owners: tuple[str, ...] = ()  # the policy's owners of the job's path: who must review


@dataclass(frozen=True)
class AgentPlan:
    name: str
    action: str
    changes: tuple[FieldChange, ...]
    jobs: tuple[str, ...]  # jobs whose targets match this agent (before or after)


@dataclass(frozen=True)
class Plan:
    diff: StateDiff
    revision: Revision
    jobs: tuple[JobPlan, ...]
    agents: tuple[AgentPlan, ...]
    window: tuple[float, float]
    policy: PolicyChange | None = None  # listed first: it changes what every job may do

    @property
    def is_empty(self) -> bool:
        return self.diff.is_empty and self.policy is None

    @property
    def reviewers(self) -> dict[str, list[str]]:
        """Owner -> what they must review (``policy`` and job names), in order."""
        out: dict[str, list[str]] = {}
        if self.policy is not None:
            for owner in self.policy.reviewers:
                out.setdefault(owner, []).append("policy")
        for job in self.jobs:
            for owner in job.owners:
                out.setdefault(owner, []).append(job.name)
        return out


DEFAULT_WINDOW_S = 7 * 86400  # plan --window's default


def build_plan(old: DesiredState | None, new: DesiredState, now: float, *,
               window_s: float = DEFAULT_WINDOW_S, fire_count: int = 3) -> Plan:
    """The diff from ``old`` to ``new`` and what it does in time and place, with the
    daylight-saving transitions of the next ``window_s`` seconds (pure)."""
    diff = diff_states(old, new)
    end = now + window_s
    old_jobs = old.jobs if old is not None else {}
    jobs: list[JobPlan] = []
    for name in diff.jobs.added:
        job = new.jobs[name]
        jobs.append(JobPlan(name, "add", _as_added(job), None, timing(job, now, fire_count),
                            dst_transitions(job, now, end), placement(job, new.agents),
                            owners_of(new, job)))
    for change in diff.jobs.changed:
        job = new.jobs[change.name]
        jobs.append(JobPlan(change.name, "change", change.changes,
                            timing(old_jobs[change.name], now, fire_count),
                            timing(job, now, fire_count), dst_transitions(job, now, end),
                            placement(job, new.agents), owners_of(new, job)))
    for name in diff.jobs.removed:
        # The owners under the policy in force before: they gave the job its place.
        jobs.append(JobPlan(name, "remove", (), None, None, (), None,
                            owners_of(old, old_jobs[name], new.root)))
    jobs.sort(key=lambda j: j.name)

    agents: list[AgentPlan] = []
    if not diff.agents.is_empty:
        users_new = _jobs_by_agent(new)
        users_old = _jobs_by_agent(old) if old is not None else {}
        for name in diff.agents.added:
            agents.append(AgentPlan(name, "add", _as_added(new.agents[name]),
                                    tuple(users_new.get(name, ()))))
        for change in diff.agents.changed:
            users = {*users_new.get(change.name, ()), *users_old.get(change.name, ())}
            agents.append(AgentPlan(change.name, "change", change.changes,
                                    tuple(sorted(users))))
        for name in diff.agents.removed:
            agents.append(AgentPlan(name, "remove", (), tuple(users_old.get(name, ()))))
        agents.sort(key=lambda a: a.name)
    return Plan(diff, new.revision, tuple(jobs), tuple(agents), (now, end),
                policy_change(old, new))


def _as_added(item: Job | Agent) -> tuple[FieldChange, ...]:
    """An added item's fields that differ from the defaults (what a reviewer needs to see)."""
    definition = item.definition()
    if isinstance(item, Job):
        blank = _blank_job(item.trigger is not None, item.notify is not None)
    else:
        blank = _blank_agent(item.ssh is not None)
    blank = dict(blank, name=definition["name"])
    out: list[FieldChange] = []
    for change in field_changes(blank, definition):
        out.extend(_leaves(change.field, change.new))
    return tuple(out)


# Definitions with every default, to show only what an added item sets. Optional nested
# values (trigger, notify, ssh) are present when the item has them, so that their own
# defaults (a trigger's 0s delay, ssh port 22) stay out of the way too. ``command`` is
# empty so that it always shows.
@functools.cache
def _blank_job(trigger: bool, notify: bool) -> dict[str, Any]:
    return Job("", (), trigger=Trigger("") if trigger else None,
               notify=Notify() if notify else None).definition()


@functools.cache
def _blank_agent(ssh: bool) -> dict[str, Any]:
    return Agent("", ssh=SshConfig("") if ssh else None).definition()


def _leaves(path: str, value: Any) -> list[FieldChange]:
    """``notify: {webhook: u, command: None}`` -> ``notify.webhook: u`` (nulls left out)."""
    if isinstance(value, dict) and value:
        return [leaf for k, v in value.items() if v is not None
                for leaf in _leaves(f"{path}.{k}", v)]
    return [FieldChange(path, None, value)]


def timing(job: Job, after: float, count: int) -> Timing:
    """The next ``count`` fire times of ``job`` after ``after``, or why it has none."""
    if job.suspend:
        return Timing(job.timezone, note="suspended: never fires")
    if job.kind is JobKind.DAEMON:
        each = f"{job.replicas} processes" if job.replicas != 1 else "one process"
        return Timing(job.timezone, note=f"daemon: runs all the time ({each} per target)")
    if job.trigger is not None:
        delay = f", {format_duration(job.trigger.delay_s)} later" if job.trigger.delay_s else ""
        return Timing(job.timezone, note=f"on `cronfile trigger {job.trigger.event}`{delay}")
    if job.after:
        return Timing(job.timezone, note=f"after {', '.join(job.after)} succeed")
    try:
        timer = job_timer(job)
        found = jobtimes.times(timer, after, count) if timer is not None else []
    except (ValueError, ZoneInfoNotFoundError) as exc:
        return Timing(job.timezone, note=f"cannot evaluate the schedule: {exc}")
    if not found and job.run_at is not None:
        return Timing(job.timezone, note="one-shot: its time has passed, it will not fire")
    skipped = tuple((t, why) for t in found if (why := job.skipped_because(t)) is not None)
    return Timing(job.timezone, tuple(found), "" if found else "never fires", skipped)


def dst_transitions(job: Job, start: float, end: float) -> tuple[DstTransition, ...]:
    """Offset changes in the job's zone inside [start, end), for jobs that fire on a clock."""
    if not (job.schedules or job.run_at) or job.suspend or job.kind is JobKind.DAEMON:
        return ()
    try:
        found = transitions(job.timezone, start, end)
        specs = [spec_for(text, job.name) for text in job.schedules]
    except (ValueError, ZoneInfoNotFoundError):
        return ()
    out = []
    for t in found:
        effects = [e for e in (effect_on(spec, t) for spec in specs) if e is not None]
        slot = "; ".join(dict.fromkeys(e.text() for e in effects))
        out.append(DstTransition(t.zone, t.instant, t.offset_before, t.offset_after, slot))
    return tuple(out)


def matching_agents(job: Job, agents: dict[str, Agent]) -> tuple[str, ...]:
    """The declared agents a job's targets name or select by labels, in declared order.

    Named agents come first in the order written (that order is what ``failover`` follows),
    then every other declared agent whose labels include all of ``targets.labels``.
    """
    if job.targets.is_local_only:
        return (LOCAL_AGENT,)
    out = list(dict.fromkeys(job.targets.agents))
    if job.targets.labels:
        wanted = set(job.targets.labels)
        out.extend(a.name for a in agents.values()
                   if a.name not in out and wanted <= set(a.labels))
    return tuple(out)


def placement(job: Job, agents: dict[str, Agent]) -> Placement:
    """Where a job will run, as declared (which of them are connected is the center's)."""
    names = matching_agents(job, agents)
    via = {Transport.AUTO: "", Transport.TCP: " via the agents' TCP channel only",
           Transport.SSH: " via SSH only"}[job.targets.transport]
    if names == (LOCAL_AGENT,):
        return Placement(names, f"local (the center's own host){via}")
    if not names:
        wanted = ", ".join(f"{k}={v}" for k, v in job.targets.labels)
        return Placement(names, f"no declared agent has labels {wanted}: "
                                "every slot would be recorded no_agent")
    listed = ", ".join(names)
    strategy = job.targets.strategy
    if len(names) == 1:
        text = names[0]
    elif strategy is Strategy.ONE:
        text = f"one of {listed} per run (round-robin over the connected ones)"
    elif strategy is Strategy.ALL:
        text = f"every one of {listed} (one run each)"
    elif strategy is Strategy.HASH:
        text = f"one of {listed}, the same one for every run (hash of the job name)"
    elif strategy is Strategy.FAILOVER:
        text = f"{' else '.join(names)} (the first connected, in this order)"
    else:
        text = f"every one of {listed} as shards 0..{len(names) - 1} of {len(names)}"
    return Placement(names, text + via)


def _jobs_by_agent(state: DesiredState) -> dict[str, list[str]]:
    """Agent name -> the jobs (sorted) whose targets match it, in one pass over the jobs."""
    out: dict[str, list[str]] = {}
    for name in sorted(state.jobs):
        for agent in matching_agents(state.jobs[name], state.agents):
            out.setdefault(agent, []).append(name)
    return out


# --------------------------------------------------------------------------- value display

# Model field names that differ from what users write in the YAML.
_YAML_NAMES = {"schedules": "schedule", "output_keep": "output.keep"}
# Fields that hold an instant (epoch seconds), not a duration, although they end in _s.
_INSTANTS = {"run_at", "active.from_s", "active.until_s"}


def display_field(path: str) -> str:
    """``timeout_s`` -> ``timeout``, ``retries.backoff_s`` -> ``retries.backoff``."""
    parts = path.split(".")
    parts[0] = _YAML_NAMES.get(parts[0], parts[0])
    return ".".join(p[:-2] if p.endswith("_s") else p for p in parts)


def display_value(path: str, value: Any) -> str:
    """A value as a reviewer reads it: durations as ``10m``, sizes as ``64KiB``, JSON else."""
    if value is None:
        return "(none)"
    last = path.split(".")[-1]
    if path == "skip" and isinstance(value, list):
        return "[" + ", ".join(_calendar_text(c) for c in value) + "]"
    if path in _INSTANTS and isinstance(value, int | float):
        return datetime.fromtimestamp(value, UTC).isoformat().replace("+00:00", "Z")
    if last.endswith("_s") and isinstance(value, int | float) and not isinstance(value, bool):
        return format_duration(value)
    if path == "output_keep" and isinstance(value, int):
        return _format_size(value)
    if path == "schedules" and isinstance(value, list) and len(value) == 1:
        value = value[0]
    return json.dumps(value, ensure_ascii=False)


def _calendar_text(calendar: Any) -> str:
    """A calendar a job skips, with what is in it (a changed calendar changes the job)."""
    if not isinstance(calendar, dict):
        return json.dumps(calendar)
    parts = []
    if calendar.get("dates"):
        parts.append("dates " + ", ".join(calendar["dates"]))
    if calendar.get("windows"):
        parts.append("windows " + ", ".join(
            f"{_utc_text(a)}..{_utc_text(b)}" for a, b in calendar["windows"]))
    return f"{calendar.get('name')} ({'; '.join(parts)})"


def _utc_text(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


def _format_size(n: int) -> str:
    for unit, size in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return f"{n}B"


def change_text(change: FieldChange, action: str) -> str:
    name = display_field(change.field)
    if action == "add":
        return f"{name}: {display_value(change.field, change.new)}"
    return (f"{name}: {display_value(change.field, change.old)} {ARROW} "
            f"{display_value(change.field, change.new)}")


def fire_text(ts: float, zone: str) -> str:
    """``Wed 2026-10-21 02:00 CEST = 2026-10-21 00:00 UTC`` (seconds only when not zero)."""
    local = to_datetime(ts, zone)
    fmt = "%Y-%m-%d %H:%M:%S" if local.second else "%Y-%m-%d %H:%M"
    text = f"{local:%a} {local.strftime(fmt)} {local.tzname()}"
    if local.utcoffset() or zone != "UTC":
        text += f" = {to_datetime(ts, 'UTC').strftime(fmt)} UTC"
    return text


def _iso_local(ts: float, zone: str) -> str:
    return to_datetime(ts, zone).isoformat(timespec="seconds")


def _iso_utc(ts: float) -> str:
    return to_datetime(ts, "UTC").isoformat(timespec="seconds").replace("+00:00", "Z")


def _revision_text(revision: Revision, with_commit: bool = True) -> str:
    text = f"content {revision.content_hash}"
    if with_commit:
        text += (f", git commit {revision.git_commit[:12]}" if revision.git_commit
                 else ", not a clean git commit")
    return text


def _baseline_text(baseline: Baseline) -> str:
    if baseline.state is None:
        return baseline.label
    # a git baseline's label already names its commit
    return f"{baseline.label}, {_revision_text(baseline.state.revision, baseline.kind != 'git')}"


def summary_line(plan: Plan) -> str:
    if plan.is_empty:
        return "No changes. The schedules match the baseline."
    j = plan.diff.jobs.counts()
    line = f"Plan: {j['add']} to add, {j['change']} to change, {j['remove']} to remove."
    if plan.policy is not None:
        line = "Policy changed. " + line
    if not plan.diff.agents.is_empty:
        a = plan.diff.agents.counts()
        line += (f" Agents: {a['add']} to add, {a['change']} to change, "
                 f"{a['remove']} to remove.")
    return line


_SIGN = {"add": "+", "change": "~", "remove": "-"}


# --------------------------------------------------------------------------- text


def render_text(plan: Plan, baseline: Baseline, warnings: list[Problem]) -> str:
    lines = [p.render() for p in warnings]
    if lines:
        lines.append("")
    lines.append(f"Baseline: {_baseline_text(baseline)}")
    lines.append(f"Revision: {_revision_text(plan.revision)}")
    start, end = plan.window
    lines.append(f"Window:   {_iso_utc(start)} {ARROW} {_iso_utc(end)} "
                 "(daylight-saving transitions inside it are listed)")
    lines.extend(f"Note: {n}" for n in baseline.notes)
    lines.append("")
    if plan.policy is not None:
        lines.extend(policy_lines(plan.policy))
        lines.append("")
    for job in plan.jobs:
        lines.extend(_job_text(job))
    if plan.agents:
        lines.append("Agents:")
        for agent in plan.agents:
            lines.append(f"{_SIGN[agent.action]} {agent.name}")
            lines.extend(f"    {change_text(c, agent.action)}" for c in agent.changes)
            if agent.jobs:
                names = ", ".join(agent.jobs[:10])
                more = f" and {len(agent.jobs) - 10} more" if len(agent.jobs) > 10 else ""
                lines.append(f"  jobs that target it: {names}{more}")
        lines.append("")
    lines.append(summary_line(plan))
    return "\n".join(lines) + "\n"


def policy_lines(change: PolicyChange) -> list[str]:
    """The policy change, marked ``!``: its rules, and which jobs it refuses or lets by."""
    review = f" (review: {', '.join(change.reviewers)})" if change.reviewers else ""
    lines = [f"! policy changed in {change.file}{review}"]
    for rule in change.rules:
        path = rule.path or '""'
        lines.append(f"  {_SIGN[rule.action]} rule {path} ({rule.source.file}:{rule.source.line})")
        for name, old, new in rule.fields:
            lines.append(f"      {name}: {new}" if rule.action == "add"
                         else f"      {name}: {old} {ARROW} {new}")
    if change.forbids:
        lines.append("  newly forbids (jobs of the baseline this policy refuses):")
        lines.extend(f"    {job}: {why}" for job, why in change.forbids)
    if change.allows:
        lines.append("  newly allows (jobs the old policy refused):")
        lines.extend(f"    {job}: {why}" for job, why in change.allows)
    if not change.forbids and not change.allows:
        lines.append("  no job of the baseline or of this revision changes from allowed to "
                     "refused, or back")
    return lines


def _timing_lines(label: str, t: Timing | None) -> list[str]:
    if t is None:
        return [f"    {label}{DASH} (not in the baseline)"]
    if t.note:
        return [f"    {label}{t.note}"]
    pad = " " * len(label)
    skipped = dict(t.skipped)
    return [f"    {label if i == 0 else pad}{fire_text(ts, t.zone)}"
            + (f"  (skipped: {skipped[ts]})" if ts in skipped else "")
            for i, ts in enumerate(t.times)]


def _job_text(job: JobPlan) -> list[str]:
    lines = [f"{_SIGN[job.action]} {job.name}"]
    if job.owners:
        lines.append(f"  owners: {', '.join(job.owners)}")
    lines.extend(f"    {change_text(c, job.action)}" for c in job.changes)
    lines.extend(_when_where_lines(job))
    lines.append("")
    return lines


def _when_where_lines(job: JobPlan) -> list[str]:
    """What an added or changed job does in time and place (nothing for a removed one)."""
    if job.action == "remove":
        return []
    zones = [t.zone for t in (job.before, job.after) if t is not None]
    lines = [f"  when ({f' {ARROW} '.join(dict.fromkeys(zones))}):"]
    lines.extend(_timing_lines("before: ", job.before))
    lines.extend(_timing_lines("after:  ", job.after))
    for d in job.dst:
        lines += [f"    daylight saving: {d.text()}", f"      this job: {d.slot_text()}"]
    if job.placement is not None:
        lines += ["  where:", f"    {job.placement.text}"]
    return lines


# --------------------------------------------------------------------------- json


def _timing_json(t: Timing | None) -> tuple[list[str], str | None]:
    if t is None:
        return [], None
    return [_iso_local(ts, t.zone) for ts in t.times], t.note or None


def plan_to_dict(plan: Plan, baseline: Baseline, warnings: list[Problem]) -> dict[str, Any]:
    jobs: list[dict[str, Any]] = []
    for job in plan.jobs:
        before, before_note = _timing_json(job.before)
        after, after_note = _timing_json(job.after)
        jobs.append({
            "name": job.name,
            "action": job.action,
            "changes": [{**c.to_dict(), "text": change_text(c, job.action)}
                        for c in job.changes],
            "timezone": job.after.zone if job.after is not None else None,
            "fire_times": {"before": before, "after": after},
            "fire_notes": {"before": before_note, "after": after_note},
            "dst_transitions": [d.to_dict() for d in job.dst],
            "agents": list(job.placement.agents) if job.placement else [],
            "placement": job.placement.text if job.placement else None,
            "owners": list(job.owners),
        })
        skipped = {side: [{"time": _iso_local(ts, t.zone), "reason": why} for ts, why in t.skipped]
                   for side, t in (("before", job.before), ("after", job.after))
                   if t is not None and t.skipped}
        if skipped:  # only jobs that skip calendars: other plans stay byte for byte the same
            jobs[-1]["skipped_slots"] = skipped
    return {
        "baseline": baseline.to_dict(),
        "revision": plan.revision.to_dict(),
        "window": {"start": _iso_utc(plan.window[0]), "end": _iso_utc(plan.window[1])},
        "changed": not plan.is_empty,
        "summary": plan.diff.jobs.counts(),
        "agent_summary": plan.diff.agents.counts(),
        "jobs": jobs,
        "agents": [{"name": a.name, "action": a.action,
                    "changes": [{**c.to_dict(), "text": change_text(c, a.action)}
                                for c in a.changes],
                    "jobs": list(a.jobs)} for a in plan.agents],
        "warnings": [p.to_dict() for p in warnings],
        "policy": _policy_json(plan.policy),
        "reviewers": plan.reviewers,
    }


def _policy_json(change: PolicyChange | None) -> dict[str, Any] | None:
    if change is None:
        return None
    return {
        "file": change.file,
        "owners": list(change.owners),
        "reviewers": list(change.reviewers),
        "rules": [{"path": r.path, "action": r.action, "owners": list(r.owners),
                   "source": str(r.source),
                   "changes": [{"field": f, "old": o, "new": n} for f, o, n in r.fields]}
                  for r in change.rules],
        "forbids": [{"job": j, "reason": why} for j, why in change.forbids],
        "allows": [{"job": j, "reason": why} for j, why in change.allows],
    }


def render_json(plan: Plan, baseline: Baseline, warnings: list[Problem]) -> str:
    return json.dumps(plan_to_dict(plan, baseline, warnings), indent=2, ensure_ascii=False) + "\n"


# --------------------------------------------------------------------------- markdown


def _fence(body: str, lang: str = "") -> str:
    """A code block whose fence is longer than any backtick run inside it."""
    longest, run = 0, 0
    for ch in body:
        run = run + 1 if ch == "`" else 0
        longest = max(longest, run)
    fence = "`" * max(3, longest + 1)
    return f"{fence}{lang}\n{body}\n{fence}"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _html(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


# GitHub refuses comments over 65,536 characters; a huge plan is cut, saying where.
MARKDOWN_LIMIT = 60_000
_MD_TABLE_ROWS = 200
_MD_DETAILS = 50


def render_markdown(plan: Plan, baseline: Baseline, warnings: list[Problem]) -> str:
    """A PR comment: summary, a table of jobs, a diff block, and time/place per job."""
    out = ["## cronfile plan", "", f"**{summary_line(plan)}**", ""]
    out.append(f"- Baseline: {_html(_baseline_text(baseline))}")
    out.append(f"- Revision: {_html(_revision_text(plan.revision))}")
    out.extend(f"- Note: {_html(n)}" for n in baseline.notes)
    out.extend(f"- ⚠️ `{_html(p.render())}`" for p in warnings)
    out.append("")
    if plan.policy is not None:
        out += ["### ⚠️ Policy change", "", _fence("\n".join(policy_lines(plan.policy))), ""]
    reviewers = plan.reviewers
    if reviewers:
        out.append("**Review required from:** " + "; ".join(
            f"{_html(owner)} ({', '.join(f'`{w}`' for w in what[:10])}"
            f"{f' and {len(what) - 10} more' if len(what) > 10 else ''})"
            for owner, what in reviewers.items()))
        out.append("")
    if plan.jobs:
        out += ["| | Job | Action | Next fire (after) | Runs on |", "|---|---|---|---|---|"]
        for job in plan.jobs[:_MD_TABLE_ROWS]:
            nxt = DASH
            if job.after is not None and (job.after.note or job.after.times):
                nxt = job.after.note or fire_text(job.after.times[0], job.after.zone)
            where = job.placement.text if job.placement else DASH
            out.append(f"| `{_SIGN[job.action]}` | `{job.name}` | {job.action} | "
                       f"{_cell(nxt)} | {_cell(where)} |")
        out.append(_more(len(plan.jobs) - _MD_TABLE_ROWS, "jobs"))
    diff_lines: list[str] = []
    items = [("", j.name, j.action, j.changes) for j in plan.jobs]
    items += [("agent ", a.name, a.action, a.changes) for a in plan.agents]
    for prefix, name, action, changes in items:
        sign = _SIGN[action]
        diff_lines.append(f"{sign} {prefix}{name}")
        diff_lines.extend(f"{sign}     {change_text(c, action)}" for c in changes)
    if diff_lines:
        out += [_fence("\n".join(diff_lines), "diff"), ""]
    shown = [j for j in plan.jobs if j.action != "remove"]
    for job in shown[:_MD_DETAILS]:
        body = "\n".join(_when_where_lines(job))
        out += [f"<details><summary><code>{_SIGN[job.action]} {job.name}</code> "
                f"({job.action})</summary>", "", _fence(body), "", "</details>", ""]
    out.append(_more(len(shown) - _MD_DETAILS, "jobs' times and places"))
    text = "\n".join(out).rstrip("\n") + "\n"
    if len(text) > MARKDOWN_LIMIT:
        cut = text.rfind("\n", 0, MARKDOWN_LIMIT - 200)
        text = text[:cut] + ("\n```\n\n" if text[:cut].count("```") % 2 else "\n\n")
        text += "_The plan is too long for a comment; run `cronfile plan` for all of it._\n"
    return text


def _more(n: int, what: str) -> str:
    return f"\n_… and {n} more {what}: run `cronfile plan` for all of them._\n" if n > 0 else ""


_RENDERERS = {"text": render_text, "json": render_json, "markdown": render_markdown}


# --------------------------------------------------------------------------- entry point


def _failure(fmt: str, message: str, problems: list[Problem] | None = None) -> str:
    """Why no plan was made, in the format asked for: ``--format json`` is JSON on stdout
    whatever happens (a pipeline into ``jq`` never reads text)."""
    found = problems or []
    if fmt == "json":
        errors = sum(1 for p in found if p.severity is Severity.ERROR)
        return json.dumps({"ok": False, "error": message, "errors": errors,
                           "warnings": len(found) - errors,
                           "problems": [p.to_dict() for p in found]},
                          indent=2, ensure_ascii=False) + "\n"
    lines = [p.render() for p in found]
    if fmt == "markdown":
        body = [f"**{_html(message[0].upper() + message[1:])}**", ""]
        if lines:
            body.append(_fence("\n".join(lines)))
        return "\n".join(["## cronfile plan", "", *body]) + "\n"
    return "\n".join([*lines, f"error: {message}"]) + "\n"


def run_plan(schedules: Path, *, against: str | None = None, state_dir: Path | None = None,
             center: CenterAccess | None = None, fmt: str = "text",
             detailed_exitcode: bool = False, now: float | None = None,
             window_s: float = DEFAULT_WINDOW_S,
             fire_count: int = 3) -> tuple[str, int]:
    """Compare ``schedules`` with a baseline; (output, exit code)."""
    if fmt not in _RENDERERS:
        return f"error: --format must be one of {', '.join(FORMATS)}\n", 2
    if sum(x is not None for x in (against, state_dir, center)) > 1:
        return _failure(fmt, "use only one of --against, --state, --center"), 2
    schedules = Path(schedules)
    result = load_schedules(schedules, with_git=True)
    if result.state is None:
        errors = sum(1 for p in result.problems if p.severity is Severity.ERROR)
        return _failure(fmt, f"{schedules} has {errors} error(s); no plan was made",
                        result.problems), 1
    try:
        if center is not None:
            baseline = center_baseline(center)
        elif against is not None:
            baseline = git_baseline(schedules, against)
        elif state_dir is not None:
            baseline = state_baseline(Path(state_dir))
        else:
            baseline = empty_baseline()
    except PlanError as exc:
        return _failure(fmt, str(exc)), 1
    warnings = [p for p in result.problems if p.severity is not Severity.ERROR]
    plan = build_plan(baseline.state, result.state, time.time() if now is None else now,
                      window_s=window_s, fire_count=fire_count)
    output = _RENDERERS[fmt](plan, baseline, warnings)
    return output, (2 if detailed_exitcode and not plan.is_empty else 0)
