"""Loading a schedules directory into a :class:`~cronfile.schedules.model.DesiredState`, or problems.

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
import stat
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronfile import gcpause
from cronfile.schedules import lint
from cronfile.schedules.cronexpr import ScheduleError
from cronfile.schedules.dst import fixed_time_warnings
from cronfile.schedules.durations import parse_duration, parse_size
from cronfile.schedules.firetimes import spec_for
from cronfile.schedules.model import (
    DEFAULT_OUTPUT_KEEP,
    Active,
    Agent,
    Calendar,
    CatchUp,
    Concurrency,
    DesiredState,
    Expect,
    Job,
    JobKind,
    Notify,
    NotifyFormat,
    OnChange,
    Policy,
    Pool,
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
from cronfile.schedules.policy import build_policy, check_inventory, check_jobs, single_policy
from cronfile.schedules.problems import Problem, Severity, did_you_mean, dotted, has_errors
from cronfile.schedules.schema import check_document
from cronfile.schedules.yamlsafe import MAX_FILE_BYTES, Mark, YamlDoc, load_yaml

LOCAL_AGENT = "local"
_ZONE_CACHE: dict[str, bool] = {}


@dataclass
class FileResult:
    """What one file contributes: its jobs and agents, and its own problems."""

    file: str
    digest: str
    jobs: list[Job] = field(default_factory=list)
    agents: list[Agent] = field(default_factory=list)
    calendars: list[Calendar] = field(default_factory=list)
    pools: list[Pool] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    # What the checks across files need, not the whole parsed file (its data and every
    # key's mark would cost memory per job): the declared names (their marks are in
    # ``doc``), and the marks of ``after``/``targets``/``defaults`` keys (see :func:`load_file`).
    doc: YamlDoc | None = None
    names: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # (mtime_ns, ctime_ns, size, inode) when read, None when too recent to trust.
    signature: tuple[int, int, int, int] | None = None
    hash_line: bytes = b""  # this file's part of the revision's content hash
    policy: Policy | None = None  # this file's ``policy:`` (see cronfile.schedules.policy)
    relative: str = ""  # the path below the schedules directory (what policy paths match)


@dataclass
class LoadResult:
    """A desired state (None when any error was found) and every problem, sorted; ``counts``
    has the jobs and agents of each file that were built without an error."""

    state: DesiredState | None
    problems: list[Problem]
    files: list[str]
    counts: dict[str, tuple[int, int]] = field(default_factory=dict)  # file -> jobs, agents

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

    def __init__(self, root: Path | str, only: str | None = None) -> None:
        """``only``: the name of one file in ``root`` to load alone (a file outside any
        schedules tree), instead of walking ``root``."""
        self.root = Path(root)
        self.only = only
        self._cache: dict[str, FileResult] = {}

    def load(self, *, with_git: bool = False) -> LoadResult:
        # The loader allocates many small objects and frees almost none of them until it
        # returns: the cyclic GC would rescan the growing heap again and again (a third of
        # the time for 10,000 jobs) to find nothing. Reference counting still frees garbage.
        with gcpause.paused():
            return self._load(with_git)

    def _load(self, with_git: bool) -> LoadResult:
        problems: list[Problem] = []
        if not self.root.is_dir():
            what = "is not a directory" if self.root.exists() else "does not exist"
            problems.append(Problem(str(self.root), 1, 1,
                                    f"schedules directory {what} (use --schedules DIR)"))
            return LoadResult(None, problems, [])
        walk_problems: list[Problem] = []
        if self.only is not None:
            paths = [(self.only, os.path.join(self.root, self.only))]
        else:
            paths, walk_problems = find_schedule_files(self.root)
        problems.extend(walk_problems)
        results: list[FileResult] = []
        seen: set[str] = set()
        root = str(self.root)
        # A file changed less than this before we look at it is read again next time
        # whatever its stat says: timestamps are coarse (a jiffy, or 2 s on FAT), and two
        # writes of the same size within one tick would look unchanged ("racy git").
        trusted_before = time.time_ns() - _RACY_NS
        for relative, path in paths:
            rel = os.path.normpath(os.path.join(root, relative))  # as the user wrote it
            seen.add(rel)
            cached = self._cache.get(rel)
            try:
                info = os.stat(path)
                signature: tuple[int, int, int, int] | None = (
                    info.st_mtime_ns, info.st_ctime_ns, info.st_size, info.st_ino)
                if max(info.st_mtime_ns, info.st_ctime_ns) >= trusted_before:
                    signature = None
            except OSError:
                signature = None
            if signature is not None and cached is not None and cached.signature == signature:
                results.append(cached)  # unchanged: not read, not hashed
                continue
            raw, problem = _read(rel, path)
            if problem is not None:
                problems.append(problem)
                if cached is not None:
                    cached.signature = None  # read it again next time
                continue
            assert raw is not None
            digest = hashlib.sha256(raw).hexdigest()
            if cached is None or cached.digest != digest:
                cached = load_file(rel, raw, digest)
                self._cache[rel] = cached
            cached.signature = signature
            cached.hash_line = f"{os.path.normpath(relative)}\0{digest}\n".encode()
            cached.relative = relative
            results.append(cached)
        for gone in set(self._cache) - seen:
            del self._cache[gone]
        for result in results:
            problems.extend(result.problems)
        problems.extend(check_across_files(results))
        policy, policy_problems = check_policy(results)
        problems.extend(policy_problems)
        if not paths and not walk_problems:
            problems.append(Problem(str(self.root), 1, 1, "no schedule files (*.yaml, *.yml) "
                                    "in this directory", severity=Severity.WARNING))
        problems.sort(key=lambda p: (p.file, p.line, p.column, p.message))
        files = [r.file for r in results]
        counts = {r.file: (len(r.jobs), len(r.agents)) for r in results}
        if has_errors(problems):
            return LoadResult(None, problems, files, counts)
        state = DesiredState(
            jobs=with_shared_parts(results),
            agents={a.name: a for r in results for a in r.agents},
            revision=Revision(_content_hash(results, self.root),
                              git_commit(self.root) if with_git else None),
            sources={r.file: r.digest for r in results},
            policy=policy,
            root=os.path.normpath(root),
        )
        return LoadResult(state, problems, files, counts)


_RACY_NS = 2_000_000_000


def with_shared_parts(results: list[FileResult]) -> dict[str, Job]:
    """Every job by name, its ``skip`` names resolved to the calendars and its ``pool`` name
    to the pool (declared in any file): a changed calendar or cap then changes the jobs
    that use it, as a plan should show. (Also used for an applied state read back from its
    stored files.)"""
    calendars = {c.name: c for r in results for c in r.calendars}
    pools = {p.name: p for r in results for p in r.pools}
    jobs = {}
    for r in results:
        for j in r.jobs:
            if j.skip:
                j = replace(j, skip=tuple(calendars.get(c.name, c) for c in j.skip))
            if j.pool is not None:
                j = replace(j, pool=pools.get(j.pool.name, j.pool))
            jobs[j.name] = j
    return jobs


def _read(shown: str, path: str) -> tuple[bytes | None, Problem | None]:
    """The bytes of a schedule file, or why not: a FIFO named x.yaml would block a plain
    read forever, and a huge file is refused before it is read into memory."""
    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):
            return None, Problem(shown, 1, 1, "not a regular file")
        if info.st_size > MAX_FILE_BYTES:
            return None, Problem(shown, 1, 1, f"file is {info.st_size} bytes; the limit is "
                                 f"{MAX_FILE_BYTES} (1 MiB): split it into several files")
        with open(path, "rb") as f:
            # Sized to the file: read(1 MiB) would allocate 1 MiB per file (0.2 s for 1,000).
            data = f.read(info.st_size + 1)
            if len(data) > info.st_size:  # it grew meanwhile; load_yaml reports it if too big
                data += f.read(MAX_FILE_BYTES + 1 - len(data))
            return data, None
    except OSError as exc:
        return None, Problem(shown, 1, 1, f"cannot read: {exc.strerror or exc}")


def load_schedules(root: Path | str, *, with_git: bool = False) -> LoadResult:
    """Load a schedules directory once (see :class:`ScheduleLoader` for repeated loads)."""
    return ScheduleLoader(root).load(with_git=with_git)


def load_single_file(path: Path) -> LoadResult:
    """Load one file on its own, with the checks across files applied to it alone."""
    return ScheduleLoader(path.parent, only=path.name).load()


def _content_hash(results: Iterable[FileResult], root: Path) -> str:
    """Hash of (path relative to the root, bytes) of every file: the same directory gives
    the same hash however its path is spelled, here or in a temporary git checkout. Each
    file's line (``rel\\0digest\\n``) is made once, when the file is read."""
    base = os.path.normpath(str(root))
    lines = sorted(r.hash_line or f"{os.path.relpath(r.file, base)}\0{r.digest}\n".encode()
                   for r in results)
    return "sha256:" + hashlib.sha256(b"".join(lines)).hexdigest()[:16]


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


