"""Loading a schedules directory into a :class:`~cronfile.model.DesiredState`, or problems.

One entry point, :meth:`ScheduleLoader.load`, used by ``validate``, ``plan``, ``next`` and the
center alike. It reads every ``*.yaml``/``*.yml`` below the directory, checks each file on
its own (YAML hazards, schema, schedules, zones) and then the files together (unique names,
``after`` references and cycles, declared targets), and collects ALL problems before it
returns: a bad file never hides the problems of another, nor stops good files from being
checked.

A loader object remembers each file's result by its bytes, so the center's reloads re-parse
only the files that changed (a reload of one file among 10,000 costs one file's parse plus
the cheap cross-file checks).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronfile.cronexpr import ScheduleError
from cronfile.durations import parse_duration, parse_size
from cronfile.firetimes import spec_for
from cronfile.model import (
    Agent,
    CatchUp,
    Concurrency,
    DesiredState,
    Expect,
    Job,
    JobKind,
    Notify,
    OnChange,
    RestartPolicy,
    RestartPolicyKind,
    Retries,
    Revision,
    SecretRef,
    Source,
    SshConfig,
    Strategy,
    Targets,
    Transport,
    Trigger,
)
from cronfile.problems import Problem, Severity, dotted, has_errors
from cronfile.schema import check_document
from cronfile.yamlsafe import Mark, YamlDoc, load_yaml

LOCAL_AGENT = "local"
_ZONE_CACHE: dict[str, bool] = {}


@dataclass
class FileResult:
    """What one file contributes: its jobs and agents, and its own problems."""

    file: str
    digest: str
    jobs: list[Job] = field(default_factory=list)
    agents: list[Agent] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    doc: YamlDoc | None = None


@dataclass
class LoadResult:
    """A desired state (None when any error was found) and every problem, sorted."""

    state: DesiredState | None
    problems: list[Problem]
    files: list[str]

    @property
    def ok(self) -> bool:
        return self.state is not None

    def failed(self, strict: bool = False) -> bool:
        return has_errors(self.problems, strict)


def _zone_exists(name: str) -> bool:
    if name not in _ZONE_CACHE:
        try:
            ZoneInfo(name)
            _ZONE_CACHE[name] = True
        except (ZoneInfoNotFoundError, ValueError):
            _ZONE_CACHE[name] = False
    return _ZONE_CACHE[name]


class ScheduleLoader:
    """Loads one schedules directory, remembering per-file results between loads."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self._cache: dict[str, FileResult] = {}

    def load(self, *, with_git: bool = False) -> LoadResult:
        problems: list[Problem] = []
        if not self.root.is_dir():
            problems.append(Problem(str(self.root), 1, 1,
                                    "schedules directory does not exist (use --schedules DIR)"))
            return LoadResult(None, problems, [])
        paths, walk_problems = find_schedule_files(self.root)
        problems.extend(walk_problems)
        results: list[FileResult] = []
        seen: set[str] = set()
        for rel, path in paths:
            rel = os.path.normpath(os.path.join(str(self.root), rel))  # as the user wrote it
            seen.add(rel)
            try:
                raw = path.read_bytes()
            except OSError as exc:
                problems.append(Problem(rel, 1, 1, f"cannot read: {exc.strerror}"))
                continue
            digest = hashlib.sha256(raw).hexdigest()
            cached = self._cache.get(rel)
            if cached is None or cached.digest != digest:
                cached = load_file(rel, raw, digest)
                self._cache[rel] = cached
            results.append(cached)
        for gone in set(self._cache) - seen:
            del self._cache[gone]
        for result in results:
            problems.extend(result.problems)
        problems.extend(check_across_files(results))
        problems.sort(key=lambda p: (p.file, p.line, p.column, p.message))
        files = [r.file for r in results]
        if has_errors(problems) or not results and walk_problems:
            return LoadResult(None, problems, files)
        state = DesiredState(
            jobs={j.name: j for r in results for j in r.jobs},
            agents={a.name: a for r in results for a in r.agents},
            revision=Revision(_content_hash(results, self.root),
                              git_commit(self.root) if with_git else None),
        )
        return LoadResult(state, problems, files)


