"""What changed between two desired states: jobs and agents added, changed, removed.

One pure function, :func:`diff_states`, shared by ``cronfile plan`` (to show the change) and
the center (to apply only the difference on a reload). It must stay cheap when little
changed: a reload of 10,000 jobs where one changed compares 10,000 pairs of frozen
dataclasses with ``==`` (C-speed field tuples, ``source`` excluded) and computes the
field-by-field changes only for the pairs that differ.

Equality is the model's: ``Job.source`` has ``compare=False`` and ``definition()`` leaves it
out, so moving a job to another file, or to another line, is no change at all.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from cronfile.schedules.model import DesiredState


class _Definable(Protocol):
    def definition(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class FieldChange:
    """One field that differs. ``field`` is dotted into nested values (``retries.max``,
    ``targets.labels.role``, ``env.PGHOST``); ``old``/``new`` are plain values as in
    ``Job.definition()``, and ``None`` where a key exists on one side only."""

    field: str
    old: Any
    new: Any

    def to_dict(self) -> dict[str, Any]:
        return {"field": self.field, "old": self.old, "new": self.new}


@dataclass(frozen=True)
class Changed:
    """A job or agent present in both states whose definition differs."""

    name: str
    changes: tuple[FieldChange, ...]


@dataclass(frozen=True)
class SectionDiff:
    """The difference of one kind of item (jobs or agents); names are sorted."""

    added: tuple[str, ...] = ()
    changed: tuple[Changed, ...] = ()
    removed: tuple[str, ...] = ()
    unchanged: tuple[str, ...] = ()

    @property
    def is_empty(self) -> bool:
        return not (self.added or self.changed or self.removed)

    @property
    def changed_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.changed)

    def counts(self) -> dict[str, int]:
        return {"add": len(self.added), "change": len(self.changed),
                "remove": len(self.removed)}


@dataclass(frozen=True)
class StateDiff:
    """Everything that differs between an old desired state (or nothing) and a new one."""

    jobs: SectionDiff
    agents: SectionDiff

    @property
    def is_empty(self) -> bool:
        return self.jobs.is_empty and self.agents.is_empty

    def summary(self) -> dict[str, Any]:
        """Counts for records and plans: ``{"jobs": {...}, "agents": {...}}``."""
        return {"jobs": self.jobs.counts(), "agents": self.agents.counts()}


def diff_states(old: DesiredState | None, new: DesiredState) -> StateDiff:
    """The difference from ``old`` (``None`` = nothing applied yet) to ``new``."""
    return StateDiff(
        jobs=_diff_section(old.jobs if old is not None else {}, new.jobs),
        agents=_diff_section(old.agents if old is not None else {}, new.agents),
    )


def _diff_section(old: Mapping[str, _Definable], new: Mapping[str, _Definable]) -> SectionDiff:
    added: list[str] = []
    changed: list[Changed] = []
    unchanged: list[str] = []
    for name, item in new.items():
        before = old.get(name)
        if before is None:
            added.append(name)
        elif before is item or before == item:  # fast: the same object (an unchanged file),
            # or frozen dataclass equality, source excluded
            unchanged.append(name)
        else:
            changes = tuple(field_changes(before.definition(), item.definition()))
            if changes:
                changed.append(Changed(name, changes))
            else:  # equal as data though not as objects (env pairs in another order)
                unchanged.append(name)
    removed = [name for name in old if name not in new]
    return SectionDiff(
        added=tuple(sorted(added)),
        changed=tuple(sorted(changed, key=lambda c: c.name)),
        removed=tuple(sorted(removed)),
        unchanged=tuple(sorted(unchanged)),
    )


def field_changes(old: Mapping[str, Any], new: Mapping[str, Any],
                  prefix: str = "") -> list[FieldChange]:
    """Field-by-field differences of two plain definitions, descending into nested dicts.

    Lists (``schedules``, ``command``, ``after``) are compared whole: a schedule list is one
    value to a reviewer, and an index-wise diff of argv would be harder to read. Dicts are
    compared per key so that ``retries.max: 3 → 5`` says exactly what moved.
    """
    out: list[FieldChange] = []
    keys = list(old)
    keys.extend(k for k in new if k not in old)
    for key in keys:
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        path = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out.extend(field_changes(a, b, path + "."))
        else:
            out.append(FieldChange(path, a, b))
    return out
