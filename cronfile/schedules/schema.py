"""The JSON Schema of schedule files, and its errors turned into messages with line numbers.

The schema (``schema/cronfile-v1.json``) is the one description of the file format: editors
use it for completion, ``cronfile schema`` prints it, and the loader checks every file
against it here. jsonschema reports a path into the data; :class:`~cronfile.schedules.yamlsafe.YamlDoc`
knows the line of every path, so each message lands on the offending key.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import fastjsonschema

from cronfile.schedules.problems import did_you_mean
from cronfile.schedules.yamlsafe import YamlDoc

if TYPE_CHECKING:
    import jsonschema
    from jsonschema.exceptions import ValidationError

SUPPORTED_VERSIONS = ("cronfile/v1",)
_JSON_TYPES = {
    dict: "a mapping", list: "a list", str: "a string", bool: "a boolean",
    int: "an integer", float: "a number", type(None): "null",
}
_TYPE_NAMES = {
    "object": "a mapping", "array": "a list", "string": "a string", "integer": "an integer",
    "number": "a number", "boolean": "a boolean (true/false)", "null": "null",
}


def schema_text() -> str:
    """The schema exactly as shipped (``cronfile schema`` prints this)."""
    beside = Path(__file__).with_name("cronfile-v1.json")
    if beside.is_file():  # the usual install; importlib.resources costs 8 ms to import
        return beside.read_text("utf-8")
    from importlib import resources

    return resources.files("cronfile.schedules").joinpath("cronfile-v1.json").read_text("utf-8")


@functools.cache
def schema() -> dict[str, Any]:
    return dict(json.loads(schema_text()))


@functools.cache
def _validator() -> jsonschema.Draft202012Validator:
    import jsonschema  # only files that fail need it: importing it costs ~0.1 s per run

    return jsonschema.Draft202012Validator(schema())


_DOCUMENTATION = ("description", "markdownDescription", "examples", "title", "default")
_SCHEMA_MAPS = ("properties", "$defs", "patternProperties", "dependentSchemas")


def _for_fastjsonschema(node: Any) -> Any:
    """The schema as fastjsonschema reads it correctly: draft 7 instead of 2020-12.

    fastjsonschema knows no 2020-12: it silently ignored ``prefixItems``, so
    ``command: ["", "x"]`` passed the fast check while jsonschema refused it. Here
    ``prefixItems``/``items`` become draft 7's ``items`` (a list)/``additionalItems``;
    ``const`` becomes a one-value ``enum`` (fastjsonschema's short error code has no
    ``const``); annotations that do not validate are dropped, so the generated code (which
    copies sub-schemas) is small. A test checks that both validators agree.
    """
    if isinstance(node, list):
        return [_for_fastjsonschema(v) for v in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DOCUMENTATION:
            continue
        if key in _SCHEMA_MAPS and isinstance(value, dict):
            out[key] = {name: _for_fastjsonschema(sub) for name, sub in value.items()}
        elif key == "$schema":
            out[key] = "http://json-schema.org/draft-07/schema#"
        elif key == "const":
            out["enum"] = [value]
        elif key == "enum":
            out[key] = value
        elif key == "prefixItems":
            out["items"] = [_for_fastjsonschema(v) for v in value]
        elif key == "items" and "prefixItems" in node:
            out["additionalItems"] = _for_fastjsonschema(value)
        else:
            out[key] = _for_fastjsonschema(value)
    return out


@functools.cache
def _fast_check() -> Any:
    """The same schema compiled to Python by fastjsonschema: ~20x faster than jsonschema on
    a valid file, but it says only valid or not, so jsonschema runs only on files that
    fail, to list every error. Compiling costs ~20 ms per run (0.14 s with the schema as
    written); defaults are never filled in, and ``format`` is not checked, exactly as
    jsonschema does by default, so the two agree on what is valid."""
    return fastjsonschema.compile(_for_fastjsonschema(schema()), use_default=False,
                                  use_formats=False, detailed_exceptions=False)


def is_valid(data: Any) -> bool:
    try:
        _fast_check()(data)
    except Exception:  # invalid, or data the generated code did not expect:
        return False  # either way jsonschema then says exactly what is wrong
    return True


def check_document(doc: YamlDoc) -> set[tuple[str | int, ...]]:
    """Append a problem to ``doc`` for every schema violation; return the paths that failed.

    A wrong ``apiVersion`` is reported alone: the rest of the file may follow another format.
    A missing one (or a misspelled key, ``apiversion:``) is reported, and the rest of the
    file is checked as the current version: a typo in the first line hides nothing else.
    """
    data = doc.data
    version = data.get("apiVersion") if isinstance(data, dict) else None
    failed: set[tuple[str | int, ...]] = set()
    if version is None and isinstance(data, dict):
        data = _as_current_version(doc, data)
        failed.add(("apiVersion",))
    elif version not in SUPPORTED_VERSIONS:
        supported = ", ".join(SUPPORTED_VERSIONS)
        doc.error(("apiVersion",), f"{version!r} is not supported (supported: {supported})")
        return {()}
    if is_valid(data):
        return failed
    for error in _validator().iter_errors(data):
        path = tuple(error.absolute_path)
        failed.add(path)
        if path in doc.voided:
            continue  # the YAML problem that emptied this value is reported already
        for where, message in _describe(error):
            doc.error(where, message)
            failed.add(where)
    return failed


def _as_current_version(doc: YamlDoc, data: dict[str, Any]) -> dict[str, Any]:
    """Report the missing ``apiVersion`` (at a key that looks like a misspelling of it,
    with a did-you-mean) and return the data to check the rest with: that key left out,
    the current version put in."""
    spelled = [k for k in data if isinstance(k, str) and
               (k.lower() == "apiversion" or did_you_mean(k, ["apiVersion"]))]
    if spelled:
        for key in spelled:
            doc.error((key,), f"unknown key {key!r} (did you mean 'apiVersion'?)")
    else:
        doc.error((), f"missing apiVersion (supported: {', '.join(SUPPORTED_VERSIONS)})")
    rest = {k: v for k, v in data.items() if k not in spelled}
    rest["apiVersion"] = SUPPORTED_VERSIONS[-1]
    return rest


def _describe(error: ValidationError) -> list[tuple[tuple[str | int, ...], str]]:
    """(path, message) pairs for one jsonschema error, phrased for a person.

    The path is shown beside the message by the caller, so messages do not repeat it.
    """
    path = tuple(error.absolute_path)
    kind = error.validator
    value = error.validator_value
    if "propertyNames" in error.schema_path and isinstance(error.instance, str):
        what = {"jobs": "job name", "agents": "agent name", "env": "environment variable name",
                "labels": "label name"}.get(str(path[-1]) if path else "", "name")
        if what == "environment variable name":
            return [((*path, error.instance), f"{error.instance!r} is not a valid {what}: "
                     "letters, digits and '_', not starting with a digit")]
        if what == "label name":
            return [((*path, error.instance), f"{error.instance!r} is not a valid {what}: "
                     "letters, digits, '-', '_', '.' and '/', starting and ending with a "
                     "letter or digit, at most 63 characters")]
        return [((*path, error.instance), f"{error.instance!r} is not a valid {what}: use "
                 "lowercase letters, digits and '-', starting and ending with a letter or "
                 "digit, at most 63 characters")]
    if kind == "additionalProperties" and isinstance(error.instance, dict):
        known = list(error.schema.get("properties", {}))
        extra = [k for k in error.instance if k not in known]
        return [((*path, k), f"unknown key {k!r}{did_you_mean(k, known)}") for k in extra]
    if kind == "required":
        missing = error.message.split("'")[1] if "'" in error.message else error.message
        return [(path, f"missing the required key {missing!r}")]
    if kind == "type":
        wanted_list = value if isinstance(value, list) else [value]
        expected = " or ".join(_TYPE_NAMES.get(str(w), str(w)) for w in wanted_list)
        return [(path, f"must be {expected}, not {_type_name(error.instance)}"
                 f"{_mapping_hint(path, error.instance)}")]
    if kind == "enum":
        choices = [str(c) for c in value]
        return [(path, f"{error.instance!r} is not one of {', '.join(choices)}"
                 f"{did_you_mean(str(error.instance), choices)}")]
    if kind == "const":
        return [(path, f"must be {value!r}")]
    if kind == "pattern":
        if error.validator_value == "\\S":
            return [(path, "must not be blank")]
        return [(path, f"{error.instance!r} {_pattern_hint(error)}")]
    if kind in ("minItems", "minLength", "minProperties") and value == 1:
        return [(path, "must not be empty")]
    if kind == "maxProperties" and value == 1 and "from_file" in error.schema.get("properties", {}):
        return [(path, "give exactly one of from_file, from_env")]
    if kind == "minimum":
        return [(path, f"must be at least {value}, not {error.instance!r}")]
    if kind == "maximum":
        return [(path, f"must be at most {value}, not {error.instance!r}")]
    if kind == "maxLength":
        return [(path, f"is longer than {value} characters")]
    if kind == "uniqueItems":
        return [(path, "lists the same item twice")]
    if kind in ("oneOf", "anyOf"):
        return [(path, _alternatives(error))]
    return [(path, error.message)]


# A mapping given as its one most common field: ``retries: 3`` means ``retries: {max: 3}``.
_SHORT_FORMS = {"retries": "max", "output": "keep", "trigger": "event"}


def _mapping_hint(path: tuple[str | int, ...], value: Any) -> str:
    key = path[-1] if path else None
    inner = _SHORT_FORMS.get(key) if isinstance(key, str) else None
    if inner is None or isinstance(value, dict | list | bool) or value is None:
        return ""
    return f" (write {key}: {{{inner}: {value}}})"


def _type_name(value: Any) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


def _pattern_hint(error: ValidationError) -> str:
    description = str(error.schema.get("description", ""))
    pattern = str(error.validator_value)
    if "ms|s|m|h|d|w" in pattern:
        return "is not a duration (write e.g. 90s, 10m, 1h30m, 500ms)"
    if "KiB" in pattern:
        return "is not a size (write e.g. 64KiB, 1MiB, 512B)"
    if "[-a-z0-9]" in pattern:
        return ("is not a valid name: lowercase letters, digits and '-', starting and ending "
                "with a letter or digit, at most 63 characters")
    if "(?!/)" in pattern:  # a policy rule's path
        return ("is not a directory of the schedules tree: write it relative to the tree "
                "(billing/), without '.' or '..' components, or \"\" for every file")
    if "A-Za-z_" in pattern:
        return "is not a valid environment variable name"
    if pattern == "^https?://":
        return "is not an http:// or https:// URL"
    if pattern in ("^[^\\s:]+$", "^[^\\s:]*$"):  # run_as; a policy's run_as may list ""
        return "is not a user name (no spaces or ':')"
    if "[0-9]{4}-[0-9]{2}-[0-9]{2}" in pattern:  # a calendar's dates
        return "is not a date (write YYYY-MM-DD, e.g. 2026-12-24)"
    if "A-Za-z0-9]([-A-Za-z0-9_./]" in pattern:
        return ("is not a valid label name: letters, digits, '-', '_', '.' and '/', starting "
                "and ending with a letter or digit")
    # A pattern this function does not know yet: say what the field is for, never the
    # regular expression itself (a test checks that every pattern in the schema is known).
    return "is not in the expected form" + (f" ({description})" if description else "")


# The schema's patterns that get a message in words (see _pattern_hint).
KNOWN_PATTERN_MARKERS = ("ms|s|m|h|d|w", "KiB", "[-a-z0-9]", "A-Za-z_", "^https?://",
                         "^[^\\s:]+$", "A-Za-z0-9]([-A-Za-z0-9_./]", "\\S", "(?!/)",
                         "^[^\\s:]*$", "[0-9]{4}-[0-9]{2}-[0-9]{2}")


def _alternatives(error: ValidationError) -> str:
    """A oneOf/anyOf failed: say what the closest alternative wanted."""
    context = list(error.context or [])
    if context and all(e.validator == "type" for e in context):
        wanted: list[str] = []
        for e in context:
            for w in e.validator_value if isinstance(e.validator_value, list) else [e.validator_value]:
                label = _TYPE_NAMES.get(str(w), str(w))
                if label not in wanted:
                    wanted.append(label)
        return f"must be {' or '.join(wanted)}, not {_type_name(error.instance)}"
    from jsonschema.exceptions import best_match

    best = best_match(context) if context else None
    if best is not None:
        sub = _describe(best)
        if sub:
            return sub[0][1]
    return error.message
