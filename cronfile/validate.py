"""``cronfile validate``: check schedule files and report every problem at once."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from cronfile.loader import LoadResult, load_schedules
from cronfile.problems import Problem, Severity, has_errors


@dataclass
class ValidateReport:
    problems: list[Problem]
    files: int
    jobs: int
    agents: int
    strict: bool

    @property
    def exit_code(self) -> int:
        return 1 if has_errors(self.problems, self.strict) else 0


def _root_for(file: Path, schedules: Path) -> Path:
    """The schedules directory a single file belongs to: cross-file checks need all of it."""
    resolved = file.resolve()
    if schedules.is_dir() and schedules.resolve() in resolved.parents:
        return schedules
    for parent in resolved.parents:
        if parent.name == "schedules":
            return parent
    return file.parent


def run_validate(paths: list[Path], schedules: Path, strict: bool = False) -> ValidateReport:
    """Validate directories (whole) and files (checked with the directory they live in)."""
    targets = paths or [schedules]
    problems: list[Problem] = []
    files = jobs = agents = 0
    loaded: dict[Path, LoadResult] = {}
    for target in targets:
        if not target.exists():
            problems.append(Problem(str(target), 1, 1, "no such file or directory"))
            continue
        root = target if target.is_dir() else _root_for(target, schedules)
        key = root.resolve()
        if key not in loaded:
            loaded[key] = load_schedules(root)
        result = loaded[key]
        if target.is_dir():
            wanted = result.problems
        else:
            name = target.resolve()
            wanted = [p for p in result.problems if Path(p.file).resolve() == name]
        for p in wanted:
            if p not in problems:
                problems.append(p)
    for result in loaded.values():
        files += len(result.files)
        if result.state is not None:
            jobs += len(result.state.jobs)
            agents += len(result.state.agents)
    return ValidateReport(problems, files, jobs, agents, strict)


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
        message = f"{p.path}: {p.message}" if p.path and not p.message.startswith(p.path) else p.message
        if fmt == "github":
            level = "error" if p.severity is Severity.ERROR else "warning"
            text = message.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")
            lines.append(f"::{level} file={p.file},line={p.line},col={p.column},"
                         f"title=cronfile::{text}")
        else:
            lines.append(f"{p.file}:{p.line}:{p.column}: {p.severity.value}: {message}")
    return "".join(line + "\n" for line in lines), summary + "\n"


def _strict(p: Problem, strict: bool) -> Problem:
    if strict and p.severity is Severity.WARNING:
        return Problem(p.file, p.line, p.column, p.message, p.path, Severity.ERROR)
    return p