def find_schedule_files(root: Path) -> tuple[list[tuple[str, str]], list[Problem]]:
    """Every ``*.yaml``/``*.yml`` below ``root`` (sorted): (path relative to ``root``, path
    to open), refusing links that leave it. The same walk as ``os.walk`` (a directory's
    files, then its subdirectories), with ``os.scandir`` entries and plain strings: a
    pathlib object per file cost seconds for 10,000 files.

    Hidden files and directories are skipped; directories are not followed through
    symlinks (their files are reached where they really are, or refused when outside).
    """
    found: list[tuple[str, str]] = []
    problems: list[Problem] = []
    real_root = root.resolve()

    def walk(top: str, prefix: str) -> None:
        try:
            with os.scandir(top) as it:
                entries = list(it)
        except OSError:
            return  # as os.walk: an unreadable directory is skipped
        dirs: list[os.DirEntry[str]] = []
        files: list[os.DirEntry[str]] = []
        for entry in entries:
            try:
                is_dir = entry.is_dir()
            except OSError:
                is_dir = False
            (dirs if is_dir else files).append(entry)
        subdirs = []
        for entry in sorted((d for d in dirs if not d.name.startswith(".")), key=_by_name):
            if entry.is_symlink():
                problem = _outside(Path(entry.path), real_root)
                if problem is not None:
                    problems.append(problem)
            else:
                subdirs.append(entry)
        for entry in sorted(files, key=_by_name):
            name = entry.name
            if not name.endswith((".yaml", ".yml")) or name.startswith("."):
                continue
            if entry.is_symlink():
                problem = _outside(Path(entry.path), real_root)
                if problem is not None:
                    problems.append(problem)
                    continue
            found.append((prefix + name, entry.path))
        for entry in subdirs:
            walk(entry.path, prefix + entry.name + "/")

    walk(os.fspath(root), "")
    return found, problems


