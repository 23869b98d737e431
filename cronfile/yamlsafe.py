"""Reading one YAML file into plain data, with the line of every key, refusing YAML's hazards.

PyYAML's own constructors would happily build ``on: true`` into ``{True: True}``, keep the
last of two duplicate keys, expand a billion-laughs file until memory runs out, or (with
an unsafe loader) construct Python objects. Here the C parser only *composes* nodes, and a
small constructor of our own turns them into dicts, lists and scalars while it:

* refuses every tag outside the core schema (``!!python/...`` never constructs anything);
* refuses duplicate keys, naming both lines, and keys that are not strings;
* counts what aliases expand to and stops past :data:`ALIAS_BUDGET` nodes, which bounds
  time and memory however the anchors nest;
* records the position of every key and list item in a ``marks`` table keyed by path, so
  later checks (schema, semantics) can name the line of the offending key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml

try:
    from yaml import CSafeLoader as _Loader
except ImportError:  # pragma: no cover - PyYAML without libyaml
    from yaml import SafeLoader as _Loader  # type: ignore[assignment]

from cronfile.problems import Problem, dotted

MAX_FILE_BYTES = 1024 * 1024
ALIAS_BUDGET = 10_000

_T = "tag:yaml.org,2002:"
_SCALAR_TAGS = {_T + "str", _T + "int", _T + "float", _T + "bool", _T + "null", _T + "timestamp"}
_SCALARS = yaml.constructor.SafeConstructor()

Path = tuple[str | int, ...]


@dataclass(frozen=True)
class Mark:
    line: int  # 1-based
    column: int  # 1-based


@dataclass
class YamlDoc:
    """A parsed file: its data (None when unreadable), key positions and problems."""

    file: str
    data: Any = None
    marks: dict[Path, Mark] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)

    def mark(self, path: Path) -> Mark:
        """The position of ``path``, or of its nearest ancestor that has one."""
        p = tuple(path)
        while p:
            if p in self.marks:
                return self.marks[p]
            p = p[:-1]
        return self.marks.get((), Mark(1, 1))

    def error(self, path: Path, message: str, *, at: Mark | None = None) -> None:
        m = at or self.mark(path)
        self.problems.append(Problem(self.file, m.line, m.column, message, dotted(path)))


def load_yaml(file: str, raw: bytes) -> YamlDoc:
    """Parse ``raw`` (the bytes of ``file``) into a :class:`YamlDoc`."""
    doc = YamlDoc(file)
    if len(raw) > MAX_FILE_BYTES:
        doc.error((), f"file is {len(raw)} bytes; the limit is {MAX_FILE_BYTES} (split it)")
        return doc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        col = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        doc.error((), f"file is not UTF-8 (byte 0x{raw[exc.start]:02x})", at=Mark(line, col))
        return doc
    text = text.removeprefix("\ufeff")
    if _tabs_in_indentation(doc, text):
        return doc
    try:
        nodes = list(yaml.compose_all(text, Loader=_Loader))
    except yaml.MarkedYAMLError as exc:
        m = exc.problem_mark or exc.context_mark
        where = Mark(m.line + 1, m.column + 1) if m else Mark(1, 1)
        doc.error((), f"YAML syntax: {exc.problem or exc.context}", at=where)
        return doc
    except yaml.YAMLError as exc:
        doc.error((), f"YAML error: {exc}")
        return doc
    nodes = [n for n in nodes if n is not None]
    if not nodes:
        doc.error((), "file is empty: a schedule file starts with 'apiVersion: cronfile/v1'")
        return doc
    if len(nodes) > 1:
        m = nodes[1].start_mark
        doc.error((), "more than one YAML document ('---'): one document per file",
                  at=Mark(m.line + 1, m.column + 1))
        return doc
    root = nodes[0]
    doc.marks[()] = Mark(root.start_mark.line + 1, root.start_mark.column + 1)
    if not isinstance(root, yaml.MappingNode):
        doc.error((), "the top level must be a mapping with apiVersion, jobs, ...")
        return doc
    builder = _Builder(doc)
    doc.data = builder.build(root, ())
    return doc


def _tabs_in_indentation(doc: YamlDoc, text: str) -> bool:
    found = False
    for number, line in enumerate(text.split("\n"), start=1):
        indent = line[: len(line) - len(line.lstrip(" \t"))]
        if "\t" in indent:
            doc.error((), "tab in indentation: YAML indents with spaces only",
                      at=Mark(number, indent.index("\t") + 1))
            found = True
    return found


class _Builder:
    def __init__(self, doc: YamlDoc) -> None:
        self.doc = doc
        self.seen: set[int] = set()
        self.sizes: dict[int, int] = {}
        self.expanded = 0
        self.over_budget = False

    def _size(self, node: yaml.Node, active: set[int]) -> int:
        key = id(node)
        if key in self.sizes:
            return self.sizes[key]
        if key in active:
            return ALIAS_BUDGET + 1  # a recursive alias expands forever
        active.add(key)
        total = 1
        if isinstance(node, yaml.SequenceNode):
            total += sum(self._size(n, active) for n in node.value)
        elif isinstance(node, yaml.MappingNode):
            total += sum(self._size(k, active) + self._size(v, active) for k, v in node.value)
        active.discard(key)
        self.sizes[key] = min(total, 10 * ALIAS_BUDGET)
        return self.sizes[key]

    def _check_alias(self, node: yaml.Node, path: Path) -> bool:
        """Count a node met a second time (an alias) against the budget; False past it."""
        if id(node) not in self.seen:
            self.seen.add(id(node))
            return True
        self.expanded += self._size(node, set())
        if self.expanded > ALIAS_BUDGET:
            if not self.over_budget:
                self.over_budget = True
                self.doc.error(path, f"aliases expand to more than {ALIAS_BUDGET} nodes "
                               "(a 'billion laughs' file?)", at=_mark(node))
            return False
        return True

    def build(self, node: yaml.Node, path: Path) -> Any:
        if self.over_budget or not self._check_alias(node, path):
            return None
        if isinstance(node, yaml.ScalarNode):
            return self._scalar(node, path)
        if isinstance(node, yaml.SequenceNode):
            if node.tag != _T + "seq":
                self.doc.error(path, f"tag {_short(node.tag)} is not allowed", at=_mark(node))
                return None
            items = []
            for i, item in enumerate(node.value):
                self.doc.marks[(*path, i)] = _mark(item)
                items.append(self.build(item, (*path, i)))
            return items
        assert isinstance(node, yaml.MappingNode)
        if node.tag != _T + "map":
            self.doc.error(path, f"tag {_short(node.tag)} is not allowed", at=_mark(node))
            return None
        return self._mapping(node, path)

    def _mapping(self, node: yaml.MappingNode, path: Path) -> dict[str, Any]:
        out: dict[str, Any] = {}
        first: dict[str, Mark] = {}
        merged: dict[str, Any] = {}
        for key_node, value_node in node.value:
            if key_node.tag == _T + "merge":
                merged.update(self._merge(value_node, path))
                continue
            key = self._key(key_node, path)
            if key is None:
                continue
            where = _mark(key_node)
            if key in first:
                self.doc.error((*path, key), f"duplicate key {key!r} (first at line "
                               f"{first[key].line}; YAML would silently keep the last)", at=where)
                continue
            first[key] = where
            self.doc.marks[(*path, key)] = where
            out[key] = self.build(value_node, (*path, key))
        for key, value in merged.items():
            out.setdefault(key, value)
        return out

    def _merge(self, node: yaml.Node, path: Path) -> dict[str, Any]:
        sources = node.value if isinstance(node, yaml.SequenceNode) else [node]
        result: dict[str, Any] = {}
        for source in sources:
            value = self.build(source, path)
            if not isinstance(value, dict):
                self.doc.error(path, "'<<' merges mappings only", at=_mark(source))
                continue
            for key, item in value.items():
                result.setdefault(key, item)
        return result

    def _key(self, node: yaml.Node, path: Path) -> str | None:
        if isinstance(node, yaml.ScalarNode) and node.tag == _T + "str":
            return str(node.value)
        if isinstance(node, yaml.ScalarNode) and node.tag in _SCALAR_TAGS:
            kind = {"bool": "boolean", "int": "number", "float": "number"}.get(
                node.tag.removeprefix(_T), node.tag.removeprefix(_T))
            self.doc.error(path, f"key {node.value!r} is read by YAML as a {kind}, not a string; "
                           f"quote it: '{node.value}':", at=_mark(node))
            return None
        self.doc.error(path, "keys must be plain strings", at=_mark(node))
        return None

    def _scalar(self, node: yaml.ScalarNode, path: Path) -> Any:
        if node.tag not in _SCALAR_TAGS:
            self.doc.error(path, f"tag {_short(node.tag)} is not allowed (no YAML tags are)",
                           at=_mark(node))
            return None
        if node.tag == _T + "timestamp":
            return str(node.value)  # no field is a date; keep what was written
        return _SCALARS.yaml_constructors[node.tag](_SCALARS, node)


def _mark(node: yaml.Node) -> Mark:
    return Mark(node.start_mark.line + 1, node.start_mark.column + 1)


def _short(tag: str) -> str:
    return "!!" + tag.removeprefix(_T) if tag.startswith(_T) else tag
