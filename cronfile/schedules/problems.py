"""Problems found in schedule files, each with its file, line, column and key path."""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass


class Severity(enum.Enum):
    ERROR = "error"
    """The file cannot be used; the center keeps its last good revision."""
    WARNING = "warning"
    """Probably a mistake, but the file works (``--strict`` makes it an error)."""


@dataclass(frozen=True, order=True)
class Problem:
    """One thing wrong with a schedule file. ``path`` is dotted: ``jobs.nightly.timeout``."""

    file: str
    line: int
    column: int
    message: str
    path: str = ""
    severity: Severity = Severity.ERROR

    def render(self) -> str:
        """``file:line:col: severity: path: message``, the one format every command prints."""
        return f"{self.file}:{self.line}:{self.column}: {self.severity.value}: {self.text()}"

    def text(self) -> str:
        """``path: message`` (the message alone when it has no path or already names it)."""
        if self.path and not self.message.startswith(self.path):
            return f"{self.path}: {self.message}"
        return self.message

    def to_dict(self) -> dict[str, object]:
        return {
            "file": self.file,
            "line": self.line,
            "column": self.column,
            "severity": self.severity.value,
            "path": self.path,
            "message": self.message,
        }


def dotted(path: Iterable[object]) -> str:
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """`` (did you mean 'timeout'?)`` when a close choice exists, else ``""``."""
    import difflib  # only a run that found a problem needs it

    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def has_errors(problems: Iterable[Problem], strict: bool = False) -> bool:
    return any(p.severity is Severity.ERROR or strict for p in problems)