def load_schedules(root: Path | str, *, with_git: bool = False) -> LoadResult:
    """Load a schedules directory once (see :class:`ScheduleLoader` for repeated loads)."""
    return ScheduleLoader(root).load(with_git=with_git)


def _content_hash(results: Iterable[FileResult], root: Path) -> str:
    """Hash of (path relative to the root, bytes) of every file: the same directory gives
    the same hash however its path is spelled, here or in a temporary git checkout."""
    h = hashlib.sha256()
    base = os.path.normpath(str(root))
    relative = sorted((os.path.relpath(r.file, base), r.digest) for r in results)
    for rel, digest in relative:
        h.update(f"{rel}\0{digest}\n".encode())
    return "sha256:" + h.hexdigest()[:16]


def git_commit(root: Path) -> str | None:
    """HEAD's commit when ``root`` is inside a git work tree with no changes under it."""
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"],
                              capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "."],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if dirty.returncode != 0 or dirty.stdout.strip():
        return None
    return head.stdout.strip() or None


def find_schedule_files(root: Path) -> tuple[list[tuple[str, Path]], list[Problem]]:
    """Every ``*.yaml``/``*.yml`` below ``root`` (sorted), refusing links that leave it."""
    found: list[tuple[str, Path]] = []
    problems: list[Problem] = []
    real_root = root.resolve()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for d in list(dirnames):
            full = Path(dirpath, d)
            if full.is_symlink() and not _inside(full.resolve(), real_root):
                rel = full.as_posix()
                problems.append(Problem(rel, 1, 1, "symlink points outside the schedules "
                                        f"directory (to {full.resolve()}): refused"))
        for name in sorted(filenames):
            if not name.endswith((".yaml", ".yml")) or name.startswith("."):
                continue
            full = Path(dirpath, name)
            rel = full.relative_to(root).as_posix()
            shown = full.as_posix()
            if full.is_symlink() and not _inside(full.resolve(), real_root):
                problems.append(Problem(shown, 1, 1, "symlink points outside the schedules "
                                        f"directory (to {full.resolve()}): refused"))
                continue
            found.append((rel, full))
    return found, problems


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


# --------------------------------------------------------------------------- one file


def load_file(rel: str, raw: bytes, digest: str = "") -> FileResult:
    """Parse, schema-check and build one file's jobs and agents."""
    doc = load_yaml(rel, raw)
    result = FileResult(rel, digest or hashlib.sha256(raw).hexdigest(), doc=doc)
    if isinstance(doc.data, dict):
        failed = check_document(doc)
        if () not in failed:
            _build(doc, result, failed)
    result.problems = doc.problems
    return result


def _failed_under(failed: set[tuple[str | int, ...]], prefix: tuple[str | int, ...]) -> bool:
    n = len(prefix)
    return any(p[:n] == prefix for p in failed)


def _build(doc: YamlDoc, result: FileResult, failed: set[tuple[str | int, ...]]) -> None:
    data = doc.data
    defaults = data.get("defaults") or {}
    if _failed_under(failed, ("defaults",)):
        defaults = None
    for name, raw in (data.get("agents") or {}).items():
        if not _failed_under(failed, ("agents", name)):
            result.agents.append(_build_agent(doc, name, raw))
    for name, raw in (data.get("jobs") or {}).items():
        if defaults is None or _failed_under(failed, ("jobs", name)):
            _check_schedule_only(doc, name, raw, failed)
            continue
        job = _JobBuilder(doc, name, raw, defaults).build()
        if job is not None:
            result.jobs.append(job)