def _by_name(entry: os.DirEntry[str]) -> str:
    return entry.name


def dangling_link(link: Path) -> Problem | None:
    """A problem when the symlink ``link`` leads nowhere (broken) or in a circle, else None."""
    shown = os.path.normpath(link)
    try:
        link.resolve(strict=True)
    except FileNotFoundError:
        return Problem(shown, 1, 1, f"broken symlink (to {os.readlink(link)})")
    except (OSError, RuntimeError):  # a loop: RuntimeError before Python 3.13
        return Problem(shown, 1, 1, "symlink loop")
    return None


def _outside(link: Path, real_root: Path) -> Problem | None:
    """A problem when the symlink ``link`` leads out of the schedules directory (or nowhere)."""
    shown = os.path.normpath(link)
    problem = dangling_link(link)
    if problem is not None:
        return problem
    target = Path(os.path.realpath(link))
    if target == real_root or real_root in target.parents:
        return None
    return Problem(shown, 1, 1, f"symlink points outside the schedules directory (to {target}): "
                   "refused")


# --------------------------------------------------------------------------- one file


def load_file(rel: str, raw: bytes, digest: str = "") -> FileResult:
    """Parse, schema-check and build one file's jobs and agents."""
    doc = load_yaml(rel, raw)
    result = FileResult(rel, digest or hashlib.sha256(raw).hexdigest(), doc=doc)
    if isinstance(doc.data, dict):
        failed = check_document(doc)
        if () not in failed:
            _FileBuilder(doc, result, failed).build()
            if "policy" in doc.data and not any(p[:1] == ("policy",) for p in failed):
                result.policy = build_policy(doc)
    result.problems = doc.problems
    data = doc.data
    if isinstance(data, dict):
        for section in ("jobs", "agents", "calendars", "pools"):
            names = data.get(section)
            if isinstance(names, dict):
                result.names[section] = tuple(names)
    # Keep only the marks the checks across files may name (after, targets, defaults, and
    # the jobs themselves), not the data: 10,000 files' trees would stay in memory.
    result.doc = YamlDoc(doc.file, marks={
        p: m for p, m in doc.marks.items()
        if len(p) <= 2 or p[0] == "defaults" or (p[0] == "jobs" and p[2] in _KEPT_MARKS)})
    return result


_KEPT_MARKS = frozenset(("after", "targets", "skip", "pool",
                         "run_as", "command", "notify"))  # last 3: policy


Failed = set[tuple[str | int, ...]]
_BAD = object()  # a value that was wrong (and reported): the job is not built


def _source(doc: YamlDoc, path: tuple[str | int, ...]) -> Source:
    m = doc.mark(path)
    return Source(doc.file, m[0], m[1])


def _entries(data: dict[str, Any], key: str) -> list[tuple[str, Any]]:
    """The ``name: value`` entries of a top-level section; none when the section is not a
    mapping (the schema has reported it, and the other sections are still checked)."""
    section = data.get(key)
    return list(section.items()) if isinstance(section, dict) else []


