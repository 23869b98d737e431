"""The applied desired state on disk: ``<state>/applied.json``.

The center writes the state it last applied so that a restart, ``cronfile plan --state DIR``
and ``cronfile status`` know what is running without re-reading (possibly changed, possibly
broken) schedule files. The file round-trips EXACTLY: every field of every job and agent,
enums, durations, secret references, source locations, tuples.

Secrets: an ``env`` value that is a :class:`~cronfile.schedules.model.SecretRef` is stored as the
reference (``{"from_file": PATH}`` / ``{"from_env": NAME}``), which is all the model ever holds;
the value is resolved on the host that runs the job and never reaches this file.

Two formats, both read back:

* ``"v": 2`` (what the center writes): the schedule files the state was loaded from, one
  per line, read back with the loader. At 100,000 jobs the files are a quarter of the size
  of their jobs encoded field by field, cost nothing to encode, and reproduce the state
  exactly, source locations included::

    {"v": 2, "revision": {"content_hash": ..., "git_commit": ...}, "files": [
    {"file": "schedules/backups.yaml", "sha256": ..., "text": "apiVersion: cronfile/v1\n..."},
    ...
    ]}

  The center does not keep the files' bytes in memory (22 MB at 100,000 jobs): the state
  only has each file's sha256, and the writer reads the file again, checking the digest.
  A file changed on disk since it was applied (an edit that is still being reloaded, or
  one that was rejected) is copied from the previous applied.json instead, matched by
  digest; the one-entry-per-line layout lets that read go a line at a time.

* ``"v": 1`` for a state that has no files behind it (built in code): every field of
  every job and agent, encoded from the model's type hints, so a field added to ``Job`` is
  stored without touching this module and a shape the codec does not know raises at once
  instead of being written lossily. Name/value pairs (``env``, ``labels``) are JSON
  objects, in their order::

    {"v": 1, "revision": {"content_hash": ..., "git_commit": ...},
     "jobs": [{"name": ..., "command": ..., ..., "source": {"file", "line", "column"}}, ...],
     "agents": [{"name": ..., "labels": {...}, "ssh": {...} | null, "source": {...}}, ...]}
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import json
import os
import tempfile
import types
import typing
from collections.abc import Iterable, Iterator
from dataclasses import MISSING, fields, is_dataclass
from functools import cache
from pathlib import Path
from typing import Any

from cronfile import gcpause
from cronfile.schedules.model import Agent, DesiredState, Job, Revision
from cronfile.state.ledger import fsync_dir
from cronfile.state.private import private_dir

FORMAT_VERSION = 1  # field by field
SOURCES_VERSION = 2  # the schedule files' bytes
APPLIED_FILE = "applied.json"


class StateFileError(ValueError):
    """A state file that cannot be read back; the message names the file and the key."""


# --------------------------------------------------------------------------- public API


def state_to_json(state: DesiredState) -> dict[str, Any]:
    """The desired state as JSON-ready data (see the module docstring for the format)."""
    return {
        "v": FORMAT_VERSION,
        "revision": _encode(state.revision, Revision, "revision"),
        "jobs": [_encode(job, Job, f"jobs.{name}") for name, job in state.jobs.items()],
        "agents": [_encode(agent, Agent, f"agents.{name}") for name, agent in state.agents.items()],
    }


def state_from_json(data: Any) -> DesiredState:
    """The inverse of :func:`state_to_json`; raises :class:`StateFileError` on bad data."""
    if not isinstance(data, dict):
        raise StateFileError("expected a JSON object")
    version = data.get("v")
    if version == SOURCES_VERSION:
        return _state_from_sources(data)
    if version != FORMAT_VERSION:
        raise StateFileError(f"format version {version!r} is not supported "
                             f"(this cronfile reads versions {FORMAT_VERSION} and {SOURCES_VERSION})")
    unknown = set(data) - {"v", "revision", "jobs", "agents"}
    if unknown:
        raise StateFileError(f"unknown keys {sorted(unknown)}")
    revision = _decode(data.get("revision"), Revision, "revision")
    jobs: dict[str, Job] = {}
    for i, raw in enumerate(_list(data.get("jobs", []), "jobs")):
        job = _decode(raw, Job, f"jobs[{i}]")
        if job.name in jobs:
            raise StateFileError(f"jobs[{i}]: job {job.name!r} appears twice")
        jobs[job.name] = job
    agents: dict[str, Agent] = {}
    for i, raw in enumerate(_list(data.get("agents", []), "agents")):
        agent = _decode(raw, Agent, f"agents[{i}]")
        if agent.name in agents:
            raise StateFileError(f"agents[{i}]: agent {agent.name!r} appears twice")
        agents[agent.name] = agent
    return DesiredState(jobs=jobs, agents=agents, revision=revision)


def _state_from_sources(data: dict[str, Any]) -> DesiredState:
    """A ``"v": 2`` state: each stored file loaded again, as it was when it was applied."""
    from cronfile.schedules.loader import (  # the loader is the only parser of these files
        FileResult,
        load_file,
        with_shared_parts,
    )
    from cronfile.schedules.problems import Severity

    unknown = set(data) - {"v", "revision", "files"}
    if unknown:
        raise StateFileError(f"unknown keys {sorted(unknown)}")
    revision = _decode(data.get("revision"), Revision, "revision")
    jobs: dict[str, Job] = {}
    agents: dict[str, Agent] = {}
    sources: dict[str, str] = {}
    policy = None  # the revision was valid when applied: at most one file holds it
    results: list[FileResult] = []
    for i, entry in enumerate(_list(data.get("files", []), "files")):
        if not (isinstance(entry, dict) and set(entry) == {"file", "sha256", "text"}
                and all(isinstance(v, str) for v in entry.values())):
            raise StateFileError(f'files[{i}]: expected {{"file": ..., "sha256": ..., "text": ...}}')
        raw = entry["text"].encode("utf-8", "surrogateescape")
        digest = hashlib.sha256(raw).hexdigest()
        if digest != entry["sha256"]:
            raise StateFileError(f"files[{i}] ({entry['file']}): its text does not match its sha256")
        result = load_file(entry["file"], raw, digest)
        results.append(result)
        errors = [p for p in result.problems if p.severity is Severity.ERROR]
        if errors:
            raise StateFileError(f"files[{i}] ({entry['file']}) no longer loads: {errors[0].render()}")
        for job in result.jobs:
            if job.name in jobs:
                raise StateFileError(f"files[{i}]: job {job.name!r} appears twice")
            jobs[job.name] = job
        for agent in result.agents:
            if agent.name in agents:
                raise StateFileError(f"files[{i}]: agent {agent.name!r} appears twice")
            agents[agent.name] = agent
        sources[entry["file"]] = digest
        policy = result.policy or policy
    # calendars and pools are declared in one file and named from others: resolved as the
    # loader does, or a restored job would skip nothing and its pool would have no cap
    jobs = with_shared_parts(results)
    return DesiredState(jobs=jobs, agents=agents, revision=revision, sources=sources,
                        policy=policy)


def _sources_chunks(state: DesiredState, previous: Path) -> Iterator[str]:
    """``"v": 2`` text, one file per piece (and per line): never joined into one string,
    so writing 100,000 jobs' files neither doubles the memory nor holds the GIL for long."""
    head = {"v": SOURCES_VERSION, "revision": _encode(state.revision, Revision, "revision")}
    yield json.dumps(head, separators=(",", ":"))[:-1] + ',"files":[\n'
    stale: dict[str, str] = {}  # file -> digest wanted, for files changed on disk since
    texts: dict[str, str] = {}
    for file, digest in state.sources.items():
        text = _text_if_unchanged(file, digest)
        if text is None:
            stale[file] = digest
        else:
            texts[file] = text
    if stale:
        found = _previous_texts(previous, stale)
        missing = sorted(set(stale) - set(found))
        if missing:
            raise StateFileError(f"cannot store the applied state: {missing[0]} changed on disk "
                                 f"since it was applied and {previous} has no copy of it")
        texts.update(found)
    for i, file in enumerate(state.sources):
        entry = {"file": file, "sha256": state.sources[file], "text": texts.pop(file)}
        # ASCII-escaped: the text of a loaded file is valid UTF-8, a surrogate-escaped path
        # may not be; escapes keep both exact.
        yield ("," if i else "") + json.dumps(entry, ensure_ascii=True, separators=(",", ":")) + "\n"
    yield "]}\n"