def _check_schedule_only(doc: YamlDoc, name: str, raw: Any,
                         failed: set[tuple[str | int, ...]]) -> None:
    """A job with other errors still gets its schedule checked: report all at once."""
    if not isinstance(raw, dict) or _failed_under(failed, ("jobs", name, "schedule")):
        return
    builder = _JobBuilder(doc, name, raw, {})
    builder._schedules()


def _source(doc: YamlDoc, path: tuple[str | int, ...]) -> Source:
    m = doc.mark(path)
    return Source(doc.file, m.line, m.column)


def _build_agent(doc: YamlDoc, name: str, raw: dict[str, Any]) -> Agent:
    path = ("agents", name)
    if name == LOCAL_AGENT:
        doc.error(path, "'local' is the center's own host and cannot be declared")
    ssh = None
    if raw.get("ssh"):
        s = raw["ssh"]
        ssh = SshConfig(host=s["host"], port=s.get("port", 22), user=s.get("user"),
                        key=s.get("key"), known_hosts=s.get("known_hosts"),
                        passphrase_file=s.get("passphrase_file"),
                        passphrase_env=s.get("passphrase_env"), sudo=s.get("sudo", True))
    labels = tuple(sorted((str(k), str(v)) for k, v in (raw.get("labels") or {}).items()))
    return Agent(name, labels, ssh, _source(doc, path))