class _FileBuilder:
    """Builds one file's agents and jobs, applying the file's ``defaults``, and checks what
    the schema cannot (zones, schedules, one of schedule/trigger/after, ...).

    A value taken from ``defaults`` is converted once per file, not once per job: a wrong
    default is reported once, at its line in ``defaults``, and 10,000 jobs sharing a
    ``retries`` block share one :class:`Retries`.
    """

    def __init__(self, doc: YamlDoc, result: FileResult, failed: Failed) -> None:
        self.doc, self.result = doc, result
        data = doc.data
        defaults = data.get("defaults")
        self.defaults: dict[str, Any] = defaults if isinstance(defaults, dict) else {}
        self.defaults_ok = not any(p[:1] == ("defaults",) for p in failed)
        if not self.defaults_ok:  # check the jobs with the defaults that are right
            wrong = {p[1] for p in failed if len(p) > 1 and p[0] == "defaults"}
            self.defaults = {k: v for k, v in self.defaults.items() if k not in wrong}
        self.failed_jobs: dict[str, set[str | int]] = {}
        for p in failed:
            if len(p) > 1 and p[0] == "jobs":
                self.failed_jobs.setdefault(str(p[1]), set()).update(p[2:3])
        self.failed_agents = {p[1] for p in failed if len(p) > 1 and p[0] == "agents"}
        self.failed_calendars = {p[1] for p in failed if len(p) > 1 and p[0] == "calendars"}
        self.failed_pools = {p[1] for p in failed if len(p) > 1 and p[0] == "pools"}
        self._base: dict[str, Any] | None = None
        self._base_bad = False
        self.now = time.time()  # validate warns about the daylight-saving changes ahead

    def build(self) -> None:
        data = self.doc.data
        for name, raw in _entries(data, "calendars"):
            if isinstance(raw, dict) and name not in self.failed_calendars:
                calendar = self.calendar(name, raw)
                if calendar is not None:
                    self.result.calendars.append(calendar)
        for name, raw in _entries(data, "pools"):
            if isinstance(raw, dict) and name not in self.failed_pools:
                self.result.pools.append(Pool(name, int(raw["max_running"])))
        for name, raw in _entries(data, "agents"):
            if name not in self.failed_agents:
                agent = self.agent(name, raw)
                if agent is not None:
                    self.result.agents.append(agent)
        for name, raw in _entries(data, "jobs"):
            if not isinstance(raw, dict):
                continue  # reported by the schema
            wrong = self.failed_jobs.get(name)
            if wrong is None and self.defaults_ok:
                job = self.job(name, raw)
                if job is not None:
                    self.result.jobs.append(job)
            else:
                # A job with schema errors still gets every other check, with the keys that
                # are right: all of a job's problems are reported in one run.
                self.job(name, raw, wrong or set(), check_only=True)

    # ----------------------------------------------------------------- calendars

    def calendar(self, name: str, raw: dict[str, Any]) -> Calendar | None:
        path = ("calendars", name)
        ok = True
        dates = []
        for i, text in enumerate(raw.get("dates") or ()):
            try:
                dates.append(date.fromisoformat(text).isoformat())
            except (TypeError, ValueError):
                self.doc.error((*path, "dates", i), f"{text!r} is not a date (YYYY-MM-DD)")
                ok = False
        windows = []
        for i, window in enumerate(raw.get("windows") or ()):
            where = (*path, "windows", i)
            ends = []
            for key in ("from", "to"):
                text = window.get(key)
                if isinstance(text, str) and not _has_offset(text):
                    self.doc.error((*where, key), f"{text} needs an offset (Z or +01:00): a "
                                   "calendar is shared by jobs in different zones")
                    ok = False
                    continue
                ends.append(self.instant(text, "UTC", (*where, key)))
            if len(ends) != 2 or _BAD in ends:
                ok = False
                continue
            if ends[1] <= ends[0]:
                self.doc.error((*where, "to"), "a window's `to` must be after its `from`")
                ok = False
                continue
            windows.append((ends[0], ends[1]))
        if not ok:
            return None
        return Calendar(name, tuple(sorted(set(dates))), tuple(sorted(windows)))

    # ----------------------------------------------------------------- agents

    def agent(self, name: str, raw: dict[str, Any]) -> Agent | None:
        path = ("agents", name)
        if name == LOCAL_AGENT:
            self.doc.error(path, "'local' is the center's own host and cannot be declared")
            return None
        ssh = None
        if raw.get("ssh"):
            s = raw["ssh"]
            ssh = SshConfig(host=s["host"], port=int(s.get("port", 22)), user=s.get("user"),
                            key=s.get("key"), known_hosts=s.get("known_hosts"),
                            passphrase_file=s.get("passphrase_file"),
                            passphrase_env=s.get("passphrase_env"), sudo=s.get("sudo", True))
        cap = raw.get("max_running")
        return Agent(name, _labels(raw.get("labels")), ssh, _source(self.doc, path),
                     max_running=None if cap is None else int(cap))

    # ----------------------------------------------------------------- jobs

    def _inherited(self) -> dict[str, Any]:
        """The Job fields every job of this file starts from: the file's defaults
        converted once (a wrong one reported once, at its line), else the built-in ones."""
        if self._base is None:
            self._base = {}
            for key, (attr, convert, fallback) in _CONVERTERS.items():
                if key in self.defaults:
                    self._base[attr] = convert(self, self.defaults[key], ("defaults", key))
                else:
                    self._base[attr] = fallback
            self._base_bad = any(v is _BAD for v in self._base.values())
        return self._base

    def job(self, name: str, raw: dict[str, Any], wrong: set[str | int] | None = None,
            check_only: bool = False) -> Job | None:
        """The job ``name``, or None when it is wrong (and reported). With ``check_only``
        (the schema found errors), the keys in ``wrong`` are skipped and no job is built."""
        doc = self.doc
        given = [k for k in ("schedule", "trigger", "after", "run_at") if k in raw]
        if wrong:
            raw = {k: v for k, v in raw.items() if k not in wrong}
        kind = JobKind.DAEMON if raw.get("kind") == "daemon" else JobKind.CRON
        path = ("jobs", name)
        ok = True
        schedules: tuple[str, ...] = ()
        if "schedule" in raw:
            checked = self.schedules(name, raw["schedule"], (*path, "schedule"))
            ok = checked is not _BAD
            # Interned: a few hundred distinct texts shared by 100,000 jobs (memory).
            schedules = tuple(_interned(checked)) if checked is not _BAD else ()
        trigger = None
        if "trigger" in raw:
            delay = self.duration(raw["trigger"].get("delay", 0), (*path, "trigger", "delay"))
            ok = ok and delay is not _BAD
            trigger = Trigger(raw["trigger"]["event"], 0.0 if delay is _BAD else delay)
        after_raw = raw.get("after", ())
        after = (after_raw,) if isinstance(after_raw, str) else tuple(after_raw)
        if "kind" in (wrong or ()):
            return None  # daemon or not decides every check below
        if kind is JobKind.DAEMON and given:
            doc.error((*path, given[0]), f"a daemon runs all the time: remove {given[0]!r}")
            ok = False
        elif kind is JobKind.CRON and len(given) != 1:
            if given:
                doc.error((*path, given[1]), "a job has exactly one of schedule, trigger, after, "
                          f"run_at (this one has {' and '.join(given)})")
            else:
                doc.error(path, f"job {name!r} needs one of schedule, trigger, after or run_at "
                          "(or kind: daemon)")
            ok = False
        if kind is JobKind.CRON:
            for key in ("replicas", "restart"):
                if key in raw:
                    doc.warn((*path, key), f"{key!r} only applies to kind: daemon; ignored")
        fields = dict(self._inherited())
        bad = self._base_bad
        for key, value in raw.items():
            spec = _CONVERTERS.get(key)
            if spec is not None:
                converted = fields[spec[0]] = spec[1](self, value, (*path, key))
                if converted is _BAD:
                    bad = True
        if "env" in raw or "env" in self.defaults:
            fields["env"] = self.env(raw)
        if schedules:
            self.dst_warnings(name, schedules, fields["timezone"], (*path, "schedule"),
                              isinstance(raw.get("schedule"), str))
        zone = fields["timezone"] if fields["timezone"] is not _BAD else "UTC"
        run_at = None
        if "run_at" in raw:
            run_at = self.instant(raw["run_at"], zone, (*path, "run_at"))
            if run_at is _BAD:
                bad = True
            elif run_at <= self.now:
                doc.warn((*path, "run_at"), f"run_at {raw['run_at']} is in the past: this "
                         "one-shot job will not fire (again)")
        if "active" in raw:
            fields["active"] = self.active(raw["active"], zone, (*path, "active"))
            bad = bad or fields["active"] is _BAD
        command = raw.get("command")
        if check_only or command is None or not ok or bad:
            return None
        return Job(
            name=name,
            # argv words repeat across jobs ("/usr/bin/env", "--all"): interned, shared
            command=tuple(_interned(command)) if isinstance(command, list) else command,
            schedules=schedules,
            run_at=run_at,
            trigger=trigger,
            after=after,
            kind=kind,
            replicas=int(raw.get("replicas", 1)),
            description=raw.get("description", "") or "",
            source=_source(doc, path),
            **fields,
        )

    def schedules(self, name: str, value: str | list[str], path: tuple[str | int, ...]) -> Any:
        items = [value] if isinstance(value, str) else value
        ok = True
        for i, text in enumerate(items):
            where = path if isinstance(value, str) else (*path, i)
            try:
                spec_for(text, name)
            except ScheduleError as exc:
                self.doc.error(where, str(exc) + lint.error_hint(text))
                ok = False
                continue
            for warning in lint.expression_warnings(text):
                self.doc.warn(where, warning)
        return items if ok else _BAD

    def dst_warnings(self, name: str, schedules: tuple[str, ...], zone: Any,
                     path: tuple[str | int, ...], single: bool) -> None:
        """Warn about fixed local times that a daylight-saving change of ``zone`` skips or
        repeats in the coming year (what that day does is in the message)."""
        if zone is _BAD or zone == "UTC" or not schedules:
            return
        for i, text in enumerate(schedules):
            warning = fixed_time_warnings(spec_for(text, name), zone, self.now)
            if warning:
                self.doc.warn(path if single else (*path, i), warning)

    def instant(self, text: str, zone: str, path: tuple[str | int, ...]) -> Any:
        """An ISO-8601 time as epoch seconds; without an offset, in the job's zone (a
        wall-clock time in a DST gap or repeat is refused: it names no one instant)."""
        try:
            if not isinstance(text, str) or len(text) < 16:  # a date and an hh:mm at least
                raise ValueError(text)
            parsed = datetime.fromisoformat(text)
        except ValueError:
            self.doc.error(path, f"{text!r} is not an ISO-8601 time (e.g. 2026-12-24T18:00:00+01:00)")
            return _BAD
        if parsed.tzinfo is not None:
            return parsed.timestamp()
        local = [parsed.replace(tzinfo=ZoneInfo(zone), fold=f) for f in (0, 1)]
        real = {t.timestamp() for t in local
                if t.astimezone(UTC).astimezone(ZoneInfo(zone)).replace(tzinfo=None) == parsed}
        if len(real) != 1:
            what = "does not exist" if not real else "happens twice"
            self.doc.error(path, f"{text} {what} in {zone} (daylight saving): give an offset")
            return _BAD
        return real.pop()

    def active(self, raw: dict[str, Any], zone: str, path: tuple[str | int, ...]) -> Any:
        ends = {key: self.instant(raw[key], zone, (*path, key)) if key in raw else None
                for key in ("from", "until")}
        if any(v is _BAD for v in ends.values()):
            return _BAD
        start, until = ends["from"], ends["until"]
        if start is not None and until is not None and until <= start:
            self.doc.error((*path, "until"), "active.until must be after active.from")
            return _BAD
        return Active(start, until)

    def zone(self, name: str, path: tuple[str | int, ...]) -> Any:
        if _zone_exists(name):
            warning = lint.zone_warning(name)
            if warning:
                self.doc.warn(path, warning)
            return sys.intern(name)  # one string per zone, not one per job
        self.doc.error(path, f"unknown time zone {name!r} {lint.unknown_zone_hint(name)}")
        return _BAD

    def duration(self, value: Any, path: tuple[str | int, ...]) -> Any:
        try:
            return parse_duration(value)
        except ValueError as exc:
            self.doc.error(path, str(exc))
            return _BAD

    def env(self, raw: dict[str, Any]) -> tuple[tuple[str, str | SecretRef], ...]:
        own = raw.get("env") or {}
        inherited = self.defaults.get("env") or {}
        merged = {**inherited, **own} if inherited else own
        out: list[tuple[str, str | SecretRef]] = []
        for key, value in sorted(merged.items()):
            if isinstance(value, dict):
                out.append((key, SecretRef(value.get("from_file"), value.get("from_env"))))
            else:
                out.append((key, "" if value is None else str(value)))
        return tuple(out)

    def retries(self, raw: dict[str, Any], path: tuple[str | int, ...]) -> Any:
        backoff = self.duration(raw.get("backoff", "30s"), (*path, "backoff"))
        factor = float(raw.get("factor", 2))
        if not 1 <= factor <= 1000:  # also refuses .nan and .inf, which the schema lets by
            self.doc.error((*path, "factor"), f"must be a number from 1 to 1000, not {factor!r}")
            return _BAD
        if backoff is _BAD:
            return _BAD
        codes = raw.get("retry_on_exit_codes")
        return Retries(max=int(raw.get("max", 0)), backoff_s=backoff, factor=factor,
                       retry_on_exit_codes=tuple(codes) if codes is not None else None)

    def expect(self, raw: dict[str, Any], path: tuple[str | int, ...]) -> Any:
        values = [self.duration(raw[k], (*path, k)) if k in raw else None
                  for k in ("max_runtime", "min_runtime", "success_within")]
        return _BAD if _BAD in values else Expect(*values)

    def restart(self, raw: dict[str, Any], path: tuple[str | int, ...]) -> Any:
        backoff = self.duration(raw.get("backoff", "5s"), (*path, "backoff"))
        most = self.duration(raw.get("max_backoff", "5m"), (*path, "max_backoff"))
        if backoff is _BAD or most is _BAD:
            return _BAD
        return RestartPolicy(RestartPolicyKind(raw.get("policy", "always")), backoff, most)


