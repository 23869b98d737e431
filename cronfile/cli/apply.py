"""``cronfile apply``: make a running center apply its source now, and say what it did.

The center's source of truth stays its schedules directory (or git branch): ``apply`` never
sends files. It validates the local files first (so CI fails fast, with every error), asks
the center to re-read its own, and checks that both are the same revision.
"""

from __future__ import annotations

import json
from pathlib import Path

from cronfile.cli.access import AccessError, CenterAccess
from cronfile.schedules.loader import load_schedules


class RevisionUnsupported(Exception):
    """``--revision`` asked of a center that follows no git branch: a usage error."""


def apply_to_center(schedules: Path, center: CenterAccess,
                    revision: str | None = None) -> tuple[str, int]:
    """(output, exit code)."""
    if revision is not None:
        return _apply_revision(center, revision)
    result = load_schedules(schedules)
    if result.state is None:
        lines = [p.render() for p in result.problems]
        return "\n".join(lines) + "\nnot applied: fix the errors above\n", 1
    try:
        answer = center.sync()
    except AccessError as exc:
        return f"{exc}\n", 1
    mine = result.state.revision.content_hash
    theirs = (answer.get("revision") or {}).get("content_hash")
    if theirs and theirs != mine:
        return (f"the center reads other files than {schedules}: it runs {theirs}, these are "
                f"{mine}. Point --schedules at the center's directory (or update it).\n", 1)
    if answer.get("unchanged"):
        return f"No changes: the center already runs revision {answer['revision']['content_hash']}.\n", 0
    if answer.get("applied"):
        d = answer.get("diff", {})
        return f"Applied revision {answer['revision']['content_hash']}: {json.dumps(d)}\n", 0
    return "rejected by the center:\n" + "\n".join(answer.get("errors", [])) + "\n", 1


def _apply_revision(center: CenterAccess, revision: str) -> tuple[str, int]:
    """``apply --revision SHA``: the center checks out that commit of its branch and applies
    it. The local files play no part: the commit is what the center validates and runs.
    Raises RevisionUnsupported for a center that follows no branch."""
    try:
        answer = center.sync(revision)
    except AccessError as exc:
        return f"{exc}\n", 1
    errors = [str(e) for e in answer.get("errors") or []]
    if answer.get("refused") == "no_git":
        raise RevisionUnsupported("; ".join(errors))
    if answer.get("refused"):
        return "refused by the center, nothing changed:\n" + "\n".join(errors) + "\n", 1
    commit = (answer.get("git") or {}).get("running")
    content = (answer.get("revision") or {}).get("content_hash")
    if answer.get("unchanged"):
        return f"No changes: the center already runs commit {commit} (revision {content}).\n", 0
    if answer.get("applied"):
        return (f"Applied commit {commit} (revision {content}): "
                f"{json.dumps(answer.get('diff', {}))}\n"), 0
    return "rejected by the center:\n" + "\n".join(errors) + "\n", 1