class _JobBuilder:
    """Applies a file's defaults to one job and checks what the schema cannot."""

    def __init__(self, doc: YamlDoc, name: str, raw: dict[str, Any], defaults: dict[str, Any]):
        self.doc, self.name, self.raw, self.defaults = doc, name, raw, defaults
        self.ok = True

    def path(self, key: str) -> tuple[str | int, ...]:
        if key in self.raw or key not in self.defaults:
            return ("jobs", self.name, key)
        return ("defaults", key)

    def get(self, key: str, default: Any = None) -> Any:
        if key in self.raw:
            return self.raw[key]
        return self.defaults.get(key, default)

    def error(self, key: str, message: str, sub: tuple[str | int, ...] = ()) -> None:
        self.doc.error((*self.path(key), *sub), message)
        self.ok = False

    def warn(self, key: str, message: str) -> None:
        m: Mark = self.doc.mark(self.path(key))
        self.doc.problems.append(Problem(self.doc.file, m.line, m.column, message,
                                         dotted(self.path(key)), Severity.WARNING))

    def duration(self, key: str, value: Any = None) -> float | None:
        value = self.get(key) if value is None else value
        if value is None:
            return None
        try:
            return parse_duration(value)
        except ValueError as exc:
            self.error(key, str(exc))
            return None

    def build(self) -> Job | None:
        kind = JobKind(self.get("kind", "cron"))
        schedules = self._schedules()
        trigger = self._trigger()
        after = self.get("after") or ()
        after = (after,) if isinstance(after, str) else tuple(after)
        given = [k for k, v in (("schedule", schedules), ("trigger", trigger), ("after", after)) if v]
        if kind is JobKind.DAEMON and given:
            self.error(given[0], f"a daemon runs all the time: remove {given[0]!r}")
        elif kind is JobKind.CRON and len(given) != 1:
            if given:
                self.error(given[1], f"a job has exactly one of schedule, trigger, after "
                           f"(this one has {' and '.join(given)})")
            else:
                self.doc.error(("jobs", self.name), f"job {self.name!r} needs one of schedule, "
                               "trigger or after (or kind: daemon)")
                self.ok = False
        zone = self.get("timezone", "UTC")
        if not _zone_exists(zone):
            self.error("timezone", f"unknown time zone {zone!r} (use an IANA name such as "
                       "Europe/Berlin or UTC)")
        if kind is JobKind.CRON:
            for key in ("replicas", "restart"):
                if key in self.raw:
                    self.warn(key, f"{key!r} only applies to kind: daemon; ignored")
        command = self.get("command")
        if isinstance(command, str) and not command.strip():
            self.error("command", "command is empty")
        job = Job(
            name=self.name,
            command=tuple(command) if isinstance(command, list) else command,
            schedules=schedules,
            trigger=trigger,
            after=after,
            kind=kind,
            replicas=self.get("replicas", 1),
            restart=self._restart(),
            timezone=zone,
            env=self._env(),
            workdir=self.get("workdir"),
            run_as=self.get("run_as"),
            timeout_s=self.duration("timeout"),
            concurrency=Concurrency(self.get("concurrency", "forbid")),
            starting_deadline_s=self.duration("starting_deadline"),
            catch_up=CatchUp(self.get("catch_up", "none")),
            jitter_s=self.duration("jitter") or 0.0,
            retries=self._retries(),
            targets=self._targets(),
            suspend=bool(self.get("suspend", False)),
            notify=self._notify(),
            output_keep=parse_size(self.get("output", {}).get("keep", 64 * 1024)),
            expect=self._expect(),
            on_change=OnChange(self.get("on_change", "let_finish")),
            description=self.get("description", "") or "",
            owner=self.get("owner", "") or "",
            source=_source(self.doc, ("jobs", self.name)),
        )
        return job if self.ok else None

    def _schedules(self) -> tuple[str, ...]:
        value = self.get("schedule")
        if value is None:
            return ()
        items = [value] if isinstance(value, str) else list(value)
        for i, text in enumerate(items):
            try:
                spec_for(text, self.name)
            except ScheduleError as exc:
                self.error("schedule", str(exc),
                           () if isinstance(value, str) else (i,))
        return tuple(items)

    def _trigger(self) -> Trigger | None:
        raw = self.get("trigger")
        if not raw:
            return None
        delay = self.duration("trigger", raw.get("delay", 0)) or 0.0
        return Trigger(raw["event"], delay)

    def _env(self) -> tuple[tuple[str, str | SecretRef], ...]:
        merged = {**(self.defaults.get("env") or {}), **(self.raw.get("env") or {})}
        out: list[tuple[str, str | SecretRef]] = []
        for key, value in sorted(merged.items()):
            if isinstance(value, dict):
                out.append((key, SecretRef(value.get("from_file"), value.get("from_env"))))
            else:
                out.append((key, "" if value is None else str(value)))
        return tuple(out)

    def _restart(self) -> RestartPolicy:
        raw = self.get("restart") or {}
        return RestartPolicy(
            RestartPolicyKind(raw.get("policy", "always")),
            self.duration("restart", raw.get("backoff", "5s")) or 5.0,
            self.duration("restart", raw.get("max_backoff", "5m")) or 300.0,
        )

    def _retries(self) -> Retries:
        raw = self.get("retries") or {}
        codes = raw.get("retry_on_exit_codes")
        return Retries(
            max=raw.get("max", 0),
            backoff_s=self.duration("retries", raw.get("backoff", "30s")) or 0.0,
            factor=float(raw.get("factor", 2)),
            retry_on_exit_codes=tuple(codes) if codes is not None else None,
        )

    def _targets(self) -> Targets:
        raw = self.get("targets") or {}
        agents = raw.get("agents") or ()
        return Targets(
            agents=tuple(agents),
            labels=tuple(sorted((str(k), str(v)) for k, v in (raw.get("labels") or {}).items())),
            strategy=Strategy(raw.get("strategy", "one")),
            transport=Transport(raw.get("transport", "auto")),
        )

    def _notify(self) -> Notify | None:
        raw = self.get("notify")
        if not raw:
            return None
        command = raw.get("command")
        return Notify(
            webhook=raw.get("webhook"),
            command=tuple(command) if isinstance(command, list) else command,
            when=tuple(raw.get("when", ["failure"])),
        )

    def _expect(self) -> Expect:
        raw = self.get("expect") or {}
        return Expect(*(self.duration("expect", raw.get(k)) if k in raw else None
                        for k in ("max_runtime", "min_runtime", "success_within")))