_NO_RETRIES = Retries()
_NO_EXPECT = Expect()
_RESTART = RestartPolicy()
_LOCAL = Targets()


def _has_offset(text: str) -> bool:
    try:
        return datetime.fromisoformat(text).tzinfo is not None
    except ValueError:
        return True  # not a time at all: instant() says so


def _interned(words: Iterable[Any]) -> Iterator[Any]:
    return (sys.intern(w) if w.__class__ is str else w for w in words)


def _same(builder: _FileBuilder, value: Any, path: tuple[str | int, ...]) -> Any:
    return value


def _text(builder: _FileBuilder, value: Any, path: tuple[str | int, ...]) -> str:
    return value or ""


def _enum(kind: Any) -> Any:
    members = {member.value: member for member in kind}  # the schema has checked the value
    return lambda builder, value, path: members[value]


def _labels(raw: dict[str, Any] | None) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((str(k), str(v)) for k, v in (raw or {}).items()))


def _targets(builder: _FileBuilder, raw: dict[str, Any], path: tuple[str | int, ...]) -> Targets:
    return Targets(agents=tuple(raw.get("agents") or ()), labels=_labels(raw.get("labels")),
                   strategy=Strategy(raw.get("strategy", "one")),
                   transport=Transport(raw.get("transport", "auto")))