def _text_if_unchanged(file: str, digest: str) -> str | None:
    """The file's text when its bytes still have ``digest``; None when it changed or is gone."""
    try:
        with open(file, "rb") as f:
            raw = f.read()
    except OSError:
        return None
    if hashlib.sha256(raw).hexdigest() != digest:
        return None
    return raw.decode("utf-8", "surrogateescape")


def _previous_texts(path: Path, wanted: dict[str, str]) -> dict[str, str]:
    """The texts of ``wanted`` (file -> digest) in a previous ``"v": 2`` applied.json, read
    one line (one file) at a time so that a 20 MB file is never parsed in one piece."""
    found: dict[str, str] = {}
    try:
        with path.open(encoding="utf-8") as f:
            for line in f:
                line = line.strip().lstrip(",")
                if not line.startswith('{"file":'):
                    continue
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue
                if wanted.get(entry.get("file")) == entry.get("sha256"):
                    found[entry["file"]] = entry["text"]
    except (OSError, UnicodeDecodeError):
        pass
    return found


def write_applied(state_dir: Path, state: DesiredState) -> Path:
    """Write ``<state_dir>/applied.json`` atomically and durably; returns its path.

    A reader (a restarting center, ``plan --state``) sees the old file or the new one, never
    half of one: the data goes to a temporary file in the SAME directory (``os.replace`` is
    atomic only within one file system), is fsynced, then renamed over the old file, and the
    directory is fsynced so the rename itself survives a power cut.
    """
    if state.sources:
        return _write_atomically(state_dir, _sources_chunks(state, state_dir / APPLIED_FILE))
    # ASCII-escaped: a YAML "\ud800" escape yields a lone surrogate, which UTF-8 cannot encode.
    # Compact: indenting forces json's pure-Python encoder (4x slower on 100,000 jobs).
    text = json.dumps(state_to_json(state), ensure_ascii=True, allow_nan=False,
                      separators=(",", ":"))
    return _write_atomically(state_dir, (text, "\n"))


