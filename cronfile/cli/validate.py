"""``cronfile validate``: check schedule files and report every problem at once."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from cronfile.schedules.loader import LoadResult, dangling_link, load_schedules, load_single_file
from cronfile.schedules.problems import Problem, Severity, has_errors


@dataclass
class ValidateReport:
    problems: list[Problem]
    files: int
    jobs: int
    agents: int
    strict: bool
    usage_error: bool = False  # a PATH that does not exist: exit 2, as for a bad option

    @property
    def exit_code(self) -> int:
        if self.usage_error:
            return 2
        return 1 if has_errors(self.problems, self.strict) else 0


def _real(path: Path | str) -> Path:
    """The path with symlinks resolved; never raises (a symlink loop stays as written)."""
    return Path(os.path.realpath(path))


def _root_for(file: Path, schedules: Path) -> Path | None:
    """The schedules directory a single file belongs to: cross-file checks need all of it.

    ``--schedules`` when the file is inside it, else the nearest enclosing directory named
    ``schedules``; None when there is none: the file is then checked alone (its directory
    may be any directory, the system's temporary one, whose other files are not ours).
    """
    resolved = _real(file)
    if schedules.is_dir() and _real(schedules) in resolved.parents:
        return schedules
    for parent in resolved.parents:
        if parent.name == "schedules":
            return parent
    return None


def run_validate(paths: list[Path], schedules: Path, strict: bool = False) -> ValidateReport:
    """Validate directories (whole) and files (checked with the directory they live in)."""
    targets = paths or [schedules]
    problems: list[Problem] = []
    seen: set[Problem] = set()
    files = jobs = agents = 0
    missing = False
    loaded: dict[Path, LoadResult] = {}

    def add(found: list[Problem]) -> None:
        for p in found:
            if p not in seen:
                seen.add(p)
                problems.append(p)

    for target in targets:
        if not target.exists():
            link = dangling_link(target) if target.is_symlink() else None
            if link is not None:
                add([link])
                continue
            what = "schedules directory" if target == schedules and not paths else "path"
            add([Problem(str(target), 1, 1, f"no such {what} (see cronfile validate --help)")])
            missing = True
            continue
        root = target if target.is_dir() else _root_for(target, schedules)
        if root is None and not target.name.endswith((".yaml", ".yml")):
            add([Problem(str(target), 1, 1, "not a schedule file: only *.yaml and *.yml files "
                         "are read")])
            continue
        if root is None:
            key = _real(target)
            if key not in loaded:
                loaded[key] = load_single_file(target)
        else:
            key = _real(root)
            if key not in loaded:
                loaded[key] = load_schedules(root)
        result = loaded[key]
        if target.is_dir():
            add(result.problems)
            files += len(result.files)
            jobs += sum(j for j, _ in result.counts.values())
            agents += sum(a for _, a in result.counts.values())
            continue
        name = _real(target)
        if not any(_real(f) == name for f in result.files):
            add([Problem(str(target), 1, 1, "not a schedule file: only *.yaml and *.yml files "
                         "(not hidden, not outside the schedules directory) are read")])
            continue
        add([p for p in result.problems if _real(p.file) == name])
        files += 1
        for file, (n_jobs, n_agents) in result.counts.items():
            if _real(file) == name:
                jobs, agents = jobs + n_jobs, agents + n_agents
    return ValidateReport(problems, files, jobs, agents, strict, usage_error=missing)


def render(report: ValidateReport, fmt: str) -> tuple[str, str]:
    """(stdout, stderr) for a report; problems go to stdout, the summary to stderr."""
    errors = sum(1 for p in report.problems if p.severity is Severity.ERROR or report.strict)
    warnings = len(report.problems) - errors
    summary = (f"{report.files} files, {report.jobs} jobs, {report.agents} agents: "
               f"{errors} errors, {warnings} warnings")
    if fmt == "json":
        data = {
            "ok": report.exit_code == 0,
            "files": report.files,
            "jobs": report.jobs,
            "agents": report.agents,
            "errors": errors,
            "warnings": warnings,
            "problems": [_strict(p, report.strict).to_dict() for p in report.problems],
        }
        return json.dumps(data, indent=2) + "\n", ""
    lines = []
    for p in report.problems:
        p = _strict(p, report.strict)
        if fmt == "github":
            level = "error" if p.severity is Severity.ERROR else "warning"
            lines.append(f"::{level} file={_gh_property(p.file)},line={p.line},col={p.column},"
                         f"title=cronfile::{_gh_data(p.text())}")
        else:
            lines.append(p.render())
    return "".join(line + "\n" for line in lines), summary + "\n"


def _strict(p: Problem, strict: bool) -> Problem:
    if strict and p.severity is Severity.WARNING:
        return Problem(p.file, p.line, p.column, p.message, p.path, Severity.ERROR)
    return p


def _gh_data(text: str) -> str:
    """Escaped as GitHub's workflow commands require for a message (actions/toolkit)."""
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def _gh_property(text: str) -> str:
    """Escaped for a property value (``file=``), where ``:`` and ``,`` are separators."""
    return _gh_data(text).replace(":", "%3A").replace(",", "%2C")