# --------------------------------------------------------------------------- across files


def check_across_files(results: list[FileResult]) -> list[Problem]:
    """Names unique across files, ``after`` references and cycles, declared targets."""
    problems: list[Problem] = []
    jobs = {j.name: j for r in results for j in r.jobs}
    agents = {a.name: a for r in results for a in r.agents}
    for section in ("jobs", "agents"):
        first: dict[str, tuple[str, Mark]] = {}
        for r in results:
            names = r.doc.data.get(section) if r.doc and isinstance(r.doc.data, dict) else None
            if not isinstance(names, dict):
                continue
            for name in names:
                where = r.doc.mark((section, name)) if r.doc else Mark(1, 1)
                if name in first:
                    other_file, other = first[name]
                    kind = "job" if section == "jobs" else "agent"
                    problems.append(Problem(r.file, where.line, where.column,
                                            f"{kind} {name!r} is also defined at "
                                            f"{other_file}:{other.line}", f"{section}.{name}"))
                else:
                    first[name] = (r.file, where)
    docs = {r.file: r.doc for r in results}
    names_in_files = {name for r in results if r.doc and isinstance(r.doc.data, dict)
                      for name in (r.doc.data.get("jobs") or {})}
    for job in jobs.values():
        doc = docs.get(job.source.file)
        for i, target in enumerate(job.after):
            if target not in names_in_files:
                problems.append(_located(doc, job, ("after", i), f"no job named "
                                         f"{target!r}", job.source))
        for i, agent_name in enumerate(job.targets.agents):
            if agent_name != LOCAL_AGENT and agent_name not in agents:
                problems.append(_located(doc, job, ("targets", "agents", i),
                                         f"agent {agent_name!r} is not declared in any "
                                         "file's agents:", job.source))
        if job.targets.labels and not any(
            set(job.targets.labels) <= set(a.labels) for a in agents.values()
        ):
            wanted = ", ".join(f"{k}={v}" for k, v in job.targets.labels)
            problem = _located(doc, job, ("targets", "labels"),
                               f"no declared agent has labels {wanted}", job.source)
            problems.append(Problem(problem.file, problem.line, problem.column, problem.message,
                                    problem.path, Severity.WARNING))
    problems.extend(_cycles(jobs, docs))
    return problems


def _located(doc: YamlDoc | None, job: Job, sub: tuple[str | int, ...], message: str,
             fallback: Source) -> Problem:
    path = ("jobs", job.name, *sub)
    if doc is not None and path[:3] in doc.marks:
        m = doc.mark(path)
        return Problem(doc.file, m.line, m.column, message, dotted(path))
    if doc is not None and ("defaults", *sub[:1]) in doc.marks:
        m = doc.mark(("defaults", *sub))
        return Problem(doc.file, m.line, m.column, message, dotted(("defaults", *sub)))
    return Problem(fallback.file, fallback.line, fallback.column, message)


def _cycles(jobs: dict[str, Job], docs: dict[str, YamlDoc | None]) -> list[Problem]:
    """Report each ``after`` cycle once, at the job where the walk found it."""
    problems: list[Problem] = []
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    reported: set[frozenset[str]] = set()

    def visit(name: str, stack: list[str]) -> None:
        state[name] = 1
        stack.append(name)
        for dep in jobs[name].after:
            if dep not in jobs:
                continue
            if state.get(dep) == 1:
                cycle = stack[stack.index(dep):] + [dep]
                key = frozenset(cycle)
                if key not in reported:
                    reported.add(key)
                    job = jobs[name]
                    problems.append(_located(docs.get(job.source.file), job, ("after",),
                                             "cycle: " + " -> ".join(cycle), job.source))
            elif dep not in state:
                visit(dep, stack)
        stack.pop()
        state[name] = 2

    for name in sorted(jobs):
        if name not in state:
            visit(name, [])
    return problems