def _notify(builder: _FileBuilder, raw: dict[str, Any], path: tuple[str | int, ...]) -> Notify:
    command = raw.get("command")
    return Notify(webhook=raw.get("webhook"),
                  command=tuple(command) if isinstance(command, list) else command,
                  when=tuple(raw.get("when", ["failure"])),
                  format=NotifyFormat(raw.get("format", NotifyFormat.JSON.value)))


def _output_keep(builder: _FileBuilder, raw: dict[str, Any], path: tuple[str | int, ...]) -> int:
    return parse_size(raw.get("keep", DEFAULT_OUTPUT_KEEP))


# File key -> (Job field, converter(builder, value, path), value when given nowhere). Plain
# functions, not bound methods: a builder holding its own bound methods is a reference
# cycle, garbage the loader (which runs with the cyclic GC off) would leave behind.
_CONVERTERS: dict[str, tuple[str, Any, Any]] = {
    "timezone": ("timezone", _FileBuilder.zone, "UTC"),
    "workdir": ("workdir", _same, None),
    "run_as": ("run_as", _same, None),
    "timeout": ("timeout_s", _FileBuilder.duration, None),
    "concurrency": ("concurrency", _enum(Concurrency), Concurrency.FORBID),
    "starting_deadline": ("starting_deadline_s", _FileBuilder.duration, None),
    "catch_up": ("catch_up", _enum(CatchUp), CatchUp.NONE),
    "jitter": ("jitter_s", _FileBuilder.duration, 0.0),
    "retries": ("retries", _FileBuilder.retries, _NO_RETRIES),
    "targets": ("targets", _targets, _LOCAL),
    "suspend": ("suspend", _same, False),
    "notify": ("notify", _notify, None),
    "output": ("output_keep", _output_keep, DEFAULT_OUTPUT_KEEP),
    "expect": ("expect", _FileBuilder.expect, _NO_EXPECT),
    "on_change": ("on_change", _enum(OnChange), OnChange.LET_FINISH),
    "restart": ("restart", _FileBuilder.restart, _RESTART),
    "owner": ("owner", _text, ""),
    # names only here; the loader puts the calendars in once every file is read
    "skip": ("skip", lambda _b, v, _p: tuple(Calendar(n) for n in v), ()),
    # the name only here; the loader puts the pool in once every file is read
    "pool": ("pool", lambda _b, v, _p: Pool(v), None),
}