def _write_atomically(state_dir: Path, chunks: Iterable[str]) -> Path:
    private_dir(state_dir)  # mkstemp makes the file 0600
    target = state_dir / APPLIED_FILE
    fd, tmp = tempfile.mkstemp(prefix=".applied.", suffix=".tmp", dir=state_dir)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(state_dir)
    return target


def read_applied(state_dir: Path) -> DesiredState | None:
    """The state in ``<state_dir>/applied.json``; None when no state was applied yet.

    A file that exists but cannot be read back raises :class:`StateFileError` naming it:
    silently treating it as "nothing applied" would make a plan claim every job is new.
    """
    path = state_dir / APPLIED_FILE
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise StateFileError(f"{path}: cannot read: {exc}") from None
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise StateFileError(f"{path}: not valid JSON: {exc}") from None
    # Loading 100,000 jobs allocates many small objects and frees almost none: the cyclic
    # GC would rescan the growing heap again and again for nothing (a third of the time).
    try:
        with gcpause.paused():
            return state_from_json(data)
    except StateFileError as exc:
        raise StateFileError(f"{path}: {exc}") from None


# --------------------------------------------------------------------------- codec


@cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def _pair_value_type(tp: Any) -> Any | None:
    """For ``tuple[tuple[str, V], ...]`` (name/value pairs) the type V, else None."""
    if typing.get_origin(tp) is not tuple:
        return None
    args = typing.get_args(tp)
    if len(args) != 2 or args[1] is not Ellipsis:
        return None
    inner = args[0]
    inner_args = typing.get_args(inner)
    if typing.get_origin(inner) is tuple and len(inner_args) == 2 and inner_args[0] is str:
        return inner_args[1]
    return None


def _is_instance(value: Any, tp: Any) -> bool:
    """Whether a model value belongs to one arm of a union."""
    if tp is type(None):
        return value is None
    origin = typing.get_origin(tp)
    if origin is tuple:
        return isinstance(value, tuple)
    if tp is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def _encode(value: Any, tp: Any, where: str) -> Any:
    """``value`` as JSON data, checked against ``tp``; a misfit is a TypeError naming where
    (``jobs.x.retries.max``). The encoders are made once per type and the place is only
    spelled out on error: an f-string per field cost most of the encoding."""
    try:
        return _encoder(tp)(value)
    except _Misfit as exc:
        raise TypeError(f"{where}{''.join(reversed(exc.path))}: {exc.message}") from None


