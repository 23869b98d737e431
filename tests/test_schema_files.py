"""The JSON Schema of a schedule file, and the schedule files shipped with the repository.

These tests need neither the loader nor the center: they check the schema as a document
(valid, documented for editor hover text, its examples valid) and that the demo and the
examples are well-formed against it and against the cross-file rules a reader would rely on.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema import Draft202012Validator

REPO = Path(__file__).resolve().parent.parent
SCHEMA_PATH = REPO / "schema" / "cronfile-v1.json"
PACKAGED_SCHEMA = REPO / "cronfile" / "schedules" / "cronfile-v1.json"

SCHEDULE_DIRS = [REPO / "schedules", *sorted((REPO / "examples").glob("*/schedules"))]
SCHEDULE_FILES = sorted(
    p for d in SCHEDULE_DIRS for p in d.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file()
)


def _rel(path: Path) -> str:
    return str(path.relative_to(REPO))


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    return json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def validator(schema: dict[str, Any]) -> Draft202012Validator:
    return Draft202012Validator(schema)


def _properties(node: Any, path: str = "#") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every (path, schema) declared under a ``properties`` keyword, at any depth."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "properties" and isinstance(value, dict):
                for name, sub in value.items():
                    yield f"{path}/properties/{name}", sub
            yield from _properties(value, f"{path}/{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _properties(value, f"{path}/{i}")


# --- the schema as a document ---------------------------------------------------------------


def test_schema_is_valid_draft_2020_12(schema: dict[str, Any]) -> None:
    Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["$id"] == "https://cronfile.dev/schema/cronfile-v1.json"
    assert schema["title"] and schema["description"]


def test_schema_is_pretty_printed_with_two_spaces(schema: dict[str, Any]) -> None:
    text = SCHEMA_PATH.read_text(encoding="utf-8")
    assert text == json.dumps(schema, indent=2, ensure_ascii=False) + "\n"


def test_packaged_schema_is_the_same_file() -> None:
    assert PACKAGED_SCHEMA.resolve() == SCHEMA_PATH.resolve()


def test_every_property_has_description_and_examples(schema: dict[str, Any]) -> None:
    props = list(_properties(schema))
    reached = {path for path, _ in props}
    assert {
        "#/properties/apiVersion",
        "#/$defs/job/properties/timeout",
        "#/$defs/defaults/properties/retries",
        "#/$defs/retries/properties/retry_on_exit_codes",
        "#/$defs/ssh/properties/known_hosts",
        "#/$defs/envValue/properties/from_file",
    } <= reached, "the walk missed nested properties"
    missing = [
        f"{path}: {key}"
        for path, sub in props
        for key in ("description", "examples")
        if not sub.get(key)
    ]
    assert not missing, "\n".join(missing)
    not_lists = [path for path, sub in props if not isinstance(sub["examples"], list)]
    assert not not_lists, not_lists


def test_every_object_forbids_unknown_keys(schema: dict[str, Any]) -> None:
    def walk(node: Any, path: str) -> Iterator[str]:
        if isinstance(node, dict):
            if "properties" in node and node.get("additionalProperties") is not False:
                yield path
            for key, value in node.items():
                yield from walk(value, f"{path}/{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                yield from walk(value, f"{path}/{i}")

    assert list(walk(schema, "#")) == []


def test_examples_in_the_schema_are_valid(schema: dict[str, Any]) -> None:
    """Hover text that shows an invalid example would teach the wrong thing."""
    bad = []
    for path, sub in [("#", schema), *_properties(schema)]:
        standalone = {"$defs": schema["$defs"], **{k: v for k, v in sub.items() if k != "$defs"}}
        check = Draft202012Validator(standalone)
        for example in sub.get("examples", []):
            for error in check.iter_errors(example):
                bad.append(f"{path}: {example!r}: {error.message}")
    for name, sub in schema["$defs"].items():
        check = Draft202012Validator({"$defs": schema["$defs"], **sub})
        for example in sub.get("examples", []):
            for error in check.iter_errors(example):
                bad.append(f"$defs/{name}: {example!r}: {error.message}")
    assert not bad, "\n".join(bad)


def test_defaults_cover_the_job_fields_except_the_per_job_ones(schema: dict[str, Any]) -> None:
    job = set(schema["$defs"]["job"]["properties"])
    defaults = set(schema["$defs"]["defaults"]["properties"])
    per_job = {"command", "schedule", "trigger", "after", "kind", "replicas", "description",
               "run_at", "active"}  # a one-shot time and a window belong to one job
    assert defaults == job - per_job


# --- the shipped schedule files -------------------------------------------------------------


def test_there_are_schedule_files_to_check() -> None:
    assert REPO / "schedules" / "demo.yaml" in SCHEDULE_FILES
    example_dirs = {
        p.relative_to(REPO / "examples").parts[0] for p in SCHEDULE_FILES if "examples" in p.parts
    }
    assert {
        "single-host",
        "fleet",
        "daemons",
        "events-and-chains",
        "github-actions",
    } <= example_dirs


@pytest.mark.parametrize("path", SCHEDULE_FILES, ids=_rel)
def test_schedule_file_is_valid(path: Path, validator: Draft202012Validator) -> None:
    document = yaml.safe_load(path.read_text(encoding="utf-8"))
    errors = [
        f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
        for e in validator.iter_errors(document)
    ]
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("path", SCHEDULE_FILES, ids=_rel)
def test_schedule_file_points_editors_at_the_schema(path: Path) -> None:
    first = path.read_text(encoding="utf-8").splitlines()[0]
    match = re.fullmatch(r"# yaml-language-server: \$schema=(\S+)", first)
    assert match, f"first line is {first!r}"
    assert (path.parent / match.group(1)).resolve() == SCHEMA_PATH.resolve()


@pytest.mark.parametrize("directory", SCHEDULE_DIRS, ids=_rel)
def test_schedules_dir_is_consistent_across_files(directory: Path) -> None:
    """The cross-file rules the loader enforces, checked here so the examples never rot.

    Names are global per directory; a cron job has exactly one of schedule/trigger/after and a
    daemon none; targets name declared agents (or ``local``); ``after`` names existing jobs.
    """
    jobs: dict[str, tuple[Path, dict[str, Any]]] = {}
    agents: dict[str, Path] = {}
    problems: list[str] = []
    for path in sorted(p for p in directory.rglob("*") if p.suffix in (".yaml", ".yml")):
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
        defaults = document.get("defaults", {})
        for name in document.get("agents", {}) or {}:
            if name in agents or name == "local":
                problems.append(f"{_rel(path)}: agent {name} declared twice")
            agents[name] = path
        for name, job in (document.get("jobs", {}) or {}).items():
            if name in jobs:
                problems.append(f"{_rel(path)}: job {name} also in {_rel(jobs[name][0])}")
            merged = {**copy.deepcopy(defaults), **job}
            jobs[name] = (path, merged)
    for name, (path, job) in jobs.items():
        where = f"{_rel(path)}: job {name}"
        starts = [key for key in ("schedule", "trigger", "after") if key in job]
        if job.get("kind", "cron") == "daemon":
            if starts:
                problems.append(f"{where}: a daemon has {starts}")
        elif len(starts) != 1:
            problems.append(f"{where}: needs exactly one of schedule/trigger/after, has {starts}")
        for agent in job.get("targets", {}).get("agents", []):
            if agent != "local" and agent not in agents:
                problems.append(f"{where}: targets undeclared agent {agent}")
        after = job.get("after", [])
        for upstream in [after] if isinstance(after, str) else after:
            if upstream not in jobs:
                problems.append(f"{where}: after unknown job {upstream}")
    assert not problems, "\n".join(problems)


# --- bad documents are rejected ---------------------------------------------------------------

GOOD_JOB = {"schedule": "0 2 * * *", "command": ["/bin/true"]}


def _doc(**job_fields: Any) -> dict[str, Any]:
    return {"apiVersion": "cronfile/v1", "jobs": {"nightly": {**GOOD_JOB, **job_fields}}}


@pytest.mark.parametrize(
    ("document", "error_path"),
    [
        pytest.param({"jobs": {}}, "", id="missing-apiVersion"),
        pytest.param({"apiVersion": "cronfile/v2"}, "apiVersion", id="unknown-apiVersion"),
        pytest.param({"apiVersion": "cronfile/v1", "job": {}}, "", id="unknown-top-level-key"),
        pytest.param(_doc(timout="10m"), "jobs.nightly", id="unknown-job-key"),
        pytest.param(
            _doc(retries={"max": 3, "delay": "1m"}), "jobs.nightly.retries", id="unknown-nested-key"
        ),
        pytest.param(_doc(timeout="10 minutes"), "jobs.nightly.timeout", id="duration-with-words"),
        pytest.param(_doc(timeout="10"), "jobs.nightly.timeout", id="duration-string-without-unit"),
        pytest.param(_doc(timeout=-5), "jobs.nightly.timeout", id="negative-duration"),
        pytest.param(_doc(output={"keep": "64 kb"}), "jobs.nightly.output.keep", id="bad-size"),
        pytest.param(
            {"apiVersion": "cronfile/v1", "jobs": {"Bad_Name": GOOD_JOB}}, "jobs", id="bad-job-name"
        ),
        pytest.param(
            {"apiVersion": "cronfile/v1", "agents": {"-web": {}}}, "agents", id="bad-agent-name"
        ),
        pytest.param(
            {"apiVersion": "cronfile/v1", "jobs": {"a" * 64: GOOD_JOB}}, "jobs", id="name-too-long"
        ),
        pytest.param(_doc(concurrency="skip"), "jobs.nightly.concurrency", id="bad-concurrency"),
        pytest.param(
            _doc(targets={"strategy": "random"}), "jobs.nightly.targets.strategy", id="bad-strategy"
        ),
        pytest.param(_doc(kind="service"), "jobs.nightly.kind", id="bad-kind"),
        pytest.param(_doc(command=[]), "jobs.nightly.command", id="empty-argv"),
        pytest.param(_doc(command=""), "jobs.nightly.command", id="empty-shell-string"),
        pytest.param(
            _doc(command=["/bin/echo", 3]), "jobs.nightly.command.1", id="argv-not-strings"
        ),
        pytest.param(_doc(schedule=[]), "jobs.nightly.schedule", id="empty-schedule-list"),
        pytest.param(_doc(env={"PORT": 8080}), "jobs.nightly.env.PORT", id="env-value-not-string"),
        pytest.param(
            _doc(env={"DEBUG": True}), "jobs.nightly.env.DEBUG", id="env-value-yaml-boolean"
        ),
        pytest.param(_doc(env={"1BAD": "x"}), "jobs.nightly.env", id="bad-env-name"),
        pytest.param(
            _doc(env={"TOKEN": {"from_file": "/a", "from_env": "B"}}),
            "jobs.nightly.env.TOKEN",
            id="secret-with-two-sources",
        ),
        pytest.param(_doc(env={"TOKEN": {}}), "jobs.nightly.env.TOKEN", id="secret-with-no-source"),
        pytest.param(_doc(replicas=0), "jobs.nightly.replicas", id="zero-replicas"),
        pytest.param(
            _doc(retries={"factor": 0.5}), "jobs.nightly.retries.factor", id="shrinking-backoff"
        ),
        pytest.param(
            _doc(trigger={"delay": "1m"}), "jobs.nightly.trigger", id="trigger-without-event"
        ),
        pytest.param(
            _doc(notify={"when": ["success"]}), "jobs.nightly.notify.when.0", id="bad-notify-when"
        ),
        pytest.param(_doc(suspend="yes"), "jobs.nightly.suspend", id="suspend-not-boolean"),
        pytest.param(
            {"apiVersion": "cronfile/v1", "defaults": {"command": "true"}},
            "defaults",
            id="command-in-defaults",
        ),
        pytest.param(
            {"apiVersion": "cronfile/v1", "agents": {"web-1": {"ssh": {"port": 22}}}},
            "agents.web-1.ssh",
            id="ssh-without-host",
        ),
        pytest.param(
            {
                "apiVersion": "cronfile/v1",
                "agents": {"web-1": {"ssh": {"host": "h", "port": 70000}}},
            },
            "agents.web-1.ssh.port",
            id="ssh-port-out-of-range",
        ),
        pytest.param(
            {"apiVersion": "cronfile/v1", "agents": {"web-1": {"labels": {"gpu": True}}}},
            "agents.web-1.labels.gpu",
            id="label-value-not-string",
        ),
    ],
)
def test_bad_document_is_rejected(
    document: dict[str, Any], error_path: str, validator: Draft202012Validator
) -> None:
    paths = {".".join(map(str, e.absolute_path)) for e in validator.iter_errors(document)}
    assert error_path in paths, f"errors at {paths or 'nowhere'}"


@pytest.mark.parametrize(
    "value",
    ["90s", "10m", "1h30m", "500ms", "1.5h", "2d", "1w", "0s", 0, 30],
)
def test_durations_accepted(value: object, validator: Draft202012Validator) -> None:
    assert validator.is_valid(_doc(timeout=value))


@pytest.mark.parametrize(
    "value", ["64KiB", "1MiB", "2GiB", "512B", "10KB", "1MB", "65536", 65536, 0]
)
def test_sizes_accepted(value: object, validator: Draft202012Validator) -> None:
    assert validator.is_valid(_doc(output={"keep": value}))


def test_the_one_of_rule_is_left_to_the_loader(validator: Draft202012Validator) -> None:
    """schedule/trigger/after exclusivity is checked by the loader, with a better message."""
    both = _doc(trigger={"event": "deploy"}, after="other")
    neither = {"apiVersion": "cronfile/v1", "jobs": {"idle": {"command": "true"}}}
    assert validator.is_valid(both)
    assert validator.is_valid(neither)