# --------------------------------------------------------------------------- across files


def check_across_files(results: list[FileResult]) -> list[Problem]:
    """Names unique across files, ``after`` references and cycles, declared targets.

    Names come from every file's data, built or not: a job whose own fields are wrong still
    exists for ``after`` and for uniqueness, so one mistake is not reported three times.
    """
    problems: list[Problem] = []
    declared: dict[str, dict[str, Any]] = {}  # section -> every name declared there
    for section in ("jobs", "agents", "calendars", "pools"):
        # Merged with dict operations; the names defined twice (rare) are then looked for.
        seen: dict[str, Any] = {}
        total = 0
        for r in results:
            names = r.names.get(section)
            if names:
                total += len(names)
                seen.update(dict.fromkeys(names, r.file))
        declared[section] = seen
        if len(seen) == total:
            continue
        everywhere: dict[str, list[tuple[str, Mark]]] = {}
        for r in results:
            for name in r.names.get(section, ()):
                mark = r.doc.mark((section, name)) if r.doc is not None else Mark(1, 1)
                everywhere.setdefault(name, []).append((r.file, mark))
        kind = section[:-1]  # job, agent, calendar, pool
        for name, places in everywhere.items():
            if len(places) < 2:
                continue
            for i, (file, where) in enumerate(places):
                other_file, other = places[1] if i == 0 else places[0]
                problems.append(Problem(file, where.line, where.column,
                                        f"{kind} {name!r} is also defined at "
                                        f"{other_file}:{other.line}", f"{section}.{name}"))
    jobs = {j.name: j for r in results for j in r.jobs}
    agents = [a for r in results for a in r.agents]
    docs = {r.file: r.doc for r in results}
    matched: dict[tuple[tuple[str, str], ...], bool] = {}  # labels -> some agent has them
    for job in jobs.values():
        if not job.after and not job.targets.agents and not job.targets.labels and not job.skip \
                and job.pool is None:
            continue
        doc = docs.get(job.source.file)
        if job.pool is not None and job.pool.name not in declared["pools"]:
            hint = did_you_mean(job.pool.name, declared["pools"])
            problems.append(_located(doc, job, ("pool",), f"no pool named {job.pool.name!r} "
                                     f"in the pools: of any file{hint}"))
        for i, calendar in enumerate(job.skip):
            if calendar.name not in declared["calendars"]:
                hint = did_you_mean(calendar.name, declared["calendars"])
                problems.append(_located(doc, job, ("skip", i), f"no calendar named "
                                         f"{calendar.name!r} in the calendars: of any file{hint}"))
        for i, target in enumerate(job.after):
            if target not in declared["jobs"]:
                hint = did_you_mean(target, declared["jobs"])
                problems.append(_located(doc, job, ("after", i), f"no job named {target!r}{hint}"))
        for i, agent_name in enumerate(job.targets.agents):
            if agent_name != LOCAL_AGENT and agent_name not in declared["agents"]:
                hint = did_you_mean(agent_name, declared["agents"])
                problems.append(_located(doc, job, ("targets", "agents", i),
                                         f"agent {agent_name!r} is not declared in the agents: "
                                         f"of any file{hint}"))
        labels = job.targets.labels
        if labels and labels not in matched:
            matched[labels] = any(set(labels) <= set(a.labels) for a in agents)
        if labels and not matched[labels]:
            wanted = ", ".join(f"{k}={v}" for k, v in labels)
            problems.append(_located(doc, job, ("targets", "labels"),
                                     f"no declared agent has the labels {wanted}",
                                     Severity.WARNING))
        if job.targets.transport is Transport.SSH:
            problems.extend(_ssh_unreachable(doc, job, agents))
    problems.extend(_cycles(jobs, docs))
    return problems


