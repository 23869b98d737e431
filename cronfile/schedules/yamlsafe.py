"""Reading one YAML file into plain data, with the line of every key, refusing YAML's hazards.

PyYAML's own constructors would happily build ``on: true`` into ``{True: True}``, keep the
last of two duplicate keys, expand a billion-laughs file until memory runs out, or (with
an unsafe loader) construct Python objects. Here libyaml (the C parser) only produces the
*event stream*, and a small builder of our own turns the events into dicts, lists and
scalars while it:

* refuses every tag outside the core schema (``!!python/...`` never constructs anything:
  nothing but str, int, float, bool and None is ever built);
* refuses duplicate keys, naming both lines, and keys that are not strings;
* counts what aliases expand to and stops past :data:`ALIAS_BUDGET` nodes, which bounds
  time and memory however the anchors nest (aliases share the built value; the bound
  protects whoever walks the data afterwards, e.g. the schema check);
* stops at :data:`MAX_DEPTH` levels of nesting. Why events and not ``yaml.compose``: the
  composer recurses in C and a file of 50,000 ``[`` crashes the process (SIGSEGV), and
  libyaml's scanner is quadratic in flow nesting (200,000 ``[`` take minutes). Reading
  events lazily and stopping at depth 64 costs microseconds on such a file;
* records the position of every key and list item in a ``marks`` table keyed by path, so
  later checks (schema, semantics) can name the line of the offending key.

It is also the fast path: no node tree is built, so this costs about what
``yaml.load(..., Loader=CSafeLoader)`` costs (see ``bench/validate.py``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import yaml
from yaml.events import (
    AliasEvent,
    DocumentEndEvent,
    DocumentStartEvent,
    MappingEndEvent,
    MappingStartEvent,
    ScalarEvent,
    SequenceEndEvent,
    SequenceStartEvent,
    StreamEndEvent,
    StreamStartEvent,
)

try:
    from yaml import CSafeLoader as _Loader
except ImportError:  # pragma: no cover - PyYAML without libyaml
    from yaml import SafeLoader as _Loader  # type: ignore[assignment]

from cronfile.schedules.problems import Problem, Severity, dotted

MAX_FILE_BYTES = 1024 * 1024
ALIAS_BUDGET = 10_000
MAX_DEPTH = 64

_T = "tag:yaml.org,2002:"
_STR, _MAP, _SEQ, _MERGE = _T + "str", _T + "map", _T + "seq", _T + "merge"
_CONSTRUCTED = {_T + "int", _T + "float", _T + "bool", _T + "null"}
# Tags PyYAML's resolver gives plain scalars that no field needs: kept as the text written.
_AS_TEXT = {_STR, _T + "timestamp", _T + "value", _MERGE}
_SCALARS = yaml.constructor.SafeConstructor()
_RESOLVER = yaml.resolver.Resolver()
_TAG_CACHE: dict[str, str] = {}
_VALUE_CACHE: dict[tuple[str, str], Any] = {}
# Characters YAML forbids (YAML 1.1 §5.1), to locate a reader error exactly.
_FORBIDDEN = re.compile("[^\t\n\r\x20-\x7e\x85\xa0-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")

Path = tuple[str | int, ...]


class Mark(NamedTuple):
    """A position in a file, 1-based (a tuple: made for every job, it must be cheap)."""

    line: int
    column: int


@dataclass
class YamlDoc:
    """A parsed file: its data (None when unusable), key positions and problems.

    ``marks`` maps a path (``("jobs", "nightly", "timeout")``) to the position of that key,
    or of that list item, packed in one int (see :func:`_pack`); :meth:`mark` unpacks it
    into a 1-based :class:`Mark`.
    """

    file: str
    data: Any = None
    marks: dict[Path, int] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    voided: set[Path] = field(default_factory=set)  # values dropped (as None) with a problem
    _seen: set[Problem] = field(default_factory=set, repr=False)

    def mark(self, path: Path) -> Mark:
        """The position of ``path``, or of its nearest ancestor that has one."""
        p = tuple(path)
        while p:
            if p in self.marks:
                return _to_mark(self.marks[p])
            p = p[:-1]
        return _to_mark(self.marks[()]) if () in self.marks else Mark(1, 1)

    def error(self, path: Path, message: str, *, at: Mark | None = None,
              severity: Severity = Severity.ERROR) -> None:
        m = at or self.mark(path)
        problem = Problem(self.file, m.line, m.column, message, dotted(path), severity)
        if problem not in self._seen:  # e.g. one bad default seen by every job
            self._seen.add(problem)
            self.problems.append(problem)

    def warn(self, path: Path, message: str) -> None:
        self.error(path, message, severity=Severity.WARNING)


def _pack(m: Any) -> int:
    """A position as one int. An int is not tracked by the cyclic GC; keeping libyaml's
    Mark objects (100,000 for 10,000 jobs) made every later collection cost 0.2 s."""
    return int(m.line) << 21 | int(m.column)  # a column is < 2**21 in a file of <= 1 MiB


def _to_mark(m: Any) -> Mark:
    if isinstance(m, int):
        return Mark((m >> 21) + 1, (m & 0x1FFFFF) + 1)
    return Mark(m.line + 1, m.column + 1)


class _Stop(Exception):
    """The rest of the file cannot be read usefully (a problem has been recorded)."""


def load_yaml(file: str, raw: bytes) -> YamlDoc:
    """Parse ``raw`` (the bytes of ``file``) into a :class:`YamlDoc`."""
    doc = YamlDoc(file)
    if len(raw) > MAX_FILE_BYTES:
        doc.error((), f"file is {len(raw)} bytes; the limit is {MAX_FILE_BYTES} (1 MiB): "
                  "split it into several files")
        return doc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        col = len(raw[raw.rfind(b"\n", 0, exc.start) + 1: exc.start].decode("utf-8", "replace")) + 1
        doc.error((), f"file is not UTF-8 (byte 0x{raw[exc.start]:02x}); save it as UTF-8",
                  at=Mark(line, col))
        return doc
    if "\t" in text and _tabs_in_indentation(doc, text):
        return doc
    parser = _Loader(raw)
    builder = _Builder(doc, parser)
    try:
        doc.data = builder.document()
    except _Stop:
        doc.data = None
    except yaml.MarkedYAMLError as exc:
        m = exc.problem_mark or exc.context_mark
        if exc.problem and "maximum nesting depth" in exc.problem:
            # libyaml 0.2.6 (PyYAML 6.0.4) scans ahead and stops at 1,000 flow levels
            # before we see the events of level 64: the same refusal, in our words.
            at = _nesting_mark(text, builder.last_open) or (
                Mark(m.line + 1, m.column + 1) if m else Mark(1, 1))
            doc.error((), f"nested deeper than {MAX_DEPTH} levels", at=at)
            doc.data = None
            return doc

        where = Mark(m.line + 1, m.column + 1) if m else Mark(1, 1)
        problem = exc.problem or exc.context or "cannot parse"
        message = f"YAML syntax: {problem}" + (f" ({exc.context})" if exc.context and
                                               exc.problem else "")
        unquoted = _unquoted_expression(text, where.line)
        if unquoted is not None:
            where, hint = unquoted
            message += hint
        doc.error((), message, at=where)
        doc.data = None
    except yaml.YAMLError as exc:  # a reader error: a character YAML does not allow
        bad = _FORBIDDEN.search(text.removeprefix("\ufeff"))
        if bad is not None:
            before = text.removeprefix("\ufeff")[: bad.start()]
            where = Mark(before.count("\n") + 1, bad.start() - (before.rfind("\n") + 1) + 1)
            doc.error((), f"character U+{ord(bad.group()):04X} is not allowed in YAML", at=where)
        else:
            doc.error((), f"YAML error: {exc}")
        doc.data = None
    finally:
        parser.dispose()
    return doc


# ``key: VALUE`` or ``- VALUE`` on one line of block YAML, VALUE starting with a character
# that YAML reserves (``*`` an alias, ``@`` nothing): the most common mistake in schedule
# files is an unquoted ``*/5 * * * *`` or ``@daily``, which the scanner reports in its terms.
_RESERVED_START = re.compile(r"^(?P<lead>\s*(?:[-A-Za-z0-9_]+:[ \t]+|-[ \t]+))(?P<value>[*@].*)$")


def _unquoted_expression(text: str, line: int) -> tuple[Mark, str] | None:
    """Where an unquoted cron expression or nickname starts on ``line`` (1-based) and the
    exact fix, when the scanner error there is caused by one; else None."""
    lines = text.split("\n")
    if not 1 <= line <= len(lines):
        return None
    match = _RESERVED_START.match(lines[line - 1].rstrip("\r"))
    if match is None:
        return None
    value = re.sub(r"\s+#.*$", "", match.group("value")).rstrip()
    quoted = f"'{value}'" if '"' in value else f'"{value}"'
    lead = match.group("lead").strip()
    what = "a schedule" if lead in ("schedule:", "-") else "a value"
    hint = f"; {what} starting with {value[0]!r} must be quoted: write {lead} {quoted}"
    return Mark(line, match.start("value") + 1), hint


def _nesting_mark(text: str, last_open: tuple[int, Any] | None) -> Mark | None:
    """Where the first flow collection at depth :data:`MAX_DEPTH` starts, counted in the
    text from the last collection the builder saw open (None when the text does not say).

    Only needed when libyaml refuses the depth before handing us the events; the count
    skips quoted scalars and comments, which is all flow text can hide brackets in."""
    if last_open is None:
        return None
    depth, start = last_open
    lines = text.split("\n")
    if start.line >= len(lines):
        return None
    offset = sum(len(line) + 1 for line in lines[: start.line]) + start.column
    depth -= 1  # the opener at ``offset`` is counted again below
    quote = ""
    line, column = start.line, start.column
    for ch in text[offset:]:
        if quote:
            if ch == quote:
                quote = ""
        elif ch in "'\"":
            quote = ch
        elif ch in "[{":
            depth += 1
            if depth >= MAX_DEPTH:
                return Mark(line + 1, column + 1)
        elif ch in "]}":
            depth -= 1
        if ch == "\n":
            line, column = line + 1, 0
        else:
            column += 1
    return None


def _tabs_in_indentation(doc: YamlDoc, text: str) -> bool:
    found = False
    for number, line in enumerate(text.split("\n"), start=1):
        if "\t" not in line:
            continue
        indent = line[: len(line) - len(line.lstrip(" \t"))]
        if "\t" in indent:
            doc.error((), "tab in indentation: YAML indents with spaces only",
                      at=Mark(number, indent.index("\t") + 1))
            found = True
    return found


_RESOLVED_FIRST = frozenset(k for k in _RESOLVER.yaml_implicit_resolvers if k)


def _plain_tag(value: str) -> str:
    """The tag YAML 1.1 (PyYAML's resolver) gives an untagged plain scalar.

    PyYAML picks its candidate patterns by the first character, so a value starting with
    any other (``/usr/bin/x``, ``deploy``) is a string without trying one; the others are
    memoised, since keys and many values repeat in every job."""
    if value and value[0] not in _RESOLVED_FIRST:
        return _STR
    tag = _TAG_CACHE.get(value)
    if tag is None:
        tag = _RESOLVER.resolve(yaml.ScalarNode, value, (True, False))
        if len(_TAG_CACHE) > 100_000:
            _TAG_CACHE.clear()
        _TAG_CACHE[value] = tag
    return tag


_IN_PROGRESS = object()
_MERGE_KEY = object()


class _Builder:
    """Builds one document from libyaml's events (see the module docstring for why)."""

    def __init__(self, doc: YamlDoc, parser: Any) -> None:
        self.doc = doc
        self.next = parser.get_event
        self.anchors: dict[str, Any] = {}  # name -> (value, size) or _IN_PROGRESS
        self.first_anchor: dict[str, Any] = {}
        self.count = 0  # nodes built, an alias counting as the nodes it expands to
        self.expanded = 0  # nodes reached through aliases
        # The collection that started last, as (depth, start mark): where to count nesting
        # from when libyaml itself gives up on the depth (see _nesting_mark).
        self.last_open: tuple[int, Any] | None = None

    def document(self) -> Any:
        """The one document of the stream (None with a problem when there is not one)."""
        event = self.next()
        assert isinstance(event, StreamStartEvent)
        root: Any = None
        have_root = False
        while True:
            event = self.next()
            if isinstance(event, StreamEndEvent):
                break
            assert isinstance(event, DocumentStartEvent)
            start = event
            first = self.next()
            if (isinstance(first, ScalarEvent) and first.value == "" and first.tag is None
                    and first.anchor is None and first.implicit[0]):
                self.next()  # DocumentEndEvent: an empty document ('---' alone) is ignored
                continue
            if have_root:
                self.doc.error((), "more than one YAML document ('---'): one document per file",
                               at=_to_mark(start.start_mark))
                raise _Stop
            if not isinstance(first, MappingStartEvent):
                self.doc.error((), "the top level must be a mapping with apiVersion, jobs, ...",
                               at=_to_mark(first.start_mark))
                raise _Stop
            self.doc.marks[()] = _pack(first.start_mark)
            root, have_root = self.node(first, (), 0), True
            end = self.next()
            assert isinstance(end, DocumentEndEvent)
        if not have_root:
            self.doc.error((), "file is empty: a schedule file starts with 'apiVersion: cronfile/v1'")
            raise _Stop
        return root

    def node(self, event: Any, path: Path, depth: int) -> Any:
        """Build the node that starts with ``event`` (consuming all of its events)."""
        cls = event.__class__
        if cls is ScalarEvent:
            self.count += 1
            scalar = self.scalar(event, path)
            if event.anchor is not None:
                self.anchor(event, scalar, 1)
            return scalar
        if cls is AliasEvent:
            return self.alias(event, path)
        if depth >= MAX_DEPTH:
            self.doc.error((), f"nested deeper than {MAX_DEPTH} levels", at=_to_mark(event.start_mark))
            raise _Stop
        self.last_open = (depth, event.start_mark)
        if event.anchor is not None:
            self.anchor(event, _IN_PROGRESS, 0)
        before = self.count
        self.count += 1
        value: Any
        if cls is MappingStartEvent:
            value = self.mapping(path, depth)
            expected = _MAP
        else:
            assert cls is SequenceStartEvent
            value = self.sequence(path, depth)
            expected = _SEQ
        if event.tag is not None and event.tag not in (expected, "!"):
            self.doc.error(path, f"tag {_short(event.tag)} is not allowed (no YAML tags are)",
                           at=_to_mark(event.start_mark))
            self.doc.voided.add(path)
            value = None
        if event.anchor is not None:
            self.anchor(event, value, self.count - before, finished=True)
        return value

    def scalar(self, event: Any, path: Path) -> Any:
        tag = event.tag
        value = event.value
        if tag is None:
            tag = _plain_tag(value) if event.implicit[0] else _STR
        elif tag == "!":
            tag = _STR  # the non-specific tag: a string, whatever it looks like
        if tag in _AS_TEXT:
            return value
        if tag in _CONSTRUCTED:
            key = (tag, value)
            try:
                return _VALUE_CACHE[key]
            except KeyError:
                pass
            try:
                result = _SCALARS.yaml_constructors[tag](_SCALARS, yaml.ScalarNode(tag, value))
            except (ValueError, KeyError, TypeError, yaml.YAMLError):
                self.doc.error(path, f"{value!r} cannot be read as {_short(tag)}",
                               at=_to_mark(event.start_mark))
                self.doc.voided.add(path)
                return None
            if len(_VALUE_CACHE) > 100_000:
                _VALUE_CACHE.clear()
            _VALUE_CACHE[key] = result
            return result
        self.doc.error(path, f"tag {_short(tag)} is not allowed (no YAML tags are)",
                       at=_to_mark(event.start_mark))
        self.doc.voided.add(path)
        return None

    def anchor(self, event: Any, value: Any, size: int, *, finished: bool = False) -> None:
        """Record ``&name``: when its node starts (a collection: ``_IN_PROGRESS`` until
        ``finished``) and, for a collection, again when it ends."""
        name = event.anchor
        if not finished:
            if name in self.first_anchor:  # YAML allows it; a reader cannot tell which is meant
                first = _to_mark(self.first_anchor[name])
                self.doc.error((), f"anchor &{name} is defined twice (first at line {first.line})",
                               at=_to_mark(event.start_mark))
                raise _Stop
            self.first_anchor[name] = _pack(event.start_mark)
        self.anchors[name] = value if value is _IN_PROGRESS else (value, size)

    def alias(self, event: Any, path: Path) -> Any:
        entry = self.anchors.get(event.anchor)
        where = _to_mark(event.start_mark)
        if entry is None:
            self.doc.error(path, f"alias *{event.anchor} names no anchor (define &{event.anchor} "
                           "before it)", at=where)
            raise _Stop
        if entry is _IN_PROGRESS:
            self.doc.error(path, f"alias *{event.anchor} is inside its own anchor "
                           "(a recursive structure)", at=where)
            raise _Stop
        value, size = entry
        self.count += size
        self.expanded += size
        if self.expanded > ALIAS_BUDGET:
            self.doc.error(path, f"aliases expand to more than {ALIAS_BUDGET} nodes "
                           "(a 'billion laughs' file?)", at=where)
            raise _Stop
        return value

    # sequence() and mapping() are the hot loops (one pass per item or key of every file):
    # the common case, an untagged string without an anchor, is handled inline.

    def sequence(self, path: Path, depth: int) -> list[Any]:
        items: list[Any] = []
        marks = self.doc.marks
        next_event = self.next
        while True:
            event = next_event()
            if event.__class__ is SequenceEndEvent:
                return items
            item_path = (*path, len(items))
            m = event.start_mark
            marks[item_path] = m.line << 21 | m.column  # see _pack
            if event.__class__ is ScalarEvent and event.tag is None and event.anchor is None and (
                    not event.implicit[0] or _plain_tag(event.value) == _STR):
                self.count += 1
                items.append(event.value)
            else:
                items.append(self.node(event, item_path, depth + 1))

    def mapping(self, path: Path, depth: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        marks = self.doc.marks
        merged: list[Any] = []
        next_event = self.next
        while True:
            event = next_event()
            if event.__class__ is MappingEndEvent:
                break
            key: Any
            if event.__class__ is ScalarEvent and event.tag is None and event.anchor is None and (
                    not event.implicit[0] or _plain_tag(event.value) == _STR):
                key = event.value
            else:
                key = self.key(event, path, depth)
            value_event = next_event()
            if key.__class__ is not str:
                if key is _MERGE_KEY:
                    merged.append((self.node(value_event, (*path, "<<"), depth + 1), value_event))
                else:  # reported; read the value all the same (it may hide more problems)
                    self.node(value_event, (*path, "?"), depth + 1)
                continue
            key_path = (*path, key)
            if key in out:
                first = _to_mark(marks[key_path])
                self.doc.error(key_path, f"duplicate key {key!r} (first at line {first.line}; "
                               "YAML would silently keep the last)", at=_to_mark(event.start_mark))
                self.node(value_event, (*path, "?"), depth + 1)
                continue
            m = event.start_mark
            marks[key_path] = m.line << 21 | m.column  # see _pack
            if value_event.__class__ is ScalarEvent and value_event.tag is None and (
                    value_event.anchor is None) and (
                    not value_event.implicit[0] or _plain_tag(value_event.value) == _STR):
                self.count += 1
                out[key] = value_event.value
            else:
                out[key] = self.node(value_event, key_path, depth + 1)
        for value, event in merged:
            self.merge(out, value, event, path)
        return out

    def key(self, event: Any, path: Path, depth: int) -> Any:
        """The key that ``event`` starts: a str, ``_MERGE_KEY`` for ``<<``, or None (reported)."""
        if event.__class__ is ScalarEvent:
            tag = event.tag
            if tag is None:
                tag = _plain_tag(event.value) if event.implicit[0] else _STR
            if tag in (_STR, "!"):
                if event.anchor is not None:
                    self.anchor(event, event.value, 1)
                return event.value
            if tag == _MERGE:
                return _MERGE_KEY
            kind = {"bool": "boolean", "int": "number", "float": "number"}.get(
                tag.removeprefix(_T), tag.removeprefix(_T))
            if tag in _CONSTRUCTED or tag == _T + "timestamp":
                self.doc.error(path, f"key {event.value!r} is read by YAML as a {kind}, not a "
                               f"string; quote it: '{event.value}':", at=_to_mark(event.start_mark))
            else:
                self.doc.error(path, f"tag {_short(tag)} is not allowed (no YAML tags are)",
                               at=_to_mark(event.start_mark))
            return None
        value = self.node(event, (*path, "?"), depth + 1)
        if event.__class__ is AliasEvent and isinstance(value, str):
            return value
        self.doc.error(path, "keys must be plain strings", at=_to_mark(event.start_mark))
        return None

    def merge(self, out: dict[str, Any], value: Any, event: Any, path: Path) -> None:
        """``<<: *base`` (or a list of them): keys written in the mapping win, then earlier
        sources win over later ones, as YAML's merge key specifies."""
        sources = value if isinstance(value, list) else [value]
        for source in sources:
            if not isinstance(source, dict):
                self.doc.error(path, "'<<' merges mappings only", at=_to_mark(event.start_mark))
                continue
            for k, v in source.items():
                out.setdefault(k, v)


def _short(tag: str) -> str:
    return "!!" + tag.removeprefix(_T) if tag.startswith(_T) else tag
