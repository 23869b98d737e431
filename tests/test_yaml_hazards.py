"""The YAML reader (:mod:`cronfile.schedules.yamlsafe`) and the loader, in process: the hazards YAML
brings, bounded in time and memory, and property tests that it reads what PyYAML's safe
loader reads whenever a document has no hazard.
"""

from __future__ import annotations

import copy
import math
import os
import time
import tracemalloc
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cronfile.schedules.loader import load_schedules
from cronfile.schedules.schema import _fast_check, is_valid, schema
from cronfile.schedules.yamlsafe import ALIAS_BUDGET, MAX_FILE_BYTES, Mark, load_yaml


def load(text: str | bytes) -> Any:
    raw = text.encode() if isinstance(text, str) else text
    return load_yaml("f.yaml", raw)


def messages(doc: Any) -> list[str]:
    return [p.message for p in doc.problems]


# --- bounded in time and memory ------------------------------------------------------------

LAUGHS_SEQ = "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"{c}: &{c} [{', '.join([f'*{p}'] * 10)}]\n" for p, c in zip("abcdefgh", "bcdefghi", strict=True))
LAUGHS_MAP = "a: &a {x: lol, y: lol}\n" + "".join(
    f"{c}: &{c} {{{', '.join(f'k{i}: *{p}' for i in range(10))}}}\n"
    for p, c in zip("abcdefgh", "bcdefghi", strict=True))
LAUGHS_MERGE = "a: &a {x: lol, y: lol}\n" + "".join(
    f"{c}: &{c} {{<<: [{', '.join([f'*{p}'] * 10)}], k: *{p}}}\n"
    for p, c in zip("abcdefgh", "bcdefghi", strict=True))


@pytest.mark.parametrize("text", [LAUGHS_SEQ, LAUGHS_MAP, LAUGHS_MERGE],
                         ids=["sequences", "mappings", "merge-keys"])
def test_billion_laughs_is_refused_fast_and_small(text: str) -> None:
    tracemalloc.start()
    start = time.perf_counter()
    doc = load(text)
    elapsed = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert doc.data is None
    assert any("aliases expand to more than" in m for m in messages(doc)), messages(doc)
    assert elapsed < 0.1, elapsed
    assert peak < 5 * 1024 * 1024, peak


def test_aliases_within_the_budget_are_fine() -> None:
    """Anchors for shared blocks are legitimate: 100 jobs reusing one ``retries`` block."""
    text = "apiVersion: cronfile/v1\nx-retries: &r {max: 3, backoff: 30s}\njobs:\n" + "".join(
        f"  j{i}: {{command: x, schedule: '@daily', retries: *r}}\n" for i in range(100))
    doc = load(text)
    assert doc.problems == []
    assert doc.data["jobs"]["j99"]["retries"] == {"max": 3, "backoff": "30s"}


def test_the_budget_counts_nodes_reached_through_aliases() -> None:
    per = 11  # a list of ten scalars: 11 nodes
    n = ALIAS_BUDGET // per
    ok = "a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]\nb: [" + ", ".join(["*a"] * n) + "]\n"
    assert load(ok).problems == []
    over = "a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]\nb: [" + ", ".join(["*a"] * (n + 1)) + "]\n"
    assert "aliases expand to more than" in messages(load(over))[0]


@pytest.mark.parametrize("text", [
    "x: " + "[" * 200_000,
    "x: " + "{a: " * 100_000,
    "x:\n" + "- " * 200_000 + "z",
    "".join(" " * i + "k:\n" for i in range(0, 2000, 2)) + " " * 2000 + "v",
], ids=["flow-sequences", "flow-mappings", "block-sequences", "block-mappings"])
def test_deep_nesting_is_refused_fast(text: str) -> None:
    """libyaml's scanner is quadratic in flow depth and PyYAML's composer recurses in C
    (a segfault at 50,000 levels): the reader stops at 64 levels after a few events."""
    start = time.perf_counter()
    doc = load(text)
    assert time.perf_counter() - start < 0.5
    assert messages(doc) == ["nested deeper than 64 levels"]
    assert doc.data is None