def check_policy(results: list[FileResult]) -> tuple[Policy | None, list[Problem]]:
    """The one policy of the directory, and every job that breaks the rule of its file
    (the checks themselves are in :mod:`cronfile.schedules.policy`)."""
    policy, problems = single_policy([r.policy for r in results if r.policy is not None])
    if policy is None:
        return None, problems
    agents = {a.name: a for r in results for a in r.agents}
    for r in results:
        rule = policy.rule_for(r.relative) if r.jobs or r.agents else None
        if rule is not None:
            problems.extend(check_jobs(rule, r.jobs, agents, r.doc))
            problems.extend(check_inventory(rule, r.agents, r.doc))
    return policy, problems


def _ssh_unreachable(doc: YamlDoc | None, job: Job, agents: list[Agent]) -> list[Problem]:
    """``transport: ssh`` to an agent that declares no ``ssh:`` could never run there: every
    slot would be ``no_agent``. Said at validate time, naming the agent."""
    by_name = {a.name: a for a in agents}
    wanted = set(job.targets.labels)
    targeted = [by_name[n] for n in job.targets.agents if n in by_name]
    targeted += [a for a in agents if wanted and wanted <= set(a.labels) and a not in targeted]
    return [_located(doc, job, ("targets", "transport"),
                     f"transport: ssh, but agent {a.name!r} declares no ssh: (declare "
                     f"agents.{a.name}.ssh, or use transport: auto or tcp)")
            for a in targeted if a.ssh is None]


def _located(doc: YamlDoc | None, job: Job, sub: tuple[str | int, ...], message: str,
             severity: Severity = Severity.ERROR) -> Problem:
    """A problem at ``jobs.<job>.<sub>``, or at ``defaults.<sub>`` when the job inherited
    the value from its file's defaults."""
    path: tuple[str | int, ...] = ("jobs", job.name, *sub)
    if doc is not None and path[:3] not in doc.marks and ("defaults", sub[0]) in doc.marks:
        path = ("defaults", *sub)
    if doc is not None and isinstance(path[-1], int) and path not in doc.marks:
        path = path[:-1]  # `after: name`, the one-name form of a list
    if doc is None:
        return Problem(job.source.file, job.source.line, job.source.column, message,
                       dotted(path), severity)
    m = doc.mark(path)
    return Problem(doc.file, m.line, m.column, message, dotted(path), severity)


def _cycles(jobs: dict[str, Job], docs: dict[str, YamlDoc | None]) -> list[Problem]:
    """Report each ``after`` cycle once, at the job where the walk closes it.

    An explicit stack rather than recursion: a chain of 5,000 jobs is legal and would
    exceed Python's recursion limit.
    """
    problems: list[Problem] = []
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    for root in sorted(name for name, job in jobs.items() if job.after):
        if root in state:
            continue
        stack: list[tuple[str, Iterator[str]]] = [(root, iter(jobs[root].after))]
        on_stack = [root]
        state[root] = 1
        while stack:
            name, deps = stack[-1]
            dep = next(deps, None)
            if dep is None:
                stack.pop()
                on_stack.pop()
                state[name] = 2
            elif dep not in jobs:
                continue
            elif state.get(dep) == 1:
                cycle = on_stack[on_stack.index(dep):] + [dep]
                job = jobs[name]
                problems.append(_located(docs.get(job.source.file), job, ("after",),
                                         "cycle: " + " -> ".join(cycle)))
            elif dep not in state:
                state[dep] = 1
                stack.append((dep, iter(jobs[dep].after)))
                on_stack.append(dep)
    return problems