class _Misfit(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message
        self.path: list[str] = []  # innermost first


_ENCODERS: dict[Any, Any] = {}


def _encoder(tp: Any) -> Any:
    enc = _ENCODERS.get(tp)
    if enc is None:
        enc = _ENCODERS[tp] = _make_encoder(tp)
    return enc


def _make_encoder(tp: Any) -> Any:  # noqa: C901 - one small closure per kind of type
    if _is_union(tp):
        arms = typing.get_args(tp)

        def union(value: Any) -> Any:
            for arm in arms:
                if _is_instance(value, arm):
                    return _encoder(arm)(value)
            raise _Misfit(f"{value!r} does not fit {tp}")
        return union
    if tp is type(None):
        return lambda value: None
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return lambda value: value.value
    if isinstance(tp, type) and is_dataclass(tp):
        hints = _hints(tp)
        parts = [(f.name, _encoder(hints[f.name])) for f in fields(tp)]

        def dataclass(value: Any) -> Any:
            out = {}
            for name, enc in parts:
                try:
                    out[name] = enc(getattr(value, name))
                except _Misfit as exc:
                    exc.path.append(f".{name}")
                    raise
            return out
        return dataclass
    if typing.get_origin(tp) is tuple:
        pair_type = _pair_value_type(tp)
        if pair_type is not None:
            pair_enc = _encoder(pair_type)

            def pairs(value: Any) -> Any:
                out: dict[str, Any] = {}
                for key, item in value:
                    if key in out:
                        raise _Misfit(f"key {key!r} appears twice")
                    try:
                        out[key] = pair_enc(item)
                    except _Misfit as exc:
                        exc.path.append(f".{key}")
                        raise
                return out
            return pairs
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            item_enc = _encoder(args[0])

            def items(value: Any) -> Any:
                out = []
                for i, v in enumerate(value):
                    try:
                        out.append(item_enc(v))
                    except _Misfit as exc:
                        exc.path.append(f"[{i}]")
                        raise
                return out
            return items
        encs = [_encoder(a) for a in args]

        def fixed(value: Any) -> Any:
            out = []
            for i, (v, enc) in enumerate(zip(value, encs, strict=True)):
                try:
                    out.append(enc(v))
                except _Misfit as exc:
                    exc.path.append(f"[{i}]")
                    raise
            return out
        return fixed
    if tp in (str, int, float, bool):
        name = tp.__name__

        def scalar(value: Any) -> Any:
            if not _is_instance(value, tp):
                raise _Misfit(f"{value!r} is not a {name}")
            return value
        return scalar

    def unknown(value: Any) -> Any:
        raise _Misfit(f"no JSON encoding for {tp}")
    return unknown


def _fits_json(data: Any, tp: Any) -> bool:
    """Whether JSON data can be decoded as one arm of a union."""
    if tp is type(None):
        return data is None
    if typing.get_origin(tp) is tuple:
        return isinstance(data, dict) if _pair_value_type(tp) is not None else isinstance(data,
                                                                                         list)
    if isinstance(tp, type) and is_dataclass(tp):
        return isinstance(data, dict)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return isinstance(data, str)
    return _is_instance(data, tp)


def _decode(data: Any, tp: Any, where: str) -> Any:
    if _is_union(tp):
        for arm in typing.get_args(tp):
            if _fits_json(data, arm):
                return _decode(data, arm, where)
        raise StateFileError(f"{where}: {data!r} is not a valid value")
    if tp is type(None):
        if data is not None:
            raise StateFileError(f"{where}: expected null")
        return None
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(data)
        except ValueError:
            allowed = ", ".join(repr(m.value) for m in tp)
            raise StateFileError(f"{where}: {data!r} is not one of {allowed}") from None
    if isinstance(tp, type) and is_dataclass(tp):
        return _decode_dataclass(data, tp, where)
    if typing.get_origin(tp) is tuple:
        pair_type = _pair_value_type(tp)
        if pair_type is not None:
            if not isinstance(data, dict):
                raise StateFileError(f"{where}: expected an object")
            return tuple((str(k), _decode(v, pair_type, f"{where}.{k}")) for k, v in data.items())
        items = _list(data, where)
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_decode(v, args[0], f"{where}[{i}]") for i, v in enumerate(items))
        if len(items) != len(args):
            raise StateFileError(f"{where}: expected {len(args)} items")
        return tuple(_decode(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(items, args,
                                                                                  strict=True)))
    if tp in (str, int, float, bool):
        if not _is_instance(data, tp):
            raise StateFileError(f"{where}: expected {tp.__name__}, got {data!r}")
        return float(data) if tp is float else data
    raise StateFileError(f"{where}: no JSON decoding for {tp}")


def _decode_dataclass(data: Any, cls: type, where: str) -> Any:
    if not isinstance(data, dict):
        raise StateFileError(f"{where}: expected an object")
    hints = _hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = set(data) - known
    if unknown:
        raise StateFileError(f"{where}: unknown keys {sorted(unknown)}")
    kwargs: dict[str, Any] = {}
    for f in fields(cls):
        if f.name in data:
            kwargs[f.name] = _decode(data[f.name], hints[f.name], f"{where}.{f.name}")
        elif f.default is MISSING and f.default_factory is MISSING:
            raise StateFileError(f"{where}: missing {f.name!r}")
    return cls(**kwargs)


def _list(data: Any, where: str) -> list[Any]:
    if not isinstance(data, list):
        raise StateFileError(f"{where}: expected a list")
    return data