def test_a_huge_file_is_refused_before_it_is_parsed() -> None:
    exactly = b"a: b\n" + b"#" * (MAX_FILE_BYTES - 6) + b"\n"
    assert len(exactly) == MAX_FILE_BYTES
    assert load(exactly).problems == []
    doc = load(exactly + b"\n")
    assert doc.problems[0].message.startswith(f"file is {MAX_FILE_BYTES + 1} bytes; the limit")


def test_loader_refuses_a_huge_file_without_reading_it(tmp_path: Path) -> None:
    big = tmp_path / "big.yaml"
    with big.open("wb") as f:
        f.truncate(50 * 1024 * 1024 * 1024)  # sparse: 50 GiB that are never read
    result = load_schedules(tmp_path)
    assert [p.message for p in result.problems] == [
        f"file is {50 * 1024 ** 3} bytes; the limit is 1048576 (1 MiB): split it into several files"]


def test_a_fifo_is_not_read(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe.yaml")  # a plain read would block forever
    result = load_schedules(tmp_path)
    assert [p.message for p in result.problems] == ["not a regular file"]


def test_symlink_loops_and_broken_links_are_reported(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").symlink_to(tmp_path / "b.yaml")
    (tmp_path / "b.yaml").symlink_to(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").symlink_to(tmp_path / "missing.yaml")
    result = load_schedules(tmp_path)
    assert sorted((Path(p.file).name, p.message.split(" (")[0]) for p in result.problems) == [
        ("a.yaml", "symlink loop"), ("b.yaml", "symlink loop"), ("c.yaml", "broken symlink")]


def test_a_long_after_chain_does_not_hit_the_recursion_limit(tmp_path: Path) -> None:
    jobs = "".join(f"  j{i}: {{command: x, after: j{i - 1}}}\n" for i in range(1, 3000))
    (tmp_path / "chain.yaml").write_text(
        "apiVersion: cronfile/v1\njobs:\n  j0: {command: x, schedule: '@daily'}\n" + jobs)
    result = load_schedules(tmp_path)
    assert result.problems == []
    assert result.state is not None and len(result.state.jobs) == 3000
    (tmp_path / "chain.yaml").write_text(
        "apiVersion: cronfile/v1\njobs:\n  j0: {command: x, after: j2999}\n" + jobs)
    result = load_schedules(tmp_path)
    assert [p.message.split(" -> ")[:2] for p in result.problems] == [["cycle: j0", "j2999"]]


# --- tags construct nothing ----------------------------------------------------------------


@pytest.mark.parametrize("value", [
    "!!python/object/apply:os.system ['exit 3']",
    "!!python/object/new:os.system ['exit 3']",
    "!!python/name:os.system",
    "!!python/module:os",
    "!!python/tuple [1, 2]",
    "!!binary aGVsbG8=",
    "!!set {a, b}",
    "!!omap [a: 1]",
    "!!pairs [a: 1]",
    "!custom value",
    "!<tag:example.com,2000:x> value",
])
def test_no_tag_constructs_anything(value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    called: list[object] = []
    monkeypatch.setattr(os, "system", lambda *a: called.append(a) or 0)
    doc = load(f"key: {value}\nother: fine\n")
    assert called == []
    assert any("is not allowed (no YAML tags are)" in m for m in messages(doc)), messages(doc)
    assert doc.data == {"key": None, "other": "fine"}


def test_core_tags_are_allowed() -> None:
    doc = load("a: !!str 123\nb: !!int '42'\nc: !!float '1.5'\nd: !!bool 'yes'\ne: ! 12\n"
               "f: !!int nope\n")
    assert doc.data == {"a": "123", "b": 42, "c": 1.5, "d": True, "e": "12", "f": None}
    assert messages(doc) == ["'nope' cannot be read as !!int"]


# --- keys ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("key", "kind"), [
    ("on", "boolean"), ("off", "boolean"), ("yes", "boolean"), ("no", "boolean"),
    ("True", "boolean"), ("true", "boolean"), ("1", "number"), ("0x1f", "number"),
    ("1.5", "number"), ("~", "null"), ("null", "null"), ("2026-01-01", "timestamp"),
])
def test_non_string_keys_are_refused_and_located(key: str, kind: str) -> None:
    doc = load(f"outer:\n  fine: 1\n  {key}: x\n")
    assert [(p.line, p.column, p.message) for p in doc.problems] == [
        (3, 3, f"key {key!r} is read by YAML as a {kind}, not a string; quote it: '{key}':")]


def test_quoted_keys_are_strings() -> None:
    doc = load("'on': 1\n\"no\": 2\n'1': 3\n")
    assert doc.problems == []
    assert doc.data == {"on": 1, "no": 2, "1": 3}


def test_complex_keys_are_refused() -> None:
    doc = load("? [a, b]\n: 1\n? {a: b}\n: 2\n")
    assert messages(doc) == ["keys must be plain strings"] * 2


def test_duplicate_keys_name_both_lines_at_any_depth() -> None:
    doc = load("a:\n  b:\n    - c: 1\n      d: 2\n      c: 3\na: 4\n")
    assert [(p.line, p.column, p.path, p.message) for p in doc.problems] == [
        (5, 7, "a.b[0].c", "duplicate key 'c' (first at line 3; YAML would silently keep the last)"),
        (6, 1, "a", "duplicate key 'a' (first at line 1; YAML would silently keep the last)"),
    ]
    assert doc.data == {"a": {"b": [{"c": 1, "d": 2}]}}


def test_merge_keys_follow_yaml() -> None:
    doc = load("base: &b {x: 1, y: 2}\nmore: &m {y: 3, z: 4}\n"
               "job:\n  <<: [*b, *m]\n  x: 0\n")
    assert doc.problems == []
    assert doc.data["job"] == {"x": 0, "y": 2, "z": 4}


def test_anchor_defined_twice_and_undefined_alias() -> None:
    assert messages(load("a: &x 1\nb: &x 2\n")) == ["anchor &x is defined twice (first at line 1)"]
    assert messages(load("a: *nope\n")) == ["alias *nope names no anchor (define &nope before it)"]


# --- encodings and positions ---------------------------------------------------------------


def test_utf8_bom_crlf_and_non_ascii_positions() -> None:
    doc = load("\ufeffa: 1\r\nb:\r\n  \u00e9t\u00e9: x\r\n  c: 2\r\n  c: 3\r\n")
    assert doc.data == {"a": 1, "b": {"\u00e9t\u00e9": "x", "c": 2}}
    assert [(p.line, p.column) for p in doc.problems] == [(5, 3)]
    assert doc.mark(("b", "\u00e9t\u00e9")) == Mark(3, 3)


@pytest.mark.parametrize(("raw", "where"), [
    (b"a: 1\nb: \xff\n", (2, 4)),
    (b"a: \xc3\xa9\xe9\n", (1, 5)),  # the column counts characters, not bytes
    ("\ufeffa: 1\n".encode("utf-16"), (1, 1)),
])
def test_not_utf8_is_located(raw: bytes, where: tuple[int, int]) -> None:
    doc = load(raw)
    assert len(doc.problems) == 1
    assert (doc.problems[0].line, doc.problems[0].column) == where
    assert "not UTF-8" in doc.problems[0].message


def test_tabs_are_reported_on_every_line() -> None:
    doc = load("a:\n\tb: 1\nc:\n  \td: 2\ne: 'x\ty'\n")
    assert [(p.line, p.column) for p in doc.problems] == [(2, 1), (4, 3)]


# --- property tests --------------------------------------------------------------------------

# NEL and the Unicode line separators are excluded: PyYAML's emitter writes them inside
# single quotes, where YAML folds them into a space (both loaders then read " ").
texts = st.text(st.characters(blacklist_characters="\x85\u2028\u2029",
                              blacklist_categories=("Cs",)), max_size=30)
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False), texts,
    st.sampled_from(["on", "off", "yes", "no", "~", "null", "<<", "=", "2026-01-01", "0x1f",
                     "1:30", "*/5 * * * *", "@daily", "!tag", "&anchor", "- x", "a: b", "#"]),
)
keys = st.one_of(texts, st.sampled_from(["on", "no", "yes", "<<", "1", "null"]))
documents = st.dictionaries(keys, st.recursive(
    scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                     st.dictionaries(keys, inner, max_size=4)),
    max_leaves=20), max_size=6)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(documents, st.sampled_from([None, False, True]))
def test_reads_what_the_safe_loader_reads(data: dict[str, Any], flow: bool | None) -> None:
    """Any document PyYAML writes is read back unchanged, exactly as yaml.safe_load reads
    it, with no problem; and every key's recorded line holds that key."""
    text = yaml.safe_dump(data, default_flow_style=flow, allow_unicode=True, sort_keys=False)
    doc = load(text)
    assert doc.problems == []
    assert doc.data == data == yaml.load(text, Loader=yaml.CSafeLoader)
    if flow is False:
        lines = text.splitlines()
        for path in doc.marks:
            if path and isinstance(path[-1], str) and path[-1] and "\n" not in path[-1] and \
                    path[-1].isprintable() and path[-1].strip() == path[-1]:
                m = doc.mark(path)
                assert path[-1] in lines[m.line - 1] or "'" in lines[m.line - 1] or \
                    '"' in lines[m.line - 1], (path, m, text)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=300), st.binary(max_size=300)))
def test_any_input_gives_data_or_problems_never_an_exception(raw: str | bytes) -> None:
    doc = load(raw)
    assert doc.data is None or isinstance(doc.data, dict)
    for p in doc.problems:
        assert p.line >= 1 and p.column >= 1 and p.message


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(["apiVersion: cronfile/v1", "jobs:", "  a:", "  b:",
                                 "    command: x", "    command: [x, y]", "    schedule: '@daily'",
                                 "    timeout: 5m", "    on: x", "    <<: *d", "defaults: &d",
                                 "  timeout: 1h", "    after: a", "  - x", "- y", "---", "  ? a",
                                 "\t", "    env: {A: 1}", "    retries: {max: 2}", "&x a: b"]),
                max_size=12))
def test_line_soup_never_raises(lines: list[str]) -> None:
    """Schedule-shaped fragments in any order: the whole loader reports, never raises."""
    from cronfile.schedules.loader import load_file

    result = load_file("f.yaml", "\n".join(lines).encode())
    for p in result.problems:
        assert p.line >= 1 and p.column >= 1


# --- the fast schema check agrees with jsonschema ---------------------------------------------

GOOD_JOB = {"command": ["/bin/true"], "schedule": "0 2 * * *"}
VALUES = [None, True, 0, -1, 1, 70000, 1.5, math.inf, "", "x", "10m", "10 minutes", "64KiB",
          "Bad_Name", "ok-name", [], [""], ["", "x"], ["x", ""], ["x", 3], {}, {"a": 1},
          {"from_env": "A"}, {"from_file": "/a", "from_env": "B"}, "https://x", "forbid",
          "one", "daemon", "always", ["failure"], ["failure", "failure"], ["success"],
          [{"a": 1}, {"a": 1}], [1, 1.0], [1, True], [3, 255], [0], [[1], [1]], ["a", "a"]]
FIELDS = sorted(schema()["$defs"]["job"]["properties"])


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(FIELDS), st.sampled_from(VALUES), st.sampled_from(["job", "defaults"]))
def test_fast_check_agrees_with_jsonschema(key: str, value: Any, where: str) -> None:
    """fastjsonschema decides alone whether a file is valid: it must agree with jsonschema
    (it did not: it knows no 2020-12 and ignored ``prefixItems``)."""
    document: dict[str, Any] = {"apiVersion": "cronfile/v1", "jobs": {"a": dict(GOOD_JOB)}}
    if where == "job":
        document["jobs"]["a"][key] = copy.deepcopy(value)
    else:
        document["defaults"] = {key: copy.deepcopy(value)}
    reference = jsonschema.Draft202012Validator(schema()).is_valid(document)
    assert is_valid(document) == reference, (key, value, where)


def test_fast_check_is_compiled_once() -> None:
    assert _fast_check() is _fast_check()
